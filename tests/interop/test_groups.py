"""Consumer groups (issue 14), judged by real clients and by the wire.

confluent-kafka consumers share a 6-partition RF 3 topic on a 3-node cluster (eager `range` and
incremental `cooperative-sticky`), one leaves, the coordinator is killed -9 mid-consumption;
kafka-python 3 and `kcat -G` consume in groups at their defaults; raw requests check the
classic group protocol's error codes (member ids, generations, static membership, offsets,
admin APIs, session expiry). Brokers run with `group.initial.rebalance.delay.ms=0` except in the
test that checks the delay. Every loop has a deadline."""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from conftest import KCAT, Broker, Clients
from helpers import Outbound, assert_all_delivered, produce
from kafka_wire import (
    ERR_FENCED_INSTANCE_ID,
    ERR_GROUP_ID_NOT_FOUND,
    ERR_GROUP_SUBSCRIBED_TO_TOPIC,
    ERR_ILLEGAL_GENERATION,
    ERR_INVALID_SESSION_TIMEOUT,
    ERR_MEMBER_ID_REQUIRED,
    ERR_NON_EMPTY_GROUP,
    ERR_NONE,
    ERR_NOT_COORDINATOR,
    ERR_OFFSET_METADATA_TOO_LARGE,
    ERR_REBALANCE_IN_PROGRESS,
    ERR_UNKNOWN_MEMBER_ID,
    ERR_UNKNOWN_TOPIC_OR_PARTITION,
    GroupConn,
    consumer_assignment,
    consumer_subscription,
    parse_consumer_assignment,
    parse_consumer_subscription,
)
from test_cluster import get_json, start_all, wait_for
from test_replication import create_led_topic

NO_DELAY = {"group.initial.rebalance.delay.ms": "0"}


# --- shared helpers -------------------------------------------------------------------------------


def group_info(node, group: str) -> dict | None:
    """`GET /v1/groups/{group}` on the node's admin port; None for a 404 (unknown group)."""
    try:
        return get_json(node.admin, f"/v1/groups/{group}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def committed_by_admin(node, group: str, topic: str) -> dict[int, int]:
    info = group_info(node, group) or {"offsets": []}
    return {o["partition"]: o["committed_offset"] for o in info["offsets"] if o["topic"] == topic}


def wait_coordinator_ready(node, timeout_s: float = 30.0) -> float:
    """Waits until the node answers a group request without COORDINATOR_LOAD_IN_PROGRESS (a new
    coordinator serves once it has applied an entry of its own term); returns the seconds it took.
    Real clients retry that error; the raw requests here must not meet it."""
    started = time.monotonic()

    def ready():
        with GroupConn(node.bootstrap) as g:
            return g.offset_fetch(5, "readiness-probe", {"none": [0]})[0] == ERR_NONE

    wait_for(f"{node.name}'s group coordinator ready", ready, timeout_s=timeout_s)
    return time.monotonic() - started


def meta_last_log_index(node) -> int:
    """The metadata Raft group's last log index on the node (`/v1/raft`)."""
    return next(g["last_log_index"] for g in get_json(node.admin, "/v1/raft")["groups"] if g["group"] == "meta")


def first_running(nodes):
    return next(n for n in nodes if n.is_running())


@pytest.fixture(scope="module")
def gbroker(tmp_path_factory, request):
    """One broker with no initial rebalance delay for the module's single-node tests (each uses its
    own groups and topics)."""
    b = Broker(tmp_path_factory.mktemp("groups"), name="groups", config=NO_DELAY)
    request.module._sluice_shared = b
    b.start()
    wait_coordinator_ready(b)
    yield b
    rc = b.stop()
    assert not b.panics(), "broker panicked:\n" + "\n".join(b.panics()[:20])
    assert rc == 0, f"broker exited {rc} on SIGTERM; log tail:\n{b.log_tail()}"


def make_topic(broker, name: str, partitions: int) -> None:
    Clients(broker).create_topic(name, partitions)


class Member(threading.Thread):
    """One confluent-kafka group member in its own thread: subscribes, consumes in batches and
    commits each batch synchronously, recording every record, every rebalance callback and every
    acknowledged commit. `pause` stops consuming (heartbeats go on in librdkafka's thread);
    `leave_after` makes it commit, note its committed offsets and close() once it has that many
    records; `stop` closes it too. Runs at most `max_s` seconds."""

    def __init__(self, name: str, bootstrap: str, group: str, topic: str, strategy: str = "range", batch: int = 500, max_s: float = 400.0, **conf):
        super().__init__(daemon=True, name=name)
        self.topic = topic
        self.batch = batch
        self.max_s = max_s
        self.conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": name,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": strategy,
            "enable.partition.eof": False,
            "topic.metadata.refresh.interval.ms": 2000,
            **conf,
        }
        if os.environ.get("SLUICE_GROUPS_DEBUG"):
            # librdkafka's group debug log, one file per member, for diagnosing a failure
            self.conf["debug"] = "cgrp,protocol"
            handler = logging.FileHandler(os.path.join(os.environ["SLUICE_GROUPS_DEBUG"], f"{name}.log"))
            log = logging.getLogger(f"member-{name}-{id(self)}")
            log.addHandler(handler)
            log.setLevel(logging.DEBUG)
            self.conf["logger"] = log
        self.records: list[tuple[str, int, int, int]] = []  # (value, partition, offset, batch no)
        self.covered: dict[int, dict[int, int]] = {}  # batch no -> {partition: committed offset} acknowledged after it
        self.acked: list[tuple[float, dict[int, int]]] = []  # (time, {partition: offset}) of each acknowledged commit
        self.failed_commits: list[str] = []
        self.events: list[tuple[str, list[int], float]] = []  # ("assign" | "revoke" | "lost", partitions, time)
        self.assigned: set[int] = set()
        self.final_committed: dict[int, int] | None = None
        self.pause = threading.Event()
        self.stop = threading.Event()
        self.leave_after: int | None = None
        self.error: BaseException | None = None
        self.closed = False

    def _cb(self, kind: str):
        def cb(consumer, partitions):
            self.events.append((kind, sorted(p.partition for p in partitions), time.monotonic()))
        return cb

    def run(self):
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by the test through .error
            self.error = e

    def _commit(self, c: Consumer, batch_no: int) -> None:
        try:
            res = c.commit(asynchronous=False)
        except KafkaException as e:
            self.failed_commits.append(str(e))
            return
        ok = {tp.partition: tp.offset for tp in res or [] if tp.error is None and tp.offset >= 0}
        if ok:
            self.acked.append((time.monotonic(), ok))
        self.covered[batch_no] = ok

    def _run(self):
        c = Consumer(self.conf)
        c.subscribe([self.topic], on_assign=self._cb("assign"), on_revoke=self._cb("revoke"), on_lost=self._cb("lost"))
        deadline = time.monotonic() + self.max_s
        batch_no = 0
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if self.pause.is_set():
                    time.sleep(0.05)
                    continue
                msgs = c.consume(num_messages=self.batch, timeout=0.2)
                self.assigned = {tp.partition for tp in c.assignment()}
                got = [m for m in msgs if m.error() is None]
                if not got:
                    continue
                batch_no += 1
                for m in got:
                    self.records.append((m.value().decode(), m.partition(), m.offset(), batch_no))
                self._commit(c, batch_no)
                if self.leave_after is not None and len(self.records) >= self.leave_after:
                    break
            if self.leave_after is not None:
                committed = c.committed([TopicPartition(self.topic, p) for p in sorted(self.assigned)], timeout=10)
                self.final_committed = {tp.partition: tp.offset for tp in committed}
        finally:
            c.close()
            self.closed = True

    def values(self) -> set[str]:
        return {r[0] for r in self.records}


