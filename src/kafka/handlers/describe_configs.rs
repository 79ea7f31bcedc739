//! DescribeConfigs (key 32): topic configs (explicit values and broker defaults) and broker configs.

use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::topic_config::{TopicConfig, TOPIC_CONFIG_KEYS};
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 1;
pub const MAX_VERSION: i16 = 4;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's ConfigSource values.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

fn broker_configs(broker: &Broker) -> Vec<(&'static str, String)> {
    let c = &broker.cfg;
    vec![
        ("node.id", c.node_id.to_string()),
        ("broker.id", c.node_id.to_string()),
        ("listeners", format!("PLAINTEXT://{}", c.kafka_addr)),
        (
            "advertised.listeners",
            format!("PLAINTEXT://{}", c.advertised_kafka_addr()),
        ),
        ("log.dirs", c.data_dir.display().to_string()),
        ("num.partitions", c.num_partitions.to_string()),
        (
            "default.replication.factor",
            c.default_replication_factor.to_string(),
        ),
        (
            "auto.create.topics.enable",
            c.auto_create_topics_enable.to_string(),
        ),
        ("message.max.bytes", c.message_max_bytes.to_string()),
        ("log.segment.bytes", c.log_segment_bytes.to_string()),
        ("log.retention.ms", c.log_retention_ms.to_string()),
        ("log.retention.bytes", c.log_retention_bytes.to_string()),
        (
            "log.retention.check.interval.ms",
            c.log_retention_check_interval_ms.to_string(),
        ),
        (
            "socket.request.max.bytes",
            c.socket_request_max_bytes.to_string(),
        ),
        ("fetch.max.bytes", c.fetch_max_bytes.to_string()),
        (
            "connections.max.idle.ms",
            c.connections_max_idle_ms
                .map_or(-1, |ms| ms as i64)
                .to_string(),
        ),
    ]
}

fn entry(name: &str, value: String, source: i8, read_only: bool) -> DescribeConfigsResourceResult {
    DescribeConfigsResourceResult::default()
        .with_name(StrBytes::from_string(name.to_string()))
        .with_value(Some(StrBytes::from_string(value)))
        .with_read_only(read_only)
        .with_config_source(source)
}

pub fn handle(
    broker: &Broker,
    _version: i16,
    req: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let results = req
        .resources
        .into_iter()
        .map(|res| {
            let name = res.resource_name.to_string();
            let wanted = |k: &str| {
                res.configuration_keys
                    .as_ref()
                    .map(|keys| keys.iter().any(|w| w.as_str() == k))
                    .unwrap_or(true)
            };
            let base = DescribeConfigsResult::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name.clone());
            match res.resource_type {
                RESOURCE_TOPIC => {
                    let st = broker.state();
                    let Some(t) = st.topics.get(&name) else {
                        return base
                            .with_error_code(ErrorCode::UnknownTopicOrPartition.code())
                            .with_error_message(Some(StrBytes::from_string(format!(
                                "topic '{name}' does not exist"
                            ))));
                    };
                    let effective = TopicConfig::resolve(Some(&t.configs), &broker.cfg);
                    let configs = TOPIC_CONFIG_KEYS
                        .iter()
                        .filter(|k| wanted(k))
                        .map(|k| {
                            let source = if t.configs.contains_key(*k) {
                                SOURCE_TOPIC
                            } else {
                                SOURCE_DEFAULT
                            };
                            entry(k, effective.value(k), source, false)
                        })
                        .collect();
                    base.with_configs(configs)
                }
                RESOURCE_BROKER => {
                    if name != broker.cfg.node_id.to_string() && !name.is_empty() {
                        return base
                            .with_error_code(ErrorCode::InvalidRequest.code())
                            .with_error_message(Some(StrBytes::from_string(format!(
                                "this is broker {}, not {name}",
                                broker.cfg.node_id
                            ))));
                    }
                    let configs = broker_configs(broker)
                        .into_iter()
                        .filter(|(k, _)| wanted(k))
                        .map(|(k, v)| entry(k, v, SOURCE_STATIC_BROKER, true))
                        .collect();
                    base.with_configs(configs)
                }
                other => base
                    .with_error_code(ErrorCode::InvalidRequest.code())
                    .with_error_message(Some(StrBytes::from_string(format!(
                        "resource type {other} is not supported"
                    )))),
            }
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}
