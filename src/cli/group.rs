//! A consumer-group member and the group requests around it (Kafka's classic group protocol).
//!
//! [`ConsumerGroupMember`] joins a group the way the Java consumer does with the eager `range`
//! assignor: FindCoordinator, JoinGroup (rejoining with the id a MEMBER_ID_REQUIRED answer
//! gives), SyncGroup (computing every member's assignment when it is the leader), Heartbeat
//! from a task of its own, OffsetCommit/OffsetFetch, and LeaveGroup on close. [`ConsumerGroupClient`]
//! is the part both it and the admin verbs (`sluice groups ...`) need: a connection to the
//! group's coordinator that is found again when the coordinator moves.
//!
//! The coordinator gets a connection of its own, never one of [`Client`]'s: those carry long
//! polling fetches, and a heartbeat queued behind a fetch on the same connection would wait
//! out the fetch's `max_wait_ms`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError as RE;
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::consumer_protocol_subscription::TopicPartition as OwnedTopic;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, ConsumerProtocolAssignment, ConsumerProtocolSubscription, DeleteGroupsRequest,
    DescribeGroupsRequest, FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, ListGroupsRequest, OffsetCommitRequest,
    OffsetFetchRequest, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::{backoff, Client, MAX_RETRIES};
use super::conn::BrokerConn;
use super::errors::KafkaError;

/// The protocol type of consumer groups (as opposed to Connect's or a custom one).
pub const PROTOCOL_TYPE: &str = "consumer";
/// The one assignor this member offers; every Kafka client supports it.
pub const RANGE: &str = "range";
/// Version written in front of subscriptions and assignments; the Java client's current one.
const CONSUMER_PROTOCOL_VERSION: i16 = 3;
/// Highest OffsetCommit / OffsetFetch versions we build: v10 names topics by id only.
const OFFSET_COMMIT_MAX: i16 = 9;
const OFFSET_FETCH_MAX: i16 = 9;
/// Group-level requests other than JoinGroup and SyncGroup: how long one may take in all,
/// rediscovering the coordinator included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one [`ConsumerGroupMember::poll`] looks for a coordinator that moved.
const COORDINATOR_LOOKUP_PER_POLL: Duration = Duration::from_secs(2);

/// Runs `$call` (a future using `$conn: &mut BrokerConn` and resolving to
/// `Result<Reply<T>>`) on the coordinator of `$gc` (a [`ConsumerGroupClient`]) until it answers
/// something other than "the coordinator moved" or `$deadline` passes; evaluates to the `T`
/// and returns early with the error otherwise. Broken connections, and those a cancelled call
/// left with a request in flight, are replaced. A macro rather than a method taking an async
/// closure: such a closure's future is not provably `Send`, and callers spawn these.
macro_rules! on_coordinator {
    ($gc:expr, $what:expr, $deadline:expr, |$conn:ident| $call:expr) => {{
        let mut attempt = 0u32;
        loop {
            let shared = $gc.coordinator($deadline).await?;
            let result = {
                let mut guard = shared.lock().await;
                if guard.in_flight() > 0 {
                    Err(anyhow!("connection had a request in flight"))
                } else {
                    let $conn: &mut BrokerConn = &mut guard;
                    // The deadline bounds a single answer too, not only the retries.
                    match tokio::time::timeout_at($deadline, $call).await {
                        Ok(r) => r,
                        Err(_) => Err(anyhow!("no answer from the coordinator in time")),
                    }
                }
            };
            if let Some(t) = $gc.settle(result, $what, $deadline, &mut attempt).await? {
                break t;
            }
        }
    }};
}

/// (topic, partition)
pub type Tp = (String, i32);

/// How a member joins: Kafka's consumer settings of the same names.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    /// `group.instance.id`: a static member.
    pub group_instance_id: Option<String>,
    /// `session.timeout.ms`
    pub session_timeout: Duration,
    /// `max.poll.interval.ms`: how long the coordinator waits for members to rejoin.
    pub rebalance_timeout: Duration,
    /// `heartbeat.interval.ms`
    pub heartbeat_interval: Duration,
    /// Upper bound on one whole [`ConsumerGroupMember::join`], retries included.
    pub join_timeout: Duration,
}

impl MemberConfig {
    /// Kafka's consumer defaults, except a shorter rebalance timeout: a CLI consumer rejoins
    /// within a heartbeat, and a lost one should not hold a rebalance for five minutes.
    pub fn new(group_id: &str, topics: &[&str]) -> MemberConfig {
        MemberConfig {
            group_id: group_id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            group_instance_id: None,
            session_timeout: Duration::from_secs(45),
            rebalance_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(3),
            join_timeout: Duration::from_secs(120),
        }
    }
}

/// The partitions a member was given, by topic, each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub topics: BTreeMap<String, Vec<i32>>,
}

impl Assignment {
    pub fn partitions_of(&self, topic: &str) -> &[i32] {
        self.topics.get(topic).map_or(&[], |v| v.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.topics.values().all(|p| p.is_empty())
    }

    /// `t-0,t-1,u-3`, as Kafka's tools name partitions.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .topics
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |p| format!("{t}-{p}")))
            .collect();
        parts.join(",")
    }
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn group_id(s: &str) -> GroupId {
    GroupId(str_bytes(s))
}

fn topic_name(s: &str) -> TopicName {
    TopicName(str_bytes(s))
}

// --- the consumer protocol (the bytes inside JoinGroup and SyncGroup) ----------------------------

/// A subscription as the Java consumer writes it: a version, then the struct at that version.
pub fn encode_subscription(
    topics: &[String],
    owned: &Assignment,
    generation: i32,
) -> Result<Bytes> {
    let mut s = ConsumerProtocolSubscription::default();
    s.topics = topics.iter().map(|t| str_bytes(t)).collect();
    s.owned_partitions = owned
        .topics
        .iter()
        .map(|(t, ps)| {
            let mut o = OwnedTopic::default();
            o.topic = topic_name(t);
            o.partitions = ps.clone();
            o
        })
        .collect();
    s.generation_id = generation;
    let mut buf = BytesMut::new();
    buf.put_i16(CONSUMER_PROTOCOL_VERSION);
    s.encode(&mut buf, CONSUMER_PROTOCOL_VERSION)?;
    Ok(buf.freeze())
}

/// Reads the version prefix; a newer version than we know is read as the newest we know,
/// as the Java client does (later versions only append fields).
fn consumer_protocol_version(b: &mut Bytes, what: &str) -> Result<i16> {
    if b.remaining() < 2 {
        bail!("{what} of {} bytes is too short", b.remaining());
    }
    let v = b.get_i16();
    if v < 0 {
        bail!("{what} has negative version {v}");
    }
    Ok(v.min(CONSUMER_PROTOCOL_VERSION))
}

