//! The consumer-group workload: members of one group (`ct-group`) share the workload topic's
//! partitions, each consuming the ones it is assigned and committing its position synchronously
//! after every fetch that returned records; an observer samples the group's committed offsets
//! throughout. When the producers stop, the group goes on until it has caught up with the high
//! watermarks ([`wait_caught_up`]); then one last OffsetFetch records where it ended.
//!
//! A member lives 15-45 s (seeded), then retires its member id and joins as a new member, as a
//! restarted consumer would: most leave the group first, some (30 %) simply vanish, as after a
//! crash, and the group waits out their session. Both start rebalances that move partitions
//! between members, which coordinator failovers alone do not (the group's state survives them).
//!
//! Members are `sluice::cli::group::ConsumerGroupMember`s (FindCoordinator, JoinGroup with
//! MEMBER_ID_REQUIRED, SyncGroup with the leader's range assignment, a heartbeat task,
//! OffsetCommit/OffsetFetch); their fetches go through [`KClient::poll`] like the standalone
//! consumers'. Everything is recorded (see [`crate::history`]) for the checker's group rules.
//!
//! Why every commit the workload sends is at or above every commit acknowledged before it (the
//! premise of the checker's `commit_backwards` rule): a member starts each assignment at the
//! committed offset it fetched after joining, only moves forward from there, and commits only
//! partitions of its current assignment as its current generation, so a member of an older
//! generation is fenced by the coordinator. One client-side hazard remains: a commit whose
//! answer never came may still be applied later (a blocked proxy link holds its bytes and
//! delivers them after the heal), after a newer commit of the same member. So after a commit
//! with an unknown outcome the member never commits again under that member id: it leaves (if
//! it can) and joins as a new member, and the rebalance that follows fences the stale request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice::cli::errors::KafkaError;
use sluice::cli::group::{ConsumerGroupClient, ConsumerGroupMember, MemberConfig, Tp};

use crate::history::{Op, OpType, F};
use crate::kclient::{KClient, Outcome};
use crate::workload::Shared;

/// The group's id.
pub const GROUP: &str = "ct-group";
/// What the observer's operations name as their member.
pub const OBSERVER: &str = "observer";

/// A member that stops heartbeating (its coordinator cut off, a lost connection) is expelled
/// after this and its partitions go to the others; 6 s is the broker's minimum.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the coordinator waits for members to rejoin before it drops the missing ones.
const REBALANCE_TIMEOUT: Duration = Duration::from_secs(10);
/// One join attempt (JoinGroup + SyncGroup, coordinator lookups and retries included).
const JOIN_BOUND: Duration = Duration::from_secs(30);
/// One commit or OffsetFetch, retries included. Shorter than the client connection's own
/// response timeout (40 s), so a request held by a blocked link is abandoned by us (and its
/// outcome recorded as unknown) rather than retried inside the client behind our back.
const CALL_BOUND: Duration = Duration::from_secs(8);
/// A LeaveGroup on the way out; best effort.
const LEAVE_BOUND: Duration = Duration::from_secs(3);
const OBSERVE_EVERY: Duration = Duration::from_millis(300);
const ERROR_PAUSE: Duration = Duration::from_millis(200);
/// Join failures in a row after which the member starts over with a new member id.
const JOIN_TRIES: u32 = 3;
/// How long one member id lives, seconds, and how often it ends in a crash (no LeaveGroup).
const LIFETIME_SECS: (u64, u64) = (15, 45);
const CRASH_CHANCE: f64 = 0.3;

fn member_config(topic: &str) -> MemberConfig {
    let mut cfg = MemberConfig::new(GROUP, &[topic]);
    cfg.session_timeout = SESSION_TIMEOUT;
    cfg.heartbeat_interval = HEARTBEAT_INTERVAL;
    cfg.rebalance_timeout = REBALANCE_TIMEOUT;
    cfg.join_timeout = JOIN_BOUND;
    cfg
}

/// The bootstrap list starting at a different node for each worker, so that one unreachable
/// node does not hold every worker's first connection attempt.
fn bootstrap_from(shared: &Shared, start: usize) -> String {
    let n = shared.bootstrap.len().max(1);
    (0..shared.bootstrap.len())
        .map(|i| shared.bootstrap[(start + i) % n].clone())
        .collect::<Vec<_>>()
        .join(",")
}

fn tps(topic: &str, parts: &[i32]) -> Vec<Tp> {
    parts.iter().map(|p| (topic.to_string(), *p)).collect()
}

