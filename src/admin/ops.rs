//! Operations: leadership transfer, reassignment, decommission, and the storage fault switch.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error;
use super::guard::optional_body;
use crate::broker::Broker;
use crate::controller::PartitionId;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct TransferBody {
    /// Node to move leadership to; default: the preferred leader (first replica).
    target: Option<u64>,
}

pub(super) async fn transfer_leadership(
    State(broker): State<Arc<Broker>>,
    Path((topic, partition)): Path<(String, PartitionId)>,
    body: Bytes,
) -> Response {
    // An empty body (the guard already required the JSON content type) means the default.
    let body: TransferBody = match optional_body(&body) {
        Ok(b) => b,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let (replicas, gid) = {
        let st = broker.state();
        let Some(t) = st.topics.get(&topic) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("topic '{topic}' does not exist"),
            );
        };
        let Some(r) = t.partitions.get(partition.index()) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("topic '{topic}' has no partition {partition}"),
            );
        };
        (r.clone(), crate::controller::group_id(t, partition))
    };
    let target = body.target.or_else(|| replicas.first().copied());
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
        let st = broker.state();
        broker.partition_leader_in(&st, &topic, partition)
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
    let req = crate::rpc::AppRequest::Transfer { group: gid, target };
    match crate::rpc::call(
        &broker.raft,
        leader,
        &req,
        std::time::Duration::from_secs(40),
    )
    .await
    {
        Ok(crate::rpc::AppResponse::Ok) => {}
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

/// A partition and the replica set it moves to.
type PartitionMove = (PartitionId, Vec<u64>);

/// Per topic, the moves that take every replica off broker `id` (partitions already moving are
/// left alone). Pure over the metadata, so it is easy to test.
pub(super) fn decommission_moves(
    st: &crate::controller::MetaState,
    id: u64,
) -> Result<Vec<(String, Vec<PartitionMove>)>, String> {
    let mut load: BTreeMap<u64, usize> = st
        .brokers
        .keys()
        .filter(|b| **b != id && !st.fenced.contains(b))
        .map(|b| (*b, 0))
        .collect();
    for t in st.topics.values() {
        for r in &t.partitions {
            for b in r {
                if let Some(n) = load.get_mut(b) {
                    *n += 1;
                }
            }
        }
    }
    let mut plan = Vec::new();
    for t in st.topics.values() {
        let mut moves = Vec::new();
        for (p, replicas) in t.partitions.iter().enumerate() {
            let p = PartitionId::from_index(p);
            if !replicas.contains(&id) || t.reassigning.contains_key(&p) {
                continue;
            }
            let Some((&to, _)) = load
                .iter()
                .filter(|(b, _)| !replicas.contains(b))
                .min_by_key(|(b, n)| (**n, **b))
            else {
                return Err(format!(
                    "no live broker can take {}/{p} off broker {id} (replicas {replicas:?}); \
                     add a broker or lower the replication factor first",
                    t.name
                ));
            };
            *load.entry(to).or_default() += 1;
            let target = replicas
                .iter()
                .map(|b| if *b == id { to } else { *b })
                .collect();
            moves.push((p, target));
        }
        plan.push((t.name.clone(), moves));
    }
    Ok(plan)
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct ReassignBody {
    replicas: Vec<u64>,
}

/// Starts moving a partition to a new replica set (preferred leader first), like Kafka's
/// AlterPartitionReassignments; `GET /v1/reassignments` shows the moves still in progress.
pub(super) async fn reassign(
    State(broker): State<Arc<Broker>>,
    Path((topic, partition)): Path<(String, PartitionId)>,
    body: Bytes,
) -> Response {
    let body: ReassignBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON body {{\"replicas\": [broker ids]}}: {e}"),
            )
        }
    };
    let cmd = crate::controller::Command::ReassignPartitions {
        topic: topic.clone(),
        moves: vec![(partition, body.replicas.clone())],
    };
    match broker.propose(&cmd).await {
        Ok(
            crate::controller::Reply::Ok
            | crate::controller::Reply::ProducerIds { .. }
            | crate::controller::Reply::Groups(_)
            | crate::controller::Reply::AclsDeleted(_),
        ) => (
            StatusCode::ACCEPTED,
            Json(json!({ "topic": topic, "partition": partition, "target": body.replicas })),
        )
            .into_response(),
        Ok(crate::controller::Reply::Err { code, message }) => {
            let status = if code == crate::errors::ErrorCode::UnknownTopicOrPartition.code() {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            error(status, message)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

pub(super) async fn reassignments(State(broker): State<Arc<Broker>>) -> Response {
    let st = broker.state();
    let list: Vec<serde_json::Value> = st
        .topics
        .values()
        .flat_map(|t| {
            t.reassigning.iter().map(move |(p, target)| {
                json!({
                    "topic": t.name,
                    "partition": p,
                    "replicas": t.partitions.get(p.index()),
                    "target": target,
                })
            })
        })
        .collect();
    Json(json!({ "reassignments": list })).into_response()
}

pub(super) async fn decommission(
    State(broker): State<Arc<Broker>>,
    Path(id): Path<u64>,
) -> Response {
    let hosted: Vec<String> = {
        let st = broker.state();
        if !st.brokers.contains_key(&id) && !broker.raft.meta().voters().contains_key(&id) {
            return error(
                StatusCode::NOT_FOUND,
                format!("broker {id} is not registered"),
            );
        }
        st.partitions_on(id)
            .map(|(t, p, _)| format!("{}/{p}", t.name))
            .collect()
    };
    // A broker that still hosts replicas has them moved first: each one to the live broker with
    // the fewest replicas that does not hold the partition yet. The caller repeats the request
    // until the broker is empty and is then removed.
    if !hosted.is_empty() {
        let plan = {
            let st = broker.state();
            decommission_moves(&st, id)
        };
        let plan = match plan {
            Ok(p) => p,
            Err(why) => return error(StatusCode::CONFLICT, why),
        };
        let mut started = 0usize;
        for (topic, moves) in plan {
            if moves.is_empty() {
                continue;
            }
            started += moves.len();
            match broker
                .propose(&crate::controller::Command::ReassignPartitions { topic, moves })
                .await
            {
                Ok(
                    crate::controller::Reply::Ok
                    | crate::controller::Reply::ProducerIds { .. }
                    | crate::controller::Reply::Groups(_)
                    | crate::controller::Reply::AclsDeleted(_),
                ) => {}
                Ok(crate::controller::Reply::Err { message, .. }) => {
                    return error(StatusCode::CONFLICT, message)
                }
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        return (
            StatusCode::ACCEPTED,
            Json(json!({
                "broker": id,
                "moving": hosted.len(),
                "started": started,
                "message": format!(
                    "moving {} partition replica(s) off broker {id}; repeat this request until it answers 200",
                    hosted.len()
                ),
            })),
        )
            .into_response();
    }
    if !broker.raft.meta().is_leader() {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "send this to the controller (node {:?})",
                broker.controller_id()
            ),
        );
    }
    if let Err(e) = broker.raft.meta().remove_voter(id).await {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("membership change failed: {e}"),
        );
    }
    match broker
        .propose(&crate::controller::Command::UnregisterBroker { id })
        .await
    {
        Ok(_) => Json(json!({ "decommissioned": id })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Chaos tests only: `GET` shows the storage fault layer's rules and counters, `POST` with
/// `{"rules": [{"op": "write"|"fsync"|"any", "error": "eio"|"enospc", "path_contains": "..."}]}`
/// replaces the rules (`{"rules": []}` heals). Refused unless the node was started with
/// `SLUICE_STORAGE_FAULTS=1`.
pub(super) async fn storage_faults_get() -> Response {
    let (status, body) = storage_faults(sluice_storage::fault::layer(), None);
    (status, Json(body)).into_response()
}

pub(super) async fn storage_faults_set(body: axum::body::Bytes) -> Response {
    let (status, body) = storage_faults(sluice_storage::fault::layer(), Some(&body));
    (status, Json(body)).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StorageFaultsBody {
    rules: Vec<sluice_storage::fault::FaultRule>,
}

pub(super) fn storage_faults(
    layer: Option<&sluice_storage::fault::FaultLayer>,
    set: Option<&[u8]>,
) -> (StatusCode, Value) {
    let Some(layer) = layer else {
        return (
            StatusCode::FORBIDDEN,
            json!({ "error": format!(
                "storage faults are not enabled on this node: start it with {}=1 (chaos tests only)",
                sluice_storage::fault::ENV
            ), "status": StatusCode::FORBIDDEN.as_u16() }),
        );
    };
    if let Some(body) = set {
        match serde_json::from_slice::<StorageFaultsBody>(body) {
            Ok(b) => layer.set_rules(b.rules),
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({ "error": format!("bad body: {e}; expected {{\"rules\": [{{\"op\": \"write|fsync|any\", \"error\": \"eio|enospc\"}}]}}"), "status": StatusCode::BAD_REQUEST.as_u16() }),
                )
            }
        }
    }
    (
        StatusCode::OK,
        serde_json::to_value(layer.status()).unwrap_or(Value::Null),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{BrokerInfo, MetaState, TopicMeta};

    fn state(brokers: &[u64], parts: Vec<Vec<u64>>) -> MetaState {
        let mut st = MetaState::default();
        for id in brokers {
            st.brokers.insert(
                *id,
                BrokerInfo {
                    id: *id,
                    kafka_addr: String::new(),
                    admin_addr: String::new(),
                    raft_addr: String::new(),
                    registered_at_ms: 0,
                },
            );
        }
        st.topics.insert(
            "t".into(),
            TopicMeta {
                name: "t".into(),
                id: [1; 16],
                partitions: parts,
                configs: Default::default(),
                leaders: Default::default(),
                reassigning: Default::default(),
            },
        );
        st
    }

    #[test]
    fn storage_faults_are_refused_unless_enabled() {
        let (status, body) = storage_faults(None, Some(br#"{"rules": []}"#));
        assert_eq!(status, StatusCode::FORBIDDEN);
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains("SLUICE_STORAGE_FAULTS=1"), "{msg}");
        assert_eq!(storage_faults(None, None).0, StatusCode::FORBIDDEN);
    }

    #[test]
    fn decommission_moves_replace_the_broker_in_place_on_the_least_loaded_live_broker() {
        let mut st = state(&[1, 2, 3, 4, 5], vec![vec![3, 1], vec![1, 2], vec![2, 3]]);
        st.fenced.insert(5);
        let plan = decommission_moves(&st, 3).unwrap();
        // 4 holds nothing and 5 is fenced: both moves go to 4, and 3's position is kept.
        assert_eq!(
            plan,
            vec![(
                "t".into(),
                vec![
                    (PartitionId::new(0), vec![4, 1]),
                    (PartitionId::new(2), vec![2, 4])
                ]
            )]
        );
    }

    #[test]
    fn decommission_without_room_is_refused() {
        let st = state(&[1, 2, 3], vec![vec![1, 2, 3]]);
        let err = decommission_moves(&st, 2).unwrap_err();
        assert!(err.contains("no live broker can take"), "{err}");
    }
}