pub fn decode_subscription(mut b: Bytes) -> Result<ConsumerProtocolSubscription> {
    let v = consumer_protocol_version(&mut b, "subscription")?;
    ConsumerProtocolSubscription::decode(&mut b, v).context("decoding a member's subscription")
}

pub fn encode_assignment(a: &Assignment) -> Result<Bytes> {
    let mut pa = ConsumerProtocolAssignment::default();
    pa.assigned_partitions = a
        .topics
        .iter()
        .map(|(t, ps)| {
            let mut at = AssignedTopic::default();
            at.topic = topic_name(t);
            at.partitions = ps.clone();
            at
        })
        .collect();
    let mut buf = BytesMut::new();
    buf.put_i16(CONSUMER_PROTOCOL_VERSION);
    pa.encode(&mut buf, CONSUMER_PROTOCOL_VERSION)?;
    Ok(buf.freeze())
}

/// An empty byte string is an empty assignment (what a coordinator sends a member the leader
/// left out).
pub fn decode_assignment(mut b: Bytes) -> Result<Assignment> {
    if b.is_empty() {
        return Ok(Assignment::default());
    }
    let v = consumer_protocol_version(&mut b, "assignment")?;
    let pa = ConsumerProtocolAssignment::decode(&mut b, v).context("decoding an assignment")?;
    let mut out = Assignment::default();
    for t in pa.assigned_partitions {
        let ps = out.topics.entry(t.topic.0.to_string()).or_default();
        ps.extend(t.partitions);
        ps.sort_unstable();
        ps.dedup();
    }
    Ok(out)
}

/// One member as the range assignor sees it.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub topics: Vec<String>,
}

/// Kafka's `RangeAssignor`: per topic, the members subscribed to it in order (static members
/// by instance id first, then the others by member id) each get a contiguous range; the first
/// `partitions % members` get one more. Every member gets an entry, maybe empty. Topics
/// missing from `partitions` (unknown to the cluster) are assigned to no one.
pub fn range_assign(
    members: &[Subscriber],
    partitions: &BTreeMap<String, i32>,
) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = members
        .iter()
        .map(|m| (m.member_id.clone(), Assignment::default()))
        .collect();
    for (topic, count) in partitions {
        let mut subs: Vec<&Subscriber> = members
            .iter()
            .filter(|m| m.topics.iter().any(|t| t == topic))
            .collect();
        if subs.is_empty() || *count <= 0 {
            continue;
        }
        subs.sort_by(|a, b| {
            let key = |m: &Subscriber| {
                (
                    m.group_instance_id.is_none(),
                    m.group_instance_id
                        .clone()
                        .unwrap_or_else(|| m.member_id.clone()),
                )
            };
            key(a).cmp(&key(b))
        });
        let n = subs.len() as i32;
        let (each, extra) = (count / n, count % n);
        for (i, m) in subs.iter().enumerate() {
            let i = i as i32;
            let start = each * i + i.min(extra);
            let len = each + i32::from(i < extra);
            if len == 0 {
                continue;
            }
            if let Some(a) = out.get_mut(&m.member_id) {
                a.topics
                    .entry(topic.clone())
                    .or_default()
                    .extend(start..start + len);
            }
        }
    }
    out
}

// --- the coordinator ------------------------------------------------------------------------------

/// Errors after which the group has to be looked up again: it moved, its coordinator is not
/// ready yet, or there is none at the moment.
pub fn coordinator_moved(code: i16) -> bool {
    matches!(
        RE::try_from_code(code),
        Some(RE::NotCoordinator | RE::CoordinatorNotAvailable | RE::CoordinatorLoadInProgress)
    )
}

/// A coordinator's answer: what was asked for, or a group-level error code with the broker's
/// message (coordinator moves are handled by [`ConsumerGroupClient::call`] and never reach callers).
pub enum Reply<T> {
    Ok(T),
    Err(i16, Option<String>),
}

type SharedConn = Arc<Mutex<BrokerConn>>;

/// A cluster client plus a connection to one group's coordinator, found on first use and
/// again after the coordinator moved.
pub struct ConsumerGroupClient {
    /// Metadata and FindCoordinator go through it; also usable by callers (ListOffsets).
    pub client: Client,
    pub group: String,
    coordinator: Option<(i32, SharedConn)>,
}

impl ConsumerGroupClient {
    pub async fn connect(bootstrap: &str, group: &str) -> Result<ConsumerGroupClient> {
        Ok(ConsumerGroupClient::new(
            Client::connect(bootstrap).await?,
            group,
        ))
    }

    pub fn new(client: Client, group: &str) -> ConsumerGroupClient {
        ConsumerGroupClient {
            client,
            group: group.to_string(),
            coordinator: None,
        }
    }

    /// Node id of the coordinator this client last found, if it has one.
    pub fn coordinator_id(&self) -> Option<i32> {
        self.coordinator.as_ref().map(|(id, _)| *id)
    }

    pub fn forget_coordinator(&mut self) {
        self.coordinator = None;
    }

    /// One FindCoordinator round trip on the bootstrap connection: Ok(Err(..)) for an
    /// answer that says to try again later.
    async fn find_once(&mut self) -> Result<std::result::Result<(i32, String), String>> {
        let group = self.group.clone();
        let conn = self.client.bootstrap_conn();
        let version = conn.version_for(ApiKey::FindCoordinator)?;
        let mut req = FindCoordinatorRequest::default();
        req.key_type = 0;
        if version >= 4 {
            req.coordinator_keys = vec![str_bytes(&group)];
        } else {
            req.key = str_bytes(&group);
        }
        let resp = conn.call(&req, version).await?;
        let (code, msg, node, host, port) = if version >= 4 {
            let c = resp
                .coordinators
                .into_iter()
                .find(|c| c.key.as_str() == group)
                .ok_or_else(|| anyhow!("FindCoordinator answer did not mention group '{group}'"))?;
            (c.error_code, c.error_message, c.node_id.0, c.host, c.port)
        } else {
            (
                resp.error_code,
                resp.error_message,
                resp.node_id.0,
                resp.host,
                resp.port,
            )
        };
        let subject = format!("coordinator of group '{group}'");
        if code != 0 {
            let e = KafkaError::new(code, &subject, msg.as_deref());
            if coordinator_moved(code) {
                return Ok(Err(e.to_string()));
            }
            return Err(e.into());
        }
        if node < 0 {
            return Ok(Err(format!("{subject}: broker named no node")));
        }
        Ok(Ok((node, format!("{host}:{port}"))))
    }

