//! One Sluice node, the composition root: it binds nothing itself (it is handed listeners, so
//! tests bind port 0), builds the [`Broker`], starts the Raft host, the Kafka listener, the admin
//! HTTP server and every background loop, and owns all of them: [`Node::shutdown`] cancels each
//! loop and waits for it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_raft::tls::{PeerTls, PeerTlsFiles};
use sluice_raft::{GroupId, MetaApp, PartitionStm, RaftError, RaftHost, RaftHostConfig};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::ServerConfig;
use crate::controller::{Command, MetaMachine};
use crate::identity::DirIdentity;
use crate::partition::producers::ProducerMachine;
use crate::{membership, partition};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("data directory {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(#[from] RaftError),
    #[error("{0}")]
    Refused(String),
    #[error("raft TLS: {0}")]
    Tls(#[from] sluice_raft::tls::TlsError),
    #[error("{0}")]
    Admin(#[from] crate::admin::AdminError),
    #[error("Kafka {0}")]
    Listener(#[from] crate::net::ListenerSetupError),
}

/// The node-to-node TLS of `cfg`, loaded; `None` for plaintext, which is only announced as
/// unsafe when the Raft port is reachable from other hosts.
fn raft_tls(cfg: &ServerConfig) -> Result<Option<PeerTls>, NodeError> {
    match (&cfg.raft_tls_cert, &cfg.raft_tls_key, &cfg.raft_tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let files = PeerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            Ok(Some(PeerTls::load(&files, cfg.node_id)?))
        }
        _ => {
            let loopback = cfg
                .raft_addr
                .parse::<SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or_else(|_| cfg.raft_addr.starts_with("localhost:"));
            if !loopback {
                tracing::warn!(
                    raft_addr = %cfg.raft_addr,
                    "the Raft port is reachable from other hosts without TLS: anyone who reaches it \
                     can change the cluster; set --raft-tls-cert/--raft-tls-key/--raft-tls-ca"
                );
            }
            Ok(None)
        }
    }
}

/// The node's listening sockets, bound before anything else starts so that a port in use
/// fails fast with a clear error.
pub struct Listeners {
    /// One per Kafka listener, in the order of [`ServerConfig::kafka_listeners`].
    pub kafka: Vec<TcpListener>,
    pub admin: TcpListener,
    pub raft: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &ServerConfig) -> Result<Listeners, NodeError> {
        async fn one(what: &'static str, addr: &str) -> Result<TcpListener, NodeError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind {
                    what,
                    addr: addr.to_string(),
                    source,
                })
        }
        let mut kafka = Vec::new();
        for l in cfg.kafka_listeners() {
            kafka.push(one("Kafka clients", &l.addr).await?);
        }
        Ok(Listeners {
            kafka,
            admin: one("admin HTTP", &cfg.admin_addr).await?,
            raft: one("Raft peers", &cfg.raft_addr).await?,
        })
    }
}

/// How long shutdown waits for loops and connections to finish after cancelling them.
const TASKS_STOP_WITHIN: Duration = Duration::from_secs(10);

pub struct Node {
    broker: Arc<Broker>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    kafka_addr: SocketAddr,
    admin_addr: SocketAddr,
}

/// A configured port 0 means "any": the node takes the port it was given, so what it registers
/// and advertises is an address peers and clients can reach.
fn resolve_port_zero(configured: &mut String, bound: &TcpListener) {
    if let Ok(addr) = bound.local_addr() {
        if configured.ends_with(":0") {
            *configured = addr.to_string();
        }
    }
}