def received(members: list[Member]) -> dict[str, list[tuple[str, int, int, int]]]:
    """value -> every receipt of it as (member, partition, offset, batch no), over all members."""
    out: dict[str, list] = {}
    for m in members:
        for v, p, o, b in list(m.records):
            out.setdefault(v, []).append((m.name, p, o, b))
    return out


def wait_consumed(members: list[Member], want: set[str], timeout_s: float = 120.0) -> None:
    def done():
        for m in members:
            if m.error is not None:
                raise AssertionError(f"{m.name} failed: {m.error!r}")
        return want <= set(received(members))

    try:
        wait_for(f"{len(want)} values consumed", done, timeout_s=timeout_s, interval_s=0.5)
    except AssertionError:
        missing = want - set(received(members))
        raise AssertionError(f"{len(missing)} of {len(want)} values never consumed in {timeout_s}s, e.g. {sorted(missing)[:5]}; "
                             f"assignments {[(m.name, sorted(m.assigned)) for m in members]}; errors {[m.error for m in members]}")


def unexplained_duplicates(members: list[Member]) -> list:
    """Values received more than once where an earlier receipt had been covered by an acknowledged
    commit (a synchronous commit of its batch that included its partition past its offset): those
    must never come back. Receipts whose commit failed (a rebalance in between) may repeat."""
    covered = {m.name: m.covered for m in members}
    bad = []
    for v, rs in received(members).items():
        for name, p, o, b in rs[:-1] if len(rs) > 1 else []:
            if covered[name].get(b, {}).get(p, -1) > o:
                bad.append((v, rs))
                break
    return bad


def assigned_of(members: list[Member]) -> list[list[int]]:
    return [sorted(m.assigned) for m in members]


def stop_all(members: list[Member]) -> None:
    for m in members:
        m.stop.set()
    for m in members:
        m.join(30)


def messages(prefix: str, count: int, partitions: int) -> list[Outbound]:
    return [Outbound(f"{prefix}{i}".encode(), partition=i % partitions) for i in range(count)]


# --- 1. three confluent-kafka consumers on a 3-node cluster -------------------------------------


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_three_consumers_share_and_take_over_a_leavers_partitions(cluster, strategy):
    for n in cluster:
        n.config = dict(NO_DELAY)
    start_all(cluster)
    topic, group = "grp-share", f"share-{strategy}"
    create_led_topic(cluster, topic, 6, 3)
    bootstrap = ",".join(n.bootstrap for n in cluster)
    members = [Member(f"m{i}", bootstrap, group, topic, strategy=strategy, batch=100) for i in range(3)]
    for m in members:
        m.start()
    try:
        # --- three members, two partitions each, disjoint, the group Stable
        def stable():
            a = assigned_of(members)
            info = group_info(first_running(cluster), group)
            return (all(len(x) == 2 for x in a) and sorted(sum(a, [])) == list(range(6))
                    and info and info["state"] == "Stable" and len(info["members"]) == 3) and info
        try:
            info = wait_for("three members with two partitions each", stable, timeout_s=60)
        except AssertionError as e:
            raise AssertionError(f"{e}\nassigned {assigned_of(members)}; group {group_info(first_running(cluster), group)}; "
                                 f"callbacks {[(m.name, [(k, ps) for k, ps, _ in m.events]) for m in members]}") from None
        assert info["protocol"] == strategy, info
        by_admin = {m["client_id"]: sorted(p for a in m["assignment"] if a["topic"] == topic for p in a["partitions"]) for m in info["members"]}
        assert by_admin == {m.name: sorted(m.assigned) for m in members}, (by_admin, assigned_of(members))
        stable_at = time.monotonic()
        stable_assignment = {m.name: set(m.assigned) for m in members}

        # --- 10,000 messages while membership is stable: each received exactly once, by its owner
        assert_all_delivered(produce(bootstrap, topic, messages("a", 10_000, 6)))
        want = {f"a{i}" for i in range(10_000)}
        wait_consumed(members, want)
        rs = received(members)
        twice = {v: r for v, r in rs.items() if len(r) > 1}
        assert not twice, f"{len(twice)} values received twice with stable membership, e.g. {list(twice.items())[:3]}"
        for v, [(name, p, _, _)] in rs.items():
            assert p in stable_assignment[name], f"{v} from partition {p} went to {name}, which owns {stable_assignment[name]}"

        # --- the leaver stops consuming; 10,000 more pile up on its partitions
        leaver, survivors = members[2], members[:2]
        leaver_parts = sorted(stable_assignment[leaver.name])
        leaver.pause.set()
        time.sleep(0.5)
        assert_all_delivered(produce(bootstrap, topic, messages("b", 10_000, 6)))
        theirs = {f"b{i}" for i in range(10_000) if i % 6 not in leaver_parts}
        wait_consumed(survivors, theirs)
        # --- it takes 1,000 of its backlog, commits them, and leaves (close())
        leaver.leave_after = len(leaver.records) + 1000
        leaver.pause.clear()
        leaver.join(60)
        assert leaver.closed and leaver.error is None, leaver.error
        left_at = {p: o for p, o in (leaver.final_committed or {}).items()}
        assert sorted(left_at) == leaver_parts, left_at
        wait_for("the leaver's commits in the replicated state",
                 lambda: committed_by_admin(first_running(cluster), group, topic).items() >= left_at.items(), timeout_s=10)

        # --- its partitions move to the two others, who go on from its committed offsets
        def taken_over():
            a = assigned_of(survivors)
            return sorted(sum(a, [])) == list(range(6)) and all(len(x) == 3 for x in a)
        wait_for("the leaver's partitions taken over", taken_over, timeout_s=60)
        assert_all_delivered(produce(bootstrap, topic, messages("c", 10_000, 6)))
        want = {f"{k}{i}" for k in "abc" for i in range(10_000)}
        wait_consumed(members, want)
        for p in leaver_parts:
            first = min((o for s in survivors for _, rp, o, _ in s.records if rp == p), default=None)
            assert first == left_at[p], f"partition {p}: the leaver committed {left_at[p]}, the survivors started at {first}"
        bad = unexplained_duplicates(members)
        assert not bad, f"{len(bad)} values received again after an acknowledged commit covered them, e.g. {bad[:3]}"
        dups = sum(len(r) - 1 for r in received(members).values())
        print(f"{strategy}: {len(want)} values, {dups} received twice (commits that failed in a rebalance: "
              f"{[len(m.failed_commits) for m in members]})")

        # --- eager (range): survivors gave everything back; cooperative: they kept what they had
        for s in survivors:
            after = [(k, ps) for k, ps, t in s.events if t > stable_at]
            revoked = [ps for k, ps in after if k in ("revoke", "lost") and ps]
            if strategy == "cooperative-sticky":
                assert not revoked, f"{s.name} had partitions revoked in an incremental rebalance: {after}"
                assert stable_assignment[s.name] <= s.assigned, (s.name, stable_assignment[s.name], s.assigned)
                gained = [ps for k, ps in after if k == "assign"]
                assert all(set(ps) <= set(leaver_parts) for ps in gained), f"{s.name} was given more than the leaver's partitions: {after}"
            else:
                assert revoked and set(revoked[0]) == stable_assignment[s.name], f"{s.name}: eager rebalance should revoke all: {after}"

        # --- everything committed: the admin endpoint shows lag 0 on every partition
        def all_committed():
            info = group_info(first_running(cluster), group)
            offs = {o["partition"]: o for o in info["offsets"] if o["topic"] == topic}
            return len(offs) == 6 and all(o["committed_offset"] == o["end_offset"] and o["lag"] == 0 for o in offs.values()) and info
        info = wait_for("every offset committed", all_committed, timeout_s=30)
        assert sum(o["committed_offset"] for o in info["offsets"]) == 30_000
        assert len(info["members"]) == 2 and info["state"] == "Stable", info
    finally:
        stop_all(members)
    assert all(m.error is None for m in members), [m.error for m in members]


