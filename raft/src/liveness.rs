//! Node-to-node liveness, which lets partition groups stay quiet when idle.
//!
//! Partition groups run with openraft's heartbeats and election timer off (DESIGN.md 4a: nearly
//! all of an idle group's cost is heartbeats). Instead every node pings each peer it shares a
//! group with, one small RPC per peer however many groups there are, and the reply ([`crate::ping`]) names the
//! partition groups the peer leads. The group supervisor ([`crate::supervisor`]) turns that into the
//! decisions openraft's timers used to make per group: a follower elects when its leader's node
//! is silent or no longer claims the group; a leader stops claiming a group when it cannot reach
//! a majority of its voters; and a leader re-announces itself to a peer that comes back.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::codec::{ResponseStatus, RpcKind};
use crate::ping::PingReply;
use crate::registry::Registry;
use crate::transport::Transport;
use crate::{GroupId, NodeId, META_GROUP};

/// How often each peer is pinged.
pub(crate) const PING_EVERY: Duration = Duration::from_millis(250);

/// A peer whose last ping answer is older than this counts as down. Four ping rounds, so a single
/// slow answer does not start elections.
pub(crate) const ALIVE_WITHIN: Duration = Duration::from_millis(1000);

#[derive(Debug)]
struct PeerView {
    boot: u64,
    last_ok: Instant,
    leads: HashSet<GroupId>,
    leaderless_logs: HashMap<GroupId, (u64, u64)>,
    /// For groups of `leaderless_logs` that still have a leader there: that leader.
    following: HashMap<GroupId, NodeId>,
    /// The answer's bytes, so an unchanged answer (the usual case) is not decoded again.
    raw: Option<bytes::Bytes>,
}

/// The last ping answer of every peer.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    peers: Mutex<HashMap<NodeId, PeerView>>,
    /// Bumped whenever a peer's answer says something new (restart, groups led, leaderless
    /// logs). With [`Liveness::alive_peers`] it tells the supervisor whether its view of the
    /// peers can have changed since its last round.
    content_changes: std::sync::atomic::AtomicU64,
}

impl Liveness {
    /// Counts an answer whose bytes equal the peer's previous one as that answer again, without
    /// decoding it; `None` when it differs (or there was none), and the caller decodes it and
    /// calls [`Liveness::record_raw`]. `Some(back)` as [`Liveness::record`].
    pub(crate) fn record_same(&self, peer: NodeId, raw: &[u8]) -> Option<bool> {
        let now = Instant::now();
        let mut peers = self.peers.lock().ok()?;
        let v = peers.get_mut(&peer)?;
        if v.raw.as_deref() != Some(raw) {
            return None;
        }
        let back = now.duration_since(v.last_ok) > ALIVE_WITHIN;
        v.last_ok = now;
        Some(back)
    }

    /// [`Liveness::record`], keeping the answer's bytes for [`Liveness::record_same`].
    pub(crate) fn record_raw(&self, peer: NodeId, reply: PingReply, raw: bytes::Bytes) -> bool {
        self.record_with(peer, reply, Some(raw))
    }

