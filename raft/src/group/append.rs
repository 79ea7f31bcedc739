//! Appends to a partition group, in two steps the types keep apart:
//! [`PartitionGroup::enqueue`] validates a batch and hands it to the Raft core (the ordering
//! point: batches enter the log in the order their enqueue calls returned), and the
//! [`Committed`] it yields resolves to the batch's offsets on commit, or on the leader's own disk
//! for [`Acks::Leader`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::RaftError as OpenraftError;
use sluice_storage::batch;

use super::gate::{poll_once, InFlight};
use super::partition::LeaderCheck;
use super::PartitionGroup;
use crate::config::PROPOSE_TIMEOUT;
use crate::partition_store::{decode_offsets, LocalWaiter, PartitionShared};
use crate::{NodeId, RaftError};

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Committed: fsynced on a majority of the voters (Kafka acks=all).
    All,
    /// On this leader's disk (Kafka acks=1): a leader that fails before a majority has the
    /// batch may lose it. A sole voter answers on commit, which costs nothing more there.
    Leader,
}

/// The outcome of an enqueued batch: resolves to its (base offset, last offset), or to
/// [`RaftError::Timeout`] when the outcome is unknown (no commit within the proposal timeout, or
/// this node lost the leadership meanwhile; the batch may still commit). Dropping it does not
/// withdraw the batch. Until it resolves or is dropped, the batch counts as in flight for a
/// leadership transfer, which lets in-flight batches finish first.
#[must_use = "the batch is in the log either way; the future tells its offsets"]
pub struct Committed {
    inner: crate::BoxFuture<'static, Result<(i64, i64), RaftError>>,
}

impl Future for Committed {
    type Output = Result<(i64, i64), RaftError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Committed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Committed")
    }
}

/// Forgets an acks=1 waiter when its append ends any way (answered, failed or dropped).
struct ForgetWaiter {
    shared: Arc<PartitionShared>,
    batch: Bytes,
}

impl Drop for ForgetWaiter {
    fn drop(&mut self) {
        self.shared.forget_local_append(&self.batch);
    }
}

type CoreReply = tokio::sync::oneshot::Receiver<
    Result<
        openraft::raft::ClientWriteResponse<crate::TypeConfig>,
        openraft::error::ClientWriteError<NodeId, crate::Node>,
    >,
>;

impl PartitionGroup {
    /// Proposes one validated Kafka batch; returns (base_offset, last_offset) once it is
    /// committed (Kafka acks=all). `enqueue(batch, Acks::All)` and then its [`Committed`].
    ///
    /// While the gate is open, the batch reaches the Raft core on this future's first poll.
    pub async fn append(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        self.enqueue(batch, Acks::All).await?.await
    }

    /// Like [`PartitionGroup::append`], but answers as soon as the batch is on this leader's
    /// disk (Kafka acks=1): a leader that fails before a majority has it may lose it.
    pub async fn append_leader_ack(&self, batch: Bytes) -> Result<(i64, i64), RaftError> {
        self.enqueue(batch, Acks::Leader).await?.await
    }

