//! Producers writing unique values with acks=all and consumers reading with assign + seek.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{History, Op, OpType, F};
use crate::kclient::{KClient, Outcome};

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
}

impl Shared {
    pub(crate) fn fresh_process(&self) -> i64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
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
                    .pipeline(pipeline),
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
            shared.history.record(op);
        }
        if unknown {
            process = shared.fresh_process();
        }
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
