//! `sluice produce TOPIC`: stdin lines -> records.
//!
//! A reader task turns stdin into batches (every `--batch-size` lines, or
//! as soon as no more input is buffered, so interactive lines go out at
//! once). The main task assigns partitions, encodes one record batch per
//! partition and keeps up to `--max-in-flight` produce requests outstanding
//! per leader, so large inputs are limited by bandwidth, not round trips.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, Read};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;
use tokio::sync::mpsc;

use super::client::{backoff, Client, TopicInfo, MAX_RETRIES};
use super::errors::{self, KafkaError};
use super::records::{encode_batch, partition_for_key, Message};
use super::ProduceArgs;
use crate::errors::ErrorCode;

/// Flush a batch once its payload reaches this size, whatever the line
/// count, to stay well below brokers' default 1 MiB message.max.bytes.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Broker-side wait for replication acknowledgements.
const PRODUCE_TIMEOUT_MS: i32 = 30_000;
/// First version whose topics are identified by id rather than name.
const TOPIC_ID_VERSION: i16 = 13;
const STDIN_BUFFER: usize = 256 * 1024;

pub async fn run(args: ProduceArgs) -> Result<()> {
    let mut client = Client::connect(&args.connect.bootstrap_server).await?;
    client.auto_create_topics = true;
    let n = produce(&mut client, &args, std::io::stdin()).await?;
    tracing::debug!(records = n, topic = %args.topic, "produce finished");
    Ok(())
}

/// Splits a line into key and value at the first `sep`, or returns the whole
/// line as value (null key) when there is no separator configured.
pub fn parse_line(line: &[u8], sep: Option<&[u8]>) -> Result<Message, String> {
    let Some(sep) = sep else {
        return Ok(Message {
            key: None,
            value: Bytes::copy_from_slice(line),
        });
    };
    let at = line
        .windows(sep.len())
        .position(|w| w == sep)
        .ok_or_else(|| "no key separator found".to_string())?;
    Ok(Message {
        key: Some(Bytes::copy_from_slice(&line[..at])),
        value: Bytes::copy_from_slice(&line[at + sep.len()..]),
    })
}

/// Reads lines from `input` and sends them in batches. A batch is cut when it
/// reaches `batch_lines` lines or [`MAX_BATCH_BYTES`], or when the read
/// buffer is empty: the next read would have to wait on the input.
///
/// Runs on a plain thread with blocking reads: a read from a terminal cannot
/// be cancelled, and on tokio's blocking pool it would stall runtime
/// shutdown (and so the error exit) until the user pressed Enter.
fn read_batches<R: Read>(
    input: R,
    sep: Option<Vec<u8>>,
    batch_lines: usize,
    tx: mpsc::Sender<Result<Vec<Message>>>,
) {
    let mut reader = std::io::BufReader::with_capacity(STDIN_BUFFER, input);
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    let mut line_no = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(anyhow!(e).context("reading stdin")));
                return;
            }
        }
        line_no += 1;
        // Strip the terminator like kafka-console-producer (also CRLF).
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        match parse_line(&line, sep.as_deref()) {
            Ok(m) => {
                bytes += m.value.len() + m.key.as_ref().map_or(0, |k| k.len());
                batch.push(m);
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(anyhow!("line {line_no}: {e}")));
                return;
            }
        }
        if batch.len() >= batch_lines || bytes >= MAX_BATCH_BYTES || reader.buffer().is_empty() {
            bytes = 0;
            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                return; // producer gave up; it reports why
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

/// One partition's record batch, kept until acknowledged so it can be
/// re-sent to a new leader.
struct PartBatch {
    partition: i32,
    data: Bytes,
    count: u64,
    attempts: u32,
    last_error: Option<String>,
}

struct Producer<'a> {
    client: &'a mut Client,
    topic: TopicInfo,
    name: String,
    acks: i16,
    max_in_flight: usize,
    /// Batches of each outstanding request, per broker, in send order
    /// (matching the connection's own FIFO of pending responses).
    in_flight: HashMap<i32, VecDeque<Vec<PartBatch>>>,
    retry: Vec<PartBatch>,
    acked: u64,
}

