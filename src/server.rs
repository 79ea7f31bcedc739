//! Runs a node: binds the listeners first (so a port in use fails fast with a clear error), starts
//! the node, serves until SIGTERM/Ctrl-C, then shuts down cleanly.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::info;

use crate::config::ServerConfig;
use crate::node::Node;

pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let kafka = TcpListener::bind(&cfg.kafka_addr)
        .await
        .with_context(|| format!("cannot listen for Kafka clients on {}", cfg.kafka_addr))?;
    let admin = TcpListener::bind(&cfg.admin_addr)
        .await
        .with_context(|| format!("cannot listen for admin HTTP on {}", cfg.admin_addr))?;
    // Before anything opens storage, so every write and fsync of this process goes through it.
    sluice_storage::fault::install_from_env(&cfg.data_dir)
        .context("cannot start the storage fault layer")?;
    let node = Node::start(cfg.clone())
        .await
        .context("cannot start the node")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let kafka_task = tokio::spawn(crate::kafka::serve(kafka, node.clone(), stop_rx.clone()));
    let mut admin_stop = stop_rx.clone();
    let admin_app = crate::admin::router(node.clone());
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(admin, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await;
    });
    info!(
        node_id = cfg.node_id,
        kafka = %cfg.kafka_addr,
        raft = %cfg.raft_addr,
        admin = %cfg.admin_addr,
        data_dir = %cfg.data_dir.display(),
        "sluice started"
    );
    let mut fatal = node.fatal.subscribe();
    let failure = tokio::select! {
        _ = wait_for_signal() => None,
        r = fatal.wait_for(|f| f.is_some()) => r.ok().and_then(|f| f.clone()),
    };
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = kafka_task.await;
    let _ = admin_task.await;
    shutdown(node).await;
    info!("stopped");
    match failure {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

async fn shutdown(node: Arc<Node>) {
    node.shutdown().await;
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
