//! Cluster-level client: bootstrap, metadata, and one connection per broker.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::messages::{ApiKey, BrokerId, MetadataRequest, MetadataResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::conn::BrokerConn;
use super::errors::{self, KafkaError};
use crate::errors::ErrorCode;

/// How many times a request is retried after a metadata refresh before the
/// error is reported. Small: a CLI should fail fast and clearly.
pub const MAX_RETRIES: u32 = 5;

/// Backoff before retry `attempt` (1-based): 100 ms, 200 ms, ... capped at 1 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.saturating_sub(1).min(4)).min(1000))
}

/// Topic metadata as returned by the broker, with partitions sorted by index.
///
/// The raw generated struct is kept (rather than copying its fields) because
/// its `topic_id` is a `uuid::Uuid`, a type we can hold but not name without
/// depending on the `uuid` crate ourselves.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    pub raw: MetadataResponseTopic,
}

impl TopicInfo {
    pub fn name(&self) -> &str {
        self.raw.name.as_ref().map(|n| n.0.as_str()).unwrap_or("")
    }

    pub fn partition_count(&self) -> i32 {
        i32::try_from(self.raw.partitions.len()).unwrap_or(i32::MAX)
    }

    /// Leader broker id of `partition`, or None if unknown / no leader.
    pub fn leader(&self, partition: i32) -> Option<i32> {
        self.raw
            .partitions
            .iter()
            .find(|p| p.partition_index == partition)
            .map(|p| p.leader_id.0)
            .filter(|l| *l >= 0)
    }

    pub fn has_topic_id(&self) -> bool {
        !self.raw.topic_id.is_nil()
    }
}

/// Parses `host:port` lists such as `a:9092,b:9092`.
pub fn parse_bootstrap(s: &str) -> Result<Vec<String>> {
    let addrs: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if addrs.is_empty() {
        bail!("--bootstrap-server is empty");
    }
    for a in &addrs {
        match a.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => bail!("bad bootstrap server '{a}': expected HOST:PORT"),
        }
    }
    Ok(addrs)
}

pub struct Client {
    /// Connection used for metadata and admin requests without a fixed target.
    bootstrap: BrokerConn,
    /// The `--bootstrap-server` list, kept so that a broken bootstrap connection can be replaced.
    bootstrap_servers: String,
    /// Advertised endpoints from the latest Metadata response.
    brokers: HashMap<i32, String>,
    controller_id: i32,
    /// Connections to specific brokers by node id (leaders, controller).
    conns: HashMap<i32, BrokerConn>,
    /// Ask the broker to create topics we look up (producers do, like kafka-console-producer;
    /// describe and consume must not invent topics).
    pub auto_create_topics: bool,
    /// Highest version per API on every connection (tests that play an older client).
    #[cfg(test)]
    version_caps: Vec<(kafka_protocol::messages::ApiKey, i16)>,
}

impl Client {
    /// Connects to the first reachable bootstrap server.
    pub async fn connect(bootstrap: &str) -> Result<Self> {
        let mut last_err = None;
        for addr in parse_bootstrap(bootstrap)? {
            match BrokerConn::connect(&addr).await {
                Ok(conn) => {
                    return Ok(Client {
                        bootstrap: conn,
                        bootstrap_servers: bootstrap.to_string(),
                        brokers: HashMap::new(),
                        controller_id: -1,
                        conns: HashMap::new(),
                        auto_create_topics: false,
                        #[cfg(test)]
                        version_caps: Vec::new(),
                    })
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %format!("{e:#}"), "bootstrap failed");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("no bootstrap server")))
    }

    /// From now on, speak at most version `max` of each listed API, as an older client would.
    #[cfg(test)]
    pub fn cap_versions(&mut self, caps: &[(kafka_protocol::messages::ApiKey, i16)]) {
        self.version_caps = caps.to_vec();
        for (k, max) in caps {
            self.bootstrap.cap_version(*k, *max);
            for c in self.conns.values_mut() {
                c.cap_version(*k, *max);
            }
        }
    }

    /// The caps set by [`Client::cap_versions`], for connections made elsewhere.
    #[cfg(test)]
    pub fn version_caps(&self) -> Vec<(kafka_protocol::messages::ApiKey, i16)> {
        self.version_caps.clone()
    }

    pub fn bootstrap_conn(&mut self) -> &mut BrokerConn {
        &mut self.bootstrap
    }

