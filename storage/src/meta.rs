//! sled-backed store for the metadata Raft group: its log (tree "log", key = index as u64 big
//! endian so that sled's byte order is index order) and small named state values (tree "state").

use std::path::Path;
use std::time::{Duration, Instant};

use crate::StorageError;

#[derive(Debug, Clone)]
pub struct MetaStore {
    db: sled::Db,
    log: sled::Tree,
    state: sled::Tree,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(k: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = k
        .try_into()
        .map_err(|_| StorageError::Corrupt(format!("meta log key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(arr))
}

impl MetaStore {
    pub fn open(dir: &Path) -> Result<MetaStore, StorageError> {
        // sled's background flusher keeps the previous handle's file lock for a moment after the
        // Db is dropped, so a quick close+reopen in one process needs a short retry.
        let deadline = Instant::now() + Duration::from_secs(3);
        let db = loop {
            match sled::open(dir) {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let log = db.open_tree("log")?;
        let state = db.open_tree("state")?;
        Ok(MetaStore { db, log, state })
    }

    /// Not durable until [`MetaStore::flush`].
    pub fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (index, value) in entries {
            batch.insert(&key(*index), value.as_slice());
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn range(
        &self,
        start: u64,
        end_exclusive: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if start >= end_exclusive {
            return Ok(Vec::new());
        }
        self.log
            .range(key(start)..key(end_exclusive))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((index_of(&k)?, v.to_vec()))
            })
            .collect()
    }

    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        match self.log.last()? {
            Some((k, v)) => Ok(Some((index_of(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    /// Removes every entry with index >= `index`, durably: entries that reappear after a crash
    /// could otherwise be mistaken for agreed log by Raft.
    pub fn truncate_from(&self, index: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(key(index)..).keys() {
            batch.remove(k?);
        }
        self.log.apply_batch(batch)?;
        self.flush()
    }

    /// Removes every entry with index <= `index`.
    pub fn purge_upto(&self, index: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=key(index)).keys() {
            batch.remove(k?);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    pub fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.state.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Durable on return.
    pub fn put_state(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.state.insert(key.as_bytes(), value)?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(r: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
        r.map(|i| (i, format!("entry-{i}").into_bytes())).collect()
    }

    #[test]
    fn append_range_truncate_purge_state_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = MetaStore::open(dir.path()).unwrap();
            assert_eq!(s.last().unwrap(), None);
            assert_eq!(s.get_state("vote").unwrap(), None);
            // Indexes around byte boundaries check that the key order is numeric.
            s.append(&entries(250..260)).unwrap();
            s.append(&entries(260..300)).unwrap();
            s.flush().unwrap();
            s.put_state("vote", b"v1").unwrap();
            s.put_state("vote", b"v2").unwrap();
        }
        {
            let s = MetaStore::open(dir.path()).unwrap();
            assert_eq!(s.range(250, 300).unwrap(), entries(250..300));
            assert_eq!(s.range(255, 258).unwrap(), entries(255..258));
            assert_eq!(s.range(0, 1000).unwrap(), entries(250..300));
            assert_eq!(s.range(10, 5).unwrap(), vec![]);
            assert_eq!(s.last().unwrap(), Some((299, b"entry-299".to_vec())));
            assert_eq!(s.get_state("vote").unwrap(), Some(b"v2".to_vec()));
            s.truncate_from(280).unwrap();
            s.purge_upto(255).unwrap();
            s.flush().unwrap();
        }
        let s = MetaStore::open(dir.path()).unwrap();
        assert_eq!(s.range(0, 1000).unwrap(), entries(256..280));
        assert_eq!(s.last().unwrap(), Some((279, b"entry-279".to_vec())));
        s.purge_upto(1000).unwrap();
        assert_eq!(s.last().unwrap(), None);
        assert_eq!(s.get_state("vote").unwrap(), Some(b"v2".to_vec()));
        assert_eq!(s.get_state("other").unwrap(), None);
    }
}
