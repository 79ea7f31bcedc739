"""Compressed record batches on the produce path. The leader decompresses every compressed batch
(gzip, snappy in xerial or raw framing, LZ4 frames, zstd) under a cap of 64 x max.message.bytes
and walks its records. A batch whose record count or offset deltas lie, an unknown codec, a
dependent-block LZ4 frame or a bomb past the cap is refused with CORRUPT_MESSAGE and nothing is
stored. Valid batches are stored byte for byte as sent (only baseOffset and partitionLeaderEpoch,
outside the CRC, are the broker's), and batches from confluent-kafka, kafka-python and kcat
round-trip through each client."""

from __future__ import annotations

import gzip
import struct
import time

import lz4.frame
import pytest
import snappy
import zstandard

from conftest import KCAT, Broker, Clients
from helpers import KCAT_FORMAT, Outbound, assert_all_delivered, consume_all, parse_kcat_lines, produce, watermarks
from kafka_wire import (
    ERR_CORRUPT_MESSAGE,
    ERR_NONE,
    RawConn,
    api_versions_request,
    crc32c,
    fetch_request_v4,
    i8,
    i16,
    i32,
    i64,
    parse_api_versions_v0,
    parse_batches,
    parse_fetch_v4,
    parse_produce_v3,
    produce_request_v3,
    varint,
)

GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4
FIND_COORDINATOR = 10
XERIAL_MAGIC = b"\x82SNAPPY\x00"

# --- batches built by hand, compressed with each codec's own Python library ---------------------


def encode_records(records: list[tuple[bytes | None, bytes]], deltas: list[int] | None = None) -> bytes:
    """The records section of a v2 batch; `deltas` overrides each record's offset delta."""
    out = bytearray()
    for i, (key, value) in enumerate(records):
        body = bytearray()
        body += i8(0)  # attributes
        body += varint(i)  # timestamp delta
        body += varint(i if deltas is None else deltas[i])
        body += varint(-1) if key is None else varint(len(key)) + key
        body += varint(len(value)) + value
        body += varint(1) + varint(1) + b"h" + varint(len(key or b"")) + (key or b"")  # one header
        out += varint(len(body)) + body
    return bytes(out)


def xerial(data: bytes, block: int = 32 * 1024) -> bytes:
    """snappy-java's framing, as the Java client and kafka-python write it."""
    out = bytearray(XERIAL_MAGIC + i32(1) + i32(1))
    for at in range(0, len(data), block):
        c = snappy.compress(data[at : at + block])
        out += i32(len(c)) + c
    return bytes(out)


COMPRESSORS = {
    "gzip": (GZIP, lambda d: gzip.compress(d, compresslevel=6)),
    "snappy-xerial": (SNAPPY, xerial),
    "snappy-raw": (SNAPPY, snappy.compress),  # librdkafka's framing: one raw block
    "lz4": (LZ4, lambda d: lz4.frame.compress(d, block_linked=False)),
    "zstd": (ZSTD, lambda d: zstandard.ZstdCompressor(level=3).compress(d)),
}


def seal(codec: int, payload: bytes, count: int, last_delta: int) -> bytes:
    """A v2 batch around an (already compressed) records section, with a correct CRC-32C."""
    ts = int(time.time() * 1000)
    after_crc = i16(codec) + i32(last_delta) + i64(ts) + i64(ts + last_delta) + i64(-1) + i16(-1) + i32(-1) + i32(count) + payload
    return i64(0) + i32(4 + 1 + 4 + len(after_crc)) + i32(-1) + i8(2) + struct.pack(">I", crc32c(after_crc)) + after_crc


def records_for(name: str, n: int) -> list[tuple[bytes | None, bytes]]:
    return [(None if i % 5 == 0 else f"{name}-k{i}".encode(), f"{name}-value-{i:05d}-".encode() + b"xyz" * (i % 40)) for i in range(n)]


# --- raw requests ---------------------------------------------------------------------------------


def raw_produce(b: Broker, topic: str, batch: bytes, corr: int = 7) -> tuple[int, int]:
    """(error code, base offset) of a Produce v3 with acks=1 carrying `batch`."""
    with RawConn("127.0.0.1", b.kafka_port, timeout_s=30) as c:
        c.send(produce_request_v3(corr, topic, 0, batch))
        resp = c.recv_frame()
    assert resp is not None, "the broker closed the connection instead of answering a well-framed produce"
    got_corr, parts = parse_produce_v3(resp)
    assert got_corr == corr and len(parts) == 1, (got_corr, parts)
    _, _, err, base = parts[0]
    return err, base


