//! A tiny in-process Kafka broker for tests: one node, in-memory logs.
//!
//! It implements just enough of ApiVersions, Metadata, Produce, Fetch,
//! ListOffsets and the topic admin APIs to drive the CLI end to end. Its
//! fetch answers deliberately end with a truncated batch whenever more data
//! is available, as real brokers do when they hit max_bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{
    decode_request_header_from_buffer, Decodable, Encodable, HeaderVersion, StrBytes, VersionRange,
};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::conn::{read_frame, MAX_FRAME_SIZE};

const NODE_ID: i32 = 1;

#[derive(Default)]
struct Topic {
    id: u128,
    partitions: Vec<Vec<Record>>,
    configs: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    topics: BTreeMap<String, Topic>,
    next_id: u128,
    /// Error codes to answer the next produce / fetch partitions with.
    produce_faults: Vec<i16>,
    fetch_faults: Vec<i16>,
}

pub struct FakeBroker {
    pub addr: String,
    state: Arc<Mutex<State>>,
}

/// Version ranges advertised by the fake broker.
#[derive(Clone)]
pub struct Advertised(pub Vec<(ApiKey, VersionRange)>);

impl Advertised {
    /// Everything this crate's kafka-protocol implements.
    pub fn modern() -> Self {
        Advertised(API_KEYS.iter().map(|k| (*k, k.valid_versions())).collect())
    }

    /// An older broker: pre-flexible Produce/Fetch/Metadata and an
    /// ApiVersions max below ours, forcing the v0 fallback handshake.
    pub fn old() -> Self {
        let cap = |k: ApiKey, max: i16| {
            let v = k.valid_versions();
            (k, VersionRange { min: v.min, max })
        };
        Advertised(vec![
            cap(ApiKey::ApiVersions, 2),
            cap(ApiKey::Metadata, 8),
            cap(ApiKey::Produce, 8),
            cap(ApiKey::Fetch, 11),
            cap(ApiKey::ListOffsets, 5),
            cap(ApiKey::CreateTopics, 4),
            cap(ApiKey::DeleteTopics, 3),
            cap(ApiKey::CreatePartitions, 1),
            cap(ApiKey::DescribeConfigs, 2),
        ])
    }

    fn get(&self, key: ApiKey) -> Option<VersionRange> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

const API_KEYS: &[ApiKey] = &[
    ApiKey::ApiVersions,
    ApiKey::Metadata,
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
    ApiKey::CreateTopics,
    ApiKey::DeleteTopics,
    ApiKey::CreatePartitions,
    ApiKey::DescribeConfigs,
];

fn uuid_text(n: u128) -> String {
    format!("{n:032x}")
}

impl FakeBroker {
    pub async fn start(versions: Advertised) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(Mutex::new(State {
            next_id: 1,
            ..Default::default()
        }));
        let st = state.clone();
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = st.clone();
                let versions = versions.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(sock, st, versions, port).await {
                        tracing::debug!("fake broker connection ended: {e:#}");
                    }
                });
            }
        });
        Ok(FakeBroker { addr, state })
    }

    pub fn create_topic(&self, name: &str, partitions: usize) {
        let mut st = self.state.lock().unwrap();
        let id = st.next_id;
        st.next_id += 1;
        st.topics.insert(
            name.to_string(),
            Topic {
                id,
                partitions: vec![Vec::new(); partitions],
                configs: Vec::new(),
            },
        );
    }

    /// Makes the next `times` produced partitions fail with `code`.
    pub fn fail_produce(&self, code: i16, times: usize) {
        self.state.lock().unwrap().produce_faults = vec![code; times];
    }

    /// Makes the next `times` fetched partitions fail with `code`.
    pub fn fail_fetch(&self, code: i16, times: usize) {
        self.state.lock().unwrap().fetch_faults = vec![code; times];
    }

    /// Values stored in `partition` of `topic`, in offset order.
    pub fn values(&self, topic: &str, partition: usize) -> Vec<(Option<Bytes>, Bytes)> {
        let st = self.state.lock().unwrap();
        st.topics[topic].partitions[partition]
            .iter()
            .map(|r| (r.key.clone(), r.value.clone().unwrap_or_default()))
            .collect()
    }
}

