//! Record-level checks on v2 record batches, for what the batch header alone cannot prove: that
//! the record count and offset deltas the header claims match the records in the body, that every
//! record parses, and which record a timestamp lookup lands on.
//!
//! Compressed bodies are decompressed on the produce path (the leader only; the stored bytes stay
//! exactly as received, and followers and fetches never decompress) and walked with the same
//! record parser as uncompressed ones. A batch's decompressed size is capped at
//! [`DECOMPRESSED_CAP_FACTOR`] × `max.message.bytes`, checked while decompressing, so a
//! decompression bomb costs at most the cap in CPU. Memory mostly stays small whatever the cap:
//! gzip, LZ4 and zstd are decompressed into a reused 64 KiB window that the record walk reads as
//! it goes (LZ4 adds one block of at most 4 MiB; libzstd its frame's window, of which it writes
//! no more than the bytes produced, so at most the cap). Snappy's raw format has no streaming
//! decoder, so its output is held whole, but snappy cannot expand more than about 21× (its
//! densest copy op is 3 bytes for 64) and a block's declared size is checked before allocation.
//!
//! Codecs and crates:
//! - gzip (1): `flate2` on its `zlib-rs` backend (a pure-Rust zlib; in `benches/validate.rs` it
//!   inflated 1 MiB batches about 40 % faster than flate2's default `miniz_oxide`). Concatenated
//!   gzip members are read, as Java's `GZIPInputStream` does.
//! - snappy (2): `snap` (pure Rust) for raw snappy blocks. The Java client and kafka-python write
//!   snappy-java's xerial framing (`\x82SNAPPY\0`, two version words, then length-prefixed raw
//!   blocks), librdkafka writes one raw block. `snap` reads raw blocks and the official snappy
//!   framing, not xerial, so xerial blocks are walked here; both forms are accepted, as
//!   snappy-java's reader (and so Kafka) accepts both.
//! - LZ4 (3): `lz4_flex`'s frame decoder (pure Rust, bounds-checked decoding). Kafka's reader
//!   refuses frames with dependent blocks, so Java consumers could not read them: refused here too.
//! - zstd (4): the `zstd` crate, bindings to the reference libzstd. It is already linked into the
//!   binary through `kafka-protocol`, so it adds no code, and it is fuzzed continuously upstream;
//!   the pure-Rust `ruzstd` decoder is younger and, by its own account, slower.
//!
//! Codec ids 5–7 do not exist and are refused.

use std::cell::RefCell;
use std::io::Read;
use std::ops::ControlFlow;

use sluice_storage::batch::{BatchHeader, BATCH_HEADER_LEN};

const COMPRESSION_MASK: i16 = 0x07;

/// The decompressed size of one batch may be at most this many times `max.message.bytes` (the
/// topic's, else the broker's `message.max.bytes`). Generous on purpose: the Java producer sizes
/// batches by their estimated compressed size, so very repetitive data can legitimately expand
/// tens of times; Kafka itself has no cap. What the cap bounds is the CPU a lying batch costs.
pub const DECOMPRESSED_CAP_FACTOR: usize = 64;

/// The decompressed-size cap for batches limited to `max_message_bytes`.
pub fn decompressed_cap(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(DECOMPRESSED_CAP_FACTOR)
}

/// Decompressed bytes handed to the record walk per decoder call.
const WINDOW: usize = 64 * 1024;
/// A snappy output buffer larger than this is freed after use rather than kept for the next batch.
const SNAPPY_RETAIN: usize = 4 * 1024 * 1024;
/// A zstd context that decoded more than this, or failed, is dropped rather than reused.
const ZSTD_RETAIN: u64 = 4 * 1024 * 1024;

const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\0";
const LZ4_FRAME_MAGIC: [u8; 4] = 0x184D_2204u32.to_le_bytes();

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("control batches cannot be produced")]
    Control,
    #[error("bad record counts: {0}")]
    Counts(String),
    #[error("unknown compression codec {0}")]
    UnknownCodec(i16),
    #[error("{codec} payload does not decompress: {reason}")]
    Decompress { codec: &'static str, reason: String },
    #[error("{codec} payload decompresses to more than {cap} bytes ({DECOMPRESSED_CAP_FACTOR} x max.message.bytes)")]
    TooLarge { codec: &'static str, cap: usize },
    #[error("record {index}: {reason}")]
    Record { index: usize, reason: String },
    #[error("header claims {claimed} records, body holds {found}")]
    CountMismatch { claimed: i32, found: String },
    /// A record-level defect before the walk knows which record it is in.
    #[error("{0}")]
    Malformed(String),
}

fn codec_name(codec: i16) -> &'static str {
    match codec {
        1 => "gzip",
        2 => "snappy",
        3 => "lz4",
        4 => "zstd",
        _ => "none",
    }
}

