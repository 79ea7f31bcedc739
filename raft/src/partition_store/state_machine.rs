//! The partition state machine: applies committed entries in log order and publishes what they
//! make (today only the high watermark), starting after a restart from the applied checkpoint or
//! the snapshot.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, Snapshot, StorageIOError};
use sluice_storage::batch;

use super::snapshot::{
    load_snapshot, PartitionSnapshotBuilder, PartitionSnapshotData, SnapshotFile,
};
use super::{PartitionShared, COMMITTED_WRITE_INTERVAL};
use crate::meta_store::blocking;
use crate::stm::{CommittedBatch, PartitionMachines};
use crate::{log_id, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// Tracks last applied and membership, and runs the partition's machines ([`crate::stm`]), the
/// high watermark first, which it publishes.
pub(crate) struct PartitionStateMachine {
    shared: Arc<PartitionShared>,
    /// Last applied, membership and the high watermark are always current; `machines` only as
    /// of the last checkpoint or cut (see [`PartitionStateMachine::checkpoint`]).
    data: PartitionSnapshotData,
    machines: Arc<PartitionMachines>,
    /// When the extra machines were last serialized into the applied checkpoint.
    checkpointed_at: Option<Instant>,
}

impl PartitionStateMachine {
    /// Starts from the applied checkpoint or the snapshot, whichever is later and still on the
    /// recovered log (openraft re-applies the committed log after it); without either, from the
    /// start of the log.
    pub(crate) async fn open(
        shared: Arc<PartitionShared>,
        machines: Arc<PartitionMachines>,
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
        })
        // A machine registered after the checkpoint was written has no state in it; the
        // snapshot (or the log's start) lets openraft re-apply what the machine needs.
        .filter(|c| machines.covered_by(&c.machines));
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
                machines: BTreeMap::new(),
            },
        };
        machines
            .restore(data.high_watermark, &data.machines)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        machines.hw.publish_replace();
        Ok(PartitionStateMachine {
            shared,
            data,
            machines,
            checkpointed_at: None,
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
    pub(super) fn cut_at(&mut self, target: Option<u64>) -> (PartitionSnapshotData, Option<u64>) {
        let applied = self.data.last_applied;
        let index = match (target, applied) {
            (Some(t), Some(a)) if t < a.index => t,
            _ => {
                if let Some(a) = applied {
                    self.data.forget_memberships_before(a.index);
                }
                let mut d = self.data.clone();
                d.earlier_memberships.clear();
                d.machines = self.machines.snapshot_extra();
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
            // Replayed by the builder.
            machines: BTreeMap::new(),
        };
        (d, Some(index))
    }
}

impl PartitionStateMachine {
    /// Records the applied state as the checkpoint a restart starts from. Without extra
    /// machines that is after every apply, as it costs nothing. Extra machines are serialized
    /// at most once per [`COMMITTED_WRITE_INTERVAL`] (the checkpoint is written no more often
    /// anyway); in between the previous checkpoint stays, whole: its machines and its last
    /// applied must describe the same point, and a restart re-applies the entries after it.
    fn checkpoint(&mut self) {
        if !self.machines.extra().is_empty() {
            if self
                .checkpointed_at
                .is_some_and(|t| t.elapsed() < COMMITTED_WRITE_INTERVAL)
            {
                return;
            }
            self.data.machines = self.machines.snapshot_extra();
            self.checkpointed_at = Some(Instant::now());
        }
        self.shared.note_applied(&self.data);
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
                    let committed = CommittedBatch {
                        batch: &stored,
                        base_offset: h.base_offset,
                        last_offset: last,
                        raft_index: e.log_id.index,
                        term: e.log_id.leader_id.term,
                    };
                    self.machines
                        .apply(&committed)
                        .map_err(|err| StorageIOError::apply(e.log_id, &err))?;
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
        self.data.high_watermark = self.machines.hw.get();
        self.checkpoint();
        self.machines.hw.publish();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let (data, hw_at) = self.cut_at(self.shared.snapshot_target());
        PartitionSnapshotBuilder {
            shared: self.shared.clone(),
            data,
            hw_at,
            machines: self.machines.clone(),
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
        self.machines
            .restore(data.high_watermark, &data.machines)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.data = data;
        self.shared.note_applied(&self.data);
        self.checkpointed_at = Some(Instant::now());
        self.machines.hw.publish_replace();
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
