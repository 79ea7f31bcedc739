//! DescribeProducers (key 61): a partition's active idempotent producers, as
//! `kafka-transactions.sh describe-producers` shows them; answered by the partition's leader
//! from its committed producer state.

use kafka_protocol::messages::describe_producers_response::{
    PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::{DescribeProducersRequest, DescribeProducersResponse, ProducerId};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::PartitionId;
use crate::errors::ErrorCode;
use crate::partition::producers::leader_table;

pub const MIN_VERSION: i16 = 0;
pub const MAX_VERSION: i16 = 0;

pub fn handle(
    broker: &Broker,
    _version: i16,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.name.0.to_string();
            let partitions = t
                .partition_indexes
                .into_iter()
                .map(|p| {
                    let r = PartitionResponse::default().with_partition_index(p);
                    let table = match PartitionId::from_wire(p) {
                        Some(pid) => leader_table(broker, &name, pid),
                        None => Err((
                            ErrorCode::UnknownTopicOrPartition,
                            format!("no partition {p}"),
                        )),
                    };
                    match table {
                        Err((code, msg)) => r
                            .with_error_code(code.code())
                            .with_error_message(Some(StrBytes::from_string(msg))),
                        Ok(table) => r.with_active_producers(
                            table
                                .iter()
                                .map(|(id, e)| {
                                    ProducerState::default()
                                        .with_producer_id(ProducerId(*id))
                                        .with_producer_epoch(i32::from(e.epoch))
                                        .with_last_sequence(
                                            e.batches.back().map_or(-1, |b| b.last_seq),
                                        )
                                        .with_last_timestamp(e.last_timestamp)
                                        .with_coordinator_epoch(-1)
                                        .with_current_txn_start_offset(-1)
                                })
                                .collect(),
                        ),
                    }
                })
                .collect();
            TopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    DescribeProducersResponse::default().with_topics(topics)
}
