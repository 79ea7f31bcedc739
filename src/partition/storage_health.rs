//! Storage health: replicas whose Raft core stopped on a failed write or fsync are reopened from
//! disk, and a node that cannot reopen one for long fences itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::broker::{Broker, PartitionKey};

/// How often local replicas are checked for a Raft core stopped on a storage error.
const STORAGE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// A failed replica is reopened at most this often (each try re-reads its log).
const STORAGE_REOPEN_EVERY: Duration = Duration::from_secs(3);
/// A replica that cannot be reopened for this long makes the broker fence itself.
pub const STORAGE_FENCE_AFTER: Duration = Duration::from_secs(30);

/// Watches this broker's replicas for a Raft core stopped by a failed write or fsync. Retrying an
/// fsync after a failure is unsafe, so such a replica is closed and opened again from disk
/// (its unconfirmed tail cut; the leader sends it again) until that works. Meanwhile it serves
/// nothing and other replicas lead. A broker that cannot reopen a replica for
/// [`STORAGE_FENCE_AFTER`] (a full or broken disk) fences itself until it can.
pub async fn storage_loop(broker: Arc<Broker>) {
    let mut failing_since: HashMap<PartitionKey, std::time::Instant> = HashMap::new();
    let mut tried_at: HashMap<PartitionKey, std::time::Instant> = HashMap::new();
    loop {
        tokio::time::sleep(STORAGE_CHECK_EVERY).await;
        let groups = broker.partitions.all();
        let now = std::time::Instant::now();
        for (key, group) in groups.iter() {
            let Some(reason) = group.failure() else {
                if failing_since.remove(key).is_some() {
                    info!(topic = %key.0, partition = %key.1, "partition replica serves again");
                }
                continue;
            };
            failing_since.entry(key.clone()).or_insert_with(|| {
                error!(topic = %key.0, partition = %key.1, %reason, "partition replica stopped on a storage error; reopening it from disk");
                broker.metrics
                    .storage_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                now
            });
            if tried_at
                .get(key)
                .is_some_and(|t| now.duration_since(*t) < STORAGE_REOPEN_EVERY)
            {
                continue;
            }
            tried_at.insert(key.clone(), now);
            let gid = group.group_id().to_string();
            match broker.raft.reopen_partition(&gid).await {
                Ok(reopened) => {
                    if !broker.partitions.replace_reopened(key, reopened) {
                        // The topic was deleted (or re-created) meanwhile and the reconcile pass
                        // closed the old group; close what the reopen brought back too.
                        warn!(topic = %key.0, partition = %key.1, "reopened a replica of a deleted topic; closing it");
                        if let Err(e) = broker.raft.close_partition(&gid, true).await {
                            warn!(group = %gid, error = %e, "closing the reopened replica failed");
                        }
                    }
                }
                Err(e) => {
                    warn!(topic = %key.0, partition = %key.1, error = %e, "cannot reopen the partition replica yet");
                }
            }
        }
        failing_since.retain(|k, _| broker.partitions.contains(k));
        tried_at.retain(|k, _| failing_since.contains_key(k));
        let stuck = failing_since
            .iter()
            .find(|(_, t)| now.duration_since(**t) >= STORAGE_FENCE_AFTER)
            .map(|((t, p), since)| {
                format!(
                    "partition {t}-{p} could not be reopened after a storage error for {} s",
                    now.duration_since(*since).as_secs()
                )
            });
        if broker.health.set_storage_fence(stuck.clone()) {
            match &stuck {
                Some(why) => {
                    error!(reason = %why, "fencing this node over its storage: no more heartbeats to the controller until it recovers")
                }
                None => info!("storage recovered; this node unfences itself"),
            }
        }
    }
}
