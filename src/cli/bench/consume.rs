//! The consuming side of `sluice bench`: one fetch loop per connection (partitions split between
//! `--producers` connections per leader), counting records from batch headers so the consumer
//! never decodes what it does not need. `e2e` also reads the send time each record carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};
use tokio::io::AsyncWriteExt;

use super::batch::{record_layout, HEADER, STAMP_LEN};
use super::{now_us, BenchArgs, Stats};
use crate::cli::client::{Client, TopicInfo};
use crate::cli::conn::{encode_request, read_response, BrokerConn, SplitConn};
use crate::cli::consume::list_offsets;
use crate::cli::errors::error_name;
use crate::cli::records::{
    decode_fetched, ATTRIBUTES_OFFSET, CONTROL_FLAG, LAST_OFFSET_DELTA_OFFSET, RECORD_COUNT_OFFSET,
};

/// First Fetch version that names topics by id only.
const TOPIC_ID_VERSION: i16 = 13;
/// How long the broker may hold a fetch that has nothing new (long poll).
const MAX_WAIT_MS: i32 = 500;
/// A consumer that sees nothing new for this long gives up with an error instead of hanging.
const IDLE_LIMIT: Duration = Duration::from_secs(15);
const EARLIEST: i64 = -2;
const LATEST: i64 = -1;

pub enum From {
    Earliest,
    Offsets(HashMap<i32, i64>),
}

/// For `e2e`: the consumer runs until it has read what the producer wrote.
pub struct Follow {
    pub produced: Arc<Stats>,
    pub producer_done: Arc<AtomicBool>,
    pub target: u64,
}

/// Every partition's log end offset, where `e2e` starts reading.
pub async fn log_ends(client: &mut Client, topic: &TopicInfo) -> Result<HashMap<i32, i64>> {
    let parts: Vec<i32> = (0..topic.partition_count()).collect();
    let mut t = topic.clone();
    list_offsets(client, &mut t, &parts, LATEST).await
}

