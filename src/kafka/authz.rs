//! Authorization of Kafka requests with Kafka's operation mapping (see the README's ACL table),
//! in front of the handlers: a request is either answered here with an authorization error, or
//! passed on with the resources the principal may not touch taken out, and a patch that puts
//! their errors into the handler's response. Handlers thus never see what they may not serve,
//! and each of them stays unaware of ACLs.
//!
//! Denied topics answer TOPIC_AUTHORIZATION_FAILED, groups GROUP_AUTHORIZATION_FAILED and the
//! cluster CLUSTER_AUTHORIZATION_FAILED, per item where the response has items. Metadata hides
//! topics the principal may not describe when it lists all topics.

use std::collections::BTreeSet;

use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::acls::{self, AclOperation as Op, ResourceType as Res, CLUSTER_RESOURCE};
use crate::errors::ErrorCode;
use crate::session::Session;

/// Puts the denied items' errors into the handler's response.
pub type Patch = Box<dyn FnOnce(&mut ResponseKind) + Send>;

/// What to do with a request.
pub enum Verdict {
    /// Serve it (possibly narrowed), then apply the patch, if any, to the response.
    Serve(RequestKind, Option<Patch>),
    /// Answer this instead.
    Deny(ResponseKind),
}

/// Who asks, and the decision over the current ACLs.
pub struct Asker<'a> {
    broker: &'a Broker,
    principal: String,
    host: String,
}

impl<'a> Asker<'a> {
    pub fn new(broker: &'a Broker, session: &Session) -> Asker<'a> {
        Asker {
            broker,
            principal: session.principal().to_string(),
            // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; ACLs name a.b.c.d.
            host: session.peer.ip().to_canonical().to_string(),
        }
    }

    pub fn may(&self, op: Op, rtype: Res, name: &str) -> bool {
        let state = self.broker.state();
        acls::authorize(
            &state.acls,
            &self.broker.authorizer,
            &self.principal,
            &self.host,
            op,
            rtype,
            name,
        )
    }

    fn may_cluster(&self, op: Op) -> bool {
        self.may(op, Res::Cluster, CLUSTER_RESOURCE)
    }

    fn topic(&self, op: Op) -> impl Fn(&str) -> bool + '_ {
        move |t| self.may(op, Res::Topic, t)
    }
}

const TOPIC_DENIED: i16 = ErrorCode::TopicAuthorizationFailed as i16;
const GROUP_DENIED: i16 = ErrorCode::GroupAuthorizationFailed as i16;
const CLUSTER_DENIED: i16 = ErrorCode::ClusterAuthorizationFailed as i16;

fn name(t: &TopicName) -> &str {
    t.0.as_str()
}

/// Removes the items whose topic `allowed` refuses, returning them.
fn split_off<T>(
    items: &mut Vec<T>,
    topic: impl Fn(&T) -> &str,
    allowed: impl Fn(&str) -> bool,
) -> Vec<T> {
    let (keep, denied): (Vec<T>, Vec<T>) = std::mem::take(items)
        .into_iter()
        .partition(|i| allowed(topic(i)));
    *items = keep;
    denied
}

fn patch(f: impl FnOnce(&mut ResponseKind) + Send + 'static) -> Option<Patch> {
    Some(Box::new(f))
}

