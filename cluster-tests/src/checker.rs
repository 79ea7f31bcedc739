//! Safety checker over a history, in the style of Jepsen's Kafka checker.
//!
//! Anomalies (each is a safety violation; any of them fails the run):
//! * `lost` — an acknowledged write that no poll ever returned although polls of its partition
//!   reached past its acknowledged offset; or one that polls did return but the final drain,
//!   which read the partition past its offset, did not (the log lost it later); or, on a
//!   partition the final drain could not read at all, one past the end of every replica's log.
//! * `unseen` — an acknowledged write never read at all, even by the final drain (which reads
//!   every partition up to its high watermark after the cluster healed).
//! * `inconsistent_offsets` — two different values at one offset (by reads or acks).
//! * `ack_mismatch` — a write read at an offset other than the one it was acknowledged at.
//! * `duplicates` — one value read at two different offsets, or in two partitions. Every value
//!   is produced once: a plain producer never resends, and an idempotent producer's resends
//!   must be answered from the broker's producer state, not appended again. Counted per
//!   producer kind as well.
//! * `nonmonotonic_poll` / `skipped_poll` — within one consumer session (process + partition),
//!   a poll went backwards, or jumped over offsets (offsets are dense: Raft-internal entries
//!   take none).
//! * `failed_read` — a read of a write whose produce definitely failed.
//! * `phantom` — a read of a value never written to that partition.
//! * `pipeline_reordered` — produce requests one producer pipelined on one connection were
//!   acknowledged at offsets out of request order (Kafka appends a connection's requests in the
//!   order they were sent, whatever order the acknowledgements arrive in).
//! * `log_start_moved` — a fetch reported a log start offset above 0. Chaos runs have no
//!   retention, so nothing may ever have been deleted from the front of a log: a consumer must
//!   always be able to read from 0. (With retention, the floor would be the start retention
//!   reported instead of 0.)
//!
//! The metadata workload's anomalies are in [`crate::metacheck`], the consumer group's
//! (`commit_backwards`, `commit_skipped`, `group_unverified`) in [`crate::groupcheck`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{json, Value};

use crate::history::{Op, OpType, ProducerKind, F};

/// How many examples of each anomaly the summary keeps.
const EXAMPLES_MAX: usize = 8;

pub const ANOMALIES: &[&str] = &[
    "lost",
    "unseen",
    "inconsistent_offsets",
    "ack_mismatch",
    "duplicates",
    "nonmonotonic_poll",
    "skipped_poll",
    "failed_read",
    "phantom",
    "pipeline_reordered",
    "log_start_moved",
];

#[derive(Debug, Clone, Default, Serialize)]
pub struct OpCounts {
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
}

/// What the idempotent producers did to get definite answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdempotentStats {
    /// Values whose batch was sent more than once.
    pub resent_values: usize,
    /// Sends beyond the first, over all values.
    pub resends: u64,
    /// Acknowledged values that needed a resend (the answer came to a resend).
    pub acked_after_resend: usize,
    /// InitProducerId answers: new ids, and epoch bumps (re-initialisations).
    pub new_ids: usize,
    pub epoch_bumps: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub valid: bool,
    pub anomaly_counts: BTreeMap<String, usize>,
    pub examples: BTreeMap<String, Vec<Value>>,
    pub send: OpCounts,
    /// The same by producer kind (plain, idempotent).
    pub send_by_producer: BTreeMap<String, OpCounts>,
    /// `duplicates` by the kind of producer that wrote the value.
    pub duplicates_by_producer: BTreeMap<String, usize>,
    pub idempotent: IdempotentStats,
    pub poll: OpCounts,
    /// Distinct values read, over all partitions.
    pub values_read: usize,
    /// Acknowledged writes per partition.
    pub acked_by_partition: BTreeMap<i32, usize>,
    /// Highest offset read per partition.
    pub max_read_offset: BTreeMap<i32, i64>,
    /// Writes with unknown outcome that were read (so they did happen) / never read.
    pub info_writes_read: usize,
    pub info_writes_unread: usize,
    /// Availability, not safety: the longest stretch without an acknowledged write, as
    /// (seconds, from, to) in seconds since the start.
    pub longest_ack_gap: Option<(f64, f64, f64)>,
    /// The same per partition.
    pub longest_ack_gap_by_partition: BTreeMap<i32, (f64, f64, f64)>,
    /// Metadata workload operations by kind (create_topic, create_partitions, delete_topic,
    /// list_topics, metadata_final) and outcome.
    pub metadata_ops: BTreeMap<String, OpCounts>,
    /// The consumer-group workload's figures; None when the history has no group.
    pub group: Option<crate::groupcheck::GroupStats>,
}

