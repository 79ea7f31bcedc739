//! A short chaos run against a real 3-node cluster: ~90 s with a couple of nemeses, among them a
//! power loss (unsynced data thrown away), 4 produce requests in flight per producer, half the
//! producers idempotent (their unanswered batches resent across the leader kills and cut
//! connections, none of which may be stored twice), the metadata workload beside the data
//! workload, and a consumer group of three members committing offsets (never backwards, never
//! past data no member consumed).
//!
//! Skipped (passes immediately) unless `CT_SMOKE=1`, so plain `cargo test` stays fast. Needs
//! `target/release/sluice` (or `SLUICE_BIN`). `SEED=...` replays a schedule; output goes to
//! `$CT_OUT` or `target/cluster-tests/smoke-SEED/`.

use std::path::PathBuf;
use std::time::Duration;

use cluster_tests::nemesis::Kind;
use cluster_tests::run::{self, RunCfg};

#[test]
fn smoke_three_nodes_under_faults() {
    if std::env::var("CT_SMOKE").ok().as_deref() != Some("1") {
        eprintln!("skipping the cluster smoke test: set CT_SMOKE=1 to run it");
        return;
    }
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(run::random_seed);
    let out = std::env::var("CT_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/cluster-tests")
                .join(format!("smoke-{seed}"))
        });
    eprintln!("cluster smoke test: seed {seed}, output {}", out.display());
    let mut cfg = RunCfg::new(out.clone(), seed);
    cfg.duration = Duration::from_secs(70);
    cfg.nodes = 3;
    cfg.nemeses = vec![
        Kind::KillLeader,
        Kind::IsolateLeader,
        Kind::PauseLeader,
        Kind::PowerLoss,
    ];
    cfg.inflight = 4;
    cfg.producer_mode = run::ProducerMode::Mixed;
    cfg.metadata_workload = true;
    cfg.group_members = 3;
    cfg.quiet_secs = (3, 6);
    cfg.hold_secs = (4, 8);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let o = rt.block_on(run::run(cfg)).expect("run failed to start");
    let report = std::fs::read_to_string(out.join("report.txt")).unwrap_or_default();
    eprintln!("{report}");
    assert!(o.setup_error.is_none(), "setup failed: {:?}", o.setup_error);
    assert!(o.check.send.ok > 0, "no write was acknowledged");
    assert!(
        !run::faults(&o).is_empty(),
        "no fault was injected (run too short?)"
    );
    assert!(
        o.check.send_by_producer.contains_key("idempotent"),
        "no idempotent producer ran"
    );
    let group = o
        .check
        .group
        .as_ref()
        .expect("the consumer group did not run");
    assert!(group.commits.ok > 0, "the consumer group committed nothing");
    assert!(
        o.safe(),
        "safety anomalies (seed {seed}); see {}",
        out.join("report.txt").display()
    );
}
