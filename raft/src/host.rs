//! [`RaftHost`]: every Raft group of one process (the metadata group and the partition groups),
//! their configs, and the transport they share.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::RaftError as OpenraftError;
use openraft::{BasicNode, ChangeMembers, Config, RaftMetrics, ServerState, SnapshotPolicy};
use rand::Rng;
use sluice_storage::{batch, LogConfig, MetaStore};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::codec::ResponseStatus;
use crate::liveness::{self, Liveness};
use crate::meta_store::{MetaLogStore, MetaStateMachine};
use crate::partition_store::{
    decode_offsets, LocalWaiter, PartitionLogStore, PartitionShared, PartitionStateMachine,
};
use crate::transport::TransportError;
use crate::registry::Registry;
use crate::transport::{self, GroupNetworkFactory, Transport};
use crate::{AppHandler, GroupId, MetaApp, NodeId, Raft, RaftError, META_GROUP};

/// How long a proposal may wait for commit. On expiry the outcome is unknown (the entry may still
/// commit), which is what [`RaftError::Timeout`] tells the caller.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a membership change waits for a new member (added as a learner first) to catch up
/// with the leader's log before it is made a voter.
const LEARNER_CATCHUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How far behind a new partition replica may be when appends pause for its last catch-up
/// before it becomes a voter: one or two AppendEntries.
const PROMOTE_SLACK_ENTRIES: u64 = 64;

/// The longest a partition pauses appends while its new replicas take the last entries.
const PROMOTE_PAUSE_MAX: Duration = Duration::from_secs(10);

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
    /// Last log index covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last log index this node has purged: its log starts after it.
    pub purged_index: Option<u64>,
    /// Why the group's Raft core stopped, if it did on an error (a failed write or fsync).
    pub storage_error: Option<String>,
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
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        storage_error: core_failure(m),
    }
}

/// Why a group's Raft core stopped, unless it was asked to.
fn core_failure(m: &RaftMetrics<NodeId, BasicNode>) -> Option<String> {
    match &m.running_state {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(e) => Some(e.to_string()),
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

/// Partitions are many and mostly idle, so they are quiet groups (DESIGN.md 4a): openraft's
/// heartbeats and election timer are off, and the group supervisor ([`election_watchdog`]) drives
/// elections and re-announcements from one node-to-node ping ([`crate::liveness`]). openraft
/// still sends the commit index to followers whenever it advances.
fn partition_config(group: &str) -> Result<Arc<Config>, RaftError> {
    let c = Config {
        cluster_name: group.to_string(),
        // Without heartbeats this is only the AppendEntries RPC timeout. It must exceed a slow
        // link's round trip: at 300 ms, a 200 ms delay each way stopped every commit.
        heartbeat_interval: 1000,
        // The supervisor's patience before electing in a leaderless group, and openraft's leader
        // lease: a voter refuses votes this long after the leader's last append reached it.
        election_timeout_min: 1100,
        election_timeout_max: 2000,
        enable_heartbeat: false,
        enable_elect: false,
        max_payload_entries: PARTITION_MAX_PAYLOAD_ENTRIES,
        // Snapshots are cut at retention's purge point only (see partition_store): one cut
        // later would make a follower that installs it skip records the leader retains. A
        // restart starts from the applied checkpoint in the state file instead.
        snapshot_policy: SnapshotPolicy::Never,
        // A partition snapshot holds no records, so purging the log behind it would delete
        // Kafka data: retention decides what goes, never openraft.
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate().map_err(|e| RaftError::Other(e.to_string()))?,
    ))
}

/// Polls `fut` once; its output if that was enough.
fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
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

/// How often the group supervisor looks at the groups (randomized per round, see below).
const WATCHDOG_PERIOD_MS: std::ops::Range<u64> = 100..400;

/// A follower whose leader's node is down, or no longer claims the group, elects after a random
/// wait in this range (on top of [`crate::liveness::ALIVE_WITHIN`] for a silent node), so that
/// the followers of one group rarely collide.
const LEADER_LOST_PATIENCE_MS: (u64, u64) = (200, 1000);

/// A quiet leader nudges followers that lag behind its log at most this often (openraft does not
/// retry replication to a follower that was down until there is something new to send).
const NUDGE_EVERY: Duration = Duration::from_secs(1);

/// How long a voter of a new group waits for its live first replica to initialize the group
/// before it initializes the group itself.
const LATE_INIT_PATIENCE: Duration = Duration::from_secs(15);

/// A uniformly random duration in `[min_ms, max_ms]`.
fn random_timeout(min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(min_ms..=max_ms.max(min_ms)))
}

/// Why a voter thinks its group needs an election, if it does.
fn stall_reason(
    group: &str,
    m: &RaftMetrics<NodeId, BasicNode>,
    node_id: NodeId,
    liveness: &Liveness,
) -> Option<&'static str> {
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    if !matches!(m.state, ServerState::Follower | ServerState::Candidate)
        || voters.len() < 2
        || !voters.contains(&node_id)
    {
        return None;
    }
    if group == META_GROUP {
        // The metadata group keeps openraft's timers; this only breaks split votes.
        return m
            .current_leader
            .is_none()
            .then_some("no leader elected by the timer");
    }
    // Like a pre-vote: a node that cannot reach a majority would only raise the term and
    // disrupt the group when it comes back.
    if !liveness.quorum_reachable(node_id, &voters) {
        return None;
    }
    match m.current_leader {
        None if liveness.someone_leads(&voters, group) => None,
        None => Some("no leader"),
        Some(l) if l == node_id => None,
        Some(l) if !liveness.alive(l) => Some("the leader's node is unreachable"),
        Some(l) if !liveness.alive_and_leads(l, group) => Some("the leader no longer leads"),
        Some(_) => None,
    }
}

