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

/// A valid, uncompressed v2 batch with one record per value (no keys, no headers).
pub(crate) use sluice_storage::batch::testutil::batch_of_values as data_batch;

/// Logs to the test output (shown only for a failing test). Without `RUST_LOG`, the group
/// supervisor's decisions and openraft's warnings (votes seen, leaders quitting) are kept: an
/// election that never happens under load is otherwise undiagnosable from a failed run.
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sluice_raft=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
