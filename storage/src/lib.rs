//! Durable storage for Sluice.
//!
//! This crate owns every byte Sluice keeps on disk:
//! - [`log`]: the segmented partition log, which doubles as the partition's Raft log (one stored
//!   Kafka RecordBatch v2 per Raft entry, plus sparse offset/time indexes and crash recovery);
//! - [`meta`]: the sled-backed log and state store of the metadata Raft group (the only user of sled);
//! - [`batch`]: RecordBatch v2 header helpers (parse, validate, patch, internal control batches);
//! - [`file`]: small crash-safe file helpers;
//! - [`fault`]: the storage fault layer for chaos tests (a durability journal and injected I/O
//!   errors), inert unless `SLUICE_STORAGE_FAULTS=1`.
//!
//! It knows nothing of tokio or openraft; callers share a [`PartitionLog`] behind a lock.

pub mod batch;
pub mod fault;
pub mod file;
/// The bounded proptest fuzz harness the workspace's fuzz targets share (tests only).
#[cfg(any(test, feature = "testing"))]
pub mod fuzzing;
pub mod log;
pub mod meta;

use std::io;
use std::path::{Path, PathBuf};

pub use batch::{BatchError, BatchHeader};
pub use log::{EntryKind, LogConfig, LogEntry, PartitionLog, PendingSync, RetentionPlan};
pub use meta::MetaStore;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sled error: {0}")]
    Sled(#[from] sled::Error),
    #[error("invalid record batch: {0}")]
    Batch(#[from] BatchError),
    #[error("offset {offset} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange {
        offset: i64,
        log_start: i64,
        log_end: i64,
    },
    /// A replicated batch was placed at another offset than where this log continues: the
    /// replicas' logs have diverged.
    #[error("log divergence at raft index {raft_index}: the batch was placed at offset {placed}, but this log continues at {local}")]
    OffsetMismatch {
        raft_index: u64,
        placed: i64,
        local: i64,
    },
    /// Recovery found a bad or missing batch at or below the point known to have been fsynced:
    /// acknowledged data was lost, which a torn tail cannot explain.
    #[error("{path} at byte {position}: {problem}, at raft index {raft_index}, which is at or below the durable point {durable}")]
    BelowDurable {
        path: PathBuf,
        position: u64,
        raft_index: u64,
        durable: u64,
        problem: String,
    },
    #[error("non-contiguous raft index: expected {expected}, got {got}")]
    NonContiguous { expected: u64, got: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("corrupt storage: {0}")]
    Corrupt(String),
}

/// Attaches the path to an I/O error, because a bare `io::Error` rarely says which file failed.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &Path) -> Result<T, StorageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &Path) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
