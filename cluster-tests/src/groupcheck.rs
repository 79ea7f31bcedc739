//! Checks of the consumer-group workload (see `groupload.rs`), part of [`crate::checker::check`].
//!
//! * `commit_backwards` — the group's committed offset of a partition went backwards. The
//!   observations of one partition's committed offset are every *acknowledged* commit (its
//!   value is the offset committed) and every *answered* OffsetFetch (a member's at the start of
//!   an assignment, the observer's samples, the final one; -1 when the group has none). Each has
//!   an interval from invocation to completion, and the value took effect (or was read) at some
//!   point inside it. For two observations X and Y where X completed before Y was invoked, Y's
//!   value must be at least X's: the workload only ever commits offsets at or above every commit
//!   acknowledged before (see `groupload.rs` for why), so on a correct broker the committed
//!   offset never decreases, and a read after a write sees it or something newer. Commits that
//!   were refused or whose outcome is unknown are not observations (they may or may not have
//!   been applied). This catches a commit applied lower than asked, a commit lost or undone
//!   (e.g. by a coordinator failover that forgot it: the next fetch reads an older offset), and
//!   a stale read from a deposed coordinator.
//! * `commit_skipped` — after the final heal, with the members stopped, one last OffsetFetch
//!   gives the group's committed offset C of every partition. Every acknowledged write at an
//!   offset below C must have been consumed by some member at least once: the members commit
//!   only what they have consumed, so a committed offset past data no member read means the
//!   group would skip it (a commit applied higher than asked, a fetch that jumped).
//! * `group_unverified` — the group workload ran but no final OffsetFetch was answered, so
//!   `commit_skipped` could not be checked.
//!
//! Records consumed more than once (at-least-once delivery: a member resumes from the last
//! committed offset after a rebalance or a refused commit) are counted, not anomalies.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;
use serde_json::json;

use crate::checker::{Anomalies, OpCounts};
use crate::history::{Op, OpType, F};

pub const ANOMALIES: &[&str] = &["commit_backwards", "commit_skipped", "group_unverified"];

/// What the group workload did, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupStats {
    /// JoinGroup + SyncGroup by members: completed, and failed or unanswered.
    pub joins: OpCounts,
    /// Member ids retired: `ok` left with a LeaveGroup, `fail` LeaveGroup unanswered, `info`
    /// crashed (dropped without one).
    pub retired: OpCounts,
    /// Distinct generations members joined, and the highest; every generation after the first
    /// is a rebalance the members took part in.
    pub generations: usize,
    pub max_generation: i32,
    /// Records members' fetches returned, in all; distinct (partition, offset) among them; and
    /// how many of those were consumed more than once (at-least-once redelivery).
    pub consumed_records: usize,
    pub consumed_offsets: usize,
    pub consumed_more_than_once: usize,
    pub commits: OpCounts,
    /// OffsetFetch answers (members' at the start of assignments, the observer's samples).
    pub offset_fetches: OpCounts,
    /// The group's committed offset per partition after the final heal (the last answer).
    pub final_committed: BTreeMap<i32, i64>,
    /// Acknowledged writes below the final committed offset of their partition (all of which
    /// members must have consumed), and at or above it (not yet committed when the run ended).
    pub acked_below_committed: usize,
    pub acked_above_committed: usize,
}

/// One observation of a partition's committed offset.
#[derive(Debug, Clone)]
struct Obs {
    invoke: u64,
    done: u64,
    value: i64,
    /// commit or offset_fetch
    what: &'static str,
    member: Option<String>,
    generation: Option<i32>,
}

impl Obs {
    fn json(&self) -> serde_json::Value {
        json!({"op": self.what, "offset": self.value, "member": self.member,
               "generation": self.generation, "invoked": self.invoke, "completed": self.done})
    }
}

fn count(c: &mut OpCounts, kind: OpType) {
    match kind {
        OpType::Invoke => {}
        OpType::Ok => c.ok += 1,
        OpType::Fail => c.fail += 1,
        OpType::Info => c.info += 1,
    }
}

