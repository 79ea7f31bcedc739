//! One Sluice node: wires the Raft host, the replicated metadata state (the controller's view), the
//! partition manager that converges local partition groups to that state, the Kafka listener and the
//! admin HTTP server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_raft::{MetaApp, PartitionGroup, RaftError, RaftHost, RaftHostConfig};
use sluice_storage::log::LogConfig;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::ServerConfig;
use crate::errors::ErrorCode;
use crate::metadata::{BrokerInfo, Command, LeaderUpdate, MetaState, Reply, TopicMeta};
use crate::metrics::Metrics;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("raft: {0}")]
    Raft(#[from] RaftError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// The metadata state machine as the Raft crate sees it. Apply is deterministic: it decodes the
/// command and applies it; it never reads a clock.
pub struct MetaMachine {
    state: RwLock<MetaState>,
    changed: watch::Sender<u64>,
}

impl MetaMachine {
    fn new() -> Self {
        MetaMachine {
            state: RwLock::new(MetaState::default()),
            changed: watch::channel(0).0,
        }
    }
    fn bump(&self, version: u64) {
        self.changed.send_replace(version);
    }
}

impl MetaApp for MetaMachine {
    fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
        let reply = match serde_json::from_slice::<Command>(command) {
            Ok(cmd) => {
                let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                let r = st.apply(&cmd);
                let v = st.version;
                drop(st);
                self.bump(v);
                r
            }
            // A command we cannot decode was written by a newer or broken proposer; every node
            // rejects it the same way, so state stays identical.
            Err(e) => Reply::Err {
                code: ErrorCode::InvalidRequest.code(),
                message: format!("undecodable metadata command: {e}"),
            },
        };
        serde_json::to_vec(&reply).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        serde_json::to_vec(&*st).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let restored: MetaState = if snapshot.is_empty() {
            MetaState::default()
        } else {
            serde_json::from_slice(snapshot).map_err(|e| format!("bad metadata snapshot: {e}"))?
        };
        let v = restored.version;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = restored;
        self.bump(v);
        Ok(())
    }
}

pub struct Node {
    pub cfg: ServerConfig,
    pub raft: Arc<RaftHost>,
    pub meta: Arc<MetaMachine>,
    /// (topic, partition) -> this node's replica of the partition group.
    partitions: RwLock<HashMap<(String, i32), Arc<PartitionGroup>>>,
    /// Bumped after every reconcile pass, so CreateTopics can wait for its partitions.
    partitions_changed: watch::Sender<u64>,
    pub metrics: Metrics,
    pub started_at: std::time::Instant,
    /// Set when the node must stop (e.g. foreign data directory); the server watches it.
    pub fatal: watch::Sender<Option<String>>,
    /// Receives node-to-node app messages; also the controller's heartbeat table.
    pub app: Arc<crate::cluster::Handler>,
    /// When this node last had a heartbeat answered by the controller (or was the controller).
    pub controller_contact: std::sync::Mutex<Option<std::time::Instant>>,
    /// Bytes of record data that unwritten Fetch responses may hold (`sluice.fetch.memory.bytes`).
    pub fetch_budget: Arc<tokio::sync::Semaphore>,
    /// Why this node fenced itself over its storage (a replica it could not reopen for
    /// [`STORAGE_FENCE_AFTER`]): it stops heartbeating the controller, which fences it, so
    /// leadership moves away and no new replicas are placed here.
    pub storage_fence: std::sync::Mutex<Option<String>>,
}