# --- 2. kafka-python and kcat at their defaults --------------------------------------------------


def test_kafka_python_consumer_group_at_defaults(gbroker):
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    topic, group = "grp-kp", "kp-group"
    make_topic(gbroker, topic, 3)

    def consume(consumer, want: set[str], timeout_s: float = 60.0) -> list[tuple[int, int, str]]:
        got = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not want <= {v for _, _, v in got}:
            for tp, recs in consumer.poll(timeout_ms=500).items():
                got += [(tp.partition, r.offset, r.value.decode()) for r in recs]
        assert want <= {v for _, _, v in got}, f"kafka-python got {len(got)} records, missing {len(want - {v for _, _, v in got})}"
        return got

    c = KafkaConsumer(topic, bootstrap_servers=[gbroker.bootstrap], group_id=group)
    try:
        # --- subscribe and poll until the group gives it all three partitions (defaults: offset
        # reset "latest", so produce only once it is assigned)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(c.assignment()) < 3:
            c.poll(timeout_ms=300)
        assert {tp.partition for tp in c.assignment()} == {0, 1, 2}, c.assignment()
        for tp in c.assignment():
            c.position(tp)  # the "latest" reset is done before anything is produced
        assert_all_delivered(produce(gbroker.bootstrap, topic, messages("kp", 900, 3)))
        got = consume(c, {f"kp{i}" for i in range(900)})
        assert len(got) == 900, f"{len(got)} records for 900 values"
        c.commit()
        committed = {p: c.committed(KTP(topic, p)) for p in range(3)}
        assert committed == {0: 300, 1: 300, 2: 300}, committed
        info = group_info(gbroker, group)
        assert info["state"] == "Stable" and info["protocol_type"] == "consumer", info
        assert [m["client_id"] for m in info["members"]][0].startswith("kafka-python"), info["members"]
        assert committed_by_admin(gbroker, group, topic) == {0: 300, 1: 300, 2: 300}
    finally:
        c.close()
    # --- a new consumer in the group resumes at the committed offsets: only the new records
    assert_all_delivered(produce(gbroker.bootstrap, topic, messages("kq", 300, 3)))
    c2 = KafkaConsumer(topic, bootstrap_servers=[gbroker.bootstrap], group_id=group)
    try:
        got = consume(c2, {f"kq{i}" for i in range(300)})
        assert sorted(v for _, _, v in got) == sorted(f"kq{i}" for i in range(300)), "records before the committed offsets came back"
        assert min(o for _, o, _ in got) == 300
    finally:
        c2.close()


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed")
def test_kcat_balanced_consumer(gbroker):
    topic, group = "grp-kcat", "kcat-group"
    make_topic(gbroker, topic, 3)
    assert_all_delivered(produce(gbroker.bootstrap, topic, messages("k", 900, 3)))
    cl = Clients(gbroker)
    fmt = r"%p %o %s\n"
    r = cl.kcat("-X", "auto.offset.reset=earliest", "-c", "900", "-q", "-f", fmt, "-G", group, topic, timeout_s=90)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [l.split() for l in r.stdout.splitlines() if l]
    assert sorted(v for _, _, v in got) == sorted(f"k{i}" for i in range(900)), f"kcat -G got {len(got)} records"
    # --- librdkafka's auto commit stores the positions when kcat closes
    wait_for("kcat's offsets committed", lambda: committed_by_admin(gbroker, group, topic) == {0: 300, 1: 300, 2: 300}, timeout_s=20)
    # --- a second balanced consumer of the group reads only what came after
    assert_all_delivered(produce(gbroker.bootstrap, topic, messages("l", 90, 3)))
    r = cl.kcat("-X", "auto.offset.reset=earliest", "-c", "90", "-q", "-f", fmt, "-G", group, topic, timeout_s=90)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [l.split() for l in r.stdout.splitlines() if l]
    assert sorted(v for _, _, v in got) == sorted(f"l{i}" for i in range(90)), got[:5]
    assert all(int(o) >= 300 for _, o, _ in got)


# --- 3. kill -9 of the coordinator during consumption --------------------------------------------


class Writer(threading.Thread):
    """An idempotent confluent-kafka producer writing `count` values, paced, recording what was acked."""

    def __init__(self, bootstrap: str, topic: str, count: int, prefix: str = "w"):
        super().__init__(daemon=True)
        self.p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                           "message.timeout.ms": 120_000, "topic.metadata.refresh.interval.ms": 1000})
        self.topic, self.count, self.prefix = topic, count, prefix
        self.acked: set[str] = set()
        self.failed: dict[str, str] = {}

    def run(self):
        deadline = time.monotonic() + 200
        for i in range(self.count):
            v = f"{self.prefix}{i}"

            def cb(err, msg, v=v):
                if err is None:
                    self.acked.add(v)
                else:
                    self.failed[v] = str(err)

            while True:
                try:
                    self.p.produce(self.topic, key=str(i).encode(), value=v.encode(), on_delivery=cb)
                    break
                except BufferError:
                    if time.monotonic() > deadline:
                        raise
                    self.p.poll(0.05)
            self.p.poll(0)
            time.sleep(0.001)
        self.p.flush(max(1.0, deadline - time.monotonic()))


class OffsetSampler(threading.Thread):
    """Reads the group's committed offsets from one node's admin endpoint every 100 ms and notes
    any that went backwards (that node's replicated view must only move forward)."""

    def __init__(self, node, group: str, topic: str):
        super().__init__(daemon=True)
        self.node, self.group, self.topic = node, group, topic
        self.stop = threading.Event()
        self.last: dict[int, int] = {}
        self.backwards: list[tuple[int, int, int]] = []
        self.samples = 0

    def run(self):
        deadline = time.monotonic() + 400
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                now = committed_by_admin(self.node, self.group, self.topic)
            except Exception:  # noqa: BLE001 - the metadata group may be electing; try again
                time.sleep(0.1)
                continue
            self.samples += 1
            for p, o in now.items():
                if o < self.last.get(p, -1):
                    self.backwards.append((p, self.last[p], o))
                self.last[p] = max(o, self.last.get(p, -1))
            time.sleep(0.1)


