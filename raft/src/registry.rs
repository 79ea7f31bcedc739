//! The routing table of one process's Raft groups: the transport server finds a group's core
//! here, and the supervisor and the ping answer read what they need of each group (its last log
//! id, whether it may vote) without knowing the group handles.
//!
//! It sits below the transport, the liveness pings and the host so that none of them has to
//! import another just to look a group up.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::{AppHandler, GroupId, Raft};

/// The groups of this process, by id; the transport server routes incoming RPCs through it.
#[derive(Default)]
pub(crate) struct Registry {
    groups: RwLock<HashMap<GroupId, Raft>>,
    /// The node's handler of [`RpcKind::App`] requests; until it is set they get an error reply.
    app: RwLock<Option<Arc<dyn AppHandler>>>,
    /// This process's boot id for ping answers, drawn on first use.
    boot: std::sync::OnceLock<u64>,
    /// The partition groups' stores, for their last log id in ping answers.
    stores: RwLock<HashMap<GroupId, Arc<crate::partition_store::PartitionShared>>>,
    /// Partition groups this node's supervisor wants an election for (its leader is gone or
    /// silent); ping answers carry their last log ids.
    stalled: RwLock<std::collections::HashSet<GroupId>>,
    /// How far each group's incoming chunked snapshot has come (see [`SnapshotChunks`]).
    snapshot_chunks: std::sync::Mutex<crate::peer_input::SnapshotChunks>,
    /// Bumped whenever a group is added or removed, or a group's server state changes (state,
    /// leader, vote, membership: openraft's server metrics, watched per group by the host). Loops
    /// that scan every group compare it with the value of their last pass and skip the scan
    /// when nothing can have changed: idle groups then cost nothing per round.
    changes: std::sync::atomic::AtomicU64,
    /// The last ping answer and the [`Registry::changes`] value it was built at (see
    /// [`crate::ping::answer`]).
    ping_answer: std::sync::Mutex<Option<(u64, bytes::Bytes)>>,
}

impl Registry {
    pub(crate) fn boot(&self) -> u64 {
        *self.boot.get_or_init(rand::random)
    }

    pub(crate) fn set_app(&self, handler: Arc<dyn AppHandler>) {
        if let Ok(mut a) = self.app.write() {
            *a = Some(handler);
        }
    }

    pub(crate) fn app(&self) -> Option<Arc<dyn AppHandler>> {
        self.app.read().ok()?.clone()
    }

    /// Refuses a snapshot chunk that would make the receiver allocate past what it was sent.
    pub(crate) fn check_snapshot_chunk(
        &self,
        group: &str,
        req: &openraft::raft::InstallSnapshotRequest<crate::TypeConfig>,
    ) -> Result<(), String> {
        match self.snapshot_chunks.lock() {
            Ok(chunks) => chunks.admit(group, req),
            Err(_) => Err("snapshot chunk table lock poisoned".into()),
        }
    }

    /// Notes a chunk openraft accepted.
    pub(crate) fn record_snapshot_chunk(&self, group: &str, seen: &crate::peer_input::ChunkSeen) {
        if let Ok(mut chunks) = self.snapshot_chunks.lock() {
            chunks.record(group, seen);
        }
    }

    pub(crate) fn get(&self, group: &str) -> Option<Raft> {
        self.groups.read().ok()?.get(group).cloned()
    }

    pub(crate) fn insert(&self, group: GroupId, raft: Raft) {
        if let Ok(mut g) = self.groups.write() {
            g.insert(group, raft);
        }
        self.bump();
    }

    pub(crate) fn remove(&self, group: &str) -> Option<Raft> {
        if let Ok(mut st) = self.stores.write() {
            st.remove(group);
        }
        let removed = self.groups.write().ok()?.remove(group);
        self.bump();
        removed
    }

    /// Notes that some group's server state (or the set of groups) changed.
    pub(crate) fn bump(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// See [`Registry::changes`]. Read it before looking at the groups: a change after the read
    /// then shows up as a new value next time.
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The cached ping answer if it was built at `changes`.
    pub(crate) fn cached_ping_answer(&self, changes: u64) -> Option<bytes::Bytes> {
        let c = self.ping_answer.lock().ok()?;
        c.as_ref()
            .filter(|(at, _)| *at == changes)
            .map(|(_, b)| b.clone())
    }

    pub(crate) fn cache_ping_answer(&self, changes: u64, answer: Option<bytes::Bytes>) {
        if let Ok(mut c) = self.ping_answer.lock() {
            *c = answer.map(|a| (changes, a));
        }
    }

    pub(crate) fn insert_store(
        &self,
        group: GroupId,
        store: Arc<crate::partition_store::PartitionShared>,
    ) {
        if let Ok(mut st) = self.stores.write() {
            st.insert(group, store);
        }
    }

    pub(crate) fn set_stalled(&self, groups: std::collections::HashSet<GroupId>) {
        if let Ok(mut s) = self.stalled.write() {
            if *s != groups {
                *s = groups;
                // Ping answers carry the stalled groups' logs.
                self.bump();
            }
        }
    }

    pub(crate) fn is_stalled(&self, group: &str) -> bool {
        self.stalled.read().is_ok_and(|s| s.contains(group))
    }

    /// Whether the group's replica may vote and stand for election: false while it is getting
    /// back acknowledged entries it lost (see `PartitionShared::may_vote`).
    pub(crate) fn may_vote(&self, group: &str) -> bool {
        let store = self.stores.read().ok().and_then(|s| s.get(group).cloned());
        store.is_none_or(|s| s.may_vote())
    }

    /// The (term, index) of the group's last log entry; `None` when unknown or the log is busy.
    pub(crate) fn last_log_id(&self, group: &str) -> Option<(u64, u64)> {
        let store = self.stores.read().ok()?.get(group).cloned()?;
        store.last_log_id_if_idle()
    }

    pub(crate) fn all(&self) -> Vec<(GroupId, Raft)> {
        match self.groups.read() {
            Ok(g) => g.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }
}
