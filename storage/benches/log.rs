//! The partition log's hot paths, on the crate's real `PartitionLog` in a tempdir:
//!
//! - `log_append_16k`: the leader's append (`append_data`: CRC check, offsets patched, written to
//!   the active segment, sparse indexes extended) of one ~16 KiB batch of 100-byte records,
//!   without fsync, with an fdatasync after every append (an acks=all batch that shares its fsync
//!   with nobody), and with one fdatasync per 16 appends (group commit);
//! - `log_fetch`: on a log of 60,000 ~1.1 KiB batches in 9 segments of 8 MiB, the lookup a Fetch
//!   does to find the batch holding a random offset (segment, then the sparse offset index, then
//!   the entry table), that lookup plus the read of the one batch, and a 1 MiB read from a random
//!   offset (`read_within`, the call the fetch path makes; page cache warm).
//!
//! Run: `cargo bench -p sluice-storage --bench log` (`make microbench` runs every bench);
//! `cargo test -p sluice-storage --bench log` runs each case once as a smoke test.
//!
//! The fsync cases measure this machine's disk as much as the code: compare them with each other
//! and with the no-fsync case, not across machines.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_storage::batch::testutil::data_batch;
use sluice_storage::{LogConfig, PartitionLog};
use tempfile::TempDir;

/// Every batch of one leader term, as on a stable leader.
const TERM: u64 = 1;
const TS: i64 = 1_700_000_000_000;
/// 151 records of 100 bytes make a 16,694-byte batch: about what a producer's default
/// `batch.size` (16384) gives.
const BATCH_RECORDS: usize = 151;
const RECORD_BYTES: usize = 100;
/// Appends go to a fresh log once this much was written, outside the timed part, so a long
/// measurement does not fill the disk (and no segment roll, which happens once per 1 GiB, lands
/// in the timed part).
const RESET_BYTES: u64 = 256 << 20;
/// Group commit: one fdatasync for this many appends.
const GROUP: u64 = 16;

/// A partition log being appended to, in its own tempdir.
struct Appender {
    log: PartitionLog,
    next_index: u64,
    // Dropped after the log: the directory goes once its files are closed.
    _dir: TempDir,
}

impl Appender {
    /// A fresh log with its first segment already created (that costs file creation and two
    /// fsyncs, once per segment, which is not what these cases measure).
    fn new(batch: &[u8]) -> Appender {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = PartitionLog::open(dir.path(), LogConfig::default()).expect("open log");
        let mut a = Appender {
            log,
            next_index: 1,
            _dir: dir,
        };
        a.append(batch);
        a.log.sync().expect("sync");
        a
    }

    fn append(&mut self, batch: &[u8]) {
        let offsets = self
            .log
            .append_data(self.next_index, TERM, batch)
            .expect("append");
        black_box(offsets);
        self.next_index += 1;
    }

    /// Appends of `len` bytes that still fit before the reset point; resets first if none does.
    fn room(&mut self, batch: &[u8]) -> u64 {
        let len = batch.len() as u64;
        if self.log.size_bytes() + len > RESET_BYTES {
            *self = Appender::new(batch);
        }
        (RESET_BYTES - self.log.size_bytes()) / len
    }
}

/// Times `iters` rounds of `round` (which appends `per_round` batches), resetting the log between
/// runs outside the timed part.
fn timed_rounds(
    a: &mut Appender,
    batch: &[u8],
    iters: u64,
    per_round: u64,
    mut round: impl FnMut(&mut Appender),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min((a.room(batch) / per_round).max(1));
        let t = Instant::now();
        for _ in 0..n {
            round(a);
        }
        total += t.elapsed();
        left -= n;
    }
    total
}

