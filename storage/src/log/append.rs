//! Appending: data batches (the leader's own, with offsets assigned here, or a follower's, already
//! placed), internal entries, and rolling to a new segment when the active one is full.

use std::fs::OpenOptions;
use std::sync::Arc;

use super::files::{encode_sidecar, remove_segment_files, segment_path, LogStart};
use super::index::SparseIndexes;
use super::segment::{EntryMeta, Segment};
use super::PartitionLog;
use crate::batch;
use crate::fault;
use crate::file::{sync_dir, write_atomic};
use crate::{IoContext, StorageError};

/// baseOffset, batchLength and partitionLeaderEpoch: the part of a data batch the log rewrites.
const PATCHED_HEAD_LEN: usize = 16;

impl PartitionLog {
    /// `batch` is one valid batch; the log assigns its offsets from its end and returns
    /// (base_offset, last_offset). For a batch new to the Raft log (the leader's own appends).
    /// Not durable until `sync`.
    pub fn append_data(
        &mut self,
        raft_index: u64,
        term: u64,
        batch: &[u8],
    ) -> Result<(i64, i64), StorageError> {
        self.append_batch(raft_index, term, batch, None)
    }

    /// Like [`PartitionLog::append_data`] for a batch another replica's log has already placed
    /// (a follower's appends): its stored baseOffset must be where this log continues, or the
    /// logs have diverged and [`StorageError::OffsetMismatch`] says so, appending nothing.
    pub fn append_replicated(
        &mut self,
        raft_index: u64,
        term: u64,
        batch: &[u8],
    ) -> Result<(i64, i64), StorageError> {
        let placed = batch::parse_header(batch)?.base_offset;
        self.append_batch(raft_index, term, batch, Some(placed))
    }

    fn append_batch(
        &mut self,
        raft_index: u64,
        term: u64,
        batch: &[u8],
        placed_at: Option<i64>,
    ) -> Result<(i64, i64), StorageError> {
        let h = batch::validate(batch)?;
        if batch::is_internal(&h) {
            return Err(StorageError::InvalidArgument(
                "data batch uses the internal producer id".into(),
            ));
        }
        let epoch = term_to_epoch(term)?;
        let base = self.log_end_offset();
        if let Some(placed) = placed_at.filter(|&p| p != base) {
            return Err(StorageError::OffsetMismatch {
                raft_index,
                placed,
                local: base,
            });
        }
        let end = i64::from(h.last_offset_delta)
            .checked_add(1)
            .and_then(|d| base.checked_add(d))
            .ok_or_else(|| StorageError::InvalidArgument("offset overflow".into()))?;
        // Only the first 16 bytes change (baseOffset, batchLength, partitionLeaderEpoch), and all
        // lie outside the CRC: the rest is written from the caller's buffer as it is.
        let mut head = [0u8; PATCHED_HEAD_LEN];
        head.copy_from_slice(&batch[..PATCHED_HEAD_LEN]);
        batch::set_base_offset(&mut head, base);
        batch::set_partition_leader_epoch(&mut head, epoch);
        let stored = &batch[..h.total_len()];
        self.append_stored(
            raft_index,
            term,
            (&head, &stored[PATCHED_HEAD_LEN..]),
            base,
            end,
            h.max_timestamp,
            true,
        )?;
        Ok((base, end - 1))
    }

    pub fn append_internal(
        &mut self,
        raft_index: u64,
        term: u64,
        payload: &[u8],
    ) -> Result<(), StorageError> {
        let epoch = term_to_epoch(term)?;
        let next = self.log_end_offset();
        let buf = batch::internal_batch(epoch, next, payload);
        if buf.len() > i32::MAX as usize {
            return Err(StorageError::InvalidArgument(
                "internal payload too large".into(),
            ));
        }
        self.append_stored(raft_index, term, (&buf, &[]), next, next, i64::MIN, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn append_stored(
        &mut self,
        raft_index: u64,
        term: u64,
        (head, tail): (&[u8], &[u8]),
        base: i64,
        end: i64,
        max_ts: i64,
        data: bool,
    ) -> Result<(), StorageError> {
        if let Some(expected) = self.next_index() {
            if raft_index != expected {
                return Err(StorageError::NonContiguous {
                    expected,
                    got: raft_index,
                });
            }
        }
        let len = (head.len() + tail.len()) as u64;
        let roll = match self.segments.last() {
            None => true,
            // A segment holding no data is never rolled: its successor would get the same name.
            Some(s) => {
                s.has_data()
                    && (s.size + len > self.cfg.segment_bytes_max
                        || s.size + len > u64::from(u32::MAX)
                        || end - s.base_offset > i64::from(u32::MAX))
            }
        };
        if roll {
            self.new_segment(base, raft_index)?;
        }
        let interval = self.cfg.index_interval_bytes;
        let seg = self
            .segments
            .last_mut()
            .ok_or_else(|| StorageError::Corrupt("no active segment".into()))?;
        let pos = seg.size;
        let written = fault::write_all_at(&seg.file, head, pos, &seg.log_path).and_then(|()| {
            fault::write_all_at(&seg.file, tail, pos + head.len() as u64, &seg.log_path)
        });
        if let Err(e) = written {
            // Best effort: drop a partial write now rather than leave it to recovery.
            let _ = seg.file.set_len(pos);
            return Err(e).ctx(&seg.log_path);
        }
        seg.size += len;
        self.dirty = true;
        seg.push_entry(
            EntryMeta {
                pos,
                len: len as u32,
                term,
                base,
                end,
                max_ts,
                data,
            },
            interval,
        );
        Ok(())
    }

    /// Creates the segment that the next entry (`first_index`, offset `base`) starts. The previous
    /// active segment is fsynced first, so that only the last segment can ever have a torn tail.
    fn new_segment(&mut self, base: i64, first_index: u64) -> Result<(), StorageError> {
        if let Some(prev) = self.segments.last_mut() {
            fault::sync_data(&prev.file, &prev.log_path).ctx(&prev.log_path)?;
            prev.index_file = None;
            prev.time_file = None;
        }
        let generation = self.start.map_or(0, |s| s.generation);
        if self.start.is_none() {
            // Lets recovery derive the first segment's Raft index even if its sidecar is lost.
            self.write_start(LogStart {
                generation,
                start_index: first_index,
                start_offset: base,
            })?;
        }
        remove_segment_files(&self.dir, base)?;
        let side = segment_path(&self.dir, base, "raft");
        write_atomic(&side, &encode_sidecar(generation, first_index)).ctx(&side)?;
        let log_path = segment_path(&self.dir, base, "log");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log_path)
            .ctx(&log_path)?;
        sync_dir(&self.dir).ctx(&self.dir)?;
        fault::created_durable(&log_path);
        self.segments.push(Segment {
            base_offset: base,
            first_index,
            log_path,
            file: Arc::new(file),
            size: 0,
            entries: Vec::new(),
            index: SparseIndexes::default(),
            max_ts: i64::MIN,
            index_file: None,
            time_file: None,
        });
        Ok(())
    }
}

/// Terms are stored in partitionLeaderEpoch (i32).
fn term_to_epoch(term: u64) -> Result<i32, StorageError> {
    i32::try_from(term)
        .map_err(|_| StorageError::InvalidArgument(format!("term {term} exceeds i32")))
}
