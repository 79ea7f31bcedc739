//! The Kafka listener: accepts connections (bounded by `max.connections`), gives each a
//! [`Session`](crate::session::Session), and runs it in `connection` until it ends or the node
//! shuts down. What a request means is the `kafka` module's business; this one owns sockets,
//! framing, limits and timeouts.

mod connection;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::session::Session;

/// Accepts connections until `shutdown` is cancelled, then waits (bounded) for open connections to
/// end. Takes an already-bound listener so tests can bind port 0.
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
            let session = Arc::new(Session::new(peer));
            if let Err(reason) = connection::run(stream, broker, session, shutdown).await {
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