/// Why a member id's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The workload stopped.
    Stopped,
    /// Its lifetime is over: a restart.
    Retired,
    /// It must not go on under this id (a commit with an unknown outcome, joins that fail).
    GaveUp,
}

/// How a commit ended, as the member must act on it.
enum Committed {
    Ok,
    /// The coordinator refused it (the generation is over, or another definite error).
    Refused,
    /// No answer: the request may still be applied later.
    Unknown,
}

/// One member of the group, `m{index}`, restarted with a new member id every so often while
/// the producers run; runs until the group is stopped, then leaves.
pub async fn member(shared: Arc<Shared>, seed: u64, index: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ (0xc2b2_ae35 * (index as u64 + 1)));
    let name = format!("m{index}");
    let topic = shared.topic.clone();
    let bootstrap = bootstrap_from(&shared, index);
    let mut kc = KClient::new(shared.bootstrap.clone(), &topic, index + 3);
    while !shared.group_stopped() {
        let lifetime = Duration::from_secs(rng.gen_range(LIFETIME_SECS.0..=LIFETIME_SECS.1));
        let crash = rng.gen_bool(CRASH_CHANCE);
        let connected = tokio::time::timeout(
            CALL_BOUND,
            ConsumerGroupMember::connect(&bootstrap, member_config(&topic)),
        )
        .await;
        let Ok(Ok(mut m)) = connected else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let retire_at = tokio::time::Instant::now() + lifetime;
        let end = run_member(&shared, &name, &topic, &mut m, &mut kc, retire_at).await;
        let process = shared.fresh_process();
        let leave = |kind| {
            Op::new(process, kind, F::GroupLeave, -1)
                .member(name.as_str())
                .generation(m.generation())
        };
        if end == End::Retired && crash {
            shared
                .history
                .record(leave(OpType::Info).error("crash: dropped without LeaveGroup"));
            continue;
        }
        // The others get our partitions now rather than after our session ends.
        let (ok, failed) = (leave(OpType::Ok), leave(OpType::Fail));
        match tokio::time::timeout(LEAVE_BOUND, m.leave()).await {
            Ok(Ok(())) => shared.history.record(ok),
            Ok(Err(e)) => shared.history.record(failed.error(format!("{e:#}"))),
            Err(_) => shared.history.record(failed.error("LeaveGroup timed out")),
        };
    }
}

