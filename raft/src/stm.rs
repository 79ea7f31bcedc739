//! Partition state machines: what a partition's committed log produces besides the log itself.
//!
//! Shaped after Redpanda's `state_machine_manager` / `rm_stm`: every partition group carries a
//! set of NAMED machines. Each one
//! - sees every committed data entry, in log order, on every replica ([`PartitionStm::apply`]);
//!   this is its committed state, identical on all replicas;
//! - is carried in the partition's snapshot (the snapshot file maps name -> machine bytes) and in
//!   the applied checkpoint, and is restored from them on recovery and on snapshot install;
//! - may keep, on the leader only, an in-flight view of what the leader has proposed but not yet
//!   committed ([`PartitionStm::propose`]), which is dropped whenever leadership changes
//!   ([`PartitionStm::reset_in_flight`]): a new leader's view starts from committed state.
//!
//! The high watermark is the first machine ([`HighWatermark`]). Its snapshot lives in the
//! snapshot file's original `high_watermark` field rather than in the map, so files written
//! before machines existed, and readers of that format, keep working.
//!
//! The broker registers extra machines for every partition group with a
//! [`PartitionStmFactory`] ([`crate::RaftHost::set_partition_machines`]) and finds them again
//! with [`crate::PartitionGroup::machine`] / [`crate::PartitionGroup::with_machine`].

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::GroupId;

/// One committed data entry as a machine sees it.
#[derive(Debug, Clone, Copy)]
pub struct CommittedBatch<'a> {
    /// The Kafka record batch as stored, carrying the offsets this log assigned.
    pub batch: &'a [u8],
    pub base_offset: i64,
    pub last_offset: i64,
    pub raft_index: u64,
    /// The Raft term that wrote it, which is the batch's partitionLeaderEpoch.
    pub term: u64,
}

/// A batch the leader is about to hand to Raft, as a machine's in-flight view sees it.
#[derive(Debug, Clone, Copy)]
pub struct ProposedBatch<'a> {
    /// The validated Kafka batch, not yet placed at an offset.
    pub batch: &'a [u8],
    /// The term the leader proposes it in.
    pub term: u64,
}

/// A machine's refusal or failure, with its own words, and (for a refusal the caller must act
/// on) a typed reason the broker gets back with [`StmError::reason`].
#[derive(Clone, thiserror::Error)]
#[error("partition state machine {machine}: {message}")]
pub struct StmError {
    pub machine: String,
    pub message: String,
    reason: Option<Arc<dyn Any + Send + Sync>>,
}

impl StmError {
    pub fn new(machine: impl Into<String>, message: impl Into<String>) -> Self {
        StmError {
            machine: machine.into(),
            message: message.into(),
            reason: None,
        }
    }

    /// A refusal carrying `reason`, e.g. a machine's verdict on a proposed batch.
    pub fn refused<R: Any + Send + Sync>(
        machine: impl Into<String>,
        message: impl Into<String>,
        reason: R,
    ) -> Self {
        StmError {
            reason: Some(Arc::new(reason)),
            ..StmError::new(machine, message)
        }
    }

    /// The typed reason, if the machine gave one of type `R`.
    pub fn reason<R: Any>(&self) -> Option<&R> {
        self.reason.as_deref().and_then(|r| r.downcast_ref())
    }
}

impl std::fmt::Debug for StmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StmError")
            .field("machine", &self.machine)
            .field("message", &self.message)
            .field("has_reason", &self.reason.is_some())
            .finish()
    }
}

/// Equal when machine and message are: the reason is for the caller, not for comparisons.
impl PartialEq for StmError {
    fn eq(&self, other: &Self) -> bool {
        self.machine == other.machine && self.message == other.message
    }
}

impl Eq for StmError {}

