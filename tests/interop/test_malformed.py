"""Hostile and broken requests over raw sockets. For each one the broker answers with the right Kafka
error or closes that connection, never hangs or panics, writes nothing it should not, and keeps
serving everyone else: after every case a fresh connection must still work."""

from __future__ import annotations

import socket
import struct

import pytest

from conftest import Broker, Clients
from helpers import Outbound, assert_all_delivered, consume_all, produce, watermarks
from kafka_wire import (
    API_VERSIONS,
    ERR_CORRUPT_MESSAGE,
    ERR_MESSAGE_TOO_LARGE,
    ERR_NONE,
    ERR_UNKNOWN_TOPIC_OR_PARTITION,
    ERR_UNSUPPORTED_VERSION,
    FETCH,
    METADATA,
    PRODUCE,
    RawConn,
    api_versions_request,
    build_batch,
    crc32c,
    frame,
    i16,
    i32,
    metadata_request_v1,
    parse_api_versions_v0,
    parse_produce_v3,
    produce_request_v3,
    request_header_v1,
)

TOPIC = "malformed"
SOCKET_LIMIT = 4 * 1024 * 1024
CONFIG = {
    "socket.request.max.bytes": str(SOCKET_LIMIT),
    "message.max.bytes": "1048588",
    "auto.create.topics.enable": "false",
}


@pytest.fixture(scope="module")
def mbroker(tmp_path_factory, request):
    b = Broker(tmp_path_factory.mktemp("malformed"), name="malformed", config=CONFIG)
    request.module._sluice_shared = b
    b.start()
    Clients(b).create_topic(TOPIC, 1)
    yield b
    rc = b.stop()
    assert not b.panics(), "broker panicked:\n" + "\n".join(b.panics()[:20])
    assert rc == 0, f"exit code {rc} on SIGTERM"


def conn(b: Broker, timeout_s: float = 10.0) -> RawConn:
    return RawConn("127.0.0.1", b.kafka_port, timeout_s)


def expect_closed_or_reply(c: RawConn, what: str) -> bytes | None:
    """Either outcome is allowed; silence is not (RawConn's timeout turns it into a failure)."""
    try:
        return c.recv_frame()
    except socket.timeout:
        raise AssertionError(f"{what}: broker neither answered nor closed the connection within the timeout")


def expect_closed(c: RawConn, what: str) -> None:
    try:
        got = c.recv_frame()
    except socket.timeout:
        raise AssertionError(f"{what}: broker did not close the connection within the timeout")
    assert got is None, f"{what}: expected the connection to be closed, got a {len(got)}-byte reply {got[:40]!r}"


def valid_produce(b: Broker, value: bytes, corr: int = 9) -> int:
    """A well-formed raw produce on a fresh connection; returns its base offset."""
    with conn(b) as c:
        c.send(produce_request_v3(corr, TOPIC, 0, build_batch([(b"ok", value)])))
        resp = c.recv_frame()
    assert resp is not None, "fresh connection: valid produce got the connection closed"
    got_corr, parts = parse_produce_v3(resp)
    assert got_corr == corr and len(parts) == 1
    _, _, err, base = parts[0]
    assert err == ERR_NONE, f"fresh connection: valid produce failed with error {err}"
    return base


def still_serving(b: Broker, hw_before: int, case: str) -> None:
    """The broker is alive, answers ApiVersions on a new connection, and the log end did not move:
    the next valid write lands exactly at the old high watermark."""
    assert b.is_running(), f"{case}: broker died; log tail:\n{b.log_tail()}"
    with conn(b) as c:
        c.send(api_versions_request(2, 77))
        resp = c.recv_frame()
    assert resp is not None, f"{case}: fresh ApiVersions connection was closed"
    corr, err, ranges = parse_api_versions_v0(resp)
    assert (corr, err) == (77, ERR_NONE) and PRODUCE in ranges, f"{case}: ApiVersions after the case: corr={corr} err={err}"
    base = valid_produce(b, f"after-{case}".encode())
    assert base == hw_before, f"{case}: a valid write after the case landed at {base}, want {hw_before} (the bad request wrote something?)"
    assert not b.panics(), f"{case}: panic in log:\n" + "\n".join(b.panics()[:10])


def hw(b: Broker) -> int:
    return watermarks(b.bootstrap, TOPIC, 1)[0][1]


