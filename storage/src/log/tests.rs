use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::index::SparseIndexes;
use super::*;
use crate::batch;
use crate::batch::testutil::data_batch;
use crate::batch::{internal_batch, set_base_offset, set_partition_leader_epoch};
use crate::file::read_optional;

// ---------- warning capture ----------

#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>);

struct FieldText<'a>(&'a mut String);
impl tracing::field::Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.1.fetch_add(1, Ordering::Relaxed);
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut text = String::new();
            event.record(&mut FieldText(&mut text));
            self.0.lock().unwrap().push(text);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs `f` and returns the text of every warning it logged on this thread.
fn with_warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let w = Warnings::default();
    let out = tracing::subscriber::with_default(w.clone(), f);
    let warns = w.0.lock().unwrap().clone();
    (out, warns)
}

// ---------- model ----------

#[derive(Clone, Debug)]
struct MEntry {
    index: u64,
    term: u64,
    start: i64,
    end: i64,
    data: bool,
    max_ts: i64,
    bytes: Vec<u8>,
}

#[derive(Default, Debug)]
struct Model {
    entries: Vec<MEntry>,
    next_index: Option<u64>,
    next_offset: i64,
}

impl Model {
    fn log_start(&self) -> i64 {
        self.entries.first().map_or(self.next_offset, |e| e.start)
    }

    fn push(&mut self, term: u64, data: Option<(&[u8], i64, i64)>, payload: &[u8]) -> MEntry {
        let index = self.next_index.unwrap_or(1);
        let start = self.next_offset;
        let e = match data {
            Some((batch, n, max_ts)) => {
                let mut bytes = batch.to_vec();
                set_base_offset(&mut bytes, start);
                set_partition_leader_epoch(&mut bytes, term as i32);
                MEntry {
                    index,
                    term,
                    start,
                    end: start + n,
                    data: true,
                    max_ts,
                    bytes,
                }
            }
            None => MEntry {
                index,
                term,
                start,
                end: start,
                data: false,
                max_ts: i64::MIN,
                bytes: internal_batch(term as i32, start, payload),
            },
        };
        self.entries.push(e.clone());
        self.next_index = Some(index + 1);
        self.next_offset = e.end;
        e
    }

    fn read(&self, offset: i64, max_bytes: usize, hw: i64, min_one: bool) -> Option<Vec<u8>> {
        if offset < self.log_start() || offset > self.next_offset {
            return None;
        }
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| e.data && e.end > offset) {
            let fits = out.len() + e.bytes.len() <= max_bytes || (out.is_empty() && min_one);
            if e.end > hw || !fits {
                break;
            }
            out.extend_from_slice(&e.bytes);
        }
        Some(out)
    }

    fn offset_for_timestamp(&self, ts: i64) -> Option<(i64, i64)> {
        self.entries
            .iter()
            .find(|e| e.data && e.max_ts >= ts)
            .map(|e| (e.start, e.max_ts))
    }
}

fn log_entry(e: &MEntry) -> LogEntry {
    LogEntry {
        raft_index: e.index,
        term: e.term,
        kind: if e.data {
            EntryKind::Data {
                base_offset: e.start,
                last_offset: e.end - 1,
            }
        } else {
            EntryKind::Internal
        },
        bytes: Bytes::from(e.bytes.clone()),
    }
}

fn check(log: &PartitionLog, m: &Model) {
    assert_eq!(log.first_index(), m.entries.first().map(|e| e.index));
    assert_eq!(log.last_index(), m.entries.last().map(|e| e.index));
    assert_eq!(log.next_index(), m.next_index);
    assert_eq!(log.log_end_offset(), m.next_offset);
    assert_eq!(log.log_start_offset(), m.log_start());
    for e in &m.entries {
        assert_eq!(log.term_of(e.index), Some(e.term), "term_of({})", e.index);
    }
    if let Some(first) = m.entries.first() {
        assert_eq!(log.term_of(first.index.wrapping_sub(1)), None);
    }
    if let Some(n) = m.next_index {
        assert_eq!(log.term_of(n), None);
    }
}

/// The on-disk sparse indexes must equal both the in-memory ones and a rebuild from the batches.
fn check_index_files(log: &PartitionLog) {
    for seg in &log.segments {
        let rebuilt =
            SparseIndexes::build(&seg.entries, seg.base_offset, log.cfg.index_interval_bytes);
        assert_eq!(seg.index, rebuilt, "incremental index differs from rebuild");
        let on_disk = |ext| read_optional(&seg.path(ext)).unwrap().unwrap_or_default();
        assert_eq!(on_disk("index"), rebuilt.encode_offsets());
        assert_eq!(on_disk("timeindex"), rebuilt.encode_times());
    }
}

