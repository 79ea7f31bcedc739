//! The consumer-group coordinator (Kafka's classic group protocol). Every group's coordinator is
//! the node that leads the metadata Raft group: it decides joins, rebalances, session expiry and
//! offset commits by proposing [`ConsumerGroupOp`]s, which every node applies to the replicated state
//! (`controller/consumer_groups.rs`), so a failover keeps every group. What is not replicated — session
//! deadlines, offered member ids — is in [`crate::broker::ConsumerGroupRuntime`]. The Kafka handlers
//! (`kafka/handlers/consumer_groups.rs`) translate requests to the operations here; `loops.rs` proposes
//! the queued operations in batches and runs the timers.
//!
//! Groups reach their state only through [`ConsumerGroupStore`], so they can later be spread over several
//! Raft groups (as Kafka spreads them over `__consumer_offsets` partitions) without touching the
//! protocol logic.

pub mod loops;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::broker::{Broker, GroupReplyRx};
use crate::controller::consumer_groups::{
    ConsumerGroup, ConsumerGroupOp, ConsumerGroupReply, ConsumerGroupState, OffsetEntry, Protocol,
};
use crate::controller::BrokerInfo;
use crate::errors::ErrorCode;

/// Where groups live: read the applied state of one, propose operations, hear of changes.
pub trait ConsumerGroupStore {
    /// Whether this node may serve `group` now (NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS,
    /// COORDINATOR_NOT_AVAILABLE otherwise).
    fn check(&self, group: &str) -> Result<(), ErrorCode>;
    /// The node that coordinates `group`.
    fn coordinator_of(&self, group: &str) -> Option<BrokerInfo>;
    /// Runs `f` on the group's applied state, without copying it (heartbeats and commits come
    /// often; a group's offsets can be many).
    fn with_group<T>(&self, group: &str, f: impl FnOnce(Option<&ConsumerGroup>) -> T) -> T;
    /// A copy of the group's applied state.
    fn read(&self, group: &str) -> Option<ConsumerGroup> {
        self.with_group(group, |g| g.cloned())
    }
    /// Changes whenever some group's applied state may have.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

impl ConsumerGroupStore for Broker {
    fn check(&self, _group: &str) -> Result<(), ErrorCode> {
        let meta = self.raft.meta();
        match meta.leader_term() {
            // A leader cut off from the others keeps its role until it hears of a newer term;
            // meanwhile the new coordinator may expire members this one still answers.
            Some(_) if !meta.leads_with_quorum(QUORUM_LEASE) => Err(ErrorCode::NotCoordinator),
            Some(term) if self.consumer_groups.loaded_term.load(Ordering::Acquire) == term => {
                Ok(())
            }
            Some(_) => {
                // The timer loop takes over; a request need not wait for its next look.
                self.consumer_groups.wake.notify_one();
                Err(ErrorCode::CoordinatorLoadInProgress)
            }
            None if meta.leader().is_some() => Err(ErrorCode::NotCoordinator),
            None => Err(ErrorCode::CoordinatorNotAvailable),
        }
    }

    fn coordinator_of(&self, _group: &str) -> Option<BrokerInfo> {
        let leader = self.raft.meta().leader()?;
        self.state().brokers.get(&leader).cloned()
    }

    fn with_group<T>(&self, group: &str, f: impl FnOnce(Option<&ConsumerGroup>) -> T) -> T {
        f(self.state().consumer_groups.get(group))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.subscribe_groups()
    }
}

/// How recently a majority must have acknowledged the metadata leader for it to coordinate
/// (its heartbeats go out every 100 ms).
const QUORUM_LEASE: Duration = Duration::from_secs(2);

/// Proposes `op` through the coordinator's batch; a failed proposal means this node cannot
/// coordinate now, which clients answer by finding the coordinator again.
pub async fn submit(broker: &Broker, op: ConsumerGroupOp) -> Result<ConsumerGroupReply, ErrorCode> {
    let reply = broker.consumer_groups.submit(op).await;
    reply_of(reply)
}

fn reply_of(
    reply: Result<ConsumerGroupReply, crate::broker::BrokerError>,
) -> Result<ConsumerGroupReply, ErrorCode> {
    match reply {
        Ok(ConsumerGroupReply::Err(code)) => {
            Err(ErrorCode::from_code(code).unwrap_or(ErrorCode::UnknownServerError))
        }
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::debug!(error = %e, "consumer group proposal failed");
            Err(ErrorCode::NotCoordinator)
        }
    }
}

