//! Checks on what a peer sends, made before it reaches a group's Raft core or log store.
//!
//! openraft treats a log store error as fatal to the group, and a vote it accepts is persisted,
//! so a single bad frame from a peer (a batch that fails validation, a term the log cannot
//! store as a Kafka leader epoch) would otherwise stop a partition for good. A refused request
//! gets an error answer; the sender retries or gives up, and this group carries on. This is
//! robustness against broken or buggy peers, not authentication.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::EntryPayload;
use sluice_storage::batch;

use crate::{LogId, NodeId, TypeConfig, Vote};

/// The largest term a partition log can store: the term is the batch's partitionLeaderEpoch
/// (an i32). Applied to every group: no real cluster comes near it.
const MAX_TERM: u64 = i32::MAX as u64;

fn is_partition_group(group: &str) -> bool {
    group.starts_with("p/")
}

fn check_vote_term(vote: &Vote) -> Result<(), String> {
    let term = vote.leader_id().term;
    if term > MAX_TERM {
        return Err(format!(
            "term {term} is above the largest storable term {MAX_TERM}"
        ));
    }
    Ok(())
}

fn check_log_id(what: &str, id: Option<&LogId>) -> Result<(), String> {
    match id {
        Some(l) if l.leader_id.term > MAX_TERM => Err(format!(
            "{what} {l} has a term above the largest storable term {MAX_TERM}"
        )),
        _ => Ok(()),
    }
}

pub(crate) fn check_vote(req: &VoteRequest<NodeId>) -> Result<(), String> {
    check_vote_term(&req.vote)?;
    check_log_id("last log id", req.last_log_id.as_ref())
}