    /// Validates `batch` and hands it to the Raft core; returns once the core has it (or with
    /// the reason it could not), with the [`Committed`] that tells its offsets. Batches enter the
    /// log in the order their `enqueue` calls return: a caller that awaits the enqueue of request
    /// N before it starts request N+1 gets them in that order.
    ///
    /// While a leadership transfer or a voter change holds the gate closed, this waits for it to
    /// reopen, at most the proposal timeout of 10 s ([`RaftError::Timeout`]). While it is open nothing
    /// awaits before the hand-over, so the first poll enqueues.
    pub async fn enqueue(&self, batch: Bytes, acks: Acks) -> Result<Committed, RaftError> {
        // Every replica's log refuses a batch that fails validation, and a log store error is
        // fatal to the Raft group, so a bad batch must never become a log entry — whatever the
        // caller checked already.
        let h = batch::validate(&batch).map_err(RaftError::InvalidBatch)?;
        if batch::is_internal(&h) {
            return Err(RaftError::ReservedProducerId);
        }
        // Marked as not yet placed, so every log appending it assigns offsets only here, on the
        // leader; a replica that receives it later checks the leader's placement instead.
        let batch = {
            let mut b = bytes::BytesMut::from(&batch[..h.total_len()]);
            batch::set_base_offset(&mut b, batch::UNPLACED_BASE_OFFSET);
            b.freeze()
        };
        // Without a waiter the sender stays in the future, so `local` never resolves.
        let (tx, local) = tokio::sync::oneshot::channel();
        let mut idle_tx = None;
        // A sole voter commits the moment its own disk has the batch, so waiting for the commit
        // costs nothing and keeps Kafka's single-replica behaviour: the high watermark already
        // covers an acks=1 answer.
        let leader_ack = acks == Acks::Leader && self.voters().len() > 1;
        let forget = if leader_ack {
            self.shared.wait_local_append(LocalWaiter {
                batch: batch.clone(),
                tx,
            });
            Some(ForgetWaiter {
                shared: self.shared.clone(),
                batch: batch.clone(),
            })
        } else {
            idle_tx = Some(tx);
            None
        };
        self.own_term_applied().await?;
        let (in_flight, reply) = self.hand_to_core(batch).await?;
        let check = self.leader_check();
        let inner = async move {
            let _in_flight = in_flight;
            let _forget = forget;
            let _idle_tx = idle_tx;
            await_outcome(reply, local, check).await
        };
        Ok(Committed {
            inner: Box::pin(inner),
        })
    }

    /// Waits for the gate and proposes `batch` the moment it is open, with no await in between:
    /// the ordering point.
    async fn hand_to_core(&self, batch: Bytes) -> Result<(InFlight, CoreReply), RaftError> {
        let mut batch = Some(batch);
        loop {
            let reopened = self.gate.reopened.notified();
            // `client_write_ff` sends to the Raft core before its first await, so polling it once
            // proposes the entry; not being ready means the core has stopped.
            if let Some((in_flight, submitted)) = self.gate.admit(|| {
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
                return Ok((in_flight, submitted.unwrap_or(Err(RaftError::Shutdown))?));
            }
            // A transfer is under way; it reopens within its own bound.
            if tokio::time::timeout(PROPOSE_TIMEOUT, reopened)
                .await
                .is_err()
            {
                return Err(RaftError::Timeout);
            }
        }
    }

    /// On a new leader, waits (bounded) until it has applied an entry of its own term. Entries of
    /// earlier terms in its log commit together with that first entry, so until it applies, the
    /// machines have not seen them: a producer's resend of a batch already in the log would be
    /// checked against a table that lacks it and appended twice. Elsewhere this returns at once
    /// (a follower's proposal fails in the core anyway).
    async fn own_term_applied(&self) -> Result<(), RaftError> {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            {
                let m = metrics.borrow_and_update();
                let applied_term = m.last_applied.map(|l| l.leader_id.term);
                if m.state != openraft::ServerState::Leader || applied_term == Some(m.current_term)
                {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Err(_) => return Err(RaftError::Timeout),
                Ok(Err(_)) => return Err(RaftError::Shutdown),
                Ok(Ok(())) => {}
            }
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
            .map_err(RaftError::Refused)
    }
}

/// Answers with the batch's offsets from the commit or from `local` (the leader's own disk, for
/// acks=1), whichever is first.
async fn await_outcome(
    reply: CoreReply,
    local: tokio::sync::oneshot::Receiver<(i64, i64)>,
    check: LeaderCheck,
) -> Result<(i64, i64), RaftError> {
    let committed = tokio::time::timeout(PROPOSE_TIMEOUT, reply);
    tokio::pin!(committed);
    let lost = leadership_lost(check);
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

/// Resolves once this node, having led, no longer claims leadership (it stepped down, or cannot
/// reach a majority of the voters).
async fn leadership_lost(check: LeaderCheck) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !check.is_leader() {
            return;
        }
    }
}