/// Drives one member id until the workload stops, `retire_at`, or the member id must be given
/// up (a commit with an unknown outcome, or joins that keep failing).
async fn run_member(
    shared: &Shared,
    name: &str,
    topic: &str,
    m: &mut ConsumerGroupMember,
    kc: &mut KClient,
    retire_at: tokio::time::Instant,
) -> End {
    let mut join_failures = 0u32;
    let done = || {
        if shared.group_stopped() {
            Some(End::Stopped)
        } else if !shared.stopped() && tokio::time::Instant::now() >= retire_at {
            // No restarts once the producers stopped: the group is catching up.
            Some(End::Retired)
        } else {
            None
        }
    };
    'generation: loop {
        if let Some(end) = done() {
            return end;
        }
        let process = shared.fresh_process();
        shared
            .history
            .record(Op::new(process, OpType::Invoke, F::GroupJoin, -1).member(name));
        let assignment = match tokio::time::timeout(JOIN_BOUND, m.join()).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                shared.history.record(
                    Op::new(process, OpType::Info, F::GroupJoin, -1)
                        .member(name)
                        .error(format!("{e:#}")),
                );
                join_failures += 1;
                if join_failures >= JOIN_TRIES {
                    return End::GaveUp;
                }
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
            Err(_) => {
                shared.history.record(
                    Op::new(process, OpType::Info, F::GroupJoin, -1)
                        .member(name)
                        .error("join timed out"),
                );
                m.group.forget_coordinator();
                join_failures += 1;
                if join_failures >= JOIN_TRIES {
                    return End::GaveUp;
                }
                continue;
            }
        };
        join_failures = 0;
        let generation = m.generation();
        let parts = assignment.partitions_of(topic).to_vec();
        shared.history.record(
            Op::new(process, OpType::Ok, F::GroupJoin, -1)
                .member(name)
                .generation(generation)
                .assigned(parts.clone()),
        );
        if parts.is_empty() {
            // A spare member: it only heartbeats, and takes over when a rebalance gives it
            // partitions.
            loop {
                if let Some(end) = done() {
                    return end;
                }
                match m.poll().await {
                    Ok(false) => tokio::time::sleep(ERROR_PAUSE).await,
                    _ => continue 'generation,
                }
            }
        }

        // Start where the group's committed offsets say (0 where it has none).
        let mut position: BTreeMap<i32, i64> = BTreeMap::new();
        while position.is_empty() {
            if let Some(end) = done() {
                return end;
            }
            match fetch_committed(shared, &mut m.group, process, name, topic, &parts, false).await {
                Some(c) => {
                    position = parts
                        .iter()
                        .map(|p| (*p, c.get(p).copied().unwrap_or(-1).max(0)))
                        .collect();
                }
                None => match m.poll().await {
                    Ok(false) => tokio::time::sleep(ERROR_PAUSE).await,
                    _ => continue 'generation,
                },
            }
        }
        let mut committed = position.clone();
        // A poll session per partition (a fresh process after each error), as the standalone
        // consumers keep them, so the checker's per-session order checks apply.
        let mut session: BTreeMap<i32, i64> =
            parts.iter().map(|p| (*p, shared.fresh_process())).collect();
        loop {
            if let Some(end) = done() {
                return end;
            }
            match m.poll().await {
                Ok(false) => {}
                _ => continue 'generation,
            }
            for &p in &parts {
                let pos = position.get(&p).copied().unwrap_or(0);
                let sp = session.get(&p).copied().unwrap_or(process);
                shared.history.record(
                    Op::new(sp, OpType::Invoke, F::Poll, p)
                        .offset(pos)
                        .member(name),
                );
                match kc.poll(p, pos).await {
                    Outcome::Ok((pairs, next)) => {
                        let log_start = kc.last_log_start;
                        shared.history.record(
                            Op::new(sp, OpType::Ok, F::Poll, p)
                                .offset(pos)
                                .msgs(pairs)
                                .log_start(log_start)
                                .member(name),
                        );
                        position.insert(p, next.max(pos));
                    }
                    Outcome::Fail(e) | Outcome::Info(e) => {
                        shared.history.record(
                            Op::new(sp, OpType::Info, F::Poll, p)
                                .offset(pos)
                                .error(e)
                                .member(name),
                        );
                        session.insert(p, shared.fresh_process());
                        tokio::time::sleep(ERROR_PAUSE).await;
                        continue;
                    }
                }
                let to = position.get(&p).copied().unwrap_or(0);
                if committed.get(&p) == Some(&to) {
                    continue;
                }
                // Processed (recorded) first, then committed: at-least-once.
                match commit(shared, m, process, name, topic, generation, p, to).await {
                    Committed::Ok => {
                        committed.insert(p, to);
                    }
                    Committed::Refused => continue 'generation,
                    Committed::Unknown => return End::GaveUp,
                }
            }
        }
    }
}

/// One partition's OffsetCommit, recorded.
#[allow(clippy::too_many_arguments)]
async fn commit(
    shared: &Shared,
    m: &mut ConsumerGroupMember,
    process: i64,
    name: &str,
    topic: &str,
    generation: i32,
    p: i32,
    offset: i64,
) -> Committed {
    let op = |kind| {
        Op::new(process, kind, F::Commit, p)
            .offset(offset)
            .generation(generation)
            .member(name)
    };
    shared.history.record(op(OpType::Invoke));
    let offsets = BTreeMap::from([((topic.to_string(), p), offset)]);
    match tokio::time::timeout(CALL_BOUND, m.commit(&offsets)).await {
        Ok(Ok(())) => {
            shared.history.record(op(OpType::Ok));
            Committed::Ok
        }
        Ok(Err(e)) if e.downcast_ref::<KafkaError>().is_some() => {
            // The coordinator's final answer. (An earlier attempt inside the client, before a
            // broken connection, may still have been applied: the checker never relies on a
            // refused commit not having happened.)
            shared
                .history
                .record(op(OpType::Fail).error(format!("{e:#}")));
            Committed::Refused
        }
        Ok(Err(e)) => {
            shared
                .history
                .record(op(OpType::Info).error(format!("{e:#}")));
            Committed::Unknown
        }
        Err(_) => {
            m.group.forget_coordinator();
            shared
                .history
                .record(op(OpType::Info).error("commit timed out"));
            Committed::Unknown
        }
    }
}

