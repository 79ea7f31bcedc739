//! One module per Kafka API, each with the version range it serves beside it. ApiVersions is
//! derived from [`SUPPORTED`], so what we advertise is exactly what we dispatch.

pub mod acls;
pub mod api_versions;
pub mod consumer_groups;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_topics;
pub mod describe_cluster;
pub mod describe_configs;
pub mod describe_producers;
pub mod fetch;
pub mod init_producer_id;
pub mod list_offsets;
pub mod metadata;
pub mod offset_for_leader_epoch;
pub mod offsets;
pub mod produce;
pub mod reassignments;
pub mod sasl;
pub mod scram_users;

use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseKind};

use super::{advertised, answer_only, authz, Answer, Handler, Response};
use crate::broker::Broker;
use crate::session::Session;

/// (API, min version, max version). Ranges stop where the next version changes semantics we do not
/// implement (e.g. Fetch v13 switches to topic ids).
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, produce::MIN_VERSION, produce::MAX_VERSION),
    (ApiKey::Fetch, fetch::MIN_VERSION, fetch::MAX_VERSION),
    (
        ApiKey::DescribeProducers,
        describe_producers::MIN_VERSION,
        describe_producers::MAX_VERSION,
    ),
    (
        ApiKey::InitProducerId,
        init_producer_id::MIN_VERSION,
        init_producer_id::MAX_VERSION,
    ),
    (
        ApiKey::ListOffsets,
        list_offsets::MIN_VERSION,
        list_offsets::MAX_VERSION,
    ),
    (
        ApiKey::Metadata,
        metadata::MIN_VERSION,
        metadata::MAX_VERSION,
    ),
    (
        ApiKey::ApiVersions,
        api_versions::MIN_VERSION,
        api_versions::MAX_VERSION,
    ),
    (
        ApiKey::CreateTopics,
        create_topics::MIN_VERSION,
        create_topics::MAX_VERSION,
    ),
    (
        ApiKey::DeleteTopics,
        delete_topics::MIN_VERSION,
        delete_topics::MAX_VERSION,
    ),
    (
        ApiKey::DescribeConfigs,
        describe_configs::MIN_VERSION,
        describe_configs::MAX_VERSION,
    ),
    (
        ApiKey::CreatePartitions,
        create_partitions::MIN_VERSION,
        create_partitions::MAX_VERSION,
    ),
    (
        ApiKey::OffsetForLeaderEpoch,
        offset_for_leader_epoch::MIN_VERSION,
        offset_for_leader_epoch::MAX_VERSION,
    ),
    (
        ApiKey::DescribeCluster,
        describe_cluster::MIN_VERSION,
        describe_cluster::MAX_VERSION,
    ),
    (
        ApiKey::AlterPartitionReassignments,
        reassignments::ALTER_MIN_VERSION,
        reassignments::ALTER_MAX_VERSION,
    ),
    (
        ApiKey::ListPartitionReassignments,
        reassignments::LIST_MIN_VERSION,
        reassignments::LIST_MAX_VERSION,
    ),
    (
        ApiKey::FindCoordinator,
        consumer_groups::FIND_COORDINATOR_VERSIONS.0,
        consumer_groups::FIND_COORDINATOR_VERSIONS.1,
    ),
    (
        ApiKey::JoinGroup,
        consumer_groups::JOIN_GROUP_VERSIONS.0,
        consumer_groups::JOIN_GROUP_VERSIONS.1,
    ),
    (
        ApiKey::SyncGroup,
        consumer_groups::SYNC_GROUP_VERSIONS.0,
        consumer_groups::SYNC_GROUP_VERSIONS.1,
    ),
    (
        ApiKey::Heartbeat,
        consumer_groups::HEARTBEAT_VERSIONS.0,
        consumer_groups::HEARTBEAT_VERSIONS.1,
    ),
    (
        ApiKey::LeaveGroup,
        consumer_groups::LEAVE_GROUP_VERSIONS.0,
        consumer_groups::LEAVE_GROUP_VERSIONS.1,
    ),
    (
        ApiKey::ListGroups,
        consumer_groups::LIST_GROUPS_VERSIONS.0,
        consumer_groups::LIST_GROUPS_VERSIONS.1,
    ),
    (
        ApiKey::DescribeGroups,
        consumer_groups::DESCRIBE_GROUPS_VERSIONS.0,
        consumer_groups::DESCRIBE_GROUPS_VERSIONS.1,
    ),
    (
        ApiKey::DeleteGroups,
        consumer_groups::DELETE_GROUPS_VERSIONS.0,
        consumer_groups::DELETE_GROUPS_VERSIONS.1,
    ),
    (
        ApiKey::OffsetCommit,
        offsets::OFFSET_COMMIT_VERSIONS.0,
        offsets::OFFSET_COMMIT_VERSIONS.1,
    ),
    (
        ApiKey::OffsetFetch,
        offsets::OFFSET_FETCH_VERSIONS.0,
        offsets::OFFSET_FETCH_VERSIONS.1,
    ),
    (
        ApiKey::OffsetDelete,
        offsets::OFFSET_DELETE_VERSIONS.0,
        offsets::OFFSET_DELETE_VERSIONS.1,
    ),
    (ApiKey::CreateAcls, acls::VERSIONS.0, acls::VERSIONS.1),
    (ApiKey::DescribeAcls, acls::VERSIONS.0, acls::VERSIONS.1),
    (ApiKey::DeleteAcls, acls::VERSIONS.0, acls::VERSIONS.1),
    (
        ApiKey::SaslHandshake,
        sasl::HANDSHAKE_VERSIONS.0,
        sasl::HANDSHAKE_VERSIONS.1,
    ),
    (
        ApiKey::SaslAuthenticate,
        sasl::AUTHENTICATE_VERSIONS.0,
        sasl::AUTHENTICATE_VERSIONS.1,
    ),
    (
        ApiKey::AlterUserScramCredentials,
        scram_users::ALTER_VERSIONS.0,
        scram_users::ALTER_VERSIONS.1,
    ),
    (
        ApiKey::DescribeUserScramCredentials,
        scram_users::DESCRIBE_VERSIONS.0,
        scram_users::DESCRIBE_VERSIONS.1,
    ),
];

