//! Server configuration: embedded defaults, a Kafka-style `server.properties` file, and command-line
//! flags, applied in that order (flags win).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {key}: invalid value '{value}': {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("config file {path} line {line}: expected key=value, got '{text}'")]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// Everything a node needs to start. Names carry units, as in Kafka's own keys.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub kafka_addr: String,
    pub advertised_kafka_addr: Option<String>,
    pub raft_addr: String,
    pub admin_addr: String,
    /// id -> raft address, including this node. Empty means "just me".
    pub peers: BTreeMap<u64, String>,
    pub num_partitions: i32,
    pub default_replication_factor: i16,
    pub auto_create_topics_enable: bool,
    pub message_max_bytes: i32,
    pub log_segment_bytes: u64,
    pub log_retention_ms: i64,
    pub log_retention_bytes: i64,
    /// How often each partition replica looks for segments that retention deletes.
    pub log_retention_check_interval_ms: u64,
    /// Largest request frame we accept; checked before the frame is allocated.
    pub socket_request_max_bytes: usize,
    /// Connections beyond this are closed at accept time.
    pub max_connections: usize,
    /// Requests one connection may have in flight before we stop reading from it.
    pub max_in_flight_requests_per_connection: usize,
    /// Largest Fetch response, whatever the request asks (Kafka's `fetch.max.bytes`); the first
    /// batch of the first non-empty partition may still exceed it, so a consumer can progress.
    pub fetch_max_bytes: usize,
    /// Record bytes that all Fetch responses not yet written to their sockets may hold together
    /// (`sluice.fetch.memory.bytes`), so many connections cannot hold gigabytes between them.
    pub fetch_memory_bytes: usize,
    /// A connection with no request and nothing in flight for this long is closed
    /// (`connections.max.idle.ms`); `None` never closes one.
    pub connections_max_idle_ms: Option<u64>,
    /// A response write that makes no progress for this long closes the connection
    /// (`sluice.socket.write.timeout.ms`): a client that stops reading cannot pin its responses.
    pub socket_write_timeout_ms: u64,
    /// An idempotent producer idle for this long (on the partition's clock, the largest batch
    /// timestamp written) is forgotten (`producer.id.expiration.ms`).
    pub producer_id_expiration_ms: i64,
    /// A batch whose timestamp is further ahead of this broker's clock is refused with
    /// INVALID_TIMESTAMP (`message.timestamp.after.max.ms`, Kafka 3.6's default of one hour).
    pub message_timestamp_after_max_ms: i64,
    /// A new consumer group's first rebalance waits this long for more members
    /// (`group.initial.rebalance.delay.ms`).
    pub group_initial_rebalance_delay_ms: i64,
    /// Session timeouts consumers may ask for (`group.min.session.timeout.ms`,
    /// `group.max.session.timeout.ms`); others get INVALID_SESSION_TIMEOUT.
    pub group_min_session_timeout_ms: i32,
    pub group_max_session_timeout_ms: i32,
    /// Members one consumer group may have (`group.max.size`).
    pub group_max_size: u32,
    /// Committed offsets of a group empty for this long expire (`offsets.retention.minutes`).
    pub offsets_retention_ms: i64,
    /// How often the coordinator looks for expired offsets (`offsets.retention.check.interval.ms`).
    pub offsets_retention_check_interval_ms: u64,
    /// Longest metadata string an offset commit may carry (`offset.metadata.max.bytes`).
    pub offset_metadata_max_bytes: usize,
    /// Mutual TLS on the node-to-node port (`raft.tls.cert`, `raft.tls.key`, `raft.tls.ca`):
    /// this node's certificate chain and key, and the cluster CA. All three or none.
    pub raft_tls_cert: Option<PathBuf>,
    pub raft_tls_key: Option<PathBuf>,
    pub raft_tls_ca: Option<PathBuf>,
    /// ACLs are enforced when set (`authorizer.class.name`: Kafka's StandardAuthorizer or
    /// AclAuthorizer name the built-in one).
    pub authorizer_enabled: bool,
    /// Principals every check passes for (`super.users`, `User:a;User:b`).
    pub super_users: Vec<String>,
    /// A resource no ACL names is open to all (`allow.everyone.if.no.acl.found`).
    pub allow_everyone_if_no_acl_found: bool,
    /// Partitions the whole cluster may hold (`sluice.max.partitions`); CreateTopics,
    /// CreatePartitions and auto-creation past it get POLICY_VIOLATION.
    pub max_partitions: usize,
    /// Topics one CreateTopics request may create (`sluice.create.topics.max.per.request`); the
    /// rest get POLICY_VIOLATION.
    pub create_topics_max_per_request: usize,
    /// Connections one client address may hold (`max.connections.per.ip`), with per-address
    /// exceptions (`max.connections.per.ip.overrides`, `host:count,...`).
    pub max_connections_per_ip: usize,
    pub max_connections_per_ip_overrides: BTreeMap<std::net::IpAddr, usize>,
    /// Bytes of requests read and not yet answered, across all connections
    /// (`queued.max.request.bytes`; 0 or negative: unbounded, as Kafka's -1).
    pub queued_max_request_bytes: usize,
    /// The admin HTTP's bearer token (`admin.api.token`, or read from `admin.api.token.file` /
    /// `--admin-token-file` by [`ServerConfig::finish`]); required on every mutating route.
    pub admin_api_token: Option<AdminToken>,
    pub admin_api_token_file: Option<PathBuf>,
    /// Reads need the token too (`admin.api.require.auth.for.reads`); needs a token.
    pub admin_api_require_auth_for_reads: bool,
    /// HTTPS on the admin port (`admin.tls.cert`, `admin.tls.key`): both or neither.
    pub admin_tls_cert: Option<PathBuf>,
    pub admin_tls_key: Option<PathBuf>,
    /// The Kafka listeners, resolved by [`ServerConfig::finish`] from `listeners`,
    /// `advertised.listeners` and `listener.security.protocol.map`. Empty means one PLAINTEXT
    /// listener on `kafka_addr` (see [`ServerConfig::kafka_listeners`]).
    pub listeners: Vec<ListenerConfig>,
    /// The raw `listeners` / `advertised.listeners` / `listener.security.protocol.map` values,
    /// kept until `finish` because a file may name them in any order.
    pub listeners_spec: Option<String>,
    pub advertised_listeners_spec: Option<String>,
    pub listener_protocol_map_spec: Option<String>,
    /// `ssl.*` for every TLS listener, and `listener.name.<name>.ssl.*` overrides per listener
    /// (keyed by the lower-case listener name, as Kafka writes these keys).
    pub ssl: SslConfig,
    pub listener_ssl: BTreeMap<String, SslConfig>,
    /// SASL mechanisms SASL listeners offer (`sasl.enabled.mechanisms`).
    pub sasl_enabled_mechanisms: Vec<String>,
    /// KIP-368 (`connections.max.reauth.ms`): 0 = sessions never expire; otherwise a SASL
    /// session must re-authenticate within this long or its connection is closed.
    pub connections_max_reauth_ms: u64,
}

