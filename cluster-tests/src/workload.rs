//! Producers writing unique values with acks=all and consumers reading with assign + seek.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{History, Op, OpType, ProducerKind, F};
use crate::kclient::{self, Attempt, KClient, Outcome};

pub struct Shared {
    pub history: History,
    pub stop: AtomicBool,
    /// Next value to write; values are unique across the run and never re-sent.
    pub next_value: AtomicU64,
    /// Next fresh process id (a worker that sees `info` continues as a new process).
    pub next_process: AtomicI64,
    pub bootstrap: Vec<String>,
    pub topic: String,
    pub partitions: i32,
    /// Produce requests each producer pipelines on its connection (1 = one at a time).
    pub inflight: usize,
    /// Next id for a group of pipelined produce requests.
    pub next_pipeline: AtomicU64,
    /// Stops the consumer group, which goes on after `stop` until it has caught up.
    pub group_stop: AtomicBool,
}

impl Shared {
    pub(crate) fn fresh_process(&self) -> i64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    pub(crate) fn group_stopped(&self) -> bool {
        self.group_stop.load(Ordering::Relaxed)
    }
}

/// Pause between a producer's writes: keeps the history readable and the 2-core box usable.
const PRODUCE_PAUSE: Duration = Duration::from_millis(15);
const ERROR_PAUSE: Duration = Duration::from_millis(200);

pub async fn producer(shared: Arc<Shared>, seed: u64, worker: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (worker as u64 + 1)));
    let mut process = shared.fresh_process();
    let mut kc = KClient::new(shared.bootstrap.clone(), &shared.topic, worker);
    let home = (worker as i32) % shared.partitions;
    while !shared.stopped() {
        // Each producer mostly writes its own partition, so a partition that is unavailable
        // stalls only its producers and per-partition availability stays visible.
        let p = if rng.gen_bool(0.8) {
            home
        } else {
            rng.gen_range(0..shared.partitions)
        };
        let k = shared.inflight.max(1);
        let values: Vec<u64> = (0..k)
            .map(|_| shared.next_value.fetch_add(1, Ordering::Relaxed))
            .collect();
        let pipeline = shared.next_pipeline.fetch_add(1, Ordering::Relaxed);
        // Recorded in request order, which is the order `send_many` writes them.
        for v in &values {
            shared.history.record(
                Op::new(process, OpType::Invoke, F::Send, p)
                    .value(*v)
                    .pipeline(pipeline)
                    .producer(ProducerKind::Plain),
            );
        }
        let outcomes = kc.send_many(p, &values).await;
        let mut pause = PRODUCE_PAUSE;
        let mut unknown = false;
        for (v, o) in values.iter().zip(outcomes) {
            let op = match o {
                Outcome::Ok(offset) => Op::new(process, OpType::Ok, F::Send, p)
                    .value(*v)
                    .offset(offset)
                    .pipeline(pipeline),
                Outcome::Fail(e) => {
                    pause = ERROR_PAUSE;
                    Op::new(process, OpType::Fail, F::Send, p)
                        .value(*v)
                        .error(e)
                        .pipeline(pipeline)
                }
                Outcome::Info(e) => {
                    pause = ERROR_PAUSE;
                    unknown = true;
                    Op::new(process, OpType::Info, F::Send, p)
                        .value(*v)
                        .error(e)
                        .pipeline(pipeline)
                }
            };
            shared.history.record(op.producer(ProducerKind::Plain));
        }
        if unknown {
            process = shared.fresh_process();
        }
        tokio::time::sleep(pause).await;
    }
}

/// How long an idempotent producer resends one round of batches before it gives up on the
/// ones still unanswered (records them as unknown) and re-initialises. Longer than a fault is
/// usually held (4-10 s) plus an election, so most resends end with a definite answer.
const RESEND_BUDGET: Duration = Duration::from_secs(30);
/// Kafka's limit for idempotence (`max.in.flight.requests.per.connection` <= 5): the broker
/// remembers a producer's last five batches per partition, so a resend of any batch of a round
/// is still recognised as one.
pub const IDEMPOTENT_INFLIGHT_MAX: usize = 5;

/// A producer id and epoch, with the next sequence per partition (all 0 after every
/// (re-)initialisation: a new epoch starts its sequences over).
struct IdemState {
    producer_id: i64,
    epoch: i16,
    next_seq: HashMap<i32, i32>,
}

/// Sequences wrap from i32::MAX to 0, as Kafka's do.
fn seq_add(seq: i32, n: usize) -> i32 {
    let n = i64::try_from(n).unwrap_or(0);
    (i64::from(seq) + n).rem_euclid(i64::from(i32::MAX) + 1) as i32
}

