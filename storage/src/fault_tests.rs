//! The fault layer is process-global, so these tests share one installed layer (journal in a
//! leaked temp dir); each test looks only at journal lines under its own directory, and scopes
//! its injected faults to that directory.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::*;
use crate::batch::testutil::data_batch;
use crate::log::{LogConfig, PartitionLog};

fn test_layer() -> &'static FaultLayer {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir").keep());
    install(&dir.join(JOURNAL_FILE)).expect("install the fault layer")
}

/// Tests that set rules replace the global rule list, so they take turns.
fn rules_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Durable(u64, PathBuf),
    Atomic(PathBuf),
    Removed(PathBuf),
}

/// Journal lines about files under `dir`, in order.
fn journal(dir: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(test_layer().journal_path()).expect("read journal");
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let line = match it.next()? {
                "durable" => {
                    let len = it.next()?.parse().ok()?;
                    Line::Durable(len, PathBuf::from(it.next()?))
                }
                "atomic" => Line::Atomic(PathBuf::from(l.strip_prefix("atomic ")?)),
                "removed" => Line::Removed(PathBuf::from(l.strip_prefix("removed ")?)),
                _ => return None,
            };
            let p = match &line {
                Line::Durable(_, p) | Line::Atomic(p) | Line::Removed(p) => p,
            };
            p.starts_with(dir).then_some(line)
        })
        .collect()
}

fn last_durable(lines: &[Line], path: &Path) -> Option<u64> {
    lines.iter().rev().find_map(|l| match l {
        Line::Durable(n, p) if p == path => Some(*n),
        _ => None,
    })
}

fn segment_log(dir: &Path) -> PathBuf {
    dir.join(format!("{:020}.log", 0))
}

#[test]
fn install_from_env_is_off_without_the_variable() {
    if std::env::var(ENV).is_ok() {
        return; // someone runs the tests with faults on; nothing to assert
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(!install_from_env(dir.path()).unwrap());
    assert!(!dir.path().join(JOURNAL_FILE).exists());
}

#[test]
fn journal_records_the_length_each_fsync_made_durable() {
    test_layer();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let seg = segment_log(dir);
    let mut log = PartitionLog::open(dir, LogConfig::default()).unwrap();
    log.append_data(1, 1, &data_batch(100, &[10, 20])).unwrap();

    // Created and its directory fsynced: present with 0 durable bytes; the sidecar and the
    // log-start file were replaced atomically.
    let lines = journal(dir);
    assert_eq!(last_durable(&lines, &seg), Some(0), "{lines:?}");
    assert!(lines.contains(&Line::Atomic(dir.join(format!("{:020}.raft", 0)))));
    assert!(lines.contains(&Line::Atomic(dir.join("log-start"))));

    log.sync().unwrap();
    let after_first = std::fs::metadata(&seg).unwrap().len();
    assert!(after_first > 0);
    assert_eq!(last_durable(&journal(dir), &seg), Some(after_first));

    // Written but not synced: the journal still says the old length.
    log.append_data(2, 1, &data_batch(100, &[30])).unwrap();
    let written = std::fs::metadata(&seg).unwrap().len();
    assert!(written > after_first);
    assert_eq!(last_durable(&journal(dir), &seg), Some(after_first));

    log.sync().unwrap();
    assert_eq!(last_durable(&journal(dir), &seg), Some(written));

    // A truncation is fsynced, and the shorter length is what is durable.
    log.truncate_from_index(2).unwrap();
    assert_eq!(last_durable(&journal(dir), &seg), Some(after_first));
}

#[test]
fn removed_segments_are_journaled() {
    test_layer();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut log = PartitionLog::open(dir, LogConfig::default()).unwrap();
    log.append_data(1, 1, &data_batch(100, &[10])).unwrap();
    log.sync().unwrap();
    log.reset(10, 5).unwrap();
    let lines = journal(dir);
    assert!(
        lines.contains(&Line::Removed(segment_log(dir))),
        "{lines:?}"
    );
}

#[test]
fn injected_write_error_names_the_segment_and_leaves_the_journal_alone() {
    let layer = test_layer();
    let _turn = rules_lock();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let seg = segment_log(dir);
    let mut log = PartitionLog::open(dir, LogConfig::default()).unwrap();
    log.append_data(1, 1, &data_batch(100, &[10])).unwrap();
    log.sync().unwrap();
    let durable = last_durable(&journal(dir), &seg);
    let before = layer.status().injected_writes;

    layer.set_rules(vec![FaultRule {
        op: FaultOp::Write,
        error: FaultErrno::Eio,
        path_contains: Some(dir.to_string_lossy().into_owned()),
    }]);
    let res = log.append_data(2, 1, &data_batch(100, &[10]));
    layer.set_rules(Vec::new());

    match res {
        Err(StorageError::Io { path, source }) => {
            assert_eq!(path, seg);
            assert_eq!(source.raw_os_error(), Some(EIO), "{source}");
        }
        other => panic!("expected an I/O error naming the segment, got {other:?}"),
    }
    assert!(layer.status().injected_writes > before);
    assert_eq!(last_durable(&journal(dir), &seg), durable);
    // Nothing of the failed append is in the file, and the log goes on once healed.
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), durable.unwrap());
    log.append_data(2, 1, &data_batch(100, &[10])).unwrap();
    log.sync().unwrap();
}

