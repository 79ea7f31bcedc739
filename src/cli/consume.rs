//! `sluice consume TOPIC`: fetch records and print them.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, ListOffsetsRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::client::{backoff, Client, TopicInfo, MAX_RETRIES};
use super::errors::{self, KafkaError};
use super::group::{ConsumerGroupMember, MemberConfig, Tp};
use super::records::{decode_fetched, Consumed};
use super::{ConsumeArgs, StartOffset};
use crate::errors::ErrorCode;

/// ListOffsets special timestamps.
pub const LATEST: i64 = -1;
pub const EARLIEST: i64 = -2;
/// First Fetch version whose topics are identified by id.
const TOPIC_ID_VERSION: i16 = 13;
const MAX_WAIT_MS: u64 = 500;
const PARTITION_MAX_BYTES: i32 = 1024 * 1024;
/// Kept below the connection's frame limit.
const FETCH_MAX_BYTES: i32 = 50 * 1024 * 1024;

pub async fn run(args: ConsumeArgs) -> Result<()> {
    let mut client = Client::connect(&args.connect.bootstrap_server).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let stop = async {
        // If the handler cannot be installed, just never stop by signal.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let n = consume(&mut client, &args, &mut out, stop).await?;
    if let Err(e) = out.flush() {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    eprintln!("Processed a total of {n} messages");
    Ok(())
}

/// Appends one record in kafka-console-consumer's layout:
/// `[Offset:N\t][KEY\t]VALUE\n`, with "null" for absent key or value.
pub fn format_record(r: &Consumed, print_key: bool, print_offset: bool, out: &mut Vec<u8>) {
    if print_offset {
        out.extend_from_slice(format!("Offset:{}\t", r.offset).as_bytes());
    }
    if print_key {
        out.extend_from_slice(r.key.as_deref().unwrap_or(b"null"));
        out.push(b'\t');
    }
    out.extend_from_slice(r.value.as_deref().unwrap_or(b"null"));
    out.push(b'\n');
}

struct Position {
    offset: i64,
    max_bytes: i32,
}

/// Consumes until `--max-messages`, `--timeout-ms` of silence, `stop`
/// resolving, or a broken output pipe. Returns the number printed.
pub async fn consume<W: Write>(
    client: &mut Client,
    args: &ConsumeArgs,
    out: &mut W,
    stop: impl Future<Output = ()>,
) -> Result<u64> {
    let mut printed = 0u64;
    tokio::pin!(stop);
    let Some(settings) = group_settings(args)? else {
        let work = consume_loop(client, args, out, &mut printed, None);
        tokio::select! {
            r = work => r?,
            _ = &mut stop => {}
        }
        return Ok(printed);
    };
    // Fail on a missing topic before joining a group for it.
    client.topic(&args.topic).await?;
    #[allow(unused_mut)]
    let mut member =
        ConsumerGroupMember::connect(&args.connect.bootstrap_server, settings.member.clone())
            .await?;
    // Tests that play an older client speak its versions to the coordinator too.
    #[cfg(test)]
    member.group.client.cap_versions(&client.version_caps());
    let mut group = ConsumerGroupRun {
        member,
        settings,
        consumed: BTreeMap::new(),
        committed: BTreeMap::new(),
        last_commit: Instant::now(),
    };
    let work = consume_loop(client, args, out, &mut printed, Some(&mut group));
    let result = tokio::select! {
        r = work => r,
        _ = &mut stop => Ok(()),
    };
    // Whatever ended the loop, what was printed is committed, so the group resumes right after
    // it; then the member leaves, so the others need not wait out its session.
    let _ = flush_out(out);
    let finished = group.finish(&args.topic).await;
    result?;
    finished?;
    Ok(printed)
}

/// What `auto.offset.reset` says for a partition the group has no offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
    /// Fail, as the Java consumer does with `none`.
    None,
}

/// `consume --group` settings, from `--group`, `--from-beginning` and `--consumer-property`.
#[derive(Debug, Clone)]
pub struct ConsumerGroupSettings {
    pub member: MemberConfig,
    pub reset: OffsetReset,
    pub auto_commit: bool,
    pub commit_interval: Duration,
}

/// The group settings of `args`, or None without a group. Contradictions are errors, as
/// kafka-console-consumer reports them.
pub fn group_settings(args: &ConsumeArgs) -> Result<Option<ConsumerGroupSettings>> {
    let props: HashMap<&str, &str> = args
        .consumer_properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let group_id = match (args.group.as_deref(), props.get("group.id")) {
        (Some(a), Some(b)) if a != *b => bail!(
            "the group ids given with --group ('{a}') and --consumer-property group.id ('{b}') differ"
        ),
        (Some(g), _) | (None, Some(&g)) => g,
        (None, None) => return Ok(None),
    };
    if group_id.is_empty() {
        bail!("the group id must not be empty");
    }
    if args.partition.is_some() || args.offset.is_some() {
        bail!("--partition and --offset cannot be used with a consumer group");
    }
    let ms = |key: &str, default: u64| -> Result<Duration> {
        match props.get(key) {
            None => Ok(Duration::from_millis(default)),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 && n <= i32::MAX as u64 => Ok(Duration::from_millis(n)),
                _ => bail!("{key} must be a positive number of milliseconds, got '{v}'"),
            },
        }
    };
    let mut member = MemberConfig::new(group_id, &[args.topic.as_str()]);
    member.session_timeout = ms(
        "session.timeout.ms",
        member.session_timeout.as_millis() as u64,
    )?;
    member.heartbeat_interval = ms(
        "heartbeat.interval.ms",
        member.heartbeat_interval.as_millis() as u64,
    )?;
    member.rebalance_timeout = ms(
        "max.poll.interval.ms",
        member.rebalance_timeout.as_millis() as u64,
    )?;
    member.join_timeout = member.rebalance_timeout + Duration::from_secs(60);
    if member.heartbeat_interval >= member.session_timeout {
        bail!("heartbeat.interval.ms must be lower than session.timeout.ms");
    }
    member.group_instance_id = props
        .get("group.instance.id")
        .filter(|v| !v.is_empty())
        .map(|v| v.to_string());
    let reset = match (props.get("auto.offset.reset").copied(), args.from_beginning) {
        (None, false) => OffsetReset::Latest,
        (None | Some("earliest"), true) | (Some("earliest"), false) => OffsetReset::Earliest,
        (Some("latest"), false) => OffsetReset::Latest,
        (Some("none"), false) => OffsetReset::None,
        (Some(v @ ("latest" | "none")), true) => {
            bail!("--from-beginning contradicts auto.offset.reset={v}")
        }
        (Some(v), _) => bail!("auto.offset.reset must be earliest, latest or none, got '{v}'"),
    };
    let auto_commit = match props.get("enable.auto.commit").copied() {
        None | Some("true") => true,
        Some("false") => false,
        Some(v) => bail!("enable.auto.commit must be true or false, got '{v}'"),
    };
    let commit_interval = ms("auto.commit.interval.ms", 5000)?;
    for k in props.keys() {
        const KNOWN: &[&str] = &[
            "group.id",
            "group.instance.id",
            "auto.offset.reset",
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "max.poll.interval.ms",
            "enable.auto.commit",
            "auto.commit.interval.ms",
        ];
        if !KNOWN.contains(k) {
            tracing::warn!("consumer property '{k}' is not used by this consumer; ignored");
        }
    }
    Ok(Some(ConsumerGroupSettings {
        member,
        reset,
        auto_commit,
        commit_interval,
    }))
}

