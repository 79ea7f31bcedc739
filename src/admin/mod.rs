//! Admin HTTP (axum): JSON views of cluster, brokers, topics, partitions, consumer groups (`groups`) and Raft groups, a health
//! check and Prometheus metrics (`views`); leadership transfer, reassignment, decommission and
//! (chaos tests only, with `SLUICE_STORAGE_FAULTS=1`) the storage fault switch (`ops`). Handlers
//! read and act through `broker::Broker` only.

mod consumer_groups;
mod ops;
mod views;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::broker::Broker;
use consumer_groups::{group, groups};
use ops::*;
use views::*;

pub fn router(broker: Arc<Broker>) -> Router {
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
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}
