//! Record batch helpers: building produce payloads, decoding fetch payloads,
//! and the Java client's key partitioner.

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID,
};

/// Kafka's murmur2, bit-for-bit as `org.apache.kafka.common.utils.Utils.murmur2`
/// (seed 0x9747b28c, little-endian 4-byte blocks, Java's signed arithmetic
/// expressed with wrapping u32 ops).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java computes `seed ^ length` on ints; lengths beyond u32 cannot occur
    // for Kafka keys, and truncation matches Java's int overflow anyway.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    // Java's switch falls through from case 3 to 1; bytes are sign-extended
    // there but masked with 0xff, so plain u8 -> u32 is equivalent.
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The Java default partitioner for keyed records:
/// `toPositive(murmur2(key)) % numPartitions`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub key: Option<Bytes>,
    pub value: Bytes,
}

/// Encodes `messages` as a single magic-2 record batch with the given
/// compression, stamped with `timestamp_ms`.
pub fn encode_batch(
    messages: &[Message],
    compression: Compression,
    timestamp_ms: i64,
) -> Result<Bytes> {
    let records: Vec<Record> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let offset = i as i64;
            Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                producer_id: NO_PRODUCER_ID,
                producer_epoch: NO_PRODUCER_EPOCH,
                timestamp_type: TimestampType::Creation,
                offset,
                // The encoder starts a new batch whenever offset - sequence
                // changes, and derives base_sequence from the first record.
                // offset - 1 keeps everything in one batch with
                // base_sequence = -1 (NO_SEQUENCE), as a non-idempotent
                // Java producer writes it.
                sequence: (offset as i32).wrapping_sub(1),
                timestamp: timestamp_ms,
                key: m.key.clone(),
                value: Some(m.value.clone()),
                headers: Default::default(),
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .context("encoding record batch")?;
    Ok(buf.freeze())
}

/// A record as handed to the consumer's printer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

/// Byte layout of the v2 batch header fields the CLI reads (and `bench` rewrites) itself.
pub(crate) const BATCH_HEADER_PREFIX: usize = 12; // base offset (8) + batch length (4)
pub(crate) const BATCH_LENGTH_OFFSET: usize = 8;
const MAGIC_OFFSET: usize = 16;
pub(crate) const CRC_OFFSET: usize = 17;
pub(crate) const ATTRIBUTES_OFFSET: usize = 21;
pub(crate) const LAST_OFFSET_DELTA_OFFSET: usize = 23;
pub(crate) const BASE_TIMESTAMP_OFFSET: usize = 27;
pub(crate) const MAX_TIMESTAMP_OFFSET: usize = 35;
pub(crate) const RECORD_COUNT_OFFSET: usize = 57;
/// The whole v2 batch header; records follow.
pub(crate) const MIN_BATCH_SIZE: usize = 61;
/// The decoder reserves `record_count` records up front; bound it so a
/// corrupt or hostile count cannot demand gigabytes. Uncompressed records
/// take at least 7 bytes each; compressed batches get a generous cap.
const MAX_COMPRESSED_RECORDS: usize = 5_000_000;
pub(crate) const CONTROL_FLAG: i16 = 1 << 5;

/// Decodes the `records` field of a fetch response partition.
///
/// Returns the user records at or after `fetch_offset` and the offset to
/// fetch next. Handles what the raw decoder does not:
/// * a truncated final batch (brokers cut responses at max_bytes) is ignored
///   and fetched again next time;
/// * control batches (transaction markers) are skipped but still advance the
///   position;
/// * compressed batches may start before `fetch_offset`; earlier records are
///   dropped.
pub fn decode_fetched(mut data: Bytes, fetch_offset: i64) -> Result<(Vec<Consumed>, i64)> {
    let mut out = Vec::new();
    let mut next = fetch_offset;
    while data.len() >= BATCH_HEADER_PREFIX {
        let base_offset = i64::from_be_bytes(read_array(&data, 0)?);
        let batch_len = i32::from_be_bytes(read_array(&data, 8)?);
        let batch_len = usize::try_from(batch_len)
            .with_context(|| format!("negative batch length at offset {base_offset}"))?;
        let total = BATCH_HEADER_PREFIX + batch_len;
        if data.len() < total {
            tracing::trace!(base_offset, "ignoring partial trailing batch");
            break;
        }
        if total < MIN_BATCH_SIZE {
            bail!("record batch at offset {base_offset} is too short ({total} bytes)");
        }
        let magic = data[MAGIC_OFFSET] as i8;
        if magic != 2 {
            bail!(
                "record batch at offset {base_offset} uses message format v{magic}; only v2 is supported"
            );
        }
        let attributes = i16::from_be_bytes(read_array(&data, ATTRIBUTES_OFFSET)?);
        let last_offset_delta = i32::from_be_bytes(read_array(&data, LAST_OFFSET_DELTA_OFFSET)?);
        let last_offset = base_offset + i64::from(last_offset_delta);
        let record_count = i32::from_be_bytes(read_array(&data, RECORD_COUNT_OFFSET)?);
        let limit = if attributes & 0x7 == 0 {
            batch_len
        } else {
            MAX_COMPRESSED_RECORDS
        };
        if usize::try_from(record_count).map_or(true, |n| n > limit) {
            bail!("record batch at offset {base_offset} claims {record_count} records");
        }
        let mut batch = data.split_to(total);
        if attributes & CONTROL_FLAG == 0 {
            let set = RecordBatchDecoder::decode(&mut batch)
                .with_context(|| format!("decoding record batch at offset {base_offset}"))?;
            out.extend(
                set.records
                    .into_iter()
                    .filter(|r| !r.control && r.offset >= fetch_offset)
                    .map(|r| Consumed {
                        offset: r.offset,
                        key: r.key,
                        value: r.value,
                    }),
            );
        }
        next = next.max(last_offset + 1);
    }
    Ok((out, next))
}

