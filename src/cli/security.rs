//! How the CLI secures its connections: a librdkafka-style properties file
//! (`--command-config FILE`, as the Kafka tools take a client properties file) with
//! `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`,
//! `ssl.certificate.location` and `ssl.key.location`; TLS (rustls) and the SASL client exchange
//! (PLAIN, SCRAM-SHA-256/512) run under `BrokerConn::connect`.
//!
//! The settings apply per process (the binary installs them once) or per broker address (tests
//! that talk to several in-process clusters at once), so `BrokerConn::connect(addr)` and every
//! caller of it keep their shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::SecurityProtocol;

#[derive(Debug, Clone)]
pub struct ClientSecurity {
    pub protocol: SecurityProtocol,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* only).
    pub sasl_mechanism: String,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub ssl_ca_location: Option<PathBuf>,
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
}

impl Default for ClientSecurity {
    fn default() -> Self {
        ClientSecurity {
            protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: "PLAIN".into(),
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
        }
    }
}

impl ClientSecurity {
    pub fn from_file(path: &Path) -> Result<ClientSecurity> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --command-config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("--command-config {}", path.display()))
    }

    /// `key=value` lines, `#`/`!` comments. Unknown keys are refused: a typo in a security
    /// setting must not silently mean "plaintext".
    pub fn parse(text: &str) -> Result<ClientSecurity> {
        let mut s = ClientSecurity::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| anyhow!("line {}: expected key=value", n + 1))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "security.protocol" => {
                    s.protocol = SecurityProtocol::parse(v).ok_or_else(|| {
                        anyhow!("security.protocol={v}: expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
                    })?
                }
                "sasl.mechanism" | "sasl.mechanisms" => {
                    let m = v.to_ascii_uppercase();
                    if !crate::config::SASL_MECHANISMS.contains(&m.as_str()) {
                        bail!("sasl.mechanism={v}: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512");
                    }
                    s.sasl_mechanism = m;
                }
                "sasl.username" => s.sasl_username = Some(v.to_string()),
                "sasl.password" => s.sasl_password = Some(v.to_string()),
                "ssl.ca.location" => s.ssl_ca_location = Some(PathBuf::from(v)),
                "ssl.certificate.location" => s.ssl_certificate_location = Some(PathBuf::from(v)),
                "ssl.key.location" => s.ssl_key_location = Some(PathBuf::from(v)),
                _ => bail!("line {}: unknown key {k}", n + 1),
            }
        }
        if s.protocol.uses_sasl() && (s.sasl_username.is_none() || s.sasl_password.is_none()) {
            bail!(
                "security.protocol={} needs sasl.username and sasl.password",
                s.protocol
            );
        }
        if s.protocol.uses_tls() && s.ssl_ca_location.is_none() {
            bail!(
                "security.protocol={} needs ssl.ca.location (the CA that signed the brokers' certificates)",
                s.protocol
            );
        }
        if s.ssl_certificate_location.is_some() != s.ssl_key_location.is_some() {
            bail!("ssl.certificate.location and ssl.key.location go together");
        }
        Ok(s)
    }

    /// The rustls client config: the CA, and the client certificate if one is set.
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let ca = self
            .ssl_ca_location
            .as_ref()
            .ok_or_else(|| anyhow!("TLS needs ssl.ca.location"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots);
        let config = match (&self.ssl_certificate_location, &self.ssl_key_location) {
            (Some(cert), Some(key)) => {
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| anyhow!("{}: no usable private key: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(read_certs(cert)?, key)
                    .context("client certificate and key")?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no CERTIFICATE in the file", path.display());
    }
    Ok(certs)
}

/// The name the broker's certificate must carry: the host of `addr`.
pub fn server_name(addr: &str) -> Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| anyhow!("bad TLS server name '{host}': {e}"))
}

/// Settings by broker address ("" for the process default).
static SETTINGS: RwLock<Option<HashMap<String, Arc<ClientSecurity>>>> = RwLock::new(None);

/// Every connection of this process uses `security` (the binary, from `--command-config`).
pub fn install_default(security: ClientSecurity) {
    install_for("", security);
}

/// Connections to `addr` use `security` (tests with several clusters in one process).
pub fn install_for(addr: &str, security: ClientSecurity) {
    let mut s = SETTINGS.write().unwrap_or_else(|p| p.into_inner());
    s.get_or_insert_with(HashMap::new)
        .insert(addr.to_string(), Arc::new(security));
}

/// Drops the settings of these addresses. Test clusters call it when they stop: their ports go
/// back to the OS, and a later cluster in the same process that is given one must not inherit
/// another test's SASL or TLS settings (that made a plaintext test fail its SASL handshake).
pub fn forget(addrs: &[String]) {
    let mut s = SETTINGS.write().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = s.as_mut() {
        for a in addrs.iter().filter(|a| !a.is_empty()) {
            m.remove(a);
        }
    }
}

/// What a connection to `addr` uses: its own settings, the default, or plaintext.
pub fn for_addr(addr: &str) -> Arc<ClientSecurity> {
    let s = SETTINGS.read().unwrap_or_else(|p| p.into_inner());
    s.as_ref()
        .and_then(|m| m.get(addr).or_else(|| m.get("")))
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_addresses_fall_back_to_plaintext() {
        // A port no real cluster of this test process holds at the same time.
        let addr = "127.0.0.1:1";
        install_for(
            addr,
            ClientSecurity {
                protocol: SecurityProtocol::SaslPlaintext,
                ..ClientSecurity::default()
            },
        );
        assert_eq!(for_addr(addr).protocol, SecurityProtocol::SaslPlaintext);
        forget(&[addr.to_string(), String::new()]);
        assert_eq!(for_addr(addr).protocol, SecurityProtocol::Plaintext);
    }

    #[test]
    fn command_config_files_parse_and_refuse_mistakes() {
        let s = ClientSecurity::parse(
            "# client\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-256\n\
             sasl.username=alice\nsasl.password=a=b\nssl.ca.location=/ca.pem\n",
        )
        .unwrap();
        assert_eq!(s.protocol, SecurityProtocol::SaslSsl);
        assert_eq!(s.sasl_mechanism, "SCRAM-SHA-256");
        assert_eq!(s.sasl_password.as_deref(), Some("a=b"));
        for (bad, why) in [
            ("security.protocol=TLS", "expected PLAINTEXT"),
            ("sasl.mechanism=GSSAPI", "expected PLAIN"),
            ("ssl.keystore.location=/x", "unknown key"),
            (
                "security.protocol=SASL_PLAINTEXT\nsasl.username=a",
                "needs sasl.username",
            ),
            ("security.protocol=SSL", "needs ssl.ca.location"),
            ("ssl.certificate.location=/c", "go together"),
            ("garbage", "expected key=value"),
        ] {
            let e = format!("{:#}", ClientSecurity::parse(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(
            ClientSecurity::parse("").unwrap().protocol,
            SecurityProtocol::Plaintext
        );
    }
}
