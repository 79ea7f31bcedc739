"""Consumer groups across clients: what a confluent-kafka group commits, `sluice consume --group`
resumes from exactly; `sluice groups describe` reports the lag; `reset-offsets` plans without
--execute and moves the offsets with it; `delete` removes the group. Every client call is bounded."""

from __future__ import annotations

import re
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from conftest import Clients
from helpers import Outbound, cli_fails, cli_ok, produce

TOPIC = "grp"
PARTITIONS = 3
RECORDS = 300
FIRST = 120  # what the confluent-kafka member processes and commits
GROUP = "cg"

PARTITION_LINE = re.compile(
    r"^\s+Topic: (\S+)\s+Partition: (\d+)\s+CommittedOffset: (-|\d+)\s+EndOffset: (-|\d+)\s+Lag: (-|\d+)\s+Member: (\S+)\s*$"
)
PLAN_LINE = re.compile(r"^Group: (\S+)\s+Topic: (\S+)\s+Partition: (\d+)\s+CurrentOffset: (-|\d+)\s+NewOffset: (\d+)\s*$")


@pytest.fixture
def cli(broker_factory) -> Clients:
    # New groups form at once (Kafka's 3 s delay for a group's first rebalance only slows tests).
    return Clients(broker_factory({"group.initial.rebalance.delay.ms": "0"}))




def group_consumer(bootstrap: str, **conf) -> Consumer:
    base = {
        "bootstrap.servers": bootstrap,
        "group.id": GROUP,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 10_000,
        "client.id": "interop-group",
    }
    base.update(conf)
    return Consumer(base)


def describe(cli: Clients) -> tuple[str, dict[int, tuple[int | None, int | None, int | None]]]:
    """(header line, {partition: (committed, end, lag)})"""
    out = cli_ok(cli.sluice("groups", "describe", GROUP), "groups describe")
    lines = out.splitlines()
    rows = {}
    for l in lines[1:]:
        m = PARTITION_LINE.match(l)
        if m and m.group(1) == TOPIC:
            val = lambda s: None if s == "-" else int(s)  # noqa: E731
            rows[int(m.group(2))] = (val(m.group(3)), val(m.group(4)), val(m.group(5)))
    return lines[0], rows


def committed_by_confluent(bootstrap: str) -> dict[int, int]:
    c = group_consumer(bootstrap)
    try:
        got = c.committed([TopicPartition(TOPIC, p) for p in range(PARTITIONS)], timeout=20)
        # librdkafka says OFFSET_INVALID (-1001) where the group has no offset; the CLI says -1.
        return {tp.partition: max(tp.offset, -1) for tp in got}
    finally:
        c.close()


