//! openraft wiring for Sluice. This crate knows nothing of topics; it owns:
//! - the one [`TypeConfig`] shared by every Raft group (`D`/`R` are opaque bytes);
//! - the metadata group's log store and state machine over the sled-backed
//!   [`sluice_storage::MetaStore`], delegating application state to the node's [`MetaApp`];
//! - the partition groups' log store over [`sluice_storage::PartitionLog`] (the partition log IS
//!   the Raft log: one stored Kafka batch per Raft entry) and their state machine, which runs
//!   the partition's named machines ([`PartitionStm`]): the high watermark and whatever the
//!   broker registers;
//! - [`RaftHost`], the registry of all groups in one process, and the node-to-node transport that
//!   multiplexes every group's RPCs over ONE TCP connection per peer node.
//!
//! Only this crate names openraft types in public signatures; callers see [`RaftHost`],
//! [`MetaGroup`], [`PartitionGroup`] and plain data.

// openraft's storage traits fix `openraft::StorageError` (200+ bytes) as the error type, and the
// helpers feeding them return it too; boxing it at every boundary would only add conversions.
#![allow(clippy::result_large_err)]

mod codec;
mod config;
mod error;
mod group;
mod group_id;
mod host;
mod liveness;
mod membership;
mod meta_store;
mod partition_store;
mod peer_input;
mod ping;
mod registry;
mod stm;
mod supervisor;
pub mod tls;
mod transport;

use std::io::Cursor;

pub use config::RaftHostConfig;
pub use error::{RaftError, StorageFailure};
pub use group::{
    Acks, Committed, GroupStatus, MetaGroup, PartitionChanges, PartitionGroup, RetentionOutcome,
};
pub use group_id::GroupId;
pub use host::RaftHost;
pub use sluice_storage::LogConfig;
pub use stm::{
    CommittedBatch, HighWatermark, PartitionStm, PartitionStmFactory, ProposedBatch, StmError,
    HIGH_WATERMARK,
};

/// The id of the metadata group, which every node belongs to.
pub const META_GROUP: &str = "meta";

openraft::declare_raft_types!(
    /// One type config for all groups: the metadata group and the partition groups differ only in
    /// what their opaque byte payloads mean.
    pub TypeConfig:
        D = bytes::Bytes,
        R = bytes::Bytes,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A boxed, sendable future (what [`AppHandler::handle`] returns; no async-trait needed).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The node's handler of application requests sent with [`RaftHost::call_app`] over the raft
/// transport's connection (forwarded metadata proposals, broker heartbeats, election requests).
pub trait AppHandler: Send + Sync + 'static {
    /// Handles one request from node `from`; an `Err` reaches the caller as
    /// [`RaftError::Other`] carrying the message.
    fn handle(
        &self,
        from: u64,
        payload: bytes::Bytes,
    ) -> BoxFuture<'static, Result<bytes::Bytes, String>>;
}

/// The state machine the node implements for the metadata group.
///
/// It must be deterministic (no clock, no I/O): every replica applies the same commands in the
/// same order and must reach the same state; the proposer stamps times into commands.
pub trait MetaApp: Send + Sync + 'static {
    /// Applies one committed command at Raft log `index` and returns the reply for the proposer.
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8>;
    /// Serializes the whole application state (called when openraft builds a snapshot).
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the whole application state with a snapshot made by [`MetaApp::snapshot`].
    fn restore(&self, snapshot: &[u8]) -> Result<(), String>;
}

pub(crate) type NodeId = u64;
pub(crate) type Node = openraft::BasicNode;
pub(crate) type Entry = openraft::Entry<TypeConfig>;
pub(crate) type LogId = openraft::LogId<NodeId>;
pub(crate) type Vote = openraft::Vote<NodeId>;
pub(crate) type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub(crate) type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub(crate) type StorageError = openraft::StorageError<NodeId>;
pub(crate) type Raft = openraft::Raft<TypeConfig>;

/// Builds a log id from the parts stored on disk; with `single-term-leader` the leader id is the
/// term alone, which is what lets a Kafka partitionLeaderEpoch carry it.
pub(crate) fn log_id(term: u64, index: u64) -> LogId {
    openraft::LogId::new(openraft::CommittedLeaderId::new(term, 0), index)
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod host_tests;
