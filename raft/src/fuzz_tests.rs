//! Bounded fuzz target `raft_frame` (issue 15): a node-to-node frame body (after the u32 length
//! prefix) through what the receiving transport runs before openraft sees anything —
//! [`codec::decode_frame`], then per RPC kind [`codec::decode_append`] + [`peer_input::check_append`],
//! the vote JSON + [`peer_input::check_vote`], or [`codec::decode_snapshot`] +
//! [`peer_input::check_snapshot`] + the snapshot-chunk bounds — for a metadata and a partition
//! group alike. Also [`codec::decode_entry`] on the raw payload (the log stores entries so).
//!
//! Seeds: `fuzz/corpus/raft_frame/` (frames written by the real encoders around batches captured
//! from Kafka clients, see `fuzz/README.md`) plus frames built here. Any input must be refused or
//! accepted, never panic.

use std::collections::BTreeSet;
use std::path::PathBuf;

use bytes::{BufMut, Bytes, BytesMut};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{EntryPayload, Membership};
use sluice_storage::fuzzing::{self, Corpus};

use crate::codec::{self, Frame, RpcKind};
use crate::peer_input::{self, SnapshotChunks};
use crate::{log_id, Entry, NodeId, SnapshotMeta, TypeConfig, Vote};

fn corpus_dir() -> PathBuf {
    // The corpus lives with the workspace's other targets, at the root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/raft_frame")
}

fn frame(kind: RpcKind, group: &str, payload: &[u8]) -> Vec<u8> {
    let mut f = codec::begin_request(9, kind, group);
    f.put_slice(payload);
    // Without the u32 length prefix: the target gets frame bodies, as `read_frame` yields them.
    f[4..].to_vec()
}

/// Frames of every kind the transport serves, made by the real encoders.
fn built_seeds() -> Vec<Vec<u8>> {
    let batch = sluice_storage::batch::testutil::data_batch(1_700_000_000_000, &[5, 20]);
    let mut placed = batch.clone();
    sluice_storage::batch::set_base_offset(&mut placed, 41);
    let members: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id(3, 7)),
        entries: vec![
            Entry {
                log_id: log_id(3, 8),
                payload: EntryPayload::Membership(Membership::new(vec![members], ())),
            },
            Entry {
                log_id: log_id(3, 9),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(3, 10),
                payload: EntryPayload::Normal(Bytes::from(placed)),
            },
        ],
        leader_commit: Some(log_id(3, 8)),
    };
    let mut out = BytesMut::new();
    let mut seeds = Vec::new();
    if codec::encode_append(&append, &mut out).is_ok() {
        seeds.push(frame(RpcKind::AppendEntries, "p/t/0", &out));
        seeds.push(frame(RpcKind::AppendEntries, "meta", &out));
    }
    // The batches Kafka clients produced (captured, see fuzz/README.md), replicated as a leader
    // would send them: placed at an offset, one entry each.
    let captured = Corpus::load(&corpus_dir().join("../record_batch"));
    for (i, b) in captured.seeds.into_iter().enumerate() {
        let mut b = b;
        if b.len() >= sluice_storage::batch::BATCH_HEADER_LEN {
            sluice_storage::batch::set_base_offset(&mut b, 100 + i as i64);
        }
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(5, 2),
            prev_log_id: Some(log_id(5, 20)),
            entries: vec![Entry {
                log_id: log_id(5, 21),
                payload: EntryPayload::Normal(Bytes::from(b)),
            }],
            leader_commit: Some(log_id(5, 20)),
        };
        let mut out = BytesMut::new();
        if codec::encode_append(&req, &mut out).is_ok() {
            seeds.push(frame(RpcKind::AppendEntries, "p/t/0", &out));
        }
    }
    let vote = VoteRequest::<NodeId>::new(Vote::new(4, 2), Some(log_id(3, 10)));
    if let Ok(json) = serde_json::to_vec(&vote) {
        seeds.push(frame(RpcKind::Vote, "meta", &json));
    }
    let snapshot = InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(3, 10)),
            last_membership: Default::default(),
            snapshot_id: "3-10-1".into(),
        },
        offset: 0,
        data: br#"{"machines":{}}"#.to_vec(),
        done: true,
    };
    let mut out = BytesMut::new();
    if codec::encode_snapshot(&snapshot, &mut out).is_ok() {
        seeds.push(frame(RpcKind::InstallSnapshot, "p/t/0", &out));
        seeds.push(frame(RpcKind::InstallSnapshot, "meta", &out));
    }
    seeds.push(frame(RpcKind::App, "2", b"{\"Heartbeat\":{}}"));
    seeds.push(frame(RpcKind::Ping, "2", b""));
    if let Ok(resp) = codec::response_frame(9, codec::ResponseStatus::Ok, b"{\"Ok\":null}") {
        seeds.push(resp[4..].to_vec());
    }
    if let Ok(entry) = codec::encode_entry(&Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Normal(Bytes::from(batch)),
    }) {
        seeds.push(entry);
    }
    seeds
}

