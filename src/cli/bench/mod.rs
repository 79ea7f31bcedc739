//! `sluice bench produce|consume|e2e`: a load generator that speaks the Kafka protocol to any
//! broker (Sluice, Kafka, Redpanda, Tansu), so the same figures can be made for each.
//!
//! One process drives `--producers` connections per leader, each pipelining up to
//! `--max-in-flight` produce requests: a writer task stamps prebuilt batches (see `batch`) and a
//! reader task per connection settles responses, so neither waits on the other. Latency goes into
//! an HDR histogram (microsecond resolution) and is reported as p50/p95/p99/p99.9/max; `--json`
//! prints the same report as one JSON object for scripts. README "Benchmarks" has the matrix.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;

use super::client::{Client, TopicInfo};
use super::{parse_acks, CompressionArg, ConnectArgs, TopicsCreateArgs};

pub mod batch;
mod consume;
mod produce;

#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Produce records as fast as allowed; report records/s, MB/s and ack latency.
    Produce(BenchArgs),
    /// Fetch a topic's records from the start; report records/s and MB/s.
    Consume(BenchArgs),
    /// Produce (paced by --throughput) and consume at once; report produce-to-consume latency
    /// from the send time written into each record.
    E2e(BenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Topic to use; created with --partitions (and --replication-factor) when missing.
    #[arg(long, default_value = "sluice-bench")]
    pub topic: String,
    /// Records to produce (consume: to read; default: what the topic holds). Default 1,000,000
    /// unless --duration is given.
    #[arg(long = "num-records")]
    pub num_records: Option<u64>,
    /// Bytes per record value (no key).
    #[arg(long = "record-size", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub record_size: u64,
    /// Producer connections per leader, each pipelining (consume: connections per leader,
    /// partitions split between them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub producers: u32,
    /// Partitions of the topic when this creates it.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Replication factor of the topic when this creates it (broker default if omitted).
    #[arg(long = "replication-factor")]
    pub replication_factor: Option<i16>,
    /// Acknowledgements: 0, 1, or all (= -1).
    #[arg(long, default_value = "all", allow_hyphen_values = true, value_parser = parse_acks)]
    pub acks: i16,
    /// Largest record batch (batch.size): records per batch = batch-bytes / record-size, at
    /// least one.
    #[arg(long = "batch-bytes", default_value_t = 16384,
          value_parser = clap::value_parser!(u64).range(1..=64 * 1024 * 1024))]
    pub batch_bytes: u64,
    /// With --throughput: how long a batch may wait for more records before it is sent
    /// (linger.ms). 0 sends whatever is due as soon as a request slot is free.
    #[arg(long = "linger-ms", default_value_t = 0)]
    pub linger_ms: u64,
    /// Produce requests awaiting a response per connection.
    #[arg(long = "max-in-flight", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_in_flight: u32,
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,
    /// Total records per second across producers (a rate limit, to measure latency at a given
    /// load); absent or -1: as fast as possible.
    #[arg(long, allow_hyphen_values = true)]
    pub throughput: Option<f64>,
    /// Stop after this many seconds (with --num-records: whichever comes first).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Largest fetch per partition (consume and e2e).
    #[arg(long = "fetch-bytes", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub fetch_bytes: i32,
    /// Print the final report as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl BenchArgs {
    fn validate(&self, mode: Mode) -> Result<()> {
        if mode == Mode::E2e && self.record_size < batch::STAMP_LEN as u64 {
            bail!(
                "--record-size must be at least {} for bench e2e (each value carries its send time)",
                batch::STAMP_LEN
            );
        }
        if let Some(t) = self.throughput {
            if !(t > 0.0 || t == -1.0) || !t.is_finite() {
                bail!("--throughput must be a positive rate (records/s) or -1 for no limit");
            }
        }
        if let Some(d) = self.duration {
            if !(d > 0.0 && d.is_finite() && d < 1e7) {
                bail!("--duration must be a positive number of seconds");
            }
        }
        if self.partitions.is_some_and(|p| p <= 0) {
            bail!("--partitions must be at least 1");
        }
        if self.num_records == Some(0) {
            bail!("--num-records must be at least 1");
        }
        Ok(())
    }

    fn rate(&self) -> Option<f64> {
        self.throughput.filter(|t| *t > 0.0)
    }

    fn deadline(&self, start: Instant) -> Option<Instant> {
        self.duration.map(|d| start + Duration::from_secs_f64(d))
    }

    /// Records to produce: --num-records, else unlimited with --duration, else 1,000,000.
    fn produce_limit(&self) -> u64 {
        match (self.num_records, self.duration) {
            (Some(n), _) => n,
            (None, Some(_)) => u64::MAX,
            (None, None) => 1_000_000,
        }
    }

    fn records_per_batch(&self) -> usize {
        usize::try_from((self.batch_bytes / self.record_size).max(1)).unwrap_or(usize::MAX)
    }
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    let (mode, args) = match &cmd {
        BenchCommand::Produce(a) => (Mode::Produce, a),
        BenchCommand::Consume(a) => (Mode::Consume, a),
        BenchCommand::E2e(a) => (Mode::E2e, a),
    };
    args.validate(mode)?;
    let mut client = Client::connect(&args.connect.bootstrap_server).await?;
    let topic = ensure_topic(&mut client, args, mode).await?;
    let progress = std::io::stdout().is_terminal();
    let report = match mode {
        Mode::Produce => {
            let stats = Arc::new(Stats::new());
            let ticker = progress.then(|| Progress::start("produce", stats.clone()));
            let start = Instant::now();
            let plan = produce::Plan::new(args, start, false);
            let res = produce::run(&client, args, &topic, plan, stats.clone()).await;
            stop_progress(ticker).await;
            res?;
            stats.report(mode, args, start.elapsed())
        }
        Mode::Consume => {
            let stats = Arc::new(Stats::new());
            let ticker = progress.then(|| Progress::start("consume", stats.clone()));
            let start = Instant::now();
            let res = consume::run(
                &mut client,
                args,
                &topic,
                consume::From::Earliest,
                &stats,
                None,
            )
            .await;
            stop_progress(ticker).await;
            res?;
            stats.report(mode, args, start.elapsed())
        }
        Mode::E2e => e2e(&mut client, args, &topic, progress).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report_text(&report));
    }
    if let Some(errors) = report.get("errors").and_then(|e| e.as_object()) {
        if !errors.is_empty() {
            bail!(
                "the broker refused some requests: {}",
                serde_json::Value::Object(errors.clone())
            );
        }
    }
    Ok(())
}

