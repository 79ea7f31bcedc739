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

use crate::broker::Broker;
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

/// Proposes `op` through the coordinator's batch; a failed proposal means this node cannot
/// coordinate now, which clients answer by finding the coordinator again.
pub async fn submit(broker: &Broker, op: ConsumerGroupOp) -> Result<ConsumerGroupReply, ErrorCode> {
    let wake = matches!(
        op,
        ConsumerGroupOp::Join { .. } | ConsumerGroupOp::Leave { .. } | ConsumerGroupOp::Sync { .. }
    );
    let reply = broker.consumer_groups.submit(op).await.map_err(|e| {
        tracing::debug!(error = %e, "consumer group proposal failed");
        ErrorCode::NotCoordinator
    })?;
    if wake {
        broker.consumer_groups.wake.notify_one();
    }
    match reply {
        ConsumerGroupReply::Err(code) => {
            Err(ErrorCode::from_code(code).unwrap_or(ErrorCode::UnknownServerError))
        }
        r => Ok(r),
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
    // The rebalance ends by its deadline (the longest rebalance timeout); a little slack covers
    // the timer's step and the completing proposal.
    let limit =
        Duration::from_millis(req.rebalance_timeout_ms.max(0) as u64) + Duration::from_secs(5);
    let answer = wait_for(broker, &group, limit, |g| {
        let g = g?;
        if !g.members.contains_key(&member_id) {
            return Some(Err(ErrorCode::UnknownMemberId));
        }
        // The generation moves past `before` only by a completed join phase that included this
        // member. Answer it then even if the group is already preparing the next round: another
        // member's join may have started that round before this waiter looked (both can apply in
        // one batch), and it reset this member's `joined`, so waiting for the round to end would
        // wait for this very member until its session expires. Kafka answers every join when its
        // phase completes; the member hears of the new round from SyncGroup or Heartbeat.
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

/// Members leaving: (member id, instance id). One code per member, or a group-level error.
pub async fn leave(
    broker: &Broker,
    group: &str,
    members: Vec<(String, Option<String>)>,
) -> Result<Vec<i16>, ErrorCode> {
    group_id_ok(group)?;
    broker.check(group)?;
    let op = ConsumerGroupOp::Leave {
        group: group.to_string(),
        members,
        now_ms: crate::clock::now_ms(),
    };
    match submit(broker, op).await? {
        ConsumerGroupReply::PerItem(codes) => Ok(codes),
        _ => Ok(Vec::new()),
    }
}

/// Offsets committed by a member (or, with generation -1 and no member id, by a consumer that
/// manages its own partitions). One code per offset, or a request-level error.
pub async fn commit(
    broker: &Broker,
    m: MemberRef<'_>,
    offsets: Vec<OffsetEntry>,
) -> Result<Vec<i16>, ErrorCode> {
    group_id_ok(m.group)?;
    broker.check(m.group)?;
    let (session, unchanged) = broker.with_group(m.group, |g| {
        (
            g.and_then(|g| g.members.get(m.member_id).map(|x| x.session_timeout_ms)),
            g.is_some_and(|g| unchanged_commit(g, &m, &offsets)),
        )
    });
    if let Some(session) = session {
        broker.consumer_groups.touch(m.group, m.member_id, session);
    }
    if unchanged {
        return Ok(vec![0; offsets.len()]);
    }
    let op = ConsumerGroupOp::Commit {
        group: m.group.to_string(),
        generation: m.generation,
        member_id: m.member_id.to_string(),
        instance_id: m.instance_id.map(String::from),
        offsets,
        now_ms: crate::clock::now_ms(),
        metadata_max_bytes: broker.cfg.offset_metadata_max_bytes,
    };
    match submit(broker, op).await? {
        ConsumerGroupReply::PerItem(codes) => Ok(codes),
        _ => Ok(Vec::new()),
    }
}

/// A commit that would change nothing: a valid member (or a simple consumer of an empty group)
/// committing exactly what is committed. Consumers that auto-commit while idle send these every
/// few seconds; answering them from the applied state keeps idle groups off the Raft log. A
/// commit that would fail goes through the log to get its error.
fn unchanged_commit(g: &ConsumerGroup, m: &MemberRef<'_>, offsets: &[OffsetEntry]) -> bool {
    let member_ok = if m.generation < 0 && m.member_id.is_empty() {
        g.state == ConsumerGroupState::Empty
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
                })
        })
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
    let op = ConsumerGroupOp::DeleteOffsets {
        group: group.to_string(),
        partitions,
    };
    match submit(broker, op).await? {
        ConsumerGroupReply::PerItem(codes) => Ok(codes),
        _ => Ok(Vec::new()),
    }
}
