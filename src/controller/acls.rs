//! Access control lists, replicated in the metadata group, and the authorization decision over
//! them, with Kafka's semantics (`StandardAuthorizer`): deny beats allow, `ALL` matches every
//! operation, Read/Write/Delete/Alter imply Describe and AlterConfigs implies DescribeConfigs,
//! a literal `*` resource or `User:*` principal matches everything, a prefixed pattern matches
//! names starting with it, super users pass every check, and a resource no ACL names at all is
//! open only when `allow.everyone.if.no.acl.found` is set.
//!
//! The vocabulary (operations, resource and pattern types, permissions, with Kafka's wire codes)
//! is [`crate::acl_types`], shared with the CLI.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use crate::acl_types::*;

/// One ACL: `principal` from `host` is allowed or denied `operation` on the resources
/// `pattern_type`/`resource_name` selects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AclBinding {
    pub resource_type: ResourceType,
    pub resource_name: String,
    pub pattern_type: PatternType,
    pub principal: String,
    pub host: String,
    pub operation: AclOperation,
    pub permission: AclPermission,
}

impl AclBinding {
    /// Kafka's checks on a new binding; the message is what CreateAcls answers.
    pub fn validate(&self) -> Result<(), String> {
        if self.resource_name.is_empty() {
            return Err("the resource name is empty".into());
        }
        if self.resource_type == ResourceType::Cluster && self.resource_name != CLUSTER_RESOURCE {
            return Err(format!(
                "the cluster resource is named {CLUSTER_RESOURCE}, not {:?}",
                self.resource_name
            ));
        }
        if self.pattern_type == PatternType::Prefixed && self.resource_name == "*" {
            return Err("a prefixed pattern cannot be '*': use a literal '*'".into());
        }
        match self.principal.split_once(':') {
            Some((kind, name)) if !kind.is_empty() && !name.is_empty() => {}
            _ => {
                return Err(format!(
                    "principal {:?} is not of the form Type:name (e.g. User:alice)",
                    self.principal
                ))
            }
        }
        if self.host.is_empty() {
            return Err("the host is empty (use * for any host)".into());
        }
        Ok(())
    }

    fn matches_resource(&self, rtype: ResourceType, name: &str) -> bool {
        self.resource_type == rtype
            && match self.pattern_type {
                PatternType::Literal => self.resource_name == name || self.resource_name == "*",
                PatternType::Prefixed => name.starts_with(&self.resource_name),
            }
    }

    fn matches_who(&self, principal: &str, host: &str) -> bool {
        (self.principal == principal || self.principal == "User:*")
            && (self.host == "*" || self.host == host)
    }
}

/// Which pattern types a filter selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatternFilter {
    Any,
    /// Bindings that would apply to the filter's resource name (literal, `*` and prefixes).
    Match,
    Exactly(PatternType),
}

/// A DescribeAcls/DeleteAcls filter: `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclFilter {
    pub resource_type: Option<ResourceType>,
    pub resource_name: Option<String>,
    pub pattern: PatternFilter,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: Option<AclOperation>,
    pub permission: Option<AclPermission>,
}

impl AclFilter {
    pub fn matches(&self, b: &AclBinding) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        if self.resource_type.is_some_and(|t| t != b.resource_type)
            || !eq(&self.principal, &b.principal)
            || !eq(&self.host, &b.host)
            || self.operation.is_some_and(|o| o != b.operation)
            || self.permission.is_some_and(|p| p != b.permission)
        {
            return false;
        }
        match (self.pattern, &self.resource_name) {
            (PatternFilter::Any, name) => eq(name, &b.resource_name),
            (PatternFilter::Exactly(p), name) => p == b.pattern_type && eq(name, &b.resource_name),
            (PatternFilter::Match, None) => true,
            (PatternFilter::Match, Some(name)) => b.matches_resource(b.resource_type, name),
        }
    }
}

/// The replicated ACLs.
pub type Acls = BTreeSet<AclBinding>;

