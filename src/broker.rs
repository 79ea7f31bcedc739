//! The broker: what request handlers and the node's loops share — configuration, the Raft host,
//! the applied controller state, the one map of this node's partition replicas, health and
//! metrics. It starts and owns no tasks (that is `node`), so handlers and loops can depend on it
//! without depending on each other.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sluice_raft::{PartitionGroup, RaftError, RaftHost};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::error;

use crate::config::ServerConfig;
use crate::controller::consumer_groups::{ConsumerGroupOp, ConsumerGroupReply};
use crate::controller::{Command, MetaMachine, MetaState, PartitionId, Reply};
use crate::metrics::Metrics;
use crate::rpc::{self, AppRequest, AppResponse};

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("raft: {0}")]
    Raft(#[from] RaftError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A partition replica's key on this node: (topic name, partition index).
pub type PartitionKey = (String, PartitionId);

/// Every replica of a [`PartitionRegistry`] at one moment.
pub type PartitionList = Arc<Vec<(PartitionKey, Arc<PartitionGroup>)>>;

/// This node's partition replicas, the one map of them in the broker crate.
#[derive(Default)]
pub struct PartitionRegistry {
    groups: RwLock<HashMap<PartitionKey, Arc<PartitionGroup>>>,
    /// [`PartitionRegistry::all`]'s list, built on its first call after a change and shared until
    /// the next: the node's loops walk every replica several times a second, and copying every
    /// key (a topic name each) on each walk was a large part of an idle node's work.
    listed: Mutex<Option<PartitionList>>,
    /// Bumped whenever the set changes or a reconcile pass ends, so CreateTopics can wait for
    /// its partitions.
    changed: watch::Sender<u64>,
}

impl PartitionRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PartitionKey, Arc<PartitionGroup>>> {
        // The map is only ever replaced entry by entry: a poisoned lock holds a consistent map.
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PartitionKey, Arc<PartitionGroup>>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, topic: &str, partition: PartitionId) -> Option<Arc<PartitionGroup>> {
        self.read().get(&(topic.to_string(), partition)).cloned()
    }

    pub fn contains(&self, key: &PartitionKey) -> bool {
        self.read().contains_key(key)
    }

    /// Every replica, as a shared list so no lock is held while the caller works (rebuilt only
    /// after the set changed).
    pub fn all(&self) -> PartitionList {
        let mut listed = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = listed.as_ref() {
            return l.clone();
        }
        let l: PartitionList = Arc::new(
            self.read()
                .iter()
                .map(|(k, g)| (k.clone(), g.clone()))
                .collect(),
        );
        *listed = Some(l.clone());
        l
    }

    /// Drops the shared list after the map changed. Taken after the map's lock is released, and
    /// `all` builds under this lock, so a list built from the old map is never kept.
    fn unlist(&self) {
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Adds or replaces (after a reopen) a replica.
    pub fn insert(&self, key: PartitionKey, group: Arc<PartitionGroup>) {
        self.write().insert(key, group);
        self.unlist();
        self.bump();
    }

    /// Replaces the replica under `key` with its reopened self, only if the entry still holds
    /// that group: a reconcile pass may have replaced it (topic re-created) meanwhile.
    pub fn replace_reopened(&self, key: &PartitionKey, group: Arc<PartitionGroup>) -> bool {
        let replaced = {
            let mut map = self.write();
            match map.get_mut(key) {
                Some(g) if g.group_id() == group.group_id() => {
                    *g = group;
                    true
                }
                _ => false,
            }
        };
        if replaced {
            self.unlist();
            self.bump();
        }
        replaced
    }

    pub fn remove(&self, key: &PartitionKey) -> Option<Arc<PartitionGroup>> {
        let g = self.write().remove(key);
        self.unlist();
        self.bump();
        g
    }

    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// What the node knows of its own standing in the cluster.
#[derive(Default)]
pub struct Health {
    /// When this node last had a heartbeat answered by the controller (or was the controller).
    controller_contact: Mutex<Option<Instant>>,
    /// Why this node fenced itself over its storage (a replica it could not reopen for a while):
    /// it stops heartbeating the controller, which fences it, so leadership moves away and no
    /// new replicas are placed here.
    storage_fence: Mutex<Option<String>>,
    /// Controller side: when each broker last sent a heartbeat.
    heartbeats: Mutex<HashMap<u64, Instant>>,
}

impl Health {
    pub fn touch_controller_contact(&self) {
        *self
            .controller_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Whether the controller answered us within `within`.
    pub fn in_controller_contact(&self, within: Duration) -> bool {
        self.controller_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < within)
    }

    pub fn storage_fence(&self) -> Option<String> {
        self.storage_fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets or clears the fence; true if that changed it.
    pub fn set_storage_fence(&self, why: Option<String>) -> bool {
        let mut f = self.storage_fence.lock().unwrap_or_else(|p| p.into_inner());
        let changed = f.is_some() != why.is_some();
        *f = why;
        changed
    }

    pub fn record_heartbeat(&self, from: u64) {
        self.heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from, Instant::now());
    }

    pub fn heartbeats(&self) -> HashMap<u64, Instant> {
        self.heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A consumer-group operation waiting for the coordinator's next proposal, and where its reply
/// goes.
pub type QueuedConsumerGroupOp = (
    ConsumerGroupOp,
    oneshot::Sender<Result<ConsumerGroupReply, BrokerError>>,
);

/// Operations that may wait for a proposal before submitters wait for room.
const GROUP_OP_QUEUE: usize = 16_384;

/// The consumer-group coordinator's state that is not replicated. It matters only on the node
/// that leads the metadata group; a new coordinator starts it afresh (see `coordinator/`).
pub struct ConsumerGroupRuntime {
    /// (group, member id) -> when the member's session expires unless it is heard from.
    pub deadlines: Mutex<HashMap<(String, String), Instant>>,
    /// (group, member id) handed out with MEMBER_ID_REQUIRED (KIP-394) and not yet used -> when
    /// the offer lapses.
    pub pending_members: Mutex<HashMap<(String, String), Instant>>,
    /// The metadata term in which this node finished taking over as coordinator (0: never).
    pub loaded_term: AtomicU64,
    /// Operations queued or in a proposal, not yet answered.
    in_flight: AtomicU64,
    ops: mpsc::Sender<QueuedConsumerGroupOp>,
    ops_rx: Mutex<Option<mpsc::Receiver<QueuedConsumerGroupOp>>>,
    /// Wakes the coordinator's timers: a rebalance may be due.
    pub wake: Notify,
}

impl Default for ConsumerGroupRuntime {
    fn default() -> Self {
        let (ops, rx) = mpsc::channel(GROUP_OP_QUEUE);
        ConsumerGroupRuntime {
            deadlines: Mutex::default(),
            pending_members: Mutex::default(),
            loaded_term: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            ops,
            ops_rx: Mutex::new(Some(rx)),
            wake: Notify::new(),
        }
    }
}

/// The reply of a queued consumer-group operation, once its proposal is applied.
pub type GroupReplyRx = oneshot::Receiver<Result<ConsumerGroupReply, BrokerError>>;

impl ConsumerGroupRuntime {
    /// Queues `op` for the coordinator's next proposal. Operations are proposed in the order
    /// they were queued, so a connection's pipelined commits apply in the order it sent them.
    pub async fn enqueue(&self, op: ConsumerGroupOp) -> Result<GroupReplyRx, BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if self.ops.send((op, tx)).await.is_err() {
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return Err(BrokerError::Other(
                "the group coordinator has stopped".into(),
            ));
        }
        Ok(rx)
    }

    /// Queues `op` and waits for its applied reply.
    pub async fn submit(&self, op: ConsumerGroupOp) -> Result<ConsumerGroupReply, BrokerError> {
        let rx = self.enqueue(op).await?;
        rx.await
            .map_err(|_| BrokerError::Other("the group coordinator has stopped".into()))?
    }

    /// Operations queued or being proposed whose replies are not out yet.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Called by the proposal loop once it has sent `n` replies.
    pub fn answered(&self, n: usize) {
        self.in_flight
            .fetch_sub(n as u64, std::sync::atomic::Ordering::AcqRel);
    }

    /// The queue's receiving end, for the one loop that proposes its operations.
    pub fn take_queue(&self) -> Option<mpsc::Receiver<QueuedConsumerGroupOp>> {
        self.ops_rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Restarts `member`'s session clock.
    pub fn touch(&self, group: &str, member: &str, session_timeout_ms: i32) {
        let until = Instant::now() + Duration::from_millis(session_timeout_ms.max(0) as u64);
        self.deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((group.to_string(), member.to_string()), until);
    }
}

pub struct Broker {
    pub cfg: ServerConfig,
    pub raft: Arc<RaftHost>,
    meta: Arc<MetaMachine>,
    pub partitions: PartitionRegistry,
    pub health: Health,
    pub metrics: Metrics,
    pub started_at: Instant,
    /// Set when the node must stop (e.g. a foreign data directory); the node watches it.
    fatal: watch::Sender<Option<String>>,
    /// Bytes of record data that unwritten Fetch responses may hold (`sluice.fetch.memory.bytes`).
    pub fetch_budget: Arc<tokio::sync::Semaphore>,
    /// Producer ids this node may hand out, a block from the controller at a time.
    producer_ids: tokio::sync::Mutex<std::ops::Range<i64>>,
    /// The consumer-group coordinator's unreplicated state.
    pub consumer_groups: ConsumerGroupRuntime,
    /// How requests are authorized against the replicated ACLs.
    pub authorizer: crate::controller::acls::AuthorizerConfig,
    /// Bytes of requests read and not yet answered, across connections
    /// (`queued.max.request.bytes`); `None`: unbounded.
    pub request_budget: Option<Arc<tokio::sync::Semaphore>>,
}

/// Producer ids a node takes from the controller at once, as Kafka's brokers do.
const PRODUCER_ID_BLOCK: i64 = 1000;

impl Broker {
    pub fn new(cfg: ServerConfig, raft: Arc<RaftHost>, meta: Arc<MetaMachine>) -> Broker {
        let fetch_budget = Arc::new(tokio::sync::Semaphore::new(cfg.fetch_memory_bytes));
        let authorizer = crate::controller::acls::AuthorizerConfig {
            enabled: cfg.authorizer_enabled,
            super_users: cfg.super_users.iter().cloned().collect(),
            allow_if_no_acl: cfg.allow_everyone_if_no_acl_found,
        };
        // Semaphore permits are u32-counted per acquire; the cap keeps one request's ask in range.
        let request_budget = (cfg.queued_max_request_bytes > 0).then(|| {
            Arc::new(tokio::sync::Semaphore::new(
                cfg.queued_max_request_bytes.min(u32::MAX as usize),
            ))
        });
        Broker {
            authorizer,
            request_budget,
            cfg,
            raft,
            meta,
            partitions: PartitionRegistry::default(),
            health: Health::default(),
            metrics: Metrics::default(),
            started_at: Instant::now(),
            fatal: watch::channel(None).0,
            fetch_budget,
            producer_ids: tokio::sync::Mutex::new(0..0),
            consumer_groups: ConsumerGroupRuntime::default(),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// The applied controller state. Held briefly: every metadata apply waits for readers.
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, MetaState> {
        self.meta.read()
    }

    /// Changes whenever the applied controller state does.
    pub fn subscribe_state(&self) -> watch::Receiver<u64> {
        self.meta.subscribe()
    }

    /// Changes whenever the applied consumer groups may have.
    pub fn subscribe_groups(&self) -> watch::Receiver<u64> {
        self.meta.subscribe_groups()
    }

    /// This node's replica of the topic's partition as the controller knows the topic now.
    /// Takes the state lock: a caller holding a [`Broker::state`] guard uses
    /// [`Broker::partition_in`] (a second read can wait behind a queued writer forever).
    pub fn partition(&self, topic: &str, partition: PartitionId) -> Option<Arc<PartitionGroup>> {
        let st = self.state();
        self.partition_in(&st, topic, partition)
    }

    /// The replica of `topic`'s partition, if it belongs to the topic `st` names. The registry
    /// is keyed by name, and right after a delete and re-create it still holds the old topic's
    /// group until the reconcile pass closes it. That group may still lead: a produce answered
    /// from it would be acknowledged into a log about to be deleted, and a fetch would read
    /// another topic's records.
    pub fn partition_in(
        &self,
        st: &MetaState,
        topic: &str,
        partition: PartitionId,
    ) -> Option<Arc<PartitionGroup>> {
        let t = st.topics.get(topic)?;
        self.partitions
            .get(topic, partition)
            .filter(|g| crate::controller::is_group_of(g.group_id(), t, partition))
    }

    /// Proposes a metadata command and returns its applied reply.
    pub async fn propose(&self, cmd: &Command) -> Result<Reply, BrokerError> {
        let bytes = serde_json::to_vec(cmd).map_err(|e| BrokerError::Other(e.to_string()))?;
        // A freshly started single node may not have elected itself yet; wait briefly for that
        // instead of failing the first client request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match rpc::propose_anywhere(&self.raft, self.cfg.node_id, bytes.clone()).await {
                Ok(reply) => {
                    return serde_json::from_slice(&reply)
                        .map_err(|e| BrokerError::Other(format!("bad metadata reply: {e}")))
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

    /// A producer id no node has handed out before, from this node's block; a new block comes
    /// from the controller when it runs out.
    pub async fn new_producer_id(&self) -> Result<i64, BrokerError> {
        let mut block = self.producer_ids.lock().await;
        if block.is_empty() {
            let cmd = Command::AllocateProducerIds {
                broker: self.cfg.node_id,
                count: PRODUCER_ID_BLOCK,
            };
            *block = match self.propose(&cmd).await? {
                Reply::ProducerIds { first, count } => first..first + count,
                Reply::Err { message, .. } => return Err(BrokerError::Other(message)),
                Reply::Ok | Reply::Groups(_) | Reply::AclsDeleted(_) => {
                    return Err(BrokerError::Other("no producer ids in the reply".into()))
                }
            };
        }
        let id = block.start;
        block.start += 1;
        Ok(id)
    }

    pub fn live_brokers(&self) -> BTreeSet<u64> {
        self.state().live_brokers()
    }

    pub fn controller_id(&self) -> Option<u64> {
        self.raft.meta().leader()
    }

    /// Waits (bounded) until every partition of `topic` has a local group with a leader.
    pub async fn wait_for_partitions(&self, topic: &str, timeout: Duration) -> bool {
        let mut rx = self.partitions.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = {
                let st = self.state();
                match st.topics.get(topic) {
                    None => false,
                    Some(t) => (0..t.partitions.len()).all(|p| {
                        self.partition_leader_in(&st, topic, PartitionId::from_index(p))
                            .is_some()
                    }),
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
        partition: PartitionId,
    ) -> Option<(u64, i32)> {
        // A replica stopped on a storage error knows no leader; the controller's record does.
        // A deleted topic's group still closing is not this topic's replica (`partition_in`):
        // CreateTopics once waited on its leader and returned before the new partition had one.
        if let Some(g) = self
            .partition_in(st, topic, partition)
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
        let l = t.leaders.get(&partition)?;
        // A leader on a broker that left the cluster cannot serve; say so instead of misrouting.
        (st.brokers.contains_key(&l.leader) && !st.fenced.contains(&l.leader))
            .then_some((l.leader, l.epoch))
    }

    /// Ready = we know a controller, are registered, and every local partition has a leader.
    pub fn is_ready(&self) -> bool {
        if self.controller_id().is_none() || self.health.storage_fence().is_some() {
            return false;
        }
        let assigned = {
            let st = self.state();
            if !st.brokers.contains_key(&self.cfg.node_id) {
                return false;
            }
            st.partitions_on(self.cfg.node_id).count()
        };
        let parts = self.partitions.all();
        parts.len() >= assigned && parts.iter().all(|(_, g)| g.leader().is_some())
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
            let req = AppRequest::Elect {
                group: group.to_string(),
            };
            match rpc::call(&self.raft, target, &req, Duration::from_secs(20)).await {
                Ok(AppResponse::Ok) => Ok(()),
                Ok(other) => Err(RaftError::Other(format!(
                    "node {target} answered {other:?}"
                ))),
                Err(e) => Err(RaftError::Other(e)),
            }
        };
        g.transfer_leadership(target, elect).await
    }

    /// Stops the node: the reason is logged and the node's runner shuts it down.
    pub fn fail(&self, reason: String) {
        error!(%reason, "fatal");
        self.fatal.send_replace(Some(reason));
    }

    /// Resolves to `Some(reason)` once [`Broker::fail`] was called.
    pub fn subscribe_fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }
}
