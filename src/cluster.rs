//! Node-to-node application messages, carried by the Raft transport's app RPC: forwarding metadata
//! proposals to the controller, broker heartbeats (from which the controller derives liveness),
//! the cluster-id handshake, and election triggers for leadership transfer.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use sluice_raft::{AppHandler, RaftError};
use tracing::{info, warn};

use crate::metadata::Command;
use crate::node::Node;

/// A broker the controller has not heard from for this long is fenced: six missed heartbeats,
/// short enough that a crashed broker stops receiving new replicas within seconds.
pub const BROKER_SESSION_TIMEOUT: Duration = Duration::from_secs(3);
/// A new controller judges nobody before this: every live broker heartbeats it well within it.
const NEW_CONTROLLER_GRACE: Duration = Duration::from_millis(1500);
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize, Deserialize)]
pub enum AppRequest {
    /// Propose this metadata command (JSON `Command`) on the controller.
    Propose {
        command: Vec<u8>,
    },
    Heartbeat {
        node_id: u64,
    },
    Hello {
        cluster_id: Option<String>,
    },
    /// Start an election for this group on the receiving node (leadership transfer).
    Elect {
        group: String,
    },
    /// On the partition's leader: move leadership of `group` to `target` (admin endpoint).
    Transfer {
        group: String,
        target: u64,
    },
    /// Add the sender to the metadata group (a node started after the cluster formed).
    Join {
        node_id: u64,
        raft_addr: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AppResponse {
    Proposed { reply: Vec<u8> },
    NotLeader { leader: Option<u64> },
    Hello { cluster_id: Option<String> },
    Ok,
    Err { message: String },
}

/// Receives app RPCs. Holds the node weakly: the node owns the Raft host, which owns this.
pub struct Handler {
    pub node: Mutex<Weak<Node>>,
    /// Controller-side: when each broker last sent a heartbeat.
    pub last_seen: Mutex<HashMap<u64, Instant>>,
}

impl Handler {
    pub fn new() -> Arc<Handler> {
        Arc::new(Handler {
            node: Mutex::new(Weak::new()),
            last_seen: Mutex::new(HashMap::new()),
        })
    }
}

fn encode(r: &AppResponse) -> Result<Bytes, String> {
    serde_json::to_vec(r)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

impl AppHandler for Handler {
    fn handle(&self, from: u64, payload: Bytes) -> BoxFuture<'static, Result<Bytes, String>> {
        let node = self.node.lock().map(|n| n.upgrade()).ok().flatten();
        let req: Result<AppRequest, _> = serde_json::from_slice(&payload);
        if let Ok(AppRequest::Heartbeat { node_id }) = &req {
            if let Ok(mut m) = self.last_seen.lock() {
                m.insert(*node_id, Instant::now());
            }
        }
        async move {
            let Some(node) = node else {
                return encode(&AppResponse::Err {
                    message: "node is starting".into(),
                });
            };
            let req = req.map_err(|e| format!("undecodable app request from {from}: {e}"))?;
            let resp = match req {
                AppRequest::Propose { command } => {
                    match node.raft.meta().propose(command).await {
                        Ok(reply) => AppResponse::Proposed { reply },
                        Err(RaftError::NotLeader { leader }) => AppResponse::NotLeader { leader },
                        Err(e) => AppResponse::Err {
                            message: e.to_string(),
                        },
                    }
                }
                AppRequest::Heartbeat { .. } => {
                    if node.raft.meta().is_leader() {
                        AppResponse::Ok
                    } else {
                        AppResponse::NotLeader {
                            leader: node.controller_id(),
                        }
                    }
                }
                AppRequest::Hello { cluster_id } => {
                    let mine = node.state().cluster_id.clone();
                    if let (Some(a), Some(b)) = (&mine, &cluster_id) {
                        if a != b {
                            warn!(peer = from, peer_cluster = %b, cluster = %a, "peer belongs to another cluster");
                        }
                    }
                    AppResponse::Hello { cluster_id: mine }
                }
                AppRequest::Join { node_id, raft_addr } => {
                    if !node.raft.meta().is_leader() {
                        AppResponse::NotLeader {
                            leader: node.controller_id(),
                        }
                    } else {
                        node.raft.set_peer_addr(node_id, raft_addr.clone());
                        match node.raft.meta().add_voter(node_id, raft_addr).await {
                            Ok(()) => AppResponse::Ok,
                            Err(RaftError::NotLeader { leader }) => {
                                AppResponse::NotLeader { leader }
                            }
                            Err(e) => AppResponse::Err {
                                message: e.to_string(),
                            },
                        }
                    }
                }
                AppRequest::Transfer { group, target } => {
                    match node.transfer_partition_leadership(&group, target).await {
                        Ok(()) => AppResponse::Ok,
                        Err(RaftError::NotLeader { leader }) => AppResponse::NotLeader { leader },
                        Err(e) => AppResponse::Err {
                            message: e.to_string(),
                        },
                    }
                }
                AppRequest::Elect { group } => match node.trigger_elect(&group).await {
                    Ok(()) => AppResponse::Ok,
                    Err(message) => AppResponse::Err { message },
                },
            };
            encode(&resp)
        }
        .boxed()
    }
}

/// Sends `req` to node `target` and decodes the answer.
pub async fn call(
    node: &Node,
    target: u64,
    req: &AppRequest,
    timeout: Duration,
) -> Result<AppResponse, String> {
    let payload = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let bytes = node
        .raft
        .call_app(target, Bytes::from(payload), timeout)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("undecodable app response: {e}"))
}

/// Proposes on the controller from any node: locally when we lead, else forwarded.
pub async fn propose_anywhere(node: &Node, command: Vec<u8>) -> Result<Vec<u8>, RaftError> {
    match node.raft.meta().propose(command.clone()).await {
        Err(RaftError::NotLeader {
            leader: Some(leader),
        }) if leader != node.cfg.node_id => {
            match call(
                node,
                leader,
                &AppRequest::Propose { command },
                Duration::from_secs(15),
            )
            .await
            {
                Ok(AppResponse::Proposed { reply }) => Ok(reply),
                Ok(AppResponse::NotLeader { leader }) => Err(RaftError::NotLeader { leader }),
                Ok(AppResponse::Err { message }) => Err(RaftError::Other(message)),
                Ok(other) => Err(RaftError::Other(format!("unexpected reply {other:?}"))),
                Err(e) => Err(RaftError::Other(format!(
                    "forwarding to controller {leader} failed: {e}"
                ))),
            }
        }
        other => other,
    }
}

/// Every node heartbeats the controller; the controller fences brokers whose heartbeats stop and
/// unfences them when they resume.
pub async fn heartbeat_loop(node: Arc<Node>) {
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        let Some(controller) = node.controller_id() else {
            continue;
        };
        // Silence is how a node fences itself: the controller fences a broker it does not hear
        // from, and leadership moves to replicas on working disks.
        if node.storage_fence().is_some() {
            continue;
        }
        if controller == node.cfg.node_id {
            if let Ok(mut m) = node.app.last_seen.lock() {
                m.insert(node.cfg.node_id, Instant::now());
            }
            if node.raft.meta().leads_with_quorum(Duration::from_secs(1)) {
                if let Ok(mut c) = node.controller_contact.lock() {
                    *c = Some(Instant::now());
                }
            }
            continue;
        }
        let answered = call(
            &node,
            controller,
            &AppRequest::Heartbeat {
                node_id: node.cfg.node_id,
            },
            Duration::from_secs(2),
        )
        .await;
        if matches!(answered, Ok(AppResponse::Ok)) {
            if let Ok(mut c) = node.controller_contact.lock() {
                *c = Some(Instant::now());
            }
        }
    }
}

