//! Record batches for the load generator: encoded once, then only stamped per request.
//!
//! Encoding records one by one would make the generator, not the broker, the bottleneck, so a
//! batch of the largest size is encoded up front and each request takes a prefix of its records
//! (their offset deltas are already right), then rewrites the header fields that change: length,
//! last offset delta, count, timestamps and the CRC. Compressed batches are compressed once per
//! record count. For `bench e2e` every record's value starts with the send time in microseconds,
//! written in place (uncompressed) or re-encoded (compressed: the slow path, documented).

use std::collections::HashMap;

use anyhow::{bail, Result};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::records::Compression;

pub(crate) use crate::cli::records::MIN_BATCH_SIZE as HEADER;
use crate::cli::records::{
    encode_batch, Message, ATTRIBUTES_OFFSET as ATTRIBUTES,
    BASE_TIMESTAMP_OFFSET as BASE_TIMESTAMP, BATCH_LENGTH_OFFSET as BATCH_LENGTH,
    CRC_OFFSET as CRC, LAST_OFFSET_DELTA_OFFSET as LAST_OFFSET_DELTA,
    MAX_TIMESTAMP_OFFSET as MAX_TIMESTAMP, RECORD_COUNT_OFFSET as RECORD_COUNT,
};
/// Bytes of each value `bench e2e` overwrites with the send time (µs since the epoch).
pub const STAMP_LEN: usize = 8;
/// Compressed batches kept per record count; paced runs vary the count, so bound the cache.
const MAX_CACHED: usize = 64;

pub struct Templates {
    compression: Compression,
    stamp: bool,
    messages: Vec<Message>,
    /// The uncompressed batch holding every message.
    full: Bytes,
    /// `ends[i]`: offset in `full` just past record `i`.
    ends: Vec<usize>,
    /// `values[i]`: offset in `full` of record `i`'s value.
    values: Vec<usize>,
    compressed: HashMap<usize, Bytes>,
}

impl Templates {
    /// Up to `max_records` records of `record_size` bytes each (values of pseudo-random capital
    /// letters, as kafka-producer-perf-test sends, so compression has something to do).
    pub fn new(
        record_size: usize,
        max_records: usize,
        compression: Compression,
        stamp: bool,
    ) -> Result<Self> {
        if max_records == 0 {
            bail!("a batch needs at least one record");
        }
        if stamp && record_size < STAMP_LEN {
            bail!("--record-size must be at least {STAMP_LEN} for bench e2e (the send time is in the value)");
        }
        let mut x: u32 = 0x2545_f491;
        let messages: Vec<Message> = (0..max_records)
            .map(|_| {
                let v: Vec<u8> = (0..record_size)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        b'A' + (x % 26) as u8
                    })
                    .collect();
                Message {
                    key: None,
                    value: Bytes::from(v),
                }
            })
            .collect();
        let full = encode_batch(&messages, Compression::None, 0)?;
        let (ends, values) = record_layout(&full, max_records)?;
        Ok(Templates {
            compression,
            stamp,
            messages,
            full,
            ends,
            values,
            compressed: HashMap::new(),
        })
    }

    pub fn max_records(&self) -> usize {
        self.ends.len()
    }

    /// A batch of the first `n` records (1 ≤ n ≤ max), timestamped `now_ms`, values stamped with
    /// `stamp_us` when this template stamps.
    pub fn batch(&mut self, n: usize, now_ms: i64, stamp_us: i64) -> Result<Bytes> {
        if n == 0 || n > self.ends.len() {
            bail!(
                "internal error: batch of {n} records from a template of {}",
                self.ends.len()
            );
        }
        let mut buf = match self.compression {
            Compression::None => {
                let end = self.ends[n - 1];
                let mut buf = BytesMut::with_capacity(end);
                buf.put_slice(&self.full[..end]);
                if self.stamp {
                    for &at in &self.values[..n] {
                        buf[at..at + STAMP_LEN].copy_from_slice(&stamp_us.to_be_bytes());
                    }
                }
                let count = i32::try_from(n)?;
                put_i32(&mut buf, LAST_OFFSET_DELTA, count - 1);
                put_i32(&mut buf, RECORD_COUNT, count);
                put_i32(&mut buf, BATCH_LENGTH, i32::try_from(end - 12)?);
                buf
            }
            c if self.stamp => {
                let stamped: Vec<Message> = self.messages[..n]
                    .iter()
                    .map(|m| {
                        let mut v = m.value.to_vec();
                        v[..STAMP_LEN].copy_from_slice(&stamp_us.to_be_bytes());
                        Message {
                            key: None,
                            value: Bytes::from(v),
                        }
                    })
                    .collect();
                BytesMut::from(&encode_batch(&stamped, c, now_ms)?[..])
            }
            c => {
                let cached = match self.compressed.get(&n) {
                    Some(b) => b.clone(),
                    None => {
                        let b = encode_batch(&self.messages[..n], c, 0)?;
                        if self.compressed.len() < MAX_CACHED {
                            self.compressed.insert(n, b.clone());
                        }
                        b
                    }
                };
                BytesMut::from(&cached[..])
            }
        };
        put_i64(&mut buf, BASE_TIMESTAMP, now_ms);
        put_i64(&mut buf, MAX_TIMESTAMP, now_ms);
        let crc = crc32c::crc32c(&buf[ATTRIBUTES..]);
        buf[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        Ok(buf.freeze())
    }
}

