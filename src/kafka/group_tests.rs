//! The consumer-group APIs against real in-process nodes over TCP: a rebalance between two
//! members, the errors Kafka answers (MEMBER_ID_REQUIRED only from JoinGroup v4, fencing by
//! generation and by static instance id), offsets, and a coordinator failover that keeps the
//! group and its offsets. The interop suite drives the same paths with librdkafka and
//! kafka-python.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestGroup;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use crate::cli::conn::BrokerConn;
use crate::errors::ErrorCode;
use crate::testkit::TestCluster;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

async fn cluster(n: usize) -> TestCluster {
    let c = TestCluster::start_with(n, |cfg| {
        cfg.group_initial_rebalance_delay_ms = 0;
        cfg.group_min_session_timeout_ms = 500;
    })
    .await
    .unwrap();
    assert!(c.wait_ready(Duration::from_secs(60)).await, "not ready");
    c
}

async fn create_topic(conn: &mut BrokerConn, topic: &str, partitions: i32, rf: i16) {
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(s(topic)))
            .with_num_partitions(partitions)
            .with_replication_factor(rf)]);
    let v = conn.version_for(ApiKey::CreateTopics).unwrap();
    let r: CreateTopicsResponse = conn.call(&req, v).await.unwrap();
    assert_eq!(r.topics[0].error_code, 0, "{r:?}");
}

fn join_req(member: &str, instance: Option<&str>, session_ms: i32) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_session_timeout_ms(session_ms)
        .with_rebalance_timeout_ms(10_000)
        .with_member_id(s(member))
        .with_group_instance_id(instance.map(s))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(
                b"\x00\x00\x00\x00\x00\x01\x00\x01t",
            ))])
}

/// Joins, retrying while a new coordinator takes over, as clients do.
async fn join(conn: &mut BrokerConn, version: i16, req: &JoinGroupRequest) -> JoinGroupResponse {
    for _ in 0..100 {
        let r: JoinGroupResponse = conn.call(req, version).await.unwrap();
        if r.error_code != ErrorCode::CoordinatorLoadInProgress.code() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coordinator never finished taking over");
}

async fn heartbeat(conn: &mut BrokerConn, generation: i32, member: &str) -> i16 {
    let req = HeartbeatRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_generation_id(generation)
        .with_member_id(s(member));
    let r: HeartbeatResponse = conn.call(&req, 4).await.unwrap();
    r.error_code
}

async fn sync(
    conn: &mut BrokerConn,
    generation: i32,
    member: &str,
    assignments: &[(&str, &'static [u8])],
) -> SyncGroupResponse {
    let req = SyncGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_generation_id(generation)
        .with_member_id(s(member))
        .with_protocol_type(Some(s("consumer")))
        .with_protocol_name(Some(s("range")))
        .with_assignments(
            assignments
                .iter()
                .map(|(m, a)| {
                    SyncGroupRequestAssignment::default()
                        .with_member_id(s(m))
                        .with_assignment(Bytes::from_static(a))
                })
                .collect(),
        );
    conn.call(&req, 5).await.unwrap()
}

async fn commit(
    conn: &mut BrokerConn,
    generation: i32,
    member: &str,
    partition: i32,
    offset: i64,
) -> i16 {
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(s(member))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s("t")))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(partition)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)
                .with_committed_metadata(Some(s("meta")))])]);
    let r: OffsetCommitResponse = conn.call(&req, 8).await.unwrap();
    r.topics[0].partitions[0].error_code
}

/// (error, offset) of partition `p` of topic t for group `g`, asked with OffsetFetch v8.
async fn fetch_offset(conn: &mut BrokerConn, groups: &[&str], p: i32) -> Vec<(i16, i64)> {
    let req = OffsetFetchRequest::default().with_groups(
        groups
            .iter()
            .map(|g| {
                OffsetFetchRequestGroup::default()
                    .with_group_id(GroupId(s(g)))
                    .with_topics(Some(vec![
                        offset_fetch_request::OffsetFetchRequestTopics::default()
                            .with_name(TopicName(s("t")))
                            .with_partition_indexes(vec![p]),
                    ]))
            })
            .collect(),
    );
    let r: OffsetFetchResponse = conn.call(&req, 8).await.unwrap();
    r.groups
        .iter()
        .map(|g| {
            let off = g
                .topics
                .first()
                .and_then(|t| t.partitions.first())
                .map_or(-99, |p| p.committed_offset);
            (g.error_code, off)
        })
        .collect()
}

