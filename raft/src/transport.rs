//! The node-to-node transport: every Raft group's RPCs to one peer node share ONE TCP
//! connection, so a thousand partition groups cost one socket per peer, not a thousand.
//!
//! A frame is a u32 big-endian length and a body (see [`crate::codec`]): requests carry a request
//! id, the group id and the RPC kind; responses carry the request id, so many RPCs are in flight
//! on one connection and answered out of order. Each peer has a task that connects lazily (on the
//! first RPC), reconnects with capped exponential backoff, and fails every in-flight RPC when the
//! connection drops so that openraft retries instead of waiting for timeouts.
//!
//! With [`PeerTls`] configured, every connection is mutual TLS: the dialler checks that the peer
//! holds the certificate of the node it meant to reach, the acceptor takes the caller's node id
//! from its certificate, and each request is checked against that id before it reaches a group.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError as OpenraftError,
    RemoteError, Timeout, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::codec::{self, Frame, ResponseStatus, RpcKind, MAX_FRAME_BYTES};
use crate::peer_input;
use crate::registry::Registry;
use crate::tls::{self, PeerTls};
use crate::{GroupId, Node, NodeId, TypeConfig};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A peer that has not finished its TLS handshake by then is dropped: a stalled handshake must
/// not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Requests a peer may have in flight on one connection before we stop reading its frames; this
/// is the bound on server-side work a single peer can queue.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;

const STATE_CONNECTING: u8 = 0;
const STATE_UP: u8 = 1;
const STATE_DOWN: u8 = 2;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Other(String),
}

/// Resolves once shutdown is signalled or its sender is gone (the host was dropped without
/// `shutdown`); `changed()` alone would resolve at once forever in the latter case and spin.
pub(crate) async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

type Pending =
    Mutex<HashMap<u64, oneshot::Sender<Result<(ResponseStatus, Bytes), TransportError>>>>;

/// One peer node: its connection task, the requests waiting for it, the in-flight ones.
struct PeerClient {
    target: NodeId,
    /// The address this client dials; a client whose address changed is replaced.
    addr: String,
    tx: mpsc::UnboundedSender<(u64, Bytes)>,
    pending: Arc<Pending>,
    state: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

fn fail_all(pending: &Pending, target: NodeId, why: &str) {
    let drained: Vec<_> = match pending.lock() {
        Ok(mut p) => p.drain().collect(),
        Err(_) => return,
    };
    for (_, tx) in drained {
        let _ = tx.send(Err(TransportError::Unreachable(target, why.to_string())));
    }
}

/// Reads one frame body; the length is checked against [`MAX_FRAME_BYTES`] before allocating.
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES} byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(Bytes::from(body)))
}

