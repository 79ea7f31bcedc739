//! Client verbs of the `sluice` CLI (`topics`, `produce`, `consume`).
//!
//! They speak the Kafka wire protocol, so they work against sluice and any
//! other Kafka-compatible broker.

use clap::{Args, Subcommand, ValueEnum};

pub mod client;
pub mod cluster;
pub mod conn;
pub mod consume;
pub mod errors;
pub mod group;
pub mod produce;
pub mod records;
pub mod topics;

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
    /// Cluster state from a node's admin HTTP API.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
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
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Runs a client verb. Errors carry a readable message (naming the Kafka
/// error code where there is one); the caller exits non-zero on `Err`.
pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Topics { command } => topics::run(command).await,
        ClientCommand::Produce(args) => produce::run(args).await,
        ClientCommand::Consume(args) => consume::run(args).await,
        ClientCommand::Cluster { command } => cluster::run(command).await,
    }
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

fn parse_acks(s: &str) -> Result<i16, String> {
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
        assert!(parse(&["consume", "t", "--group", "g"]).is_err());
    }
}

#[cfg(test)]
mod e2e_tests;
