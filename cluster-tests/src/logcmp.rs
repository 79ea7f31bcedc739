//! Replica comparison: after the cluster healed, every replica's partition log must hold the
//! same bytes up to the high watermark.
//!
//! Reads `DATA/partitions/{topic}-{p}/*.log` directly and walks the v2 batch headers
//! (baseOffset i64 @0, batchLength i32 @8, the batch is 12 + batchLength bytes, producerId i64
//! @43). Raft-internal batches (producer id -0x511CE: blank and membership entries) are
//! skipped: they take no Kafka offset. Data batches are stored exactly as the producer sent
//! them with only baseOffset and partitionLeaderEpoch (= Raft term of the entry) patched, so
//! committed batches must be byte-identical on every replica.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const INTERNAL_PRODUCER_ID: i64 = -0x511CE;
const LOG_OVERHEAD: usize = 12;
const PRODUCER_ID_AT: usize = 43;
const LAST_OFFSET_DELTA_AT: usize = 23;
const MIN_BATCH: usize = 61;

/// One replica's committed data: the concatenated data batches below the high watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaData {
    pub bytes: Vec<u8>,
    /// One past the last offset covered by `bytes`.
    pub end_offset: i64,
    pub batches: usize,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

/// The directories of `topic`'s partition `partition` under a node's `partitions/`:
/// `{topic}-{partition}.{topic id}` (or `{topic}-{partition}` from builds before topic ids were
/// part of the name).
pub fn partition_dirs(partitions: &Path, topic: &str, partition: i32) -> Vec<PathBuf> {
    let exact = format!("{topic}-{partition}");
    let versioned = format!("{exact}.");
    let Ok(rd) = std::fs::read_dir(partitions) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name == exact || name.starts_with(&versioned)
        })
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Segment files of a partition directory, in offset order (names are zero-padded offsets).
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    Ok(v)
}

/// Collects data batches with offsets below `hw` from raw segment contents.
pub fn committed_data(segment_bytes: &[Vec<u8>], hw: i64) -> ReplicaData {
    let mut out = ReplicaData {
        bytes: Vec::new(),
        end_offset: 0,
        batches: 0,
    };
    'segments: for seg in segment_bytes {
        let mut pos = 0usize;
        while pos + LOG_OVERHEAD <= seg.len() {
            let len = be_i32(seg, pos + 8);
            let Ok(len) = usize::try_from(len) else { break };
            let total = LOG_OVERHEAD + len;
            if total < MIN_BATCH || pos + total > seg.len() {
                break; // a torn tail: never below the high watermark
            }
            let b = &seg[pos..pos + total];
            pos += total;
            if be_i64(b, PRODUCER_ID_AT) == INTERNAL_PRODUCER_ID {
                continue;
            }
            let base = be_i64(b, 0);
            if base >= hw {
                break 'segments;
            }
            let last = base + i64::from(be_i32(b, LAST_OFFSET_DELTA_AT));
            out.bytes.extend_from_slice(b);
            out.end_offset = last + 1;
            out.batches += 1;
        }
    }
    out
}

/// Reads one replica's partition directory.
pub fn read_replica(dir: &Path, hw: i64) -> Result<ReplicaData> {
    let mut segs = Vec::new();
    for p in segments(dir)? {
        segs.push(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
    }
    Ok(committed_data(&segs, hw))
}

/// Outcome of comparing all replicas of one partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub partition: i32,
    pub high_watermark: i64,
    pub identical: bool,
    /// Per node: (node id, end offset covered, batches, bytes)
    pub replicas: Vec<(u32, i64, usize, usize)>,
    pub problem: Option<String>,
}

