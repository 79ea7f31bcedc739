//! The partition snapshot file (`raft-snapshot.json`): what it holds, writing it without ever
//! replacing a later one, and finishing an install that a crash cut short.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use openraft::{RaftSnapshotBuilder, Snapshot, StorageIOError};
use serde::{Deserialize, Serialize};
use sluice_storage::{file, PartitionLog};

use super::{PartitionShared, RaftStateFile, SNAPSHOT_FILE, STATE_FILE};
use crate::meta_store::{blocking, snapshot_id};
use crate::stm::{restore_all, snapshot_all, CommittedBatch, PartitionMachines};
use crate::{LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// The whole partition state machine, and the content of its snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct PartitionSnapshotData {
    pub(super) last_applied: Option<LogId>,
    pub(super) membership: StoredMembership,
    /// First offset not committed: where the log continues after the last applied entry.
    pub(super) high_watermark: i64,
    /// Memberships applied before `membership`, oldest first, back to the one in force at the
    /// last snapshot point: a snapshot cut before the last applied entry needs the membership
    /// of its own point. Empty in snapshots.
    #[serde(default)]
    pub(super) earlier_memberships: Vec<StoredMembership>,
    /// The extra partition machines' committed state by name ([`crate::stm`]). Files written
    /// before machines existed lack it (every machine then starts empty), and it is left out
    /// while a partition has none, so such a partition's files keep the old format.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "crate::stm::hex_map"
    )]
    pub(super) machines: BTreeMap<String, Vec<u8>>,
}

impl PartitionSnapshotData {
    /// The membership in force after entry `index`: the last one applied at or before it.
    pub(super) fn membership_at(&self, index: u64) -> StoredMembership {
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
    pub(super) fn forget_memberships_before(&mut self, index: u64) {
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
pub(super) struct SnapshotFile {
    pub(super) meta: SnapshotMeta,
    pub(super) data: PartitionSnapshotData,
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

pub(super) fn load_snapshot(dir: &Path) -> Result<Option<SnapshotFile>, StorageError> {
    match file::read_optional(&dir.join(SNAPSHOT_FILE))
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?
    {
        None => Ok(None),
        Some(b) => Ok(Some(
            serde_json::from_slice(&b).map_err(|e| StorageIOError::read_snapshot(None, &e))?,
        )),
    }
}

/// Completes an install that a crash interrupted: the snapshot file is written first, then the
/// log restarts after it, then the purge point is recorded. A snapshot whose last entry this log
/// lacks is therefore honoured by restarting the log after it (never by deleting the snapshot,
/// which purged entries may depend on), and a log that restarts after the recorded purge point
/// moves the purge point up to it.
pub(super) fn finish_snapshot_install(
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

impl PartitionShared {
    /// Writes `snap` unless the file already holds a later snapshot; `false` if it did not.
    /// Builds and installs never overwrite each other mid-write (one writer at a time), and an
    /// older snapshot never replaces a newer one that purged entries may depend on.
    pub(super) fn save_snapshot(&self, snap: &SnapshotFile) -> Result<bool, StorageError> {
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

    pub(super) fn snapshot_target(&self) -> Option<u64> {
        self.snapshot_target.lock().ok().and_then(|t| *t)
    }
}

pub(crate) struct PartitionSnapshotBuilder {
    pub(super) shared: Arc<PartitionShared>,
    /// The state to snapshot, already cut at its point (see [`PartitionStateMachine::cut_at`]),
    /// except for the high watermark when `hw_at` is set.
    pub(super) data: PartitionSnapshotData,
    /// Read the high watermark after this entry from the log, and replay the extra machines up
    /// to it (a cut before last applied).
    pub(super) hw_at: Option<u64>,
    pub(super) machines: Arc<PartitionMachines>,
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
            if !self.machines.extra().is_empty() {
                let shared = self.shared.clone();
                let machines = self.machines.clone();
                self.data.machines =
                    blocking(move || extra_machines_at(&shared, &machines, index)).await?;
            }
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

/// How many log entries one replay step reads at a time.
const REPLAY_CHUNK: u64 = 256;

/// The extra machines' state after entry `index`, which is before the last applied one (a
/// retention cut): fresh machines restored from the current snapshot file and replayed through
/// the log up to `index`. The live machines are ahead of the cut and have no memory of earlier
/// states, and a snapshot must be cut exactly at the purge point (see the module doc of
/// `partition_store`). The entries after the previous snapshot are still in the log: purges
/// never pass a snapshot.
fn extra_machines_at(
    shared: &PartitionShared,
    machines: &PartitionMachines,
    index: u64,
) -> Result<BTreeMap<String, Vec<u8>>, StorageError> {
    let fresh = machines.fresh_extra();
    let prev = load_snapshot(&shared.dir)?;
    let empty = BTreeMap::new();
    let (from, prev_state) = match &prev {
        Some(p) => (
            p.meta.last_log_id.map_or(0, |l| l.index + 1),
            &p.data.machines,
        ),
        None => (0, &empty),
    };
    let fail = |e: &dyn std::fmt::Display| {
        StorageIOError::read_log_at_index(index, openraft::AnyError::error(e.to_string()))
    };
    restore_all(&fresh, prev_state).map_err(|e| fail(&e))?;
    let mut next = from;
    while next <= index {
        let end = (next + REPLAY_CHUNK).min(index + 1);
        let entries = shared
            .read_log()?
            .entries(next, end)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        for e in &entries {
            if let sluice_storage::EntryKind::Data {
                base_offset,
                last_offset,
            } = e.kind
            {
                let batch = CommittedBatch {
                    batch: &e.bytes,
                    base_offset,
                    last_offset,
                    raft_index: e.raft_index,
                    term: e.term,
                };
                fresh
                    .iter()
                    .try_for_each(|m| m.apply(&batch))
                    .map_err(|e| fail(&e))?;
            }
        }
        next = end;
    }
    Ok(snapshot_all(&fresh))
}
