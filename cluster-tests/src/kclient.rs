//! The workload's Kafka operations over the `sluice` library's client: one-record produces with
//! acks=all and single-partition fetches, each classified as ok / fail / info.

use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, InitProducerIdRequest, ProduceRequest, ProducerId, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice::cli::client::{Client, TopicInfo};
use sluice::cli::errors::{self, error_name};
use sluice::cli::records::{decode_fetched, encode_batch, Message};
use sluice::errors::ErrorCode;

const TOPIC_ID_VERSION: i16 = 13;
/// Broker-side wait for replication; the client gives up a little later.
pub const PRODUCE_TIMEOUT_MS: i32 = 5_000;
const CALL_SLACK: Duration = Duration::from_secs(3);
pub const FETCH_WAIT_MS: i32 = 300;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Ok(T),
    /// Definitely did not happen (nothing was sent, or the broker refused before appending).
    Fail(String),
    /// Unknown: timeout, disconnect, or an error that does not rule out the write.
    Info(String),
}

/// What one produce request of a pipeline came to, before any policy about retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Nothing reached the broker (no metadata, no leader, no connection).
    NotSent(String),
    /// The broker answered: its error code (0 for success), base offset and a description.
    Answer {
        code: i16,
        base_offset: i64,
        message: String,
    },
    /// The request may have reached the broker, but no answer came (timeout, cut connection).
    Lost(String),
}

impl Attempt {
    /// The broker's error code, or -1 without an answer.
    pub fn code(&self) -> i16 {
        match self {
            Attempt::Answer { code, .. } => *code,
            _ => -1,
        }
    }
}

/// Errors after which the broker did not append the batch: it refused the request up front.
/// Leadership errors count as definite here because the broker says it is not the leader;
/// if such a write is read later the checker reports it (`failed_read`) and that is a finding.
pub fn definite_produce_error(code: i16) -> bool {
    use ErrorCode as E;
    matches!(
        E::from_code(code),
        Some(
            E::UnknownTopicOrPartition
                | E::LeaderNotAvailable
                | E::NotLeaderOrFollower
                | E::CorruptMessage
                | E::MessageTooLarge
                | E::InvalidTopicException
                | E::RecordListTooLarge
                // Checked before the append in Kafka.
                | E::NotEnoughReplicas
                | E::InvalidRecord
        )
    )
}

/// A client bound to one topic that reconnects through any bootstrap proxy.
pub struct KClient {
    bootstrap: Vec<String>,
    pub topic_name: String,
    client: Option<Client>,
    topic: Option<TopicInfo>,
    next_bootstrap: usize,
    /// The log start offset in the last fetch answer for the partition (success or error).
    pub last_log_start: Option<i64>,
}

impl KClient {
    pub fn new(bootstrap: Vec<String>, topic: &str, start: usize) -> KClient {
        KClient {
            bootstrap,
            topic_name: topic.to_string(),
            client: None,
            topic: None,
            next_bootstrap: start,
            last_log_start: None,
        }
    }

    /// Forgets all connections and metadata (after errors).
    pub fn reset(&mut self) {
        self.client = None;
        self.topic = None;
    }

