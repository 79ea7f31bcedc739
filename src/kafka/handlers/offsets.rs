//! Committed offsets: OffsetCommit (key 8), OffsetFetch (9) and OffsetDelete (47). Commits go
//! through the coordinator's batched proposals, so they are on a majority of the metadata group
//! before they are answered; fetches read the coordinator's applied state.

use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse,
    OffsetFetchRequest, OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::groups::{ConsumerGroup, OffsetEntry};
use crate::coordinator::{self, GroupStore, MemberRef};
use crate::errors::ErrorCode;

/// The codec starts at v2 (v0/v1 kept offsets in ZooKeeper or carried per-offset timestamps).
pub const OFFSET_COMMIT_VERSIONS: (i16, i16) = (2, 9);
pub const OFFSET_FETCH_VERSIONS: (i16, i16) = (1, 9);
pub const OFFSET_DELETE_VERSIONS: (i16, i16) = (0, 0);

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

pub async fn offset_commit(
    broker: &Broker,
    _version: i16,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let group = req.group_id.to_string();
    let member = req.member_id.to_string();
    let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
    let offsets: Vec<OffsetEntry> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| OffsetEntry {
                topic: t.name.to_string(),
                partition: p.partition_index,
                offset: p.committed_offset,
                leader_epoch: p.committed_leader_epoch,
                metadata: p
                    .committed_metadata
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            })
        })
        .collect();
    let n = offsets.len();
    let codes = if n == 0 {
        // Nothing to commit still checks the member, as Kafka does.
        coordinator::heartbeat(
            broker,
            MemberRef {
                group: &group,
                generation: req.generation_id_or_member_epoch,
                member_id: &member,
                instance_id: instance.as_deref(),
            },
        )
        .map(|_| Vec::new())
    } else {
        coordinator::commit(
            broker,
            MemberRef {
                group: &group,
                generation: req.generation_id_or_member_epoch,
                member_id: &member,
                instance_id: instance.as_deref(),
            },
            offsets,
        )
        .await
    };
    let code_at = |i: usize| match &codes {
        Ok(c) => c
            .get(i)
            .copied()
            .unwrap_or(ErrorCode::UnknownServerError.code()),
        Err(e) => e.code(),
    };
    let mut i = 0;
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let code = code_at(i);
                    i += 1;
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

/// One partition's committed offset, or Kafka's "none" (-1, empty metadata).
fn committed(g: Option<&ConsumerGroup>, topic: &str, partition: i32) -> (i64, i32, String) {
    g.and_then(|g| g.offsets.get(topic))
        .and_then(|parts| parts.get(&partition))
        .map(|o| (o.offset, o.leader_epoch, o.metadata.clone()))
        .unwrap_or((-1, -1, String::new()))
}

/// (topic, partitions) asked for, or every partition the group has committed when `None`.
fn wanted(
    g: Option<&ConsumerGroup>,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Vec<(String, Vec<i32>)> {
    match topics {
        Some(t) => t,
        None => g
            .map(|g| {
                g.offsets
                    .iter()
                    .map(|(t, parts)| (t.clone(), parts.keys().copied().collect()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

pub fn offset_fetch(broker: &Broker, version: i16, req: OffsetFetchRequest) -> OffsetFetchResponse {
    if version >= 8 {
        let groups = req
            .groups
            .iter()
            .map(|rg| {
                let base = OffsetFetchResponseGroup::default().with_group_id(rg.group_id.clone());
                if let Err(code) = broker.check(&rg.group_id) {
                    return base.with_error_code(code.code());
                }
                let g = broker.read(&rg.group_id);
                let asked = rg.topics.as_ref().map(|ts| {
                    ts.iter()
                        .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                        .collect()
                });
                let topics = wanted(g.as_ref(), asked)
                    .into_iter()
                    .map(|(topic, parts)| {
                        let partitions = parts
                            .into_iter()
                            .map(|p| {
                                let (offset, epoch, metadata) = committed(g.as_ref(), &topic, p);
                                OffsetFetchResponsePartitions::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(offset)
                                    .with_committed_leader_epoch(epoch)
                                    .with_metadata(Some(s(&metadata)))
                            })
                            .collect();
                        OffsetFetchResponseTopics::default()
                            .with_name(TopicName(s(&topic)))
                            .with_partitions(partitions)
                    })
                    .collect();
                base.with_topics(topics)
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let asked: Option<Vec<(String, Vec<i32>)>> = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
            .collect()
    });
    let (g, error) = match broker.check(&req.group_id) {
        Ok(()) => (broker.read(&req.group_id), 0),
        Err(code) => (None, code.code()),
    };
    // v1 has no top-level error: each partition carries it.
    let partition_error = if version < 2 { error } else { 0 };
    let topics = wanted(g.as_ref(), asked)
        .into_iter()
        .map(|(topic, parts)| {
            let partitions = parts
                .into_iter()
                .map(|p| {
                    let (offset, epoch, metadata) = committed(g.as_ref(), &topic, p);
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(offset)
                        .with_committed_leader_epoch(epoch)
                        .with_metadata(Some(s(&metadata)))
                        .with_error_code(partition_error)
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(TopicName(s(&topic)))
                .with_partitions(partitions)
        })
        .collect();
    OffsetFetchResponse::default()
        .with_topics(topics)
        .with_error_code(if version >= 2 { error } else { 0 })
}

pub async fn offset_delete(
    broker: &Broker,
    _version: i16,
    req: OffsetDeleteRequest,
) -> OffsetDeleteResponse {
    let group = req.group_id.to_string();
    let partitions: Vec<(String, i32)> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.name.to_string(), p.partition_index))
        })
        .collect();
    let codes = match coordinator::delete_offsets(broker, &group, partitions).await {
        Ok(c) => c,
        Err(code) => return OffsetDeleteResponse::default().with_error_code(code.code()),
    };
    let mut i = 0;
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let code = codes.get(i).copied().unwrap_or(0);
                    i += 1;
                    OffsetDeleteResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect();
            OffsetDeleteResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    OffsetDeleteResponse::default().with_topics(topics)
}
