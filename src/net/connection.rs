//! One client connection: size-prefixed frames in (the size is checked before the frame is
//! allocated), responses out strictly in request order.
//!
//! Requests on one connection are started in arrival order and may complete concurrently (pipelined
//! produce requests share one fsync), but responses go out in order, as the protocol requires.
//!
//! A connection with no request and nothing in flight for `connections.max.idle.ms` is closed, and
//! so is one whose response writes make no progress for `sluice.socket.write.timeout.ms`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::kafka::{self, respond, Pending, RequestContext, Response};
use crate::session::Session;

/// The largest request a connection may send before it has authenticated on a SASL listener.
const SASL_MAX_RECEIVE_SIZE: usize = 512 * 1024;

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

/// Serves one connection until the client leaves, it breaks a limit, or the node shuts down.
/// Generic over the stream's halves: a plaintext socket's own halves or a TLS stream's.
pub(super) async fn run<R, W>(
    mut rd: R,
    mut wr: W,
    broker: Arc<Broker>,
    session: Arc<Session>,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Pending>(broker.cfg.max_in_flight_requests_per_connection);
    let activity = Arc::new(Activity::new());
    // Never sent on: dropped with the writer, which tells waiting fetches nobody will answer them.
    let (writer_alive, writer_gone) = tokio::sync::watch::channel(());

    // The writer awaits responses strictly in request order.
    let metrics_node = broker.clone();
    let writer_activity = activity.clone();
    let stall = Duration::from_millis(broker.cfg.socket_write_timeout_ms);
    let writer_session = session.clone();
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
                    Some(Response::Kind(k)) => kafka::top_level_error(k),
                    _ => 0,
                };
                metrics.count_request(&format!("{api_key:?}"), code);
            }
            if let Some(resp) = resp {
                let chunks = respond::encode(correlation_id, api_key, version, resp)?;
                respond::write_all(&mut wr, chunks, stall).await?;
                // TLS buffers records until flushed; for a plain socket this is a no-op.
                tokio::time::timeout(stall, wr.flush())
                    .await
                    .map_err(|_| "no progress flushing a response".to_string())?
                    .map_err(|e| format!("write failed: {e}"))?;
            }
            if writer_session.authentication_failed() {
                // As Kafka: the failure's answer goes out, then the connection closes.
                return Err("SASL authentication failed".to_string());
            }
            drop(held);
            activity.touch();
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    });

    let conn = Conn {
        activity,
        requests: RequestContext {
            session,
            fetch_turns: Default::default(),
            writer_gone,
        },
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
    requests: RequestContext,
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
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
        // Before SASL authentication only the small SASL exchange is expected; a big frame from
        // an unauthenticated client is refused before it can take budget or memory (Kafka's
        // sasl.server.max.receive.size).
        if size as usize > SASL_MAX_RECEIVE_SIZE
            && conn.requests.session.needs_authentication(Instant::now())
        {
            return Err(format!(
                "a {size}-byte request before SASL authentication (at most {SASL_MAX_RECEIVE_SIZE})"
            ));
        }
        // queued.max.request.bytes: the request's bytes are taken from the node's budget before
        // they are allocated, and go back once it is answered; while the budget is spent, this
        // connection stops reading (as Kafka's request memory pool mutes it).
        let permit = match &broker.request_budget {
            None => None,
            Some(budget) => {
                let want = (size as usize).min(broker.cfg.queued_max_request_bytes) as u32;
                tokio::select! {
                    p = budget.clone().acquire_many_owned(want) => {
                        Some(p.map_err(|_| "request budget closed".to_string())?)
                    }
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        };
        let mut frame = BytesMut::zeroed(size as usize);
        tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut frame))
            .await
            .map_err(|_| format!("timed out reading a {size}-byte request"))?
            .map_err(|e| format!("truncated request frame: {e}"))?;
        let frame = frame.freeze();
        conn.activity.touch();
        // The ordering step runs here, before the next request is read (see `kafka::Handler`).
        let pending = kafka::decode_and_start(broker, &conn.requests, frame)?
            .order()
            .await;
        let pending: kafka::Pending = match permit {
            None => pending,
            Some(permit) => Box::pin(async move {
                let answered = pending.await;
                drop(permit);
                answered
            }),
        };
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
