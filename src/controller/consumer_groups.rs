//! Consumer groups as the metadata group replicates them: membership, generations, the leader's
//! assignment and committed offsets, with the deterministic state changes of Kafka's classic group
//! protocol. Everything a coordinator decides by time (a session expired, a rebalance is due) it
//! proposes as an operation with the time stamped in, so every replica applies the same change and
//! a coordinator failover keeps every group. What is not replicated (heartbeat deadlines, member
//! ids handed out but not yet used) lives on the coordinator in `coordinator/`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kafka_protocol::messages::{ConsumerProtocolAssignment, ConsumerProtocolSubscription};
use kafka_protocol::protocol::Decodable;
use serde::{Deserialize, Serialize};

use super::TopicMeta;
use crate::errors::ErrorCode;

/// Kafka's group states (classic protocol), named as DescribeGroups and ListGroups spell them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ConsumerGroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl ConsumerGroupState {
    pub fn name(self) -> &'static str {
        match self {
            ConsumerGroupState::Empty => "Empty",
            ConsumerGroupState::PreparingRebalance => "PreparingRebalance",
            ConsumerGroupState::CompletingRebalance => "CompletingRebalance",
            ConsumerGroupState::Stable => "Stable",
        }
    }
}

/// Opaque client bytes (subscriptions, assignments), kept as hex in the JSON state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Bytes);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.0.len() * 2);
        for b in self.0.iter() {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0x0f)] as char);
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map(|v| Blob(Bytes::from(v)))
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub metadata: Blob,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    /// In the member's order of preference.
    pub protocols: Vec<Protocol>,
    /// What the leader assigned it in the current generation, as the leader sent it.
    pub assignment: Blob,
    /// Has (re)joined the rebalance being prepared.
    pub joined: bool,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Option<&Blob> {
        self.protocols
            .iter()
            .find(|p| p.name == protocol)
            .map(|p| &p.metadata)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    /// The coordinator's clock when committed (for `offsets.retention.minutes`).
    pub commit_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsumerGroup {
    pub state: ConsumerGroupState,
    pub protocol_type: Option<String>,
    /// The protocol (assignor) chosen for the current generation.
    pub protocol: Option<String>,
    pub generation: i32,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// A rebalance being prepared completes by then at the latest, without the members that have
    /// not rejoined.
    pub rebalance_deadline_ms: i64,
    /// A group's first rebalance waits until then for more members
    /// (`group.initial.rebalance.delay.ms`).
    pub initial_delay_until_ms: i64,
    /// When the group last became empty (offsets of empty groups expire).
    pub empty_since_ms: i64,
    /// topic -> partition -> committed offset.
    pub offsets: BTreeMap<String, BTreeMap<i32, CommittedOffset>>,
}

impl ConsumerGroup {
    fn new(now_ms: i64) -> Self {
        ConsumerGroup {
            state: ConsumerGroupState::Empty,
            protocol_type: None,
            protocol: None,
            generation: 0,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            initial_delay_until_ms: 0,
            empty_since_ms: now_ms,
            offsets: BTreeMap::new(),
        }
    }

    pub fn member_by_instance(&self, instance: &str) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.instance_id.as_deref() == Some(instance))
    }

    /// Protocols every member supports, in the first member's order.
    fn common_protocols(&self) -> Vec<String> {
        let mut members = self.members.values();
        let Some(first) = members.next() else {
            return Vec::new();
        };
        let rest: Vec<&Member> = members.collect();
        first
            .protocols
            .iter()
            .map(|p| p.name.clone())
            .filter(|name| rest.iter().all(|m| m.metadata_for(name).is_some()))
            .collect()
    }

    /// Kafka's choice: each member votes for its most preferred protocol among those all
    /// support; most votes wins, ties go to the earlier candidate.
    fn select_protocol(&self) -> Option<String> {
        let candidates = self.common_protocols();
        let mut votes: Vec<usize> = vec![0; candidates.len()];
        for m in self.members.values() {
            if let Some(i) = m
                .protocols
                .iter()
                .find_map(|p| candidates.iter().position(|c| *c == p.name))
            {
                votes[i] += 1;
            }
        }
        let best = votes.iter().copied().max()?;
        votes
            .iter()
            .position(|v| *v == best)
            .and_then(|i| candidates.get(i).cloned())
    }

    /// Every remaining member must rejoin; completes by the longest rebalance timeout.
    fn prepare_rebalance(&mut self, now_ms: i64, joiner: Option<&str>) {
        let timeout = self
            .members
            .values()
            .map(|m| i64::from(m.rebalance_timeout_ms))
            .max()
            .unwrap_or(0);
        if self.state != ConsumerGroupState::PreparingRebalance {
            for m in self.members.values_mut() {
                m.joined = Some(m.member_id.as_str()) == joiner;
            }
            self.rebalance_deadline_ms = now_ms.saturating_add(timeout);
        }
        self.state = ConsumerGroupState::PreparingRebalance;
    }

    /// After members left or expired: an empty group is Empty in the next generation, as Kafka
    /// does; otherwise the others rebalance.
    fn after_removal(&mut self, now_ms: i64) {
        if self.members.is_empty() {
            self.become_empty(now_ms);
        } else if self.state != ConsumerGroupState::PreparingRebalance {
            self.prepare_rebalance(now_ms, None);
        }
    }

    fn become_empty(&mut self, now_ms: i64) {
        self.generation = self.generation.saturating_add(1);
        self.state = ConsumerGroupState::Empty;
        self.protocol = None;
        self.leader = None;
        self.empty_since_ms = now_ms;
        self.initial_delay_until_ms = 0;
    }

    /// The topics the members subscribe to (consumer protocol), for OffsetDelete.
    pub fn subscribed_topics(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if self.protocol_type.as_deref() != Some("consumer") {
            return out;
        }
        let Some(protocol) = &self.protocol else {
            return out;
        };
        for m in self.members.values() {
            if let Some(meta) = m.metadata_for(protocol) {
                out.extend(subscription_topics(&meta.0));
            }
        }
        out
    }
}

