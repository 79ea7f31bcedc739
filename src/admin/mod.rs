//! Admin HTTP (axum): JSON views of cluster, brokers, topics, partitions, consumer groups (`groups`) and Raft groups, a health
//! check and Prometheus metrics (`views`); leadership transfer, reassignment, decommission and
//! (chaos tests only, with `SLUICE_STORAGE_FAULTS=1`) the storage fault switch (`ops`). Handlers
//! read and act through `broker::Broker` only. `guard` puts the bearer token, the JSON content
//! type and the one error shape in front of every route; `tls` serves it over HTTPS.

mod consumer_groups;
mod guard;
mod ops;
#[cfg(test)]
mod tests;
mod tls;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::broker::Broker;
use crate::config::ServerConfig;
use consumer_groups::{group, groups};
pub use guard::{Access, BODY_BYTES_MAX};
use ops::*;
use views::*;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin TLS: {0}")]
    Files(#[from] sluice_raft::tls::TlsError),
    #[error("admin TLS: {0}")]
    Tls(String),
    #[error("admin listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Who may do what on a listener bound at `bound`, from the node's config.
pub fn access(cfg: &ServerConfig, bound: SocketAddr) -> Access {
    Access::new(
        cfg.admin_api_token
            .as_ref()
            .map(crate::config::AdminToken::expose),
        cfg.admin_api_require_auth_for_reads,
        !bound.ip().is_loopback(),
    )
}

/// The admin server on `listener` (HTTPS when `admin.tls.cert`/`key` are set), until `cancel`.
/// Certificate files are loaded here, so a bad one fails the node's start.
pub fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    cancel: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, AdminError> {
    let bound = listener.local_addr()?;
    let access = access(&broker.cfg, bound);
    if access.open_to_the_network() {
        warn!(
            admin_addr = %bound,
            "the admin HTTP listens on an address other hosts can reach and no token is set: its              mutating routes answer 403; set --admin-token-file FILE (admin.api.token.file)"
        );
    }
    let tls = match (&broker.cfg.admin_tls_cert, &broker.cfg.admin_tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let app = router(broker, access);
    let stop = cancel.clone();
    Ok(async move {
        let served = match tls {
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
            Some(acceptor) => match tls::listen(listener, acceptor, cancel) {
                Ok((listener, handshakes)) => {
                    let server = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await });
                    let server = std::future::IntoFuture::into_future(server);
                    let (served, ()) = tokio::join!(server, handshakes);
                    served
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = served {
            warn!(error = %e, "admin HTTP server stopped");
        }
    })
}

pub fn router(broker: Arc<Broker>, access: Access) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/cluster", get(cluster))
        .route("/v1/brokers", get(brokers))
        .route("/v1/topics", get(topics))
        .route("/v1/topics/{topic}", get(topic))
        .route(
            "/v1/topics/{topic}/partitions/{partition}/producers",
            get(producers),
        )
        .route("/v1/groups", get(groups))
        .route("/v1/groups/{group}", get(group))
        .route("/v1/raft", get(raft))
        .route("/metrics", get(metrics))
        .route(
            "/v1/partitions/{topic}/{partition}/transfer-leadership",
            post(transfer_leadership),
        )
        .route("/v1/brokers/{id}/decommission", post(decommission))
        .route(
            "/v1/partitions/{topic}/{partition}/reassign",
            post(reassign),
        )
        .route("/v1/reassignments", get(reassignments))
        .route(
            "/v1/debug/storage-faults",
            get(storage_faults_get).post(storage_faults_set),
        )
        .fallback(not_found)
        .with_state(broker)
        // Outermost: the guard sees every request first, and every response last.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            guard::guard,
        ))
}

/// The one error shape: `{"error": "...", "status": N}` with that status.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": message.into(), "status": status.as_u16() })),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}
