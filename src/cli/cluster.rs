//! `sluice cluster status`: the admin API's view of the cluster as readable tables. Uses a minimal
//! HTTP/1.1 client over a plain TCP stream or TLS (`https://`, verified against `--admin-ca`),
//! sending the admin bearer token when `--admin-token-file` names one; that is all the admin API
//! needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Cluster id, controller, brokers and Raft groups of one node, as tables.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Where and how to reach a node's admin API.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// A node's admin HTTP address: HOST:PORT, http://HOST:PORT or https://HOST:PORT.
    #[arg(
        long = "admin-addr",
        env = "SLUICE_ADMIN_ADDR",
        default_value = "127.0.0.1:9644",
        value_name = "URL"
    )]
    pub admin_addr: String,
    /// CA certificate (PEM) the admin port's HTTPS certificate must be issued by; HTTPS is used
    /// when this is given (or the address says https://).
    #[arg(long = "admin-ca", env = "SLUICE_ADMIN_CA", value_name = "FILE")]
    pub admin_ca: Option<PathBuf>,
    /// File holding the admin API's bearer token (trimmed), sent as `Authorization: Bearer`.
    #[arg(
        long = "admin-token-file",
        env = "SLUICE_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub admin_token_file: Option<PathBuf>,
}

impl AdminArgs {
    /// Plain HTTP to `addr`, no token: the defaults of a local node.
    pub fn plain(addr: &str) -> AdminArgs {
        AdminArgs {
            admin_addr: addr.to_string(),
            admin_ca: None,
            admin_token_file: None,
        }
    }
}

/// Responses larger than this are refused; the admin API's answers are small.
const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// A client of one node's admin API.
pub struct AdminClient {
    /// `host:port` to connect to.
    addr: String,
    /// The name the server's certificate must carry (the host part of the address).
    host: String,
    tls: Option<TlsConnector>,
    token: Option<String>,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> anyhow::Result<AdminClient> {
        let raw = args.admin_addr.trim().trim_end_matches('/');
        let (https, addr) = if let Some(rest) = raw.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = raw.strip_prefix("http://") {
            if args.admin_ca.is_some() {
                bail!("--admin-ca is for https:// addresses, not {raw}");
            }
            (false, rest)
        } else {
            (args.admin_ca.is_some(), raw)
        };
        let (host, _port) = addr
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("admin address {raw}: expected HOST:PORT"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = if https {
            let ca = args.admin_ca.as_ref().ok_or_else(|| {
                anyhow!("https:// needs --admin-ca FILE (the CA that issued the admin certificate)")
            })?;
            let roots = sluice_raft::tls::load_roots(ca)?;
            let config = rustls::ClientConfig::builder_with_provider(sluice_raft::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let token = match &args.admin_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the admin token from {}", path.display()))?;
                let t = text.trim();
                if t.is_empty() {
                    bail!("{} holds no token", path.display());
                }
                Some(t.to_string())
            }
            None => None,
        };
        Ok(AdminClient {
            addr: addr.to_string(),
            host,
            tls,
            token,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request("GET", path, None).await
    }

    /// One request; a `body` is sent as JSON (mutating routes need that content type even for
    /// an empty body, so POSTs always carry it).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if method != "GET" || body.is_some() {
            let body = body.unwrap_or("");
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            head.push_str("\r\n");
        }
        let addr = &self.addr;
        let fut = async {
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("cannot connect to admin API at {addr}"))?;
            let buf = match &self.tls {
                None => exchange(tcp, head.as_bytes()).await?,
                Some(tls) => {
                    let name = ServerName::try_from(self.host.clone())
                        .with_context(|| format!("{} is not a valid server name", self.host))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .with_context(|| format!("TLS with the admin API at {addr}"))?;
                    exchange(stream, head.as_bytes()).await?
                }
            };
            parse_response(&buf)
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .map_err(|_| anyhow!("admin API at {addr} did not answer within 10 s"))?
    }
}

/// Writes the request and reads the response until the server closes the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> anyhow::Result<Vec<u8>> {
    s.write_all(request).await?;
    s.flush().await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer that closes without close_notify after a whole response: the response
            // is complete (Connection: close), so what we have is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > RESPONSE_BYTES_MAX {
            bail!("admin response larger than {RESPONSE_BYTES_MAX} bytes");
        }
    }
    Ok(buf)
}

fn parse_response(buf: &[u8]) -> anyhow::Result<(u16, Value)> {
    let text = std::str::from_utf8(buf).context("admin response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    let value = serde_json::from_str(&body).context("admin response is not JSON")?;
    Ok((status, value))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("malformed chunked body"))?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).ok_or_else(|| anyhow!("short chunk"))?;
        out.push_str(chunk);
        body = rest.get(n + 2..).unwrap_or("");
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status(args) = cmd;
    let admin = AdminClient::new(&args.admin)?;
    let (code, cluster) = admin.get("/v1/cluster").await?;
    if code != 200 {
        bail!("GET /v1/cluster answered {code}: {cluster}");
    }
    let (_, raft) = admin.get("/v1/raft").await?;
    println!("Cluster id:    {}", show(&cluster["cluster_id"]));
    println!("Node:          {}", show(&cluster["node_id"]));
    println!("Controller:    {}", show(&cluster["controller_id"]));
    println!(
        "Metadata Raft: term {}, commit index {}",
        show(&cluster["metadata_term"]),
        show(&cluster["metadata_commit_index"])
    );
    println!();
    println!(
        "{:<6} {:<6} {:<22} {:<22} {:<22}",
        "BROKER", "LIVE", "KAFKA", "ADMIN", "RAFT"
    );
    for b in cluster["brokers"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<6} {:<22} {:<22} {:<22}",
            show(&b["id"]),
            show(&b["live"]),
            show(&b["kafka_addr"]),
            show(&b["admin_addr"]),
            show(&b["raft_addr"])
        );
    }
    println!();
    println!(
        "{:<44} {:<10} {:<6} {:<7} {:<10} {:<10}",
        "RAFT GROUP", "ROLE", "TERM", "LEADER", "LAST LOG", "APPLIED"
    );
    for g in raft["groups"].as_array().into_iter().flatten() {
        println!(
            "{:<44} {:<10} {:<6} {:<7} {:<10} {:<10}",
            show(&g["group"]),
            show(&g["role"]),
            show(&g["term"]),
            show(&g["leader"]),
            show(&g["last_log_index"]),
            show(&g["applied_index"])
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"a\":1}\n";
        let (code, v) = parse_response(plain).unwrap();
        assert_eq!(code, 200);
        assert_eq!(v["a"], 1);
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"b\"\r\n3\r\n:2}\r\n0\r\n\r\n";
        let (code, v) = parse_response(chunked).unwrap();
        assert_eq!(code, 503);
        assert_eq!(v["b"], 2);
        assert!(parse_response(b"garbage").is_err());
    }
}