/// What a request's ordering step leaves its answer to await: the reply of an operation it
/// queued (in arrival order), or an answer known at once.
pub enum Queued {
    Done(Result<Vec<i16>, ErrorCode>),
    Waiting(GroupReplyRx),
}

impl Queued {
    /// One code per item, or a request-level error.
    pub async fn codes(self) -> Result<Vec<i16>, ErrorCode> {
        match self {
            Queued::Done(r) => r,
            Queued::Waiting(rx) => {
                let reply = rx.await.unwrap_or_else(|_| {
                    Err(crate::broker::BrokerError::Other(
                        "the group coordinator has stopped".into(),
                    ))
                });
                match reply_of(reply)? {
                    ConsumerGroupReply::PerItem(codes) => Ok(codes),
                    _ => Ok(Vec::new()),
                }
            }
        }
    }
}

async fn enqueue(broker: &Broker, op: ConsumerGroupOp) -> Queued {
    match broker.consumer_groups.enqueue(op).await {
        Ok(rx) => Queued::Waiting(rx),
        Err(_) => Queued::Done(Err(ErrorCode::NotCoordinator)),
    }
}

/// What a JoinGroup asks.
pub struct JoinRequest {
    pub group: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub protocol_type: String,
    pub protocols: Vec<Protocol>,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    /// JoinGroup v4+ clients handle MEMBER_ID_REQUIRED (KIP-394); older ones cannot.
    pub member_id_required: bool,
}

/// What a JoinGroup answers.
#[derive(Debug, Default)]
pub struct JoinAnswer {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// For the leader only: every member with its metadata for the chosen protocol.
    pub members: Vec<(String, Option<String>, bytes::Bytes)>,
}

impl JoinAnswer {
    fn error(code: ErrorCode, member_id: &str) -> JoinAnswer {
        JoinAnswer {
            error: code.code(),
            generation: -1,
            member_id: member_id.to_string(),
            ..JoinAnswer::default()
        }
    }
}

fn group_id_ok(group: &str) -> Result<(), ErrorCode> {
    if group.is_empty() {
        Err(ErrorCode::InvalidGroupId)
    } else {
        Ok(())
    }
}

/// Waits (bounded) until `done` says the group reached what the caller waits for; `None` on
/// timeout or once this node stops coordinating.
async fn wait_for<T>(
    broker: &Broker,
    group: &str,
    timeout: Duration,
    mut done: impl FnMut(Option<&ConsumerGroup>) -> Option<T>,
) -> Result<Option<T>, ErrorCode> {
    let mut rx = broker.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        rx.borrow_and_update();
        if let Some(t) = broker.with_group(group, &mut done) {
            return Ok(Some(t));
        }
        broker.check(group)?;
        // Leadership can go without a metadata change; look again now and then.
        let step = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_millis(500));
        if step.is_zero() {
            return Ok(None);
        }
        let _ = tokio::time::timeout(step, rx.changed()).await;
    }
}

pub async fn join(broker: &Broker, req: JoinRequest) -> JoinAnswer {
    match join_inner(broker, req).await {
        Ok(a) => a,
        Err((code, member)) => JoinAnswer::error(code, &member),
    }
}

