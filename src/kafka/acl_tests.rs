//! ACLs end to end over TCP against a real in-process node: the ACL APIs, and enforcement with
//! Kafka's operation mapping and error codes. The client here is `User:ANONYMOUS` (a PLAINTEXT
//! listener); `allow.everyone.if.no.acl.found` lets it set the first ACLs, as an operator would
//! on a fresh cluster. The interop suite repeats the core of this with SASL users.

use std::time::Duration;

use kafka_protocol::messages::create_acls_request::AclCreation;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::delete_acls_request::DeleteAclsFilter;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;

use crate::cli::conn::BrokerConn;
use crate::cli::records::{encode_batch, Message};
use crate::controller::acls::{AclOperation, AclPermission, PatternType, ResourceType};
use crate::errors::ErrorCode;
use crate::testkit::TestCluster;

const ME: &str = "User:ANONYMOUS";

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn name(v: &str) -> TopicName {
    TopicName(s(v))
}

fn acl(
    rtype: ResourceType,
    resource: &str,
    pattern: PatternType,
    principal: &str,
    op: AclOperation,
    perm: AclPermission,
) -> AclCreation {
    AclCreation::default()
        .with_resource_type(rtype.code())
        .with_resource_name(s(resource))
        .with_resource_pattern_type(pattern.code())
        .with_principal(s(principal))
        .with_host(s("*"))
        .with_operation(op.code())
        .with_permission_type(perm.code())
}

async fn create_acls(conn: &mut BrokerConn, acls: Vec<AclCreation>) -> Vec<i16> {
    let v = conn.version_for(ApiKey::CreateAcls).unwrap();
    let resp: CreateAclsResponse = conn
        .call(&CreateAclsRequest::default().with_creations(acls), v)
        .await
        .unwrap();
    resp.results.iter().map(|r| r.error_code).collect()
}

async fn create_topic(conn: &mut BrokerConn, topic: &str) -> i16 {
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(name(topic))
            .with_num_partitions(1)
            .with_replication_factor(1)]);
    let v = conn.version_for(ApiKey::CreateTopics).unwrap();
    let resp: CreateTopicsResponse = conn.call(&req, v).await.unwrap();
    resp.topics[0].error_code
}

async fn produce(conn: &mut BrokerConn, topic: &str) -> i16 {
    let batch = encode_batch(
        &[Message {
            key: None,
            value: bytes::Bytes::from_static(b"v"),
        }],
        Compression::None,
        1_000,
    )
    .unwrap();
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(batch))])]);
    let v = conn.version_for_max(ApiKey::Produce, 9).unwrap();
    let resp: ProduceResponse = conn.call(&req, v).await.unwrap();
    let t = resp
        .responses
        .iter()
        .find(|t| t.name.0.as_str() == topic)
        .expect("topic in produce response");
    t.partition_responses[0].error_code
}

async fn fetch(conn: &mut BrokerConn, topics: &[&str]) -> Vec<(String, i16)> {
    let req = FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(10)
        .with_max_bytes(1 << 20)
        .with_topics(
            topics
                .iter()
                .map(|t| {
                    FetchTopic::default()
                        .with_topic(name(t))
                        .with_partitions(vec![FetchPartition::default()
                            .with_partition(0)
                            .with_partition_max_bytes(1 << 20)])
                })
                .collect(),
        );
    let v = conn.version_for_max(ApiKey::Fetch, 12).unwrap();
    let resp: FetchResponse = conn.call(&req, v).await.unwrap();
    resp.responses
        .iter()
        .map(|t| (t.topic.0.to_string(), t.partitions[0].error_code))
        .collect()
}

async fn metadata(conn: &mut BrokerConn, topics: Option<&[&str]>) -> Vec<(String, i16)> {
    let req = MetadataRequest::default().with_topics(topics.map(|ts| {
        ts.iter()
            .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
            .collect()
    }));
    let v = conn.version_for_max(ApiKey::Metadata, 9).unwrap();
    let resp: MetadataResponse = conn.call(&req, v).await.unwrap();
    let mut out: Vec<_> = resp
        .topics
        .iter()
        .map(|t| {
            (
                t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default(),
                t.error_code,
            )
        })
        .collect();
    out.sort();
    out
}

/// One node with `tweak`'s config, ready, and a client connection to it.
async fn acl_node(tweak: impl Fn(&mut crate::config::ServerConfig)) -> (TestCluster, BrokerConn) {
    let c = TestCluster::start_with(1, tweak).await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    let conn = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    (c, conn)
}

