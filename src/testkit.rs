//! Real nodes in-process, for tests: a single node or a cluster on 127.0.0.1 port 0, each with
//! its own data directory and a handle that stops it. Every node is the production [`Node`]
//! (same listeners, loops and storage), so a test against it tests what users run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::config::ServerConfig;
use crate::controller::PartitionId;
use crate::node::{Listeners, Node, NodeError};

static NEXT_ROOT: AtomicU64 = AtomicU64::new(0);

struct Slot {
    cfg: ServerConfig,
    node: Option<Node>,
}

/// `n` nodes that formed one cluster. Dropping it removes the data directories; call
/// [`TestCluster::shutdown`] to stop the nodes first.
pub struct TestCluster {
    root: PathBuf,
    slots: Vec<Slot>,
}

async fn bind_any() -> Result<TcpListener, NodeError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| NodeError::Bind {
            what: "a test node",
            addr: "127.0.0.1:0".into(),
            source,
        })
}

fn addr_of(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

impl TestCluster {
    /// One node with the embedded defaults, as `sluice server` with no flags runs it.
    pub async fn single() -> Result<TestCluster, NodeError> {
        Self::start_with(1, |_| {}).await
    }

    /// `n` nodes with default configs.
    pub async fn start(n: usize) -> Result<TestCluster, NodeError> {
        Self::start_with(n, |_| {}).await
    }

    /// `n` nodes; `tweak` adjusts every node's config before it starts.
    pub async fn start_with(
        n: usize,
        tweak: impl Fn(&mut ServerConfig),
    ) -> Result<TestCluster, NodeError> {
        let root = std::env::temp_dir().join(format!(
            "sluice-testkit-{}-{}",
            std::process::id(),
            NEXT_ROOT.fetch_add(1, Ordering::Relaxed)
        ));
        // Every node's listeners first: the peer list must name real ports before any starts.
        let mut bound = Vec::with_capacity(n);
        for _ in 0..n {
            bound.push(Listeners {
                kafka: vec![bind_any().await?],
                admin: bind_any().await?,
                raft: bind_any().await?,
            });
        }
        let peers: std::collections::BTreeMap<u64, String> = bound
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u64 + 1, addr_of(&l.raft)))
            .collect();
        let mut cluster = TestCluster {
            root,
            slots: Vec::new(),
        };
        let mut starting = Vec::new();
        for (i, l) in bound.into_iter().enumerate() {
            let id = i as u64 + 1;
            let mut cfg = ServerConfig {
                node_id: id,
                data_dir: cluster.root.join(format!("node{id}")),
                kafka_addr: addr_of(&l.kafka[0]),
                admin_addr: addr_of(&l.admin),
                raft_addr: addr_of(&l.raft),
                peers: peers.clone(),
                ..ServerConfig::default()
            };
            tweak(&mut cfg);
            starting.push((cfg.clone(), Node::start(cfg, l)));
        }
        // Together: a forming cluster's nodes wait for each other's votes.
        let (cfgs, futs): (Vec<_>, Vec<_>) = starting.into_iter().unzip();
        let started = futures::future::join_all(futs).await;
        for (cfg, node) in cfgs.into_iter().zip(started) {
            cluster.slots.push(Slot {
                cfg,
                node: Some(node?),
            });
        }
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Node `i` (0-based), if running.
    pub fn node(&self, i: usize) -> Option<&Node> {
        self.slots.get(i).and_then(|s| s.node.as_ref())
    }

    /// The broker of node `i`; panics if it is not running (a test bug).
    pub fn broker(&self, i: usize) -> &Arc<Broker> {
        match self.node(i) {
            Some(n) => n.broker(),
            None => panic!("test node {i} is not running"),
        }
    }

    /// What a client puts in `bootstrap.servers`: every running node.
    pub fn bootstrap(&self) -> String {
        self.slots
            .iter()
            .filter_map(|s| s.node.as_ref().map(|n| n.kafka_addr().to_string()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kafka address of node `i`, running or not.
    pub fn kafka_addr(&self, i: usize) -> String {
        self.slots[i].cfg.kafka_addr.clone()
    }

    /// Stops node `i` without a controlled shutdown (no hand-off, no goodbye to the controller),
    /// as a crash would look to its peers.
    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.slots.get_mut(i).and_then(|s| s.node.take()) {
            n.stop().await;
        }
    }

    /// Starts node `i` again on its old ports and data directory.
    pub async fn restart(&mut self, i: usize) -> Result<(), NodeError> {
        let cfg = self.slots[i].cfg.clone();
        let listeners = Listeners::bind(&cfg).await?;
        self.slots[i].node = Some(Node::start(cfg, listeners).await?);
        Ok(())
    }

    /// Waits until every running node knows the controller, is registered and sees every
    /// running node registered and unfenced.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let running: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.node.is_some())
            .map(|s| s.cfg.node_id)
            .collect();
        loop {
            let ready = self.slots.iter().filter_map(|s| s.node.as_ref()).all(|n| {
                let b = n.broker();
                let live = b.live_brokers();
                b.is_ready() && running.iter().all(|id| live.contains(id))
            });
            if ready {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Index (0-based) of the node leading `topic`'s partition `p`, as node `asking` sees it.
    pub fn leader_of(&self, asking: usize, topic: &str, p: PartitionId) -> Option<usize> {
        let b = self.broker(asking);
        let st = b.state();
        let (leader, _) = b.partition_leader_in(&st, topic, p)?;
        Some(leader as usize - 1)
    }

    /// Moves the leadership of `topic`'s partition `p` to another replica (by a graceful
    /// transfer, as the admin endpoint does); returns (old leader, new leader), 0-based.
    pub async fn move_leader(&self, topic: &str, p: PartitionId) -> Result<(usize, usize), String> {
        let old = self
            .leader_of(0, topic, p)
            .ok_or_else(|| format!("{topic}-{p} has no leader"))?;
        let target = (0..self.len())
            .find(|i| *i != old && self.node(*i).is_some())
            .ok_or("no other node")?;
        let broker = self.broker(old);
        let group = broker
            .partition(topic, p)
            .ok_or_else(|| format!("node {old} hosts no {topic}-{p}"))?;
        broker
            .transfer_partition_leadership(group.group_id(), target as u64 + 1)
            .await
            .map_err(|e| e.to_string())?;
        Ok((old, target))
    }

    /// Stops every node (without controlled shutdown: tests want it quick).
    pub async fn shutdown(mut self) {
        for i in 0..self.slots.len() {
            self.kill(i).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Before the nodes (and their ports) go: see `security::forget`.
        let addrs: Vec<String> =
            self.slots
                .iter()
                .flat_map(|s| {
                    std::iter::once(s.cfg.kafka_addr.clone()).chain(
                        s.cfg.listeners.iter().flat_map(|l| {
                            std::iter::once(l.addr.clone()).chain(l.advertised.clone())
                        }),
                    )
                })
                .collect();
        crate::cli::security::forget(&addrs);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
