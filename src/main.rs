//! The `sluice` binary: `sluice server` runs a node; the other verbs are Kafka-protocol clients.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sluice::config::{parse_peers, ServerConfig};

// Hostile length prefixes must not abort the process; see sluice::alloc_guard.
#[global_allocator]
static GLOBAL: sluice::alloc_guard::GuardedAlloc = sluice::alloc_guard::GuardedAlloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A Kafka-compatible streaming log on Raft"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. With no flags: a single-node cluster with embedded defaults.
    Server(ServerArgs),
    #[command(flatten)]
    Client(sluice::cli::ClientCommand),
}

#[derive(Args)]
struct ServerArgs {
    /// Kafka-style server.properties; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// One PLAINTEXT Kafka listener on HOST:PORT (replaces `listeners` of --config).
    #[arg(long, conflicts_with = "listeners")]
    kafka_addr: Option<String>,
    /// Kafka listeners as in Kafka: `PLAINTEXT://h:p,SASL_SSL://h:p` or named ones with
    /// `listener.security.protocol.map` in --config.
    #[arg(long, value_name = "LISTENERS")]
    listeners: Option<String>,
    /// What clients are told per listener: `SASL_SSL://host:port,...`.
    #[arg(long, value_name = "LISTENERS")]
    advertised_listeners: Option<String>,
    #[arg(long)]
    advertised_kafka_addr: Option<String>,
    #[arg(long)]
    raft_addr: Option<String>,
    #[arg(long)]
    admin_addr: Option<String>,
    /// ID@HOST:RAFTPORT,... — the same list on every node, including itself.
    #[arg(long)]
    peers: Option<String>,
    /// This node's certificate chain (PEM) for mutual TLS on the Raft port; it must name
    /// `node-<id>.sluice`. Needs --raft-tls-key and --raft-tls-ca.
    #[arg(long, value_name = "FILE")]
    raft_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --raft-tls-cert.
    #[arg(long, value_name = "FILE")]
    raft_tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present a certificate it issued.
    #[arg(long, value_name = "FILE")]
    raft_tls_ca: Option<PathBuf>,
    /// A file holding the admin HTTP's bearer token (trimmed): every mutating admin route then
    /// needs `Authorization: Bearer <token>` (`admin.api.token.file`).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Certificate chain (PEM) for HTTPS on the admin port; needs --admin-tls-key.
    #[arg(long, value_name = "FILE")]
    admin_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --admin-tls-cert.
    #[arg(long, value_name = "FILE")]
    admin_tls_key: Option<PathBuf>,
}

fn server_config(args: ServerArgs) -> anyhow::Result<ServerConfig> {
    let mut cfg = ServerConfig::default();
    if let Some(path) = &args.config {
        for key in cfg.apply_file(path)? {
            tracing::warn!(%key, file = %path.display(), "unknown config key ignored");
        }
    }
    if let Some(v) = args.node_id {
        cfg.node_id = v;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.kafka_addr {
        cfg.kafka_addr = v;
        // --kafka-addr is one PLAINTEXT listener, whatever the file said.
        cfg.listeners_spec = None;
        cfg.advertised_listeners_spec = None;
    }
    if let Some(v) = args.listeners {
        cfg.apply_property("listeners", &v)?;
    }
    if let Some(v) = args.advertised_listeners {
        cfg.apply_property("advertised.listeners", &v)?;
    }
    if let Some(v) = args.advertised_kafka_addr {
        cfg.advertised_kafka_addr = Some(v);
    }
    if let Some(v) = args.raft_addr {
        cfg.raft_addr = v;
    }
    if let Some(v) = args.admin_addr {
        cfg.admin_addr = v;
    }
    if let Some(v) = args.peers {
        cfg.peers = parse_peers(&v).context("invalid --peers")?;
    }
    if args.raft_tls_cert.is_some() {
        cfg.raft_tls_cert = args.raft_tls_cert;
    }
    if args.raft_tls_key.is_some() {
        cfg.raft_tls_key = args.raft_tls_key;
    }
    if args.raft_tls_ca.is_some() {
        cfg.raft_tls_ca = args.raft_tls_ca;
    }
    if let Some(path) = args.admin_token_file {
        // The flag replaces a token the config file may hold, as flags override the file.
        cfg.admin_api_token = None;
        cfg.admin_api_token_file = Some(path);
    }
    if args.admin_tls_cert.is_some() {
        cfg.admin_tls_cert = args.admin_tls_cert;
    }
    if args.admin_tls_key.is_some() {
        cfg.admin_tls_key = args.admin_tls_key;
    }
    cfg.finish()?;
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Server(args) => {
            let cfg = server_config(args)?;
            rt.block_on(sluice::server::run(cfg))
        }
        Command::Client(cmd) => rt.block_on(sluice::cli::run(cmd)),
    }
}
