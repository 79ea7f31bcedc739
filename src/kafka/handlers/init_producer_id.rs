//! InitProducerId (key 22): a producer id and epoch for an idempotent producer, which every
//! current client asks for at start (kafka-python 3 and the Java client by default, librdkafka
//! with `enable.idempotence`). Ids come in blocks from the controller, so none is given out
//! twice. A producer that re-initialises with its id and epoch (KIP-360, v3+) gets the next
//! epoch of the same id, which fences its older self on every partition. Transactions are not
//! built yet: a transactional id is refused.

use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use tracing::warn;

use crate::broker::Broker;
use crate::errors::ErrorCode;

pub const MIN_VERSION: i16 = 0;
/// v5 only matters to transactions (KIP-890).
pub const MAX_VERSION: i16 = 4;

/// (producer id, epoch) for a request that names its current ones: the same id one epoch on, or
/// `None` when it names none or its epoch cannot grow (then a fresh id starts at epoch 0).
pub fn bumped(producer_id: i64, epoch: i16) -> Option<(i64, i16)> {
    (producer_id >= 0 && (0..i16::MAX - 1).contains(&epoch)).then(|| (producer_id, epoch + 1))
}

pub async fn handle(
    broker: &Broker,
    _version: i16,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let resp = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if req.transactional_id.as_ref().is_some_and(|t| !t.is_empty()) {
        warn!(
            transactional_id = ?req.transactional_id,
            "InitProducerId with a transactional id refused: Sluice does not support transactions yet"
        );
        return resp.with_error_code(ErrorCode::InvalidRequest.code());
    }
    if let Some((id, epoch)) = bumped(req.producer_id.0, req.producer_epoch) {
        return resp
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(epoch);
    }
    match broker.new_producer_id().await {
        Ok(id) => resp.with_producer_id(ProducerId(id)).with_producer_epoch(0),
        Err(e) => {
            warn!(error = %e, "no producer id to hand out");
            // Retriable for every client: it asks again, possibly another node.
            resp.with_error_code(ErrorCode::CoordinatorNotAvailable.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reinitialising_bumps_the_epoch_until_it_would_overflow() {
        assert_eq!(bumped(-1, -1), None);
        assert_eq!(bumped(7, 0), Some((7, 1)));
        assert_eq!(bumped(7, i16::MAX - 2), Some((7, i16::MAX - 1)));
        assert_eq!(bumped(7, i16::MAX - 1), None);
        assert_eq!(bumped(7, -1), None);
    }
}