fn random_data(rng: &mut StdRng, base_ts: i64) -> (Vec<u8>, i64, i64) {
    let n = rng.gen_range(1..=4usize);
    let sizes: Vec<usize> = (0..n).map(|_| rng.gen_range(0..120)).collect();
    (
        data_batch(base_ts, &sizes),
        n as i64,
        base_ts + n as i64 - 1,
    )
}

#[test]
fn model_random_operations() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes_max: 1200,
        index_interval_bytes: 250,
    };
    let mut log = PartitionLog::open(dir.path(), cfg).unwrap();
    let mut m = Model::default();
    let mut rng = StdRng::seed_from_u64(0x51_1CE);
    let mut term = 1u64;
    let (mut rolls, mut reopens, mut purges, mut truncates) = (0, 0, 0, 0);
    for step in 0..1500i64 {
        let segments_before = log.segments.len();
        match rng.gen_range(0..100) {
            0..=39 => {
                if rng.gen_bool(0.1) {
                    term += 1;
                }
                let base_ts = step * 10 + rng.gen_range(-40..40);
                let (b, n, max_ts) = random_data(&mut rng, base_ts);
                let idx = m.next_index.unwrap_or(1);
                if m.next_index.is_some() && rng.gen_bool(0.05) {
                    let err = log.append_data(idx + 1, term, &b).unwrap_err();
                    assert!(matches!(err, StorageError::NonContiguous { .. }), "{err}");
                }
                let got = log.append_data(idx, term, &b).unwrap();
                let e = m.push(term, Some((&b, n, max_ts)), &[]);
                assert_eq!(got, (e.start, e.end - 1));
            }
            40..=49 => {
                let payload: Vec<u8> = (0..rng.gen_range(0..60)).map(|_| rng.gen()).collect();
                let idx = m.next_index.unwrap_or(1);
                log.append_internal(idx, term, &payload).unwrap();
                m.push(term, None, &payload);
            }
            50..=54 => log.sync().unwrap(),
            55..=57 => {
                if rng.gen_bool(0.5) {
                    log.sync().unwrap();
                }
                drop(log);
                let (l, warns) = with_warnings(|| PartitionLog::open(dir.path(), cfg).unwrap());
                assert!(warns.is_empty(), "clean reopen warned: {warns:?}");
                log = l;
                check_index_files(&log);
                reopens += 1;
            }
            58..=62 => {
                if let (Some(first), Some(last)) = (m.entries.first(), m.entries.last()) {
                    let i = rng.gen_range(first.index..=last.index + 1);
                    log.truncate_from_index(i).unwrap();
                    if let Some(pos) = m.entries.iter().position(|e| e.index == i) {
                        m.next_offset = m.entries[pos].start;
                        m.entries.truncate(pos);
                        m.next_index = Some(i);
                    }
                    truncates += 1;
                }
            }
            63..=65 => {
                if let Some(next) = m.next_index {
                    let lo = m
                        .entries
                        .first()
                        .map_or(next, |e| e.index)
                        .saturating_sub(1);
                    let p = rng.gen_range(lo..=next + 1);
                    log.purge_upto_index(p).unwrap();
                    m.entries.retain(|e| e.index > p);
                    m.next_index = Some(next.max(p + 1));
                    purges += 1;
                }
            }
            66 => {
                let ni = m.next_index.unwrap_or(1) + rng.gen_range(0..3);
                let no = m.next_offset + rng.gen_range(0..10);
                log.reset(ni, no).unwrap();
                m.entries.clear();
                m.next_index = Some(ni);
                m.next_offset = no;
            }
            67..=84 => {
                let offset = rng.gen_range(m.log_start() - 2..=m.next_offset + 2);
                let max_bytes = rng.gen_range(1..700);
                let hw = if rng.gen_bool(0.3) {
                    i64::MAX
                } else {
                    rng.gen_range(m.log_start()..=m.next_offset + 1)
                };
                let min_one = rng.gen_bool(0.5);
                match (
                    log.read_within(offset, max_bytes, hw, min_one),
                    m.read(offset, max_bytes, hw, min_one),
                ) {
                    (Ok(got), Some(want)) => assert_eq!(
                        got.as_ref(),
                        &want[..],
                        "read({offset}, {max_bytes}, {hw}, {min_one})"
                    ),
                    (Err(StorageError::OffsetOutOfRange { .. }), None) => {}
                    (got, want) => panic!("read({offset}): got {got:?}, want {want:?}"),
                }
            }
            85..=92 => {
                let lo = m.entries.first().map_or(0, |e| e.index).saturating_sub(2);
                let hi = m.next_index.unwrap_or(1) + 2;
                let a = rng.gen_range(lo..=hi);
                let b = rng.gen_range(a..=hi + 1);
                let want: Vec<LogEntry> = m
                    .entries
                    .iter()
                    .filter(|e| e.index >= a && e.index < b)
                    .map(log_entry)
                    .collect();
                assert_eq!(log.entries(a, b).unwrap(), want, "entries({a}, {b})");
            }
            _ => {
                let data: Vec<&MEntry> = m.entries.iter().filter(|e| e.data).collect();
                let ts = if !data.is_empty() && rng.gen_bool(0.7) {
                    // Exact hits and near misses of stored timestamps are the interesting cases.
                    data[rng.gen_range(0..data.len())].max_ts + rng.gen_range(-1..=1)
                } else {
                    rng.gen_range(step * 10 - 100..=step * 10 + 50)
                };
                assert_eq!(
                    log.offset_for_timestamp(ts).unwrap(),
                    m.offset_for_timestamp(ts),
                    "offset_for_timestamp({ts})"
                );
            }
        }
        if log.segments.len() > segments_before {
            rolls += 1;
        }
        check(&log, &m);
    }
    check_index_files(&log);
    // Guards against a test that silently stopped exercising the interesting paths.
    assert!(
        rolls > 20 && reopens > 20 && purges > 20 && truncates > 20,
        "{rolls} {reopens} {purges} {truncates}"
    );
    let want: Vec<LogEntry> = m.entries.iter().map(log_entry).collect();
    assert_eq!(log.entries(0, u64::MAX).unwrap(), want);
}