    /// The answer of a call bounded by a timeout. After an error or a timeout the connection's
    /// state is unknown (a late answer could be read as the next one's), so it is dropped.
    fn answered<T>(
        &mut self,
        res: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
        what: &str,
    ) -> Result<T> {
        match res {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.reset();
                Err(e)
            }
            Err(_) => {
                self.reset();
                Err(anyhow!("{what} timed out"))
            }
        }
    }

    async fn ready(&mut self) -> Result<(&mut Client, &TopicInfo)> {
        if self.client.is_none() {
            let addr = self.bootstrap[self.next_bootstrap % self.bootstrap.len()].clone();
            self.next_bootstrap += 1;
            let c = tokio::time::timeout(CONNECT_TIMEOUT * 2, Client::connect(&addr))
                .await
                .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
            self.client = Some(c);
            self.topic = None;
        }
        if self.topic.is_none() {
            let c = self.client.as_mut().ok_or_else(|| anyhow!("no client"))?;
            let t = tokio::time::timeout(Duration::from_secs(5), c.topic(&self.topic_name))
                .await
                .map_err(|_| anyhow!("metadata timed out"));
            match t {
                Ok(Ok(t)) => self.topic = Some(t),
                Ok(Err(e)) | Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
        match (self.client.as_mut(), self.topic.as_ref()) {
            (Some(c), Some(t)) => Ok((c, t)),
            _ => Err(anyhow!("client not ready")),
        }
    }

    /// Forgets the topic metadata (not the connections): the next request looks the leader up.
    pub fn refresh_metadata(&mut self) {
        self.topic = None;
    }

    /// Which node leads `partition` according to our metadata, if known.
    pub fn cached_leader(&self, partition: i32) -> Option<i32> {
        self.topic.as_ref().and_then(|t| t.leader(partition))
    }

    /// Produces one record (value as decimal text) with acks=all. Ok carries the offset.
    pub async fn send(&mut self, partition: i32, value: u64) -> Outcome<i64> {
        self.send_many(partition, &[value])
            .await
            .pop()
            .unwrap_or_else(|| Outcome::Info("no outcome".into()))
    }

    /// Pipelines one produce request per value (one record each, acks=all) on the leader's
    /// connection, then reads the answers in order. One outcome per value, in order.
    pub async fn send_many(&mut self, partition: i32, values: &[u64]) -> Vec<Outcome<i64>> {
        let mut batches = Vec::with_capacity(values.len());
        for value in values {
            match encode_batch(
                &[Message {
                    key: None,
                    value: Bytes::from(value.to_string()),
                }],
                Compression::None,
                now_ms(),
            ) {
                Ok(d) => batches.push(d),
                Err(e) => return vec![Outcome::Fail(format!("encode: {e:#}")); values.len()],
            }
        }
        self.produce_pipelined(partition, &batches)
            .await
            .into_iter()
            .map(|a| match a {
                Attempt::NotSent(m) => Outcome::Fail(m),
                Attempt::Lost(m) => Outcome::Info(m),
                Attempt::Answer {
                    code: 0,
                    base_offset,
                    ..
                } => Outcome::Ok(base_offset),
                Attempt::Answer { code, message, .. } => {
                    if definite_produce_error(code) {
                        Outcome::Fail(message)
                    } else {
                        Outcome::Info(message)
                    }
                }
            })
            .collect()
    }

    /// Asks any broker for a producer id (`current` = None) or for the next epoch of the
    /// current one (KIP-360 re-initialisation). Ok carries (producer id, epoch).
    pub async fn init_producer_id(&mut self, current: Option<(i64, i16)>) -> Result<(i64, i16)> {
        self.ready().await?;
        let (id, epoch) = current.unwrap_or((-1, -1));
        let req = InitProducerIdRequest::default()
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(epoch)
            .with_transaction_timeout_ms(60_000);
        let res = tokio::time::timeout(Duration::from_secs(8), async {
            let c = self.client.as_mut().ok_or_else(|| anyhow!("no client"))?;
            let conn = c.bootstrap_conn();
            let version = conn.version_for(ApiKey::InitProducerId)?;
            conn.call(&req, version).await
        })
        .await;
        let resp = self.answered(res, "InitProducerId")?;
        if resp.error_code != ErrorCode::None.code() {
            return Err(anyhow!("InitProducerId: {}", error_name(resp.error_code)));
        }
        Ok((resp.producer_id.0, resp.producer_epoch))
    }

    /// Pipelines one produce request per record batch (acks=all) on the leader's connection and
    /// reads the answers in order: one [`Attempt`] per batch, in order.
    pub async fn produce_pipelined(&mut self, partition: i32, batches: &[Bytes]) -> Vec<Attempt> {
        let n = batches.len();
        let all = |o: Attempt| vec![o; n];
        let topic_name = self.topic_name.clone();
        let (client, topic) = match self.ready().await {
            Ok(x) => x,
            Err(e) => return all(Attempt::NotSent(format!("no metadata: {e:#}"))),
        };
        let Some(leader) = topic.leader(partition) else {
            self.topic = None;
            return all(Attempt::NotSent(
                "LEADER_NOT_AVAILABLE (no leader in metadata)".into(),
            ));
        };
        let cap = if topic.has_topic_id() {
            i16::MAX
        } else {
            TOPIC_ID_VERSION - 1
        };
        let mut reqs = Vec::with_capacity(n);
        for data in batches {
            let mut t = TopicProduceData::default();
            t.name = TopicName(StrBytes::from_string(topic_name.clone()));
            t.topic_id = topic.raw.topic_id;
            let mut pd = PartitionProduceData::default();
            pd.index = partition;
            pd.records = Some(data.clone());
            t.partition_data = vec![pd];
            let mut req = ProduceRequest::default();
            req.acks = -1;
            req.timeout_ms = PRODUCE_TIMEOUT_MS;
            req.topic_data = vec![t];
            reqs.push(req);
        }
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT * 2, client.broker(leader)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.reset();
                return all(Attempt::NotSent(format!(
                    "connect to leader {leader}: {e:#}"
                )));
            }
            Err(_) => {
                self.reset();
                return all(Attempt::NotSent(format!(
                    "connect to leader {leader} timed out"
                )));
            }
        };
        let version = match conn.version_for_max(ApiKey::Produce, cap) {
            Ok(v) => v,
            Err(e) => return all(Attempt::NotSent(format!("{e:#}"))),
        };
        // From here on bytes may have reached the broker: errors are unknown outcomes.
        let wait = Duration::from_millis(PRODUCE_TIMEOUT_MS as u64) + CALL_SLACK;
        let mut answers: Vec<Attempt> = Vec::with_capacity(n);
        let res = tokio::time::timeout(wait, async {
            for req in &reqs {
                conn.send(req, version, true).await?;
            }
            for _ in 0..n {
                let resp = conn.recv::<ProduceRequest>(Duration::ZERO).await?;
                answers.push(produce_answer(leader, partition, &resp));
            }
            anyhow::Ok(())
        })
        .await;
        let lost_conn = match res {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("leader {leader}: {e:#}")),
            Err(_) => Some(format!("leader {leader}: produce timed out")),
        };
        if let Some(why) = lost_conn {
            self.reset();
            while answers.len() < n {
                answers.push(Attempt::Lost(why.clone()));
            }
        }
        if answers
            .iter()
            .any(|a| matches!(a, Attempt::Answer { code, .. } if errors::is_stale_metadata(*code)))
            || answers
                .iter()
                .any(|a| matches!(a, Attempt::NotSent(m) | Attempt::Lost(m) if m.contains("NOT_LEADER") || m.contains("LEADER_NOT")))
        {
            self.topic = None;
        }
        answers
    }

    /// One fetch at `offset`; Ok carries (offset, value) pairs and the next position.
    pub async fn poll(&mut self, partition: i32, offset: i64) -> Outcome<(Vec<(i64, u64)>, i64)> {
        self.last_log_start = None;
        let topic_name = self.topic_name.clone();
        let (client, topic) = match self.ready().await {
            Ok(x) => x,
            Err(e) => return Outcome::Fail(format!("no metadata: {e:#}")),
        };
        let Some(leader) = topic.leader(partition) else {
            self.topic = None;
            return Outcome::Fail("LEADER_NOT_AVAILABLE (no leader in metadata)".into());
        };
        let (req, cap) = fetch_request(
            topic,
            &topic_name,
            partition,
            FetchShape {
                offset,
                partition_max_bytes: 256 * 1024,
                max_wait_ms: FETCH_WAIT_MS,
                min_bytes: 1,
                max_bytes: 1024 * 1024,
            },
        );
        let res = tokio::time::timeout(Duration::from_secs(6), async {
            let conn = client.broker(leader).await?;
            let version = conn.version_for_max(ApiKey::Fetch, cap)?;
            conn.send(&req, version, true).await?;
            conn.recv::<FetchRequest>(Duration::from_millis(FETCH_WAIT_MS as u64))
                .await
        })
        .await;
        let resp = match self.answered(res, "fetch") {
            Ok(r) => r,
            Err(e) => return Outcome::Info(format!("leader {leader}: {e:#}")),
        };
        if resp.error_code != ErrorCode::None.code() {
            return Outcome::Fail(format!("fetch: {}", error_name(resp.error_code)));
        }
        let pd = resp
            .responses
            .into_iter()
            .filter(|t| t.topic.0.as_str() == topic_name || !t.topic_id.is_nil())
            .flat_map(|t| t.partitions.into_iter())
            .find(|p| p.partition_index == partition);
        let Some(pd) = pd else {
            return Outcome::Fail(format!("leader {leader}: no data for the partition"));
        };
        // -1 means the broker did not say.
        self.last_log_start = Some(pd.log_start_offset).filter(|s| *s >= 0);
        if pd.error_code != ErrorCode::None.code() {
            if errors::is_stale_metadata(pd.error_code) {
                self.topic = None;
            }
            return Outcome::Fail(format!("leader {leader}: {}", error_name(pd.error_code)));
        }
        let Some(data) = pd.records.filter(|d| !d.is_empty()) else {
            return Outcome::Ok((Vec::new(), offset));
        };
        let (records, next) = match decode_fetched(data, offset) {
            Ok(x) => x,
            Err(e) => return Outcome::Fail(format!("decode: {e:#}")),
        };
        let mut pairs = Vec::with_capacity(records.len());
        for r in records {
            let v = r
                .value
                .as_ref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok());
            match v {
                Some(v) => pairs.push((r.offset, v)),
                // Not ours: record it as value 0, which is never written (a phantom).
                None => pairs.push((r.offset, 0)),
            }
        }
        Outcome::Ok((pairs, next))
    }

    /// High watermark of `partition` according to its leader (ListOffsets latest), by fetching:
    /// the fetch response carries it.
    pub async fn high_watermark(&mut self, partition: i32) -> Result<i64> {
        let topic_name = self.topic_name.clone();
        let (client, topic) = self.ready().await?;
        let leader = topic
            .leader(partition)
            .ok_or_else(|| anyhow!("no leader for partition {partition}"))?;
        let (req, cap) = fetch_request(
            topic,
            &topic_name,
            partition,
            FetchShape {
                offset: 0,
                partition_max_bytes: 1,
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 1,
            },
        );
        let res = tokio::time::timeout(Duration::from_secs(5), async {
            let conn = client.broker(leader).await?;
            let version = conn.version_for_max(ApiKey::Fetch, cap)?;
            conn.call(&req, version).await
        })
        .await;
        let resp = self.answered(res, "fetch")?;
        let pd = resp
            .responses
            .into_iter()
            .flat_map(|t| t.partitions.into_iter())
            .find(|p| p.partition_index == partition)
            .ok_or_else(|| anyhow!("no answer for partition {partition}"))?;
        if pd.error_code != ErrorCode::None.code() {
            self.topic = None;
            return Err(anyhow!("{}", error_name(pd.error_code)));
        }
        Ok(pd.high_watermark)
    }
}

