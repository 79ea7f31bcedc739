//! Fault injection: a schedule of faults drawn from a seeded RNG, applied to a [`Cluster`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::Mutex;

use crate::cluster::{Cluster, NodeId};
use crate::history::{History, Op, OpType, F};
use crate::powerloss::LossStats;
use crate::proxy::{Flow, LinkMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Cut one random node off from all others (Raft links; clients still reach it).
    Isolate,
    /// Random majority / minority split.
    Split,
    /// Isolate the leader of a random partition.
    IsolateLeader,
    /// Isolate the controller (metadata group leader).
    IsolateController,
    /// A-B cut, both still see C.
    Bridge,
    /// Drop traffic from A to B only.
    OneWay,
    /// kill -9 a partition leader, restart it at heal.
    KillLeader,
    /// kill -9 every node, restart them all.
    KillAll,
    /// SIGSTOP a partition leader, SIGCONT at heal.
    PauseLeader,
    /// Clients cannot reach a partition leader (blackhole) while Raft still works.
    ClientBlackhole,
    /// 50-300 ms of latency on every Raft link.
    Delay,
    /// kill -9 the controller, restart it at heal.
    KillController,
    /// SIGSTOP the controller, SIGCONT at heal.
    PauseController,
    /// kill -9 a partition leader (one time in four: every node), then throw away or tear what
    /// it had not fsynced (see `powerloss.rs`); restart at heal.
    PowerLoss,
    /// A node's storage fails writes and/or fsyncs with EIO or ENOSPC until the heal.
    DiskFault,
}

pub const ALL: &[Kind] = &[
    Kind::Isolate,
    Kind::Split,
    Kind::IsolateLeader,
    Kind::IsolateController,
    Kind::Bridge,
    Kind::OneWay,
    Kind::KillLeader,
    Kind::KillAll,
    Kind::PauseLeader,
    Kind::ClientBlackhole,
    Kind::Delay,
    Kind::KillController,
    Kind::PauseController,
    Kind::PowerLoss,
    Kind::DiskFault,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Isolate => "isolate",
            Kind::Split => "split",
            Kind::IsolateLeader => "isolate-leader",
            Kind::IsolateController => "isolate-controller",
            Kind::Bridge => "bridge",
            Kind::OneWay => "one-way",
            Kind::KillLeader => "kill-leader",
            Kind::KillAll => "kill-all",
            Kind::PauseLeader => "pause-leader",
            Kind::ClientBlackhole => "client-blackhole",
            Kind::Delay => "delay",
            Kind::KillController => "kill-controller",
            Kind::PauseController => "pause-controller",
            Kind::PowerLoss => "power-loss",
            Kind::DiskFault => "disk-fault",
        }
    }
}

