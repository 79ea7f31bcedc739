//! DeleteTopics (key 20): by name (all versions) or by topic id (v6).

use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::broker::Broker;
use crate::controller::{Command, Reply};
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 1;
pub const MAX_VERSION: i16 = 6;

pub async fn handle(
    broker: &Broker,
    version: i16,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut targets: Vec<(Option<String>, uuid::Uuid)> = Vec::new();
    if version >= 6 {
        for t in req.topics {
            targets.push((t.name.map(|n| n.0.to_string()), t.topic_id));
        }
    } else {
        for n in req.topic_names {
            targets.push((Some(n.0.to_string()), uuid::Uuid::nil()));
        }
    }
    let mut responses = Vec::new();
    for (name, id) in targets {
        let name = name.or_else(|| {
            broker
                .state()
                .topics
                .values()
                .find(|t| uuid::Uuid::from_bytes(t.id) == id)
                .map(|t| t.name.clone())
        });
        let mut r = DeletableTopicResult::default()
            .with_name(name.clone().map(|n| TopicName(StrBytes::from_string(n))))
            .with_topic_id(id);
        let outcome = match &name {
            None => Err((
                ErrorCode::UnknownTopicOrPartition,
                "unknown topic id".to_string(),
            )),
            Some(n) => match broker
                .propose(&Command::DeleteTopic { name: n.clone() })
                .await
            {
                Ok(
                    Reply::Ok
                    | Reply::ProducerIds { .. }
                    | Reply::Groups(_)
                    | Reply::AclsDeleted(_),
                ) => Ok(()),
                Ok(Reply::Err { code, message }) => {
                    Err((super::create_topics::code_from(code), message))
                }
                Err(e) => Err((ErrorCode::RequestTimedOut, e.to_string())),
            },
        };
        if let Err((code, msg)) = outcome {
            r = r.with_error_code(code.code());
            if version >= 5 {
                r = r.with_error_message(Some(StrBytes::from_string(msg)));
            }
        }
        responses.push(r);
    }
    DeleteTopicsResponse::default().with_responses(responses)
}
