//! One chaos run: start the cluster, run the workload under the nemesis, heal, drain, compare
//! replicas, check the history, write `history.jsonl`, `summary.json` and `report.txt`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::checker::{self, CheckResult};
use crate::cluster::Cluster;
use crate::groupload;
use crate::history::{History, ProducerKind};
use crate::logcmp::{self, Comparison};
use crate::metaload;
use crate::nemesis::{self, Kind, NemesisCfg, NemesisLog};
use crate::workload::{self, Shared};

#[derive(Debug, Clone)]
pub struct RunCfg {
    pub duration: Duration,
    pub nodes: u32,
    pub seed: u64,
    pub nemeses: Vec<Kind>,
    pub out: PathBuf,
    pub partitions: i32,
    pub producers: usize,
    pub consumers: usize,
    /// Produce requests pipelined per producer.
    pub inflight: usize,
    pub quiet_secs: (u64, u64),
    pub hold_secs: (u64, u64),
    /// Run the metadata workload (topics created, grown, deleted) beside the data workload.
    pub metadata_workload: bool,
    /// Which kind of producer the workload runs.
    pub producer_mode: ProducerMode,
    /// Members of the consumer group (`ct-group`) sharing the topic's partitions and committing
    /// offsets, plus an observer sampling its committed offsets; 0 runs no group.
    pub group_members: usize,
}

/// The data workload's producers: all plain, all idempotent, or both (the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProducerMode {
    /// One record per request, no producer id; unknown outcomes are never retried.
    Plain,
    /// Producer id, epoch and sequence on every batch; unknown outcomes are resent.
    Idempotent,
    /// Half of each: on every partition one of each kind writes at home, so both the
    /// broker's deduplication and the plain path (never resent, so never stored twice) are
    /// exercised under the same faults.
    Mixed,
}

impl ProducerMode {
    pub fn name(self) -> &'static str {
        match self {
            ProducerMode::Plain => "plain",
            ProducerMode::Idempotent => "idempotent",
            ProducerMode::Mixed => "mixed",
        }
    }

    /// Whether producer `worker` is idempotent. Workers `w` write mostly to partition
    /// `w % partitions`; in mixed mode the first `partitions` workers are idempotent and the
    /// next `partitions` plain, and so on, so every partition gets both kinds.
    pub fn idempotent(self, worker: usize, partitions: i32) -> bool {
        match self {
            ProducerMode::Plain => false,
            ProducerMode::Idempotent => true,
            ProducerMode::Mixed => {
                let parts = usize::try_from(partitions.max(1)).unwrap_or(1);
                (worker / parts).is_multiple_of(2)
            }
        }
    }
}

impl RunCfg {
    pub fn new(out: PathBuf, seed: u64) -> RunCfg {
        RunCfg {
            duration: Duration::from_secs(60),
            nodes: 3,
            seed,
            nemeses: nemesis::ALL.to_vec(),
            out,
            partitions: 2,
            producers: 4,
            consumers: 2,
            inflight: 4,
            quiet_secs: (3, 8),
            hold_secs: (4, 10),
            metadata_workload: true,
            producer_mode: ProducerMode::Mixed,
            group_members: 3,
        }
    }
}

pub const TOPIC: &str = "ct";

/// What a run found; `safe()` is the exit status.
#[derive(Debug)]
pub struct RunOutcome {
    pub check: CheckResult,
    pub comparisons: Vec<Comparison>,
    pub drain: Vec<(i32, i64, i64, Option<String>)>,
    pub nemesis: NemesisLog,
    pub setup_error: Option<String>,
    pub notes: Vec<String>,
    /// The group's committed offsets after the final heal (None without a group, or when no
    /// coordinator answered).
    pub group_final: Option<BTreeMap<i32, i64>>,
    /// Whether every node's final metadata views agreed (None without the metadata workload).
    pub metadata_converged: Option<bool>,
}

impl RunOutcome {
    /// No safety anomaly (history valid, replicas identical), and every replica stopped by a
    /// disk fault came back by itself once the disk was healed.
    pub fn safe(&self) -> bool {
        self.setup_error.is_none()
            && self.check.valid
            && self.comparisons.iter().all(|c| c.identical)
            && self.nemesis.disk.unrecovered_heals == 0
    }
}

/// A seed from the clock when none is given.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

