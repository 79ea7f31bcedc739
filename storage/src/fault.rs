//! Storage fault layer for chaos tests: a durability journal and injected I/O errors.
//!
//! Compiled into every build and inert unless the process is started with
//! `SLUICE_STORAGE_FAULTS=1` (see [`install_from_env`]). Inert means one atomic load per write or
//! fsync call site and nothing else: no extra syscalls, no journal.
//!
//! When enabled, it does two things for the files this crate writes (partition-log segments,
//! their sidecars and indexes, `log-start`, and everything written with
//! [`crate::file::write_atomic`]: Raft state and snapshot files, `meta.properties`):
//!
//! - **Journal.** After each successful fsync it appends one line to `storage-faults.journal` in
//!   the data directory, saying how many bytes of which file are now durable. The journal is
//!   written with plain `write(2)` and never fsynced: `kill -9` keeps the page cache, so the
//!   harness can read it after killing the process and then simulate the power loss itself by
//!   cutting or tearing everything past the durable length. Lines (path last, so it may hold
//!   spaces):
//!   - `durable LEN PATH`: the first LEN bytes of PATH survive a power loss; anything after them
//!     may vanish or be torn. LEN 0 also marks files that are never fsynced at all (indexes).
//!   - `atomic PATH`: PATH was replaced by `write_atomic` (tmp + fsync + rename + dir fsync): after
//!     a crash it is whole, old or new, so a power loss leaves it alone.
//!   - `removed PATH`: PATH was deleted; if it exists again with no later line, it was re-created
//!     and its directory entry is not durable yet, so a power loss may delete it.
//!   - lines starting with `#` are comments (one per process start).
//! - **Injected errors.** [`FaultLayer::set_rules`] makes matching writes and/or fsyncs fail with
//!   EIO or ENOSPC (before touching the file) until the rules are cleared. The admin endpoint
//!   `POST /v1/debug/storage-faults` drives it. Errors surface as [`crate::StorageError::Io`]
//!   naming the file, exactly as a real failure would.
//!
//! Limits (also in cluster-tests/README.md): directory entries are modelled only as far as the
//! lines above say (a removal counts as durable at once; a rename as durable once the renamed
//! file's content is fsynced); sled, which holds the metadata Raft group, is not covered.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::{IoContext, StorageError};

/// The environment variable that enables the layer at process start (`1`, `true` or `yes`).
pub const ENV: &str = "SLUICE_STORAGE_FAULTS";
/// The journal's file name inside the data directory.
pub const JOURNAL_FILE: &str = "storage-faults.journal";

// Linux errno values; the layer only exists for chaos runs on Linux.
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// Which calls a rule fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultOp {
    Write,
    Fsync,
    /// Writes and fsyncs.
    Any,
}

/// The error a rule returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultErrno {
    Eio,
    Enospc,
}

impl FaultErrno {
    fn io_error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            FaultErrno::Eio => EIO,
            FaultErrno::Enospc => ENOSPC,
        })
    }
}

/// One injected fault: every matching call fails while the rule is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub op: FaultOp,
    pub error: FaultErrno,
    /// Only paths containing this string (e.g. `/partitions/`); all paths when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_contains: Option<String>,
}

impl FaultRule {
    fn matches(&self, op: FaultOp, path: &Path) -> bool {
        let op_ok = self.op == FaultOp::Any || self.op == op;
        op_ok
            && self
                .path_contains
                .as_deref()
                .is_none_or(|s| path.to_string_lossy().contains(s))
    }
}

/// What the layer is doing, for the admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct FaultStatus {
    pub journal: PathBuf,
    pub rules: Vec<FaultRule>,
    /// Calls failed on purpose since the process started.
    pub injected_writes: u64,
    pub injected_fsyncs: u64,
    /// Journal lines written since the process started.
    pub journal_records: u64,
}

#[derive(Debug)]
pub struct FaultLayer {
    journal_path: PathBuf,
    journal: Mutex<File>,
    /// Fast check for "any rule set", so fault-free calls skip the rules' lock.
    armed: AtomicBool,
    rules: Mutex<Vec<FaultRule>>,
    injected_writes: AtomicU64,
    injected_fsyncs: AtomicU64,
    records: AtomicU64,
    /// Set after the first failed journal write, so the error is logged once.
    journal_failed: AtomicBool,
}

