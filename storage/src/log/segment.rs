//! One segment: the in-memory table of its stored batches, positional reads of contiguous slots,
//! and the walk that rebuilds the table from the `.log` file (header sanity, offset continuity and,
//! for the active segment, CRCs), stopping where a torn or corrupt tail begins.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::index::SparseIndexes;
use crate::batch::{self, BATCH_HEADER_LEN};
use crate::{IoContext, StorageError};

/// In-memory metadata of one stored batch; the dense per-segment table makes Raft-index lookups O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EntryMeta {
    pub(super) pos: u64,
    pub(super) len: u32,
    pub(super) term: u64,
    /// First offset of the batch; for internal entries the log end offset when it was written.
    pub(super) base: i64,
    /// One past the last offset (== `base` for internal entries).
    pub(super) end: i64,
    pub(super) max_ts: i64,
    pub(super) data: bool,
}

#[derive(Debug)]
pub(super) struct Segment {
    pub(super) base_offset: i64,
    pub(super) first_index: u64,
    pub(super) log_path: PathBuf,
    /// Shared so that a [`PendingSync`] can fsync it after the caller has released the log.
    pub(super) file: Arc<File>,
    pub(super) size: u64,
    pub(super) entries: Vec<EntryMeta>,
    pub(super) index: SparseIndexes,
    pub(super) max_ts: i64,
    /// Kept open only while the segment is active.
    pub(super) index_file: Option<File>,
    pub(super) time_file: Option<File>,
}

impl Segment {
    pub(super) fn end_offset(&self) -> i64 {
        self.entries.last().map_or(self.base_offset, |e| e.end)
    }

    pub(super) fn next_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64
    }

    pub(super) fn has_data(&self) -> bool {
        self.end_offset() > self.base_offset
    }

    /// The largest record timestamp, as Kafka's retention.ms judges a segment: batches without
    /// timestamps (-1) fall back to the file's modification time. An unreadable mtime counts as
    /// the far future, so a doubtful segment is kept rather than deleted.
    pub(super) fn largest_timestamp(&self) -> i64 {
        if self.max_ts >= 0 {
            return self.max_ts;
        }
        self.file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .unwrap_or(i64::MAX)
    }

    pub(super) fn path(&self, ext: &str) -> PathBuf {
        self.log_path.with_extension(ext)
    }

    /// Byte length of the contiguous stored slots `[a, b)` (0 if the range is empty).
    pub(super) fn slots_len(&self, a: usize, b: usize) -> usize {
        match (
            self.entries.get(a),
            b.checked_sub(1).and_then(|l| self.entries.get(l)),
        ) {
            (Some(first), Some(last)) if b > a => {
                (last.pos + u64::from(last.len) - first.pos) as usize
            }
            _ => 0,
        }
    }

    /// Reads the contiguous stored bytes of slots `[a, b)`.
    pub(super) fn read_slots(&self, a: usize, b: usize) -> Result<Bytes, StorageError> {
        let mut buf = BytesMut::zeroed(self.slots_len(a, b));
        let n = self.read_slots_into(a, b, &mut buf)?;
        buf.truncate(n);
        Ok(buf.freeze())
    }

    /// Reads the contiguous stored bytes of slots `[a, b)` into the front of `buf`; returns how
    /// many bytes that was.
    pub(super) fn read_slots_into(
        &self,
        a: usize,
        b: usize,
        buf: &mut [u8],
    ) -> Result<usize, StorageError> {
        let len = self.slots_len(a, b);
        let Some(first) = self.entries.get(a).filter(|_| len > 0) else {
            return Ok(0);
        };
        let have = buf.len();
        let dst = buf.get_mut(..len).ok_or_else(|| {
            StorageError::InvalidArgument(format!(
                "{}: a {have}-byte buffer for slots {a}..{b}, which hold {len} bytes",
                self.log_path.display()
            ))
        })?;
        self.file
            .read_exact_at(dst, first.pos)
            .ctx(&self.log_path)?;
        Ok(len)
    }
}

pub(super) struct Walk {
    pub(super) entries: Vec<EntryMeta>,
    pub(super) valid_len: u64,
    /// Why the walk stopped before the end of the file.
    pub(super) problem: Option<String>,
}

/// Walks the batches of a segment file. Every segment is length-walked (header sanity, lengths and
/// offset continuity); `check_crc` also verifies each batch's CRC-32C, for the active segment,
/// whose tail may be torn.
pub(super) fn walk_segment(
    file: &File,
    path: &Path,
    base: i64,
    check_crc: bool,
) -> Result<Walk, StorageError> {
    let file_len = file.metadata().ctx(path)?.len();
    let mut hdr = [0u8; BATCH_HEADER_LEN];
    let mut buf = Vec::new();
    let mut entries = Vec::new();
    let mut pos = 0u64;
    let mut next = base;
    let problem = loop {
        let remaining = file_len - pos;
        if remaining == 0 {
            break None;
        }
        if remaining < BATCH_HEADER_LEN as u64 {
            break Some(format!(
                "{remaining} trailing bytes are shorter than a batch header"
            ));
        }
        file.read_exact_at(&mut hdr, pos).ctx(path)?;
        let h = match batch::parse_header(&hdr) {
            Ok(h) => h,
            Err(e) => break Some(e.to_string()),
        };
        let total = h.total_len() as u64;
        if total > remaining {
            break Some(format!(
                "batch of {total} bytes overruns the end of the file"
            ));
        }
        if check_crc {
            buf.resize(total as usize, 0);
            file.read_exact_at(&mut buf, pos).ctx(path)?;
            if let Err(e) = batch::validate(&buf) {
                break Some(e.to_string());
            }
        }
        if h.base_offset != next {
            break Some(format!(
                "baseOffset {} where {next} was expected",
                h.base_offset
            ));
        }
        if h.partition_leader_epoch < 0 {
            break Some(format!("negative term {}", h.partition_leader_epoch));
        }
        let internal = batch::is_internal(&h);
        let end = if internal {
            next
        } else {
            match i64::from(h.last_offset_delta)
                .checked_add(1)
                .filter(|d| *d > 0)
                .and_then(|d| next.checked_add(d))
            {
                Some(end) => end,
                None => break Some(format!("bad lastOffsetDelta {}", h.last_offset_delta)),
            }
        };
        entries.push(EntryMeta {
            pos,
            len: total as u32,
            term: h.partition_leader_epoch as u64,
            base: next,
            end,
            max_ts: if internal { i64::MIN } else { h.max_timestamp },
            data: !internal,
        });
        pos += total;
        next = end;
    };
    Ok(Walk {
        entries,
        valid_len: pos,
        problem,
    })
}
