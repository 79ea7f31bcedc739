//! `sluice acls create|list|delete`: kafka-acls with its flags (`--allow-principal User:alice
//! --operation Read --topic T`, `--group G`, `--cluster`, `--transactional-id X`,
//! `--resource-pattern-type prefixed`), over CreateAcls, DescribeAcls and DeleteAcls.

use std::io::Write;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::create_acls_request::AclCreation;
use kafka_protocol::messages::delete_acls_request::DeleteAclsFilter;
use kafka_protocol::messages::{
    ApiKey, CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::client::Client;
use super::errors::check;
use super::ConnectArgs;
use crate::acl_types::{
    AclOperation, AclPermission, PatternType, ResourceType, ANY_CODE, CLUSTER_RESOURCE, MATCH_CODE,
};

#[derive(Debug, Clone, Subcommand)]
pub enum AclsCommand {
    /// Add ACLs: every principal x host x operation x resource given.
    Create(AclsArgs),
    /// List ACLs, all or those matching the resources, principals and operations given.
    List(AclsArgs),
    /// Remove the ACLs matching the filter (every field left out matches anything).
    Delete(AclsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AclsArgs {
    /// Principal to allow, e.g. User:alice (repeatable).
    #[arg(long = "allow-principal", value_name = "PRINCIPAL")]
    pub allow_principal: Vec<String>,
    /// Principal to deny (repeatable).
    #[arg(long = "deny-principal", value_name = "PRINCIPAL")]
    pub deny_principal: Vec<String>,
    /// Principal to list or delete ACLs of (list and delete only).
    #[arg(long, value_name = "PRINCIPAL")]
    pub principal: Vec<String>,
    /// Host the allow applies to (default: every host).
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Host the deny applies to (default: every host).
    #[arg(long = "deny-host", value_name = "HOST")]
    pub deny_host: Vec<String>,
    /// Operation: Read, Write, Create, Delete, Alter, Describe, ClusterAction,
    /// DescribeConfigs, AlterConfigs, IdempotentWrite, All (repeatable).
    #[arg(long, value_name = "OPERATION")]
    pub operation: Vec<String>,
    /// Topic resource (repeatable; `*` for all topics).
    #[arg(long, value_name = "TOPIC")]
    pub topic: Vec<String>,
    /// Consumer group resource (repeatable).
    #[arg(long, value_name = "GROUP")]
    pub group: Vec<String>,
    /// Transactional id resource (repeatable).
    #[arg(long = "transactional-id", value_name = "ID")]
    pub transactional_id: Vec<String>,
    /// The cluster resource.
    #[arg(long)]
    pub cluster: bool,
    /// literal (default for create), prefixed; for list/delete also any (default) and match.
    #[arg(long = "resource-pattern-type", value_name = "TYPE")]
    pub resource_pattern_type: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl AclsArgs {
    fn resources(&self) -> Vec<(ResourceType, String)> {
        let mut out = Vec::new();
        out.extend(self.topic.iter().map(|t| (ResourceType::Topic, t.clone())));
        out.extend(self.group.iter().map(|g| (ResourceType::Group, g.clone())));
        out.extend(
            self.transactional_id
                .iter()
                .map(|t| (ResourceType::TransactionalId, t.clone())),
        );
        if self.cluster {
            out.push((ResourceType::Cluster, CLUSTER_RESOURCE.to_string()));
        }
        out
    }

    fn operations(&self) -> Result<Vec<AclOperation>> {
        self.operation
            .iter()
            .map(|o| {
                AclOperation::parse(o).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown operation {o:?}; one of {}",
                        names(AclOperation::ALL.iter().map(|o| o.name()))
                    )
                })
            })
            .collect()
    }

    /// (permission, principal, hosts) triples.
    fn grants(&self) -> Vec<(AclPermission, String, Vec<String>)> {
        let hosts = |h: &[String]| {
            if h.is_empty() {
                vec!["*".to_string()]
            } else {
                h.to_vec()
            }
        };
        let mut out = Vec::new();
        for p in &self.allow_principal {
            out.push((AclPermission::Allow, p.clone(), hosts(&self.allow_host)));
        }
        for p in &self.deny_principal {
            out.push((AclPermission::Deny, p.clone(), hosts(&self.deny_host)));
        }
        out
    }
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// The create requests `a` describes: the product of its principals, hosts, operations and
/// resources.
pub fn creations(a: &AclsArgs) -> Result<Vec<AclCreation>> {
    let pattern = match a.resource_pattern_type.as_deref() {
        None => PatternType::Literal,
        Some(p) => PatternType::parse(p).ok_or_else(|| {
            anyhow::anyhow!("--resource-pattern-type for create is literal or prefixed, not {p:?}")
        })?,
    };
    let resources = a.resources();
    if resources.is_empty() {
        bail!("give a resource: --topic, --group, --transactional-id or --cluster");
    }
    let grants = a.grants();
    if grants.is_empty() {
        bail!("give --allow-principal and/or --deny-principal (e.g. User:alice)");
    }
    let ops = a.operations()?;
    if ops.is_empty() {
        bail!("give --operation (e.g. Read)");
    }
    let mut out = Vec::new();
    for (perm, principal, hosts) in &grants {
        if !principal.contains(':') {
            bail!("principal {principal:?} must be Type:name, e.g. User:alice");
        }
        for host in hosts {
            for op in &ops {
                for (rtype, name) in &resources {
                    out.push(
                        AclCreation::default()
                            .with_resource_type(rtype.code())
                            .with_resource_name(s(name))
                            .with_resource_pattern_type(pattern.code())
                            .with_principal(s(principal))
                            .with_host(s(host))
                            .with_operation(op.code())
                            .with_permission_type(perm.code()),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// One filter per (resource or any) x (principal or any) x (operation or any).
fn filters(a: &AclsArgs) -> Result<Vec<DeleteAclsFilter>> {
    let pattern = match a.resource_pattern_type.as_deref() {
        None | Some("any") | Some("ANY") => ANY_CODE,
        Some(p) if p.eq_ignore_ascii_case("match") => MATCH_CODE,
        Some(p) => PatternType::parse(p)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--resource-pattern-type is literal, prefixed, any or match, not {p:?}"
                )
            })?
            .code(),
    };
    let resources: Vec<Option<(ResourceType, String)>> = match a.resources() {
        r if r.is_empty() => vec![None],
        r => r.into_iter().map(Some).collect(),
    };
    let mut principals: Vec<(Option<String>, i8)> = a
        .principal
        .iter()
        .map(|p| (Some(p.clone()), ANY_CODE))
        .collect();
    principals.extend(
        a.grants()
            .into_iter()
            .map(|(perm, p, _)| (Some(p), perm.code())),
    );
    if principals.is_empty() {
        principals.push((None, ANY_CODE));
    }
    let ops: Vec<i8> = match a.operations()? {
        o if o.is_empty() => vec![ANY_CODE],
        o => o.iter().map(|o| o.code()).collect(),
    };
    let mut out = Vec::new();
    for r in &resources {
        for (principal, perm) in &principals {
            for op in &ops {
                out.push(
                    DeleteAclsFilter::default()
                        .with_resource_type_filter(r.as_ref().map_or(ANY_CODE, |(t, _)| t.code()))
                        .with_resource_name_filter(r.as_ref().map(|(_, n)| s(n)))
                        .with_pattern_type_filter(pattern)
                        .with_principal_filter(principal.as_deref().map(s))
                        .with_host_filter(None)
                        .with_operation(*op)
                        .with_permission_type(*perm),
                );
            }
        }
    }
    Ok(out)
}

fn label<T: Copy>(code: i8, from: fn(i8) -> Option<T>, name: fn(T) -> &'static str) -> String {
    from(code).map_or_else(|| format!("unknown({code})"), |v| name(v).to_string())
}

/// kafka-acls' listing: one block per resource pattern, one line per ACL.
fn print_acl(
    out: &mut impl Write,
    rtype: i8,
    resource: &str,
    pattern: i8,
    acls: &[(String, String, i8, i8)],
) -> Result<()> {
    writeln!(
        out,
        "Current ACLs for resource `ResourcePattern(resourceType={}, name={resource}, patternType={})`:",
        label(rtype, ResourceType::from_code, |t| t.name()).to_uppercase(),
        label(pattern, PatternType::from_code, |t| t.name()).to_uppercase(),
    )?;
    for (principal, host, op, perm) in acls {
        writeln!(
            out,
            " \t(principal={principal}, host={host}, operation={}, permissionType={})",
            label(*op, AclOperation::from_code, |o| o.name()).to_uppercase(),
            label(*perm, AclPermission::from_code, |p| p.name()).to_uppercase(),
        )?;
    }
    writeln!(out)?;
    Ok(())
}

pub async fn run(cmd: AclsCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        AclsCommand::Create(a) => {
            let creations = creations(&a)?;
            let n = creations.len();
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            let conn = c.bootstrap_conn();
            let v = conn.version_for(ApiKey::CreateAcls)?;
            let resp: CreateAclsResponse = conn
                .call(&CreateAclsRequest::default().with_creations(creations), v)
                .await?;
            for r in &resp.results {
                check(
                    r.error_code,
                    "ACL",
                    r.error_message.as_ref().map(|m| m.as_str()),
                )?;
            }
            writeln!(out, "Created {n} ACL(s).")?;
        }
        AclsCommand::List(a) => {
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            let conn = c.bootstrap_conn();
            let v = conn.version_for(ApiKey::DescribeAcls)?;
            for f in filters(&a)? {
                let req = DescribeAclsRequest::default()
                    .with_resource_type_filter(f.resource_type_filter)
                    .with_resource_name_filter(f.resource_name_filter)
                    .with_pattern_type_filter(f.pattern_type_filter)
                    .with_principal_filter(f.principal_filter)
                    .with_host_filter(f.host_filter)
                    .with_operation(f.operation)
                    .with_permission_type(f.permission_type);
                let resp: DescribeAclsResponse = conn.call(&req, v).await?;
                check(
                    resp.error_code,
                    "ACLs",
                    resp.error_message.as_ref().map(|m| m.as_str()),
                )?;
                for r in &resp.resources {
                    let acls: Vec<_> = r
                        .acls
                        .iter()
                        .map(|d| {
                            (
                                d.principal.to_string(),
                                d.host.to_string(),
                                d.operation,
                                d.permission_type,
                            )
                        })
                        .collect();
                    print_acl(
                        &mut out,
                        r.resource_type,
                        &r.resource_name,
                        r.pattern_type,
                        &acls,
                    )?;
                }
            }
        }
        AclsCommand::Delete(a) => {
            let filters = filters(&a)?;
            let mut c = Client::connect(&a.connect.bootstrap_server).await?;
            let conn = c.bootstrap_conn();
            let v = conn.version_for(ApiKey::DeleteAcls)?;
            let resp: DeleteAclsResponse = conn
                .call(&DeleteAclsRequest::default().with_filters(filters), v)
                .await?;
            let mut n = 0;
            for r in &resp.filter_results {
                check(
                    r.error_code,
                    "ACLs",
                    r.error_message.as_ref().map(|m| m.as_str()),
                )?;
                n += r.matching_acls.len();
            }
            writeln!(out, "Deleted {n} ACL(s).")?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: AclsCommand,
    }

    fn args(line: &str) -> AclsArgs {
        let argv = std::iter::once("acls").chain(line.split_whitespace());
        match Cli::parse_from(argv).cmd {
            AclsCommand::Create(a) | AclsCommand::List(a) | AclsCommand::Delete(a) => a,
        }
    }

    #[test]
    fn create_is_the_product_of_principals_operations_and_resources() {
        let a = args(
            "create --allow-principal User:alice --deny-principal User:eve --operation Read \
             --operation Describe --topic t --group g --resource-pattern-type prefixed",
        );
        let c = creations(&a).unwrap();
        assert_eq!(c.len(), 2 * 2 * 2);
        assert!(c
            .iter()
            .all(|c| c.resource_pattern_type == PatternType::Prefixed.code()));
        assert!(c.iter().all(|c| c.host.as_str() == "*"));
        let eve = c.iter().filter(|c| c.principal.as_str() == "User:eve");
        assert!(eve
            .clone()
            .all(|c| c.permission_type == AclPermission::Deny.code()));
        assert_eq!(eve.count(), 4);
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let e = creations(&args("create --allow-principal User:a --operation Read")).unwrap_err();
        assert!(e.to_string().contains("--topic"), "{e}");
        let e = creations(&args(
            "create --allow-principal User:a --operation Fly --topic t",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown operation"), "{e}");
        let e = creations(&args(
            "create --allow-principal alice --operation Read --topic t",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("Type:name"), "{e}");
        let e = creations(&args(
            "create --allow-principal User:a --operation Read --topic t --resource-pattern-type match",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("literal or prefixed"), "{e}");
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        let f = filters(&args("list")).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].resource_type_filter, ANY_CODE);
        assert_eq!(f[0].resource_name_filter, None);
        assert_eq!(f[0].principal_filter, None);
        assert_eq!(f[0].operation, ANY_CODE);
        let f = filters(&args("delete --topic t --principal User:bob")).unwrap();
        assert_eq!(f[0].resource_type_filter, ResourceType::Topic.code());
        assert_eq!(
            f[0].principal_filter.as_ref().map(|p| p.as_str()),
            Some("User:bob")
        );
    }
}
