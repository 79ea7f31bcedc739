//! End-to-end: the real verbs against the in-process fake broker.

use std::collections::HashMap;

use super::client::Client;
use super::fake_broker::{Advertised, FakeBroker};
use super::records::partition_for_key;
use super::*;

fn connect_args(b: &FakeBroker) -> ConnectArgs {
    ConnectArgs {
        bootstrap_server: b.addr.clone(),
    }
}

fn produce_args(b: &FakeBroker, topic: &str) -> ProduceArgs {
    ProduceArgs {
        topic: topic.to_string(),
        key_separator: None,
        acks: -1,
        partition: None,
        compression: CompressionArg::None,
        batch_size: 1000,
        max_in_flight: 5,
        connect: connect_args(b),
    }
}

fn consume_args(b: &FakeBroker, topic: &str) -> ConsumeArgs {
    ConsumeArgs {
        topic: topic.to_string(),
        from_beginning: true,
        partition: None,
        offset: None,
        max_messages: None,
        print_key: false,
        print_offset: false,
        timeout_ms: Some(5_000),
        connect: connect_args(b),
    }
}

async fn consume_lines(b: &FakeBroker, args: &ConsumeArgs) -> Vec<String> {
    let mut client = Client::connect(&b.addr).await.unwrap();
    let mut out = Vec::new();
    consume::consume(&mut client, args, &mut out, std::future::pending())
        .await
        .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

async fn produce_text(b: &FakeBroker, args: &ProduceArgs, text: String) -> u64 {
    let mut client = Client::connect(&b.addr).await.unwrap();
    produce::produce(&mut client, args, std::io::Cursor::new(text.into_bytes()))
        .await
        .unwrap()
}

async fn produce_then_consume(versions: Advertised) {
    let b = FakeBroker::start(versions).await.unwrap();
    b.create_topic("events", 3);

    // Unkeyed lines, several batches, gzip.
    let n = 2_500;
    let text: String = (0..n).map(|i| format!("line-{i}\n")).collect();
    let mut pa = produce_args(&b, "events");
    pa.batch_size = 300;
    pa.compression = CompressionArg::Gzip;
    assert_eq!(produce_text(&b, &pa, text).await, n);

    let mut ca = consume_args(&b, "events");
    ca.max_messages = Some(n);
    let got = consume_lines(&b, &ca).await;
    assert_eq!(got.len() as u64, n);
    let mut sorted = got.clone();
    sorted.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("line-{i}")).collect();
    want.sort();
    assert_eq!(sorted, want);
    // Round-robin per batch spread the data over all partitions.
    for p in 0..3 {
        assert!(!b.values("events", p).is_empty(), "partition {p} empty");
    }

    // Keyed lines land where the Java partitioner puts them.
    let mut pa = produce_args(&b, "events");
    pa.key_separator = Some(":".into());
    let text: String = (0..200).map(|i| format!("user{i}:v{i}\n")).collect();
    assert_eq!(produce_text(&b, &pa, text).await, 200);
    let mut placed = HashMap::new();
    for p in 0..3 {
        for (k, v) in b.values("events", p) {
            if let Some(k) = k {
                placed.insert(k, (p as i32, v));
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
    let mut pa = produce_args(&b, "events");
    pa.partition = Some(1);
    pa.key_separator = Some("=".into());
    pa.acks = 1;
    let before = b.values("events", 1).len() as i64;
    produce_text(&b, &pa, "a=1\nb=2\n".into()).await;
    let mut ca = consume_args(&b, "events");
    ca.from_beginning = false;
    ca.partition = Some(1);
    ca.offset = Some(StartOffset::At(before));
    ca.print_key = true;
    ca.print_offset = true;
    ca.max_messages = Some(2);
    let got = consume_lines(&b, &ca).await;
    assert_eq!(
        got,
        vec![
            format!("Offset:{before}\ta\t1"),
            format!("Offset:{}\tb\t2", before + 1)
        ]
    );

    // Default start is the log end: nothing old is printed, and
    // --timeout-ms ends the wait.
    let mut ca = consume_args(&b, "events");
    ca.from_beginning = false;
    ca.timeout_ms = Some(300);
    assert!(consume_lines(&b, &ca).await.is_empty());

    // acks=0: no responses; records still arrive.
    let mut pa = produce_args(&b, "events");
    pa.acks = 0;
    pa.partition = Some(2);
    let before = b.values("events", 2).len();
    assert_eq!(produce_text(&b, &pa, "x\ny\n".into()).await, 2);
    // Nothing acknowledges acks=0 writes; poll until the broker has them.
    for _ in 0..50 {
        if b.values("events", 2).len() == before + 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(b.values("events", 2).len(), before + 2);
}

#[tokio::test]
async fn produce_consume_modern_broker() {
    produce_then_consume(Advertised::modern()).await;
}

#[tokio::test]
async fn produce_consume_old_broker() {
    produce_then_consume(Advertised::old()).await;
}

async fn topic_admin(versions: Advertised) {
    let b = FakeBroker::start(versions).await.unwrap();
    let mut c = Client::connect(&b.addr).await.unwrap();
    let create = TopicsCreateArgs {
        name: "orders".into(),
        partitions: Some(2),
        replication_factor: Some(1),
        configs: vec![("retention.ms".into(), "1000".into())],
        connect: connect_args(&b),
    };
    topics::create(&mut c, &create).await.unwrap();
    let err = topics::create(&mut c, &create).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'orders' already exists (TOPIC_ALREADY_EXISTS)"
    );
    b.create_topic("alpha", 1);
    assert_eq!(topics::list(&mut c).await.unwrap(), vec!["alpha", "orders"]);

    let text = topics::describe(&mut c, "orders").await.unwrap();
    assert_eq!(
        text,
        "Topic: orders  PartitionCount: 2  ReplicationFactor: 1  Configs: retention.ms=1000\n\
         \x20 Partition: 0  Leader: 1  Replicas: 1  Isr: 1\n\
         \x20 Partition: 1  Leader: 1  Replicas: 1  Isr: 1\n"
    );
    let err = topics::describe(&mut c, "nope").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'nope' does not exist (UNKNOWN_TOPIC_OR_PARTITION)"
    );

    let alter = |n| TopicsAlterArgs {
        name: "orders".into(),
        partitions: n,
        connect: connect_args(&b),
    };
    topics::alter(&mut c, &alter(4)).await.unwrap();
    assert_eq!(c.topic("orders").await.unwrap().partition_count(), 4);
    let err = topics::alter(&mut c, &alter(3)).await.unwrap_err();
    assert!(err.to_string().ends_with("(INVALID_PARTITIONS)"), "{err}");

    topics::delete(&mut c, "orders").await.unwrap();
    assert_eq!(topics::list(&mut c).await.unwrap(), vec!["alpha"]);
    let err = topics::delete(&mut c, "orders").await.unwrap_err();
    assert!(
        err.to_string().contains("UNKNOWN_TOPIC_OR_PARTITION"),
        "{err}"
    );

    // Producing to a missing topic fails clearly.
    let mut client = Client::connect(&b.addr).await.unwrap();
    let err = produce::produce(
        &mut client,
        &produce_args(&b, "orders"),
        std::io::Cursor::new(b"x\n".to_vec()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'orders' does not exist (UNKNOWN_TOPIC_OR_PARTITION)"
    );
}

#[tokio::test]
async fn topic_admin_modern_broker() {
    topic_admin(Advertised::modern()).await;
}

#[tokio::test]
async fn topic_admin_old_broker() {
    topic_admin(Advertised::old()).await;
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

/// 100k lines through produce and back; checks pipelining keeps it quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_lines() {
    let b = FakeBroker::start(Advertised::modern()).await.unwrap();
    b.create_topic("bulk", 4);
    let n = 100_000u64;
    let text: String = (0..n).map(|i| format!("{i}\n")).collect();
    let started = std::time::Instant::now();
    assert_eq!(produce_text(&b, &produce_args(&b, "bulk"), text).await, n);
    let took = started.elapsed();
    eprintln!("produced {n} lines in {took:?}");
    let total: usize = (0..4).map(|p| b.values("bulk", p).len()).sum();
    assert_eq!(total as u64, n);
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
}

#[tokio::test]
async fn retries_on_stale_leader_then_gives_up() {
    let b = FakeBroker::start(Advertised::modern()).await.unwrap();
    b.create_topic("r", 1);
    // Two NOT_LEADER answers: refreshed and retried, then accepted.
    b.fail_produce(6, 2);
    assert_eq!(
        produce_text(&b, &produce_args(&b, "r"), "a\nb\n".into()).await,
        2
    );
    assert_eq!(b.values("r", 0).len(), 2);
    b.fail_fetch(5, 2);
    let mut ca = consume_args(&b, "r");
    ca.max_messages = Some(2);
    assert_eq!(consume_lines(&b, &ca).await, vec!["a", "b"]);

    // A leader that never comes back: bounded retries, then a clear error.
    b.fail_produce(6, 100);
    let mut client = Client::connect(&b.addr).await.unwrap();
    let err = produce::produce(
        &mut client,
        &produce_args(&b, "r"),
        std::io::Cursor::new(b"c\n".to_vec()),
    )
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("giving up on topic 'r' partition 0"), "{msg}");
    assert!(msg.contains("NOT_LEADER_OR_FOLLOWER"), "{msg}");

    b.fail_produce(6, 0);
    b.fail_fetch(6, 100);
    let mut client = Client::connect(&b.addr).await.unwrap();
    let mut out = Vec::new();
    let err = consume::consume(&mut client, &ca, &mut out, std::future::pending())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("NOT_LEADER_OR_FOLLOWER"), "{msg}");

    // Non-retriable errors fail at once.
    b.fail_fetch(0, 0);
    b.fail_produce(10, 1);
    let mut client = Client::connect(&b.addr).await.unwrap();
    let err = produce::produce(
        &mut client,
        &produce_args(&b, "r"),
        std::io::Cursor::new(b"d\n".to_vec()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "topic 'r' partition 0: message is larger than the broker accepts (MESSAGE_TOO_LARGE)"
    );
}

#[tokio::test]
async fn offset_out_of_range_resets_to_log_end() {
    let b = FakeBroker::start(Advertised::modern()).await.unwrap();
    b.create_topic("o", 1);
    produce_text(&b, &produce_args(&b, "o"), "a\nb\n".into()).await;
    let mut ca = consume_args(&b, "o");
    ca.from_beginning = false;
    ca.partition = Some(0);
    ca.offset = Some(StartOffset::At(1000));
    ca.timeout_ms = Some(300);
    assert!(consume_lines(&b, &ca).await.is_empty());
    ca.offset = Some(StartOffset::Earliest);
    ca.max_messages = Some(2);
    assert_eq!(consume_lines(&b, &ca).await, vec!["a", "b"]);
}