/// Writes queued frames, coalescing whatever is already queued into one flush.
async fn write_frames<W: AsyncWriteExt + Unpin>(
    w: &mut BufWriter<W>,
    rx: &mut mpsc::UnboundedReceiver<(u64, Bytes)>,
    pending: Option<&Pending>,
) -> std::io::Result<()> {
    while let Some((id, frame)) = rx.recv().await {
        let mut next = Some((id, frame));
        while let Some((id, frame)) = next.take() {
            // A request whose caller gave up (timeout) while the peer was unreachable is stale:
            // sending it would only waste the peer's time.
            let live =
                pending.is_none_or(|p| p.lock().map(|p| p.contains_key(&id)).unwrap_or(false));
            if live {
                w.write_all(&frame).await?;
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    Ok(())
}

impl PeerClient {
    fn spawn(
        target: NodeId,
        addr: String,
        tls: Option<PeerTls>,
        shutdown: watch::Receiver<bool>,
    ) -> PeerClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Arc<Pending> = Arc::default();
        let state = Arc::new(AtomicU8::new(STATE_CONNECTING));
        let task = tokio::spawn(Self::run(
            target,
            addr.clone(),
            tls,
            rx,
            pending.clone(),
            state.clone(),
            shutdown,
        ));
        PeerClient {
            target,
            addr,
            tx,
            pending,
            state,
            task,
        }
    }

    async fn run(
        target: NodeId,
        addr: String,
        tls: Option<PeerTls>,
        mut rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
        pending: Arc<Pending>,
        state: Arc<AtomicU8>,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if *shutdown.borrow() || shutdown.has_changed().is_err() {
                break;
            }
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await;
            match connected {
                Ok(Ok(stream)) => {
                    // Heartbeats and votes are tiny and latency-bound.
                    let _ = stream.set_nodelay(true);
                    let why = match &tls {
                        None => {
                            backoff = BACKOFF_MIN;
                            let (r, w) = stream.into_split();
                            Self::connected(
                                target, &addr, r, w, &mut rx, &pending, &state, &shutdown,
                            )
                            .await
                        }
                        Some(tls) => match Self::handshake(target, tls, stream).await {
                            Ok(stream) => {
                                backoff = BACKOFF_MIN;
                                let (r, w) = tokio::io::split(stream);
                                Self::connected(
                                    target, &addr, r, w, &mut rx, &pending, &state, &shutdown,
                                )
                                .await
                            }
                            Err(why) => {
                                tracing::warn!(target_node = target, %addr, %why, "TLS handshake with peer failed");
                                why
                            }
                        },
                    };
                    state.store(STATE_DOWN, Ordering::SeqCst);
                    fail_all(&pending, target, &why);
                }
                Ok(Err(e)) => {
                    tracing::debug!(target_node = target, %addr, error = %e, "connect to peer failed");
                    state.store(STATE_DOWN, Ordering::SeqCst);
                    fail_all(&pending, target, &e.to_string());
                }
                Err(_) => {
                    state.store(STATE_DOWN, Ordering::SeqCst);
                    fail_all(&pending, target, "connect timed out");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(shutdown.clone()) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        state.store(STATE_DOWN, Ordering::SeqCst);
        fail_all(&pending, target, "transport shut down");
    }

    /// The client side of the handshake: the peer must prove it is `target`.
    async fn handshake(
        target: NodeId,
        tls: &PeerTls,
        stream: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = PeerTls::server_name(target)?;
        let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
            Err(_) => Err("TLS handshake timed out".into()),
        }
    }

    /// Runs one established connection until it fails; returns why it closed.
    #[allow(clippy::too_many_arguments)]
    async fn connected<R, W>(
        target: NodeId,
        addr: &str,
        r: R,
        w: W,
        rx: &mut mpsc::UnboundedReceiver<(u64, Bytes)>,
        pending: &Pending,
        state: &AtomicU8,
        shutdown: &watch::Receiver<bool>,
    ) -> String
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        tracing::debug!(target_node = target, %addr, "connected to peer");
        state.store(STATE_UP, Ordering::SeqCst);
        let mut w = BufWriter::new(w);
        let reader = Self::read_responses(r, pending);
        let writer = write_frames(&mut w, rx, Some(pending));
        let why = tokio::select! {
            res = reader => format!("connection lost: {res:?}"),
            res = writer => format!("write failed: {res:?}"),
            _ = stopped(shutdown.clone()) => "shutting down".to_string(),
        };
        tracing::debug!(target_node = target, %addr, %why, "peer connection closed");
        why
    }

    async fn read_responses<R: AsyncRead + Unpin>(
        mut r: R,
        pending: &Pending,
    ) -> std::io::Result<()> {
        loop {
            let Some(body) = read_frame(&mut r).await? else {
                return Ok(());
            };
            match codec::decode_frame(body) {
                Ok(Frame::Response {
                    id,
                    status,
                    payload,
                }) => {
                    let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                    // No waiter: the caller timed out already.
                    if let Some(tx) = waiter {
                        let _ = tx.send(Ok((status, payload)));
                    }
                }
                Ok(Frame::Request { .. }) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "peer sent a request on an outgoing connection",
                    ))
                }
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                }
            }
        }
    }
}

/// The client half: a connection per peer, shared by every group of this process.
pub(crate) struct Transport {
    node_id: NodeId,
    /// Configured peer addresses; they win over the address recorded in a group's membership,
    /// which is frozen when the group is created and goes stale if a node moves.
    /// Grows with [`Transport::set_addr`] as nodes join after start.
    addrs: RwLock<BTreeMap<NodeId, String>>,
    peers: Mutex<HashMap<NodeId, Arc<PeerClient>>>,
    next_id: AtomicU64,
    tls: Option<PeerTls>,
    shutdown: watch::Receiver<bool>,
}

