//! What produce-path record validation costs per batch, for each codec: `cargo bench --bench
//! validate`. Batches are built with kafka-protocol's encoder (as the `sluice` CLI sends them:
//! gzip at the default level, xerial snappy, independent-block LZ4, zstd level 3) plus raw snappy
//! as librdkafka sends it. Values are JSON-like log lines, so they compress the way real
//! payloads do rather than as runs of one byte. Also times the refusal of a bomb that expands
//! past the default cap (64 × message.max.bytes).
//!
//! Prints ns per batch and MB/s of record data (the uncompressed records section) per codec.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice::kafka::records::{decompressed_cap, validate};
use sluice_storage::batch::{parse_header, BATCH_HEADER_LEN};

const MESSAGE_MAX_BYTES: usize = 1_048_588;
/// Each measurement runs rounds of this length, and at most this many rounds.
const ROUND: Duration = Duration::from_millis(200);
const ROUNDS: usize = 5;

fn value(i: usize) -> Vec<u8> {
    let mut v = format!(
        "{{\"id\":{i},\"user\":\"u{:05}\",\"event\":\"{}\",\"ts\":{},\"pad\":\"",
        (i * 7919) % 100_000,
        ["click", "view", "purchase", "scroll"][i % 4],
        1_700_000_000_000u64 + (i as u64) * 37,
    )
    .into_bytes();
    let mut x = i as u32 ^ 0x9e37_79b9;
    while v.len() < 98 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        v.push(b'a' + ((x >> 16) % 26) as u8);
    }
    v.extend_from_slice(b"\"}");
    v
}

fn encode(n: usize, compression: Compression) -> Vec<u8> {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("key-{}", i % 64))),
            value: Some(Bytes::from(value(i))),
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
    .expect("encode");
    buf.to_vec()
}

/// Replaces a batch's records section with `payload` under `codec`, resealing length and CRC.
fn rewrap(batch: &[u8], codec: i16, payload: &[u8]) -> Vec<u8> {
    let mut b = batch[..BATCH_HEADER_LEN].to_vec();
    b[21..23].copy_from_slice(&codec.to_be_bytes());
    b.extend_from_slice(payload);
    let len = (b.len() - 12) as i32;
    b[8..12].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

/// Median ns per call of `f` over up to ROUNDS rounds of about ROUND each.
fn time(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < ROUND / 4 && calls < 1_000_000 {
        f();
        calls += 1;
    }
    let per_round = (calls * 4).max(1);
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..per_round {
            f();
        }
        samples.push(t.elapsed().as_nanos() as f64 / per_round as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn bench_batch(label: &str, batch: &[u8], records_bytes: usize) {
    let h = parse_header(batch).expect("header");
    let cap = decompressed_cap(MESSAGE_MAX_BYTES);
    validate(batch, &h, cap).unwrap_or_else(|e| panic!("{label}: {e}"));
    let ns = time(|| {
        black_box(validate(black_box(batch), &h, cap)).ok();
    });
    println!(
        "{label:<28} {:>9} B {:>12.0} ns/batch {:>9.0} MB/s",
        batch.len(),
        ns,
        records_bytes as f64 / ns * 1e3
    );
}

fn main() {
    let codecs = [
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy (xerial)", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ];
    println!(
        "{:<28} {:>11} {:>21} {:>14}",
        "batch", "size", "cost", "record data"
    );
    for n in [100, 10_000] {
        let plain = encode(n, Compression::None);
        let records = &plain[BATCH_HEADER_LEN..];
        for (name, c) in codecs {
            bench_batch(
                &format!("{n} x 100 B, {name}"),
                &encode(n, c),
                records.len(),
            );
        }
        let raw = snap::raw::Encoder::new()
            .compress_vec(records)
            .expect("snappy");
        bench_batch(
            &format!("{n} x 100 B, snappy (raw)"),
            &rewrap(&plain, 2, &raw),
            records.len(),
        );
    }

    // A bomb: one record whose value is zeros well past the cap, refused once the cap is passed.
    let cap = decompressed_cap(MESSAGE_MAX_BYTES);
    let single = encode(1, Compression::None);
    let mut body = Vec::new();
    let value_len = cap + (1 << 20);
    let mut rec = vec![0u8, 0, 0]; // attributes, timestamp delta, offset delta
    rec.push(1); // key length -1 (null)
    zigzag(value_len as i64, &mut rec);
    rec.resize(rec.len() + value_len, 0);
    rec.push(0); // no headers
    zigzag(rec.len() as i64, &mut body);
    body.extend_from_slice(&rec);
    let bombs: [(&str, i16, Vec<u8>); 3] = [
        ("gzip", 1, {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&body).expect("gzip");
            e.finish().expect("gzip")
        }),
        ("lz4", 3, {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(&body).expect("lz4");
            e.finish().expect("lz4")
        }),
        ("zstd", 4, zstd::encode_all(&body[..], 19).expect("zstd")),
    ];
    println!(
        "\nbomb: {} MiB of zeros, cap {} MiB",
        body.len() >> 20,
        cap >> 20
    );
    for (name, codec, payload) in bombs {
        let b = rewrap(&single, codec, &payload);
        let h = parse_header(&b).expect("header");
        let err = validate(&b, &h, cap).expect_err("the bomb must be refused");
        let ns = time(|| {
            black_box(validate(black_box(&b), &h, cap)).ok();
        });
        println!(
            "{name:<6} {:>8} B compressed, refused in {:>6.1} ms: {err}",
            payload.len(),
            ns / 1e6
        );
    }
}

fn zigzag(v: i64, out: &mut Vec<u8>) {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    while u >= 0x80 {
        out.push((u as u8) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}