#[test]
fn raft_index_to_offset_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
    log.append_internal(1, 1, b"blank").unwrap();
    assert_eq!(
        log.append_data(2, 1, &data_batch(100, &[1, 2, 3])).unwrap(),
        (0, 2)
    );
    log.append_internal(3, 2, b"membership").unwrap();
    log.append_internal(4, 2, b"").unwrap();
    assert_eq!(
        log.append_data(5, 2, &data_batch(200, &[4, 4])).unwrap(),
        (3, 4)
    );
    assert_eq!(log.log_end_offset(), 5);
    log.sync().unwrap();
    drop(log);
    let log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
    let kinds: Vec<(u64, u64, EntryKind)> = log
        .entries(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.raft_index, e.term, e.kind))
        .collect();
    let data = |base_offset, last_offset| EntryKind::Data {
        base_offset,
        last_offset,
    };
    assert_eq!(
        kinds,
        vec![
            (1, 1, EntryKind::Internal),
            (2, 1, data(0, 2)),
            (3, 2, EntryKind::Internal),
            (4, 2, EntryKind::Internal),
            (5, 2, data(3, 4)),
        ]
    );
    let entries = log.entries(3, 4).unwrap();
    assert_eq!(
        batch::internal_payload(&entries[0].bytes).unwrap(),
        b"membership"
    );
    // Stored data batches carry the assigned offset and the term as leader epoch.
    let h = batch::validate(&log.entries(5, 6).unwrap()[0].bytes).unwrap();
    assert_eq!((h.base_offset, h.partition_leader_epoch), (3, 2));
    // Offset 3 is in entry 5; the internal entries before it are skipped.
    let got = log.read(3, 1, i64::MAX).unwrap();
    assert_eq!(batch::validate(&got).unwrap().base_offset, 3);
    // Unless told otherwise: then a batch larger than max_bytes is not returned at all.
    assert_eq!(log.read_within(3, 1, i64::MAX, false).unwrap().len(), 0);
    assert_eq!(log.read_within(3, got.len(), i64::MAX, false).unwrap(), got);
    // Batches on both sides of internal entries come back as one contiguous buffer.
    let all = log.read(0, usize::MAX, i64::MAX).unwrap();
    let bases: Vec<i64> = batch::split(&all)
        .map(|b| batch::validate(b.unwrap()).unwrap().base_offset)
        .collect();
    assert_eq!(bases, vec![0, 3]);
    // The high watermark excludes the batch whose last offset is not below it.
    assert_eq!(log.read(3, usize::MAX, 4).unwrap().len(), 0);
    assert_eq!(
        log.read(1, usize::MAX, 5).unwrap().len(),
        log.size_bytes() as usize - 3 * 61 - 15
    );
    assert!(matches!(
        log.read(6, 1, i64::MAX),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_eq!(log.offset_for_timestamp(101).unwrap(), Some((0, 102)));
    assert_eq!(log.offset_for_timestamp(103).unwrap(), Some((3, 201)));
    assert_eq!(log.offset_for_timestamp(202).unwrap(), None);
}

#[test]
fn empty_dir_and_zero_length_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p0");
    let log = PartitionLog::open(&path, LogConfig::default()).unwrap();
    assert_eq!(
        (log.first_index(), log.last_index(), log.next_index()),
        (None, None, None)
    );
    assert_eq!(
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.size_bytes()
        ),
        (0, 0, 0)
    );
    assert_eq!(log.read(0, 100, i64::MAX).unwrap().len(), 0);
    assert!(log.read(1, 100, i64::MAX).is_err());
    assert_eq!(log.entries(0, 10).unwrap(), vec![]);
    assert_eq!(log.offset_for_timestamp(0).unwrap(), None);
    drop(log);

    // A zero-length segment without a sidecar (crash right after creation) holds nothing.
    fs::write(path.join(format!("{:020}.log", 0)), b"").unwrap();
    let (log, warns) = with_warnings(|| PartitionLog::open(&path, LogConfig::default()).unwrap());
    assert!(warns.is_empty());
    assert_eq!(log.next_index(), None);
    drop(log);

    // A zero-length active segment with its sidecar is where appends continue.
    let mut log = PartitionLog::open(&path, LogConfig::default()).unwrap();
    log.append_internal(7, 1, b"x").unwrap();
    log.sync().unwrap();
    drop(log);
    let seg = path.join(format!("{:020}.log", 0));
    File::options()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(0)
        .unwrap();
    let (mut log, warns) =
        with_warnings(|| PartitionLog::open(&path, LogConfig::default()).unwrap());
    assert!(warns.is_empty());
    assert_eq!((log.last_index(), log.next_index()), (None, Some(7)));
    assert_eq!(log.append_data(7, 1, &data_batch(0, &[1])).unwrap(), (0, 0));
}

