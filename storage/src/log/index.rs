//! The sparse offset and time indexes of a segment: the one rule that picks their entries, their
//! on-disk encoding, keeping the files in step on append (or rewriting them after recovery), and
//! the lookups that narrow a search for an offset or a timestamp to a few slots.

use std::fs::{File, OpenOptions};

use super::segment::{EntryMeta, Segment};
use crate::fault;
use crate::file::read_optional;
use crate::{IoContext, StorageError};

const OFFSET_ENTRY_LEN: u64 = 8;
const TIME_ENTRY_LEN: u64 = 12;

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct SparseIndexes {
    offsets: Vec<(u32, u32)>,
    times: Vec<(i64, u32)>,
}

impl SparseIndexes {
    /// The one rule for sparse index entries, shared by append and rebuild so they always agree.
    fn step(&mut self, e: &EntryMeta, seg_base: i64, interval: u32, max_ts_so_far: i64) {
        if !e.data {
            return;
        }
        let since = e.pos - self.offsets.last().map_or(0, |&(_, p)| u64::from(p));
        if since < u64::from(interval) {
            return;
        }
        let (Ok(rel), Ok(pos)) = (u32::try_from(e.base - seg_base), u32::try_from(e.pos)) else {
            return;
        };
        self.offsets.push((rel, pos));
        if self.times.last().is_none_or(|&(t, _)| max_ts_so_far > t) {
            self.times.push((max_ts_so_far, rel));
        }
    }

    pub(super) fn build(entries: &[EntryMeta], seg_base: i64, interval: u32) -> SparseIndexes {
        let mut idx = SparseIndexes::default();
        let mut max_ts = i64::MIN;
        for e in entries {
            if e.data {
                max_ts = max_ts.max(e.max_ts);
            }
            idx.step(e, seg_base, interval, max_ts);
        }
        idx
    }

    pub(super) fn encode_offsets(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.offsets.len() * OFFSET_ENTRY_LEN as usize);
        for &(rel, pos) in &self.offsets {
            out.extend_from_slice(&rel.to_be_bytes());
            out.extend_from_slice(&pos.to_be_bytes());
        }
        out
    }

    pub(super) fn encode_times(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len() * TIME_ENTRY_LEN as usize);
        for &(ts, rel) in &self.times {
            out.extend_from_slice(&ts.to_be_bytes());
            out.extend_from_slice(&rel.to_be_bytes());
        }
        out
    }
}

impl Segment {
    pub(super) fn rebuild_indexes(&mut self, interval: u32) {
        self.index = SparseIndexes::build(&self.entries, self.base_offset, interval);
        self.max_ts = self
            .entries
            .iter()
            .filter(|e| e.data)
            .map(|e| e.max_ts)
            .max()
            .unwrap_or(i64::MIN);
    }

    /// Rewrites the index files if their content differs from the in-memory indexes.
    pub(super) fn write_index_files(&mut self) -> Result<(), StorageError> {
        for (ext, want) in [
            ("index", self.index.encode_offsets()),
            ("timeindex", self.index.encode_times()),
        ] {
            let path = self.path(ext);
            let have = read_optional(&path).ctx(&path)?;
            let agrees = match &have {
                Some(h) => *h == want,
                None => want.is_empty(),
            };
            if !agrees {
                tracing::debug!(file = %path.display(), "rewriting index that disagrees with the log");
                fault::write_unsynced(&path, &want).ctx(&path)?;
            }
        }
        Ok(())
    }

    fn open_sidefile(&mut self, ext: &str) -> Result<&File, StorageError> {
        let path = self.path(ext);
        let slot = if ext == "index" {
            &mut self.index_file
        } else {
            &mut self.time_file
        };
        if slot.is_none() {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .ctx(&path)?;
            fault::opened_unsynced(&path);
            *slot = Some(f);
        }
        match slot {
            Some(f) => Ok(f),
            None => Err(StorageError::Corrupt(format!(
                "{} not open",
                path.display()
            ))),
        }
    }

    /// Records an entry already written to the log file. The index files are derived data that
    /// `open` rebuilds, so failing to extend them must not fail an append whose batch is written.
    pub(super) fn push_entry(&mut self, e: EntryMeta, interval: u32) {
        if e.data {
            self.max_ts = self.max_ts.max(e.max_ts);
        }
        let (n_off, n_time) = (self.index.offsets.len(), self.index.times.len());
        self.index.step(&e, self.base_offset, interval, self.max_ts);
        self.entries.push(e);
        if let Some(&(rel, pos)) = self.index.offsets.get(n_off) {
            let mut rec = [0u8; OFFSET_ENTRY_LEN as usize];
            rec[..4].copy_from_slice(&rel.to_be_bytes());
            rec[4..].copy_from_slice(&pos.to_be_bytes());
            self.write_index_record("index", &rec, n_off as u64 * OFFSET_ENTRY_LEN);
        }
        if let Some(&(ts, rel)) = self.index.times.get(n_time) {
            let mut rec = [0u8; TIME_ENTRY_LEN as usize];
            rec[..8].copy_from_slice(&ts.to_be_bytes());
            rec[8..].copy_from_slice(&rel.to_be_bytes());
            self.write_index_record("timeindex", &rec, n_time as u64 * TIME_ENTRY_LEN);
        }
    }

    fn write_index_record(&mut self, ext: &str, rec: &[u8], at: u64) {
        let path = self.path(ext);
        let res = self
            .open_sidefile(ext)
            .and_then(|f| fault::write_all_at(f, rec, at, &path).ctx(&path));
        if let Err(e) = res {
            tracing::error!(file = %path.display(), "cannot extend index (rebuilt on next open): {e}");
        }
    }

    /// First slot whose batch ends after `offset`, narrowed by the sparse offset index.
    pub(super) fn slot_for_offset(&self, offset: i64) -> usize {
        let lo = match u32::try_from(offset - self.base_offset) {
            Ok(rel) => {
                let k = self.index.offsets.partition_point(|&(o, _)| o <= rel);
                match k.checked_sub(1).and_then(|k| self.index.offsets.get(k)) {
                    Some(&(_, pos)) => self.entries.partition_point(|e| e.pos < u64::from(pos)),
                    None => 0,
                }
            }
            Err(_) => 0,
        };
        let lo = lo.min(self.entries.len());
        lo + self.entries[lo..].partition_point(|e| e.end <= offset)
    }

    /// First slot that can hold a data batch with maxTimestamp >= `ts`, narrowed by the time index:
    /// an entry (T, rel) means every batch up to offset base+rel has maxTimestamp <= T.
    pub(super) fn slot_for_timestamp(&self, ts: i64) -> usize {
        let k = self.index.times.partition_point(|&(t, _)| t < ts);
        match k.checked_sub(1).and_then(|k| self.index.times.get(k)) {
            Some(&(_, rel)) => {
                let b = self.base_offset + i64::from(rel);
                self.entries.partition_point(|e| e.base <= b)
            }
            None => 0,
        }
    }
}
