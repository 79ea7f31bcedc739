//! Bounded fuzz targets (issue 15) over what a Kafka client controls byte for byte:
//! - `kafka_request`: a request frame (after `net`'s size prefix) through the broker's decode
//!   path, [`super::peek_header`] then [`super::decode_body`], for every API and version the
//!   broker supports;
//! - `record_batch`: a produced record batch through storage's batch validation and
//!   [`super::records::validate`] (every codec's decompression), as the produce handler runs them.
//!
//! Seeds come from `fuzz/corpus/<target>/` (captures of confluent-kafka and kafka-python against
//! a real broker: `fuzz/README.md`), one synthetic frame per supported API version, and the batches
//! inside the captured Produce requests. Each input must be refused or accepted, never panic.
//! `SLUICE_FUZZ_CASES` sets the cases (`make fuzz`); see `sluice_storage::fuzzing`.

use std::cell::Cell;
use std::path::PathBuf;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestKind};
use sluice_storage::batch::{self, BATCH_HEADER_LEN};
use sluice_storage::fuzzing::{self, Corpus};

use super::handlers::supported_versions;
use super::{decode_body, peek_header, records};
use crate::alloc_guard::track;

/// The default `message.max.bytes`, whose decompression cap the produce handler applies.
const MESSAGE_MAX_BYTES: usize = 1_048_588;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every (API, version) the broker serves.
fn supported() -> Vec<(ApiKey, i16)> {
    (0..=i16::MAX)
        .take(200)
        .filter_map(|k| ApiKey::try_from(k).ok())
        .filter_map(|key| supported_versions(key).map(|(min, max)| (key, min, max)))
        .flat_map(|(key, min, max)| (min..=max).map(move |v| (key, v)))
        .collect()
}

/// A minimal frame of `key` v`version`: the header (client id "fuzz", empty tagged fields in
/// flexible headers) and a few zero bytes of body, for mutations to grow from.
fn synthetic_frame(key: ApiKey, version: i16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&(key as i16).to_be_bytes());
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(&7i32.to_be_bytes());
    f.extend_from_slice(&4i16.to_be_bytes());
    f.extend_from_slice(b"fuzz");
    if key.request_header_version(version) >= 2 {
        f.push(0);
    }
    f.extend_from_slice(&[0u8; 16]);
    f
}

/// The largest single allocation a target's inputs caused, against the input's size.
struct Reserved {
    /// What an input of this many bytes may reserve at most.
    bound: fn(usize) -> usize,
    /// (bytes reserved, input length) of the input that reserved most per input byte.
    worst: Cell<(usize, usize)>,
    /// Inputs that reserved more than the bound.
    over: Cell<u64>,
    /// Inputs the code under test accepted (a request that decoded).
    accepted: Cell<u64>,
}

impl Reserved {
    fn new(bound: fn(usize) -> usize) -> Reserved {
        Reserved {
            bound,
            worst: Cell::default(),
            over: Cell::default(),
            accepted: Cell::default(),
        }
    }

    /// What decoding `len` bytes may reserve: a decoded element can be a few hundred bytes in
    /// memory for a couple on the wire, plus fixed scratch.
    fn decoded(len: usize) -> usize {
        256 * len + (64 << 10)
    }

    /// What validating a `len`-byte batch may reserve: as decoding, plus what its codec may
    /// produce — snappy's output up to the decompression cap, one LZ4 block of at most 4 MiB
    /// (the sizes the batch's own headers claim, refused beyond those limits).
    fn validated(len: usize) -> usize {
        Self::decoded(len) + records::decompressed_cap(MESSAGE_MAX_BYTES) + (4 << 20)
    }

    /// Runs `f` and records the largest allocation it made on this thread; `Err` with the
    /// numbers if it was over the bound.
    fn measure<T>(&self, len: usize, f: impl FnOnce() -> T) -> (T, Result<(), String>) {
        track::reset();
        let out = f();
        let largest = track::largest();
        let (w, wl) = self.worst.get();
        if largest.saturating_mul(wl.max(1)) > w.saturating_mul(len.max(1)) {
            self.worst.set((largest, len));
        }
        if largest > (self.bound)(len) {
            self.over.set(self.over.get() + 1);
            let why = format!("reserved {largest} bytes for a {len}-byte input");
            return (out, Err(why));
        }
        (out, Ok(()))
    }

