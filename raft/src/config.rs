//! Configuration of the host and of its groups: [`RaftHostConfig`], the openraft configs of the
//! metadata group and of the quiet partition groups, and the timing bounds the groups share.
//! Kept in one place because the values depend on each other (a partition's election timeout is
//! also the leader lease; its heartbeat interval is only an RPC timeout).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};
use rand::Rng;

use crate::{RaftError, META_GROUP};

/// How long a proposal may wait for commit. On expiry the outcome is unknown (the entry may still
/// commit), which is what [`RaftError::Timeout`] tells the caller.
pub(crate) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a membership change waits for a new member (added as a learner first) to catch up
/// with the leader's log before it is made a voter.
pub(crate) const LEARNER_CATCHUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How far behind a new partition replica may be when appends pause for its last catch-up
/// before it becomes a voter: one or two AppendEntries.
pub(crate) const PROMOTE_SLACK_ENTRIES: u64 = 64;
/// The longest a partition pauses appends while its new replicas take the last entries.
pub(crate) const PROMOTE_PAUSE_MAX: Duration = Duration::from_secs(10);
/// AppendEntries carries at most this many entries; with Kafka's ~1 MiB batch limit it keeps a
/// frame well under the transport's frame limit.
pub(crate) const PARTITION_MAX_PAYLOAD_ENTRIES: u64 = 32;
/// How long [`PartitionGroup::apply_retention`] waits for openraft's snapshot and for its purge.
pub(crate) const RETENTION_WAIT: Duration = Duration::from_secs(10);
/// How long a voter of a new group waits for its live first replica to initialize the group
/// before it initializes the group itself.
pub(crate) const LATE_INIT_PATIENCE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct RaftHostConfig {
    pub node_id: u64,
    /// Address the transport listens on and peers dial (`host:port`).
    pub raft_addr: String,
    /// The metadata group's store lives in `data_dir/meta`.
    pub data_dir: PathBuf,
    /// Node id -> raft address, including this node; a single node is `{self}`.
    pub peers: BTreeMap<u64, String>,
    /// Mutual TLS on the node-to-node port; `None` is plaintext.
    pub tls: Option<crate::tls::PeerTls>,
}

pub(crate) fn meta_config() -> Result<Arc<Config>, RaftError> {
    let c = Config {
        cluster_name: META_GROUP.to_string(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate().map_err(|e| RaftError::Other(e.to_string()))?,
    ))
}

/// Partitions are many and mostly idle, so they are quiet groups (DESIGN.md 4a): openraft's
/// heartbeats and election timer are off, and the group supervisor ([`crate::supervisor`]) drives
/// elections and re-announcements from one node-to-node ping ([`crate::liveness`]). openraft
/// still sends the commit index to followers whenever it advances.
pub(crate) fn partition_config(group: &str) -> Result<Arc<Config>, RaftError> {
    let c = Config {
        cluster_name: group.to_string(),
        // Without heartbeats this is only the AppendEntries RPC timeout. It must exceed a slow
        // link's round trip: at 300 ms, a 200 ms delay each way stopped every commit.
        heartbeat_interval: 1000,
        // The supervisor's patience before electing in a leaderless group, and openraft's leader
        // lease: a voter refuses votes this long after the leader's last append reached it.
        election_timeout_min: 1100,
        election_timeout_max: 2000,
        enable_heartbeat: false,
        enable_elect: false,
        // No openraft tick either: it woke every idle group's core every 1.5 x heartbeat_interval
        // (667 wakeups a second per 1,000 replicas, each rebuilding and publishing the group's
        // metrics and waking their watchers), and for a quiet group a tick does nothing else.
        // In openraft 0.9.25 (vendor/openraft/src/core/raft_core.rs, `Notify::Tick`) a tick
        // (1) checks the election timer, which returns at once with `enable_elect` off;
        // (2) sends a heartbeat if due, which it skips with `enable_heartbeat` off;
        // (3) steps a leader down once a membership without it is committed. Leases need no
        // tick: a voter's lease runs from the vote's last change (an append from the leader
        // renews it), and a leader's quorum-ack time comes from replication answers. For (3)
        // the supervisor switches the tick on for exactly such a leader ([`crate::supervisor`]).
        enable_tick: false,
        max_payload_entries: PARTITION_MAX_PAYLOAD_ENTRIES,
        // Snapshots are cut at retention's purge point only (see partition_store): one cut
        // later would make a follower that installs it skip records the leader retains. A
        // restart starts from the applied checkpoint in the state file instead.
        snapshot_policy: SnapshotPolicy::Never,
        // A partition snapshot holds no records, so purging the log behind it would delete
        // Kafka data: retention decides what goes, never openraft.
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate().map_err(|e| RaftError::Other(e.to_string()))?,
    ))
}

/// A uniformly random duration in `[min_ms, max_ms]`.
pub(crate) fn random_timeout(min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(min_ms..=max_ms.max(min_ms)))
}
