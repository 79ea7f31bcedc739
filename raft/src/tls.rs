//! Mutual TLS for the node-to-node port, and the PEM loading the broker's other TLS listeners share.
//!
//! Every node holds a certificate from one cluster CA that names it: the DNS name
//! `node-<id>.sluice` ([`node_dns_name`]) among its subject alternative names. Both ends check it:
//! a dialling node verifies that the peer it reached holds the certificate of the node id it meant
//! to reach, and the accepting node takes the caller's node id from the caller's certificate,
//! never from a field of a frame. A connection without a valid certificate from the cluster CA
//! fails in the handshake, before any frame is read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::NodeId;

/// Why TLS material could not be loaded or does not fit its use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Config(String),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto provider every Sluice TLS config uses (ring: no C toolchain beyond ring's own).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file, in order (a chain: the leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("no usable private key: {e}")))
}

/// A root store holding every certificate of a PEM file (the CA, or several).
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The DNS name a node's certificate carries: `node-<id>.sluice`.
pub fn node_dns_name(id: NodeId) -> String {
    format!("node-{id}.sluice")
}

/// The node id a certificate names, from its `node-<id>.sluice` subject alternative name; a
/// certificate naming no node, or more than one, names none.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    let names = dns_names(cert)?;
    let mut ids = names.iter().filter_map(|n| {
        n.strip_prefix("node-")
            .and_then(|rest| rest.strip_suffix(".sluice"))
            .and_then(|id| id.parse::<NodeId>().ok().filter(|n| n.to_string() == id))
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        (None, _) => Err(format!(
            "the certificate names no node (no node-<id>.sluice name among {names:?})"
        )),
        (Some(a), Some(b)) => Err(format!(
            "the certificate names several nodes ({a}, {b}, ...)"
        )),
    }
}

fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                out.push(n.to_string());
            }
        }
    }
    Ok(out)
}

/// Where a node's Raft-port TLS material lives (`--raft-tls-cert/-key/-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The node-to-node TLS configs of one node: both sides present the node's certificate and
/// require the peer's, issued by the cluster CA.
#[derive(Clone)]
pub struct PeerTls {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    /// Loads the files and checks that the certificate names `node_id`: a node started with
    /// another node's certificate would be refused by every peer, so it fails at start instead.
    pub fn load(files: &PeerTlsFiles, node_id: NodeId) -> Result<PeerTls, TlsError> {
        let chain = load_certs(&files.cert)?;
        let named = node_id_of(&chain[0]).map_err(|e| file_err(&files.cert, e))?;
        if named != node_id {
            return Err(file_err(
                &files.cert,
                format!("the certificate is node {named}'s, but this is node {node_id}"),
            ));
        }
        let key = load_private_key(&files.key)?;
        let roots = load_roots(&files.ca)?;
        Self::build(chain, key, roots)
    }

    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
    ) -> Result<PeerTls, TlsError> {
        let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg_err)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(cfg_err)?;
        Ok(PeerTls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The name a dialling node verifies the peer's certificate against: that of the node id
    /// it means to reach, whatever address it dials.
    pub(crate) fn server_name(target: NodeId) -> Result<ServerName<'static>, String> {
        ServerName::try_from(node_dns_name(target)).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod test_certs {
    //! A throwaway cluster CA and node certificates for the transport's tests.

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    pub(crate) struct TestCa {
        pub(crate) pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> TestCa {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("ca");
            TestCa {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf for `names` (and 127.0.0.1), good for both TLS ends: (cert PEM, key PEM).
        pub(crate) fn leaf(&self, names: &[String]) -> (String, String) {
            let mut params = CertificateParams::new(names.to_vec()).expect("params");
            params.distinguished_name.push(
                DnType::CommonName,
                names.first().cloned().unwrap_or_default(),
            );
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &self.issuer).expect("leaf");
            (cert.pem(), key.serialize_pem())
        }

        pub(crate) fn peer_tls(&self, names: &[String]) -> PeerTls {
            let (cert, key) = self.leaf(names);
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("chain");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
                roots.add(c.expect("ca")).expect("root");
            }
            PeerTls::build(chain, key, Arc::new(roots)).expect("tls")
        }

        pub(crate) fn node(&self, id: NodeId) -> PeerTls {
            self.peer_tls(&[node_dns_name(id)])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::TestCa;
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("cert")
    }

    #[test]
    fn node_id_comes_from_the_node_name_in_the_certificate() {
        let ca = TestCa::new("ca");
        let (cert, _) = ca.leaf(&["localhost".into(), node_dns_name(7)]);
        assert_eq!(node_id_of(&der(&cert)), Ok(7));
        let (client, _) = ca.leaf(&["alice".into()]);
        assert!(node_id_of(&der(&client)).is_err());
        let (padded, _) = ca.leaf(&["node-07.sluice".into(), "node-+7.sluice".into()]);
        assert!(
            node_id_of(&der(&padded)).is_err(),
            "non-canonical ids name a node"
        );
        let (two, _) = ca.leaf(&[node_dns_name(1), node_dns_name(2)]);
        assert!(node_id_of(&der(&two)).is_err());
    }

    #[test]
    fn a_node_refuses_to_start_with_another_nodes_certificate() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("ca");
        let (cert, key) = ca.leaf(&[node_dns_name(2)]);
        let files = PeerTlsFiles {
            cert: dir.path().join("n.pem"),
            key: dir.path().join("n.key"),
            ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.cert, cert)?;
        std::fs::write(&files.key, key)?;
        std::fs::write(&files.ca, &ca.pem)?;
        assert!(PeerTls::load(&files, 2).is_ok());
        let err = PeerTls::load(&files, 1).expect_err("node 1 with node 2's certificate");
        assert!(err.to_string().contains("node 2's"), "{err}");
        std::fs::write(&files.key, "not a key")?;
        assert!(PeerTls::load(&files, 2).is_err());
        Ok(())
    }
}
