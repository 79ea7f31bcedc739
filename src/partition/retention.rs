//! Delete retention, as Kafka's log cleaner does it for `cleanup.policy=delete`: every
//! `log.retention.check.interval.ms`, each partition replica on this broker deletes its oldest whole
//! segments that breach the topic's `retention.ms` / `retention.bytes` (else the broker's
//! `log.retention.*`). Replicas decide independently, as Kafka brokers do; a follower that then
//! needs deleted entries from the leader is sent a Raft snapshot instead (see
//! [`PartitionGroup::apply_retention`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice_raft::{PartitionGroup, RaftError};
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::clock::now_ms;
use crate::controller::{PartitionId, TopicConfig};

pub async fn retention_loop(broker: Arc<Broker>) {
    let period = Duration::from_millis(broker.cfg.log_retention_check_interval_ms.max(1));
    loop {
        tokio::time::sleep(period).await;
        run_once(&broker).await;
    }
}

/// One pass over the local partitions, one at a time: the file work runs on blocking threads,
/// and serializing it keeps a pass from competing with produce traffic for the disk.
pub async fn run_once(broker: &Broker) {
    for ((topic, partition), group) in broker.partitions.all().iter() {
        let cfg = {
            let st = broker.state();
            TopicConfig::resolve(st.topics.get(topic).map(|t| &t.configs), &broker.cfg)
        };
        let (retention_ms, retention_bytes) = (cfg.retention_ms, cfg.retention_bytes);
        apply(
            broker,
            topic,
            *partition,
            group,
            retention_ms,
            retention_bytes,
        )
        .await;
    }
}

async fn apply(
    broker: &Broker,
    topic: &str,
    partition: PartitionId,
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
            broker
                .metrics
                .retention_segments_deleted
                .fetch_add(out.segments_deleted as u64, Ordering::Relaxed);
            broker
                .metrics
                .retention_bytes_deleted
                .fetch_add(out.bytes_deleted, Ordering::Relaxed);
            info!(
                topic,
                %partition,
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
            %partition,
            "retention purge is pending: a replication stream still reads those entries; \
             it completes by itself once that is done"
        ),
        // The group closed under us (topic deleted, broker stopping): nothing to clean.
        Err(RaftError::Shutdown) => debug!(topic, %partition, "retention skipped: group stopped"),
        Err(e) => warn!(topic, %partition, error = %e, "retention failed; retrying next interval"),
    }
}
