//! Opening a log directory, which is crash recovery: reading the `log-start` file, removing the
//! leftovers of interrupted purges, resets and segment creations, walking every segment, cutting
//! the active segment's torn tail (or refusing to, below the durable point), deriving missing
//! sidecars from their neighbours and rebuilding the indexes.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use super::files::{
    decode_sidecar, encode_sidecar, parse_segment_name, remove_if_exists, remove_segment_files,
    segment_path, LogStart, LOG_START_FILE,
};
use super::index::SparseIndexes;
use super::segment::{walk_segment, Segment};
use super::{LogConfig, PartitionLog};
use crate::fault;
use crate::file::{read_optional, sync_dir, write_atomic};
use crate::{IoContext, StorageError};

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
}