/// Decides `request`; with the authorizer off, everything is served as is.
pub fn check(broker: &Broker, session: &Session, version: i16, request: RequestKind) -> Verdict {
    if !broker.authorizer.enabled {
        return Verdict::Serve(request, None);
    }
    let a = Asker::new(broker, session);
    use RequestKind as R;
    use Verdict::{Deny, Serve};
    match request {
        R::ApiVersions(_) => Serve(request, None),
        R::Produce(mut r) => {
            let denied = split_off(&mut r.topic_data, |t| name(&t.name), a.topic(Op::Write));
            Serve(
                R::Produce(r),
                patch(move |resp| {
                    if let ResponseKind::Produce(p) = resp {
                        for t in denied {
                            let parts = t
                                .partition_data
                                .iter()
                                .map(|d| {
                                    produce_response::PartitionProduceResponse::default()
                                        .with_index(d.index)
                                        .with_error_code(TOPIC_DENIED)
                                        .with_base_offset(-1)
                                })
                                .collect();
                            p.responses.push(
                                produce_response::TopicProduceResponse::default()
                                    .with_name(t.name)
                                    .with_partition_responses(parts),
                            );
                        }
                    }
                }),
            )
        }
        R::Fetch(mut r) => {
            let denied = split_off(&mut r.topics, |t| name(&t.topic), a.topic(Op::Read));
            Serve(
                R::Fetch(r),
                patch(move |resp| {
                    if let ResponseKind::Fetch(f) = resp {
                        for t in denied {
                            let parts = t
                                .partitions
                                .iter()
                                .map(|p| {
                                    fetch_response::PartitionData::default()
                                        .with_partition_index(p.partition)
                                        .with_error_code(TOPIC_DENIED)
                                        .with_high_watermark(-1)
                                        .with_last_stable_offset(-1)
                                        .with_log_start_offset(-1)
                                })
                                .collect();
                            f.responses.push(
                                fetch_response::FetchableTopicResponse::default()
                                    .with_topic(t.topic)
                                    .with_topic_id(t.topic_id)
                                    .with_partitions(parts),
                            );
                        }
                    }
                }),
            )
        }
        R::ListOffsets(mut r) => {
            let denied = split_off(&mut r.topics, |t| name(&t.name), a.topic(Op::Describe));
            Serve(
                R::ListOffsets(r),
                patch(move |resp| {
                    if let ResponseKind::ListOffsets(l) = resp {
                        for t in denied {
                            let parts = t
                                .partitions
                                .iter()
                                .map(|p| {
                                    list_offsets_response::ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(TOPIC_DENIED)
                                        .with_timestamp(-1)
                                        .with_offset(-1)
                                        .with_leader_epoch(-1)
                                })
                                .collect();
                            l.topics.push(
                                list_offsets_response::ListOffsetsTopicResponse::default()
                                    .with_name(t.name)
                                    .with_partitions(parts),
                            );
                        }
                    }
                }),
            )
        }
        R::OffsetForLeaderEpoch(mut r) => {
            let denied = split_off(&mut r.topics, |t| name(&t.topic), a.topic(Op::Describe));
            Serve(
                R::OffsetForLeaderEpoch(r),
                patch(move |resp| {
                    if let ResponseKind::OffsetForLeaderEpoch(o) = resp {
                        for t in denied {
                            let parts = t
                                .partitions
                                .iter()
                                .map(|p| {
                                    offset_for_leader_epoch_response::EpochEndOffset::default()
                                        .with_partition(p.partition)
                                        .with_error_code(TOPIC_DENIED)
                                        .with_leader_epoch(-1)
                                        .with_end_offset(-1)
                                })
                                .collect();
                            o.topics.push(
                                offset_for_leader_epoch_response::OffsetForLeaderTopicResult::default()
                                    .with_topic(t.topic)
                                    .with_partitions(parts),
                            );
                        }
                    }
                }),
            )
        }
        R::DescribeProducers(mut r) => {
            let denied = split_off(&mut r.topics, |t| name(&t.name), a.topic(Op::Read));
            Serve(
                R::DescribeProducers(r),
                patch(move |resp| {
                    if let ResponseKind::DescribeProducers(d) = resp {
                        for t in denied {
                            let parts = t
                                .partition_indexes
                                .iter()
                                .map(|p| {
                                    describe_producers_response::PartitionResponse::default()
                                        .with_partition_index(*p)
                                        .with_error_code(TOPIC_DENIED)
                                })
                                .collect();
                            d.topics.push(
                                describe_producers_response::TopicResponse::default()
                                    .with_name(t.name)
                                    .with_partitions(parts),
                            );
                        }
                    }
                }),
            )
        }
        R::Metadata(r) => metadata(&a, version, r),
        R::CreateTopics(mut r) => {
            let cluster = a.may_cluster(Op::Create);
            let denied = split_off(
                &mut r.topics,
                |t| name(&t.name),
                |t| cluster || a.may(Op::Create, Res::Topic, t),
            );
            Serve(
                R::CreateTopics(r),
                patch(move |resp| {
                    if let ResponseKind::CreateTopics(c) = resp {
                        for t in denied {
                            c.topics.push(
                                create_topics_response::CreatableTopicResult::default()
                                    .with_name(t.name)
                                    .with_error_code(TOPIC_DENIED)
                                    .with_num_partitions(-1)
                                    .with_replication_factor(-1)
                                    .with_error_message(Some(StrBytes::from_static_str(
                                        "not authorized to create this topic",
                                    ))),
                            );
                        }
                    }
                }),
            )
        }
        R::DeleteTopics(mut r) => {
            let by_id: Vec<(uuid::Uuid, String)> = {
                let state = broker.state();
                state
                    .topics
                    .values()
                    .map(|t| (uuid::Uuid::from_bytes(t.id), t.name.clone()))
                    .collect()
            };
            let named = |t: &delete_topics_request::DeleteTopicState| -> String {
                match &t.name {
                    Some(n) => n.0.to_string(),
                    None => by_id
                        .iter()
                        .find(|(id, _)| *id == t.topic_id)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_default(),
                }
            };
            let may_delete = a.topic(Op::Delete);
            let denied_names = split_off(&mut r.topic_names, |t| name(t), &may_delete);
            let (keep, denied_states): (Vec<_>, Vec<_>) = std::mem::take(&mut r.topics)
                .into_iter()
                .partition(|t| may_delete(&named(t)));
            r.topics = keep;
            let denied_states: Vec<_> = denied_states.into_iter().map(|t| (named(&t), t)).collect();
            Serve(
                R::DeleteTopics(r),
                patch(move |resp| {
                    if let ResponseKind::DeleteTopics(d) = resp {
                        for n in denied_names {
                            d.responses.push(
                                delete_topics_response::DeletableTopicResult::default()
                                    .with_name(Some(n))
                                    .with_error_code(TOPIC_DENIED),
                            );
                        }
                        for (n, t) in denied_states {
                            let n = (!n.is_empty()).then(|| TopicName(StrBytes::from_string(n)));
                            d.responses.push(
                                delete_topics_response::DeletableTopicResult::default()
                                    .with_name(n)
                                    .with_topic_id(t.topic_id)
                                    .with_error_code(TOPIC_DENIED),
                            );
                        }
                    }
                }),
            )
        }
        R::CreatePartitions(mut r) => {
            let denied = split_off(&mut r.topics, |t| name(&t.name), a.topic(Op::Alter));
            Serve(
                R::CreatePartitions(r),
                patch(move |resp| {
                    if let ResponseKind::CreatePartitions(c) = resp {
                        for t in denied {
                            c.results.push(
                                create_partitions_response::CreatePartitionsTopicResult::default()
                                    .with_name(t.name)
                                    .with_error_code(TOPIC_DENIED),
                            );
                        }
                    }
                }),
            )
        }
        R::DescribeConfigs(mut r) => {
            let may =
                |res: &describe_configs_request::DescribeConfigsResource| match res.resource_type {
                    2 => a.may(Op::DescribeConfigs, Res::Topic, res.resource_name.as_str()),
                    _ => a.may_cluster(Op::DescribeConfigs),
                };
            let (keep, denied): (Vec<_>, Vec<_>) =
                std::mem::take(&mut r.resources).into_iter().partition(may);
            r.resources = keep;
            Serve(
                R::DescribeConfigs(r),
                patch(move |resp| {
                    if let ResponseKind::DescribeConfigs(d) = resp {
                        for res in denied {
                            let code = if res.resource_type == 2 {
                                TOPIC_DENIED
                            } else {
                                CLUSTER_DENIED
                            };
                            d.results.push(
                                describe_configs_response::DescribeConfigsResult::default()
                                    .with_error_code(code)
                                    .with_resource_type(res.resource_type)
                                    .with_resource_name(res.resource_name),
                            );
                        }
                    }
                }),
            )
        }
        R::DescribeCluster(_) if !a.may_cluster(Op::Describe) => {
            Deny(ResponseKind::DescribeCluster(
                DescribeClusterResponse::default().with_error_code(CLUSTER_DENIED),
            ))
        }
        R::AlterPartitionReassignments(_) if !a.may_cluster(Op::Alter) => {
            Deny(ResponseKind::AlterPartitionReassignments(
                AlterPartitionReassignmentsResponse::default().with_error_code(CLUSTER_DENIED),
            ))
        }
        R::ListPartitionReassignments(_) if !a.may_cluster(Op::Describe) => {
            Deny(ResponseKind::ListPartitionReassignments(
                ListPartitionReassignmentsResponse::default().with_error_code(CLUSTER_DENIED),
            ))
        }
        R::CreateAcls(r) if !a.may_cluster(Op::Alter) => {
            let results = r
                .creations
                .iter()
                .map(|_| {
                    create_acls_response::AclCreationResult::default()
                        .with_error_code(CLUSTER_DENIED)
                })
                .collect();
            Deny(ResponseKind::CreateAcls(
                CreateAclsResponse::default().with_results(results),
            ))
        }
        R::DeleteAcls(r) if !a.may_cluster(Op::Alter) => {
            let results = r
                .filters
                .iter()
                .map(|_| {
                    delete_acls_response::DeleteAclsFilterResult::default()
                        .with_error_code(CLUSTER_DENIED)
                })
                .collect();
            Deny(ResponseKind::DeleteAcls(
                DeleteAclsResponse::default().with_filter_results(results),
            ))
        }
        R::AlterUserScramCredentials(r) if !a.may_cluster(Op::Alter) => {
            let users: BTreeSet<String> = r
                .deletions
                .iter()
                .map(|d| d.name.to_string())
                .chain(r.upsertions.iter().map(|u| u.name.to_string()))
                .collect();
            let results = users
                .into_iter()
                .map(|u| {
                    alter_user_scram_credentials_response::AlterUserScramCredentialsResult::default(
                    )
                    .with_user(StrBytes::from_string(u))
                    .with_error_code(CLUSTER_DENIED)
                })
                .collect();
            Deny(ResponseKind::AlterUserScramCredentials(
                AlterUserScramCredentialsResponse::default().with_results(results),
            ))
        }
        R::DescribeUserScramCredentials(_) if !a.may_cluster(Op::Describe) => {
            Deny(ResponseKind::DescribeUserScramCredentials(
                DescribeUserScramCredentialsResponse::default().with_error_code(CLUSTER_DENIED),
            ))
        }
        R::DescribeAcls(_) if !a.may_cluster(Op::Describe) => Deny(ResponseKind::DescribeAcls(
            DescribeAclsResponse::default().with_error_code(CLUSTER_DENIED),
        )),
        R::InitProducerId(r) => {
            let ok = match &r.transactional_id {
                Some(id) if !id.0.is_empty() => {
                    a.may(Op::Write, Res::TransactionalId, id.0.as_str())
                }
                // KIP-679: an idempotent producer needs IdempotentWrite on the cluster, or
                // Write on some topic.
                _ => {
                    a.may_cluster(Op::IdempotentWrite) || {
                        let state = broker.state();
                        acls::allowed_on_any(
                            &state.acls,
                            &broker.authorizer,
                            &a.principal,
                            &a.host,
                            Op::Write,
                            Res::Topic,
                        )
                    }
                }
            };
            if ok {
                Serve(R::InitProducerId(r), None)
            } else {
                let code = if r.transactional_id.as_ref().is_some_and(|t| !t.0.is_empty()) {
                    ErrorCode::TransactionalIdAuthorizationFailed as i16
                } else {
                    CLUSTER_DENIED
                };
                Deny(ResponseKind::InitProducerId(
                    InitProducerIdResponse::default()
                        .with_error_code(code)
                        .with_producer_id((-1).into())
                        .with_producer_epoch(-1),
                ))
            }
        }
        R::FindCoordinator(r) => find_coordinator(&a, version, r),
        R::JoinGroup(r) if !a.may(Op::Read, Res::Group, r.group_id.0.as_str()) => {
            Deny(ResponseKind::JoinGroup(
                JoinGroupResponse::default()
                    .with_error_code(GROUP_DENIED)
                    .with_generation_id(-1),
            ))
        }
        R::SyncGroup(r) if !a.may(Op::Read, Res::Group, r.group_id.0.as_str()) => Deny(
            ResponseKind::SyncGroup(SyncGroupResponse::default().with_error_code(GROUP_DENIED)),
        ),
        R::Heartbeat(r) if !a.may(Op::Read, Res::Group, r.group_id.0.as_str()) => Deny(
            ResponseKind::Heartbeat(HeartbeatResponse::default().with_error_code(GROUP_DENIED)),
        ),
        R::LeaveGroup(r) if !a.may(Op::Read, Res::Group, r.group_id.0.as_str()) => Deny(
            ResponseKind::LeaveGroup(LeaveGroupResponse::default().with_error_code(GROUP_DENIED)),
        ),
        R::ListGroups(r) => {
            if a.may_cluster(Op::Describe) {
                return Serve(R::ListGroups(r), None);
            }
            let visible: BTreeSet<String> = {
                let state = broker.state();
                state
                    .consumer_groups
                    .keys()
                    .filter(|g| a.may(Op::Describe, Res::Group, g))
                    .cloned()
                    .collect()
            };
            Serve(
                R::ListGroups(r),
                patch(move |resp| {
                    if let ResponseKind::ListGroups(l) = resp {
                        l.groups.retain(|g| visible.contains(g.group_id.0.as_str()));
                    }
                }),
            )
        }
        R::DescribeGroups(mut r) => {
            let denied = split_off(
                &mut r.groups,
                |g| g.0.as_str(),
                |g| a.may(Op::Describe, Res::Group, g),
            );
            Serve(
                R::DescribeGroups(r),
                patch(move |resp| {
                    if let ResponseKind::DescribeGroups(d) = resp {
                        for g in denied {
                            d.groups.push(
                                describe_groups_response::DescribedGroup::default()
                                    .with_group_id(g)
                                    .with_error_code(GROUP_DENIED),
                            );
                        }
                    }
                }),
            )
        }
        R::DeleteGroups(mut r) => {
            let denied = split_off(
                &mut r.groups_names,
                |g| g.0.as_str(),
                |g| a.may(Op::Delete, Res::Group, g),
            );
            Serve(
                R::DeleteGroups(r),
                patch(move |resp| {
                    if let ResponseKind::DeleteGroups(d) = resp {
                        for g in denied {
                            d.results.push(
                                delete_groups_response::DeletableGroupResult::default()
                                    .with_group_id(g)
                                    .with_error_code(GROUP_DENIED),
                            );
                        }
                    }
                }),
            )
        }
        R::OffsetCommit(r) => offset_commit(&a, r),
        R::OffsetFetch(r) => offset_fetch(&a, version, r),
        R::OffsetDelete(mut r) => {
            if !a.may(Op::Delete, Res::Group, r.group_id.0.as_str()) {
                return Deny(ResponseKind::OffsetDelete(
                    OffsetDeleteResponse::default().with_error_code(GROUP_DENIED),
                ));
            }
            let denied = split_off(&mut r.topics, |t| name(&t.name), a.topic(Op::Read));
            Serve(
                R::OffsetDelete(r),
                patch(move |resp| {
                    if let ResponseKind::OffsetDelete(d) = resp {
                        for t in denied {
                            let parts = t
                                .partitions
                                .iter()
                                .map(|p| {
                                    offset_delete_response::OffsetDeleteResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(TOPIC_DENIED)
                                })
                                .collect();
                            d.topics.push(
                                offset_delete_response::OffsetDeleteResponseTopic::default()
                                    .with_name(t.name)
                                    .with_partitions(parts),
                            );
                        }
                    }
                }),
            )
        }
        other => Serve(other, None),
    }
}

