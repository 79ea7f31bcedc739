//! Appends to a partition group: validation, the gate, the proposal and its answer (on commit,
//! or on the leader's own disk for acks=1).

use std::time::Duration;

use bytes::Bytes;
use openraft::error::RaftError as OpenraftError;
use sluice_storage::batch;

use super::gate::poll_once;
use super::PartitionGroup;
use crate::config::PROPOSE_TIMEOUT;
use crate::partition_store::{decode_offsets, LocalWaiter};
use crate::{NodeId, RaftError};

impl PartitionGroup {
    /// Proposes one validated Kafka batch; returns (base_offset, last_offset) once it is
    /// committed, i.e. fsynced on a majority of the voters (Kafka acks=all).
    pub async fn append(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        self.append_with(batch, false).await
    }

    /// Like [`PartitionGroup::append`], but answers as soon as the batch is on this leader's
    /// disk (Kafka acks=1): a leader that fails before a majority has it may lose it.
    pub async fn append_leader_ack(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        self.append_with(batch, true).await
    }

    async fn append_with(&self, batch: Bytes, leader_ack: bool) -> Result<(i64, i64), RaftError> {
        // Every replica's log refuses a batch that fails validation, and a log store error is
        // fatal to the Raft group, so a bad batch must never become a log entry — whatever the
        // caller checked already.
        let h = batch::validate(&batch)
            .map_err(|e| RaftError::Other(format!("invalid record batch: {e}")))?;
        if batch::is_internal(&h) {
            return Err(RaftError::Other(
                "record batch uses the producer id reserved for Raft-internal entries".into(),
            ));
        }
        // Marked as not yet placed, so every log appending it assigns offsets only here, on the
        // leader; a replica that receives it later checks the leader's placement instead.
        let batch = {
            let mut b = bytes::BytesMut::from(&batch[..h.total_len()]);
            batch::set_base_offset(&mut b, batch::UNPLACED_BASE_OFFSET);
            b.freeze()
        };
        // Without a waiter the sender stays here, so `local` never resolves.
        let (tx, local) = tokio::sync::oneshot::channel();
        let mut idle_tx = None;
        // A sole voter commits the moment its own disk has the batch, so waiting for the commit
        // costs nothing and keeps Kafka's single-replica behaviour: the high watermark already
        // covers an acks=1 answer.
        let leader_ack = leader_ack && self.voters().len() > 1;
        let key = if leader_ack {
            self.shared.wait_local_append(LocalWaiter {
                batch: batch.clone(),
                tx,
            });
            Some(batch.clone())
        } else {
            idle_tx = Some(tx);
            None
        };
        let res = self.propose_admitted(batch, local).await;
        drop(idle_tx);
        if let Some(key) = key {
            self.shared.forget_local_append(&key);
        }
        res
    }

    /// Waits for the gate, proposes `batch` the moment it is open, and answers with its offsets
    /// from the commit or from `local` (the leader's own disk, for acks=1), whichever is first.
    async fn propose_admitted(
        &self,
        batch: Bytes,
        local: tokio::sync::oneshot::Receiver<(i64, i64)>,
    ) -> Result<(i64, i64), RaftError> {
        let mut batch = Some(batch);
        let (_in_flight, submitted) = loop {
            let reopened = self.gate.reopened.notified();
            // `client_write_ff` sends to the Raft core before its first await, so polling it once
            // proposes the entry; not being ready means the core has stopped.
            if let Some(admitted) = self.gate.admit(|| {
                let b = batch.take()?;
                if let Err(e) = self.propose_to_machines(&b) {
                    return Some(Err(e));
                }
                Some(match poll_once(self.raft.client_write_ff(b)) {
                    Some(Ok(rx)) => Ok(rx),
                    Some(Err(fatal)) => Err(fatal.into()),
                    None => Err(RaftError::Shutdown),
                })
            }) {
                break admitted;
            }
            // A transfer is under way; it reopens within its own bound.
            if tokio::time::timeout(PROPOSE_TIMEOUT, reopened)
                .await
                .is_err()
            {
                return Err(RaftError::Timeout);
            }
        };
        let committed = submitted.unwrap_or(Err(RaftError::Shutdown))?;
        let committed = tokio::time::timeout(PROPOSE_TIMEOUT, committed);
        tokio::pin!(committed);
        let lost = self.leadership_lost();
        tokio::pin!(lost);
        // Whichever comes first; commit implies the local append, so a waiter that misses its
        // entry still gets the committed answer. Dropping the receiver does not cancel the entry.
        tokio::select! {
            reply = &mut committed => match reply {
                Err(_) => Err(RaftError::Timeout),
                Ok(Err(_)) => Err(RaftError::Shutdown),
                Ok(Ok(Err(e))) => Err(OpenraftError::<NodeId, _>::APIError(e).into()),
                Ok(Ok(Ok(resp))) => decode_offsets(&resp.data).ok_or_else(|| {
                    RaftError::Other(format!("bad append reply of {} bytes", resp.data.len()))
                }),
            },
            Ok(offsets) = local => Ok(offsets),
            // A leader cut off from its majority cannot commit until the partition heals, and by
            // then it has usually been replaced: answer now, so the client finds the new leader
            // instead of waiting out its request timeout. The outcome is unknown (it may still
            // commit), which is what Timeout says.
            () = &mut lost => Err(RaftError::Timeout),
        }
    }

    /// The machines' in-flight step for a batch about to be proposed (on the leader only: a
    /// follower's proposal fails in the core anyway). Runs under the gate, in log order.
    fn propose_to_machines(&self, batch: &[u8]) -> Result<(), RaftError> {
        let (leading, term) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state == openraft::ServerState::Leader, m.current_term)
        };
        if !leading {
            return Ok(());
        }
        self.machines
            .propose(batch, term)
            .map_err(|e| RaftError::Other(e.to_string()))
    }

    /// Resolves once this node, having led, no longer claims leadership (it stepped down, or
    /// cannot reach a majority of the voters).
    async fn leadership_lost(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !self.is_leader() {
                return;
            }
        }
    }
}
