//! The error type callers of this crate see; openraft's error zoo is folded into it here so that
//! the broker can map each case to one Kafka error code by its variant, never by its text.

use std::sync::Arc;

use openraft::error::{ClientWriteError, Fatal, RaftError as OpenraftError};
use sluice_storage::batch::BatchError;

use crate::stm::StmError;
use crate::{GroupId, Node, NodeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// This node does not lead the group; `leader` is the one it knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// No answer in time; the outcome is unknown (a proposal may still commit).
    #[error("timed out")]
    Timeout,
    /// The group (or the whole host) is shutting down or has stopped.
    #[error("shut down")]
    Shutdown,
    /// Reading or writing this node's storage failed.
    #[error("storage error: {0}")]
    Storage(#[source] StorageFailure),
    /// A read asked for an offset outside the log (below its start or past its end).
    #[error("offset {offset} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange {
        offset: i64,
        log_start: i64,
        log_end: i64,
    },
    /// An appended record batch failed validation; nothing was proposed.
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[source] BatchError),
    /// An appended batch uses the producer id reserved for Raft-internal entries.
    #[error("record batch uses the producer id reserved for Raft-internal entries")]
    ReservedProducerId,
    /// A partition state machine refused an appended batch; nothing was proposed.
    #[error(transparent)]
    Refused(StmError),
    /// The group is not open on this node.
    #[error("group {0} is not open on this node")]
    GroupNotFound(GroupId),
    #[error("{0}")]
    Other(String),
}

/// A storage failure with its source kept: the storage crate's error when the failure came from
/// there ([`StorageFailure::storage_error`]), else openraft's account of it (which keeps only
/// the text of what the log store reported). Shared, so that [`RaftError`] stays `Clone`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct StorageFailure(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl StorageFailure {
    /// The storage crate's error, if that is where the failure came from.
    pub fn storage_error(&self) -> Option<&sluice_storage::StorageError> {
        self.0.downcast_ref()
    }
}

/// Two failures are equal when they say the same (for tests and `assert_eq!` on results).
impl PartialEq for StorageFailure {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for StorageFailure {}

impl From<sluice_storage::StorageError> for StorageFailure {
    fn from(e: sluice_storage::StorageError) -> Self {
        StorageFailure(Arc::new(e))
    }
}

impl From<crate::StorageError> for StorageFailure {
    fn from(e: crate::StorageError) -> Self {
        StorageFailure(Arc::new(e))
    }
}

impl RaftError {
    /// An I/O failure on `path` outside the log itself (a group's directory).
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        RaftError::Storage(
            sluice_storage::StorageError::Io {
                path: path.to_path_buf(),
                source,
            }
            .into(),
        )
    }
}

impl From<Fatal<NodeId>> for RaftError {
    fn from(e: Fatal<NodeId>) -> Self {
        match e {
            Fatal::StorageError(s) => s.into(),
            Fatal::Panicked => RaftError::Other("raft core panicked".to_string()),
            Fatal::Stopped => RaftError::Shutdown,
        }
    }
}

impl From<OpenraftError<NodeId, ClientWriteError<NodeId, Node>>> for RaftError {
    fn from(e: OpenraftError<NodeId, ClientWriteError<NodeId, Node>>) -> Self {
        match e {
            OpenraftError::APIError(ClientWriteError::ForwardToLeader(f)) => RaftError::NotLeader {
                leader: f.leader_id,
            },
            OpenraftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                RaftError::Other(c.to_string())
            }
            OpenraftError::Fatal(f) => f.into(),
        }
    }
}

/// The outcomes callers branch on get their own variants; the rest is a storage failure.
impl From<sluice_storage::StorageError> for RaftError {
    fn from(e: sluice_storage::StorageError) -> Self {
        match e {
            sluice_storage::StorageError::OffsetOutOfRange {
                offset,
                log_start,
                log_end,
            } => RaftError::OffsetOutOfRange {
                offset,
                log_start,
                log_end,
            },
            sluice_storage::StorageError::Batch(b) => RaftError::InvalidBatch(b),
            e => RaftError::Storage(e.into()),
        }
    }
}

impl From<crate::StorageError> for RaftError {
    fn from(e: crate::StorageError) -> Self {
        RaftError::Storage(e.into())
    }
}