/// A group consumer's membership and what it has printed.
struct ConsumerGroupRun {
    member: ConsumerGroupMember,
    settings: ConsumerGroupSettings,
    /// Per assigned partition: the offset after the last record printed (or where consumption
    /// starts), i.e. what to commit.
    consumed: BTreeMap<i32, i64>,
    /// What the group last had committed for each assigned partition.
    committed: BTreeMap<i32, i64>,
    last_commit: Instant,
}

impl ConsumerGroupRun {
    /// Commits the consumed offsets that moved. A failure is reported as a warning (the
    /// records will be read again by whoever gets the partition), as the Java consumer's auto
    /// commit does; a member whose generation ended finds out at its next poll.
    async fn commit(&mut self, topic: &str) {
        self.last_commit = Instant::now();
        if !self.settings.auto_commit || self.member.generation() < 0 {
            return;
        }
        let moved: BTreeMap<Tp, i64> = self
            .consumed
            .iter()
            .filter(|(p, o)| self.committed.get(p) != Some(o))
            .map(|(p, o)| ((topic.to_string(), *p), *o))
            .collect();
        if moved.is_empty() {
            return;
        }
        match self.member.commit(&moved).await {
            Ok(()) => {
                for ((_, p), o) in moved {
                    self.committed.insert(p, o);
                }
            }
            Err(e) => tracing::warn!("could not commit offsets: {e:#}"),
        }
    }

