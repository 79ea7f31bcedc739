//! Kafka's ACL vocabulary with its wire codes (`ResourceType`, `PatternType`, `AclOperation`,
//! `AclPermissionType`) and names as kafka-acls spells them. It depends on nothing, so the
//! controller (which stores ACLs) and the CLI (which builds ACL requests) share one table.

use serde::{Deserialize, Serialize};

/// Kafka's name of the one cluster resource.
pub const CLUSTER_RESOURCE: &str = "kafka-cluster";

macro_rules! coded_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $code:expr, $text:expr;)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn code(self) -> i8 {
                match self { $($name::$variant => $code),* }
            }

            pub fn from_code(code: i8) -> Option<$name> {
                match code { $($code => Some($name::$variant),)* _ => None }
            }

            /// Kafka's spelling (`Read`, `Topic`, `Prefixed`, `Allow`), case-insensitive, with
            /// `_` or `-` between words or none.
            pub fn parse(text: &str) -> Option<$name> {
                let norm: String = text.chars().filter(|c| *c != '_' && *c != '-').collect();
                $name::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(&norm))
            }

            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

coded_enum!(
    /// What an ACL applies to.
    ResourceType {
        Topic = 2, "Topic";
        Group = 3, "Group";
        Cluster = 4, "Cluster";
        TransactionalId = 5, "TransactionalId";
        DelegationToken = 6, "DelegationToken";
        User = 7, "User";
    }
);

coded_enum!(
    /// How an ACL's resource name matches.
    PatternType {
        Literal = 3, "Literal";
        Prefixed = 4, "Prefixed";
    }
);

coded_enum!(
    AclOperation {
        All = 2, "All";
        Read = 3, "Read";
        Write = 4, "Write";
        Create = 5, "Create";
        Delete = 6, "Delete";
        Alter = 7, "Alter";
        Describe = 8, "Describe";
        ClusterAction = 9, "ClusterAction";
        DescribeConfigs = 10, "DescribeConfigs";
        AlterConfigs = 11, "AlterConfigs";
        IdempotentWrite = 12, "IdempotentWrite";
        CreateTokens = 13, "CreateTokens";
        DescribeTokens = 14, "DescribeTokens";
    }
);

coded_enum!(
    AclPermission {
        Deny = 2, "Deny";
        Allow = 3, "Allow";
    }
);

/// Kafka's "any" code in filters, for every one of the enums above.
pub const ANY_CODE: i8 = 1;
/// Kafka's MATCH pattern filter: bindings that would match the filter's name.
pub const MATCH_CODE: i8 = 2;
