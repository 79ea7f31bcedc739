//! [`PartitionGroup`]: one partition's Raft group on this node. This file holds the handle, its
//! reads and the state it reports; appends, transfers and retention live in sibling modules.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use openraft::{BasicNode, RaftMetrics, ServerState};
use sluice_storage::LogConfig;
use tokio::sync::watch;

use super::{core_failure, status_from, AppendGate, GroupStatus};
use crate::liveness::Liveness;
use crate::membership::elect_until_leader;
use crate::partition_store::PartitionShared;
use crate::stm::{PartitionMachines, PartitionStm};
use crate::transport::Transport;
use crate::{GroupId, NodeId, Raft, RaftError};

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
    pub(crate) group: GroupId,
    pub(crate) node_id: NodeId,
    pub(crate) dir: PathBuf,
    pub(crate) raft: Raft,
    pub(crate) transport: Arc<Transport>,
    /// The metadata group, whose membership is the fallback address book.
    pub(crate) meta: Raft,
    pub(crate) shared: Arc<PartitionShared>,
    pub(crate) hw_rx: watch::Receiver<i64>,
    /// The partition's state machines, the high watermark first ([`crate::stm`]).
    pub(crate) machines: Arc<PartitionMachines>,
    pub(crate) liveness: Arc<Liveness>,
    /// Closed by a leadership transfer so the target can catch up to a log that has stopped
    /// growing.
    pub(crate) gate: Arc<AppendGate>,
    /// How the log was opened, to open it again after a storage failure.
    pub(crate) log_cfg: LogConfig,
}

impl PartitionGroup {
    /// The first offset not committed.
    pub fn high_watermark(&self) -> i64 {
        *self.hw_rx.borrow()
    }

    /// The partition's state machine called `name` (the high watermark is
    /// [`crate::HIGH_WATERMARK`]); see [`PartitionGroup::with_machine`] for typed access.
    pub fn machine(&self, name: &str) -> Option<Arc<dyn PartitionStm>> {
        self.machines.get(name)
    }

    /// Runs `f` on the machine called `name` if it is a `T`: typed access to a machine the
    /// broker registered. `None` if there is no such machine or it is of another type.
    pub fn with_machine<T: PartitionStm, R>(
        &self,
        name: &str,
        f: impl FnOnce(&T) -> R,
    ) -> Option<R> {
        let m = self.machines.get(name)?;
        let typed = m.as_any().downcast_ref::<T>()?;
        Some(f(typed))
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
            let log = shared.read_log().map_err(RaftError::from)?;
            Ok(log.read_within(offset, max_bytes, hw, min_one)?)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
    }

    pub async fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(i64, i64)>, RaftError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let log = shared.read_log().map_err(RaftError::from)?;
            Ok(log.offset_for_timestamp(ts)?)
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
    }

    /// `(epoch, start offset)` for each leader epoch that wrote data, ascending.
    pub async fn epoch_starts(&self) -> Result<Vec<(u64, i64)>, RaftError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let log = shared.read_log().map_err(RaftError::from)?;
            Ok(log.epoch_starts())
        })
        .await
        .map_err(|e| RaftError::Other(e.to_string()))?
    }

    /// The group's id; [`PartitionGroup::group_id`] is the same as a `&str`.
    pub fn id(&self) -> &GroupId {
        &self.group
    }

    pub fn group_id(&self) -> &str {
        &self.group
    }

    /// Why this replica's Raft core stopped, if a write or fsync failed: the replica serves
    /// nothing until [`crate::RaftHost::reopen_partition`] opens it again.
    pub fn failure(&self) -> Option<String> {
        core_failure(&self.raft.metrics().borrow())
    }

    /// The directory holding this replica's log and Raft state.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The Raft term, which is the Kafka leader epoch (single-term-leader: one leader per term).
    pub fn leader_epoch(&self) -> i32 {
        i32::try_from(self.raft.metrics().borrow().current_term).unwrap_or(i32::MAX)
    }

    /// Leader, and not cut off: a leader whose node cannot reach a majority of the voters' nodes
    /// may already have been replaced (their supervisors elect soon after), so it stops claiming
    /// leadership, and clients look elsewhere instead of waiting on writes that cannot commit.
    pub fn is_leader(&self) -> bool {
        self.leader_check().is_leader()
    }

    /// Whether openraft has this node as the group's leader, whether or not the leadership is in
    /// doubt (see [`PartitionGroup::is_leader`]).
    pub fn is_raft_leader(&self) -> bool {
        crate::ping::leads_group(&self.raft)
    }

    /// What [`PartitionGroup::is_leader`] needs, owned, for futures that outlive `&self`.
    pub(crate) fn leader_check(&self) -> LeaderCheck {
        LeaderCheck {
            raft: self.raft.clone(),
            node_id: self.node_id,
            liveness: self.liveness.clone(),
        }
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
        leadership_in_doubt(&self.liveness, self.node_id, m)
    }

    pub fn status(&self) -> GroupStatus {
        status_from(&self.group, &self.raft.metrics().borrow())
    }

    /// Makes this node the leader if it can (openraft 0.9 has no leadership transfer): starts
    /// elections until it leads (`Ok`), another node wins a newer term
    /// (`NotLeader { leader }`, e.g. when this node's log is behind), a leaderless peer's ping
    /// shows a longer log than this node's (`NotLeader { leader: None }`: that peer's own
    /// supervisor elects it; retrying here would only keep raising the term under it), or 4
    /// election timeouts pass (`Timeout`). Typically done within one or two heartbeat
    /// intervals. `Ok` at once on the leader.
    pub async fn trigger_elect(&self) -> Result<(), RaftError> {
        if !self.shared.may_vote() {
            return Err(RaftError::Other(
                "this replica is getting back acknowledged entries it lost and may not stand for election yet".into(),
            ));
        }
        let group = self.group.as_str();
        let defer = || {
            let voters: Vec<NodeId> = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            self.shared
                .last_log_id_if_idle()
                .is_some_and(|mine| self.liveness.better_log_elsewhere(&voters, group, mine))
        };
        elect_until_leader(&self.raft, self.node_id, defer).await
    }

    pub(crate) async fn stop(&self) {
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

/// Whether this node leads the group and is not cut off (see [`PartitionGroup::is_leader`]).
pub(crate) struct LeaderCheck {
    raft: Raft,
    node_id: NodeId,
    liveness: Arc<Liveness>,
}

impl LeaderCheck {
    pub(crate) fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader
            && m.current_leader == Some(self.node_id)
            && core_failure(&m).is_none()
            && !leadership_in_doubt(&self.liveness, self.node_id, &m)
    }
}

fn leadership_in_doubt(
    liveness: &Liveness,
    node_id: NodeId,
    m: &RaftMetrics<NodeId, BasicNode>,
) -> bool {
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    !liveness.quorum_reachable(node_id, &voters)
}
