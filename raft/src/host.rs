//! [`RaftHost`]: every Raft group of one process (the metadata group and the partition groups),
//! their configs, and the transport they share.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::{BasicNode, Config, RaftMetrics, ServerState, SnapshotPolicy};
use rand::Rng;
use sluice_storage::{batch, LogConfig, MetaStore};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::meta_store::{MetaLogStore, MetaStateMachine};
use crate::partition_store::{
    decode_offsets, PartitionLogStore, PartitionShared, PartitionStateMachine,
};
use crate::transport::{self, GroupNetworkFactory, Registry, Transport};
use crate::{GroupId, MetaApp, NodeId, Raft, RaftError, META_GROUP};

/// How long a proposal may wait for commit. On expiry the outcome is unknown (the entry may still
/// commit), which is what [`RaftError::Timeout`] tells the caller.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Entries after which a partition group snapshots its (tiny) state machine. This bounds what a
/// restart re-reads from the log to rebuild the high watermark.
const PARTITION_SNAPSHOT_EVERY_ENTRIES: u64 = 1000;

/// AppendEntries carries at most this many entries; with Kafka's ~1 MiB batch limit it keeps a
/// frame well under the transport's frame limit.
const PARTITION_MAX_PAYLOAD_ENTRIES: u64 = 32;

#[derive(Debug, Clone)]
pub struct RaftHostConfig {
    pub node_id: u64,
    /// Address the transport listens on and peers dial (`host:port`).
    pub raft_addr: String,
    /// The metadata group's store lives in `data_dir/meta`.
    pub data_dir: PathBuf,
    /// Node id -> raft address, including this node; a single node is `{self}`.
    pub peers: BTreeMap<u64, String>,
}

/// A group's Raft state as the admin API and tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupId,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    /// openraft 0.9 does not publish the commit index; this is the applied index, which trails it
    /// by at most the entries being applied.
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub voters: Vec<u64>,
    /// On the leader: the last log index each node is known to hold; empty elsewhere.
    pub match_index: BTreeMap<u64, Option<u64>>,
}

fn status_from(group: &str, m: &RaftMetrics<NodeId, BasicNode>) -> GroupStatus {
    let role = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    let applied = m.last_applied.map(|l| l.index);
    GroupStatus {
        group: group.to_string(),
        role: role.to_string(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        commit_index: applied,
        applied_index: applied,
        voters: m.membership_config.membership().voter_ids().collect(),
        match_index: m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default(),
    }
}

fn meta_config() -> Result<Arc<Config>, RaftError> {
    let c = Config {
        cluster_name: META_GROUP.to_string(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate().map_err(|e| RaftError::Other(e.to_string()))?,
    ))
}

/// Partitions are many and mostly idle, so their timers are 5x slower than openraft's defaults
/// (DESIGN.md 4a: heartbeats are nearly all of an idle group's cost).
fn partition_config(group: &str) -> Result<Arc<Config>, RaftError> {
    let c = Config {
        cluster_name: group.to_string(),
        heartbeat_interval: 500,
        election_timeout_min: 1500,
        election_timeout_max: 3000,
        max_payload_entries: PARTITION_MAX_PAYLOAD_ENTRIES,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(PARTITION_SNAPSHOT_EVERY_ENTRIES),
        // A partition snapshot holds no records, so purging the log behind it would delete
        // Kafka data: retention decides what goes, never openraft.
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate().map_err(|e| RaftError::Other(e.to_string()))?,
    ))
}

async fn propose(raft: &Raft, data: Bytes) -> Result<Bytes, RaftError> {
    match tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(data)).await {
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(RaftError::Timeout),
    }
}

/// Elects a group whose only voter is this node at once, instead of after an election timeout:
/// nobody else can lead it, so waiting would only delay the restart.
async fn elect_if_sole_voter(raft: &Raft, node_id: NodeId) -> Result<(), RaftError> {
    let voters: Vec<NodeId> = raft
        .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
        .await?;
    if voters == [node_id] {
        raft.trigger().elect().await?;
    }
    Ok(())
}