/// Whether this version of `key` is decoded by hand ([`start_legacy`]), outside
/// [`dispatch`] and so outside authorization.
pub fn is_legacy(key: ApiKey, version: i16) -> bool {
    matches!(
        (key, version),
        (ApiKey::Produce, 0..=2)
            | (ApiKey::ListOffsets, 0)
            | (ApiKey::OffsetCommit, 0..=1)
            | (ApiKey::OffsetFetch, 0)
    )
}

pub fn supported_versions(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, a, b)| (*a, *b))
}

/// Versions the codec crate no longer decodes: handled by hand in their modules.
pub fn start_legacy(
    broker: &Arc<Broker>,
    key: ApiKey,
    version: i16,
    frame: &Bytes,
) -> Result<Option<Handler>, String> {
    let result = match key {
        ApiKey::Produce if version < 3 => produce::legacy(broker, version, frame)?,
        ApiKey::ListOffsets if version < 1 => {
            let broker = broker.clone();
            let frame = frame.clone();
            return Ok(Some(answer_only(Box::pin(async move {
                match list_offsets::legacy_v0(&broker, &frame).await {
                    Ok(body) => Some(Response::Raw(body)),
                    Err(e) => {
                        tracing::info!(error = %e, "malformed ListOffsets v0 request");
                        None
                    }
                }
            }))));
        }
        ApiKey::OffsetCommit if version < 2 => {
            return Ok(Some(legacy_offsets(broker, key, version, frame)))
        }
        ApiKey::OffsetFetch if version < 1 => {
            return Ok(Some(legacy_offsets(broker, key, version, frame)))
        }
        _ => return Ok(None),
    };
    Ok(Some(answer_only(Box::pin(async move { result }))))
}

fn legacy_offsets(broker: &Arc<Broker>, key: ApiKey, version: i16, frame: &Bytes) -> Handler {
    let broker = broker.clone();
    let frame = frame.clone();
    answer_only(Box::pin(async move {
        match offsets::legacy(&broker, key, version, &frame).await {
            Ok(body) => Some(Response::Raw(body)),
            Err(e) => {
                tracing::info!(error = %e, ?key, version, "malformed legacy offsets request");
                None
            }
        }
    }))
}

/// Starts the handler of one decoded request. `session` is the connection's: who asks (for
/// authorization) and the SASL exchange will read it.
pub fn dispatch(
    broker: Arc<Broker>,
    session: Arc<Session>,
    header: RequestHeader,
    request: RequestKind,
) -> Handler {
    let v = header.request_api_version;
    match authz::check(&broker, &session, v, request) {
        authz::Verdict::Deny(resp) => answer_only(async move { Some(kind(resp)) }.boxed()),
        authz::Verdict::Serve(request, None) => serve(broker, session, v, request),
        authz::Verdict::Serve(request, Some(patch)) => {
            let handler = serve(broker, session, v, request);
            Box::pin(patch_answer(handler, patch))
        }
    }
}

