//! The group supervisor: what openraft's election timer and heartbeats would do, for quiet
//! partition groups (and split-vote breaking for the metadata group). [`decide`] holds the pure
//! judgement over a group's metrics and the peers' liveness; this module runs it every round and
//! keeps the per-group timers (patience, deferral, nudges) that turn judgements into actions.

mod decide;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use rand::Rng;
use tokio::sync::watch;

use crate::config::random_timeout;
use crate::liveness::Liveness;
use crate::registry::Registry;
use crate::{GroupId, NodeId, META_GROUP};

use decide::{
    defer_to_better_log, has_lagging_follower, has_leaderless_voter, leads_without_a_vote,
    ongoing_stall, stall_reason,
};

/// How often the group supervisor looks at the groups (randomized per round, see below).
const WATCHDOG_PERIOD_MS: std::ops::Range<u64> = 100..400;

/// A follower whose leader's node is down, or no longer claims the group, elects after a random
/// wait in this range (on top of [`crate::liveness::ALIVE_WITHIN`] for a silent node), so that
/// the followers of one group rarely collide.
const LEADER_LOST_PATIENCE_MS: (u64, u64) = (200, 1000);

/// A quiet leader nudges followers that lag behind its log at most this often (openraft does not
/// retry replication to a follower that was down until there is something new to send).
const NUDGE_EVERY: Duration = Duration::from_secs(1);

/// A round that finds nothing to do is followed by rounds that look at the metadata group only,
/// until something that the judgement depends on changes (a group's server state or membership,
/// a peer's answer, which peers are alive) or this long has passed. Looking at every group four
/// times a second was most of what an idle node spent.
const FULL_ROUND_EVERY: Duration = Duration::from_secs(2);

/// A voter defers to a peer with a longer log at most this long (that peer might not be able to
/// run, e.g. when it cannot reach a majority of its own).
const MAX_DEFER: Duration = Duration::from_secs(5);