impl Transport {
    pub(crate) fn new(
        node_id: NodeId,
        addrs: BTreeMap<NodeId, String>,
        tls: Option<PeerTls>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Transport {
            node_id,
            addrs: RwLock::new(addrs),
            peers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            tls,
            shutdown,
        }
    }

    /// The configured (or taught) address of `id`, if any.
    pub(crate) fn addr_of(&self, id: NodeId) -> Option<String> {
        self.addrs.read().ok()?.get(&id).cloned()
    }

    /// Records (or changes) the address of `id`; an open connection to an old address is
    /// dropped, and the next RPC dials the new one.
    pub(crate) fn set_addr(&self, id: NodeId, addr: String) {
        if let Ok(mut a) = self.addrs.write() {
            a.insert(id, addr);
        }
    }

    fn peer(&self, target: NodeId, addr: &str) -> Result<Arc<PeerClient>, TransportError> {
        let configured = self.addr_of(target);
        let addr = configured.as_deref().unwrap_or(addr);
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| TransportError::Other("peer table lock poisoned".into()))?;
        if let Some(p) = peers.get(&target) {
            if !p.task.is_finished() && p.addr == addr {
                return Ok(p.clone());
            }
            if p.addr != addr {
                tracing::info!(target_node = target, old = %p.addr, new = %addr, "peer address changed; reconnecting");
                p.task.abort();
                fail_all(&p.pending, target, "peer address changed");
            }
        }
        if *self.shutdown.borrow() {
            return Err(TransportError::Other("transport shut down".into()));
        }
        let p = Arc::new(PeerClient::spawn(
            target,
            addr.to_string(),
            self.tls.clone(),
            self.shutdown.clone(),
        ));
        peers.insert(target, p.clone());
        Ok(p)
    }

    /// Sends an application request to `target` (dialing `addr` unless an address is configured)
    /// and waits for the reply, at most `ttl`.
    pub(crate) async fn call_app(
        &self,
        target: NodeId,
        addr: &str,
        payload: Bytes,
        ttl: Duration,
    ) -> Result<(ResponseStatus, Bytes), TransportError> {
        let from = self.node_id.to_string();
        self.call(
            target,
            addr,
            RpcKind::App,
            &from,
            |out| {
                out.extend_from_slice(&payload);
                Ok(())
            },
            ttl,
        )
        .await
    }

    /// Sends one request and waits for its response, at most `ttl`.
    pub(crate) async fn call(
        &self,
        target: NodeId,
        addr: &str,
        kind: RpcKind,
        group: &str,
        encode_payload: impl FnOnce(&mut BytesMut) -> Result<(), codec::CodecError>,
        ttl: Duration,
    ) -> Result<(ResponseStatus, Bytes), TransportError> {
        let peer = self.peer(target, addr)?;
        if peer.state.load(Ordering::SeqCst) == STATE_DOWN {
            // Fail fast while the peer is known down: openraft backs off on Unreachable.
            return Err(TransportError::Unreachable(target, "not connected".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = codec::begin_request(id, kind, group);
        encode_payload(&mut frame).map_err(|e| TransportError::Other(e.to_string()))?;
        let frame = codec::finish_frame(frame).map_err(|e| TransportError::Other(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = peer.pending.lock() {
            p.insert(id, tx);
        }
        if peer.tx.send((id, frame)).is_err() {
            peer.pending.lock().ok().and_then(|mut p| p.remove(&id));
            return Err(TransportError::Unreachable(
                target,
                "connection task stopped".into(),
            ));
        }
        match tokio::time::timeout(ttl, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(TransportError::Unreachable(
                target,
                "connection task stopped".into(),
            )),
            Err(_) => {
                peer.pending.lock().ok().and_then(|mut p| p.remove(&id));
                Err(TransportError::Timeout)
            }
        }
    }

    pub(crate) fn shutdown_peers(&self) {
        let peers: Vec<_> = match self.peers.lock() {
            Ok(mut p) => p.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        for p in peers {
            p.task.abort();
            fail_all(&p.pending, p.target, "transport shut down");
        }
    }
}

/// Accepts peers on the raft listener and routes each request to its group.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    tls: Option<PeerTls>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer_addr)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(%peer_addr, "accepted raft peer connection");
                    let registry = registry.clone();
                    let shutdown = shutdown.clone();
                    match &tls {
                        None => {
                            let (r, w) = stream.into_split();
                            tokio::spawn(serve_connection(r, w, None, peer_addr.to_string(), registry, shutdown));
                        }
                        Some(tls) => {
                            tokio::spawn(accept_tls(stream, peer_addr.to_string(), tls.clone(), registry, shutdown));
                        }
                    }
                }
                Err(e) => {
                    // Typically EMFILE; pausing keeps the loop from spinning on it.
                    tracing::warn!(error = %e, "accepting a raft peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stopped(shutdown.clone()) => break,
        }
    }
}

/// The server side of the handshake. A caller without a certificate from the cluster CA that
/// names exactly one node is dropped here, before any frame is read.
async fn accept_tls(
    stream: TcpStream,
    peer_addr: String,
    tls: PeerTls,
    registry: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%peer_addr, error = %e, "refused a raft peer connection: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer_addr, "refused a raft peer connection: TLS handshake timed out");
            return;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let peer = match leaf.map(tls::node_id_of) {
        Some(Ok(id)) => id,
        Some(Err(why)) => {
            tracing::warn!(%peer_addr, %why, "refused a raft peer connection");
            return;
        }
        None => {
            tracing::warn!(%peer_addr, "refused a raft peer connection: no client certificate");
            return;
        }
    };
    tracing::debug!(%peer_addr, peer, "raft peer authenticated");
    let (r, w) = tokio::io::split(stream);
    serve_connection(r, w, Some(peer), peer_addr, registry, shutdown).await
}

/// Serves one peer connection; `peer` is the caller's node id when its certificate proved it.
async fn serve_connection<R, W>(
    mut r: R,
    w: W,
    peer: Option<NodeId>,
    peer_addr: String,
    registry: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Bytes)>();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(w);
        write_frames(&mut w, &mut rx, None).await
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let res: std::io::Result<()> = async {
        loop {
            let body = tokio::select! {
                b = read_frame(&mut r) => b?,
                _ = stopped(shutdown.clone()) => return Ok(()),
            };
            let Some(body) = body else { return Ok(()) };
            let (id, kind, group, payload) = match codec::decode_frame(body) {
                Ok(Frame::Request {
                    id,
                    kind,
                    group,
                    payload,
                }) => (id, kind, group, payload),
                Ok(Frame::Response { .. }) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "peer sent a response on an incoming connection",
                    ))
                }
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                }
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            let registry = registry.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let (status, payload) = dispatch(&registry, peer, kind, &group, payload).await;
                match codec::response_frame(id, status, &payload) {
                    Ok(frame) => {
                        let _ = tx.send((id, frame));
                    }
                    Err(e) => {
                        tracing::warn!(%group, error = %e, "dropping an unencodable raft response")
                    }
                }
                drop(permit);
            });
        }
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(%peer_addr, error = %e, "closing raft peer connection");
    }
    drop(tx);
    writer.abort();
}

