//! Who is on the other end of one Kafka client connection. A session lives as long as its
//! connection; every request on it sees the same one. Today it carries the peer's address, the
//! client id it last sent and its principal (always `User:ANONYMOUS` until authentication
//! exists); TLS and SASL will fill the principal in here, and authorization will read it.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

/// A Kafka principal, written `User:name` as Kafka's ACLs do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No authentication took place (a PLAINTEXT listener).
    Anonymous,
    User(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("User:ANONYMOUS"),
            Principal::User(name) => write!(f, "User:{name}"),
        }
    }
}

pub struct Session {
    pub peer: SocketAddr,
    pub connected_at: Instant,
    principal: Mutex<Principal>,
    /// The `client.id` of the latest request, for logs and quotas.
    client_id: Mutex<Option<String>>,
}

impl Session {
    pub fn new(peer: SocketAddr) -> Session {
        Session {
            peer,
            connected_at: Instant::now(),
            principal: Mutex::new(Principal::Anonymous),
            client_id: Mutex::new(None),
        }
    }

    pub fn principal(&self) -> Principal {
        self.principal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Set once authentication succeeds.
    pub fn authenticate(&self, principal: Principal) {
        *self.principal.lock().unwrap_or_else(|p| p.into_inner()) = principal;
    }

    pub fn client_id(&self) -> Option<String> {
        self.client_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn note_client_id(&self, id: Option<&str>) {
        let mut cur = self.client_id.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_deref() != id {
            *cur = id.map(str::to_string);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_print_as_kafka_writes_them() {
        let s = Session::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(s.principal().to_string(), "User:ANONYMOUS");
        s.authenticate(Principal::User("alice".into()));
        assert_eq!(s.principal().to_string(), "User:alice");
        s.note_client_id(Some("rdkafka"));
        assert_eq!(s.client_id().as_deref(), Some("rdkafka"));
    }
}
