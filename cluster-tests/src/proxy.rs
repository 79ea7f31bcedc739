//! A userspace TCP proxy whose behaviour the harness changes at run time.
//!
//! Every node-to-node link and every client-to-node link goes through one of these. Each
//! direction of a link is either passing, blocked, or delayed:
//!
//! * **blocked** ("drop" / "blackhole") means the proxy still accepts connections but moves no
//!   bytes in that direction. It stops *reading*, so data queues in kernel buffers and the sender
//!   eventually blocks — what a real partition looks like to TCP, which retransmits rather than
//!   losing bytes. When the block lifts, queued bytes flow again in order; nothing is ever
//!   discarded, so a stream is never corrupted mid-frame.
//! * **delayed** holds each chunk until `delay` after it was read, keeping order.
//!
//! A one-way cut is a link with one direction blocked.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// What one direction of a link does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flow {
    #[default]
    Pass,
    Block,
    Delay(Duration),
}

/// Both directions of a link. `fwd` is connector -> listener target (requests), `back` the
/// answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkMode {
    pub fwd: Flow,
    pub back: Flow,
}

impl LinkMode {
    pub const PASS: LinkMode = LinkMode {
        fwd: Flow::Pass,
        back: Flow::Pass,
    };
    pub const DROP: LinkMode = LinkMode {
        fwd: Flow::Block,
        back: Flow::Block,
    };
    pub fn delay(d: Duration) -> LinkMode {
        LinkMode {
            fwd: Flow::Delay(d),
            back: Flow::Delay(d),
        }
    }
}

/// Bytes read in one go; also bounds what a delayed direction holds per chunk.
const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks queued between a direction's reader and writer; when full the reader stops reading.
const QUEUED_CHUNKS: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Proxy {
    pub name: String,
    pub listen: SocketAddr,
    pub target: SocketAddr,
    mode: watch::Sender<LinkMode>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Binds `127.0.0.1:0` and forwards to `target`.
    pub async fn start(name: &str, target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding proxy listener")?;
        let listen = listener.local_addr()?;
        let (mode, _) = watch::channel(LinkMode::PASS);
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            mode.clone(),
            tasks.clone(),
            name.to_string(),
        ))
        .abort_handle();
        Ok(Proxy {
            name: name.to_string(),
            listen,
            target,
            mode,
            tasks,
            accept,
        })
    }

    pub fn set(&self, m: LinkMode) {
        self.mode.send_replace(m);
    }

    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }

    /// Closes every open connection through this proxy (the listener stays).
    pub fn reset_connections(&self) {
        let mut t = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for h in t.drain(..) {
            h.abort();
        }
    }

    /// Number of connection tasks still running (two per open connection).
    pub fn open_tasks(&self) -> usize {
        let mut t = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|h| !h.is_finished());
        t.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_connections();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Sender<LinkMode>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    name: String,
) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(proxy = %name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
        {
            Ok(Ok(s)) => s,
            _ => {
                // Target down (killed node): close the client side, as a refused connect.
                drop(client);
                continue;
            }
        };
        client.set_nodelay(true).ok();
        upstream.set_nodelay(true).ok();
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let fwd = spawn_direction(cr, uw, mode.subscribe(), true);
        let back = spawn_direction(ur, cw, mode.subscribe(), false);
        let mut t = tasks.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|h| !h.is_finished());
        t.extend(fwd);
        t.extend(back);
    }
}

fn flow_of(m: &LinkMode, fwd: bool) -> Flow {
    if fwd {
        m.fwd
    } else {
        m.back
    }
}

/// One direction: a reader task feeding a writer task. Returns both abort handles.
fn spawn_direction(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<LinkMode>,
    fwd: bool,
) -> [AbortHandle; 2] {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let mut rmode = mode.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            // While blocked, do not read: the peer's bytes wait in the kernel as in a partition.
            while flow_of(&rmode.borrow(), fwd) == Flow::Block {
                if rmode.changed().await.is_err() {
                    return;
                }
            }
            let n = tokio::select! {
                n = r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                // Re-check the mode if it changes while waiting for data.
                c = rmode.changed() => { if c.is_err() { return; } continue; }
            };
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    })
    .abort_handle();
    let mut wmode = mode;
    let writer = tokio::spawn(async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            loop {
                let flow = flow_of(&wmode.borrow(), fwd);
                match flow {
                    Flow::Pass => break,
                    Flow::Block => {
                        if wmode.changed().await.is_err() {
                            return;
                        }
                    }
                    Flow::Delay(d) => {
                        let due = read_at + d;
                        if Instant::now() >= due {
                            break;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => break,
                            c = wmode.changed() => if c.is_err() { return; },
                        }
                    }
                }
            }
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Reader saw EOF: pass the half-close on.
        let _ = w.shutdown().await;
    })
    .abort_handle();
    [reader, writer]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Exactly `n` bytes, within 2 s (panics otherwise: this is a test).
    async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        got
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(wait, s.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(got)
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() {
        let echo = echo_server().await;
        let p = Proxy::start("t", echo).await.unwrap();
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        let got = roundtrip(&mut s, b"hello", Duration::from_secs(2)).await;
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    }

    #[tokio::test]
    async fn drop_holds_connections_and_heal_delivers_in_order() {
        let echo = echo_server().await;
        let p = Proxy::start("t", echo).await.unwrap();
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        assert!(roundtrip(&mut s, b"a", Duration::from_secs(2))
            .await
            .is_some());
        p.set(LinkMode::DROP);
        // Existing connection: nothing comes back while dropped.
        assert!(roundtrip(&mut s, b"bc", Duration::from_millis(300))
            .await
            .is_none());
        // New connections are accepted but also silent.
        let mut s2 = TcpStream::connect(p.listen).await.unwrap();
        assert!(roundtrip(&mut s2, b"x", Duration::from_millis(300))
            .await
            .is_none());
        p.set(LinkMode::PASS);
        // The held bytes arrive after the heal, none lost, none reordered.
        assert_eq!(read_n(&mut s, 2).await, b"bc");
        assert_eq!(read_n(&mut s2, 1).await, b"x");
    }

    #[tokio::test]
    async fn one_way_cut_blocks_only_answers() {
        let echo = echo_server().await;
        let p = Proxy::start("t", echo).await.unwrap();
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        p.set(LinkMode {
            fwd: Flow::Pass,
            back: Flow::Block,
        });
        assert!(roundtrip(&mut s, b"q", Duration::from_millis(300))
            .await
            .is_none());
        p.set(LinkMode::PASS);
        assert_eq!(read_n(&mut s, 1).await, b"q");
    }

    #[tokio::test]
    async fn delay_adds_latency() {
        let echo = echo_server().await;
        let p = Proxy::start("t", echo).await.unwrap();
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        p.set(LinkMode::delay(Duration::from_millis(150)));
        let t0 = std::time::Instant::now();
        let got = roundtrip(&mut s, b"slow", Duration::from_secs(3)).await;
        assert_eq!(got.as_deref(), Some(&b"slow"[..]));
        // Both directions delayed.
        assert!(
            t0.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn dead_target_closes_client_and_reset_closes_open_ones() {
        // A port with nothing listening.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let p = Proxy::start("t", dead).await.unwrap();
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));

        let echo = echo_server().await;
        let p = Proxy::start("t", echo).await.unwrap();
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        assert!(roundtrip(&mut s, b"a", Duration::from_secs(2))
            .await
            .is_some());
        assert!(p.open_tasks() > 0);
        p.reset_connections();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }
}
