//! Fetch (key 1): serves stored record batches as they are, up to the high watermark. Answers as soon
//! as `min_bytes` are available (at once when `min_bytes <= 0`) and otherwise waits up to
//! `max_wait_ms`, woken by high-watermark or log-start changes rather than polling.
//!
//! Limits, as in Kafka: a response holds at most the broker's `fetch.max.bytes`, or the request's
//! `max_bytes` if smaller (`<= 0` means the broker's); each partition at most its
//! `partition_max_bytes` within what is left. Only the first partition that returns data may go
//! over, by its first batch (KIP-74: a consumer must always progress), and `max.message.bytes`
//! bounds that batch. A partition listed more than once in one request is answered INVALID_REQUEST
//! wherever it appears, as Kafka's ListOffsets answers duplicates. Record bytes are taken from the
//! node's fetch budget (`sluice.fetch.memory.bytes`) before they are read, and go back to it once the
//! response has been written to its socket.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
use sluice_raft::{PartitionChanges, RaftError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::produce::raft_error_code;
use crate::broker::Broker;
use crate::controller::{PartitionId, TopicConfig};
use crate::errors::ErrorCode;

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
    /// Listed more than once in this request: answered INVALID_REQUEST, never read.
    duplicate: bool,
}

/// The most record bytes one response may carry: the request's `max_bytes`, capped by the broker's
/// `fetch.max.bytes`; zero or negative asks for the broker's cap.
pub fn response_cap(request_max_bytes: i32, broker_max_bytes: usize) -> usize {
    match usize::try_from(request_max_bytes) {
        Ok(n) if n > 0 => n.min(broker_max_bytes),
        _ => broker_max_bytes,
    }
}

/// For each entry, whether its (topic, partition) appears more than once in the list.
fn duplicated<'a>(keys: impl Iterator<Item = (&'a str, i32)> + Clone) -> Vec<bool> {
    let mut seen: HashMap<(&str, i32), usize> = HashMap::new();
    for k in keys.clone() {
        *seen.entry(k).or_default() += 1;
    }
    keys.map(|k| seen.get(&k).is_some_and(|n| *n > 1)).collect()
}

/// The bytes of the node's fetch budget one response holds. A response that already holds some
/// never waits for more (two responses each holding part of the budget and waiting for the rest
/// would wait forever); one that holds none waits, until its own deadline at most.
struct Budget {
    sem: Arc<Semaphore>,
    /// Everything the budget has: no single reservation asks for more, or it would never be granted.
    size: usize,
    held: Option<OwnedSemaphorePermit>,
    deadline: Instant,
}

impl Budget {
    async fn take(&mut self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(bytes.clamp(1, self.size)).unwrap_or(u32::MAX);
        if self.held.is_some() {
            return self.sem.clone().try_acquire_many_owned(n).ok();
        }
        tokio::time::timeout_at(self.deadline, self.sem.clone().acquire_many_owned(n))
            .await
            .ok()?
            .ok()
    }

    /// Keeps `used` bytes of a reservation for the rest of the response and gives back the rest.
    fn keep(&mut self, mut permit: OwnedSemaphorePermit, used: usize) {
        let reserved = permit.num_permits();
        let kept = if used <= reserved {
            permit.split(used)
        } else {
            // A first batch larger than the reservation (written under a larger max.message.bytes,
            // or bigger than the whole budget): count what is free of the excess; the rest is an
            // overshoot of at most that one batch.
            let extra = u32::try_from(used - reserved).unwrap_or(u32::MAX);
            if let Ok(more) = self.sem.clone().try_acquire_many_owned(extra) {
                permit.merge(more);
            }
            Some(permit)
        };
        let Some(kept) = kept.filter(|p| p.num_permits() > 0) else {
            return;
        };
        match &mut self.held {
            Some(h) => h.merge(kept),
            None => self.held = Some(kept),
        }
    }
}

