//! One connection to one broker: TLS and SASL as the process's `--command-config` says (see
//! `security`), framing, correlation ids, API version negotiation and request pipelining.
//!
//! Kafka answers requests on a connection strictly in the order they were
//! sent, so pipelining needs no demultiplexer: we remember what we sent in a
//! FIFO and match each response against its head.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
    SaslAuthenticateRequest, SaslHandshakeRequest,
};
use kafka_protocol::protocol::{
    encode_request_header_into_buffer, Decodable, Request, StrBytes, VersionRange,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::errors;
use super::security::{self, ClientSecurity};
use crate::errors::ErrorCode;
use crate::scram::{plain_message, ClientScram, Mechanism};

/// A plaintext socket or a TLS stream over one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Largest frame we accept. Checked before allocating so that a corrupt or
/// hostile size prefix cannot make us reserve gigabytes.
pub const MAX_FRAME_SIZE: usize = 100 * 1024 * 1024;

const CLIENT_ID: &str = "sluice-cli";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on waiting for any single response; requests that carry their
/// own broker-side timeout add it on top (see [`BrokerConn::recv`]).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(40);

/// Highest version of each API this client has been written against.
/// Anything above `ApiKey::valid_versions()` is impossible anyway; this only
/// matters if a future kafka-protocol grows versions with new semantics.
fn client_cap(key: ApiKey) -> i16 {
    key.valid_versions().max
}

/// The version range this client can speak for `key`.
pub fn our_versions(key: ApiKey) -> VersionRange {
    let v = key.valid_versions();
    VersionRange {
        min: v.min,
        max: v.max.min(client_cap(key)),
    }
}

/// Picks the highest version both sides support, if any.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Option<i16> {
    let both = ours.intersect(&theirs);
    if both.is_empty() {
        None
    } else {
        Some(both.max)
    }
}

/// Reads one length-prefixed frame, refusing sizes above `limit` before
/// allocating anything.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<Bytes> {
    let size = r.read_i32().await.context("reading frame size")?;
    let size = usize::try_from(size).map_err(|_| anyhow!("negative frame size {size}"))?;
    if size > limit {
        bail!("frame of {size} bytes exceeds the {limit}-byte limit");
    }
    let mut buf = BytesMut::zeroed(size);
    r.read_exact(&mut buf).await.context("reading frame body")?;
    Ok(buf.freeze())
}

struct Pending {
    correlation_id: i32,
    api_key: i16,
    version: i16,
}

/// A connection to a single broker, after the ApiVersions handshake.
pub struct BrokerConn {
    pub addr: String,
    stream: Box<dyn Io>,
    next_correlation_id: i32,
    pending: VecDeque<Pending>,
    /// The broker's advertised range per API key.
    broker_versions: HashMap<i16, VersionRange>,
}