def stored_batches(b: Broker, topic: str, until: int) -> list[bytes]:
    """Every stored batch of partition 0 below offset `until`, raw, via Fetch v4."""
    out: list[bytes] = []
    offset = 0
    deadline = time.monotonic() + 30
    while offset < until:
        assert time.monotonic() < deadline, f"fetching {topic} stalled at offset {offset} (want {until})"
        with RawConn("127.0.0.1", b.kafka_port) as c:
            c.send(fetch_request_v4(5, topic, 0, offset, max_wait_ms=100, max_bytes=8 << 20))
            resp = c.recv_frame()
        assert resp is not None
        _, parts = parse_fetch_v4(resp)
        (_, _, err, _, records) = parts[0]
        assert err == ERR_NONE, f"fetch at {offset}: error {err}"
        batches, _ = parse_batches(records)
        for sb in batches:
            if sb.base_offset + sb.last_offset_delta < offset:
                continue
            out.append(records[sb.position : sb.end])
            offset = sb.base_offset + sb.last_offset_delta + 1
    return out


def hw(b: Broker, topic: str) -> int:
    return watermarks(b.bootstrap, topic, 1)[0][1]


def codec_of(batch: bytes) -> int:
    return struct.unpack_from(">h", batch, 21)[0] & 0x07


def records_in(batch: bytes) -> int:
    """lastOffsetDelta + 1."""
    return struct.unpack_from(">i", batch, 23)[0] + 1


@pytest.fixture(scope="module")
def cbroker(tmp_path_factory, request):
    b = Broker(tmp_path_factory.mktemp("compression"), name="compression", config={"auto.create.topics.enable": "false"})
    request.module._sluice_shared = b
    b.start()
    yield b
    rc = b.stop()
    assert not b.panics(), "broker panicked:\n" + "\n".join(b.panics()[:20])
    assert rc == 0, f"exit code {rc} on SIGTERM"


_topics = iter(range(10_000))


def new_topic(b: Broker, *configs: str) -> str:
    name = f"comp-{next(_topics)}"
    Clients(b).create_topic(name, 1, *configs)
    return name


def assert_refused_and_nothing_stored(b: Broker, topic: str, batch: bytes, case: str) -> None:
    before = hw(b, topic)
    err, _ = raw_produce(b, topic, batch)
    assert err == ERR_CORRUPT_MESSAGE, f"{case}: error {err}, want CORRUPT_MESSAGE (2)"
    assert hw(b, topic) == before, f"{case}: the high watermark moved"
    # The next valid write lands exactly where the refused one would have.
    err, base = raw_produce(b, topic, seal(0, encode_records([(b"k", b"after")]), 1, 0))
    assert (err, base) == (ERR_NONE, before), f"{case}: a valid write after it got ({err}, {base}), want (0, {before})"
    assert not b.panics(), f"{case}: the broker panicked"


# --- refusals -------------------------------------------------------------------------------------


def lying_batches(name: str) -> list[tuple[str, bytes]]:
    codec, compress = COMPRESSORS[name]
    recs = records_for(name, 10)
    body = encode_records(recs)
    return [
        ("count-says-more", seal(codec, compress(body), 12, 11)),
        ("count-says-fewer", seal(codec, compress(body), 8, 7)),
        # The attack: a small batch claiming 2^31-1 records, so as many offsets.
        ("count-says-2^31-1", seal(codec, compress(body), 2**31 - 1, 2**31 - 2)),
        ("deltas-out-of-order", seal(codec, compress(encode_records(recs, [0, 1, 2, 4, 3, 5, 6, 7, 8, 9])), 10, 9)),
        ("deltas-start-at-1", seal(codec, compress(encode_records(recs, list(range(1, 11)))), 10, 9)),
        ("truncated-payload", seal(codec, compress(body)[:-9], 10, 9)),
    ]


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_lying_compressed_batches_are_refused(cbroker, name):
    topic = new_topic(cbroker)
    # --- a valid batch first, so "nothing stored" is measured against a non-empty log
    codec, compress = COMPRESSORS[name]
    err, _ = raw_produce(cbroker, topic, seal(codec, compress(encode_records(records_for(name, 10))), 10, 9))
    assert err == ERR_NONE, f"{name}: a valid batch was refused with {err}"
    for case, batch in lying_batches(name):
        assert_refused_and_nothing_stored(cbroker, topic, batch, f"{name}/{case}")