fn append(c: &mut Criterion) {
    let batch = data_batch(TS, &[RECORD_BYTES; BATCH_RECORDS]);
    let len = batch.len() as u64;
    let mut g = c.benchmark_group("log_append_16k");
    g.throughput(Throughput::Bytes(len));
    let mut a = Appender::new(&batch);
    g.bench_function("no_fsync", |b| {
        b.iter_custom(|iters| timed_rounds(&mut a, &batch, iters, 1, |a| a.append(&batch)))
    });
    // fdatasync takes milliseconds: fewer, longer samples keep the run short.
    g.sample_size(20);
    g.bench_function("fsync_each", |b| {
        b.iter_custom(|iters| {
            timed_rounds(&mut a, &batch, iters, 1, |a| {
                a.append(&batch);
                a.log.sync().expect("sync");
            })
        })
    });
    g.throughput(Throughput::Bytes(len * GROUP));
    g.bench_function(format!("fsync_per_{GROUP}"), |b| {
        b.iter_custom(|iters| {
            timed_rounds(&mut a, &batch, iters, GROUP, |a| {
                for _ in 0..GROUP {
                    a.append(&batch);
                }
                a.log.sync().expect("sync");
            })
        })
    });
    g.finish();
}

/// Batches in the fetch log, and records per batch (a small-batch producer's log, so the index
/// has many entries to search).
const FETCH_LOG_BATCHES: usize = 60_000;
const FETCH_BATCH_RECORDS: usize = 10;

/// Offsets to look up: spread over the whole log in a fixed pseudo-random order, so successive
/// lookups do not hit the same cache lines.
fn random_offsets(end: i64, n: usize) -> Vec<i64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % end as u64) as i64
        })
        .collect()
}

fn fetch(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    // 8 MiB segments: the lookup first picks one of several segments, as on a long-lived log.
    let cfg = LogConfig {
        segment_bytes_max: 8 << 20,
        ..LogConfig::default()
    };
    let mut log = PartitionLog::open(dir.path(), cfg).expect("open log");
    let batch = data_batch(TS, &[RECORD_BYTES; FETCH_BATCH_RECORDS]);
    for i in 0..FETCH_LOG_BATCHES {
        log.append_data(i as u64 + 1, TERM, &batch).expect("append");
    }
    log.sync().expect("sync");
    let end = log.log_end_offset();
    let offsets = random_offsets(end, 4096);
    // A 1 MiB read from offsets that leave at least 1 MiB of log behind them.
    const RANGE: usize = 1 << 20;
    let range_end = end - (RANGE / batch.len() + 1) as i64 * FETCH_BATCH_RECORDS as i64;
    let range_offsets = random_offsets(range_end, 4096);

    // What the cases rely on: max_bytes 0 without min_one stops right after the lookup, and a
    // one-byte limit with min_one returns exactly the batch holding the offset.
    let o = offsets[0];
    assert!(log.read_within(o, 0, i64::MAX, false).unwrap().is_empty());
    let one = log.read(o, 1, i64::MAX).unwrap();
    assert_eq!(one.len(), batch.len());
    let base = i64::from_be_bytes(one[..8].try_into().unwrap());
    assert!(base <= o && o < base + FETCH_BATCH_RECORDS as i64);
    let r = log.read(range_offsets[0], RANGE, i64::MAX).unwrap();
    assert!(r.len() > RANGE - batch.len() && r.len() <= RANGE);

    println!(
        "fetch log: {FETCH_LOG_BATCHES} batches of {} B, {} segments, offsets 0..{end}",
        batch.len(),
        log.segment_count()
    );

    let mut g = c.benchmark_group("log_fetch");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("offset_lookup", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            black_box(log.read_within(black_box(offsets[i]), 0, i64::MAX, false))
        })
    });
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("read_one_batch", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            black_box(log.read(black_box(offsets[i]), 1, i64::MAX))
        })
    });
    g.throughput(Throughput::Bytes(RANGE as u64));
    g.bench_function("read_1mib", |b| {
        b.iter(|| {
            i = (i + 1) % range_offsets.len();
            black_box(log.read(black_box(range_offsets[i]), RANGE, i64::MAX))
        })
    });
    g.finish();
}

criterion_group!(benches, append, fetch);
criterion_main!(benches);