fn read_array<const N: usize>(data: &Bytes, at: usize) -> Result<[u8; N]> {
    let mut arr = [0u8; N];
    let mut slice = data
        .get(at..at + N)
        .with_context(|| format!("record data truncated at byte {at}"))?;
    slice.copy_to_slice(&mut arr);
    Ok(arr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_java_utils_test() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2(input), *want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn murmur2_matches_other_published_kafka_values() {
        // Values quoted from the Kafka implementation by other ports.
        let cases: &[(&[u8], i32)] = &[
            (b"1", -1993445489),
            (b"12", 126087238),
            (b"123", -267702483),
            (b"1234", -1614185708),
            (b"12345", -1188365604),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2(input), *want);
        }
    }

    #[test]
    fn key_partitioning() {
        // toPositive(-973932308) % 10 = (2147483648 - 973932308) % 10
        assert_eq!(partition_for_key(b"21", 10), 1173551340 % 10);
        for n in 1..20 {
            let p = partition_for_key(b"foobar", n);
            assert!((0..n).contains(&p));
        }
        assert_eq!(partition_for_key(b"x", 0), 0);
    }

    fn msgs(values: &[&str]) -> Vec<Message> {
        values
            .iter()
            .map(|v| Message {
                key: None,
                value: Bytes::copy_from_slice(v.as_bytes()),
            })
            .collect()
    }

    #[test]
    fn encode_is_one_batch_and_round_trips() {
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let data = encode_batch(&msgs(&["a", "b", "c"]), c, 1000).unwrap();
            let info = RecordBatchDecoder::decode_batch_info(&mut data.clone()).unwrap();
            assert_eq!(info.len(), 1, "{c:?}");
            assert_eq!(info[0].record_count, 3);
            assert_eq!(info[0].base_sequence, -1);
            assert_eq!(info[0].producer_id, -1);
            let (recs, next) = decode_fetched(data, 0).unwrap();
            assert_eq!(next, 3);
            let vals: Vec<_> = recs.iter().map(|r| r.value.clone().unwrap()).collect();
            assert_eq!(vals, vec!["a", "b", "c"]);
        }
    }

    /// Rewrites a batch's base offset (and CRC is unaffected: it covers only
    /// the bytes after the CRC field).
    fn at_offset(batch: &Bytes, base: i64) -> Vec<u8> {
        let mut v = batch.to_vec();
        v[..8].copy_from_slice(&base.to_be_bytes());
        v
    }

    #[test]
    fn decode_skips_control_partial_and_earlier_records() {
        let b1 = encode_batch(&msgs(&["a", "b"]), Compression::None, 1).unwrap();
        let b2 = encode_batch(&msgs(&["c", "d", "e"]), Compression::Gzip, 1).unwrap();
        // A control batch: same layout with the control attribute bit set.
        let ctrl_rec = Record {
            transactional: true,
            control: true,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: 7,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: 0,
            sequence: -1,
            timestamp: 1,
            key: Some(Bytes::from_static(&[0, 0, 0, 0])),
            value: Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0])),
            headers: Default::default(),
        };
        let mut ctrl = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut ctrl,
            [&ctrl_rec],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        let ctrl = ctrl.freeze();
        let b4 = encode_batch(&msgs(&["f"]), Compression::None, 1).unwrap();

        let mut data = Vec::new();
        data.extend(at_offset(&b1, 10)); // 10, 11
        data.extend(at_offset(&b2, 12)); // 12, 13, 14
        data.extend(at_offset(&ctrl, 15)); // 15 (marker)
        let full_len = data.len();
        data.extend(&at_offset(&b4, 16)[..20]); // truncated

        // Starting mid-batch: 10 and 11 are before the fetch offset.
        let (recs, next) = decode_fetched(Bytes::from(data.clone()), 11).unwrap();
        let offs: Vec<i64> = recs.iter().map(|r| r.offset).collect();
        assert_eq!(offs, vec![11, 12, 13, 14]);
        assert_eq!(next, 16, "control batch advances the position");
        // Only the partial batch: nothing, position unchanged.
        let (recs, next) = decode_fetched(Bytes::from(data[full_len..].to_vec()), 16).unwrap();
        assert!(recs.is_empty());
        assert_eq!(next, 16);
        // Fewer bytes than a batch header prefix.
        let (recs, next) = decode_fetched(Bytes::from_static(&[0, 0, 0]), 5).unwrap();
        assert!(recs.is_empty());
        assert_eq!(next, 5);
    }

    #[test]
    fn decode_rejects_corruption() {
        let b = encode_batch(&msgs(&["a"]), Compression::None, 1).unwrap();
        let mut v = b.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        assert!(decode_fetched(Bytes::from(v), 0).is_err());
        let mut v = b.to_vec();
        v[MAGIC_OFFSET] = 1;
        assert!(decode_fetched(Bytes::from(v), 0).is_err());
        let mut v = b.to_vec();
        v[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(decode_fetched(Bytes::from(v), 0).is_err());
        // An absurd record count is refused before the decoder reserves it.
        let mut v = b.to_vec();
        v[RECORD_COUNT_OFFSET..RECORD_COUNT_OFFSET + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        let err = decode_fetched(Bytes::from(v), 0).unwrap_err();
        assert!(err.to_string().contains("claims"), "{err}");
    }
}
