//! The Kafka listeners: each accepts connections (bounded by `max.connections` across all of
//! them), runs the TLS handshake on SSL/SASL_SSL listeners (bounded in time; a failed handshake
//! closes only that connection), gives each connection a [`Session`](crate::session::Session)
//! naming its listener and security protocol, and runs it in `connection` until it ends or the
//! node shuts down. What a request means is the `kafka` module's business; this one owns sockets,
//! TLS, framing, limits and timeouts.

mod connection;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::config::ListenerConfig;
use crate::session::{Principal, Session};

/// A TLS handshake that takes longer is abandoned (a client that connects and says nothing must
/// not hold a connection slot).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One bound Kafka listener and what it speaks.
pub struct BoundListener {
    pub config: ListenerConfig,
    pub socket: TcpListener,
}

#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: {source}")]
pub struct ListenerSetupError {
    listener: String,
    source: sluice_raft::tls::TlsError,
}

/// A listener ready to serve: TLS material loaded.
pub struct Ready {
    bound: BoundListener,
    tls: Option<TlsAcceptor>,
}

/// Loads each TLS listener's keys (so a missing or bad file fails the node's start, not the first
/// client).
pub fn prepare(listeners: Vec<BoundListener>) -> Result<Vec<Ready>, ListenerSetupError> {
    listeners
        .into_iter()
        .map(|bound| {
            let tls = match &bound.config.ssl {
                Some(ssl) if bound.config.protocol.uses_tls() => Some(TlsAcceptor::from(
                    tls::server_config(ssl).map_err(|source| ListenerSetupError {
                        listener: bound.config.name.clone(),
                        source,
                    })?,
                )),
                _ if bound.config.protocol.uses_tls() => {
                    return Err(ListenerSetupError {
                        listener: bound.config.name.clone(),
                        source: sluice_raft::tls::TlsError::Config(
                            "no ssl.keystore.location".into(),
                        ),
                    })
                }
                _ => None,
            };
            Ok(Ready { bound, tls })
        })
        .collect()
}

/// Serves every listener until `shutdown` is cancelled, then waits (bounded) for open
/// connections to end. Takes already-bound listeners so tests can bind port 0.
pub async fn serve(listeners: Vec<Ready>, broker: Arc<Broker>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    // One limit for all listeners together, as Kafka's max.connections.
    let limit = Arc::new(Semaphore::new(broker.cfg.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let accepting = TaskTracker::new();
    for ready in listeners {
        accepting.spawn(accept_loop(
            ready,
            broker.clone(),
            shutdown.clone(),
            (limit.clone(), per_ip.clone()),
            connections.clone(),
        ));
    }
    accepting.close();
    accepting.wait().await;
    // Each connection stops reading on cancellation and ends once its in-flight requests are
    // answered; a long poll or a stuck commit must not hold the node's shutdown for long.
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
}

/// Open connections per client address (`max.connections.per.ip`), across listeners.
#[derive(Default)]
struct PerIp {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in [`PerIp`]; gives it back when dropped.
struct IpSlot {
    table: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn enter(table: &Arc<PerIp>, ip: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = table.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn accept_loop(
    ready: Ready,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    (limit, per_ip): (Arc<Semaphore>, Arc<PerIp>),
    connections: TaskTracker,
) {
    let Ready { bound, tls } = ready;
    let listener = Arc::new(bound.config);
    loop {
        let accepted = tokio::select! {
            r = bound.socket.accept() => r,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, listener = %listener.name, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let max_here = broker
            .cfg
            .max_connections_per_ip_overrides
            .get(&ip)
            .copied()
            .unwrap_or(broker.cfg.max_connections_per_ip);
        let Some(slot) = PerIp::enter(&per_ip, ip, max_here) else {
            warn!(%peer, max = max_here, "max.connections.per.ip reached, closing new connection");
            drop(stream);
            continue;
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
        connections.spawn(one_connection(
            stream,
            peer,
            listener.clone(),
            tls.clone(),
            broker.clone(),
            shutdown.clone(),
            (permit, slot),
        ));
    }
}

async fn one_connection(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerConfig>,
    tls: Option<TlsAcceptor>,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    permit: (OwnedSemaphorePermit, IpSlot),
) {
    let session = Arc::new(Session::on_listener(
        peer,
        &listener.name,
        listener.protocol,
    ));
    let ended = match tls {
        None => {
            // Plaintext keeps the socket's own split halves: no lock between reader and writer.
            let (rd, wr) = stream.into_split();
            connection::run(rd, wr, broker, session, shutdown).await
        }
        Some(acceptor) => {
            let handshake = tokio::select! {
                r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
                () = shutdown.cancelled() => return,
            };
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    info!(%peer, listener = %listener.name, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    info!(%peer, listener = %listener.name, "TLS handshake timed out");
                    return;
                }
            };
            let dn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::subject_dn);
            if let Some(dn) = dn {
                session.authenticate(Principal::User(dn));
            }
            info!(%peer, listener = %listener.name, principal = %session.principal(), "TLS connection");
            let (rd, wr) = tokio::io::split(stream);
            connection::run(rd, wr, broker, session.clone(), shutdown).await
        }
    };
    match ended {
        Err(reason) => info!(%peer, listener = %listener.name, %reason, "closed connection"),
        Ok(()) => debug!(%peer, "connection ended"),
    }
    drop(permit);
}