def test_groups_across_clients(cli):
    bootstrap = cli.broker.bootstrap
    cli.create_topic(TOPIC, PARTITIONS)
    reports = produce(bootstrap, TOPIC, [Outbound(key=f"k{i}".encode(), value=f"v{i}".encode()) for i in range(RECORDS)], timeout_s=60)
    assert all(r.error is None for r in reports), reports[:5]
    where = {f"v{i}": (r.partition, r.offset) for i, r in enumerate(reports)}
    ends = {p: 1 + max(o for (q, o) in where.values() if q == p) for p in range(PARTITIONS)}
    assert sum(ends.values()) == RECORDS

    # --- a confluent-kafka group member processes FIRST records and commits exactly those
    c = group_consumer(bootstrap)
    processed: list[str] = []
    next_offset: dict[int, int] = {}
    try:
        c.subscribe([TOPIC])
        deadline = time.monotonic() + 60
        while len(processed) < FIRST:
            assert time.monotonic() < deadline, f"confluent consumer got {len(processed)} records in 60 s"
            for m in c.consume(num_messages=FIRST - len(processed), timeout=0.5):
                if m.error() is not None:
                    continue
                processed.append(m.value().decode())
                next_offset[m.partition()] = m.offset() + 1
        # A partition it got nothing from is committed at 0, so every partition has an offset and
        # the group's lag is defined everywhere.
        committed = {p: next_offset.get(p, 0) for p in range(PARTITIONS)}
        c.commit(offsets=[TopicPartition(TOPIC, p, o) for p, o in committed.items()], asynchronous=False)
    finally:
        c.close()
    assert committed_by_confluent(bootstrap) == committed

    # --- list and describe: an empty group, lag = produced - committed
    assert GROUP in cli_ok(cli.sluice("groups", "list"), "groups list").split()
    head, rows = describe(cli)
    assert re.match(rf"^Group: {GROUP}\s+State: Empty\s+Protocol: \S+\s+Coordinator: 1\s+Members: 0$", head), head
    assert rows == {p: (committed[p], ends[p], ends[p] - committed[p]) for p in range(PARTITIONS)}, rows
    assert sum(lag for (_, _, lag) in rows.values()) == RECORDS - FIRST

    # --- sluice consume --group resumes exactly where the group left off (--from-beginning changes
    # nothing for partitions the group has offsets for, as with Kafka's tool), and commits what it printed
    out = cli_ok(
        cli.sluice("consume", TOPIC, "--group", GROUP, "--from-beginning", "--max-messages", "100", "--timeout-ms", "20000",
                   "--consumer-property", "session.timeout.ms=10000", timeout_s=90),
        "consume --group",
    )
    printed = out.split()
    assert len(printed) == 100, out[-500:]
    assert not set(printed) & set(processed), "records the group had committed were printed again"
    by_partition: dict[int, list[int]] = {}
    for v in printed:
        p, o = where[v]
        by_partition.setdefault(p, []).append(o)
    for p, offsets in by_partition.items():
        start = committed[p]
        assert offsets == list(range(start, start + len(offsets))), f"partition {p}: {offsets[:10]}... from {start}"
    after = committed_by_confluent(bootstrap)
    for p in range(PARTITIONS):
        if p in by_partition:
            assert after[p] == max(by_partition[p]) + 1, (p, after)
        else:
            assert after[p] == committed[p], (p, after)
    _, rows = describe(cli)
    assert sum(lag for (_, _, lag) in rows.values()) == RECORDS - FIRST - 100

    # --- the rest, then nothing
    out = cli_ok(cli.sluice("consume", TOPIC, "--group", GROUP, "--timeout-ms", "3000", timeout_s=90), "consume the rest")
    rest = out.split()
    assert sorted(processed + printed + rest) == sorted(where), "not every record exactly once across the clients"
    _, rows = describe(cli)
    assert all(lag == 0 for (_, _, lag) in rows.values()), rows

    # --- while a member is in the group: no reset, no delete
    member = group_consumer(bootstrap)
    try:
        member.subscribe([TOPIC])
        deadline = time.monotonic() + 60
        while not member.assignment():
            assert time.monotonic() < deadline, "confluent consumer got no assignment"
            member.poll(0.2)
        head, _ = describe(cli)
        assert "State: Stable" in head and "Members: 1" in head, head
        out = cli_ok(cli.sluice("groups", "describe", GROUP), "describe with a member")
        assert re.search(r"ClientId: interop-group\s+Host: /?127\.0\.0\.1", out), out
        cli_fails(cli.sluice("groups", "reset-offsets", GROUP, "--topic", TOPIC, "--to-earliest", "--execute"),
              "reset while active", r"can only be reset if the group 'cg' is inactive, but the current state is Stable")
        cli_fails(cli.sluice("groups", "delete", GROUP), "delete while active", r"NON_EMPTY_GROUP")
    finally:
        member.close()

    # --- reset-offsets: a dry run prints the plan and changes nothing; --execute applies it
    before = committed_by_confluent(bootstrap)
    out = cli_ok(cli.sluice("groups", "reset-offsets", GROUP, "--topic", TOPIC, "--to-earliest"), "reset dry run")
    plan = [PLAN_LINE.match(l) for l in out.splitlines()]
    assert all(plan) and len(plan) == PARTITIONS, out
    assert {int(m.group(3)): (int(m.group(4)), int(m.group(5))) for m in plan} == {p: (ends[p], 0) for p in range(PARTITIONS)}, out
    assert committed_by_confluent(bootstrap) == before
    cli_ok(cli.sluice("groups", "reset-offsets", GROUP, "--topic", f"{TOPIC}:0,1", "--to-offset", "2", "--execute"), "reset execute")
    assert committed_by_confluent(bootstrap) == {0: 2, 1: 2, 2: before[2]}
    _, rows = describe(cli)
    assert rows[0][2] == ends[0] - 2 and rows[2][2] == 0, rows
    # confluent-kafka resumes from the reset offsets
    c = group_consumer(bootstrap)
    try:
        c.subscribe([TOPIC])
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"no records after the reset: {seen}"
            for m in c.consume(num_messages=100, timeout=0.5):
                if m.error() is None:
                    seen.setdefault(m.partition(), m.offset())
        assert seen == {0: 2, 1: 2}, seen
    finally:
        c.close()

    # --- delete
    assert cli_ok(cli.sluice("groups", "delete", GROUP), "delete").strip() == f"Deleted group {GROUP}."
    assert GROUP not in cli_ok(cli.sluice("groups", "list"), "list after delete").split()
    cli_fails(cli.sluice("groups", "describe", GROUP), "describe deleted", r"group 'cg' does not exist \(GROUP_ID_NOT_FOUND\)")
    cli_fails(cli.sluice("groups", "delete", GROUP), "delete twice", r"GROUP_ID_NOT_FOUND")


