"""Just enough of the Kafka wire format, by hand, to send requests no real client would send.

The interop tests use real clients (kcat, confluent-kafka) for everything well-formed; this module
exists for the malformed-input tests and for reading segment files on disk, so it encodes only the
non-flexible request versions it needs and decodes only the replies it checks.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

# --- CRC-32C (Castagnoli), table-driven: the stdlib has only CRC-32 (zlib) -----------------------

_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283  # the standard check value

# --- primitive encoders ---------------------------------------------------------------------------


def i8(v: int) -> bytes:
    return struct.pack(">b", v)


def i16(v: int) -> bytes:
    return struct.pack(">h", v)


def i32(v: int) -> bytes:
    return struct.pack(">i", v)


def i64(v: int) -> bytes:
    return struct.pack(">q", v)


def string(s: str | None) -> bytes:
    if s is None:
        return i16(-1)
    b = s.encode()
    return i16(len(b)) + b


def varint(v: int) -> bytes:
    """Zigzag varint as used inside record batches (also fine for varlongs)."""
    return uvarint(((v << 1) ^ (v >> 63)) & ((1 << 64) - 1))


# --- API keys and error codes used by the tests ---------------------------------------------------

PRODUCE = 0
FETCH = 1
LIST_OFFSETS = 2
METADATA = 3
OFFSET_FOR_LEADER_EPOCH = 23
API_VERSIONS = 18

ERR_NONE = 0
ERR_CORRUPT_MESSAGE = 2
ERR_UNKNOWN_TOPIC_OR_PARTITION = 3
ERR_MESSAGE_TOO_LARGE = 10
ERR_UNSUPPORTED_VERSION = 35
ERR_INVALID_REQUEST = 42
ERR_INVALID_RECORD = 87


def request_header_v1(api_key: int, api_version: int, correlation_id: int, client_id: str | None = "sluice-interop") -> bytes:
    return i16(api_key) + i16(api_version) + i32(correlation_id) + string(client_id)


def frame(payload: bytes) -> bytes:
    return i32(len(payload)) + payload


def api_versions_request(version: int, correlation_id: int) -> bytes:
    # v0-v2 bodies are empty; v99 is nonsense on purpose (KIP-511 says: answer with a v0 body).
    return frame(request_header_v1(API_VERSIONS, version, correlation_id))


def metadata_request_v1(correlation_id: int, topics: list[str] | None = None, version: int = 1) -> bytes:
    if topics is None:
        body = i32(-1)
    else:
        body = i32(len(topics)) + b"".join(string(t) for t in topics)
    return frame(request_header_v1(METADATA, version, correlation_id) + body)


def produce_request_v3(correlation_id: int, topic: str, partition: int, records: bytes, acks: int = 1, timeout_ms: int = 10_000) -> bytes:
    body = (
        string(None)  # transactional_id
        + i16(acks)
        + i32(timeout_ms)
        + i32(1)
        + string(topic)
        + i32(1)
        + i32(partition)
        + i32(len(records))
        + records
    )
    return frame(request_header_v1(PRODUCE, 3, correlation_id) + body)


# --- record batches (magic 2) ---------------------------------------------------------------------


def build_batch(records: list[tuple[bytes | None, bytes]], base_timestamp_ms: int | None = None, magic: int = 2) -> bytes:
    """One uncompressed RecordBatch v2 with a correct CRC-32C (callers corrupt it on purpose)."""
    ts = int(time.time() * 1000) if base_timestamp_ms is None else base_timestamp_ms
    recs = bytearray()
    for i, (key, value) in enumerate(records):
        body = bytearray()
        body += i8(0)  # attributes
        body += varint(0)  # timestamp delta
        body += varint(i)  # offset delta
        if key is None:
            body += varint(-1)
        else:
            body += varint(len(key)) + key
        body += varint(len(value)) + value
        body += varint(0)  # no headers
        recs += varint(len(body)) + body
    after_crc = (
        i16(0)  # attributes: no compression, CreateTime
        + i32(len(records) - 1)  # lastOffsetDelta
        + i64(ts)
        + i64(ts)
        + i64(-1)  # producerId
        + i16(-1)  # producerEpoch
        + i32(-1)  # baseSequence
        + i32(len(records))
        + bytes(recs)
    )
    crc = crc32c(after_crc)
    batch_length = 4 + 1 + 4 + len(after_crc)  # leader epoch + magic + crc + rest
    return i64(0) + i32(batch_length) + i32(-1) + i8(magic) + struct.pack(">I", crc) + after_crc


BATCH_HEADER_LEN = 61
INTERNAL_PRODUCER_ID = -0x511CE  # docs/CONTRACTS.md: raft-internal entries in the partition log


@dataclass
class StoredBatch:
    position: int  # byte position of the batch in its file
    total_len: int
    base_offset: int
    last_offset_delta: int
    producer_id: int
    records_count: int
    magic: int
    crc_ok: bool

    @property
    def end(self) -> int:
        return self.position + self.total_len

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def is_internal(self) -> bool:
        return self.producer_id == INTERNAL_PRODUCER_ID


def parse_batches(data: bytes) -> tuple[list[StoredBatch], int]:
    """Walks a segment file; returns the valid batches and the byte position where validity ends."""
    out = []
    pos = 0
    while pos + BATCH_HEADER_LEN <= len(data):
        base_offset, batch_length = struct.unpack_from(">qi", data, pos)
        total = 12 + batch_length
        if batch_length < BATCH_HEADER_LEN - 12 or pos + total > len(data):
            break
        magic = struct.unpack_from(">b", data, pos + 16)[0]
        (stored_crc,) = struct.unpack_from(">I", data, pos + 17)
        last_delta = struct.unpack_from(">i", data, pos + 23)[0]
        producer_id = struct.unpack_from(">q", data, pos + 43)[0]
        count = struct.unpack_from(">i", data, pos + 57)[0]
        ok = magic == 2 and crc32c(data[pos + 21 : pos + total]) == stored_crc
        if not ok:
            break
        out.append(StoredBatch(pos, total, base_offset, last_delta, producer_id, count, magic, ok))
        pos += total
    return out, pos


# --- a raw connection ------------------------------------------------------------------------------


class RawConn:
    """A blocking socket with a deadline on every read, so no test can hang on a silent broker."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.settimeout(timeout_s)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def recv_frame(self) -> bytes | None:
        """The next response frame (without its size), or None if the broker closed the connection.
        Raises socket.timeout if the broker neither answers nor closes within the timeout."""
        head = self._recv_exact(4)
        if head is None:
            return None
        (size,) = struct.unpack(">i", head)
        if size < 0 or size > 64 * 1024 * 1024:
            raise AssertionError(f"broker sent an absurd response size {size}")
        body = self._recv_exact(size)
        if body is None:
            raise AssertionError(f"broker closed mid-response (promised {size} bytes)")
        return body

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0]

    def i16(self) -> int:
        return self.take(">h")

    def i32(self) -> int:
        return self.take(">i")

    def i64(self) -> int:
        return self.take(">q")

    def string(self) -> str | None:
        n = self.i16()
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return s