/// The group's committed offsets of `parts`, recorded as one `offset_fetch` per partition;
/// None if the coordinator did not answer.
async fn fetch_committed(
    shared: &Shared,
    gc: &mut ConsumerGroupClient,
    process: i64,
    name: &str,
    topic: &str,
    parts: &[i32],
    last: bool,
) -> Option<BTreeMap<i32, i64>> {
    let op = |kind, p| {
        let o = Op::new(process, kind, F::OffsetFetch, p).member(name);
        if last {
            o.drain()
        } else {
            o
        }
    };
    for &p in parts {
        shared.history.record(op(OpType::Invoke, p));
    }
    let want = tps(topic, parts);
    let res = tokio::time::timeout(CALL_BOUND, gc.committed(Some(&want))).await;
    let got = match res {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => {
            for &p in parts {
                shared
                    .history
                    .record(op(OpType::Info, p).error(format!("{e:#}")));
            }
            return None;
        }
        Err(_) => {
            gc.forget_coordinator();
            for &p in parts {
                shared
                    .history
                    .record(op(OpType::Info, p).error("OffsetFetch timed out"));
            }
            return None;
        }
    };
    let mut out = BTreeMap::new();
    for &p in parts {
        let c = got.get(&(topic.to_string(), p)).copied().unwrap_or(-1);
        shared.history.record(op(OpType::Ok, p).offset(c));
        out.insert(p, c);
    }
    Some(out)
}

/// Samples the group's committed offsets of every partition until the group stops, so a
/// committed offset that goes backwards between two commits is seen.
pub async fn observer(shared: Arc<Shared>) {
    let topic = shared.topic.clone();
    let parts: Vec<i32> = (0..shared.partitions).collect();
    let bootstrap = bootstrap_from(&shared, 1);
    while !shared.group_stopped() {
        let Ok(Ok(mut gc)) =
            tokio::time::timeout(CALL_BOUND, ConsumerGroupClient::connect(&bootstrap, GROUP)).await
        else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        while !shared.group_stopped() {
            let process = shared.fresh_process();
            let ok = fetch_committed(&shared, &mut gc, process, OBSERVER, &topic, &parts, false)
                .await
                .is_some();
            tokio::time::sleep(if ok { OBSERVE_EVERY } else { ERROR_PAUSE }).await;
            if !ok {
                // A new client: the old one's bootstrap connection may be the broken part.
                break;
            }
        }
    }
}

/// Once the producers stopped and the final drain knows every partition's high watermark:
/// waits (unrecorded) until the group's committed offsets reach them, so that the final
/// OffsetFetch covers every acknowledged write. How long it took, or None if not by `deadline`.
pub async fn wait_caught_up(
    shared: Arc<Shared>,
    high_watermarks: &BTreeMap<i32, i64>,
    deadline: tokio::time::Instant,
) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    let want = tps(
        &shared.topic,
        &high_watermarks.keys().copied().collect::<Vec<_>>(),
    );
    let bootstrap = bootstrap_from(&shared, 2);
    let mut gc = None;
    while tokio::time::Instant::now() < deadline {
        if gc.is_none() {
            gc = tokio::time::timeout(CALL_BOUND, ConsumerGroupClient::connect(&bootstrap, GROUP))
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some(c) = gc.as_mut() {
            match tokio::time::timeout(CALL_BOUND, c.committed(Some(&want))).await {
                Ok(Ok(got)) => {
                    let behind = high_watermarks.iter().any(|(p, hw)| {
                        got.get(&(shared.topic.clone(), *p)).copied().unwrap_or(-1) < *hw
                    });
                    if !behind {
                        return Some(started.elapsed());
                    }
                }
                _ => gc = None,
            }
        }
        tokio::time::sleep(OBSERVE_EVERY).await;
    }
    None
}

/// After the members stopped and the cluster healed: the group's committed offsets, recorded
/// as `offset_fetch` operations with `drain` set. Retries until `deadline`; None if no answer.
pub async fn final_offsets(
    shared: Arc<Shared>,
    deadline: tokio::time::Instant,
) -> Option<BTreeMap<i32, i64>> {
    let topic = shared.topic.clone();
    let parts: Vec<i32> = (0..shared.partitions).collect();
    let bootstrap = bootstrap_from(&shared, 0);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(mut gc)) =
            tokio::time::timeout(CALL_BOUND, ConsumerGroupClient::connect(&bootstrap, GROUP)).await
        {
            let process = shared.fresh_process();
            if let Some(c) =
                fetch_committed(&shared, &mut gc, process, OBSERVER, &topic, &parts, true).await
            {
                return Some(c);
            }
        }
        tokio::time::sleep(ERROR_PAUSE).await;
    }
    None
}
