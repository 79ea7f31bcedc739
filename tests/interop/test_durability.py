"""Acknowledged writes survive a clean restart and a kill -9, and the log continues exactly where it
was: the next produce gets the next offset (no gap, no reuse)."""

from __future__ import annotations

from conftest import Broker, Clients
from helpers import Outbound, assert_all_delivered, check_partition_log, consume_all, produce, wait_serving, watermarks

PARTITIONS = 3
N = 6_000


def batch_of(tag: str, n: int) -> list[Outbound]:
    return [Outbound(value=f"{tag}-{i:06d}".encode(), key=f"{tag}-k{i % 17}".encode()) for i in range(n)]


def acked_log(reports, outbound) -> dict[tuple[int, int], bytes]:
    assert_all_delivered(reports)
    return {(d.partition, d.offset): m.value for d, m in zip(reports, outbound)}


def assert_log_is(broker: Broker, topic: str, expected: dict[tuple[int, int], bytes], where: str) -> None:
    """The topic holds exactly the acked records, at their acked offsets, and nothing else."""
    wait_serving(broker.bootstrap, topic, PARTITIONS)
    wm = watermarks(broker.bootstrap, topic, PARTITIONS)
    want_ends = {p: 1 + max((o for (pp, o) in expected if pp == p), default=-1) for p in range(PARTITIONS)}
    assert {p: hw for p, (_, hw) in wm.items()} == want_ends, f"{where}: high watermarks {wm}, want {want_ends}"
    records = consume_all(broker.bootstrap, topic, PARTITIONS, timeout_s=120)
    check_partition_log(records, where)
    got = {(r.partition, r.offset): r.value for r in records}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    changed = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    assert not missing and not extra and not changed, (
        f"{where}: {len(missing)} acked records missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), "
        f"{len(changed)} changed (e.g. {[(k, got[k], expected[k]) for k in changed[:3]]})"
    )


def produce_one_per_partition(broker: Broker, topic: str, tag: str, expected: dict) -> None:
    """New writes land at the old high watermark of each partition."""
    ends = {p: hw for p, (_, hw) in watermarks(broker.bootstrap, topic, PARTITIONS).items()}
    msgs = [Outbound(value=f"{tag}-p{p}".encode(), partition=p) for p in range(PARTITIONS)]
    reports = produce(broker.bootstrap, topic, msgs, timeout_s=60)
    assert_all_delivered(reports)
    for p, d in enumerate(reports):
        assert d.offset == ends[p], f"{tag}: new write to partition {p} got offset {d.offset}, want {ends[p]} (gap or reuse)"
        expected[(p, d.offset)] = msgs[p].value


def test_clean_restart_keeps_acked_writes(broker: Broker, clients: Clients):
    topic = "durable-clean"
    clients.create_topic(topic, PARTITIONS)

    # --- produce N acked records (acks=all)
    out = batch_of("a", N)
    expected = acked_log(produce(broker.bootstrap, topic, out, timeout_s=120), out)
    assert_log_is(broker, topic, expected, "before restart")

    # --- SIGTERM: a clean shutdown exits 0
    assert broker.stop() == 0, f"SIGTERM exit code {broker.exit_codes}"

    # --- restart on the same data dir: everything is still there
    broker.start()
    assert_log_is(broker, topic, expected, "after clean restart")

    # --- new writes continue at the next offset
    produce_one_per_partition(broker, topic, "after-restart", expected)
    more = batch_of("b", 500)
    expected.update(acked_log(produce(broker.bootstrap, topic, more, timeout_s=60), more))
    assert_log_is(broker, topic, expected, "after new writes")

    # --- and the topic itself survived (metadata is durable too)
    r = clients.sluice("topics", "describe", topic)
    assert r.returncode == 0 and f"PartitionCount: {PARTITIONS}" in r.stdout, r.stdout + r.stderr


def test_kill9_right_after_last_ack(broker: Broker, clients: Clients):
    topic = "durable-kill9"
    clients.create_topic(topic, PARTITIONS)
    expected: dict = {}

    for round_no in range(3):
        # --- produce, and kill -9 the moment the last delivery report arrives
        out = batch_of(f"r{round_no}", N // 3)
        reports = produce(broker.bootstrap, topic, out, timeout_s=120)
        broker.kill9()
        expected.update(acked_log(reports, out))

        # --- restart: every acked record is there, at its acked offset
        broker.start()
        assert_log_is(broker, topic, expected, f"after kill -9 #{round_no + 1}")

        # --- new writes continue at the next offset
        produce_one_per_partition(broker, topic, f"after-kill-{round_no}", expected)

    # --- a single-record produce, then kill -9 at once: even the smallest acked write is durable
    out = [Outbound(value=b"last", partition=0)]
    expected.update(acked_log(produce(broker.bootstrap, topic, out, timeout_s=30, **{"linger.ms": 0}), out))
    broker.kill9()
    broker.start()
    assert_log_is(broker, topic, expected, "after final kill -9")