/// Whether a leader has voters whose log is behind its own.
fn has_lagging_follower(m: &RaftMetrics<NodeId, BasicNode>) -> bool {
    let Some(repl) = &m.replication else {
        return false;
    };
    let last = m.last_log_index;
    m.membership_config
        .membership()
        .voter_ids()
        .any(|v| repl.get(&v).is_some_and(|l| l.map(|l| l.index) < last))
}

/// The group supervisor: what openraft's timers do for a group, for quiet partition groups.
///
/// - A voter elects when its group has no leader, its leader's node stopped answering pings, or
///   the leader's node no longer claims the group; after a random patience, redrawn for every
///   attempt (openraft does not retry a triggered election that loses, so this does).
/// - A leader nudges lagging followers with a heartbeat.
///
/// For the metadata group, which keeps its timers, it only breaks split votes: each openraft 0.9
/// instance draws its election timeout once and checks it only on a tick of 1.5 x heartbeat
/// interval, so two candidates whose timeouts fall into the same tick collide forever.
async fn election_watchdog(
    registry: Arc<Registry>,
    node_id: NodeId,
    liveness: Arc<Liveness>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stalled_since: HashMap<GroupId, std::time::Instant> = HashMap::new();
    let mut patience: HashMap<GroupId, Duration> = HashMap::new();
    let mut nudged: HashMap<GroupId, std::time::Instant> = HashMap::new();
    let mut deferring_since: HashMap<GroupId, std::time::Instant> = HashMap::new();
    loop {
        let period = Duration::from_millis(rand::thread_rng().gen_range(WATCHDOG_PERIOD_MS));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let mut seen = BTreeSet::new();
        let now = std::time::Instant::now();
        for (group, raft) in registry.all() {
            let (reason, lagging, leader_known) = {
                let m = raft.metrics();
                let m = m.borrow();
                (
                    stall_reason(&group, &m, node_id, &liveness),
                    group != META_GROUP
                        && m.state == ServerState::Leader
                        && has_lagging_follower(&m),
                    m.current_leader.is_some(),
                )
            };
            if lagging
                && nudged
                    .get(&group)
                    .is_none_or(|t| now.duration_since(*t) >= NUDGE_EVERY)
            {
                nudged.insert(group.clone(), now);
                if let Err(e) = raft.trigger().heartbeat().await {
                    tracing::debug!(%group, error = %e, "nudging followers failed");
                }
            }
            let Some(reason) = reason else {
                stalled_since.remove(&group);
                patience.remove(&group);
                continue;
            };
            seen.insert(group.clone());
            let since = *stalled_since.entry(group.clone()).or_insert(now);
            let (min_ms, max_ms) = if leader_known {
                LEADER_LOST_PATIENCE_MS
            } else {
                let c = raft.config();
                (c.election_timeout_min, c.election_timeout_max)
            };
            let wait = *patience
                .entry(group.clone())
                .or_insert_with(|| random_timeout(min_ms, max_ms));
            if now.duration_since(since) >= wait {
                let defer = group != META_GROUP && {
                    let m = raft.metrics();
                    let m = m.borrow();
                    defer_to_better_log(&registry, &m, &group, &liveness)
                };
                if defer {
                    let first = *deferring_since.entry(group.clone()).or_insert(now);
                    if now.duration_since(first) < MAX_DEFER {
                        continue;
                    }
                }
                deferring_since.remove(&group);
                if !registry.may_vote(&group) {
                    tracing::debug!(%group, "not standing for election: getting back lost entries");
                    continue;
                }
                tracing::info!(
                    %group,
                    reason,
                    stalled_ms = now.duration_since(since).as_millis() as u64,
                    "triggering an election"
                );
                if let Err(e) = raft.trigger().elect().await {
                    tracing::warn!(%group, error = %e, "triggering an election failed");
                }
                stalled_since.insert(group.clone(), now);
                patience.insert(group.clone(), random_timeout(min_ms, max_ms));
            }
        }
        registry.set_stalled(
            seen.iter()
                .filter(|g| g.as_str() != META_GROUP)
                .cloned()
                .collect(),
        );
        stalled_since.retain(|g, _| seen.contains(g));
        patience.retain(|g, _| seen.contains(g));
        deferring_since.retain(|g, _| seen.contains(g));
        nudged.retain(|_, t| now.duration_since(*t) < NUDGE_EVERY);
    }
}

/// A voter defers to a peer with a longer log at most this long (that peer might not be able to
/// run, e.g. when it cannot reach a majority of its own).
const MAX_DEFER: Duration = Duration::from_secs(5);

/// Whether a live peer without a leader has a more up-to-date log for `group` than this node.
fn defer_to_better_log(
    registry: &Registry,
    m: &RaftMetrics<NodeId, BasicNode>,
    group: &str,
    liveness: &Liveness,
) -> bool {
    let Some(mine) = registry.last_log_id(group) else {
        return false;
    };
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    liveness.better_log_elsewhere(&voters, group, mine)
}

/// A leader re-announces itself to a peer that is reachable again (it may have restarted, or
/// elected in vain while cut off): a quiet group would otherwise leave that follower without a
/// leader until the next write.
fn announce_to(registry: &Registry, peer: NodeId) {
    for (group, raft) in registry.all() {
        if group == META_GROUP {
            continue;
        }
        let is_voter_leader = {
            let m = raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader
                && m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == peer)
        };
        if is_voter_leader {
            tokio::spawn(async move {
                if let Err(e) = raft.trigger().heartbeat().await {
                    tracing::debug!(%group, error = %e, "announcing leadership failed");
                }
            });
        }
    }
}