# --- framing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,prefix",
    [
        ("negative-length", i32(-5) + b"\x00" * 16),
        ("min-int-length", i32(-(2**31)) + b"\x00" * 16),
        ("huge-length", i32(2**31 - 1)),
        ("over-socket-limit", i32(SOCKET_LIMIT + 1) + b"\x00" * 64),
        ("too-short-for-a-header", i32(3) + b"\x00\x12\x00"),
    ],
)
def test_bad_length_prefix_closes_connection(mbroker, case, prefix):
    before = hw(mbroker)
    # --- send only a length prefix (and a little), the broker must hang up rather than wait or allocate
    with conn(mbroker) as c:
        c.send(prefix)
        expect_closed(c, case)
    still_serving(mbroker, before, case)


def test_truncated_frame_then_hangup(mbroker):
    before = hw(mbroker)
    # --- promise 100 bytes, send 20, hang up: the broker must drop the half frame
    with conn(mbroker) as c:
        c.send(i32(100) + request_header_v1(METADATA, 1, 5)[:20].ljust(20, b"\x00"))
    # --- a stalled half frame on another connection must not block anyone
    stalled = conn(mbroker)
    try:
        stalled.send(i32(1000) + b"\x00" * 10)
        still_serving(mbroker, before, "truncated-frame")
    finally:
        stalled.close()


# --- API keys and versions ---------------------------------------------------------------------------


def test_api_versions_v99_gets_error_35_and_v0_ranges(mbroker):
    before = hw(mbroker)
    with conn(mbroker) as c:
        # --- ApiVersions at a version from the future: UNSUPPORTED_VERSION with a v0 body (KIP-511)
        c.send(api_versions_request(99, 4242))
        resp = c.recv_frame()
        assert resp is not None, "ApiVersions v99: connection closed instead of an error reply"
        corr, err, ranges = parse_api_versions_v0(resp)
        assert corr == 4242
        assert err == ERR_UNSUPPORTED_VERSION, f"ApiVersions v99: error {err}, want 35"
        for key in (PRODUCE, FETCH, METADATA, API_VERSIONS):
            assert key in ranges, f"v0 body lacks API {key}: {ranges}"
        lo, hi = ranges[API_VERSIONS]
        assert lo == 0 and hi >= 2, f"ApiVersions range {lo}..{hi}"
        # --- the client retries at a version the broker speaks, on the same connection
        c.send(api_versions_request(0, 4243))
        resp = c.recv_frame()
        assert resp is not None, "connection closed after the KIP-511 retry"
        corr, err, ranges2 = parse_api_versions_v0(resp)
        assert (corr, err) == (4243, ERR_NONE) and ranges2 == ranges
    still_serving(mbroker, before, "api-versions-v99")


@pytest.mark.parametrize(
    "case,payload",
    [
        ("unknown-api-key", frame(request_header_v1(9999, 0, 11))),
        ("negative-api-key", frame(request_header_v1(-3, 0, 12))),
        ("metadata-v99", frame(request_header_v1(METADATA, 99, 13) + i32(-1))),
        ("produce-v99", frame(request_header_v1(PRODUCE, 99, 14) + b"\x00" * 20)),
        ("fetch-v-negative", frame(request_header_v1(FETCH, -1, 15) + b"\x00" * 20)),
    ],
)
def test_unknown_api_or_version_errors_or_closes(mbroker, case, payload):
    before = hw(mbroker)
    with conn(mbroker) as c:
        c.send(payload)
        resp = expect_closed_or_reply(c, case)
        if resp is not None:
            corr = struct.unpack(">i", resp[:4])[0]
            assert corr == struct.unpack(">i", payload[8:12])[0], f"{case}: reply for another correlation id"
    still_serving(mbroker, before, case)


