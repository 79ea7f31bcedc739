//! What a node answers to a liveness ping: the partition groups it leads, and the last log id of
//! each group it votes in but has no working leader for. The transport server answers pings
//! with [`answer`]; [`crate::liveness`] sends them and reads the replies. Kept apart from both so
//! that the transport does not depend on the module that depends on it.

use bytes::Bytes;
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use crate::registry::Registry;
use crate::{GroupId, Raft, META_GROUP};

/// What a node answers to a ping.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PingReply {
    /// Random per process start: a changed value means the peer restarted and lost its view of
    /// who leads what.
    pub(crate) boot: u64,
    /// The partition groups this node leads.
    pub(crate) leads: Vec<GroupId>,
    /// For each group this node votes in but has no (working) leader: its last log id as
    /// (term, index).
    /// A voter whose log is behind a peer's leaves the election to that peer: its own attempts
    /// cannot win, and each one raises its term, which makes the peer's attempts fail too.
    #[serde(default)]
    pub(crate) leaderless_logs: Vec<(GroupId, u64, u64)>,
    /// The leader each group of `leaderless_logs` still has (the group counts as leaderless
    /// because its supervisor judged that leader gone); groups not listed have none. A leader's
    /// heartbeat helps a voter without a leader, or with another one, but not one that follows
    /// it and cannot hear its pings.
    #[serde(default)]
    pub(crate) following: Vec<(GroupId, crate::NodeId)>,
}

/// The answer to a ping. Built once per change of the groups' server states (see
/// [`Registry::changes`]) and reused while nothing changed: peers ping four times a second, and
/// building it walked every group's metrics and encoded every led group's name. An answer that
/// carries leaderless groups' logs is not reused (their last log ids move without a state
/// change).
pub(crate) fn answer(registry: &Registry, boot: u64) -> Bytes {
    let changes = registry.changes();
    if let Some(cached) = registry.cached_ping_answer(changes) {
        return cached;
    }
    let mut leads = Vec::new();
    let mut leaderless = Vec::new();
    let mut following = Vec::new();
    for (g, raft) in registry.all() {
        if g == META_GROUP {
            continue;
        }
        if leads_group(&raft) {
            leads.push(g);
            continue;
        }
        let (state, leader) = {
            let m = raft.server_metrics();
            let m = m.borrow();
            (m.state, m.current_leader)
        };
        if state == ServerState::Leader || core_stopped(&raft) {
            // A core stopped on a storage error: neither leading nor a candidate for an
            // election, and a leader's heartbeat cannot help it until it is reopened.
        } else if matches!(state, ServerState::Follower | ServerState::Candidate)
            && (leader.is_none() || registry.is_stalled(&g))
        {
            if let Some(l) = leader {
                following.push((g.clone(), l));
            }
            leaderless.push(g);
        }
    }
    let reusable = leaderless.is_empty();
    let leaderless_logs = leaderless
        .into_iter()
        .filter_map(|g| {
            let (term, index) = registry.last_log_id(&g)?;
            Some((g, term, index))
        })
        .collect();
    let reply = PingReply {
        boot,
        leads,
        leaderless_logs,
        following,
    };
    let bytes = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
    registry.cache_ping_answer(changes, reusable.then(|| bytes.clone()));
    bytes
}

/// Whether this node leads the group (here, not in `group`, which reaches this module through
/// `liveness`): openraft's server metrics say Leader and the core still
/// runs. A core that stops on a fatal error (a storage fault) publishes Shutdown only in its full
/// metrics; its server metrics keep the last state, Leader, so reading those alone would keep
/// claiming the group in ping answers and stop the followers from electing a replacement. The
/// full metrics are checked for the stop only, never for Leader: they are published after the
/// server metrics, and a check keyed on the change counter must not read them as stale.
pub(crate) fn leads_group(raft: &Raft) -> bool {
    raft.server_metrics().borrow().state == ServerState::Leader && !core_stopped(raft)
}

/// Whether the group's Raft core has stopped (on a storage error, or shut down); its server
/// metrics keep the last state it had.
fn core_stopped(raft: &Raft) -> bool {
    let m = raft.metrics();
    let m = m.borrow();
    m.state == ServerState::Shutdown || m.running_state.is_err()
}