/// Metadata: topics the principal may not describe are hidden from a list of all topics and
/// answer TOPIC_AUTHORIZATION_FAILED when named; auto-creation needs Create.
fn metadata(a: &Asker<'_>, version: i16, mut r: MetadataRequest) -> Verdict {
    let listing_all = match &r.topics {
        None => true,
        // v0 has no null: an empty list means all topics.
        Some(t) => t.is_empty() && version == 0,
    };
    if listing_all {
        let visible: BTreeSet<String> = {
            let state = a.broker.state();
            state
                .topics
                .keys()
                .filter(|t| a.may(Op::Describe, Res::Topic, t))
                .cloned()
                .collect()
        };
        return Verdict::Serve(
            RequestKind::Metadata(r),
            patch(move |resp| {
                if let ResponseKind::Metadata(m) = resp {
                    m.topics.retain(|t| {
                        t.name
                            .as_ref()
                            .is_some_and(|n| visible.contains(n.0.as_str()))
                    });
                }
            }),
        );
    }
    let mut denied = Vec::new();
    if let Some(topics) = &mut r.topics {
        denied = split_off(
            topics,
            |t| t.name.as_ref().map(|n| n.0.as_str()).unwrap_or(""),
            a.topic(Op::Describe),
        );
        // One request-wide flag: if any missing topic may not be created, none is.
        if r.allow_auto_topic_creation && !a.may_cluster(Op::Create) {
            let state = a.broker.state();
            let refused = topics.iter().any(|t| {
                t.name.as_ref().is_some_and(|n| {
                    !state.topics.contains_key(n.0.as_str())
                        && !a.may(Op::Create, Res::Topic, n.0.as_str())
                })
            });
            if refused {
                r.allow_auto_topic_creation = false;
            }
        }
    }
    Verdict::Serve(
        RequestKind::Metadata(r),
        patch(move |resp| {
            if let ResponseKind::Metadata(m) = resp {
                for t in denied {
                    m.topics.push(
                        metadata_response::MetadataResponseTopic::default()
                            .with_name(t.name)
                            .with_topic_id(t.topic_id)
                            .with_error_code(TOPIC_DENIED),
                    );
                }
            }
        }),
    )
}