def test_coordinator_killed_during_consumption(cluster):
    for n in cluster:
        n.config = dict(NO_DELAY)
    start_all(cluster)
    topic, group = "grp-kill", "kill-group"
    create_led_topic(cluster, topic, 6, 3)
    bootstrap = ",".join(n.bootstrap for n in cluster)
    members = [Member(f"k{i}", bootstrap, group, topic, batch=200) for i in range(2)]
    for m in members:
        m.start()
    w = Writer(bootstrap, topic, 20_000)
    sampler = None
    try:
        wait_for("two members sharing six partitions",
                 lambda: sorted(sum(assigned_of(members), [])) == list(range(6)) and all(len(a) == 3 for a in assigned_of(members)),
                 timeout_s=60)
        info = wait_for("the group Stable", lambda: (i := group_info(cluster[0], group)) and i["state"] == "Stable" and i, timeout_s=30)
        coord_id = info["coordinator"]
        # --- FindCoordinator from every node names the same node as the admin endpoint
        for n in cluster:
            with GroupConn(n.bootstrap) as g:
                fc = g.find_coordinator(group, version=3)
            assert fc["error"] == ERR_NONE and fc["node_id"] == coord_id, (n.name, fc, coord_id)
        victim = next(n for n in cluster if n.node_id == coord_id)
        watcher = next(n for n in cluster if n.node_id != coord_id)
        sampler = OffsetSampler(watcher, group, topic)
        sampler.start()
        w.start()
        wait_for("consumption under way", lambda: sum(len(m.acked) for m in members) >= 10 and len(w.acked) >= 3000, timeout_s=60)

        # --- kill -9 the coordinator mid-consumption
        before = dict(committed_by_admin(victim, group, topic))
        generation = group_info(victim, group)["generation"]
        victim.kill9()
        killed_at = time.monotonic()
        acked_before: dict[int, int] = {}
        for m in members:
            for t, offs in m.acked:
                if t < killed_at:
                    for p, o in offs.items():
                        acked_before[p] = max(o, acked_before.get(p, -1))
        print(f"killed coordinator {coord_id}; committed then {before}; acknowledged before the kill {acked_before}")

        # --- the group re-forms on the new coordinator and consumption goes on to the end
        def reformed():
            i = group_info(watcher, group)
            return i and i["coordinator"] not in (None, coord_id) and i["state"] == "Stable" and len(i["members"]) == 2 and i
        info = wait_for("the group Stable on a new coordinator", reformed, timeout_s=90)
        # --- the members carry on in their generation: the group's state survived, no rebalance
        assert info["generation"] == generation, f"generation {generation} before the kill, {info['generation']} after"
        new_coord = next(n for n in cluster if n.node_id == info["coordinator"])
        w.join(200)
        assert not w.is_alive(), "the producer did not finish"
        assert len(w.acked) >= 19_000, f"only {len(w.acked)} of 20,000 acknowledged; failures {list(w.failed.items())[:3]}"
        wait_consumed(members, w.acked, timeout_s=180)
        # --- no committed offset went backwards: what was acknowledged survives the kill, and the
        # end state has everything committed
        after = committed_by_admin(new_coord, group, topic)
        lost = {p: (o, after.get(p)) for p, o in acked_before.items() if after.get(p, -1) < o}
        assert not lost, f"acknowledged commits lost with the coordinator (partition: (acked, now)): {lost}"
        lower = {p: (o, after.get(p)) for p, o in before.items() if after.get(p, -1) < o}
        assert not lower, f"committed offsets went backwards across the kill: {lower}"

        def all_committed():
            i = group_info(new_coord, group)
            offs = {o["partition"]: o for o in i["offsets"] if o["topic"] == topic}
            return len(offs) == 6 and all(o["committed_offset"] == o["end_offset"] for o in offs.values())
        wait_for("every offset committed on the new coordinator", all_committed, timeout_s=30)
        final = group_info(new_coord, group)
        assert (final["generation"], final["state"], len(final["members"])) == (generation, "Stable", 2), \
            f"the members should have carried on in generation {generation}: {final}"
        with GroupConn(new_coord.bootstrap) as g:
            err, fetched = g.offset_fetch(5, group, {topic: list(range(6))})
        end = committed_by_admin(new_coord, group, topic)
        assert err == ERR_NONE and {p: o for (_, p), (o, _, _) in fetched.items()} == end, (err, fetched, end)
        bad = unexplained_duplicates(members)
        assert not bad, f"values received again after an acknowledged commit covered them, e.g. {bad[:3]}"
        # --- the old coordinator comes back with the group and its offsets in its replicated state
        victim.start(wait=False)
        victim.wait_ready(timeout_s=60)
        wait_for("the restarted node's view of the group", lambda: committed_by_admin(victim, group, topic) == end, timeout_s=30)
        wait_for("every node naming the same coordinator",
                 lambda: group_info(victim, group)["coordinator"] == group_info(watcher, group)["coordinator"], timeout_s=10)
    finally:
        stop_all(members)
        if sampler is not None:
            sampler.stop.set()
            sampler.join(10)
    assert sampler.samples > 20, f"only {sampler.samples} samples of the committed offsets"
    assert not sampler.backwards, f"committed offsets went backwards on node {sampler.node.node_id}: {sampler.backwards[:10]}"
    assert all(m.error is None for m in members), [m.error for m in members]


# --- 4. the wire -----------------------------------------------------------------------------------


def join_synced(g: GroupConn, group: str, topic: str, version: int = 5, partitions: int = 1, **kw) -> dict:
    """Joins a group alone (asking for a member id first when the version needs one), then syncs as
    leader with every partition of `topic`. Returns the join response plus "assignment"."""
    j = g.join(version, group, protocols=[("range", consumer_subscription([topic]))], **kw)
    if j["error"] == ERR_MEMBER_ID_REQUIRED:
        j = g.join(version, group, member_id=j["member_id"], protocols=[("range", consumer_subscription([topic]))], **kw)
    assert j["error"] == ERR_NONE, j
    assignments = {m["member_id"]: consumer_assignment({topic: list(range(partitions))}) for m in j["members"]}
    s = g.sync(3, group, j["generation"], j["member_id"], assignments, instance_id=kw.get("instance_id"))
    assert s["error"] == ERR_NONE, s
    j["assignment"] = parse_consumer_assignment(s["assignment"])
    return j


@pytest.mark.parametrize("version", range(10))
def test_join_group_versions_and_member_id_required(gbroker, version):
    group = f"join-v{version}"
    with GroupConn(gbroker.bootstrap) as g:
        j = g.join(version, group)
        if version < 4:
            # --- v0–v3: a member id comes with the join itself
            assert j["error"] == ERR_NONE, j
            assert j["member_id"] and j["leader"] == j["member_id"] and j["generation"] >= 1, j
        else:
            # --- v4+: MEMBER_ID_REQUIRED with the id to use, and joining with it works
            assert j["error"] == ERR_MEMBER_ID_REQUIRED, j
            mid = j["member_id"]
            assert mid, "MEMBER_ID_REQUIRED without a member id"
            j = g.join(version, group, member_id=mid)
            assert j["error"] == ERR_NONE and j["member_id"] == mid and j["leader"] == mid, j
        assert [m["member_id"] for m in j["members"]] == [j["member_id"]], "the leader is told every member"
        assert j["protocol"] == "range"
        assert parse_consumer_subscription(j["members"][0]["metadata"]) == ["t"]
        s = g.sync(min(version, 5), group, j["generation"], j["member_id"], {j["member_id"]: consumer_assignment({"t": [0]})})
        assert s["error"] == ERR_NONE and parse_consumer_assignment(s["assignment"]) == {"t": [0]}, s
        assert g.heartbeat(min(version, 4), group, j["generation"], j["member_id"]) == ERR_NONE
        err, members = g.leave(min(version, 5), group, j["member_id"])
        assert err == ERR_NONE and all(e == ERR_NONE for _, e in members), (err, members)
    assert group_info(gbroker, group)["state"] == "Empty"