def test_sluice_and_confluent_share_a_group(cli, tmp_path):
    """Both in one group at once: the range assignment the first member (sluice, the leader)
    computes is read by librdkafka, each reads only its partitions, and together every record
    exactly once."""
    import subprocess

    from conftest import SLUICE_BIN

    bootstrap = cli.broker.bootstrap
    topic, group = "shared", "mix"
    cli.create_topic(topic, 4)
    out_path = tmp_path / "sluice-consume.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [str(SLUICE_BIN), "consume", topic, "--group", group, "--from-beginning", "--print-offset",
             "--timeout-ms", "12000", "--consumer-property", "heartbeat.interval.ms=500",
             "--consumer-property", "session.timeout.ms=10000", "--bootstrap-server", bootstrap],
            stdout=out, stderr=subprocess.PIPE,
        )
    c = group_consumer(bootstrap, **{"group.id": group, "enable.auto.commit": True})
    mine: list[str] = []
    try:
        deadline = time.monotonic() + 60
        time.sleep(1.0)  # let sluice join first, so it leads
        c.subscribe([topic])
        while len(c.assignment()) != 2:
            assert time.monotonic() < deadline, f"confluent consumer assignment: {c.assignment()}"
            for m in c.consume(num_messages=10, timeout=0.2):
                if m.error() is None:
                    mine.append(m.value().decode())
        conf_parts = {tp.partition for tp in c.assignment()}
        out = cli_ok(cli.sluice("groups", "describe", group), "describe a shared group")
        assert "State: Stable" in out and "Members: 2" in out, out
        assert "ClientId: sluice-cli" in out and "ClientId: interop-group" in out, out
        reports = produce(bootstrap, topic, [Outbound(key=f"k{i}".encode(), value=f"v{i}".encode()) for i in range(400)], timeout_s=60)
        where = {f"v{i}": r.partition for i, r in enumerate(reports)}
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 4:
            assert time.monotonic() < deadline + 60, "confluent consumer never went quiet"
            for m in c.consume(num_messages=500, timeout=0.5):
                if m.error() is None:
                    mine.append(m.value().decode())
                    quiet_since = time.monotonic()
    finally:
        c.close()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise AssertionError("sluice consume --group did not stop after its --timeout-ms")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    theirs = [l.split("\t", 1)[1] for l in out_path.read_text().splitlines() if "\t" in l]
    assert {where[v] for v in mine} <= conf_parts, (conf_parts, sorted({where[v] for v in mine}))
    assert not {where[v] for v in theirs} & conf_parts, "sluice read a partition assigned to confluent-kafka"
    assert sorted(mine + theirs) == sorted(where), f"{len(mine)} + {len(theirs)} records, want each of {len(where)} once"
