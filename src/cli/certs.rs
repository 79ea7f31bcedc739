//! `sluice certs create`: a cluster CA and node and client certificates for trying TLS, mutual
//! TLS and SSL client authentication on one machine (see the README's security section).
//!
//! A node certificate names its node as `node-<id>.sluice`, which is how peers on the Raft port
//! know which node they talk to; it also names `localhost` and `127.0.0.1` (and any `--hosts`)
//! so Kafka clients and the admin HTTP can verify it. A client certificate's subject is
//! `CN=<name>`, the principal Kafka derives from it. Run again with the same `--out`, the
//! command reuses the CA there, so certificates for nodes added later join the same cluster.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, Clone, Args)]
pub struct CertsCreateArgs {
    /// Directory to write the PEM files to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Node ids to issue node certificates for, comma-separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub nodes: Vec<u64>,
    /// Client names to issue client certificates for, comma-separated (e.g. alice,bob).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub clients: Vec<String>,
    /// More host names or IPs the node certificates are valid for (besides localhost and
    /// 127.0.0.1), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "HOSTS")]
    pub hosts: Vec<String>,
    /// Days the new certificates are valid.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    /// Overwrite node and client files that exist already.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &CertsCreateArgs) -> anyhow::Result<()> {
    for path in create(args)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the files and returns their paths (the CA's only when it was created).
pub fn create(args: &CertsCreateArgs) -> anyhow::Result<Vec<PathBuf>> {
    if args.nodes.is_empty() && args.clients.is_empty() {
        bail!("nothing to create: give --nodes and/or --clients");
    }
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    for c in &args.clients {
        if c.is_empty()
            || !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            bail!("client name {c:?}: use letters, digits, '-', '_' or '.'");
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut written = Vec::new();
    let (issuer, ca_created) = load_or_create_ca(&args.out, args.days)?;
    if ca_created {
        written.push(args.out.join("ca.pem"));
    }
    for id in &args.nodes {
        let mut names = vec![
            sluice_raft::tls::node_dns_name(*id),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        names.extend(args.hosts.iter().cloned());
        let stem = format!("node-{id}");
        let cn = sluice_raft::tls::node_dns_name(*id);
        written.extend(issue(args, &issuer, &stem, &cn, names)?);
    }
    for name in &args.clients {
        written.extend(issue(
            args,
            &issuer,
            &format!("client-{name}"),
            name,
            Vec::new(),
        )?);
    }
    Ok(written)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: clocks of machines trying this differ a little.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn load_or_create_ca(dir: &Path, days: u32) -> anyhow::Result<(Issuer<'static, KeyPair>, bool)> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let key = KeyPair::from_pem(&read(&key_path)?)
                .with_context(|| format!("{}: not a private key", key_path.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&read(&cert_path)?, key)
                .with_context(|| format!("{}: not a CA certificate", cert_path.display()))?;
            Ok((issuer, false))
        }
        (false, false) => {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "Sluice cluster CA");
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            // The CA outlives the certificates it issues, so that reissuing one is enough.
            validity(&mut params, days.saturating_mul(4));
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            write(&cert_path, &cert.pem(), false)?;
            write(&key_path, &key.serialize_pem(), true)?;
            Ok((Issuer::new(params, key), true))
        }
        _ => bail!(
            "{} holds only one of ca.pem and ca.key; restore the other or use an empty directory",
            dir.display()
        ),
    }
}

/// Issues `<stem>.pem` and `<stem>.key`, good for both ends of a TLS connection.
fn issue(
    args: &CertsCreateArgs,
    issuer: &Issuer<'static, KeyPair>,
    stem: &str,
    common_name: &str,
    names: Vec<String>,
) -> anyhow::Result<Vec<PathBuf>> {
    let cert_path = args.out.join(format!("{stem}.pem"));
    let key_path = args.out.join(format!("{stem}.key"));
    if !args.force && (cert_path.exists() || key_path.exists()) {
        bail!("{} exists; pass --force to replace it", cert_path.display());
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, args.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok(vec![cert_path, key_path])
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a file; a private key is readable by its owner only.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_raft::tls::{load_certs, node_id_of, PeerTls, PeerTlsFiles};

    fn args(out: &Path, nodes: &[u64], clients: &[&str]) -> CertsCreateArgs {
        CertsCreateArgs {
            out: out.to_path_buf(),
            nodes: nodes.to_vec(),
            clients: clients.iter().map(|c| c.to_string()).collect(),
            hosts: vec![],
            days: 30,
            force: false,
        }
    }

    #[test]
    fn node_certificates_load_as_their_node_and_a_second_run_reuses_the_ca() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let files = create(&args(dir.path(), &[1, 2], &["alice"]))?;
        assert_eq!(files.len(), 1 + 2 * 3);
        let tls = |id: u64| PeerTlsFiles {
            cert: dir.path().join(format!("node-{id}.pem")),
            key: dir.path().join(format!("node-{id}.key")),
            ca: dir.path().join("ca.pem"),
        };
        PeerTls::load(&tls(1), 1)?;
        assert!(
            PeerTls::load(&tls(2), 1).is_err(),
            "node 2's certificate passed as node 1"
        );
        let alice = load_certs(&dir.path().join("client-alice.pem"))?;
        assert!(
            node_id_of(&alice[0]).is_err(),
            "a client certificate names a node"
        );

        let ca_before = std::fs::read(dir.path().join("ca.pem"))?;
        let again = create(&args(dir.path(), &[3], &[]))?;
        assert_eq!(again.len(), 2, "the CA was not reused: {again:?}");
        assert_eq!(std::fs::read(dir.path().join("ca.pem"))?, ca_before);
        PeerTls::load(&tls(3), 3)?;

        let err = create(&args(dir.path(), &[3], &[])).expect_err("overwrote node-3");
        assert!(err.to_string().contains("--force"), "{err}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("node-3.key"))?.permissions(),
        );
        assert_eq!(mode & 0o077, 0, "a key file is readable by others");
        Ok(())
    }
}
