//! Turning Kafka error codes into messages a person can act on.
//!
//! Brokers answer with numeric error codes; users know them by their Java
//! constant names (`TOPIC_ALREADY_EXISTS`), so every error we surface names
//! the constant and, where the broker sent one, its free-text message.

use std::fmt;

use kafka_protocol::error::ResponseError as RE;

use crate::errors::ErrorCode as E;

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
            E::from_code(code),
            Some(E::TopicAlreadyExists | E::UnknownTopicOrPartition | E::UnknownTopicId)
        ) || matches!(
            RE::try_from_code(code),
            Some(RE::GroupIdNotFound | RE::NonEmptyGroup)
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
        E::from_code(code),
        Some(
            E::UnknownTopicOrPartition
                | E::LeaderNotAvailable
                | E::NotLeaderOrFollower
                | E::ReplicaNotAvailable
                | E::FencedLeaderEpoch
                | E::UnknownLeaderEpoch
                | E::UnknownTopicId
                | E::NotController
        )
    )
}

/// Returns `Ok(())` for code 0 and a [`KafkaError`] otherwise.
pub fn check(code: i16, subject: &str, broker_message: Option<&str>) -> Result<(), KafkaError> {
    if code == E::None.code() {
        Ok(())
    } else {
        Err(KafkaError::new(code, subject, broker_message))
    }
}

/// The Java constant name for an error code, e.g. 36 -> `TOPIC_ALREADY_EXISTS`.
pub fn error_name(code: i16) -> String {
    crate::errors::name(code)
}

/// A short, subject-first phrase for the errors users actually hit.
fn explain(code: i16, subject: &str) -> String {
    // Group errors, named through kafka-protocol's table (the broker's lists the codes it sends).
    let group_phrase = match RE::try_from_code(code) {
        Some(RE::GroupIdNotFound) => return format!("{subject} does not exist"),
        Some(RE::NonEmptyGroup) => return format!("{subject} is not empty (it has members)"),
        Some(RE::NotCoordinator) => Some("broker is not the group's coordinator"),
        Some(RE::CoordinatorLoadInProgress) => Some("the group coordinator is still loading"),
        Some(RE::RebalanceInProgress) => Some("the group is rebalancing"),
        Some(RE::IllegalGeneration) => Some("the group has moved on to a newer generation"),
        Some(RE::UnknownMemberId) => Some("the coordinator does not know this member"),
        Some(RE::InvalidSessionTimeout) => {
            Some("session timeout is outside the broker's group.min/max.session.timeout.ms")
        }
        Some(RE::InconsistentGroupProtocol) => {
            Some("the group's members use another protocol or assignor")
        }
        Some(RE::GroupMaxSizeReached) => Some("the group is full (group.max.size)"),
        Some(RE::FencedInstanceId) => {
            Some("another member with the same group.instance.id took its place")
        }
        Some(RE::OffsetMetadataTooLarge) => {
            Some("offset metadata is larger than the broker accepts")
        }
        Some(RE::GroupSubscribedToTopic) => {
            Some("a member of the group is subscribed to the topic")
        }
        Some(RE::GroupAuthorizationFailed) => Some("not authorized to access the group"),
        _ => None,
    };
    if let Some(phrase) = group_phrase {
        return format!("{subject}: {phrase}");
    }
    let Some(e) = E::from_code(code) else {
        return format!("{subject}: request failed");
    };
    let phrase = match e {
        E::TopicAlreadyExists => return format!("{subject} already exists"),
        E::UnknownTopicOrPartition | E::UnknownTopicId => {
            return format!("{subject} does not exist")
        }
        E::OffsetOutOfRange => "offset is out of range",
        E::LeaderNotAvailable => "partition has no leader (election in progress?)",
        E::NotLeaderOrFollower => "broker is not the leader for the partition",
        E::RequestTimedOut => "request timed out on the broker",
        E::MessageTooLarge => "message is larger than the broker accepts",
        E::InvalidTopicException => "invalid topic name",
        E::RecordListTooLarge => "record list is larger than the broker accepts",
        E::NotEnoughReplicas | E::NotEnoughReplicasAfterAppend => {
            "not enough in-sync replicas for the requested acks"
        }
        E::InvalidRequiredAcks => "invalid acks value",
        E::TopicAuthorizationFailed => "not authorized to access the topic",
        E::UnsupportedVersion => "broker does not support the request version",
        E::InvalidPartitions => "invalid number of partitions",
        E::InvalidReplicationFactor => "invalid replication factor",
        E::InvalidReplicaAssignment => "invalid replica assignment",
        E::InvalidConfig => "invalid topic configuration",
        E::NotController => "broker is not the controller",
        E::CoordinatorNotAvailable => "the group coordinator is not available",
        E::InvalidRequest => "invalid request",
        E::PolicyViolation => "policy violation",
        E::TopicDeletionDisabled => "topic deletion is disabled on the broker",
        E::InvalidRecord => "record rejected by the broker",
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
