//! Cluster membership as each node takes part in it: registering this broker, heartbeating the
//! controller (and, on the controller, fencing brokers whose heartbeats stop), joining the
//! metadata group late, guarding the data directory's cluster identity, and answering peers'
//! node-to-node requests ([`Inbound`]).

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use sluice_raft::RaftError;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::clock::now_ms;
use crate::controller::{BrokerInfo, Command};
use crate::identity::{new_cluster_id, DirIdentity};
use crate::rpc::{self, AppRequest, AppResponse};

/// A broker the controller has not heard from for this long is fenced: six missed heartbeats,
/// short enough that a crashed broker stops receiving new replicas within seconds.
pub const BROKER_SESSION_TIMEOUT: Duration = Duration::from_secs(3);
/// A new controller judges nobody before this: every live broker heartbeats it well within it.
const NEW_CONTROLLER_GRACE: Duration = Duration::from_millis(1500);
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// Answers peers' requests. Holds the broker weakly: the broker owns the Raft host, which owns
/// this.
pub struct Inbound(pub Weak<Broker>);

impl rpc::Service for Inbound {
    fn serve(&self, from: u64, req: AppRequest) -> BoxFuture<'static, AppResponse> {
        let Some(broker) = self.0.upgrade() else {
            return async {
                AppResponse::Err {
                    message: "node is stopping".into(),
                }
            }
            .boxed();
        };
        // Recorded on arrival, not when the future runs: liveness is about the peer, not us.
        // Only a node's own heartbeat counts (`from` is the certificate's node id under TLS).
        if let AppRequest::Heartbeat { node_id } = &req {
            if *node_id == from {
                broker.health.record_heartbeat(*node_id);
            } else {
                warn!(
                    from,
                    claimed = node_id,
                    "ignored a heartbeat sent for another node"
                );
            }
        }
        async move { answer(&broker, from, req).await }.boxed()
    }
}

async fn answer(broker: &Broker, from: u64, req: AppRequest) -> AppResponse {
    let not_leader_or = |r: Result<(), RaftError>| match r {
        Ok(()) => AppResponse::Ok,
        Err(RaftError::NotLeader { leader }) => AppResponse::NotLeader { leader },
        Err(e) => AppResponse::Err {
            message: e.to_string(),
        },
    };
    match req {
        AppRequest::Propose { command } => {
            if let Err(message) = check_forwarded(from, &command) {
                warn!(from, reason = %message, "refused a forwarded proposal");
                return AppResponse::Err { message };
            }
            forward_proposal(broker, command).await
        }
        AppRequest::Heartbeat { .. } => {
            if broker.raft.meta().is_leader() {
                AppResponse::Ok
            } else {
                AppResponse::NotLeader {
                    leader: broker.controller_id(),
                }
            }
        }
        AppRequest::Hello { cluster_id } => {
            let mine = broker.state().cluster_id.clone();
            if let (Some(a), Some(b)) = (&mine, &cluster_id) {
                if a != b {
                    warn!(peer = from, peer_cluster = %b, cluster = %a, "peer belongs to another cluster");
                }
            }
            AppResponse::Hello { cluster_id: mine }
        }
        AppRequest::Join { node_id, raft_addr } => {
            if !broker.raft.meta().is_leader() {
                return AppResponse::NotLeader {
                    leader: broker.controller_id(),
                };
            }
            if let Err(message) = check_join(broker, from, node_id, &raft_addr) {
                warn!(from, node_id, %raft_addr, reason = %message, "refused a join");
                return AppResponse::Err { message };
            }
            broker.raft.set_peer_addr(node_id, raft_addr.clone());
            not_leader_or(broker.raft.meta().add_voter(node_id, raft_addr).await)
        }
        AppRequest::Transfer { group, target } => {
            not_leader_or(broker.transfer_partition_leadership(&group, target).await)
        }
        AppRequest::Elect { group } => match broker.trigger_elect(&group).await {
            Ok(()) => AppResponse::Ok,
            Err(message) => AppResponse::Err { message },
        },
    }
}

async fn forward_proposal(broker: &Broker, command: Vec<u8>) -> AppResponse {
    match broker.raft.meta().propose(command).await {
        Ok(reply) => AppResponse::Proposed { reply },
        Err(RaftError::NotLeader { leader }) => AppResponse::NotLeader { leader },
        Err(e) => AppResponse::Err {
            message: e.to_string(),
        },
    }
}