/// Gets a producer id (`current` None) or the next epoch of the current one, asking until it
/// has one; None only once the workload stops.
async fn init_producer(
    shared: &Shared,
    kc: &mut KClient,
    process: i64,
    current: Option<(i64, i16)>,
) -> Option<IdemState> {
    while !shared.stopped() {
        let mut invoke = Op::new(process, OpType::Invoke, F::InitProducerId, -1);
        if let Some((id, epoch)) = current {
            invoke = invoke.ids(id, epoch);
        }
        shared.history.record(invoke);
        match kc.init_producer_id(current).await {
            Ok((producer_id, epoch)) => {
                shared.history.record(
                    Op::new(process, OpType::Ok, F::InitProducerId, -1).ids(producer_id, epoch),
                );
                return Some(IdemState {
                    producer_id,
                    epoch,
                    next_seq: HashMap::new(),
                });
            }
            Err(e) => {
                // Which id a lost answer handed out does not matter: nothing was written.
                shared.history.record(
                    Op::new(process, OpType::Info, F::InitProducerId, -1).error(format!("{e:#}")),
                );
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    None
}

/// How one batch of a round ended.
#[derive(Debug, Clone)]
struct Resolved {
    outcome: Outcome<i64>,
    attempts: u32,
}

/// Sends a round of one producer's batches (consecutive sequences, in order) to `partition`'s
/// leader and resends the unanswered ones, the same bytes in the same order, to whichever node
/// leads then, until each has a definite answer or [`RESEND_BUDGET`] runs out. The second value
/// says whether the producer must re-initialise (a sequence it may have used is unaccounted for,
/// or the broker refused its sequence or epoch).
async fn send_round(
    shared: &Shared,
    kc: &mut KClient,
    partition: i32,
    batches: &[bytes::Bytes],
) -> (Vec<Resolved>, bool) {
    use sluice::errors::ErrorCode as E;
    let n = batches.len();
    let mut done: Vec<Option<Outcome<i64>>> = vec![None; n];
    let mut attempts = vec![0u32; n];
    let mut last_err = vec![String::new(); n];
    let deadline = tokio::time::Instant::now() + RESEND_BUDGET;
    let mut reinit = false;
    let mut round = 0u32;
    loop {
        let open: Vec<usize> = (0..n).filter(|i| done[*i].is_none()).collect();
        if open.is_empty() {
            break;
        }
        if reinit || tokio::time::Instant::now() >= deadline || shared.stopped() {
            // Giving up: whatever was sent may still be appended (unknown); what never left
            // the client was not.
            for i in open {
                done[i] = Some(if attempts[i] > 0 {
                    Outcome::Info(format!(
                        "no definite answer after {} sends: {}",
                        attempts[i], last_err[i]
                    ))
                } else {
                    Outcome::Fail(format!("never sent: {}", last_err[i]))
                });
            }
            reinit = true;
            break;
        }
        if round > 0 {
            // Leader elections take a few hundred ms; back off up to a second.
            let pause = ERROR_PAUSE * round.min(5);
            tokio::time::sleep(pause).await;
            kc.refresh_metadata();
        }
        round += 1;
        let to_send: Vec<bytes::Bytes> = open.iter().map(|i| batches[*i].clone()).collect();
        let answers = kc.produce_pipelined(partition, &to_send).await;
        // Whether an earlier batch of this send is still unresolved: the broker then refuses
        // the later ones for their sequence (it has not appended their predecessor), and
        // they are resent with it, in order.
        let mut earlier_open = false;
        for (&i, a) in open.iter().zip(answers) {
            if !matches!(a, Attempt::NotSent(_)) {
                attempts[i] += 1;
            }
            match a {
                Attempt::Answer {
                    code: 0,
                    base_offset,
                    ..
                } => done[i] = Some(Outcome::Ok(base_offset)),
                Attempt::NotSent(m) | Attempt::Lost(m) => {
                    last_err[i] = m;
                    earlier_open = true;
                }
                Attempt::Answer { code, message, .. } => {
                    let e = E::from_code(code);
                    let sequence_error = matches!(
                        e,
                        Some(
                            E::OutOfOrderSequenceNumber
                                | E::UnknownProducerId
                                | E::InvalidProducerEpoch
                        )
                    );
                    let retriable = code == E::RequestTimedOut.code()
                        || kafka_protocol::error::ResponseError::try_from_code(code)
                            .is_some_and(|r| r.is_retriable());
                    if (sequence_error && earlier_open) || (!sequence_error && retriable) {
                        last_err[i] = message;
                        earlier_open = true;
                    } else if code == E::DuplicateSequenceNumber.code() {
                        // Old brokers' answer to a resend: in the log, at an unknown offset.
                        done[i] = Some(Outcome::Info(message));
                        reinit = true;
                    } else if sequence_error || kclient::definite_produce_error(code) {
                        // The broker refused this batch before appending it: its sequence or
                        // epoch is no good (a gap, a fenced epoch, a forgotten producer), or
                        // the batch itself is. Later sequences cannot follow it: re-init.
                        done[i] = Some(Outcome::Fail(message));
                        reinit = true;
                    } else {
                        // An error that neither says the batch was refused nor invites a
                        // resend (UNKNOWN_SERVER_ERROR): unknown, as for plain producers.
                        done[i] = Some(Outcome::Info(message));
                        reinit = true;
                    }
                }
            }
        }
    }
    let resolved = done
        .into_iter()
        .zip(attempts)
        .map(|(o, attempts)| Resolved {
            outcome: o.unwrap_or_else(|| Outcome::Info("no outcome".into())),
            attempts,
        })
        .collect();
    (resolved, reinit)
}

/// An idempotent producer: gets a producer id, stamps each value's one-record batch with
/// (id, epoch, sequence), pipelines up to [`IDEMPOTENT_INFLIGHT_MAX`] batches per round to one
/// partition, and resends unanswered batches unchanged across cut connections and leader changes
/// (see [`send_round`]). The broker must answer a resend of a batch it already appended with the
/// original offset; storing a value twice is the `duplicates` anomaly.
pub async fn idempotent_producer(shared: Arc<Shared>, seed: u64, worker: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (worker as u64 + 1)));
    let mut process = shared.fresh_process();
    let mut kc = KClient::new(shared.bootstrap.clone(), &shared.topic, worker);
    let home = (worker as i32) % shared.partitions;
    let k = shared.inflight.clamp(1, IDEMPOTENT_INFLIGHT_MAX);
    let Some(mut st) = init_producer(&shared, &mut kc, process, None).await else {
        return;
    };
    while !shared.stopped() {
        let p = if rng.gen_bool(0.8) {
            home
        } else {
            rng.gen_range(0..shared.partitions)
        };
        let values: Vec<u64> = (0..k)
            .map(|_| shared.next_value.fetch_add(1, Ordering::Relaxed))
            .collect();
        let pipeline = shared.next_pipeline.fetch_add(1, Ordering::Relaxed);
        let first = st.next_seq.get(&p).copied().unwrap_or(0);
        let mut batches = Vec::with_capacity(k);
        let mut encode_error = None;
        for (i, v) in values.iter().enumerate() {
            let seq = seq_add(first, i);
            shared.history.record(
                Op::new(process, OpType::Invoke, F::Send, p)
                    .value(*v)
                    .pipeline(pipeline)
                    .producer(ProducerKind::Idempotent)
                    .ids(st.producer_id, st.epoch)
                    .seq(seq),
            );
            match kclient::encode_idempotent(*v, st.producer_id, st.epoch, seq) {
                Ok(b) => batches.push(b),
                Err(e) => encode_error = Some(format!("{e:#}")),
            }
        }
        st.next_seq.insert(p, seq_add(first, k));
        let done = |v: u64, kind: OpType, process: i64| {
            Op::new(process, kind, F::Send, p)
                .value(v)
                .pipeline(pipeline)
                .producer(ProducerKind::Idempotent)
                .ids(st.producer_id, st.epoch)
        };
        let (resolved, reinit) = match encode_error {
            // Nothing was sent; the sequences are skipped, so start over with a new epoch.
            Some(e) => {
                for v in &values {
                    shared
                        .history
                        .record(done(*v, OpType::Fail, process).error(e.clone()));
                }
                (Vec::new(), true)
            }
            None => send_round(&shared, &mut kc, p, &batches).await,
        };
        let mut unknown = false;
        let mut failed = false;
        for ((v, r), i) in values.iter().zip(&resolved).zip(0..) {
            let op = match &r.outcome {
                Outcome::Ok(offset) => done(*v, OpType::Ok, process).offset(*offset),
                Outcome::Fail(e) => {
                    failed = true;
                    done(*v, OpType::Fail, process).error(e.clone())
                }
                Outcome::Info(e) => {
                    unknown = true;
                    done(*v, OpType::Info, process).error(e.clone())
                }
            };
            shared
                .history
                .record(op.seq(seq_add(first, i)).attempts(r.attempts));
        }
        if unknown {
            process = shared.fresh_process();
        }
        if reinit {
            // A new epoch fences anything of the old one still in flight and restarts every
            // partition's sequence at 0, so the gap or unknown batch cannot block what follows.
            match init_producer(&shared, &mut kc, process, Some((st.producer_id, st.epoch))).await {
                Some(next) => st = next,
                None => return,
            }
        }
        let pause = if unknown || failed || reinit {
            ERROR_PAUSE
        } else {
            PRODUCE_PAUSE
        };
        tokio::time::sleep(pause).await;
    }
}

/// Reads one partition in sessions. A session starts with a seek (to where the last one
/// stopped, or to 0) under a fresh process id and ends at the first error.
pub async fn consumer(shared: Arc<Shared>, seed: u64, worker: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x85eb_ca6b * (worker as u64 + 1)));
    let p = (worker as i32) % shared.partitions;
    let mut kc = KClient::new(shared.bootstrap.clone(), &shared.topic, worker + 1);
    let mut position = 0i64;
    while !shared.stopped() {
        let process = shared.fresh_process();
        if rng.gen_bool(0.2) {
            position = 0;
        }
        // Bounded session length so seeks happen regularly even without faults.
        let polls = rng.gen_range(20..200);
        for _ in 0..polls {
            if shared.stopped() {
                return;
            }
            shared
                .history
                .record(Op::new(process, OpType::Invoke, F::Poll, p).offset(position));
            let res = kc.poll(p, position).await;
            let log_start = kc.last_log_start;
            match res {
                Outcome::Ok((pairs, next)) => {
                    let empty = pairs.is_empty();
                    shared.history.record(
                        Op::new(process, OpType::Ok, F::Poll, p)
                            .offset(position)
                            .msgs(pairs)
                            .log_start(log_start),
                    );
                    position = next.max(position);
                    if empty {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Outcome::Fail(e) => {
                    shared.history.record(
                        Op::new(process, OpType::Fail, F::Poll, p)
                            .offset(position)
                            .error(e)
                            .log_start(log_start),
                    );
                    tokio::time::sleep(ERROR_PAUSE).await;
                    break;
                }
                Outcome::Info(e) => {
                    shared.history.record(
                        Op::new(process, OpType::Info, F::Poll, p)
                            .offset(position)
                            .error(e),
                    );
                    tokio::time::sleep(ERROR_PAUSE).await;
                    break;
                }
            }
        }
    }
}

/// After the faults: reads every partition from 0 up to its high watermark (taken after the
/// producers stopped). Returns per partition (high watermark, offset reached, error if any).
pub async fn final_drain(
    shared: Arc<Shared>,
    deadline: tokio::time::Instant,
) -> Vec<(i32, i64, i64, Option<String>)> {
    let mut out = Vec::new();
    for p in 0..shared.partitions {
        let mut kc = KClient::new(shared.bootstrap.clone(), &shared.topic, p as usize);
        let mut hw = None;
        let mut last_err = None;
        while hw.is_none() && tokio::time::Instant::now() < deadline {
            match kc.high_watermark(p).await {
                Ok(h) => hw = Some(h),
                Err(e) => {
                    last_err = Some(format!("{e:#}"));
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
        let Some(hw) = hw else {
            out.push((p, -1, 0, last_err));
            continue;
        };
        let mut process = shared.fresh_process();
        let mut position = 0i64;
        let mut err = None;
        while position < hw && tokio::time::Instant::now() < deadline {
            shared.history.record(
                Op::new(process, OpType::Invoke, F::Poll, p)
                    .offset(position)
                    .drain(),
            );
            let res = kc.poll(p, position).await;
            let log_start = kc.last_log_start;
            match res {
                Outcome::Ok((pairs, next)) => {
                    shared.history.record(
                        Op::new(process, OpType::Ok, F::Poll, p)
                            .offset(position)
                            .msgs(pairs)
                            .log_start(log_start)
                            .drain(),
                    );
                    position = next.max(position);
                    err = None;
                }
                Outcome::Fail(e) | Outcome::Info(e) => {
                    shared.history.record(
                        Op::new(process, OpType::Info, F::Poll, p)
                            .offset(position)
                            .error(e.clone())
                            .log_start(log_start)
                            .drain(),
                    );
                    err = Some(e);
                    process = shared.fresh_process();
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
        if position < hw && err.is_none() {
            err = Some("drain deadline passed".into());
        }
        out.push((p, hw, position, err));
    }
    out
}