fn respond<M: Encodable + HeaderVersion>(corr: i32, version: i16, body: &M) -> Result<Bytes> {
    let mut header = ResponseHeader::default();
    header.correlation_id = corr;
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header.encode(&mut buf, M::header_version(version))?;
    body.encode(&mut buf, version)?;
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

async fn serve(
    mut sock: TcpStream,
    state: Arc<Mutex<State>>,
    versions: Advertised,
    port: u16,
) -> Result<()> {
    loop {
        let mut frame = read_frame(&mut sock, MAX_FRAME_SIZE).await?;
        let header = decode_request_header_from_buffer(&mut frame)?;
        let v = header.request_api_version;
        let corr = header.correlation_id;
        let key = ApiKey::try_from(header.request_api_key).map_err(|_| anyhow!("bad key"))?;
        if key != ApiKey::ApiVersions {
            let range = versions
                .get(key)
                .ok_or_else(|| anyhow!("unsupported {key:?}"))?;
            if v < range.min || v > range.max {
                return Err(anyhow!("client used {key:?} v{v}, advertised {range}"));
            }
        }
        let out = match key {
            ApiKey::ApiVersions => {
                let ours = versions
                    .get(ApiKey::ApiVersions)
                    .unwrap_or(VersionRange { min: 0, max: 0 });
                let mut resp = ApiVersionsResponse::default();
                resp.api_keys = versions
                    .0
                    .iter()
                    .map(|(k, r)| {
                        let mut a = ApiVersion::default();
                        a.api_key = *k as i16;
                        a.min_version = r.min;
                        a.max_version = r.max;
                        a
                    })
                    .collect();
                if v > ours.max {
                    // As Kafka: UNSUPPORTED_VERSION, body in v0 layout.
                    resp.error_code = 35;
                    respond(corr, 0, &resp)?
                } else {
                    respond(corr, v, &resp)?
                }
            }
            ApiKey::Metadata => {
                let req = MetadataRequest::decode(&mut frame, v)?;
                let st = state.lock().unwrap();
                let mut resp = MetadataResponse::default();
                let mut b = MetadataResponseBroker::default();
                b.node_id = BrokerId(NODE_ID);
                b.host = s("127.0.0.1");
                b.port = port as i32;
                resp.brokers = vec![b];
                resp.controller_id = BrokerId(NODE_ID);
                let names: Vec<String> = match &req.topics {
                    None => st.topics.keys().cloned().collect(),
                    Some(l) if l.is_empty() && v == 0 => st.topics.keys().cloned().collect(),
                    Some(l) => l
                        .iter()
                        .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                        .collect(),
                };
                for name in names {
                    let mut t = MetadataResponseTopic::default();
                    t.name = Some(TopicName(s(&name)));
                    match st.topics.get(&name) {
                        None => t.error_code = 3,
                        Some(topic) => {
                            t.topic_id = uuid_text(topic.id).parse()?;
                            t.partitions = (0..topic.partitions.len())
                                .map(|i| {
                                    let mut p = MetadataResponsePartition::default();
                                    p.partition_index = i as i32;
                                    p.leader_id = BrokerId(NODE_ID);
                                    p.replica_nodes = vec![BrokerId(NODE_ID)];
                                    p.isr_nodes = vec![BrokerId(NODE_ID)];
                                    p
                                })
                                .collect();
                        }
                    }
                    resp.topics.push(t);
                }
                respond(corr, v, &resp)?
            }
            ApiKey::CreateTopics => {
                let req = CreateTopicsRequest::decode(&mut frame, v)?;
                let mut st = state.lock().unwrap();
                let mut resp = CreateTopicsResponse::default();
                for t in req.topics {
                    let name = t.name.0.to_string();
                    let mut r = CreatableTopicResult::default();
                    r.name = t.name.clone();
                    if st.topics.contains_key(&name) {
                        r.error_code = 36;
                        r.error_message = Some(s(&format!("Topic '{name}' already exists.")));
                    } else {
                        let id = st.next_id;
                        st.next_id += 1;
                        let n = if t.num_partitions < 0 {
                            1
                        } else {
                            t.num_partitions
                        };
                        st.topics.insert(
                            name,
                            Topic {
                                id,
                                partitions: vec![Vec::new(); n as usize],
                                configs: t
                                    .configs
                                    .iter()
                                    .map(|c| {
                                        (
                                            c.name.to_string(),
                                            c.value.as_deref().unwrap_or("").to_string(),
                                        )
                                    })
                                    .collect(),
                            },
                        );
                    }
                    resp.topics.push(r);
                }
                respond(corr, v, &resp)?
            }
            ApiKey::DeleteTopics => {
                let req = DeleteTopicsRequest::decode(&mut frame, v)?;
                let mut st = state.lock().unwrap();
                let mut resp = DeleteTopicsResponse::default();
                let names: Vec<String> = if v >= 6 {
                    req.topics
                        .iter()
                        .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                        .collect()
                } else {
                    req.topic_names.iter().map(|n| n.0.to_string()).collect()
                };
                for name in names {
                    let mut r = DeletableTopicResult::default();
                    r.name = Some(TopicName(s(&name)));
                    if st.topics.remove(&name).is_none() {
                        r.error_code = 3;
                    }
                    resp.responses.push(r);
                }
                respond(corr, v, &resp)?
            }
            ApiKey::CreatePartitions => {
                let req = CreatePartitionsRequest::decode(&mut frame, v)?;
                let mut st = state.lock().unwrap();
                let mut resp = CreatePartitionsResponse::default();
                for t in req.topics {
                    let mut r = CreatePartitionsTopicResult::default();
                    r.name = t.name.clone();
                    match st.topics.get_mut(t.name.0.as_str()) {
                        None => r.error_code = 3,
                        Some(topic) if (t.count as usize) <= topic.partitions.len() => {
                            r.error_code = 37;
                            r.error_message = Some(s(&format!(
                                "Topic currently has {} partitions, which is higher than the requested {}.",
                                topic.partitions.len(),
                                t.count
                            )));
                        }
                        Some(topic) => topic.partitions.resize(t.count as usize, Vec::new()),
                    }
                    resp.results.push(r);
                }
                respond(corr, v, &resp)?
            }
            ApiKey::DescribeConfigs => {
                let req = DescribeConfigsRequest::decode(&mut frame, v)?;
                let st = state.lock().unwrap();
                let mut resp = DescribeConfigsResponse::default();
                for res in req.resources {
                    let mut r = DescribeConfigsResult::default();
                    r.resource_type = res.resource_type;
                    r.resource_name = res.resource_name.clone();
                    match st.topics.get(res.resource_name.as_str()) {
                        None => r.error_code = 3,
                        Some(t) => {
                            let mut cfgs: Vec<_> = t
                                .configs
                                .iter()
                                .map(|(k, val)| {
                                    let mut c = DescribeConfigsResourceResult::default();
                                    c.name = s(k);
                                    c.value = Some(s(val));
                                    c.config_source = 1;
                                    c
                                })
                                .collect();
                            // A broker default, which describe must hide.
                            let mut d = DescribeConfigsResourceResult::default();
                            d.name = s("segment.bytes");
                            d.value = Some(s("1073741824"));
                            d.config_source = 5;
                            cfgs.push(d);
                            r.configs = cfgs;
                        }
                    }
                    resp.results.push(r);
                }
                respond(corr, v, &resp)?
            }
            ApiKey::Produce => {
                let req = ProduceRequest::decode(&mut frame, v)?;
                let mut st = state.lock().unwrap();
                let mut resp = ProduceResponse::default();
                for td in req.topic_data {
                    let mut tr = TopicProduceResponse::default();
                    tr.name = td.name.clone();
                    tr.topic_id = td.topic_id;
                    let key = if v >= 13 {
                        let id = td.topic_id.as_u128();
                        st.topics
                            .iter()
                            .find(|(_, t)| t.id == id)
                            .map(|(k, _)| k.clone())
                    } else {
                        Some(td.name.0.to_string())
                    };
                    for pd in td.partition_data {
                        let mut pr = PartitionProduceResponse::default();
                        pr.index = pd.index;
                        if let Some(code) = st.produce_faults.pop() {
                            pr.error_code = code;
                            tr.partition_responses.push(pr);
                            continue;
                        }
                        let log = key
                            .as_ref()
                            .and_then(|k| st.topics.get_mut(k))
                            .and_then(|t| t.partitions.get_mut(pd.index as usize));
                        match (log, pd.records) {
                            (Some(log), Some(mut data)) => {
                                pr.base_offset = log.len() as i64;
                                for set in RecordBatchDecoder::decode_all(&mut data)? {
                                    for mut r in set.records {
                                        r.offset = log.len() as i64;
                                        r.sequence = r.offset as i32;
                                        log.push(r);
                                    }
                                }
                            }
                            (None, _) => pr.error_code = 3,
                            (_, None) => pr.error_code = 87,
                        }
                        tr.partition_responses.push(pr);
                    }
                    resp.responses.push(tr);
                }
                if req.acks == 0 {
                    continue;
                }
                respond(corr, v, &resp)?
            }
            ApiKey::ListOffsets => {
                let req = ListOffsetsRequest::decode(&mut frame, v)?;
                assert_eq!(req.replica_id.0, -1, "consumers must send replica_id -1");
                let st = state.lock().unwrap();
                let mut resp = ListOffsetsResponse::default();
                for t in req.topics {
                    let mut tr = ListOffsetsTopicResponse::default();
                    tr.name = t.name.clone();
                    let topic = st.topics.get(t.name.0.as_str());
                    for p in t.partitions {
                        let mut pr = ListOffsetsPartitionResponse::default();
                        pr.partition_index = p.partition_index;
                        match topic.and_then(|tp| tp.partitions.get(p.partition_index as usize)) {
                            None => pr.error_code = 3,
                            Some(log) => {
                                pr.offset = if p.timestamp == -2 {
                                    0
                                } else {
                                    log.len() as i64
                                };
                            }
                        }
                        tr.partitions.push(pr);
                    }
                    resp.topics.push(tr);
                }
                respond(corr, v, &resp)?
            }
            ApiKey::Fetch => {
                let req = FetchRequest::decode(&mut frame, v)?;
                let mut waited = false;
                loop {
                    let (resp, any) = fetch(&state, &req, v)?;
                    if any || waited {
                        break respond(corr, v, &resp)?;
                    }
                    // Long-poll a little, like max_wait_ms, without holding
                    // the lock.
                    let wait = (req.max_wait_ms.clamp(0, 100)) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    waited = true;
                }
            }
            other => return Err(anyhow!("fake broker does not implement {other:?}")),
        };
        sock.write_all(&out).await?;
    }
}

/// Builds a fetch response. Returns whether any partition had data.
fn fetch(state: &Mutex<State>, req: &FetchRequest, v: i16) -> Result<(FetchResponse, bool)> {
    let mut st = state.lock().unwrap();
    if let Some(code) = st.fetch_faults.pop() {
        let mut resp = FetchResponse::default();
        for ft in &req.topics {
            let mut tr = FetchableTopicResponse::default();
            tr.topic = ft.topic.clone();
            tr.topic_id = ft.topic_id;
            for fp in &ft.partitions {
                let mut pd = PartitionData::default();
                pd.partition_index = fp.partition;
                pd.error_code = code;
                tr.partitions.push(pd);
            }
            resp.responses.push(tr);
        }
        return Ok((resp, true));
    }
    let mut resp = FetchResponse::default();
    let mut any = false;
    for ft in &req.topics {
        let mut tr = FetchableTopicResponse::default();
        tr.topic = ft.topic.clone();
        tr.topic_id = ft.topic_id;
        let topic = if v >= 13 {
            let id = ft.topic_id.as_u128();
            st.topics.values().find(|t| t.id == id)
        } else {
            st.topics.get(ft.topic.0.as_str())
        };
        for fp in &ft.partitions {
            let mut pd = PartitionData::default();
            pd.partition_index = fp.partition;
            match topic.and_then(|t| t.partitions.get(fp.partition as usize)) {
                None => pd.error_code = 3,
                Some(log) => {
                    pd.high_watermark = log.len() as i64;
                    let start = fp.fetch_offset;
                    if start < 0 || start > log.len() as i64 {
                        pd.error_code = 1;
                    } else {
                        let rest = &log[start as usize..];
                        if !rest.is_empty() {
                            any = true;
                            pd.records = Some(encode_chunks(rest)?);
                        }
                    }
                }
            }
            tr.partitions.push(pd);
        }
        resp.responses.push(tr);
    }
    Ok((resp, any))
}

/// Up to 50 records as one gzip batch, followed, if more records exist, by
/// the first half of the next batch: a partial trailing batch.
fn encode_chunks(rest: &[Record]) -> Result<Bytes> {
    let opts = RecordEncodeOptions {
        version: 2,
        compression: Compression::Gzip,
    };
    let first = &rest[..rest.len().min(50)];
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(&mut buf, first, &opts)?;
    if rest.len() > first.len() {
        let next = &rest[first.len()..rest.len().min(100)];
        let mut nb = BytesMut::new();
        RecordBatchEncoder::encode(&mut nb, next, &opts)?;
        buf.extend_from_slice(&nb[..nb.len() / 2]);
    }
    Ok(buf.freeze())
}