/// A node may forward proposals about the cluster, but not speak for another node: it
/// registers and fences only itself, and the fencing verdict is the controller's own (it
/// proposes it locally, so a forwarded one comes from a node that is not the controller).
fn check_forwarded(from: u64, command: &[u8]) -> Result<(), String> {
    let cmd: Command = serde_json::from_slice(command)
        .map_err(|e| format!("undecodable metadata command from node {from}: {e}"))?;
    match cmd {
        Command::RegisterBroker { broker, .. } if broker.id != from => {
            Err(format!("node {from} may not register broker {}", broker.id))
        }
        Command::FenceBroker { id } if id != from => {
            Err(format!("node {from} may not fence broker {id}"))
        }
        Command::SetFenced { .. } => Err(format!(
            "node {from} is not the controller; the fencing verdict is the controller's"
        )),
        _ => Ok(()),
    }
}

/// A node joins only as itself, and a join never moves a node the cluster already knows: that
/// would let whoever can reach the port redirect a member's replication to another address.
fn check_join(broker: &Broker, from: u64, node_id: u64, raft_addr: &str) -> Result<(), String> {
    let known = broker
        .raft
        .meta()
        .voters()
        .get(&node_id)
        .cloned()
        .or_else(|| broker.cfg.peers.get(&node_id).cloned());
    join_allowed(from, node_id, raft_addr, known.as_deref())
}

/// The join rule itself; `known` is where the cluster already has `node_id`, if anywhere.
fn join_allowed(
    from: u64,
    node_id: u64,
    raft_addr: &str,
    known: Option<&str>,
) -> Result<(), String> {
    if node_id != from {
        return Err(format!(
            "node {from} asked to add node {node_id}; a node may only join as itself"
        ));
    }
    match known {
        Some(addr) if addr != raft_addr => Err(format!(
            "node {node_id} is already known at {addr}; a join cannot move it to {raft_addr}"
        )),
        _ => Ok(()),
    }
}

/// Every node heartbeats the controller; the controller fences brokers whose heartbeats stop and
/// unfences them when they resume.
pub async fn heartbeat_loop(broker: Arc<Broker>) {
    let me = broker.node_id();
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        let Some(controller) = broker.controller_id() else {
            continue;
        };
        // Silence is how a node fences itself: the controller fences a broker it does not hear
        // from, and leadership moves to replicas on working disks.
        if broker.health.storage_fence().is_some() {
            continue;
        }
        if controller == me {
            broker.health.record_heartbeat(me);
            if broker.raft.meta().leads_with_quorum(Duration::from_secs(1)) {
                broker.health.touch_controller_contact();
            }
            continue;
        }
        let answered = rpc::call(
            &broker.raft,
            controller,
            &AppRequest::Heartbeat { node_id: me },
            Duration::from_secs(2),
        )
        .await;
        if matches!(answered, Ok(AppResponse::Ok)) {
            broker.health.touch_controller_contact();
        }
    }
}

/// Which registered brokers (other than the controller itself) a controller that has led since
/// `leading_for` ago should fence, given when each last heartbeated.
fn brokers_to_fence(
    registered: impl IntoIterator<Item = u64>,
    me: u64,
    seen: &std::collections::HashMap<u64, Instant>,
    leading_for: Duration,
) -> BTreeSet<u64> {
    registered
        .into_iter()
        .filter(|id| *id != me)
        .filter(|id| {
            // Never seen by this controller: give it the session timeout from our start.
            seen.get(id)
                .map(|t| t.elapsed() > BROKER_SESSION_TIMEOUT)
                .unwrap_or(leading_for > BROKER_SESSION_TIMEOUT)
        })
        .collect()
}

/// On the controller: fences brokers whose heartbeats stopped, unfences them when they resume.
pub async fn liveness_loop(broker: Arc<Broker>) {
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        if !broker.raft.meta().is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        // A new controller has not had time to hear from anyone: judge nobody yet.
        if since.elapsed() < NEW_CONTROLLER_GRACE {
            continue;
        }
        let (registered, fenced_now) = {
            let st = broker.state();
            (
                st.brokers.keys().copied().collect::<Vec<_>>(),
                st.fenced.clone(),
            )
        };
        let seen = broker.health.heartbeats();
        let fenced = brokers_to_fence(registered, broker.node_id(), &seen, since.elapsed());
        if fenced != fenced_now {
            info!(?fenced, "broker liveness changed");
            if let Err(e) = broker.propose(&Command::SetFenced { fenced }).await {
                warn!(error = %e, "could not record broker liveness");
            }
        }
    }
}

