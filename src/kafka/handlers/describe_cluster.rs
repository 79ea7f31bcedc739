//! DescribeCluster (key 60): brokers, controller and cluster id.

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::{BrokerId, DescribeClusterRequest, DescribeClusterResponse};
use kafka_protocol::protocol::StrBytes;

use super::split_host_port;
use crate::broker::Broker;

pub const MIN_VERSION: i16 = 0;
pub const MAX_VERSION: i16 = 1;

pub fn handle(
    broker: &Broker,
    _version: i16,
    _req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    let st = broker.state();
    let brokers = st
        .brokers
        .values()
        .map(|b| {
            let (host, port) = split_host_port(&b.kafka_addr);
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(b.id as i32))
                .with_host(StrBytes::from_string(host))
                .with_port(port)
        })
        .collect();
    DescribeClusterResponse::default()
        .with_cluster_id(StrBytes::from_string(
            st.cluster_id.clone().unwrap_or_default(),
        ))
        .with_controller_id(BrokerId(
            broker.controller_id().map(|c| c as i32).unwrap_or(-1),
        ))
        .with_brokers(brokers)
}