/// Compares the replicas in `dirs` (node id, partition dir) up to `hw`.
pub fn compare(partition: i32, hw: i64, dirs: &[(u32, PathBuf)]) -> Comparison {
    let mut replicas = Vec::new();
    let mut datas = Vec::new();
    let mut problem = None;
    for (id, d) in dirs {
        match read_replica(d, hw) {
            Ok(r) => {
                replicas.push((*id, r.end_offset, r.batches, r.bytes.len()));
                datas.push((*id, r));
            }
            Err(e) => problem = Some(format!("node {id}: {e:#}")),
        }
    }
    if problem.is_none() {
        for (id, r) in &datas {
            if r.end_offset < hw {
                problem = Some(format!(
                    "node {id} holds offsets only up to {} below the high watermark {hw}",
                    r.end_offset
                ));
                break;
            }
        }
    }
    if problem.is_none() {
        if let Some((id0, first)) = datas.first() {
            for (id, r) in &datas[1..] {
                if r.bytes != first.bytes {
                    let at = r
                        .bytes
                        .iter()
                        .zip(first.bytes.iter())
                        .position(|(a, b)| a != b)
                        .unwrap_or(r.bytes.len().min(first.bytes.len()));
                    problem = Some(format!(
                        "node {id} differs from node {id0} at byte {at} of the committed data \
                         ({} vs {} bytes)",
                        r.bytes.len(),
                        first.bytes.len()
                    ));
                    break;
                }
            }
        }
    }
    Comparison {
        partition,
        high_watermark: hw,
        identical: problem.is_none(),
        replicas,
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: i64, records: i32, producer_id: i64, fill: u8) -> Vec<u8> {
        let len = 61 + 10 - 12;
        let mut b = vec![fill; 12 + len];
        b[0..8].copy_from_slice(&base.to_be_bytes());
        b[8..12].copy_from_slice(&(len as i32).to_be_bytes());
        b[23..27].copy_from_slice(&(records - 1).to_be_bytes());
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b
    }

    #[test]
    fn finds_partition_directories_with_and_without_topic_ids() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "ct-0.00ff",
            "ct-1",
            "ct-10.00ff",
            "ctx-0.00ff",
            "ct-0.tmp-file",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("ct-1.log"), b"").unwrap();
        let names = |p| -> Vec<String> {
            partition_dirs(dir.path(), "ct", p)
                .iter()
                .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(0), ["ct-0.00ff", "ct-0.tmp-file"]);
        assert_eq!(names(1), ["ct-1"]);
        assert!(names(2).is_empty());
    }

    #[test]
    fn skips_internal_and_stops_at_hw() {
        let mut seg = Vec::new();
        seg.extend(batch(0, 1, INTERNAL_PRODUCER_ID, 1)); // blank entry
        seg.extend(batch(0, 2, -1, 2));
        seg.extend(batch(2, 1, -1, 3));
        seg.extend(batch(3, 1, -1, 4)); // above hw 3
        seg.extend(&[0u8; 7]); // torn tail
        let d = committed_data(&[seg.clone()], 3);
        assert_eq!(d.batches, 2);
        assert_eq!(d.end_offset, 3);
        // Internal batches differ freely; data must match.
        let mut other = batch(0, 1, INTERNAL_PRODUCER_ID, 9);
        other.extend(batch(0, 2, -1, 2));
        other.extend(batch(2, 1, -1, 3));
        assert_eq!(committed_data(&[other], 3), d);
    }

    #[test]
    fn compare_finds_divergence_and_short_replicas() {
        let dir = std::env::temp_dir().join(format!("ct-logcmp-{}", std::process::id()));
        let mk = |name: &str, segs: &[(i64, Vec<u8>)]| {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (base, bytes) in segs {
                std::fs::write(d.join(format!("{base:020}.log")), bytes).unwrap();
            }
            d
        };
        let mut a = batch(0, 2, -1, 2);
        a.extend(batch(2, 1, -1, 3));
        let n1 = mk("n1", &[(0, a.clone())]);
        // Same data split over two segments.
        let n2 = mk("n2", &[(0, batch(0, 2, -1, 2)), (2, batch(2, 1, -1, 3))]);
        let n3 = mk("n3", &[(0, batch(0, 2, -1, 2)), (2, batch(2, 1, -1, 7))]);
        let n4 = mk("n4", &[(0, batch(0, 2, -1, 2))]);
        let ok = compare(0, 3, &[(1, n1.clone()), (2, n2.clone())]);
        assert!(ok.identical, "{:?}", ok.problem);
        let bad = compare(0, 3, &[(1, n1.clone()), (3, n3)]);
        assert!(!bad.identical);
        assert!(bad.problem.unwrap().contains("differs"));
        let short = compare(0, 3, &[(1, n1), (4, n4)]);
        assert!(short.problem.unwrap().contains("only up to 2"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