/// How the node authorizes (`authorizer.class.name`, `super.users`,
/// `allow.everyone.if.no.acl.found`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizerConfig {
    pub enabled: bool,
    pub super_users: BTreeSet<String>,
    pub allow_if_no_acl: bool,
}

/// Whether `principal` connecting from `host` may do `op` on the resource `rtype`/`name`.
pub fn authorize(
    acls: &Acls,
    cfg: &AuthorizerConfig,
    principal: &str,
    host: &str,
    op: AclOperation,
    rtype: ResourceType,
    name: &str,
) -> bool {
    if !cfg.enabled || cfg.super_users.contains(principal) {
        return true;
    }
    let mut any_for_resource = false;
    let mut allowed = false;
    for b in acls.iter().filter(|b| b.matches_resource(rtype, name)) {
        any_for_resource = true;
        if !b.matches_who(principal, host) {
            continue;
        }
        match b.permission {
            // Deny is never implied: a deny of Read does not deny Describe.
            AclPermission::Deny if b.operation == op || b.operation == AclOperation::All => {
                return false
            }
            AclPermission::Deny => {}
            AclPermission::Allow => allowed |= grants(b.operation, op),
        }
    }
    allowed || (!any_for_resource && cfg.allow_if_no_acl)
}

/// Whether an allow of `acl_op` allows `op`, with Kafka's implications.
fn grants(acl_op: AclOperation, op: AclOperation) -> bool {
    use AclOperation::*;
    acl_op == op
        || acl_op == All
        || (op == Describe && matches!(acl_op, Read | Write | Delete | Alter))
        || (op == DescribeConfigs && acl_op == AlterConfigs)
}