/// Where the record walk reads from: a slice (uncompressed bodies, snappy output) or a decoder.
trait Source {
    /// Bytes consumed so far.
    fn pos(&self) -> u64;
    /// Bytes left, when known up front.
    fn remaining(&self) -> Option<u64>;
    fn byte(&mut self) -> Result<u8, RecordError>;
    fn skip(&mut self, n: u64) -> Result<(), RecordError>;
    fn at_end(&mut self) -> Result<bool, RecordError>;
}

fn truncated() -> RecordError {
    RecordError::Malformed("body ends inside a record".into())
}

struct SliceSource<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Source for SliceSource<'_> {
    fn pos(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> Option<u64> {
        Some((self.buf.len() - self.pos) as u64)
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, RecordError> {
        let b = *self.buf.get(self.pos).ok_or_else(truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> Result<(), RecordError> {
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(truncated());
        }
        self.pos += n as usize;
        Ok(())
    }

    fn at_end(&mut self) -> Result<bool, RecordError> {
        Ok(self.pos >= self.buf.len())
    }
}

/// Reads a decoder through a fixed window, counting every decompressed byte against the cap.
struct ReadSource<'w, R> {
    inner: R,
    window: &'w mut [u8],
    start: usize,
    end: usize,
    produced: u64,
    cap: u64,
    codec: &'static str,
}

impl<'w, R: Read> ReadSource<'w, R> {
    fn new(inner: R, window: &'w mut [u8], cap: usize, codec: &'static str) -> Self {
        ReadSource {
            inner,
            window,
            start: 0,
            end: 0,
            produced: 0,
            cap: cap as u64,
            codec,
        }
    }

    /// Refills an empty window; false at the end of the decompressed stream.
    fn fill(&mut self) -> Result<bool, RecordError> {
        // One byte past the cap is enough to know it was passed, so never ask for more.
        let want = (self.cap + 1 - self.produced).min(self.window.len() as u64) as usize;
        let n = self
            .inner
            .read(&mut self.window[..want])
            .map_err(|e| RecordError::Decompress {
                codec: self.codec,
                reason: e.to_string(),
            })?;
        self.produced += n as u64;
        if self.produced > self.cap {
            return Err(RecordError::TooLarge {
                codec: self.codec,
                cap: self.cap as usize,
            });
        }
        self.start = 0;
        self.end = n;
        Ok(n > 0)
    }
}

impl<R: Read> Source for ReadSource<'_, R> {
    fn pos(&self) -> u64 {
        self.produced - (self.end - self.start) as u64
    }

    fn remaining(&self) -> Option<u64> {
        None
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, RecordError> {
        if self.start == self.end && !self.fill()? {
            return Err(truncated());
        }
        let b = self.window[self.start];
        self.start += 1;
        Ok(b)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), RecordError> {
        // Each pass consumes at least one byte of a stream the cap bounds.
        while n > 0 {
            if self.start == self.end && !self.fill()? {
                return Err(truncated());
            }
            let take = n.min((self.end - self.start) as u64);
            self.start += take as usize;
            n -= take;
        }
        Ok(())
    }

    fn at_end(&mut self) -> Result<bool, RecordError> {
        // Reading to the decoder's end also makes it check its trailer (gzip CRC, zstd frame end).
        Ok(self.start == self.end && !self.fill()?)
    }
}

/// Zigzag varint of at most `max_bytes` bytes (5 for Kafka's varint, 10 for its varlong).
#[inline]
fn zigzag<S: Source>(s: &mut S, max_bytes: u32) -> Result<i64, RecordError> {
    let mut raw: u64 = 0;
    for i in 0..max_bytes {
        let b = s.byte()?;
        raw |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    Err(RecordError::Malformed(format!(
        "varint longer than {max_bytes} bytes"
    )))
}

fn varint<S: Source>(s: &mut S) -> Result<i32, RecordError> {
    // Five 7-bit groups hold a zigzagged i32; anything wider is not a Kafka varint.
    let v = zigzag(s, 5)?;
    i32::try_from(v).map_err(|_| RecordError::Malformed(format!("varint {v} overflows an int")))
}

fn malformed(reason: String) -> RecordError {
    RecordError::Malformed(reason)
}

/// Skips a length-prefixed field that must lie inside the record ending at `end`.
fn skip_field<S: Source>(
    s: &mut S,
    what: &str,
    end: u64,
    nullable: bool,
) -> Result<(), RecordError> {
    let n = varint(s)?;
    if n < 0 {
        if nullable && n == -1 {
            return Ok(());
        }
        return Err(malformed(format!("{what} length {n}")));
    }
    if s.pos() + n as u64 > end {
        return Err(malformed(format!(
            "{what} of {n} bytes runs past the record"
        )));
    }
    s.skip(n as u64)
}

/// Parses one whole record (Kafka's DefaultRecord): (offset delta, timestamp delta).
fn record<S: Source>(s: &mut S) -> Result<(i32, i64), RecordError> {
    let len = varint(s)?;
    if len < 0 {
        return Err(malformed(format!("record length {len}")));
    }
    if let Some(left) = s.remaining() {
        if len as u64 > left {
            return Err(malformed(format!("record claims {len} bytes, {left} left")));
        }
    }
    let start = s.pos();
    let end = start + len as u64;
    s.byte()?; // attributes: unused in v2
    let ts_delta = zigzag(s, 10)?;
    let off_delta = varint(s)?;
    skip_field(s, "key", end, true)?;
    skip_field(s, "value", end, true)?;
    let headers = varint(s)?;
    if headers < 0 {
        return Err(malformed(format!("header count {headers}")));
    }
    for _ in 0..headers {
        // Each header takes at least two bytes, so the record's own length bounds this loop.
        if s.pos() >= end {
            return Err(malformed(format!("{headers} headers run past the record")));
        }
        skip_field(s, "header key", end, false)?;
        skip_field(s, "header value", end, true)?;
    }
    let used = s.pos() - start;
    if used != len as u64 {
        return Err(malformed(format!(
            "record claims {len} bytes, its fields take {used}"
        )));
    }
    Ok((off_delta, ts_delta))
}

/// Walks every record, calling `visit(index, offset delta, timestamp delta)` after each one.
fn walk<S: Source>(
    s: &mut S,
    mut visit: impl FnMut(usize, i32, i64) -> Result<ControlFlow<()>, RecordError>,
) -> Result<usize, RecordError> {
    let mut index = 0usize;
    // Every record consumes at least one byte of a bounded body, so this loop is bounded too.
    while !s.at_end()? {
        let (od, td) = record(s).map_err(|e| match e {
            RecordError::Malformed(reason) => RecordError::Record { index, reason },
            other => other,
        })?;
        if visit(index, od, td)?.is_break() {
            break;
        }
        index += 1;
    }
    Ok(index)
}

/// Checks the records against the header: exactly `records_count`, offset deltas 0..n-1.
fn check_records<S: Source>(s: &mut S, h: &BatchHeader) -> Result<(), RecordError> {
    let claimed = h.records_count;
    let n = walk(s, |i, od, _| {
        if i >= claimed as usize {
            return Err(RecordError::CountMismatch {
                claimed,
                found: "more".into(),
            });
        }
        if od as i64 != i as i64 {
            return Err(RecordError::Record {
                index: i,
                reason: format!("offset delta {od}, want {i}"),
            });
        }
        Ok(ControlFlow::Continue(()))
    })?;
    if n != claimed as usize {
        return Err(RecordError::CountMismatch {
            claimed,
            found: n.to_string(),
        });
    }
    Ok(())
}

/// Buffers reused across batches on one thread, so validation allocates no per-record memory
/// and, in the steady state, no per-batch window either.
struct Scratch {
    window: Box<[u8]>,
    snappy: Vec<u8>,
    zstd: Option<zstd::zstd_safe::DCtx<'static>>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            window: vec![0u8; WINDOW].into_boxed_slice(),
            snappy: Vec::new(),
            zstd: None,
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Appends one raw snappy block's output to `out`, refusing it before decoding if the size its
/// preamble declares would pass the cap.
fn snappy_block(block: &[u8], out: &mut Vec<u8>, cap: usize) -> Result<(), RecordError> {
    let bad = |e: snap::Error| RecordError::Decompress {
        codec: "snappy",
        reason: e.to_string(),
    };
    let n = snap::raw::decompress_len(block).map_err(bad)?;
    // Snappy's densest op turns 3 input bytes into 64 output bytes; a preamble declaring more
    // is a lie, refused before its buffer is allocated.
    if n / 64 > block.len() / 3 + 1 {
        return Err(RecordError::Decompress {
            codec: "snappy",
            reason: format!(
                "block of {} bytes declares {n} bytes of output",
                block.len()
            ),
        });
    }
    if n > cap.saturating_sub(out.len()) {
        return Err(RecordError::TooLarge {
            codec: "snappy",
            cap,
        });
    }
    let at = out.len();
    out.resize(at + n, 0);
    let wrote = snap::raw::Decoder::new()
        .decompress(block, &mut out[at..])
        .map_err(bad)?;
    out.truncate(at + wrote);
    Ok(())
}

/// Decompresses a snappy payload, xerial-framed or raw, into `out`.
fn snappy(payload: &[u8], out: &mut Vec<u8>, cap: usize) -> Result<(), RecordError> {
    let corrupt = |reason: String| RecordError::Decompress {
        codec: "snappy",
        reason,
    };
    out.clear();
    let Some(mut rest) = payload.strip_prefix(XERIAL_MAGIC) else {
        return snappy_block(payload, out, cap);
    };
    // Every pass consumes at least four bytes of the payload.
    let mut header = true;
    loop {
        if header {
            // version and compatible version; snappy-java reads any values
            rest = rest
                .get(8..)
                .ok_or_else(|| corrupt("xerial header cut short".into()))?;
            header = false;
        }
        if rest.is_empty() {
            return Ok(());
        }
        // snappy-java also reads xerial streams written back to back.
        if let Some(r) = rest.strip_prefix(XERIAL_MAGIC) {
            rest = r;
            header = true;
            continue;
        }
        let len_bytes: [u8; 4] = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("xerial block length cut short".into()))?;
        let len = i32::from_be_bytes(len_bytes);
        let block = usize::try_from(len)
            .ok()
            .and_then(|l| rest.get(4..4 + l))
            .ok_or_else(|| {
                corrupt(format!(
                    "xerial block of {len} bytes, {} left",
                    rest.len() - 4
                ))
            })?;
        snappy_block(block, out, cap)?;
        rest = &rest[4 + block.len()..];
    }
}

/// Walks the LZ4 frames' structure without decoding: Kafka reads frame format version 1 with
/// independent blocks only, and `lz4_flex` takes a frame cut right before its end mark for a
/// clean end; so every frame must be well formed, end with its end mark, and nothing may follow.
fn check_lz4_frames(payload: &[u8]) -> Result<(), RecordError> {
    let corrupt = |reason: String| RecordError::Decompress {
        codec: "lz4",
        reason,
    };
    let cut = || corrupt("frame cut short".into());
    let mut rest = payload;
    // Every pass consumes a frame header (at least 7 bytes) or a block header (4 bytes).
    // (block checksums, content checksum) of the frame being walked; None between frames.
    let mut open_frame = None;
    loop {
        let Some((per_block, content)) = open_frame else {
            if rest.is_empty() && payload.len() > rest.len() {
                return Ok(());
            }
            if rest.get(..4) != Some(&LZ4_FRAME_MAGIC[..]) {
                return Err(corrupt("not an LZ4 frame".into()));
            }
            let flg = *rest.get(4).ok_or_else(cut)?;
            if flg >> 6 != 1 {
                return Err(corrupt(format!("LZ4 frame version {}", flg >> 6)));
            }
            if flg & 0x20 == 0 {
                return Err(corrupt(
                    "LZ4 frame with dependent blocks (Kafka reads independent blocks only)".into(),
                ));
            }
            // magic, FLG, BD, [content size], [dictionary id], header checksum
            let header = 4
                + 2
                + if flg & 0x08 != 0 { 8 } else { 0 }
                + if flg & 0x01 != 0 { 4 } else { 0 }
                + 1;
            rest = rest.get(header..).ok_or_else(cut)?;
            open_frame = Some((flg & 0x10 != 0, flg & 0x04 != 0));
            continue;
        };
        let size: [u8; 4] = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(cut)?;
        rest = &rest[4..];
        let size = u32::from_le_bytes(size) & 0x7fff_ffff;
        if size == 0 {
            // end mark, then the optional content checksum
            rest = rest.get(if content { 4 } else { 0 }..).ok_or_else(cut)?;
            open_frame = None;
            continue;
        }
        let skip = size as usize + if per_block { 4 } else { 0 };
        rest = rest.get(skip..).ok_or_else(cut)?;
    }
}

fn check_compressed(
    payload: &[u8],
    h: &BatchHeader,
    codec: i16,
    cap: usize,
    scratch: &mut Scratch,
) -> Result<(), RecordError> {
    let name = codec_name(codec);
    let window = &mut scratch.window[..];
    match codec {
        1 => {
            let dec = flate2::bufread::MultiGzDecoder::new(payload);
            check_records(&mut ReadSource::new(dec, window, cap, name), h)
        }
        2 => {
            let out = &mut scratch.snappy;
            let res = snappy(payload, out, cap)
                .and_then(|()| check_records(&mut SliceSource { buf: out, pos: 0 }, h));
            if out.capacity() > SNAPPY_RETAIN {
                *out = Vec::new();
            }
            res
        }
        3 => {
            check_lz4_frames(payload)?;
            let dec = lz4_flex::frame::FrameDecoder::new(payload);
            check_records(&mut ReadSource::new(dec, window, cap, name), h)
        }
        4 => {
            if scratch.zstd.is_none() {
                scratch.zstd = zstd::zstd_safe::DCtx::try_create();
            }
            let dctx = scratch.zstd.as_mut().ok_or(RecordError::Decompress {
                codec: name,
                reason: "cannot allocate a zstd context".into(),
            })?;
            // with_context resets the context's session, whatever a failed batch left in it.
            let dec = zstd::stream::read::Decoder::with_context(payload, dctx);
            let mut src = ReadSource::new(dec, window, cap, name);
            let res = check_records(&mut src, h);
            let produced = src.produced;
            drop(src);
            // libzstd decodes through a window buffer as large as the frame's declared window,
            // written up to the bytes produced; don't keep one a big or hostile batch grew.
            if res.is_err() || produced > ZSTD_RETAIN {
                scratch.zstd = None;
            }
            res
        }
        other => Err(RecordError::UnknownCodec(other)),
    }
}

/// Checks a produced batch: header consistency, then every record of its (decompressed) body,
/// decompressing at most `max_decompressed` bytes (see [`decompressed_cap`]).
pub fn validate(batch: &[u8], h: &BatchHeader, max_decompressed: usize) -> Result<(), RecordError> {
    if h.is_control() {
        return Err(RecordError::Control);
    }
    if h.records_count < 1 {
        return Err(RecordError::Counts(format!(
            "batch has {} records",
            h.records_count
        )));
    }
    if i64::from(h.last_offset_delta) != i64::from(h.records_count) - 1 {
        return Err(RecordError::Counts(format!(
            "lastOffsetDelta {} does not match {} records",
            h.last_offset_delta, h.records_count
        )));
    }
    let body = batch
        .get(BATCH_HEADER_LEN..)
        .ok_or_else(|| RecordError::Counts("batch shorter than its header".into()))?;
    let codec = h.attributes & COMPRESSION_MASK;
    if codec == 0 {
        return check_records(&mut SliceSource { buf: body, pos: 0 }, h);
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => check_compressed(body, h, codec, max_decompressed, &mut s),
        // Not reachable (nothing here re-enters), but a fresh scratch is a safe answer.
        Err(_) => check_compressed(body, h, codec, max_decompressed, &mut Scratch::new()),
    })
}

/// The first record at or after `ts` in a stored batch: (offset, timestamp). For compressed
/// batches, the batch's first offset and max timestamp (the header is all we read).
pub fn first_at_or_after(batch: &[u8], h: &BatchHeader, ts: i64) -> Option<(i64, i64)> {
    if h.max_timestamp < ts {
        return None;
    }
    if h.attributes & COMPRESSION_MASK != 0 {
        return Some((h.base_offset, h.max_timestamp));
    }
    let body = batch.get(BATCH_HEADER_LEN..)?;
    let mut found = None;
    walk(&mut SliceSource { buf: body, pos: 0 }, |_, od, td| {
        let t = h.base_timestamp.saturating_add(td);
        if t >= ts {
            found = Some((h.base_offset.saturating_add(i64::from(od)), t));
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    })
    .ok()?;
    found
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
