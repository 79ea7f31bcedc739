//! The controller's replicated state: cluster id, brokers, topics, partition replica sets and topic
//! configs. Commands are JSON, decided by the metadata Raft leader and applied by the deterministic
//! [`MetaState::apply`] on every node. Apply reads no clock and does no I/O: proposers stamp times
//! and ids into commands.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::consumer_groups::{self, ConsumerGroupOp, ConsumerGroupReply, ConsumerGroups};
use super::scram_users::{self, ScramUpsertion, ScramUsers};
use super::PartitionId;
use crate::errors::ErrorCode;
use crate::scram::Mechanism;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerInfo {
    pub id: u64,
    /// host:port clients are told to connect to.
    pub kafka_addr: String,
    pub admin_addr: String,
    pub raft_addr: String,
    /// Proposer's wall clock when it last registered (ms since epoch).
    pub registered_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicMeta {
    pub name: String,
    /// 16 random bytes stamped by the proposer; distinguishes a re-created topic from its old self.
    pub id: [u8; 16],
    /// partition index -> replica node ids (first = preferred leader)
    pub partitions: Vec<Vec<u64>>,
    pub configs: BTreeMap<String, String>,
    /// partition index -> last leader reported by that partition's Raft group. Partition groups
    /// elect their own leaders; they report here so every node can route clients, including
    /// nodes that hold no replica of the partition.
    #[serde(default)]
    pub leaders: BTreeMap<PartitionId, LeaderInfo>,
    /// partition index -> the replica set it is moving to (reassignment in progress). The
    /// partition's leader adds the new replicas to its Raft group, waits until they have caught
    /// up, changes the voters, and then records the move as done.
    #[serde(default)]
    pub reassigning: BTreeMap<PartitionId, Vec<u64>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderInfo {
    pub leader: u64,
    /// The partition group's Raft term.
    pub epoch: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderUpdate {
    pub topic: String,
    pub topic_id: [u8; 16],
    pub partition: PartitionId,
    pub leader: u64,
    pub epoch: i32,
}

impl TopicMeta {
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
    pub fn replication_factor(&self) -> usize {
        self.partitions.first().map(Vec::len).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    InitCluster {
        cluster_id: String,
    },
    RegisterBroker {
        broker: BrokerInfo,
        /// Listener name -> the address advertised on it (Metadata answers a client with the
        /// addresses of the listener it came in on). Empty from nodes older than listeners.
        #[serde(default)]
        listeners: BTreeMap<String, String>,
    },
    CreateTopic {
        topic: TopicMeta,
    },
    DeleteTopic {
        name: String,
    },
    CreatePartitions {
        name: String,
        new_partitions: Vec<Vec<u64>>,
    },
    SetPartitionLeaders {
        updates: Vec<LeaderUpdate>,
    },
    /// The controller's liveness verdict: exactly these registered brokers are fenced.
    SetFenced {
        fenced: BTreeSet<u64>,
    },
    /// Controlled shutdown: the broker is leaving; stop offering it at once.
    FenceBroker {
        id: u64,
    },
    /// Decommission: forget a broker entirely.
    UnregisterBroker {
        id: u64,
    },
    /// Start moving partitions of a topic to new replica sets (preferred leader first).
    ReassignPartitions {
        topic: String,
        moves: Vec<(PartitionId, Vec<u64>)>,
    },
    /// Hands `count` producer ids to a broker for its InitProducerId answers. Ids come from one
    /// replicated counter, so no id is ever given out twice, whichever node is controller.
    AllocateProducerIds {
        broker: u64,
        count: i64,
    },
    /// Consumer-group operations, applied in order, each with its own reply; the coordinator
    /// batches many (offset commits above all) into one entry.
    ConsumerGroups {
        ops: Vec<ConsumerGroupOp>,
    },
    /// Adds ACLs (adding one that exists is a no-op, as in Kafka).
    CreateAcls {
        acls: Vec<super::acls::AclBinding>,
    },
    /// Removes the ACLs each filter matches; the reply lists them per filter.
    DeleteAcls {
        filters: Vec<super::acls::AclFilter>,
    },
    /// SCRAM credentials (AlterUserScramCredentials): deletions, then upsertions, as validated
    /// by the proposer. Only salted keys travel and are stored, never a password.
    AlterScramCredentials {
        upsertions: Vec<ScramUpsertion>,
        deletions: Vec<(String, Mechanism)>,
    },
    /// The partition's Raft group now has exactly `replicas` as voters: the move is done.
    CompleteReassignment {
        topic: String,
        topic_id: [u8; 16],
        partition: PartitionId,
        replicas: Vec<u64>,
    },
}

/// Reply to a command: success, or a Kafka error code with a message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Err {
        code: i16,
        message: String,
    },
    /// Producer ids `first..first + count`, for [`Command::AllocateProducerIds`].
    ProducerIds {
        first: i64,
        count: i64,
    },
    /// One reply per operation of [`Command::ConsumerGroups`].
    Groups(Vec<ConsumerGroupReply>),
    /// Per filter of [`Command::DeleteAcls`], the ACLs it removed.
    AclsDeleted(Vec<Vec<super::acls::AclBinding>>),
}

impl Reply {
    fn err(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Err {
            code: code as i16,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetaState {
    pub cluster_id: Option<String>,
    pub brokers: BTreeMap<u64, BrokerInfo>,
    pub topics: BTreeMap<String, TopicMeta>,
    /// Registered brokers the controller has not heard from lately: kept in the registry (they
    /// come back with their data) but not offered to clients or used for new replicas.
    #[serde(default)]
    pub fenced: BTreeSet<u64>,
    /// The first producer id not yet handed out.
    #[serde(default)]
    pub next_producer_id: i64,
    /// Consumer groups: membership, assignments, committed offsets.
    #[serde(default)]
    pub consumer_groups: ConsumerGroups,
    /// Access control lists (enforced when `authorizer.class.name` is set).
    #[serde(default)]
    pub acls: super::acls::Acls,
    /// SASL/SCRAM users: name -> mechanism -> salted credential.
    #[serde(default)]
    pub scram_users: ScramUsers,
    /// Per broker: listener name -> advertised host:port.
    #[serde(default)]
    pub broker_listeners: BTreeMap<u64, BTreeMap<String, String>>,
    /// Bumped on every applied command so watchers can tell that something changed.
    pub version: u64,
}

/// Kafka's rule: ASCII alphanumerics, '.', '_' and '-', at most 249 chars, not "." or "..".
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name cannot be '{name}'"));
    }
    if name.len() > 249 {
        return Err(format!(
            "topic name is {} characters long, the maximum is 249",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "topic name '{name}' contains '{c}'; legal characters are ASCII alphanumerics, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl MetaState {
    /// Where clients of `listener` reach broker `b`: its address on that listener, or its
    /// primary address when it has no listener of that name.
    pub fn kafka_addr_for<'a>(&'a self, b: &'a BrokerInfo, listener: &str) -> &'a str {
        self.broker_listeners
            .get(&b.id)
            .and_then(|l| l.get(listener))
            .map(String::as_str)
            .unwrap_or(&b.kafka_addr)
    }

    /// Registered and not fenced.
    pub fn live_brokers(&self) -> BTreeSet<u64> {
        self.brokers
            .keys()
            .copied()
            .filter(|id| !self.fenced.contains(id))
            .collect()
    }

    /// Every partition with a replica on `node`: (topic, partition index, replicas).
    pub fn partitions_on(
        &self,
        node: u64,
    ) -> impl Iterator<Item = (&TopicMeta, PartitionId, &Vec<u64>)> {
        self.topics.values().flat_map(move |t| {
            t.partitions
                .iter()
                .enumerate()
                .filter(move |(_, r)| r.contains(&node))
                .map(move |(p, r)| (t, PartitionId::from_index(p), r))
        })
    }

    pub fn apply(&mut self, command: &Command) -> Reply {
        self.version += 1;
        match command {
            Command::InitCluster { cluster_id } => {
                // First writer wins; later inits (e.g. a racing node) are harmless no-ops.
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(cluster_id.clone());
                }
                Reply::Ok
            }
            Command::AllocateProducerIds { broker, count } => {
                if !self.brokers.contains_key(broker) {
                    return Reply::err(
                        ErrorCode::InvalidRequest,
                        format!("broker {broker} is not registered"),
                    );
                }
                // Bounded so one request cannot exhaust the id space; ids stop short of i64::MAX
                // because clients treat negative ids as "none".
                let count = (*count).clamp(1, 1 << 20);
                let Some(end) = self.next_producer_id.checked_add(count) else {
                    return Reply::err(ErrorCode::InvalidRequest, "producer ids are exhausted");
                };
                let first = self.next_producer_id;
                self.next_producer_id = end;
                Reply::ProducerIds { first, count }
            }
            Command::CreateAcls { acls } => {
                // Validated by the handler; checked again so a bad entry can never be stored.
                if let Some(e) = acls.iter().find_map(|a| a.validate().err()) {
                    return Reply::err(ErrorCode::InvalidRequest, e);
                }
                self.acls.extend(acls.iter().cloned());
                Reply::Ok
            }
            Command::DeleteAcls { filters } => {
                let mut out = Vec::with_capacity(filters.len());
                for f in filters {
                    let gone: Vec<_> = self.acls.iter().filter(|b| f.matches(b)).cloned().collect();
                    for b in &gone {
                        self.acls.remove(b);
                    }
                    out.push(gone);
                }
                Reply::AclsDeleted(out)
            }
            Command::ConsumerGroups { ops } => Reply::Groups(
                ops.iter()
                    .map(|op| {
                        consumer_groups::apply_group_op(&mut self.consumer_groups, &self.topics, op)
                    })
                    .collect(),
            ),
            Command::AlterScramCredentials {
                upsertions,
                deletions,
            } => {
                scram_users::apply(&mut self.scram_users, upsertions, deletions);
                Reply::Ok
            }
            Command::RegisterBroker { broker, listeners } => {
                self.brokers.insert(broker.id, broker.clone());
                if listeners.is_empty() {
                    self.broker_listeners.remove(&broker.id);
                } else {
                    self.broker_listeners.insert(broker.id, listeners.clone());
                }
                // Registering is proof of life.
                self.fenced.remove(&broker.id);
                Reply::Ok
            }
            Command::SetFenced { fenced } => {
                self.fenced = fenced
                    .iter()
                    .copied()
                    .filter(|id| self.brokers.contains_key(id))
                    .collect();
                Reply::Ok
            }
            Command::FenceBroker { id } => {
                if self.brokers.contains_key(id) {
                    self.fenced.insert(*id);
                }
                Reply::Ok
            }
            Command::UnregisterBroker { id } => {
                self.brokers.remove(id);
                self.broker_listeners.remove(id);
                self.fenced.remove(id);
                Reply::Ok
            }
            Command::CreateTopic { topic } => {
                if let Err(m) = validate_topic_name(&topic.name) {
                    return Reply::err(ErrorCode::InvalidTopicException, m);
                }
                if self.topics.contains_key(&topic.name) {
                    return Reply::err(
                        ErrorCode::TopicAlreadyExists,
                        format!("topic '{}' already exists", topic.name),
                    );
                }
                if topic.partitions.is_empty() {
                    return Reply::err(ErrorCode::InvalidPartitions, "no partitions");
                }
                self.topics.insert(topic.name.clone(), topic.clone());
                Reply::Ok
            }
            Command::DeleteTopic { name } => {
                if self.topics.remove(name).is_none() {
                    return Reply::err(
                        ErrorCode::UnknownTopicOrPartition,
                        format!("topic '{name}' does not exist"),
                    );
                }
                consumer_groups::forget_topic(&mut self.consumer_groups, name);
                Reply::Ok
            }
            Command::CreatePartitions {
                name,
                new_partitions,
            } => match self.topics.get_mut(name) {
                None => Reply::err(
                    ErrorCode::UnknownTopicOrPartition,
                    format!("topic '{name}' does not exist"),
                ),
                Some(t) => {
                    t.partitions.extend(new_partitions.iter().cloned());
                    Reply::Ok
                }
            },
            Command::SetPartitionLeaders { updates } => {
                for u in updates {
                    let Some(t) = self.topics.get_mut(&u.topic) else {
                        continue;
                    };
                    // A report about an older incarnation of the topic, or a partition that
                    // does not exist, or a leader from an older term than we know, is stale.
                    if t.id != u.topic_id || u.partition.index() >= t.partitions.len() {
                        continue;
                    }
                    let newer = t
                        .leaders
                        .get(&u.partition)
                        .map(|l| u.epoch > l.epoch)
                        .unwrap_or(true);
                    if newer {
                        t.leaders.insert(
                            u.partition,
                            LeaderInfo {
                                leader: u.leader,
                                epoch: u.epoch,
                            },
                        );
                    }
                }
                Reply::Ok
            }
            Command::ReassignPartitions { topic, moves } => {
                let Some(t) = self.topics.get(topic) else {
                    return Reply::err(
                        ErrorCode::UnknownTopicOrPartition,
                        format!("topic '{topic}' does not exist"),
                    );
                };
                // All or nothing: validate every move first.
                for (p, replicas) in moves {
                    if p.index() >= t.partitions.len() {
                        return Reply::err(
                            ErrorCode::UnknownTopicOrPartition,
                            format!("topic '{topic}' has no partition {p}"),
                        );
                    }
                    let distinct: BTreeSet<u64> = replicas.iter().copied().collect();
                    if replicas.is_empty() || distinct.len() != replicas.len() {
                        return Reply::err(
                            ErrorCode::InvalidReplicaAssignment,
                            format!("partition {p}: replicas must be distinct and non-empty, got {replicas:?}"),
                        );
                    }
                    if let Some(b) = replicas.iter().find(|b| !self.brokers.contains_key(b)) {
                        return Reply::err(
                            ErrorCode::InvalidReplicaAssignment,
                            format!("partition {p}: broker {b} is not registered"),
                        );
                    }
                }
                let Some(t) = self.topics.get_mut(topic) else {
                    return Reply::Ok;
                };
                for (p, replicas) in moves {
                    if t.partitions.get(p.index()) == Some(replicas) {
                        t.reassigning.remove(p);
                    } else {
                        t.reassigning.insert(*p, replicas.clone());
                    }
                }
                Reply::Ok
            }
            Command::CompleteReassignment {
                topic,
                topic_id,
                partition,
                replicas,
            } => {
                let Some(t) = self.topics.get_mut(topic) else {
                    return Reply::err(
                        ErrorCode::UnknownTopicOrPartition,
                        format!("topic '{topic}' does not exist"),
                    );
                };
                // Stale: another incarnation of the topic, or the target changed meanwhile.
                if t.id != *topic_id || t.reassigning.get(partition) != Some(replicas) {
                    return Reply::err(
                        ErrorCode::NoReassignmentInProgress,
                        format!(
                            "no reassignment of {topic}-{partition} to {replicas:?} is in progress"
                        ),
                    );
                }
                t.reassigning.remove(partition);
                if let Some(r) = t.partitions.get_mut(partition.index()) {
                    *r = replicas.clone();
                }
                Reply::Ok
            }
        }
    }

    /// Partitions with `node` among their reassignment targets but not (yet) their replicas: the
    /// node opens them as a joining replica.
    pub fn joining_on(
        &self,
        node: u64,
    ) -> impl Iterator<Item = (&TopicMeta, PartitionId, &Vec<u64>)> {
        self.topics.values().flat_map(move |t| {
            t.reassigning.iter().filter_map(move |(p, target)| {
                let current = t.partitions.get(p.index())?;
                (target.contains(&node) && !current.contains(&node)).then_some((t, *p, target))
            })
        })
    }

    /// Replica placement: round-robin over the given brokers, with each partition's replica list
    /// rotated so that leaders (first replicas) spread evenly too. Pure, so it is easy to test.
    pub fn place_replicas(
        brokers: &BTreeSet<u64>,
        first_partition: usize,
        count: usize,
        replication_factor: usize,
    ) -> Vec<Vec<u64>> {
        let ids: Vec<u64> = brokers.iter().copied().collect();
        if ids.is_empty() {
            return Vec::new();
        }
        (first_partition..first_partition + count)
            .map(|p| {
                (0..replication_factor)
                    .map(|r| ids[(p + r) % ids.len()])
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, n: usize) -> TopicMeta {
        TopicMeta {
            name: name.into(),
            id: [1; 16],
            partitions: vec![vec![1]; n],
            configs: BTreeMap::new(),
            leaders: BTreeMap::new(),
            reassigning: BTreeMap::new(),
        }
    }

    #[test]
    fn reassignment_is_validated_then_completed_once() {
        let mut s = MetaState::default();
        for id in 1..=4 {
            s.apply(&Command::RegisterBroker {
                broker: BrokerInfo {
                    id,
                    kafka_addr: String::new(),
                    admin_addr: String::new(),
                    raft_addr: String::new(),
                    registered_at_ms: 0,
                },
                listeners: BTreeMap::new(),
            });
        }
        s.apply(&Command::CreateTopic {
            topic: topic("t", 2),
        });
        let reassign = |moves: Vec<(u32, Vec<u64>)>| Command::ReassignPartitions {
            topic: "t".into(),
            moves: moves
                .into_iter()
                .map(|(p, r)| (PartitionId::new(p), r))
                .collect(),
        };
        for bad in [
            vec![(5, vec![1])],
            vec![(0, vec![])],
            vec![(0, vec![2, 2])],
            vec![(0, vec![9])],
        ] {
            assert!(matches!(s.apply(&reassign(bad)), Reply::Err { .. }));
        }
        assert!(
            s.topics["t"].reassigning.is_empty(),
            "a rejected move left a trace"
        );
        assert_eq!(s.apply(&reassign(vec![(1, vec![2, 3])])), Reply::Ok);
        assert_eq!(s.joining_on(2).count(), 1);
        assert_eq!(
            s.joining_on(1).count(),
            0,
            "1 is a current replica, not joining"
        );
        let done = |replicas: Vec<u64>| Command::CompleteReassignment {
            topic: "t".into(),
            topic_id: [1; 16],
            partition: PartitionId::new(1),
            replicas,
        };
        assert!(
            matches!(s.apply(&done(vec![3, 2])), Reply::Err { .. }),
            "not the target"
        );
        assert_eq!(s.apply(&done(vec![2, 3])), Reply::Ok);
        assert_eq!(s.topics["t"].partitions[1], vec![2, 3]);
        assert!(s.topics["t"].reassigning.is_empty());
        assert!(
            matches!(s.apply(&done(vec![2, 3])), Reply::Err { .. }),
            "completed twice"
        );
    }

    #[test]
    fn create_delete_and_duplicate() {
        let mut s = MetaState::default();
        assert_eq!(
            s.apply(&Command::CreateTopic {
                topic: topic("a", 2)
            }),
            Reply::Ok
        );
        match s.apply(&Command::CreateTopic {
            topic: topic("a", 2),
        }) {
            Reply::Err { code, .. } => assert_eq!(code, ErrorCode::TopicAlreadyExists as i16),
            r => panic!("{r:?}"),
        }
        assert_eq!(
            s.apply(&Command::CreatePartitions {
                name: "a".into(),
                new_partitions: vec![vec![1]]
            }),
            Reply::Ok
        );
        assert_eq!(s.topics["a"].partitions.len(), 3);
        assert_eq!(
            s.apply(&Command::DeleteTopic { name: "a".into() }),
            Reply::Ok
        );
        assert!(matches!(
            s.apply(&Command::DeleteTopic { name: "a".into() }),
            Reply::Err { .. }
        ));
    }

    #[test]
    fn apply_is_deterministic_across_replicas() {
        let cmds = vec![
            Command::InitCluster {
                cluster_id: "c1".into(),
            },
            Command::InitCluster {
                cluster_id: "c2".into(),
            },
            Command::CreateTopic {
                topic: topic("x", 1),
            },
        ];
        let mut a = MetaState::default();
        let mut b = MetaState::default();
        for c in &cmds {
            let json = serde_json::to_vec(c).unwrap();
            let decoded: Command = serde_json::from_slice(&json).unwrap();
            a.apply(c);
            b.apply(&decoded);
        }
        assert_eq!(a, b);
        assert_eq!(a.cluster_id.as_deref(), Some("c1"));
    }

    #[test]
    fn leader_reports_only_move_forward() {
        let mut s = MetaState::default();
        s.apply(&Command::CreateTopic {
            topic: topic("t", 2),
        });
        let up = |leader, epoch, id| Command::SetPartitionLeaders {
            updates: vec![LeaderUpdate {
                topic: "t".into(),
                topic_id: id,
                partition: PartitionId::new(1),
                leader,
                epoch,
            }],
        };
        s.apply(&up(2, 5, [1; 16]));
        s.apply(&up(3, 4, [1; 16])); // older term: ignored
        s.apply(&up(3, 6, [9; 16])); // other incarnation of the topic: ignored
        assert_eq!(
            s.topics["t"].leaders[&PartitionId::new(1)],
            LeaderInfo {
                leader: 2,
                epoch: 5
            }
        );
        s.apply(&up(3, 6, [1; 16]));
        assert_eq!(s.topics["t"].leaders[&PartitionId::new(1)].leader, 3);
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-y").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a b").is_err());
        assert!(validate_topic_name("ü").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }

    #[test]
    fn placement_spreads_leaders() {
        let brokers: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
        let p = MetaState::place_replicas(&brokers, 0, 6, 3);
        let mut leaders = BTreeMap::new();
        for r in &p {
            assert_eq!(
                r.iter().collect::<BTreeSet<_>>().len(),
                3,
                "distinct replicas"
            );
            *leaders.entry(r[0]).or_insert(0) += 1;
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    }
}
