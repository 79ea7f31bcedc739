//! [`RaftHost`]: every Raft group of one process (the metadata group and the partition groups),
//! the one map of open partition groups, and the transport, supervisor and pings they share.
//! Opening, joining, reopening and closing groups happens here, under one lock, so that two
//! opens of one group cannot both create it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::BasicNode;
use sluice_storage::{LogConfig, MetaStore};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod init;

use crate::codec::ResponseStatus;
use crate::config::{meta_config, partition_config, RaftHostConfig};
use crate::group::{AppendGate, GroupStatus, MetaGroup, PartitionGroup};
use crate::liveness::{self, Liveness};
use crate::membership::{elect_if_sole_voter, resolve_addr};
use crate::meta_store::{MetaLogStore, MetaStateMachine};
use crate::partition_store::{PartitionLogStore, PartitionShared, PartitionStateMachine};
use crate::registry::Registry;
use crate::stm::{PartitionMachines, PartitionStmFactory};
use crate::supervisor::{announce_to, election_watchdog};
use crate::transport::{self, GroupNetworkFactory, Transport, TransportError};
use crate::{AppHandler, GroupId, MetaApp, NodeId, Raft, RaftError, META_GROUP};

/// How to open a replica again: its directory, log config and last index known fsynced.
type ReopenPlan = (PathBuf, LogConfig, Option<u64>);

