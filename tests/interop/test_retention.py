"""Delete retention (retention.bytes, retention.ms, per topic), judged by real clients and the files
on disk: whole old segments go, ListOffsets EARLIEST and Fetch's log_start_offset follow, a fetch
below the log start is OFFSET_OUT_OF_RANGE, the retained suffix is intact; and in a 3-node cluster a
follower that was away while the leader deleted what it had not yet copied catches up from a Raft
snapshot, without the deleted history, byte for byte from its log start."""

from __future__ import annotations

import time

from conftest import Clients
from helpers import Outbound, assert_all_delivered, consume_all, produce, watermarks
from kafka_wire import FETCH, RawConn, Reader, frame, i8, i32, i64, parse_batches, request_header_v1, string
from test_cluster import get_json, start_all, wait_for
from test_replication import all_led, leaders

SEGMENT_BYTES = 16384
RETENTION_BYTES = 65536
CHECK_MS = "200"
ERR_NONE = 0
ERR_OFFSET_OUT_OF_RANGE = 1


# --- the disk ------------------------------------------------------------------------------------


def segment_bases(node, topic: str, partition: int = 0) -> list[int]:
    return sorted(int(p.stem) for p in node.partition_dir(topic, partition).glob("*.log"))


def log_bytes(node, topic: str, partition: int = 0) -> int:
    return sum(p.stat().st_size for p in node.partition_dir(topic, partition).glob("*.log"))


def size_retention_done(node, topic: str, partition: int = 0) -> bool:
    """Nothing left for retention.bytes to delete: Kafka deletes the oldest segment only while
    size - retention.bytes >= its size."""
    segs = sorted(node.partition_dir(topic, partition).glob("*.log"))
    sizes = [p.stat().st_size for p in segs]
    return len(sizes) == 1 or sum(sizes) - RETENTION_BYTES < sizes[0]


def data_batches(node, topic: str, start: int, hw: int, partition: int = 0) -> bytes:
    """The stored data batches with start <= base and last offset < hw, concatenated."""
    out = bytearray()
    for seg in sorted(node.partition_dir(topic, partition).glob("*.log")):
        data = seg.read_bytes()
        batches, _ = parse_batches(data)
        for b in batches:
            if not b.is_internal and b.base_offset >= start and b.last_offset < hw:
                out += data[b.position : b.end]
    return bytes(out)


# --- Fetch v5, which carries log_start_offset ----------------------------------------------------


def fetch_v5(node, topic: str, offset: int, partition: int = 0) -> tuple[int, int, int, bytes]:
    """(error code, high watermark, log start offset, records) for one partition."""
    body = (
        i32(-1) + i32(100) + i32(1) + i32(1 << 20) + i8(0)
        + i32(1) + string(topic)
        + i32(1) + i32(partition) + i64(offset) + i64(-1) + i32(1 << 20)
    )
    with RawConn("127.0.0.1", node.kafka_port) as c:
        c.send(frame(request_header_v1(FETCH, 5, 1) + body))
        resp = c.recv_frame()
    assert resp is not None, "broker closed the connection on Fetch v5"
    r = Reader(resp)
    r.i32()  # correlation id
    r.i32()  # throttle
    assert r.i32() == 1 and r.string() == topic and r.i32() == 1
    assert r.i32() == partition
    err, hw, _lso, log_start = r.i16(), r.i64(), r.i64(), r.i64()
    for _ in range(max(r.i32(), 0)):
        r.i64()
        r.i64()
    size = r.i32()
    records = b"" if size < 0 else r.data[r.pos : r.pos + size]
    return err, hw, log_start, records


# --- helpers -------------------------------------------------------------------------------------


def values(prefix: str, n: int, size: int = 200) -> list[Outbound]:
    return [Outbound(value=f"{prefix}-{i:06d}-".encode().ljust(size, b"x")) for i in range(n)]


def check_suffix(bootstrap: str, topic: str, sent: dict[int, bytes], start: int, hw: int) -> None:
    """Consuming from the beginning returns exactly offsets start..hw-1, each with the value that was
    acknowledged at that offset."""
    recs = consume_all(bootstrap, topic, 1, timeout_s=60)
    offsets = [r.offset for r in recs]
    assert offsets == list(range(start, hw)), f"consumed {offsets[:3]}..{offsets[-3:]} ({len(offsets)}), want {start}..{hw - 1}"
    bad = [r.offset for r in recs if sent.get(r.offset) != r.value]
    assert not bad, f"{len(bad)} records differ from what was acknowledged at their offset, first {bad[:5]}"


def send(bootstrap: str, topic: str, msgs: list[Outbound]) -> dict[int, bytes]:
    """Produces with acks=all; returns {offset: value} of the acknowledged records. Batches stay
    well under segment.bytes, so segment sizes (and the size bounds checked below) are tight."""
    reports = produce(bootstrap, topic, msgs, **{"batch.size": 8192})
    assert_all_delivered(reports)
    return {r.offset: m.value for r, m in zip(reports, msgs)}