async fn join_inner(
    broker: &Broker,
    mut req: JoinRequest,
) -> Result<JoinAnswer, (ErrorCode, String)> {
    let fail = |code: ErrorCode, member: &str| (code, member.to_string());
    group_id_ok(&req.group).map_err(|c| fail(c, &req.member_id))?;
    broker
        .check(&req.group)
        .map_err(|c| fail(c, &req.member_id))?;
    let cfg = &broker.cfg;
    if req.session_timeout_ms < cfg.group_min_session_timeout_ms
        || req.session_timeout_ms > cfg.group_max_session_timeout_ms
    {
        return Err(fail(ErrorCode::InvalidSessionTimeout, &req.member_id));
    }
    let runtime = &broker.consumer_groups;
    let current = broker.read(&req.group);
    if req.member_id.is_empty() {
        let prefix = req.instance_id.as_deref().unwrap_or(&req.client_id);
        let id = format!("{prefix}-{}", uuid::Uuid::new_v4());
        if req.member_id_required && req.instance_id.is_none() {
            let lapses =
                Instant::now() + Duration::from_millis(req.session_timeout_ms.max(0) as u64);
            runtime
                .pending_members
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((req.group.clone(), id.clone()), lapses);
            return Err((ErrorCode::MemberIdRequired, id));
        }
        req.member_id = id;
    } else {
        let known = current
            .as_ref()
            .is_some_and(|g| g.members.contains_key(&req.member_id));
        let offered = runtime
            .pending_members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(req.group.clone(), req.member_id.clone()))
            .is_some();
        if !known && !offered {
            let fenced = req.instance_id.as_deref().is_some_and(|i| {
                current
                    .as_ref()
                    .and_then(|g| g.member_by_instance(i))
                    .is_some()
            });
            // A static member may come back with an id of its own choosing only as itself.
            if fenced || req.instance_id.is_none() {
                let code = if fenced {
                    ErrorCode::FencedInstanceId
                } else {
                    ErrorCode::UnknownMemberId
                };
                return Err(fail(code, &req.member_id));
            }
        }
    }
    let member_id = req.member_id.clone();
    let group = req.group.clone();
    runtime.touch(&group, &member_id, req.session_timeout_ms);
    let op = ConsumerGroupOp::Join {
        group: group.clone(),
        member_id: member_id.clone(),
        instance_id: req.instance_id.clone(),
        client_id: req.client_id,
        client_host: req.client_host,
        protocol_type: req.protocol_type,
        protocols: req.protocols,
        session_timeout_ms: req.session_timeout_ms,
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        now_ms: crate::clock::now_ms(),
        initial_delay_ms: cfg.group_initial_rebalance_delay_ms,
        max_size: cfg.group_max_size,
    };
    let before = match submit(broker, op).await.map_err(|c| fail(c, &member_id))? {
        ConsumerGroupReply::JoinedRebalance { generation } => generation,
        // The member keeps the current generation: answer from it at once.
        _ => i32::MIN,
    };
    // The rebalance ends by its deadline (the longest rebalance timeout of its members); a
    // little slack covers the timer's step and the completing proposal.
    let deadline_ms = broker.with_group(&group, |g| g.map_or(0, |g| g.rebalance_deadline_ms));
    let left_ms = (deadline_ms - crate::clock::now_ms()).max(i64::from(req.rebalance_timeout_ms));
    let limit = Duration::from_millis(left_ms.max(0) as u64) + Duration::from_secs(5);
    let answer = wait_for(broker, &group, limit, |g| {
        let g = g?;
        if !g.members.contains_key(&member_id) {
            return Some(Err(ErrorCode::UnknownMemberId));
        }
        // A later generation answers the join, even if yet another rebalance has begun since
        // (the waiter may wake only after both): its SyncGroup then hears
        // REBALANCE_IN_PROGRESS and the member rejoins at once, as with Kafka.
        (g.generation > before).then(|| Ok(join_answer(g, &member_id)))
    })
    .await
    .map_err(|c| fail(c, &member_id))?;
    runtime.touch(&group, &member_id, req.session_timeout_ms);
    match answer {
        Some(Ok(a)) => Ok(a),
        Some(Err(code)) => Err(fail(code, &member_id)),
        None => Err(fail(ErrorCode::RebalanceInProgress, &member_id)),
    }
}

fn join_answer(g: &ConsumerGroup, member_id: &str) -> JoinAnswer {
    let leader = g.leader.clone().unwrap_or_default();
    let protocol = g.protocol.clone();
    let members = if leader == member_id {
        g.members
            .values()
            .map(|m| {
                let meta = protocol
                    .as_ref()
                    .and_then(|p| m.protocols.iter().find(|x| &x.name == p))
                    .map(|p| p.metadata.0.clone())
                    .unwrap_or_default();
                (m.member_id.clone(), m.instance_id.clone(), meta)
            })
            .collect()
    } else {
        Vec::new()
    };
    JoinAnswer {
        error: 0,
        generation: g.generation,
        protocol_type: g.protocol_type.clone(),
        protocol,
        leader,
        member_id: member_id.to_string(),
        members,
    }
}

/// A member's identity in SyncGroup, Heartbeat and OffsetCommit.
pub struct MemberRef<'a> {
    pub group: &'a str,
    pub generation: i32,
    pub member_id: &'a str,
    pub instance_id: Option<&'a str>,
}