/// How often the election watchdog looks at the groups (randomized per round, see below).
const WATCHDOG_PERIOD_MS: std::ops::Range<u64> = 100..400;

/// A uniformly random duration in `[min_ms, max_ms]`.
fn random_timeout(min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(min_ms..=max_ms.max(min_ms)))
}

/// Breaks split-vote livelocks that openraft 0.9's own timer cannot: each Raft instance draws its
/// election timeout once at start and checks it only on a tick of 1.5 x heartbeat interval, so
/// two candidates whose timeouts fall into the same tick collide in every round, forever (seen
/// in tests within a few runs). For a voter that has seen no leader for a random time within the
/// group's election timeout range (drawn afresh for every attempt, and measured on a clock that is
/// not tick-quantized), this triggers an election; the higher term wins against the other
/// candidate's vote. It only acts once openraft's own timer has started a round (a follower keeps
/// its old leader until then), so leader leases are untouched.
async fn election_watchdog(
    registry: Arc<Registry>,
    node_id: NodeId,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leaderless_since: HashMap<GroupId, std::time::Instant> = HashMap::new();
    let mut patience: HashMap<GroupId, Duration> = HashMap::new();
    loop {
        let period = Duration::from_millis(rand::thread_rng().gen_range(WATCHDOG_PERIOD_MS));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let mut seen = BTreeSet::new();
        for (group, raft) in registry.all() {
            let stalled = {
                let m = raft.metrics();
                let m = m.borrow();
                let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                matches!(m.state, ServerState::Follower | ServerState::Candidate)
                    && m.current_leader.is_none()
                    && voters.len() > 1
                    && voters.contains(&node_id)
            };
            if !stalled {
                leaderless_since.remove(&group);
                patience.remove(&group);
                continue;
            }
            seen.insert(group.clone());
            let now = std::time::Instant::now();
            let since = *leaderless_since.entry(group.clone()).or_insert(now);
            let (min_ms, max_ms) = {
                let c = raft.config();
                (c.election_timeout_min, c.election_timeout_max)
            };
            let wait = *patience
                .entry(group.clone())
                .or_insert_with(|| random_timeout(min_ms, max_ms));
            if now.duration_since(since) >= wait {
                tracing::info!(
                    %group,
                    leaderless_ms = now.duration_since(since).as_millis() as u64,
                    "no leader elected by the timer; triggering an election"
                );
                if let Err(e) = raft.trigger().elect().await {
                    tracing::warn!(%group, error = %e, "triggering an election failed");
                }
                leaderless_since.insert(group.clone(), now);
                patience.insert(group.clone(), random_timeout(min_ms, max_ms));
            }
        }
        leaderless_since.retain(|g, _| seen.contains(g));
        patience.retain(|g, _| seen.contains(g));
    }
}

/// The metadata group handle.
pub struct MetaGroup {
    node_id: NodeId,
    raft: Raft,
}

impl MetaGroup {
    /// Proposes a command; returns the [`MetaApp::apply`] reply once it is committed and applied
    /// on this node.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        Ok(propose(&self.raft, Bytes::from(command)).await?.to_vec())
    }

    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    pub fn status(&self) -> GroupStatus {
        status_from(META_GROUP, &self.raft.metrics().borrow())
    }
}

/// One partition's Raft group on this node; its log is the partition log.
pub struct PartitionGroup {
    group: GroupId,
    node_id: NodeId,
    dir: PathBuf,
    raft: Raft,
    shared: Arc<PartitionShared>,
    hw_rx: watch::Receiver<i64>,
}

impl PartitionGroup {
    /// Proposes one validated Kafka batch; returns (base_offset, last_offset) once it is
    /// committed, i.e. fsynced on a majority of the voters.
    pub async fn append(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        // Every replica's log refuses a batch that fails validation, and a log store error is
        // fatal to the Raft group, so a bad batch must never become a log entry.
        let h = batch::validate(&batch)
            .map_err(|e| RaftError::Other(format!("invalid record batch: {e}")))?;
        if batch::is_internal(&h) {
            return Err(RaftError::Other(
                "record batch uses the producer id reserved for Raft-internal entries".into(),
            ));
        }
        let reply = propose(&self.raft, batch).await?;
        decode_offsets(&reply)
            .ok_or_else(|| RaftError::Other(format!("bad append reply of {} bytes", reply.len())))
    }