/// The topics of a consumer-protocol subscription; none if it does not decode.
pub fn subscription_topics(metadata: &Bytes) -> Vec<String> {
    let mut buf = metadata.clone();
    if buf.len() < 2 {
        return Vec::new();
    }
    let version = i16::from_be_bytes([buf[0], buf[1]]);
    bytes::Buf::advance(&mut buf, 2);
    // Newer subscription versions only add fields; read them as the newest we know.
    let version = version.clamp(0, 3);
    ConsumerProtocolSubscription::decode(&mut buf, version)
        .map(|s| s.topics.iter().map(|t| t.to_string()).collect())
        .unwrap_or_default()
}

/// A consumer-protocol assignment as (topic, partitions); empty if it does not decode.
pub fn assignment_partitions(assignment: &Bytes) -> Vec<(String, Vec<i32>)> {
    let mut buf = assignment.clone();
    if buf.len() < 2 {
        return Vec::new();
    }
    let version = i16::from_be_bytes([buf[0], buf[1]]);
    bytes::Buf::advance(&mut buf, 2);
    let version = version.clamp(0, 3);
    ConsumerProtocolAssignment::decode(&mut buf, version)
        .map(|a| {
            a.assigned_partitions
                .iter()
                .map(|t| (t.topic.to_string(), t.partitions.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// One offset to commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OffsetEntry {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
}

/// A change to the consumer groups. Proposers stamp times (`now_ms`) and ids; apply reads no
/// clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ConsumerGroupOp {
    Join {
        group: String,
        member_id: String,
        instance_id: Option<String>,
        client_id: String,
        client_host: String,
        protocol_type: String,
        protocols: Vec<Protocol>,
        session_timeout_ms: i32,
        rebalance_timeout_ms: i32,
        now_ms: i64,
        initial_delay_ms: i64,
        max_size: u32,
    },
    /// The coordinator's verdict that the rebalance of `generation` is due: everyone rejoined,
    /// or its deadline passed.
    CompleteJoin {
        group: String,
        generation: i32,
        now_ms: i64,
    },
    /// The leader's assignment for `generation`.
    Sync {
        group: String,
        generation: i32,
        member_id: String,
        assignments: Vec<(String, Blob)>,
    },
    /// Members leaving; an empty member id with an instance id names a static member.
    Leave {
        group: String,
        members: Vec<(String, Option<String>)>,
        now_ms: i64,
    },
    /// The coordinator's verdict that a member's session expired.
    Expire {
        group: String,
        member_id: String,
        now_ms: i64,
    },
    Commit {
        group: String,
        generation: i32,
        member_id: String,
        instance_id: Option<String>,
        offsets: Vec<OffsetEntry>,
        now_ms: i64,
        metadata_max_bytes: usize,
    },
    DeleteGroup {
        group: String,
    },
    DeleteOffsets {
        group: String,
        partitions: Vec<(String, i32)>,
        /// The topics the members subscribe to, decoded by the proposer (so apply never
        /// depends on how a binary decodes client bytes).
        subscribed: Vec<String>,
    },
    /// Offsets of empty groups older than the retention go, and groups left with nothing.
    ExpireOffsets {
        now_ms: i64,
        retention_ms: i64,
    },
}

impl ConsumerGroupOp {
    /// Roughly its size as JSON in a metadata entry (blobs are hex: two bytes a byte).
    pub fn approx_bytes(&self) -> usize {
        let blobs = |ps: &[Protocol]| -> usize {
            ps.iter()
                .map(|p| p.name.len() + 2 * p.metadata.0.len() + 32)
                .sum()
        };
        256 + match self {
            ConsumerGroupOp::Join { protocols, .. } => blobs(protocols),
            ConsumerGroupOp::Sync { assignments, .. } => assignments
                .iter()
                .map(|(id, a)| id.len() + 2 * a.0.len() + 16)
                .sum(),
            ConsumerGroupOp::Leave { members, .. } => members.len() * 96,
            ConsumerGroupOp::Commit { offsets, .. } => offsets
                .iter()
                .map(|o| o.topic.len() + o.metadata.len() + 96)
                .sum(),
            ConsumerGroupOp::DeleteOffsets { partitions, .. } => {
                partitions.iter().map(|(t, _)| t.len() + 32).sum()
            }
            _ => 0,
        }
    }

    pub fn group(&self) -> Option<&str> {
        match self {
            ConsumerGroupOp::Join { group, .. }
            | ConsumerGroupOp::CompleteJoin { group, .. }
            | ConsumerGroupOp::Sync { group, .. }
            | ConsumerGroupOp::Leave { group, .. }
            | ConsumerGroupOp::Expire { group, .. }
            | ConsumerGroupOp::Commit { group, .. }
            | ConsumerGroupOp::DeleteGroup { group }
            | ConsumerGroupOp::DeleteOffsets { group, .. } => Some(group),
            ConsumerGroupOp::ExpireOffsets { .. } => None,
        }
    }
}

/// The outcome of one [`ConsumerGroupOp`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ConsumerGroupReply {
    Ok,
    Err(i16),
    /// A join that needs no rebalance: the member's current generation stands.
    JoinedStable,
    /// A join that started or joined a rebalance; it completes in a later generation than this.
    JoinedRebalance {
        generation: i32,
    },
    /// One code per item (offsets committed, members leaving, offsets deleted), in order.
    PerItem(Vec<i16>),
}

fn err(code: ErrorCode) -> ConsumerGroupReply {
    ConsumerGroupReply::Err(code.code())
}

/// Every consumer group, by name.
pub type ConsumerGroups = BTreeMap<String, ConsumerGroup>;

/// Applies one operation. `topics` is the applied metadata (commits check partitions exist).
pub fn apply_group_op(
    groups: &mut ConsumerGroups,
    topics: &BTreeMap<String, TopicMeta>,
    op: &ConsumerGroupOp,
) -> ConsumerGroupReply {
    match op {
        ConsumerGroupOp::Join {
            group,
            member_id,
            instance_id,
            client_id,
            client_host,
            protocol_type,
            protocols,
            session_timeout_ms,
            rebalance_timeout_ms,
            now_ms,
            initial_delay_ms,
            max_size,
        } => {
            // Checked before the group exists: a refused join must not leave an empty group.
            if protocols.is_empty() {
                return err(ErrorCode::InconsistentGroupProtocol);
            }
            let g = groups
                .entry(group.clone())
                .or_insert_with(|| ConsumerGroup::new(*now_ms));
            if !g.members.is_empty() {
                if g.protocol_type.as_deref() != Some(protocol_type.as_str()) {
                    return err(ErrorCode::InconsistentGroupProtocol);
                }
                let common = g.common_protocols();
                let others_only = g.members.len() == 1 && g.members.contains_key(member_id);
                if !others_only && !protocols.iter().any(|p| common.contains(&p.name)) {
                    return err(ErrorCode::InconsistentGroupProtocol);
                }
            }
            // A static member rejoining under a new member id takes its old place; the old id
            // is fenced from then on.
            let mut replaced_leader = false;
            let mut previous: Option<Member> = None;
            if let Some(instance) = instance_id {
                let old_id = g.member_by_instance(instance).map(|m| m.member_id.clone());
                if let Some(old_id) = old_id.filter(|old| old != member_id) {
                    previous = g.members.remove(&old_id);
                    replaced_leader = g.leader.as_deref() == Some(old_id.as_str());
                }
            }
            let known = g.members.get(member_id).cloned().or(previous.clone());
            if known.is_none() && g.members.len() >= *max_size as usize {
                return err(ErrorCode::GroupMaxSizeReached);
            }
            let unchanged = known.as_ref().is_some_and(|m| m.protocols == *protocols);
            let member = Member {
                member_id: member_id.clone(),
                instance_id: instance_id.clone(),
                client_id: client_id.clone(),
                client_host: client_host.clone(),
                session_timeout_ms: *session_timeout_ms,
                rebalance_timeout_ms: *rebalance_timeout_ms,
                protocols: protocols.clone(),
                assignment: known.map(|m| m.assignment).unwrap_or_default(),
                joined: true,
            };
            g.members.insert(member_id.clone(), member);
            if replaced_leader {
                g.leader = Some(member_id.clone());
            }
            let is_leader = g.leader.as_deref() == Some(member_id.as_str());
            g.protocol_type = Some(protocol_type.clone());
            // Kafka lets a known follower (or a static member coming back) with unchanged
            // protocols keep its generation; the leader rejoining means it wants a new
            // assignment.
            let keeps_generation = unchanged
                && match g.state {
                    ConsumerGroupState::Stable => !is_leader || previous.is_some(),
                    // A static member replaced now would miss the leader's assignment, which
                    // names its old id: Kafka rebalances then, and so do we.
                    ConsumerGroupState::CompletingRebalance => previous.is_none(),
                    _ => false,
                };
            if keeps_generation {
                return ConsumerGroupReply::JoinedStable;
            }
            let was_empty = g.state == ConsumerGroupState::Empty;
            let generation = g.generation;
            g.prepare_rebalance(*now_ms, Some(member_id));
            if was_empty {
                g.initial_delay_until_ms = now_ms.saturating_add(*initial_delay_ms);
            } else if g.initial_delay_until_ms > *now_ms {
                // New members keep the first rebalance waiting a little longer, never past its
                // deadline (Kafka's delayed initial join).
                g.initial_delay_until_ms = now_ms
                    .saturating_add(*initial_delay_ms)
                    .min(g.rebalance_deadline_ms);
            }
            ConsumerGroupReply::JoinedRebalance { generation }
        }
        ConsumerGroupOp::CompleteJoin {
            group,
            generation,
            now_ms,
        } => {
            let Some(g) = groups.get_mut(group) else {
                return ConsumerGroupReply::Ok;
            };
            // A verdict about an earlier round is stale.
            if g.state != ConsumerGroupState::PreparingRebalance || g.generation != *generation {
                return ConsumerGroupReply::Ok;
            }
            g.members.retain(|_, m| m.joined);
            if g.members.is_empty() {
                g.become_empty(*now_ms);
                return ConsumerGroupReply::Ok;
            }
            g.generation = g.generation.saturating_add(1);
            g.protocol = g.select_protocol();
            if !g.leader.as_ref().is_some_and(|l| g.members.contains_key(l)) {
                g.leader = g.members.keys().next().cloned();
            }
            for m in g.members.values_mut() {
                m.assignment = Blob::default();
            }
            g.state = ConsumerGroupState::CompletingRebalance;
            ConsumerGroupReply::Ok
        }
        ConsumerGroupOp::Sync {
            group,
            generation,
            member_id,
            assignments,
        } => {
            let Some(g) = groups.get_mut(group) else {
                return err(ErrorCode::UnknownMemberId);
            };
            if !g.members.contains_key(member_id) {
                return err(ErrorCode::UnknownMemberId);
            }
            if *generation != g.generation {
                return err(ErrorCode::IllegalGeneration);
            }
            match g.state {
                ConsumerGroupState::PreparingRebalance => err(ErrorCode::RebalanceInProgress),
                ConsumerGroupState::CompletingRebalance
                    if g.leader.as_deref() == Some(member_id.as_str()) =>
                {
                    for m in g.members.values_mut() {
                        m.assignment = assignments
                            .iter()
                            .find(|(id, _)| *id == m.member_id)
                            .map(|(_, a)| a.clone())
                            .unwrap_or_default();
                    }
                    g.state = ConsumerGroupState::Stable;
                    ConsumerGroupReply::Ok
                }
                _ => ConsumerGroupReply::Ok,
            }
        }
        ConsumerGroupOp::Leave {
            group,
            members,
            now_ms,
        } => {
            let Some(g) = groups.get_mut(group) else {
                return ConsumerGroupReply::PerItem(vec![
                    ErrorCode::UnknownMemberId.code();
                    members.len()
                ]);
            };
            let mut codes = Vec::with_capacity(members.len());
            let mut removed = false;
            for (member_id, instance_id) in members {
                let target = match instance_id {
                    Some(instance) => match g.member_by_instance(instance) {
                        Some(m) if !member_id.is_empty() && m.member_id != *member_id => {
                            codes.push(ErrorCode::FencedInstanceId.code());
                            continue;
                        }
                        Some(m) => Some(m.member_id.clone()),
                        None => None,
                    },
                    None => g.members.contains_key(member_id).then(|| member_id.clone()),
                };
                match target {
                    Some(id) => {
                        g.members.remove(&id);
                        removed = true;
                        codes.push(0);
                    }
                    None => codes.push(ErrorCode::UnknownMemberId.code()),
                }
            }
            if removed {
                g.after_removal(*now_ms);
            }
            ConsumerGroupReply::PerItem(codes)
        }
        ConsumerGroupOp::Expire {
            group,
            member_id,
            now_ms,
        } => {
            let Some(g) = groups.get_mut(group) else {
                return ConsumerGroupReply::Ok;
            };
            if g.members.remove(member_id).is_some() {
                g.after_removal(*now_ms);
            }
            ConsumerGroupReply::Ok
        }
        ConsumerGroupOp::Commit {
            group,
            generation,
            member_id,
            instance_id,
            offsets,
            now_ms,
            metadata_max_bytes,
        } => {
            // Kafka: a negative generation commits into a group without members, whoever
            // sends it (consumers that assign partitions themselves, admin tools).
            let simple = *generation < 0;
            let g = match groups.get_mut(group) {
                Some(g) => g,
                // Only a consumer without membership may create a group by committing.
                None if simple => groups
                    .entry(group.clone())
                    .or_insert_with(|| ConsumerGroup::new(*now_ms)),
                None => return err(ErrorCode::IllegalGeneration),
            };
            if !(simple && g.state == ConsumerGroupState::Empty) {
                if let Some(instance) = instance_id {
                    if let Some(m) = g.member_by_instance(instance) {
                        if m.member_id != *member_id {
                            return err(ErrorCode::FencedInstanceId);
                        }
                    }
                }
                if g.state == ConsumerGroupState::CompletingRebalance {
                    return err(ErrorCode::RebalanceInProgress);
                }
                if !g.members.contains_key(member_id) {
                    return err(ErrorCode::UnknownMemberId);
                }
                if *generation != g.generation {
                    return err(ErrorCode::IllegalGeneration);
                }
            }
            let codes = offsets
                .iter()
                .map(|o| {
                    let exists = topics.get(&o.topic).is_some_and(|t| {
                        o.partition >= 0 && (o.partition as usize) < t.partitions.len()
                    });
                    if !exists {
                        return ErrorCode::UnknownTopicOrPartition.code();
                    }
                    if o.metadata.len() > *metadata_max_bytes {
                        return ErrorCode::OffsetMetadataTooLarge.code();
                    }
                    g.offsets.entry(o.topic.clone()).or_default().insert(
                        o.partition,
                        CommittedOffset {
                            offset: o.offset,
                            leader_epoch: o.leader_epoch,
                            metadata: o.metadata.clone(),
                            commit_ms: *now_ms,
                        },
                    );
                    0
                })
                .collect();
            ConsumerGroupReply::PerItem(codes)
        }
        ConsumerGroupOp::DeleteGroup { group } => match groups.get(group) {
            None => err(ErrorCode::GroupIdNotFound),
            Some(g) if !g.members.is_empty() => err(ErrorCode::NonEmptyGroup),
            Some(_) => {
                groups.remove(group);
                ConsumerGroupReply::Ok
            }
        },
        ConsumerGroupOp::DeleteOffsets {
            group,
            partitions,
            subscribed,
        } => {
            let Some(g) = groups.get_mut(group) else {
                return err(ErrorCode::GroupIdNotFound);
            };
            let codes = partitions
                .iter()
                .map(|(topic, p)| {
                    if subscribed.contains(topic) {
                        return ErrorCode::GroupSubscribedToTopic.code();
                    }
                    if let Some(parts) = g.offsets.get_mut(topic) {
                        parts.remove(p);
                        if parts.is_empty() {
                            g.offsets.remove(topic);
                        }
                    }
                    0
                })
                .collect();
            ConsumerGroupReply::PerItem(codes)
        }
        ConsumerGroupOp::ExpireOffsets {
            now_ms,
            retention_ms,
        } => {
            for g in groups.values_mut() {
                g.offsets.retain(|t, _| topics.contains_key(t));
                if g.state == ConsumerGroupState::Empty
                    && g.empty_since_ms.saturating_add(*retention_ms) <= *now_ms
                {
                    for parts in g.offsets.values_mut() {
                        parts.retain(|_, o| o.commit_ms.saturating_add(*retention_ms) > *now_ms);
                    }
                    g.offsets.retain(|_, parts| !parts.is_empty());
                }
            }
            groups.retain(|_, g| g.state != ConsumerGroupState::Empty || !g.offsets.is_empty());
            ConsumerGroupReply::Ok
        }
    }
}

/// A topic was deleted: its committed offsets go with it, as in Kafka.
pub fn forget_topic(groups: &mut ConsumerGroups, topic: &str) {
    for g in groups.values_mut() {
        g.offsets.remove(topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> BTreeMap<String, TopicMeta> {
        let t = TopicMeta {
            name: "t".into(),
            id: [1; 16],
            partitions: vec![vec![1], vec![1]],
            configs: BTreeMap::new(),
            leaders: BTreeMap::new(),
            reassigning: BTreeMap::new(),
        };
        BTreeMap::from([("t".to_string(), t)])
    }

    fn join(member: &str, now: i64) -> ConsumerGroupOp {
        join_as(member, None, "range", now)
    }

    fn join_as(member: &str, instance: Option<&str>, protocol: &str, now: i64) -> ConsumerGroupOp {
        ConsumerGroupOp::Join {
            group: "g".into(),
            member_id: member.into(),
            instance_id: instance.map(String::from),
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            protocol_type: "consumer".into(),
            protocols: vec![Protocol {
                name: protocol.into(),
                metadata: Blob(Bytes::from_static(b"\x00\x00")),
            }],
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            now_ms: now,
            initial_delay_ms: 3_000,
            max_size: 10,
        }
    }

    fn complete(generation: i32, now: i64) -> ConsumerGroupOp {
        ConsumerGroupOp::CompleteJoin {
            group: "g".into(),
            generation,
            now_ms: now,
        }
    }

    fn sync(member: &str, generation: i32, assignments: &[(&str, &[u8])]) -> ConsumerGroupOp {
        ConsumerGroupOp::Sync {
            group: "g".into(),
            generation,
            member_id: member.into(),
            assignments: assignments
                .iter()
                .map(|(m, a)| (m.to_string(), Blob(Bytes::copy_from_slice(a))))
                .collect(),
        }
    }

    fn commit(member: &str, generation: i32, offset: i64) -> ConsumerGroupOp {
        ConsumerGroupOp::Commit {
            group: "g".into(),
            generation,
            member_id: member.into(),
            instance_id: None,
            offsets: vec![
                OffsetEntry {
                    topic: "t".into(),
                    partition: 0,
                    offset,
                    leader_epoch: 3,
                    metadata: "m".into(),
                },
                OffsetEntry {
                    topic: "t".into(),
                    partition: 7,
                    offset,
                    leader_epoch: -1,
                    metadata: String::new(),
                },
            ],
            now_ms: 100,
            metadata_max_bytes: 4096,
        }
    }

    #[test]
    fn two_members_rebalance_sync_and_fence_old_generations() {
        let (mut gs, ts) = (ConsumerGroups::new(), topics());
        assert_eq!(
            apply_group_op(&mut gs, &ts, &join("a", 0)),
            ConsumerGroupReply::JoinedRebalance { generation: 0 }
        );
        assert_eq!(gs["g"].initial_delay_until_ms, 3_000);
        apply_group_op(&mut gs, &ts, &join("b", 10));
        // A stale verdict (wrong generation) changes nothing.
        apply_group_op(&mut gs, &ts, &complete(5, 20));
        assert_eq!(gs["g"].state, ConsumerGroupState::PreparingRebalance);
        apply_group_op(&mut gs, &ts, &complete(0, 3_000));
        let g = &gs["g"];
        assert_eq!(
            (
                g.state,
                g.generation,
                g.leader.as_deref(),
                g.protocol.as_deref()
            ),
            (
                ConsumerGroupState::CompletingRebalance,
                1,
                Some("a"),
                Some("range")
            )
        );
        // Only the leader's sync assigns; a commit now is refused as Kafka does.
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("a", 1, 5)),
            err(ErrorCode::RebalanceInProgress)
        );
        assert_eq!(
            apply_group_op(&mut gs, &ts, &sync("b", 0, &[])),
            err(ErrorCode::IllegalGeneration)
        );
        apply_group_op(&mut gs, &ts, &sync("a", 1, &[("a", b"A"), ("b", b"B")]));
        let g = &gs["g"];
        assert_eq!(g.state, ConsumerGroupState::Stable);
        assert_eq!(g.members["b"].assignment.0.as_ref(), b"B");
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("b", 1, 5)),
            ConsumerGroupReply::PerItem(vec![0, ErrorCode::UnknownTopicOrPartition.code()])
        );
        assert_eq!(gs["g"].offsets["t"][&0].offset, 5);
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("b", 0, 6)),
            err(ErrorCode::IllegalGeneration)
        );
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("zz", 1, 6)),
            err(ErrorCode::UnknownMemberId)
        );
        // A follower rejoining unchanged keeps the generation; the leader's rejoin rebalances.
        assert_eq!(
            apply_group_op(&mut gs, &ts, &join("b", 4_000)),
            ConsumerGroupReply::JoinedStable
        );
        assert_eq!(
            apply_group_op(&mut gs, &ts, &join("a", 4_000)),
            ConsumerGroupReply::JoinedRebalance { generation: 1 }
        );
        assert!(!gs["g"].members["b"].joined);
        // b never rejoins: the deadline drops it.
        apply_group_op(&mut gs, &ts, &complete(1, 34_000));
        let g = &gs["g"];
        assert_eq!((g.generation, g.members.len()), (2, 1));
        assert_eq!(
            apply_group_op(&mut gs, &ts, &sync("b", 2, &[])),
            err(ErrorCode::UnknownMemberId)
        );
    }

    #[test]
    fn leaving_and_expiry_rebalance_and_an_emptied_group_keeps_offsets() {
        let (mut gs, ts) = (ConsumerGroups::new(), topics());
        apply_group_op(&mut gs, &ts, &join("a", 0));
        apply_group_op(&mut gs, &ts, &join("b", 0));
        apply_group_op(&mut gs, &ts, &complete(0, 3_000));
        apply_group_op(&mut gs, &ts, &sync("a", 1, &[]));
        apply_group_op(&mut gs, &ts, &commit("a", 1, 9));
        let leave = ConsumerGroupOp::Leave {
            group: "g".into(),
            members: vec![("a".into(), None), ("nobody".into(), None)],
            now_ms: 5_000,
        };
        assert_eq!(
            apply_group_op(&mut gs, &ts, &leave),
            ConsumerGroupReply::PerItem(vec![0, ErrorCode::UnknownMemberId.code()])
        );
        assert_eq!(gs["g"].state, ConsumerGroupState::PreparingRebalance);
        let expire = ConsumerGroupOp::Expire {
            group: "g".into(),
            member_id: "b".into(),
            now_ms: 6_000,
        };
        apply_group_op(&mut gs, &ts, &expire);
        let g = &gs["g"];
        assert_eq!((g.state, g.generation), (ConsumerGroupState::Empty, 2));
        assert_eq!(g.offsets["t"][&0].offset, 9);
        // Empty: a simple consumer may commit; deleting works only now.
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("", -1, 11)),
            ConsumerGroupReply::PerItem(vec![0, ErrorCode::UnknownTopicOrPartition.code()])
        );
        let expire_offsets = |now| ConsumerGroupOp::ExpireOffsets {
            now_ms: now,
            retention_ms: 1_000,
        };
        apply_group_op(&mut gs, &ts, &expire_offsets(6_500));
        assert!(gs.contains_key("g"), "not yet past retention");
        apply_group_op(&mut gs, &ts, &expire_offsets(7_100));
        assert!(
            !gs.contains_key("g"),
            "an empty group without offsets is gone"
        );
    }

    #[test]
    fn static_member_replaces_its_old_id_without_rebalance() {
        let (mut gs, ts) = (ConsumerGroups::new(), topics());
        apply_group_op(&mut gs, &ts, &join_as("a1", Some("i"), "range", 0));
        apply_group_op(&mut gs, &ts, &join("b", 0));
        apply_group_op(&mut gs, &ts, &complete(0, 3_000));
        apply_group_op(&mut gs, &ts, &sync("a1", 1, &[("a1", b"A"), ("b", b"B")]));
        assert_eq!(
            apply_group_op(&mut gs, &ts, &join_as("a2", Some("i"), "range", 4_000)),
            ConsumerGroupReply::JoinedStable
        );
        let g = &gs["g"];
        assert_eq!(g.state, ConsumerGroupState::Stable);
        assert_eq!(g.leader.as_deref(), Some("a2"));
        assert_eq!(g.members["a2"].assignment.0.as_ref(), b"A");
        let mut old = commit("a1", 1, 1);
        if let ConsumerGroupOp::Commit { instance_id, .. } = &mut old {
            *instance_id = Some("i".into());
        }
        assert_eq!(
            apply_group_op(&mut gs, &ts, &old),
            err(ErrorCode::FencedInstanceId)
        );
        let leave = ConsumerGroupOp::Leave {
            group: "g".into(),
            members: vec![("a1".into(), Some("i".into()))],
            now_ms: 5_000,
        };
        assert_eq!(
            apply_group_op(&mut gs, &ts, &leave),
            ConsumerGroupReply::PerItem(vec![ErrorCode::FencedInstanceId.code()])
        );
    }

    #[test]
    fn a_static_member_replaced_while_completing_rebalances_and_refused_joins_leave_nothing() {
        let (mut gs, ts) = (ConsumerGroups::new(), topics());
        let mut empty = join("x", 0);
        if let ConsumerGroupOp::Join { protocols, .. } = &mut empty {
            protocols.clear();
        }
        assert_eq!(
            apply_group_op(&mut gs, &ts, &empty),
            err(ErrorCode::InconsistentGroupProtocol)
        );
        assert!(gs.is_empty(), "a refused join created a group");
        apply_group_op(&mut gs, &ts, &join_as("a1", Some("i"), "range", 0));
        apply_group_op(&mut gs, &ts, &join("b", 0));
        apply_group_op(&mut gs, &ts, &complete(0, 3_000));
        assert_eq!(gs["g"].state, ConsumerGroupState::CompletingRebalance);
        // The leader's assignment will name a1; a2 would get nothing. Rebalance instead.
        assert_eq!(
            apply_group_op(&mut gs, &ts, &join_as("a2", Some("i"), "range", 3_100)),
            ConsumerGroupReply::JoinedRebalance { generation: 1 }
        );
        assert_eq!(gs["g"].state, ConsumerGroupState::PreparingRebalance);
        assert!(!gs["g"].members.contains_key("a1"));
    }

    #[test]
    fn a_negative_generation_commits_into_an_empty_group_whoever_sends_it() {
        let (mut gs, ts) = (ConsumerGroups::new(), topics());
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("admin-tool", -1, 4)),
            ConsumerGroupReply::PerItem(vec![0, ErrorCode::UnknownTopicOrPartition.code()])
        );
        apply_group_op(&mut gs, &ts, &join("a", 0));
        assert_eq!(
            apply_group_op(&mut gs, &ts, &commit("", -1, 5)),
            err(ErrorCode::UnknownMemberId),
            "not while the group has members"
        );
        assert_eq!(gs["g"].offsets["t"][&0].offset, 4);
    }

    #[test]
    fn protocols_must_match_and_delete_needs_an_empty_group() {
        let (mut gs, ts) = (ConsumerGroups::new(), topics());
        apply_group_op(&mut gs, &ts, &join("a", 0));
        assert_eq!(
            apply_group_op(&mut gs, &ts, &join_as("b", None, "roundrobin", 0)),
            err(ErrorCode::InconsistentGroupProtocol)
        );
        let delete = ConsumerGroupOp::DeleteGroup { group: "g".into() };
        assert_eq!(
            apply_group_op(&mut gs, &ts, &delete),
            err(ErrorCode::NonEmptyGroup)
        );
        let leave = ConsumerGroupOp::Leave {
            group: "g".into(),
            members: vec![("a".into(), None)],
            now_ms: 1,
        };
        apply_group_op(&mut gs, &ts, &leave);
        assert_eq!(
            apply_group_op(&mut gs, &ts, &delete),
            ConsumerGroupReply::Ok
        );
        assert_eq!(
            apply_group_op(&mut gs, &ts, &delete),
            err(ErrorCode::GroupIdNotFound)
        );
    }

    #[test]
    fn deleting_a_topic_forgets_its_committed_offsets() {
        let mut st = super::super::MetaState {
            topics: topics(),
            ..Default::default()
        };
        st.apply(&super::super::Command::ConsumerGroups {
            ops: vec![commit("", -1, 3)],
        });
        assert_eq!(st.consumer_groups["g"].offsets["t"][&0].offset, 3);
        st.apply(&super::super::Command::DeleteTopic { name: "t".into() });
        assert!(st.consumer_groups["g"].offsets.is_empty());
    }

    #[test]
    fn blobs_round_trip_as_hex_and_bad_hex_is_an_error() {
        let b = Blob(Bytes::from_static(&[0, 1, 0xab, 0xff]));
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, "\"0001abff\"");
        assert_eq!(serde_json::from_str::<Blob>(&s).unwrap(), b);
        assert!(serde_json::from_str::<Blob>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"zz\"").is_err());
    }
}
