//! The metadata state machine as the Raft crate sees it ([`sluice_raft::MetaApp`]).

use std::sync::RwLock;

use sluice_raft::MetaApp;
use tokio::sync::watch;

use super::state::{Command, MetaState, Reply};
use crate::errors::ErrorCode;

/// Apply is deterministic: it decodes the command and applies it; it never reads a clock.
pub struct MetaMachine {
    state: RwLock<MetaState>,
    /// The state's version after every apply or restore of cluster metadata, so loops can wait
    /// for a change.
    changed: watch::Sender<u64>,
    /// The same for consumer-group operations, which are many (offset commits) and concern only
    /// the coordinator's waiters: the partition manager and membership loops need not wake.
    groups_changed: watch::Sender<u64>,
}

impl Default for MetaMachine {
    fn default() -> Self {
        MetaMachine {
            state: RwLock::new(MetaState::default()),
            changed: watch::channel(0).0,
            groups_changed: watch::channel(0).0,
        }
    }
}

impl MetaMachine {
    /// The applied state. Held briefly: every apply waits for readers.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, MetaState> {
        // A panic while holding the lock cannot leave MetaState half-applied in a way a reader
        // could act on differently from other replicas (apply finishes or the node stops).
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes whenever the applied cluster metadata does (not on consumer-group operations).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Changes whenever consumer groups may have.
    pub fn subscribe_groups(&self) -> watch::Receiver<u64> {
        self.groups_changed.subscribe()
    }

    fn bump(&self, version: u64) {
        self.changed.send_replace(version);
        self.groups_changed.send_replace(version);
    }
}

impl MetaApp for MetaMachine {
    fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
        let reply = match serde_json::from_slice::<Command>(command) {
            Ok(cmd) => {
                let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                let r = st.apply(&cmd);
                let v = st.version;
                drop(st);
                if matches!(cmd, Command::ConsumerGroups { .. }) {
                    self.groups_changed.send_replace(v);
                } else {
                    self.bump(v);
                }
                r
            }
            // A command we cannot decode was written by a newer or broken proposer; every node
            // rejects it the same way, so state stays identical.
            Err(e) => Reply::Err {
                code: ErrorCode::InvalidRequest.code(),
                message: format!("undecodable metadata command: {e}"),
            },
        };
        serde_json::to_vec(&reply).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.read()).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let restored: MetaState = if snapshot.is_empty() {
            MetaState::default()
        } else {
            serde_json::from_slice(snapshot).map_err(|e| format!("bad metadata snapshot: {e}"))?
        };
        let v = restored.version;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = restored;
        self.bump(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_machine_snapshot_roundtrip() {
        let m = MetaMachine::default();
        let cmd = serde_json::to_vec(&Command::InitCluster {
            cluster_id: "abc".into(),
        })
        .unwrap();
        let r: Reply = serde_json::from_slice(&m.apply(1, &cmd)).unwrap();
        assert_eq!(r, Reply::Ok);
        let garbage: Reply = serde_json::from_slice(&m.apply(2, b"not json")).unwrap();
        assert!(matches!(garbage, Reply::Err { .. }));
        let snap = m.snapshot();
        let m2 = MetaMachine::default();
        m2.restore(&snap).unwrap();
        assert_eq!(*m2.read(), *m.read());
        assert!(m2.restore(b"{bad").is_err());
    }
}
