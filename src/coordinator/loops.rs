//! The coordinator's two loops: one proposes queued group operations, many per Raft entry (so
//! thousands of offset commits a second cost a few metadata entries); one takes over as
//! coordinator when this node becomes metadata leader and runs the timers (rebalances that are
//! due, sessions that expired, offsets that expired), acting only by proposing operations.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::broker::{Broker, BrokerError, QueuedConsumerGroupOp};
use crate::controller::consumer_groups::{ConsumerGroupOp, ConsumerGroupState};
use crate::controller::{Command, Reply};

/// Operations proposed in one metadata entry at most, by count and by (estimated) size: an entry
/// must stay far below what one Raft append may carry.
const MAX_BATCH: usize = 2_000;
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Proposes queued operations: whatever queued while the previous proposal was in flight goes
/// into the next one, each with its own reply.
pub async fn proposal_loop(broker: Arc<Broker>) {
    let Some(mut queue) = broker.consumer_groups.take_queue() else {
        warn!("consumer group proposal loop started twice");
        return;
    };
    let mut carried: Option<QueuedConsumerGroupOp> = None;
    loop {
        let first = match carried.take() {
            Some(op) => op,
            None => match queue.recv().await {
                Some(op) => op,
                None => return,
            },
        };
        let mut bytes = first.0.approx_bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => {
                    bytes += op.0.approx_bytes();
                    if bytes > MAX_BATCH_BYTES {
                        carried = Some(op);
                        break;
                    }
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        let (ops, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = ops.len();
        // Membership changed: a rebalance may now be due.
        let wake = ops.iter().any(|op| {
            matches!(
                op,
                ConsumerGroupOp::Join { .. }
                    | ConsumerGroupOp::Leave { .. }
                    | ConsumerGroupOp::Sync { .. }
                    | ConsumerGroupOp::Expire { .. }
            )
        });
        broker.metrics.group_ops_proposed(n);
        let proposed = broker.propose(&Command::ConsumerGroups { ops }).await;
        broker.consumer_groups.answered(n);
        if wake {
            broker.consumer_groups.wake.notify_one();
        }
        match proposed {
            Ok(Reply::Groups(results)) if results.len() == n => {
                for (tx, r) in replies.into_iter().zip(results) {
                    let _ = tx.send(Ok(r));
                }
            }
            Ok(other) => {
                let why = format!("unexpected reply to consumer group operations: {other:?}");
                for tx in replies {
                    let _ = tx.send(Err(BrokerError::Other(why.clone())));
                }
            }
            Err(e) => {
                let why = e.to_string();
                for tx in replies {
                    let _ = tx.send(Err(BrokerError::Other(why.clone())));
                }
            }
        }
    }
}

/// How often a coordinator looks at its groups when nothing wakes it: it must notice lost
/// leadership and members' sessions expiring; the scan is a walk over the groups' members.
const TICK: Duration = Duration::from_secs(1);

/// Takes over as coordinator whenever this node leads the metadata group, then runs the timers.
pub async fn timer_loop(broker: Arc<Broker>) {
    let runtime = &broker.consumer_groups;
    let mut last_offset_expiry = Instant::now();
    loop {
        let Some(term) = broker.raft.meta().leader_term() else {
            runtime.loaded_term.store(0, Ordering::Release);
            broker
                .raft
                .meta()
                .leadership_changed(None, Duration::from_secs(60))
                .await;
            continue;
        };
        if runtime.loaded_term.load(Ordering::Acquire) != term {
            // An empty proposal of our own term: once applied, every entry committed before it
            // is applied here too, so no group or offset is read from behind.
            match broker
                .propose(&Command::ConsumerGroups { ops: Vec::new() })
                .await
            {
                Ok(_) => {
                    // Sessions restart on the new coordinator, as in Kafka.
                    runtime
                        .deadlines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    runtime
                        .pending_members
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    runtime.loaded_term.store(term, Ordering::Release);
                    let groups = broker.state().consumer_groups.len();
                    info!(term, groups, "took over as consumer group coordinator");
                }
                Err(e) => {
                    debug!(error = %e, "coordinator takeover proposal failed");
                    wait(&broker, Duration::from_millis(200)).await;
                }
            }
            continue;
        }
        let (mut ops, next) = due_operations(&broker);
        let interval = Duration::from_millis(broker.cfg.offsets_retention_check_interval_ms);
        if last_offset_expiry.elapsed() >= interval {
            last_offset_expiry = Instant::now();
            ops.push(ConsumerGroupOp::ExpireOffsets {
                now_ms: crate::clock::now_ms(),
                retention_ms: broker.cfg.offsets_retention_ms,
            });
        }
        if !ops.is_empty() {
            let submitted = ops
                .into_iter()
                .map(|op| runtime.submit(op))
                .collect::<Vec<_>>();
            let mut failed = false;
            for r in futures::future::join_all(submitted).await {
                if let Err(e) = r {
                    debug!(error = %e, "coordinator timer proposal failed");
                    failed = true;
                }
            }
            if failed {
                wait(&broker, Duration::from_millis(200)).await;
            }
            continue;
        }
        wait(&broker, next.min(TICK)).await;
    }
}

async fn wait(broker: &Broker, d: Duration) {
    let _ = tokio::time::timeout(d, broker.consumer_groups.wake.notified()).await;
}

/// Operations the timers call for now, and how long until the next one may be due.
fn due_operations(broker: &Broker) -> (Vec<ConsumerGroupOp>, Duration) {
    let now = Instant::now();
    let now_ms = crate::clock::now_ms();
    let mut ops = Vec::new();
    let mut next = TICK;
    let st = broker.state();
    let runtime = &broker.consumer_groups;
    let mut deadlines = runtime.deadlines.lock().unwrap_or_else(|p| p.into_inner());
    deadlines.retain(|(g, m), _| {
        st.consumer_groups
            .get(g)
            .is_some_and(|g| g.members.contains_key(m))
    });
    for (name, g) in &st.consumer_groups {
        if g.state == ConsumerGroupState::PreparingRebalance {
            let everyone = g.members.values().all(|m| m.joined);
            let due_ms = if everyone {
                g.initial_delay_until_ms
            } else {
                g.rebalance_deadline_ms
            };
            if now_ms >= due_ms {
                ops.push(ConsumerGroupOp::CompleteJoin {
                    group: name.clone(),
                    generation: g.generation,
                    now_ms,
                });
            } else {
                next = next.min(Duration::from_millis((due_ms - now_ms) as u64));
            }
        }
        for m in g.members.values() {
            let session = Duration::from_millis(m.session_timeout_ms.max(0) as u64);
            let key = (name.clone(), m.member_id.clone());
            if g.state == ConsumerGroupState::PreparingRebalance && m.joined {
                // Its JoinGroup waits for the rebalance; the session restarts when answered.
                deadlines.insert(key, now + session);
                continue;
            }
            let deadline = *deadlines.entry(key).or_insert(now + session);
            if now >= deadline {
                info!(group = %name, member = %m.member_id, "consumer session expired");
                ops.push(ConsumerGroupOp::Expire {
                    group: name.clone(),
                    member_id: m.member_id.clone(),
                    now_ms,
                });
            } else {
                next = next.min(deadline - now);
            }
        }
    }
    runtime
        .pending_members
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|_, lapses| *lapses > now);
    (ops, next)
}
