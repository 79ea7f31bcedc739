//! Tests of the partition store as a whole: the openraft conformance suite and recovery cases.

use openraft::testing::{StoreBuilder, Suite};

use super::log_store::*;
use super::snapshot::*;
use super::state_machine::*;
use super::*;
use crate::meta_store::snapshot_id;
use crate::stm::PartitionMachines;
use crate::GroupId;
use crate::{log_id, SnapshotMeta, StoredMembership, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftLogReader, RaftSnapshotBuilder};
use sluice_storage::batch;
use std::collections::BTreeMap;

/// A partition's machines with no extra ones: the high watermark alone.
fn machines() -> Arc<PartitionMachines> {
    Arc::new(PartitionMachines::new(GroupId::from("p/t/0"), None))
}

struct Builder;

impl StoreBuilder<TypeConfig, PartitionLogStore, PartitionStateMachine, tempfile::TempDir>
    for Builder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, PartitionLogStore, PartitionStateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let hw_tx = machines();
        let sm = PartitionStateMachine::open(shared.clone(), hw_tx).await?;
        Ok((dir, PartitionLogStore::new(shared), sm))
    }
}

#[test]
fn partition_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
    crate::test_util::init_tracing();
    Suite::test_all(Builder)
}

#[tokio::test]
async fn high_watermark_comes_from_stored_offsets_and_survives_via_snapshot() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let hw_tx = machines();
    let hw_rx = hw_tx.hw.subscribe();
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
            machines: BTreeMap::new(),
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
    let hw_tx = machines();
    let hw_rx = hw_tx.hw.subscribe();
    let mut sm = PartitionStateMachine::open(shared, hw_tx).await?;
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
    let hw_tx = machines();
    let hw_rx = hw_tx.hw.subscribe();
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

/// A toy machine: counts records and remembers the raft index of every entry it saw.
#[derive(Default)]
struct Counter {
    state: std::sync::Mutex<(i64, Vec<u64>)>,
}

impl Counter {
    fn seen(&self) -> (i64, Vec<u64>) {
        self.state.lock().expect("counter lock").clone()
    }
}