/// The response and the budget it holds, which the connection releases once it is written.
pub async fn handle(
    broker: &Broker,
    _version: i16,
    req: FetchRequest,
) -> (FetchResponse, Option<OwnedSemaphorePermit>) {
    let started = Instant::now();
    let keys = req.topics.iter().flat_map(|t| {
        t.partitions
            .iter()
            .map(move |p| (t.topic.0.as_str(), p.partition))
    });
    let mut dup = duplicated(keys).into_iter();
    let mut wants: Vec<Want> = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            wants.push(Want {
                topic: t.topic.clone(),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: usize::try_from(p.partition_max_bytes).unwrap_or(0),
                leader_epoch: p.current_leader_epoch,
                duplicate: dup.next().unwrap_or(false),
            });
        }
    }
    let cap = response_cap(req.max_bytes, broker.cfg.fetch_max_bytes);
    let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0);
    let deadline =
        started + Duration::from_millis(req.max_wait_ms.clamp(0, MAX_WAIT_MS_CAP) as u64);

    loop {
        let mut budget = Budget {
            sem: broker.fetch_budget.clone(),
            size: broker.cfg.fetch_memory_bytes,
            held: None,
            deadline,
        };
        let mut watches = Vec::new();
        let mut results: Vec<(TopicName, PartitionData)> = Vec::with_capacity(wants.len());
        let mut total = 0usize;
        let mut any_error = false;
        let mut worst = 0i16;
        for w in &wants {
            let limit = w.max_bytes.min(cap.saturating_sub(total));
            // Subscribed inside, before the read: a commit between the read and the wait still
            // wakes us.
            let (pd, watch) = if w.duplicate {
                (error(w.partition, ErrorCode::InvalidRequest), None)
            } else {
                fetch_partition(broker, w, limit, total == 0, &mut budget).await
            };
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
            broker
                .metrics
                .bytes_out
                .fetch_add(total as u64, std::sync::atomic::Ordering::Relaxed);
            broker.metrics.count_request("Fetch", worst);
            broker
                .metrics
                .fetch_latency
                .observe_ms(started.elapsed().as_secs_f64() * 1000.0);
            return (build(results), budget.held);
        }
        // Not enough yet: give the bytes back while we wait, and read again when woken.
        drop(results);
        drop(budget);
        let waits = watches
            .into_iter()
            .map(|mut changes| async move { changes.changed().await }.boxed());
        let _ = tokio::time::timeout_at(deadline, futures::future::select_all(waits)).await;
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

/// One partition's answer, reading at most `limit` bytes (or, with `min_one`, at least its first
/// batch), and what to wait on if the response goes back to sleep.
async fn fetch_partition(
    broker: &Broker,
    w: &Want,
    limit: usize,
    min_one: bool,
    budget: &mut Budget,
) -> (PartitionData, Option<PartitionChanges>) {
    let topic = w.topic.0.as_str();
    let (group, max_batch) = {
        let st = broker.state();
        let known = st.topics.get(topic).and_then(|t| {
            PartitionId::from_wire(w.partition)
                .filter(|p| p.index() < t.partitions.len())
                .map(|p| (p, TopicConfig::resolve(Some(&t.configs), &broker.cfg)))
        });
        let (pid, max_batch) = match known {
            Some((p, cfg)) => (p, cfg.max_message_bytes),
            None => return (error(w.partition, ErrorCode::UnknownTopicOrPartition), None),
        };
        let Some(group) = broker.partition_in(&st, topic, pid) else {
            return (error(w.partition, ErrorCode::NotLeaderOrFollower), None);
        };
        (group, max_batch)
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
    if w.offset < hw && (limit > 0 || min_one) {
        // The most this read can return: the limit, or with min_one a first batch that
        // max.message.bytes bounds. Reserved before reading; what goes unused is given back.
        let most = if min_one { limit.max(max_batch) } else { limit };
        // No budget now (or, for an empty response, before the deadline): nothing from this
        // partition this time, which Kafka allows; the client fetches again.
        if let Some(permit) = budget.take(most).await {
            // A budget smaller than the limit (sluice.fetch.memory.bytes < fetch.max.bytes)
            // shrinks the read to what was granted.
            let limit = limit.min(permit.num_permits());
            match group.read_within(w.offset, limit, min_one).await {
                Ok(b) => {
                    budget.keep(permit, b.len());
                    records = b;
                }
                // Retention deleted the segment between the range check above and the read.
                Err(e)
                    if matches!(e, RaftError::OffsetOutOfRange { .. })
                        || w.offset < group.log_start_offset() =>
                {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_cap_follows_the_request_under_the_broker_limit() {
        let broker = 57_671_680;
        assert_eq!(response_cap(0, broker), broker);
        assert_eq!(response_cap(-1, broker), broker);
        assert_eq!(response_cap(i32::MIN, broker), broker);
        assert_eq!(response_cap(1, broker), 1);
        assert_eq!(response_cap(1 << 20, broker), 1 << 20);
        assert_eq!(response_cap(i32::MAX, broker), broker);
        assert_eq!(response_cap(50 << 20, 1024), 1024);
    }

    #[test]
    fn every_copy_of_a_repeated_partition_is_marked() {
        let keys = [("a", 0), ("a", 1), ("b", 0), ("a", 0), ("a", 0), ("c", -1)];
        assert_eq!(
            duplicated(keys.iter().copied()),
            vec![true, false, false, true, true, false]
        );
        assert_eq!(duplicated(std::iter::empty()), Vec::<bool>::new());
        let many = vec![("t", 7); 1000];
        assert!(duplicated(many.iter().copied()).into_iter().all(|d| d));
    }

    #[tokio::test]
    async fn a_response_holding_budget_never_waits_and_keeps_only_what_it_used() {
        let sem = Arc::new(Semaphore::new(1000));
        let mut b = Budget {
            sem: sem.clone(),
            size: 1000,
            held: None,
            deadline: Instant::now() + Duration::from_secs(3600),
        };
        // An oversized ask is capped at the whole budget, so it can be granted at all.
        let p = b.take(5000).await.expect("the whole budget is free");
        assert_eq!(p.num_permits(), 1000);
        b.keep(p, 300);
        assert_eq!(sem.available_permits(), 700);
        // Holding some, it takes more only if it is free right now.
        let p = b.take(700).await.expect("700 are free");
        b.keep(p, 0);
        assert_eq!(sem.available_permits(), 700);
        let other = sem.clone().try_acquire_many_owned(600).unwrap();
        assert!(b.take(200).await.is_none(), "waited instead of giving up");
        drop(other);
        drop(b);
        assert_eq!(
            sem.available_permits(),
            1000,
            "dropping the response frees it all"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_response_waits_for_budget_until_its_deadline() {
        let sem = Arc::new(Semaphore::new(100));
        let all = sem.clone().try_acquire_many_owned(100).unwrap();
        let mut b = Budget {
            sem: sem.clone(),
            size: 100,
            held: None,
            deadline: Instant::now() + Duration::from_secs(5),
        };
        // Paused clock: the wait ends at the deadline, without real time passing.
        assert!(b.take(10).await.is_none());
        drop(all);
        assert!(b.take(10).await.is_some());
    }
}
