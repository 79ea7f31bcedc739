//! Idempotent producers' state for one partition, as Kafka's `ProducerStateManager` keeps it: per
//! producer id its epoch and the sequence ranges and offsets of its last five batches. The
//! committed table is replicated with the log (a partition state machine applies it in log order
//! on every replica and carries it in the partition snapshot); the leader checks each incoming
//! batch against the committed table plus the batches it has proposed and not yet seen commit.
//!
//! Expiry (`producer.id.expiration.ms`) must be deterministic, so it runs on the partition's own
//! clock: the largest batch timestamp applied so far. Produce refuses timestamps more than
//! `message.timestamp.after.max.ms` ahead of the broker's clock, which bounds how far one client
//! can move that clock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sluice_raft::{CommittedBatch, PartitionStm, ProposedBatch, StmError};
use tokio::sync::watch;

use crate::broker::Broker;
use crate::controller::PartitionId;
use crate::errors::ErrorCode;

/// Kafka keeps this many batches per producer to answer duplicates.
pub const BATCHES_KEPT: usize = 5;

/// The producer fields of a batch header, for a batch with a producer id (>= 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_seq: i32,
    pub last_seq: i32,
    pub max_timestamp: i64,
}

impl ProducerBatch {
    /// From a batch's header fields; `None` for a batch without a producer id (not idempotent).
    pub fn from_header(
        producer_id: i64,
        epoch: i16,
        base_sequence: i32,
        last_offset_delta: i32,
        max_timestamp: i64,
    ) -> Option<ProducerBatch> {
        (producer_id >= 0).then(|| ProducerBatch {
            producer_id,
            epoch,
            first_seq: base_sequence,
            // Sequences wrap at i32::MAX, as Kafka's do.
            last_seq: wrapping_seq(base_sequence, last_offset_delta),
            max_timestamp,
        })
    }
}

fn wrapping_seq(seq: i32, delta: i32) -> i32 {
    let next = i64::from(seq) + i64::from(delta);
    if next > i64::from(i32::MAX) {
        (next - i64::from(i32::MAX) - 1) as i32
    } else {
        next as i32
    }
}

/// `next` directly follows `last` (with Kafka's wrap-around from i32::MAX to 0).
fn in_sequence(last: i32, next: i32) -> bool {
    next == wrapping_seq(last, 1)
}

/// One of a producer's recent batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    pub last_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first, at most [`BATCHES_KEPT`].
    pub batches: VecDeque<BatchMeta>,
    /// When it last wrote, on the partition's clock.
    pub last_timestamp: i64,
}

/// What the leader does with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Append,
    /// Already in the log: answer with its original offsets and append nothing.
    Duplicate(BatchMeta),
    /// Already proposed and not yet committed: answer once it commits.
    DuplicateInFlight,
    /// A gap or a repeat that is not one of the recent batches.
    OutOfOrder {
        expected: i32,
    },
    /// The producer was fenced by a newer epoch.
    StaleEpoch {
        current: i16,
    },
    /// No state for this producer id and a sequence other than 0: it expired, or never wrote here.
    UnknownProducer,
}

/// A batch proposed by this leader and not yet committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    epoch: i16,
    first_seq: i32,
    last_seq: i32,
}

/// The committed producer state of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTable {
    producers: BTreeMap<i64, ProducerEntry>,
    /// The partition's clock: the largest batch timestamp applied.
    clock_ms: i64,
    /// When expiry last ran, on that clock.
    expired_at_ms: i64,
}