pub(crate) fn check_append(
    group: &str,
    req: &AppendEntriesRequest<TypeConfig>,
) -> Result<(), String> {
    check_vote_term(&req.vote)?;
    check_log_id("prev log id", req.prev_log_id.as_ref())?;
    check_log_id("leader commit", req.leader_commit.as_ref())?;
    for e in &req.entries {
        check_log_id("entry", Some(&e.log_id))?;
        if !is_partition_group(group) {
            continue;
        }
        if let EntryPayload::Normal(data) = &e.payload {
            let h = batch::validate(data)
                .map_err(|err| format!("entry {}: invalid record batch: {err}", e.log_id))?;
            if h.total_len() != data.len() {
                return Err(format!(
                    "entry {}: {} bytes hold a batch of {}",
                    e.log_id,
                    data.len(),
                    h.total_len()
                ));
            }
            if batch::is_internal(&h) {
                return Err(format!(
                    "entry {}: a data batch uses the internal producer id",
                    e.log_id
                ));
            }
            if h.base_offset < 0 {
                return Err(format!(
                    "entry {}: a replicated batch must carry the offset its leader placed it at, not {}",
                    e.log_id, h.base_offset
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn check_snapshot(
    group: &str,
    req: &InstallSnapshotRequest<TypeConfig>,
) -> Result<(), String> {
    check_vote_term(&req.vote)?;
    check_log_id("snapshot", req.meta.last_log_id.as_ref())?;
    if !is_partition_group(group) {
        return Ok(());
    }
    // A partition snapshot is a few hundred bytes of JSON, always sent whole; checking it whole
    // keeps a malformed one from failing inside the state machine, which would stop the group.
    if req.offset != 0 || !req.done {
        return Err(format!(
            "a partition snapshot comes in one chunk, got offset {} done {}",
            req.offset, req.done
        ));
    }
    crate::partition_store::check_snapshot_data(&req.data)
}

/// The largest metadata snapshot a node accepts from a peer.
pub(crate) const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// Per group, the snapshot being received and how many of its bytes have arrived. openraft
/// writes a chunk at its offset into a growing buffer, so a chunk at a huge offset would make
/// the receiver zero-fill memory up to it: a chunk may only start a snapshot (offset 0), repeat
/// or continue the bytes received so far.
#[derive(Default)]
pub(crate) struct SnapshotChunks {
    receiving: std::collections::HashMap<String, (String, u64)>,
}

impl SnapshotChunks {
    /// Whether the chunk may be handed to openraft; nothing is recorded until it accepted it
    /// ([`SnapshotChunks::record`]), so a stray chunk (a deposed leader's) cannot reset the
    /// progress of the snapshot the current leader streams.
    pub(crate) fn admit(
        &self,
        group: &str,
        req: &InstallSnapshotRequest<TypeConfig>,
    ) -> Result<(), String> {
        self.received(group, req).map(|_| ())
    }

    /// Notes a chunk openraft accepted.
    pub(crate) fn record(&mut self, group: &str, req: &ChunkSeen) {
        if req.done {
            self.receiving.remove(group);
            return;
        }
        let before = match self.receiving.get(group) {
            Some((id, n)) if *id == req.snapshot_id && req.offset != 0 => *n,
            _ => 0,
        };
        self.receiving.insert(
            group.to_string(),
            (req.snapshot_id.clone(), before.max(req.end)),
        );
    }

    #[cfg(test)]
    pub(crate) fn check(
        &mut self,
        group: &str,
        req: &InstallSnapshotRequest<TypeConfig>,
    ) -> Result<(), String> {
        self.admit(group, req)?;
        self.record(group, &ChunkSeen::of(req));
        Ok(())
    }

    fn received(
        &self,
        group: &str,
        req: &InstallSnapshotRequest<TypeConfig>,
    ) -> Result<u64, String> {
        let id = &req.meta.snapshot_id;
        let end = req.offset.saturating_add(req.data.len() as u64);
        if end > MAX_SNAPSHOT_BYTES {
            return Err(format!(
                "snapshot chunk ends at byte {end}, past the {MAX_SNAPSHOT_BYTES} byte limit"
            ));
        }
        let received = match self.receiving.get(group) {
            _ if req.offset == 0 => 0,
            Some((current, received)) if current == id => *received,
            _ => {
                return Err(format!(
                    "snapshot {id} chunk at offset {} without its start",
                    req.offset
                ))
            }
        };
        if req.offset > received {
            return Err(format!(
                "snapshot {id} chunk at offset {} leaves a gap after the {received} bytes received",
                req.offset
            ));
        }
        Ok(received)
    }
}

/// What [`SnapshotChunks::record`] needs of a chunk, kept while openraft owns the request.
pub(crate) struct ChunkSeen {
    snapshot_id: String,
    offset: u64,
    end: u64,
    done: bool,
}

impl ChunkSeen {
    pub(crate) fn of(req: &InstallSnapshotRequest<TypeConfig>) -> ChunkSeen {
        ChunkSeen {
            snapshot_id: req.meta.snapshot_id.clone(),
            offset: req.offset,
            end: req.offset.saturating_add(req.data.len() as u64),
            done: req.done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data_batch;
    use bytes::Bytes;

    fn append(entries: Vec<crate::Entry>, term: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: None,
            leader_commit: None,
            entries,
        }
    }

    fn normal(term: u64, index: u64, data: Vec<u8>) -> crate::Entry {
        crate::Entry {
            log_id: crate::log_id(term, index),
            payload: EntryPayload::Normal(Bytes::from(data)),
        }
    }

    #[test]
    fn votes_and_appends_with_unstorable_terms_are_refused() {
        let big = MAX_TERM + 1;
        assert!(check_vote(&VoteRequest::new(Vote::new(big, 2), None)).is_err());
        assert!(check_vote(&VoteRequest::new(Vote::new(MAX_TERM, 2), None)).is_ok());
        assert!(check_append("meta", &append(vec![], big)).is_err());
        let mut placed = data_batch(0, &[b"a"]);
        batch::set_base_offset(&mut placed, 0);
        assert!(check_append("p/t/0", &append(vec![normal(big, 1, placed.clone())], 3)).is_err());
        assert!(check_append("p/t/0", &append(vec![normal(3, 1, placed)], 3)).is_ok());
    }

    #[test]
    fn partition_entries_must_be_one_valid_placed_batch() {
        let mut good = data_batch(0, &[b"a", b"b"]);
        batch::set_base_offset(&mut good, 7);
        assert!(check_append("p/t/0", &append(vec![normal(1, 1, good.clone())], 1)).is_ok());
        let mut bad_crc = good.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0xff;
        assert!(check_append("p/t/0", &append(vec![normal(1, 1, bad_crc)], 1)).is_err());
        let mut two = good.clone();
        two.extend_from_slice(&good);
        assert!(check_append("p/t/0", &append(vec![normal(1, 1, two)], 1)).is_err());
        let mut unplaced = good.clone();
        batch::set_base_offset(&mut unplaced, batch::UNPLACED_BASE_OFFSET);
        assert!(check_append("p/t/0", &append(vec![normal(1, 1, unplaced)], 1)).is_err());
        // The metadata group's payloads are not Kafka batches.
        assert!(check_append("meta", &append(vec![normal(1, 1, b"cmd".to_vec())], 1)).is_ok());
    }

    fn chunk(id: &str, offset: u64, len: usize, done: bool) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: Vote::new_committed(1, 1),
            meta: openraft::SnapshotMeta {
                last_log_id: None,
                last_membership: Default::default(),
                snapshot_id: id.to_string(),
            },
            offset,
            data: vec![7; len],
            done,
        }
    }

    #[test]
    fn snapshot_chunks_may_not_skip_ahead_of_what_was_received() {
        let mut c = SnapshotChunks::default();
        // A hostile first chunk far out: refused, nothing recorded.
        assert!(c
            .check("meta", &chunk("s1", u64::MAX - 3, 10, false))
            .is_err());
        assert!(c.check("meta", &chunk("s1", 1 << 40, 10, false)).is_err());
        assert!(c.check("meta", &chunk("s1", 0, 100, false)).is_ok());
        // A resend of the same chunk, then the next one.
        assert!(c.check("meta", &chunk("s1", 0, 100, false)).is_ok());
        assert!(c.check("meta", &chunk("s1", 100, 100, false)).is_ok());
        // A gap, or another snapshot's middle, is refused.
        assert!(c.check("meta", &chunk("s1", 300, 100, false)).is_err());
        assert!(c.check("meta", &chunk("s2", 200, 100, false)).is_err());
        assert!(c.check("meta", &chunk("s1", 200, 100, true)).is_ok());
        // Done: a later chunk of it needs a new start.
        assert!(c.check("meta", &chunk("s1", 300, 1, false)).is_err());
    }
}
