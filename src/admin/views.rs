//! Read-only views: health, cluster, brokers, topics, Raft groups, metrics.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error;
use crate::broker::Broker;
use crate::controller::PartitionId;

pub(super) async fn health(State(broker): State<Arc<Broker>>) -> Response {
    let ready = broker.is_ready();
    let body = json!({
        "ready": ready,
        "node_id": broker.cfg.node_id,
        "controller_id": broker.controller_id(),
        "partitions": broker.partitions.len(),
        "storage_fence": broker.health.storage_fence(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub(super) fn brokers_json(broker: &Broker) -> Vec<Value> {
    let st = broker.state();
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

pub(super) async fn cluster(State(broker): State<Arc<Broker>>) -> Json<Value> {
    let meta = broker.raft.meta().status();
    Json(json!({
        "cluster_id": broker.state().cluster_id,
        "node_id": broker.cfg.node_id,
        "controller_id": broker.controller_id(),
        "metadata_term": meta.term,
        "metadata_commit_index": meta.commit_index,
        "brokers": brokers_json(&broker),
    }))
}

pub(super) async fn brokers(State(broker): State<Arc<Broker>>) -> Json<Value> {
    Json(Value::Array(brokers_json(&broker)))
}

pub(super) async fn topics(State(broker): State<Arc<Broker>>) -> Json<Value> {
    let st = broker.state();
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

pub(super) async fn topic(State(broker): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    let Some(t) = broker.state().topics.get(&name).cloned() else {
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
            let p = PartitionId::from_index(p);
            let g = broker.partition(&name, p);
            // This node's replica knows best; a node without one answers from what leaders
            // reported to the controller, as Metadata does.
            let leader = broker.partition_leader_in(&broker.state(), &name, p);
            json!({
                "partition": p,
                "replicas": replicas,
                "reassigning_to": t.reassigning.get(&p),
                "leader": leader.map(|(l, _)| l),
                "leader_epoch": leader.map(|(_, e)| e),
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

pub(super) async fn raft(State(broker): State<Arc<Broker>>) -> Json<Value> {
    let groups: Vec<Value> = broker
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
                "storage_error": s.storage_error,
                // Partition groups only: where this replica's Kafka log starts and ends.
                "log_start_offset": broker.raft.partition(&s.group).map(|g| g.log_start_offset()),
                "log_end_offset": broker.raft.partition(&s.group).map(|g| g.log_end_offset()),
            })
        })
        .collect();
    Json(json!({ "node_id": broker.cfg.node_id, "groups": groups }))
}

pub(super) async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let mut out = String::new();
    broker.metrics.render(&mut out);
    use std::fmt::Write;
    let _ = writeln!(out, "# TYPE sluice_partitions gauge");
    let _ = writeln!(out, "sluice_partitions {}", broker.partitions.len());
    // What fetch responses may still take of sluice.fetch.memory.bytes: near 0 for long means
    // responses are held by clients that do not read.
    let _ = writeln!(out, "# TYPE sluice_fetch_budget_available_bytes gauge");
    let _ = writeln!(
        out,
        "sluice_fetch_budget_available_bytes {}",
        broker.fetch_budget.available_permits()
    );
    // A term bump is an election, so the term is the election counter per group.
    let _ = writeln!(out, "# TYPE sluice_raft_term counter");
    for s in broker.raft.status() {
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
    // Their ratio is the batches one fsync carried on this replica (group commit); both count
    // from when the partition last opened on this node.
    for name in ["log_fsyncs_total", "log_appended_batches_total"] {
        let _ = writeln!(out, "# TYPE sluice_partition_{name} counter");
    }
    // 1 while this replica's Raft core is stopped on a storage error (it is being reopened).
    let _ = writeln!(out, "# TYPE sluice_partition_storage_failed gauge");
    let topics: Vec<(String, usize)> = broker
        .state()
        .topics
        .values()
        .map(|t| (t.name.clone(), t.partitions.len()))
        .collect();
    for (t, n) in topics {
        for p in (0..n).map(PartitionId::from_index) {
            let Some(g) = broker.partition(&t, p) else {
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
            let _ = writeln!(
                out,
                "sluice_partition_storage_failed{{{l}}} {}",
                u8::from(g.failure().is_some())
            );
            let (fsyncs, batches) = g.io_counters();
            let _ = writeln!(out, "sluice_partition_log_fsyncs_total{{{l}}} {fsyncs}");
            let _ = writeln!(
                out,
                "sluice_partition_log_appended_batches_total{{{l}}} {batches}"
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

/// The partition's idempotent producers, from this node's replica if it leads the partition.
pub(super) async fn producers(
    State(broker): State<Arc<Broker>>,
    Path((topic, partition)): Path<(String, PartitionId)>,
) -> Response {
    use crate::errors::ErrorCode;
    match crate::partition::producers::leader_table(&broker, &topic, partition) {
        Ok(table) => {
            let producers: Vec<Value> = table
                .iter()
                .map(|(id, e)| {
                    json!({
                        "producer_id": id,
                        "epoch": e.epoch,
                        "last_sequence": e.batches.back().map(|b| b.last_seq),
                        "last_timestamp": e.last_timestamp,
                        "batches": e.batches.iter().map(|b| json!({
                            "first_sequence": b.first_seq,
                            "last_sequence": b.last_seq,
                            "base_offset": b.base_offset,
                            "last_offset": b.last_offset,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            Json(json!({ "topic": topic, "partition": partition, "producers": producers }))
                .into_response()
        }
        Err((ErrorCode::UnknownTopicOrPartition, m)) => error(StatusCode::NOT_FOUND, m),
        Err((_, m)) => {
            let leader = {
                let st = broker.state();
                broker
                    .partition_leader_in(&st, &topic, partition)
                    .map(|l| l.0)
            };
            error(
                StatusCode::CONFLICT,
                format!("{m}; ask the leader (node {leader:?})"),
            )
        }
    }
}
