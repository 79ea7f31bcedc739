//! [`MetaGroup`]: the handle on the metadata group, which every node belongs to and whose
//! voters are changed one node at a time by the operator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::ServerState;

use super::{propose, status_from, GroupStatus};
use crate::membership::{change_voters, current_voters, elect_until_leader, ensure_leader};
use crate::transport::Transport;
use crate::{NodeId, Raft, RaftError, META_GROUP};

/// The metadata group handle.
pub struct MetaGroup {
    pub(crate) node_id: NodeId,
    pub(crate) raft: Raft,
    pub(crate) transport: Arc<Transport>,
}

impl MetaGroup {
    /// Proposes a command; returns the [`crate::MetaApp::apply`] reply once it is committed and applied
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

    /// The term this node leads in, if it is the leader: a consumer-group coordinator serves
    /// only once it has applied an entry of that term (everything committed before is then
    /// applied here too).
    pub fn leader_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader && m.current_leader == Some(self.node_id))
            .then_some(m.current_term)
    }

    /// Resolves once [`MetaGroup::leader_term`] differs from `seen`, or after `timeout`.
    pub async fn leadership_changed(&self, seen: Option<u64>, timeout: Duration) {
        let mut rx = self.raft.metrics();
        let node_id = self.node_id;
        let _ = tokio::time::timeout(
            timeout,
            rx.wait_for(|m| {
                let term = (m.state == ServerState::Leader && m.current_leader == Some(node_id))
                    .then_some(m.current_term);
                term != seen
            }),
        )
        .await;
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

    /// Makes this node the leader if it can: see [`crate::PartitionGroup::trigger_elect`].
    pub async fn trigger_elect(&self) -> Result<(), RaftError> {
        // The metadata group keeps openraft's own timers and pre-checks: nothing to defer to.
        elect_until_leader(&self.raft, self.node_id, || false).await
    }
}