/// The address of node `id`: the host's address book (configured peers plus
/// [`RaftHost::set_peer_addr`]) first, then the metadata group's membership.
fn resolve_addr(transport: &Transport, meta: &Raft, id: NodeId) -> Option<String> {
    transport.addr_of(id).or_else(|| {
        meta.metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    })
}

fn ensure_leader(raft: &Raft, node_id: NodeId) -> Result<(), RaftError> {
    let m = raft.metrics();
    let m = m.borrow();
    if m.state == ServerState::Leader && m.current_leader == Some(node_id) {
        Ok(())
    } else {
        Err(RaftError::NotLeader {
            leader: m.current_leader.filter(|l| *l != node_id),
        })
    }
}

fn current_voters(raft: &Raft) -> BTreeSet<NodeId> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// Makes `new` the voter set: every new member is added as a learner first and must catch up
/// (bounded by [`LEARNER_CATCHUP_TIMEOUT`]) before the joint change makes it a voter; removed
/// voters leave the membership altogether. Call on the leader.
async fn change_voters<G, F>(
    raft: &Raft,
    node_id: NodeId,
    new: BTreeSet<NodeId>,
    addr_of: impl Fn(NodeId) -> Option<String>,
    before_promoting: impl FnOnce(Vec<NodeId>) -> F,
) -> Result<(), RaftError>
where
    F: std::future::Future<Output = Result<G, RaftError>>,
{
    ensure_leader(raft, node_id)?;
    if new.is_empty() {
        return Err(RaftError::Other("a group needs at least one voter".into()));
    }
    let old = current_voters(raft);
    if old == new {
        return Ok(());
    }
    let learners: BTreeSet<NodeId> = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .learner_ids()
        .collect();
    for id in new.difference(&old) {
        let addr = addr_of(*id)
            .ok_or_else(|| RaftError::Other(format!("no raft address known for node {id}")))?;
        tracing::info!(group = %raft.config().cluster_name, node = id, %addr, already_learner = learners.contains(id), "adding a learner; waiting for it to catch up");
        match tokio::time::timeout(
            LEARNER_CATCHUP_TIMEOUT,
            raft.add_learner(*id, BasicNode { addr }, true),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(RaftError::Timeout),
        }
    }
    // Held across the change: a partition keeps its gate closed while the new voters are made.
    let _ready = before_promoting(new.difference(&old).copied().collect()).await?;
    tracing::info!(group = %raft.config().cluster_name, ?old, ?new, "changing voters");
    match tokio::time::timeout(
        PROPOSE_TIMEOUT,
        raft.change_membership(ChangeMembers::ReplaceAllVoters(new), false),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(RaftError::Timeout),
    }
}

/// Starts an election on this node and keeps starting them (openraft does not retry a triggered
/// election that loses) until this node leads, another node wins a newer term, or a deadline
/// of 4 election timeouts passes.
///
/// openraft 0.9 has no leadership transfer, and voters refuse votes while the leader's lease
/// (the maximum election timeout) lasts. The first election still works as a transfer: its
/// higher term makes the current leader step down at its next heartbeat to this node, after
/// which the old leader grants this node's next vote (if this node's log is at least as up to
/// date) and the two make a majority of three.
async fn elect_until_leader(raft: &Raft, node_id: NodeId) -> Result<(), RaftError> {
    let (heartbeat_ms, timeout_max_ms) = {
        let c = raft.config();
        (c.heartbeat_interval, c.election_timeout_max)
    };
    let (start_term, voter) = {
        let m = raft.metrics();
        let m = m.borrow();
        (
            m.current_term,
            m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == node_id),
        )
    };
    if !voter {
        return Err(RaftError::Other(format!(
            "node {node_id} is not a voter of {}",
            raft.config().cluster_name
        )));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(4 * timeout_max_ms);
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.state == ServerState::Leader && m.current_leader == Some(node_id) {
                return Ok(());
            }
            if let Some(l) = m.current_leader {
                if l != node_id && m.current_term > start_term {
                    return Err(RaftError::NotLeader { leader: Some(l) });
                }
            }
            if m.state == ServerState::Shutdown {
                return Err(RaftError::Shutdown);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RaftError::Timeout);
        }
        if raft.metrics().borrow().state != ServerState::Leader {
            tracing::info!(group = %raft.config().cluster_name, "triggering an election on request");
            raft.trigger().elect().await?;
        }
        // Quiet partition groups have a long heartbeat interval (it is only their RPC timeout);
        // retrying that slowly would make every transfer take seconds.
        let step = heartbeat_ms.min(300);
        let wait = random_timeout(step, 2 * step);
        let until = (tokio::time::Instant::now() + wait).min(deadline);
        // Wake early when this node wins (or someone else does).
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return Err(RaftError::Shutdown);
                    }
                    let m = metrics.borrow();
                    if m.current_leader == Some(node_id)
                        || (m.current_leader.is_some() && m.current_term > start_term)
                    {
                        break;
                    }
                }
            }
        }
    }
}

/// The metadata group handle.
pub struct MetaGroup {
    node_id: NodeId,
    raft: Raft,
    transport: Arc<Transport>,
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