/// Produce and consume at once: the consumer starts at the log end, the producer is paced by
/// --throughput (default 10,000 records/s, so latency is measured below saturation).
async fn e2e(
    client: &mut Client,
    args: &BenchArgs,
    topic: &TopicInfo,
    progress: bool,
) -> Result<serde_json::Value> {
    let mut args = args.clone();
    if args.throughput.is_none() {
        args.throughput = Some(10_000.0);
    }
    let consumed = Arc::new(Stats::new());
    let produced = Arc::new(Stats::new());
    let ticker = progress.then(|| Progress::start("e2e", consumed.clone()));
    let ends = consume::log_ends(client, topic).await?;
    let start = Instant::now();
    let plan = produce::Plan::new(&args, start, true);
    let target = plan.limit;
    let done = Arc::new(AtomicBool::new(false));
    let producer = {
        let (client_ref, args_ref, topic_ref) = (&*client, &args, topic);
        let (produced, done) = (produced.clone(), done.clone());
        async move {
            let r = produce::run(client_ref, args_ref, topic_ref, plan, produced).await;
            done.store(true, Ordering::Release);
            r
        }
    };
    let mut consumer_client = Client::connect(&args.connect.bootstrap_server).await?;
    // Learns the brokers' addresses.
    consumer_client.topic(&args.topic).await?;
    let consumer = consume::run(
        &mut consumer_client,
        &args,
        topic,
        consume::From::Offsets(ends),
        &consumed,
        Some(consume::Follow {
            produced: produced.clone(),
            producer_done: done,
            target,
        }),
    );
    let (p, c) = tokio::join!(producer, consumer);
    stop_progress(ticker).await;
    p?;
    c?;
    let elapsed = start.elapsed();
    let mut report = consumed.report(Mode::E2e, &args, elapsed);
    report["produce"] = produced.report(Mode::Produce, &args, elapsed);
    if let Some(e) = report["produce"].get("errors").cloned() {
        report["errors"] = e;
    }
    Ok(report)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Produce,
    Consume,
    E2e,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Produce => "produce",
            Mode::Consume => "consume",
            Mode::E2e => "e2e",
        }
    }
}

