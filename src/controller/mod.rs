//! The controller: the cluster metadata that the metadata Raft group replicates (brokers, topics,
//! replica sets, topic configs, fencing) and the deterministic machine that applies its commands.
//! It owns no tasks and does no I/O; the loops that propose commands live in `membership` and
//! `partition`, and reach this state through `broker::Broker`.

pub mod acls;
pub mod consumer_groups;
mod machine;
mod partition_id;
pub mod scram_users;
mod state;
pub mod topic_config;

pub use machine::MetaMachine;
pub use partition_id::PartitionId;
pub use state::*;
pub use topic_config::TopicConfig;

/// The Raft group id of one partition: `p/{topic id}/{partition}`. The topic id (not the name)
/// keeps a re-created topic from meeting the old one's group.
pub fn group_id(topic: &TopicMeta, partition: PartitionId) -> String {
    format!("p/{}/{}", topic.id_hex(), partition)
}

/// Whether `gid` is [`group_id`]`(topic, partition)`, without building it: the produce and
/// fetch paths ask this for every partition of every request.
pub fn is_group_of(gid: &str, topic: &TopicMeta, partition: PartitionId) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let Some(rest) = gid.strip_prefix("p/") else {
        return false;
    };
    let (hex, part) = rest.split_at(rest.len().min(32));
    let hex = hex.as_bytes();
    hex.len() == 32
        && topic.id.iter().enumerate().all(|(i, b)| {
            hex[2 * i] == HEX[usize::from(b >> 4)] && hex[2 * i + 1] == HEX[usize::from(b & 15)]
        })
        && part.strip_prefix('/').is_some_and(|n| {
            // Only the form `group_id` writes: decimal digits, no sign, no leading zero.
            n.bytes().all(|c| c.is_ascii_digit())
                && (n == "0" || !n.starts_with('0'))
                && n.parse::<usize>().ok() == Some(partition.index())
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn is_group_of_agrees_with_group_id_and_nothing_else() {
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(9);
        }
        let t = TopicMeta {
            name: "t".into(),
            id,
            partitions: vec![vec![1]; 12],
            configs: BTreeMap::new(),
            leaders: BTreeMap::new(),
            reassigning: BTreeMap::new(),
        };
        let mut other = t.clone();
        other.id[15] ^= 1;
        for p in [0, 1, 10, 11].map(PartitionId::from_index) {
            let gid = group_id(&t, p);
            assert!(is_group_of(&gid, &t, p), "{gid}");
            assert!(!is_group_of(&gid, &other, p), "another topic id");
            assert!(!is_group_of(
                &gid,
                &t,
                PartitionId::from_index(p.index() + 1)
            ));
        }
        let base = group_id(&t, PartitionId::ZERO);
        let stem = base.trim_end_matches("/0");
        for bad in [
            format!("{stem}/00"),
            format!("{stem}/+0"),
            format!("{stem}/"),
            format!("{stem}0"),
            stem.to_string(),
            base.to_uppercase(),
            base.replacen("p/", "q/", 1),
            "p/".to_string(),
            String::new(),
        ] {
            assert!(!is_group_of(&bad, &t, PartitionId::ZERO), "{bad}");
        }
    }
}