/// A state machine of one partition. Methods take `&self` because the machine is shared by the
/// group's Raft core (which applies) and the broker (which reads it); use interior mutability.
///
/// Committed state must be deterministic: the same entries applied in the same order reach the
/// same state on every replica (no clock, no I/O, no randomness).
pub trait PartitionStm: Send + Sync + 'static {
    /// The machine's name, unique within a partition; it keys the machine's bytes in snapshots,
    /// so it must never change once data exists.
    fn name(&self) -> &str;

    /// Applies one committed data entry. Called in log order on every replica, exactly once per
    /// entry after the state the machine was last restored from. An error stops the partition's
    /// Raft core like a storage failure, so return one only for a state that cannot go on.
    fn apply(&self, entry: &CommittedBatch<'_>) -> Result<(), StmError>;

    /// The committed state as bytes, for snapshots and the applied checkpoint.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the committed state with one made by [`PartitionStm::snapshot`]; `None` means
    /// the empty state (a new partition, or a snapshot written before this machine existed).
    /// Also drops the in-flight view.
    fn restore(&self, snapshot: Option<&[u8]>) -> Result<(), StmError>;

    /// On the leader, before `batch` is handed to Raft, in the order batches enter the log. An
    /// error refuses the batch (nothing is proposed). A proposed batch may still fail to commit;
    /// the view is reset when leadership changes, which is when that happens.
    fn propose(&self, _batch: &ProposedBatch<'_>) -> Result<(), StmError> {
        Ok(())
    }

    /// Leadership changed: `Some(term)` when this node starts proposing in `term`, `None` when it
    /// stopped leading. Drops the in-flight view.
    fn reset_in_flight(&self, _leader_term: Option<u64>) {}

    /// For typed access from [`crate::PartitionGroup::with_machine`].
    fn as_any(&self) -> &dyn Any;
}

/// Makes the extra machines of a partition group when the group opens (and fresh instances when
/// a snapshot must be cut before the last applied entry, see `partition_store::snapshot`).
pub trait PartitionStmFactory: Send + Sync + 'static {
    fn create(&self, group: &GroupId) -> Vec<Arc<dyn PartitionStm>>;
}

impl<F> PartitionStmFactory for F
where
    F: Fn(&GroupId) -> Vec<Arc<dyn PartitionStm>> + Send + Sync + 'static,
{
    fn create(&self, group: &GroupId) -> Vec<Arc<dyn PartitionStm>> {
        self(group)
    }
}

/// The name of the high-watermark machine.
pub const HIGH_WATERMARK: &str = "high_watermark";

/// The first machine: the first offset not committed. Applying sets it after the entry; it is
/// published to watchers once per applied run of entries (not per entry) by the state machine.
#[derive(Debug)]
pub struct HighWatermark {
    value: Mutex<i64>,
    tx: watch::Sender<i64>,
}

impl HighWatermark {
    pub(crate) fn new(initial: i64) -> Self {
        HighWatermark {
            value: Mutex::new(initial),
            tx: watch::channel(initial).0,
        }
    }

    /// The applied high watermark (which may be ahead of the published one within one apply).
    pub fn get(&self) -> i64 {
        *self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set(&self, hw: i64) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = hw;
    }

    /// Tells watchers the current value, if it changed.
    pub(crate) fn publish(&self) {
        let hw = self.get();
        self.tx.send_if_modified(|v| {
            let changed = *v != hw;
            *v = hw;
            changed
        });
    }

    /// Tells watchers the current value, even if unchanged (after a restore).
    pub(crate) fn publish_replace(&self) {
        self.tx.send_replace(self.get());
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.tx.subscribe()
    }
}

impl PartitionStm for HighWatermark {
    fn name(&self) -> &str {
        HIGH_WATERMARK
    }

    fn apply(&self, entry: &CommittedBatch<'_>) -> Result<(), StmError> {
        self.set(entry.last_offset + 1);
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.get().to_be_bytes().to_vec()
    }

