//! The group handles callers hold: [`MetaGroup`] and [`PartitionGroup`], and what both report
//! ([`GroupStatus`]). A partition group's code is split by concern: reads and state
//! ([`partition`]), appends ([`append`]) behind the [`gate`], leadership transfer and voter
//! changes ([`transfer`]), and retention ([`retention`]).

mod append;
mod gate;
mod meta;
mod partition;
mod retention;
mod transfer;

use std::collections::BTreeMap;

use bytes::Bytes;
use openraft::{BasicNode, RaftMetrics, ServerState};

use crate::config::PROPOSE_TIMEOUT;
use crate::{GroupId, NodeId, Raft, RaftError};

pub use append::{Acks, Committed};
pub(crate) use gate::AppendGate;
pub use meta::MetaGroup;
pub use partition::{PartitionChanges, PartitionGroup};
pub use retention::RetentionOutcome;

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

pub(crate) fn status_from(group: &str, m: &RaftMetrics<NodeId, BasicNode>) -> GroupStatus {
    let role = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    let applied = m.last_applied.map(|l| l.index);
    GroupStatus {
        group: GroupId::from(group),
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
pub(crate) fn core_failure(m: &RaftMetrics<NodeId, BasicNode>) -> Option<String> {
    match &m.running_state {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(e) => Some(e.to_string()),
    }
}

pub(crate) async fn propose(raft: &Raft, data: Bytes) -> Result<Bytes, RaftError> {
    match tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(data)).await {
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(RaftError::Timeout),
    }
}

pub(crate) fn wait_error(e: openraft::metrics::WaitError) -> RaftError {
    match e {
        openraft::metrics::WaitError::Timeout(..) => RaftError::Timeout,
        openraft::metrics::WaitError::ShuttingDown => RaftError::Shutdown,
    }
}
