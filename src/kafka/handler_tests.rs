//! One test (at least) per Kafka API handler, each against a real in-process node
//! (`crate::testkit`) over TCP, with the requests a client sends and the error codes Kafka
//! answers. The interop suite drives the same handlers through third-party clients.

use std::time::Duration;

use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;

use crate::cli::conn::BrokerConn;
use crate::cli::records::{decode_fetched, encode_batch, Message};
use crate::controller::PartitionId;
use crate::errors::ErrorCode;
use crate::testkit::TestCluster;

async fn node() -> (TestCluster, BrokerConn) {
    let c = TestCluster::single().await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    let conn = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    (c, conn)
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

async fn create_topic(conn: &mut BrokerConn, topic: &str, partitions: i32) -> CreateTopicsResponse {
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(1)]);
    let v = conn.version_for(ApiKey::CreateTopics).unwrap();
    conn.call(&req, v).await.unwrap()
}

fn batch(values: &[&str]) -> bytes::Bytes {
    let msgs: Vec<Message> = values
        .iter()
        .map(|v| Message {
            key: None,
            value: bytes::Bytes::copy_from_slice(v.as_bytes()),
        })
        .collect();
    encode_batch(&msgs, Compression::None, 1_000).unwrap()
}

async fn produce(
    conn: &mut BrokerConn,
    topic: &str,
    partition: i32,
    records: bytes::Bytes,
) -> (i16, i64) {
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(records))])]);
    let v = conn.version_for_max(ApiKey::Produce, 9).unwrap();
    let resp: ProduceResponse = conn.call(&req, v).await.unwrap();
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_versions_advertises_exactly_what_is_dispatched() {
    let (c, conn) = node().await;
    // The client asked at a version above ours and fell back, as Kafka clients do.
    for (key, min, max) in super::handlers::SUPPORTED {
        let v = conn.version_for(*key).unwrap();
        assert!(v >= *min && v <= *max, "{key:?} negotiated v{v}");
    }
    // Nothing unlisted is advertised.
    assert!(!conn.supports(ApiKey::EndTxn));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topics_creates_once_and_refuses_bad_configs() {
    let (c, mut conn) = node().await;
    let r = create_topic(&mut conn, "t", 2).await;
    assert_eq!(r.topics[0].error_code, 0);
    let r = create_topic(&mut conn, "t", 2).await;
    assert_eq!(r.topics[0].error_code, ErrorCode::TopicAlreadyExists.code());
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(name("u"))
            .with_num_partitions(1)
            .with_replication_factor(1)
            .with_configs(vec![CreatableTopicConfig::default()
                .with_name(StrBytes::from_static_str("retention.ms"))
                .with_value(Some(StrBytes::from_static_str("soon")))])]);
    let v = conn.version_for(ApiKey::CreateTopics).unwrap();
    let r: CreateTopicsResponse = conn.call(&req, v).await.unwrap();
    assert_eq!(r.topics[0].error_code, ErrorCode::InvalidConfig.code());
    let r = create_topic(&mut conn, "bad/name", 1).await;
    assert_eq!(
        r.topics[0].error_code,
        ErrorCode::InvalidTopicException.code()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_lists_topics_with_leaders_and_unknown_topics_as_errors() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "m", 3).await;
    let req = MetadataRequest::default()
        .with_allow_auto_topic_creation(false)
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(name("m"))),
            MetadataRequestTopic::default().with_name(Some(name("missing"))),
        ]));
    let v = conn.version_for(ApiKey::Metadata).unwrap();
    let r: MetadataResponse = conn.call(&req, v).await.unwrap();
    assert_eq!(r.brokers.len(), 1);
    let m = r.topics.iter().find(|t| t.name == Some(name("m"))).unwrap();
    assert_eq!(m.error_code, 0);
    assert_eq!(m.partitions.len(), 3);
    assert!(m.partitions.iter().all(|p| p.leader_id.0 == 1));
    let missing = r
        .topics
        .iter()
        .find(|t| t.name == Some(name("missing")))
        .unwrap();
    assert_eq!(
        missing.error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_fetch_and_list_offsets_agree_on_offsets() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "p", 1).await;
    assert_eq!(produce(&mut conn, "p", 0, batch(&["a", "b"])).await, (0, 0));
    assert_eq!(produce(&mut conn, "p", 0, batch(&["c"])).await, (0, 2));
    // A partition that does not exist, and a batch whose CRC does not match.
    let (code, _) = produce(&mut conn, "p", 7, batch(&["x"])).await;
    assert_eq!(code, ErrorCode::UnknownTopicOrPartition.code());
    let mut bad = bytes::BytesMut::from(&batch(&["x"])[..]);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let (code, _) = produce(&mut conn, "p", 0, bad.freeze()).await;
    assert_eq!(code, ErrorCode::CorruptMessage.code());

    let fetch = |offset: i64| {
        FetchRequest::default()
            .with_max_wait_ms(100)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(name("p"))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(1 << 20)])])
    };
    let v = conn.version_for_max(ApiKey::Fetch, 12).unwrap();
    let r: FetchResponse = conn.call(&fetch(1), v).await.unwrap();
    let p = &r.responses[0].partitions[0];
    assert_eq!((p.error_code, p.high_watermark), (0, 3));
    let (recs, next) = decode_fetched(p.records.clone().unwrap_or_default(), 1).unwrap();
    let got: Vec<_> = recs.iter().map(|r| r.value.clone().unwrap()).collect();
    assert_eq!(got, vec!["b", "c"]);
    assert_eq!(next, 3);
    let r: FetchResponse = conn.call(&fetch(99), v).await.unwrap();
    assert_eq!(
        r.responses[0].partitions[0].error_code,
        ErrorCode::OffsetOutOfRange.code()
    );

    let list = |ts: i64| {
        ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(name("p"))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(0)
                    .with_timestamp(ts)])])
    };
    let v = conn.version_for(ApiKey::ListOffsets).unwrap();
    let mut offsets = Vec::new();
    for ts in [-2, -1, 1_000] {
        let r: ListOffsetsResponse = conn.call(&list(ts), v).await.unwrap();
        offsets.push(r.topics[0].partitions[0].offset);
    }
    // Earliest, latest, and the first record at or after timestamp 1,000.
    assert_eq!(offsets, vec![0, 3, 0]);
    c.shutdown().await;
}

