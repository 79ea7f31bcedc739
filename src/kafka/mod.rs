//! Kafka requests: decoding a frame's header and body with the `kafka-protocol` crate, checking
//! the API and version against what we serve, and starting one handler per API. Connections,
//! framing and limits live in `net`; what each API does lives in `handlers`.

#[cfg(test)]
mod acl_tests;
mod advertised;
pub mod authz;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod handler_tests;
pub mod handlers;
pub mod records;
pub mod respond;
pub mod wire;

use std::sync::Arc;

use bytes::Bytes;
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

/// What answers a request once its ordering step has run.
pub type Answer = BoxFuture<'static, HandlerResult>;

/// A request's handler in two steps. The connection awaits the first (the ordering step) before
/// it reads its next request: whatever must happen in arrival order happens there (a produce
/// hands its batches to Raft, a fetch takes its turn). The answer it yields then runs on its own.
/// Ordering is thus a property of the types, not of how often a future was polled.
pub type Handler = BoxFuture<'static, Answer>;

/// A handler whose ordering step has nothing to do.
pub fn answer_only(answer: Answer) -> Handler {
    Box::pin(futures::future::ready(answer))
}

/// What the requests of one connection share.
pub struct RequestContext {
    pub session: Arc<Session>,
    /// Fetches take turns (see [`FetchTurns`]).
    pub fetch_turns: FetchTurns,
    /// Resolves `changed()` (with an error) once the connection's writer has stopped.
    pub writer_gone: tokio::sync::watch::Receiver<()>,
}

/// A decoded request with its handler; `net` runs the ordering step and queues the answer.
pub struct Started {
    pub correlation_id: i32,
    pub api_key: ApiKey,
    pub version: i16,
    pub handler: Handler,
}

/// A started request: resolves to (correlation id, API, version, response) once answered.
pub type Pending = BoxFuture<'static, Option<(i32, ApiKey, i16, HandlerResult)>>;

/// The connection's fetches run one at a time, in arrival order: each waits until the previous
/// one's response has been written, and holds its turn until its own is (Kafka serves a
/// connection one request at a time; here only fetches wait, so pipelined produces still share
/// fsyncs). Without this, a client pipelining fetches could make the connection hold one full
/// response per request. The turns form a chain handed out in the ordering step, so their order
/// is the order the requests arrived in.
#[derive(Default)]
pub struct FetchTurns {
    /// Resolves (or fails, once dropped) when the latest fetch's turn ends.
    last: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl FetchTurns {
    /// The end of the previous turn to wait for, and this turn, which ends when dropped.
    fn next(
        &self,
    ) -> (
        Option<tokio::sync::oneshot::Receiver<()>>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (mine, ends) = tokio::sync::oneshot::channel();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        (last.replace(ends), mine)
    }
}

/// Runs `fetch` in its turn. Once the writer has stopped (the client left, or stalled and was
/// dropped), fetches still waiting give up instead of reading data nobody will receive.
fn in_turn(conn: &RequestContext, fetch: Answer) -> Handler {
    let (previous, mine) = conn.fetch_turns.next();
    let mut writer_gone = conn.writer_gone.clone();
    answer_only(Box::pin(async move {
        let run = async move {
            if let Some(previous) = previous {
                // Ok or Err alike: the previous turn is over.
                let _ = previous.await;
            }
            let resp = fetch.await?;
            Some(Response::Held(Box::new(resp), Box::new(mine)))
        };
        tokio::select! {
            r = run => r,
            _ = writer_gone.changed() => None,
        }
    }))
}

/// The fixed start of every request header: (API key as sent, version, correlation id).
/// Bounds-checked, so any frame (even one shorter than the 8 bytes `net` guarantees) is an
/// error, never a panic.
pub fn peek_header(frame: &Bytes) -> Result<(i16, i16, i32), String> {
    let field = |at: usize, n: usize| {
        frame
            .get(at..at + n)
            .ok_or_else(|| format!("request header too short ({} bytes)", frame.len()))
    };
    let key = field(0, 2)?;
    let version = field(2, 2)?;
    let correlation = field(4, 4)?;
    Ok((
        i16::from_be_bytes([key[0], key[1]]),
        i16::from_be_bytes([version[0], version[1]]),
        i32::from_be_bytes([
            correlation[0],
            correlation[1],
            correlation[2],
            correlation[3],
        ]),
    ))
}

/// Decodes a request's header and body with the codec crate (every version but the legacy ones
/// handlers read by hand). Pure, so the fuzz target drives exactly this.
pub fn decode_body(
    api_key: ApiKey,
    version: i16,
    frame: Bytes,
) -> Result<(RequestHeader, RequestKind), String> {
    let mut body = frame;
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut body, header_version)
        .map_err(|e| format!("malformed {api_key:?} v{version} request header: {e}"))?;
    let request = RequestKind::decode(api_key, &mut body, version)
        .map_err(|e| format!("malformed {api_key:?} v{version} request: {e}"))?;
    Ok((header, request))
}

