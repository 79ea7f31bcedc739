//! Metadata (key 3): brokers, controller, and per-partition leader/replicas/ISR. Creates unknown
//! topics when the client asks and `auto.create.topics.enable` allows it.

use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::{create_topics, split_host_port};
use crate::broker::Broker;
use crate::controller::validate_topic_name;
use crate::controller::PartitionId;
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 0;
/// v13 adds top-level error codes for KRaft controllers only; v12 is what current clients use.
pub const MAX_VERSION: i16 = 12;

pub async fn handle(broker: &Broker, version: i16, req: MetadataRequest) -> MetadataResponse {
    // v0 sends an empty list to mean "all topics"; later versions send null.
    let requested: Option<Vec<String>> = match req.topics {
        None => None,
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(
            t.into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        ),
    };
    // v4+ lets the client refuse auto-creation; before v4 the codec decodes it as true, and
    // authorization may have turned it off for a principal without Create.
    let allow_auto = broker.cfg.auto_create_topics_enable && req.allow_auto_topic_creation;

    let mut auto_create_errors = std::collections::BTreeMap::new();
    if let Some(names) = &requested {
        if allow_auto {
            for name in names {
                if broker.state().topics.contains_key(name) || validate_topic_name(name).is_err() {
                    continue;
                }
                if let Err((code, msg)) = create_topics::create_topic(
                    broker,
                    name,
                    broker.cfg.num_partitions,
                    broker.cfg.default_replication_factor,
                    Default::default(),
                    false,
                )
                .await
                {
                    if code != ErrorCode::TopicAlreadyExists {
                        tracing::info!(topic = %name, %msg, "auto-create failed");
                        auto_create_errors.insert(name.clone(), code);
                    }
                }
            }
        }
    }

    let st = broker.state();
    let brokers = st
        .brokers
        .values()
        .filter(|b| !st.fenced.contains(&b.id))
        .map(|b| {
            let (host, port) = split_host_port(&b.kafka_addr);
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.id as i32))
                .with_host(StrBytes::from_string(host))
                .with_port(port)
        })
        .collect();

    let names: Vec<String> = match &requested {
        None => st.topics.keys().cloned().collect(),
        Some(n) => n.clone(),
    };
    let topics = names
        .into_iter()
        .map(|name| {
            let base = MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(name.clone()))));
            if let Err(_m) = validate_topic_name(&name) {
                return base.with_error_code(ErrorCode::InvalidTopicException.code());
            }
            let Some(t) = st.topics.get(&name) else {
                let code = auto_create_errors
                    .get(&name)
                    .copied()
                    .unwrap_or(ErrorCode::UnknownTopicOrPartition);
                return base.with_error_code(code.code());
            };
            let partitions = t
                .partitions
                .iter()
                .enumerate()
                .map(|(p, replicas)| {
                    let replica_ids: Vec<BrokerId> =
                        replicas.iter().map(|r| BrokerId(*r as i32)).collect();
                    let (leader, epoch, isr) =
                        match broker.partition_leader_in(&st, &name, PartitionId::from_index(p)) {
                            // Replicas on fenced brokers are certainly not in sync.
                            Some((l, e)) => (
                                l as i32,
                                e,
                                replicas
                                    .iter()
                                    .filter(|r| !st.fenced.contains(r))
                                    .map(|r| BrokerId(*r as i32))
                                    .collect(),
                            ),
                            None => (-1, -1, Vec::new()),
                        };
                    let error = if leader < 0 {
                        ErrorCode::LeaderNotAvailable.code()
                    } else {
                        0
                    };
                    MetadataResponsePartition::default()
                        .with_error_code(error)
                        .with_partition_index(p as i32)
                        .with_leader_id(BrokerId(leader))
                        .with_leader_epoch(epoch)
                        .with_replica_nodes(replica_ids)
                        .with_isr_nodes(isr)
                })
                .collect();
            base.with_topic_id(uuid::Uuid::from_bytes(t.id))
                .with_partitions(partitions)
        })
        .collect();

    MetadataResponse::default()
        .with_brokers(brokers)
        .with_cluster_id(st.cluster_id.clone().map(StrBytes::from_string))
        .with_controller_id(BrokerId(
            broker.controller_id().map(|c| c as i32).unwrap_or(-1),
        ))
        .with_topics(topics)
}
