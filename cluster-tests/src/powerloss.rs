//! Simulated power loss on a killed node's data directory.
//!
//! Nodes run with `SLUICE_STORAGE_FAULTS=1`, so the storage layer appends to
//! `DATA/storage-faults.journal`, after every successful fsync, how many bytes of which file are
//! durable (see `storage/src/fault.rs` for the line format). `kill -9` keeps the OS page cache,
//! so after killing the node every byte it wrote is still in its files; this module then does
//! what a power loss could have done to the bytes that were never fsynced:
//!
//! - a file whose last line is `durable LEN` and that is longer than LEN loses its unsynced tail:
//!   all of it, or it is torn (a random prefix of the tail kept), or garbled (a random prefix
//!   kept and a random range of it overwritten with random bytes);
//! - a file whose last line is `removed` but that exists again (re-created, its directory entry
//!   not yet fsynced) is deleted;
//! - `atomic` files (replaced by tmp + fsync + rename) are left alone: after a crash they hold
//!   either whole version.
//!
//! Afterwards every covered file that is left counts as durable at its new length (what
//! survives a power loss is on the medium), which is appended to the journal, so a later power
//! loss cannot take those bytes again. Files the journal does not mention (sled's metadata
//! store, anything written outside the storage crate) are not touched.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

pub const JOURNAL_FILE: &str = "storage-faults.journal";

/// What the journal last said about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    Durable(u64),
    Atomic,
    Removed,
}

/// The last state of every path in a journal; malformed lines are ignored (a journal line cut
/// by the kill is the only way to get one, and it described a call that never returned).
pub fn parse_journal(text: &str) -> BTreeMap<PathBuf, FileState> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((kind, rest)) = line.split_once(' ') else {
            continue;
        };
        let (state, path) = match kind {
            "durable" => {
                let Some((len, path)) = rest.split_once(' ') else {
                    continue;
                };
                let Ok(len) = len.parse() else { continue };
                (FileState::Durable(len), path)
            }
            "atomic" => (FileState::Atomic, rest),
            "removed" => (FileState::Removed, rest),
            _ => continue,
        };
        if !path.is_empty() {
            out.insert(PathBuf::from(path), state);
        }
    }
    out
}

/// What one power loss did to one node's files.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LossStats {
    /// Files the journal covers that exist.
    pub files: usize,
    /// Files that had unsynced bytes.
    pub unsynced_files: usize,
    /// Of those, partition-log segments (`.log`): the ones recovery has to cut. Most unsynced
    /// files are index files, which are never fsynced and are rebuilt from the segments.
    pub unsynced_segments: usize,
    /// Of those: tail dropped whole / torn (prefix kept) / garbled (prefix kept, bytes overwritten).
    pub cut: usize,
    pub torn: usize,
    pub garbled: usize,
    /// Re-created files whose creation was not durable, deleted.
    pub removed: usize,
    pub bytes_dropped: u64,
    pub bytes_garbled: u64,
}

impl LossStats {
    pub fn add(&mut self, o: &LossStats) {
        self.files += o.files;
        self.unsynced_files += o.unsynced_files;
        self.unsynced_segments += o.unsynced_segments;
        self.cut += o.cut;
        self.torn += o.torn;
        self.garbled += o.garbled;
        self.removed += o.removed;
        self.bytes_dropped += o.bytes_dropped;
        self.bytes_garbled += o.bytes_garbled;
    }

    pub fn summary(&self) -> String {
        format!(
            "{} files covered, {} with unsynced bytes ({} segments): {} cut, {} torn, {} garbled ({} bytes dropped, {} overwritten), {} undurable creations deleted",
            self.files,
            self.unsynced_files,
            self.unsynced_segments,
            self.cut,
            self.torn,
            self.garbled,
            self.bytes_dropped,
            self.bytes_garbled,
            self.removed
        )
    }
}

/// Simulates a power loss on `data_dir` (the node must be dead). Errors if there is no journal
/// (a node not started with `SLUICE_STORAGE_FAULTS=1`, or a binary without the fault layer).
pub fn apply(data_dir: &Path, rng: &mut StdRng) -> Result<LossStats> {
    let journal_path = data_dir.join(JOURNAL_FILE);
    let text = std::fs::read_to_string(&journal_path).with_context(|| {
        format!(
            "reading {} (was the node started with SLUICE_STORAGE_FAULTS=1?)",
            journal_path.display()
        )
    })?;
    let mut stats = LossStats::default();
    let mut survivors = Vec::new();
    for (path, state) in parse_journal(&text) {
        // Only this node's own files, whatever a journal line says.
        if !path.starts_with(data_dir) || path == journal_path {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // gone: deleted by the node, nothing to lose
        };
        stats.files += 1;
        match state {
            FileState::Atomic => {}
            FileState::Removed => {
                std::fs::remove_file(&path)
                    .with_context(|| format!("deleting {}", path.display()))?;
                stats.removed += 1;
            }
            FileState::Durable(durable) => {
                let len = meta.len();
                if len > durable {
                    lose_tail(&path, durable, len, rng, &mut stats)?;
                }
                survivors.push(path);
            }
        }
    }
    // What is left is on the medium now: a later power loss must not take it again.
    let mut lines = String::new();
    for p in survivors {
        if let Ok(m) = std::fs::metadata(&p) {
            lines.push_str(&format!("durable {} {}\n", m.len(), p.display()));
        }
    }
    lines.push_str("# power loss simulated by cluster-tests\n");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&journal_path)
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .with_context(|| format!("appending to {}", journal_path.display()))?;
    Ok(stats)
}

