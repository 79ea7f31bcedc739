//! Byte encodings owned by this crate: Raft entries (meta log values, partition-log internal
//! payloads, AppendEntries bodies) and the node-to-node frame envelope.
//!
//! Entries are encoded by hand rather than with serde_json because a Normal entry carries a Kafka
//! batch: JSON would turn every byte into a decimal number. Small control structures (votes,
//! membership, snapshot meta, responses) stay JSON: they are rare and JSON is debuggable.

use bytes::{BufMut, Bytes, BytesMut};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest};
use openraft::{EntryPayload, Membership};
use serde::{Deserialize, Serialize};

use crate::{log_id, Entry, LogId, Node, NodeId, SnapshotMeta, TypeConfig, Vote};

/// Upper bound of one frame body; checked before allocating so a corrupt or hostile length
/// prefix cannot make us allocate gigabytes. AppendEntries bodies above it are split by openraft
/// (the network answers `PayloadTooLarge`).
pub(crate) const MAX_FRAME_BYTES: usize = 64 << 20;

const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("truncated input: needed {need} more bytes at byte {at}")]
    Truncated { need: usize, at: usize },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("bad json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Bounds-checked reader over bytes that came from the disk or the network.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let rest = self.buf.len() - self.pos;
        if n > rest {
            return Err(CodecError::Truncated {
                need: n - rest,
                at: self.pos,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A u32 length prefix followed by that many bytes.
    pub(crate) fn sized(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

fn put_sized(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

/// Encodes one entry: kind u8, term u64, index u64, then the payload (a Normal entry's bytes as
/// they are; a membership as JSON; nothing for a blank).
pub(crate) fn encode_entry_into(out: &mut BytesMut, entry: &Entry) -> Result<(), CodecError> {
    let (kind, payload): (u8, Option<Vec<u8>>) = match &entry.payload {
        EntryPayload::Blank => (KIND_BLANK, None),
        EntryPayload::Normal(_) => (KIND_NORMAL, None),
        EntryPayload::Membership(m) => (KIND_MEMBERSHIP, Some(serde_json::to_vec(m)?)),
    };
    out.put_u8(kind);
    out.put_u64(entry.log_id.leader_id.term);
    out.put_u64(entry.log_id.index);
    match (&entry.payload, payload) {
        (EntryPayload::Normal(d), _) => out.put_slice(d),
        (_, Some(p)) => out.put_slice(&p),
        _ => {}
    }
    Ok(())
}

pub(crate) fn encode_entry(entry: &Entry) -> Result<Vec<u8>, CodecError> {
    let mut out = BytesMut::new();
    encode_entry_into(&mut out, entry)?;
    Ok(out.to_vec())
}

/// Decodes an entry made by [`encode_entry`]; `bytes` is the whole encoding (and a Normal entry's
/// payload is sliced out of it without copying).
pub(crate) fn decode_entry(bytes: &Bytes) -> Result<Entry, CodecError> {
    let mut r = Reader::new(bytes);
    let kind = r.u8()?;
    let term = r.u64()?;
    let index = r.u64()?;
    let start = r.pos;
    let payload = match kind {
        KIND_BLANK => EntryPayload::Blank,
        KIND_NORMAL => EntryPayload::Normal(bytes.slice(start..)),
        KIND_MEMBERSHIP => {
            let m: Membership<NodeId, Node> = serde_json::from_slice(r.rest())?;
            EntryPayload::Membership(m)
        }
        tag => return Err(CodecError::UnknownTag { what: "entry", tag }),
    };
    Ok(Entry {
        log_id: log_id(term, index),
        payload,
    })
}

#[derive(Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
    entries: u32,
}

/// AppendEntries body: u32-sized JSON header, then each entry u32-sized.
pub(crate) fn encode_append(
    req: &AppendEntriesRequest<TypeConfig>,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let header = AppendHeader {
        vote: req.vote,
        prev_log_id: req.prev_log_id,
        leader_commit: req.leader_commit,
        entries: req.entries.len() as u32,
    };
    put_sized(out, &serde_json::to_vec(&header)?);
    for e in &req.entries {
        let len_at = out.len();
        out.put_u32(0);
        encode_entry_into(out, e)?;
        let len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

pub(crate) fn decode_append(bytes: &Bytes) -> Result<AppendEntriesRequest<TypeConfig>, CodecError> {
    let mut r = Reader::new(bytes);
    let header: AppendHeader = serde_json::from_slice(r.sized()?)?;
    // Each entry needs at least its 4-byte length, so the count is checked against the bytes
    // left before reserving room for it.
    let left = bytes.len() - r.pos;
    if header.entries as usize > left / 4 {
        return Err(CodecError::Invalid(format!(
            "{} entries announced in {left} bytes",
            header.entries
        )));
    }
    let mut entries = Vec::with_capacity(header.entries as usize);
    for _ in 0..header.entries {
        let n = r.u32()? as usize;
        let start = r.pos;
        r.take(n)?;
        entries.push(decode_entry(&bytes.slice(start..start + n))?);
    }
    Ok(AppendEntriesRequest {
        vote: header.vote,
        prev_log_id: header.prev_log_id,
        entries,
        leader_commit: header.leader_commit,
    })
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: Vote,
    meta: SnapshotMeta,
    offset: u64,
    done: bool,
}

/// InstallSnapshot body: u32-sized JSON header, then the chunk's raw bytes.
pub(crate) fn encode_snapshot(
    req: &InstallSnapshotRequest<TypeConfig>,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let header = SnapshotHeader {
        vote: req.vote,
        meta: req.meta.clone(),
        offset: req.offset,
        done: req.done,
    };
    put_sized(out, &serde_json::to_vec(&header)?);
    out.put_slice(&req.data);
    Ok(())
}

pub(crate) fn decode_snapshot(
    bytes: &[u8],
) -> Result<InstallSnapshotRequest<TypeConfig>, CodecError> {
    let mut r = Reader::new(bytes);
    let header: SnapshotHeader = serde_json::from_slice(r.sized()?)?;
    Ok(InstallSnapshotRequest {
        vote: header.vote,
        meta: header.meta,
        offset: header.offset,
        data: r.rest().to_vec(),
        done: header.done,
    })
}

/// Which openraft RPC a request frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RpcKind {
    AppendEntries = 1,
    Vote = 2,
    InstallSnapshot = 3,
    /// An application request for the node's [`crate::AppHandler`]; the frame's group field
    /// carries the caller's node id in decimal, the payload is opaque.
    App = 4,
    /// A node-to-node liveness ping ([`crate::liveness`]); the group field carries the caller's
    /// node id, the payload is empty.
    Ping = 5,
}

impl RpcKind {
    fn from_u8(tag: u8) -> Result<Self, CodecError> {
        match tag {
            1 => Ok(RpcKind::AppendEntries),
            2 => Ok(RpcKind::Vote),
            3 => Ok(RpcKind::InstallSnapshot),
            4 => Ok(RpcKind::App),
            5 => Ok(RpcKind::Ping),
            tag => Err(CodecError::UnknownTag {
                what: "rpc kind",
                tag,
            }),
        }
    }
}

const FRAME_REQUEST: u8 = 1;
const FRAME_RESPONSE: u8 = 2;

/// How the receiving host handled a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseStatus {
    /// The payload is the group's JSON-encoded `Result<Response, openraft RaftError>`.
    Ok = 0,
    /// The group does not exist on that node (yet, or any more); payload is a message.
    UnknownGroup = 1,
    /// The request could not be decoded or handled; payload is a message.
    Failed = 2,
}

impl ResponseStatus {
    fn from_u8(tag: u8) -> Result<Self, CodecError> {
        match tag {
            0 => Ok(ResponseStatus::Ok),
            1 => Ok(ResponseStatus::UnknownGroup),
            2 => Ok(ResponseStatus::Failed),
            tag => Err(CodecError::UnknownTag {
                what: "response status",
                tag,
            }),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Frame {
    Request {
        id: u64,
        kind: RpcKind,
        group: String,
        payload: Bytes,
    },
    Response {
        id: u64,
        status: ResponseStatus,
        payload: Bytes,
    },
}

/// Starts a request frame (length placeholder + envelope); the caller appends the payload and
/// then calls [`finish_frame`].
pub(crate) fn begin_request(id: u64, kind: RpcKind, group: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(64 + group.len());
    out.put_u32(0);
    out.put_u8(FRAME_REQUEST);
    out.put_u64(id);
    out.put_u8(kind as u8);
    out.put_u16(group.len() as u16);
    out.put_slice(group.as_bytes());
    out
}

pub(crate) fn response_frame(
    id: u64,
    status: ResponseStatus,
    payload: &[u8],
) -> Result<Bytes, CodecError> {
    let mut out = BytesMut::with_capacity(14 + payload.len());
    out.put_u32(0);
    out.put_u8(FRAME_RESPONSE);
    out.put_u64(id);
    out.put_u8(status as u8);
    out.put_slice(payload);
    finish_frame(out)
}

/// Fills in the length prefix; refuses bodies the receiver would refuse.
pub(crate) fn finish_frame(mut out: BytesMut) -> Result<Bytes, CodecError> {
    let body = out.len() - 4;
    if body > MAX_FRAME_BYTES {
        return Err(CodecError::Invalid(format!(
            "frame body of {body} bytes exceeds the {MAX_FRAME_BYTES} byte limit"
        )));
    }
    out[0..4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(out.freeze())
}

/// Decodes a frame body (the bytes after the u32 length prefix).
pub(crate) fn decode_frame(body: Bytes) -> Result<Frame, CodecError> {
    let mut r = Reader::new(&body);
    let tag = r.u8()?;
    let id = r.u64()?;
    match tag {
        FRAME_REQUEST => {
            let kind = RpcKind::from_u8(r.u8()?)?;
            let n = r.u16()? as usize;
            let group = std::str::from_utf8(r.take(n)?)
                .map_err(|e| CodecError::Invalid(format!("group id is not UTF-8: {e}")))?
                .to_string();
            let payload = body.slice(r.pos..);
            Ok(Frame::Request {
                id,
                kind,
                group,
                payload,
            })
        }
        FRAME_RESPONSE => {
            let status = ResponseStatus::from_u8(r.u8()?)?;
            let payload = body.slice(r.pos..);
            Ok(Frame::Response {
                id,
                status,
                payload,
            })
        }
        tag => Err(CodecError::UnknownTag { what: "frame", tag }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn entries() -> Vec<Entry> {
        let members: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
        vec![
            Entry {
                log_id: log_id(0, 0),
                payload: EntryPayload::Membership(Membership::new(vec![members], ())),
            },
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(7, 2),
                payload: EntryPayload::Normal(Bytes::from_static(b"kafka batch bytes")),
            },
        ]
    }

    #[test]
    fn entries_round_trip() {
        for e in entries() {
            let enc = Bytes::from(encode_entry(&e).unwrap());
            assert_eq!(decode_entry(&enc).unwrap(), e);
        }
    }

    #[test]
    fn append_request_round_trip_and_truncation_is_an_error() {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(7, 1),
            prev_log_id: Some(log_id(6, 9)),
            entries: entries(),
            leader_commit: Some(log_id(6, 8)),
        };
        let mut out = BytesMut::new();
        encode_append(&req, &mut out).unwrap();
        let enc = out.freeze();
        let back = decode_append(&enc).unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.leader_commit, req.leader_commit);
        assert_eq!(back.entries, req.entries);
        for cut in 0..enc.len() {
            assert!(decode_append(&enc.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut f = begin_request(42, RpcKind::Vote, "p/t/0");
        f.put_slice(b"payload");
        let f = finish_frame(f).unwrap();
        assert_eq!(
            u32::from_be_bytes(f[0..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
        match decode_frame(f.slice(4..)).unwrap() {
            Frame::Request {
                id,
                kind,
                group,
                payload,
            } => {
                assert_eq!(
                    (id, kind, group.as_str(), &payload[..]),
                    (42, RpcKind::Vote, "p/t/0", &b"payload"[..])
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let r = response_frame(43, ResponseStatus::UnknownGroup, b"no such group").unwrap();
        match decode_frame(r.slice(4..)).unwrap() {
            Frame::Response {
                id,
                status,
                payload,
            } => {
                assert_eq!(
                    (id, status, &payload[..]),
                    (43, ResponseStatus::UnknownGroup, &b"no such group"[..])
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(decode_frame(Bytes::from_static(&[9, 0, 0, 0, 0, 0, 0, 0, 1])).is_err());
    }
}