fn json_reply<T: serde::Serialize>(v: &T) -> (ResponseStatus, Vec<u8>) {
    match serde_json::to_vec(v) {
        Ok(b) => (ResponseStatus::Ok, b),
        Err(e) => (ResponseStatus::Failed, e.to_string().into_bytes()),
    }
}

/// Refuses a request whose claimed sender is not the node its certificate names.
fn check_sender(peer: Option<NodeId>, claimed: Option<NodeId>, what: &str) -> Result<(), String> {
    match peer {
        Some(p) if claimed != Some(p) => Err(format!(
            "{what} claims to come from node {claimed:?}, but the connection's certificate is node {p}'s"
        )),
        _ => Ok(()),
    }
}

async fn dispatch(
    registry: &Registry,
    peer: Option<NodeId>,
    kind: RpcKind,
    group: &str,
    payload: Bytes,
) -> (ResponseStatus, Vec<u8>) {
    if kind == RpcKind::App {
        // The frame's group field carries the caller's id; with TLS it must be the certificate's.
        if let Err(why) = check_sender(peer, group.parse().ok(), "an application request") {
            tracing::warn!(reason = %why, "refused a peer's request");
            return (ResponseStatus::Failed, why.into_bytes());
        }
        return dispatch_app(registry, group, payload).await;
    }
    if kind == RpcKind::Ping {
        return (
            ResponseStatus::Ok,
            crate::ping::answer(registry, registry.boot()).to_vec(),
        );
    }
    let Some(raft) = registry.get(group) else {
        return (
            ResponseStatus::UnknownGroup,
            format!("no group {group}").into_bytes(),
        );
    };
    let refused = |group: &str, why: String| {
        tracing::warn!(group, reason = %why, "refused a peer's request");
        (ResponseStatus::Failed, why.into_bytes())
    };
    match kind {
        RpcKind::AppendEntries => match codec::decode_append(&payload) {
            Ok(req) => match check_sender(peer, req.vote.leader_id().voted_for(), "an append")
                .and_then(|()| peer_input::check_append(group, &req))
            {
                Ok(()) => json_reply(&raft.append_entries(req).await),
                Err(why) => refused(group, why),
            },
            Err(e) => (ResponseStatus::Failed, e.to_string().into_bytes()),
        },
        RpcKind::Vote => match serde_json::from_slice::<VoteRequest<NodeId>>(&payload) {
            Ok(req) => match check_sender(peer, req.vote.leader_id().voted_for(), "a vote request")
                .and_then(|()| peer_input::check_vote(&req))
            {
                Ok(()) if !registry.may_vote(group) => {
                    // A plain "not granted" with this replica's own state, as openraft would
                    // answer a candidate whose log is behind.
                    let m = raft.metrics().borrow().clone();
                    let resp = VoteResponse::new(m.vote, m.last_applied.max(m.snapshot), false);
                    tracing::info!(group, candidate = %req.vote, "not voting: this replica is still getting back entries it lost");
                    json_reply(&Ok::<_, openraft::error::RaftError<NodeId>>(resp))
                }
                Ok(()) => json_reply(&raft.vote(req).await),
                Err(why) => refused(group, why),
            },
            Err(e) => (ResponseStatus::Failed, e.to_string().into_bytes()),
        },
        RpcKind::InstallSnapshot => match codec::decode_snapshot(&payload) {
            Ok(req) => match check_sender(peer, req.vote.leader_id().voted_for(), "a snapshot")
                .and_then(|()| peer_input::check_snapshot(group, &req))
                .and_then(|()| registry.check_snapshot_chunk(group, &req))
            {
                Ok(()) => {
                    let seen = peer_input::ChunkSeen::of(&req);
                    let vote = req.vote;
                    let res = raft.install_snapshot(req).await;
                    // A chunk from a stale leader is answered Ok with this node's newer vote:
                    // only a chunk the node took as its leader's counts.
                    if res.as_ref().is_ok_and(|r| r.vote == vote) {
                        registry.record_snapshot_chunk(group, &seen);
                    }
                    json_reply(&res)
                }
                Err(why) => refused(group, why),
            },
            Err(e) => (ResponseStatus::Failed, e.to_string().into_bytes()),
        },
        RpcKind::App | RpcKind::Ping => (ResponseStatus::Failed, b"unreachable".to_vec()),
    }
}

