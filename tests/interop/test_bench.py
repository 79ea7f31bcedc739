"""`sluice bench` against a live broker: its JSON report says what really happened (checked with
third-party clients reading what it wrote, and it counting what kcat wrote), e2e latency comes from
the records' own stamps, the live progress line appears only on a terminal, and bad input is a
clear error. Small runs: figures are never asserted, only their shape."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from conftest import SLUICE_BIN, Clients
from helpers import consume_all, watermarks


@pytest.fixture(scope="module")
def cli(shared_broker) -> Clients:
    return Clients(shared_broker)


def bench(cli: Clients, verb: str, *args: str, timeout_s: float = 120.0) -> dict:
    r = cli.sluice("bench", verb, *args, "--json", timeout_s=timeout_s)
    assert r.returncode == 0, f"bench {verb} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, f"--json prints one line, got: {r.stdout!r}"
    report = json.loads(lines[0])
    check_shape(report)
    return report


def check_shape(r: dict) -> None:
    for k in ("records", "records_per_sec", "mb_per_sec", "latency_ms", "errors"):
        assert k in r, f"missing {k}: {r}"
    lat = r["latency_ms"]
    order = [lat[k] for k in ("p50", "p95", "p99", "p999", "max")]
    assert order == sorted(order), f"percentiles out of order: {lat}"
    assert r["errors"] == {}, r["errors"]


def test_produce_report_matches_what_third_party_clients_read(cli, shared_broker):
    topic = "bench-produce"
    r = bench(cli, "produce", "--topic", topic, "--partitions", "3", "--num-records", "30000",
              "--record-size", "100", "--producers", "2", "--max-in-flight", "8", "--batch-bytes", "4096")
    assert r["records"] == 30000 and r["bytes"] == 30000 * 100, r
    assert r["records_per_sec"] > 0 and r["mb_per_sec"] > 0
    assert r["latency_samples"] == 30000, "one ack latency per record"
    # Record batches as sent: values plus record framing and one 61-byte header per 40 records.
    assert 30000 * 100 < r["wire_bytes"] < 30000 * 115, r
    assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["max"]

    wm = watermarks(shared_broker.bootstrap, topic, 3)
    assert sum(hw - lo for lo, hw in wm.values()) == 30000, wm
    got = consume_all(shared_broker.bootstrap, topic, 3)
    assert len(got) == 30000
    assert all(m.key is None and len(m.value) == 100 and re.fullmatch(rb"[A-Z]+", m.value) for m in got)
    # Batches of 4096 bytes hold 40 records: every partition got some (2 producers, 3 partitions).
    assert all(hw > 0 for _, hw in wm.values()), wm


def test_consume_counts_what_kcat_wrote(cli):
    topic = "bench-consume"
    cli.create_topic(topic, 2)
    lines = "".join(f"line-{i:06d}\n" for i in range(5000))
    r = cli.kcat("-P", "-t", topic, input=lines)
    assert r.returncode == 0, r.stderr
    rep = bench(cli, "consume", "--topic", topic)
    assert rep["records"] == 5000, rep
    assert rep["bytes"] > 5000 * 11, "bytes count the batches as served"
    # Asking for fewer stops there; compressed or not, the count comes from batch headers.
    rep = bench(cli, "consume", "--topic", topic, "--num-records", "100")
    assert 100 <= rep["records"] <= 5000


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_e2e_latency_comes_from_the_records(cli, compression):
    topic = f"bench-e2e-{compression}"
    r = bench(cli, "e2e", "--topic", topic, "--num-records", "3000", "--throughput", "3000",
              "--compression", compression, "--record-size", "64")
    assert r["mode"] == "e2e" and r["records"] == 3000, r
    assert r["latency_samples"] == 3000, "one produce-to-consume latency per record"
    assert r["latency_ms"]["p50"] > 0
    assert r["produce"]["records"] == 3000 and r["produce"]["mode"] == "produce"


def test_acks_0_duration_and_compression(cli):
    r = bench(cli, "produce", "--topic", "bench-acks0", "--acks", "0", "--duration", "1.5",
              "--compression", "zstd", "--throughput", "20000")
    assert r["records"] > 0
    assert r["latency_samples"] == 0, "acks=0 gets no response, so no latency"
    assert r["elapsed_sec"] >= 1.4
    # The rate limit holds: 1.5 s at 20,000/s is about 30,000 records, never far more.
    assert r["records"] <= 20000 * 1.5 * 1.1 + 1000, r


def run_in_pty(args: list[str], timeout_s: float = 60.0) -> tuple[int, str]:
    """Runs with stdout and stderr on a pseudo-terminal, as a user at a shell would."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(args[0], args)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        else:
            os.kill(pid, 9)
            raise AssertionError(f"timed out: {args}\n{out[-2000:]!r}")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_progress_line_only_on_a_terminal(cli, shared_broker):
    args = ["bench", "produce", "--topic", "bench-progress", "--duration", "2.5",
            "--throughput", "2000", "--bootstrap-server", shared_broker.bootstrap]
    code, out = run_in_pty([str(SLUICE_BIN), *args])
    assert code == 0, out
    assert "records/s now" in out, f"no progress line on a terminal: {out!r}"
    assert "ack latency ms: p50" in out

    r = subprocess.run([str(SLUICE_BIN), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "records/s now" not in r.stdout + r.stderr, "progress must be quiet off a terminal"
    assert re.match(r"produce: \d+ records in [\d.]+ s: \d+ records/s", r.stdout), r.stdout


def test_bad_input_is_a_clear_error(cli):
    def fails(args: list[str], pattern: str) -> None:
        r = cli.sluice("bench", *args, timeout_s=60)
        assert r.returncode != 0, f"{args} should fail: {r.stdout}"
        assert re.search(pattern, r.stderr, re.I), f"{args}: stderr {r.stderr[-1500:]!r}"
        assert "panicked" not in r.stderr

    fails(["produce", "--throughput", "0"], r"--throughput must be a positive rate")
    fails(["produce", "--record-size", "0"], r"record-size")
    fails(["e2e", "--topic", "bench-small", "--record-size", "4"], r"at least 8")
    fails(["consume", "--topic", "bench-no-such-topic"], r"UNKNOWN_TOPIC_OR_PARTITION")
    cli.create_topic("bench-empty", 1)
    fails(["consume", "--topic", "bench-empty"], r"holds no records")


def test_matrix_script_quick_run(tmp_path):
    """`make bench`'s script on two short rows: it starts its own broker, prints the tables and
    writes the raw figures (the full matrix runs only under `make bench`)."""
    from conftest import REPO

    out = tmp_path / "matrix.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_matrix.py"), "--quick", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "SLUICE_BIN": str(SLUICE_BIN)})
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    for heading in ("### Disk ceiling", "### Throughput", "### Latency at 50 %"):
        assert heading in r.stdout, r.stdout
    figures = json.loads(out.read_text())
    rows = figures["targets"][0]["results"]
    assert len(rows) == 2 and all(row["produce"]["records"] > 0 and row["consume"]["records"] > 0 for row in rows)
    # The consume step reads back exactly what the produce step wrote (its first 2,000,000).
    assert all(row["consume"]["records"] == min(row["produce"]["records"], 2_000_000) for row in rows), rows
    assert figures["ceilings"] and all(c["mb_per_sec"] > 0 for c in figures["ceilings"])
