//! A partition group's Raft log and state machine.
//!
//! The Raft log IS the partition log (write once): a Normal entry is one Kafka batch appended
//! with [`PartitionLog::append_data`], which assigns its offsets; blank and membership entries
//! are stored as internal control batches that take no offset. Reading entries back rebuilds them
//! from the stored batches, so a Normal entry's payload is the batch as stored, with the base
//! offset this replica's log assigned (the same on every replica, since logs agree).
//!
//! Vote, committed and last-purged log ids live in `raft-state.json` next to the segments,
//! together with a checkpoint of the state machine (last applied, membership, high watermark)
//! that lets a restart skip re-applying the log.
//!
//! The Raft snapshot (`raft-snapshot.json`) is the same state cut at the log's purge point, never
//! later, and it holds no records: it is what a follower that needs purged entries installs, after
//! which its log restarts exactly where the leader's retained log starts. A snapshot cut at last
//! applied instead would make such a follower skip records the leader still retains. Snapshots
//! are only built by retention (openraft's own policy is off for partitions).

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    StorageIOError,
};
use serde::{Deserialize, Serialize};
use sluice_storage::{batch, file, EntryKind, LogConfig, LogEntry, PartitionLog};
use tokio::sync::watch;

use crate::codec::{decode_entry, encode_entry};
use crate::meta_store::{blocking, index_range, snapshot_id};
use crate::{log_id, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote};

const STATE_FILE: &str = "raft-state.json";
const SNAPSHOT_FILE: &str = "raft-snapshot.json";

/// How often a changed committed log id is written. It is only a hint that lets a restarted node
/// re-apply (and so publish its high watermark) before a new leader exists; a stale value is
/// safe, while writing it on every commit would cost two extra fsyncs per produce.
const COMMITTED_WRITE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RaftStateFile {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    /// The state machine as last applied; a hint like `committed` (older files lack it).
    #[serde(default)]
    applied: Option<PartitionSnapshotData>,
    /// Every entry up to this index was fsynced: recovery treats a bad batch at or below it as
    /// lost data, not a torn tail. A hint that lags, never leads: it is taken after the fsync,
    /// and lowered on disk before a truncation removes entries below it.
    #[serde(default)]
    durable: Option<u64>,
    /// Set when recovery found lost data below `durable` on a replicated partition: this replica
    /// may not vote or stand for election until its log reaches this index again, because its
    /// vote could elect a leader that lacks entries it had acknowledged.
    #[serde(default)]
    vote_floor: Option<u64>,
}

impl StateCell {
    /// Whether what differs from the file is only hints (committed, the applied checkpoint),
    /// which may be written late; a vote or purge point must be written before it is relied on.
    fn only_hints_changed(&self) -> bool {
        self.current.vote == self.written.vote && self.current.purged == self.written.purged
    }
}

struct StateCell {
    /// What is in memory, possibly ahead of the file for `committed` only.
    current: RaftStateFile,
    /// The content last written.
    written: RaftStateFile,
    written_at: Option<Instant>,
}

/// What the log store, its readers, the state machine and the group handle share.
pub(crate) struct PartitionShared {
    dir: PathBuf,
    pub(crate) log: RwLock<PartitionLog>,
    /// The log's start and end offsets, published after every change so that async callers
    /// (Fetch, Produce, ListOffsets) read them without touching the log's lock.
    log_start_offset: AtomicI64,
    log_end_offset: AtomicI64,
    /// Wakes long polls when the log start moves (retention, snapshot install), so a fetch
    /// below the new start answers OFFSET_OUT_OF_RANGE at once instead of after its max wait.
    log_start_moved: watch::Sender<i64>,
    /// fdatasync calls on the partition log and data batches appended (leader or follower), for
    /// `/metrics`: their ratio is how many batches one fsync carries (group commit).
    pub(crate) fsyncs: AtomicU64,
    pub(crate) appended_batches: AtomicU64,
    state: Mutex<StateCell>,
    state_write: Mutex<()>,
    /// Serializes snapshot file writes: a build (its own task) and an install (the state
    /// machine's task) may run at once, and both replace `raft-snapshot.json`.
    snapshot_write: Mutex<()>,
    /// The index the next snapshot is cut at (retention's purge cutoff).
    snapshot_target: Mutex<Option<u64>>,
    /// acks=1 producers waiting for their batch to be in this (leader's) log.
    local_waiters: Mutex<Vec<LocalWaiter>>,
}

