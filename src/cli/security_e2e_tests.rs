//! End-to-end security: in-process nodes with SASL_SSL / SASL_PLAINTEXT listeners driven by the
//! CLI's client code (TLS + SCRAM/PLAIN under `BrokerConn::connect`), raw sockets for what a
//! well-behaved client never does, and SCRAM users through restarts and a 3-node cluster.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::Client;
use super::conn::{encode_request, BrokerConn};
use super::security::{install_for, ClientSecurity};
use super::*;
use crate::config::{ClientAuth, ListenerConfig, SecurityProtocol, ServerConfig, SslConfig};
use crate::controller::scram_users::ScramUpsertion;
use crate::controller::Command;
use crate::scram::{random_salt, Mechanism, ScramCredential};
use crate::testkit::TestCluster;

/// Certificates for nodes 1..=n and client alice, from `sluice certs create`'s code.
fn certs(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    certs::create(&certs::CertsCreateArgs {
        out: dir.path().to_path_buf(),
        nodes: (1..=n).collect(),
        clients: vec!["alice".into()],
        hosts: vec![],
        days: 30,
        force: false,
    })
    .unwrap();
    dir
}

/// Every node's Kafka listener speaks `protocol` (TLS with the node's certificate, client
/// certificates requested).
async fn secure_cluster(
    n: usize,
    protocol: SecurityProtocol,
    dir: &std::path::Path,
    tweak: impl Fn(&mut ServerConfig),
) -> TestCluster {
    let dir = dir.to_path_buf();
    let c = TestCluster::start_with(n, move |cfg| {
        let ssl = protocol.uses_tls().then(|| SslConfig {
            keystore_location: None,
            certificate_location: Some(dir.join(format!("node-{}.pem", cfg.node_id))),
            key_location: Some(dir.join(format!("node-{}.key", cfg.node_id))),
            truststore_location: Some(dir.join("ca.pem")),
            client_auth: Some(ClientAuth::Requested),
        });
        cfg.listeners = vec![ListenerConfig {
            name: protocol.name().into(),
            protocol,
            addr: cfg.kafka_addr.clone(),
            advertised: None,
            ssl,
        }];
        tweak(cfg);
    })
    .await
    .unwrap();
    assert!(c.wait_ready(Duration::from_secs(30)).await, "not ready");
    c
}

/// Creates `user` straight through the metadata group (the first user of a cluster whose only
/// listener needs SASL) and waits until every node has applied it.
async fn seed_user(c: &TestCluster, user: &str, mech: Mechanism, password: &str) {
    let cred = ScramCredential::from_password(mech, password, &random_salt(), 4096);
    c.broker(0)
        .propose(&Command::AlterScramCredentials {
            upsertions: vec![ScramUpsertion {
                user: user.into(),
                mechanism: mech,
                credential: cred,
            }],
            deletions: vec![],
        })
        .await
        .unwrap();
    wait_for_user(c, user, true).await;
}

async fn wait_for_user(c: &TestCluster, user: &str, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = (0..c.len())
            .filter(|i| c.node(*i).is_some())
            .all(|i| c.broker(i).state().scram_users.contains_key(user) == present);
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user} present={present} not on every node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client_security(
    protocol: SecurityProtocol,
    mech: &str,
    user: &str,
    password: &str,
    dir: &std::path::Path,
) -> ClientSecurity {
    ClientSecurity {
        protocol,
        sasl_mechanism: mech.into(),
        sasl_username: Some(user.into()),
        sasl_password: Some(password.into()),
        ssl_ca_location: protocol.uses_tls().then(|| dir.join("ca.pem")),
        ssl_certificate_location: None,
        ssl_key_location: None,
    }
}

/// This process's CLI connections to every node of `c` use `sec`.
fn use_security(c: &TestCluster, sec: &ClientSecurity) {
    for i in 0..c.len() {
        install_for(&c.kafka_addr(i), sec.clone());
    }
}

