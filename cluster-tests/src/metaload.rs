//! The metadata workload: beside the data workload, one worker creates topics, raises their
//! partition counts (CreatePartitions) and deletes them, while the nemesis kills, pauses and
//! isolates the controller among other faults. After each operation it reads one node's topic
//! list from its admin API. After the final heal, [`final_views`] records every node's settled
//! view, through the admin API and through Kafka Metadata, for the convergence check.
//!
//! Topic names are never reused (`mt-N`), so the checker can tell every topic's history apart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::{
    ApiKey, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sluice::cli::client::Client;
use sluice::cli::errors::error_name;
use sluice::errors::ErrorCode;
use tokio::sync::Mutex;

use crate::cluster::{http_get, Cluster, NodeId};
use crate::history::{Op, OpType, TopicView, F};
use crate::kclient::Outcome;
use crate::workload::Shared;

/// Prefix of the workload's topic names.
pub const PREFIX: &str = "mt-";
/// The broker waits up to 30 s for new partitions' leaders; the call gets a little more.
const OP_TIMEOUT: Duration = Duration::from_secs(40);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many of the workload's topics are meant to exist at once.
const LIVE_MAX: usize = 5;
const PARTITIONS_MAX: i32 = 6;

/// Which admin request, with what it needs.
enum AdminReq {
    Create { partitions: i32, rf: i16 },
    Grow { count: i32 },
    Delete,
}

/// Errors after which the request certainly changed nothing.
fn definite(code: i16) -> bool {
    use ErrorCode as E;
    matches!(
        E::from_code(code),
        Some(
            E::UnknownTopicOrPartition
                | E::TopicAlreadyExists
                | E::NotController
                | E::InvalidTopicException
                | E::InvalidPartitions
                | E::InvalidReplicationFactor
                | E::InvalidReplicaAssignment
                | E::InvalidConfig
                | E::InvalidRequest
        )
    )
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

/// Sends one admin request for `topic` through `addr` (any node forwards to the controller).
/// Fail if it was certainly not applied, Info if it may have been.
async fn admin(addr: &str, topic: &str, req: &AdminReq) -> Outcome<()> {
    let connect = async {
        let mut c = Client::connect(addr).await?;
        c.admin().await?;
        anyhow::Ok(c)
    };
    let mut client = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Outcome::Fail(format!("connect via {addr}: {e:#}")),
        Err(_) => return Outcome::Fail(format!("connect via {addr} timed out")),
    };
    let call = async {
        let conn = client.admin().await?;
        let code = match req {
            AdminReq::Create { partitions, rf } => {
                let mut t = CreatableTopic::default();
                t.name = name(topic);
                t.num_partitions = *partitions;
                t.replication_factor = *rf;
                let mut r = CreateTopicsRequest::default();
                r.topics = vec![t];
                r.timeout_ms = 30_000;
                let v = conn.version_for(ApiKey::CreateTopics)?;
                let resp = conn.call(&r, v).await?;
                resp.topics
                    .iter()
                    .find(|t| t.name.0.as_str() == topic)
                    .map(|t| t.error_code)
            }
            AdminReq::Grow { count } => {
                let mut t = CreatePartitionsTopic::default();
                t.name = name(topic);
                t.count = *count;
                t.assignments = None;
                let mut r = CreatePartitionsRequest::default();
                r.topics = vec![t];
                r.timeout_ms = 30_000;
                let v = conn.version_for(ApiKey::CreatePartitions)?;
                let resp = conn.call(&r, v).await?;
                resp.results
                    .iter()
                    .find(|t| t.name.0.as_str() == topic)
                    .map(|t| t.error_code)
            }
            AdminReq::Delete => {
                let v = conn.version_for(ApiKey::DeleteTopics)?;
                let mut r = DeleteTopicsRequest::default();
                if v >= 6 {
                    let mut st = DeleteTopicState::default();
                    st.name = Some(name(topic));
                    r.topics = vec![st];
                } else {
                    r.topic_names = vec![name(topic)];
                }
                r.timeout_ms = 30_000;
                let resp = conn.call(&r, v).await?;
                resp.responses
                    .iter()
                    .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic))
                    .map(|t| t.error_code)
            }
        };
        code.ok_or_else(|| anyhow!("the response does not mention topic '{topic}'"))
    };
    // From here on the request may have reached the controller.
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(0)) => Outcome::Ok(()),
        Ok(Ok(code)) if definite(code) => Outcome::Fail(error_name(code).to_string()),
        Ok(Ok(code)) => Outcome::Info(error_name(code).to_string()),
        Ok(Err(e)) => Outcome::Info(format!("{e:#}")),
        Err(_) => Outcome::Info("timed out".into()),
    }
}

