//! The error type callers of this crate see; openraft's error zoo is folded into it here so that
//! the broker can map each case to one Kafka error code.

use openraft::error::{ClientWriteError, Fatal, RaftError as OpenraftError};

use crate::{Node, NodeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// This node does not lead the group; `leader` is the one it knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("timed out")]
    Timeout,
    /// The group (or the whole host) is shutting down or has stopped.
    #[error("shut down")]
    Shutdown,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("{0}")]
    Other(String),
}

impl From<Fatal<NodeId>> for RaftError {
    fn from(e: Fatal<NodeId>) -> Self {
        match e {
            Fatal::StorageError(s) => RaftError::Storage(s.to_string()),
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

impl From<sluice_storage::StorageError> for RaftError {
    fn from(e: sluice_storage::StorageError) -> Self {
        RaftError::Storage(e.to_string())
    }
}
