//! Admin HTTP (axum): JSON views of cluster, brokers, topics, partitions and Raft groups, a health
//! check, and Prometheus metrics. Read-only for now.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
        .route(
            "/v1/partitions/{topic}/{partition}/transfer-leadership",
            post(transfer_leadership),
        )
        .route("/v1/brokers/{id}/decommission", post(decommission))
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
    let st = node.state();
    st.brokers
        .values()
        .map(|b| {
            json!({
                "id": b.id,
                "kafka_addr": b.kafka_addr,
                "admin_addr": b.admin_addr,
                "raft_addr": b.raft_addr,
                "registered_at_ms": b.registered_at_ms,
                "live": !st.fenced.contains(&b.id),
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
                "snapshot_index": s.snapshot_index,
                "purged_index": s.purged_index,
                // Partition groups only: where this replica's Kafka log starts and ends.
                "log_start_offset": node.raft.partition(&s.group).map(|g| g.log_start_offset()),
                "log_end_offset": node.raft.partition(&s.group).map(|g| g.log_end_offset()),
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
    // A term bump is an election, so the term is the election counter per group.
    let _ = writeln!(out, "# TYPE sluice_raft_term counter");
    for s in node.raft.status() {
        let _ = writeln!(out, "sluice_raft_term{{group=\"{}\"}} {}", s.group, s.term);
    }
    for name in [
        "high_watermark",
        "log_end_offset",
        "log_start_offset",
        "is_leader",
    ] {
        let _ = writeln!(out, "# TYPE sluice_partition_{name} gauge");
    }
    let topics: Vec<(String, usize)> = node
        .state()
        .topics
        .values()
        .map(|t| (t.name.clone(), t.partitions.len()))
        .collect();
    for (t, n) in topics {
        for p in 0..n as i32 {
            let Some(g) = node.partition(&t, p) else {
                continue;
            };
            let l = format!("topic=\"{t}\",partition=\"{p}\"");
            let _ = writeln!(
                out,
                "sluice_partition_high_watermark{{{l}}} {}",
                g.high_watermark()
            );
            let _ = writeln!(
                out,
                "sluice_partition_log_end_offset{{{l}}} {}",
                g.log_end_offset()
            );
            let _ = writeln!(
                out,
                "sluice_partition_log_start_offset{{{l}}} {}",
                g.log_start_offset()
            );
            let _ = writeln!(
                out,
                "sluice_partition_is_leader{{{l}}} {}",
                u8::from(g.is_leader())
            );
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}

#[derive(serde::Deserialize, Default)]
struct TransferBody {
    /// Node to move leadership to; default: the preferred leader (first replica).
    target: Option<u64>,
}

async fn transfer_leadership(
    State(node): State<Arc<Node>>,
    Path((topic, partition)): Path<(String, i32)>,
    body: Option<Json<TransferBody>>,
) -> Response {
    let (replicas, gid) = {
        let st = node.state();
        let Some(t) = st.topics.get(&topic) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("topic '{topic}' does not exist"),
            );
        };
        let Some(r) = t
            .partitions
            .get(partition.max(0) as usize)
            .filter(|_| partition >= 0)
        else {
            return error(
                StatusCode::NOT_FOUND,
                format!("topic '{topic}' has no partition {partition}"),
            );
        };
        (r.clone(), crate::node::group_id(t, partition))
    };
    let target = body
        .and_then(|Json(b)| b.target)
        .or_else(|| replicas.first().copied());
    let Some(target) = target else {
        return error(StatusCode::BAD_REQUEST, "no target replica");
    };
    if !replicas.contains(&target) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "node {target} is not a replica of {topic}/{partition} (replicas {replicas:?})"
            ),
        );
    }
    let leader_now = || {
        let st = node.state();
        node.partition_leader_in(&st, &topic, partition)
    };
    if leader_now().map(|(l, _)| l) == Some(target) {
        return Json(json!({ "leader": target, "changed": false })).into_response();
    }
    let Some((leader, _)) = leader_now() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{topic}/{partition} has no leader right now"),
        );
    };
    // The leader runs the transfer: it pauses new writes until the target has its whole log.
    let req = crate::cluster::AppRequest::Transfer { group: gid, target };
    match crate::cluster::call(&node, leader, &req, std::time::Duration::from_secs(40)).await {
        Ok(crate::cluster::AppResponse::Ok) => {}
        Ok(other) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("leader {leader} answered {other:?}"),
            )
        }
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("leader {leader}: {e}")),
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if let Some((l, epoch)) = leader_now() {
            if l == target {
                return Json(json!({ "leader": l, "leader_epoch": epoch, "changed": true }))
                    .into_response();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    error(
        StatusCode::GATEWAY_TIMEOUT,
        format!("leadership of {topic}/{partition} did not move to {target} within 15 s"),
    )
}

async fn decommission(State(node): State<Arc<Node>>, Path(id): Path<u64>) -> Response {
    let hosted: Vec<String> = {
        let st = node.state();
        if !st.brokers.contains_key(&id) && !node.raft.meta().voters().contains_key(&id) {
            return error(
                StatusCode::NOT_FOUND,
                format!("broker {id} is not registered"),
            );
        }
        st.partitions_on(id)
            .map(|(t, p, _)| format!("{}/{p}", t.name))
            .collect()
    };
    // Moving replicas is partition reassignment, which is not built yet; refusing is better than
    // silently shrinking replica sets.
    if !hosted.is_empty() {
        return error(
            StatusCode::CONFLICT,
            format!(
                "broker {id} still hosts {} partition replica(s) ({}); delete or move them first",
                hosted.len(),
                hosted
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if !node.raft.meta().is_leader() {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "send this to the controller (node {:?})",
                node.controller_id()
            ),
        );
    }
    if let Err(e) = node.raft.meta().remove_voter(id).await {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("membership change failed: {e}"),
        );
    }
    match node
        .propose(&crate::metadata::Command::UnregisterBroker { id })
        .await
    {
        Ok(_) => Json(json!({ "decommissioned": id })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
