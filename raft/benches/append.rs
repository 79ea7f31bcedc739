//! The Raft append path as the leader runs it, on a real single-voter partition group in a
//! tempdir: `PartitionGroup::enqueue` (validation, the append gate, hand-over to the openraft core)
//! → the partition log store's append of the entries the core gathered, one fdatasync for all of
//! them (group commit) → commit → the partition's state machine applies (high watermark) →
//! `Committed` resolves with the offsets. Every batch is ~16 KiB of 100-byte records, acks=all.
//!
//! - `raft_append_16k/one_at_a_time`: the next batch is proposed only once the previous one
//!   committed, so each pays a whole fsync (the latency of one acks=all produce on an idle
//!   partition);
//! - `raft_append_16k/pipelined_32`: 32 batches enqueued back to back, as a connection pipelining
//!   requests does, then all awaited; the ones that queue behind an fsync share the next one.
//!   The bench prints the batches per fsync it saw.
//!
//! The host binds a loopback listener for its transport, but with one voter no frame crosses it:
//! nothing here is network time. Run: `cargo bench -p sluice-raft --bench append`
//! (`make microbench` runs every bench; `cargo test -p sluice-raft --bench append` runs each
//! case once as a smoke test). The figures are mostly this machine's fdatasync.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_raft::{Acks, LogConfig, MetaApp, PartitionGroup, RaftHost, RaftHostConfig};
use sluice_storage::batch::testutil::data_batch;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// 151 records of 100 bytes: a 16,694-byte batch, about what a producer's default `batch.size`
/// (16384) gives.
const BATCH_RECORDS: usize = 151;
const PIPELINE: usize = 32;

/// The metadata group needs an application; these benches never propose to it.
struct NoMeta;

impl MetaApp for NoMeta {
    fn apply(&self, _index: u64, _command: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(&self, _snapshot: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// A one-node host with one partition group that this node leads.
async fn single_voter_partition(dir: &std::path::Path) -> (Arc<RaftHost>, Arc<PartitionGroup>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cfg = RaftHostConfig {
        node_id: 1,
        raft_addr: addr.clone(),
        data_dir: dir.to_path_buf(),
        peers: BTreeMap::from([(1, addr)]),
        tls: None,
    };
    let host = RaftHost::start_with_listener(cfg, listener, Arc::new(NoMeta))
        .await
        .expect("start host");
    let p = host
        .open_partition(
            "p/bench/0".to_string(),
            dir.join("partitions").join("bench-0"),
            LogConfig::default(),
            [1u64],
        )
        .await
        .expect("open partition");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.is_leader() {
        assert!(Instant::now() < deadline, "no partition leader in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (host, p)
}

fn append(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, p) = rt.block_on(single_voter_partition(dir.path()));
    let batch = Bytes::from(data_batch(1_700_000_000_000, &[100; BATCH_RECORDS]));
    // The first append waits for the leader's own term to apply; keep that out of the timing.
    rt.block_on(p.append(batch.clone())).expect("first append");

    let mut g = c.benchmark_group("raft_append_16k");
    // fdatasync takes milliseconds: fewer, longer samples keep the run (and the disk used) small.
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("one_at_a_time", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    p.append(batch.clone()).await.expect("append");
                }
                t.elapsed()
            })
        })
    });
    g.throughput(Throughput::Bytes((batch.len() * PIPELINE) as u64));
    let (fsyncs0, batches0) = p.io_counters();
    g.bench_function(format!("pipelined_{PIPELINE}"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let mut committed = Vec::with_capacity(PIPELINE);
                    for _ in 0..PIPELINE {
                        committed.push(p.enqueue(batch.clone(), Acks::All).await.expect("enqueue"));
                    }
                    for c in committed {
                        c.await.expect("commit");
                    }
                }
                t.elapsed()
            })
        })
    });
    g.finish();
    let (fsyncs, batches) = p.io_counters();
    println!(
        "pipelined_{PIPELINE}: {} batches in {} fsyncs ({:.1} per fsync)",
        batches - batches0,
        fsyncs - fsyncs0,
        (batches - batches0) as f64 / (fsyncs - fsyncs0).max(1) as f64
    );
    rt.block_on(host.shutdown());
}

criterion_group!(benches, append);
criterion_main!(benches);