/// Classifies one produce response for a one-partition request.
/// The sizes and waits of one single-partition fetch.
struct FetchShape {
    offset: i64,
    partition_max_bytes: i32,
    max_wait_ms: i32,
    min_bytes: i32,
    max_bytes: i32,
}

/// A consumer fetch of one partition, and the highest Fetch version that names the topic the
/// way this broker knows it (by id only if it reported one).
fn fetch_request(
    topic: &TopicInfo,
    topic_name: &str,
    partition: i32,
    shape: FetchShape,
) -> (FetchRequest, i16) {
    let cap = if topic.has_topic_id() {
        i16::MAX
    } else {
        TOPIC_ID_VERSION - 1
    };
    let mut fp = FetchPartition::default();
    fp.partition = partition;
    fp.fetch_offset = shape.offset;
    fp.partition_max_bytes = shape.partition_max_bytes;
    let mut ft = FetchTopic::default();
    ft.topic = TopicName(StrBytes::from_string(topic_name.to_string()));
    ft.topic_id = topic.raw.topic_id;
    ft.partitions = vec![fp];
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = shape.max_wait_ms;
    req.min_bytes = shape.min_bytes;
    req.max_bytes = shape.max_bytes;
    req.isolation_level = 0;
    req.topics = vec![ft];
    (req, cap)
}

