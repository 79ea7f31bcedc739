//! Partition leadership as this node drives it: reporting the partitions it leads to the
//! controller, electing away from a fenced leader, handing leadership back to preferred
//! replicas, and handing it off before a controlled shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sluice_raft::PartitionGroup;
use tracing::info;

use crate::broker::{Broker, PartitionKey};
use crate::controller::{is_group_of, Command, LeaderUpdate};
use crate::rpc::{self, AppRequest};

/// Tells the controller which partitions this broker leads, whenever the recorded leader or epoch
/// is behind. Batched: one metadata command carries every change seen in a pass.
///
/// A pass runs only when something it reads may have changed: the controller state, or a local
/// group's leadership (the Raft host's change counter). A pass that leaves something pending (a
/// report to retry, or a leadership that is in doubt and may be reportable once the doubt clears)
/// is repeated every round regardless. Idle, that is no pass at all: scanning every replica four
/// times a second was one of the largest costs of an idle node.
pub async fn leader_report_loop(broker: Arc<Broker>) {
    let mut state_rx = broker.subscribe_state();
    // The local partition list too: a group can win its first election before it is listed, and
    // listing it bumps only this.
    let mut parts_rx = broker.partitions.subscribe();
    let mut last_seen: Option<(u64, u64, u64)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Read before the pass, so a change during it shows up as new next round.
        let seen = (
            *state_rx.borrow_and_update(),
            broker.raft.group_changes(),
            *parts_rx.borrow_and_update(),
        );
        if last_seen == Some(seen) {
            continue;
        }
        let mut in_doubt = false;
        let updates: Vec<LeaderUpdate> = {
            let st = broker.state();
            let parts = broker.partitions.all();
            parts
                .iter()
                // A deleted topic's group still closing is no replica of a same-name topic
                // re-created since: its epoch, reported for the new topic id, would shadow the
                // new group's reports.
                .filter(|((topic, p), g)| {
                    st.topics
                        .get(topic)
                        .is_some_and(|t| is_group_of(g.group_id(), t, *p))
                })
                .filter(|(_, g)| {
                    let leads = g.is_leader();
                    in_doubt |= !leads && g.is_raft_leader();
                    leads
                })
                .filter_map(|((topic, p), g)| {
                    let t = st.topics.get(topic)?;
                    let epoch = g.leader_epoch();
                    let recorded = t.leaders.get(p);
                    if recorded.is_some_and(|l| l.epoch >= epoch) {
                        return None;
                    }
                    Some(LeaderUpdate {
                        topic: topic.clone(),
                        topic_id: t.id,
                        partition: *p,
                        leader: broker.node_id(),
                        epoch,
                    })
                })
                .collect()
        };
        last_seen = (!in_doubt && updates.is_empty()).then_some(seen);
        if updates.is_empty() {
            continue;
        }
        if let Err(e) = broker
            .propose(&Command::SetPartitionLeaders { updates })
            .await
        {
            tracing::debug!(error = %e, "leader report failed, will retry");
        }
    }
}

/// When the controller fences the broker a partition's replicas still follow (crashed, paused or
/// cut off), the lowest-id live voter starts an election right away instead of waiting out the
/// old leader's lease: broker liveness drives partition failover.
pub async fn fenced_leader_loop(broker: Arc<Broker>) {
    let mut last_try: std::collections::HashMap<sluice_raft::GroupId, std::time::Instant> =
        Default::default();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let me = broker.node_id();
        // Fencing is the controller's verdict; a broker cut off from the controller (or just back
        // from being cut off) sees an old verdict, and electing on it would only disrupt a
        // working leader with a log that is likely behind.
        if !broker
            .health
            .in_controller_contact(Duration::from_millis(1500))
        {
            continue;
        }
        let todo: Vec<Arc<PartitionGroup>> = {
            let st = broker.state();
            // Nobody fenced (the usual case): no leader to elect away from, and no pass over
            // every replica twice a second.
            if st.fenced.is_empty() || st.fenced.contains(&me) {
                continue;
            }
            let parts = broker.partitions.all();
            parts
                .iter()
                .map(|(_, g)| g.clone())
                .filter(|g| {
                    let fenced_leader = g
                        .leader()
                        .is_some_and(|l| l != me && st.fenced.contains(&l));
                    let first_live = g.voters().into_iter().find(|v| !st.fenced.contains(v));
                    fenced_leader && first_live == Some(me)
                })
                .collect()
        };
        for g in todo {
            let gid = g.status().group;
            if last_try
                .get(&gid)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
            {
                continue;
            }
            last_try.insert(gid.clone(), std::time::Instant::now());
            info!(group = %gid, "leader is fenced; starting an election");
            tokio::spawn(async move {
                if let Err(e) = g.trigger_elect().await {
                    tracing::debug!(error = %e, "election after fencing did not win");
                }
            });
        }
    }
}