async fn coordinator(conn: &mut BrokerConn) -> i32 {
    let req = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![s("g")]);
    let r: FindCoordinatorResponse = conn.call(&req, 4).await.unwrap();
    r.coordinators[0].node_id.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_rebalance_sync_commit_and_are_fenced_as_kafka_fences() {
    let c = cluster(1).await;
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    let mut b = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    create_topic(&mut a, "t", 2, 1).await;
    let fc: FindCoordinatorResponse = a
        .call(&FindCoordinatorRequest::default().with_key(s("g")), 0)
        .await
        .unwrap();
    assert_eq!((fc.error_code, fc.node_id.0), (0, 1));
    assert_eq!(coordinator(&mut a).await, 1);

    // KIP-394: v4+ must ask again with the id it is given.
    let first = join(&mut a, 5, &join_req("", None, 5_000)).await;
    assert_eq!(first.error_code, ErrorCode::MemberIdRequired.code());
    let a_id = first.member_id.to_string();
    assert!(!a_id.is_empty());
    let r = join(&mut a, 5, &join_req(&a_id, None, 5_000)).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    assert_eq!((r.generation_id, r.leader.as_str()), (1, a_id.as_str()));
    assert_eq!(r.members.len(), 1);
    let r = sync(&mut a, 1, &a_id, &[(&a_id, b"all")]).await;
    assert_eq!((r.error_code, r.assignment.as_ref()), (0, b"all".as_ref()));

    // A v3 client cannot handle MEMBER_ID_REQUIRED: it joins at once, and the join waits for
    // the existing member to rejoin.
    let b_join = tokio::spawn(async move {
        let r = join(&mut b, 3, &join_req("", None, 5_000)).await;
        (b, r)
    });
    let mut saw_rebalance = false;
    for _ in 0..100 {
        if heartbeat(&mut a, 1, &a_id).await == ErrorCode::RebalanceInProgress.code() {
            saw_rebalance = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_rebalance, "the member never heard of the rebalance");
    let r = join(&mut a, 5, &join_req(&a_id, None, 5_000)).await;
    assert_eq!((r.error_code, r.generation_id), (0, 2), "{r:?}");
    assert_eq!(r.members.len(), 2, "the leader sees every member");
    let (mut b, rb) = b_join.await.unwrap();
    assert_eq!((rb.error_code, rb.generation_id), (0, 2), "{rb:?}");
    assert!(rb.members.is_empty(), "followers see no members");
    let b_id = rb.member_id.to_string();

    let b_sync = tokio::spawn(async move {
        let r = sync(&mut b, 2, &b_id, &[]).await;
        (b, b_id, r)
    });
    let r = sync(&mut a, 2, &a_id, &[(&a_id, b"p0"), ("nobody", b"x")]).await;
    assert_eq!((r.error_code, r.assignment.as_ref()), (0, b"p0".as_ref()));
    let (mut b, b_id, rb) = b_sync.await.unwrap();
    assert_eq!(rb.error_code, 0);
    assert!(rb.assignment.is_empty(), "b was assigned nothing");

    assert_eq!(heartbeat(&mut a, 2, &a_id).await, 0);
    assert_eq!(
        heartbeat(&mut a, 1, &a_id).await,
        ErrorCode::IllegalGeneration.code()
    );
    assert_eq!(
        heartbeat(&mut a, 2, "stranger").await,
        ErrorCode::UnknownMemberId.code()
    );
    assert_eq!(commit(&mut a, 2, &a_id, 0, 42).await, 0);
    // An idle consumer's auto-commit of what is already committed writes nothing.
    let ops = || {
        c.broker(0)
            .metrics
            .group_ops
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = ops();
    assert_eq!(commit(&mut a, 2, &a_id, 0, 42).await, 0);
    assert_eq!(ops(), before, "an unchanged commit was proposed");
    assert_eq!(commit(&mut b, 2, &b_id, 1, 7).await, 0);
    assert_eq!(ops(), before + 1);
    assert_eq!(
        commit(&mut a, 1, &a_id, 0, 1).await,
        ErrorCode::IllegalGeneration.code()
    );
    assert_eq!(
        commit(&mut a, 2, &a_id, 9, 1).await,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    assert_eq!(
        fetch_offset(&mut a, &["g", "other"], 0).await,
        vec![(0, 42), (0, -1)]
    );

    let d: DescribeGroupsResponse = a
        .call(
            &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
            5,
        )
        .await
        .unwrap();
    let g = &d.groups[0];
    assert_eq!(
        (
            g.group_state.as_str(),
            g.protocol_data.as_str(),
            g.members.len()
        ),
        ("Stable", "range", 2)
    );
    let l: ListGroupsResponse = a.call(&ListGroupsRequest::default(), 4).await.unwrap();
    assert_eq!(l.groups.len(), 1);
    assert_eq!(l.groups[0].group_state.as_str(), "Stable");

    let del = DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s("g"))]);
    let r: DeleteGroupsResponse = a.call(&del, 2).await.unwrap();
    assert_eq!(r.results[0].error_code, ErrorCode::NonEmptyGroup.code());
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_members(vec![
            MemberIdentity::default().with_member_id(s(&a_id)),
            MemberIdentity::default().with_member_id(s(&b_id)),
            MemberIdentity::default().with_member_id(s("stranger")),
        ]);
    let r: LeaveGroupResponse = a.call(&leave, 4).await.unwrap();
    let codes: Vec<i16> = r.members.iter().map(|m| m.error_code).collect();
    assert_eq!(codes, vec![0, 0, ErrorCode::UnknownMemberId.code()]);
    // Empty now: a consumer without membership may commit, and the group may go.
    assert_eq!(commit(&mut a, -1, "", 1, 8).await, 0);
    assert_eq!(fetch_offset(&mut a, &["g"], 1).await, vec![(0, 8)]);
    let r: DeleteGroupsResponse = a.call(&del, 2).await.unwrap();
    assert_eq!(r.results[0].error_code, 0);
    let r: DeleteGroupsResponse = a.call(&del, 2).await.unwrap();
    assert_eq!(r.results[0].error_code, ErrorCode::GroupIdNotFound.code());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_rejoining_fences_its_old_id() {
    let c = cluster(1).await;
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    create_topic(&mut a, "t", 1, 1).await;
    // Static members skip MEMBER_ID_REQUIRED.
    let r = join(&mut a, 5, &join_req("", Some("i-1"), 5_000)).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    let old = r.member_id.to_string();
    let r = sync(&mut a, r.generation_id, &old, &[(&old, b"mine")]).await;
    assert_eq!(r.error_code, 0);
    // The same instance restarts without its member id: it takes the old place, no rebalance.
    let r = join(&mut a, 5, &join_req("", Some("i-1"), 5_000)).await;
    assert_eq!((r.error_code, r.generation_id), (0, 1), "{r:?}");
    let new = r.member_id.to_string();
    assert_ne!(new, old);
    let r = sync(&mut a, 1, &new, &[]).await;
    assert_eq!((r.error_code, r.assignment.as_ref()), (0, b"mine".as_ref()));
    let hb = HeartbeatRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_generation_id(1)
        .with_member_id(s(&old))
        .with_group_instance_id(Some(s("i-1")));
    let r: HeartbeatResponse = a.call(&hb, 4).await.unwrap();
    assert_eq!(r.error_code, ErrorCode::FencedInstanceId.code());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_failover_keeps_the_group_and_its_offsets_and_sessions_expire() {
    let mut c = cluster(3).await;
    let mut any = BrokerConn::connect(&c.kafka_addr(0)).await.unwrap();
    create_topic(&mut any, "t", 1, 3).await;
    let coord = coordinator(&mut any).await;
    assert!(coord >= 1, "no coordinator");
    let ci = coord as usize - 1;
    let other = (ci + 1) % 3;
    let mut elsewhere = BrokerConn::connect(&c.kafka_addr(other)).await.unwrap();
    let r = join(&mut elsewhere, 5, &join_req("x", None, 2_000)).await;
    assert_eq!(r.error_code, ErrorCode::NotCoordinator.code());

    let mut m = BrokerConn::connect(&c.kafka_addr(ci)).await.unwrap();
    let r = join(&mut m, 3, &join_req("", None, 2_000)).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    let (id, generation) = (r.member_id.to_string(), r.generation_id);
    assert_eq!(
        sync(&mut m, generation, &id, &[(&id, b"p0")])
            .await
            .error_code,
        0
    );
    assert_eq!(commit(&mut m, generation, &id, 0, 42).await, 0);

    c.kill(ci).await;
    let mut new_coord = -1;
    for _ in 0..300 {
        let r = coordinator(&mut elsewhere).await;
        if r >= 1 && r != coord {
            new_coord = r;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(new_coord >= 1, "no new coordinator");
    let mut n = BrokerConn::connect(&c.kafka_addr(new_coord as usize - 1))
        .await
        .unwrap();
    let mut seen = vec![];
    for _ in 0..200 {
        seen = fetch_offset(&mut n, &["g"], 0).await;
        if seen[0].0 != ErrorCode::CoordinatorLoadInProgress.code() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, vec![(0, 42)], "the committed offset survived");
    // The member carries on with the new coordinator in the same generation.
    assert_eq!(heartbeat(&mut n, generation, &id).await, 0);
    assert_eq!(commit(&mut n, generation, &id, 0, 43).await, 0);
    // It stops heartbeating: its session (2 s) expires and the group empties.
    let mut state = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d: DescribeGroupsResponse = n
            .call(
                &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
                5,
            )
            .await
            .unwrap();
        state = d.groups[0].group_state.to_string();
        if state == "Empty" {
            break;
        }
    }
    assert_eq!(state, "Empty");
    assert_eq!(fetch_offset(&mut n, &["g"], 0).await, vec![(0, 43)]);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commits_of_one_connection_apply_in_the_order_sent() {
    let c = cluster(1).await;
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    create_topic(&mut a, "t", 1, 1).await;
    let _ = join(&mut a, 5, &join_req("", None, 5_000)).await; // waits out the takeover
    for round in 0..5i64 {
        for i in 1..=40i64 {
            let req = OffsetCommitRequest::default()
                .with_group_id(GroupId(s("p")))
                .with_generation_id_or_member_epoch(-1)
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s("t")))
                    .with_partitions(vec![OffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(round * 100 + i)])]);
            a.send(&req, 8, true).await.unwrap();
        }
        for _ in 0..40 {
            let r: OffsetCommitResponse =
                a.recv::<OffsetCommitRequest>(Duration::ZERO).await.unwrap();
            assert_eq!(r.topics[0].partitions[0].error_code, 0);
        }
        assert_eq!(
            fetch_offset(&mut a, &["p"], 0).await,
            vec![(0, round * 100 + 40)],
            "the last commit sent is the one that stands"
        );
    }
    c.shutdown().await;
}