impl crate::PartitionStm for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    fn apply(&self, e: &crate::CommittedBatch<'_>) -> Result<(), crate::StmError> {
        let h = batch::parse_header(e.batch)
            .map_err(|err| crate::StmError::new("counter", err.to_string()))?;
        assert_eq!(
            h.base_offset, e.base_offset,
            "the stored batch carries its offsets"
        );
        let mut st = self.state.lock().expect("counter lock");
        st.0 += e.last_offset - e.base_offset + 1;
        st.1.push(e.raft_index);
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.state.lock().expect("counter lock")).unwrap_or_default()
    }

    fn restore(&self, snapshot: Option<&[u8]>) -> Result<(), crate::StmError> {
        let st = match snapshot {
            None => (0, Vec::new()),
            Some(b) => serde_json::from_slice(b)
                .map_err(|e| crate::StmError::new("counter", e.to_string()))?,
        };
        *self.state.lock().expect("counter lock") = st;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A fresh set of machines with a [`Counter`], as a group opening would make.
fn with_counter() -> Arc<PartitionMachines> {
    let factory = |_: &GroupId| vec![Arc::new(Counter::default()) as Arc<dyn crate::PartitionStm>];
    Arc::new(PartitionMachines::new(
        GroupId::from("p/t/0"),
        Some(Arc::new(factory)),
    ))
}

fn counter(m: &PartitionMachines) -> (i64, Vec<u64>) {
    let c = m.get("counter").expect("registered");
    c.as_any()
        .downcast_ref::<Counter>()
        .expect("a Counter")
        .seen()
}

/// Appends `n` leader batches of two records at indexes `from..from + n` and applies them.
async fn apply_new(
    shared: &Arc<PartitionShared>,
    sm: &mut PartitionStateMachine,
    from: u64,
    n: u64,
) -> anyhow::Result<()> {
    append_blocking(
        shared,
        (from..from + n)
            .map(|i| leader_entry(i, &[b"x", b"y"]))
            .collect(),
    )?;
    let mut store = PartitionLogStore::new(shared.clone());
    sm.apply(store.try_get_log_entries(from..from + n).await?)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_machine_sees_every_committed_entry_in_order_and_survives_a_snapshot_install(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
    let m = with_counter();
    let mut sm = PartitionStateMachine::open(shared.clone(), m.clone()).await?;
    apply_new(&shared, &mut sm, 0, 3).await?;
    apply_new(&shared, &mut sm, 3, 2).await?;
    assert_eq!(counter(&m), (10, vec![0, 1, 2, 3, 4]));
    assert_eq!(
        m.hw.get(),
        10,
        "the high watermark is a machine like the others"
    );
    let snap = sm.get_snapshot_builder().await.build_snapshot().await?;

    // Another replica installs it: its fresh counter takes the state, not a replay.
    let dir2 = tempfile::tempdir()?;
    let shared2 = PartitionShared::open(dir2.path(), LogConfig::default())?;
    let m2 = with_counter();
    let mut sm2 = PartitionStateMachine::open(shared2.clone(), m2.clone()).await?;
    assert_eq!(counter(&m2), (0, vec![]));
    sm2.install_snapshot(&snap.meta, snap.snapshot).await?;
    assert_eq!(counter(&m2), (10, vec![0, 1, 2, 3, 4]));
    assert_eq!(*m2.hw.subscribe().borrow(), 10);
    // It goes on from there with the entries after the snapshot.
    append_blocking(&shared2, vec![leader_entry(5, &[b"z"])])?;
    let mut store2 = PartitionLogStore::new(shared2.clone());
    sm2.apply(store2.try_get_log_entries(5..6).await?).await?;
    assert_eq!(counter(&m2), (11, vec![0, 1, 2, 3, 4, 5]));
    Ok(())
}

#[tokio::test]
async fn a_machine_survives_a_reopen_from_disk() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let mut sm = PartitionStateMachine::open(shared.clone(), with_counter()).await?;
        apply_new(&shared, &mut sm, 0, 3).await?;
        shared.flush_state()?;
    }
    // From the applied checkpoint, with new instances.
    let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
    let m = with_counter();
    let mut sm = PartitionStateMachine::open(shared.clone(), m.clone()).await?;
    assert_eq!(sm.applied_state().await?.0, Some(log_id(1, 2)));
    assert_eq!(counter(&m), (6, vec![0, 1, 2]));
    // A machine registered after the checkpoint was written cannot start from it: the state
    // machine starts before the log instead, and openraft re-applies the whole log to it.
    let dir = tempfile::tempdir()?;
    {
        let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
        let mut sm = PartitionStateMachine::open(shared.clone(), machines()).await?;
        apply_new(&shared, &mut sm, 0, 3).await?;
        shared.flush_state()?;
    }
    let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
    let m = with_counter();
    let mut sm = PartitionStateMachine::open(shared.clone(), m.clone()).await?;
    assert_eq!(sm.applied_state().await?.0, None);
    let mut store = PartitionLogStore::new(shared);
    sm.apply(store.try_get_log_entries(0..3).await?).await?;
    assert_eq!(counter(&m), (6, vec![0, 1, 2]));
    Ok(())
}

#[tokio::test]
async fn a_retention_cut_replays_the_machines_up_to_the_cut() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
    let m = with_counter();
    let mut sm = PartitionStateMachine::open(shared.clone(), m.clone()).await?;
    apply_new(&shared, &mut sm, 0, 5).await?;
    shared.set_snapshot_target(2);
    let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 2)));
    let data: PartitionSnapshotData = serde_json::from_slice(snap.snapshot.get_ref())?;
    assert_eq!(data.high_watermark, 6);
    let c = Counter::default();
    crate::PartitionStm::restore(&c, data.machines.get("counter").map(|b| b.as_slice()))?;
    assert_eq!(
        c.seen(),
        (6, vec![0, 1, 2]),
        "the state at the cut, not at last applied"
    );
    assert_eq!(
        counter(&m),
        (10, vec![0, 1, 2, 3, 4]),
        "the live machine is untouched"
    );
    Ok(())
}

#[tokio::test]
async fn a_snapshot_from_before_machines_restores() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
    // What an older version wrote: no machine map at all.
    let old = snapshot_at(20, 2, 40);
    assert!(shared.save_snapshot(&old)?);
    let raw = std::fs::read_to_string(dir.path().join(SNAPSHOT_FILE))?;
    assert!(
        !raw.contains("machines"),
        "a partition without extra machines keeps the old format: {raw}"
    );
    drop(shared);
    let shared = PartitionShared::open(dir.path(), LogConfig::default())?;
    let m = with_counter();
    let mut sm = PartitionStateMachine::open(shared, m.clone()).await?;
    assert_eq!(sm.applied_state().await?.0, Some(log_id(2, 20)));
    assert_eq!(m.hw.get(), 40);
    assert_eq!(
        counter(&m),
        (0, vec![]),
        "a machine missing from the snapshot starts empty"
    );
    Ok(())
}