    /// The first offset not committed.
    pub fn high_watermark(&self) -> i64 {
        *self.hw_rx.borrow()
    }

    pub fn log_start_offset(&self) -> i64 {
        match self.shared.log.read() {
            Ok(l) => l.log_start_offset(),
            Err(p) => p.into_inner().log_start_offset(),
        }
    }

    /// The next offset this replica's log would assign (it may hold uncommitted batches).
    pub fn log_end_offset(&self) -> i64 {
        match self.shared.log.read() {
            Ok(l) => l.log_end_offset(),
            Err(p) => p.into_inner().log_end_offset(),
        }
    }

    pub fn subscribe_high_watermark(&self) -> watch::Receiver<i64> {
        self.hw_rx.clone()
    }

    /// Reads whole batches from `offset`, never past the high watermark.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<Bytes, RaftError> {
        let shared = self.shared.clone();
        let hw = self.high_watermark();
        tokio::task::spawn_blocking(move || {
            let log = shared
                .read_log()
                .map_err(|e| RaftError::Storage(e.to_string()))?;
            Ok(log.read(offset, max_bytes, hw)?)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
    }

    pub async fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(i64, i64)>, RaftError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let log = shared
                .read_log()
                .map_err(|e| RaftError::Storage(e.to_string()))?;
            Ok(log.offset_for_timestamp(ts)?)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
    }

    /// The Raft term, which is the Kafka leader epoch (single-term-leader: one leader per term).
    pub fn leader_epoch(&self) -> i32 {
        i32::try_from(self.raft.metrics().borrow().current_term).unwrap_or(i32::MAX)
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn status(&self) -> GroupStatus {
        status_from(&self.group, &self.raft.metrics().borrow())
    }

    async fn stop(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = %self.group, error = %e, "raft core did not stop cleanly");
        }
        let shared = self.shared.clone();
        let res = tokio::task::spawn_blocking(move || shared.flush_state()).await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::warn!(group = %self.group, result = ?res, "could not persist the committed log id on close");
        }
    }
}

/// One per process: the group registry plus the multiplexed transport.
pub struct RaftHost {
    cfg: RaftHostConfig,
    local_addr: SocketAddr,
    registry: Arc<Registry>,
    transport: Arc<Transport>,
    meta: MetaGroup,
    partitions: RwLock<HashMap<GroupId, Arc<PartitionGroup>>>,
    /// Serializes open/close so that two concurrent opens of one group cannot both create it.
    open_lock: tokio::sync::Mutex<()>,
    shutdown_tx: watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl RaftHost {
    /// Binds `cfg.raft_addr`, opens (or creates) the metadata group and starts serving peers.
    pub async fn start(
        cfg: RaftHostConfig,
        meta_app: Arc<dyn MetaApp>,
    ) -> Result<Arc<RaftHost>, RaftError> {
        let listener = TcpListener::bind(&cfg.raft_addr).await.map_err(|e| {
            RaftError::Other(format!("binding raft address {}: {e}", cfg.raft_addr))
        })?;
        Self::start_with_listener(cfg, listener, meta_app).await
    }

    /// Like [`RaftHost::start`] with an already-bound listener, so tests can bind `127.0.0.1:0`
    /// and learn every node's address before any host starts.
    pub async fn start_with_listener(
        cfg: RaftHostConfig,
        listener: TcpListener,
        meta_app: Arc<dyn MetaApp>,
    ) -> Result<Arc<RaftHost>, RaftError> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| RaftError::Other(format!("raft listener address: {e}")))?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let registry = Arc::new(Registry::default());
        let transport = Arc::new(Transport::new(
            cfg.node_id,
            cfg.peers.clone(),
            shutdown_rx.clone(),
        ));