impl BrokerConn {
    /// Connects to `addr` and negotiates API versions.
    pub async fn connect(addr: &str) -> Result<Self> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("timed out connecting to broker at {addr}"))?
            .with_context(|| format!("cannot connect to broker at {addr}"))?;
        // Requests are written whole, so Nagle only adds latency.
        stream.set_nodelay(true).ok();
        let sec = security::for_addr(addr);
        let stream: Box<dyn Io> = if sec.protocol.uses_tls() {
            let connector = tokio_rustls::TlsConnector::from(sec.tls_config()?);
            let tls = tokio::time::timeout(
                CONNECT_TIMEOUT,
                connector.connect(security::server_name(addr)?, stream),
            )
            .await
            .map_err(|_| anyhow!("TLS handshake with {addr} timed out"))?
            .with_context(|| format!("TLS handshake with {addr} failed"))?;
            Box::new(tls)
        } else {
            Box::new(stream)
        };
        let mut conn = BrokerConn {
            addr: addr.to_string(),
            stream,
            next_correlation_id: 0,
            pending: VecDeque::new(),
            broker_versions: HashMap::new(),
        };
        conn.handshake()
            .await
            .with_context(|| format!("ApiVersions handshake with {addr} failed"))?;
        if sec.protocol.uses_sasl() {
            tokio::time::timeout(RESPONSE_TIMEOUT, conn.authenticate(&sec))
                .await
                .map_err(|_| anyhow!("SASL authentication with {addr} timed out"))?
                .with_context(|| format!("SASL authentication with {addr} failed"))?;
        }
        Ok(conn)
    }

    /// SaslHandshake, then SaslAuthenticate rounds: one for PLAIN, two for SCRAM (whose
    /// server-final message proves the broker knows our credential too).
    pub(crate) async fn authenticate(&mut self, sec: &ClientSecurity) -> Result<()> {
        let user = sec.sasl_username.as_deref().unwrap_or_default();
        let password = sec.sasl_password.as_deref().unwrap_or_default();
        let mech = sec.sasl_mechanism.as_str();
        let v = self.version_for(ApiKey::SaslHandshake)?;
        let hs = self
            .call(
                &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_string(mech.into())),
                v,
            )
            .await?;
        if hs.error_code != 0 {
            let offered: Vec<&str> = hs.mechanisms.iter().map(|m| m.as_str()).collect();
            errors::check(
                hs.error_code,
                "SaslHandshake",
                Some(&format!(
                    "{mech} asked, broker offers {}",
                    offered.join(", ")
                )),
            )?;
        }
        let v = self.version_for(ApiKey::SaslAuthenticate)?;
        let round =
            |bytes: Vec<u8>| SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(bytes));
        let check = |code: i16, msg: Option<&StrBytes>| {
            errors::check(code, "SaslAuthenticate", msg.map(|m| m.as_str()))
        };
        if mech == "PLAIN" {
            let r = self.call(&round(plain_message(user, password)), v).await?;
            check(r.error_code, r.error_message.as_ref())?;
            return Ok(());
        }
        let mut scram = ClientScram::new(Mechanism::from_name(mech)?, user, password);
        let r = self.call(&round(scram.client_first()), v).await?;
        check(r.error_code, r.error_message.as_ref())?;
        let fin = scram.client_final(&r.auth_bytes)?;
        let r = self.call(&round(fin), v).await?;
        check(r.error_code, r.error_message.as_ref())?;
        scram.verify_server_final(&r.auth_bytes)?;
        Ok(())
    }

    /// ApiVersions: ask at our highest version; a broker that does not know it
    /// answers UNSUPPORTED_VERSION with a v0 body listing its own range, and
    /// we retry at the best common version.
    async fn handshake(&mut self) -> Result<()> {
        let ours = our_versions(ApiKey::ApiVersions);
        let mut version = ours.max;
        for _ in 0..2 {
            let mut req = ApiVersionsRequest::default();
            req.client_software_name = StrBytes::from_static_str("sluice-cli");
            req.client_software_version = StrBytes::from_static_str(env!("CARGO_PKG_VERSION"));
            self.send(&req, version, true).await?;
            let body = self.recv_raw(ApiKey::ApiVersions as i16).await?;
            // error_code is the first field in every version, so it can be
            // read before knowing how the rest is laid out.
            let code = body
                .first_chunk::<2>()
                .map(|b| i16::from_be_bytes(*b))
                .ok_or_else(|| anyhow!("empty ApiVersions response"))?;
            if code == ErrorCode::UnsupportedVersion.code() {
                let mut b = body.clone();
                let resp = ApiVersionsResponse::decode(&mut b, 0)
                    .context("decoding ApiVersions v0 fallback response")?;
                let theirs = resp
                    .api_keys
                    .iter()
                    .find(|k| k.api_key == ApiKey::ApiVersions as i16)
                    .map(|k| VersionRange {
                        min: k.min_version,
                        max: k.max_version,
                    })
                    .ok_or_else(|| anyhow!("broker did not list ApiVersions"))?;
                version = negotiate(ours, theirs)
                    .ok_or_else(|| anyhow!("no common ApiVersions version (broker {theirs})"))?;
                tracing::debug!(addr = %self.addr, version, "retrying ApiVersions");
                continue;
            }
            let mut b = body;
            let resp = ApiVersionsResponse::decode(&mut b, version)
                .context("decoding ApiVersions response")?;
            errors::check(resp.error_code, "ApiVersions", None)?;
            self.broker_versions = resp
                .api_keys
                .iter()
                .map(|k| {
                    (
                        k.api_key,
                        VersionRange {
                            min: k.min_version,
                            max: k.max_version,
                        },
                    )
                })
                .collect();
            tracing::debug!(addr = %self.addr, apis = self.broker_versions.len(), "connected");
            return Ok(());
        }
        bail!("broker kept rejecting ApiVersions")
    }

    /// Speaks as an older client would: at most `max` for `key` (tests drive the broker's older
    /// versions through the CLI's own encoders this way).
    #[cfg(test)]
    pub fn cap_version(&mut self, key: ApiKey, max: i16) {
        if let Some(v) = self.broker_versions.get_mut(&(key as i16)) {
            v.max = v.max.min(max);
        }
    }

    /// Whether the broker implements `key` at a version we speak.
    pub fn supports(&self, key: ApiKey) -> bool {
        self.version_for(key).is_ok()
    }

    /// The version to use for `key` with this broker.
    pub fn version_for(&self, key: ApiKey) -> Result<i16> {
        let ours = our_versions(key);
        let theirs = self
            .broker_versions
            .get(&(key as i16))
            .ok_or_else(|| anyhow!("broker at {} does not support {key:?}", self.addr))?;
        negotiate(ours, *theirs).ok_or_else(|| {
            anyhow!(
                "broker at {} supports {key:?} versions {theirs}, this client {ours}",
                self.addr
            )
        })
    }

    /// Like [`Self::version_for`], but never above `cap`. Used to stay below
    /// topic-id-only versions (Produce/Fetch v13+) when the broker did not
    /// tell us the topic's id.
    pub fn version_for_max(&self, key: ApiKey, cap: i16) -> Result<i16> {
        let v = self.version_for(key)?;
        if v <= cap {
            return Ok(v);
        }
        let ours = VersionRange {
            min: our_versions(key).min,
            max: cap,
        };
        let theirs = self
            .broker_versions
            .get(&(key as i16))
            .copied()
            .unwrap_or(VersionRange { min: 0, max: -1 });
        negotiate(ours, theirs).ok_or_else(|| {
            anyhow!(
                "broker at {} needs {key:?} v{} or later, which requires topic ids it did not provide",
                self.addr,
                theirs.min
            )
        })
    }

    /// Takes the handshaken (and authenticated) connection apart so that one task can write
    /// requests while another reads responses: the benchmark keeps many requests in flight
    /// without a request ever waiting for a response to be read. Nothing may be in flight.
    pub fn into_split(self) -> Result<SplitConn> {
        if !self.pending.is_empty() {
            bail!("internal error: splitting a connection with requests in flight");
        }
        let (reader, writer) = tokio::io::split(self.stream);
        Ok(SplitConn {
            addr: self.addr,
            reader,
            writer,
            next_correlation_id: self.next_correlation_id,
            broker_versions: self.broker_versions,
        })
    }

    /// Number of requests sent whose responses have not been read yet.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Encodes and writes one request. `expect_response` is false only for
    /// Produce with acks=0, to which brokers never reply.
    pub async fn send<R: Request>(
        &mut self,
        req: &R,
        version: i16,
        expect_response: bool,
    ) -> Result<()> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let frame = encode_request(req, version, correlation_id)?;
        self.stream
            .write_all(&frame)
            .await
            .with_context(|| format!("writing to broker at {}", self.addr))?;
        // TLS holds records until flushed; a no-op on a plain socket.
        self.stream
            .flush()
            .await
            .with_context(|| format!("writing to broker at {}", self.addr))?;
        if expect_response {
            self.pending.push_back(Pending {
                correlation_id,
                api_key: R::KEY,
                version,
            });
        }
        Ok(())
    }

    /// Reads the response to the oldest outstanding request, which must be an
    /// `R`. `extra_wait` is how long the broker may legitimately hold it
    /// (e.g. a fetch's max_wait_ms).
    pub async fn recv<R: Request>(&mut self, extra_wait: Duration) -> Result<R::Response> {
        let version = self
            .pending
            .front()
            .map(|p| p.version)
            .ok_or_else(|| anyhow!("no request outstanding"))?;
        let mut body = tokio::time::timeout(RESPONSE_TIMEOUT + extra_wait, self.recv_raw(R::KEY))
            .await
            .map_err(|_| anyhow!("timed out waiting for broker at {}", self.addr))??;
        R::Response::decode(&mut body, version).with_context(|| {
            format!(
                "decoding response to api key {} v{version} from {}",
                R::KEY,
                self.addr
            )
        })
    }

    /// Sends a request and waits for its response. Only valid with nothing
    /// else in flight on this connection of a different type.
    pub async fn call<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response> {
        self.send(req, version, true).await?;
        self.recv::<R>(Duration::ZERO).await
    }

    /// Reads the next frame, checks it answers the oldest pending request and
    /// returns the body after the response header.
    async fn recv_raw(&mut self, api_key: i16) -> Result<Bytes> {
        let pending = self
            .pending
            .pop_front()
            .ok_or_else(|| anyhow!("no request outstanding"))?;
        if pending.api_key != api_key {
            bail!(
                "internal error: expected response to api {}, oldest request is api {}",
                api_key,
                pending.api_key
            );
        }
        let mut frame = read_frame(&mut self.stream, MAX_FRAME_SIZE)
            .await
            .with_context(|| format!("reading response from broker at {}", self.addr))?;
        let key = ApiKey::try_from(api_key).map_err(|_| anyhow!("unknown api key {api_key}"))?;
        let header_version = key.response_header_version(pending.version);
        let header = ResponseHeader::decode(&mut frame, header_version)
            .context("decoding response header")?;
        if header.correlation_id != pending.correlation_id {
            bail!(
                "broker at {} answered correlation id {} but {} was expected",
                self.addr,
                header.correlation_id,
                pending.correlation_id
            );
        }
        Ok(frame)
    }
}

