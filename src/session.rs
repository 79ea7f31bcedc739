//! Who is on the other end of one Kafka client connection. A session lives as long as its
//! connection; every request on it sees the same one. It carries the peer's address, the listener
//! and security protocol the connection came in on, the client id it last sent, its principal
//! (`User:ANONYMOUS` until authentication; the client certificate's subject on SSL; the SASL
//! user on SASL_*), and the SASL exchange in progress. Authorization reads the principal.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SecurityProtocol;
use crate::scram::ServerFirst;

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

/// Where a SASL exchange stands (see ARCHITECTURE.md, "The authentication state machine").
#[derive(Debug, Clone, Default)]
pub enum SaslStage {
    /// No exchange in progress.
    #[default]
    Idle,
    /// SaslHandshake chose this mechanism; SaslAuthenticate comes next.
    Chosen(String),
    /// SCRAM: the server-first message went out; the client's final message comes next.
    ScramFirstSent(Box<ServerFirst>),
}

#[derive(Debug, Default)]
struct AuthState {
    /// A SASL exchange has succeeded on this connection.
    authenticated: bool,
    /// KIP-368: when the authenticated session ends unless it re-authenticates.
    expires_at: Option<Instant>,
    stage: SaslStage,
    /// An authentication failed: the connection closes once its answer is written.
    failed: bool,
}

pub struct Session {
    pub peer: SocketAddr,
    pub connected_at: Instant,
    /// The listener's name (`PLAINTEXT`, `SASL_SSL`, `CLIENT`, ...): Metadata answers with this
    /// listener's advertised address.
    pub listener: String,
    pub protocol: SecurityProtocol,
    principal: Mutex<Principal>,
    /// The `client.id` of the latest request, for logs and quotas.
    client_id: Mutex<Option<String>>,
    auth: Mutex<AuthState>,
}

impl Session {
    /// A connection on a PLAINTEXT listener named `PLAINTEXT`.
    pub fn new(peer: SocketAddr) -> Session {
        Session::on_listener(peer, "PLAINTEXT", SecurityProtocol::Plaintext)
    }

    pub fn on_listener(peer: SocketAddr, listener: &str, protocol: SecurityProtocol) -> Session {
        Session {
            peer,
            connected_at: Instant::now(),
            listener: listener.to_string(),
            protocol,
            principal: Mutex::new(Principal::Anonymous),
            client_id: Mutex::new(None),
            auth: Mutex::new(AuthState::default()),
        }
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether requests other than ApiVersions/SaslHandshake/SaslAuthenticate must be refused
    /// now: a SASL listener before authentication, or after the session expired (KIP-368).
    pub fn needs_authentication(&self, now: Instant) -> bool {
        if !self.protocol.uses_sasl() {
            return false;
        }
        let a = self.auth();
        !a.authenticated || a.expires_at.is_some_and(|at| now >= at)
    }

    pub fn is_sasl_authenticated(&self) -> bool {
        self.auth().authenticated
    }

    pub fn sasl_stage(&self) -> SaslStage {
        self.auth().stage.clone()
    }

    pub fn set_sasl_stage(&self, stage: SaslStage) {
        self.auth().stage = stage;
    }

    /// A SASL exchange succeeded: `principal` is who this connection is for `lifetime` (none:
    /// until it closes).
    pub fn sasl_authenticated(&self, principal: Principal, lifetime: Option<Duration>) {
        {
            let mut a = self.auth();
            a.authenticated = true;
            a.stage = SaslStage::Idle;
            a.expires_at = lifetime.map(|d| Instant::now() + d);
        }
        self.authenticate(principal);
    }

    /// An authentication failed; the connection is closed once the failure's answer is out.
    pub fn fail_authentication(&self) {
        let mut a = self.auth();
        a.failed = true;
        a.stage = SaslStage::Idle;
    }

    pub fn authentication_failed(&self) -> bool {
        self.auth().failed
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
    fn sasl_sessions_need_authentication_and_expire() {
        let peer = "127.0.0.1:1".parse().unwrap();
        assert!(!Session::new(peer).needs_authentication(Instant::now()));
        let s = Session::on_listener(peer, "CLIENT", SecurityProtocol::SaslSsl);
        assert!(s.needs_authentication(Instant::now()));
        s.sasl_authenticated(Principal::User("alice".into()), None);
        assert!(!s.needs_authentication(Instant::now() + Duration::from_secs(3600)));
        s.sasl_authenticated(
            Principal::User("alice".into()),
            Some(Duration::from_millis(50)),
        );
        assert!(!s.needs_authentication(Instant::now()));
        assert!(s.needs_authentication(Instant::now() + Duration::from_millis(60)));
        assert_eq!(s.principal().to_string(), "User:alice");
        assert!(!s.authentication_failed());
        s.fail_authentication();
        assert!(s.authentication_failed());
    }

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