    /// Leader, and a majority acknowledged it within `within` (a leader cut off from the others
    /// keeps its role in openraft 0.9 until it hears of a newer term).
    pub fn leads_with_quorum(&self, within: Duration) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        let voters = m.membership_config.membership().voter_ids().count();
        m.state == ServerState::Leader
            && m.current_leader == Some(self.node_id)
            && (voters <= 1
                || m.millis_since_quorum_ack
                    .is_some_and(|ms| u128::from(ms) <= within.as_millis()))
    }

    pub fn status(&self) -> GroupStatus {
        status_from(META_GROUP, &self.raft.metrics().borrow())
    }

    /// The current voters with the raft address recorded in the membership for each.
    pub fn voters(&self) -> BTreeMap<u64, String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let mem = m.membership_config.membership();
        mem.voter_ids()
            .map(|id| {
                let addr = mem
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .unwrap_or_default();
                (id, addr)
            })
            .collect()
    }

    /// Adds node `id` (listening at `raft_addr`) as a voter: first as a learner, waiting until it
    /// has caught up (bounded), then by a membership change. A no-op if it already votes. Call
    /// on the leader, else [`RaftError::NotLeader`]. The new node must be started with a `peers`
    /// map whose lowest id is not its own, so that it waits to be contacted.
    pub async fn add_voter(&self, id: u64, raft_addr: String) -> Result<(), RaftError> {
        ensure_leader(&self.raft, self.node_id)?;
        self.transport.set_addr(id, raft_addr.clone());
        let mut new = current_voters(&self.raft);
        if !new.insert(id) {
            return Ok(());
        }
        let addr = raft_addr.clone();
        change_voters(
            &self.raft,
            self.node_id,
            new,
            move |n| (n == id).then(|| addr.clone()),
            |_| async { Ok(()) },
        )
        .await
    }

    /// Removes node `id` from the membership (not even a learner afterwards). A no-op if it is not
    /// a voter. Call on the leader. Removing the leader itself is allowed, but transfer the
    /// leadership first to keep the group available.
    pub async fn remove_voter(&self, id: u64) -> Result<(), RaftError> {
        ensure_leader(&self.raft, self.node_id)?;
        let mut new = current_voters(&self.raft);
        if !new.remove(&id) {
            return Ok(());
        }
        change_voters(
            &self.raft,
            self.node_id,
            new,
            |_| None,
            |_| async { Ok(()) },
        )
        .await
    }

    /// Makes this node the leader if it can: see [`PartitionGroup::trigger_elect`].
    pub async fn trigger_elect(&self) -> Result<(), RaftError> {
        elect_until_leader(&self.raft, self.node_id).await
    }
}

/// How long [`PartitionGroup::apply_retention`] waits for openraft's snapshot and for its purge.
const RETENTION_WAIT: Duration = Duration::from_secs(10);

fn wait_error(e: openraft::metrics::WaitError) -> RaftError {
    match e {
        openraft::metrics::WaitError::Timeout(..) => RaftError::Timeout,
        openraft::metrics::WaitError::ShuttingDown => RaftError::Shutdown,
    }
}

/// What one [`PartitionGroup::apply_retention`] pass deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// The log now starts after this Raft index.
    pub purged_upto_index: u64,
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    /// The new Kafka log start offset.
    pub log_start_offset: i64,
}

/// Changes of one partition's high watermark and log start offset, from
/// [`PartitionGroup::subscribe_changes`].
pub struct PartitionChanges {
    hw: watch::Receiver<i64>,
    log_start: watch::Receiver<i64>,
}

impl PartitionChanges {
    /// Whether either moved since the subscription or the last [`PartitionChanges::changed`].
    pub fn has_changed(&self) -> bool {
        self.hw.has_changed().unwrap_or(false) || self.log_start.has_changed().unwrap_or(false)
    }

    /// Resolves at the next change. Once the group has closed it never resolves (a closed
    /// channel would otherwise resolve at once, forever): callers bound the wait themselves.
    pub async fn changed(&mut self) {
        tokio::select! {
            Ok(()) = self.hw.changed() => {}
            Ok(()) = self.log_start.changed() => {}
            else => std::future::pending::<()>().await,
        }
    }
}

/// One partition's Raft group on this node; its log is the partition log.
pub struct PartitionGroup {
    group: GroupId,
    node_id: NodeId,
    dir: PathBuf,
    raft: Raft,
    transport: Arc<Transport>,
    /// The metadata group, whose membership is the fallback address book.
    meta: Raft,
    shared: Arc<PartitionShared>,
    hw_rx: watch::Receiver<i64>,
    liveness: Arc<Liveness>,
    /// Closed by a leadership transfer so the target can catch up to a log that has stopped
    /// growing.
    gate: AppendGate,
    /// How the log was opened, to open it again after a storage failure.
    log_cfg: LogConfig,
}

/// Admission of appends to a partition group, without any await between the check and the
/// proposal: a caller's batch reaches Raft on the caller's first poll, so the batches of one
/// connection's pipelined requests enter the log in arrival order whatever the runtime's
/// cooperative budget or task scheduling does.
#[derive(Default)]
struct AppendGate {
    state: std::sync::Mutex<GateState>,
    /// Signalled when a transfer reopens the gate.
    reopened: tokio::sync::Notify,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Admitted appends that have not finished (committed, failed or given up).
    in_flight: usize,
}

/// Counts one admitted append until it is dropped.
struct InFlight<'a>(&'a AppendGate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

/// Keeps the gate closed until dropped.
struct Closed<'a>(&'a AppendGate);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = false;
        self.0.reopened.notify_waiters();
    }
}