async fn create_topic(bootstrap: &str, partitions: i32, rf: i16) -> Result<()> {
    let args = sluice::cli::TopicsCreateArgs {
        name: TOPIC.to_string(),
        partitions: Some(partitions),
        replication_factor: Some(rf),
        configs: Vec::new(),
        connect: sluice::cli::ConnectArgs {
            bootstrap_server: bootstrap.to_string(),
            command_config: None,
        },
    };
    let mut c = sluice::cli::client::Client::connect(bootstrap).await?;
    sluice::cli::topics::create(&mut c, &args).await
}

/// Starts nodes, waits for health, creates the topic and waits for its leaders.
async fn setup(cluster: &Arc<Mutex<Cluster>>, cfg: &RunCfg, notes: &mut Vec<String>) -> Result<()> {
    let t0 = Instant::now();
    {
        let mut c = cluster.lock().await;
        c.start_all()?;
        c.wait_healthy(Duration::from_secs(60))
            .await
            .context("waiting for the cluster to form")?;
    }
    notes.push(format!(
        "cluster of {} healthy after {:.1}s",
        cfg.nodes,
        t0.elapsed().as_secs_f64()
    ));
    let bootstrap = cluster.lock().await.bootstrap();
    let rf = i16::try_from(cfg.nodes.min(3)).unwrap_or(3);
    let mut last = None;
    for attempt in 0..10 {
        let addr = &bootstrap[attempt % bootstrap.len()];
        match tokio::time::timeout(
            Duration::from_secs(30),
            create_topic(addr, cfg.partitions, rf),
        )
        .await
        {
            Ok(Ok(())) => {
                last = None;
                break;
            }
            Ok(Err(e)) if format!("{e:#}").contains("TOPIC_ALREADY_EXISTS") => {
                last = None;
                break;
            }
            Ok(Err(e)) => last = Some(format!("{e:#}")),
            Err(_) => last = Some("CreateTopics timed out".into()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(e) = last {
        anyhow::bail!("creating topic '{TOPIC}' failed: {e}");
    }
    // Every partition needs a leader the admin API agrees on before the workload starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = cluster.lock().await;
        let mut missing = Vec::new();
        for p in 0..cfg.partitions {
            if c.partition_leader(TOPIC, p).await.is_none() {
                missing.push(p);
            }
        }
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("partitions {missing:?} of '{TOPIC}' have no leader after 30 s");
        }
        drop(c);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    notes.push(format!(
        "topic '{TOPIC}' ({} partitions, RF {rf}) ready after {:.1}s",
        cfg.partitions,
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Waits until every replica reports the same high watermark and log end for `p` (bounded).
async fn settle_partition(cluster: &Arc<Mutex<Cluster>>, p: i32) -> Option<i64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_hw = None;
    loop {
        let views = cluster.lock().await.partition_views(TOPIC, p).await;
        let hws: Vec<i64> = views.values().filter_map(|v| v.1).collect();
        let max = hws.iter().copied().max();
        last_hw = max.or(last_hw);
        let all_same = !hws.is_empty()
            && hws.iter().all(|h| Some(*h) == max)
            && views.values().all(|v| v.2 == max);
        if all_same || Instant::now() > deadline {
            return last_hw;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(cfg: RunCfg) -> Result<RunOutcome> {
    std::fs::create_dir_all(&cfg.out)?;
    let history = History::new(Some(&cfg.out.join("history.jsonl")))?;
    let started = Instant::now();
    let cluster = Arc::new(Mutex::new(
        Cluster::new(cfg.nodes, &cfg.out.join("nodes")).await?,
    ));
    let mut notes = Vec::new();
    notes.push(format!(
        "seed {} ({} nodes, {} s, {} producers ({}), nemeses: {})",
        cfg.seed,
        cfg.nodes,
        cfg.duration.as_secs(),
        cfg.producers,
        cfg.producer_mode.name(),
        cfg.nemeses
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(",")
    ));
    {
        let c = cluster.lock().await;
        for n in c.nodes.values() {
            notes.push(format!(
                "n{}: kafka {} (clients via {}), raft {}, admin {}, data {}, log {}, peers {}",
                n.id,
                n.kafka,
                c.clients[&n.id].listen,
                n.raft,
                n.admin,
                n.data_dir.display(),
                n.log_path.display(),
                c.peers_for(n.id)
            ));
        }
    }

    if let Err(e) = setup(&cluster, &cfg, &mut notes).await {
        let setup_error = format!("{e:#}");
        let outcome = RunOutcome {
            check: checker::check(&history.ops()),
            comparisons: Vec::new(),
            drain: Vec::new(),
            nemesis: NemesisLog::default(),
            setup_error: Some(setup_error),
            notes,
            group_final: None,
            metadata_converged: None,
        };
        write_outputs(&cfg, &outcome, &history, started.elapsed())?;
        cluster.lock().await.kill_all_processes();
        return Ok(outcome);
    }

    let bootstrap = cluster.lock().await.bootstrap();
    let shared = Arc::new(Shared {
        history: history.clone(),
        stop: AtomicBool::new(false),
        next_value: AtomicU64::new(1),
        next_process: AtomicI64::new(0),
        bootstrap,
        topic: TOPIC.to_string(),
        partitions: cfg.partitions,
        inflight: cfg.inflight,
        next_pipeline: AtomicU64::new(0),
        group_stop: AtomicBool::new(false),
    });
    let mut workers = Vec::new();
    for w in 0..cfg.producers {
        workers.push(if cfg.producer_mode.idempotent(w, cfg.partitions) {
            tokio::spawn(workload::idempotent_producer(shared.clone(), cfg.seed, w))
        } else {
            tokio::spawn(workload::producer(shared.clone(), cfg.seed, w))
        });
    }
    for w in 0..cfg.consumers {
        workers.push(tokio::spawn(workload::consumer(
            shared.clone(),
            cfg.seed,
            w,
        )));
    }
    // The group goes on after the producers stop, until it has caught up (see below).
    let mut group_workers = Vec::new();
    for m in 0..cfg.group_members {
        group_workers.push(tokio::spawn(groupload::member(shared.clone(), cfg.seed, m)));
    }
    if cfg.group_members > 0 {
        group_workers.push(tokio::spawn(groupload::observer(shared.clone())));
    }
    if cfg.metadata_workload {
        workers.push(tokio::spawn(metaload::worker(
            shared.clone(),
            cluster.clone(),
            cfg.seed,
            cfg.nodes,
        )));
    }
    let nemesis_stop = Arc::new(AtomicBool::new(false));
    let nemesis_task = tokio::spawn(nemesis::run(
        cluster.clone(),
        NemesisCfg {
            kinds: cfg.nemeses.clone(),
            topic: TOPIC.to_string(),
            partitions: cfg.partitions,
            quiet_secs: cfg.quiet_secs,
            hold_secs: cfg.hold_secs,
        },
        StdRng::seed_from_u64(cfg.seed),
        history.clone(),
        nemesis_stop.clone(),
    ));

    tokio::time::sleep(cfg.duration).await;
    tracing::info!("--- stop the nemesis and heal");
    nemesis_stop.store(true, Ordering::Relaxed);
    let nemesis_log = nemesis_task.await.unwrap_or_default();

    tracing::info!("--- let the cluster recover while the workload continues");
    let recovered = {
        let c = cluster.lock().await;
        c.wait_healthy(Duration::from_secs(60)).await
    };
    if let Err(e) = &recovered {
        notes.push(format!("after heal: {e:#}"));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    tracing::info!("--- stop the workload");
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(20), w).await;
    }

    tracing::info!("--- final drain: read every partition up to its high watermark");
    let drain = workload::final_drain(
        shared.clone(),
        tokio::time::Instant::now() + Duration::from_secs(90),
    )
    .await;

    let group_final = if cfg.group_members > 0 {
        tracing::info!("--- let the consumer group catch up with the high watermarks");
        let hws: BTreeMap<i32, i64> = drain
            .iter()
            .filter(|(_, hw, _, _)| *hw >= 0)
            .map(|(p, hw, _, _)| (*p, *hw))
            .collect();
        match groupload::wait_caught_up(
            shared.clone(),
            &hws,
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
        .await
        {
            Some(took) => notes.push(format!(
                "the consumer group caught up with the high watermarks {:.1}s after the drain",
                took.as_secs_f64()
            )),
            None => notes.push(
                "the consumer group did not catch up with the high watermarks within 60 s".into(),
            ),
        }
        shared.group_stop.store(true, Ordering::Relaxed);
        for w in group_workers {
            let _ = tokio::time::timeout(Duration::from_secs(20), w).await;
        }
        tracing::info!("--- final OffsetFetch of the consumer group");
        let f = groupload::final_offsets(
            shared.clone(),
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
        .await;
        if f.is_none() {
            notes.push("the final OffsetFetch of the group got no answer in 60 s".into());
        }
        f
    } else {
        None
    };

    let metadata_converged = if cfg.metadata_workload {
        tracing::info!("--- final metadata: every node's topics, via admin and Kafka Metadata");
        Some(metaload::final_views(&cluster, &history, Duration::from_secs(60)).await)
    } else {
        None
    };

    tracing::info!("--- compare replica logs up to the high watermark");
    let mut comparisons = Vec::new();
    let mut undrained = BTreeMap::new();
    for p in 0..cfg.partitions {
        let hw = settle_partition(&cluster, p).await.unwrap_or(-1);
        let dirs: Vec<(u32, PathBuf)> = {
            let c = cluster.lock().await;
            c.nodes
                .values()
                .flat_map(|n| {
                    logcmp::partition_dirs(&n.data_dir.join("partitions"), TOPIC, p)
                        .into_iter()
                        .map(|d| (n.id, d))
                })
                .collect()
        };
        let drained = drain.iter().any(|(dp, dhw, reached, err)| {
            *dp == p && err.is_none() && *dhw >= 0 && reached >= dhw
        });
        if !drained {
            // What is left of the partition is what its replicas hold on disk.
            let end = dirs
                .iter()
                .filter_map(|(_, d)| logcmp::read_replica(d, i64::MAX).ok())
                .map(|r| r.end_offset)
                .max()
                .unwrap_or(0);
            undrained.insert(p, end);
            notes.push(format!(
                "partition {p}: the final drain could not read it; its replicas' logs end at offset {end} at most"
            ));
        }
        if hw < 0 {
            comparisons.push(Comparison {
                partition: p,
                high_watermark: hw,
                identical: false,
                replicas: Vec::new(),
                problem: Some("no node reported a high watermark".into()),
            });
            continue;
        }
        let mut cmp = logcmp::compare(p, hw, &dirs);
        // Every replica must be found: a comparison of fewer (or none) proves nothing.
        let rf = cfg.nodes.min(3) as usize;
        if dirs.len() != rf && cmp.problem.is_none() {
            cmp.identical = false;
            cmp.problem = Some(format!(
                "expected {rf} replica directories, found {}: {dirs:?}",
                dirs.len()
            ));
        }
        comparisons.push(cmp);
    }
    cluster.lock().await.kill_all_processes();

    let check = checker::check_with(&history.ops(), &undrained);
    let outcome = RunOutcome {
        check,
        comparisons,
        drain,
        nemesis: nemesis_log,
        setup_error: None,
        notes,
        group_final,
        metadata_converged,
    };
    write_outputs(&cfg, &outcome, &history, started.elapsed())?;
    Ok(outcome)
}

/// The command line that replays this run's schedule.
pub fn replay_command(cfg: &RunCfg) -> String {
    let nemeses = if cfg.nemeses.len() == nemesis::ALL.len() {
        "all".to_string()
    } else if cfg.nemeses.is_empty() {
        "none".to_string()
    } else {
        cfg.nemeses
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "SEED={} cluster-tests run --duration-secs {} --nodes {} --nemesis {nemeses} \
         --partitions {} --producers {} --producer {} --consumers {} --group-members {} --inflight {} --quiet-secs {}-{} --hold-secs {}-{}{} --out DIR",
        cfg.seed,
        cfg.duration.as_secs(),
        cfg.nodes,
        cfg.partitions,
        cfg.producers,
        cfg.producer_mode.name(),
        cfg.consumers,
        cfg.group_members,
        cfg.inflight,
        cfg.quiet_secs.0,
        cfg.quiet_secs.1,
        cfg.hold_secs.0,
        cfg.hold_secs.1,
        if cfg.metadata_workload {
            ""
        } else {
            " --no-metadata-workload"
        }
    )
}

pub fn summary_json(cfg: &RunCfg, o: &RunOutcome, elapsed: Duration) -> Value {
    json!({
        "seed": cfg.seed,
        "replay": replay_command(cfg),
        "safe": o.safe(),
        "elapsed_secs": elapsed.as_secs_f64(),
        "setup_error": o.setup_error,
        "anomaly_counts": o.check.anomaly_counts,
        "anomaly_examples": o.check.examples,
        "producer_mode": cfg.producer_mode.name(),
        "ops": { "send": o.check.send, "poll": o.check.poll },
        "send_by_producer": o.check.send_by_producer,
        "duplicates_by_producer": o.check.duplicates_by_producer,
        "idempotent": o.check.idempotent,
        "values_read": o.check.values_read,
        "acked_by_partition": o.check.acked_by_partition,
        "max_read_offset": o.check.max_read_offset,
        "info_writes_read": o.check.info_writes_read,
        "info_writes_unread": o.check.info_writes_unread,
        "longest_ack_gap_secs": o.check.longest_ack_gap,
        "longest_ack_gap_by_partition": o.check.longest_ack_gap_by_partition,
        "faults_by_kind": o.nemesis.by_kind,
        "power_loss": {"node_losses": o.nemesis.power_loss_nodes, "effects": o.nemesis.power_loss},
        "disk_faults": o.nemesis.disk,
        "metadata_ops": o.check.metadata_ops,
        "consumer_group": o.check.group,
        "metadata_converged": o.metadata_converged,
        "unexpected_exits": o.nemesis.unexpected_exits,
        "drain": o.drain.iter().map(|(p, hw, reached, err)| json!({
            "partition": p, "high_watermark": hw, "reached": reached, "error": err})).collect::<Vec<_>>(),
        "replicas": o.comparisons,
        "notes": o.notes,
    })
}

pub fn report_text(cfg: &RunCfg, o: &RunOutcome, elapsed: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "cluster-tests run — seed {}", cfg.seed);
    let _ = writeln!(
        s,
        "verdict: {}",
        if o.safe() {
            "SAFE (no anomaly found)"
        } else {
            "UNSAFE or incomplete (see below)"
        }
    );
    let _ = writeln!(s, "elapsed: {:.1}s", elapsed.as_secs_f64());
    let _ = writeln!(s, "replay: {}", replay_command(cfg));
    if let Some(e) = &o.setup_error {
        let _ = writeln!(s, "\nSETUP FAILED: {e}");
    }
    let _ = writeln!(s, "\n== setup");
    for n in &o.notes {
        let _ = writeln!(s, "  {n}");
    }
    let _ = writeln!(s, "\n== faults injected");
    for (k, n) in &o.nemesis.by_kind {
        let _ = writeln!(s, "  {k:<20} {n}");
    }
    for (id, st) in &o.nemesis.unexpected_exits {
        let _ = writeln!(s, "  !! node {id} exited on its own: {st}");
    }
    if o.nemesis.power_loss_nodes > 0 {
        let _ = writeln!(
            s,
            "  power loss: {} node power losses; {}",
            o.nemesis.power_loss_nodes,
            o.nemesis.power_loss.summary()
        );
    }
    let d = &o.nemesis.disk;
    if o.nemesis.by_kind.contains_key("disk-fault") {
        let _ = writeln!(
            s,
            "  disk faults: {} writes and {} fsyncs failed on purpose; {} stopped replicas reopened by their node; \
             {} heals left a replica stopped (a failure); {} nodes restarted at a heal",
            d.injected_writes, d.injected_fsyncs, d.recovered_replicas, d.unrecovered_heals, d.restarts_after_heal
        );
    }
    let _ = writeln!(s, "\n== timeline");
    for e in &o.nemesis.events {
        let _ = writeln!(s, "  {e}");
    }
    let c = &o.check;
    let _ = writeln!(s, "\n== operations");
    let _ = writeln!(
        s,
        "  send: {} ok, {} fail, {} info (unknown)",
        c.send.ok, c.send.fail, c.send.info
    );
    for (k, n) in &c.send_by_producer {
        let _ = writeln!(
            s,
            "    {k} producers: {} ok, {} fail, {} info (unknown)",
            n.ok, n.fail, n.info
        );
    }
    if c.send_by_producer
        .contains_key(ProducerKind::Idempotent.name())
    {
        let i = &c.idempotent;
        let _ = writeln!(
            s,
            "  idempotent resends: {} values sent more than once ({} resends), {} acknowledged after a resend; \
             {} producer ids, {} epoch bumps",
            i.resent_values, i.resends, i.acked_after_resend, i.new_ids, i.epoch_bumps
        );
    }
    let _ = writeln!(
        s,
        "  values stored twice (duplicates): {}{}",
        c.anomaly_counts.get("duplicates").copied().unwrap_or(0),
        if c.duplicates_by_producer.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                c.duplicates_by_producer
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let _ = writeln!(
        s,
        "  poll: {} ok, {} fail, {} info",
        c.poll.ok, c.poll.fail, c.poll.info
    );
    let _ = writeln!(
        s,
        "  distinct values read: {}; unknown-outcome writes read: {}, never read: {}",
        c.values_read, c.info_writes_read, c.info_writes_unread
    );
    if let Some((gap, from, to)) = c.longest_ack_gap {
        let _ = writeln!(
            s,
            "  longest stretch without an acknowledged write: {gap:.1}s ({from:.1}s .. {to:.1}s)"
        );
    }
    for (p, n) in &c.acked_by_partition {
        let gap = c
            .longest_ack_gap_by_partition
            .get(p)
            .map(|(g, a, b)| format!(", longest gap between acks {g:.1}s ({a:.1}s .. {b:.1}s)"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  partition {p}: {n} acked, highest offset read {}{gap}",
            c.max_read_offset.get(p).copied().unwrap_or(-1)
        );
    }
    if let Some(g) = &c.group {
        let _ = writeln!(s, "\n== consumer group ({})", groupload::GROUP);
        let _ = writeln!(
            s,
            "  joins: {} ok, {} failed or unanswered; {} generations joined (highest {}): {} rebalances",
            g.joins.ok,
            g.joins.fail + g.joins.info,
            g.generations,
            g.max_generation,
            g.generations.saturating_sub(1)
        );
        let _ = writeln!(
            s,
            "  member ids retired (restarts): {} after LeaveGroup, {} LeaveGroup unanswered, {} crashed (no LeaveGroup)",
            g.retired.ok, g.retired.fail, g.retired.info
        );
        let _ = writeln!(
            s,
            "  consumed: {} records, {} distinct offsets, {} offsets consumed more than once (at-least-once, not an anomaly)",
            g.consumed_records, g.consumed_offsets, g.consumed_more_than_once
        );
        let _ = writeln!(
            s,
            "  commits: {} ok, {} refused, {} unknown; OffsetFetch samples: {} ok, {} unanswered",
            g.commits.ok,
            g.commits.fail,
            g.commits.info,
            g.offset_fetches.ok,
            g.offset_fetches.fail + g.offset_fetches.info
        );
        let _ = writeln!(
            s,
            "  final committed offsets: {:?}; acknowledged writes below them: {} (every one consumed, else commit_skipped), above: {}",
            g.final_committed, g.acked_below_committed, g.acked_above_committed
        );
    }
    if !c.metadata_ops.is_empty() {
        let _ = writeln!(s, "\n== metadata workload");
        for (k, n) in &c.metadata_ops {
            let _ = writeln!(s, "  {k:<18} {} ok, {} fail, {} info", n.ok, n.fail, n.info);
        }
        if let Some(conv) = o.metadata_converged {
            let _ = writeln!(
                s,
                "  final views (admin and Kafka Metadata, every node): {}",
                if conv {
                    "identical"
                } else {
                    "DIFFER (see metadata_divergence)"
                }
            );
        }
    }
    let _ = writeln!(s, "\n== final drain");
    for (p, hw, reached, err) in &o.drain {
        let _ = writeln!(
            s,
            "  partition {p}: high watermark {hw}, read up to {reached}{}",
            err.as_ref().map(|e| format!(" — {e}")).unwrap_or_default()
        );
    }
    let _ = writeln!(
        s,
        "\n== replica logs (byte-for-byte up to the high watermark)"
    );
    for cmp in &o.comparisons {
        let _ = writeln!(
            s,
            "  partition {}: hw {} — {} {:?}",
            cmp.partition,
            cmp.high_watermark,
            if cmp.identical {
                "identical".to_string()
            } else {
                format!("MISMATCH: {}", cmp.problem.clone().unwrap_or_default())
            },
            cmp.replicas
        );
    }
    let _ = writeln!(s, "\n== anomalies");
    for (k, n) in &c.anomaly_counts {
        let _ = writeln!(s, "  {k:<22} {n}");
        if *n > 0 {
            for ex in c.examples.get(k).into_iter().flatten() {
                let _ = writeln!(s, "      e.g. {ex}");
            }
        }
    }
    s
}

fn write_outputs(cfg: &RunCfg, o: &RunOutcome, history: &History, elapsed: Duration) -> Result<()> {
    history.flush();
    let summary = summary_json(cfg, o, elapsed);
    std::fs::write(
        cfg.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    std::fs::write(cfg.out.join("report.txt"), report_text(cfg, o, elapsed))?;
    Ok(())
}

/// Re-checks a history file (no processes): `cluster-tests check DIR/history.jsonl`.
pub fn check_file(path: &Path) -> Result<CheckResult> {
    let ops = crate::history::load(path)?;
    Ok(checker::check(&ops))
}

/// Faults by kind, for tests.
pub fn faults(o: &RunOutcome) -> BTreeMap<String, usize> {
    o.nemesis.by_kind.clone()
}