/// The replica registry is keyed by topic name, and after a delete and re-create it holds the
/// old topic's group until the reconcile pass closes it. Here the registry is put in that state
/// by hand (no metadata changes, so no reconcile pass undoes it): "new" maps to the group of
/// "old". Produce must not be acknowledged into the old topic's log, and Fetch and ListOffsets
/// must not read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_left_under_a_topic_name_serves_nothing_for_the_new_topic() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "old", 1).await;
    create_topic(&mut conn, "new", 1).await;
    assert_eq!(produce(&mut conn, "old", 0, batch(&["o"])).await, (0, 0));
    let broker = c.broker(0);
    let key = |t: &str| (t.to_string(), PartitionId::ZERO);
    let new_group = broker.partitions.get("new", PartitionId::ZERO).unwrap();
    let old_group = broker.partitions.get("old", PartitionId::ZERO).unwrap();
    broker.partitions.insert(key("new"), old_group.clone());

    assert!(broker.partition("new", PartitionId::ZERO).is_none());
    let (code, _) = produce(&mut conn, "new", 0, batch(&["lost?"])).await;
    assert_eq!(code, ErrorCode::NotLeaderOrFollower.code());
    assert_eq!(old_group.log_end_offset(), 1, "appended to the old topic");
    let fetch = FetchRequest::default()
        .with_max_wait_ms(0)
        .with_max_bytes(1 << 20)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name("new"))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_partition_max_bytes(1 << 20)])]);
    let v = conn.version_for_max(ApiKey::Fetch, 12).unwrap();
    let r: FetchResponse = conn.call(&fetch, v).await.unwrap();
    assert_eq!(
        r.responses[0].partitions[0].error_code,
        ErrorCode::NotLeaderOrFollower.code()
    );
    let list = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(name("new"))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_timestamp(-1)])]);
    let v = conn.version_for(ApiKey::ListOffsets).unwrap();
    let r: ListOffsetsResponse = conn.call(&list, v).await.unwrap();
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        ErrorCode::NotLeaderOrFollower.code()
    );

    broker.partitions.insert(key("new"), new_group);
    assert_eq!(produce(&mut conn, "new", 0, batch(&["n"])).await, (0, 0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_for_leader_epoch_answers_the_log_end_for_the_current_epoch() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "e", 1).await;
    produce(&mut conn, "e", 0, batch(&["a", "b", "c"])).await;
    let epoch = {
        let b = c.broker(0);
        let st = b.state();
        b.partition_leader_in(&st, "e", PartitionId::ZERO)
            .unwrap()
            .1
    };
    let req = |leader_epoch: i32| {
        OffsetForLeaderEpochRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![OffsetForLeaderTopic::default()
                .with_topic(name("e"))
                .with_partitions(vec![OffsetForLeaderPartition::default()
                    .with_partition(0)
                    .with_current_leader_epoch(epoch)
                    .with_leader_epoch(leader_epoch)])])
    };
    let v = conn.version_for(ApiKey::OffsetForLeaderEpoch).unwrap();
    let r: OffsetForLeaderEpochResponse = conn.call(&req(epoch), v).await.unwrap();
    let p = &r.topics[0].partitions[0];
    assert_eq!((p.error_code, p.leader_epoch, p.end_offset), (0, epoch, 3));
    // A client that believes in a newer epoch than the leader's is told it is ahead.
    let future = OffsetForLeaderEpochRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![OffsetForLeaderTopic::default()
            .with_topic(name("e"))
            .with_partitions(vec![OffsetForLeaderPartition::default()
                .with_partition(0)
                .with_current_leader_epoch(epoch + 5)
                .with_leader_epoch(epoch)])]);
    let r: OffsetForLeaderEpochResponse = conn.call(&future, v).await.unwrap();
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        ErrorCode::UnknownLeaderEpoch.code()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_partitions_grows_and_delete_topics_removes() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "g", 1).await;
    let grow = |count: i32| {
        CreatePartitionsRequest::default()
            .with_timeout_ms(10_000)
            .with_topics(vec![CreatePartitionsTopic::default()
                .with_name(name("g"))
                .with_count(count)])
    };
    let v = conn.version_for(ApiKey::CreatePartitions).unwrap();
    let r: CreatePartitionsResponse = conn.call(&grow(3), v).await.unwrap();
    assert_eq!(r.results[0].error_code, 0);
    let r: CreatePartitionsResponse = conn.call(&grow(2), v).await.unwrap();
    assert_eq!(r.results[0].error_code, ErrorCode::InvalidPartitions.code());
    assert!(
        c.broker(0)
            .wait_for_partitions("g", Duration::from_secs(10))
            .await
    );

    let delete = |t: &str| {
        DeleteTopicsRequest::default()
            .with_timeout_ms(10_000)
            .with_topic_names(vec![name(t)])
            .with_topics(vec![DeleteTopicState::default().with_name(Some(name(t)))])
    };
    let v = conn.version_for(ApiKey::DeleteTopics).unwrap();
    let r: DeleteTopicsResponse = conn.call(&delete("g"), v).await.unwrap();
    assert_eq!(r.responses[0].error_code, 0);
    assert!(!c.broker(0).state().topics.contains_key("g"));
    let r: DeleteTopicsResponse = conn.call(&delete("g"), v).await.unwrap();
    assert_eq!(
        r.responses[0].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_configs_and_describe_cluster_show_this_node() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "d", 1).await;
    let req = DescribeConfigsRequest::default().with_resources(vec![
        DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_static_str("d"))
            .with_configuration_keys(None),
        DescribeConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(StrBytes::from_static_str("1"))
            .with_configuration_keys(None),
    ]);
    let v = conn.version_for(ApiKey::DescribeConfigs).unwrap();
    let r: DescribeConfigsResponse = conn.call(&req, v).await.unwrap();
    let topic = &r.results[0];
    assert_eq!(topic.error_code, 0);
    let retention = topic
        .configs
        .iter()
        .find(|e| e.name.as_str() == "retention.ms")
        .and_then(|e| e.value.clone());
    assert_eq!(retention.as_deref(), Some("604800000"));
    assert_eq!(r.results[1].error_code, 0);
    assert!(r.results[1]
        .configs
        .iter()
        .any(|e| e.name.as_str() == "node.id"));

    let v = conn.version_for(ApiKey::DescribeCluster).unwrap();
    let r: DescribeClusterResponse = conn
        .call(&DescribeClusterRequest::default(), v)
        .await
        .unwrap();
    assert_eq!(r.controller_id.0, 1);
    assert_eq!(r.brokers.len(), 1);
    assert_eq!(
        Some(r.cluster_id.to_string()),
        c.broker(0).state().cluster_id.clone()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassignments_are_listed_and_impossible_targets_refused() {
    let (c, mut conn) = node().await;
    create_topic(&mut conn, "r", 1).await;
    let v = conn
        .version_for(ApiKey::ListPartitionReassignments)
        .unwrap();
    let r: ListPartitionReassignmentsResponse = conn
        .call(&ListPartitionReassignmentsRequest::default(), v)
        .await
        .unwrap();
    assert_eq!((r.error_code, r.topics.len()), (0, 0));
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![ReassignableTopic::default()
            .with_name(name("r"))
            .with_partitions(vec![ReassignablePartition::default()
                .with_partition_index(0)
                .with_replicas(Some(vec![BrokerId(9)]))])]);
    let v = conn
        .version_for(ApiKey::AlterPartitionReassignments)
        .unwrap();
    let r: AlterPartitionReassignmentsResponse = conn.call(&req, v).await.unwrap();
    let p = &r.responses[0].partitions[0];
    assert_ne!(p.error_code, 0, "{:?}", p.error_message);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_closes_only_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (c, mut conn) = node().await;
    let mut raw = tokio::net::TcpStream::connect(c.bootstrap()).await.unwrap();
    // A frame that claims a request but carries garbage for its header.
    raw.write_all(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
        .await
        .expect("the broker answers or closes, it does not hang");
    assert!(matches!(n, Ok(0) | Err(_)), "garbage was answered: {n:?}");
    // Everyone else is still served.
    assert_eq!(
        create_topic(&mut conn, "still", 1).await.topics[0].error_code,
        0
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_producer_id_hands_out_fresh_ids_and_bumps_epochs() {
    let (c, mut conn) = node().await;
    let v = conn.version_for(ApiKey::InitProducerId).unwrap();
    let init = |id: i64, epoch: i16| {
        InitProducerIdRequest::default()
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(epoch)
    };
    let a: InitProducerIdResponse = conn.call(&init(-1, -1), v).await.unwrap();
    let b: InitProducerIdResponse = conn.call(&init(-1, -1), v).await.unwrap();
    assert_eq!((a.error_code, a.producer_epoch), (0, 0));
    assert!(a.producer_id.0 >= 0 && b.producer_id.0 > a.producer_id.0);
    // KIP-360: the same producer re-initialising gets its next epoch.
    let again: InitProducerIdResponse = conn.call(&init(a.producer_id.0, 0), v).await.unwrap();
    assert_eq!(
        (again.producer_id, again.producer_epoch),
        (a.producer_id, 1)
    );
    // Transactions are not built: a transactional id is refused, clearly and at once.
    let txn =
        init(-1, -1).with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("t"))));
    let r: InitProducerIdResponse = conn.call(&txn, v).await.unwrap();
    assert_eq!(r.error_code, ErrorCode::InvalidRequest.code());
    // Ids come from the replicated counter: a restarted node never hands one out again.
    let mut c = c;
    c.kill(0).await;
    c.restart(0).await.unwrap();
    assert!(c.wait_ready(Duration::from_secs(30)).await);
    let mut conn = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let after: InitProducerIdResponse = conn.call(&init(-1, -1), v).await.unwrap();
    assert!(after.producer_id.0 > b.producer_id.0, "{after:?}");
    c.shutdown().await;
}

