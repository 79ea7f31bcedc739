//! The Kafka listener: accepts connections, reads size-prefixed frames (the limit is checked before
//! the frame is allocated), decodes headers and bodies with the `kafka-protocol` crate, dispatches to
//! one handler per API, and writes responses in request order.
//!
//! Requests on one connection are started in arrival order and may complete concurrently (pipelined
//! produce requests share one fsync), but responses go out in order, as the protocol requires.
//! Fetches are the exception: one at a time per connection, each from its start until its response
//! is written, so what a connection holds in fetched records is one response, whatever it pipelines.
//!
//! A connection with no request and nothing in flight for `connections.max.idle.ms` is closed, and
//! so is one whose response writes make no progress for `sluice.socket.write.timeout.ms`.

#[cfg(test)]
mod handler_tests;
pub mod handlers;
pub mod records;
pub mod respond;
pub mod wire;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseKind};
use kafka_protocol::protocol::Decodable;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::Broker;

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
    fn unheld(self) -> (Response, Vec<Box<dyn Send>>) {
        let mut resp = self;
        let mut held = Vec::new();
        while let Response::Held(inner, h) = resp {
            held.push(h);
            resp = *inner;
        }
        (resp, held)
    }
}

/// When a connection last did something, and how many of its requests are not yet answered.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection counts as idle if nothing happens before: never while a request is
    /// in flight (a long poll is not idleness), so then one full period from now.
    fn idle_at(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Instant::now() + idle;
        }
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Accepts connections until `shutdown` is cancelled, then waits (bounded) for open connections to
/// end. Takes an already-bound listener so tests can bind
/// port 0.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(broker.cfg.max_connections));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                warn!(%peer, max = broker.cfg.max_connections, "connection limit reached, closing new connection");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            if let Err(reason) = handle_connection(stream, broker, shutdown).await {
                info!(%peer, %reason, "closed connection");
            } else {
                debug!(%peer, "connection ended");
            }
            drop(permit);
        });
    }
    // Each connection stops reading on cancellation and ends once its in-flight requests are
    // answered; a long poll or a stuck commit must not hold the node's shutdown for long.
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
}

type Pending = BoxFuture<'static, Option<(i32, ApiKey, i16, HandlerResult)>>;

async fn handle_connection(
    stream: TcpStream,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Pending>(broker.cfg.max_in_flight_requests_per_connection);
    let activity = Arc::new(Activity::new());
    let fetch_turn = Arc::new(tokio::sync::Mutex::new(()));
    // Never sent on: dropped with the writer, which tells waiting fetches nobody will answer them.
    let (writer_alive, writer_gone) = tokio::sync::watch::channel(());

    // The writer awaits responses strictly in request order.
    let metrics_node = broker.clone();
    let writer_activity = activity.clone();
    let stall = Duration::from_millis(broker.cfg.socket_write_timeout_ms);
    let writer = tokio::spawn(async move {
        let metrics = &metrics_node.metrics;
        let activity = writer_activity;
        let _alive = writer_alive;
        while let Some(pending) = rx.recv().await {
            let Some((correlation_id, api_key, version, result)) = pending.await else {
                return Err("handler task failed".to_string());
            };
            let (resp, held) = match result {
                Some(r) => {
                    let (r, held) = r.unheld();
                    (Some(r), held)
                }
                None => (None, Vec::new()),
            };
            if !matches!(api_key, ApiKey::Produce | ApiKey::Fetch) {
                // Produce and Fetch count themselves, with their partitions' error codes.
                let code = match &resp {
                    Some(Response::Kind(k)) => top_level_error(k),
                    _ => 0,
                };
                metrics.count_request(&format!("{api_key:?}"), code);
            }
            if let Some(resp) = resp {
                let chunks = respond::encode(correlation_id, api_key, version, resp)?;
                respond::write_all(&mut wr, chunks, stall).await?;
            }
            drop(held);
            activity.touch();
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    });

    let conn = Conn {
        activity,
        fetch_turn,
        writer_gone,
    };
    let read = read_loop(&mut rd, &broker, &conn, &tx, &shutdown).await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| format!("writer task failed: {e}"))?;
    // A failed writer stops the reader too; its reason is the one worth reporting.
    written.and(read)
}

/// What the reader shares with the requests it starts.
struct Conn {
    activity: Arc<Activity>,
    fetch_turn: Arc<tokio::sync::Mutex<()>>,
    /// Resolves `changed()` (with an error) once the writer has stopped.
    writer_gone: tokio::sync::watch::Receiver<()>,
}

async fn read_loop(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    broker: &Arc<Broker>,
    conn: &Conn,
    tx: &mpsc::Sender<Pending>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let max = broker.cfg.socket_request_max_bytes;
    let idle = broker
        .cfg
        .connections_max_idle_ms
        .map(Duration::from_millis);
    let mut head = [0u8; 4];
    let mut got = 0usize;
    loop {
        let idle_at = idle.map(|d| conn.activity.idle_at(d));
        // One read() per turn, which is cancel-safe: an idle check in between loses no bytes.
        tokio::select! {
            r = rd.read(&mut head[got..]) => match r {
                Ok(0) if got == 0 => return Ok(()),
                Ok(0) => return Err("connection closed inside a request size".into()),
                Ok(n) => got += n,
                Err(e) => return Err(format!("read failed: {e}")),
            },
            () = shutdown.cancelled() => return Ok(()),
            // The writer gave up (a stalled or failed write): nothing more can be answered.
            _ = tx.closed() => return Err("response writer stopped".into()),
            _ = sleep_until(idle_at) => {
                let due = idle_at.is_some_and(|at| idle.map(|d| conn.activity.idle_at(d)) <= Some(at));
                if due {
                    return Err(format!(
                        "idle for {} ms (connections.max.idle.ms)",
                        idle.map_or(0, |d| d.as_millis())
                    ));
                }
                continue;
            }
        }
        if got < head.len() {
            continue;
        }
        got = 0;
        let size = i32::from_be_bytes(head);
        // Checked before allocating: a hostile length must not make us reserve memory.
        if size < 8 || size as usize > max {
            return Err(format!(
                "invalid request size {size} (must be 8..={max}, socket.request.max.bytes)"
            ));
        }
        let mut frame = BytesMut::zeroed(size as usize);
        tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut frame))
            .await
            .map_err(|_| format!("timed out reading a {size}-byte request"))?
            .map_err(|e| format!("truncated request frame: {e}"))?;
        let frame = frame.freeze();
        conn.activity.touch();
        let pending = decode_and_start(broker, conn, frame)?;
        conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        if tx.send(pending).await.is_err() {
            return Err("response writer stopped".into());
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

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
fn decode_and_start(broker: &Arc<Broker>, conn: &Conn, frame: Bytes) -> Result<Pending, String> {
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
    let mut fut = handlers::dispatch(broker.clone(), header, request);
    if api_key == ApiKey::Fetch {
        fut = one_fetch_at_a_time(conn.fetch_turn.clone(), conn.writer_gone.clone(), fut);
    }
    Ok(start(correlation_id, api_key, version, fut))
}

/// The error code of responses that carry one at the top level; per-item codes count as 0 here.
fn top_level_error(k: &ResponseKind) -> i16 {
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