    /// Joins (again) and returns the start offsets of this member's partitions of `topic`:
    /// the committed ones, else per `auto.offset.reset`.
    async fn join(
        &mut self,
        client: &mut Client,
        topic: &mut TopicInfo,
    ) -> Result<BTreeMap<i32, i64>> {
        let name = topic.name().to_string();
        let assignment = self.member.join().await?;
        let parts: Vec<i32> = assignment.partitions_of(&name).to_vec();
        *topic = client.topic(&name).await?;
        let tps: Vec<Tp> = parts.iter().map(|p| (name.clone(), *p)).collect();
        let committed = self.member.committed(&tps).await?;
        let mut starts = BTreeMap::new();
        let mut missing = Vec::new();
        for p in &parts {
            match committed.get(&(name.clone(), *p)) {
                Some(o) if *o >= 0 => {
                    starts.insert(*p, *o);
                }
                _ => missing.push(*p),
            }
        }
        self.committed = starts.clone();
        if !missing.is_empty() {
            let at = match self.settings.reset {
                OffsetReset::Earliest => EARLIEST,
                OffsetReset::Latest => LATEST,
                OffsetReset::None => bail!(
                    "group '{}' has no committed offset for topic '{name}' partition {} and auto.offset.reset is none",
                    self.settings.member.group_id,
                    missing[0]
                ),
            };
            starts.extend(list_offsets(client, topic, &missing, at).await?);
        }
        self.consumed = starts.clone();
        Ok(starts)
    }

    /// The final commit and LeaveGroup, bounded by the group calls' own timeouts.
    async fn finish(&mut self, topic: &str) -> Result<()> {
        if self.member.is_member() {
            self.commit(topic).await;
        }
        self.member.leave().await
    }
}

async fn consume_loop<W: Write>(
    client: &mut Client,
    args: &ConsumeArgs,
    out: &mut W,
    printed: &mut u64,
    mut group: Option<&mut ConsumerGroupRun>,
) -> Result<()> {
    let mut topic = client.topic(&args.topic).await?;
    if let Some(g) = group.as_deref_mut() {
        let starts = g.join(client, &mut topic).await?;
        return consume_positions(client, args, out, printed, group, topic, starts).await;
    }
    let partitions: Vec<i32> = match args.partition {
        Some(p) if (0..topic.partition_count()).contains(&p) => vec![p],
        Some(p) => bail!(
            "partition {p} of topic '{}' does not exist (it has {} partitions)",
            args.topic,
            topic.partition_count()
        ),
        None => (0..topic.partition_count()).collect(),
    };
    let start = match (args.offset, args.from_beginning) {
        (Some(o), _) => o,
        (None, true) => StartOffset::Earliest,
        (None, false) => StartOffset::Latest,
    };
    let initial: BTreeMap<i32, i64> = match start {
        StartOffset::At(o) => partitions.iter().map(|p| (*p, o)).collect(),
        StartOffset::Earliest => list_offsets(client, &mut topic, &partitions, EARLIEST)
            .await?
            .into_iter()
            .collect(),
        StartOffset::Latest => list_offsets(client, &mut topic, &partitions, LATEST)
            .await?
            .into_iter()
            .collect(),
    };
    consume_positions(client, args, out, printed, None, topic, initial).await
}

fn positions_at(starts: BTreeMap<i32, i64>) -> BTreeMap<i32, Position> {
    starts
        .into_iter()
        .map(|(p, offset)| {
            (
                p,
                Position {
                    offset,
                    max_bytes: PARTITION_MAX_BYTES,
                },
            )
        })
        .collect()
}