    fn restore(&self, snapshot: Option<&[u8]>) -> Result<(), StmError> {
        let hw = match snapshot {
            None => 0,
            Some(b) => i64::from_be_bytes(b.try_into().map_err(|_| {
                StmError::new(HIGH_WATERMARK, format!("snapshot of {} bytes", b.len()))
            })?),
        };
        self.set(hw);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The machines of one partition group: the high watermark first, then the extra ones. Shared
/// by the group's state machine (which applies and snapshots) and its handle (which proposes and
/// looks machines up).
pub(crate) struct PartitionMachines {
    pub(crate) hw: Arc<HighWatermark>,
    extra: Vec<Arc<dyn PartitionStm>>,
    /// Makes fresh extra machines for a snapshot cut before the last applied entry.
    factory: Option<Arc<dyn PartitionStmFactory>>,
    group: GroupId,
    /// The term the in-flight views belong to (`None`: not leading).
    proposing_term: Mutex<Option<u64>>,
}

impl PartitionMachines {
    pub(crate) fn new(group: GroupId, factory: Option<Arc<dyn PartitionStmFactory>>) -> Self {
        let extra = factory
            .as_ref()
            .map(|f| f.create(&group))
            .unwrap_or_default();
        PartitionMachines {
            hw: Arc::new(HighWatermark::new(0)),
            extra,
            factory,
            group,
            proposing_term: Mutex::new(None),
        }
    }

    /// Fresh instances of the extra machines, in their empty state.
    pub(crate) fn fresh_extra(&self) -> Vec<Arc<dyn PartitionStm>> {
        self.factory
            .as_ref()
            .map(|f| f.create(&self.group))
            .unwrap_or_default()
    }

    pub(crate) fn extra(&self) -> &[Arc<dyn PartitionStm>] {
        &self.extra
    }

    /// Every machine, the high watermark first.
    pub(crate) fn all(&self) -> impl Iterator<Item = &dyn PartitionStm> {
        std::iter::once(self.hw.as_ref() as &dyn PartitionStm)
            .chain(self.extra.iter().map(|m| m.as_ref()))
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<dyn PartitionStm>> {
        if name == HIGH_WATERMARK {
            return Some(self.hw.clone());
        }
        self.extra.iter().find(|m| m.name() == name).cloned()
    }

    /// Applies one committed entry to every machine, in registration order.
    pub(crate) fn apply(&self, entry: &CommittedBatch<'_>) -> Result<(), StmError> {
        self.all().try_for_each(|m| m.apply(entry))
    }

    /// The extra machines' committed state, by name.
    pub(crate) fn snapshot_extra(&self) -> BTreeMap<String, Vec<u8>> {
        snapshot_all(&self.extra)
    }

    /// Restores the high watermark and every extra machine (those missing from `extra` start
    /// empty); in-flight views are dropped.
    pub(crate) fn restore(
        &self,
        hw: i64,
        extra: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), StmError> {
        self.hw.set(hw);
        restore_all(&self.extra, extra)?;
        if let Ok(mut t) = self.proposing_term.lock() {
            *t = None;
        }
        Ok(())
    }

    /// Whether `checkpoint` holds every extra machine (one registered after it was written
    /// cannot start from it).
    pub(crate) fn covered_by(&self, checkpoint: &BTreeMap<String, Vec<u8>>) -> bool {
        self.extra.iter().all(|m| checkpoint.contains_key(m.name()))
    }

    /// The leader's in-flight step for one batch about to be proposed in `term`: a new term
    /// first resets every view.
    pub(crate) fn propose(&self, batch: &[u8], term: u64) -> Result<(), StmError> {
        if self.extra.is_empty() {
            return Ok(());
        }
        let mut current = self
            .proposing_term
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *current != Some(term) {
            *current = Some(term);
            self.extra
                .iter()
                .for_each(|m| m.reset_in_flight(Some(term)));
        }
        let proposed = ProposedBatch { batch, term };
        self.extra.iter().try_for_each(|m| m.propose(&proposed))
    }

    /// This node stopped leading: drops every in-flight view.
    pub(crate) fn leadership_lost(&self) {
        let mut current = self
            .proposing_term
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if current.take().is_some() {
            self.extra.iter().for_each(|m| m.reset_in_flight(None));
        }
    }
}

pub(crate) fn snapshot_all(machines: &[Arc<dyn PartitionStm>]) -> BTreeMap<String, Vec<u8>> {
    machines
        .iter()
        .map(|m| (m.name().to_string(), m.snapshot()))
        .collect()
}

pub(crate) fn restore_all(
    machines: &[Arc<dyn PartitionStm>],
    from: &BTreeMap<String, Vec<u8>>,
) -> Result<(), StmError> {
    machines
        .iter()
        .try_for_each(|m| m.restore(from.get(m.name()).map(|b| b.as_slice())))
}

/// Serializes machine bytes as lowercase hex in the JSON snapshot and state files (a JSON array
/// of numbers would take about four times the space).
pub(crate) mod hex_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let hex: BTreeMap<&str, String> = map
            .iter()
            .map(|(k, v)| {
                let mut h = String::with_capacity(v.len() * 2);
                for b in v {
                    h.push_str(&format!("{b:02x}"));
                }
                (k.as_str(), h)
            })
            .collect();
        hex.serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let hex = BTreeMap::<String, String>::deserialize(d)?;
        hex.into_iter()
            .map(|(k, h)| {
                if h.len() % 2 != 0 {
                    return Err(serde::de::Error::custom(format!(
                        "machine {k}: odd-length hex"
                    )));
                }
                let bytes = (0..h.len())
                    .step_by(2)
                    .map(|i| {
                        h.get(i..i + 2)
                            .and_then(|p| u8::from_str_radix(p, 16).ok())
                            .ok_or_else(|| {
                                serde::de::Error::custom(format!("machine {k}: bad hex"))
                            })
                    })
                    .collect::<Result<Vec<u8>, D::Error>>()?;
                Ok((k, bytes))
            })
            .collect()
    }
}
