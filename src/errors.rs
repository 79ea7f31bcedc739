//! The one table of Kafka error codes, for the broker (what it answers) and the CLI (what it
//! explains). Numbers are the wire values from the Kafka protocol reference; names follow Kafka's
//! so logs and client messages line up.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub enum ErrorCode {
    UnknownServerError = -1,
    None = 0,
    OffsetOutOfRange = 1,
    CorruptMessage = 2,
    UnknownTopicOrPartition = 3,
    InvalidFetchSize = 4,
    LeaderNotAvailable = 5,
    NotLeaderOrFollower = 6,
    RequestTimedOut = 7,
    ReplicaNotAvailable = 9,
    MessageTooLarge = 10,
    OffsetMetadataTooLarge = 12,
    NetworkException = 13,
    CoordinatorLoadInProgress = 14,
    CoordinatorNotAvailable = 15,
    NotCoordinator = 16,
    InvalidTopicException = 17,
    RecordListTooLarge = 18,
    NotEnoughReplicas = 19,
    NotEnoughReplicasAfterAppend = 20,
    InvalidRequiredAcks = 21,
    IllegalGeneration = 22,
    InconsistentGroupProtocol = 23,
    InvalidGroupId = 24,
    UnknownMemberId = 25,
    InvalidSessionTimeout = 26,
    RebalanceInProgress = 27,
    InvalidCommitOffsetSize = 28,
    TopicAuthorizationFailed = 29,
    GroupAuthorizationFailed = 30,
    ClusterAuthorizationFailed = 31,
    InvalidTimestamp = 32,
    UnsupportedSaslMechanism = 33,
    IllegalSaslState = 34,
    UnsupportedVersion = 35,
    TopicAlreadyExists = 36,
    InvalidPartitions = 37,
    InvalidReplicationFactor = 38,
    InvalidReplicaAssignment = 39,
    InvalidConfig = 40,
    NotController = 41,
    InvalidRequest = 42,
    UnsupportedForMessageFormat = 43,
    PolicyViolation = 44,
    OutOfOrderSequenceNumber = 45,
    DuplicateSequenceNumber = 46,
    InvalidProducerEpoch = 47,
    TransactionalIdAuthorizationFailed = 53,
    SecurityDisabled = 54,
    KafkaStorageError = 56,
    SaslAuthenticationFailed = 58,
    UnknownProducerId = 59,
    NonEmptyGroup = 68,
    GroupIdNotFound = 69,
    TopicDeletionDisabled = 73,
    FencedLeaderEpoch = 74,
    UnknownLeaderEpoch = 75,
    MemberIdRequired = 79,
    GroupMaxSizeReached = 81,
    FencedInstanceId = 82,
    NoReassignmentInProgress = 85,
    GroupSubscribedToTopic = 86,
    InvalidRecord = 87,
    ProducerFenced = 90,
    ResourceNotFound = 91,
    DuplicateResource = 92,
    UnacceptableCredential = 93,
    UnknownTopicId = 100,
}