const TOPIC_DENIED: i16 = ErrorCode::TopicAuthorizationFailed as i16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_allow_deny_hide_and_guard_the_cluster() {
    use AclOperation::*;
    use AclPermission::*;
    use PatternType::*;
    use ResourceType::*;
    let (c, mut conn) = acl_node(|cfg| {
        cfg.authorizer_enabled = true;
        cfg.allow_everyone_if_no_acl_found = true;
        cfg.auto_create_topics_enable = false;
    })
    .await;

    // No ACL names anything yet: open, by allow.everyone.if.no.acl.found.
    assert_eq!(create_topic(&mut conn, "a").await, 0);
    assert_eq!(create_topic(&mut conn, "b").await, 0);
    assert_eq!(produce(&mut conn, "b").await, 0);

    // Anonymous may read a; b and the cluster belong to bob.
    let codes = create_acls(
        &mut conn,
        vec![
            acl(Topic, "a", Literal, ME, Read, Allow),
            acl(Topic, "b", Literal, "User:bob", All, Allow),
            acl(Cluster, "kafka-cluster", Literal, "User:bob", All, Allow),
            acl(Topic, "c", Prefixed, "User:bob", All, Allow),
            // Not storable: a cluster resource must be named kafka-cluster.
            acl(Cluster, "other", Literal, "User:bob", All, Allow),
        ],
    )
    .await;
    assert_eq!(codes, vec![0, 0, 0, 0, ErrorCode::InvalidRequest as i16]);

    assert_eq!(
        fetch(&mut conn, &["a", "b"]).await,
        vec![("a".into(), 0), ("b".into(), TOPIC_DENIED)],
        "read a, not b"
    );
    assert_eq!(
        produce(&mut conn, "a").await,
        TOPIC_DENIED,
        "Read does not allow Write"
    );
    assert_eq!(
        metadata(&mut conn, None).await,
        vec![("a".into(), 0)],
        "b is hidden from the topic list"
    );
    assert_eq!(
        metadata(&mut conn, Some(&["b"])).await,
        vec![("b".into(), TOPIC_DENIED)]
    );
    // v5: by name (v6 sends topic states).
    let v = conn.version_for_max(ApiKey::DeleteTopics, 5).unwrap();
    let del: DeleteTopicsResponse = conn
        .call(
            &DeleteTopicsRequest::default()
                .with_timeout_ms(10_000)
                .with_topic_names(vec![name("a")]),
            v,
        )
        .await
        .unwrap();
    assert_eq!(
        del.responses[0].error_code, TOPIC_DENIED,
        "Read does not allow Delete"
    );
    assert_eq!(
        metadata(&mut conn, Some(&["a"])).await,
        vec![("a".into(), 0)],
        "a still there"
    );
    assert_eq!(
        create_topic(&mut conn, "c1").await,
        TOPIC_DENIED,
        "neither the cluster's nor c1's ACLs let anonymous create"
    );
    assert_eq!(
        create_topic(&mut conn, "d").await,
        0,
        "no ACL names d: open, by allow.everyone.if.no.acl.found"
    );

    // Groups: a group bob's ACL names is closed to anonymous.
    let cluster_denied = ErrorCode::ClusterAuthorizationFailed as i16;
    assert_eq!(
        create_acls(&mut conn, vec![acl(Group, "g", Literal, ME, Read, Allow)]).await,
        vec![cluster_denied],
        "only bob may alter ACLs now"
    );
    let v = conn.version_for(ApiKey::DescribeAcls).unwrap();
    let described: DescribeAclsResponse = conn
        .call(
            &DescribeAclsRequest::default()
                .with_resource_name_filter(None)
                .with_principal_filter(None)
                .with_host_filter(None)
                .with_resource_type_filter(1)
                .with_pattern_type_filter(1)
                .with_operation(1)
                .with_permission_type(1),
            v,
        )
        .await
        .unwrap();
    assert_eq!(described.error_code, cluster_denied);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_beats_allow_and_acls_can_be_listed_and_deleted() {
    use AclOperation::*;
    use AclPermission::*;
    use PatternType::*;
    use ResourceType::*;
    let (c, mut conn) = acl_node(|cfg| {
        cfg.authorizer_enabled = true;
        cfg.super_users = vec![ME.to_string()];
    })
    .await;
    assert_eq!(
        create_topic(&mut conn, "t").await,
        0,
        "a super user needs no ACL"
    );
    let codes = create_acls(
        &mut conn,
        vec![
            acl(Topic, "t", Prefixed, "User:*", Read, Allow),
            acl(Topic, "t", Literal, "User:eve", Read, Deny),
            acl(Group, "app-", Prefixed, "User:alice", Read, Allow),
        ],
    )
    .await;
    assert_eq!(codes, vec![0, 0, 0]);

    let v = conn.version_for(ApiKey::DescribeAcls).unwrap();
    let all = |rtype: i8| {
        DescribeAclsRequest::default()
            .with_resource_name_filter(None)
            .with_principal_filter(None)
            .with_host_filter(None)
            .with_resource_type_filter(rtype)
            .with_pattern_type_filter(1)
            .with_operation(1)
            .with_permission_type(1)
    };
    let described: DescribeAclsResponse = conn.call(&all(Topic.code()), v).await.unwrap();
    assert_eq!(described.error_code, 0);
    let n: usize = described.resources.iter().map(|r| r.acls.len()).sum();
    assert_eq!(n, 2, "{described:?}");
    // MATCH: every binding that applies to topic "tx": the prefixed one only.
    let matching: DescribeAclsResponse = conn
        .call(
            &all(Topic.code())
                .with_resource_name_filter(Some(s("tx")))
                .with_pattern_type_filter(2),
            v,
        )
        .await
        .unwrap();
    assert_eq!(matching.resources.len(), 1);
    assert_eq!(matching.resources[0].pattern_type, Prefixed.code());

    // The authorizer's own decision for eve (no second principal over PLAINTEXT here).
    {
        let broker = c.broker(0);
        let state = broker.state();
        let may = |who: &str| {
            crate::controller::acls::authorize(
                &state.acls,
                &broker.authorizer,
                who,
                "127.0.0.1",
                Read,
                Topic,
                "t",
            )
        };
        assert!(may("User:alice"));
        assert!(!may("User:eve"), "deny beats allow");
    }

    let v = conn.version_for(ApiKey::DeleteAcls).unwrap();
    let deleted: DeleteAclsResponse = conn
        .call(
            &DeleteAclsRequest::default().with_filters(vec![DeleteAclsFilter::default()
                .with_resource_name_filter(None)
                .with_host_filter(None)
                .with_resource_type_filter(Group.code())
                .with_pattern_type_filter(1)
                .with_principal_filter(Some(s("User:alice")))
                .with_operation(1)
                .with_permission_type(1)]),
            v,
        )
        .await
        .unwrap();
    assert_eq!(deleted.filter_results[0].error_code, 0);
    assert_eq!(deleted.filter_results[0].matching_acls.len(), 1);
    assert_eq!(c.broker(0).state().acls.len(), 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_authorizer_the_acl_apis_answer_security_disabled() {
    let c = TestCluster::single().await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    let mut conn = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let codes = create_acls(
        &mut conn,
        vec![acl(
            ResourceType::Topic,
            "a",
            PatternType::Literal,
            ME,
            AclOperation::Read,
            AclPermission::Allow,
        )],
    )
    .await;
    assert_eq!(codes, vec![ErrorCode::SecurityDisabled as i16]);
    // And nothing is enforced: anonymous creates and writes.
    assert_eq!(create_topic(&mut conn, "a").await, 0);
    c.shutdown().await;
}

/// Metadata v0-3 implies auto-creation; a principal that may describe a missing topic but not
/// create it does not get it created, whatever the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_auto_creation_needs_create_at_every_version() {
    use AclOperation::*;
    use AclPermission::*;
    use PatternType::*;
    use ResourceType::*;
    let (c, mut conn) = acl_node(|cfg| {
        cfg.authorizer_enabled = true;
        cfg.allow_everyone_if_no_acl_found = true;
        cfg.auto_create_topics_enable = true;
    })
    .await;
    // The cluster resource gets an ACL (anonymous may alter ACLs, not create topics), so
    // allow.everyone.if.no.acl.found no longer grants Create on it.
    let codes = create_acls(
        &mut conn,
        vec![
            acl(Topic, "mine-", Prefixed, ME, Read, Allow),
            acl(Cluster, "kafka-cluster", Literal, ME, Alter, Allow),
        ],
    )
    .await;
    assert_eq!(codes, vec![0, 0]);
    for v in [3i16, 9] {
        let topic = format!("mine-{v}");
        let req = MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(name(&topic))),
        ]));
        let resp: MetadataResponse = conn.call(&req, v).await.unwrap();
        assert_eq!(
            resp.topics[0].error_code,
            ErrorCode::UnknownTopicOrPartition as i16,
            "v{v}: {resp:?}"
        );
        assert!(
            !c.broker(0).state().topics.contains_key(&topic),
            "v{v} auto-created {topic}"
        );
    }
    // With Create on the prefix, the same request creates it.
    let codes = create_acls(
        &mut conn,
        vec![acl(Topic, "mine-", Prefixed, ME, Create, Allow)],
    )
    .await;
    assert_eq!(codes, vec![0]);
    let req = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default().with_name(Some(name("mine-3")))
    ]));
    let _: MetadataResponse = conn.call(&req, 3).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c.broker(0).state().topics.contains_key("mine-3") {
        assert!(
            std::time::Instant::now() < deadline,
            "not created with Create allowed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}
