//! `sluice groups ...`: list, describe, reset-offsets, delete (what kafka-consumer-groups does).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::{bail, Result};

use super::client::Client;
use super::consume::{list_offsets, EARLIEST, LATEST};
use super::group::{self, ConsumerGroupClient, ConsumerGroupDescription, Tp};
use super::{GroupsCommand, GroupsResetArgs};

pub async fn run(cmd: GroupsCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        GroupsCommand::List(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            for g in list(&mut c).await? {
                writeln!(out, "{g}")?;
            }
        }
        GroupsCommand::Describe(a) => {
            let mut g = ConsumerGroupClient::connect(&a.connect.bootstrap_server, &a.group).await?;
            out.write_all(describe(&mut g).await?.as_bytes())?;
        }
        GroupsCommand::ResetOffsets(a) => {
            let mut g = ConsumerGroupClient::connect(&a.connect.bootstrap_server, &a.group).await?;
            let (text, done) = reset_offsets(&mut g, &a).await?;
            out.write_all(text.as_bytes())?;
            if !done {
                eprintln!("Dry run: nothing was changed. Add --execute to reset the offsets.");
            }
        }
        GroupsCommand::Delete(a) => {
            let mut g = ConsumerGroupClient::connect(&a.connect.bootstrap_server, &a.group).await?;
            delete(&mut g).await?;
            writeln!(out, "Deleted group {}.", a.group)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Every group id in the cluster, sorted.
pub async fn list(c: &mut Client) -> Result<Vec<String>> {
    Ok(group::list_groups(c)
        .await?
        .into_iter()
        .map(|g| g.group_id)
        .collect())
}

/// The group's description, or GROUP_ID_NOT_FOUND for one the coordinator does not know
/// (reported as Dead with no members by older versions, as Kafka's tool treats it too).
async fn existing(g: &mut ConsumerGroupClient) -> Result<ConsumerGroupDescription> {
    let d = g.describe().await?;
    if d.state == "Dead" && d.members.is_empty() {
        bail!(super::errors::KafkaError::new(
            kafka_protocol::error::ResponseError::GroupIdNotFound.code(),
            &format!("group '{}'", g.group),
            None
        ));
    }
    Ok(d)
}

/// One partition's line of `describe`.
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub end: Option<i64>,
    pub member: Option<String>,
}

/// `groups describe` text: a header line, one line per member, one per partition the group
/// is assigned or has committed.
pub async fn describe(g: &mut ConsumerGroupClient) -> Result<String> {
    let d = match existing(g).await {
        Ok(d) => d,
        // A group with only committed offsets (e.g. from `reset-offsets`) is Empty, not Dead,
        // so this is a group that does not exist at all.
        Err(e) => return Err(e),
    };
    let committed = g.committed(None).await?;
    let mut owner: BTreeMap<Tp, String> = BTreeMap::new();
    for m in &d.members {
        for (t, ps) in &m.assignment.topics {
            for p in ps {
                owner.insert((t.clone(), *p), m.member_id.clone());
            }
        }
    }
    let mut all: BTreeSet<Tp> = committed.keys().cloned().collect();
    all.extend(owner.keys().cloned());
    let ends = end_offsets(&mut g.client, &all).await;
    let rows: Vec<PartitionLag> = all
        .into_iter()
        .map(|tp| PartitionLag {
            committed: committed.get(&tp).copied().filter(|o| *o >= 0),
            end: ends.get(&tp).copied(),
            member: owner.get(&tp).cloned(),
            topic: tp.0,
            partition: tp.1,
        })
        .collect();
    Ok(format_describe(&d, g.coordinator_id(), &rows))
}

/// Log end offsets (ListOffsets latest); partitions whose topic cannot be looked up are left
/// out (their lag prints as "-"), with a warning.
async fn end_offsets(c: &mut Client, tps: &BTreeSet<Tp>) -> BTreeMap<Tp, i64> {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in tps {
        by_topic.entry(t).or_default().push(*p);
    }
    let mut out = BTreeMap::new();
    for (t, ps) in by_topic {
        let got = async {
            let mut info = c.topic(t).await?;
            let known: Vec<i32> = ps
                .into_iter()
                .filter(|p| (0..info.partition_count()).contains(p))
                .collect();
            list_offsets(c, &mut info, &known, LATEST).await
        }
        .await;
        match got {
            Ok(m) => out.extend(m.into_iter().map(|(p, o)| ((t.to_string(), p), o))),
            Err(e) => tracing::warn!("end offsets of topic '{t}': {e:#}"),
        }
    }
    out
}

fn or_dash(v: Option<i64>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

pub fn format_describe(
    d: &ConsumerGroupDescription,
    coordinator: Option<i32>,
    rows: &[PartitionLag],
) -> String {
    let protocol = if d.protocol.is_empty() {
        "-"
    } else {
        d.protocol.as_str()
    };
    let mut s = format!(
        "Group: {}  State: {}  Protocol: {}  Coordinator: {}  Members: {}\n",
        d.group_id,
        d.state,
        protocol,
        or_dash(coordinator.map(i64::from)),
        d.members.len()
    );
    let mut members: Vec<_> = d.members.iter().collect();
    members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    for m in members {
        let assigned = m.assignment.describe();
        s.push_str(&format!(
            "  Member: {}  ClientId: {}  Host: {}  Assignment: {}\n",
            m.member_id,
            m.client_id,
            m.client_host,
            if assigned.is_empty() {
                "-"
            } else {
                assigned.as_str()
            }
        ));
    }
    for r in rows {
        let lag = match (r.committed, r.end) {
            (Some(c), Some(e)) => Some((e - c).max(0)),
            _ => None,
        };
        s.push_str(&format!(
            "  Topic: {}  Partition: {}  CommittedOffset: {}  EndOffset: {}  Lag: {}  Member: {}\n",
            r.topic,
            r.partition,
            or_dash(r.committed),
            or_dash(r.end),
            or_dash(lag),
            r.member.as_deref().unwrap_or("-")
        ));
    }
    s
}

/// Plans (and with `--execute` commits) new offsets. Returns the plan's text and whether it
/// was applied.
pub async fn reset_offsets(
    g: &mut ConsumerGroupClient,
    a: &GroupsResetArgs,
) -> Result<(String, bool)> {
    // The group may not exist yet (a reset can prepare one); only members forbid it.
    let d = match g.describe().await {
        Ok(d) => d,
        Err(e) if is_not_found(&e) => ConsumerGroupDescription {
            group_id: a.group.clone(),
            state: "Dead".into(),
            protocol_type: String::new(),
            protocol: String::new(),
            members: Vec::new(),
        },
        Err(e) => return Err(e),
    };
    if !(d.state == "Empty" || d.state == "Dead") {
        bail!(
            "Assignments can only be reset if the group '{}' is inactive, but the current state is {}.",
            a.group,
            d.state
        );
    }
    let (topic, wanted) = &a.topic;
    let mut info = g.client.topic(topic).await?;
    let count = info.partition_count();
    let parts: Vec<i32> = match wanted {
        Some(ps) => {
            if let Some(p) = ps.iter().find(|p| **p >= count) {
                bail!(
                    "partition {p} of topic '{topic}' does not exist (it has {count} partitions)"
                );
            }
            let set: BTreeSet<i32> = ps.iter().copied().collect();
            set.into_iter().collect()
        }
        None => (0..count).collect(),
    };
    let tps: Vec<Tp> = parts.iter().map(|p| (topic.clone(), *p)).collect();
    let current = g.committed(Some(&tps)).await?;
    let earliest = list_offsets(&mut g.client, &mut info, &parts, EARLIEST).await?;
    let latest = list_offsets(&mut g.client, &mut info, &parts, LATEST).await?;
    let by_time = match a.to.to_datetime {
        Some(ts) => Some(list_offsets(&mut g.client, &mut info, &parts, ts).await?),
        None => None,
    };
    let mut plan: BTreeMap<Tp, i64> = BTreeMap::new();
    for p in &parts {
        let (lo, hi) = (
            earliest.get(p).copied().unwrap_or(0),
            latest.get(p).copied().unwrap_or(0),
        );
        let new = if a.to.to_earliest {
            lo
        } else if a.to.to_latest {
            hi
        } else if let Some(n) = a.to.to_offset {
            // As kafka-consumer-groups: an offset outside the log is moved to its nearest end.
            if n < lo {
                eprintln!("New offset ({n}) is lower than earliest offset for topic '{topic}' partition {p}. Value will be set to {lo}");
                lo
            } else if n > hi {
                eprintln!("New offset ({n}) is higher than latest offset for topic '{topic}' partition {p}. Value will be set to {hi}");
                hi
            } else {
                n
            }
        } else {
            // No record at or after the time: the log end, as Kafka's tool does.
            match by_time.as_ref().and_then(|m| m.get(p)).copied() {
                Some(o) if o >= 0 => o,
                _ => hi,
            }
        };
        plan.insert((topic.clone(), *p), new);
    }
    let mut text = String::new();
    for ((t, p), new) in &plan {
        let cur = current.get(&(t.clone(), *p)).copied().filter(|o| *o >= 0);
        text.push_str(&format!(
            "Group: {}  Topic: {t}  Partition: {p}  CurrentOffset: {}  NewOffset: {new}\n",
            a.group,
            or_dash(cur)
        ));
    }
    if !a.execute {
        return Ok((text, false));
    }
    g.commit(-1, "", None, &plan).await?;
    Ok((text, true))
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<super::errors::KafkaError>()
        .is_some_and(|k| k.code == kafka_protocol::error::ResponseError::GroupIdNotFound.code())
}

pub async fn delete(g: &mut ConsumerGroupClient) -> Result<()> {
    g.delete().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::group::{Assignment, DescribedMember};

    #[test]
    fn describe_format() {
        let d = ConsumerGroupDescription {
            group_id: "g".into(),
            state: "Stable".into(),
            protocol_type: "consumer".into(),
            protocol: "range".into(),
            members: vec![
                DescribedMember {
                    member_id: "m2".into(),
                    group_instance_id: None,
                    client_id: "c2".into(),
                    client_host: "/127.0.0.1".into(),
                    assignment: Assignment::default(),
                },
                DescribedMember {
                    member_id: "m1".into(),
                    group_instance_id: None,
                    client_id: "c1".into(),
                    client_host: "/127.0.0.1".into(),
                    assignment: Assignment {
                        topics: BTreeMap::from([("t".to_string(), vec![0, 1])]),
                    },
                },
            ],
        };
        let rows = [
            PartitionLag {
                topic: "t".into(),
                partition: 0,
                committed: Some(3),
                end: Some(10),
                member: Some("m1".into()),
            },
            PartitionLag {
                topic: "t".into(),
                partition: 1,
                committed: None,
                end: Some(4),
                member: Some("m1".into()),
            },
            PartitionLag {
                topic: "gone".into(),
                partition: 0,
                committed: Some(5),
                end: None,
                member: None,
            },
        ];
        assert_eq!(
            format_describe(&d, Some(1), &rows),
            "Group: g  State: Stable  Protocol: range  Coordinator: 1  Members: 2\n\
             \x20 Member: m1  ClientId: c1  Host: /127.0.0.1  Assignment: t-0,t-1\n\
             \x20 Member: m2  ClientId: c2  Host: /127.0.0.1  Assignment: -\n\
             \x20 Topic: t  Partition: 0  CommittedOffset: 3  EndOffset: 10  Lag: 7  Member: m1\n\
             \x20 Topic: t  Partition: 1  CommittedOffset: -  EndOffset: 4  Lag: -  Member: m1\n\
             \x20 Topic: gone  Partition: 0  CommittedOffset: 5  EndOffset: -  Lag: -  Member: -\n"
        );
    }
}
