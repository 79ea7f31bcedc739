//! Kafka RecordBatch v2 header helpers. Individual records are never decoded here.
//!
//! Layout (big endian): baseOffset i64 @0, batchLength i32 @8 (bytes after this field),
//! partitionLeaderEpoch i32 @12, magic i8 @16, crc u32 @17 (CRC-32C of bytes [21..end]),
//! attributes i16 @21, lastOffsetDelta i32 @23, baseTimestamp i64 @27, maxTimestamp i64 @35,
//! producerId i64 @43, producerEpoch i16 @51, baseSequence i32 @53, recordsCount i32 @57;
//! records start @61.

pub const BATCH_HEADER_LEN: usize = 61;
/// Bytes before and including the batchLength field, which batchLength does not count.
pub const LOG_OVERHEAD: usize = 12;
const CRC_START: usize = 21;
const CONTROL_FLAG: i16 = 0x20;

/// Raft-internal entries (blank, membership) are stored in the partition log as control batches
/// with this producer id, `recordsCount` 0 and `lastOffsetDelta` -1, carrying their payload in
/// place of records; they take no Kafka offset. Real producer ids are >= -1, so this cannot clash.
pub const INTERNAL_PRODUCER_ID: i64 = -0x511CE;

/// The baseOffset of a batch no log has placed yet: the leader proposes batches with it, so each
/// replica can tell its own new batches (offsets to assign) from replicated ones (offsets to
/// check). Producers' values are ignored, as in Kafka; this one is never stored.
pub const UNPLACED_BASE_OFFSET: i64 = -1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Size of the whole batch on the wire.
    pub fn total_len(&self) -> usize {
        LOG_OVERHEAD + self.batch_length.max(0) as usize
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_FLAG != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch too short: need {need} bytes, have {have}")]
    TooShort { need: usize, have: usize },
    #[error("bad batch length {0}")]
    BadLength(i32),
    #[error("unsupported magic {0} (want 2)")]
    BadMagic(i8),
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("bad record counts: {0}")]
    BadCounts(String),
}

fn arr<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = buf.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

fn i64_at(buf: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(arr(buf, at))
}
fn i32_at(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(arr(buf, at))
}
fn i16_at(buf: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(arr(buf, at))
}

/// Parses the fixed header; checks only what the header alone can tell (size, length, magic).
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    if buf.len() < BATCH_HEADER_LEN {
        return Err(BatchError::TooShort {
            need: BATCH_HEADER_LEN,
            have: buf.len(),
        });
    }
    let batch_length = i32_at(buf, 8);
    if batch_length < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
        return Err(BatchError::BadLength(batch_length));
    }
    let magic = buf[16] as i8;
    if magic != 2 {
        return Err(BatchError::BadMagic(magic));
    }
    Ok(BatchHeader {
        base_offset: i64_at(buf, 0),
        batch_length,
        partition_leader_epoch: i32_at(buf, 12),
        magic,
        crc: u32::from_be_bytes(arr(buf, 17)),
        attributes: i16_at(buf, 21),
        last_offset_delta: i32_at(buf, 23),
        base_timestamp: i64_at(buf, 27),
        max_timestamp: i64_at(buf, 35),
        producer_id: i64_at(buf, 43),
        producer_epoch: i16_at(buf, 51),
        base_sequence: i32_at(buf, 53),
        records_count: i32_at(buf, 57),
    })
}

/// Validates that `buf` is exactly one well-formed batch: lengths, magic, CRC and counts.
pub fn validate(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let h = parse_header(buf)?;
    let total = h.total_len();
    if buf.len() < total {
        return Err(BatchError::TooShort {
            need: total,
            have: buf.len(),
        });
    }
    if buf.len() > total {
        return Err(BatchError::BadLength(h.batch_length));
    }
    let computed = crc32c::crc32c(&buf[CRC_START..total]);
    if computed != h.crc {
        return Err(BatchError::BadCrc {
            stored: h.crc,
            computed,
        });
    }
    check_counts(&h)?;
    Ok(h)
}

fn check_counts(h: &BatchHeader) -> Result<(), BatchError> {
    if is_internal(h) {
        if h.records_count != 0 || h.last_offset_delta != -1 {
            return Err(BatchError::BadCounts(format!(
                "internal batch with recordsCount {} lastOffsetDelta {}",
                h.records_count, h.last_offset_delta
            )));
        }
        return Ok(());
    }
    // Compacted batches may hold fewer records than offsets, never more.
    if h.last_offset_delta < 0
        || h.records_count < 0
        || i64::from(h.records_count) > i64::from(h.last_offset_delta) + 1
    {
        return Err(BatchError::BadCounts(format!(
            "recordsCount {} lastOffsetDelta {}",
            h.records_count, h.last_offset_delta
        )));
    }
    Ok(())
}