/// One batch of `n` records from producer `pid` at `epoch`, starting at sequence `seq`.
fn idempotent_batch(pid: i64, epoch: i16, seq: i32, n: i32) -> bytes::Bytes {
    use kafka_protocol::records::{Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i64::from(i),
            sequence: seq + i,
            timestamp: 1_000,
            key: None,
            value: Some(bytes::Bytes::from(format!("{pid}-{epoch}-{}", seq + i))),
            headers: Default::default(),
        })
        .collect();
    let mut buf = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

async fn producer_id(conn: &mut BrokerConn) -> i64 {
    let v = conn.version_for(ApiKey::InitProducerId).unwrap();
    let req = InitProducerIdRequest::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let r: InitProducerIdResponse = conn.call(&req, v).await.unwrap();
    assert_eq!(r.error_code, 0);
    r.producer_id.0
}

fn high_watermark(c: &TestCluster, node: usize, topic: &str) -> i64 {
    c.broker(node)
        .partition(topic, PartitionId::ZERO)
        .unwrap()
        .high_watermark()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_resend_returns_the_original_offset_and_appends_nothing() {
    let (mut c, mut conn) = node().await;
    create_topic(&mut conn, "i", 1).await;
    let pid = producer_id(&mut conn).await;
    assert_eq!(
        produce(&mut conn, "i", 0, idempotent_batch(pid, 0, 0, 3)).await,
        (0, 0)
    );
    assert_eq!(
        produce(&mut conn, "i", 0, idempotent_batch(pid, 0, 3, 2)).await,
        (0, 3)
    );
    // The same batch again: its original offset, and the log does not grow.
    assert_eq!(
        produce(&mut conn, "i", 0, idempotent_batch(pid, 0, 0, 3)).await,
        (0, 0)
    );
    assert_eq!(high_watermark(&c, 0, "i"), 5);
    // A gap, a stale epoch, an unknown producer.
    let (code, _) = produce(&mut conn, "i", 0, idempotent_batch(pid, 0, 9, 1)).await;
    assert_eq!(code, ErrorCode::OutOfOrderSequenceNumber.code());
    assert_eq!(
        produce(&mut conn, "i", 0, idempotent_batch(pid, 1, 0, 1)).await,
        (0, 5)
    );
    let (code, _) = produce(&mut conn, "i", 0, idempotent_batch(pid, 0, 5, 1)).await;
    assert_eq!(code, ErrorCode::InvalidProducerEpoch.code());
    let (code, _) = produce(
        &mut conn,
        "i",
        0,
        idempotent_batch(pid + 1_000_000, 0, 4, 1),
    )
    .await;
    assert_eq!(code, ErrorCode::UnknownProducerId.code());
    assert_eq!(high_watermark(&c, 0, "i"), 6);
    // DescribeProducers shows it, as kafka-transactions.sh describe-producers does.
    use kafka_protocol::messages::describe_producers_request::TopicRequest;
    let req = DescribeProducersRequest::default().with_topics(vec![TopicRequest::default()
        .with_name(name("i"))
        .with_partition_indexes(vec![0, 9])]);
    let v = conn.version_for(ApiKey::DescribeProducers).unwrap();
    let r: DescribeProducersResponse = conn.call(&req, v).await.unwrap();
    let parts = &r.topics[0].partitions;
    let active = &parts[0].active_producers;
    assert_eq!(active.len(), 1);
    assert_eq!(
        (
            active[0].producer_id.0,
            active[0].producer_epoch,
            active[0].last_sequence
        ),
        (pid, 1, 0)
    );
    assert_eq!(
        parts[1].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );

    // After a restart the producer state comes back from the log and the snapshot.
    c.kill(0).await;
    c.restart(0).await.unwrap();
    assert!(c.wait_ready(Duration::from_secs(30)).await);
    assert!(
        c.broker(0)
            .wait_for_partitions("i", Duration::from_secs(30))
            .await
    );
    let mut conn = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    assert_eq!(
        produce(&mut conn, "i", 0, idempotent_batch(pid, 1, 0, 1)).await,
        (0, 5)
    );
    assert_eq!(
        produce(&mut conn, "i", 0, idempotent_batch(pid, 1, 1, 1)).await,
        (0, 6)
    );
    assert_eq!(high_watermark(&c, 0, "i"), 7);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_knows_the_producers_of_the_old_one() {
    let c = TestCluster::start(3).await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(60)).await,
        "cluster not ready"
    );
    let mut conn = BrokerConn::connect(&c.kafka_addr(0)).await.unwrap();
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(name("l"))
            .with_num_partitions(1)
            .with_replication_factor(3)]);
    let v = conn.version_for(ApiKey::CreateTopics).unwrap();
    let r: CreateTopicsResponse = conn.call(&req, v).await.unwrap();
    assert_eq!(r.topics[0].error_code, 0);
    let pid = producer_id(&mut conn).await;
    let leader = c.leader_of(0, "l", PartitionId::ZERO).expect("a leader");
    let mut lc = BrokerConn::connect(&c.kafka_addr(leader)).await.unwrap();
    assert_eq!(
        produce(&mut lc, "l", 0, idempotent_batch(pid, 0, 0, 4)).await,
        (0, 0)
    );
    // Leadership moves; the resend reaches the new leader.
    let (_, target) = c.move_leader("l", PartitionId::ZERO).await.unwrap();
    let new_addr = c.kafka_addr(target);
    let mut nc = BrokerConn::connect(&new_addr).await.unwrap();
    let mut answer = (-1, -1);
    for _ in 0..100 {
        answer = produce(&mut nc, "l", 0, idempotent_batch(pid, 0, 0, 4)).await;
        if answer.0 != ErrorCode::NotLeaderOrFollower.code() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer, (0, 0));
    assert_eq!(
        produce(&mut nc, "l", 0, idempotent_batch(pid, 0, 4, 1)).await,
        (0, 4)
    );
    let hw = c
        .broker(target)
        .partition("l", PartitionId::ZERO)
        .unwrap()
        .high_watermark();
    assert_eq!(hw, 5);
    c.shutdown().await;
}

