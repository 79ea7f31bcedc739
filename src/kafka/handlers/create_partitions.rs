//! CreatePartitions (key 37): raise a topic's partition count; never lower it.

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};
use kafka_protocol::protocol::StrBytes;

use super::create_topics::{code_from, PARTITIONS_MAX};
use crate::broker::Broker;
use crate::controller::{Command, MetaState, Reply};
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 0;
pub const MAX_VERSION: i16 = 3;

async fn grow(
    broker: &Broker,
    name: &str,
    count: i32,
    validate_only: bool,
) -> Result<(), (ErrorCode, String)> {
    let (current, rf) = {
        let st = broker.state();
        let t = st.topics.get(name).ok_or_else(|| {
            (
                ErrorCode::UnknownTopicOrPartition,
                format!("topic '{name}' does not exist"),
            )
        })?;
        (t.partitions.len() as i32, t.replication_factor())
    };
    if count <= current {
        return Err((
            ErrorCode::InvalidPartitions,
            format!("topic '{name}' has {current} partitions; the new count must be larger, got {count}"),
        ));
    }
    if count > PARTITIONS_MAX {
        return Err((
            ErrorCode::InvalidPartitions,
            format!("at most {PARTITIONS_MAX} partitions per topic"),
        ));
    }
    let brokers = broker.live_brokers();
    if rf > brokers.len() {
        return Err((
            ErrorCode::InvalidReplicationFactor,
            format!(
                "replication factor {rf} exceeds the {} live brokers",
                brokers.len()
            ),
        ));
    }
    super::create_topics::check_partition_cap(broker, (count - current) as usize)?;
    if validate_only {
        return Ok(());
    }
    let new_partitions =
        MetaState::place_replicas(&brokers, current as usize, (count - current) as usize, rf);
    match broker
        .propose(&Command::CreatePartitions {
            name: name.to_string(),
            new_partitions,
        })
        .await
    {
        Ok(Reply::Ok | Reply::ProducerIds { .. } | Reply::Groups(_) | Reply::AclsDeleted(_)) => {}
        Ok(Reply::Err { code, message }) => return Err((code_from(code), message)),
        Err(e) => return Err((ErrorCode::RequestTimedOut, e.to_string())),
    }
    broker
        .wait_for_partitions(name, std::time::Duration::from_secs(30))
        .await;
    Ok(())
}

pub async fn handle(
    broker: &Broker,
    _version: i16,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut results = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let outcome = if t.assignments.as_ref().is_some_and(|a| !a.is_empty()) {
            Err((
                ErrorCode::InvalidReplicaAssignment,
                "manual replica assignment is not supported".to_string(),
            ))
        } else {
            grow(broker, &name, t.count, req.validate_only).await
        };
        let mut r = CreatePartitionsTopicResult::default().with_name(t.name);
        if let Err((code, msg)) = outcome {
            r = r
                .with_error_code(code.code())
                .with_error_message(Some(StrBytes::from_string(msg)));
        }
        results.push(r);
    }
    CreatePartitionsResponse::default().with_results(results)
}