def test_session_timeout_bounds(gbroker):
    with GroupConn(gbroker.bootstrap) as g:
        for ms in (5999, 1_800_001):
            j = g.join(3, "bad-session", session_ms=ms)
            assert j["error"] == ERR_INVALID_SESSION_TIMEOUT, (ms, j)


def test_heartbeat_generation_member_and_rebalance_errors(gbroker):
    topic, group = "grp-hb", "hb-group"
    make_topic(gbroker, topic, 2)
    with GroupConn(gbroker.bootstrap, "member-a") as a, GroupConn(gbroker.bootstrap, "member-b") as b:
        ja = join_synced(a, group, topic, partitions=2)
        gen, mid = ja["generation"], ja["member_id"]
        assert a.heartbeat(4, group, gen, mid) == ERR_NONE
        assert a.heartbeat(4, group, gen + 1, mid) == ERR_ILLEGAL_GENERATION
        assert a.heartbeat(4, group, gen - 1, mid) == ERR_ILLEGAL_GENERATION
        assert a.heartbeat(4, group, gen, "no-such-member") == ERR_UNKNOWN_MEMBER_ID
        assert a.heartbeat(4, "no-such-group", 1, "no-such-member") == ERR_UNKNOWN_MEMBER_ID
        # --- a second member joins: the first hears REBALANCE_IN_PROGRESS, rejoins, and both get
        # the next generation, with the first still the leader
        cb = b.send_join(3, group, protocols=[("range", consumer_subscription([topic]))])
        wait_for("REBALANCE_IN_PROGRESS on the first member's heartbeat", lambda: a.heartbeat(4, group, gen, mid) == ERR_REBALANCE_IN_PROGRESS, timeout_s=10)
        ca = a.send_join(5, group, member_id=mid, protocols=[("range", consumer_subscription([topic]))])
        ja2, jb2 = a.recv_join(ca), b.recv_join(cb)
        assert ja2["error"] == ERR_NONE and jb2["error"] == ERR_NONE, (ja2, jb2)
        assert ja2["generation"] == jb2["generation"] == gen + 1, (gen, ja2, jb2)
        assert ja2["leader"] == jb2["leader"] == mid, (mid, ja2, jb2)
        assert sorted(m["member_id"] for m in ja2["members"]) == sorted([mid, jb2["member_id"]]) and jb2["members"] == []
        assert a.heartbeat(4, group, gen, mid) == ERR_ILLEGAL_GENERATION, "the old generation is over"
        gen2, mb = ja2["generation"], jb2["member_id"]
        sa = a.sync(3, group, gen2, mid, {mid: consumer_assignment({topic: [0]}), mb: consumer_assignment({topic: [1]})})
        cb = b.sync(3, group, gen2, mb)
        assert sa["error"] == ERR_NONE and cb["error"] == ERR_NONE and parse_consumer_assignment(cb["assignment"]) == {topic: [1]}, (sa, cb)
        # --- a known follower rejoining with the same subscription keeps its generation at once
        started = time.monotonic()
        jb3 = b.join(3, group, member_id=mb, protocols=[("range", consumer_subscription([topic]))])
        assert jb3["error"] == ERR_NONE and jb3["generation"] == gen2 and time.monotonic() - started < 2, jb3
        assert a.heartbeat(4, group, gen2, mid) == ERR_NONE and group_info(gbroker, group)["state"] == "Stable"
        # --- with a changed subscription it starts a rebalance
        cb = b.send_join(3, group, member_id=mb, protocols=[("range", consumer_subscription([topic, "grp-hb-other"]))])
        wait_for("REBALANCE_IN_PROGRESS after a changed subscription", lambda: a.heartbeat(4, group, gen2, mid) == ERR_REBALANCE_IN_PROGRESS, timeout_s=10)
        ca = a.send_join(5, group, member_id=mid, protocols=[("range", consumer_subscription([topic]))])
        ja4, jb4 = a.recv_join(ca), b.recv_join(cb)
        assert ja4["error"] == jb4["error"] == ERR_NONE and ja4["generation"] == jb4["generation"] == gen2 + 1, (ja4, jb4)
        subs = {m["member_id"]: parse_consumer_subscription(m["metadata"]) for m in ja4["members"]}
        assert subs == {mid: [topic], mb: [topic, "grp-hb-other"]}, subs


def test_static_member_is_fenced_by_a_new_instance(gbroker):
    topic, group = "grp-static", "static-group"
    make_topic(gbroker, topic, 1)
    with GroupConn(gbroker.bootstrap, "first") as a, GroupConn(gbroker.bootstrap, "second") as b:
        ja = join_synced(a, group, topic, version=5, instance_id="inst-1")
        assert ja["members"][0]["instance_id"] == "inst-1"
        assert a.heartbeat(3, group, ja["generation"], ja["member_id"], instance_id="inst-1") == ERR_NONE
        # --- the same group.instance.id joins again with no member id: it takes over the slot
        jb = b.join(5, group, instance_id="inst-1", protocols=[("range", consumer_subscription([topic]))])
        assert jb["error"] == ERR_NONE and jb["member_id"] and jb["member_id"] != ja["member_id"], jb
        # --- in its old place: the same generation, no rebalance, and its old assignment
        assert jb["generation"] == ja["generation"], (ja, jb)
        sb = b.sync(3, group, jb["generation"], jb["member_id"], {}, instance_id="inst-1")
        assert sb["error"] == ERR_NONE and parse_consumer_assignment(sb["assignment"]) == ja["assignment"] == {topic: [0]}, sb
        assert group_info(gbroker, group)["state"] == "Stable"
        # --- and the first is fenced wherever it speaks
        assert a.heartbeat(3, group, jb["generation"], ja["member_id"], instance_id="inst-1") == ERR_FENCED_INSTANCE_ID
        errs = a.commit(7, group, {(topic, 0): 1}, generation=jb["generation"], member_id=ja["member_id"], instance_id="inst-1")
        assert errs == {(topic, 0): ERR_FENCED_INSTANCE_ID}, errs
        info = group_info(gbroker, group)
        assert [(m["member_id"], m["instance_id"], m["client_id"]) for m in info["members"]] == [(jb["member_id"], "inst-1", "second")], info


