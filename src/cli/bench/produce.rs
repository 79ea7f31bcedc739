//! The producing side of `sluice bench`: producer tasks that pace, stamp and write batches, and
//! one reader task per connection that settles responses in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::batch::Templates;
use super::{now_ms, now_us, BenchArgs, Stats};
use crate::cli::client::{Client, TopicInfo};
use crate::cli::conn::{encode_request, read_response, BrokerConn, Io};
use crate::cli::errors::error_name;

/// Broker-side wait for replication acknowledgements.
const PRODUCE_TIMEOUT_MS: i32 = 30_000;
/// How long a response may take before the run is failed: the broker's own timeout plus slack.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(60);
/// First Produce version that names topics by id only.
const TOPIC_ID_VERSION: i16 = 13;

/// What the producers share: the record budget, the clock and the pace.
pub struct Plan {
    pub limit: u64,
    claimed: AtomicU64,
    start: Instant,
    deadline: Option<Instant>,
    /// Records per second per producer task.
    rate_each: Option<f64>,
    linger: Duration,
    stamp: bool,
}

impl Plan {
    pub fn new(args: &BenchArgs, start: Instant, stamp: bool) -> Self {
        Plan {
            limit: args.produce_limit(),
            claimed: AtomicU64::new(0),
            start,
            deadline: args.deadline(start),
            rate_each: None,
            linger: Duration::from_millis(args.linger_ms),
            stamp,
        }
    }

    /// Takes up to `n` records from the budget; 0 when it is spent.
    fn claim(&self, n: u64) -> u64 {
        let mut cur = self.claimed.load(Ordering::Relaxed);
        loop {
            let take = n.min(self.limit.saturating_sub(cur));
            if take == 0 {
                return 0;
            }
            match self.claimed.compare_exchange_weak(
                cur,
                cur + take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take,
                Err(now) => cur = now,
            }
        }
    }

    fn at(&self, records: u64, rate: f64) -> Instant {
        self.start + Duration::from_secs_f64(records as f64 / rate)
    }
}

/// A sent request the reader task has to settle.
struct InFlight {
    correlation_id: i32,
    /// When the batch's first record was due (paced) or taken (unpaced): latency counts from
    /// here, so time spent waiting for a request slot is not hidden.
    start: Instant,
    records: u64,
    /// The record batch's size as sent.
    wire: u64,
    _permit: OwnedSemaphorePermit,
}

struct ProducerConn {
    writer: WriteHalf<Box<dyn Io>>,
    version: i16,
    next_correlation_id: i32,
    slots: Arc<Semaphore>,
    tx: Option<mpsc::UnboundedSender<InFlight>>,
    reader: tokio::task::JoinHandle<Result<()>>,
}

