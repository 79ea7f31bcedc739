//! The partition group's Raft log store: openraft's view of the partition log. Appends are
//! written and fsynced before openraft hears of them, and one append call carries every entry the
//! core gathered meanwhile, which is the group commit.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader, StorageIOError};
use sluice_storage::{batch, EntryKind, LogEntry, PartitionLog};

use super::{io_err, PartitionShared};
use crate::codec::{decode_entry, encode_entry};
use crate::meta_store::{blocking, index_range};
use crate::{log_id, Entry, LogId, StorageError, TypeConfig, Vote};

/// Rebuilds the Raft entry a stored batch holds.
pub(super) fn to_entry(e: LogEntry) -> Result<Entry, StorageError> {
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
pub(super) fn append_one(
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

pub(super) fn append_blocking(
    shared: &PartitionShared,
    entries: Vec<Entry>,
) -> Result<(), StorageError> {
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
