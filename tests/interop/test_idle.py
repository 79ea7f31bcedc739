"""An idle consumer must cost nothing: caught-up consumers long-poll a 3-node RF 3 cluster, and
each broker's CPU time over the window, read from /proc, stays under 2 % of one core.

A long-poll Fetch that spins until max_wait_ms instead of sleeping until the high watermark moves
costs a whole core per waiting consumer; this test is what catches it."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

from conftest import KCAT
from helpers import Outbound, assert_all_delivered, produce
from test_cluster import start_all
from test_replication import create_led_topic

CONSUMERS = 20
WINDOW_S = 10.0
MAX_CORE_PERCENT = 2.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces; the fields after its closing parenthesis are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def fetches_answered(node) -> float:
    total = 0.0
    with urllib.request.urlopen(f"http://{node.admin}/metrics", timeout=2.0) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('sluice_requests_total{api="Fetch",'):
                total += float(line.split()[1])
    return total


def measure(nodes, window_s: float) -> dict[str, float]:
    """Percent of one core each node used over `window_s` seconds."""
    before = {n.name: cpu_ticks(n.proc.pid) for n in nodes}
    started = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - started
    return {n.name: 100.0 * (cpu_ticks(n.proc.pid) - before[n.name]) / TICKS_PER_S / elapsed for n in nodes}


def test_caught_up_consumers_cost_almost_no_cpu(cluster):
    assert KCAT is not None, "kcat is not installed (make deps)"
    start_all(cluster)
    topic = "idle"
    create_led_topic(cluster, topic, 6, 3)
    bootstrap = ",".join(n.bootstrap for n in cluster)
    assert_all_delivered(produce(bootstrap, topic, [Outbound(value=f"v{i}".encode()) for i in range(3000)], timeout_s=60))

    # --- without consumers: the cluster's own idle cost, printed to tell the two apart
    time.sleep(3)
    quiet = measure(cluster, 5.0)
    print("idle cluster, no consumers (% of one core): " + ", ".join(f"{k} {v:.2f}" for k, v in quiet.items()))

    consumers: list[subprocess.Popen] = []
    try:
        for _ in range(CONSUMERS):
            # kcat without -G: a plain consumer of every partition from the end, librdkafka's
            # default fetch.wait.max.ms (500 ms); no consumer group (Sluice serves none yet).
            consumers.append(subprocess.Popen(
                [KCAT, "-C", "-b", bootstrap, "-t", topic, "-o", "end", "-q", "-u"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ))
        # Let every consumer connect, look up its offsets and reach its long-poll loop.
        time.sleep(5)
        for c in consumers:
            assert c.poll() is None, f"kcat exited {c.returncode}: {c.stderr.read().decode(errors='replace')[-2000:]}"
        fetches_before = {n.name: fetches_answered(n) for n in cluster}
        busy = measure(cluster, WINDOW_S)
        fetches = {n.name: fetches_answered(n) - fetches_before[n.name] for n in cluster}
        for c in consumers:
            assert c.poll() is None, f"kcat exited {c.returncode} during the window"
    finally:
        for c in consumers:
            if c.poll() is None:
                c.terminate()
        for c in consumers:
            try:
                c.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(timeout=10)
    print(f"{CONSUMERS} caught-up consumers over {WINDOW_S:.0f}s (% of one core): "
          + ", ".join(f"{k} {v:.2f}" for k, v in busy.items())
          + "; fetches answered: " + ", ".join(f"{k} {int(v)}" for k, v in fetches.items()))
    # --- the consumers really were long-polling every leader: at most 2 fetches/s per consumer
    #     and broker at a 500 ms wait, so hundreds in the window, not none
    for name, n in fetches.items():
        assert n >= CONSUMERS * WINDOW_S / 2, f"{name} answered only {n} fetches: consumers not long-polling it"
    over = {k: round(v, 2) for k, v in busy.items() if v >= MAX_CORE_PERCENT}
    assert not over, f"brokers above {MAX_CORE_PERCENT}% of one core with idle consumers: {over} (all: {busy})"
