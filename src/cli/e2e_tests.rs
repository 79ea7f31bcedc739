//! End-to-end: the real verbs against real in-process nodes (`crate::testkit`), as a modern
//! client and as an older one that speaks pre-flexible versions.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;

use super::client::Client;
use super::records::{decode_fetched, partition_for_key};
use super::*;
use crate::controller::PartitionId;
use crate::testkit::TestCluster;

/// Versions an older client speaks: pre-flexible Produce/Fetch/Metadata and friends.
const OLD: &[(ApiKey, i16)] = &[
    (ApiKey::Metadata, 8),
    (ApiKey::Produce, 8),
    (ApiKey::Fetch, 11),
    (ApiKey::ListOffsets, 5),
    (ApiKey::CreateTopics, 4),
    (ApiKey::DeleteTopics, 3),
    (ApiKey::CreatePartitions, 1),
    (ApiKey::DescribeConfigs, 2),
];
const MODERN: &[(ApiKey, i16)] = &[];

async fn single() -> TestCluster {
    let c = TestCluster::single().await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "node not ready"
    );
    c
}

pub(super) fn connect_args(c: &TestCluster) -> ConnectArgs {
    ConnectArgs {
        bootstrap_server: c.bootstrap(),
        command_config: None,
    }
}

fn produce_args(c: &TestCluster, topic: &str) -> ProduceArgs {
    ProduceArgs {
        topic: topic.to_string(),
        key_separator: None,
        acks: -1,
        partition: None,
        compression: CompressionArg::None,
        batch_size: 1000,
        max_in_flight: 5,
        connect: connect_args(c),
    }
}

fn consume_args(c: &TestCluster, topic: &str) -> ConsumeArgs {
    ConsumeArgs {
        topic: topic.to_string(),
        from_beginning: true,
        partition: None,
        offset: None,
        max_messages: None,
        print_key: false,
        print_offset: false,
        timeout_ms: Some(5_000),
        group: None,
        consumer_properties: Vec::new(),
        connect: connect_args(c),
    }
}

async fn client(c: &TestCluster, caps: &[(ApiKey, i16)]) -> Client {
    let mut client = Client::connect(&c.bootstrap()).await.unwrap();
    client.cap_versions(caps);
    client
}

async fn consume_with(client: &mut Client, args: &ConsumeArgs) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    consume::consume(client, args, &mut out, std::future::pending()).await?;
    Ok(String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect())
}

async fn consume_lines(c: &TestCluster, caps: &[(ApiKey, i16)], args: &ConsumeArgs) -> Vec<String> {
    consume_with(&mut client(c, caps).await, args)
        .await
        .unwrap()
}

async fn produce_text(
    c: &TestCluster,
    caps: &[(ApiKey, i16)],
    args: &ProduceArgs,
    text: String,
) -> u64 {
    let mut client = client(c, caps).await;
    produce::produce(&mut client, args, std::io::Cursor::new(text.into_bytes()))
        .await
        .unwrap()
}

async fn create(c: &TestCluster, name: &str, partitions: i32, rf: i16, configs: &[(&str, &str)]) {
    let mut client = client(c, MODERN).await;
    let args = TopicsCreateArgs {
        name: name.into(),
        partitions: Some(partitions),
        replication_factor: Some(rf),
        configs: configs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        connect: connect_args(c),
    };
    topics::create(&mut client, &args).await.unwrap();
}

/// The committed (key, value) pairs of one partition, read from node `node`'s replica.
async fn values(c: &TestCluster, node: usize, topic: &str, p: i32) -> Vec<(Option<Bytes>, Bytes)> {
    let g = c
        .broker(node)
        .partition(topic, PartitionId::from_wire(p).unwrap())
        .expect("partition hosted");
    let hw = g.high_watermark();
    let mut next = g.log_start_offset();
    let mut out = Vec::new();
    while next < hw {
        let data = g.read(next, 1 << 20).await.unwrap();
        let (recs, after) = decode_fetched(data, next).unwrap();
        out.extend(
            recs.into_iter()
                .filter(|r| r.offset < hw)
                .map(|r| (r.key, r.value.unwrap_or_default())),
        );
        if after <= next {
            break;
        }
        next = after;
    }
    out
}

