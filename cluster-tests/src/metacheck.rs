//! Checks of the metadata workload (see `metaload.rs`), part of [`crate::checker::check`].
//!
//! Nodes apply the metadata log in order, so within one process incarnation a node's view only
//! moves forward; different nodes may lag each other while faults last, so a node that does not
//! list a topic yet is not a finding, only one that listed it and then stopped doing so. After
//! the final heal every node must list the same topics (`metadata_final` ops), and that common
//! view must agree with what was acknowledged:
//!
//! * `lost_create` — an acknowledged CreateTopics whose topic is missing from a final view,
//!   though no DeleteTopics was ever sent for it.
//! * `topic_vanished` — a node listed a topic and a later list of the same node incarnation does
//!   not, with no DeleteTopics sent before that list; or a topic some node listed is missing
//!   from a final view, with no DeleteTopics ever sent.
//! * `partitions_shrunk` — a node's partition count for a topic went down within one
//!   incarnation, or a final view has fewer partitions than an acknowledged CreatePartitions (or
//!   any earlier list) gave it, with no DeleteTopics sent.
//! * `deleted_topic_returned` — an acknowledged DeleteTopics whose topic is in a final view, or
//!   a topic a node stopped listing that the same incarnation lists again (names are never
//!   reused, so a topic cannot legitimately come back).
//! * `metadata_divergence` — the final views differ between nodes or between a node's admin API
//!   and its Kafka Metadata, or a node gave none.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::checker::Anomalies;
use crate::history::{Op, OpType, TopicView, F};

pub const ANOMALIES: &[&str] = &[
    "lost_create",
    "topic_vanished",
    "partitions_shrunk",
    "deleted_topic_returned",
    "metadata_divergence",
];

#[derive(Default)]
struct NodeTrack {
    /// Topics this incarnation listed, with the most partitions it showed.
    present: BTreeMap<String, i32>,
    /// Topics it listed and later did not.
    gone: BTreeSet<String>,
}