fn build_log(dir: &Path, cfg: LogConfig, tail_internal_last: bool) -> Vec<LogEntry> {
    let mut log = PartitionLog::open(dir, cfg).unwrap();
    for i in 0..20usize {
        let idx = 10 + i as u64;
        let internal = if i >= 18 {
            (i == 19) == tail_internal_last
        } else {
            i % 4 == 3
        };
        if internal {
            log.append_internal(idx, 3, &vec![i as u8; 20 + i]).unwrap();
        } else {
            log.append_data(idx, 3, &data_batch(i as i64 * 100, &[30, 10 + i]))
                .unwrap();
        }
    }
    log.sync().unwrap();
    assert!(log.segments.len() >= 2, "test needs several segments");
    log.entries(0, u64::MAX).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    for dent in fs::read_dir(from).unwrap() {
        let dent = dent.unwrap();
        fs::copy(dent.path(), to.join(dent.file_name())).unwrap();
    }
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

fn data_bytes(entries: &[LogEntry]) -> Vec<u8> {
    entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Data { .. }))
        .flat_map(|e| e.bytes.iter().copied())
        .collect()
}

fn end_offset(entries: &[LogEntry]) -> i64 {
    entries
        .iter()
        .rev()
        .find_map(|e| match e.kind {
            EntryKind::Data { last_offset, .. } => Some(last_offset + 1),
            EntryKind::Internal => None,
        })
        .unwrap_or(0)
}

/// Reopens a damaged copy and checks that exactly `want` survived, then that appends continue.
fn check_recovered(dir: &Path, cfg: LogConfig, want: &[LogEntry], expect_warn: bool) {
    let (mut log, warns) = with_warnings(|| PartitionLog::open(dir, cfg).unwrap());
    if expect_warn {
        assert_eq!(warns.len(), 1, "{warns:?}");
        let seg = last_segment(dir);
        let name = seg.file_name().unwrap().to_str().unwrap();
        assert!(
            warns[0].contains(name) && warns[0].contains("position="),
            "{warns:?}"
        );
    } else {
        assert!(warns.is_empty(), "{warns:?}");
    }
    let last = want.last().unwrap().raft_index;
    assert_eq!(log.last_index(), Some(last));
    assert_eq!(log.entries(0, u64::MAX).unwrap(), want);
    let start = log.log_start_offset();
    assert_eq!(
        log.read(start, usize::MAX, i64::MAX).unwrap().as_ref(),
        &data_bytes(want)[..]
    );
    let end = end_offset(want);
    assert_eq!(log.log_end_offset(), end);
    assert_eq!(
        log.append_data(last + 1, 4, &data_batch(0, &[5])).unwrap(),
        (end, end)
    );
    assert!(matches!(
        log.append_internal(last + 1, 4, b""),
        Err(StorageError::NonContiguous { .. })
    ));
    log.append_internal(last + 2, 4, b"after").unwrap();
    log.sync().unwrap();
    check_index_files(&log);
    drop(log);
    let (log, warns) = with_warnings(|| PartitionLog::open(dir, cfg).unwrap());
    assert!(warns.is_empty(), "{warns:?}");
    assert_eq!(log.last_index(), Some(last + 2));
    assert_eq!(log.log_end_offset(), end + 1);
    assert_eq!(log.entries(0, last + 1).unwrap(), want);
}

