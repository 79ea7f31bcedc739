//! Response framing: a response becomes a list of chunks (size prefix and header, then the body),
//! written with vectored writes and a timeout on progress. A Fetch response's record data is not
//! copied into the frame: its chunks share the buffers the log was read into.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Duration;

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::Encodable;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Response;

/// Record sets smaller than this are copied: a separate chunk would cost more than the copy.
const SHARE_MIN: usize = 4096;

/// Encodes one response frame, size prefix included.
pub fn encode(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    resp: Response,
) -> Result<Vec<Bytes>, String> {
    let mut head = BytesMut::with_capacity(64);
    head.put_i32(0); // size, patched below
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut head, api_key.response_header_version(version))
        .map_err(|e| format!("encoding response header: {e}"))?;
    let mut body = match resp {
        Response::Kind(kind) => match *kind {
            ResponseKind::Fetch(f) => {
                let shared = f
                    .responses
                    .iter()
                    .flat_map(|t| t.partitions.iter())
                    .filter_map(|p| p.records.clone())
                    .filter(|r| r.len() >= SHARE_MIN)
                    .collect();
                let mut buf = ChunkedBuf::new(shared);
                f.encode(&mut buf, version)
                    .map_err(|e| format!("encoding Fetch v{version} response: {e}"))?;
                buf.finish()?
            }
            kind => {
                let mut b = BytesMut::new();
                kind.encode(&mut b, version)
                    .map_err(|e| format!("encoding {api_key:?} v{version} response: {e}"))?;
                vec![b.freeze()]
            }
        },
        Response::Raw(b) => vec![b],
        // What a held response holds must outlive the write, so the writer unwraps it first.
        Response::Held(..) => return Err("a held response reached the encoder".into()),
    };
    let len = head.len() - 4 + body.iter().map(Bytes::len).sum::<usize>();
    let size = i32::try_from(len).map_err(|_| format!("a {len}-byte {api_key:?} response"))?;
    head[0..4].copy_from_slice(&size.to_be_bytes());
    body.insert(0, head.freeze());
    body.retain(|c| !c.is_empty());
    Ok(body)
}

/// Writes every chunk. Each write must make progress within `stall`, or the connection is given
/// up: a client that stops reading would otherwise pin the response (and its fetch budget).
pub async fn write_all<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: Vec<Bytes>,
    stall: Duration,
) -> Result<(), String> {
    let mut buf = Chunks::new(chunks);
    while buf.has_remaining() {
        match tokio::time::timeout(stall, wr.write_buf(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "no progress writing a response for {} ms (sluice.socket.write.timeout.ms); \
                     the client is not reading",
                    stall.as_millis()
                ))
            }
            Ok(Err(e)) => return Err(format!("write failed: {e}")),
            Ok(Ok(0)) => return Err("write failed: the socket accepts nothing".into()),
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}

/// The chunks of one frame as a [`Buf`], so a write can hand several to the kernel at once.
struct Chunks {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Chunks {
    fn new(parts: Vec<Bytes>) -> Chunks {
        let parts: VecDeque<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let remaining = parts.iter().map(Bytes::len).sum();
        Chunks { parts, remaining }
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| b.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                self.remaining -= cnt;
                return;
            }
            cnt -= front.len();
            self.remaining -= front.len();
            self.parts.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(self.parts.iter()) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }
}

/// An encode target that keeps large record sets by reference. The encoder writes a record set
/// with one `put_slice` of the record `Bytes` it was given; a slice that lies inside one of the
/// `shared` buffers becomes a chunk of that buffer instead of a copy.
struct ChunkedBuf {
    done: Vec<Bytes>,
    done_len: usize,
    tail: BytesMut,
    shared: Vec<Bytes>,
    /// The encoder asked to rewrite bytes already handed off as a chunk (message encoding never
    /// does; record-batch building does): the frame cannot be built this way.
    broken: bool,
    scratch: Vec<u8>,
}

impl ChunkedBuf {
    fn new(shared: Vec<Bytes>) -> ChunkedBuf {
        ChunkedBuf {
            done: Vec::new(),
            done_len: 0,
            tail: BytesMut::with_capacity(1024),
            shared,
            broken: false,
            scratch: Vec::new(),
        }
    }

