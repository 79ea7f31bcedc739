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

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{ApiKey, GroupId};
use kafka_protocol::protocol::Encodable;

use crate::broker::Broker;
use crate::controller::consumer_groups::OffsetEntry;
use crate::coordinator::{self, ConsumerGroupStore, MemberRef};
use crate::errors::ErrorCode;
use crate::kafka::wire::Reader;

/// The codec starts OffsetCommit at v2 and OffsetFetch at v1; the older versions that
/// fixed-version clients still send are read by hand ([`legacy`]).
pub const OFFSET_COMMIT_VERSIONS: (i16, i16) = (0, 9);
pub const OFFSET_FETCH_VERSIONS: (i16, i16) = (0, 9);
pub const OFFSET_DELETE_VERSIONS: (i16, i16) = (0, 0);

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// The ordering step of an OffsetCommit queues the commit, so pipelined commits of one
/// connection apply in the order sent (a later commit never lands under an earlier one); the
/// returned answer awaits it.
pub async fn offset_commit(
    broker: &Broker,
    _version: i16,
    req: OffsetCommitRequest,
) -> BoxFuture<'static, OffsetCommitResponse> {
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
    let member_ref = MemberRef {
        group: &group,
        generation: req.generation_id_or_member_epoch,
        member_id: &member,
        instance_id: instance.as_deref(),
    };
    let queued = if offsets.is_empty() {
        // Nothing to commit still checks the member, as Kafka does.
        coordinator::Queued::Done(coordinator::heartbeat(broker, member_ref).map(|_| Vec::new()))
    } else {
        coordinator::commit(broker, member_ref, offsets).await
    };
    Box::pin(async move {
        let codes = queued.codes().await;
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
    })
}

/// (topic, [(partition, offset, leader epoch, metadata)]) for what was asked, or for every
/// partition the group has committed when `asked` is `None`; Kafka's "none" (-1, -1, "") where
/// nothing is committed (an unknown group included).
type Rows = Vec<(String, Vec<(i32, i64, i32, String)>)>;

fn committed_rows(broker: &Broker, group: &str, asked: Option<Vec<(String, Vec<i32>)>>) -> Rows {
    broker.with_group(group, |g| {
        let asked = asked.unwrap_or_else(|| {
            g.map(|g| {
                g.offsets
                    .iter()
                    .map(|(t, parts)| (t.clone(), parts.keys().copied().collect()))
                    .collect()
            })
            .unwrap_or_default()
        });
        asked
            .into_iter()
            .map(|(topic, parts)| {
                let rows = parts
                    .into_iter()
                    .map(|p| {
                        g.and_then(|g| g.offsets.get(&topic))
                            .and_then(|parts| parts.get(&p))
                            .map_or((p, -1, -1, String::new()), |o| {
                                (p, o.offset, o.leader_epoch, o.metadata.clone())
                            })
                    })
                    .collect();
                (topic, rows)
            })
            .collect()
    })
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
                let asked = rg.topics.as_ref().map(|ts| {
                    ts.iter()
                        .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                        .collect()
                });
                let topics = committed_rows(broker, &rg.group_id, asked)
                    .into_iter()
                    .map(|(topic, rows)| {
                        let partitions = rows
                            .into_iter()
                            .map(|(p, offset, epoch, metadata)| {
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
    let (rows, error) = match broker.check(&req.group_id) {
        Ok(()) => (committed_rows(broker, &req.group_id, asked), 0),
        // Still one row per partition asked, each with the error (v1 has no top-level one);
        // no group is named "" (group ids are checked), so every row says "none".
        Err(code) => (
            committed_rows(broker, "", asked.or(Some(Vec::new()))),
            code.code(),
        ),
    };
    let partition_error = if version < 2 { error } else { 0 };
    let topics = rows
        .into_iter()
        .map(|(topic, rows)| {
            let partitions = rows
                .into_iter()
                .map(|(p, offset, epoch, metadata)| {
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

/// OffsetCommit v0/v1 and OffsetFetch v0, which the codec crate no longer reads. Their bodies are
/// those of OffsetCommit v2 and OffsetFetch v1 less a field or two (v0 kept offsets in ZooKeeper,
/// v1 carried a per-offset timestamp, which Kafka ignores since 0.10.1), and their responses are
/// the same bytes as those versions': read by hand, answered by the current handlers.
pub async fn legacy(
    broker: &Broker,
    api: ApiKey,
    version: i16,
    frame: &Bytes,
) -> Result<Bytes, String> {
    let mut r = Reader::new(frame.clone());
    r.i16()?; // api key
    r.i16()?; // version
    r.i32()?; // correlation id
    r.nullable_string()?; // client id
    let group = GroupId(s(&r.string()?));
    let mut out = BytesMut::new();
    if api == ApiKey::OffsetFetch {
        let mut topics = Vec::new();
        for _ in 0..r.count(6)? {
            let name = TopicName(s(&r.string()?));
            let mut parts = Vec::new();
            for _ in 0..r.count(4)? {
                parts.push(r.i32()?);
            }
            topics.push(
                OffsetFetchRequestTopic::default()
                    .with_name(name)
                    .with_partition_indexes(parts),
            );
        }
        let req = OffsetFetchRequest::default()
            .with_group_id(group)
            .with_topics(Some(topics));
        offset_fetch(broker, 1, req)
            .encode(&mut out, 1)
            .map_err(|e| format!("encoding OffsetFetch v{version}: {e}"))?;
        return Ok(out.freeze());
    }
    let (generation, member) = if version >= 1 {
        (r.i32()?, r.string()?)
    } else {
        (-1, String::new())
    };
    let mut topics = Vec::new();
    for _ in 0..r.count(6)? {
        let name = TopicName(s(&r.string()?));
        let mut parts = Vec::new();
        for _ in 0..r.count(14)? {
            let partition = r.i32()?;
            let offset = r.i64()?;
            if version >= 1 {
                r.i64()?; // commit timestamp
            }
            let metadata = r.nullable_string()?;
            parts.push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(partition)
                    .with_committed_offset(offset)
                    .with_committed_leader_epoch(-1)
                    .with_committed_metadata(metadata.map(|m| s(&m))),
            );
        }
        topics.push(
            OffsetCommitRequestTopic::default()
                .with_name(name)
                .with_partitions(parts),
        );
    }
    let req = OffsetCommitRequest::default()
        .with_group_id(group)
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(s(&member))
        .with_topics(topics);
    offset_commit(broker, 2, req)
        .await
        .await
        .encode(&mut out, 2)
        .map_err(|e| format!("encoding OffsetCommit v{version}: {e}"))?;
    Ok(out.freeze())
}