/// A connection after [`BrokerConn::into_split`]: correlation ids and response matching are
/// the caller's (Kafka answers in request order, so a FIFO of what was sent suffices).
pub struct SplitConn {
    pub addr: String,
    pub reader: tokio::io::ReadHalf<Box<dyn Io>>,
    pub writer: tokio::io::WriteHalf<Box<dyn Io>>,
    pub next_correlation_id: i32,
    broker_versions: HashMap<i16, VersionRange>,
}

impl SplitConn {
    /// The version to use for `key`, never above `cap` (see [`BrokerConn::version_for_max`]).
    pub fn version_for_max(&self, key: ApiKey, cap: i16) -> Result<i16> {
        let theirs = self
            .broker_versions
            .get(&(key as i16))
            .copied()
            .ok_or_else(|| anyhow!("broker at {} does not support {key:?}", self.addr))?;
        let ours = our_versions(key);
        let ours = VersionRange {
            min: ours.min,
            max: ours.max.min(cap),
        };
        negotiate(ours, theirs).ok_or_else(|| {
            anyhow!(
                "broker at {} supports {key:?} versions {theirs}, this client {ours}",
                self.addr
            )
        })
    }
}

/// Reads one response frame and checks its header against what was sent.
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
) -> Result<Bytes> {
    let mut frame = read_frame(r, MAX_FRAME_SIZE).await?;
    let header = ResponseHeader::decode(&mut frame, key.response_header_version(version))
        .context("decoding response header")?;
    if header.correlation_id != correlation_id {
        bail!(
            "broker answered correlation id {} but {correlation_id} was expected",
            header.correlation_id
        );
    }
    Ok(frame)
}