/// Produces every line of `input` to `args.topic`; returns the number of
/// records acknowledged (or sent, with acks=0).
pub async fn produce<R>(client: &mut Client, args: &ProduceArgs, input: R) -> Result<u64>
where
    R: Read + Send + 'static,
{
    let topic = client.topic(&args.topic).await?;
    let partitions = topic.partition_count();
    if partitions == 0 {
        bail!("topic '{}' has no partitions", args.topic);
    }
    if let Some(p) = args.partition {
        if !(0..partitions).contains(&p) {
            bail!(
                "partition {p} of topic '{}' does not exist (it has {partitions} partitions)",
                args.topic
            );
        }
    }
    let compression: Compression = args.compression.into();
    let (tx, mut rx) = mpsc::channel(4);
    let sep = args.key_separator.as_ref().map(|s| s.as_bytes().to_vec());
    let batch_lines = args.batch_size as usize;
    std::thread::Builder::new()
        .name("stdin-reader".into())
        .spawn(move || read_batches(input, sep, batch_lines, tx))?;

    let mut p = Producer {
        client,
        topic,
        name: args.topic.clone(),
        acks: args.acks,
        max_in_flight: args.max_in_flight as usize,
        in_flight: HashMap::new(),
        retry: Vec::new(),
        acked: 0,
    };
    // Start round-robin at a varying partition so repeated one-line runs
    // do not all land on partition 0.
    let mut next_rr = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as i32 & 0x7fff_ffff)
        % partitions;

    let result = async {
        loop {
            // While input keeps coming, requests stay pipelined. When it
            // pauses (interactive use), settle what is outstanding first, so
            // acknowledgements and errors surface now rather than at EOF.
            let next = match rx.try_recv() {
                Ok(b) => Some(b),
                Err(mpsc::error::TryRecvError::Empty) => {
                    p.drain().await?;
                    rx.recv().await
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(batch) = next else { break };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    // Lines before the bad one were sent; settle them so
                    // the error is the only surprise.
                    p.drain().await?;
                    return Err(e);
                }
            };
            let rr = next_rr;
            next_rr = (next_rr + 1) % partitions;
            let mut by_partition: BTreeMap<i32, Vec<Message>> = BTreeMap::new();
            for m in batch {
                let part = match (args.partition, &m.key) {
                    (Some(p), _) => p,
                    (None, Some(k)) => partition_for_key(k, partitions),
                    (None, None) => rr,
                };
                by_partition.entry(part).or_default().push(m);
            }
            let now = now_ms();
            let mut batches = Vec::with_capacity(by_partition.len());
            for (partition, msgs) in by_partition {
                batches.push(PartBatch {
                    partition,
                    data: encode_batch(&msgs, compression, now)?,
                    count: msgs.len() as u64,
                    attempts: 0,
                    last_error: None,
                });
            }
            p.send(batches).await?;
            p.retry_failed().await?;
        }
        p.drain().await
    }
    .await;
    // Dropping the receiver makes the reader thread stop at its next send;
    // one blocked reading a terminal is simply left behind at exit.
    drop(rx);
    result?;
    Ok(p.acked)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Producer<'_> {
    /// Sends `batches` to their partitions' leaders, waiting for old
    /// responses first where a connection is at its in-flight limit.
    async fn send(&mut self, batches: Vec<PartBatch>) -> Result<()> {
        let mut by_leader: BTreeMap<i32, Vec<PartBatch>> = BTreeMap::new();
        for b in batches {
            match self.topic.leader(b.partition) {
                Some(l) => by_leader.entry(l).or_default().push(b),
                None => self.retry.push(PartBatch {
                    last_error: Some(format!(
                        "{} (LEADER_NOT_AVAILABLE)",
                        self.subject(b.partition)
                    )),
                    ..b
                }),
            }
        }
        for (leader, batches) in by_leader {
            while self
                .in_flight
                .get(&leader)
                .is_some_and(|q| q.len() >= self.max_in_flight)
            {
                self.await_one(leader).await?;
            }
            if let Err(e) = self.send_to(leader, &batches).await {
                tracing::debug!(leader, "send failed: {e:#}");
                self.broker_failed(leader, batches, &e);
            } else if self.acks != 0 {
                self.in_flight.entry(leader).or_default().push_back(batches);
            } else {
                self.acked += batches.iter().map(|b| b.count).sum::<u64>();
            }
        }
        Ok(())
    }

    async fn send_to(&mut self, leader: i32, batches: &[PartBatch]) -> Result<()> {
        let cap = self.max_version();
        let mut topic = TopicProduceData::default();
        // Both are set; the encoder writes the one the version uses.
        topic.name = TopicName(StrBytes::from_string(self.name.clone()));
        topic.topic_id = self.topic.raw.topic_id;
        topic.partition_data = batches
            .iter()
            .map(|b| {
                let mut d = PartitionProduceData::default();
                d.index = b.partition;
                d.records = Some(b.data.clone());
                d
            })
            .collect();
        let mut req = ProduceRequest::default();
        req.acks = self.acks;
        req.timeout_ms = PRODUCE_TIMEOUT_MS;
        req.topic_data = vec![topic];
        let conn = self.client.broker(leader).await?;
        let version = conn.version_for_max(ApiKey::Produce, cap)?;
        conn.send(&req, version, self.acks != 0).await
    }

    fn max_version(&self) -> i16 {
        if self.topic.has_topic_id() {
            i16::MAX
        } else {
            TOPIC_ID_VERSION - 1
        }
    }

    fn subject(&self, partition: i32) -> String {
        format!("topic '{}' partition {partition}", self.name)
    }

    /// Reads the oldest outstanding response from `leader` and settles its
    /// batches: acknowledged, queued for retry, or a hard error.
    async fn await_one(&mut self, leader: i32) -> Result<()> {
        let Some(batches) = self.in_flight.get_mut(&leader).and_then(|q| q.pop_front()) else {
            return Ok(());
        };
        let res = match self.client.existing_broker(leader) {
            Some(conn) => {
                conn.recv::<ProduceRequest>(Duration::from_millis(PRODUCE_TIMEOUT_MS as u64))
                    .await
            }
            None => Err(anyhow!("connection to broker {leader} was closed")),
        };
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(leader, "produce response failed: {e:#}");
                self.broker_failed(leader, batches, &e);
                return Ok(());
            }
        };
        let topic_resp = resp.responses.iter().find(|t| {
            t.name.0.as_str() == self.name
                || (!t.topic_id.is_nil() && t.topic_id == self.topic.raw.topic_id)
        });
        for b in batches {
            let pr = topic_resp.and_then(|t| {
                t.partition_responses
                    .iter()
                    .find(|p| p.index == b.partition)
            });
            let Some(pr) = pr else {
                bail!(
                    "broker {leader} did not answer for {}",
                    self.subject(b.partition)
                );
            };
            match errors::check(
                pr.error_code,
                &self.subject(b.partition),
                pr.error_message.as_deref(),
            ) {
                Ok(()) => self.acked += b.count,
                Err(e) if e.is_stale_metadata() || is_transient(e.code) => {
                    self.retry.push(PartBatch {
                        last_error: Some(e.to_string()),
                        ..b
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// After an I/O error with `leader`, everything sent there is unconfirmed:
    /// queue it all for retry (possibly duplicating records the broker did
    /// write: at-least-once, like the Java producer without idempotence).
    fn broker_failed(&mut self, leader: i32, batches: Vec<PartBatch>, e: &anyhow::Error) {
        self.client.drop_broker(leader);
        let msg = format!("{e:#}");
        let queued = self.in_flight.remove(&leader).unwrap_or_default();
        for b in batches.into_iter().chain(queued.into_iter().flatten()) {
            self.retry.push(PartBatch {
                last_error: Some(msg.clone()),
                ..b
            });
        }
    }

    /// Re-sends failed batches after refreshing metadata, a bounded number
    /// of times per batch.
    async fn retry_failed(&mut self) -> Result<()> {
        while !self.retry.is_empty() {
            let mut batches = std::mem::take(&mut self.retry);
            let mut attempt = 0;
            for b in &mut batches {
                b.attempts += 1;
                attempt = attempt.max(b.attempts);
                if b.attempts > MAX_RETRIES {
                    let why = b.last_error.clone().unwrap_or_default();
                    bail!(
                        "giving up on {} after {MAX_RETRIES} retries: {why}",
                        self.subject(b.partition)
                    );
                }
            }
            tokio::time::sleep(backoff(attempt)).await;
            match self.client.topic(&self.name).await {
                Ok(t) => self.topic = t,
                // A missing topic is final; other refresh failures count
                // as one more attempt.
                Err(e) if is_unknown_topic(&e) => return Err(e),
                Err(e) => tracing::debug!("metadata refresh failed: {e:#}"),
            }
            self.send(batches).await?;
        }
        Ok(())
    }

    /// Waits for every outstanding request, retrying failures, until all
    /// records are acknowledged or one fails for good.
    async fn drain(&mut self) -> Result<()> {
        loop {
            let leaders: Vec<i32> = self
                .in_flight
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(l, _)| *l)
                .collect();
            if leaders.is_empty() && self.retry.is_empty() {
                return Ok(());
            }
            for l in leaders {
                while self.in_flight.get(&l).is_some_and(|q| !q.is_empty()) {
                    self.await_one(l).await?;
                }
            }
            self.retry_failed().await?;
        }
    }
}

fn is_transient(code: i16) -> bool {
    matches!(
        ErrorCode::from_code(code),
        Some(
            ErrorCode::RequestTimedOut
                | ErrorCode::NetworkException
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::NotEnoughReplicasAfterAppend
        )
    )
}

fn is_unknown_topic(e: &anyhow::Error) -> bool {
    e.downcast_ref::<KafkaError>()
        .is_some_and(|k| k.code == ErrorCode::UnknownTopicOrPartition.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_separator_parsing() {
        let m = parse_line(b"k1:v1", Some(b":")).unwrap();
        assert_eq!(m.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(&m.value[..], b"v1");
        // Only the first separator splits.
        let m = parse_line(b"a::b:c", Some(b"::")).unwrap();
        assert_eq!(m.key.as_deref(), Some(&b"a"[..]));
        assert_eq!(&m.value[..], b"b:c");
        // Empty key and value are allowed.
        let m = parse_line(b":", Some(b":")).unwrap();
        assert_eq!(m.key.as_deref(), Some(&b""[..]));
        assert_eq!(&m.value[..], b"");
        // Multi-byte separators, including the tab kafka users like.
        let m = parse_line("ключ\tзначение".as_bytes(), Some(b"\t")).unwrap();
        assert_eq!(m.key.as_deref(), Some("ключ".as_bytes()));
        assert!(parse_line(b"novalue", Some(b":")).is_err());
        // Without a separator the whole line is the value.
        let m = parse_line(b"a:b", None).unwrap();
        assert_eq!(m.key, None);
        assert_eq!(&m.value[..], b"a:b");
    }

    #[test]
    fn reader_batches_by_count_and_reports_bad_lines() {
        let input = std::io::Cursor::new(b"a\nb\r\nc\nd\ne".to_vec());
        let (tx, mut rx) = mpsc::channel(10);
        read_batches(input, None, 2, tx);
        let mut all = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            let b = b.unwrap();
            assert!(!b.is_empty() && b.len() <= 2);
            all.extend(b.into_iter().map(|m| m.value));
        }
        assert_eq!(all, vec!["a", "b", "c", "d", "e"]);

        let input = std::io::Cursor::new(b"k:v\nbad\n".to_vec());
        let (tx, mut rx) = mpsc::channel(10);
        read_batches(input, Some(b":".to_vec()), 100, tx);
        let mut saw_err = false;
        while let Some(b) = rx.blocking_recv() {
            if let Err(e) = b {
                assert!(e.to_string().contains("line 2"), "{e}");
                saw_err = true;
            }
        }
        assert!(saw_err);
    }
}
