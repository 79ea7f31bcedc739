"""TLS and SASL on the Kafka listeners against real clients (issue 15).

One `sluice server` with three listeners: PLAINTEXT (where the first user is created with
`sluice users create`), SASL_SSL and SSL (client certificates requested), with certificates made by
`sluice certs create`. kcat and confluent-kafka produce and consume over SASL_SSL with
SCRAM-SHA-256; a wrong password is refused with SASL_AUTHENTICATION_FAILED; kafka-python works over
SSL with a client certificate whose principal (`User:CN=alice`) the broker logs; SCRAM-SHA-512 and
PLAIN work with confluent-kafka; a confluent-kafka producer outlives `connections.max.reauth.ms` by
re-authenticating (KIP-368). Every client call is bounded in time.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, TopicPartition

from conftest import SLUICE_BIN, Broker, free_port
from helpers import Outbound, assert_all_delivered, cli_fails, cli_ok, consumer, produce, producer

PASSWORD = "alice-s3cret"


class SecureBroker(Broker):
    """A broker with PLAINTEXT, SASL_SSL and SSL listeners instead of the one --kafka-addr."""

    def __init__(self, workdir: Path, certs: Path, extra: dict[str, str] | None = None):
        # One PEM file with the node's key and certificate chain, as Kafka's PEM keystore holds.
        keystore = certs / "node-1-keystore.pem"
        keystore.write_text((certs / "node-1.key").read_text() + (certs / "node-1.pem").read_text())
        config = {
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.location": str(certs / "ca.pem"),
            "ssl.client.auth": "requested",
        }
        config.update(extra or {})
        super().__init__(workdir, name="secure", config=config)
        self.sasl_ssl_port = free_port()
        self.ssl_port = free_port()

    @property
    def sasl_ssl(self) -> str:
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def ssl(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--kafka-addr")
        cmd[i : i + 2] = [
            "--listeners",
            f"PLAINTEXT://{self.bootstrap},SASL_SSL://{self.sasl_ssl},SSL://{self.ssl}",
        ]
        return cmd


def _sluice(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLUICE_BIN), *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def certs(tmp_path) -> Path:
    out = tmp_path / "certs"
    cli_ok(_sluice("certs", "create", "--out", str(out), "--nodes", "1", "--clients", "alice"), "certs create")
    return out


def _start(tmp_path: Path, certs: Path, request, extra: dict[str, str] | None = None) -> SecureBroker:
    b = SecureBroker(tmp_path, certs, extra)
    request.node._sluice_brokers = [b]
    b.start()
    # The first users, over the PLAINTEXT listener.
    for user, mech in (("alice", "SCRAM-SHA-256"), ("bob", "SCRAM-SHA-512")):
        pw = tmp_path / f"{user}.password"
        pw.write_text(PASSWORD + "\n")
        cli_ok(
            _sluice("users", "create", user, "--mechanism", mech, "--password-file", str(pw), "--bootstrap-server", b.bootstrap),
            f"users create {user}",
        )
    return b


@pytest.fixture
def secure(tmp_path, certs, request):
    b = _start(tmp_path, certs, request)
    yield b
    rc = b.stop()
    assert rc == 0, f"broker exited {rc} on SIGTERM; log tail:\n{b.log_tail(40)}"
    assert not b.panics(), b.panics()[:10]


def sasl_conf(certs: Path, mechanism: str = "SCRAM-SHA-256", user: str = "alice", password: str = PASSWORD) -> dict:
    return {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": mechanism,
        "sasl.username": user,
        "sasl.password": password,
        "ssl.ca.location": str(certs / "ca.pem"),
    }


def read_back(bootstrap: str, topic: str, want: int, timeout_s: float = 60.0, **conf) -> list[bytes]:
    """Every record of partition 0 from the beginning, until `want` arrived (bounded)."""
    c = consumer(bootstrap, **conf)
    got: list[bytes] = []
    errors: list[str] = []
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout_s
        while len(got) < want:
            assert time.monotonic() < deadline, f"read {len(got)}/{want} of {topic}; errors: {errors[:5]}"
            for m in c.consume(num_messages=500, timeout=0.5):
                if m.error() is not None:
                    errors.append(str(m.error()))
                    continue
                got.append(m.value())
    finally:
        c.close()
    return got


def create_topic_secure(b: SecureBroker, certs: Path, tmp_path: Path, topic: str) -> None:
    """`sluice topics create` over SASL_SSL with a --command-config file."""
    props = tmp_path / "client.properties"
    props.write_text(
        "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-256\nsasl.username=alice\n"
        f"sasl.password={PASSWORD}\nssl.ca.location={certs / 'ca.pem'}\n"
    )
    cli_ok(
        _sluice("topics", "create", topic, "--partitions", "1", "--replication-factor", "1",
                "--command-config", str(props), "--bootstrap-server", b.sasl_ssl),
        "topics create over SASL_SSL",
    )


def test_kcat_and_confluent_kafka_produce_and_consume_over_sasl_ssl_scram_sha_256(secure, certs, tmp_path):
    create_topic_secure(secure, certs, tmp_path, "sec-a")
    conf = sasl_conf(certs)
    reports = produce(secure.sasl_ssl, "sec-a", [Outbound(f"ck-{i}".encode()) for i in range(20)], timeout_s=60, **conf)
    assert_all_delivered(reports)
    assert read_back(secure.sasl_ssl, "sec-a", 20, **conf) == [f"ck-{i}".encode() for i in range(20)]

    kx = [f"-X{k}={v}" for k, v in conf.items()]
    p = subprocess.run(["kcat", "-b", secure.sasl_ssl, *kx, "-P", "-t", "sec-a"],
                       input="kc-1\nkc-2\nkc-3\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    c = subprocess.run(["kcat", "-b", secure.sasl_ssl, *kx, "-C", "-t", "sec-a", "-o", "beginning", "-e", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    lines = c.stdout.split()
    assert lines == [f"ck-{i}" for i in range(20)] + ["kc-1", "kc-2", "kc-3"], lines
    assert secure.is_running()
    assert "principal=User:alice" in secure.log_text(), "the SASL principal is logged"


def test_a_wrong_password_gets_sasl_authentication_failed(secure, certs, tmp_path):
    errors: list[KafkaError] = []
    conf = sasl_conf(certs, password="not-it")
    c = consumer(secure.sasl_ssl, error_cb=errors.append, **conf)
    try:
        c.subscribe(["sec-wrong"])
        deadline = time.monotonic() + 30
        while not any(e.code() == KafkaError._AUTHENTICATION for e in errors):
            assert time.monotonic() < deadline, f"no authentication error: {errors}"
            c.poll(0.5)
    finally:
        c.close()
    auth = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
    assert "invalid credentials" in auth[0].str(), auth[0].str()

    kx = [f"-X{k}={v}" for k, v in conf.items()]
    r = subprocess.run(["kcat", "-b", secure.sasl_ssl, *kx, "-L", "-m", "10"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert re.search(r"SASL authentication error|Authentication failed", r.stderr), r.stderr[-1500:]
    # The broker logged the failure (with the same message for unknown users).
    assert "SASL authentication failed" in secure.log_text()


def test_kafka_python_over_ssl_with_a_client_certificate(secure, certs):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KTP

    ssl = dict(security_protocol="SSL", ssl_cafile=str(certs / "ca.pem"),
               ssl_certfile=str(certs / "client-alice.pem"), ssl_keyfile=str(certs / "client-alice.key"))
    p = KafkaProducer(bootstrap_servers=secure.ssl, request_timeout_ms=20000, **ssl)
    try:
        for i in range(5):
            p.send("sec-ssl", f"kp-{i}".encode()).get(timeout=30)
    finally:
        p.close(timeout=10)
    c = KafkaConsumer(bootstrap_servers=secure.ssl, consumer_timeout_ms=10000, **ssl)
    try:
        tp = KTP("sec-ssl", 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        got = [m.value for _, m in zip(range(5), c)]
    finally:
        c.close()
    assert got == [f"kp-{i}".encode() for i in range(5)]
    assert "principal=User:CN=alice" in secure.log_text(), "the certificate's subject is the principal"


@pytest.mark.parametrize("mechanism,user", [("SCRAM-SHA-512", "bob"), ("PLAIN", "alice"), ("PLAIN", "bob")])
def test_scram_sha_512_and_plain_with_confluent_kafka(secure, certs, mechanism, user):
    topic = f"sec-{mechanism.lower()}-{user}"
    conf = sasl_conf(certs, mechanism, user)
    reports = produce(secure.sasl_ssl, topic, [Outbound(f"m-{i}".encode()) for i in range(10)], timeout_s=60, **conf)
    assert_all_delivered(reports)
    assert read_back(secure.sasl_ssl, topic, 10, **conf) == [f"m-{i}".encode() for i in range(10)]


def test_users_cli_lists_and_deletes(secure, tmp_path):
    out = cli_ok(_sluice("users", "list", "--bootstrap-server", secure.bootstrap), "users list")
    assert re.search(r"^alice\tSCRAM-SHA-256\(iterations=8192\)$", out, re.M), out
    assert re.search(r"^bob\tSCRAM-SHA-512\(iterations=8192\)$", out, re.M), out
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    cli_fails(_sluice("users", "create", "carol", "--iterations", "100", "--password-file", str(pw),
                      "--bootstrap-server", secure.bootstrap), "too few iterations", r"iterations")
    cli_ok(_sluice("users", "delete", "bob", "--bootstrap-server", secure.bootstrap), "users delete")
    out = cli_ok(_sluice("users", "list", "--bootstrap-server", secure.bootstrap), "users list")
    assert "bob" not in out, out
    cli_fails(_sluice("users", "delete", "bob", "--bootstrap-server", secure.bootstrap), "delete again", r"RESOURCE_NOT_FOUND")


def test_a_producer_outlives_the_session_lifetime_by_reauthenticating(tmp_path, certs, request):
    b = _start(tmp_path, certs, request, {"connections.max.reauth.ms": "3000"})
    try:
        conf = sasl_conf(certs)
        # ~10 s of produce requests on the same connections: three lifetimes.
        msgs = [Outbound(f"r-{i}".encode()) for i in range(20)]
        reports = produce(b.sasl_ssl, "sec-reauth", msgs[:1], timeout_s=30, **conf)
        assert_all_delivered(reports)
        p = producer(b.sasl_ssl, **conf)
        failed: list[str] = []
        delivered = 0

        def cb(err, _msg):
            nonlocal delivered
            if err is not None:
                failed.append(str(err))
            else:
                delivered += 1

        deadline = time.monotonic() + 10
        sent = 0
        while time.monotonic() < deadline:
            p.produce("sec-reauth", f"r-{sent}".encode(), on_delivery=cb)
            sent += 1
            p.poll(0.5)
        assert p.flush(30) == 0
        assert not failed, failed[:5]
        assert delivered == sent
        log = b.log_text()
        assert "reauthentication=true" in log, "the client re-authenticated on its live connection"
        assert "without (or after the expiry of) SASL authentication" not in log
    finally:
        rc = b.stop()
        assert rc == 0, b.log_tail(40)
        assert not b.panics(), b.panics()[:10]