pub(crate) fn check(ops: &[Op], an: &mut Anomalies) {
    let mut create_acked: BTreeSet<&str> = BTreeSet::new();
    let mut delete_invoked: BTreeMap<&str, u64> = BTreeMap::new();
    let mut delete_acked: BTreeSet<&str> = BTreeSet::new();
    let mut grow_acked: BTreeMap<&str, i32> = BTreeMap::new();
    for op in ops {
        let Some(t) = op.topic.as_deref() else {
            continue;
        };
        match (op.f, op.kind) {
            (F::CreateTopic, OpType::Ok) => {
                create_acked.insert(t);
            }
            (F::DeleteTopic, OpType::Invoke) => {
                delete_invoked.entry(t).or_insert(op.time);
            }
            (F::DeleteTopic, OpType::Ok) => {
                delete_acked.insert(t);
            }
            (F::CreatePartitions, OpType::Ok) => {
                let n = grow_acked.entry(t).or_insert(0);
                *n = (*n).max(op.count.unwrap_or(0));
            }
            _ => {}
        }
    }
    let deleted_before = |t: &str, time: u64| delete_invoked.get(t).is_some_and(|d| *d <= time);
    let ever_deleted = |t: &str| delete_invoked.contains_key(t);

    // Per node incarnation: views only move forward.
    let mut tracks: BTreeMap<(u32, u32), NodeTrack> = BTreeMap::new();
    let mut max_seen: BTreeMap<&str, i32> = BTreeMap::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::ListTopics && o.kind == OpType::Ok)
    {
        let (Some(node), Some(inc), Some(topics)) = (op.node, op.incarnation, &op.topics) else {
            continue;
        };
        for (name, v) in topics {
            let m = max_seen.entry(name.as_str()).or_insert(0);
            *m = (*m).max(v.partitions);
        }
        let track = tracks.entry((node, inc)).or_default();
        let missing: Vec<String> = track
            .present
            .keys()
            .filter(|n| !topics.contains_key(*n))
            .cloned()
            .collect();
        for name in missing {
            if !deleted_before(&name, op.time) {
                an.add(
                    "topic_vanished",
                    json!({"topic": name, "node": node, "incarnation": inc, "time": op.time,
                           "why": "listed earlier by this node, not now, and no DeleteTopics was sent"}),
                );
            }
            track.present.remove(&name);
            track.gone.insert(name);
        }
        for (name, v) in topics {
            if track.gone.remove(name) {
                an.add(
                    "deleted_topic_returned",
                    json!({"topic": name, "node": node, "incarnation": inc, "time": op.time,
                           "why": "this node stopped listing it, then listed it again"}),
                );
            }
            let prev = track.present.entry(name.clone()).or_insert(v.partitions);
            if v.partitions < *prev {
                an.add(
                    "partitions_shrunk",
                    json!({"topic": name, "node": node, "incarnation": inc, "time": op.time,
                           "was": *prev, "now": v.partitions}),
                );
            }
            *prev = (*prev).max(v.partitions);
        }
    }

    // After the final heal.
    let finals: Vec<&Op> = ops.iter().filter(|o| o.f == F::MetadataFinal).collect();
    if finals.is_empty() {
        return;
    }
    let views: Vec<(u32, &str, &BTreeMap<String, TopicView>)> = finals
        .iter()
        .filter_map(|o| {
            Some((
                o.node?,
                o.source.as_deref().unwrap_or("?"),
                o.topics.as_ref()?,
            ))
        })
        .collect();
    let silent: Vec<String> = finals
        .iter()
        .filter(|o| o.topics.is_none())
        .map(|o| {
            format!(
                "n{} ({})",
                o.node.unwrap_or(0),
                o.source.as_deref().unwrap_or("?")
            )
        })
        .collect();
    let first = views.first().map(|v| v.2);
    let differing: Vec<String> = views
        .iter()
        .filter(|v| Some(v.2) != first)
        .map(|v| format!("n{} ({})", v.0, v.1))
        .collect();
    if !silent.is_empty() || !differing.is_empty() {
        let summary: BTreeMap<String, Vec<String>> = views
            .iter()
            .map(|(n, s, t)| {
                (
                    format!("n{n} ({s})"),
                    t.iter()
                        .map(|(k, v)| format!("{k}:{}", v.partitions))
                        .collect(),
                )
            })
            .collect();
        an.add(
            "metadata_divergence",
            json!({"no_answer": silent, "differs_from_first": differing, "views": summary}),
        );
    }
    let mut flagged: BTreeSet<(&str, String)> = BTreeSet::new();
    let mut flag = |an: &mut Anomalies, kind: &'static str, topic: &str, ex: serde_json::Value| {
        if flagged.insert((kind, topic.to_string())) {
            an.add(kind, ex);
        }
    };
    for (node, source, t) in &views {
        for name in &create_acked {
            if !ever_deleted(name) && !t.contains_key(*name) {
                flag(
                    an,
                    "lost_create",
                    name,
                    json!({"topic": name, "node": node, "source": source}),
                );
            }
        }
        for (name, seen) in &max_seen {
            if ever_deleted(name) {
                continue;
            }
            match t.get(*name) {
                None if !create_acked.contains(name) => flag(
                    an,
                    "topic_vanished",
                    name,
                    json!({"topic": name, "node": node, "source": source,
                           "why": "listed during the run, missing after the final heal, never deleted"}),
                ),
                Some(v) if v.partitions < *seen => flag(
                    an,
                    "partitions_shrunk",
                    name,
                    json!({"topic": name, "node": node, "source": source, "was": seen, "now": v.partitions}),
                ),
                _ => {}
            }
        }
        for (name, n) in &grow_acked {
            if ever_deleted(name) {
                continue;
            }
            if let Some(v) = t.get(*name).filter(|v| v.partitions < *n) {
                flag(
                    an,
                    "partitions_shrunk",
                    name,
                    json!({"topic": name, "node": node, "source": source,
                           "acked_count": n, "now": v.partitions}),
                );
            }
        }
        for name in &delete_acked {
            if t.contains_key(*name) {
                flag(
                    an,
                    "deleted_topic_returned",
                    name,
                    json!({"topic": name, "node": node, "source": source,
                           "why": "DeleteTopics was acknowledged"}),
                );
            }
        }
    }
}