pub async fn liveness_loop(node: Arc<Node>) {
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        if !node.raft.meta().is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        // A new controller has not had time to hear from anyone: judge nobody yet.
        if since.elapsed() < NEW_CONTROLLER_GRACE {
            continue;
        }
        let (registered, fenced_now) = {
            let st = node.state();
            (
                st.brokers.keys().copied().collect::<Vec<_>>(),
                st.fenced.clone(),
            )
        };
        let fenced: BTreeSet<u64> = {
            let seen = match node.app.last_seen.lock() {
                Ok(m) => m.clone(),
                Err(_) => continue,
            };
            registered
                .into_iter()
                .filter(|id| *id != node.cfg.node_id)
                .filter(|id| {
                    // Never seen by this controller: give it the session timeout from our start.
                    seen.get(id)
                        .map(|t| t.elapsed() > BROKER_SESSION_TIMEOUT)
                        .unwrap_or(since.elapsed() > BROKER_SESSION_TIMEOUT)
                })
                .collect()
        };
        if fenced != fenced_now {
            info!(?fenced, "broker liveness changed");
            if let Err(e) = node.propose(&Command::SetFenced { fenced }).await {
                warn!(error = %e, "could not record broker liveness");
            }
        }
    }
}

/// Before taking part, compare our recorded cluster id with the peers'. A node whose directory
/// belongs to another cluster must not vote or replicate here.
pub async fn check_cluster_identity(
    node: &Arc<Node>,
    recorded: Option<String>,
) -> Result<(), String> {
    let Some(mine) = recorded else {
        return Ok(());
    };
    let peers: Vec<u64> = node
        .cfg
        .peers
        .keys()
        .copied()
        .filter(|p| *p != node.cfg.node_id)
        .collect();
    for p in peers {
        if let Ok(AppResponse::Hello {
            cluster_id: Some(theirs),
        }) = call(
            node,
            p,
            &AppRequest::Hello {
                cluster_id: Some(mine.clone()),
            },
            Duration::from_secs(2),
        )
        .await
        {
            if theirs != mine {
                return Err(format!(
                    "data directory {} belongs to cluster {mine}, but peer {p} is in cluster {theirs}; \
                     refusing to start with a foreign data directory",
                    node.cfg.data_dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// A node that is not a voter of the metadata group (started later with the peer list plus
/// itself) asks the cluster to add it. Nodes of a forming cluster are voters from the first
/// membership entry and never get here.
pub async fn join_loop(node: Arc<Node>) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    loop {
        let voters = node.raft.meta().voters();
        if voters.contains_key(&node.cfg.node_id) {
            return;
        }
        let mut targets: Vec<u64> = node.controller_id().into_iter().collect();
        targets.extend(
            node.cfg
                .peers
                .keys()
                .copied()
                .filter(|p| *p != node.cfg.node_id),
        );
        for t in targets {
            let req = AppRequest::Join {
                node_id: node.cfg.node_id,
                raft_addr: node.cfg.raft_addr.clone(),
            };
            match call(&node, t, &req, Duration::from_secs(30)).await {
                Ok(AppResponse::Ok) => {
                    info!(via = t, "joined the metadata group");
                    break;
                }
                Ok(AppResponse::NotLeader { leader: Some(l) }) if l != t => {
                    if let Ok(AppResponse::Ok) = call(&node, l, &req, Duration::from_secs(30)).await
                    {
                        info!(via = l, "joined the metadata group");
                        break;
                    }
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