fn produce_answer(
    leader: i32,
    partition: i32,
    resp: &kafka_protocol::messages::ProduceResponse,
) -> Attempt {
    let pr = resp
        .responses
        .iter()
        .flat_map(|t| t.partition_responses.iter())
        .find(|p| p.index == partition);
    let Some(pr) = pr else {
        return Attempt::Lost(format!("leader {leader}: no answer for the partition"));
    };
    let message = if pr.error_code == ErrorCode::None.code() {
        String::new()
    } else {
        format!(
            "leader {leader}: {}{}",
            error_name(pr.error_code),
            pr.error_message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )
    };
    Attempt::Answer {
        code: pr.error_code,
        base_offset: pr.base_offset,
        message,
    }
}

/// One record (value as decimal text) in a batch stamped with an idempotent producer's id,
/// epoch and sequence, as a Kafka client builds it: its resends are these same bytes.
pub fn encode_idempotent(value: u64, producer_id: i64, epoch: i16, seq: i32) -> Result<Bytes> {
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id,
        producer_epoch: epoch,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        // The encoder takes the batch's base sequence from its first record.
        sequence: seq,
        timestamp: now_ms(),
        key: None,
        value: Some(Bytes::from(value.to_string())),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        std::slice::from_ref(&record),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| anyhow!("encoding an idempotent batch: {e:#}"))?;
    Ok(buf.freeze())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
