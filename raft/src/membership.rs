//! Leadership and membership operations shared by the metadata and partition groups: who leads,
//! changing the voters (learner first, then a joint change), and elections on request (openraft
//! 0.9 has no leadership transfer, so a transfer is an election the target is sure to win).

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers, ServerState};

use crate::config::{random_timeout, LEARNER_CATCHUP_TIMEOUT, PROPOSE_TIMEOUT};
use crate::transport::Transport;
use crate::{NodeId, Raft, RaftError};

/// The address of node `id`: the host's address book (configured peers plus
/// [`RaftHost::set_peer_addr`]) first, then the metadata group's membership.
pub(crate) fn resolve_addr(transport: &Transport, meta: &Raft, id: NodeId) -> Option<String> {
    transport.addr_of(id).or_else(|| {
        meta.metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    })
}

pub(crate) fn ensure_leader(raft: &Raft, node_id: NodeId) -> Result<(), RaftError> {
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

pub(crate) fn current_voters(raft: &Raft) -> BTreeSet<NodeId> {
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
pub(crate) async fn change_voters<G, F>(
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
/// election that loses) until this node leads, another node wins a newer term, `defer` says a
/// peer should run instead (`NotLeader { leader: None }`), or a deadline of 4 election timeouts
/// passes.
///
/// `defer` is asked before every retry. A node whose log is behind can never win, and every
/// attempt raises its term, which makes the candidates that could win adopt that term and give
/// up: retrying every few hundred milliseconds kept a group of three without any leader for the
/// whole deadline (the fenced-leader loop and a test electing a follower that had not caught up).
///
/// openraft 0.9 has no leadership transfer, and voters refuse votes while the leader's lease
/// (the maximum election timeout) lasts. The first election still works as a transfer: its
/// higher term makes the current leader step down at its next heartbeat to this node, after
/// which the old leader grants this node's next vote (if this node's log is at least as up to
/// date) and the two make a majority of three.
pub(crate) async fn elect_until_leader(
    raft: &Raft,
    node_id: NodeId,
    defer: impl Fn() -> bool,
) -> Result<(), RaftError> {
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
    let mut attempts = 0u32;
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
            if attempts > 0 && defer() {
                tracing::info!(group = %raft.config().cluster_name, "not electing again: a peer without a leader has a longer log");
                return Err(RaftError::NotLeader { leader: None });
            }
            attempts += 1;
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

/// Elects a group whose only voter is this node at once, instead of after an election timeout:
/// nobody else can lead it, so waiting would only delay the restart.
pub(crate) async fn elect_if_sole_voter(raft: &Raft, node_id: NodeId) -> Result<(), RaftError> {
    let voters: Vec<NodeId> = raft
        .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
        .await?;
    if voters == [node_id] {
        raft.trigger().elect().await?;
    }
    Ok(())
}