/// Decodes one frame and starts its handler. Errors close the connection, as Kafka does for
/// requests it cannot parse.
pub(crate) fn decode_and_start(
    broker: &Arc<Broker>,
    conn: &RequestContext,
    frame: Bytes,
) -> Result<Started, String> {
    let (api_key_raw, version, correlation_id) = peek_header(&frame)?;
    let api_key = ApiKey::try_from(api_key_raw)
        .map_err(|_| format!("unknown API key {api_key_raw} (correlation id {correlation_id})"))?;
    // A SASL listener serves only the SASL exchange (and ApiVersions, which clients send first)
    // until it succeeds, and again once a KIP-368 session has expired; anything else closes the
    // connection, as Kafka does (ILLEGAL_SASL_STATE in its log).
    if !matches!(
        api_key,
        ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
    ) && conn.session.needs_authentication(std::time::Instant::now())
    {
        return Err(format!(
            "{api_key:?} on {} listener {} without (or after the expiry of) SASL authentication \
             (ILLEGAL_SASL_STATE)",
            conn.session.protocol, conn.session.listener
        ));
    }
    let Some((min, max)) = handlers::supported_versions(api_key) else {
        return Err(format!(
            "unsupported API {api_key:?} (key {api_key_raw}); see ApiVersions for what this broker serves"
        ));
    };
    if version < min || version > max {
        if api_key == ApiKey::ApiVersions {
            // KIP-511: answer with UNSUPPORTED_VERSION and a v0 body so the client can retry lower.
            let body = handlers::api_versions::unsupported_version_body();
            return Ok(Started {
                correlation_id,
                api_key,
                version: 0,
                handler: answer_only(Box::pin(async move { Some(Response::Raw(body)) })),
            });
        }
        return Err(format!(
            "unsupported version {version} of {api_key:?} (supported {min}..={max})"
        ));
    }
    // Old versions the codec crate dropped are decoded by hand inside their handlers.
    let started = |handler| Started {
        correlation_id,
        api_key,
        version,
        handler,
    };
    if handlers::is_legacy(api_key, version)
        && broker.authorizer.enabled
        && !broker
            .authorizer
            .super_users
            .contains(&conn.session.principal().to_string())
    {
        // These old versions bypass the per-resource checks of `authz`; with ACLs on, only a
        // super user may use them (Kafka 4 no longer serves them at all).
        return Err(format!(
            "{api_key:?} v{version} is not served while ACLs are enforced; use a newer client"
        ));
    }
    if let Some(handler) = handlers::start_legacy(broker, api_key, version, &frame)? {
        return Ok(started(handler));
    }
    let (header, request) = decode_body(api_key, version, frame)?;
    conn.session
        .note_client_id(header.client_id.as_ref().map(|c| c.as_str()));
    let handler = handlers::dispatch(broker.clone(), conn.session.clone(), header, request);
    Ok(started(if api_key == ApiKey::Fetch {
        // A fetch's ordering step is only its place in the turn chain; `dispatch` gives it
        // nothing to order.
        let fetch = handler;
        in_turn(conn, Box::pin(async move { fetch.await.await }))
    } else {
        handler
    }))
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

impl Started {
    /// Runs the ordering step, then the answer on its own task; what the connection's writer
    /// awaits, in request order.
    pub async fn order(self) -> Pending {
        let Started {
            correlation_id,
            api_key,
            version,
            handler,
        } = self;
        let answer = handler.await;
        let task = tokio::spawn(answer);
        Box::pin(async move {
            match task.await {
                Ok(r) => Some((correlation_id, api_key, version, r)),
                Err(e) => {
                    warn!(?api_key, error = %e, "request handler panicked");
                    None
                }
            }
        })
    }
}