fn find_coordinator(a: &Asker<'_>, version: i16, r: FindCoordinatorRequest) -> Verdict {
    let key_type = r.key_type;
    let may_key = |key: &str| match key_type {
        1 => a.may(Op::Describe, Res::TransactionalId, key),
        _ => a.may(Op::Describe, Res::Group, key),
    };
    let code = if key_type == 1 {
        ErrorCode::TransactionalIdAuthorizationFailed as i16
    } else {
        GROUP_DENIED
    };
    if version < 4 {
        if may_key(r.key.as_str()) {
            return Verdict::Serve(RequestKind::FindCoordinator(r), None);
        }
        return Verdict::Deny(ResponseKind::FindCoordinator(
            FindCoordinatorResponse::default()
                .with_error_code(code)
                .with_node_id((-1).into())
                .with_port(-1),
        ));
    }
    let mut r = r;
    let (keep, denied): (Vec<_>, Vec<_>) = std::mem::take(&mut r.coordinator_keys)
        .into_iter()
        .partition(|k| may_key(k.as_str()));
    r.coordinator_keys = keep;
    Verdict::Serve(
        RequestKind::FindCoordinator(r),
        patch(move |resp| {
            if let ResponseKind::FindCoordinator(f) = resp {
                for k in denied {
                    f.coordinators.push(
                        find_coordinator_response::Coordinator::default()
                            .with_key(k)
                            .with_node_id((-1).into())
                            .with_port(-1)
                            .with_error_code(code),
                    );
                }
            }
        }),
    )
}

