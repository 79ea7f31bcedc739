//! Brokers' addresses as the listener a request came in on advertises them: Metadata,
//! DescribeCluster and FindCoordinator answers are built with each broker's primary address and
//! rewritten here for the session's listener, so a client on `SASL_SSL://` is sent to the other
//! brokers' SASL_SSL ports, and the handlers need not know about listeners.

use kafka_protocol::messages::{
    DescribeClusterResponse, FindCoordinatorResponse, MetadataResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::handlers::split_host_port;
use crate::broker::Broker;
use crate::session::Session;

/// host, port of broker `id` on `listener`; `None` when it has no address of its own there.
fn addr_of(broker: &Broker, id: i32, listener: &str) -> Option<(String, i32)> {
    let st = broker.state();
    let b = st.brokers.get(&u64::try_from(id).ok()?)?;
    let addr = st.broker_listeners.get(&b.id)?.get(listener)?;
    Some(split_host_port(addr))
}

pub fn metadata(broker: &Broker, session: &Session, mut r: MetadataResponse) -> MetadataResponse {
    for b in &mut r.brokers {
        if let Some((host, port)) = addr_of(broker, b.node_id.0, &session.listener) {
            b.host = StrBytes::from_string(host);
            b.port = port;
        }
    }
    r
}

pub fn describe_cluster(
    broker: &Broker,
    session: &Session,
    mut r: DescribeClusterResponse,
) -> DescribeClusterResponse {
    for b in &mut r.brokers {
        if let Some((host, port)) = addr_of(broker, b.broker_id.0, &session.listener) {
            b.host = StrBytes::from_string(host);
            b.port = port;
        }
    }
    r
}

pub fn find_coordinator(
    broker: &Broker,
    session: &Session,
    mut r: FindCoordinatorResponse,
) -> FindCoordinatorResponse {
    // v0-v3 answer one key at the top level, v4+ a list.
    if r.node_id.0 >= 0 {
        if let Some((host, port)) = addr_of(broker, r.node_id.0, &session.listener) {
            r.host = StrBytes::from_string(host);
            r.port = port;
        }
    }
    for c in &mut r.coordinators {
        if c.node_id.0 < 0 {
            continue;
        }
        if let Some((host, port)) = addr_of(broker, c.node_id.0, &session.listener) {
            c.host = StrBytes::from_string(host);
            c.port = port;
        }
    }
    r
}