    fn shared_slice(&self, src: &[u8]) -> Option<Bytes> {
        if src.len() < SHARE_MIN {
            return None;
        }
        let (lo, hi) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
        self.shared.iter().find_map(|b| {
            let (blo, bhi) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
            (blo <= lo && hi <= bhi).then(|| b.slice_ref(src))
        })
    }

    fn flush_tail(&mut self) {
        if !self.tail.is_empty() {
            let t = self.tail.split().freeze();
            self.done_len += t.len();
            self.done.push(t);
        }
    }

    fn finish(mut self) -> Result<Vec<Bytes>, String> {
        if self.broken {
            return Err("the response encoder rewrote bytes already sent as a chunk".into());
        }
        self.flush_tail();
        Ok(self.done)
    }
}

// SAFETY: every method forwards to `tail`, a BytesMut, whose own implementation upholds the
// contract; `put_slice` only appends through safe calls.
unsafe impl BufMut for ChunkedBuf {
    fn remaining_mut(&self) -> usize {
        self.tail.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of `tail.chunk_mut()`, as the contract says.
        unsafe { self.tail.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.tail.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        match self.shared_slice(src) {
            Some(b) => {
                self.flush_tail();
                self.done_len += b.len();
                self.done.push(b);
            }
            None => self.tail.put_slice(src),
        }
    }
}

impl ByteBufMut for ChunkedBuf {
    fn offset(&self) -> usize {
        self.done_len + self.tail.len()
    }

    fn seek(&mut self, offset: usize) {
        match offset.checked_sub(self.done_len) {
            Some(at) => self.tail.resize(at, 0),
            None => self.broken = true,
        }
    }

    fn range(&mut self, r: std::ops::Range<usize>) -> &mut [u8] {
        let len = r.end.saturating_sub(r.start);
        match r.start.checked_sub(self.done_len) {
            Some(a) if a + len <= self.tail.len() => &mut self.tail[a..a + len],
            _ => {
                self.broken = true;
                self.scratch.resize(len, 0);
                &mut self.scratch[..]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{FetchResponse, TopicName};
    use kafka_protocol::protocol::StrBytes;

    fn fetch_response(records: &[Bytes]) -> FetchResponse {
        let parts = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                PartitionData::default()
                    .with_partition_index(i as i32)
                    .with_high_watermark(7)
                    .with_records(Some(r.clone()))
            })
            .collect();
        FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("t")))
            .with_partitions(parts)])
    }

    #[test]
    fn fetch_frames_share_large_record_sets_and_match_the_plain_encoding() {
        let big = Bytes::from(vec![7u8; 100_000]);
        let small = Bytes::from_static(b"tiny records");
        for version in [4, 11, 12] {
            let resp = fetch_response(&[big.clone(), small.clone(), big.slice(10..50_000)]);
            let mut plain = BytesMut::new();
            resp.encode(&mut plain, version).unwrap();
            let chunks = encode(
                42,
                ApiKey::Fetch,
                version,
                Response::Kind(Box::new(ResponseKind::Fetch(resp))),
            )
            .unwrap();
            let frame: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            let size = i32::from_be_bytes(frame[0..4].try_into().unwrap()) as usize;
            assert_eq!(size, frame.len() - 4, "v{version}");
            let header_len = if version >= 12 { 5 } else { 4 };
            assert_eq!(&frame[4..8], &42i32.to_be_bytes());
            assert_eq!(&frame[4 + header_len..], &plain[..], "v{version}");
            // Both large record sets went out by reference, not copied.
            let shared = chunks
                .iter()
                .filter(|c| {
                    let p = c.as_ptr() as usize;
                    p >= big.as_ptr() as usize && p < big.as_ptr() as usize + big.len()
                })
                .count();
            assert_eq!(shared, 2, "v{version}");
        }
    }

    #[tokio::test]
    async fn chunks_are_written_in_order_through_partial_writes() {
        let chunks = vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from(vec![1u8; 70_000]),
            Bytes::from_static(b"z"),
        ];
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        // A small pipe forces many partial writes; the reader drains it concurrently.
        let (mut w, mut r) = tokio::io::duplex(1000);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got)
                .await
                .map(|_| got)
        });
        write_all(&mut w, chunks, Duration::from_secs(30))
            .await
            .unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap().unwrap(), want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_the_write() {
        let (mut w, _r) = tokio::io::duplex(1000);
        let err = write_all(
            &mut w,
            vec![Bytes::from(vec![0u8; 5000])],
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(err.contains("sluice.socket.write.timeout.ms"), "{err}");
    }
}
