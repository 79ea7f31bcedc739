//! `sluice topics ...`: create, list, describe, delete, alter.

use std::io::Write;

use anyhow::{bail, Result};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::{
    ApiKey, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest,
    DescribeConfigsRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::client::{backoff, join_ids, kafka_err, Client, TopicInfo, MAX_RETRIES};
use super::errors;
use super::{TopicsAlterArgs, TopicsCommand, TopicsCreateArgs};
use crate::errors::ErrorCode;

/// Broker-side timeout for admin operations.
const ADMIN_TIMEOUT_MS: i32 = 30_000;
/// DescribeConfigs resource type for topics.
const RESOURCE_TOPIC: i8 = 2;
/// DescribeConfigs config source for per-topic overrides.
const DYNAMIC_TOPIC_CONFIG: i8 = 1;

pub async fn run(cmd: TopicsCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        TopicsCommand::Create(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            create(&mut c, &a).await?;
            writeln!(out, "Created topic {}.", a.name)?;
        }
        TopicsCommand::List(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            for name in list(&mut c).await? {
                writeln!(out, "{name}")?;
            }
        }
        TopicsCommand::Describe(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            let text = describe(&mut c, &a.name).await?;
            out.write_all(text.as_bytes())?;
        }
        TopicsCommand::Delete(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            delete(&mut c, &a.name).await?;
            writeln!(out, "Deleted topic {}.", a.name)?;
        }
        TopicsCommand::Alter(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            alter(&mut c, &a).await?;
            writeln!(
                out,
                "Altered topic {} to {} partitions.",
                a.name, a.partitions
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

/// The admin requests `topics` sends; all go to the controller.
enum AdminOp {
    Create(CreateTopicsRequest),
    /// Built per version: v6 moved names from `topic_names` to `topics`,
    /// and the encoder rejects the field the version lacks.
    Delete,
    Alter(CreatePartitionsRequest),
}

/// Sends `op` once and returns the error code and message for topic `name`.
async fn admin_once(c: &mut Client, op: &AdminOp, name: &str) -> Result<(i16, Option<StrBytes>)> {
    let conn = c.admin().await?;
    let missing = |api: &str| anyhow::anyhow!("{api} response did not mention topic '{name}'");
    match op {
        AdminOp::Create(req) => {
            let v = conn.version_for(ApiKey::CreateTopics)?;
            let defaults = req
                .topics
                .iter()
                .any(|t| t.num_partitions < 0 || t.replication_factor < 0);
            if v < 4 && defaults {
                bail!("this broker needs explicit --partitions and --replication-factor");
            }
            let resp = conn.call(req, v).await?;
            let r = resp
                .topics
                .into_iter()
                .find(|t| t.name.0.as_str() == name)
                .ok_or_else(|| missing("CreateTopics"))?;
            Ok((r.error_code, r.error_message))
        }
        AdminOp::Delete => {
            let v = conn.version_for(ApiKey::DeleteTopics)?;
            let mut req = DeleteTopicsRequest::default();
            if v >= 6 {
                let mut state = DeleteTopicState::default();
                state.name = Some(topic_name(name));
                req.topics = vec![state];
            } else {
                req.topic_names = vec![topic_name(name)];
            }
            req.timeout_ms = ADMIN_TIMEOUT_MS;
            let resp = conn.call(&req, v).await?;
            let r = resp
                .responses
                .into_iter()
                .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(name))
                .ok_or_else(|| missing("DeleteTopics"))?;
            Ok((r.error_code, r.error_message))
        }
        AdminOp::Alter(req) => {
            let v = conn.version_for(ApiKey::CreatePartitions)?;
            let resp = conn.call(req, v).await?;
            let r = resp
                .results
                .into_iter()
                .find(|t| t.name.0.as_str() == name)
                .ok_or_else(|| missing("CreatePartitions"))?;
            Ok((r.error_code, r.error_message))
        }
    }
}

/// Runs an admin request, retrying on NOT_CONTROLLER (the controller moved)
/// after refreshing metadata.
async fn admin(c: &mut Client, op: AdminOp, name: &str) -> Result<()> {
    let mut tries = 0;
    loop {
        let (code, msg) = admin_once(c, &op, name).await?;
        if code == ErrorCode::None.code() {
            return Ok(());
        }
        if code == ErrorCode::NotController.code() && tries < MAX_RETRIES {
            tries += 1;
            tokio::time::sleep(backoff(tries)).await;
            c.metadata(Some(&[])).await?;
            continue;
        }
        return Err(kafka_err(code, &format!("topic '{name}'"), msg.as_ref()));
    }
}

pub async fn create(c: &mut Client, a: &TopicsCreateArgs) -> Result<()> {
    if a.partitions.is_some_and(|p| p <= 0) {
        bail!("--partitions must be at least 1");
    }
    if a.replication_factor.is_some_and(|r| r <= 0) {
        bail!("--replication-factor must be at least 1");
    }
    let mut topic = CreatableTopic::default();
    topic.name = topic_name(&a.name);
    // -1 asks the broker for its default (CreateTopics v4+).
    topic.num_partitions = a.partitions.unwrap_or(-1);
    topic.replication_factor = a.replication_factor.unwrap_or(-1);
    topic.configs = a
        .configs
        .iter()
        .map(|(k, v)| {
            let mut cfg = CreatableTopicConfig::default();
            cfg.name = StrBytes::from_string(k.clone());
            cfg.value = Some(StrBytes::from_string(v.clone()));
            cfg
        })
        .collect();
    let mut req = CreateTopicsRequest::default();
    req.topics = vec![topic];
    req.timeout_ms = ADMIN_TIMEOUT_MS;
    admin(c, AdminOp::Create(req), &a.name).await
}

/// All topic names, sorted.
pub async fn list(c: &mut Client) -> Result<Vec<String>> {
    let resp = c.metadata(None).await?;
    let mut names: Vec<String> = resp
        .topics
        .iter()
        .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
        .collect();
    names.sort();
    Ok(names)
}

/// Renders `topics describe` output (header line plus one line per
/// partition), in kafka-topics style.
pub async fn describe(c: &mut Client, name: &str) -> Result<String> {
    let info = c.topic(name).await?;
    let configs = describe_configs(c, name).await;
    Ok(format_describe(&info, &configs))
}

/// Per-topic config overrides as `k=v`, sorted; empty if the broker cannot
/// tell (no DescribeConfigs support or an error, which is logged).
async fn describe_configs(c: &mut Client, name: &str) -> Vec<String> {
    let conn = c.bootstrap_conn();
    let Ok(version) = conn.version_for(ApiKey::DescribeConfigs) else {
        tracing::debug!("broker does not support DescribeConfigs; omitting configs");
        return Vec::new();
    };
    let mut res = DescribeConfigsResource::default();
    res.resource_type = RESOURCE_TOPIC;
    res.resource_name = StrBytes::from_string(name.to_string());
    res.configuration_keys = None;
    let mut req = DescribeConfigsRequest::default();
    req.resources = vec![res];
    let resp = match conn.call(&req, version).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("could not fetch configs of topic '{name}': {e:#}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for r in resp.results {
        if let Err(e) = errors::check(
            r.error_code,
            &format!("configs of topic '{name}'"),
            r.error_message.as_deref(),
        ) {
            tracing::warn!("{e}");
            continue;
        }
        for cfg in r.configs {
            // kafka-topics shows only values set on the topic itself.
            if cfg.config_source != DYNAMIC_TOPIC_CONFIG {
                continue;
            }
            let value = if cfg.is_sensitive {
                "<sensitive>".to_string()
            } else {
                cfg.value.as_deref().unwrap_or("null").to_string()
            };
            out.push(format!("{}={}", cfg.name, value));
        }
    }
    out.sort();
    out
}

pub fn format_describe(info: &TopicInfo, configs: &[String]) -> String {
    let parts = &info.raw.partitions;
    // As kafka-topics: the replication factor is the first partition's
    // replica count.
    let rf = parts.first().map_or(0, |p| p.replica_nodes.len());
    let mut s = format!(
        "Topic: {}  PartitionCount: {}  ReplicationFactor: {}  Configs: {}\n",
        info.name(),
        parts.len(),
        rf,
        configs.join(",")
    );
    for p in parts {
        let leader = if p.leader_id.0 < 0 {
            "none".to_string()
        } else {
            p.leader_id.0.to_string()
        };
        s.push_str(&format!(
            "  Partition: {}  Leader: {}  Replicas: {}  Isr: {}\n",
            p.partition_index,
            leader,
            join_ids(&p.replica_nodes),
            join_ids(&p.isr_nodes)
        ));
    }
    s
}

pub async fn delete(c: &mut Client, name: &str) -> Result<()> {
    admin(c, AdminOp::Delete, name).await
}

pub async fn alter(c: &mut Client, a: &TopicsAlterArgs) -> Result<()> {
    if a.partitions <= 0 {
        bail!("--partitions must be at least 1");
    }
    let mut t = CreatePartitionsTopic::default();
    t.name = topic_name(&a.name);
    t.count = a.partitions;
    t.assignments = None;
    let mut req = CreatePartitionsRequest::default();
    req.topics = vec![t];
    req.timeout_ms = ADMIN_TIMEOUT_MS;
    admin(c, AdminOp::Alter(req), &a.name).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::metadata_response::{
        MetadataResponsePartition, MetadataResponseTopic,
    };
    use kafka_protocol::messages::BrokerId;

    #[test]
    fn describe_format() {
        let mut t = MetadataResponseTopic::default();
        t.name = Some(topic_name("orders"));
        t.partitions = (0..2)
            .map(|i| {
                let mut p = MetadataResponsePartition::default();
                p.partition_index = i;
                p.leader_id = BrokerId(if i == 0 { 1 } else { -1 });
                p.replica_nodes = vec![BrokerId(1), BrokerId(2), BrokerId(3)];
                p.isr_nodes = vec![BrokerId(1), BrokerId(2)];
                p
            })
            .collect();
        let s = format_describe(
            &TopicInfo { raw: t },
            &["cleanup.policy=compact".into(), "retention.ms=1".into()],
        );
        assert_eq!(
            s,
            "Topic: orders  PartitionCount: 2  ReplicationFactor: 3  Configs: cleanup.policy=compact,retention.ms=1\n\
             \x20 Partition: 0  Leader: 1  Replicas: 1,2,3  Isr: 1,2\n\
             \x20 Partition: 1  Leader: none  Replicas: 1,2,3  Isr: 1,2\n"
        );
    }
}
