"""ACLs with real clients: `sluice acls` (kafka-acls' flags) sets them, confluent-kafka and
kafka-python meet them. The clients here are `User:ANONYMOUS` on a PLAINTEXT listener;
`allow.everyone.if.no.acl.found` lets them set the first ACLs, as an operator of a fresh cluster
would. Every client call is bounded."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from conftest import Clients
from helpers import Outbound, assert_all_delivered, cli_fails, cli_ok, produce, producer

ME = "User:ANONYMOUS"
RECORDS = 20


@pytest.fixture
def cli(broker_factory) -> Clients:
    return Clients(
        broker_factory(
            {
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found": "true",
                "auto.create.topics.enable": "false",
                "group.initial.rebalance.delay.ms": "0",
            }
        )
    )


def read(bootstrap: str, topic: str, group: str, want: int, timeout_s: float = 30.0) -> tuple[int, int | None]:
    """Consumes `topic` in `group` until `want` records or an error: (records, error code)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    got, err = 0, None
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while got < want and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() in (KafkaError._PARTITION_EOF,):
                    continue
                err = m.error().code()
                break
            got += 1
    finally:
        c.close()
    return got, err


def visible_topics(bootstrap: str) -> set[str]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15)
    return set(md.topics)


def test_read_acl_consumes_a_not_b_cannot_delete_a_and_hides_b(cli: Clients):
    bs = cli.broker.bootstrap
    for t in ("a", "b"):
        cli.create_topic(t)
        assert_all_delivered(produce(bs, t, [Outbound(value=f"{t}{i}".encode()) for i in range(RECORDS)]))

    cli_ok(cli.sluice("acls", "create", "--allow-principal", ME, "--operation", "Read", "--topic", "a", "--group", "g"), "allow read a")
    cli_ok(cli.sluice("acls", "create", "--allow-principal", "User:bob", "--operation", "All", "--topic", "b"), "b is bob's")
    listing = cli_ok(cli.sluice("acls", "list", "--topic", "a"), "list a")
    assert "principal=User:ANONYMOUS" in listing and "operation=READ" in listing, listing

    assert read(bs, "a", "g", RECORDS) == (RECORDS, None)
    got, err = read(bs, "b", "g", 1)
    assert (got, err) == (0, KafkaError.TOPIC_AUTHORIZATION_FAILED), (got, err)
    assert "b" not in visible_topics(bs) and "a" in visible_topics(bs)

    admin = AdminClient({"bootstrap.servers": bs})
    fut = admin.delete_topics(["a"], operation_timeout=10)["a"]
    with pytest.raises(Exception) as e:
        fut.result(timeout=30)
    assert "TOPIC_AUTHORIZATION_FAILED" in str(e.value) or "authoriz" in str(e.value).lower(), str(e.value)
    assert "a" in visible_topics(bs), "a was deleted"

    # A group nobody allowed anonymous: GROUP_AUTHORIZATION_FAILED.
    cli_ok(cli.sluice("acls", "create", "--allow-principal", "User:bob", "--operation", "Read", "--group", "h"), "h is bob's")
    got, err = read(bs, "a", "h", 1)
    assert err == KafkaError.GROUP_AUTHORIZATION_FAILED, (got, err)