/// The group supervisor: what openraft's timers do for a group, for quiet partition groups.
///
/// - A voter elects when its group has no leader, its leader's node stopped answering pings, or
///   the leader's node no longer claims the group; after a random patience, redrawn for every
///   attempt (openraft does not retry a triggered election that loses, so this does).
/// - A leader nudges lagging followers with a heartbeat, and voters whose pings say they know no
///   leader: a quiet group sends nothing else, so a voter that missed the election (or raised
///   its term after it) would stay leaderless until the next write.
///
/// For the metadata group, which keeps its timers, it only breaks split votes: each openraft 0.9
/// instance draws its election timeout once and checks it only on a tick of 1.5 x heartbeat
/// interval, so two candidates whose timeouts fall into the same tick collide forever.
pub(crate) async fn election_watchdog(
    registry: Arc<Registry>,
    node_id: NodeId,
    liveness: Arc<Liveness>,
    mut shutdown: watch::Receiver<bool>,
) {
    // When a group's stall began, and the leader it had then: a stall judged about one leader
    // says nothing about the next, so a new leader starts the patience again.
    let mut stalled_since: HashMap<GroupId, (Option<NodeId>, std::time::Instant)> = HashMap::new();
    let mut patience: HashMap<GroupId, Duration> = HashMap::new();
    let mut nudged: HashMap<GroupId, std::time::Instant> = HashMap::new();
    let mut deferring_since: HashMap<GroupId, std::time::Instant> = HashMap::new();
    // Quiet leaders whose tick this loop switched on so that openraft steps them down.
    let mut ticking: HashMap<GroupId, crate::Raft> = HashMap::new();
    // What the last full round saw, when, and whether it left anything in progress.
    type Fingerprint = (u64, u64, Vec<NodeId>);
    let mut last_full: Option<(Fingerprint, std::time::Instant)> = None;
    let mut busy = true;
    loop {
        let period = Duration::from_millis(rand::thread_rng().gen_range(WATCHDOG_PERIOD_MS));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let now = std::time::Instant::now();
        // Read before the groups are looked at, so a change during the round shows next round.
        let fingerprint: Fingerprint = (
            registry.changes(),
            liveness.content_changes(),
            liveness.alive_peers(),
        );
        let full = busy
            || last_full.as_ref().is_none_or(|(f, at)| {
                *f != fingerprint || now.duration_since(*at) >= FULL_ROUND_EVERY
            });
        let groups: Vec<(GroupId, crate::Raft)> = if full {
            registry.all()
        } else {
            // The metadata group keeps openraft's timers and bumps no counter: always looked at.
            registry
                .get(META_GROUP)
                .map(|r| (GroupId::from(META_GROUP), r))
                .into_iter()
                .collect()
        };
        let mut any_lagging = false;
        let mut seen = BTreeSet::new();
        for (group, raft) in groups {
            let (reason, lagging, leader, removed_leader) = {
                let m = raft.metrics();
                let m = m.borrow();
                let partition = group != META_GROUP;
                (
                    stall_reason(&group, &m, node_id, &liveness),
                    partition
                        && m.state == ServerState::Leader
                        && (has_lagging_follower(&m)
                            || has_leaderless_voter(&group, &m, node_id, &liveness)),
                    m.current_leader,
                    partition && leads_without_a_vote(&m, node_id),
                )
            };
            let leader_known = leader.is_some();
            // Quiet groups run without openraft's tick (see `config::partition_config`), and a
            // leader removed from the voters steps down only on a tick: give it ticks until it
            // has.
            if removed_leader && !ticking.contains_key(&group) {
                tracing::info!(%group, "leader is no longer a voter; ticking until it steps down");
                raft.runtime_config().tick(true);
                ticking.insert(group.clone(), raft.clone());
            }
            any_lagging |= lagging;
            if lagging
                && nudged
                    .get(&group)
                    .is_none_or(|t| now.duration_since(*t) >= NUDGE_EVERY)
            {
                nudged.insert(group.clone(), now);
                if let Err(e) = raft.trigger().heartbeat().await {
                    tracing::debug!(%group, error = %e, "nudging followers failed");
                }
            }
            let Some(reason) = reason else {
                stalled_since.remove(&group);
                patience.remove(&group);
                continue;
            };
            seen.insert(group.clone());
            let since = match ongoing_stall(stalled_since.get(&group), leader) {
                Some(at) => at,
                None => {
                    stalled_since.insert(group.clone(), (leader, now));
                    patience.remove(&group);
                    now
                }
            };
            let (min_ms, max_ms) = if leader_known {
                LEADER_LOST_PATIENCE_MS
            } else {
                let c = raft.config();
                (c.election_timeout_min, c.election_timeout_max)
            };
            let wait = *patience
                .entry(group.clone())
                .or_insert_with(|| random_timeout(min_ms, max_ms));
            if now.duration_since(since) >= wait {
                let defer = group != META_GROUP && {
                    let m = raft.metrics();
                    let m = m.borrow();
                    defer_to_better_log(&registry, &m, &group, &liveness)
                };
                if defer {
                    let first = *deferring_since.entry(group.clone()).or_insert(now);
                    if now.duration_since(first) < MAX_DEFER {
                        continue;
                    }
                }
                deferring_since.remove(&group);
                if !registry.may_vote(&group) {
                    tracing::debug!(%group, "not standing for election: getting back lost entries");
                    continue;
                }
                tracing::info!(
                    %group,
                    reason,
                    stalled_ms = now.duration_since(since).as_millis() as u64,
                    "triggering an election"
                );
                if let Err(e) = raft.trigger().elect().await {
                    tracing::warn!(%group, error = %e, "triggering an election failed");
                }
                // The election leaves this node without a leader: the retry's stall is about
                // none, and keeps the patience drawn here.
                stalled_since.insert(group.clone(), (None, now));
                patience.insert(group.clone(), random_timeout(min_ms, max_ms));
            }
        }
        if !full {
            // Only the metadata group was looked at: the partition groups' timers stand.
            continue;
        }
        ticking.retain(|_, raft| {
            let done = !leads_without_a_vote(&raft.metrics().borrow(), node_id);
            if done {
                raft.runtime_config().tick(false);
            }
            !done
        });
        registry.set_stalled(
            seen.iter()
                .filter(|g| g.as_str() != META_GROUP)
                .cloned()
                .collect(),
        );
        stalled_since.retain(|g, _| seen.contains(g));
        patience.retain(|g, _| seen.contains(g));
        deferring_since.retain(|g, _| seen.contains(g));
        nudged.retain(|_, t| now.duration_since(*t) < NUDGE_EVERY);
        busy = !seen.is_empty()
            || any_lagging
            || !nudged.is_empty()
            || !deferring_since.is_empty()
            || !ticking.is_empty();
        last_full = Some((fingerprint, now));
    }
}

/// A leader re-announces itself to a peer that is reachable again (it may have restarted, or
/// elected in vain while cut off): a quiet group would otherwise leave that follower without a
/// leader until the next write.
pub(crate) fn announce_to(registry: &Registry, peer: NodeId) {
    for (group, raft) in registry.all() {
        if group == META_GROUP {
            continue;
        }
        let is_voter_leader = {
            let m = raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader
                && m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == peer)
        };
        if is_voter_leader {
            tokio::spawn(async move {
                if let Err(e) = raft.trigger().heartbeat().await {
                    tracing::debug!(%group, error = %e, "announcing leadership failed");
                }
            });
        }
    }
}
