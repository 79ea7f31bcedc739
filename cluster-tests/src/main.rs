//! `cluster-tests run ...` — one chaos run; `cluster-tests check FILE` — re-check a history.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cluster_tests::{nemesis, run};

#[derive(Parser)]
#[command(about = "Chaos tests for Sluice against real processes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster, run the workload under faults, check the history.
    Run {
        #[arg(long = "duration-secs", default_value_t = 60)]
        duration_secs: u64,
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// RNG seed for the fault schedule and workload; also read from $SEED.
        #[arg(long, env = "SEED")]
        seed: Option<u64>,
        /// `all`, `none`, or a comma-separated list of nemesis names.
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// Output directory (history.jsonl, summary.json, report.txt, nodes/).
        #[arg(long, default_value = "cluster-tests-out")]
        out: PathBuf,
        #[arg(long, default_value_t = 2)]
        partitions: i32,
        #[arg(long, default_value_t = 4)]
        producers: usize,
        /// plain: no producer id, unknown outcomes never retried; idempotent: producer id, epoch
        /// and sequence on every batch, unknown outcomes resent until answered; mixed: half each.
        #[arg(long, value_enum, default_value = "mixed")]
        producer: run::ProducerMode,
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        /// Members of the consumer group that shares the topic's partitions and commits
        /// offsets (with an observer sampling them); 0, or --no-consumer-group, runs none.
        #[arg(long = "group-members", default_value_t = 3)]
        group_members: usize,
        #[arg(long = "no-consumer-group")]
        no_consumer_group: bool,
        /// Produce requests each producer pipelines (one record each); idempotent producers
        /// pipeline at most 5, Kafka's limit for idempotence.
        #[arg(long, default_value_t = 4)]
        inflight: usize,
        /// Healthy time between faults, seconds, as MIN-MAX.
        #[arg(long = "quiet-secs", default_value = "3-8", value_parser = parse_range)]
        quiet_secs: (u64, u64),
        /// How long each fault is held, seconds, as MIN-MAX.
        #[arg(long = "hold-secs", default_value = "4-10", value_parser = parse_range)]
        hold_secs: (u64, u64),
        /// Do not run the metadata workload (topics created, grown and deleted).
        #[arg(long = "no-metadata-workload")]
        no_metadata_workload: bool,
    },
    /// Re-run the checker over a history file.
    Check { history: PathBuf },
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("bad number in '{s}'"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("bad number in '{s}'"))?;
    if a > b {
        return Err(format!("'{s}': MIN is above MAX"));
    }
    Ok((a, b))
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Check { history } => match run::check_file(&history) {
            Ok(r) => {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                if r.valid {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(2)
            }
        },
        Cmd::Run {
            duration_secs,
            nodes,
            seed,
            nemesis: spec,
            out,
            partitions,
            producers,
            producer,
            consumers,
            group_members,
            no_consumer_group,
            inflight,
            quiet_secs,
            hold_secs,
            no_metadata_workload,
        } => {
            let kinds = match nemesis::parse(&spec) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return std::process::ExitCode::from(2);
                }
            };
            let seed = seed.unwrap_or_else(run::random_seed);
            println!("seed {seed}  (replay: SEED={seed} cluster-tests run ...)");
            let mut cfg = run::RunCfg::new(out.clone(), seed);
            cfg.duration = Duration::from_secs(duration_secs);
            cfg.nodes = nodes;
            cfg.nemeses = kinds;
            cfg.partitions = partitions.max(1);
            cfg.producers = producers;
            cfg.consumers = consumers;
            cfg.group_members = if no_consumer_group { 0 } else { group_members };
            cfg.producer_mode = producer;
            cfg.inflight = inflight.clamp(1, 64);
            cfg.quiet_secs = quiet_secs;
            cfg.hold_secs = hold_secs;
            cfg.metadata_workload = !no_metadata_workload;
            match rt.block_on(run::run(cfg)) {
                Ok(o) => {
                    let report = out.join("report.txt");
                    if let Ok(t) = std::fs::read_to_string(&report) {
                        println!("{t}");
                    }
                    println!("seed {seed}; report in {}", report.display());
                    if o.safe() {
                        std::process::ExitCode::SUCCESS
                    } else {
                        std::process::ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::from(2)
                }
            }
        }
    }
}
