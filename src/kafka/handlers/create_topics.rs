//! CreateTopics (key 19): validates, places replicas over live brokers, proposes the topic to the
//! metadata group, and answers once its partitions have leaders (so an immediate produce works).

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::topic_config::{self, TopicConfig, TOPIC_CONFIG_KEYS};
use crate::controller::{validate_topic_name, Command, MetaState, Reply, TopicMeta};
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 2;
pub const MAX_VERSION: i16 = 7;

/// Upper bound on partitions per request, so a typo cannot create a million Raft groups.
pub const PARTITIONS_MAX: i32 = 10_000;

pub type CreateError = (ErrorCode, String);

/// Refuses `adding` partitions when the cluster would then hold more than
/// `sluice.max.partitions`. Checked when proposed (each node's configured cap may differ, so
/// applying may not depend on it): concurrent creates can overshoot by what they add together.
pub fn check_partition_cap(broker: &Broker, adding: usize) -> Result<(), CreateError> {
    let have: usize = broker
        .state()
        .topics
        .values()
        .map(|t| t.partitions.len())
        .sum();
    let cap = broker.cfg.max_partitions;
    if have + adding > cap {
        return Err((
            ErrorCode::PolicyViolation,
            format!(
                "the cluster holds {have} partitions; {adding} more would pass sluice.max.partitions ({cap})"
            ),
        ));
    }
    Ok(())
}

pub async fn create_topic(
    broker: &Broker,
    name: &str,
    partitions: i32,
    replication_factor: i16,
    configs: BTreeMap<String, String>,
    validate_only: bool,
) -> Result<(), CreateError> {
    validate_topic_name(name).map_err(|m| (ErrorCode::InvalidTopicException, m))?;
    let partitions = if partitions == -1 {
        broker.cfg.num_partitions
    } else {
        partitions
    };
    if !(1..=PARTITIONS_MAX).contains(&partitions) {
        return Err((
            ErrorCode::InvalidPartitions,
            format!(
                "number of partitions must be between 1 and {PARTITIONS_MAX}, got {partitions}"
            ),
        ));
    }
    let rf = if replication_factor == -1 {
        broker.cfg.default_replication_factor
    } else {
        replication_factor
    };
    let brokers = broker.live_brokers();
    if rf < 1 || rf as usize > brokers.len() {
        return Err((
            ErrorCode::InvalidReplicationFactor,
            format!(
                "replication factor {rf} is invalid: must be between 1 and the number of live brokers ({})",
                brokers.len()
            ),
        ));
    }
    for (k, v) in &configs {
        topic_config::validate(k, v).map_err(|m| (ErrorCode::InvalidConfig, m))?;
    }
    if broker.state().topics.contains_key(name) {
        return Err((
            ErrorCode::TopicAlreadyExists,
            format!("topic '{name}' already exists"),
        ));
    }
    check_partition_cap(broker, partitions as usize)?;
    if validate_only {
        return Ok(());
    }
    let topic = TopicMeta {
        name: name.to_string(),
        id: rand::random(),
        partitions: MetaState::place_replicas(&brokers, 0, partitions as usize, rf as usize),
        configs,
        leaders: Default::default(),
        reassigning: Default::default(),
    };
    match broker.propose(&Command::CreateTopic { topic }).await {
        Ok(Reply::Ok | Reply::ProducerIds { .. } | Reply::Groups(_) | Reply::AclsDeleted(_)) => {}
        Ok(Reply::Err { code, message }) => return Err((code_from(code), message)),
        Err(e) => {
            return Err((
                ErrorCode::RequestTimedOut,
                format!("metadata proposal failed: {e}"),
            ))
        }
    }
    // Like Kafka, the topic exists once its metadata commits; waiting a little for leaders lets an
    // immediate produce succeed, but a replica set that includes a broker that just died must
    // not hold the answer hostage.
    if !broker
        .wait_for_partitions(name, Duration::from_secs(5))
        .await
    {
        tracing::warn!(topic = %name, "topic created but not all partitions have leaders yet");
    }
    Ok(())
}

pub fn code_from(code: i16) -> ErrorCode {
    match code {
        17 => ErrorCode::InvalidTopicException,
        36 => ErrorCode::TopicAlreadyExists,
        37 => ErrorCode::InvalidPartitions,
        38 => ErrorCode::InvalidReplicationFactor,
        3 => ErrorCode::UnknownTopicOrPartition,
        40 => ErrorCode::InvalidConfig,
        44 => ErrorCode::PolicyViolation,
        _ => ErrorCode::InvalidRequest,
    }
}

pub async fn handle(
    broker: &Broker,
    version: i16,
    req: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::new();
    let cap = broker.cfg.create_topics_max_per_request;
    for (i, t) in req.topics.into_iter().enumerate() {
        if i >= cap {
            let mut r = CreatableTopicResult::default()
                .with_name(t.name.clone())
                .with_error_code(ErrorCode::PolicyViolation.code());
            if version >= 1 {
                r = r.with_error_message(Some(StrBytes::from_string(format!(
                    "at most {cap} topics per CreateTopics request (sluice.create.topics.max.per.request)"
                ))));
            }
            results.push(r);
            continue;
        }
        let name = t.name.0.to_string();
        let configs: BTreeMap<String, String> = t
            .configs
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    c.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        let outcome = if !t.assignments.is_empty() {
            Err((
                ErrorCode::InvalidReplicaAssignment,
                "manual replica assignment is not supported; give partitions and replication factor"
                    .to_string(),
            ))
        } else {
            create_topic(
                broker,
                &name,
                t.num_partitions,
                t.replication_factor,
                configs.clone(),
                req.validate_only,
            )
            .await
        };
        let mut r = CreatableTopicResult::default().with_name(t.name.clone());
        match outcome {
            Ok(()) => {
                let st = broker.state();
                if let Some(meta) = st.topics.get(&name) {
                    r = r
                        .with_topic_id(uuid::Uuid::from_bytes(meta.id))
                        .with_num_partitions(meta.partitions.len() as i32)
                        .with_replication_factor(meta.replication_factor() as i16);
                } else {
                    r = r
                        .with_num_partitions(t.num_partitions)
                        .with_replication_factor(t.replication_factor);
                }
                if version >= 5 {
                    let effective = TopicConfig::resolve(Some(&configs), &broker.cfg);
                    let cfgs = TOPIC_CONFIG_KEYS
                        .iter()
                        .map(|k| {
                            let v = effective.value(k);
                            CreatableTopicConfigs::default()
                                .with_name(StrBytes::from_static_str(k))
                                .with_value(Some(StrBytes::from_string(v)))
                                .with_config_source(if configs.contains_key(*k) { 1 } else { 5 })
                        })
                        .collect();
                    r = r.with_configs(Some(cfgs));
                }
            }
            Err((code, msg)) => {
                r = r
                    .with_error_code(code.code())
                    .with_error_message(Some(StrBytes::from_string(msg)))
                    .with_num_partitions(-1)
                    .with_replication_factor(-1);
            }
        }
        results.push(r);
    }
    CreateTopicsResponse::default().with_topics(results)
}
