//! The supervisor's decisions as plain functions of a group's metrics and what the pings say
//! about the peers, so they can be tested without a cluster.

use openraft::{BasicNode, RaftMetrics, ServerState};

use crate::liveness::Liveness;
use crate::registry::Registry;
use crate::{NodeId, META_GROUP};

/// Why a voter thinks its group needs an election, if it does.
pub(super) fn stall_reason(
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
pub(super) fn has_lagging_follower(m: &RaftMetrics<NodeId, BasicNode>) -> bool {
    let Some(repl) = &m.replication else {
        return false;
    };
    let last = m.last_log_index;
    m.membership_config
        .membership()
        .voter_ids()
        .any(|v| repl.get(&v).is_some_and(|l| l.map(|l| l.index) < last))
}

/// Whether a live peer without a leader has a more up-to-date log for `group` than this node.
pub(super) fn defer_to_better_log(
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