impl ProducerTable {
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&i64, &ProducerEntry)> {
        self.producers.iter()
    }

    /// Records a committed batch at its offsets, then expires producers idle for longer than
    /// `expiration_ms` on the partition's clock.
    pub fn apply(
        &mut self,
        b: &ProducerBatch,
        base_offset: i64,
        last_offset: i64,
        expiration_ms: i64,
    ) {
        // A producer is as recent as the partition's clock when it last wrote, not as its own
        // timestamps say: one replaying old records (MirrorMaker keeps their timestamps) must
        // not expire while it writes.
        self.clock_ms = self.clock_ms.max(b.max_timestamp);
        let now = self.clock_ms;
        let e = self
            .producers
            .entry(b.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: b.epoch,
                batches: VecDeque::new(),
                last_timestamp: now,
            });
        if b.epoch != e.epoch {
            // A new epoch starts its sequences over; the old epoch's batches can no longer be
            // retried (the producer would be fenced).
            e.epoch = b.epoch;
            e.batches.clear();
        }
        e.batches.push_back(BatchMeta {
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            base_offset,
            last_offset,
        });
        while e.batches.len() > BATCHES_KEPT {
            e.batches.pop_front();
        }
        e.last_timestamp = now;
        // A scan per applied batch would be quadratic; once per tenth of the period is enough.
        if self.clock_ms.saturating_sub(self.expired_at_ms) >= (expiration_ms / 10).max(1) {
            self.expired_at_ms = self.clock_ms;
            let horizon = self.clock_ms.saturating_sub(expiration_ms);
            self.producers.retain(|_, e| e.last_timestamp >= horizon);
        }
    }
}

/// The committed table plus this leader's proposed-but-uncommitted batches.
#[derive(Debug, Default)]
pub struct LeaderView {
    in_flight: BTreeMap<i64, VecDeque<Pending>>,
}

impl LeaderView {
    /// Kafka's checks, in Kafka's order: epoch, duplicate, sequence.
    pub fn check(&self, committed: &ProducerTable, b: &ProducerBatch) -> Verdict {
        let pending = self.in_flight.get(&b.producer_id);
        let newest_pending = pending.and_then(|p| p.back());
        let entry = committed.get(b.producer_id);
        let epoch = match (entry, newest_pending) {
            (_, Some(p)) => Some(p.epoch),
            (Some(e), None) => Some(e.epoch),
            (None, None) => None,
        };
        let Some(epoch) = epoch else {
            return if b.first_seq == 0 {
                Verdict::Append
            } else {
                Verdict::UnknownProducer
            };
        };
        if b.epoch < epoch {
            return Verdict::StaleEpoch { current: epoch };
        }
        if b.epoch > epoch {
            return if b.first_seq == 0 {
                Verdict::Append
            } else {
                Verdict::OutOfOrder { expected: 0 }
            };
        }
        let same = |first: i32, last: i32| first == b.first_seq && last == b.last_seq;
        if let Some(d) = entry
            .filter(|e| e.epoch == b.epoch)
            .and_then(|e| e.batches.iter().find(|d| same(d.first_seq, d.last_seq)))
        {
            return Verdict::Duplicate(*d);
        }
        if pending
            .into_iter()
            .flatten()
            .any(|p| p.epoch == b.epoch && same(p.first_seq, p.last_seq))
        {
            return Verdict::DuplicateInFlight;
        }
        let last_seq = match newest_pending {
            Some(p) => Some(p.last_seq),
            None => entry.and_then(|e| e.batches.back()).map(|d| d.last_seq),
        };
        let expected = last_seq.map_or(0, |l| wrapping_seq(l, 1));
        match last_seq {
            Some(l) if in_sequence(l, b.first_seq) => Verdict::Append,
            None if b.first_seq == 0 => Verdict::Append,
            _ => Verdict::OutOfOrder { expected },
        }
    }

    /// The batch was handed to Raft.
    pub fn proposed(&mut self, b: &ProducerBatch) {
        let q = self.in_flight.entry(b.producer_id).or_default();
        q.push_back(Pending {
            epoch: b.epoch,
            first_seq: b.first_seq,
            last_seq: b.last_seq,
        });
        // Bounded like the committed side: a producer has at most five batches in flight.
        while q.len() > BATCHES_KEPT {
            q.pop_front();
        }
    }