/// `/v1/topics` as name -> view.
fn parse_admin_topics(v: &Value) -> Option<BTreeMap<String, TopicView>> {
    let mut out = BTreeMap::new();
    for t in v.as_array()? {
        let n = t["name"].as_str()?;
        let partitions = i32::try_from(t["partitions"].as_u64()?).ok()?;
        out.insert(
            n.to_string(),
            TopicView {
                partitions,
                id: t["id"].as_str().map(str::to_string),
            },
        );
    }
    Some(out)
}

/// One node's topic list from its admin API, with the node's incarnation; `None` if the node
/// is down, did not answer, or restarted while answering.
async fn admin_view(
    cluster: &Mutex<Cluster>,
    id: NodeId,
) -> Option<(u32, BTreeMap<String, TopicView>)> {
    let (addr, starts) = {
        let c = cluster.lock().await;
        let n = c.nodes.get(&id)?;
        if !n.running() || n.paused {
            return None;
        }
        (n.admin, n.starts)
    };
    let (status, v) = http_get(addr, "/v1/topics").await.ok()?;
    let same = cluster.lock().await.nodes.get(&id)?.starts == starts;
    (status == 200 && same)
        .then(|| parse_admin_topics(&v))
        .flatten()
        .map(|t| (starts, t))
}

/// One node's topics through Kafka Metadata on its client proxy.
async fn kafka_view(addr: SocketAddr) -> Result<BTreeMap<String, TopicView>> {
    let fut = async {
        let mut c = Client::connect(&addr.to_string()).await?;
        let resp = c.metadata(None).await?;
        let mut out = BTreeMap::new();
        for t in resp.topics {
            let Some(n) = t.name else { continue };
            if t.error_code != ErrorCode::None.code() {
                continue;
            }
            let id = (!t.topic_id.is_nil()).then(|| t.topic_id.as_simple().to_string());
            out.insert(
                n.0.to_string(),
                TopicView {
                    partitions: i32::try_from(t.partitions.len()).unwrap_or(i32::MAX),
                    id,
                },
            );
        }
        anyhow::Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("Metadata via {addr} timed out"))?
}

/// A topic the worker believes may exist, and the partition count it last asked for.
struct Known {
    name: String,
    count: i32,
}

