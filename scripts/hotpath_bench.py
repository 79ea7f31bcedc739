#!/usr/bin/env python3
"""Hot-path benchmarks that need more than one client (run by `make bench`).

  small-producers  PRODUCERS kcat processes write one-record acks=all batches (linger.ms=0,
                   batch.num.messages=1) to ONE partition at the same time. Reports the acked rate
                   and, from every replica's /metrics, how many batches one fdatasync carried.
  latency          One confluent-kafka producer (linger.ms=0, acks=all, 100-byte records) paced
                   at RATE msg/s for SECONDS; produce-to-ack latency percentiles from a histogram
                   of every delivery report.

Each run starts its own release brokers (1 node, or 3 for --rf 3) on free loopback ports in a
temporary directory and stops them, by PID, when it ends. Bounded: every step has a timeout.

  scripts/hotpath_bench.py small-producers --rf 1
  scripts/hotpath_bench.py latency --rate 10000 --seconds 20
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import shutil
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
SLUICE = Path(os.environ.get("SLUICE_BIN", REPO / "target" / "release" / "sluice"))
KCAT = shutil.which("kcat") or shutil.which("kafkacat")
STEP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`nodes` sluice processes sharing one peer list; stopped by PID on exit."""

    def __init__(self, nodes: int, work: Path):
        self.work = work
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(nodes)]
        peers = ",".join(f"{i + 1}@127.0.0.1:{raft}" for i, (_, raft, _) in enumerate(self.ports))
        self.procs: list[subprocess.Popen] = []
        for i, (kafka, raft, admin) in enumerate(self.ports):
            cmd = [str(SLUICE), "server", "--node-id", str(i + 1), "--data-dir", str(work / f"n{i + 1}"),
                   "--kafka-addr", f"127.0.0.1:{kafka}", "--raft-addr", f"127.0.0.1:{raft}",
                   "--admin-addr", f"127.0.0.1:{admin}"]
            if nodes > 1:
                cmd += ["--peers", peers]
            log = open(work / f"n{i + 1}.log", "wb")
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, "NO_COLOR": "1"}))
        deadline = time.monotonic() + 60
        for _, _, admin in self.ports:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{admin}/v1/health", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"bench: cluster not healthy after 60 s; logs in {work}")
                    time.sleep(0.2)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{k}" for k, _, _ in self.ports)

    def metrics(self) -> list[str]:
        return [urllib.request.urlopen(f"http://127.0.0.1:{a}/metrics", timeout=5).read().decode()
                for _, _, a in self.ports]

    def io_counters(self, topic: str) -> list[tuple[int, int]]:
        """(fsyncs, appended batches) of `topic`'s partitions, per node."""
        out = []
        for text in self.metrics():
            def total(name: str) -> int:
                pat = re.compile(rf'^sluice_partition_{name}{{topic="{re.escape(topic)}",partition="\d+"}} (\d+)$', re.M)
                return sum(int(m) for m in pat.findall(text))
            out.append((total("log_fsyncs_total"), total("log_appended_batches_total")))
        return out

    def high_watermark(self, topic: str) -> int:
        pat = re.compile(rf'^sluice_partition_high_watermark{{topic="{re.escape(topic)}",partition="0"}} (-?\d+)$', re.M)
        return max((int(m) for text in self.metrics() for m in pat.findall(text)), default=-1)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def create_topic(cluster: Cluster, topic: str, rf: int) -> None:
    subprocess.run([str(SLUICE), "topics", "create", topic, "--partitions", "1", "--replication-factor", str(rf),
                    "--bootstrap-server", cluster.bootstrap], check=True, timeout=60)
    # Wait until a produce succeeds, i.e. the partition has a leader.
    deadline = time.monotonic() + 30
    while cluster.high_watermark(topic) < 0:
        if time.monotonic() > deadline:
            raise SystemExit("bench: partition has no leader after 30 s")
        time.sleep(0.2)


def small_producers(args: argparse.Namespace, cluster: Cluster) -> None:
    if not KCAT:
        raise SystemExit("bench: kcat missing: run 'make deps'")
    topic = "small"
    create_topic(cluster, topic, args.rf)
    inputs = []
    for p in range(args.producers):
        path = cluster.work / f"input-{p}"
        with open(path, "w") as f:
            for i in range(args.records):
                head = f"p{p:02d}-{i:09d}-"
                f.write(head + "x" * max(0, args.record_bytes - len(head)) + "\n")
        inputs.append(path)
    before = cluster.io_counters(topic)
    hw_before = cluster.high_watermark(topic)
    print(f"bench: {args.producers} kcat producers x {args.records:,} one-record acks=all batches, RF {args.rf}")
    start = time.monotonic()
    procs = []
    for path in inputs:
        procs.append(subprocess.Popen(
            [KCAT, "-P", "-b", cluster.bootstrap, "-t", topic, "-p", "0", "-X", "acks=all",
             "-X", "linger.ms=0", "-X", "batch.num.messages=1"],
            stdin=open(path, "rb"), stderr=subprocess.PIPE))
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=STEP_TIMEOUT_S)
        if p.returncode != 0 or re.search(rb"(?i)error|fail", err):
            errors.append(err.decode(errors="replace")[:500])
    elapsed = time.monotonic() - start
    total = args.producers * args.records
    hw = cluster.high_watermark(topic)
    if errors:
        raise SystemExit("bench: producers reported errors:\n" + "\n".join(errors))
    if hw - max(hw_before, 0) != total:
        raise SystemExit(f"bench: high watermark moved by {hw - hw_before}, want {total}")
    after = cluster.io_counters(topic)
    print(f"small-producers RF {args.rf}: {total:,} acked in {elapsed:.2f} s: {total / elapsed:,.0f} rec/s")
    for node, ((f0, b0), (f1, b1)) in enumerate(zip(before, after), start=1):
        fs, bs = f1 - f0, b1 - b0
        ratio = bs / fs if fs else float("nan")
        print(f"  node {node}: {bs:,} batches appended, {fs:,} fdatasyncs: {ratio:.1f} batches/fsync")


