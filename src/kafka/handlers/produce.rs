//! Produce (key 0): validates each record batch (magic 2, CRC-32C, size limits, and every record,
//! decompressed when the batch is compressed: see `kafka::records`) and proposes it,
//! unchanged, to the partition's Raft group. The log assigns offsets; the reply carries the base
//! offset once the batch is committed. acks=0 gets no response at all, as in Kafka.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, ResponseKind};
use kafka_protocol::protocol::StrBytes;
use sluice_raft::{Acks, Committed, PartitionGroup, RaftError};
use sluice_storage::batch::{self, BatchError};

use crate::broker::Broker;
use crate::clock::now_ms;
use crate::controller::{PartitionId, TopicConfig};
use crate::errors::ErrorCode;
use crate::kafka::records as record_walk;
use crate::kafka::wire::{Reader, Writer};
use crate::kafka::{Answer, Handler, Response};
use crate::partition::producers::{self, ProducerBatch, ProducerMachine, Verdict};

/// v0-v2 carry message formats 0/1, which we reject, but the range starts at 0 because some
/// librdkafka versions refuse a broker whose Produce range does not.
pub const MIN_VERSION: i16 = 0;
/// v10+ add KIP-951 leader hints and v12 transactions v2; v9 is flexible and widely used.
pub const MAX_VERSION: i16 = 9;

pub struct PartitionOutcome {
    pub error: ErrorCode,
    pub message: Option<String>,
    pub base_offset: i64,
    pub log_start_offset: i64,
}

impl PartitionOutcome {
    fn err(error: ErrorCode, message: impl Into<String>) -> Self {
        PartitionOutcome {
            error,
            message: Some(message.into()),
            base_offset: -1,
            log_start_offset: -1,
        }
    }
}

pub fn raft_error_code(e: &RaftError) -> ErrorCode {
    match e {
        RaftError::NotLeader { .. } | RaftError::Shutdown | RaftError::GroupNotFound(_) => {
            ErrorCode::NotLeaderOrFollower
        }
        RaftError::Timeout => ErrorCode::RequestTimedOut,
        RaftError::Storage(_) => ErrorCode::KafkaStorageError,
        RaftError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        RaftError::InvalidBatch(b) => batch_error_code(b),
        RaftError::ReservedProducerId => ErrorCode::InvalidRecord,
        // Never UNKNOWN_SERVER_ERROR: clients may retry it into duplicates; a timeout is honest.
        _ => ErrorCode::RequestTimedOut,
    }
}

fn batch_error_code(e: &BatchError) -> ErrorCode {
    match e {
        BatchError::BadMagic(_) => ErrorCode::UnsupportedForMessageFormat,
        _ => ErrorCode::CorruptMessage,
    }
}

