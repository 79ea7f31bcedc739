//! Client verbs of the `sluice` CLI (`topics`, `produce`, `consume`).
//!
//! They speak the Kafka wire protocol, so they work against sluice and any
//! other Kafka-compatible broker.

use clap::{Args, Subcommand, ValueEnum};

pub mod acls;
pub mod bench;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod conn;
pub mod consume;
pub mod errors;
pub mod group;
pub mod groups;
pub mod produce;
pub mod records;
pub mod security;
pub mod topics;
pub mod users;

/// Where to find the cluster; shared by every verb.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Broker to bootstrap from (comma-separated list allowed).
    #[arg(
        long = "bootstrap-server",
        env = "SLUICE_BOOTSTRAP_SERVER",
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT"
    )]
    pub bootstrap_server: String,
    /// Client properties (librdkafka names): security.protocol, sasl.mechanism, sasl.username,
    /// sasl.password, ssl.ca.location, ssl.certificate.location, ssl.key.location.
    #[arg(
        long = "command-config",
        env = "SLUICE_COMMAND_CONFIG",
        value_name = "FILE"
    )]
    pub command_config: Option<std::path::PathBuf>,
}

/// Client subcommands, meant to be flattened into the top-level `sluice`
/// command (`#[command(flatten)]`).
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Create, list, describe, delete or alter topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Write lines from stdin to a topic, one record per line.
    Produce(ProduceArgs),
    /// Print records of a topic to stdout, one value per line.
    Consume(ConsumeArgs),
    /// List, describe, reset the offsets of, or delete consumer groups.
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// Cluster state from a node's admin HTTP API.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Create, list or delete ACLs (as kafka-acls does).
    Acls {
        #[command(subcommand)]
        command: acls::AclsCommand,
    },
    /// Create, list or delete SASL/SCRAM users (salted on this side, as Kafka's tools do).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Load generator: produce, consume or end-to-end figures against any Kafka-compatible
    /// broker (records/s, MB/s, latency percentiles).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Make a CA and node and client certificates for TLS on one machine.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// Write ca.pem, node-<id>.pem/.key and client-<name>.pem/.key (reusing DIR's CA if any).
    Create(certs::CertsCreateArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum UsersCommand {
    /// Create a user, or set a new password (one SCRAM mechanism per call).
    Create(users::UsersCreateArgs),
    /// List users and their SCRAM mechanisms and iterations.
    List(TopicsListArgs),
    /// Delete a user's credentials (every mechanism unless --mechanism).
    Delete(users::UsersDeleteArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum TopicsCommand {
    /// Create a topic.
    Create(TopicsCreateArgs),
    /// List topic names, one per line.
    List(TopicsListArgs),
    /// Show partitions, leaders, replicas, ISR and configs of a topic.
    Describe(TopicsNameArgs),
    /// Delete a topic.
    Delete(TopicsNameArgs),
    /// Increase the partition count of a topic.
    Alter(TopicsAlterArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum GroupsCommand {
    /// List consumer group ids, one per line (from every broker).
    List(TopicsListArgs),
    /// Show a group's state, members, assignments, and committed offset, end offset and lag
    /// per partition.
    Describe(GroupsNameArgs),
    /// Move a group's committed offsets (a dry run unless --execute; the group must be empty).
    ResetOffsets(GroupsResetArgs),
    /// Delete a group (it must have no members).
    Delete(GroupsNameArgs),
}

#[derive(Debug, Clone, Args)]
pub struct GroupsNameArgs {
    pub group: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Where `groups reset-offsets` moves the offsets: exactly one of these.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ResetTarget {
    /// To the log start offset.
    #[arg(long = "to-earliest")]
    pub to_earliest: bool,
    /// To the log end offset.
    #[arg(long = "to-latest")]
    pub to_latest: bool,
    /// To offset N (kept within the log start and end).
    #[arg(long = "to-offset", value_name = "N")]
    pub to_offset: Option<i64>,
    /// To the first record at or after this time: ISO-8601, e.g. 2026-01-31T12:00:00.000,
    /// with an optional Z or +HH:MM (UTC when omitted).
    #[arg(long = "to-datetime", value_name = "DATETIME", value_parser = parse_datetime)]
    pub to_datetime: Option<i64>,
}

#[derive(Debug, Clone, Args)]
pub struct GroupsResetArgs {
    pub group: String,
    /// TOPIC (every partition) or TOPIC:P,P,...
    #[arg(long, value_name = "TOPIC[:PARTITIONS]", value_parser = parse_topic_partitions)]
    pub topic: (String, Option<Vec<i32>>),
    #[command(flatten)]
    pub to: ResetTarget,
    /// Commit the new offsets (without it, only print them).
    #[arg(long)]
    pub execute: bool,
    /// Only print the new offsets (the default).
    #[arg(long = "dry-run", conflicts_with = "execute")]
    pub dry_run: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TopicsCreateArgs {
    pub name: String,
    /// Number of partitions (broker default if omitted).
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Replication factor (broker default if omitted).
    #[arg(long = "replication-factor")]
    pub replication_factor: Option<i16>,
    /// Topic config override, repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config)]
    pub configs: Vec<(String, String)>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TopicsListArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TopicsNameArgs {
    pub name: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TopicsAlterArgs {
    pub name: String,
    /// New (larger) partition count.
    #[arg(long)]
    pub partitions: i32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl From<CompressionArg> for kafka_protocol::records::Compression {
    fn from(c: CompressionArg) -> Self {
        use kafka_protocol::records::Compression;
        match c {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    pub topic: String,
    /// Split each line into key and value at the first SEP.
    #[arg(long = "key-separator", value_name = "SEP", value_parser = parse_separator)]
    pub key_separator: Option<String>,
    /// Acknowledgements: 0, 1, or all (= -1).
    #[arg(long, default_value = "all", allow_hyphen_values = true, value_parser = parse_acks)]
    pub acks: i16,
    /// Send every record to this partition instead of partitioning.
    #[arg(long)]
    pub partition: Option<i32>,
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,
    /// Send a batch after this many lines (or earlier when stdin has no
    /// more input ready).
    #[arg(long = "batch-size", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Produce requests awaiting acknowledgement per broker.
    #[arg(long = "max-in-flight", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_in_flight: u32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Where consumption starts within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOffset {
    Earliest,
    Latest,
    At(i64),
}

#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    pub topic: String,
    /// Start at the earliest offset instead of the latest.
    #[arg(long = "from-beginning", conflicts_with = "offset")]
    pub from_beginning: bool,
    /// Only consume this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Start offset in --partition: a number, "earliest" or "latest".
    #[arg(long, requires = "partition", value_parser = parse_offset)]
    pub offset: Option<StartOffset>,
    /// Exit after printing this many records.
    #[arg(long = "max-messages")]
    pub max_messages: Option<u64>,
    /// Print "KEY<TAB>" before each value ("null" for no key).
    #[arg(long = "print-key")]
    pub print_key: bool,
    /// Print "Offset:N<TAB>" before each record.
    #[arg(long = "print-offset")]
    pub print_offset: bool,
    /// Exit when no record arrived for this many milliseconds.
    #[arg(long = "timeout-ms")]
    pub timeout_ms: Option<u64>,
    /// Consume as a member of this consumer group: its assigned partitions, from its committed
    /// offsets, committing what was printed.
    #[arg(long, conflicts_with_all = ["partition", "offset"])]
    pub group: Option<String>,
    /// Consumer setting, repeatable: group.id, group.instance.id, auto.offset.reset,
    /// session.timeout.ms, heartbeat.interval.ms, max.poll.interval.ms, enable.auto.commit,
    /// auto.commit.interval.ms.
    #[arg(long = "consumer-property", value_name = "KEY=VALUE", value_parser = parse_config)]
    pub consumer_properties: Vec<(String, String)>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Runs a client verb. Errors carry a readable message (naming the Kafka
/// error code where there is one); the caller exits non-zero on `Err`.
pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    if let Some(path) = connect_args(&cmd).and_then(|c| c.command_config.clone()) {
        security::install_default(security::ClientSecurity::from_file(&path)?);
    }
    match cmd {
        ClientCommand::Topics { command } => topics::run(command).await,
        ClientCommand::Produce(args) => produce::run(args).await,
        ClientCommand::Consume(args) => consume::run(args).await,
        ClientCommand::Groups { command } => groups::run(command).await,
        ClientCommand::Cluster { command } => cluster::run(command).await,
        ClientCommand::Acls { command } => acls::run(command).await,
        ClientCommand::Users { command } => users::run(command).await,
        ClientCommand::Certs {
            command: CertsCommand::Create(args),
        } => certs::run(&args),
        ClientCommand::Bench { command } => bench::run(command).await,
    }
}

/// The connection settings of a verb that talks Kafka.
fn connect_args(cmd: &ClientCommand) -> Option<&ConnectArgs> {
    Some(match cmd {
        ClientCommand::Topics { command } => match command {
            TopicsCommand::Create(a) => &a.connect,
            TopicsCommand::List(a) => &a.connect,
            TopicsCommand::Describe(a) | TopicsCommand::Delete(a) => &a.connect,
            TopicsCommand::Alter(a) => &a.connect,
        },
        ClientCommand::Produce(a) => &a.connect,
        ClientCommand::Consume(a) => &a.connect,
        ClientCommand::Groups { command } => match command {
            GroupsCommand::List(a) => &a.connect,
            GroupsCommand::Describe(a) | GroupsCommand::Delete(a) => &a.connect,
            GroupsCommand::ResetOffsets(a) => &a.connect,
        },
        ClientCommand::Users { command } => match command {
            UsersCommand::Create(a) => &a.connect,
            UsersCommand::List(a) => &a.connect,
            UsersCommand::Delete(a) => &a.connect,
        },
        ClientCommand::Acls { command } => match command {
            acls::AclsCommand::Create(a)
            | acls::AclsCommand::List(a)
            | acls::AclsCommand::Delete(a) => &a.connect,
        },
        ClientCommand::Bench { command } => match command {
            bench::BenchCommand::Produce(a)
            | bench::BenchCommand::Consume(a)
            | bench::BenchCommand::E2e(a) => &a.connect,
        },
        ClientCommand::Cluster { .. } | ClientCommand::Certs { .. } => return None,
    })
}

fn parse_topic_partitions(s: &str) -> Result<(String, Option<Vec<i32>>), String> {
    let (topic, parts) = match s.split_once(':') {
        None => (s, None),
        Some((t, ps)) => {
            let parsed: Result<Vec<i32>, _> =
                ps.split(',').map(|p| p.trim().parse::<i32>()).collect();
            match parsed {
                Ok(v) if !v.is_empty() && v.iter().all(|p| *p >= 0) => (t, Some(v)),
                _ => return Err(format!("expected TOPIC or TOPIC:P,P,..., got '{s}'")),
            }
        }
    };
    if topic.is_empty() {
        return Err("topic must not be empty".to_string());
    }
    Ok((topic.to_string(), parts))
}

/// ISO-8601 as kafka-consumer-groups takes it (`YYYY-MM-DDTHH:mm:SS[.sss][Z|±HH:MM]`, seconds and
/// fraction optional) to milliseconds since the epoch. Without a zone, UTC.
pub fn parse_datetime(s: &str) -> Result<i64, String> {
    let bad = || format!("expected a date-time like 2026-01-31T12:00:00.000[Z|+01:00], got '{s}'");
    let (date, rest) = s.split_once('T').ok_or_else(bad)?;
    let (time, zone_ms) = if let Some(t) = rest.strip_suffix('Z') {
        (t, 0i64)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (t, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let z = &z[1..];
        let (zh, zm) = z
            .split_once(':')
            .unwrap_or((z.get(..2).unwrap_or(""), z.get(2..).unwrap_or("")));
        let zh: i64 = zh.parse().map_err(|_| bad())?;
        let zm: i64 = if zm.is_empty() {
            0
        } else {
            zm.parse().map_err(|_| bad())?
        };
        if zh > 23 || zm > 59 {
            return Err(bad());
        }
        (t, sign * (zh * 3600 + zm * 60) * 1000)
    } else {
        (rest, 0)
    };
    let num = |v: Option<&str>, lo: i64, hi: i64| -> Result<i64, String> {
        let v = v.ok_or_else(bad)?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: i64 = v.parse().map_err(|_| bad())?;
        if n < lo || n > hi {
            return Err(bad());
        }
        Ok(n)
    };
    let mut d = date.split('-');
    let (y, mo, da) = (
        num(d.next(), 0, 9999)?,
        num(d.next(), 1, 12)?,
        num(d.next(), 1, 31)?,
    );
    if d.next().is_some() {
        return Err(bad());
    }
    let (hms, frac) = match time.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (time, None),
    };
    let mut t = hms.split(':');
    let h = num(t.next(), 0, 23)?;
    let mi = num(t.next(), 0, 59)?;
    let sec = match t.next() {
        Some(x) => num(Some(x), 0, 59)?,
        None => 0,
    };
    if t.next().is_some() {
        return Err(bad());
    }
    let ms = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            let padded = format!("{f:0<3}");
            padded[..3].parse::<i64>().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    let days_in_month = [
        31,
        if is_leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if da > days_in_month[(mo - 1) as usize] {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, da);
    Ok(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000 + ms) - zone_ms)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_config(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

fn parse_separator(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("key separator must not be empty".to_string())
    } else {
        Ok(s.to_string())
    }
}

pub(crate) fn parse_acks(s: &str) -> Result<i16, String> {
    match s {
        "all" | "-1" => Ok(-1),
        "0" => Ok(0),
        "1" => Ok(1),
        _ => Err(format!("acks must be 0, 1, all or -1, got '{s}'")),
    }
}

fn parse_offset(s: &str) -> Result<StartOffset, String> {
    match s {
        "earliest" => Ok(StartOffset::Earliest),
        "latest" => Ok(StartOffset::Latest),
        _ => match s.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(StartOffset::At(n)),
            _ => Err(format!(
                "offset must be a non-negative number, 'earliest' or 'latest', got '{s}'"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        let mut v = vec!["sluice"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.cmd)
    }

    #[test]
    fn clap_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_topics_verbs() {
        let c = parse(&[
            "topics",
            "create",
            "t",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
            "--config",
            "retention.ms=1000",
            "--config",
            "cleanup.policy=compact",
            "--bootstrap-server",
            "h:1",
        ])
        .unwrap();
        let ClientCommand::Topics {
            command: TopicsCommand::Create(a),
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(a.name, "t");
        assert_eq!(a.partitions, Some(3));
        assert_eq!(a.replication_factor, Some(1));
        assert_eq!(
            a.configs,
            vec![
                ("retention.ms".into(), "1000".into()),
                ("cleanup.policy".into(), "compact".into())
            ]
        );
        assert_eq!(a.connect.bootstrap_server, "h:1");
        assert!(parse(&["topics", "create", "t", "--config", "novalue"]).is_err());
        assert!(parse(&["topics", "list"]).is_ok());
        assert!(parse(&["topics", "describe", "t"]).is_ok());
        assert!(parse(&["topics", "delete", "t"]).is_ok());
        assert!(parse(&["topics", "alter", "t", "--partitions", "4"]).is_ok());
        assert!(parse(&["topics", "alter", "t"]).is_err());
    }

    #[test]
    fn parses_produce() {
        for (arg, want) in [("all", -1), ("-1", -1), ("0", 0), ("1", 1)] {
            let c = parse(&["produce", "t", "--acks", arg]).unwrap();
            let ClientCommand::Produce(p) = c else {
                panic!()
            };
            assert_eq!(p.acks, want, "{arg}");
        }
        assert!(parse(&["produce", "t", "--acks", "2"]).is_err());
        let ClientCommand::Produce(p) = parse(&[
            "produce",
            "t",
            "--key-separator",
            ":",
            "--partition",
            "2",
            "--compression",
            "zstd",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(p.acks, -1);
        assert_eq!(p.key_separator.as_deref(), Some(":"));
        assert_eq!(p.partition, Some(2));
        assert_eq!(p.compression, CompressionArg::Zstd);
        assert!(parse(&["produce", "t", "--key-separator", ""]).is_err());
        assert!(parse(&["produce", "t", "--compression", "brotli"]).is_err());
    }

    #[test]
    fn parses_consume() {
        let ClientCommand::Consume(c) = parse(&[
            "consume",
            "t",
            "--partition",
            "1",
            "--offset",
            "42",
            "--max-messages",
            "5",
            "--print-key",
            "--print-offset",
            "--timeout-ms",
            "100",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.partition, Some(1));
        assert_eq!(c.offset, Some(StartOffset::At(42)));
        assert_eq!(c.max_messages, Some(5));
        assert!(c.print_key && c.print_offset && !c.from_beginning);
        assert_eq!(c.timeout_ms, Some(100));
        // --offset needs --partition; it contradicts --from-beginning.
        assert!(parse(&["consume", "t", "--offset", "3"]).is_err());
        assert!(parse(&[
            "consume",
            "t",
            "--partition",
            "0",
            "--offset",
            "3",
            "--from-beginning"
        ])
        .is_err());
        assert!(parse(&["consume", "t", "--partition", "0", "--offset", "earliest"]).is_ok());
        // A group picks the partitions and offsets itself.
        let ClientCommand::Consume(c) = parse(&[
            "consume",
            "t",
            "--group",
            "g",
            "--consumer-property",
            "auto.offset.reset=earliest",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.group.as_deref(), Some("g"));
        assert_eq!(
            c.consumer_properties,
            vec![("auto.offset.reset".into(), "earliest".into())]
        );
        assert!(parse(&["consume", "t", "--group", "g", "--partition", "0"]).is_err());
        assert!(parse(&["consume", "t", "--consumer-property", "x"]).is_err());
    }

    #[test]
    fn parses_groups_verbs() {
        assert!(parse(&["groups", "list"]).is_ok());
        assert!(parse(&["groups", "describe", "g"]).is_ok());
        assert!(parse(&["groups", "delete", "g"]).is_ok());
        let ClientCommand::Groups {
            command: GroupsCommand::ResetOffsets(r),
        } = parse(&[
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "t:0,2",
            "--to-offset",
            "5",
        ])
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(r.topic, ("t".to_string(), Some(vec![0, 2])));
        assert_eq!(r.to.to_offset, Some(5));
        assert!(!r.execute);
        // Exactly one target.
        assert!(parse(&["groups", "reset-offsets", "g", "--topic", "t"]).is_err());
        assert!(parse(&[
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
            "--to-latest"
        ])
        .is_err());
        assert!(parse(&[
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-latest",
            "--execute",
            "--dry-run"
        ])
        .is_err());
        assert!(parse(&[
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "t:x",
            "--to-latest"
        ])
        .is_err());
        assert!(parse(&[
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-datetime",
            "yesterday"
        ])
        .is_err());
    }

    #[test]
    fn datetimes_as_kafka_consumer_groups_takes_them() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00.000"), Ok(0));
        assert_eq!(parse_datetime("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(
            parse_datetime("2021-03-04T05:06:07.089Z"),
            Ok(1_614_834_367_089)
        );
        assert_eq!(
            parse_datetime("2021-03-04T06:06:07.089+01:00"),
            Ok(1_614_834_367_089)
        );
        assert_eq!(
            parse_datetime("2021-03-04T04:36:07.089-0030"),
            Ok(1_614_834_367_089)
        );
        assert_eq!(parse_datetime("2021-03-04T05:06"), Ok(1_614_834_360_000));
        assert_eq!(
            parse_datetime("2024-02-29T00:00:00.5"),
            Ok(1_709_164_800_500)
        );
        for bad in [
            "2021-03-04",
            "2021-02-29T00:00:00",
            "2021-13-01T00:00:00",
            "2021-03-04T24:00:00",
            "2021-03-04T05:06:07.x",
            "2021-03-04T05:06:07+25:00",
            "now",
        ] {
            assert!(parse_datetime(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod group_e2e_tests;
#[cfg(test)]
mod security_e2e_tests;
