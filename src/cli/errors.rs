//! Turning Kafka error codes into messages a person can act on.
//!
//! Brokers answer with numeric error codes; users know them by their Java
//! constant names (`TOPIC_ALREADY_EXISTS`), so every error we surface names
//! the constant and, where the broker sent one, its free-text message.

use std::fmt;

use kafka_protocol::error::ResponseError;

pub const NONE: i16 = 0;
pub const OFFSET_OUT_OF_RANGE: i16 = 1;
pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub const LEADER_NOT_AVAILABLE: i16 = 5;
pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
pub const REQUEST_TIMED_OUT: i16 = 7;
pub const REPLICA_NOT_AVAILABLE: i16 = 9;
pub const NETWORK_EXCEPTION: i16 = 13;
pub const UNSUPPORTED_VERSION: i16 = 35;
pub const TOPIC_ALREADY_EXISTS: i16 = 36;
pub const NOT_CONTROLLER: i16 = 41;
pub const FENCED_LEADER_EPOCH: i16 = 74;
pub const UNKNOWN_LEADER_EPOCH: i16 = 75;
pub const UNKNOWN_TOPIC_ID: i16 = 100;

/// An error code returned by a broker, with the context it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaError {
    pub code: i16,
    /// Human-readable description, already including the subject
    /// (e.g. "topic 'x' already exists").
    pub message: String,
}

impl fmt::Display for KafkaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, error_name(self.code))
    }
}

impl std::error::Error for KafkaError {}

impl KafkaError {
    /// Builds the error for `code` about `subject` (e.g. "topic 'orders'"),
    /// appending the broker's own message when it adds information.
    pub fn new(code: i16, subject: &str, broker_message: Option<&str>) -> Self {
        let mut message = explain(code, subject);
        // For these our sentence already says everything; brokers' texts
        // ("Topic 'x' already exists.") would only repeat it.
        let self_explanatory = matches!(
            code,
            TOPIC_ALREADY_EXISTS | UNKNOWN_TOPIC_OR_PARTITION | UNKNOWN_TOPIC_ID
        );
        let extra = broker_message
            .map(str::trim)
            .filter(|m| !m.is_empty() && !self_explanatory);
        if let Some(extra) = extra {
            message.push_str(": ");
            message.push_str(extra);
        }
        KafkaError { code, message }
    }

    /// Whether a metadata refresh followed by a retry may succeed: the
    /// partition moved, has no leader yet, or was only just created.
    pub fn is_stale_metadata(&self) -> bool {
        is_stale_metadata(self.code)
    }
}

/// Error codes after which the client should refresh metadata and retry.
pub fn is_stale_metadata(code: i16) -> bool {
    matches!(
        code,
        UNKNOWN_TOPIC_OR_PARTITION
            | LEADER_NOT_AVAILABLE
            | NOT_LEADER_OR_FOLLOWER
            | REPLICA_NOT_AVAILABLE
            | FENCED_LEADER_EPOCH
            | UNKNOWN_LEADER_EPOCH
            | UNKNOWN_TOPIC_ID
            | NOT_CONTROLLER
    )
}

/// Returns `Ok(())` for code 0 and a [`KafkaError`] otherwise.
pub fn check(code: i16, subject: &str, broker_message: Option<&str>) -> Result<(), KafkaError> {
    if code == NONE {
        Ok(())
    } else {
        Err(KafkaError::new(code, subject, broker_message))
    }
}

/// The Java constant name for an error code, e.g. 36 -> `TOPIC_ALREADY_EXISTS`.
///
/// kafka-protocol only exposes CamelCase variant names through `Display`,
/// and none of them contain acronyms, so a mechanical conversion is exact.
pub fn error_name(code: i16) -> String {
    match ResponseError::try_from_code(code) {
        None => "NONE".to_string(),
        Some(ResponseError::Unknown(c)) => format!("UNKNOWN_ERROR_CODE_{c}"),
        Some(e) => camel_to_screaming_snake(&e.to_string()),
    }
}

fn camel_to_screaming_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for (i, ch) in s.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// A short, subject-first phrase for the errors users actually hit.
fn explain(code: i16, subject: &str) -> String {
    let phrase = match code {
        TOPIC_ALREADY_EXISTS => return format!("{subject} already exists"),
        UNKNOWN_TOPIC_OR_PARTITION | UNKNOWN_TOPIC_ID => {
            return format!("{subject} does not exist")
        }
        OFFSET_OUT_OF_RANGE => "offset is out of range",
        LEADER_NOT_AVAILABLE => "partition has no leader (election in progress?)",
        NOT_LEADER_OR_FOLLOWER => "broker is not the leader for the partition",
        REQUEST_TIMED_OUT => "request timed out on the broker",
        10 => "message is larger than the broker accepts",
        17 => "invalid topic name",
        18 => "record list is larger than the broker accepts",
        19 | 20 => "not enough in-sync replicas for the requested acks",
        21 => "invalid acks value",
        29 => "not authorized to access the topic",
        UNSUPPORTED_VERSION => "broker does not support the request version",
        37 => "invalid number of partitions",
        38 => "invalid replication factor",
        39 => "invalid replica assignment",
        40 => "invalid topic configuration",
        NOT_CONTROLLER => "broker is not the controller",
        42 => "invalid request",
        44 => "policy violation",
        73 => "topic deletion is disabled on the broker",
        87 => "record rejected by the broker",
        _ => "request failed",
    };
    format!("{subject}: {phrase}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_messages() {
        assert_eq!(error_name(36), "TOPIC_ALREADY_EXISTS");
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
        assert_eq!(error_name(0), "NONE");
        assert_eq!(error_name(9999), "UNKNOWN_ERROR_CODE_9999");
        let e = KafkaError::new(36, "topic 'x'", Some("Topic 'x' already exists."));
        assert_eq!(
            e.to_string(),
            "topic 'x' already exists (TOPIC_ALREADY_EXISTS)"
        );
        let e = KafkaError::new(37, "topic 'x'", Some("has 3, asked for 2"));
        assert_eq!(
            e.to_string(),
            "topic 'x': invalid number of partitions: has 3, asked for 2 (INVALID_PARTITIONS)"
        );
        assert!(check(0, "t", None).is_ok());
        assert!(KafkaError::new(6, "p", None).is_stale_metadata());
        assert!(!KafkaError::new(36, "p", None).is_stale_metadata());
    }
}