/// Kafka's checks of a member against the group, in Kafka's order.
fn validate_member(g: Option<&ConsumerGroup>, m: &MemberRef<'_>) -> Result<i32, ErrorCode> {
    let g = g.ok_or(ErrorCode::UnknownMemberId)?;
    if let Some(instance) = m.instance_id {
        if let Some(owner) = g.member_by_instance(instance) {
            if owner.member_id != m.member_id {
                return Err(ErrorCode::FencedInstanceId);
            }
        }
    }
    let member = g
        .members
        .get(m.member_id)
        .ok_or(ErrorCode::UnknownMemberId)?;
    if m.generation != g.generation {
        return Err(ErrorCode::IllegalGeneration);
    }
    Ok(member.session_timeout_ms)
}

/// What a SyncGroup answers: the member's assignment, the protocol type and name.
pub struct SyncAnswer {
    pub assignment: bytes::Bytes,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
}

pub async fn sync(
    broker: &Broker,
    m: MemberRef<'_>,
    protocol_type: Option<&str>,
    protocol: Option<&str>,
    assignments: Vec<(String, bytes::Bytes)>,
) -> Result<SyncAnswer, ErrorCode> {
    group_id_ok(m.group)?;
    broker.check(m.group)?;
    let g = broker.read(m.group);
    let session = validate_member(g.as_ref(), &m)?;
    let Some(g) = g else {
        return Err(ErrorCode::UnknownMemberId);
    };
    // v5 clients say which protocol they think they synced; it must be the group's.
    if protocol_type.is_some_and(|t| Some(t) != g.protocol_type.as_deref())
        || protocol.is_some_and(|p| Some(p) != g.protocol.as_deref())
    {
        return Err(ErrorCode::InconsistentGroupProtocol);
    }
    if g.state == ConsumerGroupState::PreparingRebalance {
        return Err(ErrorCode::RebalanceInProgress);
    }
    broker.consumer_groups.touch(m.group, m.member_id, session);
    if g.state == ConsumerGroupState::CompletingRebalance
        && g.leader.as_deref() == Some(m.member_id)
    {
        let op = ConsumerGroupOp::Sync {
            group: m.group.to_string(),
            generation: m.generation,
            member_id: m.member_id.to_string(),
            assignments: assignments
                .into_iter()
                .map(|(id, a)| (id, crate::controller::consumer_groups::Blob(a)))
                .collect(),
        };
        submit(broker, op).await?;
    }
    let generation = m.generation;
    let member_id = m.member_id;
    let answer = wait_for(
        broker,
        m.group,
        Duration::from_millis(session.max(0) as u64),
        |g| {
            let g = g?;
            let Some(me) = g.members.get(member_id) else {
                return Some(Err(ErrorCode::UnknownMemberId));
            };
            if g.generation != generation || g.state == ConsumerGroupState::PreparingRebalance {
                return Some(Err(ErrorCode::RebalanceInProgress));
            }
            (g.state == ConsumerGroupState::Stable).then(|| {
                Ok(SyncAnswer {
                    assignment: me.assignment.0.clone(),
                    protocol_type: g.protocol_type.clone(),
                    protocol: g.protocol.clone(),
                })
            })
        },
    )
    .await?;
    broker.consumer_groups.touch(m.group, m.member_id, session);
    answer.unwrap_or(Err(ErrorCode::RebalanceInProgress))
}

pub fn heartbeat(broker: &Broker, m: MemberRef<'_>) -> Result<(), ErrorCode> {
    group_id_ok(m.group)?;
    broker.check(m.group)?;
    let (session, state) = broker.with_group(m.group, |g| {
        Ok((validate_member(g, &m)?, g.map(|g| g.state)))
    })?;
    broker.consumer_groups.touch(m.group, m.member_id, session);
    match state {
        Some(ConsumerGroupState::PreparingRebalance) => Err(ErrorCode::RebalanceInProgress),
        _ => Ok(()),
    }
}

/// Members leaving: (member id, instance id). The ordering step (a consumer's last commit,
/// sent just before, is applied first); one code per member, or a group-level error.
pub async fn leave(broker: &Broker, group: &str, members: Vec<(String, Option<String>)>) -> Queued {
    if let Err(code) = group_id_ok(group).and_then(|()| broker.check(group)) {
        return Queued::Done(Err(code));
    }
    let op = ConsumerGroupOp::Leave {
        group: group.to_string(),
        members,
        now_ms: crate::clock::now_ms(),
    };
    enqueue(broker, op).await
}

