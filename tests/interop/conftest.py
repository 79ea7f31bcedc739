"""Fixtures for the interop suite: real `sluice server` processes on free loopback ports.

Every broker gets its own temporary data dir and log file. The log is attached to the report of a
failing test, and every broker's log is checked for panics when its test ends. Everything is bounded:
startup waits at most STARTUP_TIMEOUT_S, shutdown sends SIGTERM and then SIGKILL, and every helper
that runs a client takes a timeout.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLUICE_BIN = Path(os.environ.get("SLUICE_BIN", REPO / "target" / "release" / "sluice"))
KCAT = shutil.which("kcat") or shutil.which("kafkacat")
STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 20.0
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Brokers started by this pytest process, so none outlives it (see also PR_SET_PDEATHSIG below).
_LIVE: dict[int, subprocess.Popen] = {}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1; the tiny race until the broker binds it is
    acceptable on a test machine, and cheaper than teaching the broker to report its ports. The
    kernel may hand the same free port out again before the first broker binds it (one node got
    the same port for Kafka and Raft), so a port is never given twice in one session."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port in 100 tries")


def _die_with_parent() -> None:
    # If pytest itself is killed (CI time limit, Ctrl-C twice), the broker must not keep the ports.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Broker:
    """One `sluice server` process. Restartable on the same data dir and ports."""

    def __init__(self, workdir: Path, name: str = "broker", config: dict[str, str] | None = None, node_id: int = 1):
        self.workdir = workdir
        self.name = name
        self.node_id = node_id
        self.data_dir = workdir / f"{name}-data"
        self.log_path = workdir / f"{name}.log"
        self.kafka_port = free_port()
        self.raft_port = free_port()
        self.admin_port = free_port()
        self.config = dict(config or {})
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._log_mark = 0  # byte offset in the log file where the current run began
        self.exit_codes: list[int] = []
        self.killed = False  # the last run ended by our kill9(), so its exit code says nothing

    # --- addresses --------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def partition_dir(self, topic: str, partition: int) -> Path:
        """`partitions/{topic}-{partition}.{topic id}` of the topic's current incarnation (there is
        one at most once a deletion is done); a path that does not exist if there is none."""
        found = sorted((self.data_dir / "partitions").glob(f"{topic}-{partition}.*"))
        return found[-1] if found else self.data_dir / "partitions" / f"{topic}-{partition}.absent"

    # --- lifecycle --------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [
            str(SLUICE_BIN),
            "server",
            "--node-id", str(self.node_id),
            "--data-dir", str(self.data_dir),
            "--kafka-addr", self.bootstrap,
            "--raft-addr", f"127.0.0.1:{self.raft_port}",
            "--admin-addr", self.admin,
        ]
        if self.config:
            cfg = self.workdir / f"{self.name}.properties"
            cfg.write_text("".join(f"{k}={v}\n" for k, v in self.config.items()))
            cmd += ["--config", str(cfg)]
        return cmd

    def start(self, wait: bool = True) -> "Broker":
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        if not SLUICE_BIN.exists():
            pytest.fail(f"{SLUICE_BIN} does not exist: run `cargo build --release` (make build) first")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as f:
            self._log_mark = f.tell()
            f.write(f"=== harness: start #{self.starts}: {' '.join(self.command())}\n".encode())
        env = dict(os.environ)
        env.setdefault("SLUICE_LOG", "info,openraft=off")
        env["NO_COLOR"] = "1"
        env["RUST_BACKTRACE"] = "1"
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        _LIVE[self.proc.pid] = self.proc
        self.killed = False
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self._reap(rc)
                pytest.fail(f"{self.name} exited with {rc} during startup; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.admin}/v1/health", timeout=1.0) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.1)
        pytest.fail(f"{self.name} not healthy after {timeout_s}s (last: {last}); log tail:\n{self.log_tail()}")

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.admin}/v1/health", timeout=1.0) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None

    def _reap(self, rc: int) -> None:
        if self.proc is not None:
            _LIVE.pop(self.proc.pid, None)
        self.exit_codes.append(rc)

    def stop(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> int:
        """SIGTERM, wait, then SIGKILL. Returns the exit code (negative = killed by that signal)."""
        if self.proc is None:
            return 0
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(timeout=10)
                self._note(f"SIGTERM not honoured within {timeout_s}s; sent SIGKILL")
                self._reap(rc)
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout_s}s; log tail:\n{self.log_tail()}")
        self._reap(rc)
        self._note(f"stopped with exit code {rc}")
        return rc

    def kill9(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.kill()
        rc = self.proc.wait(timeout=10)
        self._reap(rc)
        self.killed = True
        self._note("killed with SIGKILL")
        return rc

    def restart(self, wait: bool = True) -> "Broker":
        if self.proc is not None and self.proc.poll() is None:
            rc = self.stop()
            assert rc == 0, f"{self.name} exited {rc} on SIGTERM"
        return self.start(wait=wait)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- the log ----------------------------------------------------------------------------------
    def _note(self, msg: str) -> None:
        with open(self.log_path, "ab") as f:
            f.write(f"=== harness: {msg}\n".encode())

    def log_text(self, current_run_only: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        if current_run_only:
            data = data[self._log_mark :]
        return ANSI.sub("", data.decode(errors="replace"))

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def panics(self) -> list[str]:
        return [l for l in self.log_text().splitlines() if "panicked" in l]


class Clients:
    """Runs the `sluice` CLI and kcat against one broker, each call bounded by a timeout."""

    def __init__(self, broker: Broker):
        self.broker = broker

    def sluice(self, *args: str, input: str | bytes | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        # The bootstrap flag goes last so it works whether the CLI declares it per verb or globally.
        cmd = [str(SLUICE_BIN), *args, "--bootstrap-server", self.broker.bootstrap]
        return _run(cmd, input, timeout_s)

    def kcat(self, *args: str, input: str | bytes | None = None, timeout_s: float = 120.0, stdin_path: Path | None = None) -> subprocess.CompletedProcess:
        if KCAT is None:
            pytest.fail("kcat is not installed (make deps installs it: apt-get install kcat)")
        cmd = [KCAT, "-b", self.broker.bootstrap, *args]
        return _run(cmd, input, timeout_s, stdin_path=stdin_path)

    def create_topic(self, name: str, partitions: int = 1, *configs: str) -> None:
        extra = []
        for c in configs:
            extra += ["--config", c]
        r = self.sluice("topics", "create", name, "--partitions", str(partitions), "--replication-factor", "1", *extra)
        assert r.returncode == 0, f"topics create {name} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


def _run(cmd: list[str], input, timeout_s: float, stdin_path: Path | None = None) -> subprocess.CompletedProcess:
    if isinstance(input, str):
        input = input.encode()
    stdin = open(stdin_path, "rb") if stdin_path is not None else None
    try:
        p = subprocess.run(
            cmd,
            input=input,
            stdin=stdin if input is None else None,
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout_s}s: {' '.join(cmd)}\nstderr: {(e.stderr or b'')[-2000:]!r}")
    finally:
        if stdin is not None:
            stdin.close()
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


# --- fixtures -------------------------------------------------------------------------------------


class Node(Broker):
    """A broker that is one of several, started with the cluster's peer list."""

    peers: str = ""

    def command(self) -> list[str]:
        return super().command() + ["--peers", self.peers]