/// A secret that must never reach a log line: its `Debug` prints nothing of it, so printing a
/// whole [`ServerConfig`] stays safe.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// `None` for an empty (or all-whitespace) token: an empty secret is no secret.
    pub fn new(text: &str) -> Option<AdminToken> {
        let t = text.trim();
        (!t.is_empty()).then(|| AdminToken(t.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Kafka's security protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn parse(s: &str) -> Option<SecurityProtocol> {
        match s.trim().to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Some(SecurityProtocol::Plaintext),
            "SSL" => Some(SecurityProtocol::Ssl),
            "SASL_PLAINTEXT" => Some(SecurityProtocol::SaslPlaintext),
            "SASL_SSL" => Some(SecurityProtocol::SaslSsl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

impl std::fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a TLS listener asks for client certificates (`ssl.client.auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientAuth {
    #[default]
    None,
    Requested,
    Required,
}

/// The PEM files of a TLS listener. `keystore` holds the private key and the certificate chain
/// (`ssl.keystore.location`, or `ssl.certificate.location` + `ssl.key.location` as two files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslConfig {
    pub keystore_location: Option<PathBuf>,
    pub certificate_location: Option<PathBuf>,
    pub key_location: Option<PathBuf>,
    pub truststore_location: Option<PathBuf>,
    pub client_auth: Option<ClientAuth>,
}

impl SslConfig {
    /// `self` with the fields `over` sets replaced (a listener's overrides over the global keys).
    fn overridden_by(&self, over: Option<&SslConfig>) -> SslConfig {
        let Some(o) = over else {
            return self.clone();
        };
        SslConfig {
            keystore_location: o
                .keystore_location
                .clone()
                .or_else(|| self.keystore_location.clone()),
            certificate_location: o
                .certificate_location
                .clone()
                .or_else(|| self.certificate_location.clone()),
            key_location: o.key_location.clone().or_else(|| self.key_location.clone()),
            truststore_location: o
                .truststore_location
                .clone()
                .or_else(|| self.truststore_location.clone()),
            client_auth: o.client_auth.or(self.client_auth),
        }
    }

    /// Applies one `ssl.*` key (without a `listener.name.<name>.` prefix).
    fn apply(&mut self, key: &str, value: &str) -> Result<bool, ConfigError> {
        match key {
            "ssl.keystore.type" | "ssl.truststore.type" => {
                if !value.eq_ignore_ascii_case("PEM") {
                    return Err(invalid(
                        key,
                        value,
                        "only PEM is supported (a PEM file with the key and certificate chain)",
                    ));
                }
            }
            "ssl.keystore.location" => self.keystore_location = Some(parse_path(key, value)?),
            "ssl.certificate.location" => self.certificate_location = Some(parse_path(key, value)?),
            "ssl.key.location" => self.key_location = Some(parse_path(key, value)?),
            "ssl.truststore.location" => self.truststore_location = Some(parse_path(key, value)?),
            "ssl.client.auth" => {
                self.client_auth = Some(match value.to_ascii_lowercase().as_str() {
                    "none" => ClientAuth::None,
                    "requested" => ClientAuth::Requested,
                    "required" => ClientAuth::Required,
                    _ => return Err(invalid(key, value, "expected required, requested or none")),
                })
            }
            "ssl.keystore.password" | "ssl.key.password" | "ssl.truststore.password" => {
                return Err(invalid(
                    key,
                    "(hidden)",
                    "encrypted PEM keys are not supported; give an unencrypted key file",
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// One Kafka listener, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// `PLAINTEXT`, `SASL_SSL`, or a name of the protocol map such as `CLIENT`.
    pub name: String,
    pub protocol: SecurityProtocol,
    /// host:port to bind.
    pub addr: String,
    /// host:port clients are told for this listener; `None`: `addr`.
    pub advertised: Option<String>,
    /// The TLS files (global keys with this listener's overrides); `None` without TLS.
    pub ssl: Option<SslConfig>,
}

impl ListenerConfig {
    pub fn plaintext(addr: &str, advertised: Option<String>) -> ListenerConfig {
        ListenerConfig {
            name: "PLAINTEXT".into(),
            protocol: SecurityProtocol::Plaintext,
            addr: addr.to_string(),
            advertised,
            ssl: None,
        }
    }

    pub fn advertised_addr(&self) -> String {
        self.advertised.clone().unwrap_or_else(|| self.addr.clone())
    }
}

/// Splits `NAME://host:port,...` into (NAME, host:port) pairs; an empty host means loopback (the
/// safe default; Kafka would bind every interface).
pub fn parse_listener_list(key: &str, value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, hostport) = item
            .split_once("://")
            .ok_or_else(|| invalid(key, item, "expected NAME://HOST:PORT"))?;
        let name = name.trim().to_ascii_uppercase();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                key,
                item,
                "listener names are letters, digits, '_' and '-'",
            ));
        }
        let hostport = match hostport.strip_prefix(':') {
            Some(port) => format!("127.0.0.1:{port}"),
            None => hostport.to_string(),
        };
        check_hostport(key, &hostport)?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(invalid(
                key,
                value,
                format!("listener {name} is named twice"),
            ));
        }
        out.push((name, hostport));
    }
    if out.is_empty() {
        return Err(invalid(key, value, "no listener"));
    }
    Ok(out)
}