#[test]
fn torn_write_at_every_byte_of_the_last_two_batches() {
    let cfg = LogConfig {
        segment_bytes_max: 1500,
        index_interval_bytes: 150,
    };
    for tail_internal_last in [false, true] {
        let template = tempfile::tempdir().unwrap();
        let all = build_log(template.path(), cfg, tail_internal_last);
        let (log, _) = with_warnings(|| PartitionLog::open(template.path(), cfg).unwrap());
        assert!(
            log.segments.last().unwrap().entries.len() >= 3,
            "last two batches share a segment"
        );
        drop(log);
        let seg = last_segment(template.path());
        let file_len = fs::metadata(&seg).unwrap().len();
        let last_two: u64 = all[all.len() - 2..]
            .iter()
            .map(|e| e.bytes.len() as u64)
            .sum();
        let boundary = file_len - all[all.len() - 1].bytes.len() as u64;
        for cut in file_len - last_two..file_len {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(template.path(), dir.path());
            let seg = last_segment(dir.path());
            File::options()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let keep = if cut >= boundary {
                all.len() - 1
            } else {
                all.len() - 2
            };
            let at_boundary = cut == boundary || cut == file_len - last_two;
            check_recovered(dir.path(), cfg, &all[..keep], !at_boundary);
        }
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut() {
    let cfg = LogConfig {
        segment_bytes_max: 1500,
        index_interval_bytes: 150,
    };
    let template = tempfile::tempdir().unwrap();
    let all = build_log(template.path(), cfg, false);
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let seg = last_segment(dir.path());
        let mut garbage: Vec<u8> = (0..rng.gen_range(1..400)).map(|_| rng.gen()).collect();
        if round % 4 == 0 {
            // A plausible header whose body is damaged: only the CRC can tell.
            let mut fake = data_batch(0, &[50]);
            set_base_offset(&mut fake, end_offset(&all));
            let n = fake.len();
            fake[n - 1] ^= 0xff;
            garbage = fake;
        } else if round % 4 == 1 {
            // A valid batch that does not continue the offsets.
            garbage = data_batch(0, &[50]);
        }
        let mut f = File::options().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &garbage).unwrap();
        drop(f);
        check_recovered(dir.path(), cfg, &all, true);
    }
}

#[test]
fn missing_sidecars_and_indexes_are_rebuilt() {
    let cfg = LogConfig {
        segment_bytes_max: 600,
        index_interval_bytes: 100,
    };
    let dir = tempfile::tempdir().unwrap();
    let all = build_log(dir.path(), cfg, false);
    let mut bases: Vec<PathBuf> = fs::read_dir(dir.path())
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    bases.sort();
    assert!(bases.len() >= 4);
    // First, a middle and the last sidecar gone; indexes deleted or damaged.
    for p in [&bases[0], &bases[2], bases.last().unwrap()] {
        fs::remove_file(p.with_extension("raft")).unwrap();
    }
    fs::remove_file(bases[1].with_extension("index")).unwrap();
    fs::write(bases[2].with_extension("timeindex"), b"junk").unwrap();
    fs::write(bases[3].with_extension("index"), b"").unwrap();
    let (log, warns) = with_warnings(|| PartitionLog::open(dir.path(), cfg).unwrap());
    assert!(warns.is_empty());
    assert_eq!(log.entries(0, u64::MAX).unwrap(), all);
    check_index_files(&log);
    for p in &bases {
        assert!(p.with_extension("raft").exists());
    }
}