/// The topic, created when missing (produce and e2e) with --partitions/--replication-factor.
async fn ensure_topic(client: &mut Client, args: &BenchArgs, mode: Mode) -> Result<TopicInfo> {
    match client.topic(&args.topic).await {
        Ok(t) => {
            if let Some(p) = args.partitions {
                if p != t.partition_count() {
                    tracing::warn!(
                        topic = %args.topic,
                        has = t.partition_count(),
                        asked = p,
                        "topic exists with another partition count; using it as it is"
                    );
                }
            }
            Ok(t)
        }
        Err(e) if mode == Mode::Consume => Err(e),
        Err(_) => {
            let create = TopicsCreateArgs {
                name: args.topic.clone(),
                partitions: args.partitions,
                replication_factor: args.replication_factor,
                configs: Vec::new(),
                connect: args.connect.clone(),
            };
            super::topics::create(client, &create).await?;
            // Leaders are elected right after creation; wait until every partition has one.
            for attempt in 0..50 {
                if let Ok(t) = client.topic(&args.topic).await {
                    if (0..t.partition_count()).all(|p| t.leader(p).is_some()) {
                        return Ok(t);
                    }
                }
                tokio::time::sleep(super::client::backoff(attempt.min(4))).await;
            }
            Err(anyhow!(
                "topic '{}' has partitions without a leader after creation",
                args.topic
            ))
        }
    }
}

