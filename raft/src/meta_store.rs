//! The metadata group's Raft log and state machine.
//!
//! The log lives in the sled-backed [`MetaStore`] (tree "log", one encoded entry per index); the
//! vote, the committed log id, the last purged log id and the latest snapshot live in its "state"
//! tree. The application state itself belongs to the node's [`MetaApp`]; this state machine only
//! feeds it committed commands and persists its snapshots, so that a restart restores the latest
//! snapshot and openraft re-applies the committed tail of the log on top.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    StorageIOError,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_storage::MetaStore;

use crate::codec::{decode_entry, encode_entry, Reader};
use crate::{
    Entry, LogId, MetaApp, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote,
};

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";
const KEY_SNAPSHOT: &str = "snapshot";

/// Runs sled work off the async runtime: sled flushes are fsyncs.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StorageIOError::write(&e).into()),
    }
}

/// Converts `a..b`-style bounds into `[start, end)` over u64 indexes.
pub(crate) fn index_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

fn get_json<T: DeserializeOwned>(store: &MetaStore, key: &str) -> Result<Option<T>, StorageError> {
    match store.get_state(key).map_err(|e| StorageIOError::read(&e))? {
        None => Ok(None),
        Some(v) => Ok(Some(
            serde_json::from_slice(&v).map_err(|e| StorageIOError::read(&e))?,
        )),
    }
}

fn put_json<T: Serialize>(store: &MetaStore, key: &str, value: &T) -> Result<(), StorageError> {
    let v = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
    store
        .put_state(key, &v)
        .map_err(|e| StorageIOError::write(&e))?;
    Ok(())
}

/// The metadata group's log store; cheap to clone (sled handles are shared), which is also what
/// its log reader is.
#[derive(Clone)]
pub(crate) struct MetaLogStore {
    store: MetaStore,
}

impl MetaLogStore {
    pub(crate) fn new(store: MetaStore) -> Self {
        MetaLogStore { store }
    }

    /// Whether this store has ever been part of a group: a vote or any log (even purged).
    pub(crate) fn has_state(&self) -> Result<bool, StorageError> {
        Ok(self
            .store
            .get_state(KEY_VOTE)
            .map_err(|e| StorageIOError::read(&e))?
            .is_some()
            || self
                .store
                .last()
                .map_err(|e| StorageIOError::read(&e))?
                .is_some()
            || self
                .store
                .get_state(KEY_PURGED)
                .map_err(|e| StorageIOError::read(&e))?
                .is_some())
    }
}

