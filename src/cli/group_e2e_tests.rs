//! End-to-end: consumer groups through the CLI's own member client and verbs, against real
//! in-process nodes (`crate::testkit`), as a modern client and as an older one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kafka_protocol::messages::ApiKey;

use super::client::Client;
use super::e2e_tests::connect_args;
use super::errors::KafkaError;
use super::group::{ConsumerGroupClient, ConsumerGroupMember, MemberConfig};
use super::*;
use crate::config::ServerConfig;
use crate::testkit::TestCluster;

/// Versions an older client speaks: JoinGroup before MEMBER_ID_REQUIRED (v4), pre-flexible
/// group requests, OffsetFetch for one group.
const OLD: &[(ApiKey, i16)] = &[
    (ApiKey::FindCoordinator, 2),
    (ApiKey::JoinGroup, 3),
    (ApiKey::SyncGroup, 2),
    (ApiKey::Heartbeat, 2),
    (ApiKey::LeaveGroup, 2),
    (ApiKey::OffsetCommit, 5),
    (ApiKey::OffsetFetch, 5),
    (ApiKey::ListGroups, 2),
    (ApiKey::DescribeGroups, 2),
    (ApiKey::DeleteGroups, 1),
    (ApiKey::Metadata, 8),
    (ApiKey::Fetch, 11),
    (ApiKey::ListOffsets, 5),
];
const MODERN: &[(ApiKey, i16)] = &[];

/// Groups form at once in tests (Kafka's default delay of 3 s for a new group's first
/// rebalance would only slow them down).
fn quick_groups(cfg: &mut ServerConfig) {
    let known = cfg
        .apply_property("group.initial.rebalance.delay.ms", "0")
        .expect("a valid value");
    assert!(
        known,
        "the broker does not know group.initial.rebalance.delay.ms"
    );
}

async fn cluster(n: usize) -> TestCluster {
    let c = TestCluster::start_with(n, quick_groups).await.unwrap();
    assert!(
        c.wait_ready(Duration::from_secs(60)).await,
        "cluster not ready"
    );
    c
}

async fn client(c: &TestCluster, caps: &[(ApiKey, i16)]) -> Client {
    let mut client = Client::connect(&c.bootstrap()).await.unwrap();
    client.cap_versions(caps);
    client
}

async fn group_client(c: &TestCluster, caps: &[(ApiKey, i16)], group: &str) -> ConsumerGroupClient {
    ConsumerGroupClient::new(client(c, caps).await, group)
}

async fn create(c: &TestCluster, name: &str, partitions: i32) {
    let args = TopicsCreateArgs {
        name: name.into(),
        partitions: Some(partitions),
        replication_factor: Some(1),
        configs: Vec::new(),
        connect: connect_args(c),
    };
    topics::create(&mut client(c, MODERN).await, &args)
        .await
        .unwrap();
}

/// `n` lines "v0".."v{n-1}", keyed so they spread over the partitions.
async fn produce_lines(c: &TestCluster, topic: &str, from: usize, n: usize) {
    let args = ProduceArgs {
        topic: topic.to_string(),
        key_separator: Some(":".into()),
        acks: -1,
        partition: None,
        compression: CompressionArg::None,
        batch_size: 1000,
        max_in_flight: 5,
        connect: connect_args(c),
    };
    let text: String = (from..from + n).map(|i| format!("k{i}:v{i}\n")).collect();
    let sent = produce::produce(
        &mut client(c, MODERN).await,
        &args,
        std::io::Cursor::new(text.into_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(sent, n as u64);
}

fn group_consume_args(c: &TestCluster, topic: &str, group: &str) -> ConsumeArgs {
    ConsumeArgs {
        topic: topic.to_string(),
        from_beginning: false,
        partition: None,
        offset: None,
        max_messages: None,
        print_key: false,
        print_offset: false,
        timeout_ms: Some(2_000),
        group: Some(group.to_string()),
        consumer_properties: vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "300".into()),
            ("auto.commit.interval.ms".into(), "500".into()),
        ],
        connect: connect_args(c),
    }
}

async fn consume_lines(
    c: &TestCluster,
    caps: &[(ApiKey, i16)],
    args: &ConsumeArgs,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    consume::consume(
        &mut client(c, caps).await,
        args,
        &mut out,
        std::future::pending(),
    )
    .await?;
    Ok(String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect())
}

fn member_config(group: &str, topic: &str) -> MemberConfig {
    let mut cfg = MemberConfig::new(group, &[topic]);
    cfg.session_timeout = Duration::from_secs(6);
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.rebalance_timeout = Duration::from_secs(10);
    cfg.join_timeout = Duration::from_secs(30);
    cfg
}