fn same_buffer(a: &Bytes, b: &Bytes) -> bool {
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

/// A batch proposed on this node, and who to tell its offsets once it is on this node's disk.
/// `batch` is the very buffer handed to Raft: the leader's log store receives the same allocation,
/// so pointer and length identify the entry, and holding the buffer keeps its address from
/// being reused by another entry meanwhile.
pub(crate) struct LocalWaiter {
    pub(crate) batch: Bytes,
    pub(crate) tx: tokio::sync::oneshot::Sender<(i64, i64)>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl PartitionShared {
    /// Opens (and recovers) the partition log in `dir` and the Raft state file beside it.
    pub(crate) fn open(dir: &Path, cfg: LogConfig) -> Result<Arc<Self>, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageIOError::write(&e))?;
        let mut state: RaftStateFile = match file::read_optional(&dir.join(STATE_FILE))
            .map_err(|e| StorageIOError::read(&e))?
        {
            Some(b) => serde_json::from_slice(&b).map_err(|e| StorageIOError::read(&e))?,
            None => RaftStateFile::default(),
        };
        let mut log = open_log(dir, cfg, &mut state)?;
        if let Some(snap) = load_snapshot(dir)? {
            finish_snapshot_install(dir, &mut log, &mut state, &snap)?;
        }
        // Recovery may have cut a damaged tail that had committed. The committed hint must not
        // point past the log, or openraft waits forever for entries that no longer exist.
        if let Some(c) = state.committed {
            let next = log.next_index().unwrap_or(0);
            if c.index >= next {
                let clamped = next
                    .checked_sub(1)
                    .and_then(|last| log.term_of(last).map(|t| crate::log_id(t, last)))
                    .or(state.purged);
                tracing::warn!(
                    dir = %dir.display(),
                    committed = c.index,
                    log_next_index = next,
                    "committed index is past the recovered log; lowering it"
                );
                state.committed = clamped;
            }
        }
        Ok(Arc::new(PartitionShared {
            dir: dir.to_path_buf(),
            log_start_offset: AtomicI64::new(log.log_start_offset()),
            log_end_offset: AtomicI64::new(log.log_end_offset()),
            log_start_moved: watch::channel(log.log_start_offset()).0,
            fsyncs: AtomicU64::new(0),
            appended_batches: AtomicU64::new(0),
            log: RwLock::new(log),
            state: Mutex::new(StateCell {
                current: state.clone(),
                written: state,
                written_at: None,
            }),
            state_write: Mutex::new(()),
            snapshot_write: Mutex::new(()),
            snapshot_target: Mutex::new(None),
            local_waiters: Mutex::new(Vec::new()),
        }))
    }

    /// Call with the log still locked after every change to it.
    fn publish_offsets(&self, log: &PartitionLog) {
        let start = log.log_start_offset();
        self.log_start_offset.store(start, Ordering::Release);
        self.log_end_offset
            .store(log.log_end_offset(), Ordering::Release);
        self.log_start_moved.send_if_modified(|v| {
            let moved = *v != start;
            *v = start;
            moved
        });
    }

    /// Reports log start moves after this call.
    pub(crate) fn subscribe_log_start(&self) -> watch::Receiver<i64> {
        let mut rx = self.log_start_moved.subscribe();
        rx.mark_unchanged();
        rx
    }

    pub(crate) fn log_start_offset(&self) -> i64 {
        self.log_start_offset.load(Ordering::Acquire)
    }

    pub(crate) fn log_end_offset(&self) -> i64 {
        self.log_end_offset.load(Ordering::Acquire)
    }

    pub(crate) fn wait_local_append(&self, waiter: LocalWaiter) {
        if let Ok(mut w) = self.local_waiters.lock() {
            w.push(waiter);
        }
    }

    /// Forgets a waiter whose proposal ended otherwise (committed, failed or timed out).
    pub(crate) fn forget_local_append(&self, batch: &Bytes) {
        if let Ok(mut w) = self.local_waiters.lock() {
            w.retain(|x| !same_buffer(&x.batch, batch));
        }
    }

    fn notify_local_appends(&self, appended: Vec<(Bytes, (i64, i64))>) {
        if appended.is_empty() {
            return;
        }
        let Ok(mut waiters) = self.local_waiters.lock() else {
            return;
        };
        if waiters.is_empty() {
            return;
        }
        for (data, offsets) in appended {
            if let Some(k) = waiters.iter().position(|w| same_buffer(&w.batch, &data)) {
                let w = waiters.swap_remove(k);
                let _ = w.tx.send(offsets);
            }
        }
    }

    /// Whether this replica has ever taken part in its group (a vote or any log).
    pub(crate) fn has_state(&self) -> Result<bool, StorageError> {
        let st = self.lock_state()?;
        if st.current.vote.is_some() || st.current.purged.is_some() {
            return Ok(true);
        }
        drop(st);
        Ok(self.read_log()?.last_index().is_some())
    }

    pub(crate) fn read_log(
        &self,
    ) -> Result<std::sync::RwLockReadGuard<'_, PartitionLog>, StorageError> {
        self.log.read().map_err(|_| {
            StorageIOError::read_logs(openraft::AnyError::error("partition log lock poisoned"))
                .into()
        })
    }

    /// The (term, index) of the last entry, without waiting: `None` while an append holds the
    /// log (callers are on the async runtime) or when the log is empty.
    pub(crate) fn last_log_id_if_idle(&self) -> Option<(u64, u64)> {
        let log = self.log.try_read().ok()?;
        let index = log.last_index()?;
        Some((log.term_of(index)?, index))
    }

    fn write_log(&self) -> Result<std::sync::RwLockWriteGuard<'_, PartitionLog>, StorageError> {
        self.log.write().map_err(|_| {
            StorageIOError::write_logs(openraft::AnyError::error("partition log lock poisoned"))
                .into()
        })
    }

    fn lock_state(&self) -> Result<std::sync::MutexGuard<'_, StateCell>, StorageError> {
        self.state.lock().map_err(|_| {
            StorageIOError::read(openraft::AnyError::error("raft state lock poisoned")).into()
        })
    }

    /// Updates the state with `f` and writes it durably if it changed (or, for a committed-only
    /// change, if the last write is older than [`COMMITTED_WRITE_INTERVAL`] or `force`).
    fn update_state(
        &self,
        force: bool,
        f: impl FnOnce(&mut RaftStateFile),
    ) -> Result<(), StorageError> {
        // Held across the file write so writes land in the order their updates were made; the
        // state lock itself is not, so readers never wait for an fsync.
        let _writer = self.state_write.lock().map_err(|_| {
            StorageIOError::write(openraft::AnyError::error("raft state writer poisoned"))
        })?;
        let target = {
            let mut st = self.lock_state()?;
            f(&mut st.current);
            if st.current == st.written {
                return Ok(());
            }
            let recent = st
                .written_at
                .is_some_and(|t| t.elapsed() < COMMITTED_WRITE_INTERVAL);
            if st.only_hints_changed() && recent && !force {
                return Ok(());
            }
            st.current.clone()
        };
        let bytes = serde_json::to_vec(&target).map_err(|e| StorageIOError::write(&e))?;
        file::write_atomic(&self.dir.join(STATE_FILE), &bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        let mut st = self.lock_state()?;
        st.written = target;
        st.written_at = Some(Instant::now());
        Ok(())
    }

    /// Records `committed` in memory only, if a write would be held back by the interval anyway
    /// (see [`PartitionShared::update_state`]); `false` means the caller must write it.
    fn note_committed_if_not_due(&self, committed: Option<LogId>) -> Result<bool, StorageError> {
        let mut st = self.lock_state()?;
        let recent = st
            .written_at
            .is_some_and(|t| t.elapsed() < COMMITTED_WRITE_INTERVAL);
        if st.only_hints_changed() && recent {
            st.current.committed = committed;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes a committed log id held back by the write interval; called when the group closes.
    pub(crate) fn flush_state(&self) -> Result<(), StorageError> {
        self.update_state(true, |_| {})
    }

    fn purged(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock_state()?.current.purged)
    }

    fn entries(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        // Purging may keep whole segments around; entries at or below the purge point are gone
        // as far as Raft is concerned.
        let floor = self.purged()?.map_or(0, |p| p.index + 1);
        let start = start.max(floor);
        if start >= end {
            return Ok(Vec::new());
        }
        let stored = self
            .read_log()?
            .entries(start, end)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        stored.into_iter().map(to_entry).collect()
    }
}

/// Opens the log, telling recovery what was durable. Lost durable data on a replicated partition
/// is cut like a torn tail, with this replica barred from voting until it has the entries again
/// (see [`RaftStateFile::vote_floor`]); a single replica has nobody to get them from, so it
/// refuses to open, with the file and position in the error.
fn open_log(
    dir: &Path,
    cfg: LogConfig,
    state: &mut RaftStateFile,
) -> Result<PartitionLog, StorageError> {
    match PartitionLog::open_checked(dir, cfg, state.durable) {
        Ok(log) => Ok(log),
        Err(sluice_storage::StorageError::BelowDurable {
            path,
            position,
            raft_index,
            durable,
            problem,
        }) => {
            let voters = state
                .applied
                .as_ref()
                .map(|a| a.membership.membership().voter_ids().count())
                .or_else(|| {
                    load_snapshot(dir)
                        .ok()
                        .flatten()
                        .map(|s| s.meta.last_membership.membership().voter_ids().count())
                })
                .unwrap_or(0);
            if voters < 2 {
                let e = sluice_storage::StorageError::BelowDurable {
                    path,
                    position,
                    raft_index,
                    durable,
                    problem,
                };
                tracing::error!(dir = %dir.display(), error = %e, "acknowledged data is damaged and no other replica holds it; not opening the partition (restore the directory, or remove it to start the partition empty)");
                return Err(StorageIOError::read_logs(&e).into());
            }
            tracing::error!(
                file = %path.display(),
                position,
                raft_index,
                durable,
                "acknowledged data is damaged ({problem}); cutting the log there and taking the entries from the leader again, without voting until this replica has them"
            );
            let log = PartitionLog::open(dir, cfg).map_err(|e| StorageIOError::read_logs(&e))?;
            state.vote_floor = Some(state.vote_floor.map_or(durable, |f| f.max(durable)));
            state.durable = log.last_index();
            let bytes = serde_json::to_vec(&*state).map_err(|e| StorageIOError::write(&e))?;
            file::write_atomic(&dir.join(STATE_FILE), &bytes)
                .map_err(|e| StorageIOError::write(&e))?;
            Ok(log)
        }
        Err(e) => Err(StorageIOError::read_logs(&e).into()),
    }
}

/// Completes an install that a crash interrupted: the snapshot file is written first, then the
/// log restarts after it, then the purge point is recorded. A snapshot whose last entry this log
/// lacks is therefore honoured by restarting the log after it (never by deleting the snapshot,
/// which purged entries may depend on), and a log that restarts after the recorded purge point
/// moves the purge point up to it.
fn finish_snapshot_install(
    dir: &Path,
    log: &mut PartitionLog,
    state: &mut RaftStateFile,
    snap: &SnapshotFile,
) -> Result<(), StorageError> {
    let Some(last) = snap.meta.last_log_id else {
        return Ok(());
    };
    if log.term_of(last.index) != Some(last.leader_id.term)
        && log.next_index().is_none_or(|next| next <= last.index)
    {
        tracing::warn!(
            dir = %dir.display(),
            snapshot_last = %last,
            log_next_index = ?log.next_index(),
            "the log ends before the installed snapshot; restarting it after the snapshot"
        );
        log.reset(last.index + 1, snap.data.high_watermark)
            .map_err(|e| StorageIOError::write_logs(&e))?;
    }
    let restarted_after = log
        .first_index()
        .or(log.next_index())
        .and_then(|first| first.checked_sub(1));
    if restarted_after == Some(last.index) && state.purged.is_none_or(|p| p.index < last.index) {
        state.purged = Some(last);
        let bytes = serde_json::to_vec(&*state).map_err(|e| StorageIOError::write(&e))?;
        file::write_atomic(&dir.join(STATE_FILE), &bytes).map_err(|e| StorageIOError::write(&e))?;
    }
    Ok(())
}

/// Rebuilds the Raft entry a stored batch holds.
fn to_entry(e: LogEntry) -> Result<Entry, StorageError> {
    match e.kind {
        EntryKind::Data { .. } => Ok(Entry {
            log_id: log_id(e.term, e.raft_index),
            payload: EntryPayload::Normal(e.bytes),
        }),
        EntryKind::Internal => {
            let payload = batch::internal_payload(&e.bytes)
                .map_err(|err| StorageIOError::read_log_at_index(e.raft_index, &err))?;
            let entry = decode_entry(&Bytes::copy_from_slice(payload))
                .map_err(|err| StorageIOError::read_log_at_index(e.raft_index, &err))?;
            if entry.log_id != log_id(e.term, e.raft_index) {
                return Err(StorageIOError::read_log_at_index(
                    e.raft_index,
                    openraft::AnyError::error(format!(
                        "internal batch holds entry {} but is stored as {}-{}",
                        entry.log_id, e.term, e.raft_index
                    )),
                )
                .into());
            }
            Ok(entry)
        }
    }
}

/// The partition group's log store; cloning shares the same log, which is also its reader.
#[derive(Clone)]
pub(crate) struct PartitionLogStore {
    shared: Arc<PartitionShared>,
}

impl PartitionLogStore {
    pub(crate) fn new(shared: Arc<PartitionShared>) -> Self {
        PartitionLogStore { shared }
    }
}

impl RaftLogReader<TypeConfig> for PartitionLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = index_range(&range);
        let shared = self.shared.clone();
        blocking(move || shared.entries(start, end)).await
    }
}

