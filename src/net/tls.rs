//! TLS on the Kafka listeners: the rustls server config of an SSL/SASL_SSL listener from its PEM
//! files, and the principal a client certificate names.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use sluice_raft::tls::{load_certs, load_private_key, load_roots, provider, TlsError};

use crate::config::{ClientAuth, SslConfig};

/// The server config of one TLS listener: its key and chain, and whether (and against which CA)
/// client certificates are checked.
pub fn server_config(ssl: &SslConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = match (
        &ssl.keystore_location,
        &ssl.certificate_location,
        &ssl.key_location,
    ) {
        // One PEM file holding both, as Kafka's PEM keystore does.
        (Some(keystore), _, _) => (load_certs(keystore)?, load_private_key(keystore)?),
        (None, Some(cert), Some(key)) => (load_certs(cert)?, load_private_key(key)?),
        _ => {
            return Err(TlsError::Config(
                "a TLS listener needs ssl.keystore.location".into(),
            ))
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let auth = ssl.client_auth.unwrap_or_default();
    let builder = match (&ssl.truststore_location, auth) {
        (_, ClientAuth::None) => builder.with_no_client_auth(),
        (None, _) => {
            return Err(TlsError::Config(
                "ssl.client.auth needs ssl.truststore.location".into(),
            ))
        }
        (Some(ca), auth) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider());
            let verifier = if auth == ClientAuth::Requested {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Config(format!("client certificate verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("key and certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// Kafka's default SSL principal: the certificate's subject DN in RFC 2253 form (most specific
/// RDN first, `,` between them, special characters escaped), e.g. `CN=alice,O=Example`.
pub fn subject_dn(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut rdns = Vec::new();
    for rdn in parsed.subject().iter() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type();
            let name = x509_parser::objects::oid2abbrev(oid, x509_parser::objects::oid_registry())
                .map(str::to_string)
                .unwrap_or_else(|_| oid.to_id_string());
            let value = attr.as_str().ok()?;
            parts.push(format!("{name}={}", escape_rfc2253(value)));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

fn escape_rfc2253(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_print_in_rfc2253_order() {
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Ex, Inc");
        dn.push(rcgen::DnType::CommonName, "alice");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_dn(cert.der()).as_deref(),
            Some("CN=alice,O=Ex\\, Inc")
        );
    }
}
