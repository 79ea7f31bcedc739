//! Leadership transfer and voter changes of a partition group: both close the append gate so that
//! the replica that must catch up is chasing a log that has stopped growing.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics};

use super::gate::Closed;
use super::{wait_error, PartitionGroup};
use crate::config::{LEARNER_CATCHUP_TIMEOUT, PROMOTE_PAUSE_MAX, PROMOTE_SLACK_ENTRIES};
use crate::membership::{change_voters, current_voters, resolve_addr};
use crate::{NodeId, RaftError};

impl PartitionGroup {
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

    /// The current voter ids.
    pub fn voters(&self) -> BTreeSet<u64> {
        current_voters(&self.raft)
    }

    /// Makes `new` the voter set. Each added node must have the group open (with
    /// [`crate::RaftHost::join_partition`]) and a known address ([`crate::RaftHost::set_peer_addr`], the
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
}