/// Appends one entry; for a data batch, returns its (base, last) offsets.
fn append_one(
    log: &mut PartitionLog,
    e: &Entry,
) -> Result<Option<(i64, i64)>, sluice_storage::StorageError> {
    let index = e.log_id.index;
    let term = e.log_id.leader_id.term;
    match &e.payload {
        EntryPayload::Normal(data) => {
            if batch::parse_header(data)?.base_offset == batch::UNPLACED_BASE_OFFSET {
                log.append_data(index, term, data).map(Some)
            } else {
                log.append_replicated(index, term, data).map(Some)
            }
        }
        EntryPayload::Blank | EntryPayload::Membership(_) => {
            let payload = encode_entry(e)
                .map_err(|err| sluice_storage::StorageError::InvalidArgument(err.to_string()))?;
            log.append_internal(index, term, &payload).map(|()| None)
        }
    }
}

fn append_blocking(shared: &PartitionShared, entries: Vec<Entry>) -> Result<(), StorageError> {
    let purged = shared.purged()?;
    let mut log = shared.write_log()?;
    let mut appended: Vec<(Bytes, (i64, i64))> = Vec::new();
    for e in entries {
        let res = match append_one(&mut log, &e) {
            Ok(offsets) => offsets,
            Err(sluice_storage::StorageError::NonContiguous { .. })
                if log
                    .last_index()
                    .is_none_or(|last| purged.is_some_and(|p| last <= p.index)) =>
            {
                // The log holds nothing Raft still knows of (it was purged up to or past what is
                // stored), so Raft may restart it at any index, e.g. right after a state-machine
                // snapshot that is ahead of the log. Offsets continue from the log's end.
                let next_offset = log.log_end_offset();
                log.reset(e.log_id.index, next_offset)
                    .map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
                append_one(&mut log, &e)
                    .map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?
            }
            Err(err) => return Err(StorageIOError::write_log_entry(e.log_id, &err).into()),
        };
        if let (Some(offsets), EntryPayload::Normal(data)) = (res, e.payload) {
            appended.push((data, offsets));
        }
    }
    shared.publish_offsets(&log);
    let last_appended = log.last_index();
    let pending = log.take_pending_sync();
    // The fsync runs without the lock: fetches and replication reads of the committed prefix go
    // on meanwhile, and nothing can change the log under it, because openraft issues log writes
    // (append, truncate, purge) one at a time and waits for each.
    drop(log);
    if let Some(p) = pending {
        p.sync().map_err(|e| StorageIOError::write_logs(&e))?;
        shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(last) = last_appended {
        shared.note_durable(last);
    }
    shared
        .appended_batches
        .fetch_add(appended.len() as u64, Ordering::Relaxed);
    shared.notify_local_appends(appended);
    Ok(())
}

impl RaftLogStorage<TypeConfig> for PartitionLogStore {
    type LogReader = PartitionLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let shared = self.shared.clone();
        blocking(move || {
            let purged = shared.purged()?;
            let log = shared.read_log()?;
            let last = log
                .last_index()
                .and_then(|i| log.term_of(i).map(|t| log_id(t, i)));
            let last = match (last, purged) {
                (Some(l), Some(p)) if l.index > p.index => Some(l),
                (Some(_), Some(p)) => Some(p),
                (l, p) => l.or(p),
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let vote = *vote;
        blocking(move || {
            shared
                .update_state(true, |s| s.vote = Some(vote))
                .map_err(|e| StorageIOError::write_vote(&e).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.shared.lock_state()?.current.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // openraft calls this on every commit, before it applies: skip the blocking-pool round
        // trip when the write interval says the file is not due anyway.
        if self.shared.note_committed_if_not_due(committed)? {
            return Ok(());
        }
        let shared = self.shared.clone();
        blocking(move || shared.update_state(false, |s| s.committed = committed)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.lock_state()?.current.committed)
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let shared = self.shared.clone();
        // Appended and fsynced before returning: the entries must be readable on return and the
        // callback tells openraft they are durable (acks=all means on disk on a majority). Raft
        // core queues new proposals meanwhile and hands them over as one batch next time, so this
        // is group commit.
        match blocking(move || append_blocking(&shared, entries)).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io_err(&e)));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        blocking(move || {
            // Lowered on disk first: a crash after the cut must not find the durable point past
            // the log and take a legitimate truncation for lost data.
            let below = log_id.index.checked_sub(1);
            shared.update_state(true, |s| {
                if s.durable.is_some_and(|d| below.is_none_or(|b| d > b)) {
                    s.durable = below;
                }
            })?;
            let mut log = shared.write_log()?;
            let res = log.truncate_from_index(log_id.index);
            shared.publish_offsets(&log);
            res.map_err(|e| StorageIOError::write_logs(&e).into())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        blocking(move || {
            // Recorded first, so that a crash in between leaves extra entries (harmless) rather
            // than a log that forgot where it ends.
            shared.update_state(true, |s| s.purged = Some(log_id))?;
            let mut log = shared.write_log()?;
            // Purging past the last entry leaves an empty log that continues at the next index
            // and at the same offset.
            let res = log.purge_upto_index(log_id.index);
            shared.publish_offsets(&log);
            res.map_err(|e| StorageIOError::write_logs(&e).into())
        })
        .await
    }
}

/// The whole partition state machine, and the content of its snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartitionSnapshotData {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// First offset not committed: where the log continues after the last applied entry.
    high_watermark: i64,
    /// Memberships applied before `membership`, oldest first, back to the one in force at the
    /// last snapshot point: a snapshot cut before the last applied entry needs the membership
    /// of its own point. Empty in snapshots.
    #[serde(default)]
    earlier_memberships: Vec<StoredMembership>,
}

impl PartitionSnapshotData {
    /// The membership in force after entry `index`: the last one applied at or before it.
    fn membership_at(&self, index: u64) -> StoredMembership {
        self.earlier_memberships
            .iter()
            .chain(std::iter::once(&self.membership))
            .rev()
            .find(|m| m.log_id().is_some_and(|l| l.index <= index))
            .or_else(|| self.earlier_memberships.first())
            .cloned()
            .unwrap_or_default()
    }

    /// Forgets memberships that no snapshot at or after `index` can need.
    fn forget_memberships_before(&mut self, index: u64) {
        let in_force = self
            .earlier_memberships
            .iter()
            .rposition(|m| m.log_id().is_some_and(|l| l.index <= index));
        if let Some(k) = in_force {
            self.earlier_memberships.drain(..k);
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: PartitionSnapshotData,
}

/// What a follower checks of a partition snapshot sent by a peer, before openraft installs it.
pub(crate) fn check_snapshot_data(data: &[u8]) -> Result<(), String> {
    let d: PartitionSnapshotData =
        serde_json::from_slice(data).map_err(|e| format!("unreadable partition snapshot: {e}"))?;
    if d.high_watermark < 0 {
        return Err(format!(
            "partition snapshot with a negative high watermark {}",
            d.high_watermark
        ));
    }
    Ok(())
}

fn load_snapshot(dir: &Path) -> Result<Option<SnapshotFile>, StorageError> {
    match file::read_optional(&dir.join(SNAPSHOT_FILE))
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?
    {
        None => Ok(None),
        Some(b) => Ok(Some(
            serde_json::from_slice(&b).map_err(|e| StorageIOError::read_snapshot(None, &e))?,
        )),
    }
}

impl PartitionShared {
    /// Writes `snap` unless the file already holds a later snapshot; `false` if it did not.
    /// Builds and installs never overwrite each other mid-write (one writer at a time), and an
    /// older snapshot never replaces a newer one that purged entries may depend on.
    fn save_snapshot(&self, snap: &SnapshotFile) -> Result<bool, StorageError> {
        let sig = Some(snap.meta.signature());
        let _writer = self.snapshot_write.lock().map_err(|_| {
            StorageIOError::write_snapshot(
                sig.clone(),
                openraft::AnyError::error("snapshot writer poisoned"),
            )
        })?;
        if let Some(existing) = load_snapshot(&self.dir)? {
            if existing.meta.last_log_id > snap.meta.last_log_id {
                tracing::info!(
                    dir = %self.dir.display(),
                    kept = ?existing.meta.last_log_id,
                    refused = ?snap.meta.last_log_id,
                    "not replacing a later snapshot with an earlier one"
                );
                return Ok(false);
            }
        }
        let bytes = serde_json::to_vec(snap)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        file::write_atomic(&self.dir.join(SNAPSHOT_FILE), &bytes)
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(true)
    }

    /// Where the next snapshot is cut: `Some` once retention has asked for one.
    pub(crate) fn set_snapshot_target(&self, index: u64) {
        if let Ok(mut t) = self.snapshot_target.lock() {
            *t = Some(index);
        }
    }

    fn snapshot_target(&self) -> Option<u64> {
        self.snapshot_target.lock().ok().and_then(|t| *t)
    }

    /// The last index known fsynced in this process (or recorded before it started).
    pub(crate) fn durable_in_memory(&self) -> Option<u64> {
        self.lock_state().ok().and_then(|st| st.current.durable)
    }

    /// Cuts every entry after `durable`, for a replica reopened after a storage failure; `None`
    /// (nothing was ever recorded durable) keeps the log as recovery left it.
    pub(crate) fn cut_unconfirmed_tail(&self, durable: Option<u64>) -> Result<(), StorageError> {
        let Some(durable) = durable else {
            return Ok(());
        };
        let mut log = self.write_log()?;
        if log.last_index().is_some_and(|last| last > durable) {
            tracing::warn!(dir = %self.dir.display(), durable, last = ?log.last_index(), "cutting entries written after the last confirmed fsync");
            let res = log.truncate_from_index(durable + 1);
            self.publish_offsets(&log);
            res.map_err(|e| StorageIOError::write_logs(&e))?;
        }
        // What the failed incarnation confirmed stays known as durable: the state file may lag
        // behind it, and a second failure before the next fsync must not cut below it.
        if let Some(last) = log.last_index() {
            drop(log);
            self.note_durable(durable.min(last));
        }
        Ok(())
    }

    /// Records that entries up to `index` are fsynced (written with the next state write).
    fn note_durable(&self, index: u64) {
        if let Ok(mut st) = self.state.lock() {
            if st.current.durable.is_none_or(|d| d < index) {
                st.current.durable = Some(index);
            }
        }
    }

    /// Whether this replica may vote and stand for election (see [`RaftStateFile::vote_floor`]).
    /// Lifts the bar once the log has reached the floor again; the lift is written with the next
    /// state write (until then a restart re-checks the floor against the log, with the same
    /// outcome). Never blocks: called from the async runtime.
    pub(crate) fn may_vote(&self) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        let Some(floor) = st.current.vote_floor else {
            return true;
        };
        let last = self.log.try_read().ok().and_then(|l| l.last_index());
        if last.is_none_or(|l| l < floor) {
            return false;
        }
        tracing::info!(dir = %self.dir.display(), floor, "the replica has its lost entries again; it may vote");
        st.current.vote_floor = None;
        true
    }

    /// Records the applied state for the next state-file write (a restart starts from it).
    fn note_applied(&self, data: &PartitionSnapshotData) {
        if let Ok(mut st) = self.state.lock() {
            st.current.applied = Some(data.clone());
        }
    }

    fn applied_checkpoint(&self) -> Option<PartitionSnapshotData> {
        self.state
            .lock()
            .ok()
            .and_then(|st| st.current.applied.clone())
    }
}

/// Tracks last applied, membership and the high watermark, which it publishes.
pub(crate) struct PartitionStateMachine {
    shared: Arc<PartitionShared>,
    data: PartitionSnapshotData,
    hw_tx: Arc<watch::Sender<i64>>,
}

impl PartitionStateMachine {
    /// Starts from the applied checkpoint or the snapshot, whichever is later and still on the
    /// recovered log (openraft re-applies the committed log after it); without either, from the
    /// start of the log.
    pub(crate) async fn open(
        shared: Arc<PartitionShared>,
        hw_tx: Arc<watch::Sender<i64>>,
    ) -> Result<Self, StorageError> {
        let s = shared.clone();
        let (snap, log_start) =
            blocking(move || Ok((load_snapshot(&s.dir)?, s.read_log()?.log_start_offset())))
                .await?;
        let on_log = |l: &LogId| {
            shared
                .read_log()
                .map(|log| log.term_of(l.index) == Some(l.leader_id.term))
                .unwrap_or(false)
        };
        // A checkpoint past a damaged tail that recovery cut describes state that is gone; the
        // snapshot is at or before the purge point, which finish_snapshot_install honoured.
        let checkpoint = shared.applied_checkpoint().filter(|c| match c.last_applied {
            Some(l) if !on_log(&l) => {
                tracing::warn!(
                    dir = %shared.dir.display(),
                    checkpoint = %l,
                    "applied checkpoint is not on the recovered log; re-applying from the snapshot"
                );
                false
            }
            _ => true,
        });
        let snap = snap.map(|f| f.data);
        let data = match (checkpoint, snap) {
            (Some(c), Some(s)) if c.last_applied >= s.last_applied => c,
            (_, Some(s)) => s,
            (Some(c), None) => c,
            (None, None) => PartitionSnapshotData {
                last_applied: None,
                membership: StoredMembership::default(),
                high_watermark: log_start,
                earlier_memberships: Vec::new(),
            },
        };
        hw_tx.send_replace(data.high_watermark);
        Ok(PartitionStateMachine {
            shared,
            data,
            hw_tx,
        })
    }
}

pub(crate) struct PartitionSnapshotBuilder {
    shared: Arc<PartitionShared>,
    /// The state to snapshot, already cut at its point (see [`PartitionStateMachine::cut_at`]),
    /// except for the high watermark when `hw_at` is set.
    data: PartitionSnapshotData,
    /// Read the high watermark after this entry from the log (a cut before last applied).
    hw_at: Option<u64>,
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        if let Some(index) = self.hw_at {
            let shared = self.shared.clone();
            let end = blocking(move || Ok(shared.read_log()?.end_offset_at(index))).await?;
            self.data.high_watermark = end.ok_or_else(|| {
                StorageIOError::read_log_at_index(
                    index,
                    openraft::AnyError::error("snapshot point is not in the log"),
                )
            })?;
        }
        let meta = SnapshotMeta {
            last_log_id: self.data.last_applied,
            last_membership: self.data.membership.clone(),
            snapshot_id: snapshot_id(self.data.last_applied),
        };
        let bytes = serde_json::to_vec(&self.data)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let file = SnapshotFile {
            meta: meta.clone(),
            data: self.data.clone(),
        };
        let shared = self.shared.clone();
        blocking(move || shared.save_snapshot(&file).map(|_| ())).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

/// The 16-byte apply reply for a data entry: base offset and last offset, i64 big endian.
pub(crate) fn encode_offsets(base: i64, last: i64) -> Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&base.to_be_bytes());
    b.extend_from_slice(&last.to_be_bytes());
    Bytes::from(b)
}

pub(crate) fn decode_offsets(b: &[u8]) -> Option<(i64, i64)> {
    let base = i64::from_be_bytes(b.get(0..8)?.try_into().ok()?);
    let last = i64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
    Some((base, last))
}

impl PartitionStateMachine {
    /// The state to snapshot for a cut after entry `target` (retention's purge cutoff), or
    /// after the last applied entry without a target; the high watermark of an earlier cut is
    /// read from the log by the builder. Forgets memberships older than the cut's.
    fn cut_at(&mut self, target: Option<u64>) -> (PartitionSnapshotData, Option<u64>) {
        let applied = self.data.last_applied;
        let index = match (target, applied) {
            (Some(t), Some(a)) if t < a.index => t,
            _ => {
                if let Some(a) = applied {
                    self.data.forget_memberships_before(a.index);
                }
                let mut d = self.data.clone();
                d.earlier_memberships.clear();
                return (d, None);
            }
        };
        let term = self.shared.read_log().ok().and_then(|l| l.term_of(index));
        let Some(term) = term else {
            // Not in the log (already purged): cut at last applied, as without a target.
            return self.cut_at(None);
        };
        let membership = self.data.membership_at(index);
        self.data.forget_memberships_before(index);
        let d = PartitionSnapshotData {
            last_applied: Some(log_id(term, index)),
            membership,
            high_watermark: -1,
            earlier_memberships: Vec::new(),
        };
        (d, Some(index))
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.data.last_applied, self.data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Bytes>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        for e in entries {
            self.data.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Normal(stored) => {
                    // openraft hands the state machine entries read back from the log store, so
                    // this is the stored batch carrying the offsets this log assigned.
                    let h = batch::parse_header(&stored)
                        .map_err(|err| StorageIOError::apply(e.log_id, &err))?;
                    let last = h.base_offset + i64::from(h.last_offset_delta);
                    self.data.high_watermark = last + 1;
                    replies.push(encode_offsets(h.base_offset, last));
                }
                EntryPayload::Blank => replies.push(Bytes::new()),
                EntryPayload::Membership(m) => {
                    let previous = std::mem::replace(
                        &mut self.data.membership,
                        StoredMembership::new(Some(e.log_id), m),
                    );
                    self.data.earlier_memberships.push(previous);
                    replies.push(Bytes::new());
                }
            }
        }
        self.shared.note_applied(&self.data);
        self.hw_tx.send_if_modified(|hw| {
            let changed = *hw != self.data.high_watermark;
            *hw = self.data.high_watermark;
            changed
        });
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let (data, hw_at) = self.cut_at(self.shared.snapshot_target());
        PartitionSnapshotBuilder {
            shared: self.shared.clone(),
            data,
            hw_at,
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
        let sig = Some(meta.signature());
        let mut data: PartitionSnapshotData = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        data.earlier_memberships.clear();
        let file = SnapshotFile {
            meta: meta.clone(),
            data: data.clone(),
        };
        let shared = self.shared.clone();
        let snap_last = meta.last_log_id;
        let hw = data.high_watermark;
        blocking(move || {
            // In this order, so that a crash anywhere leaves what finish_snapshot_install
            // completes on the next open: the snapshot, then the log restarted after it, then
            // the purge point.
            shared.save_snapshot(&file)?;
            // The snapshot carries no records: a replica whose log does not reach the snapshot
            // (or disagrees at its end) restarts its log right after it, at the leader's offset.
            // The snapshot was cut at the leader's purge point, so this is where the leader's
            // retained log starts, and everything the leader still has reaches this replica.
            if let Some(last) = snap_last {
                let mut log = shared.write_log()?;
                if log.term_of(last.index) != Some(last.leader_id.term) {
                    tracing::warn!(
                        dir = %shared.dir.display(),
                        snapshot_last = %last,
                        next_offset = hw,
                        "log does not contain the installed snapshot's last entry; restarting it after the snapshot"
                    );
                    let res = log.reset(last.index + 1, hw);
                    shared.publish_offsets(&log);
                    res.map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
                    drop(log);
                    shared.update_state(true, |s| {
                        if s.purged.is_none_or(|p| p.index < last.index) {
                            s.purged = Some(last);
                        }
                        // The log restarts empty: nothing in it is durable yet.
                        s.durable = None;
                    })?;
                }
            }
            Ok(())
        })
        .await?;
        self.data = data;
        self.shared.note_applied(&self.data);
        self.hw_tx.send_replace(self.data.high_watermark);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let shared = self.shared.clone();
        let snap = blocking(move || load_snapshot(&shared.dir)).await?;
        match snap {
            None => Ok(None),
            Some(f) => {
                let bytes = serde_json::to_vec(&f.data)
                    .map_err(|e| StorageIOError::read_snapshot(Some(f.meta.signature()), &e))?;
                Ok(Some(Snapshot {
                    meta: f.meta,
                    snapshot: Box::new(Cursor::new(bytes)),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct Builder;

    impl StoreBuilder<TypeConfig, PartitionLogStore, PartitionStateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, PartitionLogStore, PartitionStateMachine), StorageError>
        {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
            let (hw_tx, _) = watch::channel(0);
            let sm = PartitionStateMachine::open(shared.clone(), Arc::new(hw_tx)).await?;
            Ok((dir, PartitionLogStore::new(shared), sm))
        }
    }

    #[test]
    fn partition_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
        crate::test_util::init_tracing();
        Suite::test_all(Builder)
    }

    #[tokio::test]
    async fn high_watermark_comes_from_stored_offsets_and_survives_via_snapshot(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (hw_tx, hw_rx) = watch::channel(-1);
        let hw_tx = Arc::new(hw_tx);
        {
            let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
            {
                let mut log = shared.write_log()?;
                let blank = Entry {
                    log_id: log_id(1, 0),
                    payload: EntryPayload::Blank,
                };
                append_one(&mut log, &blank)?;
                log.append_data(1, 1, &crate::test_util::data_batch(0, &[b"a", b"b"]))?;
                log.append_data(2, 1, &crate::test_util::data_batch(0, &[b"c"]))?;
                log.sync()?;
            }
            let mut sm = PartitionStateMachine::open(shared.clone(), hw_tx.clone()).await?;
            assert_eq!(*hw_rx.borrow(), 0);
            let mut store = PartitionLogStore::new(shared.clone());
            let entries = store.try_get_log_entries(0..3).await?;
            assert!(matches!(entries[0].payload, EntryPayload::Blank));
            let replies = sm.apply(entries).await?;
            assert_eq!(replies[0], Bytes::new());
            assert_eq!(decode_offsets(&replies[1]), Some((0, 1)));
            assert_eq!(decode_offsets(&replies[2]), Some((2, 2)));
            assert_eq!(*hw_rx.borrow(), 3);
            sm.get_snapshot_builder().await.build_snapshot().await?;
        }
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let mut sm = PartitionStateMachine::open(shared, hw_tx).await?;
        assert_eq!(*hw_rx.borrow(), 3);
        assert_eq!(sm.applied_state().await?.0, Some(log_id(1, 2)));
        Ok(())
    }

    #[tokio::test]
    async fn a_replicated_batch_placed_elsewhere_is_refused_not_renumbered() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let entry = |index: u64, base: i64| {
            let mut b = crate::test_util::data_batch(0, &[b"x"]);
            batch::set_base_offset(&mut b, base);
            Entry {
                log_id: log_id(1, index),
                payload: EntryPayload::Normal(Bytes::from(b)),
            }
        };
        // The leader's own batches are unplaced; the log assigns 0 and 1.
        append_blocking(
            &shared,
            vec![entry(0, batch::UNPLACED_BASE_OFFSET), entry(1, -1)],
        )?;
        // Replicated at the offset where this log continues: accepted.
        append_blocking(&shared, vec![entry(2, 2)])?;
        // A leader that placed index 3 at offset 5 has a different log: refuse, append nothing.
        let err = append_blocking(&shared, vec![entry(3, 5)]).expect_err("divergence must fail");
        assert!(err.to_string().contains("divergence"), "{err}");
        assert_eq!(shared.log_end_offset(), 3);
        assert_eq!(shared.read_log()?.next_index(), Some(3));
        Ok(())
    }

    /// A leader's own data entry at `index` (term 1): not yet placed at an offset.
    fn leader_entry(index: u64, values: &[&[u8]]) -> Entry {
        let mut b = crate::test_util::data_batch(0, values);
        batch::set_base_offset(&mut b, batch::UNPLACED_BASE_OFFSET);
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(Bytes::from(b)),
        }
    }

    fn snapshot_at(index: u64, term: u64, hw: i64) -> SnapshotFile {
        let last = Some(log_id(term, index));
        SnapshotFile {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership: StoredMembership::default(),
                snapshot_id: snapshot_id(last),
            },
            data: PartitionSnapshotData {
                last_applied: last,
                membership: StoredMembership::default(),
                high_watermark: hw,
                earlier_memberships: Vec::new(),
            },
        }
    }

    #[test]
    fn an_earlier_snapshot_never_replaces_a_later_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        assert!(shared.save_snapshot(&snapshot_at(20, 2, 50))?);
        // A build cut at 10 that finishes after an install at 20 must not undo it.
        assert!(!shared.save_snapshot(&snapshot_at(10, 2, 30))?);
        let kept = load_snapshot(dir.path())?.expect("a snapshot");
        assert_eq!(kept.meta.last_log_id, Some(log_id(2, 20)));
        assert!(shared.save_snapshot(&snapshot_at(30, 3, 70))?);
        Ok(())
    }

    #[tokio::test]
    async fn an_install_cut_short_by_a_crash_is_completed_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
            append_blocking(&shared, (0..5).map(|i| leader_entry(i, &[b"x"])).collect())?;
            // The install wrote the leader's snapshot at index 20, then the node died before
            // the log restarted after it.
            assert!(shared.save_snapshot(&snapshot_at(20, 2, 40))?);
        }
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let snap = load_snapshot(dir.path())?.expect("the snapshot survives");
        assert_eq!(snap.meta.last_log_id, Some(log_id(2, 20)));
        assert_eq!(shared.read_log()?.next_index(), Some(21));
        assert_eq!(shared.log_end_offset(), 40);
        assert_eq!(shared.purged()?, Some(log_id(2, 20)));
        let (hw_tx, hw_rx) = watch::channel(-1);
        let mut sm = PartitionStateMachine::open(shared, Arc::new(hw_tx)).await?;
        assert_eq!(sm.applied_state().await?.0, Some(log_id(2, 20)));
        assert_eq!(*hw_rx.borrow(), 40);
        Ok(())
    }

    #[test]
    fn a_reopened_replica_keeps_what_the_failed_one_confirmed_durable() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let confirmed = {
            let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
            shared.flush_state()?; // the file's durable point: nothing yet
            append_blocking(&shared, (0..6).map(|i| leader_entry(i, &[b"x"])).collect())?;
            // The state file is written lazily; the failure came before the next write.
            shared.durable_in_memory()
        };
        assert_eq!(confirmed, Some(5));
        // First reopen: nothing to cut, and the fsynced entries stay known as durable although
        // the file still says otherwise.
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        shared.cut_unconfirmed_tail(confirmed)?;
        assert_eq!(shared.durable_in_memory(), Some(5));
        drop(shared);
        // A second failure before any fsync reopens with what the first reopen knew: no entry
        // that was fsynced is cut.
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        shared.cut_unconfirmed_tail(Some(5))?;
        assert_eq!(shared.read_log()?.last_index(), Some(5));
        Ok(())
    }

    #[tokio::test]
    async fn a_restart_starts_from_the_applied_checkpoint() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (hw_tx, hw_rx) = watch::channel(-1);
        let hw_tx = Arc::new(hw_tx);
        {
            let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
            append_blocking(
                &shared,
                (0..3).map(|i| leader_entry(i, &[b"x", b"y"])).collect(),
            )?;
            let mut sm = PartitionStateMachine::open(shared.clone(), hw_tx.clone()).await?;
            let mut store = PartitionLogStore::new(shared.clone());
            sm.apply(store.try_get_log_entries(0..3).await?).await?;
            assert_eq!(*hw_rx.borrow(), 6);
            shared.flush_state()?;
        }
        assert!(
            load_snapshot(dir.path())?.is_none(),
            "no snapshot was taken"
        );
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let mut sm = PartitionStateMachine::open(shared, hw_tx).await?;
        assert_eq!(sm.applied_state().await?.0, Some(log_id(1, 2)));
        assert_eq!(*hw_rx.borrow(), 6);
        Ok(())
    }

    #[test]
    fn offsets_reply_round_trip() {
        assert_eq!(decode_offsets(&encode_offsets(5, 9)), Some((5, 9)));
        assert_eq!(decode_offsets(&[0u8; 15]), None);
    }
}