impl Node {
    pub async fn start(cfg: ServerConfig) -> Result<Arc<Node>, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let identity = DirIdentity::load(&cfg.data_dir)?;
        if let Some(id) = identity.node_id {
            if id != cfg.node_id {
                return Err(NodeError::Other(format!(
                    "data directory {} belongs to node {id}, but this node was started as node {}; \
                     use --node-id {id} or another --data-dir",
                    cfg.data_dir.display(),
                    cfg.node_id
                )));
            }
        }
        identity_store(&cfg.data_dir, cfg.node_id, identity.cluster_id.as_deref())?;
        std::fs::create_dir_all(cfg.data_dir.join("partitions"))?;
        let meta = Arc::new(MetaMachine::new());
        let raft = RaftHost::start(
            RaftHostConfig {
                node_id: cfg.node_id,
                raft_addr: cfg.raft_addr.clone(),
                data_dir: cfg.data_dir.join("raft"),
                peers: cfg.peers.clone(),
            },
            meta.clone() as Arc<dyn MetaApp>,
        )
        .await?;
        let app = crate::cluster::Handler::new();
        raft.set_app_handler(app.clone());
        let cfg_fetch_memory = cfg.fetch_memory_bytes;
        let node = Arc::new(Node {
            cfg,
            raft,
            meta,
            partitions: RwLock::new(HashMap::new()),
            partitions_changed: watch::channel(0).0,
            metrics: Metrics::default(),
            started_at: std::time::Instant::now(),
            fatal: watch::channel(None).0,
            app,
            fetch_budget: Arc::new(tokio::sync::Semaphore::new(cfg_fetch_memory)),
            controller_contact: std::sync::Mutex::new(None),
            storage_fence: std::sync::Mutex::new(None),
        });
        if let Ok(mut w) = node.app.node.lock() {
            *w = Arc::downgrade(&node);
        }
        if let Err(reason) =
            crate::cluster::check_cluster_identity(&node, identity.cluster_id.clone()).await
        {
            node.raft.shutdown().await;
            return Err(NodeError::Other(reason));
        }
        tokio::spawn(identity_loop(node.clone()));
        tokio::spawn(crate::cluster::heartbeat_loop(node.clone()));
        tokio::spawn(crate::cluster::liveness_loop(node.clone()));
        // Only a node that never belonged to a cluster asks to join; a decommissioned one must not
        // quietly come back.
        if identity.cluster_id.is_none() {
            tokio::spawn(crate::cluster::join_loop(node.clone()));
        }
        tokio::spawn(register_loop(node.clone()));
        tokio::spawn(reconcile_loop(node.clone()));
        tokio::spawn(leader_report_loop(node.clone()));
        tokio::spawn(preferred_leader_loop(node.clone()));
        tokio::spawn(fenced_leader_loop(node.clone()));
        tokio::spawn(reassignment_loop(node.clone()));
        tokio::spawn(crate::retention::retention_loop(node.clone()));
        tokio::spawn(storage_loop(node.clone()));
        Ok(node)
    }

    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, MetaState> {
        self.meta.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn partition(&self, topic: &str, partition: i32) -> Option<Arc<PartitionGroup>> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// Every partition replica this node hosts.
    pub fn local_partitions(&self) -> Vec<((String, i32), Arc<PartitionGroup>)> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect()
    }

    pub fn partition_count(&self) -> usize {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Proposes a metadata command and returns its applied reply.
    pub async fn propose(&self, cmd: &Command) -> Result<Reply, NodeError> {
        let bytes = serde_json::to_vec(cmd).map_err(|e| NodeError::Other(e.to_string()))?;
        // A freshly started single node may not have elected itself yet; wait briefly for that
        // instead of failing the first client request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match crate::cluster::propose_anywhere(self, bytes.clone()).await {
                Ok(reply) => {
                    return serde_json::from_slice(&reply)
                        .map_err(|e| NodeError::Other(format!("bad metadata reply: {e}")))
                }
                Err(RaftError::NotLeader { leader: None })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn live_brokers(&self) -> BTreeSet<u64> {
        self.state().live_brokers()
    }

    pub fn controller_id(&self) -> Option<u64> {
        self.raft.meta().leader()
    }

    /// Where a partition's files live: `partitions/{topic}-{partition}.{topic id}`. With the topic
    /// id in the name, a re-created topic gets a new directory and can never meet files a deleted
    /// topic of the same name left behind (say, by a crash halfway through removing them).
    pub fn partition_dir(&self, topic: &str, partition: i32, topic_id_hex: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("partitions")
            .join(partition_dir_name(topic, partition, topic_id_hex))
    }

    /// Waits (bounded) until every partition of `topic` has a local group with a leader.
    pub async fn wait_for_partitions(&self, topic: &str, timeout: Duration) -> bool {
        let mut rx = self.partitions_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = {
                let st = self.state();
                match st.topics.get(topic) {
                    None => false,
                    Some(t) => (0..t.partitions.len())
                        .all(|p| self.partition_leader_in(&st, topic, p as i32).is_some()),
                }
            };
            if ready {
                return true;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            // Leadership can change without a reconcile pass, so poll as well as listen.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(20)), rx.changed()).await;
        }
    }

    /// The partition's leader and epoch: from the local replica when we host one (freshest), else
    /// as last reported to the metadata group.
    pub fn partition_leader_in(
        &self,
        st: &MetaState,
        topic: &str,
        partition: i32,
    ) -> Option<(u64, i32)> {
        // A replica stopped on a storage error knows no leader; the controller's record does.
        if let Some(g) = self
            .partition(topic, partition)
            .filter(|g| g.failure().is_none())
        {
            // Our replica may still believe in a leader the controller has fenced; sending
            // clients there only makes them wait.
            return g
                .leader()
                .filter(|l| !st.fenced.contains(l))
                .map(|l| (l, g.leader_epoch()));
        }
        let t = st.topics.get(topic)?;
        let l = t.leaders.get(&(partition as u32))?;
        // A leader on a broker that left the cluster cannot serve; say so instead of misrouting.
        (st.brokers.contains_key(&l.leader) && !st.fenced.contains(&l.leader))
            .then_some((l.leader, l.epoch))
    }

    /// Ready = we know a controller, are registered, and every local partition has a leader.
    pub fn is_ready(&self) -> bool {
        if self.controller_id().is_none() || self.storage_fence().is_some() {
            return false;
        }
        if !self.state().brokers.contains_key(&self.cfg.node_id) {
            return false;
        }
        let assigned = {
            let st = self.state();
            st.partitions_on(self.cfg.node_id).count()
        };
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        parts.len() >= assigned && parts.values().all(|g| g.leader().is_some())
    }

    /// Why the node fenced itself over its storage, if it did.
    pub fn storage_fence(&self) -> Option<String> {
        self.storage_fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts an election for `group` on this node (the receiving half of leadership transfer).
    pub async fn trigger_elect(&self, group: &str) -> Result<(), String> {
        if group == sluice_raft::META_GROUP {
            return self
                .raft
                .meta()
                .trigger_elect()
                .await
                .map_err(|e| e.to_string());
        }
        match self.raft.partition(group) {
            Some(g) => g.trigger_elect().await.map_err(|e| e.to_string()),
            None => Err(format!("no group {group} on node {}", self.cfg.node_id)),
        }
    }

    /// On the partition leader: hand leadership of `group` to replica `target`.
    pub async fn transfer_partition_leadership(
        &self,
        group: &str,
        target: u64,
    ) -> Result<(), RaftError> {
        let g = self
            .raft
            .partition(group)
            .ok_or_else(|| RaftError::GroupNotFound(group.into()))?;
        let elect = async {
            let req = crate::cluster::AppRequest::Elect {
                group: group.to_string(),
            };
            match crate::cluster::call(self, target, &req, Duration::from_secs(20)).await {
                Ok(crate::cluster::AppResponse::Ok) => Ok(()),
                Ok(other) => Err(RaftError::Other(format!(
                    "node {target} answered {other:?}"
                ))),
                Err(e) => Err(RaftError::Other(e)),
            }
        };
        g.transfer_leadership(target, elect).await
    }

    pub fn fail(&self, reason: String) {
        error!(%reason, "fatal");
        self.fatal.send_replace(Some(reason));
    }

    /// Controlled shutdown, as in Kafka: tell the controller we are leaving (so no new replicas or
    /// clients are sent here), hand partition and controller leadership to other replicas (so
    /// clients wait for one election instead of a lease timeout), then stop Raft.
    pub async fn shutdown(&self) {
        let me = self.cfg.node_id;
        let others_live = self.live_brokers().into_iter().any(|b| b != me);
        if others_live {
            let cmd = Command::FenceBroker { id: me };
            let fence = tokio::time::timeout(Duration::from_secs(3), self.propose(&cmd));
            match fence.await {
                Ok(Ok(_)) => info!("controller told of controlled shutdown"),
                Ok(Err(e)) => warn!(error = %e, "could not announce controlled shutdown"),
                Err(_) => warn!("announcing controlled shutdown timed out"),
            }
            self.hand_off_leadership().await;
        }
        self.raft.shutdown().await;
    }

    async fn hand_off_leadership(&self) {
        let me = self.cfg.node_id;
        let live = self.live_brokers();
        let led: Vec<(String, Vec<u64>)> = {
            let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
            parts
                .values()
                .filter(|g| g.is_leader())
                .map(|g| {
                    (
                        g.status().group.to_string(),
                        g.voters().into_iter().collect(),
                    )
                })
                .collect()
        };
        let mut moves = Vec::new();
        for (group, voters) in led {
            if let Some(to) = voters.into_iter().find(|v| *v != me && live.contains(v)) {
                moves.push((group, to));
            }
        }
        if self.raft.meta().is_leader() {
            if let Some(to) = self
                .raft
                .meta()
                .voters()
                .into_keys()
                .find(|v| *v != me && live.contains(v))
            {
                moves.push((sluice_raft::META_GROUP.to_string(), to));
            }
        }
        if moves.is_empty() {
            return;
        }
        info!(
            count = moves.len(),
            "handing off leadership before shutdown"
        );
        let calls = moves.into_iter().map(|(group, to)| async move {
            let req = crate::cluster::AppRequest::Elect { group };
            let _ = crate::cluster::call(self, to, &req, Duration::from_secs(5)).await;
        });
        let _ =
            tokio::time::timeout(Duration::from_secs(6), futures::future::join_all(calls)).await;
    }
}

/// What `meta.properties` (as in Kafka's log dirs) says this data directory belongs to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirIdentity {
    pub node_id: Option<u64>,
    pub cluster_id: Option<String>,
}

impl DirIdentity {
    pub fn load(dir: &std::path::Path) -> Result<DirIdentity, NodeError> {
        let path = dir.join("meta.properties");
        let Some(bytes) = sluice_storage::file::read_optional(&path)? else {
            return Ok(DirIdentity::default());
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut id = DirIdentity::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("node.id", v)) => {
                    id.node_id = Some(v.trim().parse().map_err(|_| {
                        NodeError::Other(format!("{}: bad node.id '{v}'", path.display()))
                    })?)
                }
                Some(("cluster.id", v)) if !v.trim().is_empty() => {
                    id.cluster_id = Some(v.trim().to_string())
                }
                _ => {}
            }
        }
        Ok(id)
    }
}

