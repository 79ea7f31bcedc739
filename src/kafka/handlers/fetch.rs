//! Fetch (key 1): serves stored record batches as they are, up to the high watermark. Answers as soon
//! as `min_bytes` are available (at once when `min_bytes <= 0`, as in Kafka) and waits up to
//! `max_wait_ms` only when they are not, woken by high-watermark changes rather than polling.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
use sluice_raft::PartitionChanges;

use super::produce::raft_error_code;
use crate::errors::ErrorCode;
use crate::node::Node;

pub const MIN_VERSION: i16 = 4;
/// v13 replaces topic names with topic ids; v12 is the last name-based version.
pub const MAX_VERSION: i16 = 12;

/// Longest we hold a fetch, whatever the client asks; keeps a bad max_wait_ms from pinning tasks.
const MAX_WAIT_MS_CAP: i32 = 30_000;

struct Want {
    topic: TopicName,
    partition: i32,
    offset: i64,
    max_bytes: usize,
    leader_epoch: i32,
}

pub async fn handle(node: &Node, _version: i16, req: FetchRequest) -> FetchResponse {
    let started = Instant::now();
    let wants: Vec<Want> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| Want {
                topic: t.topic.clone(),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes.max(0) as usize,
                leader_epoch: p.current_leader_epoch,
            })
        })
        .collect();
    let max_bytes = if req.max_bytes <= 0 {
        usize::MAX
    } else {
        req.max_bytes as usize
    };
    let min_bytes = req.min_bytes.max(0) as usize;
    let deadline =
        Instant::now() + Duration::from_millis(req.max_wait_ms.clamp(0, MAX_WAIT_MS_CAP) as u64);

    loop {
        let mut watches = Vec::new();
        let mut results: Vec<(TopicName, PartitionData)> = Vec::new();
        let mut total = 0usize;
        let mut any_error = false;
        let mut worst = 0i16;
        for w in &wants {
            let (pd, watch) = fetch_partition(node, w, max_bytes.saturating_sub(total)).await;
            // Subscribed inside, before reading: a commit between the read and the wait still
            // wakes us.
            if pd.error_code != 0 {
                any_error = true;
                worst = pd.error_code;
            }
            total += pd.records.as_ref().map(Bytes::len).unwrap_or(0);
            if let Some(rx) = watch {
                watches.push(rx);
            }
            results.push((w.topic.clone(), pd));
        }
        let now = Instant::now();
        // min_bytes <= 0 answers at once, as in Kafka, even with nothing to return.
        if total >= min_bytes || any_error || now >= deadline || watches.is_empty() {
            node.metrics
                .bytes_out
                .fetch_add(total as u64, std::sync::atomic::Ordering::Relaxed);
            node.metrics.count_request("Fetch", worst);
            node.metrics
                .fetch_latency
                .observe_ms(started.elapsed().as_secs_f64() * 1000.0);
            return build(results);
        }
        drop(results);
        let waits = watches
            .into_iter()
            .map(|mut changes| async move { changes.changed().await }.boxed());
        let _ = tokio::time::timeout(deadline - now, futures::future::select_all(waits)).await;
    }
}

fn build(results: Vec<(TopicName, PartitionData)>) -> FetchResponse {
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    for (name, pd) in results {
        match topics.iter_mut().find(|t| t.topic == name) {
            Some(t) => t.partitions.push(pd),
            None => topics.push(
                FetchableTopicResponse::default()
                    .with_topic(name)
                    .with_partitions(vec![pd]),
            ),
        }
    }
    FetchResponse::default().with_responses(topics)
}

fn error(partition: i32, code: ErrorCode) -> PartitionData {
    PartitionData::default()
        .with_partition_index(partition)
        .with_error_code(code.code())
        .with_high_watermark(-1)
        .with_last_stable_offset(-1)
        .with_log_start_offset(-1)
        .with_records(Some(Bytes::new()))
}

async fn fetch_partition(
    node: &Node,
    w: &Want,
    budget: usize,
) -> (PartitionData, Option<PartitionChanges>) {
    let topic = w.topic.0.as_str();
    let known = node
        .state()
        .topics
        .get(topic)
        .map(|t| w.partition >= 0 && (w.partition as usize) < t.partitions.len())
        .unwrap_or(false);
    if !known {
        return (error(w.partition, ErrorCode::UnknownTopicOrPartition), None);
    }
    let Some(group) = node.partition(topic, w.partition) else {
        return (error(w.partition, ErrorCode::NotLeaderOrFollower), None);
    };
    if !group.is_leader() {
        return (error(w.partition, ErrorCode::NotLeaderOrFollower), None);
    }
    let epoch = group.leader_epoch();
    if w.leader_epoch >= 0 && w.leader_epoch < epoch {
        return (error(w.partition, ErrorCode::FencedLeaderEpoch), None);
    }
    if w.leader_epoch > epoch {
        return (error(w.partition, ErrorCode::UnknownLeaderEpoch), None);
    }
    let watch = group.subscribe_changes();
    let hw = group.high_watermark();
    let start = group.log_start_offset();
    let end = group.log_end_offset();
    if w.offset < start || w.offset > end {
        let pd = error(w.partition, ErrorCode::OffsetOutOfRange)
            .with_high_watermark(hw)
            .with_last_stable_offset(hw)
            .with_log_start_offset(start);
        return (pd, None);
    }
    let mut records = Bytes::new();
    if w.offset < hw && budget > 0 {
        match group.read(w.offset, w.max_bytes.min(budget)).await {
            Ok(b) => records = b,
            // Retention deleted the segment between the range check above and the read.
            Err(_) if w.offset < group.log_start_offset() => {
                let pd = error(w.partition, ErrorCode::OffsetOutOfRange)
                    .with_high_watermark(hw)
                    .with_last_stable_offset(hw)
                    .with_log_start_offset(group.log_start_offset());
                return (pd, None);
            }
            Err(e) => {
                tracing::warn!(topic, partition = w.partition, offset = w.offset, error = %e, "fetch read failed");
                return (error(w.partition, raft_error_code(&e)), None);
            }
        }
    }
    let pd = PartitionData::default()
        .with_partition_index(w.partition)
        .with_high_watermark(hw)
        .with_last_stable_offset(hw)
        .with_log_start_offset(start)
        .with_aborted_transactions(Some(Vec::new()))
        .with_preferred_read_replica(kafka_protocol::messages::BrokerId(-1))
        .with_records(Some(records));
    (pd, Some(watch))
}
