//! Reading: Raft entries by index, Kafka fetches by offset, timestamp lookups and the leader-epoch
//! history.

use bytes::{Bytes, BytesMut};

use super::{EntryKind, LogEntry, PartitionLog};
use crate::StorageError;

impl PartitionLog {
    /// The visible entries with index in `[start, end_exclusive)`.
    pub fn entries(&self, start: u64, end_exclusive: u64) -> Result<Vec<LogEntry>, StorageError> {
        let Some((first, last)) = self.visible() else {
            return Ok(Vec::new());
        };
        let start = start.max(first);
        let end = end_exclusive.min(last.saturating_add(1));
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        let mut i = start;
        while i < end {
            let Some((k, slot)) = self.locate(i) else {
                break;
            };
            let seg = &self.segments[k];
            let stop = (slot + (end - i) as usize).min(seg.entries.len());
            let bytes = seg.read_slots(slot, stop)?;
            let origin = seg.entries[slot].pos;
            for (j, e) in seg.entries[slot..stop].iter().enumerate() {
                let at = (e.pos - origin) as usize;
                out.push(LogEntry {
                    raft_index: i + j as u64,
                    term: e.term,
                    kind: if e.data {
                        EntryKind::Data {
                            base_offset: e.base,
                            last_offset: e.end - 1,
                        }
                    } else {
                        EntryKind::Internal
                    },
                    bytes: bytes.slice(at..at + e.len as usize),
                });
            }
            i += (stop - slot) as u64;
        }
        Ok(out)
    }

    /// Kafka fetch: whole data batches, starting with the one containing `offset`, only batches whose
    /// last offset < `max_offset_exclusive`, up to `max_bytes` but always at least one qualifying
    /// batch. Internal batches are skipped.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        max_offset_exclusive: i64,
    ) -> Result<Bytes, StorageError> {
        self.read_within(offset, max_bytes, max_offset_exclusive, true)
    }

    /// [`PartitionLog::read`], where `min_one` says whether the first batch is returned even if
    /// it alone exceeds `max_bytes` (Kafka does so only for the first partition of a response
    /// that has data, so a consumer can always make progress). The bytes are read from the file
    /// once, straight into the buffer that is returned.
    pub fn read_within(
        &self,
        offset: i64,
        max_bytes: usize,
        max_offset_exclusive: i64,
        min_one: bool,
    ) -> Result<Bytes, StorageError> {
        let (log_start, log_end) = (self.log_start_offset(), self.log_end_offset());
        if offset < log_start || offset > log_end {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start,
                log_end,
            });
        }
        let visible_from = self.visible().map_or(u64::MAX, |v| v.0);
        let k0 = self
            .segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        // Runs of adjacent data batches: (segment, first slot, end slot).
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        let mut total = 0usize;
        'outer: for (k, seg) in self.segments.iter().enumerate().skip(k0) {
            let from = if k == k0 {
                seg.slot_for_offset(offset)
            } else {
                0
            };
            for (slot, e) in seg.entries.iter().enumerate().skip(from) {
                if !e.data || seg.first_index + (slot as u64) < visible_from {
                    continue;
                }
                let fits = total + e.len as usize <= max_bytes || (total == 0 && min_one);
                if e.end > max_offset_exclusive || !fits {
                    break 'outer;
                }
                total += e.len as usize;
                match runs.last_mut() {
                    Some(r) if r.0 == k && r.2 == slot => r.2 = slot + 1,
                    _ => runs.push((k, slot, slot + 1)),
                }
            }
        }
        // Sized from the runs themselves, so the check in read_slots_into holds by construction.
        let len: usize = runs
            .iter()
            .map(|&(k, a, b)| self.segments[k].slots_len(a, b))
            .sum();
        // Zeroed, not uninitialised: a large buffer comes from fresh (already zero) pages.
        let mut out = BytesMut::zeroed(len);
        let mut at = 0;
        for (k, a, b) in runs {
            let dst = out.get_mut(at..).unwrap_or_default();
            at += self.segments[k].read_slots_into(a, b, dst)?;
        }
        out.truncate(at);
        Ok(out.freeze())
    }

    /// First visible data batch whose maxTimestamp >= `ts`, as (its base offset, its maxTimestamp).
    /// Records are not decoded, so the offset is the batch's, not the exact record's.
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(i64, i64)>, StorageError> {
        let Some((visible_from, _)) = self.visible() else {
            return Ok(None);
        };
        for seg in &self.segments {
            if seg.max_ts < ts {
                continue;
            }
            let from = seg.slot_for_timestamp(ts);
            for (slot, e) in seg.entries.iter().enumerate().skip(from) {
                if e.data && e.max_ts >= ts && seg.first_index + slot as u64 >= visible_from {
                    return Ok(Some((e.base, e.max_ts)));
                }
            }
        }
        Ok(None)
    }

    /// Where each leader epoch (Raft term) starts: `(epoch, first offset written in it)`, for every
    /// term that wrote data, ascending. This is the epoch history OffsetForLeaderEpoch answers from.
    pub fn epoch_starts(&self) -> Vec<(u64, i64)> {
        let Some((visible_from, _)) = self.visible() else {
            return Vec::new();
        };
        let mut out: Vec<(u64, i64)> = Vec::new();
        for seg in &self.segments {
            for (slot, e) in seg.entries.iter().enumerate() {
                if !e.data || seg.first_index + (slot as u64) < visible_from {
                    continue;
                }
                if out.last().is_none_or(|(t, _)| *t != e.term) {
                    out.push((e.term, e.base));
                }
            }
        }
        out
    }
}
