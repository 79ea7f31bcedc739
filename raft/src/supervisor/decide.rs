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
    // State first: most groups are led or followed happily, and this is their whole cost.
    if !matches!(m.state, ServerState::Follower | ServerState::Candidate) {
        return None;
    }
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    if voters.len() < 2 || !voters.contains(&node_id) {
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

/// When the stall seen now began, if it is the one recorded (`began`: the leader it was about,
/// and when). A stall about another leader (say, one elected a moment ago whose pings do not
/// claim the group yet) is a new one and gets the full patience: carrying the old start over
/// made a voter disrupt a leader elected milliseconds before.
pub(super) fn ongoing_stall(
    began: Option<&(Option<NodeId>, std::time::Instant)>,
    leader: Option<NodeId>,
) -> Option<std::time::Instant> {
    began.and_then(|(was, at)| (*was == leader).then_some(*at))
}

/// Whether this node leads a group whose membership no longer has it as a voter: openraft steps
/// such a leader down only on a tick, which quiet groups run only while this holds.
pub(super) fn leads_without_a_vote(m: &RaftMetrics<NodeId, BasicNode>, node_id: NodeId) -> bool {
    m.state == ServerState::Leader
        && !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == node_id)
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

/// Whether this node leads `group` and a voter's ping says it knows no leader for it (it missed
/// the election, or raised its term after it). A quiet leader sends nothing until the next
/// write, so that voter would stay leaderless; a heartbeat either makes it follow or, if its
/// term is higher, makes this leader step down and the group elect again.
pub(super) fn has_leaderless_voter(
    group: &str,
    m: &RaftMetrics<NodeId, BasicNode>,
    node_id: NodeId,
    liveness: &Liveness,
) -> bool {
    m.state == ServerState::Leader
        && m.membership_config
            .membership()
            .voter_ids()
            .any(|v| v != node_id && liveness.reports_leaderless(v, group, node_id))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use openraft::{Membership, StoredMembership};

    use super::*;
    use crate::ping::PingReply;

    /// Node 1's metrics for a group with voters 1, 2 and 3.
    fn follower_of(leader: Option<NodeId>) -> RaftMetrics<NodeId, BasicNode> {
        let mut m = RaftMetrics::new_initial(1);
        m.state = ServerState::Follower;
        m.current_leader = leader;
        let voters: BTreeSet<NodeId> = [1, 2, 3].into_iter().collect();
        m.membership_config = Arc::new(StoredMembership::new(
            None,
            Membership::new(vec![voters.clone()], voters),
        ));
        m
    }

    fn answer(liveness: &Liveness, peer: NodeId, leads: &[&str]) {
        liveness.record(
            peer,
            PingReply {
                boot: 1,
                leads: leads.iter().map(|g| crate::GroupId::from(*g)).collect(),
                leaderless_logs: Vec::new(),
                following: Vec::new(),
            },
        );
    }

    #[test]
    fn a_follower_elects_only_when_its_leader_is_gone_and_a_majority_is_reachable() {
        let l = Liveness::default();
        // Nobody answers: this node alone is no majority, so it keeps quiet (like a pre-vote).
        assert_eq!(stall_reason("p/t/0", &follower_of(Some(2)), 1, &l), None);
        answer(&l, 3, &[]);
        assert_eq!(
            stall_reason("p/t/0", &follower_of(Some(2)), 1, &l),
            Some("the leader's node is unreachable")
        );
        answer(&l, 2, &[]);
        assert_eq!(
            stall_reason("p/t/0", &follower_of(Some(2)), 1, &l),
            Some("the leader no longer leads")
        );
        answer(&l, 2, &["p/t/0"]);
        assert_eq!(stall_reason("p/t/0", &follower_of(Some(2)), 1, &l), None);
        // Without a leader: wait while a live peer claims the group, else elect.
        assert_eq!(stall_reason("p/t/0", &follower_of(None), 1, &l), None);
        assert_eq!(
            stall_reason("p/t/1", &follower_of(None), 1, &l),
            Some("no leader")
        );
    }

    #[test]
    fn a_stall_about_a_new_leader_starts_its_patience_again() {
        let t = std::time::Instant::now();
        assert_eq!(ongoing_stall(None, None), None);
        assert_eq!(ongoing_stall(Some(&(None, t)), None), Some(t));
        assert_eq!(ongoing_stall(Some(&(Some(1), t)), Some(1)), Some(t));
        assert_eq!(ongoing_stall(Some(&(Some(1), t)), Some(2)), None);
        assert_eq!(ongoing_stall(Some(&(None, t)), Some(2)), None);
    }

    #[test]
    fn a_leader_nudges_only_a_live_voter_that_reports_no_leader() {
        let l = Liveness::default();
        let mut m = follower_of(Some(1));
        m.state = ServerState::Leader;
        answer(&l, 2, &[]);
        assert!(!has_leaderless_voter("p/t/0", &m, 1, &l));
        l.record(
            3,
            PingReply {
                boot: 1,
                leads: Vec::new(),
                leaderless_logs: vec![(crate::GroupId::from("p/t/0"), 2, 7)],
                following: vec![(crate::GroupId::from("p/t/0"), 1)],
            },
        );
        assert!(
            !has_leaderless_voter("p/t/0", &m, 1, &l),
            "it follows this node and cannot hear its pings: a heartbeat does not help"
        );
        l.record(
            3,
            PingReply {
                boot: 1,
                leads: Vec::new(),
                leaderless_logs: vec![(crate::GroupId::from("p/t/0"), 2, 7)],
                following: Vec::new(),
            },
        );
        assert!(has_leaderless_voter("p/t/0", &m, 1, &l));
        assert!(!has_leaderless_voter("p/t/1", &m, 1, &l), "another group");
        m.state = ServerState::Follower;
        assert!(!has_leaderless_voter("p/t/0", &m, 1, &l), "not the leader");
    }

    #[test]
    fn the_metadata_group_only_breaks_split_votes() {
        let l = Liveness::default();
        assert_eq!(
            stall_reason(META_GROUP, &follower_of(None), 1, &l),
            Some("no leader elected by the timer")
        );
        assert_eq!(stall_reason(META_GROUP, &follower_of(Some(2)), 1, &l), None);
    }

    #[test]
    fn leaders_learners_and_single_voters_never_elect() {
        let l = Liveness::default();
        answer(&l, 2, &[]);
        answer(&l, 3, &[]);
        let mut m = follower_of(None);
        m.state = ServerState::Leader;
        assert_eq!(stall_reason("p/t/0", &m, 1, &l), None);
        let mut m = follower_of(None);
        m.state = ServerState::Learner;
        assert_eq!(stall_reason("p/t/0", &m, 1, &l), None);
        assert_eq!(
            stall_reason("p/t/0", &follower_of(None), 4, &l),
            None,
            "not a voter"
        );
        assert!(!has_lagging_follower(&follower_of(None)));
    }
}
