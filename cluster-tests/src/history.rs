//! The operation history: every invocation and completion, one JSON object per line.
//!
//! Shape (Jepsen style): `{"process", "type": invoke|ok|fail|info, "f": send|poll|nemesis,
//! "partition", "offset", "value", "time"}`. For `send`, `value` is the unique integer written
//! and `offset` (on `ok`) the offset the broker acknowledged. For `poll`, `offset` is the fetch
//! position and `msgs` the `[offset, value]` pairs read. `time` is nanoseconds since the run
//! started. `info` means the outcome is unknown (timeout, disconnect); `fail` means the
//! operation definitely did not happen. Sends carry `pipeline` (requests pipelined on one
//! connection), polls `log_start`; the metadata workload's operations are described at [`F`].
//! Sends also carry `producer` (plain or idempotent); an idempotent producer's sends carry the
//! `producer_id`, `epoch` and `seq` their batch was stamped with, and their completions
//! `attempts` (how many times the same batch was sent); its `init_producer_id` operations record
//! the ids and epochs it was given.
//!
//! The consumer group's operations (see [`crate::groupload`]) name their `member`: a member's
//! `group_join` completes with its `generation` and `assigned` partitions; its polls are `poll`
//! operations like the standalone consumers'; each `commit` is one partition's `offset` committed
//! as `generation`; each `offset_fetch` answers one partition's committed `offset` (-1: none),
//! asked by a member when it is given the partition, by the `observer` that samples the group
//! throughout, or (`drain`) once after the final heal.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    Send,
    Poll,
    Nemesis,
    /// Metadata workload: CreateTopics (`topic`, `count` partitions), CreatePartitions (`topic`,
    /// new `count`), DeleteTopics (`topic`), and one node's topic list (`node`, `incarnation`,
    /// `topics`), from its admin API.
    #[serde(rename = "create_topic")]
    CreateTopic,
    #[serde(rename = "create_partitions")]
    CreatePartitions,
    #[serde(rename = "delete_topic")]
    DeleteTopic,
    #[serde(rename = "list_topics")]
    ListTopics,
    /// After the final heal: one node's settled view of every topic (`node`, `source` = admin or
    /// kafka, `topics`); all must agree.
    #[serde(rename = "metadata_final")]
    MetadataFinal,
    /// An idempotent producer's InitProducerId: asked with `producer_id`/`epoch` (absent for a
    /// new id), answered with the id and epoch it got.
    #[serde(rename = "init_producer_id")]
    InitProducerId,
    /// A consumer-group member's JoinGroup + SyncGroup: on `ok`, its `generation` and the
    /// workload topic's partitions it was `assigned`.
    #[serde(rename = "group_join")]
    GroupJoin,
    /// OffsetCommit of one partition's `offset` by `member` as `generation`.
    Commit,
    /// OffsetFetch of the group: on `ok`, one partition's committed `offset` (-1 for none).
    #[serde(rename = "offset_fetch")]
    OffsetFetch,
    /// A member retiring its member id: `ok` after a LeaveGroup, `fail` if the LeaveGroup got
    /// no answer, `info` for a simulated crash (dropped without one; its session expires).
    #[serde(rename = "group_leave")]
    GroupLeave,
}

/// Which kind of producer sent a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProducerKind {
    /// One record per request, no producer id; an unknown outcome is never retried.
    Plain,
    /// Batches stamped with producer id, epoch and sequence; unknown outcomes are resent.
    Idempotent,
}

impl ProducerKind {
    pub fn name(self) -> &'static str {
        match self {
            ProducerKind::Plain => "plain",
            ProducerKind::Idempotent => "idempotent",
        }
    }
}

/// One topic as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicView {
    pub partitions: i32,
    /// Hex topic id, where the source reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Workers are processes >= 0; the nemesis is -1. A worker that sees an `info` continues
    /// as a new process (the old one may still have an operation in flight).
    pub process: i64,
    #[serde(rename = "type")]
    pub kind: OpType,
    pub f: F,
    #[serde(default)]
    pub partition: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    /// Poll results: (offset, value) in the order read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgs: Option<Vec<(i64, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Nemesis description (`isolate n2`, `heal`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// Sends: the produce requests one producer pipelined on one connection share this id;
    /// their invocations are recorded in request order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<u64>,
    /// Polls: the log start offset the broker reported (Fetch v5+), on success or error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_start: Option<i64>,
    /// Polls of the final drain, which reads every partition from 0 once the faults are over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    /// Metadata operations: the topic, the partition count asked for, the node asked, that
    /// node's start count (its process incarnation), where a view came from, and the view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<BTreeMap<String, TopicView>>,
    /// Sends: the kind of producer. Histories from before idempotent producers have none: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<ProducerKind>,
    /// Idempotent sends and InitProducerId: the producer id and epoch, and the batch's sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i32>,
    /// Idempotent send completions: how many times the batch was sent (resends included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Consumer-group operations: which member (`m0`..) or `observer` did it, the generation
    /// it held, and (group_join) the partitions it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned: Option<Vec<i32>>,
    /// Nanoseconds since the start of the run.
    pub time: u64,
}