def test_unknown_codecs_and_dependent_lz4_blocks_are_refused(cbroker):
    topic = new_topic(cbroker)
    body = encode_records(records_for("x", 5))
    payload = zstandard.ZstdCompressor().compress(body)
    for codec in (5, 6, 7):
        assert_refused_and_nothing_stored(cbroker, topic, seal(codec, payload, 5, 4), f"codec-{codec}")
    # Valid LZ4, but Kafka's reader refuses dependent blocks, so Java consumers could not read it.
    # (More than one 64 KiB block: liblz4 marks a single-block frame independent whatever it is asked.)
    big = encode_records(records_for("lz", 2000))
    linked = lz4.frame.compress(big, block_linked=True, block_size=lz4.frame.BLOCKSIZE_MAX64KB)
    assert linked[4] & 0x20 == 0, "the test frame is not in dependent-block mode"
    assert_refused_and_nothing_stored(cbroker, topic, seal(LZ4, linked, 2000, 1999), "lz4-linked-blocks")


def test_decompression_bomb_is_refused(cbroker):
    # max.message.bytes 65536 -> a decompressed cap of 4 MiB.
    topic = new_topic(cbroker, "max.message.bytes=65536")
    # --- 3 MiB of zeros in one record is under the cap: accepted
    fits = encode_records([(b"big", bytes(3 << 20))])
    for name in ("gzip", "zstd", "lz4"):
        codec, compress = COMPRESSORS[name]
        batch = seal(codec, compress(fits), 1, 0)
        assert len(batch) < 65536
        err, _ = raw_produce(cbroker, topic, batch)
        assert err == ERR_NONE, f"{name}: a 3 MiB record under a 4 MiB cap was refused with {err}"
    # --- 12 MiB of zeros (LZ4 expands at most ~255x, so that still fits 64 KiB) is not
    bomb = encode_records([(b"bomb", bytes(12 << 20))])
    for name in ("gzip", "zstd", "lz4"):
        codec, compress = COMPRESSORS[name]
        batch = seal(codec, compress(bomb), 1, 0)
        assert len(batch) < 65536, f"{name}: bomb of {len(batch)} bytes does not fit max.message.bytes"
        assert_refused_and_nothing_stored(cbroker, topic, batch, f"{name}-bomb")
    # Snappy expands at most ~21x, so 64 KiB of it cannot pass a 4 MiB cap; a snappy bomb can only
    # lie in its preamble, and is refused before its output buffer is allocated.
    liar = bytes([0x80, 0x80, 0x80, 0x80, 0x04]) + bytes(64)  # preamble: 1 GiB follows
    assert_refused_and_nothing_stored(cbroker, topic, seal(SNAPPY, liar, 1, 0), "snappy-preamble-lies")


# --- valid batches: stored byte for byte ------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_raw_compressed_batches_are_stored_as_sent(cbroker, name):
    topic = new_topic(cbroker)
    codec, compress = COMPRESSORS[name]
    sent = []
    for round_ in range(3):
        recs = records_for(f"{name}{round_}", 200)
        batch = seal(codec, compress(encode_records(recs)), 200, 199)
        err, base = raw_produce(cbroker, topic, batch)
        assert (err, base) == (ERR_NONE, round_ * 200), f"{name}: produce got ({err}, {base})"
        sent.append((batch, recs))
    # --- the stored batches are the sent bytes, but for baseOffset and partitionLeaderEpoch
    stored = stored_batches(cbroker, topic, 600)
    assert len(stored) == 3, f"{name}: {len(stored)} stored batches, want 3"
    for i, ((batch, _), got) in enumerate(zip(sent, stored)):
        assert struct.unpack_from(">q", got, 0)[0] == i * 200
        assert got[8:12] == batch[8:12] and got[16:] == batch[16:], f"{name}: stored batch {i} differs from the one sent"
        assert codec_of(got) == codec
    # --- and a real client decompresses them to the records we built
    got = consume_all(cbroker.bootstrap, topic, 1, timeout_s=60)
    want = [rec for _, recs in sent for rec in recs]
    assert [(r.key, r.value) for r in got] == want


# --- valid batches from real clients round-trip -------------------------------------------------------

N_CLIENT = 3_000


def client_messages(client: str, codec: str) -> list[tuple[bytes, bytes]]:
    return [(f"{client}-{codec}-k{i % 17}".encode(), f"{client}-{codec}-{i:06d}-".encode() + b"payload" * (i % 25)) for i in range(N_CLIENT)]


def advertises(b: Broker, api_key: int) -> bool:
    with RawConn("127.0.0.1", b.kafka_port) as c:
        c.send(api_versions_request(2, 3))
        resp = c.recv_frame()
    assert resp is not None
    _, err, ranges = parse_api_versions_v0(resp)
    assert err == ERR_NONE
    return api_key in ranges