/// Counters and the latency histogram, shared by the tasks of one side of a run.
pub struct Stats {
    records: AtomicU64,
    bytes: AtomicU64,
    /// Record batch bytes acknowledged (headers and record framing included), producers only.
    wire: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Latencies above this (µs) are clamped: one minute is far beyond any useful figure.
const MAX_LATENCY_US: u64 = 60_000_000;

impl Stats {
    pub fn new() -> Self {
        Stats {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            // 3 significant digits over 1 µs .. 60 s: ~0.1 % error, a few hundred KiB.
            hist: Mutex::new(
                Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static bounds are valid"),
            ),
            errors: Mutex::new(Default::default()),
        }
    }

    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// `n` records of `bytes` settled, each with latency `latency_us` (None: acks=0).
    pub fn settle(&self, n: u64, bytes: u64, latency_us: Option<u64>) {
        self.records.fetch_add(n, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(l) = latency_us {
            let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
            // saturating_record_n cannot fail: out-of-range values are clamped.
            h.saturating_record_n(l.clamp(1, MAX_LATENCY_US), n);
        }
    }

    pub fn add_wire(&self, bytes: u64) {
        self.wire.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `n` records of `bytes` arrived in one fetch that took `latency_us`: one sample per fetch.
    pub fn settle_fetch(&self, n: u64, bytes: u64, latency_us: u64) {
        self.records.fetch_add(n, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
    }

    /// Records one latency sample per record, for when records in one batch differ.
    pub fn record_latencies(&self, latencies_us: &[u64], bytes: u64) {
        self.records
            .fetch_add(latencies_us.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        for l in latencies_us {
            h.saturating_record(*l.clamp(&1, &MAX_LATENCY_US));
        }
    }

    pub fn error(&self, what: String, n: u64) {
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *e.entry(what).or_default() += n;
    }

    fn p_ms(&self, q: f64) -> f64 {
        let h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_empty() {
            return 0.0;
        }
        h.value_at_quantile(q) as f64 / 1000.0
    }

    fn report(&self, mode: Mode, args: &BenchArgs, elapsed: Duration) -> serde_json::Value {
        let records = self.records();
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = elapsed.as_secs_f64().max(1e-9);
        let h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        let q = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                round3(h.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "mode": mode.name(),
            "topic": args.topic,
            "records": records,
            "bytes": bytes,
            "wire_bytes": self.wire.load(Ordering::Relaxed),
            "elapsed_sec": round3(secs),
            "records_per_sec": round3(records as f64 / secs),
            "mb_per_sec": round3(bytes as f64 / secs / (1024.0 * 1024.0)),
            "latency_samples": h.len(),
            "latency_ms": {
                "p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "p999": q(0.999),
                "max": if h.is_empty() { 0.0 } else { round3(h.max() as f64 / 1000.0) },
                "mean": if h.is_empty() { 0.0 } else { round3(h.mean() / 1000.0) },
            },
            "errors": errors,
            "config": {
                "record_size": args.record_size,
                "producers": args.producers,
                "acks": args.acks,
                "batch_bytes": args.batch_bytes,
                "linger_ms": args.linger_ms,
                "max_in_flight": args.max_in_flight,
                "compression": format!("{:?}", args.compression).to_lowercase(),
                "throughput": args.rate(),
            },
        })
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn report_text(r: &serde_json::Value) -> String {
    let f = |k: &str| r["latency_ms"][k].as_f64().unwrap_or(0.0);
    let mut s = format!(
        "{}: {} records in {:.2} s: {:.0} records/s, {:.2} MB/s\n",
        r["mode"].as_str().unwrap_or("?"),
        r["records"],
        r["elapsed_sec"].as_f64().unwrap_or(0.0),
        r["records_per_sec"].as_f64().unwrap_or(0.0),
        r["mb_per_sec"].as_f64().unwrap_or(0.0),
    );
    let what = match r["mode"].as_str() {
        Some("e2e") => "produce-to-consume latency",
        Some("consume") => "fetch latency",
        _ => "ack latency",
    };
    if r["latency_samples"].as_u64().unwrap_or(0) > 0 {
        s += &format!(
            "{what} ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n",
            f("p50"),
            f("p95"),
            f("p99"),
            f("p999"),
            f("max")
        );
    }
    if let Some(p) = r.get("produce") {
        s += &format!("  (producer side) {}", report_text(p));
    }
    if let Some(e) = r["errors"].as_object().filter(|e| !e.is_empty()) {
        s += &format!("errors: {}\n", serde_json::Value::Object(e.clone()));
    }
    s
}

/// The live line on stderr (only when stdout is a terminal): rate over the last second, total,
/// and latency so far.
struct Progress {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(label: &'static str, stats: Arc<Stats>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            while !flag.load(Ordering::Acquire) {
                tick.tick().await;
                let now = stats.records();
                eprint!(
                    "\r{label}: {:>10.0} records/s now, {:>12} total, latency p50 {:.2} ms p99 {:.2} ms   ",
                    (now - last) as f64,
                    now,
                    stats.p_ms(0.5),
                    stats.p_ms(0.99),
                );
                last = now;
            }
        });
        Progress { stop, task }
    }
}

async fn stop_progress(p: Option<Progress>) {
    if let Some(p) = p {
        p.stop.store(true, Ordering::Release);
        p.task.abort();
        let _ = p.task.await;
        eprintln!();
    }
}

pub fn now_ms() -> i64 {
    i64::try_from(now_us() / 1000).unwrap_or(i64::MAX)
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
