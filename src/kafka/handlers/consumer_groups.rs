//! Consumer-group membership APIs of the classic protocol: FindCoordinator (key 10), JoinGroup
//! (11), Heartbeat (12), LeaveGroup (13), SyncGroup (14), DescribeGroups (15), ListGroups (16)
//! and DeleteGroups (42). They translate requests to `coordinator` and its answers back; the
//! group logic lives there. librdkafka uses no group at all unless the broker offers every one
//! of FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit and OffsetFetch.

use futures::future::BoxFuture;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::{
    delete_groups_response, describe_groups_response, list_groups_response, BrokerId,
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    FindCoordinatorRequest, FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::split_host_port;
use crate::broker::Broker;
use crate::controller::consumer_groups::{Blob, Protocol};
use crate::coordinator::{self, ConsumerGroupStore, JoinRequest, MemberRef};
use crate::errors::ErrorCode;
use crate::session::Session;

/// v5 adds an error for transactions, v6 share-group keys; neither applies here.
pub const FIND_COORDINATOR_VERSIONS: (i16, i16) = (0, 4);
pub const JOIN_GROUP_VERSIONS: (i16, i16) = (0, 9);
pub const SYNC_GROUP_VERSIONS: (i16, i16) = (0, 5);
pub const HEARTBEAT_VERSIONS: (i16, i16) = (0, 4);
pub const LEAVE_GROUP_VERSIONS: (i16, i16) = (0, 5);
pub const LIST_GROUPS_VERSIONS: (i16, i16) = (0, 5);
/// v6 (KIP-1043) adds error messages for the new group types.
pub const DESCRIBE_GROUPS_VERSIONS: (i16, i16) = (0, 5);
pub const DELETE_GROUPS_VERSIONS: (i16, i16) = (0, 2);

/// Kafka's key types: 0 group, 1 transaction, 2 share group.
const KEY_TYPE_GROUP: i8 = 0;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

pub fn find_coordinator(
    broker: &Broker,
    version: i16,
    req: FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    let answer = |key: &str| -> Coordinator {
        let none = Coordinator::default()
            .with_key(s(key))
            .with_node_id(BrokerId(-1))
            .with_host(s(""))
            .with_port(-1);
        if req.key_type != KEY_TYPE_GROUP {
            return none
                .with_error_code(ErrorCode::CoordinatorNotAvailable.code())
                .with_error_message(Some(s(
                    "Sluice coordinates consumer groups only (no transactions yet)",
                )));
        }
        match broker.coordinator_of(key) {
            Some(b) => {
                let (host, port) = split_host_port(&b.kafka_addr);
                Coordinator::default()
                    .with_key(s(key))
                    .with_node_id(BrokerId(b.id as i32))
                    .with_host(s(&host))
                    .with_port(port)
            }
            None => none
                .with_error_code(ErrorCode::CoordinatorNotAvailable.code())
                .with_error_message(Some(s("no controller is elected yet"))),
        }
    };
    if version >= 4 {
        let coordinators = req.coordinator_keys.iter().map(|k| answer(k)).collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    let c = answer(&req.key);
    FindCoordinatorResponse::default()
        .with_error_code(c.error_code)
        .with_error_message(c.error_message)
        .with_node_id(c.node_id)
        .with_host(c.host)
        .with_port(c.port)
}

pub async fn join_group(
    broker: &Broker,
    session: &Session,
    version: i16,
    req: JoinGroupRequest,
) -> JoinGroupResponse {
    // v0 has no rebalance timeout: Kafka uses the session timeout for both.
    let rebalance_timeout_ms = if version == 0 {
        req.session_timeout_ms
    } else {
        req.rebalance_timeout_ms
    };
    let a = coordinator::join(
        broker,
        JoinRequest {
            group: req.group_id.to_string(),
            member_id: req.member_id.to_string(),
            instance_id: req.group_instance_id.as_ref().map(|i| i.to_string()),
            client_id: session.client_id().unwrap_or_default(),
            client_host: format!("/{}", session.peer.ip()),
            protocol_type: req.protocol_type.to_string(),
            protocols: req
                .protocols
                .iter()
                .map(|p| Protocol {
                    name: p.name.to_string(),
                    metadata: Blob(p.metadata.clone()),
                })
                .collect(),
            session_timeout_ms: req.session_timeout_ms,
            rebalance_timeout_ms,
            member_id_required: version >= 4,
        },
    )
    .await;
    // Before v7 the protocol name is not nullable.
    let protocol = a
        .protocol
        .map(|p| s(&p))
        .or_else(|| (version < 7).then(|| s("")));
    JoinGroupResponse::default()
        .with_error_code(a.error)
        .with_generation_id(a.generation)
        .with_protocol_type(a.protocol_type.map(|t| s(&t)))
        .with_protocol_name(protocol)
        .with_leader(s(&a.leader))
        .with_member_id(s(&a.member_id))
        .with_members(
            a.members
                .into_iter()
                .map(|(id, instance, metadata)| {
                    JoinGroupResponseMember::default()
                        .with_member_id(s(&id))
                        .with_group_instance_id(instance.map(|i| s(&i)))
                        .with_metadata(metadata)
                })
                .collect(),
        )
}

pub async fn sync_group(
    broker: &Broker,
    _version: i16,
    req: SyncGroupRequest,
) -> SyncGroupResponse {
    let group = req.group_id.to_string();
    let member = req.member_id.to_string();
    let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
    let r = coordinator::sync(
        broker,
        MemberRef {
            group: &group,
            generation: req.generation_id,
            member_id: &member,
            instance_id: instance.as_deref(),
        },
        req.protocol_type.as_deref(),
        req.protocol_name.as_deref(),
        req.assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect(),
    )
    .await;
    match r {
        Ok(a) => SyncGroupResponse::default()
            .with_protocol_type(a.protocol_type.map(|t| s(&t)))
            .with_protocol_name(a.protocol.map(|p| s(&p)))
            .with_assignment(a.assignment),
        Err(code) => SyncGroupResponse::default().with_error_code(code.code()),
    }
}

pub fn heartbeat(broker: &Broker, _version: i16, req: HeartbeatRequest) -> HeartbeatResponse {
    let group = req.group_id.to_string();
    let member = req.member_id.to_string();
    let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
    let r = coordinator::heartbeat(
        broker,
        MemberRef {
            group: &group,
            generation: req.generation_id,
            member_id: &member,
            instance_id: instance.as_deref(),
        },
    );
    HeartbeatResponse::default().with_error_code(r.err().map_or(0, ErrorCode::code))
}

/// The ordering step of a LeaveGroup queues the leave, so a commit the consumer sent just before
/// on this connection is applied first; the returned answer awaits it.
pub async fn leave_group(
    broker: &Broker,
    version: i16,
    req: LeaveGroupRequest,
) -> BoxFuture<'static, LeaveGroupResponse> {
    let group = req.group_id.to_string();
    // v0–v2 name one member; v3+ a batch, possibly static members by instance id alone.
    let members: Vec<(String, Option<String>)> = if version < 3 {
        vec![(req.member_id.to_string(), None)]
    } else {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|i| i.to_string()),
                )
            })
            .collect()
    };
    let queued = coordinator::leave(broker, &group, members.clone()).await;
    Box::pin(async move {
        match queued.codes().await {
            Err(code) => LeaveGroupResponse::default().with_error_code(code.code()),
            Ok(codes) if version < 3 => {
                LeaveGroupResponse::default().with_error_code(codes.first().copied().unwrap_or(0))
            }
            Ok(codes) => LeaveGroupResponse::default().with_members(
                members
                    .into_iter()
                    .zip(codes)
                    .map(|((id, instance), code)| {
                        MemberResponse::default()
                            .with_member_id(s(&id))
                            .with_group_instance_id(instance.map(|i| s(&i)))
                            .with_error_code(code)
                    })
                    .collect(),
            ),
        }
    })
}