    /// The coordinator's connection, looking the coordinator up (with backoff) if needed.
    async fn coordinator(&mut self, deadline: Instant) -> Result<SharedConn> {
        if let Some((_, c)) = &self.coordinator {
            return Ok(c.clone());
        }
        let mut attempt = 0;
        loop {
            let why = match self.find_once().await {
                Ok(Ok((node, addr))) => match BrokerConn::connect(&addr).await {
                    #[allow(unused_mut)]
                    Ok(mut conn) => {
                        #[cfg(test)]
                        for (k, max) in self.client.version_caps() {
                            conn.cap_version(k, max);
                        }
                        tracing::debug!(group = %self.group, node, %addr, "found the coordinator");
                        let conn = Arc::new(Mutex::new(conn));
                        self.coordinator = Some((node, conn.clone()));
                        return Ok(conn);
                    }
                    Err(e) => format!("coordinator {node}: {e:#}"),
                },
                Ok(Err(why)) => why,
                Err(e) if e.downcast_ref::<KafkaError>().is_some() => return Err(e),
                Err(e) => {
                    // The bootstrap connection broke (or a cancelled call left it mid-request).
                    let why = format!("{e:#}");
                    if let Err(e) = self.client.reconnect_bootstrap().await {
                        tracing::debug!("bootstrap reconnect failed: {e:#}");
                    }
                    why
                }
            };
            attempt += 1;
            let pause = backoff(attempt);
            if Instant::now() + pause >= deadline {
                bail!(
                    "could not find the coordinator of group '{}' (tried {attempt} times): {why}",
                    self.group
                );
            }
            tracing::debug!(group = %self.group, attempt, %why, "coordinator not found yet");
            tokio::time::sleep(pause).await;
        }
    }

    /// Takes one attempt's outcome (see [`on_coordinator!`]): Some(answer), None to try again
    /// (after forgetting the coordinator and a backoff), or the final error. A group-level
    /// error becomes a [`KafkaError`] about the group.
    async fn settle<T>(
        &mut self,
        result: Result<Reply<T>>,
        what: &str,
        deadline: Instant,
        attempt: &mut u32,
    ) -> Result<Option<T>> {
        let why = match result {
            Ok(Reply::Ok(t)) => return Ok(Some(t)),
            Ok(Reply::Err(code, msg)) if coordinator_moved(code) => {
                KafkaError::new(code, &format!("group '{}'", self.group), msg.as_deref())
                    .to_string()
            }
            Ok(Reply::Err(code, msg)) => {
                return Err(KafkaError::new(
                    code,
                    &format!("group '{}'", self.group),
                    msg.as_deref(),
                )
                .into())
            }
            Err(e) if e.downcast_ref::<KafkaError>().is_some() => return Err(e),
            Err(e) => format!("{e:#}"),
        };
        self.forget_coordinator();
        *attempt += 1;
        let pause = backoff(*attempt);
        if Instant::now() + pause >= deadline {
            bail!(
                "{what} for group '{}' failed after {attempt} tries: {why}",
                self.group
            );
        }
        tracing::debug!(group = %self.group, attempt = *attempt, %why, "retrying {what}");
        tokio::time::sleep(pause).await;
        Ok(None)
    }

    /// Committed offsets of the group: of `partitions` (every partition asked for gets an
    /// entry, -1 for none), or of every partition it has committed when `None`.
    pub async fn committed(&mut self, partitions: Option<&[Tp]>) -> Result<BTreeMap<Tp, i64>> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let group = self.group.clone();
        let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (t, p) in partitions.unwrap_or(&[]) {
            by_topic.entry(t.clone()).or_default().push(*p);
        }
        let all = partitions.is_none();
        let topics = if all { None } else { Some(&by_topic) };
        let mut got = on_coordinator!(self, "OffsetFetch", deadline, |conn| offset_fetch(
            conn, &group, topics
        ));
        for tp in partitions.unwrap_or(&[]) {
            got.entry(tp.clone()).or_insert(-1);
        }
        Ok(got)
    }

    /// OffsetCommit of `offsets` as `generation`/`member_id` (-1 and "" for a tool or an
    /// `assign()` consumer, which the coordinator accepts only while the group has no members).
    pub async fn commit(
        &mut self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        offsets: &BTreeMap<Tp, i64>,
    ) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        let group = self.group.clone();
        on_coordinator!(self, "OffsetCommit", deadline, |conn| offset_commit(
            conn,
            &group,
            generation,
            member_id,
            instance_id,
            offsets
        ));
        Ok(())
    }
}