impl RaftLogReader<TypeConfig> for MetaLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = index_range(&range);
        let store = self.store.clone();
        blocking(move || {
            let rows = store
                .range(start, end)
                .map_err(|e| StorageIOError::read_logs(&e))?;
            rows.into_iter()
                .map(|(index, v)| {
                    let e = decode_entry(&Bytes::from(v))
                        .map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
                    Ok(e)
                })
                .collect()
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for MetaLogStore {
    type LogReader = MetaLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let store = self.store.clone();
        blocking(move || {
            let purged: Option<LogId> = get_json(&store, KEY_PURGED)?;
            let last = match store.last().map_err(|e| StorageIOError::read_logs(&e))? {
                Some((index, v)) => Some(
                    decode_entry(&Bytes::from(v))
                        .map_err(|e| StorageIOError::read_log_at_index(index, &e))?
                        .log_id,
                ),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last.or(purged),
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let store = self.store.clone();
        let vote = *vote;
        blocking(move || {
            put_json(&store, KEY_VOTE, &vote).map_err(|e| StorageIOError::write_vote(&e).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let store = self.store.clone();
        blocking(move || get_json(&store, KEY_VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let store = self.store.clone();
        blocking(move || put_json(&store, KEY_COMMITTED, &committed)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let store = self.store.clone();
        blocking(move || Ok(get_json::<Option<LogId>>(&store, KEY_COMMITTED)?.flatten())).await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let v =
                encode_entry(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            rows.push((e.log_id.index, v));
        }
        let store = self.store.clone();
        // Written and flushed before returning: entries must be readable on return, and the
        // callback promises they are on disk.
        let res = blocking(move || {
            store
                .append(&rows)
                .map_err(|e| StorageIOError::write_logs(&e))?;
            store.flush().map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let store = self.store.clone();
        blocking(move || {
            store
                .truncate_from(log_id.index)
                .map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let store = self.store.clone();
        blocking(move || {
            // The purge point is recorded first: after a crash in between, a few already-purged
            // entries may still be present, which is harmless; the reverse would lose the last
            // log id when every entry is gone.
            put_json(&store, KEY_PURGED, &log_id)?;
            store
                .purge_upto(log_id.index)
                .map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await
    }
}

/// The persisted form of a snapshot: u32-sized JSON meta, then the application's bytes.
fn encode_snapshot(meta: &SnapshotMeta, data: &[u8]) -> Result<Vec<u8>, StorageError> {
    let m = serde_json::to_vec(meta)
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
    let mut out = BytesMut::with_capacity(4 + m.len() + data.len());
    out.put_u32(m.len() as u32);
    out.put_slice(&m);
    out.put_slice(data);
    Ok(out.to_vec())
}

fn decode_snapshot(bytes: &[u8]) -> Result<(SnapshotMeta, Vec<u8>), StorageError> {
    let mut r = Reader::new(bytes);
    let meta_bytes = r
        .sized()
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
    let meta: SnapshotMeta =
        serde_json::from_slice(meta_bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
    Ok((meta, r.rest().to_vec()))
}

fn load_snapshot(store: &MetaStore) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
    match store
        .get_state(KEY_SNAPSHOT)
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?
    {
        None => Ok(None),
        Some(v) => Ok(Some(decode_snapshot(&v)?)),
    }
}

/// The metadata group's state machine: applies committed commands to the node's [`MetaApp`].
pub(crate) struct MetaStateMachine {
    store: MetaStore,
    app: Arc<dyn MetaApp>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Shared with the snapshot builders: a build runs in its own task and may finish after an
    /// install, which it must not undo.
    snapshot_write: Arc<std::sync::Mutex<()>>,
}

/// Persists a snapshot unless the store already holds a later one (see
/// [`MetaStateMachine::snapshot_write`]).
fn save_snapshot_if_not_older(
    store: &MetaStore,
    lock: &std::sync::Mutex<()>,
    meta: &SnapshotMeta,
    encoded: &[u8],
) -> Result<(), StorageError> {
    let sig = meta.signature();
    let _writer = lock.lock().map_err(|_| {
        StorageIOError::write_snapshot(
            Some(sig.clone()),
            openraft::AnyError::error("snapshot writer poisoned"),
        )
    })?;
    if let Some((existing, _)) = load_snapshot(store)? {
        if existing.last_log_id > meta.last_log_id {
            tracing::info!(kept = ?existing.last_log_id, refused = ?meta.last_log_id, "not replacing a later metadata snapshot with an earlier one");
            return Ok(());
        }
    }
    store
        .put_state(KEY_SNAPSHOT, encoded)
        .map_err(|e| StorageIOError::write_snapshot(Some(sig), &e).into())
}

impl MetaStateMachine {
    /// Restores the latest persisted snapshot into `app`; openraft then re-applies the committed
    /// log after it.
    pub(crate) async fn open(
        store: MetaStore,
        app: Arc<dyn MetaApp>,
    ) -> Result<Self, StorageError> {
        let s = store.clone();
        let snap = blocking(move || load_snapshot(&s)).await?;
        let mut sm = MetaStateMachine {
            store,
            app,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot_write: Arc::default(),
        };
        if let Some((meta, data)) = snap {
            sm.app.restore(&data).map_err(|e| {
                StorageIOError::read_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
            })?;
            sm.last_applied = meta.last_log_id;
            sm.membership = meta.last_membership.clone();
            tracing::info!(last_applied = ?meta.last_log_id, "restored metadata snapshot");
        }
        Ok(sm)
    }
}

/// Takes the view at creation time, so applies that run while it is being persisted do not leak
/// into a snapshot labelled with an older log id.
pub(crate) struct MetaSnapshotBuilder {
    store: MetaStore,
    meta: SnapshotMeta,
    data: Vec<u8>,
    snapshot_write: Arc<std::sync::Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for MetaSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let encoded = encode_snapshot(&self.meta, &self.data)?;
        let store = self.store.clone();
        let lock = self.snapshot_write.clone();
        let meta = self.meta.clone();
        blocking(move || save_snapshot_if_not_older(&store, &lock, &meta, &encoded)).await?;
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(self.data.clone())),
        })
    }
}

/// Unique enough to tell two snapshots of the same log id apart (they may differ if one was made
/// after a restart on a different code version); openraft only compares them for equality.
pub(crate) fn snapshot_id(last: Option<LogId>) -> String {
    let nonce: u32 = rand::random();
    match last {
        Some(l) => format!("{}-{}-{nonce:08x}", l.leader_id.term, l.index),
        None => format!("none-{nonce:08x}"),
    }
}

impl RaftStateMachine<TypeConfig> for MetaStateMachine {
    type SnapshotBuilder = MetaSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Bytes>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        for e in entries {
            self.last_applied = Some(e.log_id);
            let reply = match e.payload {
                EntryPayload::Blank => Bytes::new(),
                EntryPayload::Normal(cmd) => Bytes::from(self.app.apply(e.log_id.index, &cmd)),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    Bytes::new()
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MetaSnapshotBuilder {
            store: self.store.clone(),
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id: snapshot_id(self.last_applied),
            },
            data: self.app.snapshot(),
            snapshot_write: self.snapshot_write.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        self.app.restore(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
        })?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let encoded = encode_snapshot(meta, &data)?;
        let store = self.store.clone();
        let lock = self.snapshot_write.clone();
        let meta = meta.clone();
        blocking(move || save_snapshot_if_not_older(&store, &lock, &meta, &encoded)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let store = self.store.clone();
        let snap = blocking(move || load_snapshot(&store)).await?;
        Ok(snap.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::test_util::RecordingApp;

    struct Builder;

    impl StoreBuilder<TypeConfig, MetaLogStore, MetaStateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, MetaLogStore, MetaStateMachine), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let store = MetaStore::open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
            let sm =
                MetaStateMachine::open(store.clone(), Arc::new(RecordingApp::default())).await?;
            Ok((dir, MetaLogStore::new(store), sm))
        }
    }

    #[test]
    fn meta_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
        Suite::test_all(Builder)
    }

    #[tokio::test]
    async fn meta_snapshot_survives_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let app = Arc::new(RecordingApp::default());
        {
            let store = MetaStore::open(dir.path())?;
            let mut sm = MetaStateMachine::open(store, app.clone()).await?;
            let cmd = Entry {
                log_id: crate::log_id(1, 1),
                payload: EntryPayload::Normal(Bytes::from_static(b"hello")),
            };
            let replies = sm.apply([cmd]).await?;
            assert_eq!(replies, vec![Bytes::from_static(b"applied 1")]);
            let mut b = sm.get_snapshot_builder().await;
            b.build_snapshot().await?;
        }
        let app2 = Arc::new(RecordingApp::default());
        let store = MetaStore::open(dir.path())?;
        let mut sm = MetaStateMachine::open(store, app2.clone()).await?;
        assert_eq!(sm.applied_state().await?.0, Some(crate::log_id(1, 1)));
        assert_eq!(app2.commands(), vec![b"hello".to_vec()]);
        Ok(())
    }

    #[tokio::test]
    async fn a_build_finishing_after_an_install_does_not_undo_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = MetaStore::open(dir.path())?;
        let mut sm =
            MetaStateMachine::open(store.clone(), Arc::new(RecordingApp::default())).await?;
        sm.apply([Entry {
            log_id: crate::log_id(1, 1),
            payload: EntryPayload::Normal(Bytes::from_static(b"old")),
        }])
        .await?;
        // openraft builds in its own task: the builder is taken at index 1 ...
        let mut stale = sm.get_snapshot_builder().await;
        // ... the leader's snapshot at index 9 is installed meanwhile ...
        let leader_app = RecordingApp::default();
        leader_app.apply(9, b"from the leader");
        let last = Some(crate::log_id(2, 9));
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: StoredMembership::default(),
            snapshot_id: snapshot_id(last),
        };
        sm.install_snapshot(&meta, Box::new(Cursor::new(leader_app.snapshot())))
            .await?;
        // ... and the build finishes last.
        stale.build_snapshot().await?;
        let (kept, _) = load_snapshot(&store)?.expect("a snapshot");
        assert_eq!(kept.last_log_id, last);
        Ok(())
    }
}
