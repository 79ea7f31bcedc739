"""Client-side helpers shared by the interop tests: produce with delivery reports, read a topic back
completely, parse kcat output. Every loop here has a deadline."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition


@dataclass
class Delivered:
    partition: int
    offset: int
    error: str | None


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp: int = -1


@dataclass
class Outbound:
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None
    timestamp: int | None = None


def producer(bootstrap: str, **conf) -> Producer:
    base = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 60_000,
        "client.id": "sluice-interop",
    }
    base.update(conf)
    return Producer(base)


def produce(bootstrap: str, topic: str, messages: list[Outbound], timeout_s: float = 120.0, flush_each: bool = False, **conf) -> list[Delivered]:
    """Produces `messages` in order and returns one delivery report per message, in the same order.
    Fails if any report is missing when the deadline passes."""
    p = producer(bootstrap, **conf)
    reports: list[Delivered | None] = [None] * len(messages)
    errors: list[str] = []

    def on_delivery(i):
        def cb(err, msg):
            if err is not None:
                reports[i] = Delivered(-1, -1, str(err))
            else:
                reports[i] = Delivered(msg.partition(), msg.offset(), None)
        return cb

    deadline = time.monotonic() + timeout_s
    for i, m in enumerate(messages):
        kwargs = {"value": m.value, "key": m.key, "on_delivery": on_delivery(i)}
        if m.headers:
            kwargs["headers"] = m.headers
        if m.partition is not None:
            kwargs["partition"] = m.partition
        if m.timestamp is not None:
            kwargs["timestamp"] = m.timestamp
        while True:
            try:
                p.produce(topic, **kwargs)
                break
            except BufferError:
                # The local queue is full: let deliveries drain, but never past the deadline.
                if time.monotonic() > deadline:
                    raise AssertionError(f"producer queue stayed full until the deadline at message {i}")
                p.poll(0.1)
        p.poll(0)
        if flush_each:
            left = p.flush(max(0.1, deadline - time.monotonic()))
            assert left == 0, f"message {i} not delivered before the deadline"
    left = p.flush(max(0.1, deadline - time.monotonic()))
    missing = [i for i, r in enumerate(reports) if r is None]
    assert left == 0 and not missing, f"{len(missing)} of {len(messages)} messages got no delivery report within {timeout_s}s (first: {missing[:5]}); errors: {errors[:5]}"
    return reports  # type: ignore[return-value]


def assert_all_delivered(reports: list[Delivered]) -> None:
    failed = [(i, r.error) for i, r in enumerate(reports) if r.error is not None]
    assert not failed, f"{len(failed)} deliveries failed, first: {failed[:5]}"


def consumer(bootstrap: str, **conf) -> Consumer:
    base = {
        "bootstrap.servers": bootstrap,
        # librdkafka insists on a group id even for assign(); nothing is committed.
        "group.id": f"sluice-interop-{time.monotonic_ns()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        "client.id": "sluice-interop",
    }
    base.update(conf)
    return Consumer(base)


def watermarks(bootstrap: str, topic: str, partitions: int, timeout_s: float = 15.0) -> dict[int, tuple[int, int]]:
    """{partition: (log start offset, high watermark)} via ListOffsets."""
    deadline = time.monotonic() + timeout_s
    out: dict[int, tuple[int, int]] = {}
    c = consumer(bootstrap)
    try:
        for p in range(partitions):
            while True:
                try:
                    out[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=max(0.1, deadline - time.monotonic()))
                    break
                except KafkaException as e:
                    # librdkafka 2.x caches a partition it was told has no leader (a topic just
                    # created) and answers "unknown partition" from that cache without asking the
                    # broker again (rd_kafka_topic_partition_list_query_leaders treats leader -1 as
                    # permanent); the entry lives for metadata.max.age.ms. A fresh client asks anew.
                    if e.args[0].code() != KafkaError._UNKNOWN_PARTITION:
                        raise
                    if time.monotonic() >= deadline:
                        raise AssertionError(f"{topic} partition {p}: {e}; the broker says:\n{describe_for_diagnosis(bootstrap, topic)}") from e
                    time.sleep(0.2)
                    c.close()
                    c = consumer(bootstrap)
        return out
    finally:
        c.close()


def describe_for_diagnosis(bootstrap: str, topic: str) -> str:
    from conftest import SLUICE_BIN

    r = subprocess.run([str(SLUICE_BIN), "topics", "describe", topic, "--bootstrap-server", bootstrap],
                       capture_output=True, text=True, timeout=30)
    return (r.stdout + r.stderr).strip()


def consume_all(bootstrap: str, topic: str, partitions: int, timeout_s: float = 120.0, start: dict[int, int] | None = None, **conf) -> list[Record]:
    """Reads every partition from `start` (default: the beginning) up to the high watermark seen at
    the start of the call, via assign() (no consumer group). Fails on a deadline, never hangs."""
    wm = watermarks(bootstrap, topic, partitions)
    ends = {p: hw for p, (_, hw) in wm.items()}
    c = consumer(bootstrap, **conf)
    out: list[Record] = []
    errors: list[str] = []
    try:
        tps = [TopicPartition(topic, p, (start or {}).get(p, OFFSET_BEGINNING)) for p in range(partitions)]
        c.assign(tps)
        pos = {p: (start or {}).get(p, wm[p][0]) for p in range(partitions)}
        deadline = time.monotonic() + timeout_s
        while any(pos[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise AssertionError(f"consume of {topic} timed out after {timeout_s}s at {pos}, want {ends}; errors: {errors[:5]}")
            for m in c.consume(num_messages=1000, timeout=0.5):
                if m.error() is not None:
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        errors.append(str(m.error()))
                    continue
                out.append(Record(m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or []), m.timestamp()[1]))
                pos[m.partition()] = m.offset() + 1
    finally:
        c.close()
    fatal = [e for e in errors if "FATAL" in e.upper()]
    assert not fatal, f"fatal consumer errors: {fatal[:5]}"
    return out


def parse_kcat_lines(text: str) -> list[Record]:
    """Lines from `kcat -C -f '%p\\t%o\\t%k\\t%s\\t%h\\n'` (headers as k=v,k=v)."""
    out = []
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split("\t")
        assert len(parts) == 5, f"unexpected kcat line {line!r}"
        p, o, k, v, h = parts
        headers = []
        if h:
            for kv in h.split(","):
                hk, _, hv = kv.partition("=")
                headers.append((hk, hv.encode()))
        out.append(Record(int(p), int(o), k.encode() if k else None, v.encode(), headers))
    return out


KCAT_FORMAT = r"%p\t%o\t%k\t%s\t%h\n"


def check_partition_log(records: list[Record], where: str) -> dict[int, list[Record]]:
    """Groups records by partition and checks each partition's offsets are 0,1,2,... with no gap or
    duplicate (Raft-internal entries must take no Kafka offset)."""
    by_p: dict[int, list[Record]] = {}
    for r in records:
        by_p.setdefault(r.partition, []).append(r)
    for p, rs in by_p.items():
        offsets = [r.offset for r in rs]
        first = offsets[0]
        want = list(range(first, first + len(offsets)))
        if offsets != want:
            bad = next(i for i, (a, b) in enumerate(zip(offsets, want)) if a != b)
            raise AssertionError(f"{where}: partition {p} offsets not contiguous at index {bad}: {offsets[max(0, bad - 3):bad + 3]}")
    return by_p


def wait_serving(bootstrap: str, topic: str, partitions: int, timeout_s: float = 30.0) -> float:
    """Waits until ListOffsets answers for every partition; returns the seconds it took.

    /v1/health turning 200 does not promise that every partition is already open after a restart,
    so tests that restart a broker wait here (bounded) before they look at the data."""
    from confluent_kafka import KafkaException

    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout_s:
        try:
            watermarks(bootstrap, topic, partitions, timeout_s=2.0)
            return time.monotonic() - started
        except KafkaException as e:
            last = e
            time.sleep(0.2)
    raise AssertionError(f"{topic}: partitions not served {timeout_s}s after the broker said healthy: {last}")


def check_stored_once(got: list[Record], acked: dict[str, tuple[int, int]], failed: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Each value at one offset at most (the same record delivered twice is the consumer's
    business; one value at two offsets is stored twice), and every acknowledged value at its
    acknowledged offset. Returns where each value is."""
    where: dict[str, tuple[int, int]] = {}
    for r in got:
        v, at = r.value.decode(), (r.partition, r.offset)
        assert where.get(v, at) == at, f"{v} stored twice: at {where[v]} and at {at}; acked at {acked.get(v)}, failed: {failed.get(v)}"
        where[v] = at
    lost = {v: at for v, at in acked.items() if where.get(v) != at}
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged values lost or moved, e.g. {list(lost.items())[:5]}"
    return where


def cli_ok(r, what: str) -> str:
    """A CLI run that must succeed; its output on failure."""
    assert r.returncode == 0, f"{what}: exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
    return r.stdout


def cli_fails(r, what: str, pattern: str) -> None:
    """A CLI run that must fail with a message matching `pattern`, and never panic."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"{what}: expected a non-zero exit, got 0\n{out[-1500:]}"
    assert re.search(pattern, out, re.I), f"{what}: message does not match /{pattern}/:\n{out[-1500:]}"
    assert "panicked" not in out, f"{what}: the CLI panicked:\n{out[-1500:]}"