    /// Replaces the bootstrap connection (after an I/O error or a cancelled call left it
    /// unusable) with one to the first reachable bootstrap server.
    pub async fn reconnect_bootstrap(&mut self) -> Result<()> {
        let mut last_err = None;
        for addr in parse_bootstrap(&self.bootstrap_servers)? {
            match BrokerConn::connect(&addr).await {
                #[allow(unused_mut)]
                Ok(mut conn) => {
                    #[cfg(test)]
                    for (k, max) in &self.version_caps {
                        conn.cap_version(*k, *max);
                    }
                    self.bootstrap = conn;
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("no bootstrap server")))
    }

    /// Node ids of the brokers in the latest Metadata response, sorted.
    pub fn broker_ids(&self) -> Vec<i32> {
        let mut ids: Vec<i32> = self.brokers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Raw Metadata request. `topics: None` asks for every topic.
    pub async fn metadata(&mut self, topics: Option<&[&str]>) -> Result<MetadataResponse> {
        let version = self.bootstrap.version_for(ApiKey::Metadata)?;
        let mut req = MetadataRequest::default();
        req.topics = match topics {
            // v0 has no null array: an empty list means "all topics" there.
            None if version == 0 => Some(Vec::new()),
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        let mut t = MetadataRequestTopic::default();
                        t.name = Some(TopicName(StrBytes::from_string(n.to_string())));
                        t
                    })
                    .collect(),
            ),
        };
        // Only producers opt in: describing or consuming a missing topic should fail, not
        // silently create it with broker defaults.
        req.allow_auto_topic_creation = self.auto_create_topics;
        let resp = self.bootstrap.call(&req, version).await?;
        if version >= 13 {
            errors::check(resp.error_code, "metadata request", None)?;
        }
        self.brokers = resp
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
            .collect();
        self.controller_id = resp.controller_id.0;
        // Drop connections to brokers whose endpoint changed or vanished.
        let brokers = &self.brokers;
        self.conns
            .retain(|id, c| brokers.get(id).is_some_and(|addr| *addr == c.addr));
        Ok(resp)
    }

    /// Metadata for one topic, retrying while the topic has no leaders yet
    /// (e.g. right after creation). Fails clearly if it does not exist.
    pub async fn topic(&mut self, name: &str) -> Result<TopicInfo> {
        let mut attempt = 0;
        loop {
            let resp = self.metadata(Some(&[name])).await?;
            // Some brokers omit unknown topics instead of flagging them.
            let topic = resp
                .topics
                .into_iter()
                .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(name));
            let code = topic
                .as_ref()
                .map_or(ErrorCode::UnknownTopicOrPartition.code(), |t| t.error_code);
            match (topic, errors::check(code, &format!("topic '{name}'"), None)) {
                (Some(mut raw), Ok(())) => {
                    let leaderless = raw.partitions.iter().any(|p| p.leader_id.0 < 0);
                    if !leaderless || attempt >= MAX_RETRIES {
                        raw.partitions.sort_by_key(|p| p.partition_index);
                        return Ok(TopicInfo { raw });
                    }
                }
                (_, Err(e)) => {
                    // A missing topic is retried briefly only, in case it was
                    // created a moment ago; other stale-metadata errors
                    // (no leader yet) get the full retry budget.
                    let retry = if e.code == ErrorCode::UnknownTopicOrPartition.code() {
                        attempt < 2
                    } else {
                        e.is_stale_metadata() && attempt < MAX_RETRIES
                    };
                    if !retry {
                        return Err(e.into());
                    }
                }
                (None, Ok(())) => bail!("broker returned no metadata for topic '{name}'"),
            }
            attempt += 1;
            tracing::debug!(topic = name, attempt, "topic metadata not ready, retrying");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Connection to broker `node_id`, opened on first use.
    pub async fn broker(&mut self, node_id: i32) -> Result<&mut BrokerConn> {
        if !self.conns.contains_key(&node_id) {
            let addr = self
                .brokers
                .get(&node_id)
                .cloned()
                .ok_or_else(|| anyhow!("broker {node_id} is not in the cluster metadata"))?;
            #[allow(unused_mut)]
            let mut conn = BrokerConn::connect(&addr)
                .await
                .with_context(|| format!("connecting to broker {node_id}"))?;
            #[cfg(test)]
            for (k, max) in &self.version_caps {
                conn.cap_version(*k, *max);
            }
            self.conns.insert(node_id, conn);
        }
        self.conns
            .get_mut(&node_id)
            .ok_or_else(|| anyhow!("broker {node_id} connection vanished"))
    }

    /// The advertised `host:port` of broker `node_id`, from the latest metadata.
    pub fn broker_addr(&self, node_id: i32) -> Option<String> {
        self.brokers.get(&node_id).cloned()
    }

    /// Forgets the connection to `node_id` after an I/O error so the next
    /// use reconnects.
    pub fn drop_broker(&mut self, node_id: i32) {
        self.conns.remove(&node_id);
    }

    /// Existing connection to `node_id`, if any.
    pub fn existing_broker(&mut self, node_id: i32) -> Option<&mut BrokerConn> {
        self.conns.get_mut(&node_id)
    }

    /// Node ids with open connections.
    pub fn connected_brokers(&self) -> Vec<i32> {
        self.conns.keys().copied().collect()
    }

    /// Connection for admin requests (CreateTopics etc.): the controller if
    /// the metadata names a reachable one, else the bootstrap broker (KRaft
    /// brokers forward admin requests to the controller themselves).
    pub async fn admin(&mut self) -> Result<&mut BrokerConn> {
        if self.brokers.is_empty() {
            self.metadata(Some(&[])).await?;
        }
        let id = self.controller_id;
        if id >= 0 && self.brokers.contains_key(&id) {
            if let Err(e) = self.broker(id).await {
                tracing::debug!(error = %format!("{e:#}"), "controller unreachable, using bootstrap");
            } else {
                return self.broker(id).await;
            }
        }
        Ok(&mut self.bootstrap)
    }
}

/// `BrokerId` values as a comma-separated list, as kafka-topics prints them.
pub fn join_ids(ids: &[BrokerId]) -> String {
    ids.iter()
        .map(|b| b.0.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Turns a Kafka error into an `anyhow` error, keeping the code inspectable
/// via `downcast_ref::<KafkaError>()`.
pub fn kafka_err(code: i16, subject: &str, msg: Option<&StrBytes>) -> anyhow::Error {
    KafkaError::new(code, subject, msg.map(|m| m.as_str())).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_parsing() {
        assert_eq!(
            parse_bootstrap("127.0.0.1:9092").unwrap(),
            vec!["127.0.0.1:9092"]
        );
        assert_eq!(parse_bootstrap("a:1, b:2").unwrap(), vec!["a:1", "b:2"]);
        assert!(parse_bootstrap("nohost").is_err());
        assert!(parse_bootstrap("h:notaport").is_err());
        assert!(parse_bootstrap("").is_err());
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(50), Duration::from_millis(1000));
    }
}
