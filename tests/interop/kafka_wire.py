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


# --- consumer groups (classic protocol) ------------------------------------------------------------
#
# Every group API in both encodings: `Enc`/`Dec` write and read a field the non-flexible way or the
# flexible way (KIP-482) depending on the version, so one function per API covers all its versions.

OFFSET_COMMIT = 8
OFFSET_FETCH = 9
FIND_COORDINATOR = 10
JOIN_GROUP = 11
HEARTBEAT = 12
LEAVE_GROUP = 13
SYNC_GROUP = 14
DESCRIBE_GROUPS = 15
LIST_GROUPS = 16
DELETE_GROUPS = 42
OFFSET_DELETE = 47

# The first flexible version of each API (OffsetDelete has none).
FLEXIBLE_FROM = {
    OFFSET_COMMIT: 8,
    OFFSET_FETCH: 6,
    FIND_COORDINATOR: 3,
    JOIN_GROUP: 6,
    HEARTBEAT: 4,
    LEAVE_GROUP: 4,
    SYNC_GROUP: 4,
    DESCRIBE_GROUPS: 5,
    LIST_GROUPS: 3,
    DELETE_GROUPS: 2,
    OFFSET_DELETE: 1 << 15,
}

ERR_COORDINATOR_LOAD_IN_PROGRESS = 14
ERR_COORDINATOR_NOT_AVAILABLE = 15
ERR_NOT_COORDINATOR = 16
ERR_OFFSET_METADATA_TOO_LARGE = 12
ERR_ILLEGAL_GENERATION = 22
ERR_UNKNOWN_MEMBER_ID = 25
ERR_INVALID_SESSION_TIMEOUT = 26
ERR_REBALANCE_IN_PROGRESS = 27
ERR_NON_EMPTY_GROUP = 68
ERR_GROUP_ID_NOT_FOUND = 69
ERR_MEMBER_ID_REQUIRED = 79
ERR_FENCED_INSTANCE_ID = 82
ERR_GROUP_SUBSCRIBED_TO_TOPIC = 86


class Enc:
    def __init__(self, flexible: bool):
        self.flexible = flexible
        self.buf = bytearray()

    def raw(self, b: bytes) -> "Enc":
        self.buf += b
        return self

    def i8(self, v: int) -> "Enc":
        return self.raw(i8(v))

    def i16(self, v: int) -> "Enc":
        return self.raw(i16(v))

    def i32(self, v: int) -> "Enc":
        return self.raw(i32(v))

    def i64(self, v: int) -> "Enc":
        return self.raw(i64(v))

    def str(self, s: str | None) -> "Enc":
        return self.raw(compact_string(s) if self.flexible else string(s))

    def bytes(self, b: bytes | None) -> "Enc":
        if b is None:
            return self.raw(uvarint(0) if self.flexible else i32(-1))
        return self.raw((uvarint(len(b) + 1) if self.flexible else i32(len(b))) + b)

    def array(self, items, each, struct: bool = True) -> "Enc":
        """`each(enc, item)` writes one element; elements that are structs get their own tags in
        flexible versions. `items=None` is a null array."""
        if items is None:
            return self.raw(uvarint(0) if self.flexible else i32(-1))
        items = list(items)
        self.raw(uvarint(len(items) + 1) if self.flexible else i32(len(items)))
        for it in items:
            each(self, it)
            if struct:
                self.tags()
        return self

    def tags(self) -> "Enc":
        if self.flexible:
            self.raw(NO_TAGS)
        return self


class Dec(FlexReader):
    def __init__(self, data: bytes, flexible: bool, pos: int = 0):
        super().__init__(data)
        self.flexible = flexible
        self.pos = pos

    def i8(self) -> int:
        return self.take(">b")

    def str(self) -> str | None:
        return self.compact_string() if self.flexible else self.string()

    def bytes(self) -> bytes | None:
        n = self.count() if self.flexible else self.i32()
        if n < 0:
            return None
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def array(self, each, struct: bool = True) -> list | None:
        n = self.count() if self.flexible else self.i32()
        if n < 0:
            return None
        out = []
        for _ in range(n):
            out.append(each(self))
            if struct:
                self.tags()
        return out

    def tags(self) -> None:
        if self.flexible:
            self.skip_tags()


def consumer_subscription(topics: list[str], user_data: bytes | None = None) -> bytes:
    """ConsumerProtocolSubscription v0: what a consumer puts in JoinGroup's protocol metadata."""
    e = Enc(False).i16(0).array(topics, lambda e, t: e.str(t), struct=False).bytes(user_data)
    return bytes(e.buf)


