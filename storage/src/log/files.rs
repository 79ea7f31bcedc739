//! The files of a log directory: segment file names, the `log-start` file and the `.raft` sidecar
//! (both small, checksummed and written atomically), and removal of a segment's files.

use std::fs;
use std::path::{Path, PathBuf};

use super::PartitionLog;
use crate::fault;
use crate::file::write_atomic;
use crate::{IoContext, StorageError};

pub(super) const LOG_START_FILE: &str = "log-start";
const LOG_START_MAGIC: &[u8; 4] = b"SLLS";
const SIDECAR_MAGIC: &[u8; 4] = b"SLRS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LogStart {
    pub(super) generation: u64,
    pub(super) start_index: u64,
    pub(super) start_offset: i64,
}

impl LogStart {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(LOG_START_MAGIC);
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&self.start_index.to_be_bytes());
        b.extend_from_slice(&self.start_offset.to_be_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<LogStart> {
        let body = checked_body(b, LOG_START_MAGIC, 32)?;
        Some(LogStart {
            generation: u64::from_be_bytes(body.get(4..12)?.try_into().ok()?),
            start_index: u64::from_be_bytes(body.get(12..20)?.try_into().ok()?),
            start_offset: i64::from_be_bytes(body.get(20..28)?.try_into().ok()?),
        })
    }
}

/// Checks length, magic and trailing CRC-32C of a small metadata file; returns the body.
fn checked_body<'a>(b: &'a [u8], magic: &[u8; 4], len: usize) -> Option<&'a [u8]> {
    if b.len() != len || b.get(..4)? != magic {
        return None;
    }
    let (body, crc) = b.split_at(len - 4);
    let crc = u32::from_be_bytes(crc.try_into().ok()?);
    (crc32c::crc32c(body) == crc).then_some(body)
}

pub(super) fn encode_sidecar(generation: u64, first_index: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(SIDECAR_MAGIC);
    b.extend_from_slice(&generation.to_be_bytes());
    b.extend_from_slice(&first_index.to_be_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

/// Returns (generation, first_index).
pub(super) fn decode_sidecar(b: &[u8]) -> Option<(u64, u64)> {
    let body = checked_body(b, SIDECAR_MAGIC, 24)?;
    Some((
        u64::from_be_bytes(body.get(4..12)?.try_into().ok()?),
        u64::from_be_bytes(body.get(12..20)?.try_into().ok()?),
    ))
}

const SEGMENT_EXTS: [&str; 4] = ["log", "raft", "index", "timeindex"];

pub(super) fn segment_path(dir: &Path, base: i64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

/// Parses `{20 digits}.{ext}` for the segment file extensions.
pub(super) fn parse_segment_name(name: &str) -> Option<(i64, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|c| c.is_ascii_digit()) || !SEGMENT_EXTS.contains(&ext)
    {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

pub(super) fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => {
            fault::removed(path);
            Ok(())
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx(path),
        Err(_) => Ok(()),
    }
}

/// Removes a segment's files, the log first, the sidecar last: a sidecar without a log is an
/// ignorable orphan on open, while a log without its sidecar needs repair.
pub(super) fn remove_segment_files(dir: &Path, base: i64) -> Result<(), StorageError> {
    for ext in ["log", "index", "timeindex", "raft"] {
        remove_if_exists(&segment_path(dir, base, ext))?;
    }
    Ok(())
}

impl PartitionLog {
    pub(super) fn write_start(&mut self, s: LogStart) -> Result<(), StorageError> {
        let path = self.dir.join(LOG_START_FILE);
        write_atomic(&path, &s.encode()).ctx(&path)?;
        self.start = Some(s);
        Ok(())
    }
}
