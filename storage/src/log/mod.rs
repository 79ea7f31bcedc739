//! The segmented partition log, which is also the partition's Raft log.
//!
//! Every Raft entry is exactly one stored batch: data entries are Kafka RecordBatch v2 batches whose
//! baseOffset the log assigns in append order (and whose partitionLeaderEpoch is the Raft term);
//! internal entries are control batches (see [`crate::batch::internal_batch`]) that take no offset. Their
//! baseOffset field holds the next offset at the time they were written, so every stored batch's
//! baseOffset equals the log end offset just before it, which recovery checks.
//!
//! On disk, per segment with base offset `B` (the first offset it may hold):
//! - `{B:020}.log`: the batches, back to back;
//! - `{B:020}.raft`: magic, generation, Raft index of the segment's first entry, CRC-32C (written
//!   atomically when the segment is created; within a segment Raft indexes are contiguous, so this
//!   plus the batch order gives every entry's index);
//! - `{B:020}.index`: sparse offset index, (offset - B) u32 BE + file position u32 BE;
//! - `{B:020}.timeindex`: sparse time index, max timestamp so far i64 BE + (offset - B) u32 BE.
//!
//! Both indexes are a pure function of the batches and `index_interval_bytes` (an entry for a data
//! batch once at least that many bytes were written since the last entry), so `open` recomputes
//! them and rewrites the files when they disagree. One `log-start` file per directory records the
//! purge point (first Raft index kept and its offset) and the reset generation: a reset bumps the
//! generation, and segments of an older generation found on open are leftovers of an interrupted
//! reset.
//!
//! The code is cut by concern. `files` names the files and encodes the small metadata ones (the
//! `log-start` file, the `.raft` sidecar); `segment` is one segment (its entry table, its reads and
//! the batch walk that checks a file); `index` the sparse indexes; `recover` opening a directory;
//! `append`, `read` and `trim` (truncation, purge, reset, retention) the operations of
//! [`PartitionLog`], whose shared position bookkeeping (Raft index to segment slot to offset) is
//! here.

mod append;
mod files;
mod index;
mod read;
mod recover;
mod segment;
mod trim;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::fault;
use crate::{IoContext, StorageError};
use files::LogStart;
use segment::Segment;

pub use trim::RetentionPlan;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    pub segment_bytes_max: u64,
    pub index_interval_bytes: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            index_interval_bytes: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Data { base_offset: i64, last_offset: i64 },
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub raft_index: u64,
    pub term: u64,
    pub kind: EntryKind,
    /// The stored batch, with the assigned baseOffset and partitionLeaderEpoch = term.
    pub bytes: Bytes,
}

/// An fsync of the active segment, detached from the log (see [`PartitionLog::take_pending_sync`]).
#[derive(Debug)]
pub struct PendingSync {
    file: Arc<File>,
    path: PathBuf,
}

impl PendingSync {
    /// fdatasync: the batches are in place, and their length is all the metadata that matters.
    pub fn sync(self) -> Result<(), StorageError> {
        // DELIBERATELY BROKEN with `--features chaos-bugs` and SLUICE_CHAOS_BUG=skip-fsync: the
        // appends are reported durable without an fdatasync (and so never journaled as durable),
        // which a simulated power loss must expose as lost acknowledged writes.
        #[cfg(feature = "chaos-bugs")]
        if fault::chaos_bug("skip-fsync") {
            return Ok(());
        }
        fault::sync_data(&self.file, &self.path).ctx(&self.path)
    }
}

/// The partition log. Mutations take `&mut self`; `read`, `entries` and lookups take `&self` and use
/// positional reads, so readers can share the log behind an `RwLock`.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    cfg: LogConfig,
    /// Ordered by base offset and by first Raft index; only the last one is written to.
    segments: Vec<Segment>,
    /// Absent until the first segment is created, a purge or a reset.
    start: Option<LogStart>,
    /// Appended since the last fsync of the active segment.
    dirty: bool,
}

impl PartitionLog {
    /// Fsyncs everything appended since the last sync (older segments were fsynced when they were
    /// rolled, sidecars when they were created; indexes are rebuilt on open and need no fsync).
    pub fn sync(&mut self) -> Result<(), StorageError> {
        match self.take_pending_sync() {
            Some(p) => p.sync(),
            None => Ok(()),
        }
    }

    /// What [`PartitionLog::sync`] would fsync, to be done by the caller once it has released the
    /// log, so that readers need not wait for the disk. The log counts as clean from here on: the
    /// caller must run the returned sync before it reports the appends durable, and must treat a
    /// failed sync as fatal for the log (retrying an fsync after a failure is unsafe anyway).
    pub fn take_pending_sync(&mut self) -> Option<PendingSync> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        self.segments.last().map(|seg| PendingSync {
            file: seg.file.clone(),
            path: seg.log_path.clone(),
        })
    }

    /// The Raft index the next append must use; `None` for a new, never-written log (any index).
    pub fn next_index(&self) -> Option<u64> {
        match self.segments.last() {
            Some(s) => Some(s.next_index()),
            None => self.start.map(|s| s.start_index),
        }
    }

    /// (first, last) visible Raft index.
    fn visible(&self) -> Option<(u64, u64)> {
        let first_seg = self.segments.first()?;
        let last = self.segments.last()?.next_index().checked_sub(1)?;
        let first = first_seg
            .first_index
            .max(self.start.map_or(0, |s| s.start_index));
        (first <= last && last >= first_seg.first_index).then_some((first, last))
    }

    pub fn first_index(&self) -> Option<u64> {
        self.visible().map(|v| v.0)
    }

    pub fn last_index(&self) -> Option<u64> {
        self.visible().map(|v| v.1)
    }

    /// (segment, slot) of a visible entry.
    fn locate(&self, raft_index: u64) -> Option<(usize, usize)> {
        let (first, last) = self.visible()?;
        if raft_index < first || raft_index > last {
            return None;
        }
        let k = self
            .segments
            .partition_point(|s| s.first_index <= raft_index)
            .checked_sub(1)?;
        let seg = self.segments.get(k)?;
        let slot = (raft_index - seg.first_index) as usize;
        (slot < seg.entries.len()).then_some((k, slot))
    }

    pub fn term_of(&self, raft_index: u64) -> Option<u64> {
        let (k, slot) = self.locate(raft_index)?;
        Some(self.segments[k].entries[slot].term)
    }

    /// The offset the log continued at after entry `raft_index`: one past a data batch's last
    /// offset, or the log end at the time for an internal entry.
    pub fn end_offset_at(&self, raft_index: u64) -> Option<i64> {
        let (k, slot) = self.locate(raft_index)?;
        Some(self.segments[k].entries[slot].end)
    }

    /// Offset of the first visible entry (the log end offset if the log is empty).
    pub fn log_start_offset(&self) -> i64 {
        match self.visible().and_then(|(first, _)| self.locate(first)) {
            Some((k, slot)) => self.segments[k].entries[slot].base,
            None => self.log_end_offset(),
        }
    }

    /// The next offset to assign.
    pub fn log_end_offset(&self) -> i64 {
        match self.segments.last() {
            Some(s) => s.end_offset(),
            None => self.start.map_or(0, |s| s.start_offset),
        }
    }

    /// Bytes of all segment files (including purged entries still held by a partially purged segment).
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests;
