"""The `sluice` client verbs against a live broker: topic admin round trip, errors that say what went
wrong with a non-zero exit, and produce/consume with keys."""

from __future__ import annotations

import re
import time

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from conftest import Clients
from helpers import Outbound, cli_fails, cli_ok, consume_all, produce, watermarks


@pytest.fixture(scope="module")
def cli(shared_broker) -> Clients:
    return Clients(shared_broker)




DESCRIBE_HEAD = re.compile(r"^Topic:\s*(\S+)\s+PartitionCount:\s*(\d+)\s+ReplicationFactor:\s*(\d+)\s+Configs:\s*(.*)$")
DESCRIBE_PART = re.compile(r"^\s+Partition:\s*(\d+)\s+Leader:\s*(-?\d+)\s+Replicas:\s*([\d,]+)\s+Isr:\s*([\d,]*)\s*$")


def describe(cli: Clients, topic: str) -> tuple[int, int, str, list[tuple[int, int, str, str]]]:
    out = cli_ok(cli.sluice("topics", "describe", topic), f"describe {topic}")
    lines = [l for l in out.splitlines() if l.strip()]
    head = DESCRIBE_HEAD.match(lines[0])
    assert head and head.group(1) == topic, f"describe header: {lines[0]!r}"
    parts = []
    for l in lines[1:]:
        m = DESCRIBE_PART.match(l)
        assert m, f"describe partition line: {l!r}"
        parts.append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)))
    return int(head.group(2)), int(head.group(3)), head.group(4), parts


def test_topic_admin_round_trip(cli, shared_broker):
    topic = "cli-admin"

    # --- create prints the Kafka tool's line
    out = cli_ok(cli.sluice("topics", "create", topic, "--partitions", "3", "--replication-factor", "1", "--config", "retention.ms=123456"), "create")
    assert f"Created topic {topic}." in out

    # --- list shows it, one name per line
    names = cli_ok(cli.sluice("topics", "list"), "list").split("\n")
    assert topic in [n.strip() for n in names], names

    # --- describe: 3 partitions, each led by node 1 with itself as the only replica and in sync
    count, rf, configs, parts = describe(cli, topic)
    assert (count, rf) == (3, 1)
    assert "retention.ms=123456" in configs, f"Configs: {configs!r}"
    assert [p[0] for p in parts] == [0, 1, 2]
    assert all(p[1:] == (1, "1", "1") for p in parts), parts

    # --- the same config via DescribeConfigs from a real client
    admin = AdminClient({"bootstrap.servers": shared_broker.bootstrap})
    fut = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)], request_timeout=15)
    entries = list(fut.values())[0].result(timeout=20)
    assert entries["retention.ms"].value == "123456", {k: v.value for k, v in entries.items()}

    # --- alter to 5 partitions; the new ones are usable at once
    cli_ok(cli.sluice("topics", "alter", topic, "--partitions", "5"), "alter")
    count, _, _, parts = describe(cli, topic)
    assert count == 5 and [p[0] for p in parts] == [0, 1, 2, 3, 4], parts
    rep = produce(shared_broker.bootstrap, topic, [Outbound(value=b"into-p4", partition=4)], timeout_s=60)
    assert (rep[0].error, rep[0].partition, rep[0].offset) == (None, 4, 0), rep

    # --- delete; the name disappears and can be reused for a fresh, empty topic
    cli_ok(cli.sluice("topics", "delete", topic), "delete")
    deadline = time.monotonic() + 15
    while topic in cli_ok(cli.sluice("topics", "list"), "list").split() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert topic not in cli_ok(cli.sluice("topics", "list"), "list").split(), "deleted topic still listed after 15 s"
    out = cli_ok(cli.sluice("topics", "create", topic, "--partitions", "1", "--replication-factor", "1"), "re-create")
    assert f"Created topic {topic}." in out
    assert watermarks(shared_broker.bootstrap, topic, 1)[0] == (0, 0), "re-created topic is not empty"
    count, _, configs, _ = describe(cli, topic)
    assert count == 1 and "retention.ms=123456" not in configs, "re-created topic kept the old one's config"