fn connect(c: &TestCluster) -> ConnectArgs {
    ConnectArgs {
        bootstrap_server: c.bootstrap(),
        command_config: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_scram_produce_and_consume_through_the_cli() {
    let dir = certs(1);
    let c = secure_cluster(1, SecurityProtocol::SaslSsl, dir.path(), |_| {}).await;
    seed_user(&c, "alice", Mechanism::ScramSha256, "alice-secret").await;
    let sec = client_security(
        SecurityProtocol::SaslSsl,
        "SCRAM-SHA-256",
        "alice",
        "alice-secret",
        dir.path(),
    );
    use_security(&c, &sec);

    let mut client = Client::connect(&c.bootstrap()).await.unwrap();
    let create = TopicsCreateArgs {
        name: "secure".into(),
        partitions: Some(2),
        replication_factor: Some(1),
        configs: vec![],
        connect: connect(&c),
    };
    topics::create(&mut client, &create).await.unwrap();
    let pa = ProduceArgs {
        topic: "secure".into(),
        key_separator: None,
        acks: -1,
        partition: None,
        compression: CompressionArg::None,
        batch_size: 1000,
        max_in_flight: 5,
        connect: connect(&c),
    };
    let lines: String = (0..50).map(|i| format!("rec-{i}\n")).collect();
    let n = produce::produce(&mut client, &pa, std::io::Cursor::new(lines.into_bytes()))
        .await
        .unwrap();
    assert_eq!(n, 50);
    let ca = ConsumeArgs {
        topic: "secure".into(),
        from_beginning: true,
        partition: None,
        offset: None,
        max_messages: Some(50),
        print_key: false,
        print_offset: false,
        timeout_ms: Some(10_000),
        group: None,
        consumer_properties: Vec::new(),
        connect: connect(&c),
    };
    let mut out = Vec::new();
    let mut reader = Client::connect(&c.bootstrap()).await.unwrap();
    consume::consume(&mut reader, &ca, &mut out, std::future::pending())
        .await
        .unwrap();
    let mut got: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..50).map(|i| format!("rec-{i}")).collect();
    want.sort();
    assert_eq!(got, want);

    // More users through the CLI over the authenticated listener, salted client-side; each
    // authenticates with its own mechanism, and PLAIN with either stored credential.
    users::create(&mut client, "bob", "SCRAM-SHA-512", "bob-secret", 8192)
        .await
        .unwrap();
    wait_for_user(&c, "bob", true).await;
    let listed = users::list(&mut client).await.unwrap();
    assert_eq!(
        listed,
        vec![
            (
                "alice".to_string(),
                vec![("SCRAM-SHA-256".to_string(), 4096)]
            ),
            ("bob".to_string(), vec![("SCRAM-SHA-512".to_string(), 8192)]),
        ]
    );
    let addr = c.kafka_addr(0);
    for (mech, user, pw) in [
        ("SCRAM-SHA-512", "bob", "bob-secret"),
        ("PLAIN", "bob", "bob-secret"),
        ("PLAIN", "alice", "alice-secret"),
    ] {
        install_for(
            &addr,
            client_security(SecurityProtocol::SaslSsl, mech, user, pw, dir.path()),
        );
        let mut conn = BrokerConn::connect(&addr)
            .await
            .unwrap_or_else(|e| panic!("{mech} {user}: {e:#}"));
        let v = conn
            .version_for(kafka_protocol::messages::ApiKey::Metadata)
            .unwrap();
        conn.call(&MetadataRequest::default(), v).await.unwrap();
    }
    // Bad iteration counts are Kafka's UNACCEPTABLE_CREDENTIAL; deleting an unknown user's
    // credential RESOURCE_NOT_FOUND.
    install_for(&addr, sec.clone());
    let mut client = Client::connect(&c.bootstrap()).await.unwrap();
    let e = users::create(&mut client, "carol", "SCRAM-SHA-256", "x", 100)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("--iterations"), "{e:#}");
    let e = users::delete(&mut client, "nobody", Some("SCRAM-SHA-256"))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("RESOURCE_NOT_FOUND"), "{e:#}");
    users::delete(&mut client, "bob", None).await.unwrap();
    wait_for_user(&c, "bob", false).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_or_unknown_user_gets_sasl_authentication_failed() {
    let dir = certs(1);
    let c = secure_cluster(1, SecurityProtocol::SaslSsl, dir.path(), |_| {}).await;
    seed_user(&c, "alice", Mechanism::ScramSha256, "alice-secret").await;
    let addr = c.kafka_addr(0);
    for (mech, user, pw) in [
        ("SCRAM-SHA-256", "alice", "wrong"),
        ("SCRAM-SHA-256", "mallory", "alice-secret"),
        ("SCRAM-SHA-512", "alice", "alice-secret"),
        ("PLAIN", "alice", "wrong"),
    ] {
        install_for(
            &addr,
            client_security(SecurityProtocol::SaslSsl, mech, user, pw, dir.path()),
        );
        let e = BrokerConn::connect(&addr).await.err().expect("must fail");
        let text = format!("{e:#}");
        assert!(
            text.contains("SASL_AUTHENTICATION_FAILED"),
            "{mech} {user}: {text}"
        );
    }
    // The same message for a wrong password and an unknown user: nothing tells them apart.
    c.shutdown().await;
}