async fn offset_fetch(
    conn: &mut BrokerConn,
    group: &str,
    topics: Option<&BTreeMap<String, Vec<i32>>>,
) -> Result<Reply<BTreeMap<Tp, i64>>> {
    let version = conn.version_for_max(ApiKey::OffsetFetch, OFFSET_FETCH_MAX)?;
    let mut req = OffsetFetchRequest::default();
    if version >= 8 {
        let mut g = OffsetFetchRequestGroup::default();
        g.group_id = group_id(group);
        g.topics = topics.map(|ts| {
            ts.iter()
                .map(|(t, ps)| {
                    let mut rt = OffsetFetchRequestTopics::default();
                    rt.name = topic_name(t);
                    rt.partition_indexes = ps.clone();
                    rt
                })
                .collect()
        });
        req.groups = vec![g];
    } else {
        req.group_id = group_id(group);
        let listed = |ts: &BTreeMap<String, Vec<i32>>| {
            ts.iter()
                .map(|(t, ps)| {
                    let mut rt = OffsetFetchRequestTopic::default();
                    rt.name = topic_name(t);
                    rt.partition_indexes = ps.clone();
                    rt
                })
                .collect()
        };
        req.topics = match topics {
            Some(ts) => Some(listed(ts)),
            None if version >= 2 => None,
            None => bail!(
                "broker at {} cannot list all of a group's offsets (OffsetFetch v{version})",
                conn.addr
            ),
        };
    }
    let resp = conn.call(&req, version).await?;
    let mut out = BTreeMap::new();
    let mut first_err = 0i16;
    if version >= 8 {
        let Some(g) = resp
            .groups
            .into_iter()
            .find(|g| g.group_id.0.as_str() == group)
        else {
            bail!("OffsetFetch answer did not mention group '{group}'");
        };
        if g.error_code != 0 {
            return Ok(Reply::Err(g.error_code, None));
        }
        for t in g.topics {
            for p in t.partitions {
                if p.error_code != 0 && first_err == 0 {
                    first_err = p.error_code;
                }
                out.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    } else {
        if resp.error_code != 0 {
            return Ok(Reply::Err(resp.error_code, None));
        }
        for t in resp.topics {
            for p in t.partitions {
                if p.error_code != 0 && first_err == 0 {
                    first_err = p.error_code;
                }
                out.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    }
    if first_err != 0 {
        return Ok(Reply::Err(first_err, None));
    }
    Ok(Reply::Ok(out))
}

async fn offset_commit(
    conn: &mut BrokerConn,
    group: &str,
    generation: i32,
    member_id: &str,
    instance_id: Option<&str>,
    offsets: &BTreeMap<Tp, i64>,
) -> Result<Reply<()>> {
    let version = conn.version_for_max(ApiKey::OffsetCommit, OFFSET_COMMIT_MAX)?;
    let mut by_topic: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
    for ((t, p), o) in offsets {
        let mut rp = OffsetCommitRequestPartition::default();
        rp.partition_index = *p;
        rp.committed_offset = *o;
        rp.committed_leader_epoch = -1;
        rp.committed_metadata = Some(StrBytes::from_static_str(""));
        by_topic.entry(t).or_default().push(rp);
    }
    let mut req = OffsetCommitRequest::default();
    req.group_id = group_id(group);
    req.generation_id_or_member_epoch = generation;
    req.member_id = str_bytes(member_id);
    if version >= 7 {
        req.group_instance_id = instance_id.map(str_bytes);
    }
    req.retention_time_ms = -1;
    req.topics = by_topic
        .into_iter()
        .map(|(t, ps)| {
            let mut rt = OffsetCommitRequestTopic::default();
            rt.name = topic_name(t);
            rt.partitions = ps;
            rt
        })
        .collect();
    let resp = conn.call(&req, version).await?;
    let mut answered = BTreeSet::new();
    for t in &resp.topics {
        for p in &t.partitions {
            if p.error_code != 0 {
                // Group-level trouble (rebalance, coordinator moved) comes per partition too.
                if coordinator_moved(p.error_code) || is_membership_error(p.error_code) {
                    return Ok(Reply::Err(p.error_code, None));
                }
                return Err(KafkaError::new(
                    p.error_code,
                    &format!(
                        "committing offset of group '{group}' for topic '{}' partition {}",
                        t.name.0, p.partition_index
                    ),
                    None,
                )
                .into());
            }
            answered.insert((t.name.0.to_string(), p.partition_index));
        }
    }
    if let Some((t, p)) = offsets.keys().find(|tp| !answered.contains(*tp)) {
        bail!("OffsetCommit answer did not mention topic '{t}' partition {p}");
    }
    Ok(Reply::Ok(()))
}

/// Errors that mean this member's generation is over: it has to join again.
pub fn is_membership_error(code: i16) -> bool {
    matches!(
        RE::try_from_code(code),
        Some(RE::RebalanceInProgress | RE::IllegalGeneration | RE::UnknownMemberId)
    )
}

// --- the member ----------------------------------------------------------------------------------

/// What the heartbeat task last found out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Beat {
    Fine,
    /// The group is rebalancing or our generation is over: join again.
    Rejoin(String),
    /// The coordinator does not know us any more: join again as a new member.
    Unknown(String),
    /// The coordinator moved or its connection broke: find it and go on heartbeating.
    Lost(String),
    /// Joining again cannot help (e.g. FENCED_INSTANCE_ID).
    Fatal(String),
}

struct Heartbeat {
    task: Option<JoinHandle<()>>,
    news: tokio::sync::watch::Receiver<Beat>,
}

impl Heartbeat {
    /// No task, only the news that the coordinator is still to be found.
    fn lost(why: String) -> Heartbeat {
        let (_, news) = tokio::sync::watch::channel(Beat::Lost(why));
        Heartbeat { task: None, news }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A member of one consumer group. Drive it with [`ConsumerGroupMember::join`] and then, between
/// fetches, [`ConsumerGroupMember::poll`]; commit with [`ConsumerGroupMember::commit`]; finish with
/// [`ConsumerGroupMember::leave`]. Its heartbeat runs on a task it owns (aborted when it is dropped).
pub struct ConsumerGroupMember {
    pub cfg: MemberConfig,
    pub group: ConsumerGroupClient,
    member_id: String,
    generation: i32,
    leader: bool,
    protocol: Option<String>,
    assignment: Assignment,
    heartbeat: Option<Heartbeat>,
    /// Set when the generation is over; the next [`ConsumerGroupMember::poll`] says so.
    must_rejoin: bool,
}

impl ConsumerGroupMember {
    pub async fn connect(bootstrap: &str, cfg: MemberConfig) -> Result<ConsumerGroupMember> {
        let group = ConsumerGroupClient::connect(bootstrap, &cfg.group_id).await?;
        Ok(ConsumerGroupMember::new(group, cfg))
    }

    pub fn new(group: ConsumerGroupClient, cfg: MemberConfig) -> ConsumerGroupMember {
        ConsumerGroupMember {
            cfg,
            group,
            member_id: String::new(),
            generation: -1,
            leader: false,
            protocol: None,
            assignment: Assignment::default(),
            heartbeat: None,
            must_rejoin: true,
        }
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    pub fn assignment(&self) -> &Assignment {
        &self.assignment
    }

    /// Whether the member holds a generation (joined and synced, not known to be over).
    pub fn is_member(&self) -> bool {
        !self.must_rejoin && self.generation >= 0
    }

    /// Takes in what the heartbeat found. Returns true when the member has to join again
    /// (the caller commits what it consumed, if it can, then calls [`ConsumerGroupMember::join`]).
    /// A moved coordinator is found again here, and the heartbeat goes on.
    pub async fn poll(&mut self) -> Result<bool> {
        let news = match &self.heartbeat {
            Some(h) => h.news.borrow().clone(),
            None => Beat::Fine,
        };
        match news {
            Beat::Fine => {}
            Beat::Rejoin(why) => {
                tracing::debug!(group = %self.cfg.group_id, "rejoining: {why}");
                self.end_generation(false);
            }
            Beat::Unknown(why) => {
                tracing::debug!(group = %self.cfg.group_id, "rejoining as a new member: {why}");
                self.end_generation(true);
            }
            Beat::Lost(why) => {
                tracing::debug!(group = %self.cfg.group_id, "looking for the coordinator again: {why}");
                self.heartbeat = None;
                self.group.forget_coordinator();
                // A short look per poll: the caller goes on consuming its partitions meanwhile
                // (as Kafka's consumer does), and if the coordinator stays away longer than
                // the session, the next heartbeat says UNKNOWN_MEMBER_ID and we rejoin.
                let deadline = Instant::now() + COORDINATOR_LOOKUP_PER_POLL;
                match self.group.coordinator(deadline).await {
                    Ok(_) => self.start_heartbeat(),
                    Err(e) => {
                        tracing::warn!(group = %self.cfg.group_id, "coordinator not found yet: {e:#}");
                        self.heartbeat = Some(Heartbeat::lost(format!("{e:#}")));
                    }
                }
            }
            Beat::Fatal(why) => {
                self.end_generation(false);
                bail!("{why}");
            }
        }
        Ok(self.must_rejoin)
    }

    fn end_generation(&mut self, forget_member: bool) {
        self.heartbeat = None;
        self.must_rejoin = true;
        if forget_member {
            self.member_id.clear();
            self.generation = -1;
        }
    }

    /// Joins (or rejoins) the group and returns this member's assignment. Bounded by the
    /// config's `join_timeout`.
    pub async fn join(&mut self) -> Result<Assignment> {
        self.heartbeat = None;
        let deadline = Instant::now() + self.cfg.join_timeout;
        let mut attempt = 0u32;
        loop {
            let why = match self.join_once(deadline).await? {
                Ok(assignment) => {
                    self.assignment = assignment.clone();
                    self.must_rejoin = false;
                    self.start_heartbeat();
                    tracing::debug!(
                        group = %self.cfg.group_id,
                        member = %self.member_id,
                        generation = self.generation,
                        leader = self.leader,
                        assignment = %assignment.describe(),
                        "joined"
                    );
                    return Ok(assignment);
                }
                Err(why) => why,
            };
            attempt += 1;
            // MEMBER_ID_REQUIRED asks for an immediate second join; the rest wait a little.
            let pause = if why.is_empty() {
                Duration::ZERO
            } else {
                backoff(attempt)
            };
            if Instant::now() + pause >= deadline {
                bail!(
                    "could not join group '{}' within {:?}: {why}",
                    self.cfg.group_id,
                    self.cfg.join_timeout
                );
            }
            tracing::debug!(group = %self.cfg.group_id, attempt, %why, "joining again");
            tokio::time::sleep(pause).await;
        }
    }

    /// One JoinGroup + SyncGroup. Ok(Err(why)) means "try again" (why is empty when the
    /// coordinator handed out a member id to join with).
    async fn join_once(
        &mut self,
        deadline: Instant,
    ) -> Result<std::result::Result<Assignment, String>> {
        let metadata = encode_subscription(&self.cfg.topics, &self.assignment, self.generation)?;
        let group = self.cfg.group_id.clone();
        let cfg = self.cfg.clone();
        let member_id = self.member_id.clone();
        let join: Result<JoinGroupResponse> = async {
            Ok(on_coordinator!(self.group, "JoinGroup", deadline, |conn| {
                join_group(conn, &cfg, &member_id, metadata.clone())
            }))
        }
        .await;
        let resp = match join {
            Ok(r) => r,
            Err(e) => return self.retry_or_fail(e, "JoinGroup"),
        };
        let code = resp.error_code;
        match RE::try_from_code(code) {
            None => {}
            Some(RE::MemberIdRequired) => {
                self.member_id = resp.member_id.to_string();
                return Ok(Err(String::new()));
            }
            Some(RE::UnknownMemberId) => {
                self.member_id.clear();
                return Ok(Err(KafkaError::new(
                    code,
                    &format!("joining group '{group}'"),
                    None,
                )
                .to_string()));
            }
            Some(RE::RebalanceInProgress | RE::IllegalGeneration) => {
                return Ok(Err(KafkaError::new(
                    code,
                    &format!("joining group '{group}'"),
                    None,
                )
                .to_string()));
            }
            Some(_) => {
                return Err(KafkaError::new(code, &format!("joining group '{group}'"), None).into())
            }
        }
        self.member_id = resp.member_id.to_string();
        self.generation = resp.generation_id;
        self.protocol = resp.protocol_name.as_ref().map(|p| p.to_string());
        self.leader = resp.leader.as_str() == self.member_id;
        if let Some(p) = &self.protocol {
            if p != RANGE {
                bail!(
                    "group '{group}' chose assignor '{p}', but this member offered only '{RANGE}'"
                );
            }
        }
        let assignments = if self.leader && !resp.skip_assignment {
            self.assign(&resp).await?
        } else {
            Vec::new()
        };
        let (generation, member_id) = (self.generation, self.member_id.clone());
        let instance = self.cfg.group_instance_id.clone();
        let protocol = self.protocol.clone();
        let rebalance_timeout = self.cfg.rebalance_timeout;
        let sync: Result<SyncGroupResponse> = async {
            Ok(on_coordinator!(
                self.group,
                "SyncGroup",
                deadline,
                |conn| async {
                    let version = conn.version_for(ApiKey::SyncGroup)?;
                    let mut req = SyncGroupRequest::default();
                    req.group_id = group_id(&group);
                    req.generation_id = generation;
                    req.member_id = str_bytes(&member_id);
                    if version >= 3 {
                        req.group_instance_id = instance.as_deref().map(str_bytes);
                    }
                    if version >= 5 {
                        req.protocol_type = Some(StrBytes::from_static_str(PROTOCOL_TYPE));
                        req.protocol_name = Some(str_bytes(protocol.as_deref().unwrap_or(RANGE)));
                    }
                    req.assignments = assignments.clone();
                    conn.send(&req, version, true).await?;
                    // The coordinator answers once the leader has sent the assignments.
                    let resp = conn.recv::<SyncGroupRequest>(rebalance_timeout).await?;
                    if coordinator_moved(resp.error_code) {
                        return Ok(Reply::Err(resp.error_code, None));
                    }
                    Ok(Reply::Ok(resp))
                }
            ))
        }
        .await;
        let resp = match sync {
            Ok(r) => r,
            Err(e) => return self.retry_or_fail(e, "SyncGroup"),
        };
        match RE::try_from_code(resp.error_code) {
            None => Ok(Ok(decode_assignment(resp.assignment)?)),
            Some(RE::UnknownMemberId) => {
                self.member_id.clear();
                self.generation = -1;
                Ok(Err(KafkaError::new(
                    resp.error_code,
                    &format!("syncing group '{group}'"),
                    None,
                )
                .to_string()))
            }
            Some(RE::RebalanceInProgress | RE::IllegalGeneration) => Ok(Err(KafkaError::new(
                resp.error_code,
                &format!("syncing group '{group}'"),
                None,
            )
            .to_string())),
            Some(_) => {
                Err(
                    KafkaError::new(resp.error_code, &format!("syncing group '{group}'"), None)
                        .into(),
                )
            }
        }
    }

    /// A failed call: coordinator trouble that outlasted the retries is final; a lost
    /// connection (the call's own deadline) is retried by [`ConsumerGroupMember::join`] until its own.
    fn retry_or_fail<T>(
        &mut self,
        e: anyhow::Error,
        what: &str,
    ) -> Result<std::result::Result<T, String>> {
        if e.downcast_ref::<KafkaError>().is_some() {
            return Err(e);
        }
        self.group.forget_coordinator();
        Ok(Err(format!("{what}: {e:#}")))
    }

    /// The leader's part: every member's range assignment, encoded.
    async fn assign(
        &mut self,
        resp: &JoinGroupResponse,
    ) -> Result<Vec<SyncGroupRequestAssignment>> {
        let mut subs = Vec::new();
        let mut topics = BTreeSet::new();
        for m in &resp.members {
            let s = decode_subscription(m.metadata.clone()).with_context(|| {
                format!("member {} of group '{}'", m.member_id, self.cfg.group_id)
            })?;
            let ts: Vec<String> = s.topics.iter().map(|t| t.to_string()).collect();
            topics.extend(ts.iter().cloned());
            subs.push(Subscriber {
                member_id: m.member_id.to_string(),
                group_instance_id: m.group_instance_id.as_ref().map(|i| i.to_string()),
                topics: ts,
            });
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let md = self.group.client.metadata(Some(&names)).await?;
        let mut counts = BTreeMap::new();
        for t in md.topics {
            let Some(name) = t.name.as_ref().map(|n| n.0.to_string()) else {
                continue;
            };
            if t.error_code == 0 && topics.contains(&name) {
                counts.insert(name, t.partitions.len() as i32);
            } else {
                tracing::warn!(topic = %name, error = t.error_code, "subscribed topic not assigned");
            }
        }
        let plan = range_assign(&subs, &counts);
        plan.iter()
            .map(|(member, a)| {
                let mut sa = SyncGroupRequestAssignment::default();
                sa.member_id = str_bytes(member);
                sa.assignment = encode_assignment(a)?;
                Ok(sa)
            })
            .collect()
    }

    fn start_heartbeat(&mut self) {
        let Some((_, conn)) = &self.group.coordinator else {
            self.heartbeat = Some(Heartbeat::lost("no coordinator".into()));
            return;
        };
        let (tx, rx) = tokio::sync::watch::channel(Beat::Fine);
        let task = tokio::spawn(heartbeat_loop(
            conn.clone(),
            self.cfg.clone(),
            self.member_id.clone(),
            self.generation,
            tx,
        ));
        self.heartbeat = Some(Heartbeat {
            task: Some(task),
            news: rx,
        });
    }

    /// Commits `offsets` as this generation. Fails with a [`KafkaError`] when the generation is
    /// over (REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID): the member then has
    /// to rejoin, and the next [`ConsumerGroupMember::poll`] says so.
    pub async fn commit(&mut self, offsets: &BTreeMap<Tp, i64>) -> Result<()> {
        let instance = self.cfg.group_instance_id.clone();
        let r = self
            .group
            .commit(
                self.generation,
                &self.member_id,
                instance.as_deref(),
                offsets,
            )
            .await;
        if let Err(e) = &r {
            if let Some(k) = e.downcast_ref::<KafkaError>() {
                if is_membership_error(k.code) {
                    self.end_generation(k.code == RE::UnknownMemberId.code());
                }
            }
        }
        r
    }

    /// Committed offsets of `partitions` (-1 where the group has none).
    pub async fn committed(&mut self, partitions: &[Tp]) -> Result<BTreeMap<Tp, i64>> {
        self.group.committed(Some(partitions)).await
    }

    /// LeaveGroup, so the others get our partitions now rather than after our session times
    /// out. Static members do not leave (their instance id keeps their place), as in Kafka.
    pub async fn leave(&mut self) -> Result<()> {
        self.heartbeat = None;
        if self.member_id.is_empty() || self.cfg.group_instance_id.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let group = self.cfg.group_id.clone();
        let member_id = self.member_id.clone();
        let r: Result<()> = async {
            on_coordinator!(self.group, "LeaveGroup", deadline, |conn| async {
                let version = conn.version_for(ApiKey::LeaveGroup)?;
                let mut req = LeaveGroupRequest::default();
                req.group_id = group_id(&group);
                if version >= 3 {
                    let mut m = MemberIdentity::default();
                    m.member_id = str_bytes(&member_id);
                    if version >= 5 {
                        m.reason = Some(StrBytes::from_static_str("the consumer is closing"));
                    }
                    req.members = vec![m];
                } else {
                    req.member_id = str_bytes(&member_id);
                }
                let resp = conn.call(&req, version).await?;
                if resp.error_code != 0 {
                    return Ok(Reply::Err(resp.error_code, None));
                }
                match resp.members.iter().find(|m| m.error_code != 0) {
                    Some(m) => Ok(Reply::Err(m.error_code, None)),
                    None => Ok(Reply::Ok(())),
                }
            });
            Ok(())
        }
        .await;
        self.member_id.clear();
        self.generation = -1;
        self.must_rejoin = true;
        match r {
            // Already gone (our session expired, or the group was rebalanced without us).
            Err(e)
                if e.downcast_ref::<KafkaError>()
                    .is_some_and(|k| is_membership_error(k.code)) =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

async fn join_group(
    conn: &mut BrokerConn,
    cfg: &MemberConfig,
    member_id: &str,
    metadata: Bytes,
) -> Result<Reply<JoinGroupResponse>> {
    let version = conn.version_for(ApiKey::JoinGroup)?;
    let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    let mut req = JoinGroupRequest::default();
    req.group_id = group_id(&cfg.group_id);
    req.session_timeout_ms = ms(cfg.session_timeout);
    req.rebalance_timeout_ms = ms(cfg.rebalance_timeout);
    req.member_id = str_bytes(member_id);
    if version >= 5 {
        req.group_instance_id = cfg.group_instance_id.as_deref().map(str_bytes);
    }
    req.protocol_type = StrBytes::from_static_str(PROTOCOL_TYPE);
    let mut p = JoinGroupRequestProtocol::default();
    p.name = StrBytes::from_static_str(RANGE);
    p.metadata = metadata;
    req.protocols = vec![p];
    conn.send(&req, version, true).await?;
    // The coordinator holds the answer until every member has rejoined (v0 has no rebalance
    // timeout: the session timeout stands in for it).
    let wait = if version >= 1 {
        cfg.rebalance_timeout
    } else {
        cfg.session_timeout
    };
    let resp = conn.recv::<JoinGroupRequest>(wait).await?;
    if coordinator_moved(resp.error_code) {
        return Ok(Reply::Err(resp.error_code, None));
    }
    Ok(Reply::Ok(resp))
}

async fn heartbeat_loop(
    conn: SharedConn,
    cfg: MemberConfig,
    member_id: String,
    generation: i32,
    news: tokio::sync::watch::Sender<Beat>,
) {
    loop {
        tokio::time::sleep(cfg.heartbeat_interval).await;
        let r = {
            let mut c = conn.lock().await;
            if c.in_flight() > 0 {
                Err(anyhow!("connection had a request in flight"))
            } else {
                // A heartbeat answered later than a session is useless: the coordinator has
                // dropped us by then, or it is unreachable and another one must be found.
                match tokio::time::timeout(
                    cfg.session_timeout,
                    heartbeat_once(&mut c, &cfg, &member_id, generation),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(anyhow!("no heartbeat answer within the session timeout")),
                }
            }
        };
        let subject = format!("heartbeat of group '{}'", cfg.group_id);
        let beat = match r {
            Ok(0) => continue,
            Ok(code) => {
                let e = KafkaError::new(code, &subject, None).to_string();
                match RE::try_from_code(code) {
                    Some(RE::RebalanceInProgress | RE::IllegalGeneration) => Beat::Rejoin(e),
                    Some(RE::UnknownMemberId) => Beat::Unknown(e),
                    _ if coordinator_moved(code) => Beat::Lost(e),
                    _ => Beat::Fatal(e),
                }
            }
            Err(e) => Beat::Lost(format!("{subject}: {e:#}")),
        };
        let _ = news.send(beat);
        return;
    }
}

async fn heartbeat_once(
    conn: &mut BrokerConn,
    cfg: &MemberConfig,
    member_id: &str,
    generation: i32,
) -> Result<i16> {
    let version = conn.version_for(ApiKey::Heartbeat)?;
    let mut req = HeartbeatRequest::default();
    req.group_id = group_id(&cfg.group_id);
    req.generation_id = generation;
    req.member_id = str_bytes(member_id);
    if version >= 3 {
        req.group_instance_id = cfg.group_instance_id.as_deref().map(str_bytes);
    }
    Ok(conn.call(&req, version).await?.error_code)
}

// --- admin requests ------------------------------------------------------------------------------

/// One group as ListGroups names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListedConsumerGroup {
    pub group_id: String,
    pub protocol_type: String,
    /// Empty when the broker's ListGroups version does not carry it (before v4).
    pub state: String,
}

/// ListGroups on every broker, merged (each broker lists only the groups it coordinates).
pub async fn list_groups(client: &mut Client) -> Result<Vec<ListedConsumerGroup>> {
    client.metadata(Some(&[])).await?;
    let mut out = BTreeMap::new();
    for id in client.broker_ids() {
        let mut attempt = 0;
        loop {
            let r = list_groups_on(client, id).await;
            match r {
                Ok(Reply::Ok(groups)) => {
                    for g in groups {
                        out.insert(g.group_id.clone(), g);
                    }
                    break;
                }
                Ok(Reply::Err(code, _)) if coordinator_moved(code) && attempt < MAX_RETRIES => {}
                Ok(Reply::Err(code, msg)) => {
                    return Err(KafkaError::new(
                        code,
                        &format!("listing groups on broker {id}"),
                        msg.as_deref(),
                    )
                    .into())
                }
                Err(e) if attempt < MAX_RETRIES => {
                    client.drop_broker(id);
                    tracing::debug!("listing groups on broker {id}: {e:#}");
                }
                Err(e) => return Err(e.context(format!("listing groups on broker {id}"))),
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
    Ok(out.into_values().collect())
}

async fn list_groups_on(client: &mut Client, id: i32) -> Result<Reply<Vec<ListedConsumerGroup>>> {
    let conn = client.broker(id).await?;
    let version = conn.version_for(ApiKey::ListGroups)?;
    let resp = conn.call(&ListGroupsRequest::default(), version).await?;
    if resp.error_code != 0 {
        return Ok(Reply::Err(resp.error_code, None));
    }
    Ok(Reply::Ok(
        resp.groups
            .into_iter()
            .map(|g| ListedConsumerGroup {
                group_id: g.group_id.0.to_string(),
                protocol_type: g.protocol_type.to_string(),
                state: g.group_state.to_string(),
            })
            .collect(),
    ))
}

/// A member as DescribeGroups reports it, its assignment decoded.
#[derive(Debug, Clone)]
pub struct DescribedMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub assignment: Assignment,
}

#[derive(Debug, Clone)]
pub struct ConsumerGroupDescription {
    pub group_id: String,
    /// Empty, PreparingRebalance, CompletingRebalance, Stable or Dead (unknown groups are Dead).
    pub state: String,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<DescribedMember>,
}

impl ConsumerGroupClient {
    /// DescribeGroups of this client's group, from its coordinator.
    pub async fn describe(&mut self) -> Result<ConsumerGroupDescription> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let group = self.group.clone();
        let g = on_coordinator!(self, "DescribeGroups", deadline, |conn| async {
            let version = conn.version_for(ApiKey::DescribeGroups)?;
            let mut req = DescribeGroupsRequest::default();
            req.groups = vec![group_id(&group)];
            let resp = conn.call(&req, version).await?;
            let Some(g) = resp
                .groups
                .into_iter()
                .find(|g| g.group_id.0.as_str() == group)
            else {
                bail!("DescribeGroups answer did not mention group '{group}'");
            };
            if g.error_code != 0 {
                return Ok(Reply::Err(
                    g.error_code,
                    g.error_message.map(|m| m.to_string()),
                ));
            }
            Ok(Reply::Ok(g))
        });
        let consumer = g.protocol_type.as_str() == PROTOCOL_TYPE;
        let mut members = Vec::new();
        for m in g.members {
            let assignment = if consumer {
                decode_assignment(m.member_assignment.clone()).unwrap_or_else(|e| {
                    tracing::warn!("member {}: {e:#}", m.member_id);
                    Assignment::default()
                })
            } else {
                Assignment::default()
            };
            members.push(DescribedMember {
                member_id: m.member_id.to_string(),
                group_instance_id: m.group_instance_id.map(|i| i.to_string()),
                client_id: m.client_id.to_string(),
                client_host: m.client_host.to_string(),
                assignment,
            });
        }
        Ok(ConsumerGroupDescription {
            group_id: g.group_id.0.to_string(),
            state: g.group_state.to_string(),
            protocol_type: g.protocol_type.to_string(),
            protocol: g.protocol_data.to_string(),
            members,
        })
    }

    /// DeleteGroups of this client's group.
    pub async fn delete(&mut self) -> Result<()> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let group = self.group.clone();
        on_coordinator!(self, "DeleteGroups", deadline, |conn| async {
            let version = conn.version_for(ApiKey::DeleteGroups)?;
            let mut req = DeleteGroupsRequest::default();
            req.groups_names = vec![group_id(&group)];
            let resp = conn.call(&req, version).await?;
            let Some(r) = resp
                .results
                .into_iter()
                .find(|r| r.group_id.0.as_str() == group)
            else {
                bail!("DeleteGroups answer did not mention group '{group}'");
            };
            if r.error_code != 0 {
                return Ok(Reply::Err(r.error_code, None));
            }
            Ok(Reply::Ok(()))
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: &str, instance: Option<&str>, topics: &[&str]) -> Subscriber {
        Subscriber {
            member_id: id.into(),
            group_instance_id: instance.map(String::from),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn parts(a: &BTreeMap<String, Assignment>, member: &str, topic: &str) -> Vec<i32> {
        a[member].partitions_of(topic).to_vec()
    }

    #[test]
    fn range_gives_contiguous_ranges_the_first_members_one_more() {
        let members = [
            sub("c", None, &["t"]),
            sub("a", None, &["t"]),
            sub("b", None, &["t"]),
        ];
        let counts = BTreeMap::from([("t".to_string(), 7)]);
        let a = range_assign(&members, &counts);
        assert_eq!(parts(&a, "a", "t"), vec![0, 1, 2]);
        assert_eq!(parts(&a, "b", "t"), vec![3, 4]);
        assert_eq!(parts(&a, "c", "t"), vec![5, 6]);
    }

    #[test]
    fn range_assigns_each_topic_to_its_subscribers_only() {
        let members = [sub("a", None, &["t", "u"]), sub("b", None, &["u"])];
        let counts = BTreeMap::from([("t".to_string(), 2), ("u".to_string(), 3)]);
        let a = range_assign(&members, &counts);
        assert_eq!(parts(&a, "a", "t"), vec![0, 1]);
        assert_eq!(parts(&a, "a", "u"), vec![0, 1]);
        assert_eq!(parts(&a, "b", "t"), Vec::<i32>::new());
        assert_eq!(parts(&a, "b", "u"), vec![2]);
    }

    #[test]
    fn range_leaves_extra_members_empty_and_unknown_topics_unassigned() {
        let members = [
            sub("a", None, &["t", "gone"]),
            sub("b", None, &["t"]),
            sub("c", None, &["t"]),
        ];
        let counts = BTreeMap::from([("t".to_string(), 2)]);
        let a = range_assign(&members, &counts);
        assert_eq!(a.len(), 3);
        assert_eq!(parts(&a, "a", "t"), vec![0]);
        assert_eq!(parts(&a, "b", "t"), vec![1]);
        assert!(a["c"].is_empty());
        assert!(a["a"].partitions_of("gone").is_empty());
        assert!(range_assign(&[], &counts).is_empty());
    }

    #[test]
    fn range_orders_static_members_first_by_instance_id() {
        let members = [
            sub("a", None, &["t"]),
            sub("z", Some("i2"), &["t"]),
            sub("y", Some("i1"), &["t"]),
        ];
        let counts = BTreeMap::from([("t".to_string(), 3)]);
        let a = range_assign(&members, &counts);
        assert_eq!(parts(&a, "y", "t"), vec![0]);
        assert_eq!(parts(&a, "z", "t"), vec![1]);
        assert_eq!(parts(&a, "a", "t"), vec![2]);
    }

    #[test]
    fn subscription_round_trips_with_its_version_prefix() {
        let owned = Assignment {
            topics: BTreeMap::from([("t".to_string(), vec![0, 2])]),
        };
        let b = encode_subscription(&["t".into(), "u".into()], &owned, 7).unwrap();
        assert_eq!(&b[..2], &3i16.to_be_bytes());
        let s = decode_subscription(b).unwrap();
        let topics: Vec<&str> = s.topics.iter().map(|t| t.as_str()).collect();
        assert_eq!(topics, vec!["t", "u"]);
        assert_eq!(s.owned_partitions.len(), 1);
        assert_eq!(s.owned_partitions[0].partitions, vec![0, 2]);
        assert_eq!(s.generation_id, 7);
    }

    #[test]
    fn subscription_v0_as_older_clients_write_it() {
        // version 0, topics ["t"], user data null: what librdkafka and old Java clients send.
        let raw: &[u8] = &[0, 0, 0, 0, 0, 1, 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
        let s = decode_subscription(Bytes::from_static(raw)).unwrap();
        assert_eq!(s.topics.len(), 1);
        assert_eq!(s.topics[0].as_str(), "t");
        assert!(s.owned_partitions.is_empty());
        // A future version is read as the newest we know; garbage is an error, not a panic.
        let mut b = encode_subscription(&["t".into()], &Assignment::default(), -1)
            .unwrap()
            .to_vec();
        b[..2].copy_from_slice(&9i16.to_be_bytes());
        assert!(decode_subscription(Bytes::from(b)).is_ok());
        assert!(decode_subscription(Bytes::from_static(&[0])).is_err());
        assert!(decode_subscription(Bytes::from_static(&[0xff, 0xff])).is_err());
        assert!(decode_subscription(Bytes::from_static(&[0, 0, 0, 9])).is_err());
    }

    #[test]
    fn assignment_round_trips_and_empty_bytes_are_empty() {
        let a = Assignment {
            topics: BTreeMap::from([("t".to_string(), vec![1, 3]), ("u".to_string(), vec![0])]),
        };
        let b = encode_assignment(&a).unwrap();
        assert_eq!(decode_assignment(b).unwrap(), a);
        assert_eq!(
            decode_assignment(Bytes::new()).unwrap(),
            Assignment::default()
        );
        assert_eq!(a.describe(), "t-1,t-3,u-0");
        // The v0 layout: version, [topic, [partition]], user data.
        let raw: &[u8] = &[
            0, 0, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 4, 0xff, 0xff, 0xff,
            0xff,
        ];
        let d = decode_assignment(Bytes::from_static(raw)).unwrap();
        assert_eq!(d.partitions_of("t"), &[4, 5]);
    }

    #[test]
    fn error_classes() {
        assert!(coordinator_moved(16) && coordinator_moved(15) && coordinator_moved(14));
        assert!(!coordinator_moved(27));
        assert!(is_membership_error(27) && is_membership_error(22) && is_membership_error(25));
        assert!(!is_membership_error(16));
    }
}
