//! HTTPS on the admin port: a listener for `axum::serve` that hands over only connections whose
//! TLS handshake finished. Handshakes run concurrently (a slow or silent client cannot hold the
//! port) and are bounded in number and time; a plain-HTTP client just sees its connection closed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::AdminError;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's accept queue.
const HANDSHAKES_MAX: usize = 64;

/// The server config of `admin.tls.cert` / `admin.tls.key` (no client certificates: callers
/// authenticate with the bearer token).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, AdminError> {
    let chain = sluice_raft::tls::load_certs(cert)?;
    let key = sluice_raft::tls::load_private_key(key)?;
    let config = rustls::ServerConfig::builder_with_provider(sluice_raft::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AdminError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| AdminError::Tls(format!("certificate and key do not fit: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What `axum::serve` accepts from: connections after their handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The handshake loop only ends on shutdown, when axum stops accepting anyway.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The listener, and the loop that accepts TCP connections and runs their handshakes; the
/// caller runs the loop beside the server (it ends on `cancel`).
pub fn listen(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    cancel: CancellationToken,
) -> std::io::Result<(TlsListener, impl std::future::Future<Output = ()>)> {
    let local = tcp.local_addr()?;
    let (tx, ready) = mpsc::channel(16);
    let handshakes = async move {
        let mut pending = FuturesUnordered::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                accepted = tcp.accept(), if pending.len() < HANDSHAKES_MAX => match accepted {
                    Ok((stream, peer)) => {
                        let acceptor = acceptor.clone();
                        pending.push(async move {
                            let done =
                                tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(stream)).await;
                            (done, peer)
                        });
                    }
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        warn!(error = %e, "admin HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some((done, peer)) = pending.next(), if !pending.is_empty() => match done {
                    Ok(Ok(stream)) => {
                        if tx.send((stream, peer)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "admin TLS handshake failed"),
                    Err(_) => debug!(%peer, "admin TLS handshake timed out"),
                },
            }
        }
    };
    Ok((TlsListener { ready, local }, handshakes))
}