    /// The batch committed (in log order, so it is the oldest pending of its producer).
    pub fn committed(&mut self, b: &ProducerBatch) {
        if let Some(q) = self.in_flight.get_mut(&b.producer_id) {
            // The epoch too: after a bump, a new epoch's batch 0..0 is not the old one's.
            if let Some(i) = q.iter().position(|p| {
                p.epoch == b.epoch && p.first_seq == b.first_seq && p.last_seq == b.last_seq
            }) {
                q.drain(..=i);
            }
            if q.is_empty() {
                self.in_flight.remove(&b.producer_id);
            }
        }
    }

    /// Leadership changed: what this node proposed may never commit.
    pub fn clear(&mut self) {
        self.in_flight.clear();
    }
}

/// The name the producer machine has in every partition (and in its snapshots).
pub const MACHINE: &str = "producers";

/// The producer state as a partition state machine: the committed table, applied in log order
/// on every replica and carried in the snapshot, and the leader's in-flight view, consulted and
/// extended under the partition's append gate, so a check and its proposal are one step.
pub struct ProducerMachine {
    expiration_ms: i64,
    committed: Mutex<ProducerTable>,
    leader: Mutex<LeaderView>,
    /// Bumped after every applied batch, for answers that wait for a batch to commit.
    applied: watch::Sender<u64>,
}