/// Parses `all` or a comma-separated list of names.
pub fn parse(spec: &str) -> Result<Vec<Kind>> {
    if spec.trim() == "all" {
        return Ok(ALL.to_vec());
    }
    if spec.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match ALL.iter().find(|k| k.name() == name) {
            Some(k) => out.push(*k),
            None => bail!(
                "unknown nemesis '{name}'; known: all, none, {}",
                ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(out)
}

/// How to undo a fault.
#[derive(Debug, Clone)]
enum Undo {
    Network,
    Restart(Vec<NodeId>),
    Resume(NodeId),
    /// Clear node's storage faults and wait for its stopped replicas to come back (see
    /// [`heal_disk`]). With the node's injected-error counters when the fault was set.
    HealDisk(NodeId, u64, u64),
}

pub struct NemesisCfg {
    pub kinds: Vec<Kind>,
    pub topic: String,
    pub partitions: i32,
    /// Healthy time between faults, seconds (min, max).
    pub quiet_secs: (u64, u64),
    /// How long a fault is held, seconds (min, max).
    pub hold_secs: (u64, u64),
}

/// Faults injected, by kind, plus notes (unexpected node exits etc.).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NemesisLog {
    pub by_kind: BTreeMap<String, usize>,
    pub events: Vec<String>,
    /// Nodes that exited without the harness killing them: (node, exit status).
    pub unexpected_exits: Vec<(NodeId, String)>,
    /// What the power losses did to unsynced data, summed over nodes and faults.
    pub power_loss: LossStats,
    /// Node power losses (a power loss of every node counts once per node).
    pub power_loss_nodes: usize,
    pub disk: DiskFaultLog,
}

/// Injected storage errors and what healing them took.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DiskFaultLog {
    /// Calls the nodes' fault layers failed on purpose (summed at each heal).
    pub injected_writes: u64,
    pub injected_fsyncs: u64,
    /// Replicas stopped by injected errors that the node reopened by itself after the heal.
    pub recovered_replicas: usize,
    /// Heals after which some replica was still stopped [`RECOVER_AFTER_HEAL`] later: the run
    /// fails, because a node must recover from a healed disk without a restart.
    pub unrecovered_heals: usize,
    /// Nodes restarted (kill -9 + start) at a heal: unrecovered heals, and heals whose fault
    /// switch did not answer.
    pub restarts_after_heal: usize,
}

async fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100).min(end - tokio::time::Instant::now())).await;
    }
}

fn note(history: &History, log: &mut NemesisLog, kind: OpType, text: String) {
    tracing::info!("nemesis: {text}");
    let mut op = Op::new(-1, kind, F::Nemesis, -1);
    op.fault = Some(text.clone());
    let op = history.record(op);
    log.events
        .push(format!("{:>8.3}s {text}", op.time as f64 / 1e9));
}

/// Runs faults until `stop`; always leaves the cluster healed (network passing, nodes resumed
/// and running).
pub async fn run(
    cluster: Arc<Mutex<Cluster>>,
    cfg: NemesisCfg,
    mut rng: StdRng,
    history: History,
    stop: Arc<AtomicBool>,
) -> NemesisLog {
    let mut log = NemesisLog::default();
    if cfg.kinds.is_empty() {
        return log;
    }
    // Faults are dealt from a shuffled deck of every selected kind, refilled when empty, so a run
    // long enough for one pass (about 12 s a fault) injects every kind at least once.
    let mut deck: Vec<Kind> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let quiet = rng.gen_range(cfg.quiet_secs.0..=cfg.quiet_secs.1);
        sleep_unless(&stop, Duration::from_secs(quiet)).await;
        check_exits(&cluster, &history, &mut log).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if deck.is_empty() {
            deck = cfg.kinds.clone();
            deck.shuffle(&mut rng);
        }
        let kind = deck.pop().unwrap_or(Kind::Isolate);
        let hold = rng.gen_range(cfg.hold_secs.0..=cfg.hold_secs.1);
        let part = rng.gen_range(0..cfg.partitions.max(1));
        // Draw every random choice up front so a seed always consumes the RNG the same way.
        let pick: u64 = rng.gen();
        let undo = match apply(&cluster, kind, &cfg.topic, part, pick, &mut log).await {
            Ok((undo, text)) => {
                *log.by_kind.entry(kind.name().to_string()).or_default() += 1;
                note(&history, &mut log, OpType::Invoke, text);
                undo
            }
            Err(e) => {
                note(
                    &history,
                    &mut log,
                    OpType::Fail,
                    format!("{} not applied: {e:#}", kind.name()),
                );
                continue;
            }
        };
        // Holds are not cut short by `stop`: a fault always runs its course, then heals.
        tokio::time::sleep(Duration::from_secs(hold)).await;
        let text = undo_fault(&cluster, &undo, &mut log).await;
        note(&history, &mut log, OpType::Ok, text);
        check_exits(&cluster, &history, &mut log).await;
    }
    // Leave everything healed whatever happened.
    {
        let mut c = cluster.lock().await;
        c.heal_network();
        for id in c.ids() {
            if c.nodes[&id].paused {
                let _ = c.resume(id);
            }
            if !c.nodes[&id].running() {
                let _ = c.start(id);
            }
        }
    }
    // A disk fault's heal runs before we get here; this only guards against a heal that failed.
    // Rules live in the process, so a node that is still starting (its admin port not yet
    // open) has none, and failing to reach it is no news.
    {
        let c = cluster.lock().await;
        for id in c.ids() {
            if let Err(e) = c.set_storage_faults(id, serde_json::json!([])).await {
                tracing::debug!(
                    node = id,
                    "clearing storage faults at the final heal: {e:#}"
                );
            }
        }
    }
    note(
        &history,
        &mut log,
        OpType::Ok,
        "final heal: network passing, all nodes running".into(),
    );
    log
}

