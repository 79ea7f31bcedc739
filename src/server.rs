//! `sluice server`: binds the listeners first (so a port in use fails fast with a clear error),
//! starts the node, serves until SIGTERM/Ctrl-C or a fatal error, then shuts down cleanly.

use anyhow::Context;
use tracing::info;

use crate::config::ServerConfig;
use crate::node::{Listeners, Node};

pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&cfg).await?;
    // Before anything opens storage, so every write and fsync of this process goes through it.
    sluice_storage::fault::install_from_env(&cfg.data_dir)
        .context("cannot start the storage fault layer")?;
    let node = Node::start(cfg.clone(), listeners)
        .await
        .context("cannot start the node")?;
    info!(
        node_id = cfg.node_id,
        kafka = %node.kafka_addr(),
        raft = %cfg.raft_addr,
        admin = %node.admin_addr(),
        data_dir = %cfg.data_dir.display(),
        "sluice started"
    );
    for l in &cfg.listeners {
        info!(listener = %l.name, protocol = %l.protocol, addr = %l.addr, advertised = %l.advertised_addr(), "Kafka listener");
    }
    let failure = tokio::select! {
        _ = wait_for_signal() => None,
        reason = node.failed() => Some(reason),
    };
    info!("shutting down");
    node.shutdown().await;
    info!("stopped");
    match failure {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