impl ProducerMachine {
    pub fn new(expiration_ms: i64) -> ProducerMachine {
        ProducerMachine {
            expiration_ms,
            committed: Mutex::new(ProducerTable::default()),
            leader: Mutex::new(LeaderView::default()),
            applied: watch::channel(0).0,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ProducerTable> {
        // Each update finishes before the lock is released; a poisoned table is still whole.
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self) -> std::sync::MutexGuard<'_, LeaderView> {
        self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the committed table (for DescribeProducers and the admin view).
    pub fn snapshot_table(&self) -> ProducerTable {
        self.table().clone()
    }

    /// The committed batch of `b`'s producer, epoch and sequence range, if there is one.
    pub fn committed_batch(&self, b: &ProducerBatch) -> Option<BatchMeta> {
        let t = self.table();
        let e = t.get(b.producer_id).filter(|e| e.epoch == b.epoch)?;
        e.batches
            .iter()
            .find(|d| d.first_seq == b.first_seq && d.last_seq == b.last_seq)
            .copied()
    }

    /// Changes after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

/// The producer fields of a stored or proposed batch; `None` without a producer id.
pub fn producer_batch(batch: &[u8]) -> Option<ProducerBatch> {
    let h = sluice_storage::batch::parse_header(batch).ok()?;
    ProducerBatch::from_header(
        h.producer_id,
        h.producer_epoch,
        h.base_sequence,
        h.last_offset_delta,
        h.max_timestamp,
    )
}

impl PartitionStm for ProducerMachine {
    fn name(&self) -> &str {
        MACHINE
    }

    fn apply(&self, entry: &CommittedBatch<'_>) -> Result<(), StmError> {
        let Some(b) = producer_batch(entry.batch) else {
            return Ok(());
        };
        self.table()
            .apply(&b, entry.base_offset, entry.last_offset, self.expiration_ms);
        self.view().committed(&b);
        self.applied.send_modify(|v| *v += 1);
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.table()).unwrap_or_default()
    }

    fn restore(&self, snapshot: Option<&[u8]>) -> Result<(), StmError> {
        let table = match snapshot {
            None => ProducerTable::default(),
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| StmError::new(MACHINE, format!("bad producer snapshot: {e}")))?,
        };
        *self.table() = table;
        self.view().clear();
        self.applied.send_modify(|v| *v += 1);
        Ok(())
    }

    fn propose(&self, batch: &ProposedBatch<'_>) -> Result<(), StmError> {
        let Some(b) = producer_batch(batch.batch) else {
            return Ok(());
        };
        let verdict = {
            let table = self.table();
            self.view().check(&table, &b)
        };
        // DELIBERATELY BROKEN with `--features chaos-bugs` and SLUICE_CHAOS_BUG=no-dedup, for the
        // chaos harness to catch: a resend of a recent batch is appended again instead of being
        // answered with its original offsets, so a retried value is stored twice.
        #[cfg(feature = "chaos-bugs")]
        let verdict = match verdict {
            Verdict::Duplicate(_) | Verdict::DuplicateInFlight
                if crate::chaos_bugs::enabled("no-dedup") =>
            {
                Verdict::Append
            }
            v => v,
        };
        if verdict == Verdict::Append {
            self.view().proposed(&b);
            return Ok(());
        }
        Err(StmError::refused(
            MACHINE,
            format!(
                "producer {} epoch {} sequence {}..={}: {verdict:?}",
                b.producer_id, b.epoch, b.first_seq, b.last_seq
            ),
            verdict,
        ))
    }

    fn reset_in_flight(&self, _leader_term: Option<u64>) {
        self.view().clear();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The committed producer table of a partition this node leads, or the error Kafka answers.
pub fn leader_table(
    broker: &Broker,
    topic: &str,
    partition: PartitionId,
) -> Result<ProducerTable, (ErrorCode, String)> {
    let known = broker
        .state()
        .topics
        .get(topic)
        .is_some_and(|t| partition.index() < t.partitions.len());
    if !known {
        return Err((
            ErrorCode::UnknownTopicOrPartition,
            format!("no partition {partition} of topic '{topic}'"),
        ));
    }
    let not_leader = || {
        (
            ErrorCode::NotLeaderOrFollower,
            "this broker does not lead the partition".to_string(),
        )
    };
    let group = broker.partition(topic, partition).ok_or_else(not_leader)?;
    if !group.is_leader() {
        return Err(not_leader());
    }
    group
        .with_machine(MACHINE, |m: &ProducerMachine| m.snapshot_table())
        .ok_or_else(not_leader)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn batch(pid: i64, epoch: i16, first: i32, count: i32, ts: i64) -> ProducerBatch {
        ProducerBatch::from_header(pid, epoch, first, count - 1, ts).unwrap()
    }

    /// Checks, proposes and commits `b` at `offset` the way a leader does.
    fn write(t: &mut ProducerTable, v: &mut LeaderView, b: &ProducerBatch, offset: i64) -> Verdict {
        let verdict = v.check(t, b);
        if verdict == Verdict::Append {
            v.proposed(b);
            let last = offset + i64::from(b.last_seq - b.first_seq);
            t.apply(b, offset, last, DAY);
            v.committed(b);
        }
        verdict
    }

    #[test]
    fn a_resent_batch_is_a_duplicate_with_its_original_offsets() {
        let (mut t, mut v) = (ProducerTable::default(), LeaderView::default());
        assert_eq!(
            write(&mut t, &mut v, &batch(7, 0, 0, 3, 1), 100),
            Verdict::Append
        );
        assert_eq!(
            write(&mut t, &mut v, &batch(7, 0, 3, 2, 2), 103),
            Verdict::Append
        );
        let want = BatchMeta {
            first_seq: 0,
            last_seq: 2,
            base_offset: 100,
            last_offset: 102,
        };
        assert_eq!(
            write(&mut t, &mut v, &batch(7, 0, 0, 3, 1), 999),
            Verdict::Duplicate(want)
        );
        // Only the last five are remembered; older ones are out of order, not duplicates.
        for i in 0..5 {
            assert_eq!(
                write(&mut t, &mut v, &batch(7, 0, 5 + i, 1, 3), 105 + i as i64),
                Verdict::Append
            );
        }
        assert_eq!(
            write(&mut t, &mut v, &batch(7, 0, 0, 3, 1), 999),
            Verdict::OutOfOrder { expected: 10 }
        );
    }

    #[test]
    fn gaps_stale_epochs_and_unknown_producers_are_refused() {
        let (mut t, mut v) = (ProducerTable::default(), LeaderView::default());
        assert_eq!(
            write(&mut t, &mut v, &batch(1, 0, 5, 1, 1), 0),
            Verdict::UnknownProducer
        );
        assert_eq!(
            write(&mut t, &mut v, &batch(1, 0, 0, 2, 1), 0),
            Verdict::Append
        );
        assert_eq!(
            write(&mut t, &mut v, &batch(1, 0, 3, 1, 1), 2),
            Verdict::OutOfOrder { expected: 2 }
        );
        // A bumped epoch starts at 0 and fences the old one.
        assert_eq!(
            write(&mut t, &mut v, &batch(1, 1, 4, 1, 1), 2),
            Verdict::OutOfOrder { expected: 0 }
        );
        assert_eq!(
            write(&mut t, &mut v, &batch(1, 1, 0, 1, 1), 2),
            Verdict::Append
        );
        assert_eq!(
            write(&mut t, &mut v, &batch(1, 0, 2, 1, 1), 3),
            Verdict::StaleEpoch { current: 1 }
        );
    }

    #[test]
    fn in_flight_batches_count_for_sequence_and_duplicates() {
        let (t, mut v) = (ProducerTable::default(), LeaderView::default());
        let first = batch(3, 0, 0, 2, 1);
        v.proposed(&first);
        assert_eq!(v.check(&t, &first), Verdict::DuplicateInFlight);
        assert_eq!(v.check(&t, &batch(3, 0, 2, 1, 1)), Verdict::Append);
        assert_eq!(
            v.check(&t, &batch(3, 0, 5, 1, 1)),
            Verdict::OutOfOrder { expected: 2 }
        );
        // A new leader knows only what committed.
        v.clear();
        assert_eq!(v.check(&t, &batch(3, 0, 2, 1, 1)), Verdict::UnknownProducer);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let (mut t, mut v) = (ProducerTable::default(), LeaderView::default());
        let near_end = batch(9, 0, 0, 1, 1);
        write(&mut t, &mut v, &near_end, 0);
        let mut b = batch(9, 0, 1, 1, 1);
        b.first_seq = i32::MAX - 1;
        b.last_seq = i32::MAX;
        t.apply(&b, 1, 1, DAY);
        let wrapped = ProducerBatch::from_header(9, 0, 0, 1, 1).unwrap();
        assert_eq!(v.check(&t, &wrapped), Verdict::Append);
        assert_eq!(
            ProducerBatch::from_header(9, 0, i32::MAX, 2, 1)
                .unwrap()
                .last_seq,
            1
        );
    }

    #[test]
    fn idle_producers_expire_on_the_partitions_clock_the_same_on_every_replica() {
        let mut a = ProducerTable::default();
        let mut v = LeaderView::default();
        write(&mut a, &mut v, &batch(1, 0, 0, 1, 1_000), 0);
        write(&mut a, &mut v, &batch(2, 0, 0, 1, 1_000 + DAY / 2), 1);
        let mut b = a.clone();
        // A day and a bit later by the batches' clock, producer 1 is gone, producer 2 is not.
        write(&mut a, &mut v, &batch(3, 0, 0, 1, 2_000 + DAY), 2);
        b.apply(&batch(3, 0, 0, 1, 2_000 + DAY), 2, 2, DAY);
        assert!(a.get(1).is_none() && a.get(2).is_some());
        assert_eq!(a, b);
        let json = serde_json::to_vec(&a).unwrap();
        assert_eq!(serde_json::from_slice::<ProducerTable>(&json).unwrap(), a);
        // A producer writing old timestamps (a replay) is as recent as the clock when it writes.
        write(&mut a, &mut v, &batch(4, 0, 0, 1, 5), 3);
        write(&mut a, &mut v, &batch(5, 0, 0, 1, 2_000 + DAY + DAY / 2), 4);
        assert!(a.get(4).is_some(), "a producer that just wrote expired");
        // Batches without a producer id are not tracked.
        assert!(ProducerBatch::from_header(-1, -1, -1, 0, 5).is_none());
    }
}
