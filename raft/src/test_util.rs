//! Test helpers: a recording [`MetaApp`] and a builder of valid Kafka v2 batches.

use std::sync::Mutex;

use crate::MetaApp;

/// Records every applied command; replies `"applied {index}"`; snapshots as JSON.
#[derive(Default)]
pub(crate) struct RecordingApp {
    commands: Mutex<Vec<Vec<u8>>>,
}

impl RecordingApp {
    pub(crate) fn commands(&self) -> Vec<Vec<u8>> {
        self.commands.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl MetaApp for RecordingApp {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        if let Ok(mut c) = self.commands.lock() {
            c.push(command.to_vec());
        }
        format!("applied {index}").into_bytes()
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.commands()).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let cmds: Vec<Vec<u8>> = serde_json::from_slice(snapshot).map_err(|e| e.to_string())?;
        let mut c = self.commands.lock().map_err(|e| e.to_string())?;
        *c = cmds;
        Ok(())
    }
}

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
}

/// A valid, uncompressed v2 batch with one record per value (no keys, no headers).
pub(crate) fn data_batch(base_ts: i64, values: &[&[u8]]) -> Vec<u8> {
    let mut records = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let mut body = vec![0u8]; // record attributes
        put_varint(&mut body, i as i64); // timestampDelta
        put_varint(&mut body, i as i64); // offsetDelta
        put_varint(&mut body, -1); // null key
        put_varint(&mut body, v.len() as i64);
        body.extend_from_slice(v);
        put_varint(&mut body, 0); // no headers
        put_varint(&mut records, body.len() as i64);
        records.extend_from_slice(&body);
    }
    let n = values.len() as i32;
    let mut b = Vec::new();
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((61 - 12 + records.len()) as i32).to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    b.push(2);
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(n - 1).to_be_bytes());
    b.extend_from_slice(&base_ts.to_be_bytes());
    b.extend_from_slice(&(base_ts + i64::from(n.max(1)) - 1).to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(&records);
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

/// Logs to the test output when `RUST_LOG` is set.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