/// Two steps (see `kafka::Handler`): the ordering step enqueues every partition's batches in
/// request order, so pipelined requests enter the log in the order they arrived; the answer
/// waits for the commits.
// The ordering step's output is the answer, a future awaited later on its own task.
#[allow(clippy::async_yields_async)]
pub fn handle(broker: Arc<Broker>, version: i16, req: ProduceRequest) -> Handler {
    async move {
        let started = Instant::now();
        let acks = req.acks;
        let timeout = Duration::from_millis(req.timeout_ms.clamp(1, 300_000) as u64);
        let mut parts = Vec::new();
        for t in req.topic_data {
            let topic = t.name.0.to_string();
            for p in t.partition_data {
                let start = if req.transactional_id.is_some() {
                    Started::Answered(PartitionOutcome::err(
                        ErrorCode::InvalidRequest,
                        "transactions are not supported",
                    ))
                } else if !(-1..=1).contains(&acks) {
                    Started::Answered(PartitionOutcome::err(
                        ErrorCode::InvalidRequiredAcks,
                        format!("acks must be -1, 0 or 1, got {acks}"),
                    ))
                } else {
                    broker.metrics.bytes_in.fetch_add(
                        p.records.as_ref().map(|r| r.len() as u64).unwrap_or(0),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    enqueue_partition(&broker, &topic, p.index, p.records, acks).await
                };
                parts.push(((t.name.clone(), p.index), start));
            }
        }
        let answer: Answer = async move {
            let (keys, starts): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
            let waits = starts.into_iter().map(|s| await_partition(s, timeout));
            let outcomes = futures::future::join_all(waits).await;
            let mut worst = 0;
            let mut topics: Vec<TopicProduceResponse> = Vec::new();
            for ((name, index), o) in keys.into_iter().zip(outcomes) {
                if o.error != ErrorCode::None {
                    tracing::debug!(topic = %name.0, partition = index, error = ?o.error, msg = ?o.message, "produce failed");
                    worst = o.error.code();
                }
                let pr = PartitionProduceResponse::default()
                    .with_index(index)
                    .with_error_code(o.error.code())
                    .with_base_offset(o.base_offset)
                    .with_log_append_time_ms(-1)
                    .with_log_start_offset(o.log_start_offset)
                    .with_error_message(if version >= 8 {
                        o.message.map(StrBytes::from_string)
                    } else {
                        None
                    });
                match topics.iter_mut().find(|t| t.name == name) {
                    Some(t) => t.partition_responses.push(pr),
                    None => topics.push(
                        TopicProduceResponse::default()
                            .with_name(name)
                            .with_partition_responses(vec![pr]),
                    ),
                }
            }
            broker.metrics.count_request("Produce", worst);
            broker
                .metrics
                .produce_latency
                .observe_ms(started.elapsed().as_secs_f64() * 1000.0);
            if acks == 0 {
                return None;
            }
            Some(Response::Kind(Box::new(ResponseKind::Produce(
                ProduceResponse::default().with_responses(topics),
            ))))
        }
        .boxed();
        answer
    }
    .boxed()
}

/// One partition of a request after its ordering step: answered already, or enqueued and
/// waiting for its batches to commit.
enum Started {
    Answered(PartitionOutcome),
    Enqueued {
        batches: Vec<BatchWait>,
        group: Arc<PartitionGroup>,
    },
}

/// How one batch of a request gets its offsets.
enum BatchWait {
    /// Enqueued: from its commit.
    Commit(Committed),
    /// An idempotent producer's resend of a batch already in the log: its original offsets.
    Known(i64, i64),
    /// A resend of a batch still on its way: the original's offsets once it commits.
    Original(ProducerBatch),
}

impl BatchWait {
    async fn offsets(self, group: &PartitionGroup) -> Result<(i64, i64), String> {
        match self {
            BatchWait::Commit(c) => c.await.map_err(|e| e.to_string()),
            BatchWait::Known(base, last) => Ok((base, last)),
            BatchWait::Original(b) => {
                let Some(mut applied) =
                    group.with_machine(producers::MACHINE, |m: &ProducerMachine| m.subscribe())
                else {
                    return Err("the partition has no producer state".into());
                };
                loop {
                    let found = group
                        .with_machine(producers::MACHINE, |m: &ProducerMachine| {
                            m.committed_batch(&b)
                        })
                        .flatten();
                    if let Some(d) = found {
                        return Ok((d.base_offset, d.last_offset));
                    }
                    // The request's timeout bounds this; a lost original never commits.
                    if applied.changed().await.is_err() {
                        return Err("the partition closed".into());
                    }
                }
            }
        }
    }
}

/// Kafka's answer to an idempotent producer's batch the producer state refused.
fn verdict_code(v: &Verdict) -> ErrorCode {
    match v {
        Verdict::OutOfOrder { .. } => ErrorCode::OutOfOrderSequenceNumber,
        Verdict::StaleEpoch { .. } => ErrorCode::InvalidProducerEpoch,
        Verdict::UnknownProducer => ErrorCode::UnknownProducerId,
        // Duplicates are answered with offsets, not refused; appends are not refused at all.
        Verdict::Append | Verdict::Duplicate(_) | Verdict::DuplicateInFlight => {
            ErrorCode::RequestTimedOut
        }
    }
}

/// Validates a partition's record batches, then hands every one to the partition's Raft group
/// in request order. Nothing is enqueued unless every batch is valid, so a bad request leaves no
/// partial write.
async fn enqueue_partition(
    broker: &Broker,
    topic: &str,
    partition: i32,
    records: Option<Bytes>,
    acks: i16,
) -> Started {
    let answered = |e: ErrorCode, m: String| Started::Answered(PartitionOutcome::err(e, m));
    let (group, max_message_bytes) = {
        let st = broker.state();
        let Some(t) = st.topics.get(topic) else {
            return answered(
                ErrorCode::UnknownTopicOrPartition,
                format!("topic '{topic}' does not exist"),
            );
        };
        let Some(pid) =
            PartitionId::from_wire(partition).filter(|p| p.index() < t.partitions.len())
        else {
            return answered(
                ErrorCode::UnknownTopicOrPartition,
                format!("topic '{topic}' has no partition {partition}"),
            );
        };
        let Some(group) = broker.partition_in(&st, topic, pid) else {
            return answered(
                ErrorCode::NotLeaderOrFollower,
                "this broker does not host the partition".into(),
            );
        };
        (
            group,
            TopicConfig::resolve(Some(&t.configs), &broker.cfg).max_message_bytes,
        )
    };
    if !group.is_leader() {
        return answered(
            ErrorCode::NotLeaderOrFollower,
            "not the partition leader".into(),
        );
    }
    let Some(records) = records.filter(|r| !r.is_empty()) else {
        return answered(ErrorCode::CorruptMessage, "empty record set".into());
    };
    let mut batches = Vec::new();
    let mut pos = 0usize;
    for b in batch::split(&records) {
        let b = match b {
            Ok(b) => b,
            Err(e) => return answered(batch_error_code(&e), e.to_string()),
        };
        let len = b.len();
        let header = match batch::validate(b) {
            Ok(h) => h,
            Err(e) => return answered(batch_error_code(&e), e.to_string()),
        };
        if len > max_message_bytes {
            return answered(
                ErrorCode::MessageTooLarge,
                format!(
                    "record batch of {len} bytes exceeds max.message.bytes {max_message_bytes}"
                ),
            );
        }
        // After the size check, so an oversize batch is refused before anything decompresses it.
        if let Err(e) =
            record_walk::validate(b, &header, record_walk::decompressed_cap(max_message_bytes))
        {
            return answered(ErrorCode::CorruptMessage, e.to_string());
        }
        // Kafka 3.6's check: a clock far ahead would also move the partition's producer-expiry
        // clock, which runs on batch timestamps.
        let create_time = header.attributes & 0x08 == 0;
        let ahead = header.max_timestamp.saturating_sub(now_ms());
        if create_time && ahead > broker.cfg.message_timestamp_after_max_ms {
            return answered(
                ErrorCode::InvalidTimestamp,
                format!(
                    "batch timestamp {} is {ahead} ms ahead of the broker's clock \
                     (message.timestamp.after.max.ms is {})",
                    header.max_timestamp, broker.cfg.message_timestamp_after_max_ms
                ),
            );
        }
        batches.push(records.slice(pos..pos + len));
        pos += len;
    }
    // DELIBERATELY BROKEN with `--features chaos-bugs` and SLUICE_CHAOS_BUG=ack-before-quorum,
    // for the chaos harness to catch: acks=all answered as acks=1, from the leader's disk alone.
    #[cfg(feature = "chaos-bugs")]
    let acks = if crate::chaos_bugs::enabled("ack-before-quorum") {
        1
    } else {
        acks
    };
    // acks=1: the leader's disk is enough, as in Kafka; acks=all (and acks=0, whose outcome
    // nobody reads) wait for a majority.
    let mode = if acks == 1 { Acks::Leader } else { Acks::All };
    let mut waits = Vec::with_capacity(batches.len());
    for b in batches {
        let resend = producers::producer_batch(&b);
        match group.enqueue(b, mode).await {
            Ok(c) => waits.push(BatchWait::Commit(c)),
            Err(RaftError::Refused(r)) if r.reason::<Verdict>().is_some() => {
                if matches!(
                    r.reason::<Verdict>(),
                    Some(Verdict::Duplicate(_) | Verdict::DuplicateInFlight)
                ) {
                    broker
                        .metrics
                        .produce_duplicates
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                match (r.reason::<Verdict>(), resend) {
                    (Some(Verdict::Duplicate(d)), _) => {
                        waits.push(BatchWait::Known(d.base_offset, d.last_offset))
                    }
                    (Some(Verdict::DuplicateInFlight), Some(b)) => {
                        waits.push(BatchWait::Original(b))
                    }
                    (Some(v), _) if waits.is_empty() => {
                        return answered(verdict_code(v), r.message.clone())
                    }
                    _ => {
                        return answered(
                            ErrorCode::RequestTimedOut,
                            format!("part of the request was not enqueued: {}", r.message),
                        )
                    }
                }
            }
            // Refused before it reached the log: a definite answer, which clients may retry.
            Err(e) if waits.is_empty() => {
                return answered(raft_error_code(&e), e.to_string());
            }
            // An earlier batch of this request is already on its way: the request as a whole
            // has an unknown outcome.
            Err(e) => {
                return answered(
                    ErrorCode::RequestTimedOut,
                    format!("part of the request was not enqueued: {e}"),
                )
            }
        }
    }
    Started::Enqueued {
        batches: waits,
        group,
    }
}

/// Waits for a partition's enqueued batches to commit. Once a batch has reached the Raft core
/// every failure is an unknown outcome (it may still commit under a new leader), so it is
/// answered REQUEST_TIMED_OUT, never a code that tells the client the write did not happen:
/// a client that trusts NOT_LEADER_OR_FOLLOWER resends, and a write that did commit is then
/// stored twice.
async fn await_partition(started: Started, timeout: Duration) -> PartitionOutcome {
    let (batches, group) = match started {
        Started::Answered(o) => return o,
        Started::Enqueued { batches, group } => (batches, group),
    };
    let waits = batches.into_iter().map(|b| b.offsets(&group));
    let Ok(results) = tokio::time::timeout(timeout, futures::future::join_all(waits)).await else {
        return PartitionOutcome::err(
            ErrorCode::RequestTimedOut,
            "timed out waiting for the write to commit",
        );
    };
    let mut first_base = -1;
    for r in results {
        match r {
            Ok((base, _last)) => {
                if first_base < 0 {
                    first_base = base;
                }
            }
            Err(e) => {
                return PartitionOutcome::err(
                    ErrorCode::RequestTimedOut,
                    format!("the write's outcome is unknown: {e}"),
                )
            }
        }
    }
    PartitionOutcome {
        error: ErrorCode::None,
        message: None,
        base_offset: first_base,
        log_start_offset: group.log_start_offset(),
    }
}

/// Produce v0-v2: decoded by hand (the codec crate dropped them) and answered with
/// UNSUPPORTED_VERSION for every partition, because these versions carry message formats 0/1.
pub fn legacy(_node: &Broker, version: i16, frame: &Bytes) -> Result<Option<Response>, String> {
    let mut r = Reader::new(frame.clone());
    r.i16()?; // api key
    r.i16()?; // version
    r.i32()?; // correlation id
    r.nullable_string()?; // client id
    let acks = r.i16()?;
    r.i32()?; // timeout
    let mut topics = Vec::new();
    for _ in 0..r.count(6)? {
        let name = r.string()?;
        let mut parts = Vec::new();
        for _ in 0..r.count(8)? {
            let p = r.i32()?;
            r.nullable_bytes()?;
            parts.push(p);
        }
        topics.push((name, parts));
    }
    if acks == 0 {
        return Ok(None);
    }
    let mut w = Writer::default();
    w.i32(topics.len() as i32);
    for (name, parts) in topics {
        w.string(&name).i32(parts.len() as i32);
        for p in parts {
            w.i32(p).i16(ErrorCode::UnsupportedVersion.code()).i64(-1);
            if version >= 2 {
                w.i64(-1);
            }
        }
    }
    if version >= 1 {
        w.i32(0); // throttle time
    }
    Ok(Some(Response::Raw(w.finish())))
}