/// Whether any allow-ACL could let `principal` do `op` on some resource of `rtype` (Kafka's
/// "Write on any topic" check for idempotent producers).
pub fn allowed_on_any(
    acls: &Acls,
    cfg: &AuthorizerConfig,
    principal: &str,
    host: &str,
    op: AclOperation,
    rtype: ResourceType,
) -> bool {
    if !cfg.enabled || cfg.super_users.contains(principal) {
        return true;
    }
    acls.iter().any(|b| {
        b.resource_type == rtype
            && b.permission == AclPermission::Allow
            && b.matches_who(principal, host)
            && grants(b.operation, op)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(
        rtype: ResourceType,
        name: &str,
        pattern: PatternType,
        principal: &str,
        op: AclOperation,
        permission: AclPermission,
    ) -> AclBinding {
        AclBinding {
            resource_type: rtype,
            resource_name: name.into(),
            pattern_type: pattern,
            principal: principal.into(),
            host: "*".into(),
            operation: op,
            permission,
        }
    }

    fn on() -> AuthorizerConfig {
        AuthorizerConfig {
            enabled: true,
            ..Default::default()
        }
    }

    use AclOperation::*;
    use AclPermission::*;
    use PatternType::*;
    use ResourceType::*;

    #[test]
    fn read_allows_read_and_describe_and_nothing_else() {
        let acls: Acls = [acl(Topic, "a", Literal, "User:alice", Read, Allow)].into();
        let can = |p: &str, op, name: &str| authorize(&acls, &on(), p, "1.2.3.4", op, Topic, name);
        assert!(can("User:alice", Read, "a"));
        assert!(can("User:alice", Describe, "a"));
        assert!(!can("User:alice", Write, "a"));
        assert!(!can("User:alice", Delete, "a"));
        assert!(!can("User:alice", Read, "b"));
        assert!(!can("User:bob", Read, "a"));
    }

    #[test]
    fn deny_beats_allow_and_is_not_implied() {
        let acls: Acls = [
            acl(Topic, "*", Literal, "User:*", All, Allow),
            acl(Topic, "secret", Literal, "User:alice", Read, Deny),
        ]
        .into();
        let can = |op, name: &str| authorize(&acls, &on(), "User:alice", "h", op, Topic, name);
        assert!(can(Read, "public"));
        assert!(!can(Read, "secret"));
        assert!(can(Describe, "secret"), "a deny of Read denied Describe");
        let mut host_deny = acl(Topic, "public", Literal, "User:alice", All, Deny);
        host_deny.host = "10.0.0.1".into();
        let acls: Acls = [acl(Topic, "*", Literal, "User:*", All, Allow), host_deny].into();
        assert!(!authorize(
            &acls,
            &on(),
            "User:alice",
            "10.0.0.1",
            Write,
            Topic,
            "public"
        ));
        assert!(authorize(
            &acls,
            &on(),
            "User:alice",
            "10.0.0.2",
            Write,
            Topic,
            "public"
        ));
    }

    #[test]
    fn prefixed_patterns_super_users_and_the_no_acl_default() {
        let acls: Acls = [acl(Group, "app-", Prefixed, "User:alice", Read, Allow)].into();
        let mut cfg = on();
        assert!(authorize(
            &acls,
            &cfg,
            "User:alice",
            "h",
            Read,
            Group,
            "app-1"
        ));
        assert!(!authorize(
            &acls,
            &cfg,
            "User:alice",
            "h",
            Read,
            Group,
            "other"
        ));
        assert!(!authorize(
            &acls, &cfg, "User:bob", "h", Read, Group, "app-1"
        ));
        cfg.super_users.insert("User:bob".into());
        assert!(authorize(
            &acls,
            &cfg,
            "User:bob",
            "h",
            Delete,
            Cluster,
            CLUSTER_RESOURCE
        ));
        // No ACL names "other": open only with allow.everyone.if.no.acl.found.
        assert!(!authorize(
            &acls,
            &cfg,
            "User:carol",
            "h",
            Read,
            Group,
            "other"
        ));
        cfg.allow_if_no_acl = true;
        assert!(authorize(
            &acls,
            &cfg,
            "User:carol",
            "h",
            Read,
            Group,
            "other"
        ));
        assert!(!authorize(
            &acls,
            &cfg,
            "User:carol",
            "h",
            Read,
            Group,
            "app-1"
        ));
        let off = AuthorizerConfig::default();
        assert!(authorize(
            &acls,
            &off,
            "User:carol",
            "h",
            Read,
            Group,
            "app-1"
        ));
    }

    #[test]
    fn filters_select_by_field_and_match_pattern() {
        let a = acl(Topic, "a", Literal, "User:alice", Read, Allow);
        let star = acl(Topic, "*", Literal, "User:bob", Write, Allow);
        let pre = acl(Topic, "ab", Prefixed, "User:bob", Read, Deny);
        let any = AclFilter {
            resource_type: None,
            resource_name: None,
            pattern: PatternFilter::Any,
            principal: None,
            host: None,
            operation: None,
            permission: None,
        };
        assert!([&a, &star, &pre].iter().all(|b| any.matches(b)));
        let mut m = any.clone();
        m.pattern = PatternFilter::Match;
        m.resource_name = Some("abc".into());
        assert!(!m.matches(&a) && m.matches(&star) && m.matches(&pre));
        let mut lit = any.clone();
        lit.pattern = PatternFilter::Exactly(Literal);
        lit.principal = Some("User:bob".into());
        assert!(!lit.matches(&a) && lit.matches(&star) && !lit.matches(&pre));
    }

    #[test]
    fn codes_and_names_round_trip() {
        for op in AclOperation::ALL {
            assert_eq!(AclOperation::from_code(op.code()), Some(*op));
            assert_eq!(AclOperation::parse(op.name()), Some(*op));
        }
        assert_eq!(
            AclOperation::parse("describe_configs"),
            Some(DescribeConfigs)
        );
        assert_eq!(
            ResourceType::parse("transactional-id"),
            Some(TransactionalId)
        );
        assert_eq!(AclOperation::from_code(ANY_CODE), None);
        let bad = acl(Cluster, "x", Literal, "alice", All, Allow);
        assert!(bad.validate().is_err());
    }
}
