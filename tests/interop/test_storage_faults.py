"""A replica whose disk fails (a write or fsync returns EIO or ENOSPC) stops on the error, says so
(/v1/raft storage_error, /metrics), loses leadership to a healthy replica without losing an
acknowledged write, and is reopened from disk and caught up once the disk works again. A node that
cannot reopen a replica for 30 s fences itself (/v1/health 503 with storage_fence) until it can.

Faults are injected by the storage fault layer (SLUICE_STORAGE_FAULTS=1, POST
/v1/debug/storage-faults), which fails matching calls before they touch the file, as a real EIO
would."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from helpers import check_stored_once, consume_all
from test_cluster import get_json, start_all, wait_for
from test_replication import Writer, create_led_topic, leaders

TOPIC = "disk"


def set_faults(node, rules: list[dict]) -> dict:
    req = urllib.request.Request(
        f"http://{node.admin}/v1/debug/storage-faults",
        data=json.dumps({"rules": rules}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def group_of(node, topic: str, partition: int) -> str:
    return f"p/{get_json(node.admin, f'/v1/topics/{topic}')['id']}/{partition}"


def group_status(node, group: str) -> dict | None:
    for g in get_json(node.admin, "/v1/raft")["groups"]:
        if g["group"] == group:
            return g
    return None


def metric(node, name: str) -> float:
    with urllib.request.urlopen(f"http://{node.admin}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics of {node.name}")


def by_id(cluster, node_id: int):
    return next(n for n in cluster if n.node_id == node_id)


def check_acked(w: Writer, cluster, topic: str) -> None:
    """Every acknowledged value once, at its acknowledged offset. The writer never retries: a
    retried produce whose first attempt timed out but committed is stored twice, which is a
    non-idempotent producer's legitimate duplicate, not a broker fault."""
    assert w.acked, "nothing was acknowledged"
    got = consume_all(cluster[0].bootstrap, topic, 1, timeout_s=120)
    check_stored_once(got, w.acked, w.failed)


def caught_up(cluster, group: str, node) -> bool:
    """`node`'s replica serves again and holds the leader's whole log."""
    mine = group_status(node, group)
    if mine is None or mine["storage_error"] or mine["role"] == "shutdown":
        return False
    leader_id = mine["leader"]
    if leader_id is None:
        return False
    theirs = group_status(by_id(cluster, leader_id), group)
    return theirs is not None and mine["log_end_offset"] == theirs["log_end_offset"]


@pytest.fixture
def faulty_cluster(cluster, monkeypatch):
    monkeypatch.setenv("SLUICE_STORAGE_FAULTS", "1")
    start_all(cluster)
    create_led_topic(cluster, TOPIC, 1, 3)
    return cluster


@pytest.mark.parametrize("fault", [
    {"op": "fsync", "error": "eio"},
    {"op": "write", "error": "enospc"},
])
def test_a_failing_disk_moves_leadership_and_the_replica_comes_back(faulty_cluster, fault):
    cluster = faulty_cluster
    group = group_of(cluster[0], TOPIC, 0)
    victim = by_id(cluster, leaders(cluster[0], TOPIC)[0])
    w = Writer(cluster[0].bootstrap, TOPIC)
    w.start()
    try:
        wait_for("the first writes", lambda: len(w.acked) >= 200)
        failures_before = metric(victim, "sluice_partition_storage_failures_total")
        status = set_faults(victim, [dict(fault, path_contains="/partitions/")])
        assert status["rules"], status

        # --- the leader's next write fails: it stops the group and says why
        st = wait_for(f"{victim.name} reports the storage error", lambda: (group_status(victim, group) or {}).get("storage_error"))
        assert ("Input/output error" in st) or ("No space left" in st), st
        wait_for("the failure counted in /metrics", lambda: metric(victim, "sluice_partition_storage_failures_total") > failures_before)
        assert metric(victim, "sluice_partition_storage_failed") >= 1

        # --- a healthy replica takes over and writes go on
        new_leader = wait_for("a new leader", lambda: (l := leaders(cluster[0], TOPIC)[0]) not in (None, -1, victim.node_id) and l, timeout_s=60)
        acked_at_move = len(w.acked)
        wait_for("writes acknowledged by the new leader", lambda: len(w.acked) >= acked_at_move + 200, timeout_s=60)

        # --- while the disk still fails (the victim's replica is reopened and fails again, every
        # few seconds), writes keep being acknowledged
        for _ in range(2):
            acked = len(w.acked)
            wait_for("writes acknowledged while the disk fails", lambda: len(w.acked) >= acked + 100, timeout_s=30)
            time.sleep(2)

        # --- the disk works again: the replica is reopened and catches up
        set_faults(victim, [])
        wait_for(f"{victim.name}'s replica caught up", lambda: caught_up(cluster, group, victim), timeout_s=60)
        assert metric(victim, "sluice_partition_storage_failed") == 0
        assert victim.health() == 200, "a node that recovered its storage is ready"
    finally:
        w.stop.set()
        w.join(120)
    assert not w.is_alive()
    assert new_leader != victim.node_id
    check_acked(w, cluster, TOPIC)
    log = victim.log_text(current_run_only=True)
    assert "reopening it from disk" in log, log[-3000:]


def test_a_node_that_cannot_reopen_a_replica_fences_itself_until_it_can(faulty_cluster):
    cluster = faulty_cluster
    group = group_of(cluster[0], TOPIC, 0)
    # A follower this time: its appends fail and so does every reopen's attempt to cut the tail.
    leader_id = leaders(cluster[0], TOPIC)[0]
    victim = next(n for n in cluster if n.node_id != leader_id)
    w = Writer(cluster[0].bootstrap, TOPIC)
    w.start()
    try:
        wait_for("the first writes", lambda: len(w.acked) >= 100)
        set_faults(victim, [{"op": "any", "error": "eio", "path_contains": "/partitions/"}])
        wait_for(f"{victim.name} reports the storage error", lambda: (group_status(victim, group) or {}).get("storage_error"))
        # --- after 30 s of failed reopens the node fences itself; the other two keep taking writes
        fence = wait_for(f"{victim.name} fences itself", lambda: get_json_any(victim, "/v1/health").get("storage_fence"), timeout_s=60)
        assert f"{TOPIC}-0" in fence, fence
        assert victim.health() == 503
        other = next(n for n in cluster if n is not victim)
        wait_for("the controller sees the node fenced", lambda: not next(b for b in get_json(other.admin, "/v1/brokers") if b["id"] == victim.node_id)["live"], timeout_s=30)
        acked = len(w.acked)
        wait_for("writes go on without the fenced node", lambda: len(w.acked) >= acked + 100, timeout_s=60)

        # --- healed: reopened, unfenced, caught up
        set_faults(victim, [])
        wait_for(f"{victim.name} unfences itself", lambda: victim.health() == 200, timeout_s=60)
        wait_for(f"{victim.name}'s replica caught up", lambda: caught_up(cluster, group, victim), timeout_s=60)
    finally:
        w.stop.set()
        w.join(120)
    check_acked(w, cluster, TOPIC)
    log = victim.log_text(current_run_only=True)
    assert "fencing this node over its storage" in log and "unfences itself" in log, log[-3000:]


def get_json_any(node, path: str) -> dict:
    """GET that also returns the body of an error status (/v1/health answers 503 with JSON)."""
    try:
        return get_json(node.admin, path)
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
