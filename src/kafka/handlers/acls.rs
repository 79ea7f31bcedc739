//! CreateAcls (key 30), DescribeAcls (29) and DeleteAcls (31): ACLs live in the metadata Raft
//! group (`controller::acls`), so every node answers and enforces the same ones. As in Kafka, a
//! broker without an authorizer answers SECURITY_DISABLED. Who may call these is decided in
//! `kafka::authz` (Alter, resp. Describe, on the cluster).

use kafka_protocol::messages::create_acls_response::AclCreationResult;
use kafka_protocol::messages::delete_acls_response::{
    DeleteAclsFilterResult, DeleteAclsMatchingAcl,
};
use kafka_protocol::messages::describe_acls_response::{AclDescription, DescribeAclsResource};
use kafka_protocol::messages::{
    CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::acls::{
    AclBinding, AclFilter, AclOperation, AclPermission, PatternFilter, PatternType, ResourceType,
    ANY_CODE, MATCH_CODE,
};
use crate::controller::{Command, Reply};
use crate::errors::ErrorCode;

pub const VERSIONS: (i16, i16) = (1, 3);

const DISABLED: &str = "no authorizer is configured on the broker (set authorizer.class.name)";

fn msg(s: impl Into<String>) -> Option<StrBytes> {
    Some(StrBytes::from_string(s.into()))
}

/// One creation as a binding, or why it is not one (INVALID_REQUEST).
fn binding(
    c: &kafka_protocol::messages::create_acls_request::AclCreation,
) -> Result<AclBinding, String> {
    let b = AclBinding {
        resource_type: ResourceType::from_code(c.resource_type)
            .ok_or_else(|| format!("unknown resource type {}", c.resource_type))?,
        resource_name: c.resource_name.to_string(),
        pattern_type: PatternType::from_code(c.resource_pattern_type).ok_or_else(|| {
            format!(
                "pattern type {} cannot be stored (use literal or prefixed)",
                c.resource_pattern_type
            )
        })?,
        principal: c.principal.to_string(),
        host: c.host.to_string(),
        operation: AclOperation::from_code(c.operation)
            .ok_or_else(|| format!("operation {} cannot be stored", c.operation))?,
        permission: AclPermission::from_code(c.permission_type)
            .ok_or_else(|| format!("permission {} cannot be stored", c.permission_type))?,
    };
    b.validate()?;
    Ok(b)
}

pub async fn create(broker: &Broker, req: CreateAclsRequest) -> CreateAclsResponse {
    let err = |code: ErrorCode, m: &str| {
        AclCreationResult::default()
            .with_error_code(code.code())
            .with_error_message(msg(m))
    };
    if !broker.authorizer.enabled {
        let results = req
            .creations
            .iter()
            .map(|_| err(ErrorCode::SecurityDisabled, DISABLED))
            .collect();
        return CreateAclsResponse::default().with_results(results);
    }
    let parsed: Vec<Result<AclBinding, String>> = req.creations.iter().map(binding).collect();
    let valid: Vec<AclBinding> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    let outcome = if valid.is_empty() {
        Ok(())
    } else {
        match broker.propose(&Command::CreateAcls { acls: valid }).await {
            Ok(Reply::Err { message, .. }) => Err(message),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    };
    let results = parsed
        .iter()
        .map(|p| match (p, &outcome) {
            (Err(e), _) => err(ErrorCode::InvalidRequest, e),
            (Ok(_), Err(e)) => err(ErrorCode::UnknownServerError, e),
            (Ok(_), Ok(())) => AclCreationResult::default(),
        })
        .collect();
    CreateAclsResponse::default().with_results(results)
}

/// A wire filter as ours; `None` for a filter that can match nothing Kafka would store.
#[allow(clippy::too_many_arguments)]
fn filter(
    rtype: i8,
    name: Option<&StrBytes>,
    pattern: i8,
    principal: Option<&StrBytes>,
    host: Option<&StrBytes>,
    op: i8,
    permission: i8,
) -> Result<AclFilter, String> {
    let any_or = |code: i8, what: &str| -> Result<Option<i8>, String> {
        match code {
            ANY_CODE => Ok(None),
            c if c > ANY_CODE => Ok(Some(c)),
            c => Err(format!("unknown {what} {c}")),
        }
    };
    Ok(AclFilter {
        resource_type: any_or(rtype, "resource type")?
            .map(|c| ResourceType::from_code(c).ok_or(format!("unknown resource type {c}")))
            .transpose()?,
        resource_name: name.map(|n| n.to_string()),
        pattern: match pattern {
            ANY_CODE => PatternFilter::Any,
            MATCH_CODE => PatternFilter::Match,
            c => PatternFilter::Exactly(
                PatternType::from_code(c).ok_or(format!("unknown pattern type {c}"))?,
            ),
        },
        principal: principal.map(|p| p.to_string()),
        host: host.map(|h| h.to_string()),
        operation: any_or(op, "operation")?
            .map(|c| AclOperation::from_code(c).ok_or(format!("unknown operation {c}")))
            .transpose()?,
        permission: any_or(permission, "permission")?
            .map(|c| AclPermission::from_code(c).ok_or(format!("unknown permission {c}")))
            .transpose()?,
    })
}

pub fn describe(broker: &Broker, req: DescribeAclsRequest) -> DescribeAclsResponse {
    let fail = |code: ErrorCode, m: &str| {
        DescribeAclsResponse::default()
            .with_error_code(code.code())
            .with_error_message(msg(m))
    };
    if !broker.authorizer.enabled {
        return fail(ErrorCode::SecurityDisabled, DISABLED);
    }
    let f = match filter(
        req.resource_type_filter,
        req.resource_name_filter.as_ref(),
        req.pattern_type_filter,
        req.principal_filter.as_ref(),
        req.host_filter.as_ref(),
        req.operation,
        req.permission_type,
    ) {
        Ok(f) => f,
        Err(e) => return fail(ErrorCode::InvalidRequest, &e),
    };
    let state = broker.state();
    // Grouped by resource, as Kafka answers; the set is ordered by resource first.
    let mut resources: Vec<DescribeAclsResource> = Vec::new();
    for b in state.acls.iter().filter(|b| f.matches(b)) {
        let same = resources.last().is_some_and(|r| {
            r.resource_type == b.resource_type.code()
                && r.resource_name.as_str() == b.resource_name
                && r.pattern_type == b.pattern_type.code()
        });
        if !same {
            resources.push(
                DescribeAclsResource::default()
                    .with_resource_type(b.resource_type.code())
                    .with_resource_name(StrBytes::from_string(b.resource_name.clone()))
                    .with_pattern_type(b.pattern_type.code()),
            );
        }
        if let Some(r) = resources.last_mut() {
            r.acls.push(
                AclDescription::default()
                    .with_principal(StrBytes::from_string(b.principal.clone()))
                    .with_host(StrBytes::from_string(b.host.clone()))
                    .with_operation(b.operation.code())
                    .with_permission_type(b.permission.code()),
            );
        }
    }
    DescribeAclsResponse::default().with_resources(resources)
}

pub async fn delete(broker: &Broker, req: DeleteAclsRequest) -> DeleteAclsResponse {
    let err = |code: ErrorCode, m: &str| {
        DeleteAclsFilterResult::default()
            .with_error_code(code.code())
            .with_error_message(msg(m))
    };
    if !broker.authorizer.enabled {
        let results = req
            .filters
            .iter()
            .map(|_| err(ErrorCode::SecurityDisabled, DISABLED))
            .collect();
        return DeleteAclsResponse::default().with_filter_results(results);
    }
    let parsed: Vec<Result<AclFilter, String>> = req
        .filters
        .iter()
        .map(|f| {
            filter(
                f.resource_type_filter,
                f.resource_name_filter.as_ref(),
                f.pattern_type_filter,
                f.principal_filter.as_ref(),
                f.host_filter.as_ref(),
                f.operation,
                f.permission_type,
            )
        })
        .collect();
    let valid: Vec<AclFilter> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    let outcome = if valid.is_empty() {
        Ok(Vec::new())
    } else {
        match broker
            .propose(&Command::DeleteAcls { filters: valid })
            .await
        {
            Ok(Reply::AclsDeleted(per_filter)) => Ok(per_filter),
            Ok(Reply::Err { message, .. }) => Err(message),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    };
    let mut deleted = match &outcome {
        Ok(v) => v.clone().into_iter(),
        Err(_) => Vec::new().into_iter(),
    };
    let results = parsed
        .iter()
        .map(|p| match (p, &outcome) {
            (Err(e), _) => err(ErrorCode::InvalidRequest, e),
            (Ok(_), Err(e)) => err(ErrorCode::UnknownServerError, e),
            (Ok(_), Ok(_)) => {
                let matching = deleted
                    .next()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|b| {
                        DeleteAclsMatchingAcl::default()
                            .with_resource_type(b.resource_type.code())
                            .with_resource_name(StrBytes::from_string(b.resource_name))
                            .with_pattern_type(b.pattern_type.code())
                            .with_principal(StrBytes::from_string(b.principal))
                            .with_host(StrBytes::from_string(b.host))
                            .with_operation(b.operation.code())
                            .with_permission_type(b.permission.code())
                    })
                    .collect();
                DeleteAclsFilterResult::default().with_matching_acls(matching)
            }
        })
        .collect();
    DeleteAclsResponse::default().with_filter_results(results)
}
