//! Crash-safe helpers for small files.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::fault;

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Fsyncs a directory so that creations, renames and deletions inside it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fault::sync_dir(dir)
}

/// Replaces `path` with `bytes` so that after a crash either the old or the new content is seen:
/// write a temporary file, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp)?;
        fault::write_all(&mut f, bytes, &tmp)?;
        fault::sync_all_tmp(&f, &tmp)?;
    }
    // Journaled before the rename: from here on `path` holds either whole version after a
    // crash, never a cut one.
    fault::replaced_atomically(path);
    fs::rename(&tmp, path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

/// Reads a whole file, mapping "does not exist" to `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        assert_eq!(read_optional(&p).unwrap(), None);
        write_atomic(&p, b"one").unwrap();
        assert_eq!(read_optional(&p).unwrap().as_deref(), Some(&b"one"[..]));
        write_atomic(&p, b"two!").unwrap();
        assert_eq!(read_optional(&p).unwrap().as_deref(), Some(&b"two!"[..]));
        assert!(!tmp_path(&p).exists());
    }
}
