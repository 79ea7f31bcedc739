"""A torn or garbage tail on the active segment (what a crash mid-write leaves) is cut off at startup
with one WARN naming the file and position; everything before it is still served, and new writes
continue right after it. Each run prints its seed; set SLUICE_TEST_SEED to replay one."""

from __future__ import annotations

import os
import random
import re
import shutil
import time

import pytest

from conftest import Broker, Clients
from helpers import Outbound, assert_all_delivered, check_partition_log, consume_all, produce, wait_serving, watermarks
from kafka_wire import parse_batches

TOPIC = "recovery"
BYSTANDER = "zz-bystander"
# Small segments, so the log has rolled a few times and the active segment is not the first one.
CONFIG = {"log.segment.bytes": "65536"}


def seed() -> int:
    s = int(os.environ.get("SLUICE_TEST_SEED", str(time.time_ns() % 2**32)))
    print(f"SLUICE_TEST_SEED={s}")
    return s


def active_segment(broker: Broker):
    pdir = broker.partition_dir(TOPIC, 0)
    logs = sorted(pdir.glob("*.log"))
    assert logs, f"no segments in {pdir} (contents: {sorted(p.name for p in pdir.parent.glob('*/*'))[:20]})"
    for p in logs:
        assert re.fullmatch(r"\d{20}\.log", p.name), f"segment name {p.name} is not {{base_offset:020}}.log"
    return logs, logs[-1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "zeros"])
def test_torn_tail_is_cut_and_the_rest_served(broker_factory, damage):
    s = seed()
    rng = random.Random(s)
    broker = broker_factory(CONFIG)
    Clients(broker).create_topic(TOPIC, 1)
    # A bystander topic whose name sorts after the damaged one: its partitions must not suffer.
    Clients(broker).create_topic(BYSTANDER, 2)
    assert_all_delivered(produce(broker.bootstrap, BYSTANDER, [Outbound(value=f"b{i}".encode(), partition=i % 2) for i in range(10)], timeout_s=60))

    # --- produce ~260 KB in many small batches, then a few single-record batches at the end
    out = [Outbound(value=f"rec-{i:06d}-".encode() + b"x" * rng.randrange(40, 160)) for i in range(2_000)]
    reports = produce(broker.bootstrap, TOPIC, out, timeout_s=120, **{"linger.ms": 0, "batch.num.messages": 40})
    tail = [Outbound(value=f"tail-{i}".encode()) for i in range(20)]
    reports += produce(broker.bootstrap, TOPIC, tail, timeout_s=60, flush_each=True)
    out += tail
    assert_all_delivered(reports)
    assert [d.offset for d in reports] == list(range(len(out)))

    # --- stop cleanly; the active segment must be a clean sequence of batches
    assert broker.stop() == 0
    segments, seg = active_segment(broker)
    assert len(segments) >= 2, f"log.segment.bytes=65536 but only {len(segments)} segment(s) for ~260 KB"
    data = seg.read_bytes()
    batches, valid_end = parse_batches(data)
    assert valid_end == len(data), f"{seg.name}: {len(data) - valid_end} bytes after a clean shutdown are not valid batches"
    data_batches = [b for b in batches if not b.is_internal]
    assert data_batches, f"{seg.name} holds no data batch"
    assert int(seg.stem) <= data_batches[0].base_offset, f"{seg.name} starts after its first batch (base {data_batches[0].base_offset})"

    # --- damage the tail
    if damage == "truncate":
        victim = data_batches[rng.randrange(len(data_batches))]
        cut = rng.randrange(victim.position + 1, victim.end)  # strictly inside a batch: a torn write
        with open(seg, "r+b") as f:
            f.truncate(cut)
        survivors = victim.base_offset
        positions = {victim.position, cut}
        print(f"{damage}: cut {seg.name} at byte {cut} inside the batch at {victim.position} (offsets {victim.base_offset}..{victim.last_offset})")
    else:
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))) if damage == "garbage" else bytes(rng.randrange(1, 3000))
        with open(seg, "ab") as f:
            f.write(junk)
        survivors = len(out)
        positions = {len(data), len(data) + len(junk)}
        print(f"{damage}: appended {len(junk)} bytes to {seg.name} at byte {len(data)}")

    # --- restart: the broker comes up and says what it cut
    broker.start()
    # --- an undamaged topic is served whatever happened to the other one
    wait_serving(broker.bootstrap, BYSTANDER, 2)
    by = consume_all(broker.bootstrap, BYSTANDER, 2, timeout_s=60)
    assert sorted(r.value for r in by) == sorted(f"b{i}".encode() for i in range(10)), f"seed {s}: bystander topic lost data"
    wait_serving(broker.bootstrap, TOPIC, 1)  # the partition (and its recovery) may open after /v1/health
    log = broker.log_text(current_run_only=True)
    warns = [l for l in log.splitlines() if "WARN" in l and seg.name in l]
    assert warns, f"seed {s}: no WARN naming {seg.name} after {damage}; run log:\n{log[-3000:]}"
    assert any(str(p) in w for w in warns for p in positions), f"seed {s}: WARN does not name byte position {sorted(positions)}: {warns}"

    # --- everything before the cut is served, nothing after it
    wm = watermarks(broker.bootstrap, TOPIC, 1)
    assert wm[0] == (0, survivors), f"seed {s}: watermarks {wm[0]}, want (0, {survivors})"
    got = consume_all(broker.bootstrap, TOPIC, 1, timeout_s=120)
    check_partition_log(got, "after recovery")
    assert [(r.offset, r.value) for r in got] == [(i, out[i].value) for i in range(survivors)], f"seed {s}: served log differs"

    # --- reads that start inside the damaged segment use the rebuilt indexes
    if survivors > 1:
        base = int(seg.stem)
        start = rng.randrange(base, survivors) if base < survivors else rng.randrange(survivors)
        part = consume_all(broker.bootstrap, TOPIC, 1, start={0: start}, timeout_s=60)
        assert [(r.offset, r.value) for r in part] == [(i, out[i].value) for i in range(start, survivors)], f"seed {s}: read from {start} differs"

    # --- new writes continue right after the survivors
    more = [Outbound(value=f"new-{i}".encode()) for i in range(50)]
    rep = produce(broker.bootstrap, TOPIC, more, timeout_s=60)
    assert_all_delivered(rep)
    assert [d.offset for d in rep] == list(range(survivors, survivors + 50)), f"seed {s}: new writes at {rep[0].offset}.., want {survivors}"

    # --- a second restart finds nothing to repair and keeps it all
    assert broker.stop() == 0
    broker.start()
    wait_serving(broker.bootstrap, TOPIC, 1)
    again = broker.log_text(current_run_only=True)
    assert not [l for l in again.splitlines() if "WARN" in l and ".log" in l and "trunc" in l.lower()], f"seed {s}: second restart truncated again:\n{again[-2000:]}"
    got = consume_all(broker.bootstrap, TOPIC, 1, timeout_s=120)
    assert [r.value for r in got] == [m.value for m in out[:survivors]] + [m.value for m in more], f"seed {s}: log after second restart differs"