/// Runs `--producers` tasks against the leaders of `topic` until the plan's budget or deadline
/// is reached and every response has been read.
pub async fn run(
    client: &Client,
    args: &BenchArgs,
    topic: &TopicInfo,
    mut plan: Plan,
    stats: Arc<Stats>,
) -> Result<()> {
    let partitions = topic.partition_count();
    if partitions <= 0 {
        return Err(anyhow!("topic '{}' has no partitions", topic.name()));
    }
    let producers = i32::try_from(args.producers).unwrap_or(1).max(1);
    plan.rate_each = args.rate().map(|r| r / f64::from(producers));
    let plan = Arc::new(plan);
    let cap = if topic.has_topic_id() {
        i16::MAX
    } else {
        TOPIC_ID_VERSION - 1
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..producers {
        let mine: Vec<i32> = if partitions >= producers {
            (0..partitions).filter(|p| p % producers == i).collect()
        } else {
            vec![i % partitions]
        };
        let mut leaders: Vec<i32> = Vec::new();
        let mut conns = Vec::new();
        let mut parts = Vec::new();
        for p in mine {
            let leader = topic
                .leader(p)
                .ok_or_else(|| anyhow!("partition {p} of '{}' has no leader", topic.name()))?;
            let idx = match leaders.iter().position(|l| *l == leader) {
                Some(idx) => idx,
                None => {
                    let addr = client
                        .broker_addr(leader)
                        .ok_or_else(|| anyhow!("broker {leader} is not in the metadata"))?;
                    conns.push(open(&addr, cap, args, &stats).await?);
                    leaders.push(leader);
                    conns.len() - 1
                }
            };
            parts.push((p, idx));
        }
        let batches_of = args.records_per_batch();
        let templates = Templates::new(
            usize::try_from(args.record_size)?,
            batches_of,
            args.compression.into(),
            plan.stamp,
        )?;
        let job = Job {
            topic_name: topic.name().to_string(),
            topic_id: topic.raw.topic_id,
            acks: args.acks,
            record_size: args.record_size,
        };
        tasks.spawn(producer_task(
            conns,
            parts,
            templates,
            plan.clone(),
            stats.clone(),
            job,
        ));
    }
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let r = r
            .map_err(|e| anyhow!("producer task failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

async fn open(addr: &str, cap: i16, args: &BenchArgs, stats: &Arc<Stats>) -> Result<ProducerConn> {
    let conn = BrokerConn::connect(addr).await?.into_split()?;
    let version = conn.version_for_max(ApiKey::Produce, cap)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_acks(
        conn.reader,
        rx,
        version,
        stats.clone(),
        args.record_size,
    ));
    Ok(ProducerConn {
        writer: conn.writer,
        version,
        next_correlation_id: conn.next_correlation_id,
        slots: Arc::new(Semaphore::new(
            usize::try_from(args.max_in_flight).unwrap_or(1),
        )),
        tx: Some(tx),
        reader,
    })
}

struct Job {
    topic_name: String,
    topic_id: uuid::Uuid,
    acks: i16,
    record_size: u64,
}

async fn producer_task(
    mut conns: Vec<ProducerConn>,
    parts: Vec<(i32, usize)>,
    mut templates: Templates,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    job: Job,
) -> Result<()> {
    let per_batch = templates.max_records() as u64;
    let mut sent: u64 = 0;
    let mut next_part = 0usize;
    let result: Result<()> = async {
        loop {
            let now = Instant::now();
            if plan.deadline.is_some_and(|d| now >= d) {
                break;
            }
            let (want, start) = match plan.rate_each {
                None => (per_batch, now),
                Some(rate) => {
                    let due = ((now - plan.start).as_secs_f64() * rate) as u64 + 1;
                    let avail = due.saturating_sub(sent);
                    let first_due = plan.at(sent, rate);
                    let mut wake = None;
                    if avail == 0 {
                        wake = Some(first_due);
                    } else if avail < per_batch && !plan.linger.is_zero() {
                        let full_at = plan.at(sent + per_batch - 1, rate);
                        let flush_at = (first_due + plan.linger).min(full_at);
                        if now < flush_at {
                            wake = Some(flush_at);
                        }
                    }
                    if let Some(w) = wake {
                        let w = plan.deadline.map_or(w, |d| w.min(d));
                        tokio::time::sleep_until(w.into()).await;
                        continue;
                    }
                    (avail.min(per_batch), first_due)
                }
            };
            let n = plan.claim(want);
            if n == 0 {
                break;
            }
            sent += n;
            let (partition, ci) = parts[next_part % parts.len()];
            next_part = next_part.wrapping_add(1);
            let conn = &mut conns[ci];
            let permit = conn
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| anyhow!("request slots closed"))?;
            // e2e's stamp is the same start its ack latency counts from, in wall-clock time.
            let behind = u64::try_from(Instant::now().saturating_duration_since(start).as_micros())
                .unwrap_or(0);
            let stamp = i64::try_from(now_us().saturating_sub(behind)).unwrap_or(i64::MAX);
            let batch = templates.batch(usize::try_from(n)?, now_ms(), stamp)?;
            let wire = batch.len() as u64;
            let mut data = PartitionProduceData::default();
            data.index = partition;
            data.records = Some(batch);
            let mut t = TopicProduceData::default();
            // Both set; the encoder writes the one the version uses.
            t.name = TopicName(StrBytes::from_string(job.topic_name.clone()));
            t.topic_id = job.topic_id;
            t.partition_data = vec![data];
            let mut req = ProduceRequest::default();
            req.acks = job.acks;
            req.timeout_ms = PRODUCE_TIMEOUT_MS;
            req.topic_data = vec![t];
            let correlation_id = conn.next_correlation_id;
            conn.next_correlation_id = correlation_id.wrapping_add(1);
            let frame = encode_request(&req, conn.version, correlation_id)?;
            conn.writer
                .write_all(&frame)
                .await
                .context("writing a produce request")?;
            // TLS holds records until flushed; a no-op on a plain socket.
            conn.writer
                .flush()
                .await
                .context("writing a produce request")?;
            if job.acks == 0 {
                stats.settle(n, n * job.record_size, None);
                stats.add_wire(wire);
                continue;
            }
            let queued = conn.tx.as_ref().map(|tx| {
                tx.send(InFlight {
                    correlation_id,
                    start,
                    records: n,
                    wire,
                    _permit: permit,
                })
            });
            if !matches!(queued, Some(Ok(()))) {
                // The reader stopped: its error is reported below.
                break;
            }
        }
        Ok(())
    }
    .await;
    // Closing the queues lets each reader finish the responses still owed, then end.
    let mut first_err = result.err();
    for c in &mut conns {
        c.tx = None;
    }
    for c in conns {
        let r = c
            .reader
            .await
            .map_err(|e| anyhow!("response reader failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
        // Keep the socket open until every response was read.
        drop(c.writer);
    }
    first_err.map_or(Ok(()), Err)
}

async fn read_acks(
    mut reader: ReadHalf<Box<dyn Io>>,
    mut rx: mpsc::UnboundedReceiver<InFlight>,
    version: i16,
    stats: Arc<Stats>,
    record_size: u64,
) -> Result<()> {
    while let Some(f) = rx.recv().await {
        let mut body = tokio::time::timeout(
            RESPONSE_DEADLINE,
            read_response(&mut reader, ApiKey::Produce, version, f.correlation_id),
        )
        .await
        .map_err(|_| anyhow!("no produce response within {RESPONSE_DEADLINE:?}"))??;
        let latency = u64::try_from(f.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let resp =
            ProduceResponse::decode(&mut body, version).context("decoding a produce response")?;
        let code = resp
            .responses
            .iter()
            .flat_map(|t| t.partition_responses.iter())
            .map(|p| p.error_code)
            .find(|c| *c != 0)
            .unwrap_or(0);
        if code == 0 {
            stats.settle(f.records, f.records * record_size, Some(latency));
            stats.add_wire(f.wire);
        } else {
            stats.error(error_name(code), f.records);
        }
    }
    Ok(())
}
