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
//!
//! This module owns [`PartitionShared`] (the log, the state file and what every part reads);
//! [`log_store`] is openraft's view of the log, [`state_machine`] applies committed entries and
//! [`snapshot`] writes, reads and installs the snapshot file.

mod log_store;
mod snapshot;
mod state_machine;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::StorageIOError;
use serde::{Deserialize, Serialize};
use sluice_storage::{file, LogConfig, PartitionLog};
use tokio::sync::watch;

use crate::{Entry, LogId, StorageError, Vote};

use log_store::to_entry;
pub(crate) use log_store::PartitionLogStore;
pub(crate) use snapshot::check_snapshot_data;
use snapshot::{finish_snapshot_install, load_snapshot, PartitionSnapshotData};
pub(crate) use state_machine::{decode_offsets, PartitionStateMachine};

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

impl PartitionShared {
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
