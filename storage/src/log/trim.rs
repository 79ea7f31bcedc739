//! Removing entries: truncating the tail (Raft conflicts), purging the head (snapshots and
//! retention), resetting to empty (snapshot install), and the retention plan that picks what to
//! purge.

use super::files::{remove_segment_files, LogStart};
use super::PartitionLog;
use crate::fault;
use crate::file::sync_dir;
use crate::{IoContext, StorageError};

impl PartitionLog {
    /// Drops every entry with index >= `raft_index`, durably.
    pub fn truncate_from_index(&mut self, raft_index: u64) -> Result<(), StorageError> {
        let Some((first, last)) = self.visible() else {
            return Ok(());
        };
        if raft_index > last {
            return Ok(());
        }
        if raft_index < first {
            return Err(StorageError::InvalidArgument(format!(
                "truncate at {raft_index} below the first entry {first}"
            )));
        }
        let (k, slot) = self
            .locate(raft_index)
            .ok_or_else(|| StorageError::Corrupt(format!("entry {raft_index} not found")))?;
        // Newest first, so that a crash in between leaves a prefix of the log.
        let mut removed = false;
        while self.segments.len() > k + 1 || (slot == 0 && k > 0 && self.segments.len() > k) {
            if let Some(seg) = self.segments.pop() {
                remove_segment_files(&self.dir, seg.base_offset)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir).ctx(&self.dir)?;
        }
        let interval = self.cfg.index_interval_bytes;
        let seg = self
            .segments
            .last_mut()
            .ok_or_else(|| StorageError::Corrupt("no segment left".into()))?;
        if seg.first_index <= raft_index {
            let keep = (raft_index - seg.first_index) as usize;
            if keep < seg.entries.len() {
                let size = seg.entries[keep].pos;
                seg.file.set_len(size).ctx(&seg.log_path)?;
                fault::sync_all(&seg.file, &seg.log_path).ctx(&seg.log_path)?;
                seg.size = size;
                seg.entries.truncate(keep);
                seg.rebuild_indexes(interval);
                seg.write_index_files()?;
            }
        }
        // The active segment is now fully fsynced (either truncated above or rolled earlier).
        self.dirty = false;
        Ok(())
    }

    /// Forgets every entry with index <= `raft_index`; whole segments that hold only such entries
    /// are deleted. If nothing is left, the next append continues at `raft_index + 1`.
    pub fn purge_upto_index(&mut self, raft_index: u64) -> Result<(), StorageError> {
        let new_start = raft_index
            .checked_add(1)
            .ok_or_else(|| StorageError::InvalidArgument("purge index overflow".into()))?;
        if self.start.is_some_and(|s| new_start <= s.start_index) {
            return Ok(());
        }
        let start_offset = match self.segments.first() {
            Some(seg) if new_start <= seg.first_index => seg.base_offset,
            _ => match self.locate(new_start) {
                Some((k, slot)) => self.segments[k].entries[slot].base,
                None => self.log_end_offset(),
            },
        };
        let generation = self.start.map_or(0, |s| s.generation);
        self.write_start(LogStart {
            generation,
            start_index: new_start,
            start_offset,
        })?;
        let mut removed = false;
        while self
            .segments
            .first()
            .is_some_and(|s| s.next_index() <= new_start)
        {
            let seg = self.segments.remove(0);
            remove_segment_files(&self.dir, seg.base_offset)?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir).ctx(&self.dir)?;
        }
        if self.segments.is_empty() {
            self.dirty = false;
        }
        Ok(())
    }

    /// Empties the log; the next append must be `next_raft_index` and gets offset `next_offset`.
    pub fn reset(&mut self, next_raft_index: u64, next_offset: i64) -> Result<(), StorageError> {
        if next_offset < 0 {
            return Err(StorageError::InvalidArgument(format!(
                "negative offset {next_offset}"
            )));
        }
        let generation = self.start.map_or(0, |s| s.generation) + 1;
        // The new generation makes any segment that survives a crash below a leftover.
        self.write_start(LogStart {
            generation,
            start_index: next_raft_index,
            start_offset: next_offset,
        })?;
        while let Some(seg) = self.segments.pop() {
            remove_segment_files(&self.dir, seg.base_offset)?;
        }
        sync_dir(&self.dir).ctx(&self.dir)?;
        self.dirty = false;
        Ok(())
    }

    /// What Kafka's delete retention would remove now: the oldest whole segments that breach
    /// `retention_ms` (their largest record timestamp is more than that older than `now_ms`) or
    /// that can go while the log stays at least `retention_bytes` big (`size - retention_bytes >=
    /// segment size`, oldest first). `-1` (any negative value) disables either limit.
    ///
    /// Unlike Kafka, the active segment is never deleted, not even when it is all expired: rolling
    /// it would put an empty segment at the end, which this log refuses (its successor would get
    /// the same base offset). Segments holding any entry above `max_index` (the last applied,
    /// hence committed, Raft index) are kept, as Kafka keeps those above the high watermark: only
    /// a snapshot can stand in for purged entries, and it covers applied entries only.
    pub fn retention_plan(
        &self,
        now_ms: i64,
        retention_ms: i64,
        retention_bytes: i64,
        max_index: u64,
    ) -> Option<RetentionPlan> {
        let (_, older) = self.segments.split_last()?;
        let bounded = older
            .iter()
            .take_while(|s| s.next_index() <= max_index.saturating_add(1))
            .count();
        let older = &older[..bounded];

        let by_time = if retention_ms < 0 {
            0
        } else {
            older
                .iter()
                .take_while(|s| now_ms.saturating_sub(s.largest_timestamp()) > retention_ms)
                .count()
        };
        let by_size = if retention_bytes < 0 {
            0
        } else {
            // Kafka: `diff = size - retention.bytes`; delete while `diff - segment.size >= 0`.
            let mut diff = i128::from(self.size_bytes()) - i128::from(retention_bytes);
            let mut n = 0;
            for s in older {
                diff -= i128::from(s.size);
                if diff < 0 {
                    break;
                }
                n += 1;
            }
            n
        };
        let n = by_time.max(by_size);
        let last = older.get(n.checked_sub(1)?)?;
        let next = self.segments.get(n)?;
        Some(RetentionPlan {
            purge_upto_index: last.next_index().checked_sub(1)?,
            segments: n,
            bytes: older[..n].iter().map(|s| s.size).sum(),
            log_start_offset: next.base_offset,
        })
    }
}

/// Whole segments that retention would delete; see [`PartitionLog::retention_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Purge every entry with a Raft index up to this one: the last entry of the newest segment
    /// to delete, so [`PartitionLog::purge_upto_index`] removes exactly these segments.
    pub purge_upto_index: u64,
    pub segments: usize,
    pub bytes: u64,
    /// The log start offset once they are gone: the first kept segment's base offset.
    pub log_start_offset: i64,
}