@pytest.mark.parametrize(
    "case,payload",
    [
        # Metadata v1 announcing 5 topics and carrying none.
        ("metadata-truncated-array", frame(request_header_v1(METADATA, 1, 21) + i32(5))),
        # Metadata v1 with a topic name that claims 300 bytes and has 3.
        ("metadata-truncated-string", frame(request_header_v1(METADATA, 1, 22) + i32(1) + i16(300) + b"abc")),
        # A 2-billion-entry array in a tiny frame: must be refused before allocation.
        ("metadata-huge-array-count", frame(request_header_v1(METADATA, 1, 23) + i32(2**31 - 1))),
        # Client id length that runs past the frame.
        ("header-truncated-client-id", frame(struct.pack(">hhih", METADATA, 1, 24, 500) + b"xy")),
        # Produce v3 cut off in the middle of its topic array.
        ("produce-truncated-body", frame(request_header_v1(PRODUCE, 3, 25) + i16(-1) + i16(1) + i32(5000) + i32(1) + i16(len(TOPIC)))),
        # Produce v3 whose records field claims 1 MB but has 10 bytes.
        ("produce-records-length-lies", frame(request_header_v1(PRODUCE, 3, 26) + i16(-1) + i16(1) + i32(5000) + i32(1) + i16(len(TOPIC)) + TOPIC.encode() + i32(1) + i32(0) + i32(1_000_000) + b"\x00" * 10)),
    ],
)
def test_truncated_request_body(mbroker, case, payload):
    before = hw(mbroker)
    with conn(mbroker) as c:
        c.send(payload)
        resp = expect_closed_or_reply(c, case)
        if resp is not None and case.startswith("produce"):
            _, parts = parse_produce_v3(resp)
            assert all(err != ERR_NONE for *_, err, _ in parts), f"{case}: produce of garbage succeeded: {parts}"
    still_serving(mbroker, before, case)


# --- record batches ------------------------------------------------------------------------------------


def reseal(batch: bytearray) -> bytes:
    """Recomputes the CRC after an edit, so only the intended defect remains."""
    struct.pack_into(">I", batch, 17, crc32c(bytes(batch[21:])))
    return bytes(batch)


def bad_batches() -> list[tuple[str, bytes, set[int]]]:
    good = build_batch([(b"k1", b"value-one"), (b"k2", b"value-two"), (None, b"value-three")])
    cases = []

    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # a record byte: CRC no longer matches
    cases.append(("crc-over-records", bytes(flipped), {ERR_CORRUPT_MESSAGE}))

    wrong_crc = bytearray(good)
    wrong_crc[17] ^= 0x01  # the CRC field itself
    cases.append(("crc-field", bytes(wrong_crc), {ERR_CORRUPT_MESSAGE}))

    attrs = bytearray(good)
    attrs[22] ^= 0x01  # attributes -> gzip, without resealing: the CRC covers attributes
    cases.append(("crc-over-attributes", bytes(attrs), {ERR_CORRUPT_MESSAGE}))

    # Wrong magic: Kafka answers CORRUPT_MESSAGE, INVALID_RECORD (87) or UNSUPPORTED_FOR_MESSAGE_FORMAT (43).
    for magic in (0, 1, 3, -1):
        m = bytearray(good)
        m[16] = magic & 0xFF
        cases.append((f"magic-{magic}", bytes(m), {ERR_CORRUPT_MESSAGE, 87, 43}))

    cases.append(("truncated-batch", good[:-7], {ERR_CORRUPT_MESSAGE, 87}))
    cases.append(("header-only", good[:40], {ERR_CORRUPT_MESSAGE, 87}))

    longer = bytearray(good)
    struct.pack_into(">i", longer, 8, len(good) - 12 + 500)  # batchLength points past the end
    cases.append(("batch-length-past-end", bytes(longer), {ERR_CORRUPT_MESSAGE, 87}))

    negative = bytearray(good)
    struct.pack_into(">i", negative, 8, -100)
    cases.append(("batch-length-negative", bytes(negative), {ERR_CORRUPT_MESSAGE, 87}))

    counts = bytearray(good)
    struct.pack_into(">i", counts, 23, 1000)  # lastOffsetDelta 1000 for 3 records: would leave an offset gap
    cases.append(("last-offset-delta-too-big", reseal(counts), {ERR_CORRUPT_MESSAGE, 87}))

    small = bytearray(good)
    struct.pack_into(">i", small, 23, 0)  # lastOffsetDelta 0 for 3 records: offsets would collide
    cases.append(("last-offset-delta-too-small", reseal(small), {ERR_CORRUPT_MESSAGE, 87}))

    lying = bytearray(good)
    struct.pack_into(">i", lying, 23, 4)  # header says 5 records (delta 4, count 5); the body has 3
    struct.pack_into(">i", lying, 57, 5)
    cases.append(("records-count-lies", reseal(lying), {ERR_CORRUPT_MESSAGE, 87}))

    negcount = bytearray(good)
    struct.pack_into(">i", negcount, 57, -1)
    cases.append(("records-count-negative", reseal(negcount), {ERR_CORRUPT_MESSAGE, 87}))

    # Two batches in one records field, the second corrupt: the whole partition write is refused.
    cases.append(("second-batch-corrupt", good + bytes(flipped), {ERR_CORRUPT_MESSAGE, 87}))
    # A valid batch followed by a few stray bytes.
    cases.append(("trailing-bytes", good + b"\x00\x01\x02", {ERR_CORRUPT_MESSAGE, 87}))
    cases.append(("empty-records", b"", {ERR_CORRUPT_MESSAGE, 87}))
    return cases


