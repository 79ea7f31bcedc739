//! Kafka wire costs on the broker's own code paths: `cargo bench --bench wire` (`make microbench`
//! runs every bench; `cargo test --bench wire` runs each case once as a smoke test).
//!
//! - `produce_v9_16k/decode`: a Produce v9 request (one topic, one partition, one ~16 KiB batch
//!   of 100-byte records, as the `sluice` CLI encodes it) decoded the way `kafka::decode_and_start`
//!   does for a current version: `peek_header`, the API key, then `decode_body` (header and body
//!   through the codec crate). The records stay a slice of the frame, not a copy.
//! - `produce_v9_16k/decode_and_check`: that, plus the per-batch checks the Produce handler runs
//!   before it hands a batch to Raft (split, `batch::validate` with its CRC-32C, the record walk
//!   of `records::validate`): the CPU a leader spends on a request before the log sees it.
//! - `fetch_v12_1mib/encode`: a Fetch v12 response carrying a records section of about 1 MiB
//!   (62 such batches, 1,035,028 bytes, as one buffer the way the log's read returns it), framed
//!   by `respond::encode`, which the connection's writer calls: header and fields are encoded, the
//!   records section is kept by reference rather than copied. `fetch_v12_1mib/encode_copying` is
//!   the codec's plain encode into one buffer, which copies the records: what that sharing saves.
//!
//! Throughput is bytes of the request or response frame.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchResponse, ProduceRequest, RequestKind, ResponseKind, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use sluice::cli::conn::encode_request;
use sluice::kafka::records::{decompressed_cap, validate as validate_records};
use sluice::kafka::respond;
use sluice::kafka::{decode_body, peek_header, Response};
use sluice_storage::batch::{self, testutil::data_batch};

const TS: i64 = 1_700_000_000_000;
/// 151 records of 100 bytes: a 16,694-byte batch, about what a producer's default `batch.size`
/// (16384) gives.
const BATCH_RECORDS: usize = 151;
const MESSAGE_MAX_BYTES: usize = 1_048_588;

/// A Produce v9 frame as the connection hands it on: without the size prefix.
fn produce_frame(records: Bytes) -> Bytes {
    let mut partition = PartitionProduceData::default();
    partition.index = 0;
    partition.records = Some(records);
    let mut topic = TopicProduceData::default();
    topic.name = TopicName(StrBytes::from_static_str("bench-topic"));
    topic.partition_data = vec![partition];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 30_000;
    req.topic_data = vec![topic];
    let framed = encode_request(&req, 9, 7).expect("encode produce");
    framed.slice(4..)
}

/// Decodes a Produce frame as the broker does; returns the records of its one partition.
fn decode_produce(frame: Bytes) -> Option<Bytes> {
    let (key, version, _correlation) = peek_header(&frame).ok()?;
    let api_key = ApiKey::try_from(key).ok()?;
    let (_header, request) = decode_body(api_key, version, frame).ok()?;
    match request {
        RequestKind::Produce(p) => {
            p.topic_data
                .into_iter()
                .next()?
                .partition_data
                .into_iter()
                .next()?
                .records
        }
        _ => None,
    }
}

fn produce(c: &mut Criterion) {
    let records = Bytes::from(data_batch(TS, &[100; BATCH_RECORDS]));
    let frame = produce_frame(records.clone());
    assert_eq!(decode_produce(frame.clone()), Some(records.clone()));
    let cap = decompressed_cap(MESSAGE_MAX_BYTES);

    let mut g = c.benchmark_group("produce_v9_16k");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(decode_produce(black_box(frame.clone()))))
    });
    g.bench_function("decode_and_check", |b| {
        b.iter(|| {
            let records = decode_produce(black_box(frame.clone())).expect("records");
            for one in batch::split(&records) {
                let one = one.expect("batch");
                let h = batch::validate(one).expect("valid batch");
                assert!(one.len() <= MESSAGE_MAX_BYTES);
                validate_records(one, &h, cap).expect("valid records");
            }
            records
        })
    });
    g.finish();
}

/// A Fetch response for one partition, with the fields the fetch handler sets.
fn fetch_response(records: Bytes) -> FetchResponse {
    let hw = 1_000_000;
    let partition = PartitionData::default()
        .with_partition_index(0)
        .with_high_watermark(hw)
        .with_last_stable_offset(hw)
        .with_log_start_offset(0)
        .with_aborted_transactions(Some(Vec::new()))
        .with_preferred_read_replica(BrokerId(-1))
        .with_records(Some(records));
    FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(TopicName(StrBytes::from_static_str("bench-topic")))
        .with_partitions(vec![partition])])
}

fn fetch(c: &mut Criterion) {
    const VERSION: i16 = 12;
    let one = data_batch(TS, &[100; BATCH_RECORDS]);
    let records = Bytes::from(one.repeat((1 << 20) / one.len()));
    let resp = fetch_response(records);
    let encode = |resp: FetchResponse| {
        respond::encode(
            7,
            ApiKey::Fetch,
            VERSION,
            Response::Kind(Box::new(ResponseKind::Fetch(resp))),
        )
        .expect("encode fetch")
    };
    let frame_len: usize = encode(resp.clone()).iter().map(Bytes::len).sum();

    let mut g = c.benchmark_group("fetch_v12_1mib");
    g.throughput(Throughput::Bytes(frame_len as u64));
    // Each encode consumes its response; building those (a Bytes refcount and a few small
    // vectors) is the handler's work, so it is left out of the timing.
    g.bench_function("encode", |b| {
        b.iter_batched(|| resp.clone(), encode, BatchSize::SmallInput)
    });
    // For comparison: the codec's own encode into one buffer, which copies the records section
    // (what `respond::encode`'s chunked frame avoids).
    g.bench_function("encode_copying", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(frame_len);
            resp.encode(&mut buf, VERSION).expect("encode fetch");
            black_box(buf)
        })
    });
    g.finish();
}

criterion_group!(benches, produce, fetch);
criterion_main!(benches);