def test_topic_admin_errors(cli):
    topic = "cli-errors"
    cli_ok(cli.sluice("topics", "create", topic, "--partitions", "2", "--replication-factor", "1"), "create")

    # --- each mistake exits non-zero with a message that names the problem
    cli_fails(cli.sluice("topics", "create", topic, "--partitions", "2", "--replication-factor", "1"), "duplicate create", r"already.?exists")
    cli_fails(cli.sluice("topics", "describe", "cli-no-such-topic"), "describe unknown", r"unknown|not exist|no such|not found")
    cli_fails(cli.sluice("topics", "delete", "cli-no-such-topic"), "delete unknown", r"unknown|not exist|no such|not found")
    cli_fails(cli.sluice("topics", "alter", "cli-no-such-topic", "--partitions", "4"), "alter unknown", r"unknown|not exist|no such|not found")
    cli_fails(cli.sluice("topics", "alter", topic, "--partitions", "1"), "shrink partitions", r"partition")
    cli_fails(cli.sluice("topics", "create", "cli-rf3", "--partitions", "1", "--replication-factor", "3"), "replication factor > brokers", r"replication")
    cli_fails(cli.sluice("topics", "create", "cli-zero", "--partitions", "0", "--replication-factor", "1"), "zero partitions", r"partition")
    cli_fails(cli.sluice("topics", "create", "bad name!", "--partitions", "1", "--replication-factor", "1"), "invalid name", r"invalid|illegal|name")

    # --- and none of them changed anything
    names = cli_ok(cli.sluice("topics", "list"), "list").split()
    assert topic in names and not {"cli-rf3", "cli-zero", "bad name!"} & set(names), names
    assert describe(cli, topic)[0] == 2


def test_produce_consume_with_keys(cli, shared_broker):
    topic = "cli-data"
    cli_ok(cli.sluice("topics", "create", topic, "--partitions", "1", "--replication-factor", "1"), "create")
    lines = [(f"user{i % 7}", f"event-{i:04d}") for i in range(200)]

    # --- produce keyed lines through the CLI, with each acks setting
    for acks, chunk in (("all", lines[:100]), ("1", lines[100:150]), ("0", lines[150:])):
        r = cli.sluice("produce", topic, "--key-separator", ":", "--acks", acks, input="".join(f"{k}:{v}\n" for k, v in chunk), timeout_s=60)
        cli_ok(r, f"produce --acks {acks}")

    # --- a real client sees the keys and values split at the separator, in order
    deadline = time.monotonic() + 15
    while watermarks(shared_broker.bootstrap, topic, 1)[0][1] < len(lines) and time.monotonic() < deadline:
        time.sleep(0.2)  # acks=0 is fire-and-forget: give it a moment
    got = consume_all(shared_broker.bootstrap, topic, 1, timeout_s=60)
    assert [(r.key, r.value) for r in got] == [(k.encode(), v.encode()) for k, v in lines]

    # --- the CLI reads them back with keys and offsets
    r = cli.sluice("consume", topic, "--from-beginning", "--max-messages", str(len(lines)), "--print-key", "--print-offset", "--timeout-ms", "15000", timeout_s=60)
    out = [l for l in cli_ok(r, "consume").splitlines() if l.strip()]
    assert len(out) == len(lines), f"consume printed {len(out)} lines, want {len(lines)}: {out[:3]}"
    for off, (line, (k, v)) in enumerate(zip(out, lines)):
        assert line.endswith(v), f"line {off}: {line!r} does not end with the value {v!r}"
        prefix = line[: -len(v)]
        assert k in prefix, f"line {off}: {line!r} lacks the key {k!r}"
        assert str(off) in re.findall(r"\d+", prefix.replace(k, "")), f"line {off}: {line!r} lacks the offset"

    # --- --partition/--offset start exactly there; --max-messages stops exactly then
    r = cli.sluice("consume", topic, "--partition", "0", "--offset", "150", "--max-messages", "5", "--timeout-ms", "15000", timeout_s=60)
    out = [l for l in cli_ok(r, "consume --offset").splitlines() if l.strip()]
    assert out == [v for _, v in lines[150:155]], out

    # --- --timeout-ms ends a consume that runs out of messages, with what it read
    started = time.monotonic()
    r = cli.sluice("consume", topic, "--partition", "0", "--offset", "195", "--timeout-ms", "2000", timeout_s=60)
    assert time.monotonic() - started < 30, "consume ignored --timeout-ms"
    assert [l for l in r.stdout.splitlines() if l.strip()] == [v for _, v in lines[195:]], r.stdout + r.stderr
    assert "panicked" not in r.stderr


def test_produce_to_new_topic_autocreates(cli, shared_broker):
    # --- auto.create.topics.enable defaults to true (as in Kafka): producing creates the topic
    topic = "cli-auto-created"
    r = cli.sluice("produce", topic, input="hello\n", timeout_s=60)
    cli_ok(r, "produce to a new topic")
    names = cli_ok(cli.sluice("topics", "list"), "list").split()
    assert topic in names
    got = consume_all(shared_broker.bootstrap, topic, 1, timeout_s=30)
    assert [x.value for x in got] == [b"hello"]