def check_stored_codec(b: Broker, topic: str, codec: str, n: int, librdkafka: bool = False) -> None:
    """The client really compressed: the stored batches carry the codec. librdkafka sends a batch
    uncompressed when compression would not shrink it, which happens only to a batch of a record
    or two (message 0 has no payload; a loaded machine makes librdkafka send such tiny batches)."""
    want = {"gzip": GZIP, "snappy": SNAPPY, "lz4": LZ4, "zstd": ZSTD}[codec]
    if librdkafka and want == LZ4 and not advertises(b, FIND_COORDINATOR):
        # librdkafka takes FindCoordinator v0 as the sign of a broker that reads LZ4 and, without
        # it, quietly sends LZ4 batches uncompressed. Sluice serves FindCoordinator, so this
        # holds only for a build without consumer groups.
        want = 0
    batches = stored_batches(b, topic, n)
    codecs = {codec_of(x) for x in batches}
    assert want in codecs, f"stored batches use codecs {codecs}, want {want}"
    odd = [(codec_of(x), records_in(x)) for x in batches if codec_of(x) != want]
    assert all(c == 0 and r <= 2 for c, r in odd), f"batches not in codec {want} (codec, records): {odd[:10]}"


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_kafka_python_round_trip(cbroker, codec):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    topic = new_topic(cbroker)
    msgs = client_messages("kafka-python", codec)
    # --- kafka-python produces compressed batches (xerial framing for snappy)
    p = KafkaProducer(
        bootstrap_servers=cbroker.bootstrap,
        compression_type=codec,
        acks="all",
        linger_ms=20,
        batch_size=64 * 1024,
        # kafka-python 3.x defaults: idempotence on.
        request_timeout_ms=30_000,
        max_block_ms=30_000,
    )
    try:
        futures = [p.send(topic, key=k, value=v, partition=0) for k, v in msgs]
        p.flush(timeout=60)
        offsets = [f.get(timeout=60).offset for f in futures]
    finally:
        p.close(timeout=10)
    assert offsets == list(range(N_CLIENT))
    check_stored_codec(cbroker, topic, codec, N_CLIENT)

    # --- kafka-python reads them back
    c = KafkaConsumer(bootstrap_servers=cbroker.bootstrap, group_id=None, enable_auto_commit=False, request_timeout_ms=30_000)
    got = []
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        deadline = time.monotonic() + 60
        while len(got) < N_CLIENT and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=500, max_records=1000).values():
                got.extend((r.offset, r.key, r.value) for r in recs)
    finally:
        c.close()
    assert got == [(i, k, v) for i, (k, v) in enumerate(msgs)]
    # --- and so does librdkafka
    via_confluent = consume_all(cbroker.bootstrap, topic, 1, timeout_s=60)
    assert [(r.key, r.value) for r in via_confluent] == msgs


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_kcat_round_trip(cbroker, codec, tmp_path):
    assert KCAT, "kcat is not installed (make deps)"
    topic = new_topic(cbroker)
    msgs = client_messages("kcat", codec)
    src = tmp_path / "in.txt"
    src.write_bytes(b"".join(k + b"\t" + v + b"\n" for k, v in msgs))
    # --- kcat produces compressed batches (raw snappy for snappy)
    r = Clients(cbroker).kcat("-P", "-t", topic, "-p", "0", "-K", "\t", "-z", codec, "-X", "acks=all", stdin_path=src, timeout_s=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert hw(cbroker, topic) == N_CLIENT
    check_stored_codec(cbroker, topic, codec, N_CLIENT, librdkafka=True)
    # --- kcat reads them back
    r = Clients(cbroker).kcat("-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", KCAT_FORMAT, timeout_s=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = parse_kcat_lines(r.stdout)
    assert [(x.offset, x.key, x.value) for x in got] == [(i, k, v) for i, (k, v) in enumerate(msgs)]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_confluent_kafka_round_trip(cbroker, codec):
    topic = new_topic(cbroker)
    msgs = client_messages("confluent", codec)
    reports = produce(cbroker.bootstrap, topic, [Outbound(value=v, key=k, partition=0) for k, v in msgs], timeout_s=120, **{"compression.type": codec, "linger.ms": 20})
    assert_all_delivered(reports)
    assert [d.offset for d in reports] == list(range(N_CLIENT))
    check_stored_codec(cbroker, topic, codec, N_CLIENT, librdkafka=True)
    got = consume_all(cbroker.bootstrap, topic, 1, timeout_s=60)
    assert [(r.offset, r.key, r.value) for r in got] == [(i, k, v) for i, (k, v) in enumerate(msgs)]
