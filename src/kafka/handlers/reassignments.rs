//! AlterPartitionReassignments (key 45) and ListPartitionReassignments (key 46): what
//! `kafka-reassign-partitions.sh` and AdminClient use to move partitions between brokers. A move is
//! recorded by the controller and carried out by the partition's leader (see `node.rs`).

use std::collections::BTreeSet;

use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::create_topics::code_from;
use crate::broker::Broker;
use crate::controller::{Command, PartitionId, Reply};
use crate::errors::ErrorCode;

pub const ALTER_MIN_VERSION: i16 = 0;
pub const ALTER_MAX_VERSION: i16 = 1;
pub const LIST_MIN_VERSION: i16 = 0;
pub const LIST_MAX_VERSION: i16 = 0;

async fn alter_one(
    broker: &Broker,
    topic: &str,
    partition: i32,
    replicas: Option<Vec<BrokerId>>,
    allow_rf_change: bool,
) -> Result<(), (ErrorCode, String)> {
    let Some(replicas) = replicas else {
        // Kafka reverts to the old replica set; a half-done Raft membership change cannot simply
        // be dropped, so say so instead of pretending.
        return Err((
            ErrorCode::InvalidRequest,
            "cancelling a reassignment is not supported; reassign back to the old replicas instead"
                .into(),
        ));
    };
    let partition = PartitionId::from_wire(partition).ok_or_else(|| {
        (
            ErrorCode::UnknownTopicOrPartition,
            format!("no partition {partition}"),
        )
    })?;
    let mut target = Vec::with_capacity(replicas.len());
    for b in replicas {
        let id = u64::try_from(b.0).map_err(|_| {
            (
                ErrorCode::InvalidReplicaAssignment,
                format!("broker id {} is negative", b.0),
            )
        })?;
        target.push(id);
    }
    if !allow_rf_change {
        let st = broker.state();
        let current = st
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition.index()))
            .map(Vec::len);
        if current.is_some_and(|n| n != target.len()) {
            return Err((
                ErrorCode::InvalidReplicationFactor,
                "the new replica set changes the replication factor".into(),
            ));
        }
    }
    match broker
        .propose(&Command::ReassignPartitions {
            topic: topic.to_string(),
            moves: vec![(partition, target)],
        })
        .await
    {
        Ok(Reply::Ok | Reply::ProducerIds { .. } | Reply::Groups(_) | Reply::AclsDeleted(_)) => {
            Ok(())
        }
        Ok(Reply::Err { code, message }) => Err((
            if code == ErrorCode::InvalidReplicaAssignment.code() {
                ErrorCode::InvalidReplicaAssignment
            } else {
                code_from(code)
            },
            message,
        )),
        Err(e) => Err((ErrorCode::RequestTimedOut, e.to_string())),
    }
}

pub async fn alter(
    broker: &Broker,
    _version: i16,
    req: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    let mut responses = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut partitions = Vec::new();
        for p in t.partitions {
            let mut r = ReassignablePartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_error_message(None);
            if let Err((code, msg)) = alter_one(
                broker,
                &name,
                p.partition_index,
                p.replicas,
                req.allow_replication_factor_change,
            )
            .await
            {
                r = r
                    .with_error_code(code.code())
                    .with_error_message(Some(StrBytes::from_string(msg)));
            }
            partitions.push(r);
        }
        responses.push(
            ReassignableTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    AlterPartitionReassignmentsResponse::default()
        .with_error_message(None)
        .with_allow_replication_factor_change(req.allow_replication_factor_change)
        .with_responses(responses)
}

fn ids(set: impl IntoIterator<Item = u64>) -> Vec<BrokerId> {
    set.into_iter().map(|b| BrokerId(b as i32)).collect()
}

pub fn list(
    broker: &Broker,
    _version: i16,
    req: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    let st = broker.state();
    // None = every topic; otherwise only the named partitions.
    let wanted: Option<Vec<(String, BTreeSet<i32>)>> = req.topics.map(|ts| {
        ts.into_iter()
            .map(|t| {
                (
                    t.name.0.to_string(),
                    t.partition_indexes.into_iter().collect(),
                )
            })
            .collect()
    });
    let mut topics = Vec::new();
    for t in st.topics.values() {
        let filter = match &wanted {
            None => None,
            Some(w) => match w.iter().find(|(n, _)| *n == t.name) {
                Some((_, ps)) => Some(ps),
                None => continue,
            },
        };
        let mut partitions = Vec::new();
        for (p, target) in &t.reassigning {
            if filter.is_some_and(|f| !f.contains(&p.wire())) {
                continue;
            }
            let current: BTreeSet<u64> = t
                .partitions
                .get(p.index())
                .map(|r| r.iter().copied().collect())
                .unwrap_or_default();
            let target_set: BTreeSet<u64> = target.iter().copied().collect();
            // Kafka's view: replicas = the union while moving; adding and removing the differences.
            let mut replicas: Vec<u64> = target.clone();
            replicas.extend(current.difference(&target_set).copied());
            partitions.push(
                OngoingPartitionReassignment::default()
                    .with_partition_index(p.wire())
                    .with_replicas(ids(replicas))
                    .with_adding_replicas(ids(target_set.difference(&current).copied()))
                    .with_removing_replicas(ids(current.difference(&target_set).copied())),
            );
        }
        if !partitions.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(kafka_protocol::messages::TopicName(StrBytes::from_string(
                        t.name.clone(),
                    )))
                    .with_partitions(partitions),
            );
        }
    }
    ListPartitionReassignmentsResponse::default()
        .with_error_message(None)
        .with_topics(topics)
}