fn offset_commit(a: &Asker<'_>, mut r: OffsetCommitRequest) -> Verdict {
    let group_ok = a.may(Op::Read, Res::Group, r.group_id.0.as_str());
    let error_for = |t: &offset_commit_request::OffsetCommitRequestTopic, code: i16| {
        let parts = t
            .partitions
            .iter()
            .map(|p| {
                offset_commit_response::OffsetCommitResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(code)
            })
            .collect();
        offset_commit_response::OffsetCommitResponseTopic::default()
            .with_name(t.name.clone())
            .with_topic_id(t.topic_id)
            .with_partitions(parts)
    };
    if !group_ok {
        let topics = r
            .topics
            .iter()
            .map(|t| error_for(t, GROUP_DENIED))
            .collect();
        return Verdict::Deny(ResponseKind::OffsetCommit(
            OffsetCommitResponse::default().with_topics(topics),
        ));
    }
    let denied: Vec<_> = split_off(&mut r.topics, |t| name(&t.name), a.topic(Op::Read))
        .iter()
        .map(|t| error_for(t, TOPIC_DENIED))
        .collect();
    Verdict::Serve(
        RequestKind::OffsetCommit(r),
        patch(move |resp| {
            if let ResponseKind::OffsetCommit(c) = resp {
                c.topics.extend(denied);
            }
        }),
    )
}