fn identity_store(
    dir: &std::path::Path,
    node_id: u64,
    cluster_id: Option<&str>,
) -> Result<(), NodeError> {
    let text = format!(
        "# written by sluice; ties this data directory to one node of one cluster\nversion=1\nnode.id={node_id}\ncluster.id={}\n",
        cluster_id.unwrap_or("")
    );
    sluice_storage::file::write_atomic(&dir.join("meta.properties"), text.as_bytes())?;
    Ok(())
}

/// Records the cluster id in `meta.properties` once known, and stops the node if the replicated
/// cluster id is not the one this directory was created for.
async fn identity_loop(node: Arc<Node>) {
    let mut known = DirIdentity::load(&node.cfg.data_dir)
        .ok()
        .and_then(|i| i.cluster_id);
    let mut rx = node.meta.changed.subscribe();
    loop {
        let current = node.state().cluster_id.clone();
        match (&known, current) {
            (Some(k), Some(c)) if *k != c => {
                node.fail(format!(
                    "data directory {} belongs to cluster {k}, but this cluster is {c}; \
                     refusing to run with a foreign data directory",
                    node.cfg.data_dir.display()
                ));
                return;
            }
            (None, Some(c)) => {
                if let Err(e) = identity_store(&node.cfg.data_dir, node.cfg.node_id, Some(&c)) {
                    warn!(error = %e, "could not record the cluster id in meta.properties");
                } else {
                    info!(cluster_id = %c, "cluster id recorded");
                    known = Some(c);
                }
            }
            _ => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Registers this broker (and, on a fresh cluster, the cluster id) once a controller exists, and
/// again whenever our registration is missing or stale.
async fn register_loop(node: Arc<Node>) {
    let me = BrokerInfo {
        id: node.cfg.node_id,
        kafka_addr: node.cfg.advertised_kafka_addr(),
        admin_addr: node.cfg.admin_addr.clone(),
        raft_addr: node.cfg.raft_addr.clone(),
        registered_at_ms: 0,
    };
    loop {
        let (need_cluster, need_register) = {
            let st = node.state();
            let current = st.brokers.get(&me.id);
            let stale = match current {
                None => true,
                Some(b) => {
                    b.kafka_addr != me.kafka_addr
                        || b.admin_addr != me.admin_addr
                        || b.raft_addr != me.raft_addr
                }
            };
            (st.cluster_id.is_none(), stale)
        };
        if !need_cluster && !need_register {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if node.controller_id().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let voters = node.raft.meta().voters();
        if !voters.is_empty() && !voters.contains_key(&me.id) {
            // Not (or no longer) a member: decommissioned, or still joining.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if need_cluster && node.raft.meta().is_leader() {
            let cluster_id = new_cluster_id();
            if let Err(e) = node.propose(&Command::InitCluster { cluster_id }).await {
                warn!(error = %e, "could not initialize cluster id, will retry");
            }
        }
        if need_register {
            let mut b = me.clone();
            b.registered_at_ms = now_ms();
            match node.propose(&Command::RegisterBroker { broker: b }).await {
                Ok(_) => info!(node_id = me.id, addr = %me.kafka_addr, "broker registered"),
                Err(e) => warn!(error = %e, "broker registration failed, will retry"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Kafka cluster ids are 22-character URL-safe base64 of 16 random bytes.
pub fn new_cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: [u8; 16] = rand::random();
    let mut bits: u128 = u128::from_be_bytes(bytes);
    let mut s = String::with_capacity(22);
    for _ in 0..22 {
        s.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    s
}

pub fn group_id(topic: &TopicMeta, partition: i32) -> String {
    format!("p/{}/{}", topic.id_hex(), partition)
}

/// Tells the controller which partitions this node leads, whenever the recorded leader or epoch
/// is behind. Batched: one metadata command carries every change seen in a pass.
async fn leader_report_loop(node: Arc<Node>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let updates: Vec<LeaderUpdate> = {
            let st = node.state();
            let parts = node.partitions.read().unwrap_or_else(|p| p.into_inner());
            parts
                .iter()
                .filter(|(_, g)| g.is_leader())
                .filter_map(|((topic, p), g)| {
                    let t = st.topics.get(topic)?;
                    let epoch = g.leader_epoch();
                    let recorded = t.leaders.get(&(*p as u32));
                    if recorded.is_some_and(|l| l.epoch >= epoch) {
                        return None;
                    }
                    Some(LeaderUpdate {
                        topic: topic.clone(),
                        topic_id: t.id,
                        partition: *p as u32,
                        leader: node.cfg.node_id,
                        epoch,
                    })
                })
                .collect()
        };
        if updates.is_empty() {
            continue;
        }
        if let Err(e) = node
            .propose(&Command::SetPartitionLeaders { updates })
            .await
        {
            tracing::debug!(error = %e, "leader report failed, will retry");
        }
    }
}

/// When the controller fences the broker a partition's replicas still follow (crashed, paused or
/// cut off), the lowest-id live voter starts an election right away instead of waiting out the
/// old leader's lease: broker liveness drives partition failover.
async fn fenced_leader_loop(node: Arc<Node>) {
    let mut last_try: std::collections::HashMap<String, std::time::Instant> = Default::default();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let me = node.cfg.node_id;
        // Fencing is the controller's verdict; a node cut off from the controller (or just back
        // from being cut off) sees an old verdict, and electing on it would only disrupt a
        // working leader with a log that is likely behind.
        let in_contact = node
            .controller_contact
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < Duration::from_millis(1500));
        if !in_contact {
            continue;
        }
        let todo: Vec<Arc<PartitionGroup>> = {
            let st = node.state();
            if st.fenced.contains(&me) {
                continue;
            }
            let parts = node.partitions.read().unwrap_or_else(|p| p.into_inner());
            parts
                .values()
                .filter(|g| {
                    let fenced_leader = g
                        .leader()
                        .is_some_and(|l| l != me && st.fenced.contains(&l));
                    let first_live = g.voters().into_iter().find(|v| !st.fenced.contains(v));
                    fenced_leader && first_live == Some(me)
                })
                .cloned()
                .collect()
        };
        for g in todo {
            let gid = g.status().group.to_string();
            if last_try
                .get(&gid)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
            {
                continue;
            }
            last_try.insert(gid.clone(), std::time::Instant::now());
            info!(group = %gid, "leader is fenced; starting an election");
            tokio::spawn(async move {
                if let Err(e) = g.trigger_elect().await {
                    tracing::debug!(error = %e, "election after fencing did not win");
                }
            });
        }
    }
}

/// Carries out reassignments on the partitions this node leads: new replicas join the group as
/// learners and catch up, then the voters change (a joint change) to exactly the target, and the
/// move is recorded. A leader that is not in the target first adds the new replicas, then hands
/// leadership to the target's first replica, whose loop finishes the job. Every step is idempotent,
/// so a restart or a leader change mid-move just resumes it.
/// (topic, topic id, partition, target replicas, the local group).
type PendingMove = (String, [u8; 16], u32, Vec<u64>, Arc<PartitionGroup>);

async fn reassignment_loop(node: Arc<Node>) {
    let in_flight: Arc<std::sync::Mutex<BTreeSet<String>>> = Default::default();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let me = node.cfg.node_id;
        let todo: Vec<PendingMove> = {
            let st = node.state();
            let parts = node.partitions.read().unwrap_or_else(|p| p.into_inner());
            st.topics
                .values()
                .flat_map(|t| {
                    t.reassigning
                        .iter()
                        .map(move |(p, target)| (t, *p, target.clone()))
                })
                .filter_map(|(t, p, target)| {
                    let g = parts.get(&(t.name.clone(), p as i32))?;
                    g.is_leader()
                        .then(|| (t.name.clone(), t.id, p, target, g.clone()))
                })
                .collect()
        };
        for (topic, topic_id, partition, target, group) in todo {
            let gid = group.group_id().to_string();
            if let Ok(mut f) = in_flight.lock() {
                if !f.insert(gid.clone()) {
                    continue;
                }
            }
            let node = node.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let res =
                    move_replicas(&node, &group, me, &topic, topic_id, partition, &target).await;
                if let Err(e) = res {
                    warn!(%topic, partition, ?target, error = %e, "reassignment step failed; will retry");
                }
                if let Ok(mut f) = in_flight.lock() {
                    f.remove(&gid);
                }
            });
        }
    }
}

async fn move_replicas(
    node: &Arc<Node>,
    group: &Arc<PartitionGroup>,
    me: u64,
    topic: &str,
    topic_id: [u8; 16],
    partition: u32,
    target: &[u64],
) -> Result<(), NodeError> {
    let target_set: BTreeSet<u64> = target.iter().copied().collect();
    let voters = group.voters();
    if voters != target_set {
        if target_set.contains(&me) {
            info!(%topic, partition, from = ?voters, to = ?target, "changing the replica set");
            group.change_voters(target_set.clone()).await?;
        } else {
            let union: BTreeSet<u64> = voters.union(&target_set).copied().collect();
            if voters != union {
                info!(%topic, partition, from = ?voters, to = ?union, "adding the new replicas before leaving");
                group.change_voters(union).await?;
            }
            let successor = target[0];
            info!(%topic, partition, to = successor, "handing leadership to the new replica set");
            node.transfer_partition_leadership(group.group_id(), successor)
                .await?;
            // The successor's loop removes this node.
            return Ok(());
        }
    }
    let reply = node
        .propose(&Command::CompleteReassignment {
            topic: topic.to_string(),
            topic_id,
            partition,
            replicas: target.to_vec(),
        })
        .await?;
    match reply {
        Reply::Ok => {
            info!(%topic, partition, replicas = ?target, "reassignment complete");
            Ok(())
        }
        Reply::Err { message, .. } => Err(NodeError::Other(message)),
    }
}

/// Leadership goes back to each partition's preferred leader (its first replica) once things are
/// quiet, so leaders spread evenly again after failures heal. The leader hands it over by a
/// graceful transfer (as the admin endpoint does) once the preferred replica has its whole log, so
/// no election is started by a replica whose log is behind.
async fn preferred_leader_loop(node: Arc<Node>) {
    const SETTLE: Duration = Duration::from_secs(10);
    // Several at a time: after a node returns, a third of a large cluster's partitions may want
    // their leader back, and one per round would take many minutes.
    const TRANSFERS_PER_ROUND: usize = 32;
    let mut misplaced_since: std::collections::HashMap<(String, i32), std::time::Instant> =
        Default::default();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let me = node.cfg.node_id;
        let candidates: Vec<((String, i32), Arc<PartitionGroup>, u64)> = {
            let st = node.state();
            let parts = node.partitions.read().unwrap_or_else(|p| p.into_inner());
            parts
                .iter()
                .filter_map(|((t, p), g)| {
                    let replicas = st.topics.get(t)?.partitions.get(*p as usize)?;
                    let preferred = *replicas.first()?;
                    // Only when every replica is live: moving leadership during a fault costs
                    // availability for nothing.
                    let replicas_live = replicas.iter().all(|b| !st.fenced.contains(b));
                    (preferred != me && replicas_live && g.is_leader())
                        .then(|| ((t.clone(), *p), g.clone(), preferred))
                })
                .collect()
        };
        let keys: BTreeSet<(String, i32)> = candidates.iter().map(|(k, _, _)| k.clone()).collect();
        misplaced_since.retain(|k, _| keys.contains(k));
        let mut transfers = tokio::task::JoinSet::new();
        for (key, group, preferred) in candidates {
            let since = *misplaced_since
                .entry(key.clone())
                .or_insert_with(std::time::Instant::now);
            // A transfer pauses the partition's writes until the target has the whole log, so
            // only a target that is already caught up is worth it.
            if since.elapsed() < SETTLE || !group.caught_up(preferred) {
                continue;
            }
            info!(topic = %key.0, partition = key.1, to = preferred, "handing leadership back to the preferred replica");
            misplaced_since.remove(&key);
            let node = node.clone();
            transfers.spawn(async move {
                let gid = group.group_id().to_string();
                if let Err(e) = node.transfer_partition_leadership(&gid, preferred).await {
                    tracing::debug!(error = %e, "preferred leader transfer failed");
                }
            });
            if transfers.len() >= TRANSFERS_PER_ROUND {
                break;
            }
        }
        while transfers.join_next().await.is_some() {}
    }
}

/// The partition manager: converge the local set of partition groups to the replicated desired
/// state. Runs on every metadata change; also on start, which is how a restarted node reopens its
/// partitions.
async fn reconcile_loop(node: Arc<Node>) {
    let mut rx = node.meta.changed.subscribe();
    wait_for_metadata_catch_up(&node).await;
    loop {
        if let Err(e) = reconcile_once(&node).await {
            error!(error = %e, "partition reconcile failed, retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Until the metadata state machine has applied everything this node had already logged, its view
/// is older than what is on disk: reconciling then would delete partitions of topics it has not
/// re-learned yet.
async fn wait_for_metadata_catch_up(node: &Arc<Node>) {
    let logged_at_start = node.raft.meta().status().last_log_index.unwrap_or(0);
    loop {
        let s = node.raft.meta().status();
        let applied = s.applied_index.unwrap_or(0);
        if s.leader.is_some() && applied >= logged_at_start && Some(applied) >= s.commit_index {
            info!(applied, "metadata caught up; reconciling partitions");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A partition this node should host, as the reconciler needs it.
struct Wanted {
    group: String,
    id_hex: String,
    segment_bytes: Option<u64>,
    /// Preferred leader first; for a joining replica, the reassignment target.
    replicas: Vec<u64>,
    /// Being added by a reassignment: the group exists elsewhere and will contact this replica.
    join: bool,
}

async fn reconcile_once(node: &Arc<Node>) -> Result<(), NodeError> {
    let me = node.cfg.node_id;
    // Only what opening needs, not the TopicMeta: cloning a topic's whole assignment for each of
    // its partitions made every reconcile quadratic in the partition count.
    let desired: BTreeMap<(String, i32), Wanted> = {
        let st = node.state();
        let mut topic_bits: HashMap<&str, (String, Option<u64>)> = HashMap::new();
        let joining: BTreeSet<(&str, usize)> = st
            .joining_on(me)
            .map(|(t, p, _)| (t.name.as_str(), p))
            .collect();
        st.partitions_on(me)
            .chain(st.joining_on(me))
            .map(|(t, p, r)| {
                let join = joining.contains(&(t.name.as_str(), p));
                let (id_hex, segment_bytes) =
                    topic_bits.entry(t.name.as_str()).or_insert_with(|| {
                        (
                            t.id_hex(),
                            t.configs.get("segment.bytes").and_then(|v| v.parse().ok()),
                        )
                    });
                let p = p as i32;
                (
                    (t.name.clone(), p),
                    Wanted {
                        group: group_id(t, p),
                        id_hex: id_hex.clone(),
                        segment_bytes: *segment_bytes,
                        replicas: r.clone(),
                        join,
                    },
                )
            })
            .collect()
    };
    let current: Vec<(String, i32)> = node
        .partitions
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();

    // Close groups whose topic is gone (or was re-created with a new id).
    for key in current {
        let keep = desired
            .get(&key)
            .map(|w| {
                node.partition(&key.0, key.1)
                    .map(|g| g.group_id() == w.group)
                    .unwrap_or(false)
            })
            .unwrap_or(false);
        if !keep {
            let removed = node
                .partitions
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            if let Some(g) = removed {
                info!(topic = %key.0, partition = key.1, "closing partition (topic deleted)");
                node.raft.close_partition(&g.status().group, true).await?;
            }
        }
    }

    let mut failures = 0usize;
    for ((topic, p), wanted) in desired {
        if node.partition(&topic, p).is_some() {
            continue;
        }
        let Wanted {
            group: gid,
            id_hex,
            segment_bytes,
            replicas,
            join,
        } = wanted;
        let dir = node.partition_dir(&topic, p, &id_hex);
        adopt_unversioned_dir(&dir, &topic, p, &id_hex)?;
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            // The new entry must survive a crash before anything in it is trusted.
            if let Some(root) = dir.parent() {
                sluice_storage::file::sync_dir(root)?;
            }
        }
        // Written once: rewriting it at every open would keep a partition on a full disk from
        // opening.
        let id_file = dir.join("topic_id");
        if std::fs::read_to_string(&id_file).map_or(true, |old| old.trim() != id_hex) {
            sluice_storage::file::write_atomic(&id_file, id_hex.as_bytes())?;
        }
        let log_cfg = LogConfig {
            segment_bytes_max: segment_bytes.unwrap_or(node.cfg.log_segment_bytes),
            ..LogConfig::default()
        };
        // One broken partition must not keep the others from opening: note it, go on, and let
        // the loop retry.
        let opened = if join {
            node.raft.join_partition(gid, dir, log_cfg).await
        } else {
            node.raft.open_partition(gid, dir, log_cfg, replicas).await
        };
        let group = match opened {
            Ok(g) => g,
            Err(e) => {
                error!(%topic, partition = p, error = %e, "cannot open partition");
                failures += 1;
                continue;
            }
        };
        node.partitions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic.clone(), p), group);
        node.partitions_changed.send_modify(|v| *v += 1);
    }
    node.partitions_changed.send_modify(|v| *v += 1);
    if failures > 0 {
        return Err(NodeError::Other(format!(
            "{failures} partition(s) failed to open"
        )));
    }
    cleanup_orphan_dirs(node);
    Ok(())
}

/// How often local replicas are checked for a Raft core stopped on a storage error.
const STORAGE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// A failed replica is reopened at most this often (each try re-reads its log).
const STORAGE_REOPEN_EVERY: Duration = Duration::from_secs(3);
/// A replica that cannot be reopened for this long makes the node fence itself.
pub const STORAGE_FENCE_AFTER: Duration = Duration::from_secs(30);

/// Watches this node's replicas for a Raft core stopped by a failed write or fsync. Retrying an
/// fsync after a failure is unsafe, so such a replica is closed and opened again from disk
/// (its unconfirmed tail cut; the leader sends it again) until that works. Meanwhile it serves
/// nothing and other replicas lead. A node that cannot reopen a replica for
/// [`STORAGE_FENCE_AFTER`] (a full or broken disk) fences itself until it can.
async fn storage_loop(node: Arc<Node>) {
    let mut failing_since: HashMap<(String, i32), std::time::Instant> = HashMap::new();
    let mut tried_at: HashMap<(String, i32), std::time::Instant> = HashMap::new();
    loop {
        tokio::time::sleep(STORAGE_CHECK_EVERY).await;
        let groups: Vec<((String, i32), Arc<PartitionGroup>)> = node
            .partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect();
        let now = std::time::Instant::now();
        for (key, group) in groups {
            let Some(reason) = group.failure() else {
                if failing_since.remove(&key).is_some() {
                    info!(topic = %key.0, partition = key.1, "partition replica serves again");
                }
                continue;
            };
            failing_since.entry(key.clone()).or_insert_with(|| {
                error!(topic = %key.0, partition = key.1, %reason, "partition replica stopped on a storage error; reopening it from disk");
                node.metrics
                    .storage_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                now
            });
            if tried_at
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < STORAGE_REOPEN_EVERY)
            {
                continue;
            }
            tried_at.insert(key.clone(), now);
            let gid = group.group_id().to_string();
            match node.raft.reopen_partition(&gid).await {
                Ok(reopened) => {
                    node.partitions
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), reopened);
                    node.partitions_changed.send_modify(|v| *v += 1);
                }
                Err(e) => {
                    warn!(topic = %key.0, partition = key.1, error = %e, "cannot reopen the partition replica yet");
                }
            }
        }
        failing_since.retain(|k, _| {
            node.partitions
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(k)
        });
        tried_at.retain(|k, _| failing_since.contains_key(k));
        let stuck = failing_since
            .iter()
            .find(|(_, t)| now.duration_since(**t) >= STORAGE_FENCE_AFTER)
            .map(|((t, p), since)| {
                format!(
                    "partition {t}-{p} could not be reopened after a storage error for {} s",
                    now.duration_since(*since).as_secs()
                )
            });
        let mut fence = node.storage_fence.lock().unwrap_or_else(|p| p.into_inner());
        if stuck.is_some() != fence.is_some() {
            match &stuck {
                Some(why) => {
                    error!(reason = %why, "fencing this node over its storage: no more heartbeats to the controller until it recovers")
                }
                None => info!("storage recovered; this node unfences itself"),
            }
        }
        *fence = stuck;
    }
}

/// Longest file name most file systems take (ext4, xfs: 255 bytes).
const NAME_MAX: usize = 255;

/// `{topic}-{partition}.{topic id}`, with the topic name shortened if the whole would not fit a
/// file name (Kafka allows 249-character names; the partition and id keep names unique).
fn partition_dir_name(topic: &str, partition: i32, topic_id_hex: &str) -> String {
    let suffix = format!("-{partition}.{topic_id_hex}");
    let room = NAME_MAX.saturating_sub(suffix.len());
    let cut = topic
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|&end| end <= room)
        .last()
        .unwrap_or(0);
    format!("{}{suffix}", &topic[..cut])
}

/// Before topic ids were part of the name, a partition lived in `{topic}-{partition}`. Such a
/// directory is renamed to `dir` if its `topic_id` file says it belongs to this topic; any other
/// is left for [`cleanup_orphan_dirs`].
fn adopt_unversioned_dir(
    dir: &std::path::Path,
    topic: &str,
    partition: i32,
    id_hex: &str,
) -> std::io::Result<()> {
    let Some(root) = dir.parent() else {
        return Ok(());
    };
    let old = root.join(format!("{topic}-{partition}"));
    if dir.exists() || !old.is_dir() {
        return Ok(());
    }
    match std::fs::read_to_string(old.join("topic_id")) {
        Ok(id) if id.trim() == id_hex => {
            info!(from = %old.display(), to = %dir.display(), "renaming partition directory to carry its topic id");
            std::fs::rename(&old, dir)?;
            sluice_storage::file::sync_dir(root)
        }
        _ => Ok(()),
    }
}

/// Directories of partitions this node no longer hosts (e.g. deleted while we were down).
fn cleanup_orphan_dirs(node: &Node) {
    let Ok(entries) = std::fs::read_dir(node.cfg.data_dir.join("partitions")) else {
        return;
    };
    let wanted: BTreeSet<std::ffi::OsString> = node
        .partitions
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter_map(|g| g.dir().file_name().map(ToOwned::to_owned))
        .collect();
    for e in entries.flatten() {
        if !wanted.contains(&e.file_name()) {
            let name = e.file_name().to_string_lossy().to_string();
            info!(dir = %name, "removing partition directory no longer assigned to this node");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dir_names_carry_the_topic_id_and_fit_a_file_name() {
        assert_eq!(partition_dir_name("orders", 3, "ab12"), "orders-3.ab12");
        let id = "0123456789abcdef0123456789abcdef";
        let long = "t".repeat(249);
        let name = partition_dir_name(&long, 1_000_000, id);
        assert_eq!(name.len(), NAME_MAX);
        assert!(name.ends_with(&format!("-1000000.{id}")));
    }

    #[test]
    fn an_unversioned_directory_is_adopted_only_by_its_own_topic() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("t-0");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("topic_id"), "aaaa").unwrap();
        std::fs::write(old.join("00000000000000000000.log"), b"data").unwrap();
        // Another topic of the same name (a new id) does not take it.
        let other = root.path().join(partition_dir_name("t", 0, "bbbb"));
        adopt_unversioned_dir(&other, "t", 0, "bbbb").unwrap();
        assert!(old.exists() && !other.exists());
        // Its own topic does, with its files.
        let mine = root.path().join(partition_dir_name("t", 0, "aaaa"));
        adopt_unversioned_dir(&mine, "t", 0, "aaaa").unwrap();
        assert!(!old.exists());
        assert_eq!(
            std::fs::read(mine.join("00000000000000000000.log")).unwrap(),
            b"data"
        );
    }

    #[test]
    fn dir_identity_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(DirIdentity::load(d.path()).unwrap(), DirIdentity::default());
        identity_store(d.path(), 3, None).unwrap();
        assert_eq!(DirIdentity::load(d.path()).unwrap().node_id, Some(3));
        identity_store(d.path(), 3, Some("abc")).unwrap();
        let id = DirIdentity::load(d.path()).unwrap();
        assert_eq!(id.cluster_id.as_deref(), Some("abc"));
        std::fs::write(d.path().join("meta.properties"), "node.id=x\n").unwrap();
        assert!(DirIdentity::load(d.path()).is_err());
    }

    #[test]
    fn cluster_ids_look_like_kafkas() {
        let a = new_cluster_id();
        assert_eq!(a.len(), 22);
        assert_ne!(a, new_cluster_id());
    }

    #[test]
    fn meta_machine_snapshot_roundtrip() {
        let m = MetaMachine::new();
        let cmd = serde_json::to_vec(&Command::InitCluster {
            cluster_id: "abc".into(),
        })
        .unwrap();
        let r: Reply = serde_json::from_slice(&m.apply(1, &cmd)).unwrap();
        assert_eq!(r, Reply::Ok);
        let garbage: Reply = serde_json::from_slice(&m.apply(2, b"not json")).unwrap();
        assert!(matches!(garbage, Reply::Err { .. }));
        let snap = m.snapshot();
        let m2 = MetaMachine::new();
        m2.restore(&snap).unwrap();
        assert_eq!(*m2.state.read().unwrap(), *m.state.read().unwrap());
        assert!(m2.restore(b"{bad").is_err());
    }
}