#[test]
fn reset_and_full_purge_continue_at_given_position() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes_max: 400,
        index_interval_bytes: 100,
    };
    let mut log = PartitionLog::open(dir.path(), cfg).unwrap();
    for i in 1..=10 {
        log.append_data(i, 1, &data_batch(0, &[40])).unwrap();
    }
    log.reset(100, 5000).unwrap();
    assert_eq!(
        (log.last_index(), log.next_index(), log.log_end_offset()),
        (None, Some(100), 5000)
    );
    drop(log);
    let mut log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(
        (log.next_index(), log.log_start_offset()),
        (Some(100), 5000)
    );
    assert_eq!(
        log.append_data(100, 2, &data_batch(0, &[40])).unwrap(),
        (5000, 5000)
    );
    assert!(dir.path().join(format!("{:020}.log", 5000)).exists());
    assert!(!dir.path().join(format!("{:020}.log", 0)).exists());
    for i in 101..110 {
        log.append_data(i, 2, &data_batch(0, &[40])).unwrap();
    }
    // Segments hold three batches each, so 102 ends the first one exactly.
    log.purge_upto_index(102).unwrap();
    assert_eq!(
        (log.first_index(), log.log_start_offset()),
        (Some(103), 5003)
    );
    assert!(!dir.path().join(format!("{:020}.log", 5000)).exists());
    log.purge_upto_index(104).unwrap();
    assert_eq!(
        (log.first_index(), log.log_start_offset()),
        (Some(105), 5005)
    );
    assert!(!dir.path().join(format!("{:020}.log", 5000)).exists());
    assert!(matches!(
        log.read(5004, 10, i64::MAX),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    log.purge_upto_index(120).unwrap();
    assert_eq!(
        (log.first_index(), log.next_index(), log.log_end_offset()),
        (None, Some(121), 5010)
    );
    drop(log);
    let mut log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(
        (log.first_index(), log.next_index(), log.log_end_offset()),
        (None, Some(121), 5010)
    );
    assert_eq!(
        log.append_data(121, 3, &data_batch(0, &[1])).unwrap(),
        (5010, 5010)
    );
    assert_eq!(
        log.size_bytes(),
        fs::metadata(dir.path().join(format!("{:020}.log", 5010)))
            .unwrap()
            .len()
    );
}

#[test]
fn leftovers_of_an_interrupted_reset_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let backup = tempfile::tempdir().unwrap();
    let cfg = LogConfig::default();
    let mut log = PartitionLog::open(dir.path(), cfg).unwrap();
    for i in 1..=3 {
        log.append_data(i, 1, &data_batch(0, &[10])).unwrap();
    }
    log.sync().unwrap();
    copy_dir(dir.path(), backup.path());
    log.reset(50, 70).unwrap();
    drop(log);
    // Simulate a crash after the new log-start was written but before the old segment was deleted.
    for ext in ["log", "raft"] {
        let name = format!("{:020}.{ext}", 0);
        fs::copy(backup.path().join(&name), dir.path().join(&name)).unwrap();
    }
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    assert_eq!(
        (log.last_index(), log.next_index(), log.log_end_offset()),
        (None, Some(50), 70)
    );
    assert!(!dir.path().join(format!("{:020}.log", 0)).exists());
}

#[test]
fn epoch_starts_follow_terms_of_data_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
    assert!(log.epoch_starts().is_empty());
    log.append_internal(1, 1, b"blank").unwrap();
    log.append_data(2, 1, &data_batch(100, &[1, 2])).unwrap(); // offsets 0-1, term 1
    log.append_internal(3, 3, b"blank").unwrap(); // term 2 wrote nothing; term 3 starts
    log.append_data(4, 3, &data_batch(200, &[1])).unwrap(); // offset 2
    log.append_data(5, 3, &data_batch(300, &[1, 1])).unwrap(); // offsets 3-4
    log.append_data(6, 5, &data_batch(400, &[1])).unwrap(); // offset 5
    assert_eq!(log.epoch_starts(), vec![(1, 0), (3, 2), (5, 5)]);
    log.truncate_from_index(6).unwrap();
    assert_eq!(log.epoch_starts(), vec![(1, 0), (3, 2)]);
}

// ---------- retention ----------

/// A log whose segments hold one entry each (every data batch rolls a new segment): an internal
/// entry at index 1, then one 2-record batch per timestamp, at indexes 2, 3, ...
fn one_batch_per_segment(dir: &Path, timestamps: &[i64]) -> PartitionLog {
    let cfg = LogConfig {
        segment_bytes_max: 1,
        index_interval_bytes: 100,
    };
    let mut log = PartitionLog::open(dir, cfg).unwrap();
    log.append_internal(1, 1, b"blank").unwrap();
    for (i, ts) in timestamps.iter().enumerate() {
        // Two records: the batch's max timestamp is ts + 1.
        log.append_data(i as u64 + 2, 1, &data_batch(*ts, &[100, 100]))
            .unwrap();
    }
    log.sync().unwrap();
    log
}

