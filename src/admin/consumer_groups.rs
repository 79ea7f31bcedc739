//! Consumer-group views: every group with its state, and one group's members, assignments,
//! committed offsets and lag. Any node answers from its replicated state.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error;
use crate::broker::Broker;
use crate::controller::consumer_groups::{assignment_partitions, ConsumerGroup};
use crate::controller::PartitionId;

pub(super) async fn groups(State(broker): State<Arc<Broker>>) -> Json<Value> {
    let st = broker.state();
    let groups: Vec<Value> = st
        .consumer_groups
        .iter()
        .map(|(name, g)| {
            json!({
                "group": name,
                "state": g.state.name(),
                "protocol_type": g.protocol_type,
                "protocol": g.protocol,
                "generation": g.generation,
                "members": g.members.len(),
            })
        })
        .collect();
    Json(json!({
        "coordinator": broker.controller_id(),
        "groups": groups,
    }))
}

pub(super) async fn group(State(broker): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    let Some(g) = broker.state().consumer_groups.get(&name).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("consumer group '{name}' does not exist"),
        );
    };
    Json(group_json(&broker, &name, &g)).into_response()
}

fn group_json(broker: &Broker, name: &str, g: &ConsumerGroup) -> Value {
    let consumer = g.protocol_type.as_deref() == Some("consumer");
    let members: Vec<Value> = g
        .members
        .values()
        .map(|m| {
            let assignment: Vec<Value> = if consumer {
                assignment_partitions(&m.assignment.0)
                    .into_iter()
                    .map(|(topic, partitions)| json!({"topic": topic, "partitions": partitions}))
                    .collect()
            } else {
                Vec::new()
            };
            json!({
                "member_id": m.member_id,
                "instance_id": m.instance_id,
                "client_id": m.client_id,
                "client_host": m.client_host,
                "session_timeout_ms": m.session_timeout_ms,
                "rebalance_timeout_ms": m.rebalance_timeout_ms,
                "assignment": assignment,
            })
        })
        .collect();
    let offsets: Vec<Value> = g
        .offsets
        .iter()
        .flat_map(|(topic, parts)| {
            parts.iter().map(move |(p, o)| {
                // The high watermark of this node's replica; a node without one cannot say.
                let end = PartitionId::from_wire(*p)
                    .and_then(|p| broker.partition(topic, p))
                    .map(|r| r.high_watermark());
                json!({
                    "topic": topic,
                    "partition": p,
                    "committed_offset": o.offset,
                    "leader_epoch": o.leader_epoch,
                    "metadata": o.metadata,
                    "commit_ms": o.commit_ms,
                    "end_offset": end,
                    "lag": end.map(|e| (e - o.offset).max(0)),
                })
            })
        })
        .collect();
    json!({
        "group": name,
        "coordinator": broker.controller_id(),
        "state": g.state.name(),
        "protocol_type": g.protocol_type,
        "protocol": g.protocol,
        "generation": g.generation,
        "leader": g.leader,
        "members": members,
        "offsets": offsets,
    })
}