/// What the receiving side runs on a frame body, for both kinds of group.
fn check_frame(input: &[u8]) -> Result<(), String> {
    let body = Bytes::copy_from_slice(input);
    // The log's own entry decoding sees the same bytes a peer controls.
    let _ = codec::decode_entry(&body);
    let Ok(Frame::Request {
        kind,
        group,
        payload,
        ..
    }) = codec::decode_frame(body)
    else {
        return Ok(());
    };
    for group in [group.as_str(), "meta", "p/t/0"] {
        match kind {
            RpcKind::AppendEntries => {
                if let Ok(req) = codec::decode_append(&payload) {
                    let _ = peer_input::check_append(group, &req);
                }
            }
            RpcKind::Vote => {
                if let Ok(req) = serde_json::from_slice::<VoteRequest<NodeId>>(&payload) {
                    let _ = peer_input::check_vote(&req);
                }
            }
            RpcKind::InstallSnapshot => {
                if let Ok(req) = codec::decode_snapshot(&payload) {
                    let _ = peer_input::check_snapshot(group, &req);
                    let _ = SnapshotChunks::default().check(group, &req);
                }
            }
            RpcKind::App | RpcKind::Ping => {}
        }
    }
    Ok(())
}

#[test]
fn fuzz_raft_frame_decoding() {
    let mut corpus = Corpus::load(&corpus_dir());
    corpus.seeds.extend(built_seeds());
    fuzzing::run("raft_frame", &corpus, 60_000, check_frame);
}

/// Writes [`built_seeds`] to `fuzz/corpus/raft_frame/` (by hand:
/// `cargo test -p sluice-raft write_raft_frame_corpus -- --ignored`).
#[test]
#[ignore]
fn write_raft_frame_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in built_seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("built-{i:02}.bin")), seed).unwrap();
    }
}

/// Structured inputs for what byte mutations rarely reach behind the JSON headers: any vote,
/// log ids (terms past what a partition log stores among them) and entries whose batches are
/// captured ones mutated, encoded by the real encoder, then decoded and checked as received.
#[test]
fn fuzz_raft_append_and_snapshot_fields() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let mut batches = Corpus::load(&corpus_dir().join("../record_batch")).seeds;
    batches.push(sluice_storage::batch::testutil::data_batch(
        1_700_000_000_000,
        &[1, 2],
    ));
    let term = prop_oneof![
        0u64..8,
        Just(i32::MAX as u64),
        Just(i32::MAX as u64 + 1),
        any::<u64>()
    ];
    let index = prop_oneof![0u64..64, any::<u64>()];
    let entry = (
        term.clone(),
        index.clone(),
        0u8..3,
        0..batches.len(),
        prop::collection::vec(any::<u64>(), 0..4),
        any::<i64>(),
    );
    let append = (
        term.clone(),
        any::<u64>(),
        any::<bool>(),
        prop::option::of((term.clone(), index.clone())),
        prop::collection::vec(entry, 0..4),
    );
    let snapshot = (
        term,
        index,
        prop_oneof![
            Just(0u64),
            any::<u64>(),
            Just(crate::peer_input::MAX_SNAPSHOT_BYTES)
        ],
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    let n = fuzzing::cases(20_000);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let started = std::time::Instant::now();
    let result = runner.run(
        &(append, snapshot),
        |((vterm, vnode, committed, prev, entries), (sterm, sindex, offset, done, data))| {
            let vote = if committed {
                Vote::new_committed(vterm, vnode)
            } else {
                Vote::new(vterm, vnode)
            };
            let entries = entries
                .into_iter()
                .map(|(t, i, kind, b, ops, base)| Entry {
                    log_id: log_id(t, i),
                    payload: match kind {
                        0 => EntryPayload::Blank,
                        1 => EntryPayload::Membership(Membership::new(
                            vec![[1u64, 2].into_iter().collect()],
                            (),
                        )),
                        _ => {
                            let mut bytes = fuzzing::mutate(&batches[b], &ops);
                            if bytes.len() >= sluice_storage::batch::BATCH_HEADER_LEN {
                                sluice_storage::batch::set_base_offset(&mut bytes, base);
                            }
                            EntryPayload::Normal(Bytes::from(bytes))
                        }
                    },
                })
                .collect();
            let req = AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: prev.map(|(t, i)| log_id(t, i)),
                entries,
                leader_commit: prev.map(|(t, i)| log_id(t, i / 2)),
            };
            let mut out = BytesMut::new();
            if codec::encode_append(&req, &mut out).is_ok() {
                let body = frame(RpcKind::AppendEntries, "p/t/0", &out);
                check_frame(&body).map_err(TestCaseError::fail)?;
            }
            let snap = InstallSnapshotRequest::<TypeConfig> {
                vote,
                meta: SnapshotMeta {
                    last_log_id: Some(log_id(sterm, sindex)),
                    last_membership: Default::default(),
                    snapshot_id: format!("{sterm}-{sindex}"),
                },
                offset,
                data,
                done,
            };
            let mut out = BytesMut::new();
            if codec::encode_snapshot(&snap, &mut out).is_ok() {
                let body = frame(RpcKind::InstallSnapshot, "meta", &out);
                check_frame(&body).map_err(TestCaseError::fail)?;
            }
            Ok(())
        },
    );
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz raft_fields: {n} cases in {secs:.1} s = {:.0} exec/s; seeds {} captured batches",
        f64::from(n) / secs.max(1e-9),
        batches.len()
    );
    if let Err(e) = result {
        panic!("fuzz target raft_fields failed: {e}");
    }
}
