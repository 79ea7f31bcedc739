"""Idempotent producers at their defaults: kafka-python 3.x (idempotence on by default) and
confluent-kafka with enable.idempotence write to a 3-node, RF 3 topic while the client's
connection to the leader is cut in the middle of requests and the leader is killed. Every value
is stored at most once, and every acknowledged value exactly once, at its acknowledged offset:
the clients resend what they did not see acknowledged, and the broker answers a resend with the
original offset instead of appending it again.

Clients reach the nodes through a small TCP proxy per node (the nodes advertise the proxy's
address), which can drop every connection at once, mid-request."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from confluent_kafka import Producer

from helpers import check_stored_once, consume_all
from test_cluster import get_json, start_all, wait_for
from test_replication import create_led_topic, leaders
from test_storage_faults import metric

TOPIC = "idem"


class CuttableProxy(threading.Thread):
    """Forwards 127.0.0.1:<port> to a node's Kafka port; `cut()` resets every open connection."""

    def __init__(self, target_port: int):
        super().__init__(daemon=True)
        self.target_port = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.closed = False
        self.cuts = 0

    def run(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Resets every open connection (RST, not FIN): whatever was in flight is lost."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.cuts += 1
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self):
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxied_cluster(cluster):
    proxies = [CuttableProxy(n.kafka_port) for n in cluster]
    for n, p in zip(cluster, proxies):
        n.config = {"advertised.listeners": f"PLAINTEXT://127.0.0.1:{p.port}"}
        p.start()
    yield cluster, proxies
    for p in proxies:
        p.close()


class ConfluentWriter(threading.Thread):
    def __init__(self, bootstrap: str, count: int):
        super().__init__(daemon=True)
        self.p = Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self.count = count
        self.acked: dict[str, tuple[int, int]] = {}
        self.failed: dict[str, str] = {}

    def run(self):
        for i in range(self.count):
            v = f"c{i}"

            def cb(err, msg, v=v):
                if err is None:
                    self.acked[v] = (msg.partition(), msg.offset())
                else:
                    self.failed[v] = str(err)

            while True:
                try:
                    self.p.produce(TOPIC, value=v.encode(), on_delivery=cb)
                    break
                except BufferError:
                    self.p.poll(0.05)
            self.p.poll(0)
            time.sleep(0.004)
        left = self.p.flush(120)
        assert left == 0, f"{left} messages without a delivery report"


class KafkaPythonWriter(threading.Thread):
    """kafka-python 3.x at its defaults: idempotence on, acks=all, retries."""

    def __init__(self, bootstrap: str, count: int):
        super().__init__(daemon=True)
        from kafka import KafkaProducer

        self.p = KafkaProducer(bootstrap_servers=bootstrap.split(","))
        self.count = count
        self.acked: dict[str, tuple[int, int]] = {}
        self.failed: dict[str, str] = {}

    def run(self):
        futures = []
        for i in range(self.count):
            v = f"k{i}"
            futures.append((v, self.p.send(TOPIC, value=v.encode())))
            time.sleep(0.004)
        self.p.flush(120)
        for v, f in futures:
            try:
                md = f.get(timeout=120)
                self.acked[v] = (md.partition, md.offset)
            except Exception as e:  # noqa: BLE001 - a failed delivery is recorded, not raised
                self.failed[v] = repr(e)
        self.p.close(30)


@pytest.mark.parametrize("client", ["kafka-python-defaults", "confluent-idempotent"])
def test_idempotent_producers_store_each_value_once_across_cuts_and_a_leader_kill(proxied_cluster, client):
    cluster, proxies = proxied_cluster
    start_all(cluster)
    create_led_topic(cluster, TOPIC, 1, 3)
    bootstrap = ",".join(f"127.0.0.1:{p.port}" for p in proxies)
    count = 3000
    w = KafkaPythonWriter(bootstrap, count) if client == "kafka-python-defaults" else ConfluentWriter(bootstrap, count)
    w.start()

    def leader_index() -> int:
        lid = wait_for("a leader", lambda: (l := leaders(next(n for n in cluster if n.is_running()), TOPIC)[0]) not in (None, -1) and l)
        return next(i for i, n in enumerate(cluster) if n.node_id == lid)

    # --- the client's connections to the leader drop mid-request, three times
    for _ in range(3):
        time.sleep(1.0)
        proxies[leader_index()].cut()
    # --- the leader dies (kill -9) while the producer keeps sending, then comes back
    time.sleep(1.0)
    victim = cluster[leader_index()]
    victim.kill9()
    time.sleep(3.0)
    victim.start()
    w.join(300)
    assert not w.is_alive(), "the producer did not finish"

    assert len(w.acked) >= count * 0.9, f"only {len(w.acked)} of {count} acknowledged; failures: {list(w.failed.items())[:5]}"
    live = next(n for n in cluster if n.is_running())
    got = consume_all(live.bootstrap, TOPIC, 1, timeout_s=120)
    check_stored_once(got, w.acked, w.failed)
    assert sum(p.cuts for p in proxies) == 3
    dups = sum(metric(n, "sluice_produce_duplicate_batches_total") for n in cluster if n.is_running())
    print(f"{client}: {len(w.acked)} acked, {len(w.failed)} failed, {len(got)} stored, {dups:.0f} resent batches answered as duplicates")
