#!/usr/bin/env python3
"""Captures real Kafka client requests as fuzz seeds (fuzz/corpus/kafka_request/).

Starts `target/release/sluice server` on free loopback ports, advertising a capturing TCP proxy as
its Kafka address (so clients reach the broker only through the proxy, bootstrap and after), then
drives confluent-kafka, kafka-python and kcat (librdkafka 2.0.2) through it: topic creation, produce with every codec,
consume in a group with commits, metadata and offsets lookups. Every client->broker frame (the
bytes after the 4-byte size prefix) is written as one file, at most PER_KEY per client, API and
version (PER_KEY_PRODUCE for Produce), and only frames up to MAX_FRAME bytes. Everything is bounded by timeouts, and the
broker and proxy are stopped at the end.

    .venv/bin/python scripts/capture_corpus.py [--out fuzz/corpus/kafka_request]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLUICE = REPO / "target" / "release" / "sluice"
PER_KEY = 2
# Produce requests carry the record batches (one codec per producer run): keep more of them.
PER_KEY_PRODUCE = 12
MAX_FRAME = 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Capture:
    """Counts what was written per (client, api key, version)."""

    def __init__(self, out: Path):
        self.out = out
        self.counts: dict[tuple[str, int, int], int] = {}
        self.lock = threading.Lock()
        self.tag = "unknown"

    def frame(self, body: bytes) -> None:
        if len(body) < 8 or len(body) > MAX_FRAME:
            return
        key = int.from_bytes(body[0:2], "big", signed=True)
        ver = int.from_bytes(body[2:4], "big", signed=True)
        with self.lock:
            k = (self.tag, key, ver)
            n = self.counts.get(k, 0)
            if n >= (PER_KEY_PRODUCE if key == 0 else PER_KEY):
                return
            self.counts[k] = n + 1
            (self.out / f"{self.tag}-key{key:02}-v{ver}-{n}.bin").write_bytes(body)


def pump(src: socket.socket, dst: socket.socket, capture: Capture | None) -> None:
    buf = b""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
            if capture is None:
                continue
            buf += data
            while len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big", signed=True)
                if size < 0 or size > 100 << 20:
                    capture = None  # not Kafka framing any more: stop parsing, keep forwarding
                    break
                if len(buf) < 4 + size:
                    break
                capture.frame(buf[4 : 4 + size])
                buf = buf[4 + size :]
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def proxy(listen: socket.socket, broker_port: int, capture: Capture, stop: threading.Event) -> None:
    listen.settimeout(0.2)
    while not stop.is_set():
        try:
            client, _ = listen.accept()
        except socket.timeout:
            continue
        upstream = socket.create_connection(("127.0.0.1", broker_port), timeout=10)
        upstream.settimeout(None)
        client.settimeout(None)
        threading.Thread(target=pump, args=(client, upstream, capture), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()


def drive_confluent(bootstrap: str) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic("cap-ck", num_partitions=2, replication_factor=1)]).values():
        try:
            f.result(timeout=30)
        except Exception:
            pass
    for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
        p = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 5,
                      "enable.idempotence": codec == "zstd"})
        for i in range(20):
            p.produce("cap-ck", key=f"k{i}".encode(), value=f"{codec}-value-{i}".encode() * 3,
                      headers=[("h", b"v")])
        p.flush(30)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "cap-ck-group",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe(["cap-ck"])
    got = 0
    deadline = time.monotonic() + 30
    while got < 100 and time.monotonic() < deadline:
        m = c.poll(1.0)
        if m is not None and m.error() is None:
            got += 1
    c.commit(asynchronous=False)
    c.committed([TopicPartition("cap-ck", 0)], timeout=10)
    c.offsets_for_times([TopicPartition("cap-ck", 0, 0)], timeout=10)
    c.close()


def drive_kafka_python(bootstrap: str) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic("cap-kp", num_partitions=2, replication_factor=1)])
    except Exception:
        pass
    admin.list_topics()
    admin.describe_cluster()
    for codec in (None, "gzip", "snappy", "lz4", "zstd"):
        p = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=5)
        for i in range(20):
            p.send("cap-kp", key=f"k{i}".encode(), value=f"{codec}-value-{i}".encode() * 3,
                   headers=[("h", b"v")])
        p.flush(30)
        p.close(10)
    c = KafkaConsumer("cap-kp", bootstrap_servers=bootstrap, group_id="cap-kp-group",
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=10000)
    got = 0
    for _ in c:
        got += 1
        if got >= 100:
            break
    c.commit()
    c.close()
    # Group listing and describing, where this kafka-python version has them.
    for call, args in (("list_consumer_groups", ()), ("list_groups", ()),
                       ("describe_consumer_groups", (["cap-kp-group"],))):
        fn = getattr(admin, call, None)
        if fn is not None:
            try:
                fn(*args)
            except Exception:
                pass
    admin.close()


def drive_kcat(bootstrap: str) -> None:
    """kcat links Debian's librdkafka 2.0.2, older than confluent-kafka's: other API versions."""
    import shutil

    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        return
    lines = "".join(f"k{i}:kcat-value-{i}\n" for i in range(20)).encode()
    for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
        subprocess.run([kcat, "-b", bootstrap, "-P", "-t", "cap-kc", "-K", ":", "-z", codec],
                       input=lines, timeout=60, capture_output=True)
    subprocess.run([kcat, "-b", bootstrap, "-C", "-t", "cap-kc", "-o", "beginning", "-e", "-q"],
                   timeout=60, capture_output=True)
    subprocess.run([kcat, "-b", bootstrap, "-L"], timeout=60, capture_output=True)
    subprocess.run([kcat, "-b", bootstrap, "-G", "cap-kc-group", "-o", "beginning", "-e", "-q", "cap-kc"],
                   timeout=60, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "fuzz" / "corpus" / "kafka_request"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kafka, raft, admin_port, proxy_port = (free_port() for _ in range(4))
    work = Path(tempfile.mkdtemp(prefix="sluice-capture-"))
    log = open(work / "broker.log", "wb")
    broker = subprocess.Popen(
        [str(SLUICE), "server", "--data-dir", str(work / "data"),
         "--kafka-addr", f"127.0.0.1:{kafka}", "--advertised-kafka-addr", f"127.0.0.1:{proxy_port}",
         "--raft-addr", f"127.0.0.1:{raft}", "--admin-addr", f"127.0.0.1:{admin_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    capture = Capture(out)
    stop = threading.Event()
    listen = socket.socket()
    listen.bind(("127.0.0.1", proxy_port))
    listen.listen(64)
    t = threading.Thread(target=proxy, args=(listen, kafka, capture, stop), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/v1/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        bootstrap = f"127.0.0.1:{proxy_port}"
        capture.tag = "confluent"
        drive_confluent(bootstrap)
        capture.tag = "kafkapython"
        drive_kafka_python(bootstrap)
        capture.tag = "kcat"
        drive_kcat(bootstrap)
    finally:
        stop.set()
        t.join(timeout=5)
        listen.close()
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(timeout=10)
        log.close()
    files = sorted(out.iterdir())
    print(f"{len(files)} frames, {sum(f.stat().st_size for f in files)} bytes in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