async fn check_exits(cluster: &Arc<Mutex<Cluster>>, history: &History, log: &mut NemesisLog) {
    let exited = cluster.lock().await.exited();
    for (id, status) in exited {
        note(
            history,
            log,
            OpType::Info,
            format!("node {id} exited on its own ({status}); restarting it"),
        );
        log.unexpected_exits.push((id, status));
        let _ = cluster.lock().await.start(id);
    }
}

async fn leader_or_random(c: &Cluster, topic: &str, part: i32, pick: u64) -> NodeId {
    if let Some(l) = c.partition_leader(topic, part).await {
        return l;
    }
    let ids = c.ids();
    ids[(pick as usize) % ids.len()]
}

async fn apply(
    cluster: &Arc<Mutex<Cluster>>,
    kind: Kind,
    topic: &str,
    part: i32,
    pick: u64,
    log: &mut NemesisLog,
) -> Result<(Undo, String)> {
    let mut c = cluster.lock().await;
    let ids = c.ids();
    let n = ids.len();
    let mut shuffled = ids.clone();
    shuffled.shuffle(&mut <StdRng as rand::SeedableRng>::seed_from_u64(pick));
    let others = |x: NodeId| ids.iter().copied().filter(|&y| y != x).collect::<Vec<_>>();
    Ok(match kind {
        Kind::Isolate => {
            let x = shuffled[0];
            c.partition(&[x], &others(x));
            (Undo::Network, format!("isolate n{x}"))
        }
        Kind::Split => {
            let minority = (n - 1) / 2;
            let minority = minority.max(1);
            let (a, b) = shuffled.split_at(minority);
            c.partition(a, b);
            (Undo::Network, format!("split {a:?} | {b:?}"))
        }
        Kind::IsolateLeader => {
            let x = leader_or_random(&c, topic, part, pick).await;
            c.partition(&[x], &others(x));
            (
                Undo::Network,
                format!("isolate n{x} (leader of partition {part})"),
            )
        }
        Kind::IsolateController => {
            let x = match c.controller().await {
                Some(x) => x,
                None => shuffled[0],
            };
            c.partition(&[x], &others(x));
            (Undo::Network, format!("isolate n{x} (controller)"))
        }
        Kind::Bridge => {
            if n < 3 {
                bail!("bridge needs 3 nodes");
            }
            let (a, b, mid) = (shuffled[0], shuffled[1], shuffled[2]);
            // With more than 3 nodes: the rest join sides alternately; `mid` sees everyone.
            let mut left = vec![a];
            let mut right = vec![b];
            for (i, x) in shuffled[3..].iter().enumerate() {
                if i % 2 == 0 {
                    left.push(*x)
                } else {
                    right.push(*x)
                }
            }
            c.partition(&left, &right);
            (
                Undo::Network,
                format!("bridge {left:?} x {right:?}, n{mid} sees both"),
            )
        }
        Kind::OneWay => {
            let (a, b) = (shuffled[0], shuffled[1]);
            c.set_one_way(a, b, Flow::Block);
            (Undo::Network, format!("one-way: drop n{a} -> n{b}"))
        }
        Kind::KillLeader => {
            let x = leader_or_random(&c, topic, part, pick).await;
            c.kill(x)?;
            (
                Undo::Restart(vec![x]),
                format!("kill -9 n{x} (leader of partition {part})"),
            )
        }
        Kind::KillAll => {
            c.kill_all_processes();
            (Undo::Restart(ids.clone()), "kill -9 all nodes".into())
        }
        Kind::PauseLeader => {
            let x = leader_or_random(&c, topic, part, pick).await;
            c.pause(x)?;
            (
                Undo::Resume(x),
                format!("SIGSTOP n{x} (leader of partition {part})"),
            )
        }
        Kind::ClientBlackhole => {
            let x = leader_or_random(&c, topic, part, pick).await;
            c.clients[&x].set(LinkMode::DROP);
            (
                Undo::Network,
                format!("blackhole clients -> n{x} (leader of partition {part})"),
            )
        }
        Kind::Delay => {
            let ms = 50 + pick % 251;
            c.set_all_links(LinkMode::delay(Duration::from_millis(ms)));
            (Undo::Network, format!("delay all Raft links by {ms} ms"))
        }
        Kind::KillController => {
            let x = match c.controller().await {
                Some(x) => x,
                None => shuffled[0],
            };
            c.kill(x)?;
            (Undo::Restart(vec![x]), format!("kill -9 n{x} (controller)"))
        }
        Kind::PauseController => {
            let x = match c.controller().await {
                Some(x) => x,
                None => shuffled[0],
            };
            c.pause(x)?;
            (Undo::Resume(x), format!("SIGSTOP n{x} (controller)"))
        }
        Kind::PowerLoss => {
            // The RNG for tearing is the fault's own, drawn from the schedule's seed.
            let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(pick ^ 0x0bad_cafe);
            let (targets, who) = if pick.is_multiple_of(4) {
                (ids.clone(), "every node".to_string())
            } else {
                let x = leader_or_random(&c, topic, part, pick).await;
                (vec![x], format!("n{x} (leader of partition {part})"))
            };
            for &x in &targets {
                c.kill(x)?;
            }
            let mut parts = Vec::new();
            for &x in &targets {
                let stats = crate::powerloss::apply(&c.nodes[&x].data_dir, &mut rng)
                    .with_context(|| format!("power loss on n{x}"))?;
                parts.push(format!("n{x}: {}", stats.summary()));
                log.power_loss.add(&stats);
                log.power_loss_nodes += 1;
            }
            (
                Undo::Restart(targets),
                format!(
                    "power loss on {who} (kill -9, unsynced data lost) — {}",
                    parts.join("; ")
                ),
            )
        }
        Kind::DiskFault => {
            let x = if pick.is_multiple_of(3) {
                shuffled[0]
            } else {
                leader_or_random(&c, topic, part, pick).await
            };
            let op = ["write", "fsync", "any"][((pick >> 8) % 3) as usize];
            let errno = ["eio", "enospc"][((pick >> 16) % 2) as usize];
            // Partition data only: the metadata group lives in sled, which the layer does not cover.
            let rules = serde_json::json!([{
                "op": op, "error": errno, "path_contains": "/partitions/"
            }]);
            let before = c.set_storage_faults(x, rules).await?;
            let count = |k: &str| before[k].as_u64().unwrap_or(0);
            (
                Undo::HealDisk(x, count("injected_writes"), count("injected_fsyncs")),
                format!(
                    "disk fault on n{x}: {op} fails with {} under partitions/",
                    errno.to_uppercase()
                ),
            )
        }
    })
}

