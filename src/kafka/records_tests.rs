//! Tests for `records.rs`: batches are built here byte by byte (so they can lie in every way a
//! hostile producer could) and compressed with each codec's own encoder crate, independently of
//! the decoders under test; real-client batches come from kafka-protocol's encoder.

use std::cell::Cell;
use std::io::{Read, Write};
use std::rc::Rc;

use bytes::BytesMut;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice_storage::batch;

use super::*;

const CODECS: [i16; 5] = [0, 1, 2, 3, 4];
const BIG_CAP: usize = 64 << 20;

fn zz(v: i64, out: &mut Vec<u8>) {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    while u >= 0x80 {
        out.push((u as u8) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}

/// One record with its length prefix; `None` key/values are written as null (-1).
fn rec(
    od: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&[u8], Option<&[u8]>)],
) -> Vec<u8> {
    let mut r = vec![0u8]; // attributes
    zz(od * 10, &mut r); // timestamp delta
    zz(od, &mut r);
    for field in [key, value] {
        match field {
            None => zz(-1, &mut r),
            Some(b) => {
                zz(b.len() as i64, &mut r);
                r.extend_from_slice(b);
            }
        }
    }
    zz(headers.len() as i64, &mut r);
    for (k, v) in headers {
        zz(k.len() as i64, &mut r);
        r.extend_from_slice(k);
        match v {
            None => zz(-1, &mut r),
            Some(b) => {
                zz(b.len() as i64, &mut r);
                r.extend_from_slice(b);
            }
        }
    }
    let mut out = Vec::new();
    zz(r.len() as i64, &mut out);
    out.extend_from_slice(&r);
    out
}

/// `deltas.len()` records of about 100 bytes, carrying the given offset deltas.
fn body_with_deltas(deltas: &[i64]) -> Vec<u8> {
    let mut b = Vec::new();
    for &d in deltas {
        let value = format!("value-{d:04}-").into_bytes().repeat(8);
        b.extend(rec(
            d,
            Some(format!("key-{d}").as_bytes()),
            Some(&value),
            &[(b"h", Some(b"v"))],
        ));
    }
    b
}

fn body(n: i64) -> Vec<u8> {
    body_with_deltas(&(0..n).collect::<Vec<_>>())
}