/// `acked`: every acknowledged write as (value, partition, offset). None when the history has
/// no group operations.
pub(crate) fn check(
    ops: &[Op],
    acked: &[(u64, i32, i64)],
    an: &mut Anomalies,
) -> Option<GroupStats> {
    let group_op = |o: &&Op| {
        matches!(
            o.f,
            F::GroupJoin | F::GroupLeave | F::Commit | F::OffsetFetch
        ) || (o.f == F::Poll && o.member.is_some())
    };
    if !ops.iter().any(|o| group_op(&o)) {
        return None;
    }
    let mut st = GroupStats::default();
    let mut generations = BTreeSet::new();
    // Invocation times by (process, f, partition): a process has one such operation open.
    let mut invoked: HashMap<(i64, F, i32), u64> = HashMap::new();
    let mut obs: BTreeMap<i32, Vec<Obs>> = BTreeMap::new();
    let mut consumed_at: HashMap<(i32, i64), usize> = HashMap::new();
    let mut consumed_values: HashSet<(i32, u64)> = HashSet::new();
    let mut final_committed: BTreeMap<i32, i64> = BTreeMap::new();
    for op in ops.iter().filter(group_op) {
        let key = (op.process, op.f, op.partition);
        if op.kind == OpType::Invoke {
            invoked.insert(key, op.time);
            continue;
        }
        let invoke = invoked.remove(&key).unwrap_or(op.time);
        match op.f {
            F::GroupJoin => {
                count(&mut st.joins, op.kind);
                if let (OpType::Ok, Some(g)) = (op.kind, op.generation) {
                    generations.insert(g);
                }
            }
            F::GroupLeave => count(&mut st.retired, op.kind),
            F::Poll => {
                if op.kind != OpType::Ok {
                    continue;
                }
                for &(o, v) in op.msgs.as_deref().unwrap_or(&[]) {
                    st.consumed_records += 1;
                    *consumed_at.entry((op.partition, o)).or_default() += 1;
                    consumed_values.insert((op.partition, v));
                }
            }
            F::Commit => {
                count(&mut st.commits, op.kind);
                if op.kind == OpType::Ok {
                    if let Some(value) = op.offset {
                        obs.entry(op.partition).or_default().push(Obs {
                            invoke,
                            done: op.time,
                            value,
                            what: "commit",
                            member: op.member.clone(),
                            generation: op.generation,
                        });
                    }
                }
            }
            F::OffsetFetch => {
                if !op.drain {
                    count(&mut st.offset_fetches, op.kind);
                }
                if op.kind == OpType::Ok {
                    let value = op.offset.unwrap_or(-1);
                    if op.drain {
                        final_committed.insert(op.partition, value);
                    }
                    obs.entry(op.partition).or_default().push(Obs {
                        invoke,
                        done: op.time,
                        value,
                        what: "offset_fetch",
                        member: op.member.clone(),
                        generation: op.generation,
                    });
                }
            }
            _ => {}
        }
    }
    st.generations = generations.len();
    st.max_generation = generations.iter().copied().max().unwrap_or(-1);
    st.consumed_offsets = consumed_at.len();
    st.consumed_more_than_once = consumed_at.values().filter(|n| **n > 1).count();

    // Rule (a): sweep each partition's observations in invocation order, keeping the largest
    // value among those completed before the current one was invoked.
    for (p, list) in &mut obs {
        list.sort_by_key(|o| (o.invoke, o.done));
        let mut by_done: Vec<&Obs> = list.iter().collect();
        by_done.sort_by_key(|o| o.done);
        let mut next = 0;
        let mut floor: Option<&Obs> = None;
        for y in list.iter() {
            while next < by_done.len() && by_done[next].done < y.invoke {
                let x = by_done[next];
                if floor.is_none_or(|f| x.value > f.value) {
                    floor = Some(x);
                }
                next += 1;
            }
            if let Some(x) = floor.filter(|x| y.value < x.value) {
                an.add(
                    "commit_backwards",
                    json!({"partition": p, "earlier": x.json(), "later": y.json()}),
                );
            }
        }
    }

    // Rule (b): no acknowledged write below the final committed offset left unconsumed.
    if final_committed.is_empty() {
        an.add(
            "group_unverified",
            json!({"why": "no final OffsetFetch of the group was answered after the heal"}),
        );
    }
    let mut skipped: Vec<(i32, i64, u64)> = Vec::new();
    for &(v, p, o) in acked {
        let Some(c) = final_committed.get(&p) else {
            continue;
        };
        if o < *c {
            st.acked_below_committed += 1;
            if !consumed_values.contains(&(p, v)) {
                skipped.push((p, o, v));
            }
        } else {
            st.acked_above_committed += 1;
        }
    }
    skipped.sort_unstable();
    for (p, o, v) in skipped {
        an.add(
            "commit_skipped",
            json!({"partition": p, "value": v, "acked_offset": o,
                   "final_committed": final_committed.get(&p)}),
        );
    }
    st.final_committed = final_committed;
    Some(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::check;

    /// Builds group histories: times are given explicitly so real-time order is exact.
    struct G(Vec<Op>);

    impl G {
        fn new() -> G {
            G(Vec::new())
        }
        /// An acknowledged write of `v` at `offset` of partition `p`.
        fn ack(mut self, p: i32, v: u64, offset: i64) -> G {
            self.0.push(Op::new(0, OpType::Invoke, F::Send, p).value(v));
            self.0
                .push(Op::new(0, OpType::Ok, F::Send, p).value(v).offset(offset));
            self
        }
        fn join(mut self, process: i64, member: &str, generation: i32, parts: &[i32]) -> G {
            self.0
                .push(Op::new(process, OpType::Invoke, F::GroupJoin, -1).member(member));
            self.0.push(
                Op::new(process, OpType::Ok, F::GroupJoin, -1)
                    .member(member)
                    .generation(generation)
                    .assigned(parts.to_vec()),
            );
            self
        }
        fn consume(mut self, process: i64, member: &str, p: i32, from: i64, m: &[(i64, u64)]) -> G {
            self.0.push(
                Op::new(process, OpType::Invoke, F::Poll, p)
                    .offset(from)
                    .member(member),
            );
            self.0.push(
                Op::new(process, OpType::Ok, F::Poll, p)
                    .offset(from)
                    .msgs(m.to_vec())
                    .member(member),
            );
            self
        }
        /// A commit of `offset` invoked at `t0` and completed (`kind`) at `t1`.
        fn commit(
            mut self,
            process: i64,
            p: i32,
            offset: i64,
            kind: OpType,
            t0: u64,
            t1: u64,
        ) -> G {
            let op = |k| {
                Op::new(process, k, F::Commit, p)
                    .offset(offset)
                    .generation(1)
                    .member("m0")
            };
            self.0.push(op(OpType::Invoke).at(t0));
            self.0.push(op(kind).at(t1));
            self
        }
        /// An OffsetFetch answered `offset`, invoked at `t0`, answered at `t1`.
        fn fetch(mut self, process: i64, p: i32, offset: i64, t0: u64, t1: u64, last: bool) -> G {
            let mut inv = Op::new(process, OpType::Invoke, F::OffsetFetch, p)
                .member("observer")
                .at(t0);
            let mut ok = Op::new(process, OpType::Ok, F::OffsetFetch, p)
                .member("observer")
                .offset(offset)
                .at(t1);
            inv.drain = last;
            ok.drain = last;
            self.0.push(inv);
            self.0.push(ok);
            self
        }
        fn check(&self) -> crate::checker::CheckResult {
            check(&self.0)
        }
    }

    /// Four writes consumed by m0, committed at 2 then 4, a rebalance, final committed 4.
    fn clean() -> G {
        G::new()
            .ack(0, 1, 0)
            .ack(0, 2, 1)
            .ack(0, 3, 2)
            .ack(0, 4, 3)
            .join(10, "m0", 1, &[0])
            .fetch(10, 0, -1, 10, 11, false)
            .consume(11, "m0", 0, 0, &[(0, 1), (1, 2)])
            .commit(10, 0, 2, OpType::Ok, 20, 21)
            .fetch(12, 0, 2, 22, 23, false)
            .consume(11, "m0", 0, 2, &[(2, 3), (3, 4)])
            .commit(10, 0, 4, OpType::Ok, 30, 31)
            // A refused commit and an unknown one are not observations.
            .commit(10, 0, 1, OpType::Fail, 32, 33)
            .commit(10, 0, 1, OpType::Info, 34, 35)
            .join(13, "m1", 2, &[0])
            .fetch(13, 0, 4, 40, 41, false)
            // Redelivery after the rebalance is at-least-once, not an anomaly.
            .consume(14, "m1", 0, 3, &[(3, 4)])
            .fetch(15, 0, 4, 50, 51, true)
    }

    #[test]
    fn clean_group_history_is_valid() {
        let r = clean().check();
        assert!(r.valid, "{:?}", r.examples);
        let g = r.group.expect("group stats");
        assert_eq!(g.generations, 2);
        assert_eq!(g.commits.ok, 2);
        assert_eq!(g.commits.fail, 1);
        assert_eq!(g.commits.info, 1);
        assert_eq!(g.consumed_records, 5);
        assert_eq!(g.consumed_offsets, 4);
        assert_eq!(g.consumed_more_than_once, 1);
        assert_eq!(g.final_committed[&0], 4);
        assert_eq!(g.acked_below_committed, 4);
    }

    fn only(r: &crate::checker::CheckResult, kind: &str) {
        assert!(!r.valid, "{kind} not detected");
        for (k, n) in &r.anomaly_counts {
            if k == kind {
                assert!(*n > 0, "{kind}: {:?}", r.anomaly_counts);
            } else {
                assert_eq!(
                    *n, 0,
                    "unexpected {k} while testing {kind}: {:?}",
                    r.examples
                );
            }
        }
    }

    #[test]
    fn detects_a_fetch_below_an_acknowledged_commit() {
        // Acknowledged 4 at t=31; a fetch invoked at t=36 reads 2.
        let r = clean().fetch(20, 0, 2, 36, 37, false).check();
        only(&r, "commit_backwards");
        assert_eq!(r.examples["commit_backwards"][0]["earlier"]["offset"], 4);
        assert_eq!(r.examples["commit_backwards"][0]["later"]["offset"], 2);
        // A fetch that overlaps the commit may read the old value.
        let r = clean().fetch(20, 0, 2, 29, 37, false).check();
        assert!(r.valid, "{:?}", r.examples);
    }

    #[test]
    fn detects_an_acknowledged_commit_below_an_earlier_one() {
        let r = clean().commit(10, 0, 3, OpType::Ok, 36, 37).check();
        only(&r, "commit_backwards");
    }

    #[test]
    fn detects_a_commit_that_vanished() {
        // The group has no offset any more (-1) after one was acknowledged.
        let r = clean().fetch(20, 0, -1, 60, 61, false).check();
        only(&r, "commit_backwards");
    }

    #[test]
    fn detects_a_committed_offset_past_unconsumed_data() {
        // Final committed 5 (one past offset 4), but no member read offset 4's write (nor
        // anyone else: it is also unseen).
        let r = clean().ack(0, 5, 4).fetch(16, 0, 5, 60, 61, true).check();
        assert_eq!(r.anomaly_counts["commit_skipped"], 1, "{:?}", r.examples);
        assert_eq!(r.anomaly_counts["unseen"], 1, "{:?}", r.examples);
        assert_eq!(r.examples["commit_skipped"][0]["value"], 5);
        // Consumed by some member (any of them) it is fine.
        let r = clean()
            .ack(0, 5, 4)
            .consume(14, "m1", 0, 4, &[(4, 5)])
            .fetch(16, 0, 5, 60, 61, true)
            .check();
        assert!(r.valid, "{:?}", r.examples);
        // Read only by the standalone consumers or the drain does not count for the group.
        let r = clean().ack(0, 5, 4).fetch(16, 0, 5, 60, 61, true);
        let mut h = r;
        h.0.push(Op::new(90, OpType::Invoke, F::Poll, 0).offset(4));
        h.0.push(
            Op::new(90, OpType::Ok, F::Poll, 0)
                .offset(4)
                .msgs(vec![(4, 5)]),
        );
        only(&h.check(), "commit_skipped");
    }

    #[test]
    fn a_group_run_without_a_final_fetch_is_unverified() {
        let mut h = clean();
        h.0.retain(|o| !o.drain);
        only(&h.check(), "group_unverified");
        // Histories without a group are not checked for one.
        let r = G::new().ack(0, 1, 0).check();
        assert!(r.group.is_none());
        assert_eq!(r.anomaly_counts["group_unverified"], 0);
    }
}