pub async fn worker(shared: Arc<Shared>, cluster: Arc<Mutex<Cluster>>, seed: u64, nodes: u32) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6d65_7461);
    let process = shared.fresh_process();
    let mut known: Vec<Known> = Vec::new();
    let mut next = 0u64;
    let ids: Vec<NodeId> = cluster.lock().await.ids();
    let rf_max = i16::try_from(nodes.clamp(1, 3)).unwrap_or(1);
    while !shared.stopped() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
        if shared.stopped() {
            break;
        }
        let roll = rng.gen_range(0..10);
        let via = shared.bootstrap[rng.gen_range(0..shared.bootstrap.len())].clone();
        let pick = rng.gen_range(0..known.len().max(1));
        let (f, topic, req) = if known.len() < 2 || (known.len() < LIVE_MAX && roll < 4) {
            next += 1;
            let partitions = rng.gen_range(1..=2);
            let rf = rng.gen_range(1..=rf_max);
            known.push(Known {
                name: format!("{PREFIX}{next}"),
                count: partitions,
            });
            let t = known[known.len() - 1].name.clone();
            (F::CreateTopic, t, AdminReq::Create { partitions, rf })
        } else if roll < 7 && known[pick].count < PARTITIONS_MAX {
            known[pick].count += 1;
            let count = known[pick].count;
            (
                F::CreatePartitions,
                known[pick].name.clone(),
                AdminReq::Grow { count },
            )
        } else {
            let k = known.remove(pick);
            (F::DeleteTopic, k.name, AdminReq::Delete)
        };
        let count = match req {
            AdminReq::Create { partitions, .. } => Some(partitions),
            AdminReq::Grow { count } => Some(count),
            AdminReq::Delete => None,
        };
        let with_count = |op: Op| match count {
            Some(n) => op.count(n),
            None => op,
        };
        shared.history.record(with_count(
            Op::new(process, OpType::Invoke, f, -1).topic(&topic),
        ));
        let done = match admin(&via, &topic, &req).await {
            Outcome::Ok(()) => Op::new(process, OpType::Ok, f, -1),
            Outcome::Fail(e) => Op::new(process, OpType::Fail, f, -1).error(e),
            Outcome::Info(e) => Op::new(process, OpType::Info, f, -1).error(e),
        };
        let failed = done.kind == OpType::Fail;
        shared.history.record(with_count(done.topic(&topic)));
        match f {
            F::CreateTopic if failed => known.retain(|k| k.name != topic),
            F::CreatePartitions if failed => {
                if let Some(k) = known.iter_mut().find(|k| k.name == topic) {
                    k.count -= 1;
                }
            }
            _ => {}
        }
        // A look at one node's metadata after every operation.
        let id = ids[rng.gen_range(0..ids.len())];
        if let Some((inc, topics)) = admin_view(&cluster, id).await {
            shared.history.record(
                Op::new(process, OpType::Ok, F::ListTopics, -1)
                    .node(id, inc)
                    .topics(topics),
            );
        }
    }
}

/// One final view: node, its incarnation, `admin` or `kafka`, the topics (None: no answer).
type View = (
    NodeId,
    u32,
    &'static str,
    Option<BTreeMap<String, TopicView>>,
);

/// After the final heal: waits (bounded) until every node's admin API and Kafka Metadata list
/// the same topics, then records each view (the last ones seen if they never agree).
pub async fn final_views(
    cluster: &Mutex<Cluster>,
    history: &crate::history::History,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let nodes: Vec<(NodeId, SocketAddr)> = {
            let c = cluster.lock().await;
            c.ids()
                .into_iter()
                .map(|id| (id, c.clients[&id].listen))
                .collect()
        };
        let mut views: Vec<View> = Vec::new();
        for (id, client_addr) in nodes {
            let admin = admin_view(cluster, id).await;
            let inc = admin.as_ref().map_or(0, |(i, _)| *i);
            views.push((id, inc, "admin", admin.map(|(_, t)| t)));
            views.push((id, inc, "kafka", kafka_view(client_addr).await.ok()));
        }
        let first = views.first().and_then(|v| v.3.clone());
        let agree = first.is_some() && views.iter().all(|v| v.3 == first);
        if agree || tokio::time::Instant::now() >= deadline {
            for (id, inc, source, topics) in views {
                let mut op = Op::new(-2, OpType::Ok, F::MetadataFinal, -1).node(id, inc);
                op.source = Some(source.to_string());
                match topics {
                    Some(t) => op = op.topics(t),
                    None => {
                        op.kind = OpType::Fail;
                        op.error = Some("no answer".into());
                    }
                }
                history.record(op);
            }
            return agree;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
