//! The partition manager: converges this node's partition replicas to the controller's desired
//! state (opening, joining and closing Raft groups) and owns where their files live.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_storage::log::LogConfig;
use tracing::{error, info};

use crate::broker::{Broker, BrokerError, PartitionKey};
use crate::controller::{group_id, PartitionId, TopicConfig};

/// The partition manager: converge the local set of partition groups to the replicated desired
/// state. Runs on every metadata change; also on start, which is how a restarted broker reopens its
/// partitions.
pub async fn reconcile_loop(broker: Arc<Broker>) {
    let mut rx = broker.subscribe_state();
    wait_for_metadata_catch_up(&broker).await;
    loop {
        if let Err(e) = reconcile_once(&broker).await {
            error!(error = %e, "partition reconcile failed, retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Until the metadata state machine has applied everything this broker had already logged, its view
/// is older than what is on disk: reconciling then would delete partitions of topics it has not
/// re-learned yet.
async fn wait_for_metadata_catch_up(broker: &Arc<Broker>) {
    let logged_at_start = broker.raft.meta().status().last_log_index.unwrap_or(0);
    loop {
        let s = broker.raft.meta().status();
        let applied = s.applied_index.unwrap_or(0);
        if s.leader.is_some() && applied >= logged_at_start && Some(applied) >= s.commit_index {
            info!(applied, "metadata caught up; reconciling partitions");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A partition this broker should host, as the reconciler needs it.
struct Wanted {
    group: String,
    id_hex: String,
    segment_bytes: u64,
    /// Preferred leader first; for a joining replica, the reassignment target.
    replicas: Vec<u64>,
    /// Being added by a reassignment: the group exists elsewhere and will contact this replica.
    join: bool,
}

async fn reconcile_once(broker: &Arc<Broker>) -> Result<(), BrokerError> {
    let me = broker.node_id();
    // Only what opening needs, not the TopicMeta: cloning a topic's whole assignment for each of
    // its partitions made every reconcile quadratic in the partition count.
    let desired: BTreeMap<PartitionKey, Wanted> = {
        let st = broker.state();
        let mut topic_bits: HashMap<&str, (String, u64)> = HashMap::new();
        let joining: BTreeSet<(&str, PartitionId)> = st
            .joining_on(me)
            .map(|(t, p, _)| (t.name.as_str(), p))
            .collect();
        st.partitions_on(me)
            .chain(st.joining_on(me))
            .map(|(t, p, r)| {
                let join = joining.contains(&(t.name.as_str(), p));
                let (id_hex, segment_bytes) =
                    topic_bits.entry(t.name.as_str()).or_insert_with(|| {
                        let cfg = TopicConfig::resolve(Some(&t.configs), &broker.cfg);
                        (t.id_hex(), cfg.segment_bytes)
                    });
                (
                    (t.name.clone(), p),
                    Wanted {
                        group: group_id(t, p),
                        id_hex: id_hex.clone(),
                        segment_bytes: *segment_bytes,
                        replicas: r.clone(),
                        join,
                    },
                )
            })
            .collect()
    };
    let current: Vec<PartitionKey> = broker
        .partitions
        .all()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();

    // Close groups whose topic is gone (or was re-created with a new id).
    for key in current {
        let keep = desired
            .get(&key)
            .map(|w| {
                broker
                    .partitions
                    .get(&key.0, key.1)
                    .map(|g| g.group_id() == w.group)
                    .unwrap_or(false)
            })
            .unwrap_or(false);
        if !keep {
            let removed = broker.partitions.remove(&key);
            if let Some(g) = removed {
                info!(topic = %key.0, partition = %key.1, "closing partition (topic deleted)");
                broker.raft.close_partition(&g.status().group, true).await?;
            }
        }
    }

    let mut failures = 0usize;
    for ((topic, p), wanted) in desired {
        if broker.partitions.get(&topic, p).is_some() {
            continue;
        }
        let Wanted {
            group: gid,
            id_hex,
            segment_bytes,
            replicas,
            join,
        } = wanted;
        let dir = partition_dir(&broker.cfg.data_dir, &topic, p, &id_hex);
        adopt_unversioned_dir(&dir, &topic, p, &id_hex)?;
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            // The new entry must survive a crash before anything in it is trusted.
            if let Some(root) = dir.parent() {
                sluice_storage::file::sync_dir(root)?;
            }
        }
        // Written once: rewriting it at every open would keep a partition on a full disk from
        // opening.
        let id_file = dir.join("topic_id");
        if std::fs::read_to_string(&id_file).map_or(true, |old| old.trim() != id_hex) {
            sluice_storage::file::write_atomic(&id_file, id_hex.as_bytes())?;
        }
        let log_cfg = LogConfig {
            segment_bytes_max: segment_bytes,
            ..LogConfig::default()
        };
        // One broken partition must not keep the others from opening: note it, go on, and let
        // the loop retry.
        let opened = if join {
            broker.raft.join_partition(gid, dir, log_cfg).await
        } else {
            broker
                .raft
                .open_partition(gid, dir, log_cfg, replicas)
                .await
        };
        let group = match opened {
            Ok(g) => g,
            Err(e) => {
                error!(%topic, partition = %p, error = %e, "cannot open partition");
                failures += 1;
                continue;
            }
        };
        broker.partitions.insert((topic.clone(), p), group);
    }
    broker.partitions.bump();
    if failures > 0 {
        return Err(BrokerError::Other(format!(
            "{failures} partition(s) failed to open"
        )));
    }
    cleanup_orphan_dirs(broker);
    Ok(())
}

/// Where a partition's files live: `partitions/{topic}-{partition}.{topic id}`. With the topic
/// id in the name, a re-created topic gets a new directory and can never meet files a deleted
/// topic of the same name left behind (say, by a crash halfway through removing them).
pub fn partition_dir(
    data_dir: &Path,
    topic: &str,
    partition: PartitionId,
    topic_id_hex: &str,
) -> PathBuf {
    data_dir
        .join("partitions")
        .join(partition_dir_name(topic, partition, topic_id_hex))
}

/// Longest file name most file systems take (ext4, xfs: 255 bytes).
const NAME_MAX: usize = 255;

/// `{topic}-{partition}.{topic id}`, with the topic name shortened if the whole would not fit a
/// file name (Kafka allows 249-character names; the partition and id keep names unique).
fn partition_dir_name(topic: &str, partition: PartitionId, topic_id_hex: &str) -> String {
    let suffix = format!("-{partition}.{topic_id_hex}");
    let room = NAME_MAX.saturating_sub(suffix.len());
    let cut = topic
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|&end| end <= room)
        .last()
        .unwrap_or(0);
    format!("{}{suffix}", &topic[..cut])
}

/// Before topic ids were part of the name, a partition lived in `{topic}-{partition}`. Such a
/// directory is renamed to `dir` if its `topic_id` file says it belongs to this topic; any other
/// is left for [`cleanup_orphan_dirs`].
fn adopt_unversioned_dir(
    dir: &Path,
    topic: &str,
    partition: PartitionId,
    id_hex: &str,
) -> std::io::Result<()> {
    let Some(root) = dir.parent() else {
        return Ok(());
    };
    let old = root.join(format!("{topic}-{partition}"));
    if dir.exists() || !old.is_dir() {
        return Ok(());
    }
    match std::fs::read_to_string(old.join("topic_id")) {
        Ok(id) if id.trim() == id_hex => {
            info!(from = %old.display(), to = %dir.display(), "renaming partition directory to carry its topic id");
            std::fs::rename(&old, dir)?;
            sluice_storage::file::sync_dir(root)
        }
        _ => Ok(()),
    }
}

/// Directories of partitions this broker no longer hosts (e.g. deleted while we were down).
fn cleanup_orphan_dirs(broker: &Broker) {
    let Ok(entries) = std::fs::read_dir(broker.cfg.data_dir.join("partitions")) else {
        return;
    };
    let wanted: BTreeSet<std::ffi::OsString> = broker
        .partitions
        .all()
        .iter()
        .filter_map(|(_, g)| g.dir().file_name().map(ToOwned::to_owned))
        .collect();
    for e in entries.flatten() {
        if !wanted.contains(&e.file_name()) {
            let name = e.file_name().to_string_lossy().to_string();
            info!(dir = %name, "removing partition directory no longer assigned to this broker");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: PartitionId = PartitionId::ZERO;

    #[test]
    fn partition_dir_names_carry_the_topic_id_and_fit_a_file_name() {
        assert_eq!(
            partition_dir_name("orders", PartitionId::from_index(3), "ab12"),
            "orders-3.ab12"
        );
        let id = "0123456789abcdef0123456789abcdef";
        let long = "t".repeat(249);
        let name = partition_dir_name(&long, PartitionId::from_index(1_000_000), id);
        assert_eq!(name.len(), NAME_MAX);
        assert!(name.ends_with(&format!("-1000000.{id}")));
    }

    #[test]
    fn an_unversioned_directory_is_adopted_only_by_its_own_topic() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("t-0");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("topic_id"), "aaaa").unwrap();
        std::fs::write(old.join("00000000000000000000.log"), b"data").unwrap();
        // Another topic of the same name (a new id) does not take it.
        let other = root.path().join(partition_dir_name("t", P0, "bbbb"));
        adopt_unversioned_dir(&other, "t", P0, "bbbb").unwrap();
        assert!(old.exists() && !other.exists());
        // Its own topic does, with its files.
        let mine = root.path().join(partition_dir_name("t", P0, "aaaa"));
        adopt_unversioned_dir(&mine, "t", P0, "aaaa").unwrap();
        assert!(!old.exists());
        assert_eq!(
            std::fs::read(mine.join("00000000000000000000.log")).unwrap(),
            b"data"
        );
    }
}