    /// See [`Liveness::content_changes`].
    pub(crate) fn content_changes(&self) -> u64 {
        self.content_changes
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The peers alive now, in id order.
    pub(crate) fn alive_peers(&self) -> Vec<NodeId> {
        let Ok(peers) = self.peers.lock() else {
            return Vec::new();
        };
        let mut alive: Vec<NodeId> = peers
            .iter()
            .filter(|(_, v)| v.last_ok.elapsed() <= ALIVE_WITHIN)
            .map(|(id, _)| *id)
            .collect();
        alive.sort_unstable();
        alive
    }

    /// Records an answer; true when the peer has (re)appeared: never heard, silent for longer
    /// than [`ALIVE_WITHIN`], or restarted.
    #[cfg(test)]
    pub(crate) fn record(&self, peer: NodeId, reply: PingReply) -> bool {
        self.record_with(peer, reply, None)
    }

    /// The answer and its bytes are stored under one lock: pings to a peer overlap and may
    /// complete out of order, and bytes from one answer beside the fields of another would make
    /// `record_same` keep the wrong view.
    fn record_with(&self, peer: NodeId, reply: PingReply, raw: Option<bytes::Bytes>) -> bool {
        let now = Instant::now();
        let Ok(mut peers) = self.peers.lock() else {
            return false;
        };
        let leads: HashSet<GroupId> = reply.leads.into_iter().collect();
        let leaderless_logs: HashMap<GroupId, (u64, u64)> = reply
            .leaderless_logs
            .into_iter()
            .map(|(g, term, index)| (g, (term, index)))
            .collect();
        let following: HashMap<GroupId, NodeId> = reply.following.into_iter().collect();
        let bump = || {
            self.content_changes
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        };
        match peers.get_mut(&peer) {
            Some(v) => {
                let back = v.boot != reply.boot || now.duration_since(v.last_ok) > ALIVE_WITHIN;
                if v.boot != reply.boot
                    || v.leads != leads
                    || v.leaderless_logs != leaderless_logs
                    || v.following != following
                {
                    bump();
                }
                v.boot = reply.boot;
                v.last_ok = now;
                v.leads = leads;
                v.leaderless_logs = leaderless_logs;
                v.following = following;
                v.raw = raw;
                back
            }
            None => {
                bump();
                peers.insert(
                    peer,
                    PeerView {
                        boot: reply.boot,
                        last_ok: now,
                        leads,
                        leaderless_logs,
                        following,
                        raw,
                    },
                );
                true
            }
        }
    }

    pub(crate) fn alive(&self, peer: NodeId) -> bool {
        self.peers
            .lock()
            .ok()
            .and_then(|p| p.get(&peer).map(|v| v.last_ok.elapsed() <= ALIVE_WITHIN))
            .unwrap_or(false)
    }

    /// Whether `peer` is alive and its last answer says it leads `group`.
    pub(crate) fn alive_and_leads(&self, peer: NodeId, group: &str) -> bool {
        self.peers
            .lock()
            .ok()
            .and_then(|p| {
                p.get(&peer)
                    .map(|v| v.last_ok.elapsed() <= ALIVE_WITHIN && v.leads.contains(group))
            })
            .unwrap_or(false)
    }

    /// Whether any live peer among `voters` claims to lead `group`.
    pub(crate) fn someone_leads(&self, voters: &[NodeId], group: &str) -> bool {
        voters.iter().any(|v| self.alive_and_leads(*v, group))
    }

    /// Whether `peer` is alive and its last answer lists `group` as having no working leader
    /// there, other than `leader` (a voter following `leader` that cannot hear its pings is
    /// not helped by `leader`'s heartbeat).
    pub(crate) fn reports_leaderless(&self, peer: NodeId, group: &str, leader: NodeId) -> bool {
        self.peers
            .lock()
            .ok()
            .and_then(|p| {
                p.get(&peer).map(|v| {
                    v.last_ok.elapsed() <= ALIVE_WITHIN
                        && v.leaderless_logs.contains_key(group)
                        && v.following.get(group) != Some(&leader)
                })
            })
            .unwrap_or(false)
    }

    /// Whether a live peer among `voters` is also without a leader for `group` and has a log
    /// more up to date than `mine` (term, index), so it, not this node, should run.
    pub(crate) fn better_log_elsewhere(
        &self,
        voters: &[NodeId],
        group: &str,
        mine: (u64, u64),
    ) -> bool {
        let Ok(peers) = self.peers.lock() else {
            return false;
        };
        voters.iter().any(|v| {
            peers.get(v).is_some_and(|p| {
                p.last_ok.elapsed() <= ALIVE_WITHIN
                    && p.leaderless_logs.get(group).is_some_and(|l| *l > mine)
            })
        })
    }

    /// Whether this node together with the live ones among `voters` is a majority of `voters`.
    pub(crate) fn quorum_reachable(&self, node_id: NodeId, voters: &[NodeId]) -> bool {
        let reachable = voters
            .iter()
            .filter(|v| **v == node_id || self.alive(**v))
            .count();
        reachable * 2 > voters.len()
    }
}

/// The other voters of this node's partition groups: the peers worth pinging.
fn partition_peers(registry: &Registry, node_id: NodeId) -> BTreeSet<NodeId> {
    let mut peers = BTreeSet::new();
    for (g, raft) in registry.all() {
        if g == META_GROUP {
            continue;
        }
        // The server metrics: their change is what bumps the counter this list is keyed on; the
        // full metrics are published later and could still hold the old membership.
        let m = raft.server_metrics();
        let m = m.borrow();
        peers.extend(
            m.membership_config
                .membership()
                .voter_ids()
                .filter(|v| *v != node_id),
        );
    }
    peers
}

/// Pings every peer each [`PING_EVERY`]; `on_back` runs (on the pinging task) for a peer that
/// has (re)appeared.
pub(crate) async fn ping_loop(
    transport: Arc<Transport>,
    registry: Arc<Registry>,
    liveness: Arc<Liveness>,
    node_id: NodeId,
    on_back: Arc<dyn Fn(NodeId) + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    let from = node_id.to_string();
    // The peers to ping change only with the groups' memberships, which bump the registry's
    // change counter: walking every group's membership four times a second was most of an idle
    // node's ping cost.
    let mut peers: Option<(u64, BTreeSet<NodeId>)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PING_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let changes = registry.changes();
        if peers.as_ref().is_none_or(|(at, _)| *at != changes) {
            peers = Some((changes, partition_peers(&registry, node_id)));
        }
        let targets = peers.as_ref().map(|(_, p)| p.clone()).unwrap_or_default();
        for peer in targets {
            let Some(addr) = transport.addr_of(peer) else {
                continue;
            };
            let transport = transport.clone();
            let liveness = liveness.clone();
            let on_back = on_back.clone();
            let from = from.clone();
            // One task per ping, so a peer that does not answer delays nobody else's.
            tokio::spawn(async move {
                let res = transport
                    .call(peer, &addr, RpcKind::Ping, &from, |_| Ok(()), ALIVE_WITHIN)
                    .await;
                let Ok((ResponseStatus::Ok, body)) = res else {
                    return;
                };
                if let Some(back) = liveness.record_same(peer, &body) {
                    if back {
                        tracing::debug!(peer, "peer is reachable again");
                        on_back(peer);
                    }
                    return;
                }
                match serde_json::from_slice::<PingReply>(&body) {
                    Ok(reply) => {
                        if liveness.record_raw(peer, reply, body) {
                            tracing::debug!(peer, "peer is reachable again");
                            on_back(peer);
                        }
                    }
                    Err(e) => tracing::warn!(peer, error = %e, "undecodable ping reply"),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(boot: u64, leads: &[&str]) -> PingReply {
        PingReply {
            boot,
            leads: leads.iter().map(|s| GroupId::from(*s)).collect(),
            leaderless_logs: Vec::new(),
            following: Vec::new(),
        }
    }

    #[test]
    fn a_longer_log_elsewhere_takes_precedence() {
        let l = Liveness::default();
        let mut r = reply(1, &[]);
        r.leaderless_logs = vec![("g".into(), 3, 10)];
        l.record(2, r);
        assert!(l.better_log_elsewhere(&[1, 2, 3], "g", (3, 9)));
        assert!(
            l.better_log_elsewhere(&[1, 2, 3], "g", (2, 50)),
            "term first"
        );
        assert!(
            !l.better_log_elsewhere(&[1, 2, 3], "g", (3, 10)),
            "equal logs both run"
        );
        assert!(!l.better_log_elsewhere(&[1, 2, 3], "other", (0, 0)));
        assert!(!l.better_log_elsewhere(&[1, 3], "g", (0, 0)), "not a voter");
    }

    #[test]
    fn first_answer_and_restart_count_as_back() {
        let l = Liveness::default();
        assert!(!l.alive(2));
        assert!(l.record(2, reply(7, &["a"])));
        assert!(l.alive(2));
        assert!(
            !l.record(2, reply(7, &["a"])),
            "same boot, recent: not back"
        );
        assert!(l.record(2, reply(8, &[])), "new boot id: restarted");
    }

    #[test]
    fn leads_and_quorum() {
        let l = Liveness::default();
        l.record(2, reply(1, &["g1"]));
        assert!(l.alive_and_leads(2, "g1"));
        assert!(!l.alive_and_leads(2, "g2"));
        assert!(!l.alive_and_leads(3, "g1"));
        assert!(l.someone_leads(&[1, 2, 3], "g1"));
        assert!(l.quorum_reachable(1, &[1, 2, 3]), "self + 2 of 3");
        assert!(!l.quorum_reachable(1, &[1, 3, 4]), "3 and 4 never answered");
        assert!(l.quorum_reachable(1, &[1]));
    }
}