class Histogram:
    """Log-linear buckets (about 1 % wide) from 1 µs to 100 s: percentiles without keeping samples."""

    def __init__(self) -> None:
        self.bounds: list[float] = []
        b = 1e-6
        while b < 100:
            self.bounds.append(b)
            b *= 1.01
        self.counts = [0] * (len(self.bounds) + 1)
        self.n = 0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.n += 1

    def percentile(self, q: float) -> float:
        rank = q * self.n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return self.bounds[min(i, len(self.bounds) - 1)]
        return float("nan")


def latency(args: argparse.Namespace, cluster: Cluster) -> None:
    from confluent_kafka import Producer  # the venv's client; imported here so small-producers needs none

    topic = "latency"
    create_topic(cluster, topic, args.rf)
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "acks": "all", "linger.ms": 0,
                         "enable.idempotence": False, "message.timeout.ms": 30000})
    value = b"v" * args.record_bytes
    hist = Histogram()
    failed = []

    def report(err, _msg, sent):
        if err is not None:
            failed.append(str(err))
        else:
            hist.record(time.perf_counter() - sent)

    # Warm up the connection and metadata, outside the measurement.
    producer.produce(topic, value, partition=0)
    producer.flush(30)
    total = int(args.rate * args.seconds)
    interval = 1.0 / args.rate
    print(f"bench: paced {args.rate:,} msg/s for {args.seconds} s ({total:,} x {args.record_bytes} B, acks=all, linger.ms=0, RF {args.rf})")
    # Delivery reports reach Python only inside poll(): a thread blocks in poll() (which releases
    # the GIL) so each report is timed as it arrives. The sender sends what is due every
    # millisecond rather than spinning between messages: a busy client would take the CPU the
    # broker needs on this 2-core machine and measure itself.
    sending = True

    def poller() -> None:
        while sending or len(producer) > 0:
            producer.poll(0.05)

    polling = threading.Thread(target=poller, daemon=True)
    polling.start()
    start = time.perf_counter()
    sent_count = 0
    while sent_count < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / interval) + 1)
        while sent_count < due:
            sent = time.perf_counter()
            producer.produce(topic, value, partition=0, on_delivery=lambda e, m, s=sent: report(e, m, s))
            sent_count += 1
        time.sleep(0.001)
    send_end = time.perf_counter()
    sending = False
    polling.join(timeout=60)
    producer.flush(60)
    end = time.perf_counter()
    achieved = total / (send_end - start)
    pct = {q: hist.percentile(q) * 1000 for q in (0.5, 0.99, 0.999)}
    print(f"latency {args.rate:,} msg/s target: {achieved:,.0f} msg/s offered, all acked after {end - start:.2f} s; "
          f"p50 {pct[0.5]:.2f} ms  p99 {pct[0.99]:.2f} ms  p99.9 {pct[0.999]:.2f} ms  max-bucket n={hist.n:,}")
    if failed:
        raise SystemExit(f"bench: {len(failed)} deliveries failed, first: {failed[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("small-producers")
    sp.add_argument("--rf", type=int, default=1, choices=(1, 3))
    sp.add_argument("--producers", type=int, default=16)
    sp.add_argument("--records", type=int, default=5000, help="per producer")
    sp.add_argument("--record-bytes", type=int, default=100)
    lp = sub.add_parser("latency")
    lp.add_argument("--rf", type=int, default=1, choices=(1, 3))
    lp.add_argument("--rate", type=int, default=10000)
    lp.add_argument("--seconds", type=float, default=20)
    lp.add_argument("--record-bytes", type=int, default=100)
    args = ap.parse_args()
    if not SLUICE.exists():
        raise SystemExit(f"bench: {SLUICE} missing: run 'make build'")
    work = Path(tempfile.mkdtemp(prefix="sluice-hotpath."))
    cluster = Cluster(3 if args.rf == 3 else 1, work)
    try:
        if args.cmd == "small-producers":
            small_producers(args, cluster)
        else:
            latency(args, cluster)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
