"""A self-forming cluster: three `sluice server` processes started with one command each and the
same peer list form one cluster, elect a controller, survive losing it, and agree on metadata.
Bad starts (foreign data directory, malformed peer list, port in use) fail fast and clearly."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from confluent_kafka.admin import AdminClient

from conftest import SLUICE_BIN, Clients, Node, free_port


def get_json(admin: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=2.0) as r:
        return json.loads(r.read())


def wait_for(what: str, fn, timeout_s: float = 30.0, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
            last = v
        except Exception as e:  # noqa: BLE001 - a node may be restarting; keep polling until the deadline
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def start_all(nodes, order=None):
    for i in order or range(len(nodes)):
        nodes[i].start(wait=False)
    for n in nodes:
        n.wait_ready(timeout_s=60)


def controllers(nodes) -> set:
    return {get_json(n.admin, "/v1/cluster")["controller_id"] for n in nodes if n.is_running()}


def metadata(bootstrap: str, topic: str | None = None):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return admin.list_topics(topic=topic, timeout=10)


def test_three_nodes_form_one_cluster_in_any_order(cluster):
    # --- start in reverse order, so the lowest id (which initializes) comes last
    start_all(cluster, order=[2, 1, 0])
    # --- Metadata over the Kafka protocol from every node lists all three brokers
    for n in cluster:
        md = wait_for(
            f"three brokers in metadata from {n.name}",
            lambda: (lambda m: m if len(m.brokers) == 3 else None)(metadata(n.bootstrap)),
        )
        addrs = sorted(f"{b.host}:{b.port}" for b in md.brokers.values())
        assert addrs == sorted(x.bootstrap for x in cluster)
    # --- every node agrees on the controller and the cluster id
    c = wait_for("one controller", lambda: (lambda s: s if len(s) == 1 and None not in s else None)(controllers(cluster)))
    ids = {get_json(n.admin, "/v1/cluster")["cluster_id"] for n in cluster}
    assert len(ids) == 1 and None not in ids, ids
    assert c.pop() in {1, 2, 3}


def test_controller_failover_and_rejoin(cluster):
    start_all(cluster)
    first = wait_for("a controller", lambda: (lambda s: s.pop() if len(s) == 1 and None not in s else None)(controllers(cluster)))
    Clients(cluster[0]).sluice("topics", "create", "before", "--partitions", "2", "--replication-factor", "3")
    # --- kill -9 the controller; a new one is elected and topic creation works again quickly
    victim = next(n for n in cluster if n.node_id == first)
    victim.kill9()
    survivors = [n for n in cluster if n is not victim]
    t0 = time.monotonic()
    wait_for(
        "a new controller",
        lambda: (lambda s: len(s) == 1 and None not in s and first not in s)(controllers(survivors)),
        timeout_s=20,
    )

    def create():
        r = Clients(survivors[0]).sluice("topics", "create", "after", "--partitions", "2", "--replication-factor", "2", timeout_s=20)
        return r.returncode == 0 or "already exists" in r.stderr

    wait_for("topic creation after failover", create, timeout_s=20, interval_s=0.5)
    elapsed = time.monotonic() - t0
    print(f"controller failover to working CreateTopics: {elapsed:.1f}s")
    # --- the old controller restarts as a follower, with nothing lost
    victim.start(wait=False)
    victim.wait_ready(timeout_s=60)
    wait_for("old controller sees both topics", lambda: {"before", "after"} <= set(metadata(victim.bootstrap).topics))
    assert get_json(victim.admin, "/v1/cluster")["controller_id"] != victim.node_id or len(controllers(cluster)) == 1


def test_topic_visible_everywhere_and_after_return(cluster):
    start_all(cluster)
    Clients(cluster[1]).sluice("topics", "create", "t-everywhere", "--partitions", "3", "--replication-factor", "1")
    for n in cluster:
        wait_for(f"t-everywhere on {n.name}", lambda: "t-everywhere" in metadata(n.bootstrap).topics)
    # --- with node 3 down, create a topic; node 3 sees it when it returns
    cluster[2].stop()
    wait_for("controller among survivors", lambda: len(controllers(cluster[:2]) - {None}) == 1)
    r = Clients(cluster[0]).sluice("topics", "create", "t-while-down", "--partitions", "2", "--replication-factor", "2", timeout_s=30)
    assert r.returncode == 0, r.stderr
    cluster[2].start(wait=False)
    cluster[2].wait_ready(timeout_s=60)
    wait_for("t-while-down on the returned node", lambda: "t-while-down" in metadata(cluster[2].bootstrap).topics)
    # --- and a produce/consume through a node that hosts no replica reaches the leader
    def leaders():
        md = metadata(cluster[2].bootstrap, "t-everywhere")
        found = {p.leader for p in md.topics["t-everywhere"].partitions.values()}
        return found if found <= {1, 2, 3} else None

    # the returning node is fenced until the controller hears its heartbeats again
    assert wait_for("every partition led by a live broker", leaders, timeout_s=15)


def run_server(args: list[str], timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLUICE_BIN), "server", *args], capture_output=True, text=True, timeout=timeout_s)


def test_malformed_peer_list_fails_fast(tmp_path):
    for peers, needle in [
        ("1@127.0.0.1", "HOST:PORT"),
        ("x@127.0.0.1:1", "node id"),
        ("2@127.0.0.1:1,3@127.0.0.1:2", "must include this node"),
    ]:
        r = run_server([
            "--data-dir", str(tmp_path / "d"), "--kafka-addr", f"127.0.0.1:{free_port()}",
            "--raft-addr", f"127.0.0.1:{free_port()}", "--admin-addr", f"127.0.0.1:{free_port()}",
            "--peers", peers,
        ])
        assert r.returncode != 0
        assert needle in r.stderr, r.stderr


def test_port_in_use_fails_fast(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        t0 = time.monotonic()
        r = run_server([
            "--data-dir", str(tmp_path / "d"), "--kafka-addr", f"127.0.0.1:{busy}",
            "--raft-addr", f"127.0.0.1:{free_port()}", "--admin-addr", f"127.0.0.1:{free_port()}",
        ])
        assert r.returncode != 0
        assert f"127.0.0.1:{busy}" in r.stderr and "Kafka" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 10


def test_foreign_data_directory_is_refused(cluster, tmp_path):
    start_all(cluster)
    wait_for("cluster id", lambda: get_json(cluster[0].admin, "/v1/cluster")["cluster_id"])
    # --- a single-node cluster of its own, started as node 3, gets a different cluster id
    foreign = Node(tmp_path, name="foreign", node_id=3)
    foreign.peers = f"3@127.0.0.1:{foreign.raft_port}"
    foreign.start()
    wait_for("foreign cluster id recorded", lambda: "cluster.id=" in (foreign.data_dir / "meta.properties").read_text() and
             (foreign.data_dir / "meta.properties").read_text().split("cluster.id=")[1].strip())
    foreign.stop()
    # --- node 3 of our cluster restarted on that directory must refuse to run
    cluster[2].stop()
    r = run_server([
        "--node-id", "3", "--data-dir", str(foreign.data_dir),
        "--kafka-addr", cluster[2].bootstrap, "--raft-addr", f"127.0.0.1:{cluster[2].raft_port}",
        "--admin-addr", cluster[2].admin, "--peers", cluster[2].peers,
    ], timeout_s=60)
    assert r.returncode != 0
    assert "belongs to cluster" in r.stderr, r.stderr[-2000:]


def start_fourth(cluster, tmp_path) -> Node:
    """Node 4, started with the cluster's peer list plus itself, once every node sees it as a broker.
    The caller stops it."""
    fourth = Node(tmp_path, name="n4", node_id=4)
    fourth.peers = cluster[0].peers + f",4@127.0.0.1:{fourth.raft_port}"
    fourth.start(wait=False)
    try:
        fourth.wait_ready(timeout_s=60)
        wait_for("four brokers in metadata", lambda: len(metadata(cluster[0].bootstrap).brokers) == 4)
    except BaseException:
        fourth.stop()
        raise
    return fourth


def test_fourth_node_joins_and_is_decommissioned(cluster, tmp_path):
    start_all(cluster)
    ctl = wait_for("a controller", lambda: (lambda s: s.pop() if len(s) == 1 and None not in s else None)(controllers(cluster)))
    # --- a node started later with the peer list plus itself joins the metadata group
    fourth = start_fourth(cluster, tmp_path)
    try:
        assert get_json(fourth.admin, "/v1/cluster")["controller_id"] == ctl
        raft = get_json(fourth.admin, "/v1/raft")["groups"]
        assert any(g["group"] == "meta" for g in raft)
        # --- decommission: only on the controller, and it removes the broker everywhere
        controller = next(n for n in cluster if n.node_id == ctl)
        req = urllib.request.Request(f"http://{controller.admin}/v1/brokers/4/decommission", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read()) == {"decommissioned": 4}
        wait_for("three brokers again", lambda: len(metadata(cluster[1].bootstrap).brokers) == 3)
        # --- a broker whose replicas have nowhere to go (RF 3 on 3 brokers) is refused with a reason
        Clients(cluster[0]).sluice("topics", "create", "pinned", "--partitions", "3", "--replication-factor", "3")
        req = urllib.request.Request(f"http://{controller.admin}/v1/brokers/{cluster[1].node_id}/decommission", method="POST",
                                     headers={"content-type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("decommission of a broker with replicas succeeded")
        except urllib.error.HTTPError as e:
            assert e.code == 409 and "no live broker can take" in e.read().decode()
        assert get_json(controller.admin, "/v1/reassignments")["reassignments"] == []
    finally:
        fourth.stop()