/// `CLIENT:SASL_SSL,INTERNAL:PLAINTEXT` -> {CLIENT: SaslSsl, INTERNAL: Plaintext}.
pub fn parse_protocol_map(value: &str) -> Result<BTreeMap<String, SecurityProtocol>, ConfigError> {
    const KEY: &str = "listener.security.protocol.map";
    let mut map = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, proto) = item
            .split_once(':')
            .ok_or_else(|| invalid(KEY, item, "expected NAME:PROTOCOL"))?;
        let proto = SecurityProtocol::parse(proto).ok_or_else(|| {
            invalid(
                KEY,
                item,
                "protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
            )
        })?;
        map.insert(name.trim().to_ascii_uppercase(), proto);
    }
    Ok(map)
}

/// SASL mechanisms this broker implements.
pub const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            node_id: 1,
            data_dir: PathBuf::from("./sluice-data"),
            kafka_addr: "127.0.0.1:9092".into(),
            advertised_kafka_addr: None,
            raft_addr: "127.0.0.1:9093".into(),
            admin_addr: "127.0.0.1:9644".into(),
            peers: BTreeMap::new(),
            num_partitions: 1,
            default_replication_factor: 1,
            auto_create_topics_enable: true,
            message_max_bytes: 1_048_588,
            log_segment_bytes: 1 << 30,
            log_retention_ms: 7 * 24 * 3600 * 1000,
            log_retention_bytes: -1,
            log_retention_check_interval_ms: 300_000,
            socket_request_max_bytes: 104_857_600,
            max_connections: 10_000,
            max_in_flight_requests_per_connection: 64,
            fetch_max_bytes: 57_671_680,
            fetch_memory_bytes: 256 << 20,
            connections_max_idle_ms: Some(600_000),
            socket_write_timeout_ms: 30_000,
            producer_id_expiration_ms: 86_400_000,
            message_timestamp_after_max_ms: 3_600_000,
            group_initial_rebalance_delay_ms: 3_000,
            group_min_session_timeout_ms: 6_000,
            group_max_session_timeout_ms: 1_800_000,
            group_max_size: i32::MAX as u32,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
            offsets_retention_check_interval_ms: 600_000,
            offset_metadata_max_bytes: 4096,
            raft_tls_cert: None,
            raft_tls_key: None,
            raft_tls_ca: None,
            authorizer_enabled: false,
            super_users: Vec::new(),
            allow_everyone_if_no_acl_found: false,
            max_partitions: 100_000,
            create_topics_max_per_request: 1_000,
            max_connections_per_ip: i32::MAX as usize,
            max_connections_per_ip_overrides: BTreeMap::new(),
            queued_max_request_bytes: 512 << 20,
            admin_api_token: None,
            admin_api_token_file: None,
            admin_api_require_auth_for_reads: false,
            admin_tls_cert: None,
            admin_tls_key: None,
            listeners: Vec::new(),
            listeners_spec: None,
            advertised_listeners_spec: None,
            listener_protocol_map_spec: None,
            ssl: SslConfig::default(),
            listener_ssl: BTreeMap::new(),
            sasl_enabled_mechanisms: SASL_MECHANISMS.iter().map(|m| m.to_string()).collect(),
            connections_max_reauth_ms: 0,
        }
    }
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| invalid(key, value, "not a valid number"))
}

/// A whole number within `min..=max`, the range named in the error.
fn parse_in<T>(key: &str, value: &str, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let n: T = parse_num(key, value)?;
    if n < min || n > max {
        return Err(invalid(
            key,
            value,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(key, value, "expected true or false")),
    }
}

/// Accepts `host:port` where host is a name or an IP; the port must be a number.
pub fn check_hostport(key: &str, value: &str) -> Result<(), ConfigError> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(key, value, "expected HOST:PORT"))?;
    if host.is_empty() {
        return Err(invalid(key, value, "empty host"));
    }
    port.parse::<u16>()
        .map_err(|_| invalid(key, value, "port must be a number 0-65535"))?;
    Ok(())
}

fn parse_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if value.trim().is_empty() {
        return Err(invalid(key, value, "empty path"));
    }
    Ok(PathBuf::from(value.trim()))
}

/// `1@127.0.0.1:9093,2@127.0.0.1:19093` -> {1: .., 2: ..}
pub fn parse_peers(value: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('@')
            .ok_or_else(|| invalid("peers", item, "expected ID@HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| invalid("peers", item, "node id must be a non-negative integer"))?;
        check_hostport("peers", addr)?;
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(invalid(
                "peers",
                value,
                format!("node id {id} listed twice"),
            ));
        }
    }
    Ok(peers)
}

