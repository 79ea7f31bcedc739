//! AlterUserScramCredentials (key 51) and DescribeUserScramCredentials (key 50): the SCRAM user
//! store of the metadata group, with Kafka's per-user error codes. Clients salt (as Kafka's
//! tools do): only the salt, iterations and salted password arrive, and only StoredKey and
//! ServerKey are kept.

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::messages::alter_user_scram_credentials_response::AlterUserScramCredentialsResult;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResult,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse,
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::scram_users::ScramUpsertion;
use crate::controller::{Command, Reply};
use crate::errors::ErrorCode;
use crate::scram::{Mechanism, ScramCredential, MAX_ITERATIONS, MIN_ITERATIONS};

pub const ALTER_VERSIONS: (i16, i16) = (0, 0);
pub const DESCRIBE_VERSIONS: (i16, i16) = (0, 0);

type Outcome = Result<(), (ErrorCode, String)>;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// The mechanism of a request's byte, or UNSUPPORTED_SASL_MECHANISM.
fn mechanism(id: i8) -> Result<Mechanism, (ErrorCode, String)> {
    Mechanism::from_type_id(id).ok_or_else(|| {
        (
            ErrorCode::UnsupportedSaslMechanism,
            format!("unknown SCRAM mechanism {id} (1 = SCRAM-SHA-256, 2 = SCRAM-SHA-512)"),
        )
    })
}

type Validated = (
    Vec<String>,
    BTreeMap<String, Outcome>,
    Vec<ScramUpsertion>,
    Vec<(String, Mechanism)>,
);

/// Each user's outcome (in request order) and the changes of the users without an error.
fn validate(broker: &Broker, req: &AlterUserScramCredentialsRequest) -> Validated {
    // Per user, in request order: the first error wins for that user.
    let mut order: Vec<String> = Vec::new();
    let mut outcome: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut note = |user: &str, r: Outcome, order: &mut Vec<String>| {
        if !outcome.contains_key(user) {
            order.push(user.to_string());
            outcome.insert(user.to_string(), r);
        } else if let (Some(Ok(())), Err(e)) = (outcome.get(user), r) {
            outcome.insert(user.to_string(), Err(e));
        }
    };
    let mut seen: BTreeSet<(String, i8)> = BTreeSet::new();
    let mut upsertions = Vec::new();
    let mut deletions = Vec::new();
    let state = broker.state();
    for d in &req.deletions {
        let user = d.name.to_string();
        let r = (|| {
            if user.is_empty() {
                return Err((
                    ErrorCode::UnacceptableCredential,
                    "empty user name".to_string(),
                ));
            }
            if !seen.insert((user.clone(), d.mechanism)) {
                return Err((
                    ErrorCode::DuplicateResource,
                    format!("user {user} is altered twice for one mechanism"),
                ));
            }
            let mech = mechanism(d.mechanism)?;
            if !state
                .scram_users
                .get(&user)
                .is_some_and(|c| c.contains_key(&mech))
            {
                return Err((
                    ErrorCode::ResourceNotFound,
                    format!("user {user} has no {} credential", mech.name()),
                ));
            }
            deletions.push((user.clone(), mech));
            Ok(())
        })();
        note(&user, r, &mut order);
    }
    for u in &req.upsertions {
        let user = u.name.to_string();
        let r = (|| {
            if user.is_empty() {
                return Err((
                    ErrorCode::UnacceptableCredential,
                    "empty user name".to_string(),
                ));
            }
            if !seen.insert((user.clone(), u.mechanism)) {
                return Err((
                    ErrorCode::DuplicateResource,
                    format!("user {user} is altered twice for one mechanism"),
                ));
            }
            let mech = mechanism(u.mechanism)?;
            let iterations = u32::try_from(u.iterations)
                .ok()
                .filter(|i| (MIN_ITERATIONS..=MAX_ITERATIONS).contains(i))
                .ok_or_else(|| {
                    (
                        ErrorCode::UnacceptableCredential,
                        format!(
                            "iterations {} is outside {MIN_ITERATIONS}..={MAX_ITERATIONS}",
                            u.iterations
                        ),
                    )
                })?;
            let hash_len = match mech {
                Mechanism::ScramSha256 => 32,
                Mechanism::ScramSha512 => 64,
            };
            if u.salt.is_empty() || u.salted_password.len() != hash_len {
                return Err((
                    ErrorCode::UnacceptableCredential,
                    format!(
                        "a {} credential needs a salt and a {hash_len}-byte salted password",
                        mech.name()
                    ),
                ));
            }
            upsertions.push(ScramUpsertion {
                user: user.clone(),
                mechanism: mech,
                credential: ScramCredential::from_salted(
                    mech,
                    &u.salt,
                    iterations,
                    &u.salted_password,
                ),
            });
            Ok(())
        })();
        note(&user, r, &mut order);
    }
    (order, outcome, upsertions, deletions)
}