/// Offset commits per second one coordinator takes from many consumers: 64 connections, each
/// with 8 commits in flight (simple commits of 4 partitions each), for 10 s. A measurement, not
/// a test: `cargo test --release -p sluice --lib offset_commit_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn offset_commit_throughput() {
    let c = cluster(1).await;
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    create_topic(&mut a, "t", 4, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let addr = c.bootstrap();
            tokio::spawn(async move {
                let mut conn = BrokerConn::connect(&addr).await.unwrap();
                let group = format!("g{i}");
                let mut done = 0u64;
                let mut offset = 0i64;
                while tokio::time::Instant::now() < deadline {
                    for _ in 0..8 {
                        offset += 1;
                        let req = OffsetCommitRequest::default()
                            .with_group_id(GroupId(s(&group)))
                            .with_generation_id_or_member_epoch(-1)
                            .with_topics(vec![OffsetCommitRequestTopic::default()
                                .with_name(TopicName(s("t")))
                                .with_partitions(
                                    (0..4)
                                        .map(|p| {
                                            OffsetCommitRequestPartition::default()
                                                .with_partition_index(p)
                                                .with_committed_offset(offset)
                                        })
                                        .collect(),
                                )]);
                        conn.send(&req, 8, true).await.unwrap();
                    }
                    for _ in 0..8 {
                        let r: OffsetCommitResponse = conn
                            .recv::<OffsetCommitRequest>(Duration::ZERO)
                            .await
                            .unwrap();
                        assert_eq!(r.topics[0].partitions[0].error_code, 0);
                        done += 1;
                    }
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let m = &c.broker(0).metrics;
    let ops = m.group_ops.load(std::sync::atomic::Ordering::Relaxed);
    let proposals = m.group_proposals.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "offset commits: {total} requests ({} partition offsets) in {secs:.1} s = {:.0} commits/s; \
         {ops} group ops in {proposals} metadata entries ({:.1} per entry)",
        total * 4,
        total as f64 / secs,
        ops as f64 / proposals.max(1) as f64
    );
    c.shutdown().await;
}

/// One request frame of hand-written bytes; returns the response body after the correlation id.
async fn raw_call(addr: &str, api: i16, version: i16, body: &[u8]) -> Bytes {
    use bytes::{Buf, BufMut, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut frame = BytesMut::new();
    frame.put_i16(api);
    frame.put_i16(version);
    frame.put_i32(7);
    frame.put_i16(-1); // no client id
    frame.put_slice(body);
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(&(frame.len() as i32).to_be_bytes())
        .await
        .unwrap();
    sock.write_all(&frame).await.unwrap();
    let len = sock.read_i32().await.unwrap();
    let mut resp = vec![0u8; len as usize];
    sock.read_exact(&mut resp).await.unwrap();
    let mut resp = Bytes::from(resp);
    assert_eq!(resp.get_i32(), 7, "correlation id");
    resp
}

fn put_str(b: &mut bytes::BytesMut, v: &str) {
    use bytes::BufMut;
    b.put_i16(v.len() as i16);
    b.put_slice(v.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_offset_commit_and_fetch_versions_are_served() {
    use bytes::{Buf, BufMut, BytesMut};
    let c = cluster(1).await;
    let mut a = BrokerConn::connect(&c.bootstrap()).await.unwrap();
    create_topic(&mut a, "t", 1, 1).await;
    let _ = join(&mut a, 5, &join_req("", None, 5_000)).await; // waits out the takeover
    for (version, offset) in [(0i16, 11i64), (1, 12)] {
        let mut body = BytesMut::new();
        put_str(&mut body, "old");
        if version == 1 {
            body.put_i32(-1);
            put_str(&mut body, "");
        }
        body.put_i32(1);
        put_str(&mut body, "t");
        body.put_i32(1);
        body.put_i32(0);
        body.put_i64(offset);
        if version == 1 {
            body.put_i64(-1);
        }
        put_str(&mut body, "m");
        let mut r = raw_call(&c.bootstrap(), 8, version, &body).await;
        // [topic [partition error]]
        assert_eq!(r.get_i32(), 1);
        let n = r.get_i16() as usize;
        r.advance(n);
        assert_eq!((r.get_i32(), r.get_i32(), r.get_i16()), (1, 0, 0));

        let mut body = BytesMut::new();
        put_str(&mut body, "old");
        body.put_i32(1);
        put_str(&mut body, "t");
        body.put_i32(1);
        body.put_i32(0);
        let mut r = raw_call(&c.bootstrap(), 9, 0, &body).await;
        // [topic [partition offset metadata error]]
        assert_eq!(r.get_i32(), 1);
        let n = r.get_i16() as usize;
        r.advance(n);
        assert_eq!((r.get_i32(), r.get_i32(), r.get_i64()), (1, 0, offset));
        let n = r.get_i16() as usize;
        assert_eq!(&r[..n], b"m");
        r.advance(n);
        assert_eq!(r.get_i16(), 0);
    }
    c.shutdown().await;
}
