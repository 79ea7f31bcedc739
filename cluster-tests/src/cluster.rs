//! Real `sluice server` processes on 127.0.0.1 with every link behind a [`Proxy`].
//!
//! Node-to-node routing: node `i` gets its own `--peers` list in which node `j`'s Raft address
//! is the proxy for the link `i -> j` (ids are the same everywhere). A connection node `i` opens
//! to node `j` therefore carries `i`'s requests to `j` forward and `j`'s answers back; blocking
//! traffic from `i` to `j` means blocking `link(i,j).fwd` and `link(j,i).back`.
//!
//! Client routing: node `i` advertises the client proxy in front of its Kafka port, so clients
//! that follow metadata to a leader go through a proxy too. The admin port is not proxied: it
//! is the harness's own view.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::{Flow, LinkMode, Proxy};

pub type NodeId = u32;

/// Enables the storage fault layer in the nodes (see `storage/src/fault.rs`).
pub const FAULTS_ENV: &str = "SLUICE_STORAGE_FAULTS";

/// Where the `sluice` binary is: `$SLUICE_BIN`, else the workspace's release build.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice")
}

/// A free port on 127.0.0.1, held until the listener is dropped, so that nothing this process
/// binds to port 0 meanwhile (the proxies) can be handed the same port. Once released, another
/// process could still take it before the node binds it: a small race we accept.
fn reserve_port(held: &mut Vec<std::net::TcpListener>) -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    held.push(l);
    Ok(port)
}

pub struct Node {
    pub id: NodeId,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub kafka: SocketAddr,
    pub raft: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    pub paused: bool,
    pub starts: u32,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub bin: PathBuf,
    pub nodes: BTreeMap<NodeId, Node>,
    /// (from, to) -> proxy in front of `to`'s Raft port, used by `from`.
    pub links: BTreeMap<(NodeId, NodeId), Proxy>,
    /// Client proxy in front of each node's Kafka port (the advertised address).
    pub clients: BTreeMap<NodeId, Proxy>,
}