/// OffsetFetch: Describe on the group, and on each topic (a denied topic's partitions answer
/// TOPIC_AUTHORIZATION_FAILED; asked for all topics, unauthorized ones are left out).
fn offset_fetch(a: &Asker<'_>, version: i16, mut r: OffsetFetchRequest) -> Verdict {
    let may_topic = |t: &str| a.may(Op::Describe, Res::Topic, t);
    if version < 8 {
        if !a.may(Op::Describe, Res::Group, r.group_id.0.as_str()) {
            // v0-1 carry no top-level error: each asked partition says it instead.
            let topics = r
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    let parts = t
                        .partition_indexes
                        .iter()
                        .map(|p| {
                            offset_fetch_response::OffsetFetchResponsePartition::default()
                                .with_partition_index(*p)
                                .with_committed_offset(-1)
                                .with_committed_leader_epoch(-1)
                                .with_error_code(GROUP_DENIED)
                        })
                        .collect();
                    offset_fetch_response::OffsetFetchResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(parts)
                })
                .collect();
            return Verdict::Deny(ResponseKind::OffsetFetch(
                OffsetFetchResponse::default()
                    .with_error_code(GROUP_DENIED)
                    .with_topics(topics),
            ));
        }
        let all = r.topics.is_none();
        let denied = match &mut r.topics {
            Some(t) => split_off(t, |t| name(&t.name), may_topic),
            None => Vec::new(),
        };
        let visible = visible_topics(a);
        return Verdict::Serve(
            RequestKind::OffsetFetch(r),
            patch(move |resp| {
                if let ResponseKind::OffsetFetch(f) = resp {
                    if all {
                        f.topics.retain(|t| visible.contains(name(&t.name)));
                    }
                    for t in denied {
                        let parts = t
                            .partition_indexes
                            .iter()
                            .map(|p| {
                                offset_fetch_response::OffsetFetchResponsePartition::default()
                                    .with_partition_index(*p)
                                    .with_committed_offset(-1)
                                    .with_committed_leader_epoch(-1)
                                    .with_error_code(TOPIC_DENIED)
                            })
                            .collect();
                        f.topics.push(
                            offset_fetch_response::OffsetFetchResponseTopic::default()
                                .with_name(t.name)
                                .with_partitions(parts),
                        );
                    }
                }
            }),
        );
    }
    let (keep, denied_groups): (Vec<_>, Vec<_>) = std::mem::take(&mut r.groups)
        .into_iter()
        .partition(|g| a.may(Op::Describe, Res::Group, g.group_id.0.as_str()));
    r.groups = keep;
    let listing_all: Vec<GroupId> = r
        .groups
        .iter()
        .filter(|g| g.topics.is_none())
        .map(|g| g.group_id.clone())
        .collect();
    let mut denied_topics = Vec::new();
    for g in &mut r.groups {
        if let Some(t) = &mut g.topics {
            for d in split_off(t, |t| name(&t.name), may_topic) {
                denied_topics.push((g.group_id.clone(), d));
            }
        }
    }
    let visible = visible_topics(a);
    Verdict::Serve(
        RequestKind::OffsetFetch(r),
        patch(move |resp| {
            if let ResponseKind::OffsetFetch(f) = resp {
                for g in f
                    .groups
                    .iter_mut()
                    .filter(|g| listing_all.contains(&g.group_id))
                {
                    g.topics.retain(|t| visible.contains(name(&t.name)));
                }
                for (group, t) in denied_topics {
                    let parts = t
                        .partition_indexes
                        .iter()
                        .map(|p| {
                            offset_fetch_response::OffsetFetchResponsePartitions::default()
                                .with_partition_index(*p)
                                .with_committed_offset(-1)
                                .with_committed_leader_epoch(-1)
                                .with_error_code(TOPIC_DENIED)
                        })
                        .collect();
                    let topic = offset_fetch_response::OffsetFetchResponseTopics::default()
                        .with_name(t.name)
                        .with_partitions(parts);
                    if let Some(g) = f.groups.iter_mut().find(|g| g.group_id == group) {
                        g.topics.push(topic);
                    }
                }
                for g in denied_groups {
                    f.groups.push(
                        offset_fetch_response::OffsetFetchResponseGroup::default()
                            .with_group_id(g.group_id)
                            .with_error_code(GROUP_DENIED),
                    );
                }
            }
        }),
    )
}

fn visible_topics(a: &Asker<'_>) -> BTreeSet<String> {
    let state = a.broker.state();
    state
        .topics
        .keys()
        .filter(|t| a.may(Op::Describe, Res::Topic, t))
        .cloned()
        .collect()
}