async fn produce_then_consume(caps: &[(ApiKey, i16)]) {
    let c = single().await;
    create(&c, "events", 3, 1, &[]).await;

    // Unkeyed lines, several batches, gzip.
    let n = 2_500;
    let text: String = (0..n).map(|i| format!("line-{i}\n")).collect();
    let mut pa = produce_args(&c, "events");
    pa.batch_size = 300;
    pa.compression = CompressionArg::Gzip;
    assert_eq!(produce_text(&c, caps, &pa, text).await, n);

    let mut ca = consume_args(&c, "events");
    ca.max_messages = Some(n);
    let got = consume_lines(&c, caps, &ca).await;
    assert_eq!(got.len() as u64, n);
    let mut sorted = got.clone();
    sorted.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("line-{i}")).collect();
    want.sort();
    assert_eq!(sorted, want);
    // Round-robin per batch spread the data over all partitions.
    for p in 0..3 {
        assert!(
            !values(&c, 0, "events", p).await.is_empty(),
            "partition {p} empty"
        );
    }

    // Keyed lines land where the Java partitioner puts them.
    let mut pa = produce_args(&c, "events");
    pa.key_separator = Some(":".into());
    let text: String = (0..200).map(|i| format!("user{i}:v{i}\n")).collect();
    assert_eq!(produce_text(&c, caps, &pa, text).await, 200);
    let mut placed = HashMap::new();
    for p in 0..3 {
        for (k, v) in values(&c, 0, "events", p).await {
            if let Some(k) = k {
                placed.insert(k, (p, v));
            }
        }
    }
    assert_eq!(placed.len(), 200);
    for i in 0..200 {
        let key = format!("user{i}");
        let (p, v) = &placed[key.as_bytes()];
        assert_eq!(*p, partition_for_key(key.as_bytes(), 3), "{key}");
        assert_eq!(&v[..], format!("v{i}").as_bytes());
    }

    // Explicit partition and offset with key/offset printing.
    let mut pa = produce_args(&c, "events");
    pa.partition = Some(1);
    pa.key_separator = Some("=".into());
    pa.acks = 1;
    let before = values(&c, 0, "events", 1).await.len() as i64;
    produce_text(&c, caps, &pa, "a=1\nb=2\n".into()).await;
    let mut ca = consume_args(&c, "events");
    ca.from_beginning = false;
    ca.partition = Some(1);
    ca.offset = Some(StartOffset::At(before));
    ca.print_key = true;
    ca.print_offset = true;
    ca.max_messages = Some(2);
    let got = consume_lines(&c, caps, &ca).await;
    assert_eq!(
        got,
        vec![
            format!("Offset:{before}\ta\t1"),
            format!("Offset:{}\tb\t2", before + 1)
        ]
    );

    // Default start is the log end: nothing old is printed, and
    // --timeout-ms ends the wait.
    let mut ca = consume_args(&c, "events");
    ca.from_beginning = false;
    ca.timeout_ms = Some(300);
    assert!(consume_lines(&c, caps, &ca).await.is_empty());

    // acks=0: no responses; records still arrive.
    let mut pa = produce_args(&c, "events");
    pa.acks = 0;
    pa.partition = Some(2);
    let before = values(&c, 0, "events", 2).await.len();
    assert_eq!(produce_text(&c, caps, &pa, "x\ny\n".into()).await, 2);
    // Nothing acknowledges acks=0 writes; poll (bounded) until the broker has them.
    for _ in 0..250 {
        if values(&c, 0, "events", 2).await.len() == before + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(values(&c, 0, "events", 2).await.len(), before + 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_modern_client() {
    produce_then_consume(MODERN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_old_client() {
    produce_then_consume(OLD).await;
}

async fn topic_admin(caps: &[(ApiKey, i16)]) {
    let c = single().await;
    let mut cl = client(&c, caps).await;
    let create_args = TopicsCreateArgs {
        name: "orders".into(),
        partitions: Some(2),
        replication_factor: Some(1),
        configs: vec![("retention.ms".into(), "1000".into())],
        connect: connect_args(&c),
    };
    topics::create(&mut cl, &create_args).await.unwrap();
    let err = topics::create(&mut cl, &create_args).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'orders' already exists (TOPIC_ALREADY_EXISTS)"
    );
    create(&c, "alpha", 1, 1, &[]).await;
    assert_eq!(
        topics::list(&mut cl).await.unwrap(),
        vec!["alpha", "orders"]
    );

    let text = topics::describe(&mut cl, "orders").await.unwrap();
    assert_eq!(
        text,
        "Topic: orders  PartitionCount: 2  ReplicationFactor: 1  Configs: retention.ms=1000\n\
         \x20 Partition: 0  Leader: 1  Replicas: 1  Isr: 1\n\
         \x20 Partition: 1  Leader: 1  Replicas: 1  Isr: 1\n"
    );
    let err = topics::describe(&mut cl, "nope").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'nope' does not exist (UNKNOWN_TOPIC_OR_PARTITION)"
    );

    let alter = |n| TopicsAlterArgs {
        name: "orders".into(),
        partitions: n,
        connect: connect_args(&c),
    };
    topics::alter(&mut cl, &alter(4)).await.unwrap();
    assert_eq!(cl.topic("orders").await.unwrap().partition_count(), 4);
    let err = topics::alter(&mut cl, &alter(3)).await.unwrap_err();
    assert!(err.to_string().ends_with("(INVALID_PARTITIONS)"), "{err}");

    topics::delete(&mut cl, "orders").await.unwrap();
    assert_eq!(topics::list(&mut cl).await.unwrap(), vec!["alpha"]);
    let err = topics::delete(&mut cl, "orders").await.unwrap_err();
    assert!(
        err.to_string().contains("UNKNOWN_TOPIC_OR_PARTITION"),
        "{err}"
    );

    // Producing to a missing topic fails clearly (the node auto-creates topics only for
    // clients that ask, which this producer does not).
    let mut pc = client(&c, caps).await;
    let err = produce::produce(
        &mut pc,
        &produce_args(&c, "orders"),
        std::io::Cursor::new(b"x\n".to_vec()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'orders' does not exist (UNKNOWN_TOPIC_OR_PARTITION)"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_admin_modern_client() {
    topic_admin(MODERN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_admin_old_client() {
    topic_admin(OLD).await;
}

#[tokio::test]
async fn produce_request_round_trip() {
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{Compression, RecordBatchDecoder};

    let msgs = vec![
        records::Message {
            key: Some(bytes::Bytes::from_static(b"k")),
            value: bytes::Bytes::from_static(b"hello"),
        },
        records::Message {
            key: None,
            value: bytes::Bytes::from_static(b"world"),
        },
    ];
    let data = records::encode_batch(&msgs, Compression::Snappy, 1234).unwrap();
    let mut pd = PartitionProduceData::default();
    pd.index = 2;
    pd.records = Some(data);
    let mut td = TopicProduceData::default();
    td.name = TopicName(StrBytes::from_static_str("t"));
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 30_000;
    req.topic_data = vec![td];
    for version in [3, 8, 9, 12] {
        let frame = conn::encode_request(&req, version, 77).unwrap();
        let (header, back) = conn::decode_request::<ProduceRequest>(frame).unwrap();
        assert_eq!(header.correlation_id, 77);
        assert_eq!(header.request_api_version, version);
        assert_eq!(header.client_id.as_deref(), Some("sluice-cli"));
        assert_eq!(back, req, "v{version}");
        let mut recs = back.topic_data[0].partition_data[0]
            .records
            .clone()
            .unwrap();
        let set = RecordBatchDecoder::decode(&mut recs).unwrap();
        assert_eq!(set.compression, Compression::Snappy);
        assert_eq!(set.records.len(), 2);
        assert_eq!(set.records[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(set.records[1].value.as_deref(), Some(&b"world"[..]));
        assert_eq!(set.records[1].timestamp, 1234);
    }
}

/// 100k lines through produce and back, pipelined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_lines() {
    let c = single().await;
    create(&c, "bulk", 4, 1, &[]).await;
    let n = 100_000u64;
    let text: String = (0..n).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        produce_text(&c, MODERN, &produce_args(&c, "bulk"), text).await,
        n
    );
    let mut total = 0;
    for p in 0..4 {
        total += values(&c, 0, "bulk", p).await.len();
    }
    assert_eq!(total as u64, n);
    c.shutdown().await;
}

/// Standard input as an interactive user types it: lines arrive when the test sends them.
struct Pipe(std::sync::mpsc::Receiver<Vec<u8>>, Vec<u8>);

impl std::io::Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.1.is_empty() {
            match self.0.recv() {
                Ok(chunk) => self.1 = chunk,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.1.len());
        buf[..n].copy_from_slice(&self.1[..n]);
        self.1.drain(..n);
        Ok(n)
    }
}

/// Waits (bounded) until partition 0 of `topic` holds `n` committed records on node 0.
async fn wait_for_values(c: &TestCluster, topic: &str, n: usize) {
    for _ in 0..500 {
        if values(c, 0, topic, 0).await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{topic} never reached {n} records");
}

/// On three nodes: a client whose metadata went stale after a leadership move is answered
/// NOT_LEADER_OR_FOLLOWER, refreshes and retries, for produce and for fetch; once a majority is
/// gone, both give up within their retry bound with an error that names the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_leaders_are_retried_and_a_lost_majority_is_reported() {
    let mut c = TestCluster::start(3).await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(60)).await,
        "cluster not ready"
    );
    create(&c, "r", 1, 3, &[]).await;
    // A producer and a consumer that keep their metadata across the move.
    let (lines, input) = std::sync::mpsc::channel::<Vec<u8>>();
    let pa = produce_args(&c, "r");
    let boot = c.bootstrap();
    let producer = tokio::spawn(async move {
        let mut pc = Client::connect(&boot).await?;
        produce::produce(&mut pc, &pa, Pipe(input, Vec::new())).await
    });
    lines.send(b"a\n".to_vec()).unwrap();
    wait_for_values(&c, "r", 1).await;
    let mut ca = consume_args(&c, "r");
    ca.max_messages = Some(2);
    ca.timeout_ms = Some(30_000);
    let boot = c.bootstrap();
    let consumer = tokio::spawn(async move {
        let mut cc = Client::connect(&boot).await?;
        consume_with(&mut cc, &ca).await
    });
    // Give the consumer time to read "a" and start waiting for more; no outcome depends on it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Move leadership away from where both last saw it.
    let (old, _) = c.move_leader("r", PartitionId::ZERO).await.unwrap();
    let old = c.broker(old).clone();
    lines.send(b"b\n".to_vec()).unwrap();
    drop(lines);
    assert_eq!(producer.await.unwrap().unwrap(), 2);
    assert_eq!(consumer.await.unwrap().unwrap(), vec!["a", "b"]);
    // The old leader turned the stale attempts away; the clients found the new one.
    assert!(old.metrics.requests_answered("Produce", 6) >= 1);
    assert!(old.metrics.requests_answered("Fetch", 6) >= 1);
    let mut cc = client(&c, MODERN).await;

    // Lose the majority: nodes 2 and 3 go, node 1 stays and keeps answering metadata.
    c.kill(1).await;
    c.kill(2).await;
    let started = std::time::Instant::now();
    let mut pc = client(&c, MODERN).await;
    let err = produce::produce(
        &mut pc,
        &produce_args(&c, "r"),
        std::io::Cursor::new(b"c\n".to_vec()),
    )
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    // Which error ends the retries depends on whether the controller has fenced the dead
    // leader yet (LEADER_NOT_AVAILABLE) or still names it (connection refused); either way the
    // message says which partition and why.
    assert!(
        msg.contains("giving up on topic 'r' partition 0 after 5 retries")
            && (msg.contains("(LEADER_NOT_AVAILABLE)") || msg.contains("cannot connect to broker")),
        "{msg}"
    );
    let mut ca = consume_args(&c, "r");
    ca.max_messages = Some(3);
    ca.timeout_ms = None;
    let err = consume_with(&mut cc, &ca).await.unwrap_err();
    let consume_msg = format!("{err:#}");
    assert!(
        consume_msg.contains("after 5 retries")
            && (consume_msg.contains("topic 'r' partition 0 has no leader (LEADER_NOT_AVAILABLE)")
                || consume_msg.contains("cannot connect to broker")),
        "{consume_msg}"
    );
    eprintln!("gave up after {:?}", started.elapsed());
    c.shutdown().await;
}

/// Errors that retrying cannot fix fail at once, with Kafka's name for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retriable_errors_fail_at_once() {
    let c = single().await;
    create(&c, "small", 1, 1, &[("max.message.bytes", "200")]).await;
    let mut pc = client(&c, MODERN).await;
    let line = format!("{}\n", "x".repeat(1_000));
    let err = produce::produce(
        &mut pc,
        &produce_args(&c, "small"),
        std::io::Cursor::new(line.into_bytes()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'small' partition 0: message is larger than the broker accepts: \
         record batch of 1070 bytes exceeds max.message.bytes 200 (MESSAGE_TOO_LARGE)"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_out_of_range_resets_to_log_end() {
    let c = single().await;
    create(&c, "o", 1, 1, &[]).await;
    produce_text(&c, MODERN, &produce_args(&c, "o"), "a\nb\n".into()).await;
    let mut ca = consume_args(&c, "o");
    ca.from_beginning = false;
    ca.partition = Some(0);
    ca.offset = Some(StartOffset::At(1000));
    ca.timeout_ms = Some(300);
    assert!(consume_lines(&c, MODERN, &ca).await.is_empty());
    ca.offset = Some(StartOffset::Earliest);
    ca.max_messages = Some(2);
    assert_eq!(consume_lines(&c, MODERN, &ca).await, vec!["a", "b"]);
    c.shutdown().await;
}

/// Three nodes whose Raft port is mutual TLS with `sluice certs create`'s certificates: the
/// cluster forms, replicates an RF 3 topic, and a restarted node rejoins over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_mutual_tls_between_nodes_forms_replicates_and_rejoins() {
    let certs = tempfile::tempdir().unwrap();
    super::certs::create(&super::certs::CertsCreateArgs {
        out: certs.path().to_path_buf(),
        nodes: vec![1, 2, 3],
        clients: vec![],
        hosts: vec![],
        days: 2,
        force: false,
    })
    .unwrap();
    let dir = certs.path().to_path_buf();
    let mut c = TestCluster::start_with(3, move |cfg| {
        cfg.raft_tls_cert = Some(dir.join(format!("node-{}.pem", cfg.node_id)));
        cfg.raft_tls_key = Some(dir.join(format!("node-{}.key", cfg.node_id)));
        cfg.raft_tls_ca = Some(dir.join("ca.pem"));
    })
    .await
    .unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(60)).await,
        "TLS cluster not ready"
    );
    create(&c, "sec", 1, 3, &[]).await;
    let mut pc = client(&c, MODERN).await;
    let sent = produce::produce(
        &mut pc,
        &produce_args(&c, "sec"),
        std::io::Cursor::new(b"a\nb\n".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(sent, 2);
    // A follower goes down and comes back: it catches up over a new TLS connection.
    let follower = (0..3)
        .find(|i| {
            c.broker(*i)
                .raft
                .meta()
                .leader()
                .is_some_and(|l| l != *i as u64 + 1)
        })
        .unwrap();
    c.kill(follower).await;
    let mut pc = client(&c, MODERN).await;
    produce::produce(
        &mut pc,
        &produce_args(&c, "sec"),
        std::io::Cursor::new(b"c\n".to_vec()),
    )
    .await
    .unwrap();
    c.restart(follower).await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(60)).await,
        "restarted node not ready"
    );
    // Its replica got the record it missed: replication reached it over TLS.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let end = c
            .broker(follower)
            .partitions
            .get("sec", PartitionId::ZERO)
            .map(|g| g.log_end_offset());
        if end == Some(3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restarted replica's log end is {end:?}, not 3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ca = consume_args(&c, "sec");
    ca.max_messages = Some(3);
    ca.timeout_ms = Some(30_000);
    let mut cc = client(&c, MODERN).await;
    assert_eq!(
        consume_with(&mut cc, &ca).await.unwrap(),
        vec!["a", "b", "c"]
    );
    c.shutdown().await;
}