impl CheckResult {
    pub fn anomaly_total(&self) -> usize {
        self.anomaly_counts.values().sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteStatus {
    Pending,
    Ok(i64),
    Fail,
    Info,
}

#[derive(Debug, Clone)]
struct Write {
    partition: i32,
    status: WriteStatus,
    process: i64,
    kind: ProducerKind,
}

pub(crate) struct Anomalies {
    counts: BTreeMap<String, usize>,
    examples: BTreeMap<String, Vec<Value>>,
}

impl Anomalies {
    fn new() -> Self {
        Anomalies {
            counts: ANOMALIES
                .iter()
                .chain(crate::metacheck::ANOMALIES)
                .chain(crate::groupcheck::ANOMALIES)
                .map(|a| (a.to_string(), 0))
                .collect(),
            examples: BTreeMap::new(),
        }
    }
    pub(crate) fn add(&mut self, kind: &str, example: Value) {
        *self.counts.entry(kind.to_string()).or_default() += 1;
        let ex = self.examples.entry(kind.to_string()).or_default();
        if ex.len() < EXAMPLES_MAX {
            ex.push(example);
        }
    }
}

pub fn check(ops: &[Op]) -> CheckResult {
    check_with(ops, &BTreeMap::new())
}

/// [`check`], knowing which partitions the final drain could not read (no leader after the
/// heal, e.g. when every replica lost acknowledged entries and none may vote): for each, the
/// highest end offset any replica's log holds on disk. An acknowledged write at or past it is
/// on no replica any more: `lost`, even if polls read it earlier.
pub fn check_with(ops: &[Op], undrained: &BTreeMap<i32, i64>) -> CheckResult {
    let mut an = Anomalies::new();
    let mut send = OpCounts::default();
    let mut poll = OpCounts::default();

    // Writes by value, from invocations and their completions.
    let mut writes: HashMap<u64, Write> = HashMap::new();
    let mut send_by_producer: BTreeMap<String, OpCounts> = BTreeMap::new();
    let mut idempotent = IdempotentStats::default();
    for op in ops.iter().filter(|o| o.f == F::Send) {
        let Some(v) = op.value else { continue };
        // Histories from before idempotent producers name no kind: they were all plain.
        let kind = op.producer.unwrap_or(ProducerKind::Plain);
        let new = |status| Write {
            partition: op.partition,
            status,
            process: op.process,
            kind,
        };
        if op.kind != OpType::Invoke {
            let c = send_by_producer.entry(kind.name().to_string()).or_default();
            match op.kind {
                OpType::Ok => c.ok += 1,
                OpType::Fail => c.fail += 1,
                _ => c.info += 1,
            }
            if let Some(n) = op.attempts.filter(|n| *n > 1) {
                idempotent.resent_values += 1;
                idempotent.resends += u64::from(n - 1);
                if op.kind == OpType::Ok {
                    idempotent.acked_after_resend += 1;
                }
            }
        }
        match op.kind {
            OpType::Invoke => {
                writes.insert(v, new(WriteStatus::Pending));
            }
            OpType::Ok => {
                send.ok += 1;
                let w = writes.entry(v).or_insert(new(WriteStatus::Pending));
                w.status = WriteStatus::Ok(op.offset.unwrap_or(-1));
            }
            OpType::Fail => {
                send.fail += 1;
                if let Some(w) = writes.get_mut(&v) {
                    w.status = WriteStatus::Fail;
                }
            }
            OpType::Info => {
                send.info += 1;
                if let Some(w) = writes.get_mut(&v) {
                    w.status = WriteStatus::Info;
                }
            }
        }
    }
    for op in ops
        .iter()
        .filter(|o| o.f == F::InitProducerId && o.kind == OpType::Ok)
    {
        if op.epoch.is_some_and(|e| e > 0) {
            idempotent.epoch_bumps += 1;
        } else {
            idempotent.new_ids += 1;
        }
    }

    // Every (partition, offset) -> values, and value -> offsets, from reads.
    let mut at_offset: BTreeMap<(i32, i64), BTreeSet<u64>> = BTreeMap::new();
    let mut read_offsets: HashMap<u64, BTreeSet<i64>> = HashMap::new();
    // Where each value was read: (partition, offset).
    let mut read_at: HashMap<u64, BTreeSet<(i32, i64)>> = HashMap::new();
    let mut max_read: BTreeMap<i32, i64> = BTreeMap::new();
    // Session state: (process, partition) -> next expected offset.
    let mut sessions: HashMap<(i64, i32), i64> = HashMap::new();
    for op in ops.iter().filter(|o| o.f == F::Poll) {
        match op.kind {
            OpType::Invoke => continue,
            OpType::Fail => {
                poll.fail += 1;
                continue;
            }
            OpType::Info => {
                poll.info += 1;
                continue;
            }
            OpType::Ok => poll.ok += 1,
        }
        let p = op.partition;
        let msgs = op.msgs.as_deref().unwrap_or(&[]);
        let mut expected = op.offset;
        if let Some(prev) = sessions.get(&(op.process, p)) {
            // The consumer's own position should continue where the last poll ended; the
            // broker's answer is checked against the position actually asked for.
            expected = expected.or(Some(*prev));
        }
        for &(o, v) in msgs {
            if let Some(e) = expected {
                if o < e {
                    an.add(
                        "nonmonotonic_poll",
                        json!({"process": op.process, "partition": p, "expected": e, "got": o, "value": v, "time": op.time}),
                    );
                } else if o > e {
                    an.add(
                        "skipped_poll",
                        json!({"process": op.process, "partition": p, "expected": e, "got": o, "value": v, "time": op.time}),
                    );
                }
            }
            expected = Some(o + 1);
            at_offset.entry((p, o)).or_default().insert(v);
            read_offsets.entry(v).or_default().insert(o);
            read_at.entry(v).or_default().insert((p, o));
            let m = max_read.entry(p).or_insert(-1);
            *m = (*m).max(o);
            match writes.get(&v) {
                None => an.add(
                    "phantom",
                    json!({"partition": p, "offset": o, "value": v, "why": "never written"}),
                ),
                Some(w) if w.partition != p => an.add(
                    "phantom",
                    json!({"partition": p, "offset": o, "value": v, "why": format!("written to partition {}", w.partition)}),
                ),
                Some(w) if w.status == WriteStatus::Fail => an.add(
                    "failed_read",
                    json!({"partition": p, "offset": o, "value": v, "writer": w.process}),
                ),
                _ => {}
            }
        }
        if let Some(e) = expected {
            sessions.insert((op.process, p), e);
        }
    }

    // Acknowledged offsets join the read ones for the offset-consistency check.
    let mut acked_by_partition: BTreeMap<i32, usize> = BTreeMap::new();
    let mut acked: Vec<(u64, &Write, i64)> = writes
        .iter()
        .filter_map(|(v, w)| match w.status {
            WriteStatus::Ok(o) => Some((*v, w, o)),
            _ => None,
        })
        .collect();
    acked.sort_by_key(|(v, w, o)| (w.partition, *o, *v));
    let mut claims: BTreeMap<(i32, i64), BTreeSet<u64>> = at_offset.clone();
    for (v, w, o) in &acked {
        *acked_by_partition.entry(w.partition).or_default() += 1;
        if *o >= 0 {
            claims.entry((w.partition, *o)).or_default().insert(*v);
        }
    }
    for ((p, o), vals) in &claims {
        if vals.len() > 1 {
            an.add(
                "inconsistent_offsets",
                json!({"partition": p, "offset": o, "values": vals}),
            );
        }
    }
    let mut duplicates_by_producer: BTreeMap<String, usize> = BTreeMap::new();
    let mut dup_values: Vec<(&u64, &BTreeSet<(i32, i64)>)> =
        read_at.iter().filter(|(_, at)| at.len() > 1).collect();
    // Sorted so the examples kept are the earliest, whatever the hash order.
    dup_values.sort();
    for (v, at) in dup_values {
        let w = writes.get(v);
        let kind = w.map_or("unknown", |w| w.kind.name());
        *duplicates_by_producer.entry(kind.to_string()).or_default() += 1;
        let status = match w.map(|w| w.status) {
            Some(WriteStatus::Ok(o)) => format!("acked at {o}"),
            Some(WriteStatus::Fail) => "failed".into(),
            Some(WriteStatus::Info) => "unknown outcome".into(),
            Some(WriteStatus::Pending) => "no completion".into(),
            None => "never written".into(),
        };
        an.add(
            "duplicates",
            json!({"partition": w.map_or(-1, |w| w.partition), "value": v, "producer": kind,
                   "read_at": at, "write": status}),
        );
    }
    // What the final drain read: the log as it ended up, per partition.
    let mut drained: HashMap<i32, (i64, BTreeSet<u64>)> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::Poll && o.kind == OpType::Ok && o.drain)
    {
        let d = drained.entry(op.partition).or_insert((-1, BTreeSet::new()));
        for &(o, v) in op.msgs.as_deref().unwrap_or(&[]) {
            d.0 = d.0.max(o);
            d.1.insert(v);
        }
    }
    let mut info_read = 0;
    let mut info_unread = 0;
    for (v, w) in &writes {
        if matches!(w.status, WriteStatus::Info | WriteStatus::Pending) {
            if read_offsets.contains_key(v) {
                info_read += 1;
            } else {
                info_unread += 1;
            }
        }
    }
    for (v, w, o) in &acked {
        let p = w.partition;
        if let Some(end) = undrained.get(&p).filter(|end| *o >= **end) {
            an.add(
                "lost",
                json!({"partition": p, "value": v, "acked_offset": o, "replicas_end": end,
                       "why": "no replica's log reaches its offset (the final drain could not read the partition)"}),
            );
            continue;
        }
        match read_offsets.get(v) {
            Some(offs) => {
                if !offs.contains(o) {
                    an.add(
                        "ack_mismatch",
                        json!({"partition": p, "value": v, "acked_offset": o, "read_offsets": offs}),
                    );
                }
                if let Some((hi, vals)) = drained.get(&p) {
                    if *o < *hi && !vals.contains(v) {
                        an.add(
                            "lost",
                            json!({"partition": p, "value": v, "acked_offset": o, "drained_up_to": hi,
                                   "why": "read earlier, missing from the final drain"}),
                        );
                    }
                }
            }
            None => {
                let hi = max_read.get(&p).copied().unwrap_or(-1);
                if *o < hi {
                    an.add(
                        "lost",
                        json!({"partition": p, "value": v, "acked_offset": o, "max_read_offset": hi}),
                    );
                } else {
                    an.add(
                        "unseen",
                        json!({"partition": p, "value": v, "acked_offset": o, "max_read_offset": hi}),
                    );
                }
            }
        }
    }

    // Pipelined requests: acknowledged offsets must follow request (= invocation) order.
    let mut pipelines: BTreeMap<u64, (i32, Vec<u64>)> = BTreeMap::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::Send && o.kind == OpType::Invoke)
    {
        if let (Some(id), Some(v)) = (op.pipeline, op.value) {
            pipelines
                .entry(id)
                .or_insert_with(|| (op.partition, Vec::new()))
                .1
                .push(v);
        }
    }
    for (id, (p, values)) in &pipelines {
        let acked: Vec<(u64, i64)> = values
            .iter()
            .filter_map(|v| match writes.get(v).map(|w| w.status) {
                Some(WriteStatus::Ok(o)) => Some((*v, o)),
                _ => None,
            })
            .collect();
        if acked.windows(2).any(|w| w[1].1 <= w[0].1) {
            an.add(
                "pipeline_reordered",
                json!({"pipeline": id, "partition": p, "request_order": values,
                       "acked_value_offsets": acked}),
            );
        }
    }