impl ServerConfig {
    /// Applies one `key=value` pair in Kafka's naming. Unknown keys are reported to the caller, which
    /// warns: Kafka also tolerates keys it does not know.
    pub fn apply_property(&mut self, key: &str, value: &str) -> Result<bool, ConfigError> {
        let v = value.trim();
        match key {
            "node.id" | "broker.id" => self.node_id = parse_num(key, v)?,
            // Checked here for a clear error at the line that is wrong; resolved in `finish`.
            "listeners" => {
                parse_listener_list(key, v)?;
                self.listeners_spec = Some(v.to_string());
            }
            "advertised.listeners" => {
                parse_listener_list(key, v)?;
                self.advertised_listeners_spec = Some(v.to_string());
            }
            "listener.security.protocol.map" => {
                parse_protocol_map(v)?;
                self.listener_protocol_map_spec = Some(v.to_string());
            }
            "sasl.enabled.mechanisms" => {
                let mut mechs = Vec::new();
                for m in v.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    let m = m.to_ascii_uppercase();
                    if !SASL_MECHANISMS.contains(&m.as_str()) {
                        return Err(invalid(
                            key,
                            v,
                            format!("unsupported mechanism {m}; supported: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
                        ));
                    }
                    mechs.push(m);
                }
                if mechs.is_empty() {
                    return Err(invalid(key, v, "no mechanism"));
                }
                self.sasl_enabled_mechanisms = mechs;
            }
            "connections.max.reauth.ms" => {
                self.connections_max_reauth_ms = parse_in(key, v, 0, i64::MAX as u64)?;
            }
            k if k.starts_with("ssl.") => return self.ssl.apply(k, v),
            k if k.starts_with("listener.name.") => {
                // listener.name.<name>.ssl.<key>
                let rest = &k["listener.name.".len()..];
                let Some((name, sub)) = rest.split_once('.') else {
                    return Ok(false);
                };
                if !sub.starts_with("ssl.") {
                    return Ok(false);
                }
                return self
                    .listener_ssl
                    .entry(name.to_ascii_lowercase())
                    .or_default()
                    .apply(sub, v);
            }
            "log.dirs" | "log.dir" => {
                let first = v.split(',').next().unwrap_or("").trim();
                if first.is_empty() {
                    return Err(invalid(key, v, "empty directory"));
                }
                self.data_dir = PathBuf::from(first);
            }
            "num.partitions" => {
                self.num_partitions = parse_num(key, v)?;
                if self.num_partitions < 1 {
                    return Err(invalid(key, v, "must be at least 1"));
                }
            }
            "default.replication.factor" => {
                self.default_replication_factor = parse_num(key, v)?;
                if self.default_replication_factor < 1 {
                    return Err(invalid(key, v, "must be at least 1"));
                }
            }
            "auto.create.topics.enable" => self.auto_create_topics_enable = parse_bool(key, v)?,
            "message.max.bytes" => {
                self.message_max_bytes = parse_num(key, v)?;
                if self.message_max_bytes < 64 {
                    return Err(invalid(key, v, "must be at least 64"));
                }
            }
            "log.segment.bytes" => {
                self.log_segment_bytes = parse_num(key, v)?;
                if self.log_segment_bytes < 1024 {
                    return Err(invalid(key, v, "must be at least 1024"));
                }
            }
            "log.retention.ms" => self.log_retention_ms = parse_num(key, v)?,
            "log.retention.minutes" => {
                self.log_retention_ms = parse_num::<i64>(key, v)?.saturating_mul(60_000)
            }
            "log.retention.hours" => {
                self.log_retention_ms = parse_num::<i64>(key, v)?.saturating_mul(3_600_000)
            }
            "log.retention.bytes" => self.log_retention_bytes = parse_num(key, v)?,
            "log.retention.check.interval.ms" => {
                let ms: u64 = parse_num(key, v)?;
                if ms < 1 {
                    return Err(invalid(key, v, "must be at least 1"));
                }
                self.log_retention_check_interval_ms = ms;
            }
            "socket.request.max.bytes" => self.socket_request_max_bytes = parse_num(key, v)?,
            "producer.id.expiration.ms" => {
                self.producer_id_expiration_ms = parse_in(key, v, 1, i64::MAX)?;
            }
            "message.timestamp.after.max.ms" => {
                self.message_timestamp_after_max_ms = parse_in(key, v, 0, i64::MAX)?;
            }
            "group.initial.rebalance.delay.ms" => {
                self.group_initial_rebalance_delay_ms = parse_in(key, v, 0, i32::MAX as i64)?;
            }
            "group.min.session.timeout.ms" => {
                self.group_min_session_timeout_ms = parse_in(key, v, 1, i32::MAX)?;
            }
            "group.max.session.timeout.ms" => {
                self.group_max_session_timeout_ms = parse_in(key, v, 1, i32::MAX)?;
            }
            "group.max.size" => self.group_max_size = parse_in(key, v, 1, i32::MAX as u32)?,
            "offsets.retention.minutes" => {
                let minutes: i64 = parse_in(key, v, 1, i64::MAX / 60_000)?;
                self.offsets_retention_ms = minutes * 60_000;
            }
            "offsets.retention.check.interval.ms" => {
                self.offsets_retention_check_interval_ms = parse_in(key, v, 1, i64::MAX as u64)?;
            }
            "offset.metadata.max.bytes" => {
                self.offset_metadata_max_bytes = parse_in(key, v, 0, i32::MAX as usize)?;
            }
            "max.connections" => self.max_connections = parse_num(key, v)?,
            // Kafka's own lower bound; i32 because the protocol's max_bytes fields are.
            "fetch.max.bytes" => {
                self.fetch_max_bytes = parse_in(key, v, 1024, i32::MAX as usize)?;
            }
            "sluice.fetch.memory.bytes" => {
                self.fetch_memory_bytes = parse_in(key, v, 1024, i32::MAX as usize)?;
            }
            // As in Kafka, a negative value turns the idle timeout off.
            "connections.max.idle.ms" => {
                let ms: i64 = parse_num(key, v)?;
                self.connections_max_idle_ms = match u64::try_from(ms) {
                    Ok(0) => {
                        return Err(invalid(key, v, "must be positive (negative: no timeout)"))
                    }
                    Ok(ms) => Some(ms),
                    Err(_) => None,
                };
            }
            "sluice.socket.write.timeout.ms" => {
                self.socket_write_timeout_ms = parse_in(key, v, 1, i32::MAX as u64)?;
            }
            "sluice.raft.addr" => {
                check_hostport(key, v)?;
                self.raft_addr = v.to_string()
            }
            "sluice.admin.addr" => {
                check_hostport(key, v)?;
                self.admin_addr = v.to_string()
            }
            "sluice.peers" => self.peers = parse_peers(v)?,
            "authorizer.class.name" => {
                self.authorizer_enabled = match v {
                    "" => false,
                    "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                    | "kafka.security.authorizer.AclAuthorizer"
                    | "sluice" => true,
                    _ => {
                        return Err(invalid(
                            key,
                            v,
                            "the built-in authorizer is named \
                             org.apache.kafka.metadata.authorizer.StandardAuthorizer (or empty: off)",
                        ))
                    }
                }
            }
            "super.users" => {
                let mut users = Vec::new();
                for u in v.split(';').map(str::trim).filter(|u| !u.is_empty()) {
                    match u.split_once(':') {
                        Some((t, n)) if !t.is_empty() && !n.is_empty() => users.push(u.to_string()),
                        _ => return Err(invalid(key, u, "expected Type:name, e.g. User:admin")),
                    }
                }
                self.super_users = users;
            }
            "max.connections.per.ip" => {
                self.max_connections_per_ip = parse_in(key, v, 0, i32::MAX as usize)?
            }
            "max.connections.per.ip.overrides" => {
                let mut map = BTreeMap::new();
                for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let (host, n) = item
                        .rsplit_once(':')
                        .ok_or_else(|| invalid(key, item, "expected IP:COUNT"))?;
                    let ip = host
                        .parse::<std::net::IpAddr>()
                        .map_err(|_| invalid(key, item, "the host must be an IP address"))?;
                    map.insert(ip, parse_in(key, n, 0, i32::MAX as usize)?);
                }
                self.max_connections_per_ip_overrides = map;
            }
            "queued.max.request.bytes" => {
                let n: i64 = parse_num(key, v)?;
                self.queued_max_request_bytes = usize::try_from(n).unwrap_or(0);
            }
            "sluice.max.partitions" => self.max_partitions = parse_in(key, v, 1, 10_000_000)?,
            "sluice.create.topics.max.per.request" => {
                self.create_topics_max_per_request = parse_in(key, v, 1, 1_000_000)?
            }
            "allow.everyone.if.no.acl.found" => {
                self.allow_everyone_if_no_acl_found = parse_bool(key, v)?
            }
            "raft.tls.cert" => self.raft_tls_cert = Some(parse_path(key, v)?),
            "raft.tls.key" => self.raft_tls_key = Some(parse_path(key, v)?),
            "raft.tls.ca" => self.raft_tls_ca = Some(parse_path(key, v)?),
            // The value is not echoed back in the error: it is a secret.
            "admin.api.token" => {
                self.admin_api_token =
                    Some(AdminToken::new(v).ok_or_else(|| invalid(key, "", "empty token"))?)
            }
            "admin.api.token.file" => self.admin_api_token_file = Some(parse_path(key, v)?),
            "admin.api.require.auth.for.reads" => {
                self.admin_api_require_auth_for_reads = parse_bool(key, v)?
            }
            "admin.tls.cert" => self.admin_tls_cert = Some(parse_path(key, v)?),
            "admin.tls.key" => self.admin_tls_key = Some(parse_path(key, v)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Reads a `server.properties` file: `key=value` lines, `#`/`!` comments, blank lines.
    pub fn apply_file(&mut self, path: &Path) -> Result<Vec<String>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut unknown = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .or_else(|| line.split_once(':'))
                .ok_or_else(|| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line: n + 1,
                    text: line.to_string(),
                })?;
            if !self.apply_property(k.trim(), v)? {
                unknown.push(k.trim().to_string());
            }
        }
        Ok(unknown)
    }

    /// The address clients are told to connect to.
    pub fn advertised_kafka_addr(&self) -> String {
        self.advertised_kafka_addr
            .clone()
            .unwrap_or_else(|| self.kafka_addr.clone())
    }

    /// The Kafka listeners to bind: the resolved ones, or one PLAINTEXT listener on `kafka_addr`
    /// (a config that never went through `finish`, as the test kit builds them).
    pub fn kafka_listeners(&self) -> Vec<ListenerConfig> {
        if self.listeners.is_empty() {
            vec![ListenerConfig::plaintext(
                &self.kafka_addr,
                self.advertised_kafka_addr.clone(),
            )]
        } else {
            self.listeners.clone()
        }
    }

    /// Resolves `listeners`, `advertised.listeners`, the protocol map and each TLS listener's
    /// files into [`ServerConfig::listeners`].
    pub fn resolve_listeners(&mut self) -> Result<(), ConfigError> {
        let Some(spec) = self.listeners_spec.clone() else {
            self.listeners = vec![ListenerConfig::plaintext(
                &self.kafka_addr,
                self.advertised_kafka_addr.clone(),
            )];
            return self.check_listener_files();
        };
        let map = match &self.listener_protocol_map_spec {
            Some(m) => parse_protocol_map(m)?,
            None => BTreeMap::new(),
        };
        let mut listeners = Vec::new();
        for (name, addr) in parse_listener_list("listeners", &spec)? {
            let protocol = match map.get(&name) {
                Some(p) => *p,
                None => SecurityProtocol::parse(&name).ok_or_else(|| {
                    invalid(
                        "listeners",
                        &spec,
                        format!(
                            "listener {name} is not a security protocol and not in \
                             listener.security.protocol.map"
                        ),
                    )
                })?,
            };
            if listeners.iter().any(|l: &ListenerConfig| l.addr == addr) {
                return Err(invalid(
                    "listeners",
                    &spec,
                    format!("two listeners on {addr}"),
                ));
            }
            listeners.push(ListenerConfig {
                name,
                protocol,
                addr,
                advertised: None,
                ssl: None,
            });
        }
        if let Some(adv) = &self.advertised_listeners_spec {
            for (name, addr) in parse_listener_list("advertised.listeners", adv)? {
                let Some(l) = listeners.iter_mut().find(|l| l.name == name) else {
                    return Err(invalid(
                        "advertised.listeners",
                        adv,
                        format!("{name} is not one of the listeners"),
                    ));
                };
                l.advertised = Some(addr);
            }
        }
        // --advertised-kafka-addr still names the first listener's address when
        // advertised.listeners does not.
        if listeners[0].advertised.is_none() {
            listeners[0].advertised = self.advertised_kafka_addr.clone();
        }
        self.kafka_addr = listeners[0].addr.clone();
        self.advertised_kafka_addr = listeners[0].advertised.clone();
        self.listeners = listeners;
        self.check_listener_files()
    }

    /// Gives every TLS listener its files and refuses a TLS listener without a key.
    fn check_listener_files(&mut self) -> Result<(), ConfigError> {
        for l in &mut self.listeners {
            if !l.protocol.uses_tls() {
                continue;
            }
            let ssl = self
                .ssl
                .overridden_by(self.listener_ssl.get(&l.name.to_ascii_lowercase()));
            let has_key = ssl.keystore_location.is_some()
                || (ssl.certificate_location.is_some() && ssl.key_location.is_some());
            if !has_key {
                return Err(invalid(
                    "ssl.keystore.location",
                    "",
                    format!(
                        "listener {} is {} and needs ssl.keystore.location (a PEM file with the \
                         private key and certificate chain)",
                        l.name, l.protocol
                    ),
                ));
            }
            if ssl.client_auth.unwrap_or_default() != ClientAuth::None
                && ssl.truststore_location.is_none()
            {
                return Err(invalid(
                    "ssl.truststore.location",
                    "",
                    format!(
                        "listener {} checks client certificates (ssl.client.auth) and needs \
                         ssl.truststore.location (the PEM CA)",
                        l.name
                    ),
                ));
            }
            l.ssl = Some(ssl);
        }
        Ok(())
    }

    /// Final consistency checks once every source has been applied.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        self.resolve_listeners()?;
        check_hostport("kafka-addr", &self.kafka_addr)?;
        check_hostport("raft-addr", &self.raft_addr)?;
        check_hostport("admin-addr", &self.admin_addr)?;
        if let Some(a) = &self.advertised_kafka_addr {
            check_hostport("advertised-kafka-addr", a)?;
        }
        if self.peers.is_empty() {
            self.peers.insert(self.node_id, self.raft_addr.clone());
        }
        let tls = [&self.raft_tls_cert, &self.raft_tls_key, &self.raft_tls_ca];
        if tls.iter().any(|f| f.is_some()) && !tls.iter().all(|f| f.is_some()) {
            return Err(invalid(
                "raft.tls",
                &format!("{tls:?}"),
                "set all of raft.tls.cert, raft.tls.key and raft.tls.ca (--raft-tls-cert/-key/-ca), or none",
            ));
        }
        self.finish_admin()?;
        match self.peers.get(&self.node_id) {
            None => {
                return Err(invalid(
                    "peers",
                    &format!("{:?}", self.peers),
                    format!("the peer list must include this node (id {})", self.node_id),
                ))
            }
            // The peer list is what other nodes dial; a mismatch means nobody can reach us.
            Some(addr)
                if addr != &self.raft_addr
                    && (addr.parse::<SocketAddr>().ok()
                        != self.raft_addr.parse::<SocketAddr>().ok()
                        || addr.parse::<SocketAddr>().is_err()) =>
            {
                return Err(invalid(
                    "peers",
                    addr,
                    format!(
                        "node {} is listed at {addr} but --raft-addr is {}",
                        self.node_id, self.raft_addr
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The admin HTTP's settings: the token file read, and the combinations that make sense.
    fn finish_admin(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.admin_api_token_file {
            if self.admin_api_token.is_some() {
                return Err(invalid(
                    "admin.api.token.file",
                    &path.display().to_string(),
                    "set admin.api.token or admin.api.token.file (--admin-token-file), not both",
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            self.admin_api_token = Some(AdminToken::new(&text).ok_or_else(|| {
                invalid(
                    "admin.api.token.file",
                    &path.display().to_string(),
                    "the file holds no token",
                )
            })?);
        }
        if self.admin_api_require_auth_for_reads && self.admin_api_token.is_none() {
            return Err(invalid(
                "admin.api.require.auth.for.reads",
                "true",
                "needs a token: set admin.api.token or --admin-token-file",
            ));
        }
        if self.admin_tls_cert.is_some() != self.admin_tls_key.is_some() {
            return Err(invalid(
                "admin.tls",
                &format!("{:?}", (&self.admin_tls_cert, &self.admin_tls_key)),
                "set both admin.tls.cert and admin.tls.key (--admin-tls-cert/--admin-tls-key), or neither",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_override_defaults() {
        let mut c = ServerConfig::default();
        assert!(c.apply_property("broker.id", "7").unwrap());
        assert!(c
            .apply_property("listeners", "PLAINTEXT://127.0.0.1:19092")
            .unwrap());
        assert!(c.apply_property("num.partitions", "3").unwrap());
        assert!(c.apply_property("log.retention.hours", "2").unwrap());
        assert!(c
            .apply_property("log.retention.check.interval.ms", "250")
            .unwrap());
        assert!(c
            .apply_property("log.retention.check.interval.ms", "0")
            .is_err());
        assert!(!c.apply_property("some.unknown.key", "x").unwrap());
        c.resolve_listeners().unwrap();
        assert_eq!(c.node_id, 7);
        assert_eq!(c.kafka_addr, "127.0.0.1:19092");
        assert_eq!(c.num_partitions, 3);
        assert_eq!(c.log_retention_ms, 7_200_000);
        assert_eq!(c.log_retention_check_interval_ms, 250);
    }

    #[test]
    fn connection_and_request_limits_parse_as_in_kafka() {
        let mut c = ServerConfig::default();
        c.apply_property("max.connections.per.ip", "5").unwrap();
        c.apply_property("max.connections.per.ip.overrides", "127.0.0.1:50, ::1:7")
            .unwrap();
        assert_eq!(c.max_connections_per_ip, 5);
        assert_eq!(
            c.max_connections_per_ip_overrides
                .get(&"::1".parse::<std::net::IpAddr>().unwrap()),
            Some(&7)
        );
        assert!(c
            .apply_property("max.connections.per.ip.overrides", "host.example:3")
            .is_err());
        c.apply_property("queued.max.request.bytes", "-1").unwrap();
        assert_eq!(
            c.queued_max_request_bytes, 0,
            "-1 is unbounded, as in Kafka"
        );
        c.apply_property("queued.max.request.bytes", "1048576")
            .unwrap();
        assert_eq!(c.queued_max_request_bytes, 1 << 20);
    }

    #[test]
    fn authorizer_keys_as_in_kafka() {
        let mut c = ServerConfig::default();
        assert!(!c.authorizer_enabled);
        let standard = "org.apache.kafka.metadata.authorizer.StandardAuthorizer";
        assert!(c.apply_property("authorizer.class.name", standard).unwrap());
        assert!(c.authorizer_enabled);
        assert!(c
            .apply_property("authorizer.class.name", "com.example.Mine")
            .is_err());
        c.apply_property("super.users", "User:admin; User:ops")
            .unwrap();
        assert_eq!(c.super_users, vec!["User:admin", "User:ops"]);
        assert!(c.apply_property("super.users", "admin").is_err());
        c.apply_property("allow.everyone.if.no.acl.found", "true")
            .unwrap();
        assert!(c.allow_everyone_if_no_acl_found);
        let mut tls = ServerConfig::default();
        tls.apply_property("raft.tls.cert", "/x/node-1.pem")
            .unwrap();
        assert!(
            tls.finish().is_err(),
            "a cert without key and CA was accepted"
        );
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let mut c = ServerConfig::default();
        let e = c.apply_property("num.partitions", "zero").unwrap_err();
        assert!(e.to_string().contains("num.partitions"), "{e}");
        assert!(c.apply_property("num.partitions", "0").is_err());
        assert!(c.apply_property("listeners", "PLAINTEXT://nohost").is_err());
        assert!(c
            .apply_property("auto.create.topics.enable", "yes")
            .is_err());
    }

    #[test]
    fn fetch_and_connection_limits_parse() {
        let mut c = ServerConfig::default();
        assert_eq!(c.fetch_max_bytes, 57_671_680);
        assert_eq!(c.connections_max_idle_ms, Some(600_000));
        assert!(c.apply_property("fetch.max.bytes", "1048576").unwrap());
        assert!(c
            .apply_property("sluice.fetch.memory.bytes", "67108864")
            .unwrap());
        assert!(c.apply_property("connections.max.idle.ms", "1500").unwrap());
        assert!(c
            .apply_property("sluice.socket.write.timeout.ms", "2000")
            .unwrap());
        assert_eq!(c.fetch_max_bytes, 1_048_576);
        assert_eq!(c.fetch_memory_bytes, 67_108_864);
        assert_eq!(c.connections_max_idle_ms, Some(1500));
        assert_eq!(c.socket_write_timeout_ms, 2000);
        assert!(c.apply_property("connections.max.idle.ms", "-1").unwrap());
        assert_eq!(c.connections_max_idle_ms, None);
    }

    #[test]
    fn fetch_and_connection_limits_refuse_bad_values() {
        let mut c = ServerConfig::default();
        for (key, value) in [
            ("fetch.max.bytes", "1023"),
            ("fetch.max.bytes", "-1"),
            ("fetch.max.bytes", "2147483648"),
            ("fetch.max.bytes", "lots"),
            ("sluice.fetch.memory.bytes", "0"),
            ("sluice.fetch.memory.bytes", "1e9"),
            ("connections.max.idle.ms", "0"),
            ("connections.max.idle.ms", "soon"),
            ("sluice.socket.write.timeout.ms", "0"),
            ("sluice.socket.write.timeout.ms", "-5"),
        ] {
            let e = c.apply_property(key, value).unwrap_err();
            assert!(e.to_string().contains(key), "{key}={value}: {e}");
        }
        let e = c.apply_property("fetch.max.bytes", "10").unwrap_err();
        assert!(e.to_string().contains("between 1024 and"), "{e}");
        // A refused value leaves the previous one in place.
        assert_eq!(c.fetch_max_bytes, 57_671_680);
        assert_eq!(c.connections_max_idle_ms, Some(600_000));
    }

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1@127.0.0.1:9093, 2@127.0.0.1:19093").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[&2], "127.0.0.1:19093");
        assert!(parse_peers("1@127.0.0.1").is_err());
        assert!(parse_peers("x@127.0.0.1:1").is_err());
        assert!(parse_peers("1@a:1,1@b:2").is_err());
        assert!(parse_peers("127.0.0.1:9093").is_err());
    }

    #[test]
    fn finish_requires_self_in_peers() {
        let mut c = ServerConfig {
            peers: parse_peers("2@127.0.0.1:19093").unwrap(),
            ..ServerConfig::default()
        };
        assert!(c.finish().is_err());
        let mut c = ServerConfig::default();
        c.finish().unwrap();
        assert_eq!(c.peers[&1], "127.0.0.1:9093");
    }

    #[test]
    fn admin_token_from_a_file_is_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret-token\n").unwrap();
        let mut c = ServerConfig::default();
        assert!(c
            .apply_property("admin.api.token.file", path.to_str().unwrap())
            .unwrap());
        assert!(c
            .apply_property("admin.api.require.auth.for.reads", "true")
            .unwrap());
        c.finish().unwrap();
        assert_eq!(
            c.admin_api_token.as_ref().map(AdminToken::expose),
            Some("s3cret-token")
        );
        assert!(c.admin_api_require_auth_for_reads);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token leaks in Debug"
        );
        // Both sources, an empty file, reads without a token, half a TLS pair: refused.
        c.admin_api_token_file = Some(path.clone());
        assert!(c.finish().is_err());
        std::fs::write(&path, " \n").unwrap();
        let mut c = ServerConfig {
            admin_api_token_file: Some(path),
            ..ServerConfig::default()
        };
        assert!(c.finish().is_err());
        assert!(c.apply_property("admin.api.token", "  ").is_err());
        let mut c = ServerConfig {
            admin_api_require_auth_for_reads: true,
            ..ServerConfig::default()
        };
        assert!(c.finish().is_err());
        let mut c = ServerConfig::default();
        assert!(c.apply_property("admin.tls.cert", "/x/cert.pem").unwrap());
        let e = c.finish().unwrap_err();
        assert!(e.to_string().contains("admin.tls"), "{e}");
        assert!(c.apply_property("admin.tls.key", "/x/key.pem").unwrap());
        c.finish().unwrap();
    }

    #[test]
    fn file_with_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.properties");
        std::fs::write(
            &path,
            "# comment\nnode.id=3\n\nlog.dirs=/tmp/x,/tmp/y\nfoo.bar=1\n",
        )
        .unwrap();
        let mut c = ServerConfig::default();
        let unknown = c.apply_file(&path).unwrap();
        assert_eq!(unknown, vec!["foo.bar".to_string()]);
        assert_eq!(c.node_id, 3);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        std::fs::write(&path, "garbage line\n").unwrap();
        assert!(ServerConfig::default().apply_file(&path).is_err());
    }

    fn listeners_of(props: &[(&str, &str)]) -> Result<Vec<ListenerConfig>, ConfigError> {
        let mut c = ServerConfig::default();
        for (k, v) in props {
            c.apply_property(k, v)?;
        }
        c.resolve_listeners()?;
        Ok(c.listeners)
    }

    #[test]
    fn listeners_parse_as_kafka_writes_them() {
        // No listeners key: one PLAINTEXT listener on the default address.
        let l = listeners_of(&[]).unwrap();
        assert_eq!(l, vec![ListenerConfig::plaintext("127.0.0.1:9092", None)]);
        let l = listeners_of(&[
            (
                "listeners",
                "PLAINTEXT://127.0.0.1:9092, sasl_ssl://localhost:9094,SSL://:9095",
            ),
            ("advertised.listeners", "SASL_SSL://broker.example:19094"),
            ("ssl.keystore.location", "/k.pem"),
        ])
        .unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].name, "SASL_SSL");
        assert_eq!(l[1].protocol, SecurityProtocol::SaslSsl);
        assert_eq!(l[1].advertised_addr(), "broker.example:19094");
        assert_eq!(l[2].addr, "127.0.0.1:9095");
        assert_eq!(l[0].advertised_addr(), "127.0.0.1:9092");
        assert!(l[0].ssl.is_none());
        assert_eq!(
            l[2].ssl.as_ref().unwrap().keystore_location,
            Some(PathBuf::from("/k.pem"))
        );
        // Named listeners through the protocol map, with a per-listener TLS override.
        let l = listeners_of(&[
            ("listeners", "CLIENT://127.0.0.1:1,INTERNAL://127.0.0.1:2"),
            (
                "listener.security.protocol.map",
                "CLIENT:SASL_SSL,INTERNAL:PLAINTEXT",
            ),
            ("ssl.keystore.location", "/global.pem"),
            ("listener.name.client.ssl.keystore.location", "/client.pem"),
            ("listener.name.client.ssl.client.auth", "requested"),
            ("ssl.truststore.location", "/ca.pem"),
        ])
        .unwrap();
        assert_eq!(l[0].protocol, SecurityProtocol::SaslSsl);
        assert_eq!(l[1].protocol, SecurityProtocol::Plaintext);
        let ssl = l[0].ssl.as_ref().unwrap();
        assert_eq!(ssl.keystore_location, Some(PathBuf::from("/client.pem")));
        assert_eq!(ssl.client_auth, Some(ClientAuth::Requested));
        assert_eq!(ssl.truststore_location, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn listener_and_security_errors_are_clear() {
        let err = |props: &[(&str, &str)]| listeners_of(props).unwrap_err().to_string();
        let e = err(&[("listeners", "CLIENT://127.0.0.1:1")]);
        assert!(e.contains("listener.security.protocol.map"), "{e}");
        let e = err(&[(
            "listeners",
            "PLAINTEXT://127.0.0.1:1,PLAINTEXT://127.0.0.1:2",
        )]);
        assert!(e.contains("named twice"), "{e}");
        let e = err(&[("listeners", "PLAINTEXT://127.0.0.1:1,SSL://127.0.0.1:1")]);
        assert!(e.contains("two listeners on"), "{e}");
        let e = err(&[("listeners", "127.0.0.1:1")]);
        assert!(e.contains("NAME://HOST:PORT"), "{e}");
        let e = err(&[("listeners", "SSL://127.0.0.1:1")]);
        assert!(e.contains("needs ssl.keystore.location"), "{e}");
        let e = err(&[
            ("listeners", "PLAINTEXT://127.0.0.1:1"),
            ("advertised.listeners", "SSL://h:1"),
        ]);
        assert!(e.contains("not one of the listeners"), "{e}");
        let e = err(&[
            ("listeners", "SSL://127.0.0.1:1"),
            ("ssl.keystore.location", "/k.pem"),
            ("ssl.client.auth", "required"),
        ]);
        assert!(e.contains("ssl.truststore.location"), "{e}");
        let e = err(&[("listener.security.protocol.map", "A:TLS")]);
        assert!(e.contains("protocol must be"), "{e}");
        let e = err(&[("ssl.keystore.type", "JKS")]);
        assert!(e.contains("only PEM"), "{e}");
        let e = err(&[("ssl.client.auth", "always")]);
        assert!(e.contains("required, requested or none"), "{e}");
        let e = err(&[("sasl.enabled.mechanisms", "GSSAPI")]);
        assert!(e.contains("unsupported mechanism GSSAPI"), "{e}");
        let e = err(&[("connections.max.reauth.ms", "-1")]);
        assert!(e.contains("connections.max.reauth.ms"), "{e}");
        let mut c = ServerConfig::default();
        assert_eq!(
            c.sasl_enabled_mechanisms,
            vec!["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
        );
        c.apply_property("sasl.enabled.mechanisms", "scram-sha-512")
            .unwrap();
        assert_eq!(c.sasl_enabled_mechanisms, vec!["SCRAM-SHA-512"]);
        c.apply_property("connections.max.reauth.ms", "5000")
            .unwrap();
        assert_eq!(c.connections_max_reauth_ms, 5000);
    }
}
