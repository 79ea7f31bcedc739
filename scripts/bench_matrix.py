#!/usr/bin/env python3
"""`make bench`: the benchmark matrix, printed as Markdown tables, each figure beside its ceiling.

Every figure comes from `sluice bench` (the Kafka-protocol load generator in src/cli/bench) against
brokers this script starts on loopback in a temporary directory and stops by PID:

  ceilings   the disk's fdatasync bandwidth and latency (sequential appends of 16 KiB and 256 KiB,
             each followed by fdatasync, in the brokers' own temp dir), and the records/s it allows.
  matrix     single node RF 1 and 3 nodes RF 3; 1 and 6 partitions; 100 B and 1 KiB records;
             acks=1 and acks=all; small batches (16 KiB, linger 0: Kafka's defaults) and large
             (256 KiB). Produce records/s and MB/s, ack p99, broker CPU per record, disk bytes
             written per produced byte per replica; then consume records/s of the same topic.
  latency    produce ack latency and produce-to-consume latency at 50 % of the measured maximum
             (100 B, acks=all, small batches, 1 and 6 partitions, both cluster shapes).
  restart    (--restart-gib N) a single node holding N GiB of log, stopped and restarted (SIGTERM,
             then SIGKILL): seconds until it serves a produce and a fetch again.
  other      the same RF 1 rows against another Kafka-compatible broker (Tansu, via
             scripts/other_broker.sh) when it is installed, so both sets of figures come from one
             run of one tool.

  scripts/bench_matrix.py                    # the whole matrix (~15 min on 2 cores)
  scripts/bench_matrix.py --quick            # 2 rows, 1 s each: checks the script works
  scripts/bench_matrix.py --restart-gib 10 --only restart
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath_bench import SLUICE, Cluster, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OTHER = REPO / "scripts" / "other_broker.sh"
STEP_TIMEOUT_S = 600
CONSUME_CAP = 2_000_000
HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """Brokers under test: where to connect, which processes to charge, what they are."""

    name: str
    bootstrap: str
    pids: list[int]
    replicas: int
    notes: str = ""
    can_delete: bool = True
    results: list[dict] = field(default_factory=list)

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, bytes sent to storage) summed over the broker processes."""
        cpu, wrote = 0.0, 0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(stat[11]) + int(stat[12])) / HZ
                for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                    if line.startswith("write_bytes:"):
                        wrote += int(line.split()[1])
            except (OSError, IndexError, ValueError):
                pass
        return cpu, wrote


def bench(target: Target, verb: str, *args: str, timeout_s: float = STEP_TIMEOUT_S) -> dict:
    cmd = [str(SLUICE), "bench", verb, *args, "--json", "--bootstrap-server", target.bootstrap]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    try:
        report = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = None
    if r.returncode != 0 and not (report and report.get("errors")):
        raise SystemExit(f"bench: `{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-1500:]}")
    # A run the broker refused batches in (e.g. NOT_LEADER_OR_FOLLOWER while a leadership was in
    # doubt under load) is kept: its errors are printed beside its figures, never hidden.
    return report


def delete_topic(target: Target, topic: str) -> None:
    if target.can_delete:
        subprocess.run([str(SLUICE), "topics", "delete", topic, "--bootstrap-server", target.bootstrap],
                       capture_output=True, timeout=120)


# --- ceilings --------------------------------------------------------------------------------------