/// Before taking part, compare our recorded cluster id with the peers'. A node whose directory
/// belongs to another cluster must not vote or replicate here.
pub async fn check_cluster_identity(
    broker: &Broker,
    recorded: Option<String>,
) -> Result<(), String> {
    let Some(mine) = recorded else {
        return Ok(());
    };
    let me = broker.node_id();
    let peers: Vec<u64> = broker
        .cfg
        .peers
        .keys()
        .copied()
        .filter(|p| *p != me)
        .collect();
    for p in peers {
        let hello = AppRequest::Hello {
            cluster_id: Some(mine.clone()),
        };
        if let Ok(AppResponse::Hello {
            cluster_id: Some(theirs),
        }) = rpc::call(&broker.raft, p, &hello, Duration::from_secs(2)).await
        {
            if theirs != mine {
                return Err(format!(
                    "data directory {} belongs to cluster {mine}, but peer {p} is in cluster {theirs}; \
                     refusing to start with a foreign data directory",
                    broker.cfg.data_dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// A node that is not a voter of the metadata group (started later with the peer list plus
/// itself) asks the cluster to add it. Nodes of a forming cluster are voters from the first
/// membership entry and never get here.
pub async fn join_loop(broker: Arc<Broker>) {
    let me = broker.node_id();
    tokio::time::sleep(Duration::from_secs(3)).await;
    loop {
        if broker.raft.meta().voters().contains_key(&me) {
            return;
        }
        let mut targets: Vec<u64> = broker.controller_id().into_iter().collect();
        targets.extend(broker.cfg.peers.keys().copied().filter(|p| *p != me));
        let req = AppRequest::Join {
            node_id: me,
            raft_addr: broker.cfg.raft_addr.clone(),
        };
        for t in targets {
            let joined_via = match rpc::call(&broker.raft, t, &req, Duration::from_secs(30)).await {
                Ok(AppResponse::Ok) => Some(t),
                Ok(AppResponse::NotLeader { leader: Some(l) }) if l != t => {
                    let r = rpc::call(&broker.raft, l, &req, Duration::from_secs(30)).await;
                    matches!(r, Ok(AppResponse::Ok)).then_some(l)
                }
                _ => None,
            };
            if let Some(via) = joined_via {
                info!(via, "joined the metadata group");
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Records the cluster id in `meta.properties` once known, and stops the node if the replicated
/// cluster id is not the one this directory was created for.
pub async fn identity_loop(broker: Arc<Broker>) {
    let dir = broker.cfg.data_dir.clone();
    let mut known = DirIdentity::load(&dir).ok().and_then(|i| i.cluster_id);
    let mut rx = broker.subscribe_state();
    loop {
        let current = broker.state().cluster_id.clone();
        match (&known, current) {
            (Some(k), Some(c)) if *k != c => {
                broker.fail(format!(
                    "data directory {} belongs to cluster {k}, but this cluster is {c}; \
                     refusing to run with a foreign data directory",
                    dir.display()
                ));
                return;
            }
            (None, Some(c)) => {
                if let Err(e) = DirIdentity::store(&dir, broker.node_id(), Some(&c)) {
                    warn!(error = %e, "could not record the cluster id in meta.properties");
                } else {
                    info!(cluster_id = %c, "cluster id recorded");
                    known = Some(c);
                }
            }
            _ => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Registers this broker (and, on a fresh cluster, the cluster id) once a controller exists, and
/// again whenever our registration is missing or stale.
pub async fn register_loop(broker: Arc<Broker>) {
    let cfg = &broker.cfg;
    let me = BrokerInfo {
        id: cfg.node_id,
        kafka_addr: cfg.advertised_kafka_addr(),
        admin_addr: cfg.admin_addr.clone(),
        raft_addr: cfg.raft_addr.clone(),
        registered_at_ms: 0,
    };
    let listeners: std::collections::BTreeMap<String, String> = cfg
        .kafka_listeners()
        .iter()
        .map(|l| (l.name.clone(), l.advertised_addr()))
        .collect();
    loop {
        let (need_cluster, need_register) = {
            let st = broker.state();
            let stale = st.brokers.get(&me.id).is_none_or(|b| {
                b.kafka_addr != me.kafka_addr
                    || b.admin_addr != me.admin_addr
                    || b.raft_addr != me.raft_addr
            }) || st.broker_listeners.get(&me.id).cloned().unwrap_or_default()
                != listeners;
            (st.cluster_id.is_none(), stale)
        };
        if !need_cluster && !need_register {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if broker.controller_id().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let voters = broker.raft.meta().voters();
        if !voters.is_empty() && !voters.contains_key(&me.id) {
            // Not (or no longer) a member: decommissioned, or still joining.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if need_cluster && broker.raft.meta().is_leader() {
            let cluster_id = new_cluster_id();
            if let Err(e) = broker.propose(&Command::InitCluster { cluster_id }).await {
                warn!(error = %e, "could not initialize cluster id, will retry");
            }
        }
        if need_register {
            let mut b = me.clone();
            b.registered_at_ms = now_ms();
            match broker
                .propose(&Command::RegisterBroker {
                    broker: b,
                    listeners: listeners.clone(),
                })
                .await
            {
                Ok(_) => info!(node_id = me.id, addr = %me.kafka_addr, "broker registered"),
                Err(e) => warn!(error = %e, "broker registration failed, will retry"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn silent_brokers_are_fenced_after_the_session_timeout() {
        let now = Instant::now();
        let old = now - BROKER_SESSION_TIMEOUT - Duration::from_millis(10);
        let seen: HashMap<u64, Instant> = [(2, now), (3, old)].into_iter().collect();
        let long = BROKER_SESSION_TIMEOUT * 2;
        // 1 is the controller itself; 4 was never seen.
        assert_eq!(
            brokers_to_fence([1, 2, 3, 4], 1, &seen, long),
            [3, 4].into_iter().collect()
        );
        // A controller that just took over gives the unseen the session timeout.
        assert_eq!(
            brokers_to_fence([1, 2, 3, 4], 1, &seen, Duration::from_secs(1)),
            [3].into_iter().collect()
        );
    }

    #[test]
    fn a_node_joins_only_as_itself_and_never_moves_a_known_node() {
        assert!(join_allowed(4, 4, "10.0.0.4:9093", None).is_ok());
        assert!(
            join_allowed(4, 4, "10.0.0.4:9093", Some("10.0.0.4:9093")).is_ok(),
            "a retry"
        );
        let e = join_allowed(4, 1, "10.0.0.9:9093", None).unwrap_err();
        assert!(e.contains("only join as itself"), "{e}");
        let e = join_allowed(1, 1, "10.0.0.9:9093", Some("10.0.0.1:9093")).unwrap_err();
        assert!(e.contains("cannot move it"), "{e}");
    }

    #[test]
    fn a_node_forwards_proposals_only_in_its_own_name() {
        let enc = |c: &Command| serde_json::to_vec(c).unwrap();
        let register = |id: u64| Command::RegisterBroker {
            broker: crate::controller::BrokerInfo {
                id,
                kafka_addr: "127.0.0.1:9092".into(),
                admin_addr: "127.0.0.1:9644".into(),
                raft_addr: "127.0.0.1:9093".into(),
                registered_at_ms: 0,
            },
            listeners: Default::default(),
        };
        assert!(check_forwarded(2, &enc(&register(2))).is_ok());
        assert!(check_forwarded(2, &enc(&register(1))).is_err());
        assert!(check_forwarded(2, &enc(&Command::FenceBroker { id: 2 })).is_ok());
        assert!(check_forwarded(2, &enc(&Command::FenceBroker { id: 1 })).is_err());
        let fenced = Command::SetFenced {
            fenced: [1].into_iter().collect(),
        };
        assert!(check_forwarded(2, &enc(&fenced)).is_err());
        assert!(check_forwarded(2, &enc(&Command::DeleteTopic { name: "t".into() })).is_ok());
        assert!(check_forwarded(2, b"not json").is_err());
    }
}