def test_deny_beats_allow_and_acls_are_deleted(cli: Clients):
    bs = cli.broker.bootstrap
    cli.create_topic("t")
    assert_all_delivered(produce(bs, "t", [Outbound(value=b"x") for _ in range(RECORDS)]))
    cli_ok(cli.sluice("acls", "create", "--allow-principal", "User:*", "--operation", "All", "--topic", "t", "--resource-pattern-type", "prefixed", "--group", "g"), "allow all")
    cli_ok(cli.sluice("acls", "create", "--deny-principal", ME, "--operation", "Read", "--topic", "t"), "deny read")
    got, err = read(bs, "t", "g", 1)
    assert err == KafkaError.TOPIC_AUTHORIZATION_FAILED, (got, err)

    out = cli_ok(cli.sluice("acls", "delete", "--deny-principal", ME, "--operation", "Read", "--topic", "t", "--resource-pattern-type", "literal"), "delete deny")
    assert "Deleted 1 ACL" in out, out
    assert read(bs, "t", "g", RECORDS) == (RECORDS, None)

    # kafka-python, a second protocol implementation, meets the same deny.
    from kafka import KafkaConsumer
    from kafka.errors import TopicAuthorizationFailedError

    cli_ok(cli.sluice("acls", "create", "--deny-principal", ME, "--operation", "Read", "--topic", "t"), "deny again")
    kc = KafkaConsumer(bootstrap_servers=bs, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        kc.assign([__import__("kafka").TopicPartition("t", 0)])
        with pytest.raises(TopicAuthorizationFailedError):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                kc.poll(timeout_ms=500)
    finally:
        kc.close()

    # Once bob owns the cluster resource, anonymous may no longer change ACLs.
    cli_ok(cli.sluice("acls", "create", "--allow-principal", "User:bob", "--operation", "All", "--cluster"), "cluster is bob's")
    cli_fails(cli.sluice("acls", "create", "--allow-principal", ME, "--operation", "All", "--cluster"), "anonymous alters ACLs", "CLUSTER_AUTHORIZATION_FAILED|not authorized")


def test_without_an_authorizer_acl_commands_say_security_is_disabled(broker_factory):
    cli = Clients(broker_factory())
    cli_fails(cli.sluice("acls", "create", "--allow-principal", ME, "--operation", "Read", "--topic", "x"), "create", "SECURITY_DISABLED|authorizer")
    cli_fails(cli.sluice("acls", "list"), "list", "SECURITY_DISABLED|authorizer")


# --- The same rules for a real principal: alice, authenticated with SCRAM over SASL_SSL. The
#     PLAINTEXT listener is the operator's (its anonymous principal is a super user).
from test_security import _start, certs, sasl_conf  # noqa: E402,F401  (certs is a fixture)


def test_sasl_user_with_read_on_a_reads_a_only_and_deny_beats_allow(tmp_path, certs, request):  # noqa: F811
    b = _start(
        tmp_path,
        certs,
        request,
        {
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": ME,
            "group.initial.rebalance.delay.ms": "0",
        },
    )
    try:
        admin = Clients(b)
        for t in ("a", "b"):
            admin.create_topic(t)
            assert_all_delivered(produce(b.bootstrap, t, [Outbound(value=f"{t}{i}".encode()) for i in range(RECORDS)]))
        cli_ok(admin.sluice("acls", "create", "--allow-principal", "User:alice", "--operation", "Read", "--topic", "a", "--group", "g"), "alice reads a")
        alice = sasl_conf(certs)

        def alice_read(topic: str, want: int):
            c = Consumer({"bootstrap.servers": b.sasl_ssl, "group.id": "g", "auto.offset.reset": "earliest", "enable.auto.commit": False, **alice})
            got, err = 0, None
            try:
                c.subscribe([topic])
                deadline = time.monotonic() + 30
                while got < want and time.monotonic() < deadline:
                    m = c.poll(0.5)
                    if m is None:
                        continue
                    if m.error():
                        err = m.error().code()
                        break
                    got += 1
            finally:
                c.close()
            return got, err

        assert alice_read("a", RECORDS) == (RECORDS, None)
        assert alice_read("b", 1) == (0, KafkaError.TOPIC_AUTHORIZATION_FAILED)
        md = AdminClient({"bootstrap.servers": b.sasl_ssl, **alice}).list_topics(timeout=15)
        assert "a" in md.topics and "b" not in md.topics, sorted(md.topics)
        alice_admin = AdminClient({"bootstrap.servers": b.sasl_ssl, **alice})  # kept: a dropped handle fails its futures
        fut = alice_admin.delete_topics(["a"], operation_timeout=10)["a"]
        with pytest.raises(Exception) as e:
            fut.result(timeout=30)
        assert "AUTHORIZATION" in str(e.value).upper(), str(e.value)
        # alice's produce to a is refused too: Read is not Write.
        p = producer(b.sasl_ssl, **alice)
        errors = []
        p.produce("a", b"x", on_delivery=lambda err, msg: errors.append(err))
        p.flush(30)
        assert errors and errors[0] is not None and errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, errors

        # Deny beats allow: an allow-all for every user, and a deny of Read on a for alice.
        cli_ok(admin.sluice("acls", "create", "--allow-principal", "User:*", "--operation", "All", "--topic", "a"), "allow all")
        cli_ok(admin.sluice("acls", "create", "--deny-principal", "User:alice", "--operation", "Read", "--topic", "a"), "deny alice")
        assert alice_read("a", 1) == (0, KafkaError.TOPIC_AUTHORIZATION_FAILED)
        # bob, allowed by User:* and not denied, reads a (with his own group ACL).
        cli_ok(admin.sluice("acls", "create", "--allow-principal", "User:bob", "--operation", "Read", "--group", "g2"), "bob's group")
        c = Consumer({"bootstrap.servers": b.sasl_ssl, "group.id": "g2", "auto.offset.reset": "earliest", **sasl_conf(certs, "SCRAM-SHA-512", "bob")})
        try:
            c.subscribe(["a"])
            got, deadline = 0, time.monotonic() + 30
            while got < RECORDS and time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is not None and not m.error():
                    got += 1
            assert got == RECORDS
        finally:
            c.close()
    finally:
        assert b.stop() == 0
        assert not b.panics(), b.panics()[:10]
