//! SaslHandshake (key 17) and SaslAuthenticate (key 36): the SASL exchange of a SASL_PLAINTEXT or
//! SASL_SSL connection, with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 against the SCRAM users of
//! the metadata group, and KIP-368 re-authentication. The exchange's state is the session's
//! (`SaslStage`); `kafka::decode_and_start` refuses everything else until it succeeds, and a failed
//! exchange closes the connection once its answer is written.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use tracing::info;

use crate::broker::Broker;
use crate::errors::ErrorCode;
use crate::scram::{parse_plain, Mechanism, ScramError, ServerFirst};
use crate::session::{Principal, SaslStage, Session};

/// v0 is followed by raw SASL tokens without Kafka framing, which every client we test skips for
/// v1. v0 is still advertised because librdkafka (2.0.2, Debian's kcat) only offers SASL at all
/// when the broker lists SaslHandshake v0; a v0 handshake itself is answered ILLEGAL_SASL_STATE
/// with a log line saying why, and the connection closed.
pub const HANDSHAKE_VERSIONS: (i16, i16) = (0, 1);
pub const AUTHENTICATE_VERSIONS: (i16, i16) = (0, 2);

pub fn handshake(
    broker: &Broker,
    session: &Session,
    version: i16,
    req: SaslHandshakeRequest,
) -> SaslHandshakeResponse {
    let enabled = &broker.cfg.sasl_enabled_mechanisms;
    let resp = SaslHandshakeResponse::default().with_mechanisms(
        enabled
            .iter()
            .map(|m| StrBytes::from_string(m.clone()))
            .collect(),
    );
    if !session.protocol.uses_sasl() {
        info!(peer = %session.peer, listener = %session.listener, "SaslHandshake on a listener without SASL");
        session.fail_authentication();
        return resp.with_error_code(ErrorCode::IllegalSaslState.code());
    }
    if version == 0 {
        info!(peer = %session.peer, listener = %session.listener,
            "SaslHandshake v0 (raw SASL tokens without Kafka framing) is not supported; \
             use a client that sends SaslHandshake v1 and SaslAuthenticate (Kafka 1.0+)");
        session.fail_authentication();
        return resp.with_error_code(ErrorCode::IllegalSaslState.code());
    }
    let asked = req.mechanism.to_ascii_uppercase();
    if !enabled.contains(&asked) {
        // Kafka answers and lets the client choose again; it does not close.
        return resp.with_error_code(ErrorCode::UnsupportedSaslMechanism.code());
    }
    session.set_sasl_stage(SaslStage::Chosen(asked));
    resp
}

fn failure(session: &Session, code: ErrorCode, message: String) -> SaslAuthenticateResponse {
    info!(peer = %session.peer, listener = %session.listener, %message, "SASL authentication failed");
    session.fail_authentication();
    SaslAuthenticateResponse::default()
        .with_error_code(code.code())
        .with_error_message(Some(StrBytes::from_string(message)))
}

/// Accepts `user` as this connection's principal: a re-authentication must name the same one.
fn succeed(
    broker: &Broker,
    session: &Session,
    user: &str,
    auth_bytes: Bytes,
    mechanism: &str,
) -> SaslAuthenticateResponse {
    let principal = Principal::User(user.to_string());
    if session.is_sasl_authenticated() && session.principal() != principal {
        return failure(
            session,
            ErrorCode::SaslAuthenticationFailed,
            format!(
                "re-authentication must keep the principal {}, not {principal}",
                session.principal()
            ),
        );
    }
    let reauth_ms = broker.cfg.connections_max_reauth_ms;
    let lifetime = (reauth_ms > 0).then(|| Duration::from_millis(reauth_ms));
    let again = session.is_sasl_authenticated();
    session.sasl_authenticated(principal, lifetime);
    info!(peer = %session.peer, listener = %session.listener, principal = %session.principal(), %mechanism, reauthentication = again, "SASL authenticated");
    SaslAuthenticateResponse::default()
        .with_auth_bytes(auth_bytes)
        .with_session_lifetime_ms(i64::try_from(reauth_ms).unwrap_or(i64::MAX))
}

pub fn authenticate(
    broker: &Broker,
    session: &Session,
    _version: i16,
    req: SaslAuthenticateRequest,
) -> SaslAuthenticateResponse {
    let failed = |m: &str| {
        format!("Authentication failed during authentication due to invalid credentials with SASL mechanism {m}")
    };
    match session.sasl_stage() {
        SaslStage::Idle => failure(
            session,
            ErrorCode::IllegalSaslState,
            "SaslAuthenticate before SaslHandshake".into(),
        ),
        SaslStage::Chosen(m) if m == "PLAIN" => {
            let (user, password) = match parse_plain(&req.auth_bytes) {
                Ok(x) => x,
                Err(e) => {
                    return failure(session, ErrorCode::SaslAuthenticationFailed, e.to_string())
                }
            };
            // PLAIN is checked against the user's SCRAM credentials, whichever mechanism.
            let ok = broker.state().scram_users.get(&user).is_some_and(|creds| {
                creds
                    .iter()
                    .any(|(mech, cred)| cred.matches_password(*mech, &password))
            });
            if ok {
                succeed(broker, session, &user, Bytes::new(), "PLAIN")
            } else {
                failure(
                    session,
                    ErrorCode::SaslAuthenticationFailed,
                    failed("PLAIN"),
                )
            }
        }
        SaslStage::Chosen(m) => {
            let mech = match Mechanism::from_name(&m) {
                Ok(mech) => mech,
                Err(e) => {
                    return failure(session, ErrorCode::UnsupportedSaslMechanism, e.to_string())
                }
            };
            let state = broker.state();
            let started = ServerFirst::start(mech, &req.auth_bytes, |user| {
                state
                    .scram_users
                    .get(user)
                    .and_then(|c| c.get(&mech))
                    .cloned()
            });
            match started {
                Ok((first, out)) => {
                    session.set_sasl_stage(SaslStage::ScramFirstSent(Box::new(first)));
                    SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(out))
                }
                Err(e) => failure(session, ErrorCode::SaslAuthenticationFailed, e.to_string()),
            }
        }
        SaslStage::ScramFirstSent(first) => match first.finish(&req.auth_bytes) {
            Ok(server_final) => succeed(
                broker,
                session,
                &first.username,
                Bytes::from(server_final),
                first.mechanism.name(),
            ),
            Err(ScramError::AuthenticationFailed(m)) => {
                failure(session, ErrorCode::SaslAuthenticationFailed, failed(&m))
            }
            Err(e) => failure(session, ErrorCode::SaslAuthenticationFailed, e.to_string()),
        },
    }
}
