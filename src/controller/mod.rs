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
