//! The segmented partition log, which is also the partition's Raft log.
//!
//! Every Raft entry is exactly one stored batch: data entries are Kafka RecordBatch v2 batches whose
//! baseOffset the log assigns in append order (and whose partitionLeaderEpoch is the Raft term);
//! internal entries are control batches (see [`batch::internal_batch`]) that take no offset. Their
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

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::batch::{self, BATCH_HEADER_LEN};
use crate::fault;
use crate::file::{read_optional, sync_dir, write_atomic};
use crate::{IoContext, StorageError};

const LOG_START_FILE: &str = "log-start";
const LOG_START_MAGIC: &[u8; 4] = b"SLLS";
const SIDECAR_MAGIC: &[u8; 4] = b"SLRS";
const OFFSET_ENTRY_LEN: u64 = 8;
/// baseOffset, batchLength and partitionLeaderEpoch: the part of a data batch the log rewrites.
const PATCHED_HEAD_LEN: usize = 16;
const TIME_ENTRY_LEN: u64 = 12;

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

/// In-memory metadata of one stored batch; the dense per-segment table makes Raft-index lookups O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryMeta {
    pos: u64,
    len: u32,
    term: u64,
    /// First offset of the batch; for internal entries the log end offset when it was written.
    base: i64,
    /// One past the last offset (== `base` for internal entries).
    end: i64,
    max_ts: i64,
    data: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct SparseIndexes {
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

    fn build(entries: &[EntryMeta], seg_base: i64, interval: u32) -> SparseIndexes {
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

    fn encode_offsets(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.offsets.len() * OFFSET_ENTRY_LEN as usize);
        for &(rel, pos) in &self.offsets {
            out.extend_from_slice(&rel.to_be_bytes());
            out.extend_from_slice(&pos.to_be_bytes());
        }
        out
    }

    fn encode_times(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len() * TIME_ENTRY_LEN as usize);
        for &(ts, rel) in &self.times {
            out.extend_from_slice(&ts.to_be_bytes());
            out.extend_from_slice(&rel.to_be_bytes());
        }
        out
    }
}

#[derive(Debug)]
struct Segment {
    base_offset: i64,
    first_index: u64,
    log_path: PathBuf,
    /// Shared so that a [`PendingSync`] can fsync it after the caller has released the log.
    file: Arc<File>,
    size: u64,
    entries: Vec<EntryMeta>,
    index: SparseIndexes,
    max_ts: i64,
    /// Kept open only while the segment is active.
    index_file: Option<File>,
    time_file: Option<File>,
}

impl Segment {
    fn end_offset(&self) -> i64 {
        self.entries.last().map_or(self.base_offset, |e| e.end)
    }