impl AppendGate {
    /// Runs `submit` and counts the append in flight if the gate is open; `None` if it is closed.
    fn admit<T>(&self, submit: impl FnOnce() -> T) -> Option<(InFlight<'_>, T)> {
        // Poisoning cannot leave the two plain fields inconsistent, so it is ignored.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return None;
        }
        st.in_flight += 1;
        let out = submit();
        Some((InFlight(self), out))
    }

    fn close(&self) -> Closed<'_> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        Closed(self)
    }

    fn in_flight(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight
    }
}

impl PartitionGroup {
    /// Proposes one validated Kafka batch; returns (base_offset, last_offset) once it is
    /// committed, i.e. fsynced on a majority of the voters (Kafka acks=all).
    pub async fn append(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        self.append_with(batch, false).await
    }

    /// Like [`PartitionGroup::append`], but answers as soon as the batch is on this leader's
    /// disk (Kafka acks=1): a leader that fails before a majority has it may lose it.
    pub async fn append_leader_ack(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        self.append_with(batch, true).await
    }

    async fn append_with(&self, batch: Bytes, leader_ack: bool) -> Result<(i64, i64), RaftError> {
        // Every replica's log refuses a batch that fails validation, and a log store error is
        // fatal to the Raft group, so a bad batch must never become a log entry — whatever the
        // caller checked already.
        let h = batch::validate(&batch)
            .map_err(|e| RaftError::Other(format!("invalid record batch: {e}")))?;
        if batch::is_internal(&h) {
            return Err(RaftError::Other(
                "record batch uses the producer id reserved for Raft-internal entries".into(),
            ));
        }
        // Marked as not yet placed, so every log appending it assigns offsets only here, on the
        // leader; a replica that receives it later checks the leader's placement instead.
        let batch = {
            let mut b = bytes::BytesMut::from(&batch[..h.total_len()]);
            batch::set_base_offset(&mut b, batch::UNPLACED_BASE_OFFSET);
            b.freeze()
        };
        // Without a waiter the sender stays here, so `local` never resolves.
        let (tx, local) = tokio::sync::oneshot::channel();
        let mut idle_tx = None;
        // A sole voter commits the moment its own disk has the batch, so waiting for the commit
        // costs nothing and keeps Kafka's single-replica behaviour: the high watermark already
        // covers an acks=1 answer.
        let leader_ack = leader_ack && self.voters().len() > 1;
        let key = if leader_ack {
            self.shared.wait_local_append(LocalWaiter {
                batch: batch.clone(),
                tx,
            });
            Some(batch.clone())
        } else {
            idle_tx = Some(tx);
            None
        };
        let res = self.propose_admitted(batch, local).await;
        drop(idle_tx);
        if let Some(key) = key {
            self.shared.forget_local_append(&key);
        }
        res
    }

    /// Waits for the gate, proposes `batch` the moment it is open, and answers with its offsets
    /// from the commit or from `local` (the leader's own disk, for acks=1), whichever is first.
    async fn propose_admitted(
        &self,
        batch: Bytes,
        local: tokio::sync::oneshot::Receiver<(i64, i64)>,
    ) -> Result<(i64, i64), RaftError> {
        let mut batch = Some(batch);
        let (_in_flight, submitted) = loop {
            let reopened = self.gate.reopened.notified();
            // `client_write_ff` sends to the Raft core before its first await, so polling it once
            // proposes the entry; not being ready means the core has stopped.
            if let Some(admitted) = self.gate.admit(|| {
                batch
                    .take()
                    .and_then(|b| poll_once(self.raft.client_write_ff(b)))
            }) {
                break admitted;
            }
            // A transfer is under way; it reopens within its own bound.
            if tokio::time::timeout(PROPOSE_TIMEOUT, reopened)
                .await
                .is_err()
            {
                return Err(RaftError::Timeout);
            }
        };
        let committed = match submitted {
            Some(Ok(rx)) => rx,
            Some(Err(fatal)) => return Err(fatal.into()),
            None => return Err(RaftError::Shutdown),
        };
        let committed = tokio::time::timeout(PROPOSE_TIMEOUT, committed);
        tokio::pin!(committed);
        let lost = self.leadership_lost();
        tokio::pin!(lost);
        // Whichever comes first; commit implies the local append, so a waiter that misses its
        // entry still gets the committed answer. Dropping the receiver does not cancel the entry.
        tokio::select! {
            reply = &mut committed => match reply {
                Err(_) => Err(RaftError::Timeout),
                Ok(Err(_)) => Err(RaftError::Shutdown),
                Ok(Ok(Err(e))) => Err(OpenraftError::<NodeId, _>::APIError(e).into()),
                Ok(Ok(Ok(resp))) => decode_offsets(&resp.data).ok_or_else(|| {
                    RaftError::Other(format!("bad append reply of {} bytes", resp.data.len()))
                }),
            },
            Ok(offsets) = local => Ok(offsets),
            // A leader cut off from its majority cannot commit until the partition heals, and by
            // then it has usually been replaced: answer now, so the client finds the new leader
            // instead of waiting out its request timeout. The outcome is unknown (it may still
            // commit), which is what Timeout says.
            () = &mut lost => Err(RaftError::Timeout),
        }
    }