/// The fetch loop from `starts`; with a group, it also heartbeats' news, rejoins, and commits.
async fn consume_positions<W: Write>(
    client: &mut Client,
    args: &ConsumeArgs,
    out: &mut W,
    printed: &mut u64,
    mut group: Option<&mut ConsumerGroupRun>,
    mut topic: TopicInfo,
    starts: BTreeMap<i32, i64>,
) -> Result<()> {
    let mut positions = positions_at(starts);
    if args.max_messages == Some(0) {
        return Ok(());
    }
    let timeout = args.timeout_ms.map(Duration::from_millis);
    let max_wait = timeout.map_or(MAX_WAIT_MS, |t| (t.as_millis() as u64).min(MAX_WAIT_MS));
    let mut last_record = Instant::now();
    let mut stale_rounds = 0u32;
    let mut buf = Vec::new();

    loop {
        if let Some(g) = group.as_deref_mut() {
            if g.member.poll().await? {
                // Commit before giving the partitions up, so their next owner starts right
                // after what we printed (the generation is still valid while the group
                // prepares the rebalance).
                g.commit(&args.topic).await;
                positions = positions_at(g.join(client, &mut topic).await?);
                // Time spent rejoining is not silence from the topic.
                last_record = Instant::now();
            } else if g.last_commit.elapsed() >= g.settings.commit_interval {
                g.commit(&args.topic).await;
            }
            if positions.is_empty() {
                // Nothing assigned (more members than partitions): wait for a rebalance.
                tokio::time::sleep(Duration::from_millis(max_wait.min(200))).await;
                if timeout.is_some_and(|t| last_record.elapsed() >= t) {
                    return Ok(());
                }
                continue;
            }
        }
        // Send one fetch to every leader first, then collect the answers,
        // so brokers wait for data concurrently.
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        let mut stale: Option<String> = None;
        for p in positions.keys() {
            match topic.leader(*p) {
                Some(l) => by_leader.entry(l).or_default().push(*p),
                None => {
                    stale = Some(format!(
                        "topic '{}' partition {p} has no leader (LEADER_NOT_AVAILABLE)",
                        args.topic
                    ))
                }
            }
        }
        let mut sent = Vec::new();
        for (leader, parts) in &by_leader {
            match send_fetch(client, &topic, &positions, *leader, parts, max_wait).await {
                Ok(()) => sent.push(*leader),
                Err(e) => {
                    client.drop_broker(*leader);
                    stale = Some(format!("{e:#}"));
                }
            }
        }
        let mut progressed = false;
        let mut out_of_range = Vec::new();
        for leader in sent {
            let Some(conn) = client.existing_broker(leader) else {
                continue;
            };
            let resp = match conn
                .recv::<FetchRequest>(Duration::from_millis(max_wait))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    client.drop_broker(leader);
                    stale = Some(format!("{e:#}"));
                    continue;
                }
            };
            errors::check(resp.error_code, "fetch", None)?;
            for t in resp.responses {
                let ours = t.topic.0.as_str() == args.topic
                    || (!t.topic_id.is_nil() && t.topic_id == topic.raw.topic_id);
                if !ours {
                    continue;
                }
                for pd in t.partitions {
                    let p = pd.partition_index;
                    let Some(pos) = positions.get_mut(&p) else {
                        continue;
                    };
                    let subject = format!("topic '{}' partition {p}", args.topic);
                    match ErrorCode::from_code(pd.error_code) {
                        Some(ErrorCode::None) => {}
                        Some(ErrorCode::OffsetOutOfRange) => {
                            // Resolved after this round: other connections
                            // may still owe us a fetch response, so no new
                            // requests may be interleaved now.
                            out_of_range.push(p);
                            continue;
                        }
                        _ if errors::is_stale_metadata(pd.error_code) => {
                            let e = KafkaError::new(pd.error_code, &subject, None);
                            stale = Some(e.to_string());
                            continue;
                        }
                        _ => return Err(KafkaError::new(pd.error_code, &subject, None).into()),
                    }
                    let Some(data) = pd.records.filter(|d| !d.is_empty()) else {
                        continue;
                    };
                    let (records, next) = decode_fetched(data, pos.offset)?;
                    if next == pos.offset {
                        // Only a partial batch fit: the next batch is larger
                        // than our per-partition limit, so raise it.
                        pos.max_bytes = pos.max_bytes.saturating_mul(2).min(FETCH_MAX_BYTES);
                        continue;
                    }
                    pos.offset = next;
                    progressed = true;
                    for r in &records {
                        buf.clear();
                        format_record(r, args.print_key, args.print_offset, &mut buf);
                        if !write_out(out, &buf)? {
                            return Ok(()); // reader went away (e.g. `| head`)
                        }
                        *printed += 1;
                        if let Some(g) = group.as_deref_mut() {
                            g.consumed.insert(p, r.offset + 1);
                        }
                        last_record = Instant::now();
                        if args.max_messages.is_some_and(|m| *printed >= m) {
                            let _ = flush_out(out)?;
                            return Ok(());
                        }
                    }
                    // Past the whole fetched range (control records and gaps included).
                    if let Some(g) = group.as_deref_mut() {
                        g.consumed.insert(p, next);
                    }
                }
            }
        }
        if !flush_out(out)? {
            return Ok(());
        }
        for p in out_of_range {
            let Some(pos) = positions.get_mut(&p) else {
                continue;
            };
            let reset = reset_offset(client, &mut topic, p, pos.offset).await?;
            tracing::warn!(
                "topic '{}' partition {p}: offset {} is out of range, continuing at {reset}",
                args.topic,
                pos.offset
            );
            pos.offset = reset;
            if let Some(g) = group.as_deref_mut() {
                g.consumed.insert(p, reset);
            }
        }
        if let Some(why) = stale {
            stale_rounds += 1;
            if stale_rounds > MAX_RETRIES {
                if !progressed {
                    bail!("giving up after {MAX_RETRIES} metadata refreshes: {why}");
                }
                // Other partitions still deliver, so keep going, but say
                // why this one is stuck.
                tracing::warn!("still retrying: {why}");
            }
            tracing::debug!("refreshing metadata: {why}");
            tokio::time::sleep(backoff(stale_rounds)).await;
            topic = client.topic(&args.topic).await?;
        } else {
            stale_rounds = 0;
        }
        if timeout.is_some_and(|t| last_record.elapsed() >= t) {
            return Ok(());
        }
    }
}