/// A hostile or careless client cannot create without bound: topics per CreateTopics request
/// and partitions per cluster are capped, with POLICY_VIOLATION and a message naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topics_and_partitions_are_capped_per_request_and_per_cluster() {
    let c = TestCluster::start_with(1, |cfg| {
        cfg.max_partitions = 5;
        cfg.create_topics_max_per_request = 2;
    })
    .await
    .unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    let mut conn = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let topic = |n: &str, p: i32| {
        CreatableTopic::default()
            .with_name(name(n))
            .with_num_partitions(p)
            .with_replication_factor(1)
    };
    let v = conn.version_for(ApiKey::CreateTopics).unwrap();
    let resp: CreateTopicsResponse = conn
        .call(
            &CreateTopicsRequest::default()
                .with_timeout_ms(10_000)
                .with_topics(vec![topic("a", 1), topic("b", 1), topic("c", 1)]),
            v,
        )
        .await
        .unwrap();
    let codes: Vec<i16> = resp.topics.iter().map(|t| t.error_code).collect();
    let policy = ErrorCode::PolicyViolation.code();
    assert_eq!(codes, vec![0, 0, policy], "{resp:?}");
    assert!(resp.topics[2]
        .error_message
        .as_ref()
        .is_some_and(|m| m.contains("sluice.create.topics.max.per.request")));
    // Two partitions exist; four more would make six, past the cap of five.
    let resp = create_topic(&mut conn, "d", 4).await;
    assert_eq!(resp.topics[0].error_code, policy, "{resp:?}");
    assert_eq!(
        create_topic(&mut conn, "d", 3).await.topics[0].error_code,
        0
    );
    let v = conn.version_for(ApiKey::CreatePartitions).unwrap();
    let grown: CreatePartitionsResponse = conn
        .call(
            &CreatePartitionsRequest::default()
                .with_timeout_ms(10_000)
                .with_topics(vec![CreatePartitionsTopic::default()
                    .with_name(name("a"))
                    .with_count(2)]),
            v,
        )
        .await
        .unwrap();
    assert_eq!(grown.results[0].error_code, policy, "{grown:?}");
    assert!(c
        .broker(0)
        .state()
        .topics
        .get("a")
        .is_some_and(|t| t.partitions.len() == 1));
    c.shutdown().await;
}