def parse_api_versions_v0(resp: bytes) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(correlation_id, error_code, {api_key: (min, max)}) from a v0-shaped ApiVersions response."""
    r = Reader(resp)
    corr = r.i32()
    err = r.i16()
    n = r.i32()
    if n < 0 or n > 1000:
        raise AssertionError(f"ApiVersions array count {n} is absurd")
    ranges = {}
    for _ in range(n):
        k, lo, hi = r.i16(), r.i16(), r.i16()
        ranges[k] = (lo, hi)
    return corr, err, ranges


def offset_for_leader_epoch_v2(correlation_id: int, topic: str, partition: int, current_leader_epoch: int, leader_epoch: int) -> bytes:
    body = i32(1) + string(topic) + i32(1) + i32(partition) + i32(current_leader_epoch) + i32(leader_epoch)
    return frame(request_header_v1(OFFSET_FOR_LEADER_EPOCH, 2, correlation_id) + body)


def parse_offset_for_leader_epoch_v2(resp: bytes) -> tuple[int, list[tuple[str, int, int, int, int]]]:
    """(correlation_id, [(topic, partition, error_code, leader_epoch, end_offset)])."""
    r = Reader(resp)
    corr = r.i32()
    r.i32()  # throttle_time_ms
    out = []
    for _ in range(r.i32()):
        topic = r.string()
        for _ in range(r.i32()):
            err = r.i16()
            p = r.i32()
            epoch = r.i32()
            end = r.i64()
            out.append((topic, p, err, epoch, end))
    return corr, out


def parse_produce_v3(resp: bytes) -> tuple[int, list[tuple[str, int, int, int]]]:
    """(correlation_id, [(topic, partition, error_code, base_offset)]) from a Produce v3 response."""
    r = Reader(resp)
    corr = r.i32()
    out = []
    for _ in range(r.i32()):
        topic = r.string()
        for _ in range(r.i32()):
            p = r.i32()
            err = r.i16()
            base = r.i64()
            r.i64()  # log_append_time_ms
            out.append((topic, p, err, base))
    r.i32()  # throttle_time_ms
    return corr, out


def fetch_request_v4(correlation_id: int, topic: str, partition: int, offset: int, max_wait_ms: int, min_bytes: int = 1, max_bytes: int = 1 << 20) -> bytes:
    return fetch_request_v4_partitions(correlation_id, topic, [(partition, offset, max_bytes)], max_wait_ms, min_bytes, max_bytes)


def fetch_request_v4_partitions(
    correlation_id: int,
    topic: str,
    partitions: list[tuple[int, int, int]],
    max_wait_ms: int,
    min_bytes: int = 1,
    max_bytes: int = 1 << 20,
) -> bytes:
    """Fetch v4 for several (partition, offset, partition_max_bytes) of one topic, repeats allowed."""
    body = (
        i32(-1)  # replica_id: a consumer
        + i32(max_wait_ms)
        + i32(min_bytes)
        + i32(max_bytes)
        + i8(0)  # read_uncommitted
        + i32(1)
        + string(topic)
        + i32(len(partitions))
        + b"".join(i32(p) + i64(offset) + i32(pmax) for p, offset, pmax in partitions)
    )
    return frame(request_header_v1(FETCH, 4, correlation_id) + body)


def parse_fetch_v4(resp: bytes) -> tuple[int, list[tuple[str, int, int, int, bytes]]]:
    """(correlation_id, [(topic, partition, error_code, high_watermark, records)])."""
    r = Reader(resp)
    corr = r.i32()
    r.i32()  # throttle_time_ms
    out = []
    for _ in range(r.i32()):
        topic = r.string()
        for _ in range(r.i32()):
            p = r.i32()
            err = r.i16()
            hw = r.i64()
            r.i64()  # last_stable_offset
            n = r.i32()
            for _ in range(max(n, 0)):
                r.i64()
                r.i64()
            size = r.i32()
            records = b"" if size < 0 else r.data[r.pos : r.pos + size]
            r.pos += max(size, 0)
            out.append((topic, p, err, hw, records))
    return corr, out


ERR_OFFSET_OUT_OF_RANGE = 1


# --- flexible versions (KIP-482): compact types and tagged fields ----------------------------------

ALTER_PARTITION_REASSIGNMENTS = 45
LIST_PARTITION_REASSIGNMENTS = 46


def uvarint(v: int) -> bytes:
    """Unsigned varint: compact lengths and tag counts (KIP-482)."""
    out = bytearray()
    while True:
        if v < 0x80:
            out.append(v)
            return bytes(out)
        out.append((v & 0x7F) | 0x80)
        v >>= 7


def compact_string(s: str | None) -> bytes:
    if s is None:
        return uvarint(0)
    b = s.encode()
    return uvarint(len(b) + 1) + b


def compact_array(items: list[bytes] | None) -> bytes:
    if items is None:
        return uvarint(0)
    return uvarint(len(items) + 1) + b"".join(items)


NO_TAGS = uvarint(0)


def request_header_v2(api_key: int, api_version: int, correlation_id: int, client_id: str | None = "sluice-interop") -> bytes:
    return request_header_v1(api_key, api_version, correlation_id, client_id) + NO_TAGS


def alter_partition_reassignments_v0(correlation_id: int, moves: dict[str, dict[int, list[int] | None]]) -> bytes:
    topics = []
    for name, parts in moves.items():
        ps = [i32(p) + (compact_array(None) if r is None else compact_array([i32(b) for b in r])) + NO_TAGS for p, r in parts.items()]
        topics.append(compact_string(name) + compact_array(ps) + NO_TAGS)
    body = i32(30_000) + compact_array(topics) + NO_TAGS
    return frame(request_header_v2(ALTER_PARTITION_REASSIGNMENTS, 0, correlation_id) + body)


def list_partition_reassignments_v0(correlation_id: int) -> bytes:
    body = i32(30_000) + compact_array(None) + NO_TAGS
    return frame(request_header_v2(LIST_PARTITION_REASSIGNMENTS, 0, correlation_id) + body)


class FlexReader(Reader):
    def uvarint(self) -> int:
        shift = v = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7

    def compact_string(self) -> str | None:
        n = self.uvarint() - 1
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return s

    def count(self) -> int:
        return self.uvarint() - 1

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.pos += self.uvarint()


def _parse_reassignment_reply(resp: bytes, read_partition) -> tuple[int, dict]:
    """Both reassignment replies share a frame: header tags, throttle, error, message, then
    topics of partitions; `read_partition(reader)` reads one partition's own fields."""
    r = FlexReader(resp)
    r.i32()  # correlation id
    r.skip_tags()
    r.i32()  # throttle
    err = r.i16()
    r.compact_string()
    out = {}
    for _ in range(r.count()):
        name = r.compact_string()
        for _ in range(r.count()):
            p = r.i32()
            out[(name, p)] = read_partition(r)
            r.skip_tags()
        r.skip_tags()
    return err, out


def parse_alter_partition_reassignments_v0(resp: bytes) -> tuple[int, dict[tuple[str, int], tuple[int, str | None]]]:
    """(top-level error, {(topic, partition): (error code, message)})."""
    return _parse_reassignment_reply(resp, lambda r: (r.i16(), r.compact_string()))


def parse_list_partition_reassignments_v0(resp: bytes) -> dict[tuple[str, int], tuple[list[int], list[int], list[int]]]:
    """{(topic, partition): (replicas, adding, removing)}."""
    err, out = _parse_reassignment_reply(resp, lambda r: tuple([r.i32() for _ in range(r.count())] for _ in range(3)))
    assert err == 0, f"ListPartitionReassignments error {err}"
    return out