const ALL: &[ErrorCode] = &[
    ErrorCode::UnknownServerError,
    ErrorCode::None,
    ErrorCode::OffsetOutOfRange,
    ErrorCode::CorruptMessage,
    ErrorCode::UnknownTopicOrPartition,
    ErrorCode::InvalidFetchSize,
    ErrorCode::LeaderNotAvailable,
    ErrorCode::NotLeaderOrFollower,
    ErrorCode::RequestTimedOut,
    ErrorCode::ReplicaNotAvailable,
    ErrorCode::MessageTooLarge,
    ErrorCode::OffsetMetadataTooLarge,
    ErrorCode::NetworkException,
    ErrorCode::CoordinatorLoadInProgress,
    ErrorCode::CoordinatorNotAvailable,
    ErrorCode::NotCoordinator,
    ErrorCode::InvalidTopicException,
    ErrorCode::RecordListTooLarge,
    ErrorCode::NotEnoughReplicas,
    ErrorCode::NotEnoughReplicasAfterAppend,
    ErrorCode::InvalidRequiredAcks,
    ErrorCode::IllegalGeneration,
    ErrorCode::InconsistentGroupProtocol,
    ErrorCode::InvalidGroupId,
    ErrorCode::UnknownMemberId,
    ErrorCode::InvalidSessionTimeout,
    ErrorCode::RebalanceInProgress,
    ErrorCode::InvalidCommitOffsetSize,
    ErrorCode::TopicAuthorizationFailed,
    ErrorCode::GroupAuthorizationFailed,
    ErrorCode::ClusterAuthorizationFailed,
    ErrorCode::InvalidTimestamp,
    ErrorCode::UnsupportedSaslMechanism,
    ErrorCode::IllegalSaslState,
    ErrorCode::UnsupportedVersion,
    ErrorCode::TopicAlreadyExists,
    ErrorCode::InvalidPartitions,
    ErrorCode::InvalidReplicationFactor,
    ErrorCode::InvalidReplicaAssignment,
    ErrorCode::InvalidConfig,
    ErrorCode::NotController,
    ErrorCode::InvalidRequest,
    ErrorCode::UnsupportedForMessageFormat,
    ErrorCode::PolicyViolation,
    ErrorCode::OutOfOrderSequenceNumber,
    ErrorCode::DuplicateSequenceNumber,
    ErrorCode::InvalidProducerEpoch,
    ErrorCode::TransactionalIdAuthorizationFailed,
    ErrorCode::SecurityDisabled,
    ErrorCode::KafkaStorageError,
    ErrorCode::SaslAuthenticationFailed,
    ErrorCode::UnknownProducerId,
    ErrorCode::NonEmptyGroup,
    ErrorCode::GroupIdNotFound,
    ErrorCode::TopicDeletionDisabled,
    ErrorCode::FencedLeaderEpoch,
    ErrorCode::UnknownLeaderEpoch,
    ErrorCode::MemberIdRequired,
    ErrorCode::GroupMaxSizeReached,
    ErrorCode::FencedInstanceId,
    ErrorCode::NoReassignmentInProgress,
    ErrorCode::GroupSubscribedToTopic,
    ErrorCode::InvalidRecord,
    ErrorCode::ProducerFenced,
    ErrorCode::ResourceNotFound,
    ErrorCode::DuplicateResource,
    ErrorCode::UnacceptableCredential,
    ErrorCode::UnknownTopicId,
];

impl ErrorCode {
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The variant for a code this table knows.
    pub fn from_code(code: i16) -> Option<ErrorCode> {
        ALL.iter().copied().find(|e| e.code() == code)
    }
}

/// Kafka's constant name for any error code, e.g. 36 -> `TOPIC_ALREADY_EXISTS`, including codes
/// this table does not list (from `kafka-protocol`'s full list).
pub fn name(code: i16) -> String {
    use kafka_protocol::error::ResponseError;
    // kafka-protocol exposes CamelCase variant names through `Display`, none with acronyms, so
    // the mechanical conversion is exact.
    match ResponseError::try_from_code(code) {
        None => "NONE".to_string(),
        Some(ResponseError::Unknown(c)) => format!("UNKNOWN_ERROR_CODE_{c}"),
        Some(e) => {
            let camel = e.to_string();
            let mut out = String::with_capacity(camel.len() + 8);
            for (i, ch) in camel.chars().enumerate() {
                if ch.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_found_by_its_code_and_named_as_kafka_does() {
        for e in ALL {
            assert_eq!(ErrorCode::from_code(e.code()), Some(*e));
            // Our variant names are Kafka's, so the table cannot drift from the wire names.
            let ours = format!("{e:?}");
            let kafka: String = name(e.code())
                .split('_')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_string() + &c.as_str().to_lowercase())
                        .unwrap_or_default()
                })
                .collect();
            assert!(ours == kafka || e.code() == 0, "{ours} vs {kafka}");
        }
        assert_eq!(ErrorCode::from_code(9999), None);
        assert_eq!(name(36), "TOPIC_ALREADY_EXISTS");
        assert_eq!(name(-1), "UNKNOWN_SERVER_ERROR");
        assert_eq!(name(0), "NONE");
        assert_eq!(name(9999), "UNKNOWN_ERROR_CODE_9999");
    }
}