/// Drops, tears or garbles the bytes of `path` past `durable` (the file is `len` long).
fn lose_tail(
    path: &Path,
    durable: u64,
    len: u64,
    rng: &mut StdRng,
    stats: &mut LossStats,
) -> Result<()> {
    let unsynced = len - durable;
    stats.unsynced_files += 1;
    if path.extension().is_some_and(|e| e == "log") {
        stats.unsynced_segments += 1;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let roll = rng.gen_range(0..4);
    let keep = match roll {
        // Half the time the whole tail is gone.
        0 | 1 => {
            stats.cut += 1;
            0
        }
        // A prefix of the tail made it to the medium, the rest did not.
        2 => {
            stats.torn += 1;
            rng.gen_range(0..unsynced)
        }
        // A prefix made it, part of it as garbage (a sector written half-way, stale blocks).
        _ => {
            stats.garbled += 1;
            rng.gen_range(1..=unsynced)
        }
    };
    if roll == 3 {
        let a = rng.gen_range(0..keep);
        let b = rng.gen_range(a + 1..=keep);
        let junk: Vec<u8> = (0..b - a).map(|_| rng.gen()).collect();
        f.write_all_at(&junk, durable + a)
            .with_context(|| format!("garbling {}", path.display()))?;
        stats.bytes_garbled += b - a;
    }
    f.set_len(durable + keep)
        .with_context(|| format!("truncating {}", path.display()))?;
    stats.bytes_dropped += unsynced - keep;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn journal_last_line_per_path_wins_and_bad_lines_are_skipped() {
        let j = "# start pid 1\n\
                 durable 0 /d/a.log\n\
                 durable 100 /d/a.log\n\
                 atomic /d/raft state.json\n\
                 durable x /d/bad\n\
                 removed /d/b.log\n\
                 durable 7 /d/c.log\n\
                 removed /d/c.log\n\
                 durable 12";
        let m = parse_journal(j);
        assert_eq!(m[Path::new("/d/a.log")], FileState::Durable(100));
        assert_eq!(m[Path::new("/d/raft state.json")], FileState::Atomic);
        assert_eq!(m[Path::new("/d/b.log")], FileState::Removed);
        assert_eq!(m[Path::new("/d/c.log")], FileState::Removed);
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn only_unsynced_bytes_are_lost_and_survivors_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let synced: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        let tail = vec![0xAB; 300];
        let write = |name: &str, bytes: &[u8]| std::fs::write(d.join(name), bytes).unwrap();
        let mut full = synced.clone();
        full.extend_from_slice(&tail);
        write("seg.log", &full);
        write("clean.log", &synced);
        write("state.json", b"{\"vote\":1}");
        write("again.log", b"recreated");
        write("other.bin", b"not covered");
        let j = format!(
            "durable 200 {p}/seg.log\ndurable 200 {p}/clean.log\natomic {p}/state.json\nremoved {p}/again.log\ndurable 0 /elsewhere/x.log\n",
            p = d.display()
        );
        write(JOURNAL_FILE, j.as_bytes());

        // Every mode occurs over enough seeds; each must keep the durable prefix intact.
        let mut modes = LossStats::default();
        for seed in 0..40 {
            write("seg.log", &full);
            write("again.log", b"recreated");
            write(JOURNAL_FILE, j.as_bytes());
            let mut rng = StdRng::seed_from_u64(seed);
            let s = apply(d, &mut rng).unwrap();
            modes.add(&s);
            let seg = std::fs::read(d.join("seg.log")).unwrap();
            assert!(seg.len() >= 200 && seg.len() <= 500, "seed {seed}");
            assert_eq!(
                &seg[..200],
                &synced[..],
                "seed {seed}: durable bytes changed"
            );
            assert_eq!(s.unsynced_files, 1, "seed {seed}: {s:?}");
            assert_eq!(s.bytes_dropped, 500 - seg.len() as u64);
            assert_eq!(std::fs::read(d.join("clean.log")).unwrap(), synced);
            assert_eq!(
                std::fs::read(d.join("state.json")).unwrap(),
                b"{\"vote\":1}"
            );
            assert!(!d.join("again.log").exists(), "undurable creation kept");
            assert_eq!(std::fs::read(d.join("other.bin")).unwrap(), b"not covered");
            // The survivors are durable now: a second power loss takes nothing more.
            let journal = std::fs::read_to_string(d.join(JOURNAL_FILE)).unwrap();
            let state = parse_journal(&journal);
            assert_eq!(
                state[&d.join("seg.log")],
                FileState::Durable(seg.len() as u64)
            );
            let again = apply(d, &mut rng).unwrap();
            assert_eq!(again.unsynced_files, 0);
            assert_eq!(std::fs::read(d.join("seg.log")).unwrap(), seg);
        }
        assert!(
            modes.cut > 0 && modes.torn > 0 && modes.garbled > 0,
            "{modes:?}"
        );
        assert!(modes.bytes_garbled > 0);
    }

    #[test]
    fn a_missing_journal_is_an_error_naming_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let err = apply(dir.path(), &mut StdRng::seed_from_u64(1)).unwrap_err();
        assert!(format!("{err:#}").contains("SLUICE_STORAGE_FAULTS=1"));
    }
}
