//! SASL/SCRAM users as replicated metadata: per user and mechanism the salt, iteration count,
//! StoredKey and ServerKey (RFC 5802), never the password. Changed only by
//! `Command::AlterScramCredentials`, applied the same on every node, carried in metadata
//! snapshots, so every node authenticates every user and credentials survive restarts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scram::{Mechanism, ScramCredential};

/// name -> mechanism -> credential.
pub type ScramUsers = BTreeMap<String, BTreeMap<Mechanism, ScramCredential>>;

/// One credential to create or replace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramUpsertion {
    pub user: String,
    pub mechanism: Mechanism,
    pub credential: ScramCredential,
}

pub fn apply(
    users: &mut ScramUsers,
    upsertions: &[ScramUpsertion],
    deletions: &[(String, Mechanism)],
) {
    for (user, mech) in deletions {
        if let Some(creds) = users.get_mut(user) {
            creds.remove(mech);
            if creds.is_empty() {
                users.remove(user);
            }
        }
    }
    for u in upsertions {
        users
            .entry(u.user.clone())
            .or_default()
            .insert(u.mechanism, u.credential.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Command, MetaState};

    #[test]
    fn credentials_apply_the_same_everywhere_and_round_trip_through_json() {
        let cred = ScramCredential::from_password(Mechanism::ScramSha256, "pw", b"salt", 4096);
        let cmds = vec![
            Command::AlterScramCredentials {
                upsertions: vec![
                    ScramUpsertion {
                        user: "alice".into(),
                        mechanism: Mechanism::ScramSha256,
                        credential: cred.clone(),
                    },
                    ScramUpsertion {
                        user: "bob".into(),
                        mechanism: Mechanism::ScramSha512,
                        credential: cred.clone(),
                    },
                ],
                deletions: vec![],
            },
            Command::AlterScramCredentials {
                upsertions: vec![],
                deletions: vec![("bob".into(), Mechanism::ScramSha512)],
            },
        ];
        let mut a = MetaState::default();
        let mut b = MetaState::default();
        for c in &cmds {
            a.apply(c);
            // Through JSON, as the Raft log carries it.
            let c: Command = serde_json::from_slice(&serde_json::to_vec(c).unwrap()).unwrap();
            b.apply(&c);
        }
        assert_eq!(a, b);
        assert_eq!(a.scram_users.len(), 1);
        assert_eq!(a.scram_users["alice"][&Mechanism::ScramSha256], cred);
        // Snapshots are the state as JSON.
        let snap: MetaState = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(snap, a);
        let text = String::from_utf8(serde_json::to_vec(&a).unwrap()).unwrap();
        assert!(!text.contains("\"pw\""), "{text}");
    }
}
