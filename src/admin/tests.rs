//! The admin API's guard against real in-process nodes (`crate::testkit`) over TCP: the bearer
//! token, the JSON content type, the one error shape, and HTTPS — each refused request checked
//! to have changed nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::cluster::{AdminArgs, AdminClient};
use crate::controller::PartitionId;
use crate::testkit::TestCluster;

const TOKEN: &str = "admin-test-token-7f3a";

/// One raw HTTP/1.1 exchange: status, lower-cased header block, JSON body (`Null` if none).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect to admin");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    // A server that answers before reading the whole body (413) may reset the connection after
    // its response: what arrived before the reset is the answer.
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .expect("admin answered in time");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    let value = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, head, value)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// The one error shape: `{"error": "<something>", "status": <code>}`.
fn assert_json_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["status"], want, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

async fn ready(c: &TestCluster) {
    assert!(
        c.wait_ready(Duration::from_secs(60)).await,
        "cluster not ready"
    );
}

async fn topic_with_leader(c: &TestCluster, topic: &str, rf: i16) -> usize {
    crate::kafka::handlers::create_topics::create_topic(
        c.broker(0),
        topic,
        1,
        rf,
        BTreeMap::new(),
        false,
    )
    .await
    .expect("create topic");
    for _ in 0..300 {
        if let Some(l) = c.leader_of(0, topic, PartitionId::new(0)) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{topic} got no leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_need_the_token_and_json_and_refused_requests_change_nothing() {
    let c = TestCluster::start_with(3, |cfg| {
        cfg.admin_api_token = crate::config::AdminToken::new(TOKEN);
    })
    .await
    .unwrap();
    ready(&c).await;
    let leader = topic_with_leader(&c, "moves", 3).await;
    let target = (leader + 1) % 3;
    let admin = c.node(0).unwrap().admin_addr();
    let path = "/v1/partitions/moves/0/transfer-leadership";
    let body = format!("{{\"target\": {}}}", target + 1);
    let bearer = format!("Bearer {TOKEN}");
    let json = ("Content-Type", "application/json");

    // No token, a wrong one, another scheme: 401 with the JSON shape and the challenge.
    for auth in [None, Some("Bearer wrong"), Some("Basic YWRtaW46YWRtaW4=")] {
        let mut headers = vec![json];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let (status, head, v) = http(admin, "POST", path, &headers, &body).await;
        assert_json_error(status, &v, 401);
        assert!(head.contains("www-authenticate: bearer"), "{head}");
    }
    // What a cross-site page can send without a preflight: a form POST, no token, no body.
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let (status, _, v) = http(admin, "POST", path, &[form], "").await;
    assert_json_error(status, &v, 401);
    // With the token but not JSON: 415, whatever the body says.
    let auth = ("Authorization", bearer.as_str());
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, _, v) = http(admin, "POST", path, &[auth, ("Content-Type", ct)], &body).await;
        assert_json_error(status, &v, 415);
    }
    let (status, _, v) = http(admin, "POST", path, &[auth], "").await;
    assert_json_error(status, &v, 415);
    // Malformed JSON, a body of the wrong shape, an oversized body.
    let (status, _, v) = http(admin, "POST", path, &[auth, json], "{\"target\": ").await;
    assert_json_error(status, &v, 400);
    let (status, _, v) = http(admin, "POST", path, &[auth, json], "{\"target\": \"x\"}").await;
    assert_json_error(status, &v, 400);
    let huge = format!("[{}1]", "1,".repeat(super::BODY_BYTES_MAX / 2 + 8));
    let (status, _, v) = http(admin, "POST", path, &[auth, json], &huge).await;
    assert_json_error(status, &v, 413);
    // A refused decommission leaves the broker registered.
    let decommission = format!("/v1/brokers/{}/decommission", target + 1);
    let (status, _, v) = http(admin, "POST", &decommission, &[form], "").await;
    assert_json_error(status, &v, 401);
    let (status, _, v) = http(admin, "POST", &decommission, &[auth, form], "").await;
    assert_json_error(status, &v, 415);

    // Nothing moved: same leader, every broker still registered, no reassignment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.leader_of(0, "moves", PartitionId::new(0)), Some(leader));
    {
        let st = c.broker(0).state();
        assert_eq!(st.brokers.len(), 3);
        assert!(st.topics["moves"].reassigning.is_empty());
    }

    // Reads stay open; unknown routes and methods are JSON errors too.
    let (status, _, v) = http(admin, "GET", "/v1/cluster", &[], "").await;
    assert_eq!(status, 200, "{v}");
    let (status, _, v) = http(admin, "GET", "/v1/no-such-thing", &[], "").await;
    assert_json_error(status, &v, 404);
    let (status, head, v) = http(admin, "DELETE", "/v1/cluster", &[auth, json], "").await;
    assert_json_error(status, &v, 405);
    assert!(head.contains("allow: "), "{head}");

    // With the token and JSON the same request works.
    let (status, _, v) = http(admin, "POST", path, &[auth, json], &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["leader"], target as u64 + 1, "{v}");
    assert_eq!(c.leader_of(0, "moves", PartitionId::new(0)), Some(target));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_loopback_node_serves_changes_but_only_as_json() {
    let c = TestCluster::single().await.unwrap();
    ready(&c).await;
    topic_with_leader(&c, "solo", 1).await;
    let admin = c.node(0).unwrap().admin_addr();
    // The body-less cross-site POST is refused before it changes anything.
    for ct in ["application/x-www-form-urlencoded", "text/plain"] {
        let (status, _, v) = http(
            admin,
            "POST",
            "/v1/brokers/1/decommission",
            &[("Content-Type", ct)],
            "",
        )
        .await;
        assert_json_error(status, &v, 415);
    }
    assert!(c.broker(0).state().brokers.contains_key(&1));
    assert!(c.broker(0).raft.meta().voters().contains_key(&1));
    // A body-less route takes an empty body or {} with the JSON content type.
    for body in ["", "{}"] {
        let (status, _, v) = http(
            admin,
            "POST",
            "/v1/partitions/solo/0/transfer-leadership",
            &[("Content-Type", "application/json; charset=utf-8")],
            body,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["changed"], false, "{v}");
    }
    // Handler errors keep the shape.
    let (status, _, v) = http(
        admin,
        "POST",
        "/v1/partitions/nope/0/transfer-leadership",
        &[("Content-Type", "application/json")],
        "{}",
    )
    .await;
    assert_json_error(status, &v, 404);

    // The same router as a listener other hosts could reach sees it (tests bind only loopback,
    // so the access is built as `serve` builds it for a routable address): without a token,
    // every change is 403 with a body saying how to set one, reads are served.
    let exposed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exposed_addr = exposed.local_addr().unwrap();
    let app = super::router(c.broker(0).clone(), super::Access::new(None, false, true));
    let server = tokio::spawn(async move { axum::serve(exposed, app).await });
    let (status, _, v) = http(
        exposed_addr,
        "POST",
        "/v1/brokers/1/decommission",
        &[("Content-Type", "application/json")],
        "{}",
    )
    .await;
    assert_json_error(status, &v, 403);
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("--admin-token-file"),
        "{v}"
    );
    assert!(c.broker(0).state().brokers.contains_key(&1));
    let (status, _, v) = http(exposed_addr, "GET", "/v1/brokers", &[], "").await;
    assert_eq!(status, 200, "{v}");
    server.abort();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_need_the_token_when_configured() {
    let c = TestCluster::start_with(1, |cfg| {
        cfg.admin_api_token = crate::config::AdminToken::new(TOKEN);
        cfg.admin_api_require_auth_for_reads = true;
    })
    .await
    .unwrap();
    ready(&c).await;
    let admin = c.node(0).unwrap().admin_addr();
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/v1/cluster", "/v1/health", "/metrics", "/v1/nope"] {
        let (status, head, v) = http(admin, "GET", path, &[], "").await;
        assert_json_error(status, &v, 401);
        assert!(head.contains("www-authenticate: bearer"), "{head}");
    }
    let (status, _, v) = http(
        admin,
        "GET",
        "/v1/cluster",
        &[("Authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["node_id"], 1);
    let (status, _, v) = http(admin, "GET", "/v1/nope", &[("Authorization", &bearer)], "").await;
    assert_json_error(status, &v, 404);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_admin_verifies_against_the_ca_and_closes_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    crate::cli::certs::create(&crate::cli::certs::CertsCreateArgs {
        out: dir.path().to_path_buf(),
        nodes: vec![1],
        clients: vec![],
        hosts: vec![],
        days: 1,
        force: false,
    })
    .unwrap();
    let cert = dir.path().join("node-1.pem");
    let key = dir.path().join("node-1.key");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let c = TestCluster::start_with(1, |cfg| {
        cfg.admin_tls_cert = Some(cert.clone());
        cfg.admin_tls_key = Some(key.clone());
        cfg.admin_api_token = crate::config::AdminToken::new(TOKEN);
    })
    .await
    .unwrap();
    ready(&c).await;
    topic_with_leader(&c, "tls", 1).await;
    let addr = c.node(0).unwrap().admin_addr();
    let https = AdminClient::new(&AdminArgs {
        admin_addr: format!("https://{addr}"),
        admin_ca: Some(dir.path().join("ca.pem")),
        admin_token_file: Some(token_file.clone()),
    })
    .unwrap();
    let (status, v) = https.get("/v1/cluster").await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["node_id"], 1);
    let (status, v) = https
        .request("POST", "/v1/partitions/tls/0/transfer-leadership", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // Plain HTTP to the HTTPS port: the connection closes, no HTTP answer, the node goes on.
    let plain = AdminClient::new(&AdminArgs::plain(&addr.to_string())).unwrap();
    assert!(plain.get("/v1/cluster").await.is_err());
    // HTTPS against another CA fails verification.
    let other = tempfile::tempdir().unwrap();
    crate::cli::certs::create(&crate::cli::certs::CertsCreateArgs {
        out: other.path().to_path_buf(),
        nodes: vec![1],
        clients: vec![],
        hosts: vec![],
        days: 1,
        force: false,
    })
    .unwrap();
    let wrong_ca = AdminClient::new(&AdminArgs {
        admin_addr: format!("https://{addr}"),
        admin_ca: Some(other.path().join("ca.pem")),
        admin_token_file: None,
    })
    .unwrap();
    assert!(wrong_ca.get("/v1/cluster").await.is_err());
    let (status, _) = https.get("/v1/health").await.unwrap();
    assert_eq!(status, 200);
    c.shutdown().await;
}
