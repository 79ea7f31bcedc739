//! Delete retention on a partition replica: openraft only purges what a snapshot covers, so a
//! retention pass is a snapshot cut at the purge point followed by a purge.

use openraft::{BasicNode, RaftMetrics};

use super::{wait_error, PartitionGroup};
use crate::config::RETENTION_WAIT;
use crate::{NodeId, RaftError};

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

impl PartitionGroup {
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
            let log = shared.read_log().map_err(RaftError::from)?;
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
}