    /// Resolves once this node, having led, no longer claims leadership (it stepped down, or
    /// cannot reach a majority of the voters).
    async fn leadership_lost(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !self.is_leader() {
                return;
            }
        }
    }

    /// On the leader: whether voter `target` holds this leader's whole log.
    pub fn caught_up(&self, target: u64) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).copied())
            .flatten()
            .map(|l| l.index);
        matched.is_some() && matched == m.last_log_index
    }

    /// Moves leadership to `target` (called on the leader). New appends wait while the target
    /// catches up to this leader's last entry; then `elect` asks the target to start its election,
    /// which it wins because its log is as long as anyone's. Bounded; the gate opens on return.
    pub async fn transfer_leadership<F>(&self, target: u64, elect: F) -> Result<(), RaftError>
    where
        F: std::future::Future<Output = Result<(), RaftError>>,
    {
        if !self.is_leader() {
            return Err(RaftError::NotLeader {
                leader: self.leader(),
            });
        }
        let _closed = self.gate.close();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Appends admitted before the gate closed finish first (as before, when they held a
        // shared lock the transfer waited for), so none is cut off by the leader change.
        while self.gate.in_flight() > 0 {
            if tokio::time::Instant::now() > deadline {
                return Err(RaftError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.raft.metrics().borrow().clone();
            let last = m.last_log_index;
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&target).cloned())
                .flatten()
                .map(|l| l.index);
            if matched.is_some() && matched == last {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RaftError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The target's higher term reaches this quiet leader only through an append, so keep
        // sending some while it elects: the reply makes this node step down and then grant the
        // target its vote.
        let mut heartbeats = tokio::time::interval(Duration::from_millis(100));
        tokio::pin!(elect);
        loop {
            tokio::select! {
                res = &mut elect => { res?; break; }
                _ = heartbeats.tick() => {
                    let _ = self.raft.trigger().heartbeat().await;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.is_leader() {
            if tokio::time::Instant::now() > deadline {
                return Err(RaftError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The first offset not committed.
    pub fn high_watermark(&self) -> i64 {
        *self.hw_rx.borrow()
    }

    /// Lock-free: safe to call from async handlers while an append is being written.
    pub fn log_start_offset(&self) -> i64 {
        self.shared.log_start_offset()
    }

    /// The next offset this replica's log would assign (it may hold uncommitted batches).
    /// Lock-free, like [`PartitionGroup::log_start_offset`].
    pub fn log_end_offset(&self) -> i64 {
        self.shared.log_end_offset()
    }

    /// (fdatasync calls, data batches appended) on this replica's log since the group opened.
    pub fn io_counters(&self) -> (u64, u64) {
        (
            self.shared
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed),
            self.shared
                .appended_batches
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// A receiver that reports only high-watermark changes after this call. (A plain clone of
    /// the group's receiver would report every change since the group opened, so `changed()`
    /// would return at once, every time.)
    pub fn subscribe_high_watermark(&self) -> watch::Receiver<i64> {
        let mut rx = self.hw_rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// What a long poll waits on: the high watermark and the log start offset, reporting only
    /// changes after this call. Subscribe before reading, so a commit between the read and the
    /// wait still wakes the waiter.
    pub fn subscribe_changes(&self) -> PartitionChanges {
        let mut log_start = self.shared.subscribe_log_start();
        log_start.mark_unchanged();
        PartitionChanges {
            hw: self.subscribe_high_watermark(),
            log_start,
        }
    }

    /// Reads whole batches from `offset`, never past the high watermark.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<Bytes, RaftError> {
        self.read_within(offset, max_bytes, true).await
    }

    /// [`PartitionGroup::read`]; `min_one` false returns nothing rather than a first batch
    /// larger than `max_bytes` (see `PartitionLog::read_within`).
    pub async fn read_within(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one: bool,
    ) -> Result<Bytes, RaftError> {
        let shared = self.shared.clone();
        let hw = self.high_watermark();
        tokio::task::spawn_blocking(move || {
            let log = shared
                .read_log()
                .map_err(|e| RaftError::Storage(e.to_string()))?;
            Ok(log.read_within(offset, max_bytes, hw, min_one)?)
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

    /// `(epoch, start offset)` for each leader epoch that wrote data, ascending.
    pub async fn epoch_starts(&self) -> Result<Vec<(u64, i64)>, RaftError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let log = shared
                .read_log()
                .map_err(|e| RaftError::Storage(e.to_string()))?;
            Ok(log.epoch_starts())
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
    }

    pub fn group_id(&self) -> &str {
        &self.group
    }

    /// Why this replica's Raft core stopped, if a write or fsync failed: the replica serves
    /// nothing until [`RaftHost::reopen_partition`] opens it again.
    pub fn failure(&self) -> Option<String> {
        core_failure(&self.raft.metrics().borrow())
    }

    /// The directory holding this replica's log and Raft state.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Applies delete retention to this replica's log (every replica does so on its own, as in
    /// Kafka): deletes the oldest whole segments that breach `retention_ms` / `retention_bytes`
    /// (-1 = unlimited), never the active segment and never above the last applied entry.
    ///
    /// openraft only purges what a snapshot covers, so a snapshot is taken first if needed
    /// (partition snapshots hold no records, only last applied, membership and high watermark).
    /// A follower that later needs purged entries is sent that snapshot and restarts its log
    /// after it. Returns what was deleted, `None` if nothing was due, and [`RaftError::Timeout`]
    /// if openraft has not purged within a few seconds (a leader postpones a purge while a
    /// replication stream still reads the range; it then happens by itself later).
    pub async fn apply_retention(
        &self,
        now_ms: i64,
        retention_ms: i64,
        retention_bytes: i64,
    ) -> Result<Option<RetentionOutcome>, RaftError> {
        if retention_ms < 0 && retention_bytes < 0 {
            return Ok(None);
        }
        let Some(applied) = self.raft.metrics().borrow().last_applied.map(|l| l.index) else {
            return Ok(None);
        };
        let shared = self.shared.clone();
        let plan = tokio::task::spawn_blocking(move || {
            let log = shared
                .read_log()
                .map_err(|e| RaftError::Storage(e.to_string()))?;
            Ok::<_, RaftError>(log.retention_plan(now_ms, retention_ms, retention_bytes, applied))
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))??;
        let Some(plan) = plan else {
            return Ok(None);
        };
        let cutoff = plan.purge_upto_index;
        let covered =
            |m: &RaftMetrics<NodeId, BasicNode>| m.snapshot.is_some_and(|s| s.index >= cutoff);
        if !covered(&self.raft.metrics().borrow()) {
            // Cut exactly at the purge point: the snapshot is what a follower behind the new log
            // start installs, and its log must then start where this one does.
            self.shared.set_snapshot_target(cutoff);
            self.raft.trigger().snapshot().await?;
            self.raft
                .wait(Some(RETENTION_WAIT))
                .metrics(covered, "snapshot covers the retention cutoff")
                .await
                .map_err(wait_error)?;
        }
        self.raft.trigger().purge_log(cutoff).await?;
        self.raft
            .wait(Some(RETENTION_WAIT))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= cutoff),
                "log purged up to the retention cutoff",
            )
            .await
            .map_err(wait_error)?;
        Ok(Some(RetentionOutcome {
            purged_upto_index: cutoff,
            segments_deleted: plan.segments,
            bytes_deleted: plan.bytes,
            log_start_offset: self.log_start_offset(),
        }))
    }

    /// The Raft term, which is the Kafka leader epoch (single-term-leader: one leader per term).
    pub fn leader_epoch(&self) -> i32 {
        i32::try_from(self.raft.metrics().borrow().current_term).unwrap_or(i32::MAX)
    }

    /// Leader, and not cut off: a leader whose node cannot reach a majority of the voters' nodes
    /// may already have been replaced (their supervisors elect soon after), so it stops claiming
    /// leadership, and clients look elsewhere instead of waiting on writes that cannot commit.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader
            && m.current_leader == Some(self.node_id)
            && core_failure(&m).is_none()
            && !self.leadership_in_doubt(&m)
    }

    pub fn leader(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        // A core stopped on a storage error keeps its last metrics, leader included; it knows
        // nothing current, and must not send clients to itself.
        if core_failure(&m).is_some() {
            return None;
        }
        if m.current_leader == Some(self.node_id) && self.leadership_in_doubt(&m) {
            return None;
        }
        m.current_leader
    }

    fn leadership_in_doubt(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        !self.liveness.quorum_reachable(self.node_id, &voters)
    }

    pub fn status(&self) -> GroupStatus {
        status_from(&self.group, &self.raft.metrics().borrow())
    }

    /// The current voter ids.
    pub fn voters(&self) -> BTreeSet<u64> {
        current_voters(&self.raft)
    }

    /// Makes `new` the voter set. Each added node must have the group open (with
    /// [`RaftHost::join_partition`]) and a known address ([`RaftHost::set_peer_addr`], the
    /// configured peers, or the metadata membership); it is added as a learner, must catch up
    /// (bounded, else [`RaftError::Timeout`]), and then becomes a voter by a joint change.
    /// Removed voters leave the membership. Call on the leader, else [`RaftError::NotLeader`].
    ///
    /// A new voter must hold the leader's whole log when it becomes one: otherwise the voters
    /// that make a majority without it could acknowledge the change while it still lacks
    /// committed data, and a replica that leaves would take the last copies with it. Once the
    /// learners are close, appends pause (as for a leadership transfer) until they match the
    /// leader's last entry, and resume after the change.
    pub async fn change_voters(&self, new: BTreeSet<u64>) -> Result<(), RaftError> {
        let transport = self.transport.clone();
        let meta = self.meta.clone();
        change_voters(
            &self.raft,
            self.node_id,
            new,
            move |id| resolve_addr(&transport, &meta, id),
            |learners| self.hold_until_caught_up(learners),
        )
        .await
    }

    /// Waits until every node in `learners` matches this leader's last log entry, first with
    /// appends flowing (until they are within [`PROMOTE_SLACK_ENTRIES`]), then with the gate
    /// closed; returns the closed gate. Bounded by [`LEARNER_CATCHUP_TIMEOUT`] and, while
    /// appends are paused, by [`PROMOTE_PAUSE_MAX`].
    async fn hold_until_caught_up(&self, learners: Vec<NodeId>) -> Result<Closed<'_>, RaftError> {
        let lag = |m: &RaftMetrics<NodeId, BasicNode>| -> Option<u64> {
            let last = m.last_log_index.unwrap_or(0);
            let repl = m.replication.as_ref()?;
            learners.iter().try_fold(0u64, |worst, id| {
                let matched = repl.get(id)?.as_ref().map_or(0, |l| l.index + 1);
                Some(worst.max((last + 1).saturating_sub(matched)))
            })
        };
        let close_enough =
            |m: &RaftMetrics<NodeId, BasicNode>| lag(m).is_some_and(|l| l <= PROMOTE_SLACK_ENTRIES);
        self.raft
            .wait(Some(LEARNER_CATCHUP_TIMEOUT))
            .metrics(close_enough, "learners within reach of the leader's log")
            .await
            .map_err(wait_error)?;
        let closed = self.gate.close();
        let deadline = tokio::time::Instant::now() + PROMOTE_PAUSE_MAX;
        while self.gate.in_flight() > 0 {
            if tokio::time::Instant::now() > deadline {
                return Err(RaftError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Entries admitted before the gate closed are in the channel or the log by now.
        self.raft
            .wait(Some(
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            ))
            .metrics(
                |m| lag(m) == Some(0),
                "learners hold the leader's whole log",
            )
            .await
            .map_err(wait_error)?;
        Ok(closed)
    }

    /// Makes this node the leader if it can (openraft 0.9 has no leadership transfer): starts
    /// elections until it leads (`Ok`), another node wins a newer term
    /// (`NotLeader { leader }`, e.g. when this node's log is behind), or 4 election timeouts
    /// pass (`Timeout`). Typically done within one or two heartbeat intervals. `Ok` at once on
    /// the leader.
    pub async fn trigger_elect(&self) -> Result<(), RaftError> {
        if !self.shared.may_vote() {
            return Err(RaftError::Other(
                "this replica is getting back acknowledged entries it lost and may not stand for election yet".into(),
            ));
        }
        elect_until_leader(&self.raft, self.node_id).await
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
        group: GroupId,
        dir: PathBuf,
        log_cfg: LogConfig,
        replicas: impl IntoIterator<Item = u64>,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
        let replicas: Vec<u64> = replicas.into_iter().collect();
        self.open_partition_inner(group, dir, log_cfg, Some(replicas), None)
            .await
    }

    /// Opens (or creates) a replica that is being added to an existing group by the leader's
    /// [`PartitionGroup::change_voters`]: it never initializes the group, it waits to be
    /// contacted. Open it before the leader changes the voters. Reopening after a restart works
    /// like [`RaftHost::open_partition`].
    pub async fn join_partition(
        &self,
        group: GroupId,
        dir: PathBuf,
        log_cfg: LogConfig,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
        self.open_partition_inner(group, dir, log_cfg, None, None)
            .await
    }

    /// Opens again a replica whose Raft core stopped on a storage error, once the caller thinks
    /// the disk may work again. Entries after the last one this replica fsynced are cut first:
    /// after a failed fsync the kernel may report them written while the disk lacks them, and
    /// they were never acknowledged by this replica; the leader sends them again. Errors (the
    /// disk still failing) leave the group closed; call again later.
    pub async fn reopen_partition(
        &self,
        group: &GroupId,
    ) -> Result<Arc<PartitionGroup>, RaftError> {
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
            (None, None) => {
                return Err(RaftError::Other(format!(
                    "partition group {group} is not open"
                )))
            }
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
        self.registry.insert_store(group.clone(), shared.clone());
        let pg = Arc::new(PartitionGroup {
            group: group.clone(),
            node_id: self.cfg.node_id,
            dir,
            raft: raft.clone(),
            transport: self.transport.clone(),
            meta: self.meta.raft.clone(),
            shared,
            hw_rx,
            liveness: self.liveness.clone(),
            gate: AppendGate::default(),
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

    fn partition_members(
        &self,
        voters: &BTreeSet<u64>,
    ) -> Result<BTreeMap<NodeId, BasicNode>, RaftError> {
        let mut members = BTreeMap::new();
        for id in voters {
            let addr = self
                .peer_addr(*id)
                .ok_or_else(|| RaftError::Other(format!("voter {id} is not a known peer")))?;
            members.insert(*id, BasicNode { addr });
        }
        Ok(members)
    }

    async fn initialize_partition(
        &self,
        raft: &Raft,
        voters: &BTreeSet<u64>,
    ) -> Result<(), RaftError> {
        let members = self.partition_members(voters)?;
        raft.initialize(members)
            .await
            .map_err(|e| RaftError::Other(format!("initializing partition group: {e}")))
    }

    /// A voter other than the first replica initializes a new group only if nobody has
    /// contacted it within a random election timeout (the first replica is down or slow):
    /// the initial membership entry is the same on every voter, so a second initialization is
    /// harmless, and the random delay keeps the late initializers from splitting the vote.
    fn initialize_partition_later(
        &self,
        group: &str,
        raft: &Raft,
        voters: &BTreeSet<u64>,
        preferred: Option<u64>,
    ) -> Result<(), RaftError> {
        let members = self.partition_members(voters)?;
        let (min_ms, max_ms) = {
            let c = raft.config();
            (c.election_timeout_min, c.election_timeout_max)
        };
        let delay = random_timeout(min_ms, max_ms);
        let raft = raft.clone();
        let group = group.to_string();
        let shutdown = self.shutdown_tx.subscribe();
        let liveness = self.liveness.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut wait = delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = transport::stopped(shutdown.clone()) => return,
                }
                let contacted = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    m.state == ServerState::Shutdown
                        || m.current_leader.is_some()
                        || m.current_term > 0
                        || m.last_log_index.is_some()
                };
                if contacted {
                    return;
                }
                // A live first replica is merely slow to open its groups (a node opening a
                // thousand new partitions takes seconds): give it time to lead as it should.
                if preferred.is_some_and(|p| liveness.alive(p))
                    && start.elapsed() < LATE_INIT_PATIENCE
                {
                    wait = Duration::from_millis(500);
                    continue;
                }
                break;
            }
            tracing::info!(%group, waited_ms = start.elapsed().as_millis() as u64, "no leader contacted this voter of a new group; initializing it too");
            match raft.initialize(members).await {
                Ok(()) => {}
                // Contacted in the meantime (NotAllowed), or the group closed: nothing to do.
                Err(e) => tracing::debug!(%group, error = %e, "late initialization not needed"),
            }
        });
        Ok(())
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