impl Cluster {
    /// Reserves ports, starts the proxies; nodes are started with [`Cluster::start_all`].
    pub async fn new(n: u32, root: &Path) -> Result<Cluster> {
        let bin = sluice_bin();
        if !bin.exists() {
            bail!(
                "{} not found: run `cargo build --release -p sluice` or set SLUICE_BIN",
                bin.display()
            );
        }
        std::fs::create_dir_all(root)?;
        // Absolute, because the storage fault journal names files by the paths the node was
        // given, and the power-loss nemesis must find them whatever its own working directory.
        let root = &std::fs::canonicalize(root)
            .with_context(|| format!("resolving {}", root.display()))?;
        let mut nodes = BTreeMap::new();
        // A proxy once got a node's just-released Kafka port and the node could not start.
        let mut held = Vec::new();
        for id in 1..=n {
            let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir)?;
            nodes.insert(
                id,
                Node {
                    id,
                    data_dir: dir.join("data"),
                    log_path: dir.join("node.log"),
                    kafka: addr(reserve_port(&mut held)?),
                    raft: addr(reserve_port(&mut held)?),
                    admin: addr(reserve_port(&mut held)?),
                    child: None,
                    paused: false,
                    starts: 0,
                },
            );
        }
        let mut links = BTreeMap::new();
        let mut clients = BTreeMap::new();
        for (&to, node) in &nodes {
            for &from in nodes.keys() {
                if from != to {
                    let p = Proxy::start(&format!("raft {from}->{to}"), node.raft).await?;
                    links.insert((from, to), p);
                }
            }
            clients.insert(
                to,
                Proxy::start(&format!("client->{to}"), node.kafka).await?,
            );
        }
        drop(held);
        Ok(Cluster {
            bin,
            nodes,
            links,
            clients,
        })
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// The `--peers` list node `id` is started with.
    pub fn peers_for(&self, id: NodeId) -> String {
        self.nodes
            .values()
            .map(|n| {
                let addr = if n.id == id {
                    n.raft
                } else {
                    self.links[&(id, n.id)].listen
                };
                format!("{}@{}", n.id, addr)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Bootstrap list for clients: every client proxy.
    pub fn bootstrap(&self) -> Vec<String> {
        self.clients
            .values()
            .map(|p| p.listen.to_string())
            .collect()
    }

    pub fn start(&mut self, id: NodeId) -> Result<()> {
        let peers = self.peers_for(id);
        let advertised = self.clients[&id].listen;
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        if node.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("opening {}", node.log_path.display()))?;
        let log2 = log.try_clone()?;
        let child = Command::new(&self.bin)
            .arg("server")
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--kafka-addr", &node.kafka.to_string()])
            .args(["--advertised-kafka-addr", &advertised.to_string()])
            .args(["--raft-addr", &node.raft.to_string()])
            .args(["--admin-addr", &node.admin.to_string()])
            .args(["--peers", &peers])
            .env(
                "SLUICE_LOG",
                std::env::var("CT_NODE_LOG").unwrap_or_else(|_| "info,openraft=off".into()),
            )
            .env("NO_COLOR", "1")
            // The storage fault layer: the durability journal the power-loss nemesis reads, and
            // the injected I/O errors of the disk-fault nemesis.
            .env(FAULTS_ENV, "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        tracing::info!(node = id, pid = child.id(), "started");
        node.child = Some(child);
        node.paused = false;
        node.starts += 1;
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        for id in self.ids() {
            self.start(id)?;
        }
        Ok(())
    }

    fn signal(&self, id: NodeId, sig: i32) -> Result<()> {
        let pid = self.nodes[&id]
            .pid()
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        let pid = i32::try_from(pid)?;
        // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            bail!(
                "kill({pid}, {sig}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// kill -9 and reap.
    pub fn kill(&mut self, id: NodeId) -> Result<()> {
        if self.nodes[&id].child.is_none() {
            return Ok(());
        }
        self.signal(id, libc::SIGKILL)?;
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        if let Some(mut c) = node.child.take() {
            let _ = c.wait();
        }
        node.paused = false;
        tracing::info!(node = id, "killed");
        Ok(())
    }

    pub fn pause(&mut self, id: NodeId) -> Result<()> {
        self.signal(id, libc::SIGSTOP)?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = true;
        }
        Ok(())
    }

    pub fn resume(&mut self, id: NodeId) -> Result<()> {
        if self.nodes[&id].running() {
            self.signal(id, libc::SIGCONT)?;
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = false;
        }
        Ok(())
    }

    /// Whether a node exited on its own (a crash the harness did not cause).
    pub fn exited(&mut self) -> Vec<(NodeId, String)> {
        let mut out = Vec::new();
        for n in self.nodes.values_mut() {
            if let Some(c) = n.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    out.push((n.id, st.to_string()));
                    n.child = None;
                }
            }
        }
        out
    }

    /// Blocks (or unblocks) traffic from `from` to `to` only.
    pub fn set_one_way(&self, from: NodeId, to: NodeId, flow: Flow) {
        if let Some(p) = self.links.get(&(from, to)) {
            let mut m = p.mode();
            m.fwd = flow;
            p.set(m);
        }
        if let Some(p) = self.links.get(&(to, from)) {
            let mut m = p.mode();
            m.back = flow;
            p.set(m);
        }
    }

    /// Cuts (both ways) every pair that crosses between `a` and `b`.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.set_one_way(x, y, Flow::Block);
                self.set_one_way(y, x, Flow::Block);
            }
        }
    }

    pub fn set_all_links(&self, m: LinkMode) {
        for p in self.links.values() {
            p.set(m);
        }
    }

    /// Every link and client proxy back to pass.
    pub fn heal_network(&self) {
        for p in self.links.values().chain(self.clients.values()) {
            p.set(LinkMode::PASS);
        }
    }

    pub fn kill_all_processes(&mut self) {
        for id in self.ids() {
            let _ = self.kill(id);
        }
    }

    pub async fn admin_get(&self, id: NodeId, path: &str) -> Result<(u16, Value)> {
        http_get(self.nodes[&id].admin, path).await
    }

    /// Replaces node `id`'s injected storage faults (`[]` heals); returns the layer's status.
    pub async fn set_storage_faults(&self, id: NodeId, rules: Value) -> Result<Value> {
        let body = serde_json::json!({ "rules": rules }).to_string();
        let (status, v) = http_request(
            self.nodes[&id].admin,
            "POST",
            "/v1/debug/storage-faults",
            Some(&body),
        )
        .await?;
        if status != 200 {
            bail!("POST /v1/debug/storage-faults on n{id}: {status} {v}");
        }
        Ok(v)
    }

    /// Raft groups on node `id` that stopped (role `shutdown`) or report a storage error.
    pub async fn stopped_groups(&self, id: NodeId) -> Result<Vec<String>> {
        let (status, v) = self.admin_get(id, "/v1/raft").await?;
        if status != 200 {
            bail!("GET /v1/raft on n{id}: {status}");
        }
        Ok(v["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["role"] == "shutdown" || !g["storage_error"].is_null())
            .filter_map(|g| g["group"].as_str().map(str::to_string))
            .collect())
    }

    pub async fn healthy(&self, id: NodeId) -> bool {
        matches!(self.admin_get(id, "/v1/health").await, Ok((200, _)))
    }

    /// Waits until every running, unpaused node answers health 200.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut bad = Vec::new();
            for n in self.nodes.values().filter(|n| n.running() && !n.paused) {
                if !self.healthy(n.id).await {
                    bad.push(n.id);
                }
            }
            if bad.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nodes {bad:?} not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The controller as any reachable node reports it.
    pub async fn controller(&self) -> Option<NodeId> {
        for n in self.nodes.values().filter(|n| n.running() && !n.paused) {
            if let Ok((200, v)) = self.admin_get(n.id, "/v1/cluster").await {
                if let Some(c) = v["controller_id"].as_u64() {
                    return u32::try_from(c).ok();
                }
            }
        }
        None
    }

    /// The leader of `topic`/`partition`, as the first node that reports one says.
    pub async fn partition_leader(&self, topic: &str, partition: i32) -> Option<NodeId> {
        for n in self.nodes.values().filter(|n| n.running() && !n.paused) {
            if let Ok((200, v)) = self.admin_get(n.id, &format!("/v1/topics/{topic}")).await {
                let l = v["partitions"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["partition"] == partition))
                    .and_then(|p| p["leader"].as_u64());
                if let Some(l) = l {
                    return u32::try_from(l).ok();
                }
            }
        }
        None
    }

    /// Per node: this node's view of the partition (leader, high watermark, log end offset).
    pub async fn partition_views(
        &self,
        topic: &str,
        partition: i32,
    ) -> BTreeMap<NodeId, (Option<u64>, Option<i64>, Option<i64>)> {
        let mut out = BTreeMap::new();
        for n in self.nodes.values().filter(|n| n.running() && !n.paused) {
            if let Ok((200, v)) = self.admin_get(n.id, &format!("/v1/topics/{topic}")).await {
                if let Some(p) = v["partitions"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["partition"] == partition))
                {
                    out.insert(
                        n.id,
                        (
                            p["leader"].as_u64(),
                            p["high_watermark"].as_i64(),
                            p["log_end_offset"].as_i64(),
                        ),
                    );
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Only our own children, by pid.
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Minimal HTTP/1.1 GET (the admin API is tiny; no client crate needed).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Value)> {
    http_request(addr, "GET", path, None).await
}

/// Minimal HTTP/1.1 request with an optional JSON body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Value)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        parse_http(&buf)
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .map_err(|_| anyhow!("{method} {path} on {addr} timed out"))?
}

fn parse_http(buf: &[u8]) -> Result<(u16, Value)> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end"))?;
    let head = std::str::from_utf8(&buf[..split])?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl])?.trim(), 16)?;
        b = &b[nl + 2..];
        if size == 0 || b.len() < size {
            return Ok(out);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_http() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"a\": 1}\n";
        let (s, v) = parse_http(r).unwrap();
        assert_eq!(s, 200);
        assert_eq!(v["a"], 1);
        let r = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"b\"\r\n3\r\n: 2\r\n1\r\n}\r\n0\r\n\r\n";
        let (s, v) = parse_http(r).unwrap();
        assert_eq!(s, 503);
        assert_eq!(v["b"], 2);
    }
}