static LAYER: OnceLock<FaultLayer> = OnceLock::new();

/// The installed layer, if any. This is the only cost on the I/O paths when faults are off.
#[inline]
pub fn layer() -> Option<&'static FaultLayer> {
    LAYER.get()
}

/// Installs the layer with its journal in `data_dir` if `SLUICE_STORAGE_FAULTS` says so. Call
/// once at process start, before any storage is opened. Returns whether the layer is on.
pub fn install_from_env(data_dir: &Path) -> Result<bool, StorageError> {
    let on = std::env::var(ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
    if !on {
        return Ok(false);
    }
    let journal = data_dir.join(JOURNAL_FILE);
    let l = install(&journal)?;
    tracing::warn!(
        journal = %l.journal_path.display(),
        "storage fault layer enabled ({ENV}): fsyncs are journaled and I/O errors can be injected"
    );
    Ok(true)
}

/// Installs the layer with its journal at `journal` (appending to it). Idempotent: a second call
/// returns the layer already installed, whatever its journal.
pub fn install(journal: &Path) -> Result<&'static FaultLayer, StorageError> {
    if let Some(l) = LAYER.get() {
        return Ok(l);
    }
    if let Some(dir) = journal.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).ctx(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)
        .ctx(journal)?;
    let candidate = FaultLayer {
        journal_path: journal.to_path_buf(),
        journal: Mutex::new(file),
        armed: AtomicBool::new(false),
        rules: Mutex::new(Vec::new()),
        injected_writes: AtomicU64::new(0),
        injected_fsyncs: AtomicU64::new(0),
        records: AtomicU64::new(0),
        journal_failed: AtomicBool::new(false),
    };
    // Another thread may have won the race; either way one layer is installed.
    let _ = LAYER.set(candidate);
    let l = LAYER
        .get()
        .ok_or_else(|| StorageError::InvalidArgument("fault layer not installed".into()))?;
    l.append(&format!("# start pid {}", std::process::id()));
    Ok(l)
}

impl FaultLayer {
    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    /// Replaces every rule; an empty list heals.
    pub fn set_rules(&self, rules: Vec<FaultRule>) {
        let mut g = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        self.armed.store(!rules.is_empty(), Ordering::SeqCst);
        if rules.is_empty() {
            tracing::warn!("storage faults cleared");
        } else {
            tracing::warn!(?rules, "storage faults set");
        }
        *g = rules;
    }

    pub fn status(&self) -> FaultStatus {
        FaultStatus {
            journal: self.journal_path.clone(),
            rules: self.rules.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            injected_writes: self.injected_writes.load(Ordering::Relaxed),
            injected_fsyncs: self.injected_fsyncs.load(Ordering::Relaxed),
            journal_records: self.records.load(Ordering::Relaxed),
        }
    }

    /// The error a matching rule prescribes for `op` on `path`, counted as injected.
    fn inject(&self, op: FaultOp, path: &Path) -> io::Result<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let errno = {
            let g = self.rules.lock().unwrap_or_else(|e| e.into_inner());
            g.iter().find(|r| r.matches(op, path)).map(|r| r.error)
        };
        let Some(errno) = errno else {
            return Ok(());
        };
        match op {
            FaultOp::Fsync => self.injected_fsyncs.fetch_add(1, Ordering::Relaxed),
            _ => self.injected_writes.fetch_add(1, Ordering::Relaxed),
        };
        tracing::debug!(file = %path.display(), ?op, ?errno, "injecting storage fault");
        Err(errno.io_error())
    }

    fn append(&self, line: &str) {
        let mut rec = String::with_capacity(line.len() + 1);
        rec.push_str(line);
        rec.push('\n');
        let res = {
            let mut f = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            // One write(2) per line, no userspace buffer: a SIGKILL must not lose a line that
            // was written before the call it describes returned.
            f.write_all(rec.as_bytes())
        };
        match res {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.journal_failed.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        journal = %self.journal_path.display(),
                        "cannot write the storage fault journal; power-loss simulation will be wrong: {e}"
                    );
                }
            }
        }
    }

    fn record_durable(&self, path: &Path, len: u64) {
        self.append(&format!("durable {len} {}", path.display()));
    }
}

