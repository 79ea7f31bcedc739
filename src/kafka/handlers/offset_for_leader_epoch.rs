//! OffsetForLeaderEpoch (key 23): where a leader epoch ended, from the partition's epoch history
//! (the Raft terms stamped into stored batches). librdkafka and the Java client call it after every
//! leader change to check that their position is still on the log, and truncate if not.

use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};

use super::produce::raft_error_code;
use crate::broker::Broker;
use crate::controller::PartitionId;
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 2;
pub const MAX_VERSION: i16 = 4;

/// Kafka's rule: the requested epoch's end is the start of the next higher epoch, or the log end
/// for the current epoch. An epoch older than the history answers with the log start.
pub fn end_offset_for(
    history: &[(u64, i64)],
    requested: i32,
    current_epoch: i32,
    log_end: i64,
    log_start: i64,
) -> (i32, i64) {
    if requested < 0 {
        return (-1, -1);
    }
    if requested >= current_epoch {
        return if requested == current_epoch {
            (current_epoch, log_end)
        } else {
            (-1, -1)
        };
    }
    let req = requested as u64;
    let floor = history.iter().rev().find(|(e, _)| *e <= req);
    let higher = history.iter().find(|(e, _)| *e > req);
    match (floor, higher) {
        (Some((e, _)), Some((_, start))) => (*e as i32, *start),
        (Some((e, _)), None) => (*e as i32, log_end),
        (None, Some((_, start))) => (requested, (*start).max(log_start)),
        (None, None) => (requested, log_end),
    }
}

pub async fn handle(
    broker: &Broker,
    _version: i16,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let mut topics = Vec::new();
    for t in req.topics {
        let mut parts = Vec::new();
        for p in &t.partitions {
            let base = EpochEndOffset::default().with_partition(p.partition);
            let err = |code: ErrorCode| {
                base.clone()
                    .with_error_code(code.code())
                    .with_end_offset(-1)
                    .with_leader_epoch(-1)
            };
            let known = broker.state().topics.get(t.topic.0.as_str()).and_then(|m| {
                PartitionId::from_wire(p.partition).filter(|p| p.index() < m.partitions.len())
            });
            let Some(pid) = known else {
                parts.push(err(ErrorCode::UnknownTopicOrPartition));
                continue;
            };
            let Some(g) = broker
                .partition(t.topic.0.as_str(), pid)
                .filter(|g| g.is_leader())
            else {
                parts.push(err(ErrorCode::NotLeaderOrFollower));
                continue;
            };
            let epoch = g.leader_epoch();
            if p.current_leader_epoch >= 0 && p.current_leader_epoch < epoch {
                parts.push(err(ErrorCode::FencedLeaderEpoch));
                continue;
            }
            if p.current_leader_epoch > epoch {
                parts.push(err(ErrorCode::UnknownLeaderEpoch));
                continue;
            }
            match g.epoch_starts().await {
                Ok(history) => {
                    // From the log end, as Kafka does, never the high watermark: a new leader's
                    // high watermark can lag what its predecessor had committed until an entry
                    // of its own term commits, and a client whose position sits in that gap
                    // would conclude its log was truncated when it was not.
                    let (e, off) = end_offset_for(
                        &history,
                        p.leader_epoch,
                        epoch,
                        g.log_end_offset(),
                        g.log_start_offset(),
                    );
                    parts.push(base.with_leader_epoch(e).with_end_offset(off));
                }
                Err(e) => parts.push(err(raft_error_code(&e))),
            }
        }
        topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(parts),
        );
    }
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}

#[cfg(test)]
mod tests {
    use super::end_offset_for;

    #[test]
    fn follows_kafkas_epoch_rules() {
        let h = [(1, 0), (3, 10), (5, 25)];
        assert_eq!(
            end_offset_for(&h, 5, 5, 40, 0),
            (5, 40),
            "current epoch ends at log end"
        );
        assert_eq!(end_offset_for(&h, 1, 5, 40, 0), (1, 10));
        assert_eq!(
            end_offset_for(&h, 2, 5, 40, 0),
            (1, 10),
            "gap epoch maps to its floor"
        );
        assert_eq!(end_offset_for(&h, 4, 5, 40, 0), (3, 25));
        assert_eq!(
            end_offset_for(&h, 0, 5, 40, 0),
            (0, 0),
            "older than history"
        );
        assert_eq!(end_offset_for(&h, 6, 5, 40, 0), (-1, -1), "future epoch");
        assert_eq!(end_offset_for(&h, -1, 5, 40, 0), (-1, -1));
        assert_eq!(end_offset_for(&[], 2, 3, 7, 0), (2, 7));
    }

    #[test]
    fn the_current_epoch_ends_at_the_log_end_not_the_high_watermark() {
        // A new leader (epoch 6) holds offsets up to 40 from epoch 5, of which its high watermark
        // covers only 30 until its first own entry commits. A consumer at 35 asking about epoch
        // 5 must hear 40 (no truncation), as Kafka answers from the log end offset.
        let h = [(1, 0), (5, 25), (6, 40)];
        let (log_end, _high_watermark) = (41, 30);
        assert_eq!(end_offset_for(&h, 5, 6, log_end, 0), (5, 40));
        assert_eq!(end_offset_for(&h, 6, 6, log_end, 0), (6, 41));
    }
}