impl Op {
    pub fn new(process: i64, kind: OpType, f: F, partition: i32) -> Op {
        Op {
            process,
            kind,
            f,
            partition,
            offset: None,
            value: None,
            msgs: None,
            error: None,
            fault: None,
            pipeline: None,
            log_start: None,
            drain: false,
            topic: None,
            count: None,
            node: None,
            incarnation: None,
            source: None,
            topics: None,
            producer: None,
            producer_id: None,
            epoch: None,
            seq: None,
            attempts: None,
            member: None,
            generation: None,
            assigned: None,
            time: 0,
        }
    }
    pub fn member(mut self, m: impl Into<String>) -> Op {
        self.member = Some(m.into());
        self
    }
    pub fn generation(mut self, g: i32) -> Op {
        self.generation = Some(g);
        self
    }
    pub fn assigned(mut self, ps: Vec<i32>) -> Op {
        self.assigned = Some(ps);
        self
    }
    pub fn producer(mut self, k: ProducerKind) -> Op {
        self.producer = Some(k);
        self
    }
    /// The producer id and epoch (idempotent sends, InitProducerId).
    pub fn ids(mut self, producer_id: i64, epoch: i16) -> Op {
        self.producer_id = Some(producer_id);
        self.epoch = Some(epoch);
        self
    }
    pub fn seq(mut self, s: i32) -> Op {
        self.seq = Some(s);
        self
    }
    pub fn attempts(mut self, n: u32) -> Op {
        self.attempts = Some(n);
        self
    }
    pub fn pipeline(mut self, id: u64) -> Op {
        self.pipeline = Some(id);
        self
    }
    pub fn drain(mut self) -> Op {
        self.drain = true;
        self
    }
    pub fn log_start(mut self, o: Option<i64>) -> Op {
        self.log_start = o;
        self
    }
    pub fn topic(mut self, t: impl Into<String>) -> Op {
        self.topic = Some(t.into());
        self
    }
    pub fn count(mut self, n: i32) -> Op {
        self.count = Some(n);
        self
    }
    pub fn node(mut self, id: u32, incarnation: u32) -> Op {
        self.node = Some(id);
        self.incarnation = Some(incarnation);
        self
    }
    pub fn topics(mut self, t: BTreeMap<String, TopicView>) -> Op {
        self.topics = Some(t);
        self
    }
    pub fn offset(mut self, o: i64) -> Op {
        self.offset = Some(o);
        self
    }
    pub fn value(mut self, v: u64) -> Op {
        self.value = Some(v);
        self
    }
    pub fn msgs(mut self, m: Vec<(i64, u64)>) -> Op {
        self.msgs = Some(m);
        self
    }
    pub fn error(mut self, e: impl Into<String>) -> Op {
        self.error = Some(e.into());
        self
    }
    pub fn at(mut self, t: u64) -> Op {
        self.time = t;
        self
    }
}

/// Shared recorder: keeps every op in memory (for the checker) and appends it to the file
/// as it happens (so a crashed run still leaves its history).
#[derive(Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
    start: Instant,
}

struct Inner {
    ops: Vec<Op>,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl History {
    pub fn new(path: Option<&Path>) -> Result<History> {
        let file = match path {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            )),
            None => None,
        };
        Ok(History {
            inner: Arc::new(Mutex::new(Inner {
                ops: Vec::new(),
                file,
            })),
            start: Instant::now(),
        })
    }

    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Stamps `op` with the current time and records it.
    pub fn record(&self, mut op: Op) -> Op {
        op.time = self.now();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.file.as_mut() {
            if let Ok(line) = serde_json::to_string(&op) {
                let _ = writeln!(f, "{line}");
            }
        }
        g.ops.push(op.clone());
        op
    }

    pub fn flush(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.file.as_mut() {
            let _ = f.flush();
        }
    }

    pub fn ops(&self) -> Vec<Op> {
        self.flush();
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ops
            .clone()
    }
}

/// Reads a history file written by [`History`].
pub fn load(path: &Path) -> Result<Vec<Op>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ops = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        ops.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: bad history line", path.display(), i + 1))?,
        );
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_jsonl() {
        let dir = std::env::temp_dir().join(format!("ct-hist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("history.jsonl");
        let h = History::new(Some(&path)).unwrap();
        h.record(Op::new(0, OpType::Invoke, F::Send, 1).value(7));
        h.record(Op::new(0, OpType::Ok, F::Send, 1).value(7).offset(3));
        h.record(
            Op::new(1, OpType::Ok, F::Poll, 1)
                .offset(3)
                .msgs(vec![(3, 7)]),
        );
        h.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().next().unwrap().contains("\"type\":\"invoke\""));
        assert!(text.contains("\"f\":\"send\""));
        let back = load(&path).unwrap();
        assert_eq!(back, h.ops());
        std::fs::remove_dir_all(&dir).ok();
    }
}
