//! `sluice users ...`: SASL/SCRAM users through AlterUserScramCredentials and
//! DescribeUserScramCredentials. Passwords are salted here (a fresh random salt, PBKDF2 with the
//! mechanism's hash), as Kafka's `kafka-configs --alter --add-config SCRAM-...` does: the broker
//! never sees a password.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use kafka_protocol::messages::alter_user_scram_credentials_request::{
    ScramCredentialDeletion, ScramCredentialUpsertion,
};
use kafka_protocol::messages::describe_user_scram_credentials_request::UserName;
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, ApiKey, DescribeUserScramCredentialsRequest,
};
use kafka_protocol::protocol::StrBytes;

use super::client::Client;
use super::errors;
use super::{ConnectArgs, UsersCommand};
use crate::scram::{random_salt, Mechanism, MAX_ITERATIONS, MIN_ITERATIONS};

#[derive(Debug, Clone, Args)]
pub struct UsersCreateArgs {
    pub name: String,
    /// SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, default_value = "SCRAM-SHA-256")]
    pub mechanism: String,
    /// A file whose first line is the password (kept off the command line and shell history).
    #[arg(long = "password-file", value_name = "FILE")]
    pub password_file: PathBuf,
    #[arg(long, default_value_t = 8192)]
    pub iterations: u32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UsersDeleteArgs {
    pub name: String,
    /// Only this mechanism's credential (default: every mechanism the user has).
    #[arg(long)]
    pub mechanism: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(cmd: UsersCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        UsersCommand::Create(a) => {
            let password = read_password(&a.password_file)?;
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            create(&mut c, &a.name, &a.mechanism, &password, a.iterations).await?;
            writeln!(
                out,
                "Created {} credentials for user {}.",
                a.mechanism, a.name
            )?;
        }
        UsersCommand::List(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            for (user, mechs) in list(&mut c).await? {
                let m: Vec<String> = mechs
                    .iter()
                    .map(|(m, i)| format!("{m}(iterations={i})"))
                    .collect();
                writeln!(out, "{user}\t{}", m.join(","))?;
            }
        }
        UsersCommand::Delete(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            delete(&mut c, &a.name, a.mechanism.as_deref()).await?;
            writeln!(out, "Deleted user {}.", a.name)?;
        }
    }
    Ok(())
}

/// The file's first line, without its line ending.
pub fn read_password(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --password-file {}", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!("--password-file {} is empty", path.display());
    }
    Ok(line.to_string())
}

fn mechanism(name: &str) -> Result<Mechanism> {
    Mechanism::from_name(name).map_err(|_| {
        anyhow::anyhow!("unknown mechanism {name}: expected SCRAM-SHA-256 or SCRAM-SHA-512")
    })
}

pub async fn create(
    c: &mut Client,
    name: &str,
    mech: &str,
    password: &str,
    iterations: u32,
) -> Result<()> {
    let mech = mechanism(mech)?;
    if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
        bail!("--iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}");
    }
    let salt = random_salt();
    let salted = mech.salted_password(password.as_bytes(), &salt, iterations);
    let req = AlterUserScramCredentialsRequest::default().with_upsertions(vec![
        ScramCredentialUpsertion::default()
            .with_name(StrBytes::from_string(name.to_string()))
            .with_mechanism(mech.type_id())
            .with_iterations(i32::try_from(iterations).unwrap_or(i32::MAX))
            .with_salt(Bytes::from(salt))
            .with_salted_password(Bytes::from(salted)),
    ]);
    alter(c, req).await
}

pub async fn delete(c: &mut Client, name: &str, mech: Option<&str>) -> Result<()> {
    let mechs: Vec<Mechanism> = match mech {
        Some(m) => vec![mechanism(m)?],
        None => {
            let users = list(c).await?;
            let Some((_, have)) = users.into_iter().find(|(u, _)| u == name) else {
                bail!("user {name} does not exist (RESOURCE_NOT_FOUND)");
            };
            have.iter()
                .filter_map(|(m, _)| Mechanism::from_name(m).ok())
                .collect()
        }
    };
    let req = AlterUserScramCredentialsRequest::default().with_deletions(
        mechs
            .into_iter()
            .map(|m| {
                ScramCredentialDeletion::default()
                    .with_name(StrBytes::from_string(name.to_string()))
                    .with_mechanism(m.type_id())
            })
            .collect(),
    );
    alter(c, req).await
}

async fn alter(c: &mut Client, req: AlterUserScramCredentialsRequest) -> Result<()> {
    let conn = c.bootstrap_conn();
    let v = conn.version_for(ApiKey::AlterUserScramCredentials)?;
    let resp = conn.call(&req, v).await?;
    for r in &resp.results {
        errors::check(
            r.error_code,
            &format!("user {}", r.user.as_str()),
            r.error_message.as_ref().map(|m| m.as_str()),
        )?;
    }
    Ok(())
}

/// Every user with (mechanism, iterations) of each credential, sorted by name.
pub async fn list(c: &mut Client) -> Result<Vec<(String, Vec<(String, i32)>)>> {
    let conn = c.bootstrap_conn();
    let v = conn.version_for(ApiKey::DescribeUserScramCredentials)?;
    let req = DescribeUserScramCredentialsRequest::default().with_users(None::<Vec<UserName>>);
    let resp = conn.call(&req, v).await?;
    errors::check(
        resp.error_code,
        "DescribeUserScramCredentials",
        resp.error_message.as_ref().map(|m| m.as_str()),
    )?;
    let mut users = Vec::new();
    for r in resp.results {
        errors::check(
            r.error_code,
            &format!("user {}", r.user.as_str()),
            r.error_message.as_ref().map(|m| m.as_str()),
        )?;
        let mechs = r
            .credential_infos
            .iter()
            .map(|i| {
                let name = Mechanism::from_type_id(i.mechanism)
                    .map(|m| m.name().to_string())
                    .unwrap_or_else(|| format!("UNKNOWN({})", i.mechanism));
                (name, i.iterations)
            })
            .collect();
        users.push((r.user.to_string(), mechs));
    }
    users.sort();
    Ok(users)
}