impl Node {
    pub async fn start(mut cfg: ServerConfig, listeners: Listeners) -> Result<Node, NodeError> {
        let Listeners { kafka, admin, raft } = listeners;
        let mut kafka_listeners = cfg.kafka_listeners();
        if kafka_listeners.len() != kafka.len() {
            return Err(NodeError::Refused(format!(
                "{} Kafka listeners configured but {} sockets bound",
                kafka_listeners.len(),
                kafka.len()
            )));
        }
        for (l, socket) in kafka_listeners.iter_mut().zip(&kafka) {
            resolve_port_zero(&mut l.addr, socket);
        }
        // The first listener is the node's primary address (logs, the admin views).
        cfg.kafka_addr = kafka_listeners[0].addr.clone();
        cfg.advertised_kafka_addr = kafka_listeners[0].advertised.clone();
        cfg.listeners = kafka_listeners.clone();
        resolve_port_zero(&mut cfg.admin_addr, &admin);
        let configured_raft = cfg.raft_addr.clone();
        resolve_port_zero(&mut cfg.raft_addr, &raft);
        if cfg.peers.get(&cfg.node_id) == Some(&configured_raft) {
            cfg.peers.insert(cfg.node_id, cfg.raft_addr.clone());
        }
        let data_dir = cfg.data_dir.clone();
        let dir_err = |source| NodeError::DataDir {
            dir: data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(cfg.data_dir.join("partitions")).map_err(dir_err)?;
        let identity = DirIdentity::load(&cfg.data_dir).map_err(dir_err)?;
        if let Some(id) = identity.node_id.filter(|id| *id != cfg.node_id) {
            return Err(NodeError::Refused(format!(
                "data directory {} belongs to node {id}, but this node was started as node {}; \
                 use --node-id {id} or another --data-dir",
                cfg.data_dir.display(),
                cfg.node_id
            )));
        }
        DirIdentity::store(&cfg.data_dir, cfg.node_id, identity.cluster_id.as_deref())
            .map_err(dir_err)?;

        let meta = Arc::new(MetaMachine::default());
        let raft_host = RaftHost::start_with_listener(
            RaftHostConfig {
                node_id: cfg.node_id,
                raft_addr: cfg.raft_addr.clone(),
                data_dir: cfg.data_dir.join("raft"),
                peers: cfg.peers.clone(),
                tls: raft_tls(&cfg)?,
            },
            raft,
            meta.clone() as Arc<dyn MetaApp>,
        )
        .await?;
        // Before any partition opens: every partition group carries the producer state of its
        // idempotent producers, replicated with its log.
        let expiration_ms = cfg.producer_id_expiration_ms;
        raft_host.set_partition_machines(Arc::new(move |_: &GroupId| {
            vec![Arc::new(ProducerMachine::new(expiration_ms)) as Arc<dyn PartitionStm>]
        }));
        let broker = Arc::new(Broker::new(cfg, raft_host.clone(), meta));
        raft_host.set_app_handler(Arc::new(crate::rpc::Server(membership::Inbound(
            Arc::downgrade(&broker),
        ))));
        if let Err(reason) =
            membership::check_cluster_identity(&broker, identity.cluster_id.clone()).await
        {
            raft_host.shutdown().await;
            return Err(NodeError::Refused(reason));
        }

        let bound: Vec<crate::net::BoundListener> = kafka_listeners
            .into_iter()
            .zip(kafka)
            .map(|(config, socket)| crate::net::BoundListener { config, socket })
            .collect();
        let kafka_addr = bound[0].socket.local_addr().map_err(dir_err)?;
        let ready = match crate::net::prepare(bound) {
            Ok(r) => r,
            Err(e) => {
                raft_host.shutdown().await;
                return Err(e.into());
            }
        };
        let admin_addr = admin.local_addr().map_err(dir_err)?;
        let cancel = CancellationToken::new();
        // Before any loop starts: a bad admin certificate fails the start with nothing to undo
        // but Raft.
        let admin_serving = match crate::admin::serve(admin, broker.clone(), cancel.clone()) {
            Ok(serving) => serving,
            Err(e) => {
                raft_host.shutdown().await;
                return Err(e.into());
            }
        };
        let node = Node {
            kafka_addr,
            admin_addr,
            broker,
            cancel,
            tasks: TaskTracker::new(),
        };
        let b = &node.broker;
        node.spawn(membership::identity_loop(b.clone()));
        node.spawn(membership::heartbeat_loop(b.clone()));
        node.spawn(membership::liveness_loop(b.clone()));
        // Only a node that never belonged to a cluster asks to join; a decommissioned one must not
        // quietly come back.
        if identity.cluster_id.is_none() {
            node.spawn(membership::join_loop(b.clone()));
        }
        node.spawn(membership::register_loop(b.clone()));
        node.spawn(partition::manager::reconcile_loop(b.clone()));
        node.spawn(partition::leadership::leader_report_loop(b.clone()));
        node.spawn(partition::leadership::preferred_leader_loop(b.clone()));
        node.spawn(partition::leadership::fenced_leader_loop(b.clone()));
        node.spawn(partition::reassignment::reassignment_loop(b.clone()));
        node.spawn(partition::retention::retention_loop(b.clone()));
        node.spawn(partition::storage_health::storage_loop(b.clone()));
        node.spawn(crate::coordinator::loops::proposal_loop(b.clone()));
        node.spawn(crate::coordinator::loops::timer_loop(b.clone()));

        // The servers stop accepting on cancellation themselves (they drain, not drop).
        node.tasks
            .spawn(crate::net::serve(ready, b.clone(), node.cancel.clone()));
        // The admin server (HTTPS when configured) stops accepting on cancellation itself.
        node.tasks.spawn(admin_serving);
        Ok(node)
    }

    /// Runs `fut` until it ends or the node shuts down, whichever is first.
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = fut => {}
            }
        });
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Where Kafka clients reach this node (the bound address, with the real port).
    pub fn kafka_addr(&self) -> SocketAddr {
        self.kafka_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Resolves with the reason once something has made the node unable to go on.
    pub async fn failed(&self) -> String {
        let mut rx = self.broker.subscribe_fatal();
        let reason = match rx.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone(),
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            // The broker outlives this borrow of the node, so the sender cannot be gone.
            None => std::future::pending().await,
        }
    }

    /// Controlled shutdown, as in Kafka: tell the controller we are leaving (so no new replicas or
    /// clients are sent here), hand partition and controller leadership to other replicas (so
    /// clients wait for one election instead of a lease timeout), then stop every loop, the
    /// listeners and Raft.
    pub async fn shutdown(self) {
        let broker = &self.broker;
        let me = broker.node_id();
        if broker.live_brokers().into_iter().any(|b| b != me) {
            let cmd = Command::FenceBroker { id: me };
            match tokio::time::timeout(Duration::from_secs(3), broker.propose(&cmd)).await {
                Ok(Ok(_)) => info!("controller told of controlled shutdown"),
                Ok(Err(e)) => warn!(error = %e, "could not announce controlled shutdown"),
                Err(_) => warn!("announcing controlled shutdown timed out"),
            }
            partition::leadership::hand_off_leadership(broker).await;
        }
        self.stop().await;
    }

    /// Stops without the controlled-shutdown steps, as a crash would but with files closed: for
    /// tests that need a node to vanish.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(TASKS_STOP_WITHIN, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop within {TASKS_STOP_WITHIN:?}");
        }
        self.broker.raft.shutdown().await;
    }
}