// ---------- call sites (this crate's writes and syncs go through these) ----------

/// `file.write_all_at`, failing first if a write fault is set for `path`.
pub(crate) fn write_all_at(file: &File, buf: &[u8], pos: u64, path: &Path) -> io::Result<()> {
    if let Some(l) = layer() {
        l.inject(FaultOp::Write, path)?;
    }
    file.write_all_at(buf, pos)
}

/// `file.write_all` (for a freshly created file), failing first on a write fault.
pub(crate) fn write_all(file: &mut File, buf: &[u8], path: &Path) -> io::Result<()> {
    if let Some(l) = layer() {
        l.inject(FaultOp::Write, path)?;
    }
    file.write_all(buf)
}

/// Replaces a file that is never fsynced (a derived index): nothing of it is durable.
pub(crate) fn write_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(l) = layer() {
        l.inject(FaultOp::Write, path)?;
    }
    std::fs::write(path, bytes)?;
    if let Some(l) = layer() {
        l.record_durable(path, 0);
    }
    Ok(())
}

/// Notes a file opened for writes that are never fsynced (a derived index).
pub(crate) fn opened_unsynced(path: &Path) {
    if let Some(l) = layer() {
        l.record_durable(path, 0);
    }
}

/// fdatasync; journals the length the file had when the sync began.
pub(crate) fn sync_data(file: &File, path: &Path) -> io::Result<()> {
    sync(file, path, false)
}

/// fsync; journals the length the file had when the sync began.
pub(crate) fn sync_all(file: &File, path: &Path) -> io::Result<()> {
    sync(file, path, true)
}

/// fsync of a temporary file about to be renamed: faults apply, but the journal line is the
/// rename's ([`replaced_atomically`]), since the temporary name never matters after a crash.
pub(crate) fn sync_all_tmp(file: &File, path: &Path) -> io::Result<()> {
    if let Some(l) = layer() {
        l.inject(FaultOp::Fsync, path)?;
    }
    file.sync_all()
}

fn sync(file: &File, path: &Path, all: bool) -> io::Result<()> {
    let Some(l) = layer() else {
        return if all {
            file.sync_all()
        } else {
            file.sync_data()
        };
    };
    // Taken before the sync: bytes appended while it runs are not known to be covered.
    let len = file.metadata()?.len();
    l.inject(FaultOp::Fsync, path)?;
    if all {
        file.sync_all()?;
    } else {
        file.sync_data()?;
    }
    l.record_durable(path, len);
    Ok(())
}

/// fsync of a directory (no journal line: directory entries are modelled by the callers' lines).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    if let Some(l) = layer() {
        l.inject(FaultOp::Fsync, dir)?;
    }
    File::open(dir)?.sync_all()
}

/// A file created empty whose directory entry has just been fsynced: its 0 bytes are durable.
pub(crate) fn created_durable(path: &Path) {
    if let Some(l) = layer() {
        l.record_durable(path, 0);
    }
}

/// `path` is about to be atomically replaced by a fully fsynced file.
pub(crate) fn replaced_atomically(path: &Path) {
    if let Some(l) = layer() {
        l.append(&format!("atomic {}", path.display()));
    }
}

/// `path` was deleted.
pub(crate) fn removed(path: &Path) {
    if let Some(l) = layer() {
        l.append(&format!("removed {}", path.display()));
    }
}

/// Whether deliberately broken behaviour `name` is on (`SLUICE_CHAOS_BUG=name[,name...]`);
/// only in builds with the `chaos-bugs` feature, which the chaos harness uses to prove it can
/// catch a durability bug.
#[cfg(feature = "chaos-bugs")]
pub fn chaos_bug(name: &str) -> bool {
    static BUGS: OnceLock<Vec<String>> = OnceLock::new();
    let bugs = BUGS.get_or_init(|| {
        let v: Vec<String> = std::env::var("SLUICE_CHAOS_BUG")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if !v.is_empty() {
            tracing::warn!(bugs = ?v, "DELIBERATELY BROKEN BUILD: chaos bugs enabled");
        }
        v
    });
    bugs.iter().any(|b| b == name)
}

#[cfg(test)]
#[path = "fault_tests.rs"]
mod tests;
