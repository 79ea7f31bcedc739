"""What clients ask before and around reading: ApiVersions + Metadata (kcat -L), ListOffsets by
latest and by time (kcat -o -1 / s@ts, confluent offsets_for_times), DescribeCluster, and Fetch long
polling (a fetch at the high watermark waits up to max_wait_ms, and wakes early for new data)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from conftest import Clients
from helpers import Outbound, assert_all_delivered, consumer, produce, watermarks
from kafka_wire import (
    ERR_NONE,
    ERR_OFFSET_OUT_OF_RANGE,
    RawConn,
    api_versions_request,
    build_batch,
    fetch_request_v4,
    metadata_request_v1,
    parse_batches,
    parse_fetch_v4,
    parse_produce_v3,
    produce_request_v3,
)


def test_kcat_metadata_listing(shared_broker):
    c = Clients(shared_broker)
    c.create_topic("meta-three", 3)
    c.create_topic("meta-one", 1)

    # --- kcat -L negotiates ApiVersions, then reads Metadata for all topics
    r = c.kcat("-L", "-J", timeout_s=30)
    assert r.returncode == 0, r.stderr[-2000:]
    md = json.loads(r.stdout)
    assert [b["id"] for b in md["brokers"]] == [1], md["brokers"]
    assert md["brokers"][0]["name"] == shared_broker.bootstrap, f"advertised {md['brokers'][0]['name']}, want {shared_broker.bootstrap}"
    assert md.get("controllerid") == 1, md.get("controllerid")
    topics = {t["topic"]: t for t in md["topics"]}
    for name, n in (("meta-three", 3), ("meta-one", 1)):
        t = topics.get(name)
        assert t is not None, f"{name} missing from {sorted(topics)}"
        assert "error" not in t or not t["error"], t
        assert sorted(p["partition"] for p in t["partitions"]) == list(range(n))
        for p in t["partitions"]:
            assert p["leader"] == 1 and [x["id"] for x in p["replicas"]] == [1] and [x["id"] for x in p["isrs"]] == [1], p

    # --- the plain-text listing for one topic says the same
    r = c.kcat("-L", "-t", "meta-three", timeout_s=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'topic "meta-three" with 3 partitions:' in r.stdout, r.stdout
    assert f"broker 1 at {shared_broker.bootstrap}" in r.stdout, r.stdout
    assert "partition 2, leader 1, replicas: 1, isrs: 1" in r.stdout, r.stdout


def test_kcat_reads_from_latest_and_from_time(shared_broker):
    c = Clients(shared_broker)
    topic = "meta-latest"
    c.create_topic(topic, 1)
    t0 = int(time.time() * 1000) - 60_000
    # --- ten records, each its own batch, timestamps one second apart
    out = [Outbound(value=f"v{i}".encode(), timestamp=t0 + i * 1000) for i in range(10)]
    assert_all_delivered(produce(shared_broker.bootstrap, topic, out, timeout_s=60, flush_each=True))

    # --- -o -1: ListOffsets(latest) minus one -> exactly the last record
    r = c.kcat("-C", "-t", topic, "-p", "0", "-o", "-1", "-e", "-q", "-f", r"%o %s\n", timeout_s=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["9 v9"], r.stdout

    # --- -o -3: the last three
    r = c.kcat("-C", "-t", topic, "-p", "0", "-o", "-3", "-e", "-q", "-f", r"%o %s\n", timeout_s=30)
    assert r.stdout.splitlines() == ["7 v7", "8 v8", "9 v9"], r.stdout

    # --- -o end: nothing, and kcat still exits at end of partition
    r = c.kcat("-C", "-t", topic, "-p", "0", "-o", "end", "-e", "-q", "-f", r"%o %s\n", timeout_s=30)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr

    # --- -o s@ts: ListOffsets by timestamp
    r = c.kcat("-C", "-t", topic, "-p", "0", "-o", f"s@{t0 + 6500}", "-e", "-q", "-f", r"%o %s %T\n", timeout_s=30)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [l.split()[:2] for l in lines] == [["7", "v7"], ["8", "v8"], ["9", "v9"]], r.stdout
    assert [int(l.split()[2]) for l in lines] == [t0 + 7000, t0 + 8000, t0 + 9000], "timestamps not preserved"


def test_offsets_for_times(shared_broker):
    c = Clients(shared_broker)
    topic = "meta-times"
    c.create_topic(topic, 1)
    t0 = int(time.time() * 1000) - 120_000

    # --- ten records in ten batches, then ten records in ONE batch, timestamps 1 s apart throughout
    solo = [Outbound(value=f"s{i}".encode(), timestamp=t0 + i * 1000) for i in range(10)]
    assert_all_delivered(produce(shared_broker.bootstrap, topic, solo, timeout_s=60, flush_each=True))
    joint = [Outbound(value=f"j{i}".encode(), timestamp=t0 + (10 + i) * 1000) for i in range(10)]
    rep = produce(shared_broker.bootstrap, topic, joint, timeout_s=60, **{"linger.ms": 200})
    assert_all_delivered(rep)

    # --- each query gives the first offset whose timestamp is >= the asked time
    queries = {
        t0 - 5_000: 0,
        t0: 0,
        t0 + 3_500: 4,
        t0 + 9_000: 9,
        t0 + 9_001: 10,
        t0 + 14_500: 15,  # inside the single multi-record batch: Kafka answers per record
        t0 + 19_000: 19,
        t0 + 60_000: -1,  # past the end: no such offset
    }
    cons = consumer(shared_broker.bootstrap)
    try:
        for ts, want in queries.items():
            res = cons.offsets_for_times([TopicPartition(topic, 0, ts)], timeout=15)
            assert res[0].error is None, f"ts {ts - t0:+}: {res[0].error}"
            assert res[0].offset == want, f"offsets_for_times(t0{ts - t0:+d} ms) = {res[0].offset}, want {want}"
        # --- and earliest/latest through the same API family
        assert cons.get_watermark_offsets(TopicPartition(topic, 0), timeout=15) == (0, 20)
    finally:
        cons.close()


def test_describe_cluster(shared_broker):
    admin = AdminClient({"bootstrap.servers": shared_broker.bootstrap})
    # --- DescribeCluster: one node, which is also the controller, and a cluster id
    desc = admin.describe_cluster(request_timeout=15).result(timeout=20)
    assert desc.cluster_id, "empty cluster id"
    assert [n.id for n in desc.nodes] == [1], desc.nodes
    assert (desc.nodes[0].host, desc.nodes[0].port) == ("127.0.0.1", shared_broker.kafka_port)
    assert desc.controller is not None and desc.controller.id == 1


def test_fetch_long_polling(shared_broker):
    c = Clients(shared_broker)
    topic = "meta-longpoll"
    c.create_topic(topic, 1)
    assert_all_delivered(produce(shared_broker.bootstrap, topic, [Outbound(value=b"first")], timeout_s=30))

    with RawConn("127.0.0.1", shared_broker.kafka_port, timeout_s=15) as conn:
        # --- a fetch below the high watermark answers at once with the data
        started = time.monotonic()
        conn.send(fetch_request_v4(1, topic, 0, 0, max_wait_ms=5000))
        _, parts = parse_fetch_v4(conn.recv_frame())
        assert time.monotonic() - started < 2.0, "fetch with data waited"
        _, _, err, hw, records = parts[0]
        assert (err, hw) == (ERR_NONE, 1)
        batches, end = parse_batches(records)
        assert end == len(records) and [b.base_offset for b in batches] == [0], batches

        # --- a fetch whose byte limits are smaller than one batch still gets that whole batch (KIP-74)
        conn.send(fetch_request_v4(5, topic, 0, 0, max_wait_ms=100, max_bytes=1))
        _, parts = parse_fetch_v4(conn.recv_frame())
        batches, end = parse_batches(parts[0][4])
        assert parts[0][2] == ERR_NONE and end == len(parts[0][4]) and [b.base_offset for b in batches] == [0], parts

        # --- at the high watermark with nothing new, it waits about max_wait_ms and returns empty
        started = time.monotonic()
        conn.send(fetch_request_v4(2, topic, 0, 1, max_wait_ms=1500))
        _, parts = parse_fetch_v4(conn.recv_frame())
        waited = time.monotonic() - started
        assert 1.2 <= waited <= 5.0, f"empty long poll returned after {waited:.2f}s, want ~1.5s"
        assert parts[0][2] == ERR_NONE and parts[0][4] == b""

        # --- a write during the wait wakes it early
        timer = threading.Timer(0.7, lambda: produce(shared_broker.bootstrap, topic, [Outbound(value=b"second")], timeout_s=30))
        started = time.monotonic()
        timer.start()
        try:
            conn.send(fetch_request_v4(3, topic, 0, 1, max_wait_ms=10_000))
            _, parts = parse_fetch_v4(conn.recv_frame())
        finally:
            timer.join(timeout=30)
        waited = time.monotonic() - started
        assert waited < 5.0, f"long poll did not wake on new data (returned after {waited:.2f}s)"
        _, _, err, hw, records = parts[0]
        assert err == ERR_NONE and hw == 2 and [b.base_offset for b in parse_batches(records)[0]] == [1]

        # --- past the log end: OFFSET_OUT_OF_RANGE, not a wait
        started = time.monotonic()
        conn.send(fetch_request_v4(4, topic, 0, 1000, max_wait_ms=5000))
        _, parts = parse_fetch_v4(conn.recv_frame())
        assert parts[0][2] == ERR_OFFSET_OUT_OF_RANGE, f"fetch at 1000: error {parts[0][2]}"
        assert time.monotonic() - started < 3.0


def test_produce_auto_creates_topic(shared_broker):
    c = Clients(shared_broker)
    # --- auto.create.topics.enable is on by default (as in Kafka): kcat's first produce creates the topic
    r = c.kcat("-P", "-t", "meta-auto", input="a\nb\n", timeout_s=30)
    assert r.returncode == 0, r.stderr[-2000:]
    r = c.kcat("-L", "-J", "-t", "meta-auto", timeout_s=30)
    topic = json.loads(r.stdout)["topics"][0]
    assert topic["topic"] == "meta-auto" and len(topic["partitions"]) == 1, topic  # num.partitions = 1
    r = c.kcat("-C", "-t", "meta-auto", "-o", "beginning", "-e", "-q", "-f", r"%o %s\n", timeout_s=30)
    assert r.stdout.splitlines() == ["0 a", "1 b"], r.stdout + r.stderr


def test_pipelined_requests_are_answered_in_order(shared_broker):
    c = Clients(shared_broker)
    topic = "meta-pipeline"
    c.create_topic(topic, 1)
    # --- 60 requests written back to back on one connection: produce acks=1, acks=0 (no reply),
    #     Metadata and ApiVersions, interleaved
    expected = []
    payload = b""
    for i in range(60):
        kind = i % 4
        if kind == 0:
            payload += produce_request_v3(i, topic, 0, build_batch([(None, f"p{i}".encode())]), acks=1)
            expected.append(i)
        elif kind == 1:
            payload += produce_request_v3(i, topic, 0, build_batch([(None, f"p{i}".encode())]), acks=0)
        elif kind == 2:
            payload += metadata_request_v1(i, [topic])
            expected.append(i)
        else:
            payload += api_versions_request(1, i)
            expected.append(i)
    with RawConn("127.0.0.1", shared_broker.kafka_port, timeout_s=20) as conn:
        conn.send(payload)
        got = []
        for _ in expected:
            resp = conn.recv_frame()
            assert resp is not None, f"connection closed after {len(got)} replies"
            got.append(int.from_bytes(resp[:4], "big", signed=True))
    # --- replies come in request order, and acks=0 requests get none
    assert got == expected, f"reply correlation ids {got}"
    # --- all 30 produces landed, in the order they were sent
    deadline = time.monotonic() + 10
    while watermarks(shared_broker.bootstrap, topic, 1)[0][1] < 30 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = c.kcat("-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", r"%s\n", timeout_s=30)
    assert r.stdout.splitlines() == [f"p{i}" for i in range(60) if i % 4 in (0, 1)], r.stdout


def test_pipelined_produces_land_in_request_order_under_cpu_contention(broker_factory):
    """Kafka appends one connection's requests in the order they were sent. 2,000 acks=all
    produces go back to back on one connection while two busy processes compete for the 2 CPUs:
    replies and offsets must both follow the request order (a reorder once showed up as delivery
    reports out of offset order)."""
    broker = broker_factory()
    topic = "pipeline-order"
    Clients(broker).create_topic(topic, 1)
    n = 2000
    hogs = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"]) for _ in range(2)]
    try:
        with RawConn("127.0.0.1", broker.kafka_port, timeout_s=60) as conn:
            def send_all():
                for i in range(n):
                    conn.send(produce_request_v3(i, topic, 0, build_batch([(None, f"r{i}".encode())]), acks=-1))

            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            replies = []
            for _ in range(n):
                resp = conn.recv_frame()
                assert resp is not None, f"connection closed after {len(replies)} replies"
                corr, [(_, _, err, base)] = parse_produce_v3(resp)
                replies.append((corr, err, base))
            sender.join(timeout=60)
    finally:
        for h in hogs:
            h.kill()
            h.wait(timeout=10)
    assert [c for c, _, _ in replies] == list(range(n)), "replies out of request order"
    assert all(e == 0 for _, e, _ in replies), [r for r in replies if r[1]][:5]
    assert [b for _, _, b in replies] == list(range(n)), "offsets out of request order"