/// Splits concatenated batches by their length fields (no CRC check; call [`validate`] on each).
/// Stops after the first error.
pub fn split(buf: &[u8]) -> impl Iterator<Item = Result<&[u8], BatchError>> {
    let mut rest = buf;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let item = parse_header(rest).and_then(|h| {
            let total = h.total_len();
            if rest.len() < total {
                return Err(BatchError::TooShort {
                    need: total,
                    have: rest.len(),
                });
            }
            let (one, tail) = rest.split_at(total);
            rest = tail;
            Ok(one)
        });
        failed = item.is_err();
        Some(item)
    })
}

/// baseOffset lies outside the CRC-covered range, so patching it keeps the batch valid.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    if let Some(dst) = batch.get_mut(0..8) {
        dst.copy_from_slice(&base_offset.to_be_bytes());
    }
}

/// partitionLeaderEpoch lies outside the CRC-covered range, so patching it keeps the batch valid.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    if let Some(dst) = batch.get_mut(12..16) {
        dst.copy_from_slice(&epoch.to_be_bytes());
    }
}

/// Builds the control batch that stores a Raft-internal entry; `payload` takes the place of records.
pub fn internal_batch(term: i32, next_offset: i64, payload: &[u8]) -> Vec<u8> {
    let total = BATCH_HEADER_LEN + payload.len();
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&next_offset.to_be_bytes());
    b.extend_from_slice(&((total - LOG_OVERHEAD) as i32).to_be_bytes());
    b.extend_from_slice(&term.to_be_bytes());
    b.push(2);
    b.extend_from_slice(&[0u8; 4]); // CRC, filled below
    b.extend_from_slice(&CONTROL_FLAG.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes()); // lastOffsetDelta
    b.extend_from_slice(&(-1i64).to_be_bytes()); // baseTimestamp
    b.extend_from_slice(&(-1i64).to_be_bytes()); // maxTimestamp
    b.extend_from_slice(&INTERNAL_PRODUCER_ID.to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes()); // producerEpoch
    b.extend_from_slice(&(-1i32).to_be_bytes()); // baseSequence
    b.extend_from_slice(&0i32.to_be_bytes()); // recordsCount
    b.extend_from_slice(payload);
    let crc = crc32c::crc32c(&b[CRC_START..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

pub fn is_internal(h: &BatchHeader) -> bool {
    h.is_control() && h.producer_id == INTERNAL_PRODUCER_ID
}

/// Validates `batch` as an internal batch and returns its payload.
pub fn internal_payload(batch: &[u8]) -> Result<&[u8], BatchError> {
    let h = validate(batch)?;
    if !is_internal(&h) {
        return Err(BatchError::BadCounts("not an internal batch".into()));
    }
    Ok(&batch[BATCH_HEADER_LEN..])
}

/// Test helpers: builds real v2 batches with varint-encoded records. Shared with this crate's
/// tests, other crates' tests and the benches. Always compiled (hidden from the docs): a crate's
/// own benches cannot turn on its `testing` feature, and the builders need nothing the crate
/// does not already depend on.
#[doc(hidden)]
pub mod testutil {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }

    /// A valid, uncompressed v2 batch with one record per entry of `value_sizes`; record i has
    /// timestamp `base_ts + i`.
    pub fn data_batch(base_ts: i64, value_sizes: &[usize]) -> Vec<u8> {
        let values: Vec<Vec<u8>> = value_sizes
            .iter()
            .map(|&size| (0..size).map(|j| (j % 251) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        batch_of_values(base_ts, &refs)
    }

    /// A valid, uncompressed v2 batch with one record per value (no keys, no headers); record i
    /// has timestamp `base_ts + i`.
    pub fn batch_of_values(base_ts: i64, values: &[&[u8]]) -> Vec<u8> {
        let mut records = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut body = vec![0u8]; // record attributes
            put_varint(&mut body, i as i64); // timestampDelta
            put_varint(&mut body, i as i64); // offsetDelta
            put_varint(&mut body, -1); // null key
            put_varint(&mut body, v.len() as i64);
            body.extend_from_slice(v);
            put_varint(&mut body, 0); // no headers
            put_varint(&mut records, body.len() as i64);
            records.extend_from_slice(&body);
        }
        let n = values.len() as i32;
        let mut b = Vec::new();
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(
            &((BATCH_HEADER_LEN - LOG_OVERHEAD + records.len()) as i32).to_be_bytes(),
        );
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(2);
        b.extend_from_slice(&[0u8; 4]);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(n - 1).to_be_bytes());
        b.extend_from_slice(&base_ts.to_be_bytes());
        b.extend_from_slice(&(base_ts + i64::from(n.max(1)) - 1).to_be_bytes());
        b.extend_from_slice(&(-1i64).to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&n.to_be_bytes());
        b.extend_from_slice(&records);
        let crc = crc32c::crc32c(&b[CRC_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::data_batch;
    use super::*;

    #[test]
    fn parse_and_validate_good_batch() {
        let b = data_batch(1000, &[3, 10, 0]);
        let h = validate(&b).unwrap();
        assert_eq!(h.total_len(), b.len());
        assert_eq!(h.magic, 2);
        assert_eq!(h.records_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.base_timestamp, 1000);
        assert_eq!(h.max_timestamp, 1002);
        assert_eq!(h.producer_id, -1);
        assert!(!h.is_control());
        assert!(!is_internal(&h));
        assert_eq!(parse_header(&b).unwrap(), h);
    }

    #[test]
    fn bad_crc_is_rejected() {
        let mut b = data_batch(0, &[5]);
        let last = b.len() - 1;
        b[last] ^= 0x01;
        assert!(matches!(validate(&b), Err(BatchError::BadCrc { .. })));
        // Corrupting a header byte inside the CRC range is caught too.
        let mut b = data_batch(0, &[5]);
        b[30] ^= 0x80;
        assert!(matches!(validate(&b), Err(BatchError::BadCrc { .. })));
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut b = data_batch(0, &[5]);
        b[16] = 1;
        assert_eq!(parse_header(&b), Err(BatchError::BadMagic(1)));
        assert_eq!(validate(&b), Err(BatchError::BadMagic(1)));
    }

    #[test]
    fn short_and_overlong_buffers_are_rejected() {
        let b = data_batch(0, &[20, 20]);
        assert_eq!(
            parse_header(&b[..60]),
            Err(BatchError::TooShort { need: 61, have: 60 })
        );
        assert_eq!(
            validate(&b[..b.len() - 1]),
            Err(BatchError::TooShort {
                need: b.len(),
                have: b.len() - 1
            })
        );
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(validate(&long), Err(BatchError::BadLength(_))));
        let mut neg = b;
        neg[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(parse_header(&neg), Err(BatchError::BadLength(-5)));
    }

    #[test]
    fn bad_counts_are_rejected() {
        let mut b = data_batch(0, &[1, 1]);
        b[57..61].copy_from_slice(&5i32.to_be_bytes()); // more records than offsets
        let crc = crc32c::crc32c(&b[CRC_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(validate(&b), Err(BatchError::BadCounts(_))));
    }

    #[test]
    fn split_concatenated_batches() {
        let a = data_batch(0, &[1]);
        let b = data_batch(5, &[100, 2, 3]);
        let c = internal_batch(1, 7, b"payload");
        let all = [a.clone(), b.clone(), c.clone()].concat();
        let parts: Vec<&[u8]> = split(&all).collect::<Result<_, _>>().unwrap();
        assert_eq!(parts, vec![&a[..], &b[..], &c[..]]);
        for p in parts {
            validate(p).unwrap();
        }
        assert_eq!(split(&[]).count(), 0);
        // A truncated tail yields exactly one error and then stops.
        let cut = &all[..all.len() - 3];
        let items: Vec<_> = split(cut).collect();
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok() && items[1].is_ok());
        assert!(matches!(items[2], Err(BatchError::TooShort { .. })));
    }

    #[test]
    fn patching_base_offset_and_epoch_keeps_crc_valid() {
        let mut b = data_batch(0, &[4, 4]);
        set_base_offset(&mut b, 123_456);
        set_partition_leader_epoch(&mut b, 42);
        let h = validate(&b).unwrap();
        assert_eq!(h.base_offset, 123_456);
        assert_eq!(h.partition_leader_epoch, 42);
        // Out-of-range patches on short buffers do nothing instead of panicking.
        let mut short = [0u8; 4];
        set_base_offset(&mut short, 1);
        set_partition_leader_epoch(&mut short, 1);
        assert_eq!(short, [0u8; 4]);
    }

    #[test]
    fn internal_batch_round_trip() {
        let b = internal_batch(7, 99, b"membership");
        let h = validate(&b).unwrap();
        assert_eq!(h.magic, 2);
        assert!(h.is_control());
        assert!(is_internal(&h));
        assert_eq!(h.base_offset, 99);
        assert_eq!(h.partition_leader_epoch, 7);
        assert_eq!(h.records_count, 0);
        assert_eq!(h.last_offset_delta, -1);
        assert_eq!(internal_payload(&b).unwrap(), b"membership");
        assert_eq!(internal_payload(&internal_batch(1, 0, b"")).unwrap(), b"");
        assert!(internal_payload(&data_batch(0, &[1])).is_err());
    }
}