def metric(node, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{node.admin}/metrics", timeout=2.0) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


# --- single node ---------------------------------------------------------------------------------


def test_size_retention_deletes_old_segments_and_keeps_the_suffix(broker_factory):
    b = broker_factory({"log.retention.check.interval.ms": CHECK_MS})
    topic = "ret-size"
    Clients(b).create_topic(topic, 1, f"segment.bytes={SEGMENT_BYTES}", f"retention.bytes={RETENTION_BYTES}")
    msgs = values("size", 3000)
    sent = send(b.bootstrap, topic, msgs)
    hw = max(sent) + 1
    assert hw == 3000

    def settled():
        start, _ = watermarks(b.bootstrap, topic, 1)[0]
        return start > 0 and size_retention_done(b, topic) and start
    t0 = time.monotonic()
    start = wait_for("size retention to delete old segments", settled, timeout_s=30)
    print(f"log start {start} after {time.monotonic() - t0:.2f}s; {log_bytes(b, topic)} bytes in {len(segment_bases(b, topic))} segments left")

    # --- whole segments only: the log start is the first remaining segment's base offset, and the
    # log kept at least retention.bytes (Kafka deletes a segment only if that much remains)
    assert segment_bases(b, topic)[0] == start
    assert RETENTION_BYTES <= log_bytes(b, topic) < RETENTION_BYTES + SEGMENT_BYTES
    assert watermarks(b.bootstrap, topic, 1)[0] == (start, hw)
    # --- Fetch: below the log start is out of range; at it, records and the right log_start_offset
    err, f_hw, f_start, recs = fetch_v5(b, topic, start - 1)
    assert (err, f_hw, f_start, recs) == (ERR_OFFSET_OUT_OF_RANGE, hw, start, b"")
    err, f_hw, f_start, recs = fetch_v5(b, topic, start)
    assert (err, f_hw, f_start) == (ERR_NONE, hw, start) and len(recs) > 0
    assert get_json(b.admin, f"/v1/topics/{topic}")["partitions"][0]["log_start_offset"] == start
    # --- the retained suffix is complete and intact
    check_suffix(b.bootstrap, topic, sent, start, hw)
    assert metric(b, "sluice_retention_segments_deleted_total") >= 1
    assert "retention deleted old segments" in b.log_text()

    # --- retention survives a restart and new writes keep their offsets
    b.restart()
    more = values("more", 50)
    sent.update(send(b.bootstrap, topic, more))
    wait_for("size retention after the restart", lambda: size_retention_done(b, topic), timeout_s=20)
    start2 = watermarks(b.bootstrap, topic, 1)[0][0]
    assert start2 >= start and segment_bases(b, topic)[0] == start2
    check_suffix(b.bootstrap, topic, sent, start2, 3050)


def test_time_retention_deletes_segments_older_than_retention_ms(broker_factory):
    b = broker_factory({"log.retention.check.interval.ms": CHECK_MS})
    topic = "ret-time"
    # Ten minutes: records stamped an hour ago are expired, records stamped now are not.
    Clients(b).create_topic(topic, 1, f"segment.bytes={SEGMENT_BYTES}", "retention.ms=600000")
    hour_ago = int(time.time() * 1000) - 3_600_000
    old = [Outbound(value=m.value, timestamp=hour_ago + i) for i, m in enumerate(values("old", 1000))]
    sent = send(b.bootstrap, topic, old)
    new = values("new", 1000)
    sent.update(send(b.bootstrap, topic, new))
    first_new = 1000
    hw = 2000

    start = wait_for("time retention", lambda: watermarks(b.bootstrap, topic, 1)[0][0], timeout_s=30)
    # Let a few more checks run: they must not delete anything that is not expired.
    time.sleep(1.0)
    start = watermarks(b.bootstrap, topic, 1)[0][0]
    bases = segment_bases(b, topic)
    print(f"log start {start}; segments {bases}")
    assert bases[0] == start
    # Every segment holding only old records went; the one where old meets new stays (its largest
    # timestamp is new), and so does everything after it.
    assert start <= first_new
    assert not [x for x in bases[1:] if x <= first_new], f"segments of old records beyond the first survived: {bases}"
    # A segment holds ~75 of these records: the boundary segment starts less than that before.
    assert start > first_new - 150, f"only up to {start} deleted: {bases}"
    check_suffix(b.bootstrap, topic, sent, start, hw)


# --- three nodes ---------------------------------------------------------------------------------


def raft_group(node, topic_prefix: str = "p/") -> dict:
    groups = [g for g in get_json(node.admin, "/v1/raft")["groups"] if g["group"].startswith(topic_prefix)]
    assert len(groups) == 1, groups
    return groups[0]


def same_data_from_common_start(leader, follower, topic: str, hw: int) -> int:
    """Waits until both replicas hold the same data batches, byte for byte, from the later of
    their two log starts up to `hw`, and returns how many bytes that is. Each replica applies
    retention on its own schedule, so a log start can move (and a segment vanish) between two
    reads; comparing from the common start, and again if retention ran in between, is what
    "the same log" means here."""

    def same():
        start = max(raft_group(leader)["log_start_offset"], raft_group(follower)["log_start_offset"])
        try:
            mine = data_batches(follower, topic, start, hw)
            theirs = data_batches(leader, topic, start, hw)
        except FileNotFoundError:
            return False
        print(f"from {start}: {len(mine)} vs {len(theirs)} bytes")
        return mine == theirs and len(mine) > 0 and len(mine)

    return wait_for("the follower's data equals the leader's from their common log start", same, timeout_s=30)


def test_follower_behind_the_leaders_log_start_catches_up_by_snapshot(cluster):
    for n in cluster:
        n.config = {"log.retention.check.interval.ms": CHECK_MS}
    start_all(cluster)
    topic = "ret-repl"
    r = Clients(cluster[0]).sluice(
        "topics", "create", topic, "--partitions", "1", "--replication-factor", "3",
        "--config", f"segment.bytes={SEGMENT_BYTES}", "--config", f"retention.bytes={RETENTION_BYTES}",
    )
    assert r.returncode == 0, r.stderr
    wait_for("partition led", lambda: all_led(cluster, topic, 1))
    bootstrap = ",".join(n.bootstrap for n in cluster)
    leader_id = leaders(cluster[0], topic)[0]
    leader = next(n for n in cluster if n.node_id == leader_id)
    follower = next(n for n in cluster if n.node_id != leader_id)

    first = values("first", 100)
    sent = send(bootstrap, topic, first)
    wait_for("follower has everything", lambda: raft_group(follower)["applied_index"] == raft_group(leader)["applied_index"])
    old_end = raft_group(follower)["log_end_offset"]
    assert old_end == 100

    # --- the follower stops; the leader writes ~700 KB and retention deletes past the follower's end
    assert follower.stop() == 0
    away = values("away", 3000)
    sent.update(send(bootstrap, topic, away))
    leader_start = wait_for(
        "leader's log start past the follower's end",
        lambda: (s := raft_group(leader)["log_start_offset"]) > old_end and s,
        timeout_s=30,
    )
    # More writes while it is away. Retention may snapshot past them too (every pass that deletes
    # snapshots at the last applied entry), so the follower may get them in its snapshot or as entries.
    after = values("after", 100)
    sent.update(send(bootstrap, topic, after))
    hw = 3200
    leader_status = raft_group(leader)
    print(f"leader: log start {leader_start}, snapshot {leader_status['snapshot_index']}, purged {leader_status['purged_index']}, last {leader_status['last_log_index']}")
    assert leader_status["purged_index"] is not None and leader_status["snapshot_index"] >= leader_status["purged_index"]

    # --- back: it catches up
    t0 = time.monotonic()
    follower.start(wait=False)
    follower.wait_ready(timeout_s=60)
    wait_for(
        "follower caught up",
        lambda: (g := raft_group(follower))["applied_index"] == raft_group(leader)["applied_index"] and g["log_end_offset"] == hw,
        timeout_s=60,
    )
    print(f"follower caught up {time.monotonic() - t0:.2f}s after its restart")
    fg = raft_group(follower)
    print(f"follower: log start {fg['log_start_offset']}, snapshot {fg['snapshot_index']}, purged {fg['purged_index']}, "
          f"{log_bytes(follower, topic)} bytes in {segment_bases(follower, topic)}")
    # ... from a snapshot: it has one, its log was restarted after it (one warning says so), and
    # its log starts at or after the leader's and well past where it stopped
    assert fg["snapshot_index"] is not None and fg["purged_index"] is not None
    assert "restarting it after the snapshot" in follower.log_text(current_run_only=True)
    f_start = fg["log_start_offset"]
    assert f_start >= leader_start > old_end
    # ... without the deleted history: no segment of what it had or what the leader deleted
    bases = segment_bases(follower, topic)
    assert all(x > old_end for x in bases), bases
    assert log_bytes(follower, topic) < RETENTION_BYTES + 2 * SEGMENT_BYTES
    # ... and from its log start on, its data batches are the leader's, byte for byte
    same_data_from_common_start(leader, follower, topic, hw)

    # --- writes continue and reach it
    last = values("last", 100)
    sent.update(send(bootstrap, topic, last))
    hw = 3300
    wait_for("follower replicates new writes", lambda: raft_group(follower)["log_end_offset"] == hw and raft_group(follower)["applied_index"] == raft_group(leader)["applied_index"])
    assert same_data_from_common_start(leader, follower, topic, hw) > 100 * 200
    bases = segment_bases(follower, topic)
    assert bases and bases[0] >= f_start > old_end, bases
    wait_for("size retention done everywhere", lambda: all(size_retention_done(n, topic) for n in cluster), timeout_s=20)
    start, end = watermarks(bootstrap, topic, 1)[0]
    assert end == hw
    check_suffix(bootstrap, topic, sent, start, hw)
