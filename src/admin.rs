//! Admin HTTP (axum): JSON views of cluster, brokers, topics, partitions and Raft groups, a health
//! check, and Prometheus metrics. Read-only for now.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::node::Node;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/cluster", get(cluster))
        .route("/v1/brokers", get(brokers))
        .route("/v1/topics", get(topics))
        .route("/v1/topics/{topic}", get(topic))
        .route("/v1/raft", get(raft))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(node)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn health(State(node): State<Arc<Node>>) -> Response {
    let ready = node.is_ready();
    let body = json!({
        "ready": ready,
        "node_id": node.cfg.node_id,
        "controller_id": node.controller_id(),
        "partitions": node.partition_count(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

fn brokers_json(node: &Node) -> Vec<Value> {
    node.state()
        .brokers
        .values()
        .map(|b| {
            json!({
                "id": b.id,
                "kafka_addr": b.kafka_addr,
                "admin_addr": b.admin_addr,
                "raft_addr": b.raft_addr,
                "registered_at_ms": b.registered_at_ms,
                "live": true,
            })
        })
        .collect()
}

async fn cluster(State(node): State<Arc<Node>>) -> Json<Value> {
    let meta = node.raft.meta().status();
    Json(json!({
        "cluster_id": node.state().cluster_id,
        "node_id": node.cfg.node_id,
        "controller_id": node.controller_id(),
        "metadata_term": meta.term,
        "metadata_commit_index": meta.commit_index,
        "brokers": brokers_json(&node),
    }))
}

async fn brokers(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(Value::Array(brokers_json(&node)))
}

async fn topics(State(node): State<Arc<Node>>) -> Json<Value> {
    let st = node.state();
    Json(Value::Array(
        st.topics
            .values()
            .map(|t| {
                json!({
                    "name": t.name,
                    "id": t.id_hex(),
                    "partitions": t.partitions.len(),
                    "replication_factor": t.replication_factor(),
                    "configs": t.configs,
                })
            })
            .collect(),
    ))
}

async fn topic(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Response {
    let Some(t) = node.state().topics.get(&name).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("topic '{name}' does not exist"),
        );
    };
    let partitions: Vec<Value> = t
        .partitions
        .iter()
        .enumerate()
        .map(|(p, replicas)| {
            let g = node.partition(&name, p as i32);
            json!({
                "partition": p,
                "replicas": replicas,
                "leader": g.as_ref().and_then(|g| g.leader()),
                "leader_epoch": g.as_ref().map(|g| g.leader_epoch()),
                "in_sync_replicas": g.as_ref().map(|g| g.status().voters),
                "log_start_offset": g.as_ref().map(|g| g.log_start_offset()),
                "log_end_offset": g.as_ref().map(|g| g.log_end_offset()),
                "high_watermark": g.as_ref().map(|g| g.high_watermark()),
            })
        })
        .collect();
    Json(json!({
        "name": t.name,
        "id": t.id_hex(),
        "configs": t.configs,
        "partitions": partitions,
    }))
    .into_response()
}

async fn raft(State(node): State<Arc<Node>>) -> Json<Value> {
    let groups: Vec<Value> = node
        .raft
        .status()
        .into_iter()
        .map(|s| {
            json!({
                "group": s.group,
                "role": s.role,
                "term": s.term,
                "leader": s.leader,
                "last_log_index": s.last_log_index,
                "commit_index": s.commit_index,
                "applied_index": s.applied_index,
                "voters": s.voters,
                "match_index": s.match_index,
            })
        })
        .collect();
    Json(json!({ "node_id": node.cfg.node_id, "groups": groups }))
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let mut out = String::new();
    node.metrics.render(&mut out);
    use std::fmt::Write;
    let _ = writeln!(out, "# TYPE sluice_partitions gauge");
    let _ = writeln!(out, "sluice_partitions {}", node.partition_count());
    for s in node.raft.status() {
        let _ = writeln!(out, "sluice_raft_term{{group=\"{}\"}} {}", s.group, s.term);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