    // No retention in chaos runs: the log must always start at 0.
    let mut moved: BTreeSet<(i32, i64)> = BTreeSet::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::Poll && o.kind != OpType::Invoke)
    {
        if let Some(s) = op.log_start.filter(|s| *s > 0) {
            if moved.insert((op.partition, s)) {
                an.add(
                    "log_start_moved",
                    json!({"partition": op.partition, "log_start": s, "fetch_offset": op.offset,
                           "process": op.process, "time": op.time, "error": op.error}),
                );
            }
        }
    }

    crate::metacheck::check(ops, &mut an);
    let acked_writes: Vec<(u64, i32, i64)> = acked
        .iter()
        .map(|(v, w, o)| (*v, w.partition, *o))
        .collect();
    let group = crate::groupcheck::check(ops, &acked_writes, &mut an);
    let mut metadata_ops: BTreeMap<String, OpCounts> = BTreeMap::new();
    for op in ops.iter().filter(|o| {
        matches!(
            o.f,
            F::CreateTopic
                | F::CreatePartitions
                | F::DeleteTopic
                | F::ListTopics
                | F::MetadataFinal
        )
    }) {
        let name = serde_json::to_value(op.f)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let c = metadata_ops.entry(name).or_default();
        match op.kind {
            OpType::Invoke => {}
            OpType::Ok => c.ok += 1,
            OpType::Fail => c.fail += 1,
            OpType::Info => c.info += 1,
        }
    }

    let longest_gap = |part: Option<i32>| {
        let mut t: Vec<u64> = ops
            .iter()
            .filter(|o| o.f == F::Send && o.kind == OpType::Ok)
            .filter(|o| part.is_none_or(|p| o.partition == p))
            .map(|o| o.time)
            .collect();
        t.sort_unstable();
        t.windows(2)
            .map(|w| (w[1] - w[0], w[0], w[1]))
            .max()
            .map(|(g, a, b)| (g as f64 / 1e9, a as f64 / 1e9, b as f64 / 1e9))
    };
    let longest_ack_gap = longest_gap(None);
    let longest_ack_gap_by_partition = acked_by_partition
        .keys()
        .filter_map(|p| longest_gap(Some(*p)).map(|g| (*p, g)))
        .collect();

    let total: usize = an.counts.values().sum();
    CheckResult {
        group,
        metadata_ops,
        longest_ack_gap,
        longest_ack_gap_by_partition,
        valid: total == 0,
        anomaly_counts: an.counts,
        examples: an.examples,
        send,
        send_by_producer,
        duplicates_by_producer,
        idempotent,
        poll,
        values_read: read_offsets.len(),
        acked_by_partition,
        max_read_offset: max_read,
        info_writes_read: info_read,
        info_writes_unread: info_unread,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories tersely: `w(p, v, offset)` an acked write, `poll(proc, p, from, pairs)`.
    struct H(Vec<Op>);
    impl H {
        fn new() -> H {
            H(Vec::new())
        }
        fn write(mut self, p: i32, v: u64, result: OpType, offset: Option<i64>) -> H {
            self.0.push(Op::new(0, OpType::Invoke, F::Send, p).value(v));
            let mut done = Op::new(0, result, F::Send, p).value(v);
            done.offset = offset;
            self.0.push(done);
            self
        }
        fn ack(self, p: i32, v: u64, o: i64) -> H {
            self.write(p, v, OpType::Ok, Some(o))
        }
        fn poll(mut self, proc_: i64, p: i32, from: i64, pairs: &[(i64, u64)]) -> H {
            self.0
                .push(Op::new(proc_, OpType::Invoke, F::Poll, p).offset(from));
            self.0.push(
                Op::new(proc_, OpType::Ok, F::Poll, p)
                    .offset(from)
                    .msgs(pairs.to_vec()),
            );
            self
        }
        fn check(&self) -> CheckResult {
            check(&self.0)
        }
    }

    fn only(r: &CheckResult, kind: &str) {
        assert!(!r.valid, "{kind} not detected");
        assert!(r.anomaly_counts[kind] > 0, "{kind}: {:?}", r.anomaly_counts);
        for (k, n) in &r.anomaly_counts {
            if k != kind {
                assert_eq!(
                    *n, 0,
                    "unexpected {k} while testing {kind}: {:?}",
                    r.examples
                );
            }
        }
    }

    fn clean() -> H {
        H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .ack(1, 3, 0)
            .write(0, 4, OpType::Info, None)
            .write(0, 5, OpType::Fail, None)
            .ack(0, 6, 3)
            .poll(10, 0, 0, &[(0, 1), (1, 2)])
            .poll(10, 0, 2, &[(2, 4), (3, 6)])
            .poll(11, 1, 0, &[(0, 3)])
    }

    #[test]
    fn clean_history_is_valid() {
        let r = clean().check();
        assert!(r.valid, "{:?}", r.examples);
        assert_eq!(r.send.ok, 4);
        assert_eq!(r.send.fail, 1);
        assert_eq!(r.send.info, 1);
        assert_eq!(r.poll.ok, 3);
        assert_eq!(r.info_writes_read, 1);
        assert_eq!(r.max_read_offset[&0], 3);
    }

    #[test]
    fn detects_lost_write() {
        // Offset 1 was acked, offset 2 read, 1 never read.
        let r = H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .ack(0, 3, 2)
            .poll(10, 0, 0, &[(0, 1)])
            .poll(11, 0, 2, &[(2, 3)])
            .check();
        only(&r, "lost");
        assert_eq!(r.examples["lost"][0]["value"], 2);
    }

    #[test]
    fn detects_a_write_read_once_and_missing_from_the_final_drain() {
        let mut h =
            H::new()
                .ack(0, 1, 0)
                .ack(0, 2, 1)
                .ack(0, 3, 2)
                .poll(10, 0, 0, &[(0, 1), (1, 2)]);
        // The drain reads past offset 1 and finds value 3 where 2 was: 2 is gone from the log.
        h = h.poll(11, 0, 0, &[(0, 1), (1, 3), (2, 3)]);
        let n = h.0.len();
        h.0[n - 1].drain = true;
        h.0[n - 2].drain = true;
        let r = h.check();
        assert!(!r.valid);
        assert_eq!(r.anomaly_counts["lost"], 1, "{:?}", r.examples);
        assert_eq!(r.examples["lost"][0]["value"], 2);
        // The same reads outside the drain prove nothing about the final log.
        let r = H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .poll(10, 0, 0, &[(0, 1), (1, 2)])
            .poll(11, 0, 0, &[(0, 1)])
            .check();
        assert!(r.valid, "{:?}", r.examples);
    }

    #[test]
    fn a_write_past_every_replicas_end_is_lost_when_the_drain_cannot_read() {
        let h = H::new().ack(0, 1, 0).ack(0, 2, 1).ack(0, 3, 2).poll(
            10,
            0,
            0,
            &[(0, 1), (1, 2), (2, 3)],
        );
        // Every value was read during the run; the partition then lost offsets 1.. on every
        // replica, and the drain got no leader.
        let r = check_with(&h.0, &BTreeMap::from([(0, 1)]));
        assert!(!r.valid);
        assert_eq!(r.anomaly_counts["lost"], 2, "{:?}", r.examples);
        // Without that knowledge the same history passes: the drain proved nothing.
        assert!(h.check().valid);
        // A replica that still holds every acknowledged offset loses nothing.
        assert!(check_with(&h.0, &BTreeMap::from([(0, 3)])).valid);
    }

    #[test]
    fn detects_unseen_write() {
        let r = H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .poll(10, 0, 0, &[(0, 1)])
            .check();
        only(&r, "unseen");
    }

    #[test]
    fn detects_two_values_at_one_offset() {
        let r = H::new()
            .write(0, 1, OpType::Info, None)
            .write(0, 2, OpType::Info, None)
            .poll(10, 0, 0, &[(0, 1)])
            .poll(11, 0, 0, &[(0, 2)])
            .check();
        only(&r, "inconsistent_offsets");
    }

    #[test]
    fn detects_ack_offset_differing_from_read_offset() {
        let r = H::new()
            .write(0, 1, OpType::Info, None)
            .ack(0, 2, 0)
            .poll(10, 0, 0, &[(0, 1), (1, 2)])
            .check();
        // Offset 0 is claimed by the ack of 2 and the read of 1; 2 is read at 1, acked at 0.
        assert!(!r.valid);
        assert_eq!(r.anomaly_counts["ack_mismatch"], 1);
        assert_eq!(r.anomaly_counts["inconsistent_offsets"], 1);
        assert_eq!(r.anomaly_counts["lost"], 0);
    }

    #[test]
    fn detects_duplicates() {
        let r = H::new()
            .write(0, 1, OpType::Info, None)
            .ack(0, 2, 2)
            .poll(10, 0, 0, &[(0, 1), (1, 1), (2, 2)])
            .check();
        only(&r, "duplicates");
        // Sends without a producer kind (older histories) are plain producers'.
        assert_eq!(r.duplicates_by_producer["plain"], 1);
    }

    /// An idempotent producer's write of `v` (producer 7, epoch 0, sequence `seq`), sent
    /// `attempts` times.
    fn idem(
        mut h: H,
        p: i32,
        v: u64,
        seq: i32,
        result: OpType,
        offset: Option<i64>,
        attempts: u32,
    ) -> H {
        h.0.push(
            Op::new(0, OpType::Invoke, F::Send, p)
                .value(v)
                .producer(ProducerKind::Idempotent)
                .ids(7, 0)
                .seq(seq),
        );
        let mut done = Op::new(0, result, F::Send, p)
            .value(v)
            .producer(ProducerKind::Idempotent)
            .ids(7, 0)
            .seq(seq)
            .attempts(attempts);
        done.offset = offset;
        h.0.push(done);
        h
    }

    #[test]
    fn idempotent_resends_answered_with_the_original_offset_are_valid() {
        let h = idem(H::new(), 0, 1, 0, OpType::Ok, Some(0), 3);
        let h = idem(h, 0, 2, 1, OpType::Ok, Some(1), 1);
        let r = h
            .ack(0, 3, 2)
            .poll(10, 0, 0, &[(0, 1), (1, 2), (2, 3)])
            .check();
        assert!(r.valid, "{:?}", r.examples);
        assert_eq!(r.idempotent.resent_values, 1);
        assert_eq!(r.idempotent.resends, 2);
        assert_eq!(r.idempotent.acked_after_resend, 1);
        assert_eq!(r.send_by_producer["idempotent"].ok, 2);
        assert_eq!(r.send_by_producer["plain"].ok, 1);
        assert!(r.duplicates_by_producer.is_empty());
    }

    #[test]
    fn detects_an_idempotent_resend_appended_twice() {
        // The first send of 1 was appended at 0 and its answer lost; the broker appended the
        // resend again at 1 and acknowledged that: 1 is stored twice.
        let h = idem(H::new(), 0, 1, 0, OpType::Ok, Some(1), 2);
        let r = idem(h, 0, 2, 1, OpType::Ok, Some(2), 1)
            .poll(10, 0, 0, &[(0, 1), (1, 1), (2, 2)])
            .check();
        only(&r, "duplicates");
        assert_eq!(r.duplicates_by_producer["idempotent"], 1);
        assert_eq!(r.examples["duplicates"][0]["value"], 1);
        assert_eq!(r.examples["duplicates"][0]["producer"], "idempotent");
        // The same with an unknown outcome (the producer gave up): still stored twice.
        let h = idem(H::new(), 0, 1, 0, OpType::Info, None, 4);
        let r = h.poll(10, 0, 0, &[(0, 1), (1, 1)]).check();
        only(&r, "duplicates");
    }

    #[test]
    fn a_value_in_two_partitions_is_a_duplicate_of_any_producer() {
        let r = H::new()
            .ack(0, 1, 0)
            .poll(10, 0, 0, &[(0, 1)])
            .poll(11, 1, 0, &[(0, 1)])
            .check();
        assert!(!r.valid);
        assert_eq!(r.anomaly_counts["duplicates"], 1, "{:?}", r.examples);
        assert_eq!(r.duplicates_by_producer["plain"], 1);
        // Read in the partition it was not written to, it is also a phantom there.
        assert_eq!(r.anomaly_counts["phantom"], 1);
    }

    #[test]
    fn detects_nonmonotonic_poll() {
        let r = H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .poll(10, 0, 0, &[(0, 1), (1, 2), (0, 1)])
            .check();
        only(&r, "nonmonotonic_poll");
    }

    #[test]
    fn detects_skipped_poll() {
        let r = H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .ack(0, 3, 2)
            .poll(10, 0, 0, &[(0, 1)])
            .poll(10, 0, 1, &[(2, 3)])
            .poll(11, 0, 0, &[(0, 1), (1, 2), (2, 3)])
            .check();
        only(&r, "skipped_poll");
    }

    #[test]
    fn new_session_may_seek_anywhere() {
        let r = H::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .poll(10, 0, 1, &[(1, 2)])
            .poll(11, 0, 0, &[(0, 1), (1, 2)])
            .check();
        assert!(r.valid, "{:?}", r.examples);
    }

    #[test]
    fn detects_read_of_failed_write() {
        let r = H::new()
            .write(0, 1, OpType::Fail, None)
            .poll(10, 0, 0, &[(0, 1)])
            .check();
        only(&r, "failed_read");
    }

    #[test]
    fn detects_phantom_values() {
        let r = H::new()
            .ack(0, 1, 0)
            .poll(10, 0, 0, &[(0, 1), (1, 99)])
            .check();
        only(&r, "phantom");
        let r = H::new()
            .ack(1, 1, 0)
            .ack(0, 2, 0)
            .poll(10, 0, 0, &[(0, 1)])
            .poll(11, 1, 0, &[(0, 1)])
            .check();
        assert!(r.anomaly_counts["phantom"] > 0);
    }

    /// `k` requests pipelined by process 0 to partition 0: `(value, acked offset or None)`.
    fn pipelined(mut h: H, id: u64, reqs: &[(u64, Option<i64>)]) -> H {
        for (v, _) in reqs {
            h.0.push(
                Op::new(0, OpType::Invoke, F::Send, 0)
                    .value(*v)
                    .pipeline(id),
            );
        }
        // Answers may be recorded in any order; only the offsets' order matters.
        for (v, o) in reqs.iter().rev() {
            let mut done = match o {
                Some(o) => Op::new(0, OpType::Ok, F::Send, 0).value(*v).offset(*o),
                None => Op::new(0, OpType::Info, F::Send, 0).value(*v),
            };
            done.pipeline = Some(id);
            h.0.push(done);
        }
        h
    }

    #[test]
    fn pipelined_acks_in_request_order_are_valid() {
        let h = pipelined(H::new(), 1, &[(1, Some(0)), (2, None), (3, Some(2))]);
        let h = pipelined(h, 2, &[(4, Some(3)), (5, Some(4))]);
        let r = h
            .poll(10, 0, 0, &[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)])
            .check();
        assert!(r.valid, "{:?}", r.examples);
    }

    #[test]
    fn detects_pipelined_requests_appended_out_of_order() {
        // Requests 1, 2, 3 on one connection; 3 landed before 2.
        let r = pipelined(H::new(), 7, &[(1, Some(0)), (2, Some(2)), (3, Some(1))])
            .poll(10, 0, 0, &[(0, 1), (1, 3), (2, 2)])
            .check();
        only(&r, "pipeline_reordered");
        assert_eq!(r.examples["pipeline_reordered"][0]["pipeline"], 7);
    }

    #[test]
    fn detects_a_log_start_that_moved_without_retention() {
        let mut h = clean();
        let ok = h.0.len();
        h = h.poll(12, 0, 0, &[(0, 1), (1, 2)]);
        h.0[ok + 1].log_start = Some(0);
        assert!(h.check().valid, "a log start of 0 is fine");
        h.0.push(
            Op::new(13, OpType::Fail, F::Poll, 0)
                .offset(0)
                .error("OFFSET_OUT_OF_RANGE")
                .log_start(Some(2)),
        );
        let r = h.check();
        only(&r, "log_start_moved");
        assert_eq!(r.examples["log_start_moved"][0]["log_start"], 2);
    }

    // ---------- metadata workload ----------

    use crate::history::TopicView;

    fn meta(f: F, kind: OpType, topic: &str, count: Option<i32>, t: u64) -> Op {
        let mut o = Op::new(50, kind, f, -1).topic(topic).at(t);
        o.count = count;
        o
    }

    fn view(topics: &[(&str, i32)]) -> BTreeMap<String, TopicView> {
        topics
            .iter()
            .map(|(n, p)| {
                (
                    n.to_string(),
                    TopicView {
                        partitions: *p,
                        id: None,
                    },
                )
            })
            .collect()
    }

    fn list(node: u32, inc: u32, t: u64, topics: &[(&str, i32)]) -> Op {
        Op::new(50, OpType::Ok, F::ListTopics, -1)
            .node(node, inc)
            .topics(view(topics))
            .at(t)
    }

    fn finals(topics: &[(&str, i32)], nodes: u32) -> Vec<Op> {
        (1..=nodes)
            .flat_map(|n| {
                ["admin", "kafka"].map(|s| {
                    let mut o = Op::new(-2, OpType::Ok, F::MetadataFinal, -1)
                        .node(n, 1)
                        .topics(view(topics));
                    o.source = Some(s.to_string());
                    o
                })
            })
            .collect()
    }

    /// Create a (acked, 1 partition), grow it to 2 (acked), create b (unknown outcome), delete c
    /// (acked, after it was created and listed).
    fn meta_history() -> Vec<Op> {
        vec![
            meta(F::CreateTopic, OpType::Invoke, "a", Some(1), 1),
            meta(F::CreateTopic, OpType::Ok, "a", Some(1), 2),
            list(1, 1, 3, &[("a", 1)]),
            meta(F::CreatePartitions, OpType::Invoke, "a", Some(2), 4),
            meta(F::CreatePartitions, OpType::Ok, "a", Some(2), 5),
            meta(F::CreateTopic, OpType::Invoke, "c", Some(1), 6),
            meta(F::CreateTopic, OpType::Ok, "c", Some(1), 7),
            list(2, 1, 8, &[("a", 2), ("c", 1)]),
            meta(F::CreateTopic, OpType::Invoke, "b", Some(1), 9),
            meta(F::CreateTopic, OpType::Info, "b", Some(1), 10),
            meta(F::DeleteTopic, OpType::Invoke, "c", None, 11),
            meta(F::DeleteTopic, OpType::Ok, "c", None, 12),
            list(2, 1, 13, &[("a", 2)]),
            // A lagging node that has not applied the second partition yet is not a finding.
            list(3, 1, 14, &[("a", 1)]),
        ]
    }

    #[test]
    fn consistent_metadata_history_is_valid() {
        let mut ops = meta_history();
        ops.extend(finals(&[("a", 2)], 3));
        let r = check(&ops);
        assert!(r.valid, "{:?}", r.examples);
        // b's create had an unknown outcome: present or not, both are fine.
        let mut ops = meta_history();
        ops.extend(finals(&[("a", 2), ("b", 1)], 3));
        assert!(check(&ops).valid);
    }

    fn only_ops(ops: &[Op], kind: &str) -> CheckResult {
        let r = check(ops);
        only(&r, kind);
        r
    }

    #[test]
    fn detects_a_lost_create() {
        let mut ops = meta_history();
        ops.extend(finals(&[], 3));
        let r = only_ops(&ops, "lost_create");
        assert_eq!(r.examples["lost_create"][0]["topic"], "a");
    }

    #[test]
    fn detects_a_topic_that_vanishes_from_a_node() {
        let mut ops = meta_history();
        // Node 2 listed a; the same incarnation stops listing it with no delete sent.
        ops.push(list(2, 1, 15, &[]));
        ops.extend(finals(&[("a", 2)], 3));
        let r = only_ops(&ops, "topic_vanished");
        assert_eq!(r.examples["topic_vanished"][0]["node"], 2);
        // After a restart (new incarnation) an empty view is a lagging node, not a loss.
        let mut ops = meta_history();
        ops.push(list(2, 2, 15, &[]));
        ops.extend(finals(&[("a", 2)], 3));
        assert!(check(&ops).valid);
        // A topic only ever seen in a list (its create's outcome unknown) must not vanish either.
        let mut ops = meta_history();
        ops.push(list(1, 1, 16, &[("a", 2), ("b", 1)]));
        ops.extend(finals(&[("a", 2)], 3));
        let r = check(&ops);
        assert!(
            r.anomaly_counts["topic_vanished"] > 0,
            "{:?}",
            r.anomaly_counts
        );
    }

    #[test]
    fn detects_shrinking_partition_counts() {
        let mut ops = meta_history();
        ops.push(list(2, 1, 15, &[("a", 1)]));
        ops.extend(finals(&[("a", 2)], 3));
        only_ops(&ops, "partitions_shrunk");
        // The acknowledged CreatePartitions is missing from the final view.
        let mut ops = meta_history();
        ops.retain(|o| !(o.f == F::ListTopics && o.node == Some(2)));
        ops.extend(finals(&[("a", 1)], 3));
        let r = only_ops(&ops, "partitions_shrunk");
        assert_eq!(r.examples["partitions_shrunk"][0]["acked_count"], 2);
    }

    #[test]
    fn detects_a_deleted_topic_that_comes_back() {
        let mut ops = meta_history();
        ops.extend(finals(&[("a", 2), ("c", 1)], 3));
        only_ops(&ops, "deleted_topic_returned");
        let mut ops = meta_history();
        ops.push(list(2, 1, 15, &[("a", 2), ("c", 1)]));
        ops.extend(finals(&[("a", 2)], 3));
        only_ops(&ops, "deleted_topic_returned");
    }

    #[test]
    fn detects_nodes_that_do_not_converge() {
        let mut ops = meta_history();
        let mut f = finals(&[("a", 2)], 3);
        f[5].topics = Some(view(&[("a", 2), ("zombie", 1)]));
        ops.extend(f);
        only_ops(&ops, "metadata_divergence");
        let mut ops = meta_history();
        let mut f = finals(&[("a", 2)], 3);
        f[0].topics = None;
        f[0].kind = OpType::Fail;
        ops.extend(f);
        only_ops(&ops, "metadata_divergence");
    }

    #[test]
    fn unknown_outcome_writes_are_not_anomalies() {
        let r = H::new()
            .write(0, 1, OpType::Info, None)
            .write(0, 2, OpType::Info, None)
            .poll(10, 0, 0, &[(0, 2)])
            .check();
        assert!(r.valid, "{:?}", r.examples);
        assert_eq!(r.info_writes_read, 1);
        assert_eq!(r.info_writes_unread, 1);
    }
}