async fn member(
    c: &TestCluster,
    caps: &[(ApiKey, i16)],
    group: &str,
    topic: &str,
) -> ConsumerGroupMember {
    ConsumerGroupMember::new(
        group_client(c, caps, group).await,
        member_config(group, topic),
    )
}

fn kafka_code(e: &anyhow::Error) -> Option<i16> {
    e.downcast_ref::<KafkaError>().map(|k| k.code)
}

/// The same partitions as `topic-p` names, for comparing assignments.
fn names(parts: &[i32], topic: &str) -> BTreeSet<String> {
    parts.iter().map(|p| format!("{topic}-{p}")).collect()
}

async fn resume_where_the_group_left_off(caps: &[(ApiKey, i16)]) {
    let c = cluster(1).await;
    create(&c, "events", 3).await;
    produce_lines(&c, "events", 0, 100).await;

    // A new group with --from-beginning starts at the log start; 40 records, then it stops
    // and commits exactly those 40.
    let mut a = group_consume_args(&c, "events", "g");
    a.from_beginning = true;
    a.max_messages = Some(40);
    let first = consume_lines(&c, caps, &a).await.unwrap();
    assert_eq!(first.len(), 40);

    // The group resumes after them (its offsets win over the default of "latest").
    let mut a = group_consume_args(&c, "events", "g");
    a.max_messages = Some(60);
    let second = consume_lines(&c, caps, &a).await.unwrap();
    assert_eq!(second.len(), 60);
    let all: BTreeSet<String> = first.iter().chain(second.iter()).cloned().collect();
    assert_eq!(all.len(), 100, "a record was printed twice");
    assert_eq!(all, (0..100).map(|i| format!("v{i}")).collect());

    // Nothing left for the group; later records are read by the next run.
    let a = group_consume_args(&c, "events", "g");
    assert!(consume_lines(&c, caps, &a).await.unwrap().is_empty());
    produce_lines(&c, "events", 100, 5).await;
    let got = consume_lines(&c, caps, &a).await.unwrap();
    assert_eq!(got.len(), 5);

    // A new group without --from-beginning starts at the end: nothing of the old records.
    let a = group_consume_args(&c, "events", "fresh");
    assert!(consume_lines(&c, caps, &a).await.unwrap().is_empty());

    // describe: empty group, every partition committed at its end, lag 0.
    let mut g = group_client(&c, caps, "g").await;
    let text = groups::describe(&mut g).await.unwrap();
    assert!(
        text.starts_with("Group: g  State: Empty  Protocol: "),
        "{text}"
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("Topic: ")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    let mut total = 0;
    for l in &lines {
        assert!(l.contains("Lag: 0  Member: -"), "{text}");
        let committed: i64 = l
            .split("CommittedOffset: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        total += committed;
    }
    assert_eq!(total, 105);

    // Contradictions are refused before anything is sent.
    let mut a = group_consume_args(&c, "events", "g");
    a.consumer_properties
        .push(("group.id".into(), "other".into()));
    let err = consume_lines(&c, caps, &a).await.unwrap_err();
    assert!(err.to_string().contains("differ"), "{err}");
    let mut a = group_consume_args(&c, "events", "g");
    a.from_beginning = true;
    a.consumer_properties
        .push(("auto.offset.reset".into(), "latest".into()));
    assert!(consume_lines(&c, caps, &a).await.is_err());
    // auto.offset.reset=none with no commit fails clearly.
    let mut a = group_consume_args(&c, "events", "none");
    a.group = None;
    a.consumer_properties
        .push(("group.id".into(), "none".into()));
    a.consumer_properties
        .push(("auto.offset.reset".into(), "none".into()));
    let err = consume_lines(&c, caps, &a).await.unwrap_err();
    assert!(err.to_string().contains("no committed offset"), "{err:#}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consume_resumes_modern_client() {
    resume_where_the_group_left_off(MODERN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consume_resumes_old_client() {
    resume_where_the_group_left_off(OLD).await;
}

/// Two members through the library API (as the chaos harness uses it): the second join
/// rebalances the first, the partitions are split by range, and when one leaves the other
/// gets everything back.
async fn members_split_and_rebalance(caps: &[(ApiKey, i16)]) {
    let c = cluster(1).await;
    create(&c, "t", 4).await;
    let mut a = member(&c, caps, "g2", "t").await;
    let got = a.join().await.unwrap();
    assert_eq!(got.partitions_of("t"), &[0, 1, 2, 3]);
    assert!(a.is_leader());
    let gen_a = a.generation();

    let mut b = member(&c, caps, "g2", "t").await;
    let joining = tokio::spawn(async move {
        let got = b.join().await;
        (b, got)
    });
    // A hears of the rebalance from its heartbeat and rejoins.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if a.poll().await.unwrap() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rebalance noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got_a = a.join().await.unwrap();
    let (mut b, got_b) = joining.await.unwrap();
    let got_b = got_b.unwrap();
    assert!(a.generation() > gen_a);
    assert_eq!(a.generation(), b.generation());
    let (pa, pb) = (got_a.partitions_of("t"), got_b.partitions_of("t"));
    assert_eq!(pa.len(), 2, "{got_a:?} {got_b:?}");
    assert_eq!(pb.len(), 2, "{got_a:?} {got_b:?}");
    let union: BTreeSet<String> = names(pa, "t").union(&names(pb, "t")).cloned().collect();
    assert_eq!(union, names(&[0, 1, 2, 3], "t"));
    // Range: the member whose id sorts first has 0 and 1.
    let first = if a.member_id() < b.member_id() {
        pa
    } else {
        pb
    };
    assert_eq!(first, &[0, 1]);

    // Commits as this generation work; a stale generation is refused and asks for a rejoin.
    let offsets = BTreeMap::from([(("t".to_string(), pa[0]), 0i64)]);
    a.commit(&offsets).await.unwrap();

    // describe shows both members and their assignments; the group cannot be deleted or reset.
    let mut g = group_client(&c, caps, "g2").await;
    let text = groups::describe(&mut g).await.unwrap();
    assert!(text.contains("State: Stable"), "{text}");
    assert!(text.contains("Members: 2"), "{text}");
    assert!(
        text.contains(&format!(
            "Member: {}  ClientId: sluice-cli  Host: ",
            a.member_id()
        )),
        "{text}"
    );
    let err = groups::delete(&mut g).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "group 'g2' is not empty (it has members) (NON_EMPTY_GROUP)"
    );
    let reset = GroupsResetArgs {
        group: "g2".into(),
        topic: ("t".into(), None),
        to: ResetTarget {
            to_earliest: true,
            to_latest: false,
            to_offset: None,
            to_datetime: None,
        },
        execute: true,
        dry_run: false,
        connect: connect_args(&c),
    };
    let err = groups::reset_offsets(&mut g, &reset).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Assignments can only be reset if the group 'g2' is inactive, but the current state is Stable."
    );
    assert_eq!(
        groups::list(&mut client(&c, caps).await).await.unwrap(),
        vec!["g2"]
    );

    // B leaves: A is told to rejoin and gets all four back.
    b.leave().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !a.poll().await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rebalance after leave"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.join().await.unwrap().partitions_of("t"), &[0, 1, 2, 3]);
    a.leave().await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_and_rebalance_modern_client() {
    members_split_and_rebalance(MODERN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_and_rebalance_old_client() {
    members_split_and_rebalance(OLD).await;
}

/// reset-offsets (dry run, then each target with --execute) and delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_offsets_and_delete() {
    let c = cluster(1).await;
    create(&c, "r", 2).await;
    produce_lines(&c, "r", 0, 20).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before_second_half = crate::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    produce_lines(&c, "r", 20, 20).await;
    let mut a = group_consume_args(&c, "r", "rg");
    a.from_beginning = true;
    a.max_messages = Some(40);
    assert_eq!(consume_lines(&c, MODERN, &a).await.unwrap().len(), 40);

    let mut g = group_client(&c, MODERN, "rg").await;
    // Everything consumed: the committed offsets are the log ends.
    let committed = g.committed(None).await.unwrap();
    assert_eq!(committed.values().sum::<i64>(), 40);
    let reset = |to: ResetTarget, execute: bool| GroupsResetArgs {
        group: "rg".into(),
        topic: ("r".into(), None),
        to,
        execute,
        dry_run: false,
        connect: connect_args(&c),
    };
    let earliest = || ResetTarget {
        to_earliest: true,
        to_latest: false,
        to_offset: None,
        to_datetime: None,
    };
    // Dry run: the plan, nothing changed.
    let (text, done) = groups::reset_offsets(&mut g, &reset(earliest(), false))
        .await
        .unwrap();
    assert!(!done);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("Group: rg  Topic: r  Partition: 0  CurrentOffset: "),
        "{text}"
    );
    assert!(text.contains("NewOffset: 0"), "{text}");
    assert_eq!(g.committed(None).await.unwrap(), committed);
    // --execute moves them.
    let (_, done) = groups::reset_offsets(&mut g, &reset(earliest(), true))
        .await
        .unwrap();
    assert!(done);
    let now = g.committed(None).await.unwrap();
    assert!(now.values().all(|o| *o == 0), "{now:?}");
    // --to-offset is kept inside the log; --to-latest is the end.
    let to_offset = ResetTarget {
        to_earliest: false,
        to_latest: false,
        to_offset: Some(1_000),
        to_datetime: None,
    };
    groups::reset_offsets(&mut g, &reset(to_offset, true))
        .await
        .unwrap();
    assert_eq!(g.committed(None).await.unwrap(), committed);
    // --to-datetime: the first record at or after the time; the second half is 20 records.
    let by_time = ResetTarget {
        to_earliest: false,
        to_latest: false,
        to_offset: None,
        to_datetime: Some(before_second_half),
    };
    groups::reset_offsets(&mut g, &reset(by_time, true))
        .await
        .unwrap();
    let now = g.committed(None).await.unwrap();
    let lag: i64 = committed.iter().map(|(tp, end)| end - now[tp]).sum();
    assert_eq!(lag, 20, "{now:?} vs {committed:?}");
    // The group resumes there.
    let mut a = group_consume_args(&c, "r", "rg");
    a.max_messages = Some(20);
    let got: BTreeSet<String> = consume_lines(&c, MODERN, &a)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, (20..40).map(|i| format!("v{i}")).collect());

    // A reset can prepare a group that does not exist yet.
    let mut fresh = group_client(&c, MODERN, "prepared").await;
    groups::reset_offsets(
        &mut fresh,
        &GroupsResetArgs {
            group: "prepared".into(),
            ..reset(earliest(), true)
        },
    )
    .await
    .unwrap();
    assert!(fresh
        .committed(None)
        .await
        .unwrap()
        .values()
        .all(|o| *o == 0));

    // delete: gone from list and describe; deleting again says it does not exist.
    groups::delete(&mut g).await.unwrap();
    let listed = groups::list(&mut client(&c, MODERN).await).await.unwrap();
    assert_eq!(listed, vec!["prepared"]);
    let err = groups::describe(&mut g).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "group 'rg' does not exist (GROUP_ID_NOT_FOUND)"
    );
    let err = groups::delete(&mut g).await.unwrap_err();
    assert_eq!(kafka_code(&err), Some(69), "{err}");
    c.shutdown().await;
}

/// Three nodes: the coordinator (the controller) is killed while a member is in the group;
/// the member finds the new coordinator and its commits and membership go on (the group is
/// replicated), or it rejoins; either way it ends up with every partition and a commit lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_follows_the_coordinator_to_a_new_node() {
    let mut c = cluster(3).await;
    let args = TopicsCreateArgs {
        name: "f".into(),
        partitions: Some(2),
        replication_factor: Some(3),
        configs: Vec::new(),
        connect: connect_args(&c),
    };
    topics::create(&mut client(&c, MODERN).await, &args)
        .await
        .unwrap();
    let mut m = member(&c, MODERN, "fg", "f").await;
    m.join().await.unwrap();
    let old = m.group.coordinator_id().unwrap();
    c.kill(old as usize - 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let offsets = BTreeMap::from([(("f".to_string(), 0), 0i64), (("f".to_string(), 1), 0i64)]);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        match m.poll().await {
            Ok(true) => {
                m.join().await.unwrap();
            }
            Ok(false) => {}
            Err(e) => panic!("{e:#}"),
        }
        match m.commit(&offsets).await {
            Ok(()) if m.group.coordinator_id().is_some_and(|n| n != old) => break,
            Ok(()) => {}
            Err(e) => eprintln!("commit: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(m.assignment().partitions_of("f"), &[0, 1]);
    m.leave().await.unwrap();
    c.shutdown().await;
}

/// Stopped from outside (Ctrl-C in the binary): what was printed is committed and the member
/// leaves, so the group is Empty at once and resumes after the last printed record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_commits_and_leaves() {
    let c = cluster(1).await;
    create(&c, "s", 2).await;
    produce_lines(&c, "s", 0, 50).await;
    let mut a = group_consume_args(&c, "s", "sg");
    a.from_beginning = true;
    a.timeout_ms = None;
    let mut out = Vec::new();
    let stop = tokio::time::sleep(Duration::from_secs(3));
    let n = consume::consume(&mut client(&c, MODERN).await, &a, &mut out, stop)
        .await
        .unwrap();
    assert_eq!(n, 50);
    let mut g = group_client(&c, MODERN, "sg").await;
    assert_eq!(g.committed(None).await.unwrap().values().sum::<i64>(), 50);
    let d = g.describe().await.unwrap();
    assert_eq!((d.state.as_str(), d.members.len()), ("Empty", 0));
    c.shutdown().await;
}
