//! Node-to-node application messages, carried by the Raft transport's app RPC: forwarding metadata
//! proposals to the controller, broker heartbeats (from which the controller derives liveness),
//! the cluster-id handshake, joins, and election triggers for leadership transfer.
//!
//! This module owns the wire (the message types, encoding, the client side); what a node does
//! with a request is a [`Service`] that `membership` implements, so the RPC layer never depends on
//! the broker it serves.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use sluice_raft::{AppHandler, RaftError, RaftHost};

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

/// What a node does with the requests of its peers.
pub trait Service: Send + Sync + 'static {
    /// Answers one request from node `from`. Called on the transport's task: anything slow
    /// belongs in the returned future.
    fn serve(&self, from: u64, req: AppRequest) -> BoxFuture<'static, AppResponse>;
}

/// Adapts a [`Service`] to the Raft host's byte-level app handler.
pub struct Server<S>(pub S);

impl<S: Service> AppHandler for Server<S> {
    fn handle(&self, from: u64, payload: Bytes) -> BoxFuture<'static, Result<Bytes, String>> {
        let req: AppRequest = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("undecodable app request from {from}: {e}");
                return async move { Err(msg) }.boxed();
            }
        };
        let answer = self.0.serve(from, req);
        async move {
            let resp = answer.await;
            serde_json::to_vec(&resp)
                .map(Bytes::from)
                .map_err(|e| e.to_string())
        }
        .boxed()
    }
}

/// Sends `req` to node `target` and decodes the answer.
pub async fn call(
    raft: &RaftHost,
    target: u64,
    req: &AppRequest,
    timeout: Duration,
) -> Result<AppResponse, String> {
    let payload = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let bytes = raft
        .call_app(target, Bytes::from(payload), timeout)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("undecodable app response: {e}"))
}

/// Proposes on the controller from any node: locally when we lead, else forwarded.
pub async fn propose_anywhere(
    raft: &RaftHost,
    me: u64,
    command: Vec<u8>,
) -> Result<Vec<u8>, RaftError> {
    match raft.meta().propose(command.clone()).await {
        Err(RaftError::NotLeader {
            leader: Some(leader),
        }) if leader != me => {
            match call(
                raft,
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