@pytest.mark.parametrize("case,records,allowed", bad_batches(), ids=[c[0] for c in bad_batches()])
def test_bad_batch_is_rejected(mbroker, case, records, allowed):
    before = hw(mbroker)
    # --- produce the bad batch with acks=1: the reply must name the right error
    with conn(mbroker) as c:
        c.send(produce_request_v3(31, TOPIC, 0, records))
        resp = expect_closed_or_reply(c, case)
    assert resp is not None, f"{case}: connection closed instead of a produce error (a well-framed request deserves a reply)"
    corr, parts = parse_produce_v3(resp)
    assert corr == 31 and len(parts) == 1, f"{case}: {corr} {parts}"
    _, p, err, _ = parts[0]
    assert err in allowed, f"{case}: error code {err}, want one of {sorted(allowed)}"
    # --- nothing was written, and the broker goes on
    still_serving(mbroker, before, case)


def test_oversize_batch_gets_message_too_large(mbroker):
    before = hw(mbroker)
    # --- one 1.5 MB record, over message.max.bytes but under socket.request.max.bytes
    big = build_batch([(b"big", b"z" * 1_500_000)])
    with conn(mbroker, timeout_s=30) as c:
        c.send(produce_request_v3(41, TOPIC, 0, big))
        resp = c.recv_frame()
    assert resp is not None, "oversize batch: connection closed instead of MESSAGE_TOO_LARGE"
    _, parts = parse_produce_v3(resp)
    assert parts[0][2] == ERR_MESSAGE_TOO_LARGE, f"oversize batch: error {parts[0][2]}, want 10"
    still_serving(mbroker, before, "oversize-batch")


def test_unknown_topic_and_partition(mbroker):
    before = hw(mbroker)
    batch = build_batch([(None, b"nowhere")])
    for topic, partition in (("no-such-topic", 0), (TOPIC, 99), (TOPIC, -1)):
        # --- auto-create is off: the write is refused, not silently created
        with conn(mbroker) as c:
            c.send(produce_request_v3(51, topic, partition, batch))
            resp = c.recv_frame()
        assert resp is not None
        _, parts = parse_produce_v3(resp)
        assert parts[0][2] == ERR_UNKNOWN_TOPIC_OR_PARTITION, f"{topic}/{partition}: error {parts[0][2]}, want 3"
    r = Clients(mbroker).sluice("topics", "list")
    assert "no-such-topic" not in r.stdout.split(), "a produce to an unknown topic created it with auto-create off"
    still_serving(mbroker, before, "unknown-topic")


def test_raw_batch_reads_back_with_a_real_client(mbroker):
    # --- our hand-built batch is valid Kafka: confluent-kafka reads what we wrote raw
    before = hw(mbroker)
    base = valid_produce(mbroker, b"hand-built")
    assert base == before
    got = consume_all(mbroker.bootstrap, TOPIC, 1, start={0: base}, timeout_s=30)
    assert [(r.offset, r.key, r.value) for r in got] == [(base, b"ok", b"hand-built")]

    # --- and after all that abuse, a normal client still produces and consumes
    out = [Outbound(value=f"after-{i}".encode()) for i in range(100)]
    rep = produce(mbroker.bootstrap, TOPIC, out, timeout_s=60)
    assert_all_delivered(rep)
    assert rep[0].offset == base + 1
    got = consume_all(mbroker.bootstrap, TOPIC, 1, start={0: base + 1}, timeout_s=30)
    assert [r.value for r in got] == [m.value for m in out]
