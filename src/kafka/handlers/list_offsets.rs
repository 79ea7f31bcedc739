//! ListOffsets (key 2): earliest (-2), latest (-1, the high watermark) and by timestamp. v0 is
//! decoded by hand because the codec crate dropped it; kafka-python still sends it.

use bytes::Bytes;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};

use super::produce::raft_error_code;
use crate::broker::Broker;
use crate::controller::PartitionId;
use crate::errors::ErrorCode;
use crate::kafka::wire::{Reader, Writer};

pub const MIN_VERSION: i16 = 0;
/// v7 adds MAX_TIMESTAMP (-3) lookups, which the log does not index yet.
pub const MAX_VERSION: i16 = 6;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

/// (error, timestamp, offset, leader epoch)
async fn lookup(
    broker: &Broker,
    topic: &str,
    partition: i32,
    ts: i64,
    leader_epoch: i32,
) -> (ErrorCode, i64, i64, i32) {
    let known =
        broker.state().topics.get(topic).and_then(|t| {
            PartitionId::from_wire(partition).filter(|p| p.index() < t.partitions.len())
        });
    let Some(pid) = known else {
        return (ErrorCode::UnknownTopicOrPartition, -1, -1, -1);
    };
    let Some(g) = broker.partition(topic, pid) else {
        return (ErrorCode::NotLeaderOrFollower, -1, -1, -1);
    };
    if !g.is_leader() {
        return (ErrorCode::NotLeaderOrFollower, -1, -1, -1);
    }
    let epoch = g.leader_epoch();
    if leader_epoch >= 0 && leader_epoch < epoch {
        return (ErrorCode::FencedLeaderEpoch, -1, -1, -1);
    }
    if leader_epoch > epoch {
        return (ErrorCode::UnknownLeaderEpoch, -1, -1, -1);
    }
    match ts {
        LATEST => (ErrorCode::None, -1, g.high_watermark(), epoch),
        EARLIEST => (ErrorCode::None, -1, g.log_start_offset(), epoch),
        ts if ts < 0 => (ErrorCode::InvalidRequest, -1, -1, -1),
        ts => match g.offset_for_timestamp(ts).await {
            Ok(Some((off, found_ts))) if off < g.high_watermark() => {
                // The index finds the batch; the record inside it is found by walking it.
                let exact = match g.read(off, 1).await {
                    Ok(bytes) => sluice_storage::batch::parse_header(&bytes)
                        .ok()
                        .and_then(|h| {
                            let len = h.total_len().min(bytes.len());
                            crate::kafka::records::first_at_or_after(&bytes[..len], &h, ts)
                        }),
                    Err(_) => None,
                };
                let (off, found_ts) = exact.unwrap_or((off, found_ts));
                (ErrorCode::None, found_ts, off, epoch)
            }
            Ok(_) => (ErrorCode::None, -1, -1, epoch),
            Err(e) => (raft_error_code(&e), -1, -1, -1),
        },
    }
}

pub async fn handle(broker: &Broker, version: i16, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut topics = Vec::new();
    for t in req.topics {
        let mut parts = Vec::new();
        for p in &t.partitions {
            let (err, ts, off, epoch) = lookup(
                broker,
                t.name.0.as_str(),
                p.partition_index,
                p.timestamp,
                p.current_leader_epoch,
            )
            .await;
            parts.push(
                ListOffsetsPartitionResponse::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(err.code())
                    .with_timestamp(ts)
                    .with_offset(off)
                    // The field exists from v4; the codec refuses non-defaults before that.
                    .with_leader_epoch(if version >= 4 { epoch } else { -1 }),
            );
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// v0: replica_id, [topic, [partition, timestamp, max_num_offsets]] ->
/// [topic, [partition, error_code, [offset]]].
pub async fn legacy_v0(broker: &Broker, frame: &Bytes) -> Result<Bytes, String> {
    let mut r = Reader::new(frame.clone());
    r.i16()?;
    r.i16()?;
    r.i32()?;
    r.nullable_string()?;
    r.i32()?; // replica id
    let mut topics = Vec::new();
    for _ in 0..r.count(6)? {
        let name = r.string()?;
        let mut parts = Vec::new();
        for _ in 0..r.count(16)? {
            let p = r.i32()?;
            let ts = r.i64()?;
            let max = r.i32()?;
            parts.push((p, ts, max));
        }
        topics.push((name, parts));
    }
    let mut w = Writer::default();
    w.i32(topics.len() as i32);
    for (name, parts) in topics {
        w.string(&name).i32(parts.len() as i32);
        for (p, ts, max) in parts {
            let (err, _ts, off, _e) = lookup(broker, &name, p, ts, -1).await;
            w.i32(p).i16(err.code());
            if err == ErrorCode::None && off >= 0 && max > 0 {
                w.i32(1).i64(off);
            } else {
                w.i32(0);
            }
        }
    }
    Ok(w.finish())
}