#[test]
fn injected_fsync_error_is_reported_and_nothing_is_journaled_durable() {
    let layer = test_layer();
    let _turn = rules_lock();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let seg = segment_log(dir);
    let mut log = PartitionLog::open(dir, LogConfig::default()).unwrap();
    log.append_data(1, 1, &data_batch(100, &[10])).unwrap();
    let before = layer.status().injected_fsyncs;

    layer.set_rules(vec![FaultRule {
        op: FaultOp::Fsync,
        error: FaultErrno::Enospc,
        path_contains: Some(dir.to_string_lossy().into_owned()),
    }]);
    let res = log.take_pending_sync().expect("dirty").sync();
    layer.set_rules(Vec::new());

    match res {
        Err(StorageError::Io { path, source }) => {
            assert_eq!(path, seg);
            assert_eq!(source.raw_os_error(), Some(ENOSPC), "{source}");
        }
        other => panic!("expected an I/O error naming the segment, got {other:?}"),
    }
    assert_eq!(layer.status().injected_fsyncs, before + 1);
    assert_eq!(
        last_durable(&journal(dir), &seg),
        Some(0),
        "a failed fsync must not count the appended bytes as durable"
    );
}

#[test]
fn faults_apply_only_to_matching_paths_and_ops() {
    let layer = test_layer();
    let _turn = rules_lock();
    let hit = tempfile::tempdir().unwrap();
    let miss = tempfile::tempdir().unwrap();
    layer.set_rules(vec![FaultRule {
        op: FaultOp::Fsync,
        error: FaultErrno::Eio,
        path_contains: Some(hit.path().to_string_lossy().into_owned()),
    }]);
    // Writes pass (only fsyncs are faulted); the other directory is untouched.
    let wrote = crate::file::write_atomic(&hit.path().join("f"), b"x");
    let other = crate::file::write_atomic(&miss.path().join("f"), b"y");
    layer.set_rules(Vec::new());
    let err = wrote.expect_err("fsync under the faulted directory fails");
    assert_eq!(err.raw_os_error(), Some(EIO));
    other.expect("another directory is not faulted");
    assert_eq!(std::fs::read(miss.path().join("f")).unwrap(), b"y");
}

#[test]
fn rules_round_trip_through_json() {
    let r: Vec<FaultRule> = serde_json::from_str(
        r#"[{"op":"any","error":"enospc"},{"op":"write","error":"eio","path_contains":"/partitions/"}]"#,
    )
    .unwrap();
    assert_eq!(r[0].op, FaultOp::Any);
    assert_eq!(r[1].path_contains.as_deref(), Some("/partitions/"));
    assert!(r[0].matches(FaultOp::Fsync, Path::new("/a")));
    assert!(!r[1].matches(FaultOp::Write, Path::new("/data/raft/x")));
    assert!(!r[1].matches(FaultOp::Fsync, Path::new("/data/partitions/x")));
    assert!(serde_json::from_str::<FaultRule>(r#"{"op":"read","error":"eio"}"#).is_err());
}