/// `max.connections.per.ip`: a third connection from one address is closed at accept, the first
/// two keep working, and a slot comes back when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_capped() {
    use tokio::io::AsyncReadExt;
    let c = TestCluster::start_with(1, |cfg| cfg.max_connections_per_ip = 2)
        .await
        .unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let b = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(c.bootstrap()).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("the third connection is closed, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "third connection got {n:?}");
    assert_eq!(create_topic(&mut a, "ip", 1).await.topics[0].error_code, 0);
    drop(b);
    // The freed slot is usable again (the close reaches the broker asynchronously).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match BrokerConn::connect(&c.bootstrap()).await {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no slot came back: {e:#}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// `queued.max.request.bytes`: while one connection's request holds the whole budget (a fetch
/// waiting for data), another connection's request is not read, let alone answered; it is once
/// the first is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_bytes_bound_what_all_connections_have_in_flight() {
    let c = TestCluster::start_with(1, |cfg| cfg.queued_max_request_bytes = 64)
        .await
        .unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let mut b = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    assert_eq!(
        create_topic(&mut a, "quiet", 1).await.topics[0].error_code,
        0
    );
    // A fetch of an empty partition waits up to 4 s; its frame is over 64 bytes, so it holds
    // the whole budget until answered.
    let fetch = FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(4_000)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name("quiet"))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_partition_max_bytes(1 << 20)])]);
    let fv = a.version_for_max(ApiKey::Fetch, 12).unwrap();
    a.send(&fetch, fv, true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mv = b.version_for_max(ApiKey::Metadata, 9).unwrap();
    b.send(&MetadataRequest::default().with_topics(None), mv, true)
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let m: MetadataResponse = b.recv::<MetadataRequest>(Duration::from_secs(10)).await?;
        anyhow::Ok(m)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "answered while the budget was spent"
    );
    let f: FetchResponse = a
        .recv::<FetchRequest>(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(f.responses[0].partitions[0].error_code, 0);
    let m = waiting.await.unwrap().unwrap();
    assert!(m
        .topics
        .iter()
        .any(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == "quiet")));
    c.shutdown().await;
}