pub async fn alter(
    broker: &Broker,
    _version: i16,
    req: AlterUserScramCredentialsRequest,
) -> AlterUserScramCredentialsResponse {
    let (order, mut outcome, mut upsertions, mut deletions) = validate(broker, &req);
    // A user with any error changes nothing, as in Kafka.
    let failed: BTreeSet<String> = outcome
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(u, _)| u.clone())
        .collect();
    upsertions.retain(|u| !failed.contains(&u.user));
    deletions.retain(|(u, _)| !failed.contains(u));
    if !upsertions.is_empty() || !deletions.is_empty() {
        let touched: BTreeSet<String> = upsertions
            .iter()
            .map(|u| u.user.clone())
            .chain(deletions.iter().map(|(u, _)| u.clone()))
            .collect();
        let cmd = Command::AlterScramCredentials {
            upsertions,
            deletions,
        };
        let err = match broker.propose(&cmd).await {
            Ok(Reply::Err { code, message }) => Some((
                ErrorCode::from_code(code).unwrap_or(ErrorCode::UnknownServerError),
                message,
            )),
            Ok(_) => None,
            Err(e) => Some((ErrorCode::RequestTimedOut, e.to_string())),
        };
        if let Some(e) = err {
            for u in touched {
                outcome.insert(u, Err(e.clone()));
            }
        }
    }
    let results = order
        .iter()
        .map(|user| {
            let r = AlterUserScramCredentialsResult::default().with_user(s(user));
            match outcome.get(user) {
                Some(Err((code, msg))) => r
                    .with_error_code(code.code())
                    .with_error_message(Some(s(msg))),
                _ => r,
            }
        })
        .collect();
    AlterUserScramCredentialsResponse::default().with_results(results)
}

pub fn describe(
    broker: &Broker,
    _version: i16,
    req: DescribeUserScramCredentialsRequest,
) -> DescribeUserScramCredentialsResponse {
    let state = broker.state();
    let infos = |user: &str| -> Vec<CredentialInfo> {
        state
            .scram_users
            .get(user)
            .map(|creds| {
                creds
                    .iter()
                    .map(|(m, c)| {
                        CredentialInfo::default()
                            .with_mechanism(m.type_id())
                            .with_iterations(i32::try_from(c.iterations).unwrap_or(i32::MAX))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let asked: Vec<String> = match req.users {
        Some(u) if !u.is_empty() => u.iter().map(|n| n.name.to_string()).collect(),
        // Null or empty: every user.
        _ => state.scram_users.keys().cloned().collect(),
    };
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for u in &asked {
        *count.entry(u.as_str()).or_default() += 1;
    }
    let mut done = BTreeSet::new();
    let mut results = Vec::new();
    for user in &asked {
        if !done.insert(user.clone()) {
            continue;
        }
        let r = DescribeUserScramCredentialsResult::default().with_user(s(user));
        let r = if count.get(user.as_str()).copied().unwrap_or(0) > 1 {
            r.with_error_code(ErrorCode::DuplicateResource.code())
                .with_error_message(Some(s(&format!("user {user} is asked for twice"))))
        } else if !state.scram_users.contains_key(user) {
            r.with_error_code(ErrorCode::ResourceNotFound.code())
                .with_error_message(Some(s(&format!(
                    "Attempt to describe a user credential that does not exist: {user}"
                ))))
        } else {
            r.with_credential_infos(infos(user))
        };
        results.push(r);
    }
    DescribeUserScramCredentialsResponse::default().with_results(results)
}
