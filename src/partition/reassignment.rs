//! Reassignment as the partition leader carries it out (the controller only records the target).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sluice_raft::PartitionGroup;
use tracing::{info, warn};

use crate::broker::{Broker, BrokerError};
use crate::controller::{Command, PartitionId, Reply};

/// Carries out reassignments on the partitions this broker leads: new replicas join the group as
/// learners and catch up, then the voters change (a joint change) to exactly the target, and the
/// move is recorded. A leader that is not in the target first adds the new replicas, then hands
/// leadership to the target's first replica, whose loop finishes the job. Every step is idempotent,
/// so a restart or a leader change mid-move just resumes it.
/// (topic, topic id, partition, target replicas, the local group).
type PendingMove = (String, [u8; 16], PartitionId, Vec<u64>, Arc<PartitionGroup>);

pub async fn reassignment_loop(broker: Arc<Broker>) {
    let in_flight: Arc<std::sync::Mutex<BTreeSet<String>>> = Default::default();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let me = broker.node_id();
        let todo: Vec<PendingMove> = {
            let st = broker.state();
            st.topics
                .values()
                .flat_map(|t| {
                    t.reassigning
                        .iter()
                        .map(move |(p, target)| (t, *p, target.clone()))
                })
                .filter_map(|(t, p, target)| {
                    let g = broker.partition_in(&st, &t.name, p)?;
                    g.is_leader().then(|| (t.name.clone(), t.id, p, target, g))
                })
                .collect()
        };
        for (topic, topic_id, partition, target, group) in todo {
            let gid = group.group_id().to_string();
            if let Ok(mut f) = in_flight.lock() {
                if !f.insert(gid.clone()) {
                    continue;
                }
            }
            let broker = broker.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let res =
                    move_replicas(&broker, &group, me, &topic, topic_id, partition, &target).await;
                if let Err(e) = res {
                    warn!(%topic, %partition, ?target, error = %e, "reassignment step failed; will retry");
                }
                if let Ok(mut f) = in_flight.lock() {
                    f.remove(&gid);
                }
            });
        }
    }
}

async fn move_replicas(
    broker: &Arc<Broker>,
    group: &Arc<PartitionGroup>,
    me: u64,
    topic: &str,
    topic_id: [u8; 16],
    partition: PartitionId,
    target: &[u64],
) -> Result<(), BrokerError> {
    let target_set: BTreeSet<u64> = target.iter().copied().collect();
    let voters = group.voters();
    if voters != target_set {
        if target_set.contains(&me) {
            info!(%topic, %partition, from = ?voters, to = ?target, "changing the replica set");
            group.change_voters(target_set.clone()).await?;
        } else {
            let union: BTreeSet<u64> = voters.union(&target_set).copied().collect();
            if voters != union {
                info!(%topic, %partition, from = ?voters, to = ?union, "adding the new replicas before leaving");
                group.change_voters(union).await?;
            }
            let successor = target[0];
            info!(%topic, %partition, to = successor, "handing leadership to the new replica set");
            broker
                .transfer_partition_leadership(group.group_id(), successor)
                .await?;
            // The successor's loop removes this broker.
            return Ok(());
        }
    }
    let reply = broker
        .propose(&Command::CompleteReassignment {
            topic: topic.to_string(),
            topic_id,
            partition,
            replicas: target.to_vec(),
        })
        .await?;
    match reply {
        Reply::Ok | Reply::ProducerIds { .. } | Reply::Groups(_) | Reply::AclsDeleted(_) => {
            info!(%topic, %partition, replicas = ?target, "reassignment complete");
            Ok(())
        }
        Reply::Err { message, .. } => Err(BrokerError::Other(message)),
    }
}