/// One raw request/response on a plaintext socket.
async fn raw_call(s: &mut TcpStream, frame: Bytes) -> Option<Bytes> {
    s.write_all(&frame).await.ok()?;
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some(Bytes::from(body))
}

/// Whether the broker closed `s` (EOF within a few seconds).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_before_authentication_closes_the_connection_and_so_does_a_failure() {
    let dir = certs(1);
    let c = secure_cluster(1, SecurityProtocol::SaslPlaintext, dir.path(), |_| {}).await;
    seed_user(&c, "alice", Mechanism::ScramSha256, "alice-secret").await;
    let addr = c.kafka_addr(0);

    // ApiVersions is answered before authentication; Metadata closes the connection.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let av = encode_request(&ApiVersionsRequest::default(), 3, 1).unwrap();
    assert!(raw_call(&mut s, av).await.is_some());
    let md = encode_request(&MetadataRequest::default(), 9, 2).unwrap();
    assert!(raw_call(&mut s, md).await.is_none());
    assert!(closed(&mut s).await);

    // A big frame before authentication is refused from its size alone: nothing is allocated
    // for it or taken from the request budget (the body is never sent).
    let mut s = TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &(1_000_000i32).to_be_bytes())
        .await
        .unwrap();
    assert!(
        closed(&mut s).await,
        "a 1 MB frame before authentication was waited for"
    );

    // A failed SaslAuthenticate is answered (SASL_AUTHENTICATION_FAILED), then the broker
    // closes: the client cannot try passwords on the same connection.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let hs = encode_request(
        &kafka_protocol::messages::SaslHandshakeRequest::default().with_mechanism("PLAIN".into()),
        1,
        1,
    )
    .unwrap();
    assert!(raw_call(&mut s, hs).await.is_some());
    let auth = encode_request(
        &kafka_protocol::messages::SaslAuthenticateRequest::default()
            .with_auth_bytes(Bytes::from_static(b"\0alice\0nope")),
        1,
        2,
    )
    .unwrap();
    let mut resp = raw_call(&mut s, auth).await.expect("answered");
    // Response header v0 (correlation id), then error_code.
    let _ = bytes::Buf::get_i32(&mut resp);
    assert_eq!(bytes::Buf::get_i16(&mut resp), 58);
    assert!(closed(&mut s).await);

    // The right password over the CLI works on the same listener.
    install_for(
        &addr,
        client_security(
            SecurityProtocol::SaslPlaintext,
            "SCRAM-SHA-256",
            "alice",
            "alice-secret",
            dir.path(),
        ),
    );
    BrokerConn::connect(&addr).await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_closed_and_reauthentication_keeps_it_alive() {
    let dir = certs(1);
    let c = secure_cluster(1, SecurityProtocol::SaslPlaintext, dir.path(), |cfg| {
        cfg.connections_max_reauth_ms = 1500;
    })
    .await;
    seed_user(&c, "alice", Mechanism::ScramSha512, "pw").await;
    seed_user(&c, "bob", Mechanism::ScramSha512, "pw2").await;
    let addr = c.kafka_addr(0);
    let sec = client_security(
        SecurityProtocol::SaslPlaintext,
        "SCRAM-SHA-512",
        "alice",
        "pw",
        dir.path(),
    );
    install_for(&addr, sec.clone());
    let md = || MetadataRequest::default();

    // Re-authenticating within the lifetime keeps the connection serving past it.
    let mut conn = BrokerConn::connect(&addr).await.unwrap();
    let v = conn
        .version_for(kafka_protocol::messages::ApiKey::Metadata)
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        conn.authenticate(&sec).await.unwrap();
        conn.call(&md(), v).await.unwrap();
    }
    // Re-authentication must keep the principal.
    let bob = client_security(
        SecurityProtocol::SaslPlaintext,
        "SCRAM-SHA-512",
        "bob",
        "pw2",
        dir.path(),
    );
    let e = conn.authenticate(&bob).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("SASL_AUTHENTICATION_FAILED"),
        "{e:#}"
    );

    // Without re-authentication, the first request after the lifetime closes the connection.
    let mut conn = BrokerConn::connect(&addr).await.unwrap();
    conn.call(&md(), v).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(conn.call(&md(), v).await.is_err());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_users_replicate_to_every_node_and_survive_a_restart() {
    let dir = certs(3);
    let mut c = secure_cluster(3, SecurityProtocol::SaslPlaintext, dir.path(), |_| {}).await;
    seed_user(&c, "admin", Mechanism::ScramSha256, "admin-pw").await;
    // Created through the CLI on one node, authenticated on every node.
    let admin = client_security(
        SecurityProtocol::SaslPlaintext,
        "SCRAM-SHA-256",
        "admin",
        "admin-pw",
        dir.path(),
    );
    use_security(&c, &admin);
    let mut client = Client::connect(&c.kafka_addr(2)).await.unwrap();
    users::create(&mut client, "alice", "SCRAM-SHA-256", "alice-pw", 4096)
        .await
        .unwrap();
    wait_for_user(&c, "alice", true).await;
    let alice = client_security(
        SecurityProtocol::SaslPlaintext,
        "SCRAM-SHA-256",
        "alice",
        "alice-pw",
        dir.path(),
    );
    for i in 0..3 {
        install_for(&c.kafka_addr(i), alice.clone());
        BrokerConn::connect(&c.kafka_addr(i))
            .await
            .unwrap_or_else(|e| panic!("node {i}: {e:#}"));
    }
    // Every node restarts: the credentials come back from each node's own metadata log.
    for i in 0..3 {
        c.kill(i).await;
    }
    for i in 0..3 {
        c.restart(i).await.unwrap();
    }
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "not ready after restart"
    );
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match BrokerConn::connect(&c.kafka_addr(i)).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(node = i, error = %format!("{e:#}"), "retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("node {i} after restart: {e:#}"),
            }
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_listeners_answer_with_their_own_advertised_address_and_share_max_connections() {
    use crate::node::{Listeners, Node};
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let (plain, internal, admin, raft) = (bind().await, bind().await, bind().await, bind().await);
    let addr = |l: &tokio::net::TcpListener| l.local_addr().unwrap().to_string();
    let (plain_addr, internal_addr) = (addr(&plain), addr(&internal));
    let root = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig {
        data_dir: root.path().join("n1"),
        raft_addr: addr(&raft),
        admin_addr: addr(&admin),
        max_connections: 3,
        ..ServerConfig::default()
    };
    cfg.apply_property(
        "listeners",
        &format!("PLAINTEXT://{plain_addr},INTERNAL://{internal_addr}"),
    )
    .unwrap();
    cfg.apply_property(
        "listener.security.protocol.map",
        "PLAINTEXT:PLAINTEXT,INTERNAL:SASL_PLAINTEXT",
    )
    .unwrap();
    cfg.apply_property("advertised.listeners", "INTERNAL://internal.example:1234")
        .unwrap();
    cfg.finish().unwrap();
    // A port in use fails the bind, naming it.
    let e = Listeners::bind(&cfg).await.err().expect("ports are taken");
    assert!(e.to_string().contains(&plain_addr), "{e}");
    let node = Node::start(
        cfg,
        Listeners {
            kafka: vec![plain, internal],
            admin,
            raft,
        },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.broker().is_ready()
        || node
            .broker()
            .state()
            .broker_listeners
            .get(&1)
            .map(|l| l.len())
            != Some(2)
    {
        assert!(Instant::now() < deadline, "node not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hosts = |r: &kafka_protocol::messages::MetadataResponse| -> Vec<String> {
        r.brokers
            .iter()
            .map(|b| format!("{}:{}", b.host.as_str(), b.port))
            .collect()
    };
    // PLAINTEXT: its own address; INTERNAL (SASL) after authenticating: the advertised one.
    let mut p = BrokerConn::connect(&plain_addr).await.unwrap();
    let v = p
        .version_for(kafka_protocol::messages::ApiKey::Metadata)
        .unwrap();
    let r = p.call(&MetadataRequest::default(), v).await.unwrap();
    assert_eq!(hosts(&r), vec![plain_addr.clone()]);
    node.broker()
        .propose(&Command::AlterScramCredentials {
            upsertions: vec![ScramUpsertion {
                user: "u".into(),
                mechanism: Mechanism::ScramSha256,
                credential: ScramCredential::from_password(
                    Mechanism::ScramSha256,
                    "p",
                    b"salt",
                    4096,
                ),
            }],
            deletions: vec![],
        })
        .await
        .unwrap();
    install_for(
        &internal_addr,
        ClientSecurity {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: "SCRAM-SHA-256".into(),
            sasl_username: Some("u".into()),
            sasl_password: Some("p".into()),
            ..ClientSecurity::default()
        },
    );
    let mut i = BrokerConn::connect(&internal_addr).await.unwrap();
    let r = i.call(&MetadataRequest::default(), v).await.unwrap();
    assert_eq!(hosts(&r), vec!["internal.example:1234".to_string()]);
    // max.connections (3) counts both listeners: p and i hold two, one more fits, a fourth is
    // closed at accept.
    let mut third = TcpStream::connect(&plain_addr).await.unwrap();
    let av = encode_request(&ApiVersionsRequest::default(), 3, 1).unwrap();
    assert!(raw_call(&mut third, av.clone()).await.is_some());
    let mut fourth = TcpStream::connect(&internal_addr).await.unwrap();
    assert!(raw_call(&mut fourth, av).await.is_none());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssl_listener_requiring_client_certificates_refuses_clients_without_one() {
    let dir = certs(1);
    let d = dir.path().to_path_buf();
    let c = secure_cluster(1, SecurityProtocol::Ssl, dir.path(), move |cfg| {
        if let Some(ssl) = cfg.listeners[0].ssl.as_mut() {
            ssl.client_auth = Some(ClientAuth::Required);
            // One PEM file with key and chain, as Kafka's PEM keystore.
            let ks = d.join("node-1-keystore.pem");
            let text = std::fs::read_to_string(d.join("node-1.key")).unwrap()
                + &std::fs::read_to_string(d.join("node-1.pem")).unwrap();
            std::fs::write(&ks, text).unwrap();
            ssl.keystore_location = Some(ks);
            ssl.certificate_location = None;
            ssl.key_location = None;
        }
    })
    .await;
    let addr = c.kafka_addr(0);
    let ssl = |cert: bool| ClientSecurity {
        protocol: SecurityProtocol::Ssl,
        ssl_ca_location: Some(dir.path().join("ca.pem")),
        ssl_certificate_location: cert.then(|| dir.path().join("client-alice.pem")),
        ssl_key_location: cert.then(|| dir.path().join("client-alice.key")),
        ..ClientSecurity::default()
    };
    install_for(&addr, ssl(false));
    assert!(
        BrokerConn::connect(&addr).await.is_err(),
        "no client certificate"
    );
    // A plaintext client gets nowhere either, and the listener keeps serving.
    install_for(&addr, ClientSecurity::default());
    assert!(
        BrokerConn::connect(&addr).await.is_err(),
        "plaintext on a TLS port"
    );
    install_for(&addr, ssl(true));
    let mut conn = BrokerConn::connect(&addr).await.unwrap();
    let v = conn
        .version_for(kafka_protocol::messages::ApiKey::Metadata)
        .unwrap();
    let r = conn.call(&MetadataRequest::default(), v).await.unwrap();
    assert_eq!(r.brokers.len(), 1);
    c.shutdown().await;
}