/// Offsets committed by a member (or, with a negative generation, by a consumer that manages
/// its own partitions). The ordering step: the answer awaits what it returns.
pub async fn commit(broker: &Broker, m: MemberRef<'_>, offsets: Vec<OffsetEntry>) -> Queued {
    if let Err(code) = group_id_ok(m.group).and_then(|()| broker.check(m.group)) {
        return Queued::Done(Err(code));
    }
    let now_ms = crate::clock::now_ms();
    // Nothing queued (no earlier commit could still land after this one), and a recent enough
    // commit time that skipping the write cannot let the offset expire.
    let fresh_after = now_ms - broker.cfg.offsets_retention_ms / 2;
    let quiet = broker.consumer_groups.in_flight() == 0;
    let (session, unchanged) = broker.with_group(m.group, |g| {
        (
            g.and_then(|g| g.members.get(m.member_id).map(|x| x.session_timeout_ms)),
            quiet && g.is_some_and(|g| unchanged_commit(g, &m, &offsets, fresh_after)),
        )
    });
    if let Some(session) = session {
        broker.consumer_groups.touch(m.group, m.member_id, session);
    }
    if unchanged {
        return Queued::Done(Ok(vec![0; offsets.len()]));
    }
    // DELIBERATELY BROKEN with `--features chaos-bugs`, for the chaos harness to catch (its
    // consumer-group rules): SLUICE_CHAOS_BUG=offsets-backwards stores a commit of an offset
    // that is a multiple of 5 (and at least 5) 5 lower than asked, offsets-skip-ahead 5 higher;
    // the member is told it was committed as asked either way.
    #[cfg(feature = "chaos-bugs")]
    let offsets = chaos_skew_offsets(offsets);
    let op = ConsumerGroupOp::Commit {
        group: m.group.to_string(),
        generation: m.generation,
        member_id: m.member_id.to_string(),
        instance_id: m.instance_id.map(String::from),
        offsets,
        now_ms,
        metadata_max_bytes: broker.cfg.offset_metadata_max_bytes,
    };
    enqueue(broker, op).await
}

/// A commit that would change nothing: a valid member (or a simple consumer of an empty group)
/// committing exactly what is committed. Consumers that auto-commit while idle send these every
/// few seconds; answering them from the applied state keeps idle groups off the Raft log. A
/// commit that would fail goes through the log to get its error.
fn unchanged_commit(
    g: &ConsumerGroup,
    m: &MemberRef<'_>,
    offsets: &[OffsetEntry],
    fresh_after_ms: i64,
) -> bool {
    let member_ok = if m.generation < 0 && g.state == ConsumerGroupState::Empty {
        true
    } else {
        g.state != ConsumerGroupState::CompletingRebalance && validate_member(Some(g), m).is_ok()
    };
    member_ok
        && offsets.iter().all(|o| {
            g.offsets
                .get(&o.topic)
                .and_then(|parts| parts.get(&o.partition))
                .is_some_and(|c| {
                    c.offset == o.offset
                        && c.leader_epoch == o.leader_epoch
                        && c.metadata == o.metadata
                        && c.commit_ms >= fresh_after_ms
                })
        })
}

#[cfg(feature = "chaos-bugs")]
fn chaos_skew_offsets(mut offsets: Vec<OffsetEntry>) -> Vec<OffsetEntry> {
    let delta = if crate::chaos_bugs::enabled("offsets-backwards") {
        -5
    } else if crate::chaos_bugs::enabled("offsets-skip-ahead") {
        5
    } else {
        return offsets;
    };
    for o in &mut offsets {
        if o.offset >= 5 && o.offset % 5 == 0 {
            o.offset += delta;
        }
    }
    offsets
}

/// Runs one operation whose reply is Ok or an error (DeleteGroups).
pub async fn delete_group(broker: &Broker, group: &str) -> Result<(), ErrorCode> {
    group_id_ok(group)?;
    broker.check(group)?;
    submit(
        broker,
        ConsumerGroupOp::DeleteGroup {
            group: group.to_string(),
        },
    )
    .await
    .map(|_| ())
}

pub async fn delete_offsets(
    broker: &Broker,
    group: &str,
    partitions: Vec<(String, i32)>,
) -> Result<Vec<i16>, ErrorCode> {
    group_id_ok(group)?;
    broker.check(group)?;
    let subscribed = broker.with_group(group, |g| {
        g.map(|g| g.subscribed_topics().into_iter().collect())
            .unwrap_or_default()
    });
    let op = ConsumerGroupOp::DeleteOffsets {
        group: group.to_string(),
        partitions,
        subscribed,
    };
    match submit(broker, op).await? {
        ConsumerGroupReply::PerItem(codes) => Ok(codes),
        _ => Ok(Vec::new()),
    }
}