/// Each node lists the groups it coordinates, as Kafka brokers do; clients ask every node.
pub fn list_groups(broker: &Broker, _version: i16, req: ListGroupsRequest) -> ListGroupsResponse {
    if let Err(code) = broker.check("") {
        // Not the coordinator: nothing to list, which is not an error.
        return ListGroupsResponse::default().with_error_code(match code {
            ErrorCode::CoordinatorLoadInProgress => code.code(),
            _ => 0,
        });
    }
    let st = broker.state();
    let wanted_state = |state: &str| {
        req.states_filter.is_empty()
            || req
                .states_filter
                .iter()
                .any(|f| f.eq_ignore_ascii_case(state))
    };
    // Every group here is a classic one.
    let wanted_type = req.types_filter.is_empty()
        || req
            .types_filter
            .iter()
            .any(|f| f.eq_ignore_ascii_case("classic"));
    let groups = st
        .consumer_groups
        .iter()
        .filter(|(_, g)| wanted_type && wanted_state(g.state.name()))
        .map(|(name, g)| {
            list_groups_response::ListedGroup::default()
                .with_group_id(GroupId(s(name)))
                .with_protocol_type(s(g.protocol_type.as_deref().unwrap_or("")))
                .with_group_state(s(g.state.name()))
                .with_group_type(s("classic"))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

pub fn describe_groups(
    broker: &Broker,
    version: i16,
    req: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    // Kafka's "not requested" marker for authorized operations.
    let no_ops = i32::MIN;
    let groups = req
        .groups
        .iter()
        .map(|name| {
            let base = describe_groups_response::DescribedGroup::default()
                .with_group_id(name.clone())
                .with_authorized_operations(no_ops);
            if let Err(code) = broker.check(name) {
                return base.with_error_code(code.code());
            }
            let Some(g) = broker.read(name) else {
                // Kafka describes an unknown group as Dead, without error (v0–v5).
                return base
                    .with_group_state(s("Dead"))
                    .with_protocol_type(s(""))
                    .with_protocol_data(s(""));
            };
            let protocol = g.protocol.clone().unwrap_or_default();
            let members = g
                .members
                .values()
                .map(|m| {
                    let metadata = m
                        .protocols
                        .iter()
                        .find(|p| p.name == protocol)
                        .map(|p| p.metadata.0.clone())
                        .unwrap_or_default();
                    describe_groups_response::DescribedGroupMember::default()
                        .with_member_id(s(&m.member_id))
                        .with_group_instance_id(m.instance_id.as_ref().map(|i| s(i)))
                        .with_client_id(s(&m.client_id))
                        .with_client_host(s(&m.client_host))
                        .with_member_metadata(metadata)
                        .with_member_assignment(m.assignment.0.clone())
                })
                .collect();
            let ops = if version >= 3 && req.include_authorized_operations {
                // Everyone may do everything until ACLs exist: Read, Describe, Delete.
                (1 << 3) | (1 << 8) | (1 << 6)
            } else {
                no_ops
            };
            base.with_group_state(s(g.state.name()))
                .with_protocol_type(s(g.protocol_type.as_deref().unwrap_or("")))
                .with_protocol_data(s(&protocol))
                .with_members(members)
                .with_authorized_operations(ops)
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

pub async fn delete_groups(
    broker: &Broker,
    _version: i16,
    req: DeleteGroupsRequest,
) -> DeleteGroupsResponse {
    let mut results = Vec::with_capacity(req.groups_names.len());
    let outcomes = futures::future::join_all(
        req.groups_names
            .iter()
            .map(|g| coordinator::delete_group(broker, g)),
    )
    .await;
    for (name, r) in req.groups_names.iter().zip(outcomes) {
        results.push(
            delete_groups_response::DeletableGroupResult::default()
                .with_group_id(name.clone())
                .with_error_code(r.err().map_or(0, ErrorCode::code)),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}
