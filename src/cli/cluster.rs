//! `sluice cluster status`: the admin API's view of the cluster as readable tables. Uses a minimal
//! HTTP/1.1 GET over a plain TCP stream, which is all the admin API needs.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Cluster id, controller, brokers and Raft groups of one node, as tables.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// A node's admin HTTP address.
    #[arg(
        long = "admin-addr",
        env = "SLUICE_ADMIN_ADDR",
        default_value = "127.0.0.1:9644",
        value_name = "HOST:PORT"
    )]
    pub admin_addr: String,
}

/// Responses larger than this are refused; the admin API's answers are small.
const RESPONSE_BYTES_MAX: usize = 16 << 20;

pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to admin API at {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > RESPONSE_BYTES_MAX {
                bail!("admin response larger than {RESPONSE_BYTES_MAX} bytes");
            }
        }
        parse_response(&buf)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("admin API at {addr} did not answer within 10 s"))?
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
    let (code, cluster) = http_get(&args.admin_addr, "/v1/cluster").await?;
    if code != 200 {
        bail!("GET /v1/cluster answered {code}: {cluster}");
    }
    let (_, raft) = http_get(&args.admin_addr, "/v1/raft").await?;
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