/// Writes `buf`; returns false if the output pipe is closed.
fn write_out<W: Write>(out: &mut W, buf: &[u8]) -> Result<bool> {
    match out.write_all(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn flush_out<W: Write>(out: &mut W) -> Result<bool> {
    match out.flush() {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn send_fetch(
    client: &mut Client,
    topic: &TopicInfo,
    positions: &BTreeMap<i32, Position>,
    leader: i32,
    parts: &[i32],
    max_wait_ms: u64,
) -> Result<()> {
    let conn = client.broker(leader).await?;
    let cap = if topic.has_topic_id() {
        i16::MAX
    } else {
        TOPIC_ID_VERSION - 1
    };
    let version = conn.version_for_max(ApiKey::Fetch, cap)?;
    let mut ft = FetchTopic::default();
    // Both set; the encoder writes the one this version uses.
    ft.topic = TopicName(StrBytes::from_string(topic.name().to_string()));
    ft.topic_id = topic.raw.topic_id;
    ft.partitions = parts
        .iter()
        .filter_map(|p| positions.get(p).map(|pos| (p, pos)))
        .map(|(p, pos)| {
            let mut fp = FetchPartition::default();
            fp.partition = *p;
            fp.fetch_offset = pos.offset;
            fp.partition_max_bytes = pos.max_bytes;
            fp
        })
        .collect();
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = i32::try_from(max_wait_ms).unwrap_or(i32::MAX);
    req.min_bytes = 1;
    req.max_bytes = FETCH_MAX_BYTES;
    // read_uncommitted, as kafka-console-consumer by default.
    req.isolation_level = 0;
    // session_id 0 / epoch -1 (the defaults): full fetches, no session.
    req.topics = vec![ft];
    conn.send(&req, version, true).await
}

/// Resolves `timestamp` (EARLIEST / LATEST) to offsets for `partitions`,
/// asking each leader and refreshing metadata on stale-leader errors.
pub async fn list_offsets(
    client: &mut Client,
    topic: &mut TopicInfo,
    partitions: &[i32],
    timestamp: i64,
) -> Result<HashMap<i32, i64>> {
    let mut result = HashMap::new();
    let mut attempt = 0;
    loop {
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        let mut stale = None;
        for p in partitions.iter().filter(|p| !result.contains_key(*p)) {
            match topic.leader(*p) {
                Some(l) => by_leader.entry(l).or_default().push(*p),
                None => {
                    stale = Some(format!(
                        "topic '{}' partition {p} has no leader (LEADER_NOT_AVAILABLE)",
                        topic.name()
                    ))
                }
            }
        }
        for (leader, parts) in by_leader {
            match list_offsets_once(client, topic, leader, &parts, timestamp).await {
                Ok(answers) => {
                    for (p, code, offset) in answers {
                        let subject = format!("topic '{}' partition {p}", topic.name());
                        match errors::check(code, &subject, None) {
                            Ok(()) => {
                                result.insert(p, offset);
                            }
                            Err(e) if e.is_stale_metadata() => stale = Some(e.to_string()),
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Err(e) => {
                    client.drop_broker(leader);
                    stale = Some(format!("{e:#}"));
                }
            }
        }
        let Some(why) = stale else {
            return Ok(result);
        };
        attempt += 1;
        if attempt > MAX_RETRIES {
            bail!("could not look up offsets after {MAX_RETRIES} retries: {why}");
        }
        tokio::time::sleep(backoff(attempt)).await;
        *topic = client.topic(topic.name().to_string().as_str()).await?;
    }
}

async fn list_offsets_once(
    client: &mut Client,
    topic: &TopicInfo,
    leader: i32,
    parts: &[i32],
    timestamp: i64,
) -> Result<Vec<(i32, i16, i64)>> {
    let conn = client.broker(leader).await?;
    let version = conn.version_for(ApiKey::ListOffsets)?;
    let mut t = ListOffsetsTopic::default();
    t.name = TopicName(StrBytes::from_string(topic.name().to_string()));
    t.partitions = parts
        .iter()
        .map(|p| {
            let mut lp = ListOffsetsPartition::default();
            lp.partition_index = *p;
            lp.timestamp = timestamp;
            lp
        })
        .collect();
    let mut req = ListOffsetsRequest::default();
    // -1 marks a consumer; the generated default (0) would claim to be
    // broker 0 replicating.
    req.replica_id = BrokerId(-1);
    req.topics = vec![t];
    req.timeout_ms = 30_000;
    let resp = conn.call(&req, version).await?;
    let mut out = Vec::new();
    for t in resp
        .topics
        .iter()
        .filter(|t| t.name.0.as_str() == topic.name())
    {
        for p in &t.partitions {
            out.push((p.partition_index, p.error_code, p.offset));
        }
    }
    for p in parts {
        if !out.iter().any(|(q, _, _)| q == p) {
            return Err(anyhow!(
                "broker {leader} did not return an offset for topic '{}' partition {p}",
                topic.name()
            ));
        }
    }
    Ok(out)
}

/// Where to continue after OFFSET_OUT_OF_RANGE: the log start if we were
/// before it (data was deleted), else the log end.
async fn reset_offset(
    client: &mut Client,
    topic: &mut TopicInfo,
    partition: i32,
    offset: i64,
) -> Result<i64> {
    let earliest = list_offsets(client, topic, &[partition], EARLIEST).await?;
    let earliest = earliest.get(&partition).copied().unwrap_or(0);
    if offset < earliest {
        return Ok(earliest);
    }
    let latest = list_offsets(client, topic, &[partition], LATEST).await?;
    Ok(latest.get(&partition).copied().unwrap_or(earliest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn record_formatting() {
        let r = Consumed {
            offset: 7,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"v")),
        };
        let mut b = Vec::new();
        format_record(&r, false, false, &mut b);
        assert_eq!(b, b"v\n");
        b.clear();
        format_record(&r, true, true, &mut b);
        assert_eq!(b, b"Offset:7\tk\tv\n");
        let r = Consumed {
            offset: 0,
            key: None,
            value: None,
        };
        b.clear();
        format_record(&r, true, false, &mut b);
        assert_eq!(b, b"null\tnull\n");
    }
}