#[test]
fn retention_by_time_deletes_expired_prefix_but_never_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let log = one_batch_per_segment(dir.path(), &[1000, 2000, 3000, 4000]);
    // The blank entry shares the first segment with the first batch.
    assert_eq!(log.segment_count(), 4);
    // now - (ts + 1) > 2500 for ts 1000 and 2000 only.
    let plan = log.retention_plan(5000, 2500, -1, u64::MAX).unwrap();
    assert_eq!(
        (plan.purge_upto_index, plan.segments, plan.log_start_offset),
        (3, 2, 4)
    );
    // Exactly at the limit is not a breach (Kafka: strictly older).
    assert_eq!(log.retention_plan(4001, 3000, -1, u64::MAX), None);
    // Everything expired: all but the active segment.
    let plan = log.retention_plan(1_000_000, 0, -1, u64::MAX).unwrap();
    assert_eq!((plan.purge_upto_index, plan.segments), (4, 3));
    assert_eq!(plan.log_start_offset, 6);
    // A newer segment before an older one stops the scan, as in Kafka.
    let dir2 = tempfile::tempdir().unwrap();
    let log2 = one_batch_per_segment(dir2.path(), &[9000, 1000, 1000, 1000]);
    assert_eq!(log2.retention_plan(10_000, 2000, -1, u64::MAX), None);
    // Unlimited.
    assert_eq!(log.retention_plan(i64::MAX, -1, -1, u64::MAX), None);
}

#[test]
fn retention_by_size_keeps_at_least_retention_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = one_batch_per_segment(dir.path(), &[0, 0, 0, 0]);
    let sizes: Vec<u64> = log.segments.iter().map(|s| s.size).collect();
    let total = log.size_bytes();
    assert_eq!(total, sizes.iter().sum::<u64>());
    // size - retention = exactly the first two segments: both go.
    let keep = total - sizes[0] - sizes[1];
    let plan = log.retention_plan(0, -1, keep as i64, u64::MAX).unwrap();
    assert_eq!((plan.segments, plan.purge_upto_index), (2, 3));
    assert_eq!(plan.bytes, sizes[0] + sizes[1]);
    // One byte more to keep: only the first goes.
    let plan = log
        .retention_plan(0, -1, keep as i64 + 1, u64::MAX)
        .unwrap();
    assert_eq!((plan.segments, plan.purge_upto_index), (1, 2));
    // retention.bytes = 0 would delete everything; the active segment stays.
    let plan = log.retention_plan(0, -1, 0, u64::MAX).unwrap();
    assert_eq!(plan.segments, 3);
    // Under the limit: nothing.
    assert_eq!(log.retention_plan(0, -1, total as i64, u64::MAX), None);
    assert_eq!(log.retention_plan(0, -1, i64::MAX, u64::MAX), None);
}

#[test]
fn retention_time_and_size_take_the_larger_prefix_and_stop_at_max_index() {
    let dir = tempfile::tempdir().unwrap();
    let log = one_batch_per_segment(dir.path(), &[1000, 2000, 3000, 4000, 5000]);
    let total = log.size_bytes() as i64;
    let sizes: Vec<i64> = log.segments.iter().map(|s| s.size as i64).collect();
    let seg = sizes[1];
    let three = sizes[0] + sizes[1] + sizes[2];
    // Time alone: one segment; size alone: three; together: three.
    let by_time = log.retention_plan(3500, 2000, -1, u64::MAX).unwrap();
    let by_size = log
        .retention_plan(3500, -1, total - three, u64::MAX)
        .unwrap();
    let both = log
        .retention_plan(3500, 2000, total - three, u64::MAX)
        .unwrap();
    assert_eq!((by_time.segments, by_size.segments), (1, 3));
    assert_eq!(both, by_size);
    // Time wins when it reaches further.
    let both = log
        .retention_plan(1_000_000, 0, total - seg, u64::MAX)
        .unwrap();
    assert_eq!(both.segments, 4);
    // Bounded by the applied index: index 3 ends the second segment, 4 is inside the third.
    let plan = log.retention_plan(1_000_000, 0, 0, 3).unwrap();
    assert_eq!((plan.segments, plan.purge_upto_index), (2, 3));
    let plan = log.retention_plan(1_000_000, 0, 0, 4).unwrap();
    assert_eq!((plan.segments, plan.purge_upto_index), (3, 4));
    assert_eq!(log.retention_plan(1_000_000, 0, 0, 1), None);
    assert_eq!(log.retention_plan(1_000_000, 0, 0, 0), None);
}

