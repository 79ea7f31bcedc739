//! Delete retention, as Kafka's log cleaner does it for `cleanup.policy=delete`: every
//! `log.retention.check.interval.ms`, each partition replica on this node deletes its oldest whole
//! segments that breach the topic's `retention.ms` / `retention.bytes` (else the broker's
//! `log.retention.*`). Replicas decide independently, as Kafka brokers do; a follower that then
//! needs deleted entries from the leader is sent a Raft snapshot instead (see
//! [`PartitionGroup::apply_retention`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice_raft::{PartitionGroup, RaftError};
use tracing::{debug, info, warn};

use crate::node::{now_ms, Node};

/// The effective `(retention.ms, retention.bytes)` of one topic: its own config, else the broker
/// default. Topic configs are validated on create, so an unparsable value can only come from an
/// older or foreign writer; it falls back to the default rather than disabling retention.
pub fn effective_limits(
    configs: Option<&BTreeMap<String, String>>,
    default_ms: i64,
    default_bytes: i64,
) -> (i64, i64) {
    let get = |key: &str, default: i64| {
        configs
            .and_then(|c| c.get(key))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(default)
    };
    (
        get("retention.ms", default_ms),
        get("retention.bytes", default_bytes),
    )
}

pub async fn retention_loop(node: Arc<Node>) {
    let period = Duration::from_millis(node.cfg.log_retention_check_interval_ms.max(1));
    loop {
        tokio::time::sleep(period).await;
        run_once(&node).await;
    }
}

/// One pass over the local partitions, one at a time: the file work runs on blocking threads,
/// and serializing it keeps a pass from competing with produce traffic for the disk.
pub async fn run_once(node: &Node) {
    for ((topic, partition), group) in node.local_partitions() {
        let (retention_ms, retention_bytes) = {
            let st = node.state();
            effective_limits(
                st.topics.get(&topic).map(|t| &t.configs),
                node.cfg.log_retention_ms,
                node.cfg.log_retention_bytes,
            )
        };
        apply(
            node,
            &topic,
            partition,
            &group,
            retention_ms,
            retention_bytes,
        )
        .await;
    }
}

async fn apply(
    node: &Node,
    topic: &str,
    partition: i32,
    group: &PartitionGroup,
    retention_ms: i64,
    retention_bytes: i64,
) {
    match group
        .apply_retention(now_ms(), retention_ms, retention_bytes)
        .await
    {
        Ok(None) => {}
        Ok(Some(out)) => {
            node.metrics
                .retention_segments_deleted
                .fetch_add(out.segments_deleted as u64, Ordering::Relaxed);
            node.metrics
                .retention_bytes_deleted
                .fetch_add(out.bytes_deleted, Ordering::Relaxed);
            info!(
                topic,
                partition,
                log_start_offset = out.log_start_offset,
                segments_deleted = out.segments_deleted,
                bytes_deleted = out.bytes_deleted,
                retention_ms,
                retention_bytes,
                "retention deleted old segments"
            );
        }
        Err(RaftError::Timeout) => info!(
            topic,
            partition,
            "retention purge is pending: a replication stream still reads those entries; \
             it completes by itself once that is done"
        ),
        // The group closed under us (topic deleted, node stopping): nothing to clean.
        Err(RaftError::Shutdown) => debug!(topic, partition, "retention skipped: group stopped"),
        Err(e) => warn!(topic, partition, error = %e, "retention failed; retrying next interval"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_overrides_win_over_broker_defaults() {
        let mut c = BTreeMap::new();
        assert_eq!(effective_limits(None, 7, -1), (7, -1));
        assert_eq!(effective_limits(Some(&c), 7, -1), (7, -1));
        c.insert("retention.bytes".to_string(), "65536".to_string());
        assert_eq!(effective_limits(Some(&c), 7, -1), (7, 65536));
        c.insert("retention.ms".to_string(), "-1".to_string());
        assert_eq!(effective_limits(Some(&c), 7, -1), (-1, 65536));
        c.insert("retention.ms".to_string(), "soon".to_string());
        assert_eq!(effective_limits(Some(&c), 7, -1), (7, 65536));
    }
}