def test_a_recreated_topic_never_meets_a_deleted_topics_files(broker_factory):
    """A crash halfway through deleting a topic's files can leave its Raft state and segments
    behind (here: everything but its `topic_id` file). A topic later created with the same name
    must start empty, not adopt them."""
    broker = broker_factory()
    cli = Clients(broker)
    name = "reborn"
    cli.create_topic(name, 1)
    assert_all_delivered(produce(broker.bootstrap, name, [Outbound(value=f"old-{i}".encode()) for i in range(10)]))
    old_dir = broker.partition_dir(name, 0)
    assert old_dir.exists(), old_dir
    # --- keep a copy of the old topic's files, as a half-finished removal would leave them
    broker.stop()
    leftover = broker.workdir / "leftover"
    shutil.copytree(old_dir, leftover)
    (leftover / "topic_id").unlink()
    broker.start()
    r = cli.sluice("topics", "delete", name)
    assert r.returncode == 0, r.stderr
    wait_for_gone = time.monotonic() + 15
    while name in cli.sluice("topics", "list").stdout.split() and time.monotonic() < wait_for_gone:
        time.sleep(0.2)
    cli.create_topic(name, 1)
    wait_serving(broker.bootstrap, name, 1)
    # --- the leftovers reappear where the old topic kept its partition; restart over them
    broker.stop()
    shutil.rmtree(old_dir, ignore_errors=True)
    shutil.copytree(leftover, old_dir)
    broker.start()
    wait_serving(broker.bootstrap, name, 1)
    assert watermarks(broker.bootstrap, name, 1)[0] == (0, 0), "the new topic holds the deleted topic's records"
    assert_all_delivered(produce(broker.bootstrap, name, [Outbound(value=b"new-0")]))
    assert [r.value for r in consume_all(broker.bootstrap, name, 1)] == [b"new-0"]
    assert not old_dir.exists(), "the deleted topic's leftovers are removed"
