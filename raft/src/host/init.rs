//! How a new partition group gets its first leader: every original voter may initialize it
//! (the initial membership entry is the same everywhere), the preferred leader at once and the
//! others only if nobody contacted them, so a group gets a leader even when its first replica
//! is down.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, ServerState};

use super::RaftHost;
use crate::config::{random_timeout, LATE_INIT_PATIENCE};
use crate::transport;
use crate::{NodeId, Raft, RaftError};

impl RaftHost {
    pub(super) fn partition_members(
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

    pub(super) async fn initialize_partition(
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
    pub(super) fn initialize_partition_later(
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
}
