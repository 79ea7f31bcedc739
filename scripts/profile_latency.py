#!/usr/bin/env python3
"""Where produce latency goes at a fixed load: `sluice bench produce --throughput R` against brokers
this script starts, with the system watched while it runs.

It answers "what bounds p99?" with measurements, not guesses:

  fsync      every fdatasync/fsync the brokers make (perf tracepoints): count, p50/p99/max time.
  cpu        machine-wide busy share of all cores, and each process's CPU (brokers, load generator).
  run queue  per-thread time spent runnable but waiting for a core (/proc/PID/task/*/schedstat),
             per second of run: how long work waited for a CPU, which on 2 shared cores is queueing.
  disk       bytes the brokers wrote to storage per batch byte sent, per replica, beside the fsync
             count (each fsync can rewrite a partial last page).
  profile    (--perf-cpu) an on-CPU call-graph sample of the brokers; the top symbols are printed
             and the data is kept for `perf report -i`.

  scripts/profile_latency.py --nodes 1 --rate 695000 --partitions 1
  scripts/profile_latency.py --nodes 3 --rate 315000 --partitions 6 --perf-cpu

Run it on a quiet machine; it starts and stops its brokers and perf by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath_bench import SLUICE, Cluster  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / HZ


def run_queue_wait(pid: int) -> float:
    """Seconds the process's threads have spent runnable but not running, summed."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def machine_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def fsync_times(script: str) -> list[float]:
    """Durations (ms) of fdatasync/fsync calls from `perf script` output of enter/exit tracepoints."""
    open_at: dict[int, float] = {}
    out = []
    for line in script.splitlines():
        parts = line.split()
        # comm tid [cpu] time: event: ...
        try:
            i = next(k for k, p in enumerate(parts) if p.endswith(":") and p[:-1].replace(".", "").isdigit())
            tid = int(parts[i - 2]) if parts[i - 1].startswith("[") else int(parts[i - 1])
            ts = float(parts[i][:-1])
            event = parts[i + 1]
        except (StopIteration, ValueError, IndexError):
            continue
        if "sys_enter_f" in event:
            open_at[tid] = ts
        elif "sys_exit_f" in event and tid in open_at:
            out.append((ts - open_at.pop(tid)) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--rate", type=int, required=True, help="records per second")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--batch-bytes", default="16384")
    ap.add_argument("--linger-ms", default="0")
    ap.add_argument("--perf-cpu", action="store_true", help="also sample the brokers' on-CPU stacks")
    ap.add_argument("--keep", type=Path, help="directory to keep perf data and broker logs in")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sluice-profile."))
    keep = args.keep or work
    keep.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args.nodes, work)
    perfs: list[subprocess.Popen] = []
    try:
        pids = [p.pid for p in cluster.procs]
        topic = "profile"
        common = ["--topic", topic, "--record-size", "100", "--acks", "all", "--batch-bytes", args.batch_bytes,
                  "--linger-ms", args.linger_ms, "--producers", "2", "--json", "--bootstrap-server", cluster.bootstrap]
        # Creates the topic and lets leaders settle before anything is measured.
        subprocess.run([str(SLUICE), "bench", "produce", *common, "--partitions", str(args.partitions),
                        "--replication-factor", str(args.nodes), "--throughput", "50000", "--duration", "3"],
                       capture_output=True, timeout=120, check=False)
        time.sleep(2)
        pid_list = ",".join(map(str, pids))
        events = ["-e", "syscalls:sys_enter_fdatasync", "-e", "syscalls:sys_exit_fdatasync",
                  "-e", "syscalls:sys_enter_fsync", "-e", "syscalls:sys_exit_fsync"]
        perfs.append(subprocess.Popen(["perf", "record", "-q", "-o", str(keep / "fsync.data"), *events, "-p", pid_list],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if args.perf_cpu:
            perfs.append(subprocess.Popen(["perf", "record", "-q", "-F", "499", "-g", "-o", str(keep / "cpu.data"),
                                           "-p", pid_list], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        cpu0 = [proc_cpu(p) for p in pids]
        io0 = sum(write_bytes(p) for p in pids)
        rq0 = [run_queue_wait(p) for p in pids]
        busy0 = machine_busy()
        t0 = time.monotonic()
        bench = subprocess.Popen([str(SLUICE), "bench", "produce", *common, "--throughput", str(args.rate),
                                  "--duration", str(args.seconds)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)
        bench_rq0 = run_queue_wait(bench.pid) if bench.poll() is None else 0.0
        bench_cpu0 = proc_cpu(bench.pid) if bench.poll() is None else 0.0
        bench_rq1, bench_cpu1 = bench_rq0, bench_cpu0
        while bench.poll() is None:
            try:
                bench_rq1, bench_cpu1 = run_queue_wait(bench.pid), proc_cpu(bench.pid)
            except OSError:
                break
            time.sleep(0.2)
        out, _ = bench.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        busy1 = machine_busy()
        cpu1 = [proc_cpu(p) for p in pids]
        io1 = sum(write_bytes(p) for p in pids)
        rq1 = [run_queue_wait(p) for p in pids]
        for p in perfs:
            p.send_signal(signal.SIGINT)
        for p in perfs:
            p.wait(timeout=120)
        report = json.loads(out.strip().splitlines()[-1])

        script = subprocess.run(["perf", "script", "-i", str(keep / "fsync.data")], capture_output=True, text=True,
                                timeout=300).stdout
        syncs = fsync_times(script)
        cores = os.cpu_count() or 1
        busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        lat = report["latency_ms"]
        print(f"load: {args.rate:,} records/s of 100 B, {args.partitions} partition(s), {args.nodes} node(s), "
              f"acks=all, batch {args.batch_bytes} B, linger {args.linger_ms} ms, {elapsed:.1f} s")
        print(f"produce: {report['records_per_sec']:,.0f} records/s, ack latency p50 {lat['p50']} ms, "
              f"p99 {lat['p99']} ms, p99.9 {lat['p999']} ms, max {lat['max']} ms, errors {report.get('errors') or 0}")
        if syncs:
            print(f"fsync: {len(syncs)} calls ({len(syncs) / elapsed:,.0f}/s), p50 {statistics.median(syncs):.2f} ms, "
                  f"p99 {pct(syncs, 0.99):.2f} ms, max {max(syncs):.2f} ms, "
                  f"time in fsync {sum(syncs) / 1000 / elapsed * 100:.0f} % of the run (summed over threads)")
        wire = report.get("wire_bytes") or 0
        if wire:
            per_replica = (io1 - io0) / args.nodes
            print(f"disk: {per_replica / wire:.2f} bytes written per batch byte per replica; "
                  f"{len(syncs) / args.nodes / (wire / 2**20):.1f} fsyncs per MiB per replica "
                  f"(a 4 KiB page rewritten per fsync would add {len(syncs) / args.nodes * 4096 / wire:.2f})")
        print(f"cpu: machine {busy * 100:.0f} % busy of {cores} cores; brokers "
              + ", ".join(f"{(b - a) / elapsed * 100:.0f} %" for a, b in zip(cpu0, cpu1))
              + f"; load generator {(bench_cpu1 - bench_cpu0) / elapsed * 100:.0f} % (of one core)")
        print("run queue: waited for a core "
              + ", ".join(f"{(b - a) / elapsed * 1000:.0f} ms/s" for a, b in zip(rq0, rq1))
              + f" (brokers); {(bench_rq1 - bench_rq0) / elapsed * 1000:.0f} ms/s (load generator)")
        if args.perf_cpu:
            top = subprocess.run(["perf", "report", "-i", str(keep / "cpu.data"), "--no-children", "--stdio",
                                  "--sort", "dso,sym", "--percent-limit", "1.5", "-g", "none"],
                                 capture_output=True, text=True, timeout=300).stdout
            print("on-CPU (brokers, self time, symbols over 1.5 %):")
            for line in top.splitlines():
                if line.strip() and not line.startswith("#"):
                    print("  " + line.strip())
            print(f"perf data kept in {keep}")
    finally:
        for p in perfs:
            if p.poll() is None:
                p.kill()
        cluster.stop()


if __name__ == "__main__":
    main()