    fn next_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64
    }

    fn has_data(&self) -> bool {
        self.end_offset() > self.base_offset
    }

    /// The largest record timestamp, as Kafka's retention.ms judges a segment: batches without
    /// timestamps (-1) fall back to the file's modification time. An unreadable mtime counts as
    /// the far future, so a doubtful segment is kept rather than deleted.
    fn largest_timestamp(&self) -> i64 {
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

    fn path(&self, ext: &str) -> PathBuf {
        self.log_path.with_extension(ext)
    }

    fn rebuild_indexes(&mut self, interval: u32) {
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
    fn write_index_files(&mut self) -> Result<(), StorageError> {
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
    fn push_entry(&mut self, e: EntryMeta, interval: u32) {
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
    fn slot_for_offset(&self, offset: i64) -> usize {
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
    fn slot_for_timestamp(&self, ts: i64) -> usize {
        let k = self.index.times.partition_point(|&(t, _)| t < ts);
        match k.checked_sub(1).and_then(|k| self.index.times.get(k)) {
            Some(&(_, rel)) => {
                let b = self.base_offset + i64::from(rel);
                self.entries.partition_point(|e| e.base <= b)
            }
            None => 0,
        }
    }

    /// Byte length of the contiguous stored slots `[a, b)` (0 if the range is empty).
    fn slots_len(&self, a: usize, b: usize) -> usize {
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
    fn read_slots(&self, a: usize, b: usize) -> Result<Bytes, StorageError> {
        let mut buf = BytesMut::zeroed(self.slots_len(a, b));
        let n = self.read_slots_into(a, b, &mut buf)?;
        buf.truncate(n);
        Ok(buf.freeze())
    }

    /// Reads the contiguous stored bytes of slots `[a, b)` into the front of `buf`; returns how
    /// many bytes that was.
    fn read_slots_into(&self, a: usize, b: usize, buf: &mut [u8]) -> Result<usize, StorageError> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogStart {
    generation: u64,
    start_index: u64,
    start_offset: i64,
}

impl LogStart {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(LOG_START_MAGIC);
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&self.start_index.to_be_bytes());
        b.extend_from_slice(&self.start_offset.to_be_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<LogStart> {
        let body = checked_body(b, LOG_START_MAGIC, 32)?;
        Some(LogStart {
            generation: u64::from_be_bytes(body.get(4..12)?.try_into().ok()?),
            start_index: u64::from_be_bytes(body.get(12..20)?.try_into().ok()?),
            start_offset: i64::from_be_bytes(body.get(20..28)?.try_into().ok()?),
        })
    }
}

/// Checks length, magic and trailing CRC-32C of a small metadata file; returns the body.
fn checked_body<'a>(b: &'a [u8], magic: &[u8; 4], len: usize) -> Option<&'a [u8]> {
    if b.len() != len || b.get(..4)? != magic {
        return None;
    }
    let (body, crc) = b.split_at(len - 4);
    let crc = u32::from_be_bytes(crc.try_into().ok()?);
    (crc32c::crc32c(body) == crc).then_some(body)
}

fn encode_sidecar(generation: u64, first_index: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(SIDECAR_MAGIC);
    b.extend_from_slice(&generation.to_be_bytes());
    b.extend_from_slice(&first_index.to_be_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

/// Returns (generation, first_index).
fn decode_sidecar(b: &[u8]) -> Option<(u64, u64)> {
    let body = checked_body(b, SIDECAR_MAGIC, 24)?;
    Some((
        u64::from_be_bytes(body.get(4..12)?.try_into().ok()?),
        u64::from_be_bytes(body.get(12..20)?.try_into().ok()?),
    ))
}

const SEGMENT_EXTS: [&str; 4] = ["log", "raft", "index", "timeindex"];

fn segment_path(dir: &Path, base: i64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

/// Parses `{20 digits}.{ext}` for the segment file extensions.
fn parse_segment_name(name: &str) -> Option<(i64, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|c| c.is_ascii_digit()) || !SEGMENT_EXTS.contains(&ext)
    {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => {
            fault::removed(path);
            Ok(())
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx(path),
        Err(_) => Ok(()),
    }
}

/// Removes a segment's files, the log first, the sidecar last: a sidecar without a log is an
/// ignorable orphan on open, while a log without its sidecar needs repair.
fn remove_segment_files(dir: &Path, base: i64) -> Result<(), StorageError> {
    for ext in ["log", "index", "timeindex", "raft"] {
        remove_if_exists(&segment_path(dir, base, ext))?;
    }
    Ok(())
}

struct Walk {
    entries: Vec<EntryMeta>,
    valid_len: u64,
    /// Why the walk stopped before the end of the file.
    problem: Option<String>,
}

/// Walks the batches of a segment file. Every segment is length-walked (header sanity, lengths and
/// offset continuity); `check_crc` also verifies each batch's CRC-32C, for the active segment,
/// whose tail may be torn.
fn walk_segment(
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
    /// Opens (creating if needed) the log in `dir`, recovering from a crash: a torn or garbage tail
    /// of the active segment is cut off with one warning; leftovers of interrupted purges, resets
    /// and segment creations are removed; missing or stale sidecars and indexes are rebuilt.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<PartitionLog, StorageError> {
        Self::open_checked(dir, cfg, None)
    }

    /// [`PartitionLog::open`], knowing that every entry up to Raft index `durable` was fsynced
    /// (and acknowledged): a bad batch at or below it is not a torn tail but lost data, and
    /// [`StorageError::BelowDurable`] says so without cutting anything. Above it, a torn tail is
    /// cut as usual.
    pub fn open_checked(
        dir: &Path,
        cfg: LogConfig,
        durable: Option<u64>,
    ) -> Result<PartitionLog, StorageError> {
        if cfg.segment_bytes_max == 0 {
            return Err(StorageError::InvalidArgument(
                "segment_bytes_max must be > 0".into(),
            ));
        }
        fs::create_dir_all(dir).ctx(dir)?;
        let start_path = dir.join(LOG_START_FILE);
        let start = match read_optional(&start_path).ctx(&start_path)? {
            Some(b) => Some(LogStart::decode(&b).ok_or_else(|| {
                StorageError::Corrupt(format!("{} is unreadable", start_path.display()))
            })?),
            None => None,
        };
        let generation = start.map_or(0, |s| s.generation);

        let mut bases = std::collections::BTreeMap::<i64, Vec<String>>::new();
        for dent in fs::read_dir(dir).ctx(dir)? {
            let dent = dent.ctx(dir)?;
            let name = dent.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                remove_if_exists(&dent.path())?;
            } else if let Some((base, ext)) = parse_segment_name(&name) {
                bases.entry(base).or_default().push(ext.to_string());
            }
        }
        let mut found = Vec::new(); // (base, sidecar first index)
        let mut removed = false;
        for (base, exts) in bases {
            if !exts.iter().any(|e| e == "log") {
                remove_segment_files(dir, base)?;
                removed = true;
                continue;
            }
            let side_path = segment_path(dir, base, "raft");
            let side = read_optional(&side_path)
                .ctx(&side_path)?
                .and_then(|b| decode_sidecar(&b));
            match side {
                Some((g, _)) if g < generation => {
                    tracing::info!(segment = base, "removing segment left over from a reset");
                    remove_segment_files(dir, base)?;
                    removed = true;
                }
                _ => found.push((base, side.map(|(_, first)| first))),
            }
        }

        let n = found.len();
        let mut walked = Vec::with_capacity(n);
        // Only the active segment can hold writes that were never fsynced: a segment is
        // fsynced before the next one is created. Its tail is cut below, once the Raft index of
        // the first bad batch is known.
        let mut torn_tail = None;
        for (i, &(base, _)) in found.iter().enumerate() {
            let log_path = segment_path(dir, base, "log");
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&log_path)
                .ctx(&log_path)?;
            let is_last = i + 1 == n;
            let walk = walk_segment(&file, &log_path, base, is_last)?;
            if let Some(problem) = &walk.problem {
                if !is_last {
                    return Err(StorageError::Corrupt(format!(
                        "{} at byte {}: {problem}",
                        log_path.display(),
                        walk.valid_len
                    )));
                }
                torn_tail = Some(problem.clone());
            }
            walked.push((log_path, file, walk));
        }

        // Recover missing sidecars from the neighbours: Raft indexes are contiguous across segments.
        let mut firsts: Vec<Option<u64>> = found.iter().map(|&(_, f)| f).collect();
        for i in 1..n {
            if firsts[i].is_none() {
                firsts[i] = firsts[i - 1].map(|f| f + walked[i - 1].2.entries.len() as u64);
            }
        }
        for i in (0..n.saturating_sub(1)).rev() {
            if firsts[i].is_none() {
                firsts[i] =
                    firsts[i + 1].and_then(|f| f.checked_sub(walked[i].2.entries.len() as u64));
            }
        }
        if let (Some(None), Some(s)) = (firsts.first(), start) {
            if s.start_offset == found[0].0 {
                firsts[0] = Some(s.start_index);
            }
        }

        if let (Some(problem), Some((log_path, file, walk)), Some(first)) =
            (&torn_tail, walked.last(), firsts.last().copied().flatten())
        {
            let bad_index = first + walk.entries.len() as u64;
            if let Some(durable) = durable.filter(|d| bad_index <= *d) {
                return Err(StorageError::BelowDurable {
                    path: log_path.clone(),
                    position: walk.valid_len,
                    raft_index: bad_index,
                    durable,
                    problem: problem.clone(),
                });
            }
            tracing::warn!(
                file = %log_path.display(),
                position = walk.valid_len,
                raft_index = bad_index,
                "truncating torn or corrupt tail of the active segment: {problem}"
            );
            file.set_len(walk.valid_len).ctx(log_path)?;
            fault::sync_all(file, log_path).ctx(log_path)?;
        } else if let (Some(problem), Some((log_path, file, walk))) = (&torn_tail, walked.last()) {
            tracing::warn!(
                file = %log_path.display(),
                position = walk.valid_len,
                "truncating torn or corrupt tail of the active segment: {problem}"
            );
            file.set_len(walk.valid_len).ctx(log_path)?;
            fault::sync_all(file, log_path).ctx(log_path)?;
        }

        let mut segments: Vec<Segment> = Vec::with_capacity(n);
        for (((base, side), first), (log_path, file, walk)) in
            found.into_iter().zip(firsts).zip(walked)
        {
            let Some(first_index) = first else {
                if walk.entries.is_empty() {
                    // An empty segment without a sidecar holds nothing worth keeping.
                    tracing::info!(file = %log_path.display(), "removing empty segment without sidecar");
                    remove_segment_files(dir, base)?;
                    removed = true;
                    continue;
                }
                return Err(StorageError::Corrupt(format!(
                    "{}: sidecar missing and the Raft index cannot be derived",
                    log_path.display()
                )));
            };
            if side.is_none() {
                tracing::info!(file = %log_path.display(), first_index, "rewriting missing segment sidecar");
                let p = segment_path(dir, base, "raft");
                write_atomic(&p, &encode_sidecar(generation, first_index)).ctx(&p)?;
            }
            if let Some(prev) = segments.last() {
                if prev.next_index() != first_index || prev.end_offset() != base {
                    return Err(StorageError::Corrupt(format!(
                        "{} does not continue the previous segment (index {} vs {}, offset {} vs {})",
                        log_path.display(),
                        first_index,
                        prev.next_index(),
                        base,
                        prev.end_offset()
                    )));
                }
            }
            let mut seg = Segment {
                base_offset: base,
                first_index,
                log_path,
                file: Arc::new(file),
                size: walk.valid_len,
                entries: walk.entries,
                index: SparseIndexes::default(),
                max_ts: i64::MIN,
                index_file: None,
                time_file: None,
            };
            seg.rebuild_indexes(cfg.index_interval_bytes);
            // The index files are a cache of what is rebuilt in memory here: failing to refresh
            // them (a full disk) must not keep the partition from opening.
            if let Err(e) = seg.write_index_files() {
                tracing::warn!(segment = base, error = %e, "could not rewrite the segment's index files; serving from the rebuilt in-memory index");
            }
            segments.push(seg);
        }

        // Finish an interrupted purge: drop segments that hold only purged entries.
        if let Some(s) = start {
            while segments
                .first()
                .is_some_and(|seg| seg.next_index() <= s.start_index)
            {
                let seg = segments.remove(0);
                remove_segment_files(dir, seg.base_offset)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(dir).ctx(dir)?;
        }
        let log = PartitionLog {
            dir: dir.to_path_buf(),
            cfg,
            segments,
            start,
            dirty: false,
        };
        // Whole batches can go missing too (a file cut at a batch boundary).
        if let Some(durable) = durable {
            let next = log.next_index().unwrap_or(0);
            if next <= durable {
                let path = log
                    .segments
                    .last()
                    .map_or_else(|| dir.to_path_buf(), |s| s.log_path.clone());
                let position = log.segments.last().map_or(0, |s| s.size);
                return Err(StorageError::BelowDurable {
                    path,
                    position,
                    raft_index: next,
                    durable,
                    problem: "the log ends there".into(),
                });
            }
        }
        Ok(log)
    }

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

    fn write_start(&mut self, s: LogStart) -> Result<(), StorageError> {
        let path = self.dir.join(LOG_START_FILE);
        write_atomic(&path, &s.encode()).ctx(&path)?;
        self.start = Some(s);
        Ok(())
    }

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

    /// Bytes of all segment files (including purged entries still held by a partially purged segment).
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
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

/// Terms are stored in partitionLeaderEpoch (i32).
fn term_to_epoch(term: u64) -> Result<i32, StorageError> {
    i32::try_from(term)
        .map_err(|_| StorageError::InvalidArgument(format!("term {term} exceeds i32")))
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