/// Leadership goes back to each partition's preferred leader (its first replica) once things are
/// quiet, so leaders spread evenly again after failures heal. The leader hands it over by a
/// graceful transfer (as the admin endpoint does) once the preferred replica has its whole log, so
/// no election is started by a replica whose log is behind.
pub async fn preferred_leader_loop(broker: Arc<Broker>) {
    const SETTLE: Duration = Duration::from_secs(10);
    // Several at a time: after a broker returns, a third of a large cluster's partitions may want
    // their leader back, and one per round would take many minutes.
    const TRANSFERS_PER_ROUND: usize = 32;
    let mut misplaced_since: std::collections::HashMap<PartitionKey, std::time::Instant> =
        Default::default();
    // As in `leader_report_loop`: a pass that found no misplaced leader is not repeated until
    // the controller state or a local leadership changes.
    let mut state_rx = broker.subscribe_state();
    let mut parts_rx = broker.partitions.subscribe();
    let mut last_seen: Option<(u64, u64, u64)> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen = (
            *state_rx.borrow_and_update(),
            broker.raft.group_changes(),
            *parts_rx.borrow_and_update(),
        );
        if last_seen == Some(seen) {
            continue;
        }
        let me = broker.node_id();
        // A leadership in doubt (peers unreachable) is no candidate now but may be once the
        // doubt clears, which changes nothing this loop keys on: keep passing until then.
        let mut in_doubt = false;
        let candidates: Vec<(PartitionKey, Arc<PartitionGroup>, u64)> = {
            let st = broker.state();
            let parts = broker.partitions.all();
            parts
                .iter()
                .filter_map(|((t, p), g)| {
                    let topic = st.topics.get(t)?;
                    if !is_group_of(g.group_id(), topic, *p) {
                        return None;
                    }
                    let replicas = topic.partitions.get(p.index())?;
                    let preferred = *replicas.first()?;
                    // Only when every replica is live: moving leadership during a fault costs
                    // availability for nothing.
                    let replicas_live = replicas.iter().all(|b| !st.fenced.contains(b));
                    let leads = g.is_leader();
                    in_doubt |= preferred != me && !leads && g.is_raft_leader();
                    (preferred != me && replicas_live && leads)
                        .then(|| ((t.clone(), *p), g.clone(), preferred))
                })
                .collect()
        };
        last_seen = (candidates.is_empty() && !in_doubt).then_some(seen);
        let keys: BTreeSet<PartitionKey> = candidates.iter().map(|(k, _, _)| k.clone()).collect();
        misplaced_since.retain(|k, _| keys.contains(k));
        let mut transfers = tokio::task::JoinSet::new();
        for (key, group, preferred) in candidates {
            let since = *misplaced_since
                .entry(key.clone())
                .or_insert_with(std::time::Instant::now);
            // A transfer pauses the partition's writes until the target has the whole log, so
            // only a target that is already caught up is worth it.
            if since.elapsed() < SETTLE || !group.caught_up(preferred) {
                continue;
            }
            info!(topic = %key.0, partition = %key.1, to = preferred, "handing leadership back to the preferred replica");
            misplaced_since.remove(&key);
            let broker = broker.clone();
            transfers.spawn(async move {
                let gid = group.group_id().to_string();
                if let Err(e) = broker.transfer_partition_leadership(&gid, preferred).await {
                    tracing::debug!(error = %e, "preferred leader transfer failed");
                }
            });
            if transfers.len() >= TRANSFERS_PER_ROUND {
                break;
            }
        }
        while transfers.join_next().await.is_some() {}
    }
}

/// Before a controlled shutdown: hand every partition this node leads, and the controller role,
/// to a live replica, so clients wait for one election instead of a lease timeout.
pub async fn hand_off_leadership(broker: &Broker) {
    let me = broker.node_id();
    let live = broker.live_brokers();
    let led: Vec<(String, Vec<u64>)> = {
        broker
            .partitions
            .all()
            .iter()
            .map(|(_, g)| g)
            .filter(|g| g.is_leader())
            .map(|g| {
                (
                    g.status().group.to_string(),
                    g.voters().into_iter().collect(),
                )
            })
            .collect()
    };
    let mut moves = Vec::new();
    for (group, voters) in led {
        if let Some(to) = voters.into_iter().find(|v| *v != me && live.contains(v)) {
            moves.push((group, to));
        }
    }
    if broker.raft.meta().is_leader() {
        if let Some(to) = broker
            .raft
            .meta()
            .voters()
            .into_keys()
            .find(|v| *v != me && live.contains(v))
        {
            moves.push((sluice_raft::META_GROUP.to_string(), to));
        }
    }
    if moves.is_empty() {
        return;
    }
    info!(
        count = moves.len(),
        "handing off leadership before shutdown"
    );
    let calls = moves.into_iter().map(|(group, to)| async move {
        let req = AppRequest::Elect { group };
        let _ = rpc::call(&broker.raft, to, &req, Duration::from_secs(5)).await;
    });
    let _ = tokio::time::timeout(Duration::from_secs(6), futures::future::join_all(calls)).await;
}