#[test]
fn retention_plan_applied_by_purge_deletes_exactly_those_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = one_batch_per_segment(dir.path(), &[1000, 2000, 3000, 4000]);
    let before = log.segment_count();
    let size_before = log.size_bytes();
    let plan = log.retention_plan(5000, 2500, -1, u64::MAX).unwrap();
    log.purge_upto_index(plan.purge_upto_index).unwrap();
    assert_eq!(log.segment_count(), before - plan.segments);
    assert_eq!(log.size_bytes(), size_before - plan.bytes);
    assert_eq!(log.log_start_offset(), plan.log_start_offset);
    assert_eq!(log.first_index(), Some(plan.purge_upto_index + 1));
    assert!(matches!(
        log.read(plan.log_start_offset - 1, 1 << 20, i64::MAX),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    let rest = log.read(plan.log_start_offset, 1 << 20, i64::MAX).unwrap();
    assert_eq!(batch::parse_header(&rest).unwrap().base_offset, 4);
    // The same plan again finds nothing new to delete, also after a reopen.
    assert_eq!(log.retention_plan(5000, 2500, -1, u64::MAX), None);
    drop(log);
    let log = PartitionLog::open(
        dir.path(),
        LogConfig {
            segment_bytes_max: 1,
            index_interval_bytes: 100,
        },
    )
    .unwrap();
    assert_eq!(log.log_start_offset(), plan.log_start_offset);
    assert_eq!(log.retention_plan(5000, 2500, -1, u64::MAX), None);
}

#[test]
fn retention_without_timestamps_uses_the_segment_mtime() {
    let dir = tempfile::tempdir().unwrap();
    // Base timestamp -2 with two records: max timestamp -1, i.e. none.
    let log = one_batch_per_segment(dir.path(), &[-2, -2, -2]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(log.retention_plan(now, 60_000, -1, u64::MAX), None);
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    log.segments[0].file.set_modified(hour_ago).unwrap();
    let plan = log.retention_plan(now, 60_000, -1, u64::MAX).unwrap();
    assert_eq!(plan.segments, 1);
}

#[test]
fn pending_sync_is_taken_once_and_runs_without_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
    assert!(
        log.take_pending_sync().is_none(),
        "a fresh log has nothing to sync"
    );
    log.append_data(1, 1, &data_batch(100, &[1, 2])).unwrap();
    log.append_data(2, 1, &data_batch(100, &[3])).unwrap();
    let pending = log
        .take_pending_sync()
        .expect("appends leave the log dirty");
    assert!(
        log.take_pending_sync().is_none(),
        "the second caller has nothing left to sync"
    );
    // The log stays fully usable while the detached fsync has not run yet.
    assert_eq!(
        log.read(0, usize::MAX, i64::MAX).unwrap().len(),
        log.size_bytes() as usize
    );
    log.append_data(3, 1, &data_batch(100, &[4])).unwrap();
    pending.sync().unwrap();
    let again = log
        .take_pending_sync()
        .expect("the later append is not covered");
    again.sync().unwrap();
    drop(log);
    let log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.log_end_offset(), 4);
}

#[test]
fn replicated_batches_must_continue_the_log_where_the_leader_placed_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(
        log.append_data(1, 1, &data_batch(100, &[1, 2])).unwrap(),
        (0, 1)
    );
    let mut placed = data_batch(100, &[3]);
    set_base_offset(&mut placed, 2);
    assert_eq!(log.append_replicated(2, 1, &placed).unwrap(), (2, 2));
    let size = log.size_bytes();
    let mut elsewhere = data_batch(100, &[4]);
    set_base_offset(&mut elsewhere, 7);
    match log.append_replicated(3, 1, &elsewhere) {
        Err(StorageError::OffsetMismatch {
            raft_index: 3,
            placed: 7,
            local: 3,
        }) => {}
        other => panic!("want OffsetMismatch, got {other:?}"),
    }
    assert_eq!(log.size_bytes(), size, "nothing appended");
    assert_eq!(log.next_index(), Some(3));
    // The stored batch is the caller's, with only baseOffset and the leader epoch rewritten.
    let stored = log.entries(2, 3).unwrap().remove(0).bytes;
    assert_eq!(&stored[16..], &placed[16..]);
    assert_eq!(batch::validate(&stored).unwrap().base_offset, 2);
}

#[test]
fn damage_at_or_below_the_durable_point_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
        for i in 1..=10u64 {
            log.append_data(i, 1, &data_batch(100, &[50])).unwrap();
        }
        log.sync().unwrap();
    }
    let seg = last_segment(dir.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the 5th of 10 equal batches: indexes 5..=10 are lost.
    let at = (len / 10 * 4 + 70) as usize;
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    match PartitionLog::open_checked(dir.path(), LogConfig::default(), Some(8)) {
        Err(StorageError::BelowDurable {
            raft_index,
            durable,
            ..
        }) => assert_eq!((raft_index, durable), (5, 8)),
        other => panic!("want BelowDurable, got {other:?}"),
    }
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "nothing was cut"
    );
    // With the durable point below the damage it is a torn tail, cut as before.
    let log = PartitionLog::open_checked(dir.path(), LogConfig::default(), Some(4)).unwrap();
    assert_eq!(log.last_index(), Some(4));
    drop(log);
    // A log that ends before the durable point lost whole batches.
    assert!(matches!(
        PartitionLog::open_checked(dir.path(), LogConfig::default(), Some(6)),
        Err(StorageError::BelowDurable {
            raft_index: 5,
            durable: 6,
            ..
        })
    ));
}