    fn report(&self, target: &str) {
        let (w, wl) = self.worst.get();
        let accepted = match self.accepted.get() {
            0 => String::new(),
            n => format!("; {n} accepted"),
        };
        println!(
            "fuzz {target}: largest reservation per input byte: {w} bytes for a {wl}-byte input; \
             {} inputs reserved more than their bound (refused inputs only){accepted}",
            self.over.get()
        );
    }
}

/// The broker's decode path for one frame: an error or a request, never a panic.
fn check_request(input: &[u8], reserved: &Reserved) -> Result<(), String> {
    let frame = Bytes::copy_from_slice(input);
    let Ok((key, version, _)) = peek_header(&frame) else {
        return Ok(());
    };
    let Ok(api) = ApiKey::try_from(key) else {
        return Ok(());
    };
    match supported_versions(api) {
        Some((min, max)) if (min..=max).contains(&version) => {
            // Ok or Err alike; only a panic (caught by proptest) fails the case.
            let len = frame.len();
            let (decoded, bounded) = reserved.measure(len, || decode_body(api, version, frame));
            // kafka-protocol 0.18 reserves an array's claimed count before it reads the
            // elements (upstream #152/#200; alloc_guard keeps the huge ones off real memory):
            // address space the refused request returns at once. A request that decodes must
            // have been given the bytes for what it holds.
            if let (Ok(_), Err(why)) = (&decoded, bounded) {
                return Err(format!("{api:?} v{version} decoded but {why}"));
            }
            if decoded.is_ok() {
                reserved.accepted.set(reserved.accepted.get() + 1);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The record batches inside the Produce requests among `frames`.
fn produced_batches(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in frames {
        let frame = Bytes::copy_from_slice(f);
        let Ok((key, version, _)) = peek_header(&frame) else {
            continue;
        };
        if ApiKey::try_from(key) != Ok(ApiKey::Produce) {
            continue;
        }
        let Ok((_, RequestKind::Produce(req))) = decode_body(ApiKey::Produce, version, frame)
        else {
            continue;
        };
        for t in &req.topic_data {
            for p in &t.partition_data {
                if let Some(records) = &p.records {
                    out.extend(
                        batch::split(records)
                            .filter_map(Result::ok)
                            .map(<[u8]>::to_vec),
                    );
                }
            }
        }
    }
    out
}

/// `b` with its CRC recomputed, so a mutation reaches the record and decompression checks
/// behind the CRC (a hostile client computes a valid CRC too).
fn with_crc(b: &[u8]) -> Vec<u8> {
    let mut b = b.to_vec();
    if b.len() >= BATCH_HEADER_LEN {
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

/// `b` with its batch length set to its real length and the CRC recomputed.
fn with_length_and_crc(b: &[u8]) -> Vec<u8> {
    let mut b = b.to_vec();
    if b.len() >= BATCH_HEADER_LEN {
        let len = i32::try_from(b.len() - 12).unwrap_or(i32::MAX);
        b[8..12].copy_from_slice(&len.to_be_bytes());
    }
    with_crc(&b)
}

/// How deep the record-batch inputs went: past storage's checks (CRC and lengths) per codec,
/// and accepted by the record checks, so a run shows it reaches every decompression path.
#[derive(Default)]
struct Depth {
    valid_header: [Cell<u64>; 8],
    accepted: [Cell<u64>; 8],
}

impl Depth {
    fn report(&self) {
        let show = |c: &[Cell<u64>; 8]| {
            ["none", "gzip", "snappy", "lz4", "zstd"]
                .iter()
                .zip(c.iter())
                .map(|(n, v)| format!("{n} {}", v.get()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "fuzz record_batch: passed storage's checks by codec: {}; accepted by the record checks: {}",
            show(&self.valid_header),
            show(&self.accepted)
        );
    }
}

/// The produce path's checks on one batch, as stored bytes.
fn check_one_batch(b: &[u8], depth: &Depth) {
    for one in batch::split(b).take(64).flatten() {
        let _ = batch::validate(one);
    }
    let _ = batch::internal_payload(b);
    if let Ok(h) = batch::validate(b) {
        let codec = (h.attributes & 0x7) as usize;
        // The produce handler's cap for the default message.max.bytes.
        let cap = records::decompressed_cap(MESSAGE_MAX_BYTES);
        let accepted = records::validate(b, &h, cap).is_ok();
        let _ = records::first_at_or_after(b, &h, h.base_timestamp);
        let bump = |c: &Cell<u64>| c.set(c.get() + 1);
        bump(&depth.valid_header[codec]);
        if accepted {
            bump(&depth.accepted[codec]);
        }
    }
}

fn check_batch(input: &[u8], reserved: &Reserved, depth: &Depth) -> Result<(), String> {
    for b in [input.to_vec(), with_crc(input), with_length_and_crc(input)] {
        // Our own decoders: every reservation within the input's bounds (decompression grows
        // its output as it goes, up to the cap), refused or not.
        reserved.measure(b.len(), || check_one_batch(&b, depth)).1?;
    }
    Ok(())
}

#[test]
fn fuzz_kafka_request_decoding() {
    let mut corpus = Corpus::load(&corpus_dir("kafka_request"));
    let supported = supported();
    assert!(supported.len() > 50, "{} API versions", supported.len());
    corpus
        .seeds
        .extend(supported.iter().map(|(k, v)| synthetic_frame(*k, *v)));
    let reserved = Reserved::new(Reserved::decoded);
    fuzzing::run("kafka_request", &corpus, 40_000, |i| {
        check_request(i, &reserved)
    });
    reserved.report("kafka_request");
}

#[test]
fn fuzz_record_batch_validation() {
    let requests = Corpus::load(&corpus_dir("kafka_request"));
    let mut corpus = Corpus::load(&corpus_dir("record_batch"));
    corpus.seeds.extend(produced_batches(&requests.seeds));
    corpus
        .seeds
        .push(batch::testutil::data_batch(1_700_000_000_000, &[0, 3, 100]));
    let reserved = Reserved::new(Reserved::validated);
    let depth = Depth::default();
    fuzzing::run("record_batch", &corpus, 30_000, |i| {
        check_batch(i, &reserved, &depth)
    });
    reserved.report("record_batch");
    depth.report();
    // Every codec's record checks were reached and passed (the captured seeds alone do that).
    for (codec, accepted) in depth.accepted.iter().enumerate().take(5) {
        assert!(accepted.get() > 0, "codec {codec} never accepted");
    }
}

/// Writes the batches of the captured Produce requests to `fuzz/corpus/record_batch/` (run by
/// hand after a new capture: `cargo test -p sluice --lib write_record_batch_corpus -- --ignored`).
#[test]
#[ignore]
fn write_record_batch_corpus() {
    let requests = Corpus::load(&corpus_dir("kafka_request"));
    let dir = corpus_dir("record_batch");
    std::fs::create_dir_all(&dir).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for b in produced_batches(&requests.seeds) {
        let Ok(h) = batch::validate(&b) else {
            continue;
        };
        // One batch per codec and record-count shape keeps the corpus small.
        let codec = h.attributes & 0x7;
        if b.len() > 8192 || !seen.insert((codec, h.records_count.min(3))) {
            continue;
        }
        let name = format!("codec{codec}-records{}.bin", h.records_count);
        std::fs::write(dir.join(name), &b).unwrap();
    }
}

#[test]
fn peek_header_refuses_short_frames_without_panicking() {
    for n in 0..8 {
        assert!(peek_header(&Bytes::from(vec![0u8; n])).is_err(), "{n}");
    }
    assert_eq!(
        peek_header(&Bytes::from_static(&[0, 18, 0, 3, 0, 0, 0, 9])),
        Ok((18, 3, 9))
    );
}

/// The versions handlers decode by hand (`handlers::start_legacy`) whose handling only reads.
/// OffsetCommit v0/v1 is left out: a decoded one commits offsets through the coordinator.
const LEGACY_READS: [(ApiKey, i16); 5] = [
    (ApiKey::Produce, 0),
    (ApiKey::Produce, 1),
    (ApiKey::Produce, 2),
    (ApiKey::ListOffsets, 0),
    (ApiKey::OffsetFetch, 0),
];

/// Well-formed frames of [`LEGACY_READS`] naming topic `fz`, for mutations to start from.
fn legacy_seeds() -> Vec<Vec<u8>> {
    let header = |key: ApiKey, version: i16| {
        let mut f = Vec::new();
        f.extend_from_slice(&(key as i16).to_be_bytes());
        f.extend_from_slice(&version.to_be_bytes());
        f.extend_from_slice(&11i32.to_be_bytes());
        f.extend_from_slice(&4i16.to_be_bytes());
        f.extend_from_slice(b"fuzz");
        f
    };
    let topic = |f: &mut Vec<u8>| {
        f.extend_from_slice(&1i32.to_be_bytes());
        f.extend_from_slice(&2i16.to_be_bytes());
        f.extend_from_slice(b"fz");
        f.extend_from_slice(&1i32.to_be_bytes());
        f.extend_from_slice(&0i32.to_be_bytes());
    };
    let mut seeds = Vec::new();
    for v in 0..=2 {
        let mut f = header(ApiKey::Produce, v);
        f.extend_from_slice(&1i16.to_be_bytes()); // acks
        f.extend_from_slice(&1000i32.to_be_bytes()); // timeout
        topic(&mut f);
        // A v0 message set: offset, size, crc, magic 0, attributes, null key, value "x".
        let msg: [u8; 15] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0, 0];
        let set = [&msg[..], &[0, 0, 0, 0, 0, 0, 0, 1, b'x']].concat();
        f.extend_from_slice(&(set.len() as i32).to_be_bytes());
        f.extend_from_slice(&set);
        seeds.push(f);
    }
    let mut f = header(ApiKey::ListOffsets, 0);
    f.extend_from_slice(&(-1i32).to_be_bytes()); // replica id
    topic(&mut f);
    f.extend_from_slice(&(-1i64).to_be_bytes()); // latest
    f.extend_from_slice(&1i32.to_be_bytes()); // max offsets
    seeds.push(f);
    let mut f = header(ApiKey::OffsetFetch, 0);
    f.extend_from_slice(&2i16.to_be_bytes());
    f.extend_from_slice(b"fg");
    topic(&mut f);
    seeds.push(f);
    seeds
}

/// The versions the codec crate dropped, through the handlers that read them by hand, against
/// a real node (`handlers::start_legacy` is what `decode_and_start` calls for them).
#[test]
fn fuzz_legacy_request_decoding() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt.block_on(async {
        let c = crate::testkit::TestCluster::single().await.unwrap();
        assert!(c.wait_ready(std::time::Duration::from_secs(60)).await);
        super::handlers::create_topics::create_topic(
            c.broker(0),
            "fz",
            1,
            1,
            Default::default(),
            false,
        )
        .await
        .unwrap();
        c
    });
    let broker = cluster.broker(0).clone();
    let corpus = Corpus {
        seeds: legacy_seeds(),
        files: 0,
        file_bytes: 0,
    };
    // Inputs that reached a legacy handler, and those it answered.
    let (reached, answered) = (Cell::new(0u64), Cell::new(0u64));
    let check = |input: &[u8]| -> Result<(), String> {
        let frame = Bytes::copy_from_slice(input);
        let Ok((key, version, _)) = peek_header(&frame) else {
            return Ok(());
        };
        let Ok(api) = ApiKey::try_from(key) else {
            return Ok(());
        };
        if !LEGACY_READS.contains(&(api, version)) {
            return Ok(());
        }
        reached.set(reached.get() + 1);
        if let Ok(Some(handler)) = super::handlers::start_legacy(&broker, api, version, &frame) {
            let answer = rt.block_on(async {
                let answer = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    handler.await.await
                });
                answer.await.map_err(|_| "no answer in 10 s".to_string())
            })?;
            answered.set(answered.get() + u64::from(answer.is_some()));
        }
        Ok(())
    };
    fuzzing::run("kafka_request_legacy", &corpus, 30_000, check);
    println!(
        "fuzz kafka_request_legacy: {} inputs reached a legacy handler, {} were answered",
        reached.get(),
        answered.get()
    );
    assert!(answered.get() >= 5, "the seeds must be answered");
    rt.block_on(cluster.shutdown());
}