        let meta_dir = cfg.data_dir.join("meta");
        let store = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&meta_dir)
                .map_err(|e| RaftError::Storage(format!("{}: {e}", meta_dir.display())))?;
            Ok::<_, RaftError>(MetaStore::open(&meta_dir)?)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))??;
        let log_store = MetaLogStore::new(store.clone());
        let has_state = log_store
            .has_state()
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        let sm = MetaStateMachine::open(store, meta_app)
            .await
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        let network = GroupNetworkFactory {
            transport: transport.clone(),
            group: META_GROUP.to_string(),
        };
        let raft = Raft::new(cfg.node_id, meta_config()?, network, log_store, sm).await?;
        registry.insert(META_GROUP.to_string(), raft.clone());

        let server = tokio::spawn(transport::serve(
            listener,
            registry.clone(),
            shutdown_rx.clone(),
        ));
        tokio::spawn(election_watchdog(
            registry.clone(),
            cfg.node_id,
            shutdown_rx,
        ));
        tracing::info!(node_id = cfg.node_id, %local_addr, has_state, "raft host started");

        let host = Arc::new(RaftHost {
            meta: MetaGroup {
                node_id: cfg.node_id,
                raft,
            },
            cfg,
            local_addr,
            registry,
            transport,
            partitions: RwLock::new(HashMap::new()),
            open_lock: tokio::sync::Mutex::new(()),
            shutdown_tx,
            server: Mutex::new(Some(server)),
        });
        if let Err(e) = host.start_meta(has_state).await {
            host.shutdown().await;
            return Err(e);
        }
        Ok(host)
    }

    /// Initializes a new metadata group (when this node bootstraps it) or hurries a sole voter's
    /// election after a restart.
    async fn start_meta(&self, has_state: bool) -> Result<(), RaftError> {
        let cfg = &self.cfg;
        let raft = &self.meta.raft;
        if !has_state {
            if Self::bootstraps_meta(cfg) {
                let members: BTreeMap<NodeId, BasicNode> = cfg
                    .peers
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                    .collect();
                tracing::info!(?members, "initializing the metadata group");
                raft.initialize(members).await.map_err(|e| {
                    RaftError::Other(format!("initializing the metadata group: {e}"))
                })?;
            } else {
                tracing::info!(peers = ?cfg.peers, "metadata group not initialized here; waiting for a peer to include this node");
            }
        } else {
            elect_if_sole_voter(raft, cfg.node_id).await?;
        }

        Ok(())
    }

    /// Whether this node creates the metadata group when it has no state. Only a single node does
    /// today; multi-node bootstrap (likely: the lowest id initializes with all peers, the others
    /// wait to be contacted) is future work, and must stay exactly-once.
    fn bootstraps_meta(cfg: &RaftHostConfig) -> bool {
        cfg.peers.len() == 1 && cfg.peers.contains_key(&cfg.node_id)
    }

    /// The address the transport actually listens on (useful when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    pub fn meta(&self) -> &MetaGroup {
        &self.meta
    }

    /// Opens the partition group stored in `dir`, creating it if new. A new group is initialized
    /// by its first (lowest-id) voter only, so it is initialized exactly once; the other voters
    /// wait for its leader to contact them. A group whose only voter is this node leads at once.
    pub async fn open_partition(
        &self,
        group: GroupId,
        dir: PathBuf,
        log_cfg: LogConfig,
        voters: BTreeSet<u64>,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
        let _guard = self.open_lock.lock().await;
        if *self.shutdown_tx.borrow() {
            return Err(RaftError::Shutdown);
        }
        if let Some(p) = self.partition(&group) {
            return Ok(p);
        }
        let open_dir = dir.clone();
        let shared = tokio::task::spawn_blocking(move || PartitionShared::open(&open_dir, log_cfg))
            .await
            .map_err(|e| RaftError::Other(e.to_string()))?
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        let has_state = shared
            .has_state()
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        let (hw_tx, hw_rx) = watch::channel(0i64);
        let sm = PartitionStateMachine::open(shared.clone(), Arc::new(hw_tx))
            .await
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        let network = GroupNetworkFactory {
            transport: self.transport.clone(),
            group: group.clone(),
        };
        let raft = Raft::new(
            self.cfg.node_id,
            partition_config(&group)?,
            network,
            PartitionLogStore::new(shared.clone()),
            sm,
        )
        .await?;
        self.registry.insert(group.clone(), raft.clone());
        let pg = Arc::new(PartitionGroup {
            group: group.clone(),
            node_id: self.cfg.node_id,
            dir,
            raft: raft.clone(),
            shared,
            hw_rx,
        });
        if let Ok(mut parts) = self.partitions.write() {
            parts.insert(group.clone(), pg.clone());
        }

        let started = if !has_state {
            if voters.first() == Some(&self.cfg.node_id) {
                self.initialize_partition(&raft, &voters).await
            } else {
                Ok(())
            }
        } else {
            elect_if_sole_voter(&raft, self.cfg.node_id).await
        };
        if let Err(e) = started {
            self.registry.remove(&group);
            if let Ok(mut parts) = self.partitions.write() {
                parts.remove(&group);
            }
            pg.stop().await;
            return Err(e);
        }
        tracing::info!(%group, has_state, ?voters, "opened partition group");
        Ok(pg)
    }

    async fn initialize_partition(
        &self,
        raft: &Raft,
        voters: &BTreeSet<u64>,
    ) -> Result<(), RaftError> {
        let mut members = BTreeMap::new();
        for id in voters {
            let addr = self
                .cfg
                .peers
                .get(id)
                .ok_or_else(|| RaftError::Other(format!("voter {id} is not a known peer")))?;
            members.insert(*id, BasicNode { addr: addr.clone() });
        }
        raft.initialize(members)
            .await
            .map_err(|e| RaftError::Other(format!("initializing partition group: {e}")))
    }

    /// Stops the group; with `delete_data`, also removes its directory.
    pub async fn close_partition(
        &self,
        group: &GroupId,
        delete_data: bool,
    ) -> Result<(), RaftError> {
        let _guard = self.open_lock.lock().await;
        let pg = self
            .partitions
            .write()
            .ok()
            .and_then(|mut p| p.remove(group));
        self.registry.remove(group);
        let Some(pg) = pg else { return Ok(()) };
        pg.stop().await;
        if delete_data {
            let dir = pg.dir.clone();
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RaftError::Storage(format!(
                    "removing {}: {e}",
                    dir.display()
                ))),
            })
            .await
            .map_err(|e| RaftError::Other(e.to_string()))??;
        }
        tracing::info!(%group, delete_data, "closed partition group");
        Ok(())
    }

    pub fn partition(&self, group: &str) -> Option<Arc<PartitionGroup>> {
        self.partitions.read().ok()?.get(group).cloned()
    }

    /// The metadata group first, then partitions by id.
    pub fn status(&self) -> Vec<GroupStatus> {
        let mut out = vec![self.meta.status()];
        let mut parts: Vec<GroupStatus> = match self.partitions.read() {
            Ok(p) => p.values().map(|g| g.status()).collect(),
            Err(_) => Vec::new(),
        };
        parts.sort_by(|a, b| a.group.cmp(&b.group));
        out.extend(parts);
        out
    }

    /// Stops every group, the listener and the peer connections. Idempotent.
    pub async fn shutdown(&self) {
        let _guard = self.open_lock.lock().await;
        if self.shutdown_tx.send_replace(true) {
            return;
        }
        let parts: Vec<Arc<PartitionGroup>> = match self.partitions.write() {
            Ok(mut p) => p.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        };
        for pg in parts {
            self.registry.remove(&pg.group);
            pg.stop().await;
        }
        for (group, raft) in self.registry.all() {
            self.registry.remove(&group);
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(%group, error = %e, "raft core did not stop cleanly");
            }
        }
        self.transport.shutdown_peers();
        let server = self.server.lock().ok().and_then(|mut s| s.take());
        if let Some(server) = server {
            let _ = server.await;
        }
        tracing::info!(node_id = self.cfg.node_id, "raft host stopped");
    }
}