def test_simple_consumer_commits_and_offset_fetch_returns_them(gbroker):
    topic, group = "grp-simple", "simple-group"
    make_topic(gbroker, topic, 4)  # partition 3 gets no commit
    assert_all_delivered(produce(gbroker.bootstrap, topic, messages("s", 30, 3)))
    # --- confluent-kafka with assign() and no subscribe commits explicit offsets
    c = Consumer({"bootstrap.servers": gbroker.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(3)])
        res = c.commit(offsets=[TopicPartition(topic, 0, 7), TopicPartition(topic, 1, 8), TopicPartition(topic, 2, 9)], asynchronous=False)
        assert all(tp.error is None for tp in res), res
        got = c.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
        assert {tp.partition: tp.offset for tp in got} == {0: 7, 1: 8, 2: 9}
    finally:
        c.close()
    info = group_info(gbroker, group)
    assert info["state"] == "Empty" and info["members"] == [], info
    # --- OffsetFetch over the wire: v1 to v7 by partition, v2+ with topics null, v8 in a batch
    with GroupConn(gbroker.bootstrap) as g:
        for v in range(1, 8):
            err, offs = g.offset_fetch(v, group, {topic: [0, 1, 2, 3]})
            assert err == ERR_NONE, (v, err)
            assert {p: o for (_, p), (o, _, _) in offs.items() if p < 3} == {0: 7, 1: 8, 2: 9}, (v, offs)
            assert offs[(topic, 3)][0] == -1, (v, "a partition without a commit is -1", offs)
        for v in (2, 7):
            err, offs = g.offset_fetch(v, group, None)
            assert err == ERR_NONE and {k: o for k, (o, _, _) in offs.items()} == {(topic, 0): 7, (topic, 1): 8, (topic, 2): 9}, (v, offs)
        err, offs = g.offset_fetch(5, "never-heard-of", {topic: [0]})
        assert err == ERR_NONE and offs[(topic, 0)][0] == -1, offs
        # --- a raw simple commit: generation -1 and no member id; metadata comes back
        errs = g.commit(2, "simple-raw", {(topic, 0): 3, (topic, 1): 4}, metadata="hello")
        assert errs == {(topic, 0): 0, (topic, 1): 0}, errs
        err, offs = g.offset_fetch(3, "simple-raw", {topic: [0, 1]})
        assert offs == {(topic, 0): (3, "hello", 0), (topic, 1): (4, "hello", 0)}, offs
        # --- the oldest versions: OffsetCommit v0 and v1 (its timestamp ignored), OffsetFetch v0
        assert g.commit(0, "simple-old", {(topic, 0): 11}) == {(topic, 0): ERR_NONE}
        assert g.commit(1, "simple-old", {(topic, 1): 12}, metadata="v1") == {(topic, 1): ERR_NONE}
        err, offs = g.offset_fetch(0, "simple-old", {topic: [0, 1, 2]})
        assert offs[(topic, 0)] == (11, "", 0) and offs[(topic, 1)] == (12, "v1", 0), offs
        assert (offs[(topic, 2)][0], offs[(topic, 2)][2]) == (-1, ERR_NONE), offs
        # --- committing exactly what is committed (an idle auto-commit) writes no metadata entry
        before = meta_last_log_index(gbroker)
        for _ in range(30):
            assert g.commit(8, "simple-raw", {(topic, 0): 3, (topic, 1): 4}, metadata="hello") == {(topic, 0): 0, (topic, 1): 0}
        grew = meta_last_log_index(gbroker) - before
        assert grew < 5, f"30 unchanged commits grew the metadata log by {grew} entries"
        # (the measure works: 30 commits that change something, one at a time, do grow it)
        before = meta_last_log_index(gbroker)
        for i in range(30):
            assert g.commit(8, "simple-moving", {(topic, 0): i}) == {(topic, 0): 0}
        assert meta_last_log_index(gbroker) - before >= 20, "changing commits should each take a metadata entry"
        # --- an unknown partition, and metadata over offset.metadata.max.bytes
        errs = g.commit(8, "simple-raw", {(topic, 9): 1, ("grp-no-such-topic", 0): 1})
        assert errs == {(topic, 9): ERR_UNKNOWN_TOPIC_OR_PARTITION, ("grp-no-such-topic", 0): ERR_UNKNOWN_TOPIC_OR_PARTITION}, errs
        errs = g.commit(8, "simple-raw", {(topic, 2): 1}, metadata="x" * 4097)
        assert errs == {(topic, 2): ERR_OFFSET_METADATA_TOO_LARGE}, errs
        # --- OffsetFetch v8: two groups in one request, and a null topic list for one of them
        for v in (8, 9):
            res = g.offset_fetch_groups(v, {group: {topic: [0, 1, 2]}, "simple-raw": None})
            assert set(res) == {group, "simple-raw"}, res
            assert res[group][0] == ERR_NONE and {p: o for (_, p), (o, _, _) in res[group][1].items()} == {0: 7, 1: 8, 2: 9}, res
            assert res["simple-raw"][0] == ERR_NONE and {k: o for k, (o, _, _) in res["simple-raw"][1].items()} == {(topic, 0): 3, (topic, 1): 4}, res
    assert committed_by_admin(gbroker, group, topic) == {0: 7, 1: 8, 2: 9}


def test_list_describe_delete_groups_and_offset_delete(gbroker):
    topic, other, group = "grp-admin", "grp-admin-other", "admin-group"
    make_topic(gbroker, topic, 2)
    make_topic(gbroker, other, 1)
    with GroupConn(gbroker.bootstrap, "admin-client-a") as a, GroupConn(gbroker.bootstrap) as g:
        ja = join_synced(a, group, topic, partitions=2)
        # --- offsets for the subscribed topic and for one the member is not subscribed to
        errs = a.commit(8, group, {(topic, 0): 5, (topic, 1): 6, (other, 0): 2}, generation=ja["generation"], member_id=ja["member_id"])
        assert set(errs.values()) == {ERR_NONE}, errs
        # --- ListGroups shows it (v0 and v4 with a state filter)
        err, groups = g.list_groups(0)
        assert err == ERR_NONE and {"group": group, "protocol_type": "consumer"} in groups, groups
        err, groups = g.list_groups(4, ["Stable"])
        assert err == ERR_NONE and {"group": group, "protocol_type": "consumer", "state": "Stable"} in groups, groups
        err, groups = g.list_groups(4, ["Empty"])
        assert err == ERR_NONE and group not in [x["group"] for x in groups], groups
        # --- DescribeGroups: state, protocol, members with client id and host, their bytes
        for v in (0, 5):
            (d,) = g.describe_groups(v, [group])
            assert (d["error"], d["state"], d["protocol_type"], d["protocol"]) == (ERR_NONE, "Stable", "consumer", "range"), d
            (m,) = d["members"]
            assert m["member_id"] == ja["member_id"] and m["client_id"] == "admin-client-a", m
            assert "127.0.0.1" in m["client_host"], m
            assert parse_consumer_subscription(m["metadata"]) == [topic]
            assert parse_consumer_assignment(m["assignment"]) == {topic: [0, 1]}
        # --- OffsetDelete: refused for the subscribed topic, done for the other
        err, res = g.offset_delete(group, {topic: [0], other: [0]})
        assert err == ERR_NONE and res == {(topic, 0): ERR_GROUP_SUBSCRIBED_TO_TOPIC, (other, 0): ERR_NONE}, (err, res)
        err, offs = g.offset_fetch(5, group, {topic: [0], other: [0]})
        assert offs[(topic, 0)][0] == 5 and offs[(other, 0)][0] == -1, offs
        err, res = g.offset_delete("no-such-group", {topic: [0]})
        assert err == ERR_GROUP_ID_NOT_FOUND, (err, res)
        # --- DeleteGroups: a group with members is not deleted, an unknown one is not found
        assert g.delete_groups(2, [group, "no-such-group"]) == {group: ERR_NON_EMPTY_GROUP, "no-such-group": ERR_GROUP_ID_NOT_FOUND}
        assert group_info(gbroker, group)["state"] == "Stable"
        # --- once the member leaves, the group is deleted with its offsets
        assert a.leave(3, group, ja["member_id"])[0] == ERR_NONE
        assert g.delete_groups(0, [group]) == {group: ERR_NONE}
        assert group_info(gbroker, group) is None
        err, offs = g.offset_fetch(5, group, {topic: [0, 1]})
        assert {o for o, _, _ in offs.values()} == {-1}, offs
        err, groups = g.list_groups(0)
        assert group not in [x["group"] for x in groups], groups


