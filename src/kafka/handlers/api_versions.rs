//! ApiVersions (key 18): what we serve, derived from the dispatch table.

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse};

use super::SUPPORTED;
use crate::broker::Broker;
use crate::errors::ErrorCode;
use crate::kafka::wire::Writer;

pub const MIN_VERSION: i16 = 0;
/// v4 only adds a tagged field we do not need; librdkafka 2.0.2 tops out at v3.
pub const MAX_VERSION: i16 = 3;

fn api_keys() -> Vec<ApiVersion> {
    SUPPORTED
        .iter()
        .map(|(k, min, max)| {
            ApiVersion::default()
                .with_api_key(*k as i16)
                .with_min_version(*min)
                .with_max_version(*max)
        })
        .collect()
}

pub fn handle(_node: &Broker, _version: i16, _req: ApiVersionsRequest) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(0)
        .with_api_keys(api_keys())
}

/// The body sent when a client asks for an ApiVersions version we do not know: error 35 and our
/// ranges in the v0 layout, which every client can parse (KIP-511).
pub fn unsupported_version_body() -> Bytes {
    let keys = api_keys();
    let mut w = Writer::default();
    w.i16(ErrorCode::UnsupportedVersion.code())
        .i32(keys.len() as i32);
    for k in keys {
        w.i16(k.api_key).i16(k.min_version).i16(k.max_version);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Decodable;

    #[test]
    fn unsupported_version_body_is_a_valid_v0_response() {
        let mut body = unsupported_version_body();
        let r = ApiVersionsResponse::decode(&mut body, 0).unwrap();
        assert_eq!(r.error_code, 35);
        assert_eq!(r.api_keys.len(), SUPPORTED.len());
        let produce = r.api_keys.iter().find(|k| k.api_key == 0).unwrap();
        assert_eq!(
            produce.min_version, 0,
            "librdkafka wants Produce to start at 0"
        );
    }
}