async fn undo_fault(cluster: &Arc<Mutex<Cluster>>, undo: &Undo, log: &mut NemesisLog) -> String {
    let mut c = cluster.lock().await;
    match undo {
        Undo::HealDisk(id, w, f) => heal_disk(&mut c, *id, (*w, *f), &mut log.disk).await,
        Undo::Network => {
            c.heal_network();
            "heal network".into()
        }
        Undo::Restart(ids) => {
            let mut errs = Vec::new();
            for id in ids {
                if let Err(e) = c.start(*id) {
                    errs.push(format!("n{id}: {e:#}"));
                }
            }
            if errs.is_empty() {
                format!("restart {ids:?}")
            } else {
                format!("restart {ids:?} (errors: {})", errs.join("; "))
            }
        }
        Undo::Resume(id) => match c.resume(*id) {
            Ok(()) => format!("SIGCONT n{id}"),
            Err(e) => format!("SIGCONT n{id} failed: {e:#}"),
        },
    }
}

/// How long a healed node gets to reopen the replicas its storage errors stopped: it retries
/// every 3 s, and a follower then has to catch up.
const RECOVER_AFTER_HEAL: Duration = Duration::from_secs(20);

/// Clears node `id`'s storage faults, then waits for the node to reopen every replica the errors
/// stopped, by itself. One that is still down after [`RECOVER_AFTER_HEAL`] is a failure of the
/// run (counted in `unrecovered_heals`); the node is then restarted so the run can go on.
async fn heal_disk(
    c: &mut Cluster,
    id: NodeId,
    before: (u64, u64),
    log: &mut DiskFaultLog,
) -> String {
    let status = match c.set_storage_faults(id, serde_json::json!([])).await {
        Ok(s) => s,
        Err(e) => {
            // The node may be dead or paused; a restart clears the rules anyway (they live in memory).
            let _ = c.kill(id);
            let _ = c.start(id);
            log.restarts_after_heal += 1;
            return format!("heal disk n{id}: could not clear the faults ({e:#}); RESTARTED n{id}");
        }
    };
    // The counters count from the process start; the node ran throughout the fault (a node
    // that died meanwhile is caught above or by the exit check).
    let writes = status["injected_writes"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before.0);
    let fsyncs = status["injected_fsyncs"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before.1);
    log.injected_writes += writes;
    log.injected_fsyncs += fsyncs;
    let mut text =
        format!("heal disk n{id} ({writes} writes and {fsyncs} fsyncs failed on purpose)");
    let start = tokio::time::Instant::now();
    let mut first_seen: Option<Vec<String>> = None;
    let still = loop {
        let failed = match c.stopped_groups(id).await {
            Ok(s) => s,
            Err(e) => vec![format!("unknown: /v1/raft did not answer: {e:#}")],
        };
        if first_seen.is_none() {
            first_seen = Some(failed.clone());
        }
        if failed.is_empty() || start.elapsed() >= RECOVER_AFTER_HEAL {
            break failed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stopped_at_heal = first_seen.unwrap_or_default();
    if still.is_empty() {
        if !stopped_at_heal.is_empty() {
            log.recovered_replicas += stopped_at_heal.len();
            text.push_str(&format!(
                "; {} replica(s) stopped by the errors reopened by the node in {:.1}s",
                stopped_at_heal.len(),
                start.elapsed().as_secs_f64()
            ));
        }
        return text;
    }
    log.unrecovered_heals += 1;
    let restarted = c.kill(id).and_then(|()| c.start(id));
    log.restarts_after_heal += 1;
    text.push_str(&format!(
        "; !! {} replica(s) still stopped {}s after the heal ({}) -> RESTARTED n{id}{}",
        still.len(),
        RECOVER_AFTER_HEAL.as_secs(),
        still.join(", "),
        restarted
            .err()
            .map(|e| format!(" — restart failed: {e:#}"))
            .unwrap_or_default()
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(parse("all").unwrap().len(), ALL.len());
        assert_eq!(
            parse("kill-leader, bridge").unwrap(),
            vec![Kind::KillLeader, Kind::Bridge]
        );
        assert!(parse("none").unwrap().is_empty());
        assert!(parse("nope").is_err());
    }
}