def test_session_expiry_moves_partitions_to_the_survivor(gbroker):
    topic, group = "grp-expiry", "expiry-group"
    make_topic(gbroker, topic, 2)
    survivor = Member("survivor", gbroker.bootstrap, group, topic, batch=100)
    survivor.start()
    try:
        wait_for("the survivor owns both partitions", lambda: survivor.assigned == {0, 1}, timeout_s=30)
        with GroupConn(gbroker.bootstrap, "dropper") as d:
            # --- a raw member with a 6 s session joins; librdkafka rejoins in the background
            mid = d.join(5, group, session_ms=6000, rebalance_ms=30_000, protocols=[("range", consumer_subscription([topic]))])["member_id"]
            j = d.join(5, group, member_id=mid, session_ms=6000, rebalance_ms=30_000, protocols=[("range", consumer_subscription([topic]))])
            assert j["error"] == ERR_NONE, j
            assignments = {}
            if j["leader"] == mid:  # we lead: range over the two members, as the consumer would
                ids = sorted(m["member_id"] for m in j["members"])
                assignments = {m: consumer_assignment({topic: [i]}) for i, m in enumerate(ids)}
            s = d.sync(3, group, j["generation"], mid, assignments)
            silent_at = time.monotonic()  # its last word to the coordinator
            assert s["error"] == ERR_NONE, s
            mine = parse_consumer_assignment(s["assignment"]).get(topic, [])
            assert len(mine) == 1, f"the raw member should get one of two partitions: {mine}"
            wait_for("the survivor down to one partition", lambda: survivor.assigned == {0, 1} - set(mine), timeout_s=30)
            assert len(group_info(gbroker, group)["members"]) == 2
            # --- the raw member goes silent; after its session it is gone and the survivor has both
            wait_for("the survivor owns both partitions again", lambda: survivor.assigned == {0, 1}, timeout_s=30)
            took = time.monotonic() - silent_at
            assert took >= 5.5, f"the silent member was dropped after {took:.1f}s, before its 6 s session ran out"
            info = group_info(gbroker, group)
            assert [m["client_id"] for m in info["members"]] == ["survivor"], info
            assert d.heartbeat(3, group, j["generation"], mid) == ERR_UNKNOWN_MEMBER_ID
        # --- and it consumes the dropped member's partition
        assert_all_delivered(produce(gbroker.bootstrap, topic, messages("x", 100, 2)))
        wait_consumed([survivor], {f"x{i}" for i in range(100)}, timeout_s=30)
    finally:
        stop_all([survivor])
    assert survivor.error is None, survivor.error


def test_not_coordinator_and_find_coordinator(cluster):
    for n in cluster:
        n.config = dict(NO_DELAY)
    start_all(cluster)
    group = "nc-group"
    create_led_topic(cluster, "grp-nc", 1, 3)
    controller = wait_for("one controller", lambda: (lambda s: s.pop() if len(s) == 1 and None not in s else None)(
        {get_json(n.admin, "/v1/cluster")["controller_id"] for n in cluster}))
    # --- FindCoordinator v0 to v4 from every node: the controller, at its Kafka address
    coord = next(n for n in cluster if n.node_id == controller)
    print(f"coordinator {controller} ready after {wait_coordinator_ready(coord):.2f}s more")
    for n in cluster:
        with GroupConn(n.bootstrap) as g:
            for v in range(5):
                fc = g.find_coordinator(group, version=v)
                assert fc["error"] == ERR_NONE and fc["node_id"] == controller, (n.name, v, fc)
                assert f"{fc['host']}:{fc['port']}" == coord.bootstrap, (v, fc)
    # --- group requests to the other nodes: NOT_COORDINATOR
    for n in cluster:
        if n is coord:
            continue
        with GroupConn(n.bootstrap) as g:
            assert g.join(3, group)["error"] == ERR_NOT_COORDINATOR
            assert g.join(9, group)["error"] == ERR_NOT_COORDINATOR
            assert g.heartbeat(4, group, 1, "m") == ERR_NOT_COORDINATOR
            assert g.sync(5, group, 1, "m")["error"] == ERR_NOT_COORDINATOR
            assert g.commit(8, group, {("grp-nc", 0): 1}) == {("grp-nc", 0): ERR_NOT_COORDINATOR}
            assert g.offset_fetch(5, group, {"grp-nc": [0]})[0] == ERR_NOT_COORDINATOR
            assert g.offset_fetch_groups(8, {group: None})[group][0] == ERR_NOT_COORDINATOR
            assert g.leave(3, group, "m")[0] == ERR_NOT_COORDINATOR
            assert g.delete_groups(2, [group]) == {group: ERR_NOT_COORDINATOR}
            assert g.describe_groups(5, [group])[0]["error"] == ERR_NOT_COORDINATOR
            assert g.list_groups(0) == (ERR_NONE, []), "only the coordinator lists groups"
    # --- the coordinator itself serves them; the group then shows everywhere on the admin port
    with GroupConn(coord.bootstrap) as g:
        assert g.commit(8, group, {("grp-nc", 0): 1}) == {("grp-nc", 0): ERR_NONE}
        err, groups = g.list_groups(0)
        assert err == ERR_NONE and group in [x["group"] for x in groups]
    for n in cluster:
        wait_for(f"the group in {n.name}'s replicated state", lambda: committed_by_admin(n, group, "grp-nc") == {0: 1}, timeout_s=10)
        assert group_info(n, group)["coordinator"] == controller


def test_initial_rebalance_delay(broker_factory):
    """With the default group.initial.rebalance.delay.ms (3000) the first join of a new group waits
    for it; a broker configured with 0 answers at once. A join into an existing group does not."""
    slow = broker_factory()
    fast = broker_factory(config=NO_DELAY)
    for b in (slow, fast):
        print(f"{b.name}: coordinator ready {wait_coordinator_ready(b):.2f}s after health 200")
    for b, lo, hi in ((slow, 2.7, 10.0), (fast, 0.0, 1.5)):
        with GroupConn(b.bootstrap) as g:
            started = time.monotonic()
            j = g.join(3, "delayed")
            took = time.monotonic() - started
            assert j["error"] == ERR_NONE, j
            assert lo <= took <= hi, f"{b.name}: first join of a new group took {took:.2f}s, want {lo}..{hi}"
            # --- the same member rejoining the (now Stable, non-empty) group is not delayed again
            started = time.monotonic()
            j2 = g.join(3, "delayed", member_id=j["member_id"])
            took = time.monotonic() - started
            assert j2["error"] == ERR_NONE and took < 1.5, (b.name, took, j2)