/// Builds a complete request frame: size prefix, header, body.
pub fn encode_request<R: Request>(req: &R, version: i16, correlation_id: i32) -> Result<Bytes> {
    let mut header = RequestHeader::default();
    header.request_api_key = R::KEY;
    header.request_api_version = version;
    header.correlation_id = correlation_id;
    header.client_id = Some(StrBytes::from_static_str(CLIENT_ID));
    let mut buf = BytesMut::with_capacity(64 + req.compute_size(version)?);
    buf.put_i32(0); // size placeholder, patched below
    encode_request_header_into_buffer(&mut buf, &header)?;
    req.encode(&mut buf, version)?;
    let size = i32::try_from(buf.len() - 4).context("request too large")?;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf.freeze())
}

/// Splits a frame produced by [`encode_request`] back into header and
/// request; used by tests and the fake broker.
#[cfg(test)]
pub fn decode_request<R: Request>(mut frame: Bytes) -> Result<(RequestHeader, R)> {
    let size = bytes::Buf::get_i32(&mut frame);
    if usize::try_from(size).ok() != Some(frame.len()) {
        bail!(
            "size prefix {size} does not match frame length {}",
            frame.len()
        );
    }
    let header = kafka_protocol::protocol::decode_request_header_from_buffer(&mut frame)?;
    let req = R::decode(&mut frame, header.request_api_version)?;
    Ok((header, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vr(min: i16, max: i16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn negotiation_picks_highest_common() {
        assert_eq!(negotiate(vr(3, 13), vr(0, 9)), Some(9));
        assert_eq!(negotiate(vr(3, 13), vr(3, 20)), Some(13));
        assert_eq!(negotiate(vr(4, 18), vr(0, 3)), None);
        assert_eq!(negotiate(vr(0, 4), vr(4, 4)), Some(4));
        // Our side is whatever kafka-protocol implements.
        assert_eq!(
            our_versions(ApiKey::Produce),
            ApiKey::Produce.valid_versions()
        );
    }

    #[tokio::test]
    async fn frame_limit_checked_before_allocation() {
        // A 2 GiB size prefix with no body must be refused, not allocated.
        let data: &[u8] = &[0x7f, 0xff, 0xff, 0xff];
        let mut r = data;
        let err = read_frame(&mut r, MAX_FRAME_SIZE).await.unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        let data: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let mut r = data;
        assert!(read_frame(&mut r, MAX_FRAME_SIZE).await.is_err());
        let data: &[u8] = &[0, 0, 0, 3, 1, 2, 3];
        let mut r = data;
        assert_eq!(&read_frame(&mut r, 10).await.unwrap()[..], &[1, 2, 3]);
    }
}