/// One per process: the group registry plus the multiplexed transport.
pub struct RaftHost {
    /// Replicas closed by [`RaftHost::reopen_partition`] whose reopening failed: how to try
    /// again (directory, log config, last index known fsynced).
    reopen_pending: Mutex<HashMap<GroupId, ReopenPlan>>,
    cfg: RaftHostConfig,
    local_addr: SocketAddr,
    registry: Arc<Registry>,
    transport: Arc<Transport>,
    liveness: Arc<Liveness>,
    meta: MetaGroup,
    partitions: RwLock<HashMap<GroupId, Arc<PartitionGroup>>>,
    /// Makes the extra state machines of each partition group that opens.
    partition_machines: RwLock<Option<Arc<dyn PartitionStmFactory>>>,
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
            cfg.tls.clone(),
            shutdown_rx.clone(),
        ));

        let meta_dir = cfg.data_dir.join("meta");
        let store = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&meta_dir).map_err(|e| RaftError::io(&meta_dir, e))?;
            Ok::<_, RaftError>(MetaStore::open(&meta_dir)?)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))??;
        let log_store = MetaLogStore::new(store.clone());
        let has_state = log_store.has_state().map_err(RaftError::from)?;
        let sm = MetaStateMachine::open(store, meta_app)
            .await
            .map_err(RaftError::from)?;
        let network = GroupNetworkFactory {
            transport: transport.clone(),
            group: GroupId::from(META_GROUP),
        };
        let raft = Raft::new(cfg.node_id, meta_config()?, network, log_store, sm).await?;
        registry.insert(GroupId::from(META_GROUP), raft.clone());

        let server = tokio::spawn(transport::serve(
            listener,
            registry.clone(),
            cfg.tls.clone(),
            shutdown_rx.clone(),
        ));
        let liveness = Arc::new(Liveness::default());
        tokio::spawn(election_watchdog(
            registry.clone(),
            cfg.node_id,
            liveness.clone(),
            shutdown_rx.clone(),
        ));
        let announce_registry = registry.clone();
        tokio::spawn(liveness::ping_loop(
            transport.clone(),
            registry.clone(),
            liveness.clone(),
            cfg.node_id,
            Arc::new(move |peer| announce_to(&announce_registry, peer)),
            shutdown_rx,
        ));
        tracing::info!(node_id = cfg.node_id, %local_addr, has_state, "raft host started");

        let host = Arc::new(RaftHost {
            reopen_pending: Mutex::new(HashMap::new()),
            meta: MetaGroup {
                node_id: cfg.node_id,
                raft,
                transport: transport.clone(),
            },
            cfg,
            local_addr,
            registry,
            transport,
            liveness,
            partitions: RwLock::new(HashMap::new()),
            partition_machines: RwLock::new(None),
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
                let mut members: BTreeMap<NodeId, BasicNode> = cfg
                    .peers
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                    .collect();
                members.entry(cfg.node_id).or_insert_with(|| BasicNode {
                    addr: cfg.raft_addr.clone(),
                });
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

    /// Whether this node creates the metadata group when it has no persisted state: only the
    /// lowest id of `peers` does (with every peer as a voter), so however the starts interleave
    /// there is exactly one initialization; the others wait to be contacted by its leader. An
    /// empty `peers` means `{self}`. A node with persisted state never initializes.
    fn bootstraps_meta(cfg: &RaftHostConfig) -> bool {
        cfg.peers
            .keys()
            .next()
            .is_none_or(|lowest| *lowest == cfg.node_id)
    }

    /// Sets the handler of application requests ([`RaftHost::call_app`] from any node); before
    /// it is set such requests get an error reply. May be called again to replace it.
    pub fn set_app_handler(&self, handler: Arc<dyn AppHandler>) {
        self.registry.set_app(handler);
    }

    /// Sets the factory of the extra state machines every partition group opened from now on
    /// carries ([`crate::PartitionStm`]); set it before opening partitions. Groups already open
    /// keep the machines they have.
    pub fn set_partition_machines(&self, factory: Arc<dyn PartitionStmFactory>) {
        if let Ok(mut f) = self.partition_machines.write() {
            *f = Some(factory);
        }
    }

    /// Teaches the transport the raft address of node `id` (a node that joined after start, or
    /// one that moved); it wins over addresses recorded in group memberships.
    pub fn set_peer_addr(&self, id: u64, addr: String) {
        self.transport.set_addr(id, addr);
    }

    /// The raft address of node `id` as the transport would dial it: the configured peers and
    /// [`RaftHost::set_peer_addr`] first, then the metadata group's membership.
    pub fn peer_addr(&self, id: u64) -> Option<String> {
        if id == self.cfg.node_id {
            return Some(
                self.transport
                    .addr_of(id)
                    .unwrap_or_else(|| self.cfg.raft_addr.clone()),
            );
        }
        resolve_addr(&self.transport, &self.meta.raft, id)
    }

    /// Sends an application request to node `target`'s [`AppHandler`] over the raft connection
    /// and waits for its reply at most `timeout`. `target` may be this node (handled locally).
    /// Errors: the handler's `Err(msg)`, an unknown address, an unreachable peer or a missing
    /// handler are [`RaftError::Other`]; no reply in time is [`RaftError::Timeout`] (the request
    /// may still be handled); a stopped host is [`RaftError::Shutdown`].
    pub async fn call_app(
        &self,
        target: u64,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RaftError> {
        if *self.shutdown_tx.borrow() {
            return Err(RaftError::Shutdown);
        }
        if target == self.cfg.node_id {
            let handler = self.registry.app().ok_or_else(|| {
                RaftError::Other("no application handler is set on this node".into())
            })?;
            return match tokio::time::timeout(timeout, handler.handle(target, payload)).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e)) => Err(RaftError::Other(e)),
                Err(_) => Err(RaftError::Timeout),
            };
        }
        let addr = resolve_addr(&self.transport, &self.meta.raft, target)
            .ok_or_else(|| RaftError::Other(format!("no raft address known for node {target}")))?;
        match self
            .transport
            .call_app(target, &addr, payload, timeout)
            .await
        {
            Ok((ResponseStatus::Ok, reply)) => Ok(reply),
            Ok((_, msg)) => Err(RaftError::Other(String::from_utf8_lossy(&msg).into_owned())),
            Err(TransportError::Timeout) => Err(RaftError::Timeout),
            Err(e @ TransportError::Unreachable(..)) => Err(RaftError::Other(e.to_string())),
            Err(TransportError::Other(e)) => {
                if *self.shutdown_tx.borrow() {
                    Err(RaftError::Shutdown)
                } else {
                    Err(RaftError::Other(e))
                }
            }
        }
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

    /// A counter that moves whenever a partition group is opened or closed or a group's server
    /// state changes (state, leader, vote, membership; not its log). Loops that look at every
    /// group compare it with their last pass's value to skip passes over idle groups.
    pub fn group_changes(&self) -> u64 {
        self.registry.changes()
    }

    /// Opens the partition group stored in `dir`, creating it if new, as one of the group's
    /// ORIGINAL `replicas` (the voters it was created with, preferred leader first; pass the same
    /// list on every replica).
    ///
    /// A new group is initialized with the replicas as voters by every voter, which openraft
    /// allows because the initial membership entry is identical everywhere: the first replica at
    /// once (it runs the first election, so the preferred leader leads from the start), the
    /// others after a random delay within the election timeout unless a leader has contacted them
    /// by then. So a group gets a leader even if its first replica is down, and a voter opening
    /// it late just becomes a follower. A group whose only voter is
    /// this node leads at once. For a replica ADDED to an existing group use
    /// [`RaftHost::join_partition`] instead (its initial membership would differ).
    pub async fn open_partition(
        &self,
        group: impl Into<GroupId>,
        dir: PathBuf,
        log_cfg: LogConfig,
        replicas: impl IntoIterator<Item = u64>,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
        let replicas: Vec<u64> = replicas.into_iter().collect();
        self.open_partition_inner(group.into(), dir, log_cfg, Some(replicas), None)
            .await
    }

    /// Opens (or creates) a replica that is being added to an existing group by the leader's
    /// [`PartitionGroup::change_voters`]: it never initializes the group, it waits to be
    /// contacted. Open it before the leader changes the voters. Reopening after a restart works
    /// like [`RaftHost::open_partition`].
    pub async fn join_partition(
        &self,
        group: impl Into<GroupId>,
        dir: PathBuf,
        log_cfg: LogConfig,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
        self.open_partition_inner(group.into(), dir, log_cfg, None, None)
            .await
    }

    /// Opens again a replica whose Raft core stopped on a storage error, once the caller thinks
    /// the disk may work again. Entries after the last one this replica fsynced are cut first:
    /// after a failed fsync the kernel may report them written while the disk lacks them, and
    /// they were never acknowledged by this replica; the leader sends them again. Errors (the
    /// disk still failing) leave the group closed; call again later.
    pub async fn reopen_partition(&self, group: &str) -> Result<Arc<PartitionGroup>, RaftError> {
        let group = GroupId::from(group);
        let group = &group;
        let pending = self
            .reopen_pending
            .lock()
            .ok()
            .and_then(|p| p.get(group).cloned());
        let (dir, log_cfg, durable) = match (self.partition(group), pending) {
            (Some(old), _) if old.failure().is_none() => return Ok(old),
            (Some(old), _) => {
                let how = (old.dir.clone(), old.log_cfg, old.shared.durable_in_memory());
                drop(old);
                self.close_partition(group, false).await?;
                how
            }
            (None, Some(how)) => how,
            (None, None) => return Err(RaftError::GroupNotFound(group.clone())),
        };
        if let Ok(mut p) = self.reopen_pending.lock() {
            p.insert(group.clone(), (dir.clone(), log_cfg, durable));
        }
        let opened = self
            .open_partition_inner(group.clone(), dir, log_cfg, None, Some(durable))
            .await?;
        if let Ok(mut p) = self.reopen_pending.lock() {
            p.remove(group);
        }
        Ok(opened)
    }

    async fn open_partition_inner(
        &self,
        group: GroupId,
        dir: PathBuf,
        log_cfg: LogConfig,
        replicas: Option<Vec<u64>>,
        cut_after: Option<Option<u64>>,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
        let voters: Option<BTreeSet<u64>> = replicas.as_ref().map(|r| r.iter().copied().collect());
        let _guard = self.open_lock.lock().await;
        if *self.shutdown_tx.borrow() {
            return Err(RaftError::Shutdown);
        }
        if let Some(p) = self.partition(&group) {
            return Ok(p);
        }
        let open_dir = dir.clone();
        let shared = tokio::task::spawn_blocking(move || {
            let shared = PartitionShared::open(&open_dir, log_cfg)?;
            if let Some(durable) = cut_after {
                shared.cut_unconfirmed_tail(durable)?;
            }
            Ok::<_, crate::StorageError>(shared)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
        .map_err(RaftError::from)?;
        let has_state = shared.has_state().map_err(RaftError::from)?;
        let factory = self.partition_machines.read().ok().and_then(|f| f.clone());
        let machines = Arc::new(PartitionMachines::new(group.clone(), factory));
        let sm = PartitionStateMachine::open(shared.clone(), machines.clone())
            .await
            .map_err(RaftError::from)?;
        let hw_rx = machines.hw.subscribe();
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
        // Subscribed before the group is listed: a change in between would otherwise count as
        // already seen and never bump the registry's change counter.
        let server_metrics = raft.server_metrics();
        self.registry.insert(group.clone(), raft.clone());
        self.registry.insert_store(group.clone(), shared.clone());
        tokio::spawn(watch_server_state(
            server_metrics,
            machines.clone(),
            self.registry.clone(),
        ));
        let pg = Arc::new(PartitionGroup {
            group: group.clone(),
            node_id: self.cfg.node_id,
            dir,
            raft: raft.clone(),
            transport: self.transport.clone(),
            meta: self.meta.raft.clone(),
            shared,
            hw_rx,
            machines: machines.clone(),
            liveness: self.liveness.clone(),
            gate: Arc::new(AppendGate::default()),
            log_cfg,
        });
        if let Ok(mut parts) = self.partitions.write() {
            parts.insert(group.clone(), pg.clone());
        }

        let started = if !has_state {
            match (&voters, &replicas) {
                (Some(v), Some(r)) if r.first() == Some(&self.cfg.node_id) => {
                    self.initialize_partition(&raft, v).await
                }
                (Some(v), Some(r)) if v.contains(&self.cfg.node_id) => {
                    self.initialize_partition_later(&group, &raft, v, r.first().copied())
                }
                _ => Ok(()),
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

    /// Stops the group; with `delete_data`, also removes its directory.
    pub async fn close_partition(&self, group: &str, delete_data: bool) -> Result<(), RaftError> {
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
                Err(e) => Err(RaftError::io(&dir, e)),
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

/// Follows the group's server state (state, leader, vote, membership; not its log, so appends
/// do not wake it): notes every change in the registry's change counter, which the loops that
/// scan all groups use to skip idle rounds, and drops the machines' in-flight views when this
/// node stops leading the group; a node that leads again does so in a new term, which resets
/// them before its first proposal. Ends when the group's Raft core stops.
async fn watch_server_state(
    mut metrics: watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, BasicNode>>,
    machines: Arc<PartitionMachines>,
    registry: Arc<Registry>,
) {
    let mut leading = false;
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow_and_update().state == openraft::ServerState::Leader;
        registry.bump();
        if leading && !now {
            machines.leadership_lost();
        }
        leading = now;
    }
    // The core stopped (closed, or a fatal error): a leadership it held is over.
    if leading {
        machines.leadership_lost();
    }
    registry.bump();
}
