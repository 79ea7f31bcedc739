"""Partition replication through Raft, judged by a real client (confluent-kafka, acks=all): leader
crashes lose no acknowledged write, followers catch up byte for byte, a partition without a majority
acknowledges nothing, and leadership moves on request without failed writes."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import urllib.error
import urllib.request

from confluent_kafka import Producer

from conftest import Clients
from helpers import consume_all
from kafka_wire import RawConn, build_batch, offset_for_leader_epoch_v2, parse_offset_for_leader_epoch_v2, parse_produce_v3, produce_request_v3
from test_cluster import get_json, metadata, start_all, start_fourth, wait_for

INTERNAL_PRODUCER_ID = -0x511CE


def leaders(node, topic: str) -> dict[int, int]:
    t = get_json(node.admin, f"/v1/topics/{topic}")
    return {p["partition"]: p["leader"] for p in t["partitions"]}


def all_led(nodes, topic: str, n: int):
    for node in nodes:
        if not node.is_running():
            continue
        try:
            md = metadata(node.bootstrap, topic)
        except Exception:  # noqa: BLE001 - this node may be mid-restart; ask the next
            continue
        parts = md.topics[topic].partitions
        if len(parts) == n and all(p.leader >= 0 and not p.error for p in parts.values()):
            return True
    return False


def create_led_topic(cluster, topic: str, partitions: int, rf: int) -> None:
    r = Clients(cluster[0]).sluice("topics", "create", topic, "--partitions", str(partitions), "--replication-factor", str(rf))
    assert r.returncode == 0, r.stderr
    wait_for(f"all {partitions} partitions of {topic} led", lambda: all_led(cluster, topic, partitions))


class Writer(threading.Thread):
    """Writes unique values with acks=all until stopped; records every delivery report. A plain
    (non-idempotent) producer with retries off, so a value is sent once: acknowledged values must
    each appear exactly once, at their acknowledged offset, without the broker's deduplication."""

    def __init__(self, bootstrap: str, topic: str, retries: int = 0):
        super().__init__(daemon=True)
        self.topic = topic
        self.p = Producer({
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": False,
            "message.send.max.retries": retries,
            "retry.backoff.ms": 200,
            "message.timeout.ms": 15000,
            "request.timeout.ms": 12000,
            "linger.ms": 5,
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self.acked: dict[str, tuple[int, int]] = {}
        self.failed: dict[str, str] = {}
        self.stop = threading.Event()
        self.sent = 0

    def run(self):
        i = 0
        deadline = time.monotonic() + 300
        while not self.stop.is_set() and time.monotonic() < deadline:
            v = f"v{i}"

            def cb(err, msg, v=v):
                if err is None:
                    self.acked[v] = (msg.partition(), msg.offset())
                else:
                    self.failed[v] = str(err)

            try:
                self.p.produce(self.topic, value=v.encode(), on_delivery=cb)
                i += 1
                self.sent = i
            except BufferError:
                pass
            self.p.poll(0.002)
        left = self.p.flush(60)
        assert left == 0, f"{left} messages without a delivery report"


def test_acked_writes_survive_leader_kills(cluster):
    start_all(cluster)
    topic = "repl-kill"
    create_led_topic(cluster, topic, 6, 3)
    bootstrap = ",".join(n.bootstrap for n in cluster)
    w = Writer(bootstrap, topic)
    w.start()
    time.sleep(3)
    for round_ in range(2):
        # --- kill -9 the node leading the most partitions, then bring it back
        counts: dict[int, int] = {}
        for l in leaders(next(n for n in cluster if n.is_running()), topic).values():
            if l is not None:
                counts[l] = counts.get(l, 0) + 1
        victim_id = max(counts, key=counts.get)
        victim = next(n for n in cluster if n.node_id == victim_id)
        print(f"round {round_}: killing node {victim_id}, leader of {counts[victim_id]} partitions")
        victim.kill9()
        time.sleep(6)
        victim.start(wait=False)
        victim.wait_ready(timeout_s=60)
        time.sleep(4)
    w.stop.set()
    w.join(timeout=120)
    assert not w.is_alive()
    assert len(w.acked) > 500, f"only {len(w.acked)} acked writes"
    print(f"sent {w.sent}, acked {len(w.acked)}, failed {len(w.failed)}: {list(w.failed.values())[:3]}")
    # --- read everything back through a node that was never killed
    wait_for("all partitions led", lambda: all_led(cluster, topic, 6))
    recs = consume_all(bootstrap, topic, 6, timeout_s=120)
    at: dict[tuple[int, int], str] = {}
    where: dict[str, list[tuple[int, int]]] = {}
    for rec in recs:
        v = rec.value.decode()
        at[(rec.partition, rec.offset)] = v
        where.setdefault(v, []).append((rec.partition, rec.offset))
    dupes = {v: w_ for v, w_ in where.items() if len(w_) > 1}
    assert not dupes, f"values at two offsets: {list(dupes.items())[:5]}"
    lost = [(v, po) for v, po in w.acked.items() if at.get(po) != v]
    assert not lost, f"{len(lost)} acknowledged writes not at their acknowledged offset, first: {lost[:5]}"


def batches(path_bytes: bytes):
    """(raw batch bytes, base offset, last offset, internal?) for each batch in a segment file."""
    pos = 0
    while pos + 61 <= len(path_bytes):
        base, length = struct.unpack_from(">qi", path_bytes, pos)
        end = pos + 12 + length
        if length < 49 or end > len(path_bytes):
            break
        last_delta = struct.unpack_from(">i", path_bytes, pos + 23)[0]
        pid = struct.unpack_from(">q", path_bytes, pos + 43)[0]
        yield path_bytes[pos:end], base, base + last_delta, pid == INTERNAL_PRODUCER_ID
        pos = end


def data_log(node, topic: str, partition: int, hw: int) -> bytes:
    out = bytearray()
    for seg in sorted(node.partition_dir(topic, partition).glob("*.log")):
        for raw, base, last, internal in batches(seg.read_bytes()):
            if not internal and last < hw:
                out += raw
    return bytes(out)


def test_stopped_follower_catches_up_byte_for_byte(cluster, tmp_path):
    start_all(cluster)
    topic = "repl-catchup"
    create_led_topic(cluster, topic, 1, 3)
    leader_id = leaders(cluster[0], topic)[0]
    follower = next(n for n in cluster if n.node_id != leader_id)
    follower.stop()
    # --- 50,000 writes while the follower is away
    data = tmp_path / "lines.txt"
    data.write_text("".join(f"record-{i}\n" for i in range(50_000)))
    live = next(n for n in cluster if n.is_running())
    r = Clients(live).kcat("-P", "-t", topic, "-X", "acks=all", "-X", "message.timeout.ms=60000", "-l", str(data), timeout_s=180)
    assert r.returncode == 0, r.stderr[-2000:]
    follower.start(wait=False)
    follower.wait_ready(timeout_s=60)

    def caught_up():
        groups = {}
        for n in cluster:
            for g in get_json(n.admin, "/v1/raft")["groups"]:
                if g["group"].startswith("p/"):
                    groups[n.node_id] = g
        idx = {k: g["last_log_index"] for k, g in groups.items()}
        return idx if len(idx) == 3 and len(set(idx.values())) == 1 else None

    # --- /v1/raft shows the same last log index on all three replicas
    wait_for("follower caught up in /v1/raft", caught_up, timeout_s=60)
    hw = get_json(next(n for n in cluster if n.node_id == leader_id).admin, f"/v1/topics/{topic}")["partitions"][0]["high_watermark"]
    assert hw >= 50_000
    # --- and the data batches on disk are identical, byte for byte, up to the high watermark
    logs = {n.node_id: data_log(n, topic, 0, hw) for n in cluster}
    sizes = {k: len(v) for k, v in logs.items()}
    assert len(set(logs.values())) == 1, f"replica logs differ: sizes {sizes}"
    assert sizes[leader_id] > 50_000 * 10


def test_no_majority_no_ack_then_recovery(cluster):
    start_all(cluster)
    topic = "repl-quorum"
    create_led_topic(cluster, topic, 1, 3)
    # --- stop two of the three replicas
    for n in cluster[1:]:
        n.kill9()
    p = Producer({
        "bootstrap.servers": cluster[0].bootstrap, "acks": "all", "enable.idempotence": False,
        "message.timeout.ms": 8000, "request.timeout.ms": 5000, "message.send.max.retries": 0,
    })
    reports = []
    for i in range(20):
        p.produce(topic, value=f"lonely-{i}".encode(), on_delivery=lambda err, msg: reports.append(err))
    p.flush(30)
    assert len(reports) == 20
    assert all(e is not None for e in reports), f"acknowledged without a majority: {reports}"
    print("errors without majority:", sorted({e.name() for e in reports}))
    assert all(e.retriable() or e.name() in ("_MSG_TIMED_OUT", "REQUEST_TIMED_OUT", "NOT_ENOUGH_REPLICAS", "_TIMED_OUT") for e in reports), [e.name() for e in reports]
    # --- bring them back: writes resume
    for n in cluster[1:]:
        n.start(wait=False)
    for n in cluster:
        n.wait_ready(timeout_s=60)
    wait_for("partition led", lambda: all_led(cluster, topic, 1), timeout_s=60)
    ok = []
    p2 = Producer({"bootstrap.servers": ",".join(n.bootstrap for n in cluster), "acks": "all", "enable.idempotence": False, "message.timeout.ms": 30000})
    for i in range(20):
        p2.produce(topic, value=f"back-{i}".encode(), on_delivery=lambda err, msg: ok.append(err))
    p2.flush(40)
    assert len(ok) == 20 and all(e is None for e in ok), ok
    values = [r.value.decode() for r in consume_all(cluster[0].bootstrap, topic, 1)]
    assert [v for v in values if v.startswith("back-")] == [f"back-{i}" for i in range(20)]


def test_transfer_leadership_under_load(cluster):
    start_all(cluster)
    topic = "repl-transfer"
    create_led_topic(cluster, topic, 1, 3)
    w = Writer(",".join(n.bootstrap for n in cluster), topic, retries=10)
    w.start()
    time.sleep(2)
    for _ in range(2):
        current = leaders(cluster[0], topic)[0]
        target = next(n.node_id for n in cluster if n.node_id != current)
        req = urllib.request.Request(
            f"http://{cluster[0].admin}/v1/partitions/{topic}/0/transfer-leadership",
            data=json.dumps({"target": target}).encode(), method="POST",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"transfer to {target} failed: {e.code} {e.read()!r}")
        assert body["leader"] == target, body
        time.sleep(2)
    w.stop.set()
    w.join(timeout=120)
    assert len(w.acked) > 100
    assert not w.failed, f"{len(w.failed)} writes failed for good: {list(w.failed.values())[:3]}"


def post(admin: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{admin}{path}", data=data, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_decommission_moves_replicas_to_a_new_broker_under_load(cluster, tmp_path):
    start_all(cluster)
    topic = "repl-move"
    create_led_topic(cluster, topic, 2, 3)
    fourth = start_fourth(cluster, tmp_path)
    try:
        # --- bad reassignments are refused with a reason and leave nothing behind
        assert post(cluster[0].admin, f"/v1/partitions/{topic}/0/reassign", {"replicas": [1, 9]})[0] == 400
        assert post(cluster[0].admin, f"/v1/partitions/{topic}/0/reassign", {"replicas": [1, 1]})[0] == 400
        assert post(cluster[0].admin, f"/v1/partitions/{topic}/7/reassign", {"replicas": [1]})[0] == 404
        assert get_json(cluster[0].admin, "/v1/reassignments")["reassignments"] == []
        bootstrap = ",".join(n.bootstrap for n in cluster)
        w = Writer(bootstrap, topic, retries=10)
        w.start()
        time.sleep(2)
        # --- decommission node 3 while writes go on: its replicas move to node 4, then it leaves
        ctl = get_json(cluster[0].admin, "/v1/cluster")["controller_id"]
        controller = next(n for n in cluster if n.node_id == ctl)
        victim = next(n for n in cluster if n.node_id != ctl)
        first_code, first = post(controller.admin, f"/v1/brokers/{victim.node_id}/decommission")
        assert first_code == 202 and first["moving"] == 2, first

        def decommissioned():
            code, body = post(controller.admin, f"/v1/brokers/{victim.node_id}/decommission")
            assert code in (200, 202), (code, body)
            return code == 200 or None
        wait_for("decommission finished", decommissioned, timeout_s=120, interval_s=1.0)
        time.sleep(2)
        w.stop.set()
        w.join(timeout=120)
        assert len(w.acked) > 100
        assert not w.failed, f"{len(w.failed)} writes failed for good: {list(w.failed.values())[:3]}"
        # --- the new replica sets, as every node and client sees them
        live = [n for n in cluster if n is not victim] + [fourth]
        expected = {n.node_id for n in live}
        md = metadata(fourth.bootstrap, topic)
        assert {b for b in md.brokers} == expected
        for p in md.topics[topic].partitions.values():
            assert set(p.replicas) == expected, p.replicas
        assert get_json(controller.admin, "/v1/reassignments")["reassignments"] == []
        # --- node 4's data batches are the leader's, byte for byte, up to the high watermark
        for part in range(2):
            leader_id = wait_for("a leader", lambda: leaders(fourth, topic).get(part) if leaders(fourth, topic).get(part, -1) >= 0 else None)
            leader = next(n for n in live if n.node_id == leader_id)

            def same_logs():
                hw = get_json(leader.admin, f"/v1/topics/{topic}")["partitions"][part]["high_watermark"]
                logs = {n.node_id: data_log(n, topic, part, hw) for n in live}
                return hw if len(set(logs.values())) == 1 and logs[4] else None
            wait_for(f"identical replica logs of partition {part}", same_logs, timeout_s=30)
        # --- the old replica's data is gone
        wait_for("partition data removed from the old broker",
                 lambda: not any(victim.partition_dir(topic, p).exists() for p in range(2)))
        # --- every acknowledged value is there, at its offset
        got = {(rec.partition, rec.offset): rec.value.decode() for rec in consume_all(fourth.bootstrap, topic, 2)}
        for v, (part, off) in w.acked.items():
            assert got.get((part, off)) == v, f"{v} acked at {part}/{off}, read {got.get((part, off))!r}"
    finally:
        fourth.stop()


def test_kafka_reassignment_api_moves_a_partition_and_its_leader(cluster):
    """AlterPartitionReassignments / ListPartitionReassignments on the wire (the APIs
    kafka-reassign-partitions.sh uses): an RF 2 partition moves to another pair of brokers, its
    leader moving with it when the leader is not in the new set; bad moves get per-partition errors."""
    from kafka_wire import (RawConn, alter_partition_reassignments_v0, list_partition_reassignments_v0,
                            parse_alter_partition_reassignments_v0, parse_list_partition_reassignments_v0)
    start_all(cluster)
    topic = "repl-api-move"
    create_led_topic(cluster, topic, 1, 2)
    before = get_json(cluster[0].admin, f"/v1/topics/{topic}")["partitions"][0]
    old = before["replicas"]
    spare = next(n.node_id for n in cluster if n.node_id not in old)
    # The leader's replica is dropped, so leadership has to move as well.
    target = [spare, next(b for b in old if b != before["leader"])]
    bootstrap = ",".join(n.bootstrap for n in cluster)
    w = Writer(bootstrap, topic, retries=10)
    w.start()
    time.sleep(2)
    host, port = cluster[0].bootstrap.split(":")
    with RawConn(host, int(port)) as c:
        c.send(alter_partition_reassignments_v0(1, {topic: {0: [1, 99]}, "no-such-topic": {0: [1]}}))
        err, res = parse_alter_partition_reassignments_v0(c.recv_frame())
        assert err == 0
        assert res[(topic, 0)][0] == 39, res  # INVALID_REPLICA_ASSIGNMENT: broker 99 does not exist
        assert res[("no-such-topic", 0)][0] == 3, res  # UNKNOWN_TOPIC_OR_PARTITION
        c.send(alter_partition_reassignments_v0(2, {topic: {0: None}}))
        _, res = parse_alter_partition_reassignments_v0(c.recv_frame())
        assert res[(topic, 0)][0] == 42 and "cancel" in res[(topic, 0)][1], res
        c.send(alter_partition_reassignments_v0(3, {topic: {0: target}}))
        _, res = parse_alter_partition_reassignments_v0(c.recv_frame())
        assert res[(topic, 0)] == (0, None), res

        def done():
            c.send(list_partition_reassignments_v0(4))
            ongoing = parse_list_partition_reassignments_v0(c.recv_frame())
            if ongoing:
                replicas, adding, removing = ongoing[(topic, 0)]
                assert adding == [spare] and set(removing) == set(old) - set(target), ongoing
                assert set(replicas) == set(old) | set(target), ongoing
                return None
            return True
        wait_for("reassignment finished", done, timeout_s=60)
    after = get_json(cluster[0].admin, f"/v1/topics/{topic}")["partitions"][0]
    assert after["replicas"] == target, after
    wait_for("the leader is in the new replica set",
             lambda: get_json(cluster[0].admin, f"/v1/topics/{topic}")["partitions"][0]["leader"] in target)
    time.sleep(2)
    w.stop.set()
    w.join(timeout=120)
    assert len(w.acked) > 100
    assert not w.failed, f"{len(w.failed)} writes failed for good: {list(w.failed.values())[:3]}"
    got = {(rec.partition, rec.offset): rec.value.decode() for rec in consume_all(bootstrap, topic, 1)}
    for v, (part, off) in w.acked.items():
        assert got.get((part, off)) == v, f"{v} acked at {part}/{off}, read {got.get((part, off))!r}"
    dropped = next(n for n in cluster if n.node_id in set(old) - set(target))
    wait_for("the dropped replica's data is removed", lambda: not dropped.partition_dir(topic, 0).exists())


def test_offset_for_leader_epoch_answers_from_the_log_end(cluster):
    """Kafka answers OffsetForLeaderEpoch from the log end offset. A leader whose high watermark
    trails its log (here: an acks=1 write its frozen followers never acknowledged; on a new leader:
    entries its predecessor committed, until one of its own term commits) must not report the
    epoch ending at the high watermark, or clients conclude their log was truncated."""
    start_all(cluster)
    topic = "epoch-end"
    create_led_topic(cluster, topic, 1, 3)
    p = Producer({"bootstrap.servers": cluster[0].bootstrap, "acks": "all", "enable.idempotence": False})
    for i in range(10):
        p.produce(topic, value=f"v{i}".encode())
    assert p.flush(30) == 0
    leader_id = leaders(cluster[0], topic)[0]
    leader = next(n for n in cluster if n.node_id == leader_id)
    group = next(g for g in get_json(leader.admin, "/v1/raft")["groups"] if g["group"].startswith("p/") and g["role"] == "leader")
    epoch = group["term"]
    host, port = leader.bootstrap.split(":")
    followers = [n for n in cluster if n is not leader]
    with RawConn(host, int(port)) as c:
        # --- freeze both followers: the leader still leads for about a second, but commits nothing
        for f in followers:
            os.kill(f.proc.pid, signal.SIGSTOP)
        try:
            c.send(produce_request_v3(1, topic, 0, build_batch([(None, b"only-on-the-leader")]), acks=1))
            _, [(_, _, err, base)] = parse_produce_v3(c.recv_frame())
            c.send(offset_for_leader_epoch_v2(2, topic, 0, epoch, epoch))
            _, [(_, _, oerr, oepoch, end)] = parse_offset_for_leader_epoch_v2(c.recv_frame())
        finally:
            for f in followers:
                os.kill(f.proc.pid, signal.SIGCONT)
    assert (err, base) == (0, 10), (err, base)
    assert oerr == 0 and oepoch == epoch, (oerr, oepoch)
    assert end == 11, f"the current epoch ends at the log end (11), not the high watermark (10): got {end}"