def consumer_assignment(assignment: dict[str, list[int]]) -> bytes:
    """ConsumerProtocolAssignment v0: what the leader hands each member in SyncGroup."""
    e = Enc(False).i16(0)
    e.array(sorted(assignment.items()), lambda e, tp: e.str(tp[0]).array(tp[1], lambda e, p: e.i32(p), struct=False), struct=False)
    return bytes(e.bytes(None).buf)


def parse_consumer_subscription(data: bytes) -> list[str]:
    d = Dec(data, False)
    d.i16()
    return d.array(lambda d: d.str(), struct=False)


def parse_consumer_assignment(data: bytes) -> dict[str, list[int]]:
    """The topics and partitions of an assignment (any version: later fields are ignored)."""
    if not data:
        return {}
    d = Dec(data, False)
    d.i16()
    out = {}
    for topic, parts in d.array(lambda d: (d.str(), d.array(lambda d: d.i32(), struct=False)), struct=False):
        out[topic] = sorted(parts)
    return out


class GroupConn:
    """A raw connection that speaks the group APIs at any version. Requests may be pipelined on
    several connections (`send` now, `recv` later), which a JoinGroup that waits for the other
    members needs. Every read has the connection's timeout."""

    def __init__(self, bootstrap: str, client_id: str = "sluice-interop", timeout_s: float = 20.0):
        host, port = bootstrap.rsplit(":", 1)
        self.conn = RawConn(host, int(port), timeout_s)
        self.client_id = client_id
        self.corr = 0
        self.pending: dict[int, tuple[int, int]] = {}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def flexible(api: int, version: int) -> bool:
        return version >= FLEXIBLE_FROM[api]

    def send(self, api: int, version: int, body: Enc) -> int:
        self.corr += 1
        header = (request_header_v2 if self.flexible(api, version) else request_header_v1)(api, version, self.corr, self.client_id)
        self.conn.send(frame(header + bytes(body.buf)))
        self.pending[self.corr] = (api, version)
        return self.corr

    def recv(self, corr: int) -> Dec:
        api, version = self.pending.pop(corr)
        resp = self.conn.recv_frame()
        assert resp is not None, f"broker closed the connection instead of answering api {api} v{version}"
        d = Dec(resp, self.flexible(api, version))
        got = d.i32()
        assert got == corr, f"api {api} v{version}: correlation id {got}, want {corr}"
        d.tags()
        return d

    def call(self, api: int, version: int, body: Enc) -> Dec:
        return self.recv(self.send(api, version, body))

    def enc(self, api: int, version: int) -> Enc:
        return Enc(self.flexible(api, version))

    # --- FindCoordinator ---------------------------------------------------------------------------
    def find_coordinator(self, group: str, version: int = 2) -> dict:
        """{"error", "node_id", "host", "port"} for one group (v4: the batch of one key)."""
        e = self.enc(FIND_COORDINATOR, version)
        if version >= 4:
            e.i8(0).array([group], lambda e, k: e.str(k), struct=False)
        else:
            e.str(group)
            if version >= 1:
                e.i8(0)
        d = self.call(FIND_COORDINATOR, version, e.tags())
        if version >= 4:
            d.i32()
            (c,) = d.array(lambda d: {"key": d.str(), "node_id": d.i32(), "host": d.str(), "port": d.i32(), "error": d.i16(), "message": d.str()})
            return c
        if version >= 1:
            d.i32()
        err = d.i16()
        if version >= 1:
            d.str()
        return {"error": err, "node_id": d.i32(), "host": d.str(), "port": d.i32()}

    # --- JoinGroup / SyncGroup / Heartbeat / LeaveGroup --------------------------------------------
    def send_join(self, version: int, group: str, member_id: str = "", protocols: list[tuple[str, bytes]] | None = None,
                  session_ms: int = 10_000, rebalance_ms: int = 10_000, instance_id: str | None = None,
                  protocol_type: str = "consumer") -> int:
        e = self.enc(JOIN_GROUP, version).str(group).i32(session_ms)
        if version >= 1:
            e.i32(rebalance_ms)
        e.str(member_id)
        if version >= 5:
            e.str(instance_id)
        e.str(protocol_type)
        e.array(protocols or [("range", consumer_subscription(["t"]))], lambda e, p: e.str(p[0]).bytes(p[1]))
        if version >= 8:
            e.str(None)  # reason
        return self.send(JOIN_GROUP, version, e.tags())

    def recv_join(self, corr: int) -> dict:
        version = self.pending[corr][1]
        d = self.recv(corr)
        if version >= 2:
            d.i32()
        out = {"error": d.i16(), "generation": d.i32()}
        out["protocol_type"] = d.str() if version >= 7 else None
        out["protocol"] = d.str()
        out["leader"] = d.str()
        if version >= 9:
            d.i8()  # skip_assignment
        out["member_id"] = d.str()
        out["members"] = d.array(lambda d: {"member_id": d.str(), "instance_id": d.str() if version >= 5 else None, "metadata": d.bytes()})
        return out

    def join(self, version: int, group: str, **kw) -> dict:
        return self.recv_join(self.send_join(version, group, **kw))

    def sync(self, version: int, group: str, generation: int, member_id: str, assignments: dict[str, bytes] | None = None,
             instance_id: str | None = None, protocol: str | None = "range") -> dict:
        e = self.enc(SYNC_GROUP, version).str(group).i32(generation).str(member_id)
        if version >= 3:
            e.str(instance_id)
        if version >= 5:
            e.str("consumer").str(protocol)
        e.array(sorted((assignments or {}).items()), lambda e, a: e.str(a[0]).bytes(a[1]))
        d = self.call(SYNC_GROUP, version, e.tags())
        if version >= 1:
            d.i32()
        out = {"error": d.i16()}
        if version >= 5:
            out["protocol_type"], out["protocol"] = d.str(), d.str()
        out["assignment"] = d.bytes()
        return out

    def heartbeat(self, version: int, group: str, generation: int, member_id: str, instance_id: str | None = None) -> int:
        e = self.enc(HEARTBEAT, version).str(group).i32(generation).str(member_id)
        if version >= 3:
            e.str(instance_id)
        d = self.call(HEARTBEAT, version, e.tags())
        if version >= 1:
            d.i32()
        return d.i16()

    def leave(self, version: int, group: str, member_id: str, instance_id: str | None = None) -> tuple[int, list[tuple[str, int]]]:
        """(top-level error, [(member id, error)]) (the list is empty before v3)."""
        e = self.enc(LEAVE_GROUP, version).str(group)
        if version >= 3:
            def member(e, m):
                e.str(m).str(instance_id)
                if version >= 5:
                    e.str(None)  # reason
            e.array([member_id], member)
        else:
            e.str(member_id)
        d = self.call(LEAVE_GROUP, version, e.tags())
        if version >= 1:
            d.i32()
        err = d.i16()
        members = d.array(lambda d: (d.str(), d.str(), d.i16())) if version >= 3 else []
        return err, [(m, e_) for m, _, e_ in members]

    # --- offsets -----------------------------------------------------------------------------------
    def commit(self, version: int, group: str, offsets: dict[tuple[str, int], int], generation: int = -1, member_id: str = "",
               metadata: str | None = "", instance_id: str | None = None) -> dict[tuple[str, int], int]:
        """OffsetCommit; {(topic, partition): error}."""
        e = self.enc(OFFSET_COMMIT, version).str(group)
        if version >= 1:
            e.i32(generation).str(member_id)
        if version >= 7:
            e.str(instance_id)
        if 2 <= version <= 4:
            e.i64(-1)  # retention_time_ms: the broker's default
        by_topic: dict[str, list[tuple[int, int]]] = {}
        for (t, p), o in offsets.items():
            by_topic.setdefault(t, []).append((p, o))

        def part(e, po):
            e.i32(po[0]).i64(po[1])
            if version >= 6:
                e.i32(-1)
            if version == 1:
                e.i64(-1)
            e.str(metadata)

        e.array(sorted(by_topic.items()), lambda e, t: e.str(t[0]).array(t[1], part))
        d = self.call(OFFSET_COMMIT, version, e.tags())
        if version >= 3:
            d.i32()
        out = {}
        for name, parts in d.array(lambda d: (d.str(), d.array(lambda d: (d.i32(), d.i16())))):
            for p, err in parts:
                out[(name, p)] = err
        return out

    def offset_fetch(self, version: int, group: str, topics: dict[str, list[int]] | None) -> tuple[int, dict[tuple[str, int], tuple[int, str | None, int]]]:
        """OffsetFetch v1–7 for one group: (group error, {(topic, partition): (offset, metadata, error)})."""
        assert version <= 7
        e = self.enc(OFFSET_FETCH, version).str(group)
        e.array(None if topics is None else sorted(topics.items()), lambda e, t: e.str(t[0]).array(t[1], lambda e, p: e.i32(p), struct=False))
        if version >= 7:
            e.i8(0)  # require_stable
        d = self.call(OFFSET_FETCH, version, e.tags())
        if version >= 3:
            d.i32()
        offsets = self._fetched_topics(d, version)
        err = d.i16() if version >= 2 else 0
        return err, offsets

    @staticmethod
    def _fetched_topics(d: Dec, version: int) -> dict[tuple[str, int], tuple[int, str | None, int]]:
        def part(d):
            p, o = d.i32(), d.i64()
            if version >= 5:
                d.i32()  # committed leader epoch
            return p, o, d.str(), d.i16()

        out = {}
        for name, parts in d.array(lambda d: (d.str(), d.array(part))):
            for p, o, meta, err in parts:
                out[(name, p)] = (o, meta, err)
        return out

    def offset_fetch_groups(self, version: int, groups: dict[str, dict[str, list[int]] | None]) -> dict[str, tuple[int, dict]]:
        """OffsetFetch v8+ for several groups in one request: {group: (error, offsets as above)}."""
        assert version >= 8
        e = self.enc(OFFSET_FETCH, version)

        def group(e, g):
            e.str(g[0])
            if version >= 9:
                e.str(None).i32(-1)  # member id, member epoch: a classic-protocol caller
            e.array(None if g[1] is None else sorted(g[1].items()), lambda e, t: e.str(t[0]).array(t[1], lambda e, p: e.i32(p), struct=False))

        e.array(list(groups.items()), group).i8(0)
        d = self.call(OFFSET_FETCH, version, e.tags())
        d.i32()
        out = {}
        for g, offsets, err in d.array(lambda d: (d.str(), self._fetched_topics(d, version), d.i16())):
            out[g] = (err, offsets)
        return out

    def offset_delete(self, group: str, partitions: dict[str, list[int]]) -> tuple[int, dict[tuple[str, int], int]]:
        e = self.enc(OFFSET_DELETE, 0).str(group)
        e.array(sorted(partitions.items()), lambda e, t: e.str(t[0]).array(t[1], lambda e, p: e.i32(p)))
        d = self.call(OFFSET_DELETE, 0, e)
        err = d.i16()
        d.i32()
        out = {}
        for name, parts in d.array(lambda d: (d.str(), d.array(lambda d: (d.i32(), d.i16())))):
            for p, e_ in parts:
                out[(name, p)] = e_
        return err, out

    # --- admin -------------------------------------------------------------------------------------
    def list_groups(self, version: int = 0, states: list[str] | None = None) -> tuple[int, list[dict]]:
        e = self.enc(LIST_GROUPS, version)
        if version >= 4:
            e.array(states or [], lambda e, s: e.str(s), struct=False)
        if version >= 5:
            e.array([], lambda e, s: e.str(s), struct=False)
        d = self.call(LIST_GROUPS, version, e.tags())
        if version >= 1:
            d.i32()
        err = d.i16()

        def group(d):
            g = {"group": d.str(), "protocol_type": d.str()}
            if version >= 4:
                g["state"] = d.str()
            if version >= 5:
                g["type"] = d.str()
            return g

        return err, d.array(group)

    def describe_groups(self, version: int, groups: list[str]) -> list[dict]:
        e = self.enc(DESCRIBE_GROUPS, version).array(groups, lambda e, g: e.str(g), struct=False)
        if version >= 3:
            e.i8(0)
        d = self.call(DESCRIBE_GROUPS, version, e.tags())
        if version >= 1:
            d.i32()

        def member(d):
            m = {"member_id": d.str()}
            m["instance_id"] = d.str() if version >= 4 else None
            m["client_id"], m["client_host"], m["metadata"], m["assignment"] = d.str(), d.str(), d.bytes(), d.bytes()
            return m

        def group(d):
            g = {"error": d.i16(), "group": d.str(), "state": d.str(), "protocol_type": d.str(), "protocol": d.str(), "members": d.array(member)}
            if version >= 3:
                d.i32()  # authorized operations
            return g

        return d.array(group)

    def delete_groups(self, version: int, groups: list[str]) -> dict[str, int]:
        e = self.enc(DELETE_GROUPS, version).array(groups, lambda e, g: e.str(g), struct=False)
        d = self.call(DELETE_GROUPS, version, e.tags())
        d.i32()
        return dict(d.array(lambda d: (d.str(), d.i16())))