@pytest.fixture
def cluster(tmp_path, request):
    nodes = [Node(tmp_path, name=f"n{i}", node_id=i) for i in (1, 2, 3)]
    peers = ",".join(f"{n.node_id}@127.0.0.1:{n.raft_port}" for n in nodes)
    for n in nodes:
        n.peers = peers
    request.node._sluice_brokers = nodes
    yield nodes
    problems = []
    for n in nodes:
        if n.is_running():
            rc = n.stop()
            if rc != 0:
                problems.append(f"{n.name} exited {rc} on SIGTERM")
        if n.panics():
            problems.append(f"{n.name} panicked: {n.panics()[:5]}")
    assert not problems, problems





@pytest.fixture
def broker_factory(tmp_path, request):
    """Makes (and on teardown stops) brokers with custom config; checks each log for panics."""
    made: list[Broker] = []
    request.node._sluice_brokers = made

    def make(config: dict[str, str] | None = None, start: bool = True, name: str | None = None) -> Broker:
        b = Broker(tmp_path, name=name or f"broker{len(made) + 1}", config=config)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    problems = []
    for b in made:
        try:
            rc = b.stop()
            if rc != 0 and not b.killed:
                problems.append(f"{b.name} exited with {rc} (SIGTERM must shut down cleanly); log tail:\n{b.log_tail(40)}")
        except AssertionError as e:
            problems.append(str(e))
        if b.panics():
            problems.append(f"{b.name} panicked:\n" + "\n".join(b.panics()[:20]))
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def broker(broker_factory) -> Broker:
    return broker_factory()


@pytest.fixture
def clients(broker) -> Clients:
    return Clients(broker)


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory, request):
    """One broker for a whole module of read-mostly tests (each test uses its own topics)."""
    b = Broker(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), name="shared")
    request.module._sluice_shared = b
    b.start()
    yield b
    rc = b.stop()
    assert not b.panics(), "shared broker panicked:\n" + "\n".join(b.panics()[:20])
    assert rc == 0, f"shared broker exited {rc} on SIGTERM; log tail:\n{b.log_tail()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    brokers = list(getattr(item, "_sluice_brokers", []))
    shared = getattr(item.module, "_sluice_shared", None)
    if shared is not None:
        brokers.append(shared)
    for b in brokers:
        rep.sections.append((f"{b.name} log ({b.log_path})", b.log_tail(150)))


def pytest_sessionfinish(session, exitstatus):
    for pid, proc in list(_LIVE.items()):
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        _LIVE.pop(pid, None)
