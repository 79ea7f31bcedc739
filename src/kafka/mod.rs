//! Kafka requests: decoding a frame's header and body with the `kafka-protocol` crate, checking
//! the API and version against what we serve, and starting one handler per API. Connections,
//! framing and limits live in `net`; what each API does lives in `handlers`.

#[cfg(test)]
mod handler_tests;
pub mod handlers;
pub mod records;
pub mod respond;
pub mod wire;

use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::future::BoxFuture;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseKind};
use kafka_protocol::protocol::Decodable;
use tracing::warn;

use crate::broker::Broker;
use crate::session::Session;

/// What a handler produces: an encoded response body, or nothing (acks=0 produce).
pub type HandlerResult = Option<Response>;

pub enum Response {
    /// A response the `kafka-protocol` crate can encode at the request's version (boxed: the
    /// enum of every response type is large and these move through a channel).
    Kind(Box<ResponseKind>),
    /// A body we encoded by hand (old versions the crate no longer knows, or error bodies).
    Raw(Bytes),
    /// A response and something to keep until it has been written to the socket: the fetch
    /// budget its records hold, the connection's fetch turn.
    Held(Box<Response>, Box<dyn Send>),
}

impl Response {
    /// The response itself, and what it held (to drop once it is written).
    pub(crate) fn unheld(self) -> (Response, Vec<Box<dyn Send>>) {
        let mut resp = self;
        let mut held = Vec::new();
        while let Response::Held(inner, h) = resp {
            held.push(h);
            resp = *inner;
        }
        (resp, held)
    }
}

/// What the requests of one connection share.
pub struct RequestContext {
    pub session: Arc<Session>,
    /// Fetches take turns (see [`one_fetch_at_a_time`]).
    pub fetch_turn: Arc<tokio::sync::Mutex<()>>,
    /// Resolves `changed()` (with an error) once the connection's writer has stopped.
    pub writer_gone: tokio::sync::watch::Receiver<()>,
}

/// A started request: resolves to (correlation id, API, version, response) once answered.
pub type Pending = BoxFuture<'static, Option<(i32, ApiKey, i16, HandlerResult)>>;

/// Runs a fetch once the connection's previous fetch has been written out, and holds the turn
/// until this one's response is too (Kafka serves a connection one request at a time; here only
/// fetches wait, so pipelined produces still share fsyncs). Without this, a client pipelining
/// fetches could make the connection hold one full response per request.
///
/// Once the writer has stopped (the client left, or stalled and was dropped), fetches still queued
/// give up instead of reading data nobody will receive.
fn one_fetch_at_a_time(
    turn: Arc<tokio::sync::Mutex<()>>,
    mut writer_gone: tokio::sync::watch::Receiver<()>,
    fut: BoxFuture<'static, HandlerResult>,
) -> BoxFuture<'static, HandlerResult> {
    Box::pin(async move {
        let run = async move {
            let guard = turn.lock_owned().await;
            let resp = fut.await?;
            Some(Response::Held(Box::new(resp), Box::new(guard)))
        };
        tokio::select! {
            // The first poll must reach the turn's queue, so requests queue in arrival order.
            biased;
            r = run => r,
            _ = writer_gone.changed() => None,
        }
    })
}

/// Decodes one frame and starts its handler. Errors close the connection, as Kafka does for
/// requests it cannot parse.
pub(crate) fn decode_and_start(
    broker: &Arc<Broker>,
    conn: &RequestContext,
    frame: Bytes,
) -> Result<Pending, String> {
    let mut peek = frame.clone();
    let api_key_raw = peek.get_i16();
    let version = peek.get_i16();
    let correlation_id = if peek.remaining() >= 4 {
        peek.get_i32()
    } else {
        return Err("request header too short".into());
    };
    let api_key = ApiKey::try_from(api_key_raw)
        .map_err(|_| format!("unknown API key {api_key_raw} (correlation id {correlation_id})"))?;
    let Some((min, max)) = handlers::supported_versions(api_key) else {
        return Err(format!(
            "unsupported API {api_key:?} (key {api_key_raw}); see ApiVersions for what this broker serves"
        ));
    };
    if version < min || version > max {
        if api_key == ApiKey::ApiVersions {
            // KIP-511: answer with UNSUPPORTED_VERSION and a v0 body so the client can retry lower.
            let body = handlers::api_versions::unsupported_version_body();
            return Ok(ready(correlation_id, api_key, 0, Some(Response::Raw(body))));
        }
        return Err(format!(
            "unsupported version {version} of {api_key:?} (supported {min}..={max})"
        ));
    }
    let mut body = frame;
    // Old versions the codec crate dropped are decoded by hand inside their handlers.
    if let Some(pending) = handlers::start_legacy(broker, api_key, version, correlation_id, &body)?
    {
        return Ok(pending);
    }
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut body, header_version)
        .map_err(|e| format!("malformed {api_key:?} v{version} request header: {e}"))?;
    let request = RequestKind::decode(api_key, &mut body, version)
        .map_err(|e| format!("malformed {api_key:?} v{version} request: {e}"))?;
    conn.session
        .note_client_id(header.client_id.as_ref().map(|c| c.as_str()));
    let mut fut = handlers::dispatch(broker.clone(), conn.session.clone(), header, request);
    if api_key == ApiKey::Fetch {
        fut = one_fetch_at_a_time(conn.fetch_turn.clone(), conn.writer_gone.clone(), fut);
    }
    Ok(start(correlation_id, api_key, version, fut))
}

/// The error code of responses that carry one at the top level; per-item codes count as 0 here.
pub(crate) fn top_level_error(k: &ResponseKind) -> i16 {
    match k {
        ResponseKind::ApiVersions(r) => r.error_code,
        ResponseKind::DescribeCluster(r) => r.error_code,
        ResponseKind::Metadata(r) => r.error_code,
        _ => 0,
    }
}

fn ready(correlation_id: i32, api_key: ApiKey, version: i16, result: HandlerResult) -> Pending {
    Box::pin(async move { Some((correlation_id, api_key, version, result)) })
}

/// Starts the handler right away so that requests reach Raft in arrival order (a produce handler
/// proposes its batches on its first poll, with no await before them, whatever the task's
/// cooperative budget), then lets it finish on its own task.
fn start(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    fut: BoxFuture<'static, HandlerResult>,
) -> Pending {
    let mut fut = fut;
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => ready(correlation_id, api_key, version, r),
        std::task::Poll::Pending => {
            let handle = tokio::spawn(fut);
            Box::pin(async move {
                match handle.await {
                    Ok(r) => Some((correlation_id, api_key, version, r)),
                    Err(e) => {
                        warn!(?api_key, error = %e, "request handler panicked");
                        None
                    }
                }
            })
        }
    }
}