pub async fn run(
    client: &mut Client,
    args: &BenchArgs,
    topic: &TopicInfo,
    from: From,
    stats: &Arc<Stats>,
    follow: Option<Follow>,
) -> Result<()> {
    let parts: Vec<i32> = (0..topic.partition_count()).collect();
    let starts = match from {
        From::Offsets(o) => o,
        From::Earliest => {
            let mut t = topic.clone();
            list_offsets(client, &mut t, &parts, EARLIEST).await?
        }
    };
    let target = match &follow {
        Some(f) => f.target,
        None => {
            let mut t = topic.clone();
            let ends = list_offsets(client, &mut t, &parts, LATEST).await?;
            let held: i64 = parts
                .iter()
                .map(|p| ends.get(p).copied().unwrap_or(0) - starts.get(p).copied().unwrap_or(0))
                .map(|n| n.max(0))
                .sum();
            let held = u64::try_from(held).unwrap_or(0);
            let target = args.num_records.unwrap_or(held);
            if target == 0 {
                bail!(
                    "topic '{}' holds no records; fill it first (sluice bench produce --topic {})",
                    topic.name(),
                    topic.name()
                );
            }
            target
        }
    };
    let deadline = args.deadline(Instant::now());
    // Group partitions by leader, then split each leader's among --producers connections.
    let mut by_leader: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in &parts {
        let leader = topic
            .leader(*p)
            .ok_or_else(|| anyhow!("partition {p} of '{}' has no leader", topic.name()))?;
        by_leader.entry(leader).or_default().push(*p);
    }
    let per_leader = usize::try_from(args.producers).unwrap_or(1).max(1);
    let cap = if topic.has_topic_id() {
        i16::MAX
    } else {
        TOPIC_ID_VERSION - 1
    };
    let shared = Arc::new(Shared {
        target,
        deadline,
        follow,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (leader, ps) in by_leader {
        let addr = client
            .broker_addr(leader)
            .ok_or_else(|| anyhow!("broker {leader} is not in the metadata"))?;
        for k in 0..per_leader.min(ps.len()) {
            let mine: Vec<(i32, i64)> = ps
                .iter()
                .skip(k)
                .step_by(per_leader)
                .map(|p| (*p, starts.get(p).copied().unwrap_or(0)))
                .collect();
            let conn = BrokerConn::connect(&addr).await?.into_split()?;
            let version = conn.version_for_max(ApiKey::Fetch, cap)?;
            let fetch = Fetcher {
                conn,
                version,
                topic_name: topic.name().to_string(),
                topic_id: topic.raw.topic_id,
                positions: mine,
                fetch_bytes: args.fetch_bytes,
            };
            tasks.spawn(fetch_loop(fetch, stats.clone(), shared.clone()));
        }
    }
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let r = r
            .map_err(|e| anyhow!("consumer task failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

struct Shared {
    target: u64,
    deadline: Option<Instant>,
    follow: Option<Follow>,
}

impl Shared {
    fn finished(&self, stats: &Stats) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return true;
        }
        let got = stats.records();
        match &self.follow {
            None => got >= self.target,
            Some(f) => f.producer_done.load(Ordering::Acquire) && got >= f.produced.records(),
        }
    }
}

struct Fetcher {
    conn: SplitConn,
    version: i16,
    topic_name: String,
    topic_id: uuid::Uuid,
    positions: Vec<(i32, i64)>,
    fetch_bytes: i32,
}

impl Fetcher {
    fn request(&self) -> FetchRequest {
        let mut ft = FetchTopic::default();
        // Both set; the encoder writes the one this version uses.
        ft.topic = TopicName(StrBytes::from_string(self.topic_name.clone()));
        ft.topic_id = self.topic_id;
        ft.partitions = self
            .positions
            .iter()
            .map(|(p, offset)| {
                let mut fp = FetchPartition::default();
                fp.partition = *p;
                fp.fetch_offset = *offset;
                fp.partition_max_bytes = self.fetch_bytes;
                fp
            })
            .collect();
        let mut req = FetchRequest::default();
        req.replica_id = BrokerId(-1);
        req.max_wait_ms = MAX_WAIT_MS;
        req.min_bytes = 1;
        req.max_bytes = self
            .fetch_bytes
            .saturating_mul(i32::try_from(self.positions.len()).unwrap_or(i32::MAX));
        req.topics = vec![ft];
        req
    }
}

async fn fetch_loop(mut f: Fetcher, stats: Arc<Stats>, shared: Arc<Shared>) -> Result<()> {
    let mut last_progress = Instant::now();
    let mut last_total = stats.records();
    while !shared.finished(&stats) {
        let req = f.request();
        let correlation_id = f.conn.next_correlation_id;
        f.conn.next_correlation_id = correlation_id.wrapping_add(1);
        let sent_at = Instant::now();
        let frame = encode_request(&req, f.version, correlation_id)?;
        f.conn
            .writer
            .write_all(&frame)
            .await
            .context("writing a fetch request")?;
        f.conn
            .writer
            .flush()
            .await
            .context("writing a fetch request")?;
        let mut body = tokio::time::timeout(
            Duration::from_secs(60),
            read_response(&mut f.conn.reader, ApiKey::Fetch, f.version, correlation_id),
        )
        .await
        .map_err(|_| anyhow!("no fetch response within 60 s"))??;
        let fetch_latency = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        let resp =
            FetchResponse::decode(&mut body, f.version).context("decoding a fetch response")?;
        if resp.error_code != 0 {
            bail!("fetch failed: {}", error_name(resp.error_code));
        }
        let mut progressed = false;
        for t in resp.responses {
            for p in t.partitions {
                if p.error_code != 0 {
                    bail!(
                        "fetch of partition {} failed: {}",
                        p.partition_index,
                        error_name(p.error_code)
                    );
                }
                let Some(pos) = f
                    .positions
                    .iter_mut()
                    .find(|(q, _)| *q == p.partition_index)
                else {
                    continue;
                };
                let Some(data) = p.records else { continue };
                let stamps = shared.follow.is_some();
                let got = count(data, pos.1, stamps)?;
                if got.next > pos.1 {
                    pos.1 = got.next;
                    progressed = true;
                }
                if got.records > 0 {
                    if stamps {
                        stats.record_latencies(&got.latencies_us, got.bytes);
                    } else {
                        stats.settle_fetch(got.records, got.bytes, fetch_latency);
                    }
                }
            }
        }
        // Judged on the whole run's count: this loop's partitions may be done while others
        // still deliver.
        let total = stats.records();
        if progressed || total != last_total {
            last_total = total;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > IDLE_LIMIT {
            bail!(
                "no new records for {IDLE_LIMIT:?} after {} records (expected {})",
                stats.records(),
                shared.target
            );
        }
    }
    Ok(())
}

/// What one partition's records section held past the fetch offset.
#[derive(Debug, Default)]
pub struct Counted {
    pub records: u64,
    /// Record batch bytes as served (the wire size).
    pub bytes: u64,
    pub next: i64,
    /// With stamps: now minus the send time in each record's value, µs.
    pub latencies_us: Vec<u64>,
}

/// Counts records from batch headers. A trailing partial batch (cut at the fetch size) is left
/// for the next fetch; control batches advance the position without counting.
pub fn count(mut data: Bytes, fetch_offset: i64, stamps: bool) -> Result<Counted> {
    let mut out = Counted {
        next: fetch_offset,
        ..Default::default()
    };
    let now = now_us();
    while data.len() >= 12 {
        let base = i64::from_be_bytes(data[0..8].try_into()?);
        let len = i32::from_be_bytes(data[8..12].try_into()?);
        let total = 12 + usize::try_from(len).map_err(|_| anyhow!("negative batch length"))?;
        if data.len() < total {
            break;
        }
        if total < HEADER {
            bail!("record batch at offset {base} is too short ({total} bytes)");
        }
        let batch = data.split_to(total);
        let attributes = i16::from_be_bytes(batch[ATTRIBUTES_OFFSET..][..2].try_into()?);
        let last_delta = i32::from_be_bytes(batch[LAST_OFFSET_DELTA_OFFSET..][..4].try_into()?);
        let count = i32::from_be_bytes(batch[RECORD_COUNT_OFFSET..][..4].try_into()?);
        let last = base + i64::from(last_delta);
        if last < fetch_offset || last < out.next {
            continue;
        }
        let skip = usize::try_from((out.next - base).max(0)).unwrap_or(0);
        out.next = last + 1;
        if attributes & CONTROL_FLAG != 0 {
            continue;
        }
        let n = usize::try_from(count).unwrap_or(0).saturating_sub(skip);
        out.records += n as u64;
        out.bytes += total as u64;
        if stamps {
            stamp_latencies(
                &batch,
                attributes,
                skip,
                now,
                &mut out.latencies_us,
                fetch_offset,
            )?;
        }
    }
    Ok(out)
}

fn stamp_latencies(
    batch: &Bytes,
    attributes: i16,
    skip: usize,
    now: u64,
    out: &mut Vec<u64>,
    fetch_offset: i64,
) -> Result<()> {
    let since = |v: &[u8]| -> u64 {
        let sent = v
            .get(..STAMP_LEN)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(now);
        now.saturating_sub(sent)
    };
    if attributes & 0x7 == 0 {
        let count = i32::from_be_bytes(batch[RECORD_COUNT_OFFSET..][..4].try_into()?);
        let count = usize::try_from(count).unwrap_or(0);
        let (_, values) = record_layout(batch, count)?;
        for at in values.into_iter().skip(skip) {
            out.push(since(&batch[at..]));
        }
    } else {
        let (records, _) = decode_fetched(batch.clone(), fetch_offset)?;
        for r in records.into_iter().skip(skip) {
            out.push(since(r.value.as_deref().unwrap_or(&[])));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::batch::Templates;
    use bytes::BytesMut;
    use kafka_protocol::records::Compression;

    fn two_batches(c: Compression, stamp: bool) -> Bytes {
        let mut t = Templates::new(20, 10, c, stamp).unwrap();
        let mut b = BytesMut::new();
        b.extend_from_slice(&t.batch(10, 0, now_us() as i64 - 2_000).unwrap());
        let mut second = BytesMut::from(&t.batch(5, 0, now_us() as i64 - 2_000).unwrap()[..]);
        second[0..8].copy_from_slice(&10i64.to_be_bytes());
        b.extend_from_slice(&second);
        b.freeze()
    }

    #[test]
    fn counts_from_headers_and_leaves_a_partial_batch() {
        let data = two_batches(Compression::None, false);
        let c = count(data.clone(), 0, false).unwrap();
        assert_eq!((c.records, c.next, c.bytes), (15, 15, data.len() as u64));
        // The second batch cut short: only the first is counted, the position stops at 10.
        let c = count(data.slice(..data.len() - 3), 0, false).unwrap();
        assert_eq!((c.records, c.next), (10, 10));
        // Fetching from inside the first batch counts only what follows.
        let c = count(data, 4, false).unwrap();
        assert_eq!((c.records, c.next), (11, 15));
    }

    #[test]
    fn e2e_latency_comes_from_each_records_stamp() {
        for comp in [Compression::None, Compression::Gzip] {
            let c = count(two_batches(comp, true), 0, true).unwrap();
            assert_eq!(c.latencies_us.len(), 15, "{comp:?}");
            // Stamped 2 ms in the past: each latency is at least that, and not absurd.
            assert!(
                c.latencies_us
                    .iter()
                    .all(|l| (2_000..2_000_000).contains(l)),
                "{:?}",
                c.latencies_us
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut b = BytesMut::from(&two_batches(Compression::None, false)[..]);
        b[8..12].copy_from_slice(&20i32.to_be_bytes());
        assert!(count(b.freeze(), 0, false).is_err());
        let neg = Bytes::from(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(count(neg, 0, false).is_err());
    }
}