class RawMember(threading.Thread):
    """A raw-wire member that behaves as a client does: join (v3, so no member id round trip),
    sync (the leader hands every member an empty assignment), heartbeat every 300 ms, and rejoin
    on REBALANCE_IN_PROGRESS; UNKNOWN_MEMBER_ID starts over with no id. Records how long each
    JoinGroup took to be answered."""

    def __init__(self, bootstrap: str, group: str, topic: str, name: str, start: threading.Barrier, max_s: float = 60.0):
        super().__init__(daemon=True, name=name)
        self.bootstrap, self.group, self.topic, self.start_barrier, self.max_s = bootstrap, group, topic, start, max_s
        self.joins: list[tuple[float, int, int]] = []  # (seconds to answer, error, generation)
        self.synced_generation: int | None = None  # the generation whose heartbeats are answered 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            with GroupConn(self.bootstrap, self.name, timeout_s=45.0) as g:
                self._run(g)
        except BaseException as e:  # noqa: BLE001 - reported by the test through .error
            self.error = e

    def _run(self, g: GroupConn):
        protocols = [("range", consumer_subscription([self.topic]))]
        mid = ""
        self.start_barrier.wait(10)
        deadline = time.monotonic() + self.max_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.synced_generation = None
            started = time.monotonic()
            j = g.join(3, self.group, member_id=mid, session_ms=30_000, rebalance_ms=30_000, protocols=protocols)
            self.joins.append((time.monotonic() - started, j["error"], j["generation"]))
            if j["error"] == ERR_UNKNOWN_MEMBER_ID:
                mid = ""
                continue
            if j["error"] != ERR_NONE:
                time.sleep(0.1)
                continue
            mid, gen = j["member_id"], j["generation"]
            assignments = {m["member_id"]: consumer_assignment({}) for m in j["members"]}
            s = g.sync(3, self.group, gen, mid, assignments)
            if s["error"] != ERR_NONE:
                continue  # REBALANCE_IN_PROGRESS and the like: join again
            while not self.stop.is_set() and time.monotonic() < deadline:
                hb = g.heartbeat(3, self.group, gen, mid)
                if hb != ERR_NONE:
                    break
                self.synced_generation = gen
                time.sleep(0.3)


@pytest.mark.parametrize("round_", range(3))
def test_members_joining_at_once_all_get_answered(gbroker, round_):
    """Six members join a new group at the same moment and rejoin as clients do. Every JoinGroup
    is answered well within the 30 s session, and the group settles with all six in one
    generation. (A join completed while another member's join already started the next round
    must still be answered, not left waiting until its session runs out.)"""
    topic, group = "grp-burst", f"burst-{round_}"
    if round_ == 0:
        make_topic(gbroker, topic, 6)
    start = threading.Barrier(6)
    members = [RawMember(gbroker.bootstrap, group, topic, f"burst{i}", start) for i in range(6)]
    for m in members:
        m.start()
    try:
        def settled():
            gens = {m.synced_generation for m in members}
            info = group_info(gbroker, group)
            return len(gens) == 1 and None not in gens and info and info["state"] == "Stable" and len(info["members"]) == 6
        try:
            wait_for("six members in one generation", settled, timeout_s=20)
        except AssertionError as e:
            raise AssertionError(f"{e}\njoins (seconds, error, generation): {[(m.name, m.joins) for m in members]}; "
                                 f"group {group_info(gbroker, group)}") from None
        slow = [(m.name, t, err) for m in members for t, err, _ in m.joins if t > 10]
        assert not slow, f"JoinGroups answered only after {slow}"
    finally:
        for m in members:
            m.stop.set()
        for m in members:
            m.join(50)
    assert all(m.error is None for m in members), [m.error for m in members]


def test_coordinator_without_a_quorum_stops_serving(cluster):
    """A coordinator whose peers are gone (kill -9 of both) cannot know whether a newer one took
    over, so within its 2 s quorum lease it must stop answering group requests as coordinator
    (NOT_COORDINATOR or COORDINATOR_NOT_AVAILABLE, never success). Once the peers are back, the
    group and its offsets are there."""
    for n in cluster:
        n.config = dict(NO_DELAY)
    start_all(cluster)
    topic, group = "grp-lease", "lease-group"
    create_led_topic(cluster, topic, 2, 3)
    controller = wait_for("one controller", lambda: (lambda s: s.pop() if len(s) == 1 and None not in s else None)(
        {get_json(n.admin, "/v1/cluster")["controller_id"] for n in cluster}))
    coord = next(n for n in cluster if n.node_id == controller)
    wait_coordinator_ready(coord)
    refusals = {ERR_NOT_COORDINATOR, 15}  # COORDINATOR_NOT_AVAILABLE
    with GroupConn(coord.bootstrap, "lease-member") as g:
        j = join_synced(g, group, topic, partitions=2)
        gen, mid = j["generation"], j["member_id"]
        assert g.commit(8, group, {(topic, 0): 7, (topic, 1): 8}, generation=gen, member_id=mid) == {(topic, 0): 0, (topic, 1): 0}
        assert g.heartbeat(4, group, gen, mid) == ERR_NONE
        # --- its peers die; the coordinator keeps its role until it hears of a newer term
        for n in cluster:
            if n is not coord:
                n.kill9()
        killed_at = time.monotonic()
        answers = []
        while time.monotonic() - killed_at < 10:
            hb = g.heartbeat(4, group, gen, mid)
            answers.append((round(time.monotonic() - killed_at, 2), hb))
            if hb != ERR_NONE:
                break
            time.sleep(0.2)
        last_ok = max((t for t, e in answers if e == ERR_NONE), default=0.0)
        print(f"last heartbeat answered {last_ok}s after the peers died; then {answers[-1]}")
        assert answers[-1][1] in refusals, f"still answering as coordinator 10 s after losing its quorum: {answers[-5:]}"
        assert last_ok <= 4.0, f"answered as coordinator {last_ok}s after losing its quorum (lease 2 s): {answers}"
        # --- and from then on refuses every group request, for reads and writes alike
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert g.heartbeat(4, group, gen, mid) in refusals
            assert set(g.commit(8, group, {(topic, 0): 9}, generation=gen, member_id=mid).values()) <= refusals
            assert g.offset_fetch(5, group, {topic: [0]})[0] in refusals
            assert g.join(3, group, member_id=mid, protocols=[("range", consumer_subscription([topic]))])["error"] in refusals
            time.sleep(0.3)
    # --- the peers come back: the group and its offsets are served again (by whoever coordinates)
    for n in cluster:
        if not n.is_running():
            n.start(wait=False)
    for n in cluster:
        n.wait_ready(timeout_s=60)
    new_coord = next(n for n in cluster if n.node_id == wait_for(
        "a controller", lambda: get_json(cluster[0].admin, "/v1/cluster")["controller_id"], timeout_s=30))
    wait_coordinator_ready(new_coord)
    with GroupConn(new_coord.bootstrap) as g:
        err, offs = g.offset_fetch(5, group, {topic: [0, 1]})
    assert err == ERR_NONE and {p: o for (_, p), (o, _, _) in offs.items()} == {0: 7, 1: 8}, (err, offs)