def disk_ceiling(directory: Path, chunk: int, seconds: float) -> dict:
    """Appends `chunk` bytes and fdatasyncs, again and again, as a log does: MB/s and sync latency."""
    path = directory / f"ceiling-{chunk}"
    buf = os.urandom(chunk)
    lat: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        written = 0
        while time.perf_counter() - start < seconds and written < 4 << 30:
            t0 = time.perf_counter()
            os.write(fd, buf)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
            written += chunk
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    return {"chunk": chunk, "mb_per_sec": written / elapsed / (1 << 20), "syncs_per_sec": len(lat) / elapsed,
            "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


# --- the matrix ------------------------------------------------------------------------------------

BATCHES = {"small": ["--batch-bytes", "16384", "--linger-ms", "0"], "large": ["--batch-bytes", "262144"]}


def matrix_rows(quick: bool) -> list[dict]:
    if quick:
        return [dict(partitions=1, size=100, acks="all", batch="small"),
                dict(partitions=6, size=1024, acks="1", batch="large")]
    return [dict(partitions=p, size=s, acks=a, batch=b)
            for p in (1, 6) for s in (100, 1024) for a in ("1", "all") for b in ("small", "large")]


DESCRIBE_PART = re.compile(r"Partition:\s*(\d+)\s+Leader:\s*(-?\d+)\s+Replicas:\s*([\d,]+)")


def settle_leaders(target: Target, topic: str, partitions: int, replicas: int) -> None:
    """Creates `topic` and waits (30 s at most) until every partition is led by its preferred
    replica: the broker moves leadership there a few seconds after creation, and `sluice bench`
    does not follow a leader that moves mid-run (it counts NOT_LEADER_OR_FOLLOWER and fails)."""
    subprocess.run([str(SLUICE), "topics", "create", topic, "--partitions", str(partitions),
                    "--replication-factor", str(replicas), "--bootstrap-server", target.bootstrap],
                   capture_output=True, timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = subprocess.run([str(SLUICE), "topics", "describe", topic, "--bootstrap-server", target.bootstrap],
                           capture_output=True, text=True, timeout=60)
        parts = DESCRIBE_PART.findall(r.stdout)
        if len(parts) == partitions and all(l == reps.split(",")[0] for _, l, reps in parts):
            return
        time.sleep(0.5)
    print(f"  (leaders of {topic} not all at their preferred replicas after 30 s; running anyway)")


def run_row(target: Target, row: dict, seconds: float, n: int) -> dict:
    topic = f"m-{n}-p{row['partitions']}-s{row['size']}-a{row['acks']}-{row['batch']}"
    common = ["--topic", topic, "--record-size", str(row["size"])]
    if target.replicas > 1:
        settle_leaders(target, topic, row["partitions"], target.replicas)
    cpu0, w0 = target.usage()
    p = bench(target, "produce", *common, "--partitions", str(row["partitions"]),
              "--replication-factor", str(target.replicas), "--acks", row["acks"], *BATCHES[row["batch"]],
              "--producers", "2", "--max-in-flight", "5", "--num-records", "1000000000", "--duration", str(seconds))
    cpu1, w1 = target.usage()
    # The first 2,000,000 records at most: plenty for a steady rate, and a slow consumer side
    # (Tansu's) would otherwise take minutes per row.
    c = bench(target, "consume", "--topic", topic, "--producers", "1",
              "--num-records", str(max(1, min(p["records"], CONSUME_CAP))))
    cpu2, _ = target.usage()
    delete_topic(target, topic)
    # Per byte the broker was sent (record batches as produced), so record framing is not
    # counted as amplification.
    payload = max(1, p.get("wire_bytes") or p["bytes"])
    out = {**row, "produce": p, "consume": c,
           "produce_cpu_us_per_record": (cpu1 - cpu0) * 1e6 / max(1, p["records"]),
           "consume_cpu_us_per_record": (cpu2 - cpu1) * 1e6 / max(1, c["records"]),
           "disk_bytes_per_byte_per_replica": (w1 - w0) / payload / target.replicas}
    target.results.append(out)
    if p["errors"]:
        print(f"  {target.name} {topic}: the broker refused batches: {p['errors']}")
    print(f"  {target.name} {topic}: produce {p['records_per_sec']:,.0f}/s p99 {p['latency_ms']['p99']} ms, "
          f"consume {c['records_per_sec']:,.0f}/s", flush=True)
    return out


def latency_rows(target: Target, seconds: float) -> list[dict]:
    out = []
    for partitions in (1, 6):
        best = max((r["produce"]["records_per_sec"] for r in target.results
                    if r["partitions"] == partitions and r["size"] == 100 and r["acks"] == "all"
                    and r["batch"] == "small"), default=0)
        if not best:
            continue
        rate = max(1000, int(best / 2))
        topic = f"lat-p{partitions}"
        if target.replicas > 1:
            settle_leaders(target, topic, partitions, target.replicas)
        common = ["--topic", topic, "--record-size", "100", "--acks", "all", *BATCHES["small"],
                  "--throughput", str(rate), "--duration", str(seconds), "--producers", "2"]
        p = bench(target, "produce", *common, "--partitions", str(partitions),
                  "--replication-factor", str(target.replicas))
        e = bench(target, "e2e", *common)
        delete_topic(target, topic)
        out.append({"partitions": partitions, "rate": rate, "produce": p, "e2e": e})
        print(f"  {target.name} latency at {rate:,}/s, {partitions} partitions: ack p99 "
              f"{p['latency_ms']['p99']} ms, e2e p99 {e['latency_ms']['p99']} ms", flush=True)
    return out


# --- brokers ---------------------------------------------------------------------------------------

def sluice_target(nodes: int, work: Path) -> tuple[Target, Cluster]:
    work.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(nodes, work)
    notes = "fsync on every append (acks=all waits for it)" if nodes == 1 else "3 replicas, one disk, fsync on each"
    return Target(f"sluice {nodes} node{'s' if nodes > 1 else ''} RF {nodes}", cluster.bootstrap,
                  [p.pid for p in cluster.procs], nodes, notes), cluster


OTHER_NAME = "tansu 0.6.0 (memory, no fsync)"


def other_install() -> bool:
    if not OTHER.exists():
        print("other broker: scripts/other_broker.sh missing; skipped")
        return False
    inst = subprocess.run([str(OTHER), "install"], capture_output=True, text=True, timeout=3600)
    if inst.returncode != 0:
        print(f"other broker: install failed, skipped:\n{inst.stderr[-1500:]}")
        return False
    return True


def other_start(work: Path) -> tuple[str, int]:
    """A fresh comparison broker: it keeps every record in memory, so each row gets its own."""
    port = free_port()
    r = subprocess.run([str(OTHER), "start", str(port), str(work)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"other broker: start failed:\n{r.stdout}\n{r.stderr[-1500:]}")
    return f"127.0.0.1:{port}", int(r.stdout.strip().splitlines()[-1])


def stop_other(pid: int | None) -> None:
    if pid is not None:
        subprocess.run([str(OTHER), "stop", str(pid)], capture_output=True, timeout=60)


def run_other(work: Path, quick: bool, seconds: float, latency_seconds: float, with_latency: bool
              ) -> tuple[Target, list[dict]]:
    target = Target(OTHER_NAME, "", [], 1, "records in the broker's heap; a fresh broker per row")
    lat: list[dict] = []
    rows = matrix_rows(quick)
    for n, row in enumerate(rows + ([None] if with_latency else [])):
        target.bootstrap, pid = other_start(work / f"other-{n}")
        target.pids = [pid]
        try:
            if row is not None:
                run_row(target, row, seconds, n)
            else:
                lat = latency_rows(target, latency_seconds)
        finally:
            stop_other(pid)
    return target, lat


def restart_probe(gib: float, work: Path) -> dict:
    """Fills one node with `gib` GiB, then times restarts until a produce and a fetch succeed."""
    ports = (free_port(), free_port(), free_port())
    data = work / "restart"
    cmd = [str(SLUICE), "server", "--node-id", "1", "--data-dir", str(data), "--kafka-addr", f"127.0.0.1:{ports[0]}",
           "--raft-addr", f"127.0.0.1:{ports[1]}", "--admin-addr", f"127.0.0.1:{ports[2]}"]
    env = {**os.environ, "NO_COLOR": "1"}

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=open(work / "restart.log", "ab"), stderr=subprocess.STDOUT, env=env)

    def serving(t0: float, proc: subprocess.Popen) -> float:
        args = [str(SLUICE), "bench", "produce", "--topic", "restart", "--num-records", "1", "--json",
                "--bootstrap-server", f"127.0.0.1:{ports[0]}"]
        while time.monotonic() - t0 < 300:
            if proc.poll() is not None:
                raise SystemExit(f"bench: restarted node exited; see {work / 'restart.log'}")
            ok = subprocess.run(args, capture_output=True, timeout=60).returncode == 0
            if ok and subprocess.run([str(SLUICE), "consume", "restart", "--from-beginning", "--max-messages", "1",
                                      "--timeout-ms", "5000", "--bootstrap-server", f"127.0.0.1:{ports[0]}"],
                                     capture_output=True, timeout=60).returncode == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise SystemExit("bench: node not serving 300 s after restart")

    proc = start()
    t = Target("restart", f"127.0.0.1:{ports[0]}", [proc.pid], 1)
    serving(time.monotonic(), proc)
    records = int(gib * (1 << 30) / 1024)
    fill = bench(t, "produce", "--topic", "restart", "--record-size", "1024", "--acks", "1",
                 "--batch-bytes", "262144", "--num-records", str(records), "--producers", "2", timeout_s=3600)
    out = {"gib": gib, "fill_records_per_sec": fill["records_per_sec"]}
    for how, sig in (("clean", signal.SIGTERM), ("kill9", signal.SIGKILL)):
        proc.send_signal(sig)
        proc.wait(timeout=120)
        t0 = time.monotonic()
        proc = start()
        out[f"{how}_restart_serving_sec"] = serving(t0, proc)
        print(f"  restart ({how}) with {gib} GiB: serving after {out[f'{how}_restart_serving_sec']:.2f} s", flush=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return out


# --- output ----------------------------------------------------------------------------------------

def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.0f} k"


def print_tables(ceilings: list[dict], targets: list[Target], latency: dict, restart: dict | None) -> None:
    if ceilings:
        print("\n### Disk ceiling (fdatasync after each append)\n")
        print("| append size | MB/s | syncs/s | sync p50 ms | sync p99 ms | 100 B records/s it allows | 1 KiB records/s |")
        print("|---|---|---|---|---|---|---|")
    for c in ceilings:
        bw = c["mb_per_sec"] * (1 << 20)
        print(f"| {c['chunk'] // 1024} KiB | {c['mb_per_sec']:.0f} | {c['syncs_per_sec']:,.0f} | {c['p50_ms']:.2f} | "
              f"{c['p99_ms']:.2f} | {fmt_rate(bw / 108)} | {fmt_rate(bw / 1032)} |")
    print("\n### Throughput (2 producer connections × 5 in flight; consume reads the same topic)\n")
    print("| broker | partitions | record | acks | batches | produce rec/s | MB/s | ack p99 ms | broker CPU µs/rec "
          "| disk B/B/replica | consume rec/s | consume MB/s | consume CPU µs/rec |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        for r in t.results:
            p, c = r["produce"], r["consume"]
            refused = sum(p["errors"].values()) if p["errors"] else 0
            note = f" ({refused:,} refused†)" if refused else ""
            print(f"| {t.name} | {r['partitions']} | {r['size']} B | {r['acks']} | {r['batch']}{note} | "
                  f"{fmt_rate(p['records_per_sec'])} | {p['mb_per_sec']:.0f} | {p['latency_ms']['p99']:.1f} | "
                  f"{r['produce_cpu_us_per_record']:.2f} | {r['disk_bytes_per_byte_per_replica']:.2f} | "
                  f"{fmt_rate(c['records_per_sec'])} | {c['mb_per_sec']:.0f} | {r['consume_cpu_us_per_record']:.2f} |")
    if latency:
        print("\n### Latency at 50 % of the measured maximum (100 B, acks=all, 16 KiB batches, linger 0)\n")
        print("| broker | partitions | rate rec/s | ack p50 ms | ack p99 ms | ack p99.9 ms | e2e p50 ms | e2e p99 ms | e2e max ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, rows in latency.items():
            for r in rows:
                a, e = r["produce"]["latency_ms"], r["e2e"]["latency_ms"]
                print(f"| {name} | {r['partitions']} | {r['rate']:,} | {a['p50']:.2f} | {a['p99']:.2f} | "
                      f"{a['p999']:.2f} | {e['p50']:.2f} | {e['p99']:.2f} | {e['max']:.2f} |")
    if restart:
        print(f"\n### Restart with {restart['gib']} GiB of log\n")
        print(f"clean (SIGTERM): serving after {restart['clean_restart_serving_sec']:.2f} s; "
              f"after kill -9: {restart['kill9_restart_serving_sec']:.2f} s")
    for t in targets:
        if t.notes:
            print(f"\n- {t.name}: {t.notes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rows, 1 s each, single node only")
    ap.add_argument("--seconds", type=float, default=5.0, help="per produce run")
    ap.add_argument("--latency-seconds", type=float, default=8.0)
    ap.add_argument("--restart-gib", type=float, default=0.0)
    ap.add_argument("--only", default="", help="comma list of: ceiling,rf1,rf3,other,latency,restart")
    ap.add_argument("--json-out", default=str(REPO / "target" / "bench-matrix.json"))
    args = ap.parse_args()
    if not SLUICE.exists():
        raise SystemExit(f"bench: {SLUICE} missing: run 'make build'")
    only = set(filter(None, args.only.split(","))) or {"ceiling", "rf1", "rf3", "other", "latency", "restart"}
    if args.quick:
        if not args.only:
            only -= {"rf3", "other", "restart"}
        args.seconds, args.latency_seconds = 1.0, 1.0
    work = Path(tempfile.mkdtemp(prefix="sluice-matrix."))
    ceilings, targets, latency, restart = [], [], {}, None
    try:
        if "ceiling" in only:
            for chunk in (16 << 10, 256 << 10):
                ceilings.append(disk_ceiling(work, chunk, 1.0 if args.quick else 3.0))
        shapes = [n for n, key in ((1, "rf1"), (3, "rf3")) if key in only]
        for nodes in shapes:
            target, cluster = sluice_target(nodes, work / f"c{nodes}")
            try:
                print(f"bench: {target.name}", flush=True)
                for n, row in enumerate(matrix_rows(args.quick)):
                    run_row(target, row, args.seconds, n)
                if "latency" in only:
                    latency[target.name] = latency_rows(target, args.latency_seconds)
            finally:
                cluster.stop()
            targets.append(target)
        if "other" in only and other_install():
            print(f"bench: {OTHER_NAME}", flush=True)
            target, lat = run_other(work, args.quick, args.seconds, args.latency_seconds, "latency" in only)
            targets.append(target)
            if lat:
                latency[target.name] = lat
        if "restart" in only and args.restart_gib > 0:
            restart = restart_probe(args.restart_gib, work)
        print_tables(ceilings, targets, latency, restart)
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"ceilings": ceilings, "latency": latency, "restart": restart,
                                                   "targets": [{"name": t.name, "results": t.results}
                                                               for t in targets]}, indent=1))
        print(f"\n(raw figures: {args.json_out})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