fn xerial(raw_blocks: &[&[u8]]) -> Vec<u8> {
    let mut out = XERIAL_MAGIC.to_vec();
    out.extend_from_slice(&1i32.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    for b in raw_blocks {
        let c = snap::raw::Encoder::new().compress_vec(b).unwrap();
        out.extend_from_slice(&(c.len() as i32).to_be_bytes());
        out.extend_from_slice(&c);
    }
    out
}

fn lz4_frame(data: &[u8], info: lz4_flex::frame::FrameInfo) -> Vec<u8> {
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn compress(codec: i16, data: &[u8]) -> Vec<u8> {
    match codec {
        0 => data.to_vec(),
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        // The Java client's framing; raw snappy (librdkafka's) has its own tests.
        2 => xerial(&data.chunks(32 * 1024).collect::<Vec<_>>()),
        3 => lz4_frame(data, lz4_flex::frame::FrameInfo::new()),
        4 => zstd::encode_all(data, 3).unwrap(),
        _ => unreachable!("test codec {codec}"),
    }
}

/// A batch with a correct CRC around `payload`, claiming `count` records and `last_delta`.
fn batch_raw(codec: i16, payload: &[u8], count: i32, last_delta: i32) -> Vec<u8> {
    let mut after_crc = Vec::new();
    after_crc.extend_from_slice(&codec.to_be_bytes()); // attributes
    after_crc.extend_from_slice(&last_delta.to_be_bytes());
    after_crc.extend_from_slice(&1_000i64.to_be_bytes()); // base timestamp
    after_crc.extend_from_slice(&(1_000i64 + 10 * i64::from(last_delta)).to_be_bytes());
    after_crc.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    after_crc.extend_from_slice(&(-1i16).to_be_bytes());
    after_crc.extend_from_slice(&(-1i32).to_be_bytes());
    after_crc.extend_from_slice(&count.to_be_bytes());
    after_crc.extend_from_slice(payload);
    let mut b = Vec::new();
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((4 + 1 + 4 + after_crc.len()) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&crc32c::crc32c(&after_crc).to_be_bytes());
    b.extend_from_slice(&after_crc);
    b
}

fn batch_of(codec: i16, body: &[u8], count: i32) -> Vec<u8> {
    batch_raw(codec, &compress(codec, body), count, count - 1)
}

fn check(b: &[u8], cap: usize) -> Result<(), RecordError> {
    // Header only: some cases lie in ways the storage layer's own header checks would catch first.
    let h = batch::parse_header(b).expect("the test built a batch with a bad header");
    validate(b, &h, cap)
}

fn encode(n: i64, compression: Compression) -> Vec<u8> {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i,
            sequence: i as i32,
            timestamp: 1000 + i * 10,
            key: (i % 3 != 0).then(|| bytes::Bytes::from(format!("k{i}"))),
            value: Some(bytes::Bytes::from(format!("v{i}").repeat(20))),
            headers: Default::default(),
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
    .unwrap();
    buf.to_vec()
}

#[test]
fn accepts_real_batches_and_finds_timestamps() {
    let b = encode(5, Compression::None);
    let h = batch::validate(&b).unwrap();
    validate(&b, &h, BIG_CAP).unwrap();
    assert_eq!(first_at_or_after(&b, &h, 1025), Some((3, 1030)));
    assert_eq!(first_at_or_after(&b, &h, 0), Some((0, 1000)));
    assert_eq!(first_at_or_after(&b, &h, 2000), None);
    for c in [
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let z = encode(300, c);
        let hz = batch::validate(&z).unwrap();
        assert_ne!(hz.attributes & 7, 0, "{c:?} batch is not compressed");
        validate(&z, &hz, BIG_CAP).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

#[test]
fn every_codec_accepts_valid_batches() {
    for codec in CODECS {
        for n in [1, 100, 2_000] {
            let b = batch_of(codec, &body(n), n as i32);
            check(&b, BIG_CAP).unwrap_or_else(|e| panic!("codec {codec}, {n} records: {e}"));
        }
    }
    // Null keys and values, headers with null values, empty keys.
    let mut odd = rec(0, None, None, &[]);
    odd.extend(rec(
        1,
        Some(b""),
        Some(b"v"),
        &[(b"k", None), (b"", Some(b""))],
    ));
    for codec in CODECS {
        check(&batch_of(codec, &odd, 2), BIG_CAP).unwrap_or_else(|e| panic!("codec {codec}: {e}"));
    }
}

#[test]
fn snappy_raw_and_xerial_framings() {
    let data = body(500);
    // librdkafka: one raw snappy block.
    let raw = snap::raw::Encoder::new().compress_vec(&data).unwrap();
    check(&batch_raw(2, &raw, 500, 499), BIG_CAP).unwrap();
    // snappy-java: xerial blocks, also when two streams are written back to back.
    let (a, b) = data.split_at(12_345);
    check(&batch_raw(2, &xerial(&[a, b]), 500, 499), BIG_CAP).unwrap();
    let mut two = xerial(&[a]);
    two.extend(xerial(&[b]));
    check(&batch_raw(2, &two, 500, 499), BIG_CAP).unwrap();
    // A xerial block whose length points past the payload.
    let mut long = xerial(&[&data]);
    long[16..20].copy_from_slice(&(i32::MAX).to_be_bytes());
    let e = check(&batch_raw(2, &long, 500, 499), BIG_CAP).unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::Decompress {
                codec: "snappy",
                ..
            }
        ),
        "{e}"
    );
    // A header cut inside the version words.
    let e = check(&batch_raw(2, &XERIAL_MAGIC[..], 1, 0), BIG_CAP).unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::Decompress {
                codec: "snappy",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn lz4_frame_variants() {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
    let data = body(2_000);
    let checked = FrameInfo::new()
        .block_checksums(true)
        .content_checksum(true)
        .content_size(Some(data.len() as u64))
        .block_size(BlockSize::Max256KB);
    check(
        &batch_raw(3, &lz4_frame(&data, checked.clone()), 2_000, 1_999),
        BIG_CAP,
    )
    .unwrap();

    // A flipped byte inside a checksummed block is caught by the block checksum.
    let mut bad = lz4_frame(&data, checked);
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    assert!(check(&batch_raw(3, &bad, 2_000, 1_999), BIG_CAP).is_err());

    // Dependent blocks: valid LZ4, but Kafka's reader refuses them, so Java consumers could not read the batch.
    let linked = lz4_frame(&data, FrameInfo::new().block_mode(BlockMode::Linked));
    let e = check(&batch_raw(3, &linked, 2_000, 1_999), BIG_CAP).unwrap_err();
    assert!(e.to_string().contains("dependent blocks"), "{e}");

    // The legacy LZ4 format (another magic) is not what Kafka writes.
    let mut legacy = lz4_frame(&data, FrameInfo::new());
    legacy[..4].copy_from_slice(&0x184C_2102u32.to_le_bytes());
    assert!(check(&batch_raw(3, &legacy, 2_000, 1_999), BIG_CAP).is_err());
}

#[test]
fn gzip_members_back_to_back_are_one_body() {
    let data = body(100);
    let (a, b) = data.split_at(4_000);
    let mut two = compress(1, a);
    two.extend(compress(1, b));
    check(&batch_raw(1, &two, 100, 99), BIG_CAP).unwrap();
}

#[test]
fn record_count_that_lies_is_refused() {
    for codec in CODECS {
        // Header claims more records than the body holds.
        let e = check(&batch_of(codec, &body(3), 5), BIG_CAP).unwrap_err();
        assert_eq!(
            e,
            RecordError::CountMismatch {
                claimed: 5,
                found: "3".into()
            },
            "codec {codec}"
        );
        // Header claims fewer.
        let e = check(&batch_of(codec, &body(3), 2), BIG_CAP).unwrap_err();
        assert_eq!(
            e,
            RecordError::CountMismatch {
                claimed: 2,
                found: "more".into()
            },
            "codec {codec}"
        );
        // The attack: a tiny batch claiming i32::MAX records (and as many offsets).
        let e = check(&batch_of(codec, &body(1), i32::MAX), BIG_CAP).unwrap_err();
        assert!(
            matches!(
                e,
                RecordError::CountMismatch {
                    claimed: i32::MAX,
                    ..
                }
            ),
            "codec {codec}: {e}"
        );
    }
}

#[test]
fn offset_deltas_must_be_0_to_n_minus_1_in_order() {
    for codec in CODECS {
        for (deltas, bad_index) in [
            (vec![0, 2, 1], 1),
            (vec![1, 2, 3], 0),
            (vec![0, 0, 1], 1),
            (vec![0, 1, -2], 2),
        ] {
            let b = batch_of(codec, &body_with_deltas(&deltas), 3);
            match check(&b, BIG_CAP) {
                Err(RecordError::Record { index, reason }) => {
                    assert_eq!(index, bad_index, "codec {codec} {deltas:?}: {reason}");
                    assert!(reason.contains("offset delta"), "{reason}");
                }
                other => panic!("codec {codec} {deltas:?}: {other:?}"),
            }
        }
    }
}

#[test]
fn last_offset_delta_must_match_the_count() {
    for codec in CODECS {
        let payload = compress(codec, &body(3));
        for last in [1, 3, 1000] {
            let e = check(&batch_raw(codec, &payload, 3, last), BIG_CAP).unwrap_err();
            assert!(
                matches!(e, RecordError::Counts(_)),
                "codec {codec} last {last}: {e}"
            );
        }
    }
}

#[test]
fn unknown_codecs_are_refused() {
    let payload = compress(4, &body(3));
    for codec in 5..=7 {
        let e = check(&batch_raw(codec, &payload, 3, 2), BIG_CAP).unwrap_err();
        assert_eq!(e, RecordError::UnknownCodec(codec));
    }
}

#[test]
fn truncated_or_garbage_payloads_are_refused() {
    let data = body(200);
    for codec in 1..=4 {
        let good = compress(codec, &data);
        check(&batch_raw(codec, &good, 200, 199), BIG_CAP).unwrap();
        let cuts = [good.len() / 2, good.len() - 1, 4, 0];
        for cut in cuts {
            let b = batch_raw(codec, &good[..cut], 200, 199);
            assert!(
                check(&b, BIG_CAP).is_err(),
                "codec {codec} cut at {cut} of {}",
                good.len()
            );
        }
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        flipped[mid + 1] ^= 0x5a;
        assert!(
            check(&batch_raw(codec, &flipped, 200, 199), BIG_CAP).is_err(),
            "codec {codec} flipped"
        );
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"trailing garbage");
        assert!(
            check(&batch_raw(codec, &trailing, 200, 199), BIG_CAP).is_err(),
            "codec {codec} trailing"
        );
        // Deterministic noise (an LCG), with and without each codec's magic in front.
        let mut x = 0x2545_f491_u32.wrapping_add(codec as u32);
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let mut dressed = good[..good.len().min(8)].to_vec();
        dressed.extend_from_slice(&noise);
        for junk in [&noise, &dressed] {
            assert!(
                check(&batch_raw(codec, junk, 200, 199), BIG_CAP).is_err(),
                "codec {codec} noise"
            );
        }
    }
    // Uncompressed bodies with broken records.
    let mut short = rec(0, Some(b"k"), Some(b"v"), &[]);
    short[0] += 2; // length claims two bytes the fields do not use
    short.extend_from_slice(&[0, 0]);
    let e = check(&batch_of(0, &short, 1), BIG_CAP).unwrap_err();
    assert!(matches!(e, RecordError::Record { index: 0, .. }), "{e}");
    let e = check(&batch_of(0, &[0xff; 12], 1), BIG_CAP).unwrap_err();
    assert!(e.to_string().contains("varint longer"), "{e}");
}

#[test]
fn records_must_parse_fully() {
    let base = rec(0, Some(b"key"), Some(b"value"), &[(b"h", Some(b"v"))]);
    // Patch single fields of an otherwise valid record (positions after the 1-byte length).
    let broken = |at: usize, byte: u8| {
        let mut r = base.clone();
        r[at] = byte;
        r
    };
    // base: [len][attr][ts][od][klen=3]key[vlen=5]value[hcount=1][hk=1]h[hv=1]v
    let cases = [
        ("key length -2", broken(4, 3)),
        ("key past the record", broken(4, 60)),
        ("header count -1", broken(14, 1)),
        ("header count 9", broken(14, 18)),
        ("null header key", broken(15, 1)),
    ];
    for codec in CODECS {
        for (what, r) in &cases {
            let b = batch_of(codec, r, 1);
            match check(&b, BIG_CAP) {
                Err(RecordError::Record { index: 0, .. }) => {}
                other => panic!("codec {codec}, {what}: {other:?}"),
            }
        }
    }
}

/// Counts the bytes a decoder hands out, to show how far a bomb got.
struct Counting<R> {
    inner: R,
    n: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.set(self.n.get() + n as u64);
        Ok(n)
    }
}

#[test]
fn decompression_bombs_stop_at_the_cap() {
    // One record whose value is 4 MiB of zeros: a few KiB compressed.
    let value = vec![0u8; 4 << 20];
    let bomb_body = rec(0, None, Some(&value), &[]);
    let cap = 256 * 1024;
    for codec in 1..=4 {
        let payload = compress(codec, &bomb_body);
        // Snappy expands at most ~21x; the others thousands of times.
        assert!(
            payload.len() * 20 < bomb_body.len(),
            "codec {codec}: bomb is {} bytes",
            payload.len()
        );
        let b = batch_raw(codec, &payload, 1, 0);
        // Under a cap that fits, it is a valid batch; under a small one it is refused.
        check(&b, 8 << 20).unwrap_or_else(|e| panic!("codec {codec}: {e}"));
        let e = check(&b, cap).unwrap_err();
        assert!(
            matches!(e, RecordError::TooLarge { cap: c, .. } if c == cap),
            "codec {codec}: {e}"
        );
    }

    // The streaming codecs decompress no more than the cap (plus the byte that proves it passed).
    for codec in [1i16, 3, 4] {
        let payload = compress(codec, &bomb_body);
        let produced = Rc::new(Cell::new(0));
        let mut window = vec![0u8; WINDOW];
        let inner: Box<dyn Read> = match codec {
            1 => Box::new(flate2::bufread::MultiGzDecoder::new(&payload[..])),
            3 => Box::new(lz4_flex::frame::FrameDecoder::new(&payload[..])),
            _ => Box::new(zstd::stream::read::Decoder::with_buffer(&payload[..]).unwrap()),
        };
        let counting = Counting {
            inner,
            n: produced.clone(),
        };
        let h = batch::validate(&batch_raw(codec, &payload, 1, 0)).unwrap();
        let e = check_records(&mut ReadSource::new(counting, &mut window, cap, "test"), &h)
            .unwrap_err();
        assert!(
            matches!(e, RecordError::TooLarge { .. }),
            "codec {codec}: {e}"
        );
        assert!(
            produced.get() <= cap as u64 + 1,
            "codec {codec}: decompressed {} bytes past a cap of {cap}",
            produced.get()
        );
    }

    // Snappy holds its output, so the size its preamble declares is checked before decoding.
    let mut liar = Vec::new();
    let mut n = 1u64 << 30; // "1 GiB follows", as an unsigned varint
    while n >= 0x80 {
        liar.push((n as u8) | 0x80);
        n >>= 7;
    }
    liar.push(n as u8);
    liar.extend_from_slice(&[0; 16]);
    let e = check(&batch_raw(2, &liar, 1, 0), BIG_CAP).unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::Decompress {
                codec: "snappy",
                ..
            }
        ),
        "{e}"
    );
    let e = check(&batch_raw(2, &xerial(&[&bomb_body]), 1, 0), cap).unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::TooLarge {
                codec: "snappy",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn buffers_are_reused_after_failures() {
    // A failed zstd batch leaves its context mid-frame; the next batch on the thread still works.
    let good = batch_of(4, &body(50), 50);
    let payload = compress(4, &body(50));
    let cut = batch_raw(4, &payload[..payload.len() / 2], 50, 49);
    for _ in 0..3 {
        assert!(check(&cut, BIG_CAP).is_err());
        // A context a failed batch used is not kept; one a small good batch used is.
        SCRATCH.with(|s| assert!(s.borrow().zstd.is_none()));
        check(&good, BIG_CAP).unwrap();
        SCRATCH.with(|s| assert!(s.borrow().zstd.is_some()));
    }
    let big_snappy = batch_of(2, &body(60_000), 60_000);
    check(&big_snappy, BIG_CAP).unwrap();
    SCRATCH.with(|s| {
        let s = s.borrow();
        assert!(
            s.snappy.capacity() <= SNAPPY_RETAIN,
            "kept {} bytes",
            s.snappy.capacity()
        );
    });
}