fn put_i32(buf: &mut [u8], at: usize, v: i32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_i64(buf: &mut [u8], at: usize, v: i64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads a zigzag varint (Kafka's record fields) at `*at`, advancing it.
pub fn read_varint(data: &[u8], at: &mut usize) -> Result<i64> {
    let mut raw: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some(&b) = data.get(*at) else {
            bail!("varint runs past the end of the batch");
        };
        *at += 1;
        raw |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    bail!("varint longer than 10 bytes")
}

/// Where each record ends and where its value starts, for the first `n` records of an
/// uncompressed batch.
pub fn record_layout(batch: &[u8], n: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut ends = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    let mut at = HEADER;
    for _ in 0..n {
        let len = usize::try_from(read_varint(batch, &mut at)?)?;
        let end = at + len;
        at += 1; // attributes
        read_varint(batch, &mut at)?; // timestamp delta
        read_varint(batch, &mut at)?; // offset delta
        let key_len = read_varint(batch, &mut at)?;
        if key_len > 0 {
            at += usize::try_from(key_len)?;
        }
        read_varint(batch, &mut at)?; // value length
        values.push(at);
        ends.push(end);
        at = end;
    }
    if at > batch.len() {
        bail!("records run past the end of the batch");
    }
    Ok((ends, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use kafka_protocol::records::RecordBatchDecoder;

    fn decode(b: Bytes) -> Vec<kafka_protocol::records::Record> {
        let mut b = b;
        RecordBatchDecoder::decode(&mut b).unwrap().records
    }

    #[test]
    fn prefixes_decode_with_their_own_counts_timestamps_and_crc() {
        let mut t = Templates::new(100, 200, Compression::None, false).unwrap();
        for n in [1, 7, 128, 200] {
            let b = t.batch(n, 1_700_000_000_123, 0).unwrap();
            let crc = (&b[CRC..CRC + 4]).get_u32();
            assert_eq!(crc, crc32c::crc32c(&b[ATTRIBUTES..]));
            let records = decode(b);
            assert_eq!(records.len(), n);
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, i as i64);
                assert_eq!(r.timestamp, 1_700_000_000_123);
                assert_eq!(r.value.as_ref().map(|v| v.len()), Some(100));
            }
        }
    }

    #[test]
    fn stamps_land_in_every_value_with_and_without_compression() {
        for c in [Compression::None, Compression::Lz4] {
            let mut t = Templates::new(16, 50, c, true).unwrap();
            let b = t.batch(33, 5, 0x0102_0304_0506_0708).unwrap();
            let records = decode(b);
            assert_eq!(records.len(), 33);
            for r in records {
                let v = r.value.unwrap();
                assert_eq!(&v[..8], &0x0102_0304_0506_0708i64.to_be_bytes());
                assert_eq!(v.len(), 16);
            }
        }
    }

    #[test]
    fn compressed_batches_are_cached_per_count_and_restamped() {
        let mut t = Templates::new(100, 10, Compression::Snappy, false).unwrap();
        let a = t.batch(10, 1, 0).unwrap();
        let b = t.batch(10, 2, 0).unwrap();
        assert_ne!(a, b, "the timestamp and CRC change");
        assert_eq!(decode(b)[9].timestamp, 2);
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(Templates::new(4, 10, Compression::None, true).is_err());
        let mut t = Templates::new(10, 3, Compression::None, false).unwrap();
        assert!(t.batch(0, 0, 0).is_err());
        assert!(t.batch(4, 0, 0).is_err());
        assert!(record_layout(&t.full[..HEADER + 3], 3).is_err());
    }
}
