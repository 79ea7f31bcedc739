//! What produce-path record validation costs per batch, for each codec, and CRC-32C: criterion
//! benches, `cargo bench --bench validate` (`make microbench` runs every bench;
//! `cargo test --bench validate` runs each case once as a smoke test).
//!
//! Batches are built with kafka-protocol's encoder (as the `sluice` CLI sends them: gzip at the
//! default level, xerial snappy, independent-block LZ4, zstd level 3) plus raw snappy as
//! librdkafka sends it. Values are JSON-like log lines, so they compress the way real payloads do
//! rather than as runs of one byte. `validate/*` times `records::validate` (decompression and the
//! record walk) on one batch of 100 and of 10,000 such records; its throughput is bytes of record
//! data (the uncompressed records section), the rate a leader can accept that codec at.
//! `validate_bomb/*` times the refusal of a bomb that expands past the default cap
//! (64 × message.max.bytes): throughput there is the bytes inflated before the refusal.
//! `crc32c/1mib` is `crc32c::crc32c` over 1 MiB: the checksum storage's `batch::validate` checks
//! on every batch a leader accepts and every batch recovery walks.

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice::kafka::records::{decompressed_cap, validate};
use sluice_storage::batch::{parse_header, BATCH_HEADER_LEN};

const MESSAGE_MAX_BYTES: usize = 1_048_588;

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

fn codecs(c: &mut Criterion) {
    let codecs = [
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy_xerial", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ];
    let cap = decompressed_cap(MESSAGE_MAX_BYTES);
    for n in [100, 10_000] {
        let plain = encode(n, Compression::None);
        let records = &plain[BATCH_HEADER_LEN..];
        let raw = snap::raw::Encoder::new()
            .compress_vec(records)
            .expect("snappy");
        let mut batches: Vec<(&str, Vec<u8>)> = codecs
            .iter()
            .map(|&(name, c)| (name, encode(n, c)))
            .collect();
        batches.push(("snappy_raw", rewrap(&plain, 2, &raw)));
        let mut g = c.benchmark_group(format!("validate/{n}x100B"));
        g.throughput(Throughput::Bytes(records.len() as u64));
        if n > 100 {
            // Milliseconds per batch: fewer samples keep the run short.
            g.sample_size(20);
        }
        for (name, batch) in &batches {
            let h = parse_header(batch).expect("header");
            validate(batch, &h, cap).unwrap_or_else(|e| panic!("{name}: {e}"));
            g.bench_function(*name, |b| {
                b.iter(|| black_box(validate(black_box(batch), &h, cap)).ok())
            });
        }
        g.finish();
    }
}

/// A bomb: one record whose value is zeros well past the cap, refused once the cap is passed.
fn bombs(c: &mut Criterion) {
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
    let mut g = c.benchmark_group("validate_bomb");
    g.throughput(Throughput::Bytes(cap as u64));
    // Each refusal inflates 64 MiB: the minimum sample count, over a few seconds.
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    for (name, codec, payload) in bombs {
        let b = rewrap(&single, codec, &payload);
        let h = parse_header(&b).expect("header");
        let err = validate(&b, &h, cap).expect_err("the bomb must be refused");
        println!(
            "bomb: {} MiB of zeros, cap {} MiB; {name}: {} B compressed, refused: {err}",
            body.len() >> 20,
            cap >> 20,
            payload.len()
        );
        g.bench_function(name, |bench| {
            bench.iter(|| black_box(validate(black_box(&b), &h, cap)).ok())
        });
    }
    g.finish();
}

/// CRC-32C (Castagnoli, with the crate's hardware path), the checksum of every stored batch.
fn crc(c: &mut Criterion) {
    const LEN: usize = 1 << 20;
    let buf: Vec<u8> = (0..LEN).map(|i| (i * 31 % 251) as u8).collect();
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("1mib", |b| b.iter(|| crc32c::crc32c(black_box(&buf))));
    g.finish();
}

criterion_group!(benches, codecs, bombs, crc);
criterion_main!(benches);

fn zigzag(v: i64, out: &mut Vec<u8>) {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    while u >= 0x80 {
        out.push((u as u8) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}