/// Runs `handler`'s ordering step, then yields its answer with the patch applied.
async fn patch_answer(handler: Handler, patch: authz::Patch) -> Answer {
    let answer = handler.await;
    Box::pin(async move { answer.await.map(|r| patched(r, patch)) })
}

/// Applies an authorization patch to the response inside whatever holds it.
fn patched(resp: Response, patch: authz::Patch) -> Response {
    match resp {
        Response::Kind(mut k) => {
            patch(&mut k);
            Response::Kind(k)
        }
        Response::Held(inner, held) => Response::Held(Box::new(patched(*inner, patch)), held),
        raw @ Response::Raw(_) => raw,
    }
}

fn serve(broker: Arc<Broker>, session: Arc<Session>, v: i16, request: RequestKind) -> Handler {
    let answer: Answer = match request {
        RequestKind::ApiVersions(r) => {
            let resp = api_versions::handle(&broker, v, r);
            async move { Some(Response::Kind(Box::new(ResponseKind::ApiVersions(resp)))) }.boxed()
        }
        RequestKind::Metadata(r) => async move {
            let resp = metadata::handle(&broker, v, r).await;
            let resp = advertised::metadata(&broker, &session, resp);
            Some(Response::Kind(Box::new(ResponseKind::Metadata(resp))))
        }
        .boxed(),
        // The one handler with an ordering step of its own.
        RequestKind::Produce(r) => return produce::handle(broker, v, r),
        RequestKind::Fetch(r) => async move {
            let (resp, held) = fetch::handle(&broker, v, r).await;
            let resp = Response::Kind(Box::new(ResponseKind::Fetch(resp)));
            // The fetch budget goes back once the connection has written the records out.
            Some(match held {
                Some(permit) => Response::Held(Box::new(resp), Box::new(permit)),
                None => resp,
            })
        }
        .boxed(),
        RequestKind::DescribeProducers(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::DescribeProducers(
                describe_producers::handle(&broker, v, r),
            ))))
        }
        .boxed(),
        RequestKind::InitProducerId(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::InitProducerId(
                init_producer_id::handle(&broker, v, r).await,
            ))))
        }
        .boxed(),
        RequestKind::ListOffsets(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::ListOffsets(
                list_offsets::handle(&broker, v, r).await,
            ))))
        }
        .boxed(),
        RequestKind::CreateTopics(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::CreateTopics(
                create_topics::handle(&broker, v, r).await,
            ))))
        }
        .boxed(),
        RequestKind::DeleteTopics(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::DeleteTopics(
                delete_topics::handle(&broker, v, r).await,
            ))))
        }
        .boxed(),
        RequestKind::CreatePartitions(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::CreatePartitions(
                create_partitions::handle(&broker, v, r).await,
            ))))
        }
        .boxed(),
        RequestKind::OffsetForLeaderEpoch(r) => async move {
            Some(Response::Kind(Box::new(
                ResponseKind::OffsetForLeaderEpoch(
                    offset_for_leader_epoch::handle(&broker, v, r).await,
                ),
            )))
        }
        .boxed(),
        RequestKind::DescribeConfigs(r) => async move {
            Some(Response::Kind(Box::new(ResponseKind::DescribeConfigs(
                describe_configs::handle(&broker, v, r),
            ))))
        }
        .boxed(),
        RequestKind::DescribeCluster(r) => async move {
            let resp = describe_cluster::handle(&broker, v, r);
            let resp = advertised::describe_cluster(&broker, &session, resp);
            Some(Response::Kind(Box::new(ResponseKind::DescribeCluster(
                resp,
            ))))
        }
        .boxed(),
        RequestKind::AlterPartitionReassignments(r) => async move {
            Some(Response::Kind(Box::new(
                ResponseKind::AlterPartitionReassignments(
                    reassignments::alter(&broker, v, r).await,
                ),
            )))
        }
        .boxed(),
        RequestKind::ListPartitionReassignments(r) => async move {
            Some(Response::Kind(Box::new(
                ResponseKind::ListPartitionReassignments(reassignments::list(&broker, v, r)),
            )))
        }
        .boxed(),
        RequestKind::FindCoordinator(r) => {
            let resp = consumer_groups::find_coordinator(&broker, v, r);
            let resp = advertised::find_coordinator(&broker, &session, resp);
            async move { Some(kind(ResponseKind::FindCoordinator(resp))) }.boxed()
        }
        RequestKind::JoinGroup(r) => async move {
            Some(kind(ResponseKind::JoinGroup(
                consumer_groups::join_group(&broker, &session, v, r).await,
            )))
        }
        .boxed(),
        RequestKind::SyncGroup(r) => async move {
            Some(kind(ResponseKind::SyncGroup(
                consumer_groups::sync_group(&broker, v, r).await,
            )))
        }
        .boxed(),
        RequestKind::Heartbeat(r) => {
            let resp = consumer_groups::heartbeat(&broker, v, r);
            async move { Some(kind(ResponseKind::Heartbeat(resp))) }.boxed()
        }
        // Commits and leaves are queued in their ordering step: pipelined, they apply in order.
        RequestKind::LeaveGroup(r) => return Box::pin(ordered_leave(broker, v, r)),
        RequestKind::ListGroups(r) => {
            let resp = consumer_groups::list_groups(&broker, v, r);
            async move { Some(kind(ResponseKind::ListGroups(resp))) }.boxed()
        }
        RequestKind::DescribeGroups(r) => {
            let resp = consumer_groups::describe_groups(&broker, v, r);
            async move { Some(kind(ResponseKind::DescribeGroups(resp))) }.boxed()
        }
        RequestKind::DeleteGroups(r) => async move {
            Some(kind(ResponseKind::DeleteGroups(
                consumer_groups::delete_groups(&broker, v, r).await,
            )))
        }
        .boxed(),
        RequestKind::OffsetCommit(r) => return Box::pin(ordered_commit(broker, v, r)),
        RequestKind::OffsetFetch(r) => {
            let resp = offsets::offset_fetch(&broker, v, r);
            async move { Some(kind(ResponseKind::OffsetFetch(resp))) }.boxed()
        }
        RequestKind::OffsetDelete(r) => async move {
            Some(kind(ResponseKind::OffsetDelete(
                offsets::offset_delete(&broker, v, r).await,
            )))
        }
        .boxed(),
        RequestKind::CreateAcls(r) => async move {
            Some(kind(ResponseKind::CreateAcls(
                acls::create(&broker, r).await,
            )))
        }
        .boxed(),
        RequestKind::DescribeAcls(r) => {
            let resp = acls::describe(&broker, r);
            async move { Some(kind(ResponseKind::DescribeAcls(resp))) }.boxed()
        }
        RequestKind::DeleteAcls(r) => async move {
            Some(kind(ResponseKind::DeleteAcls(
                acls::delete(&broker, r).await,
            )))
        }
        .boxed(),
        // The SASL exchange runs in its ordering step: a pipelined request behind it must see
        // the session already authenticated (or failed).
        RequestKind::SaslHandshake(r) => {
            let resp = sasl::handshake(&broker, &session, v, r);
            async move { Some(kind(ResponseKind::SaslHandshake(resp))) }.boxed()
        }
        RequestKind::SaslAuthenticate(r) => {
            let resp = sasl::authenticate(&broker, &session, v, r);
            async move { Some(kind(ResponseKind::SaslAuthenticate(resp))) }.boxed()
        }
        RequestKind::AlterUserScramCredentials(r) => async move {
            Some(kind(ResponseKind::AlterUserScramCredentials(
                scram_users::alter(&broker, v, r).await,
            )))
        }
        .boxed(),
        RequestKind::DescribeUserScramCredentials(r) => {
            let resp = scram_users::describe(&broker, v, r);
            async move { Some(kind(ResponseKind::DescribeUserScramCredentials(resp))) }.boxed()
        }
        // supported_versions() filtered everything else before decoding.
        other => {
            tracing::warn!(request = ?std::mem::discriminant(&other), "request without handler");
            async { None }.boxed()
        }
    };
    answer_only(answer)
}

/// A LeaveGroup's ordering step (queue the leave), yielding its answer.
async fn ordered_leave(
    broker: Arc<Broker>,
    v: i16,
    r: kafka_protocol::messages::LeaveGroupRequest,
) -> Answer {
    let answer = consumer_groups::leave_group(&broker, v, r).await;
    Box::pin(async move { Some(kind(ResponseKind::LeaveGroup(answer.await))) })
}

/// An OffsetCommit's ordering step (queue the commit), yielding its answer.
async fn ordered_commit(
    broker: Arc<Broker>,
    v: i16,
    r: kafka_protocol::messages::OffsetCommitRequest,
) -> Answer {
    let answer = offsets::offset_commit(&broker, v, r).await;
    Box::pin(async move { Some(kind(ResponseKind::OffsetCommit(answer.await))) })
}

fn kind(k: ResponseKind) -> Response {
    Response::Kind(Box::new(k))
}

/// Kafka's `host:port` split for advertised addresses.
pub fn split_host_port(addr: &str) -> (String, i32) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(9092)),
        None => (addr.to_string(), 9092),
    }
}