/// Hands an application request to the node's handler; `from` is the caller's node id.
async fn dispatch_app(
    registry: &Registry,
    from: &str,
    payload: Bytes,
) -> (ResponseStatus, Vec<u8>) {
    let Ok(from) = from.parse::<NodeId>() else {
        return (
            ResponseStatus::Failed,
            format!("bad caller id {from:?}").into_bytes(),
        );
    };
    let Some(app) = registry.app() else {
        return (
            ResponseStatus::Failed,
            b"no application handler is set on this node".to_vec(),
        );
    };
    match app.handle(from, payload).await {
        Ok(reply) => (ResponseStatus::Ok, reply.to_vec()),
        Err(e) => (ResponseStatus::Failed, e.into_bytes()),
    }
}

/// Creates a group's per-target network clients over the shared [`Transport`].
pub(crate) struct GroupNetworkFactory {
    pub(crate) transport: Arc<Transport>,
    pub(crate) group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> GroupNetwork {
        GroupNetwork {
            transport: self.transport.clone(),
            group: self.group.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

pub(crate) struct GroupNetwork {
    transport: Arc<Transport>,
    group: GroupId,
    target: NodeId,
    addr: String,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, OpenraftError<NodeId, E>>>;

impl GroupNetwork {
    async fn rpc<Resp, E>(
        &self,
        action: RPCTypes,
        kind: RpcKind,
        encode_payload: impl FnOnce(&mut BytesMut) -> Result<(), codec::CodecError>,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let ttl = option.hard_ttl();
        let res = self
            .transport
            .call(
                self.target,
                &self.addr,
                kind,
                &self.group,
                encode_payload,
                ttl,
            )
            .await;
        let (status, payload) = match res {
            Ok(r) => r,
            Err(TransportError::Timeout) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.transport.node_id,
                    target: self.target,
                    timeout: ttl,
                }))
            }
            Err(e @ TransportError::Unreachable(..)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e @ TransportError::Other(_)) => {
                return Err(RPCError::Network(NetworkError::new(&e)))
            }
        };
        match status {
            ResponseStatus::Ok => {
                let r: Result<Resp, OpenraftError<NodeId, E>> = serde_json::from_slice(&payload)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            // The group is not (yet) open on the target: worth a back-off, not a hot retry.
            ResponseStatus::UnknownGroup => Err(RPCError::Unreachable(Unreachable::new(
                &AnyError::error(String::from_utf8_lossy(&payload)),
            ))),
            ResponseStatus::Failed => Err(RPCError::Network(NetworkError::new(&AnyError::error(
                String::from_utf8_lossy(&payload),
            )))),
        }
    }
}

impl RaftNetwork<TypeConfig> for GroupNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let mut body = BytesMut::new();
        codec::encode_append(&rpc, &mut body)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // Checked here rather than by the frame encoder so openraft can split the batch.
        if body.len() + 64 + self.group.len() > MAX_FRAME_BYTES {
            let hint = (rpc.entries.len() as u64 / 2).max(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.rpc(
            RPCTypes::AppendEntries,
            RpcKind::AppendEntries,
            |out| {
                out.extend_from_slice(&body);
                Ok(())
            },
            &option,
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.rpc(
            RPCTypes::InstallSnapshot,
            RpcKind::InstallSnapshot,
            |out| codec::encode_snapshot(&rpc, out),
            &option,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.rpc(
            RPCTypes::Vote,
            RpcKind::Vote,
            |out| {
                serde_json::to_writer(bytes::BufMut::writer(out), &rpc)?;
                Ok(())
            },
            &option,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn server() -> anyhow::Result<(String, watch::Sender<bool>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::new(Registry::default()), None, rx));
        Ok((addr, tx))
    }

    #[tokio::test]
    async fn unknown_group_gets_an_error_response_matched_by_request_id() -> anyhow::Result<()> {
        let (addr, _stop) = server().await?;
        let (_tx, rx) = watch::channel(false);
        let t = Transport::new(1, BTreeMap::new(), None, rx);
        let vote = VoteRequest::new(crate::Vote::new(1, 1), None);
        let (status, payload) = t
            .call(
                2,
                &addr,
                RpcKind::Vote,
                "p/nope/0",
                |out| Ok(serde_json::to_writer(bytes::BufMut::writer(out), &vote)?),
                Duration::from_secs(5),
            )
            .await?;
        assert_eq!(status, ResponseStatus::UnknownGroup);
        assert_eq!(&payload[..], b"no group p/nope/0");
        t.shutdown_peers();
        Ok(())
    }

    #[tokio::test]
    async fn oversized_frame_closes_the_connection_without_allocating() -> anyhow::Result<()> {
        let (addr, _stop) = server().await?;
        let mut s = TcpStream::connect(&addr).await?;
        s.write_all(&u32::MAX.to_be_bytes()).await?;
        let mut buf = [0u8; 16];
        // The server drops the connection: EOF (or a reset) rather than a response.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await?;
        assert!(matches!(n, Ok(0) | Err(_)), "got {n:?}");
        Ok(())
    }

    #[tokio::test]
    async fn unreachable_peer_fails_fast_after_the_first_attempt() -> anyhow::Result<()> {
        // A port that was just free: nothing listens on it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await?
            .local_addr()?
            .to_string();
        let (_tx, rx) = watch::channel(false);
        let t = Transport::new(1, BTreeMap::new(), None, rx);
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let res = t
                .call(
                    2,
                    &addr,
                    RpcKind::Vote,
                    "meta",
                    |_| Ok(()),
                    Duration::from_secs(5),
                )
                .await;
            assert!(
                matches!(res, Err(TransportError::Unreachable(2, _))),
                "got {res:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(2));
        }
        t.shutdown_peers();
        Ok(())
    }
}
