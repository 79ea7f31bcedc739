//! DescribeConfigs (key 32): topic configs (explicit values and broker defaults) and broker configs.
//! Also owns the list of topic config keys Sluice accepts and how each is validated.

use std::collections::BTreeMap;

use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::protocol::StrBytes;

use crate::errors::ErrorCode;
use crate::node::Node;

pub const MIN_VERSION: i16 = 1;
pub const MAX_VERSION: i16 = 4;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's ConfigSource values.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "max.message.bytes",
    "message.timestamp.type",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
];

pub fn validate_topic_config(key: &str, value: &str) -> Result<(), String> {
    let num = |min: i64| -> Result<(), String> {
        match value.parse::<i64>() {
            Ok(n) if n >= min => Ok(()),
            _ => Err(format!(
                "invalid value '{value}' for {key}: must be an integer >= {min}"
            )),
        }
    };
    match key {
        "cleanup.policy" => match value {
            "delete" => Ok(()),
            "compact" | "compact,delete" | "delete,compact" => {
                Err("cleanup.policy=compact is not supported by Sluice; use delete".to_string())
            }
            _ => Err(format!("invalid value '{value}' for cleanup.policy")),
        },
        "max.message.bytes" => num(0),
        "message.timestamp.type" => match value {
            "CreateTime" => Ok(()),
            _ => Err(format!(
                "message.timestamp.type={value} is not supported; only CreateTime"
            )),
        },
        "retention.bytes" | "retention.ms" => num(-1),
        "segment.bytes" => num(1024),
        _ => Err(format!("unknown topic config '{key}'")),
    }
}

/// The effective value of a topic config: explicit, else the broker default.
pub fn topic_config_value(node: &Node, explicit: &BTreeMap<String, String>, key: &str) -> String {
    if let Some(v) = explicit.get(key) {
        return v.clone();
    }
    let c = &node.cfg;
    match key {
        "cleanup.policy" => "delete".into(),
        "max.message.bytes" => c.message_max_bytes.to_string(),
        "message.timestamp.type" => "CreateTime".into(),
        "retention.bytes" => c.log_retention_bytes.to_string(),
        "retention.ms" => c.log_retention_ms.to_string(),
        "segment.bytes" => c.log_segment_bytes.to_string(),
        _ => String::new(),
    }
}

fn broker_configs(node: &Node) -> Vec<(&'static str, String)> {
    let c = &node.cfg;
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

pub fn handle(node: &Node, _version: i16, req: DescribeConfigsRequest) -> DescribeConfigsResponse {
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
                    let st = node.state();
                    let Some(t) = st.topics.get(&name) else {
                        return base
                            .with_error_code(ErrorCode::UnknownTopicOrPartition.code())
                            .with_error_message(Some(StrBytes::from_string(format!(
                                "topic '{name}' does not exist"
                            ))));
                    };
                    let configs = TOPIC_CONFIG_KEYS
                        .iter()
                        .filter(|k| wanted(k))
                        .map(|k| {
                            let source = if t.configs.contains_key(*k) {
                                SOURCE_TOPIC
                            } else {
                                SOURCE_DEFAULT
                            };
                            entry(k, topic_config_value(node, &t.configs, k), source, false)
                        })
                        .collect();
                    base.with_configs(configs)
                }
                RESOURCE_BROKER => {
                    if name != node.cfg.node_id.to_string() && !name.is_empty() {
                        return base
                            .with_error_code(ErrorCode::InvalidRequest.code())
                            .with_error_message(Some(StrBytes::from_string(format!(
                                "this is broker {}, not {name}",
                                node.cfg.node_id
                            ))));
                    }
                    let configs = broker_configs(node)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_config_validation() {
        assert!(validate_topic_config("retention.ms", "-1").is_ok());
        assert!(validate_topic_config("retention.ms", "abc").is_err());
        assert!(validate_topic_config("segment.bytes", "10").is_err());
        assert!(validate_topic_config("cleanup.policy", "compact").is_err());
        assert!(validate_topic_config("no.such.key", "1").is_err());
        for k in TOPIC_CONFIG_KEYS {
            assert!(
                validate_topic_config(k, "x").is_err() || *k == "cleanup.policy",
                "{k} accepts garbage"
            );
        }
    }
}
