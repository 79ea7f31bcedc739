//! The process supervisor and proxies against a single real node: start, health, SIGSTOP /
//! SIGCONT, kill -9 / restart, client blackhole, and data surviving the crash.
//!
//! Skipped unless `CT_SMOKE=1` (it needs `target/release/sluice`).

use std::time::Duration;

use cluster_tests::cluster::Cluster;
use cluster_tests::kclient::{KClient, Outcome};
use cluster_tests::proxy::LinkMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_lifecycle() {
    if std::env::var("CT_SMOKE").ok().as_deref() != Some("1") {
        eprintln!("skipping: set CT_SMOKE=1 to run");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ct-supervisor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = Cluster::new(1, &dir).await.expect("cluster");
    c.start_all().unwrap();
    c.wait_healthy(Duration::from_secs(30)).await.unwrap();
    assert_eq!(c.controller().await, Some(1));

    // Create the topic through the client proxy.
    let bootstrap = c.bootstrap();
    let args = sluice::cli::TopicsCreateArgs {
        name: "sup".into(),
        partitions: Some(1),
        replication_factor: Some(1),
        configs: Vec::new(),
        connect: sluice::cli::ConnectArgs {
            bootstrap_server: bootstrap[0].clone(),
            command_config: None,
        },
    };
    let mut admin = sluice::cli::client::Client::connect(&bootstrap[0])
        .await
        .unwrap();
    sluice::cli::topics::create(&mut admin, &args)
        .await
        .unwrap();
    let mut kc = KClient::new(bootstrap.clone(), "sup", 0);
    assert_eq!(kc.send(0, 41).await, Outcome::Ok(0));

    // Paused: the admin port stops answering; resumed: healthy again.
    c.pause(1).unwrap();
    assert!(!c.healthy(1).await);
    c.resume(1).unwrap();
    c.wait_healthy(Duration::from_secs(10)).await.unwrap();

    // Clients blackholed: a produce cannot complete, so its outcome is unknown (info).
    c.clients[&1].set(LinkMode::DROP);
    let mut blocked = KClient::new(bootstrap.clone(), "sup", 0);
    assert!(!matches!(blocked.send(0, 42).await, Outcome::Ok(_)));
    c.clients[&1].set(LinkMode::PASS);

    // kill -9 and restart: acknowledged data survives.
    c.kill(1).unwrap();
    assert!(!c.healthy(1).await);
    c.start(1).unwrap();
    c.wait_healthy(Duration::from_secs(30)).await.unwrap();
    let mut reader = KClient::new(bootstrap, "sup", 0);
    let mut seen = Vec::new();
    for _ in 0..50 {
        if let Outcome::Ok((pairs, _)) = reader.poll(0, 0).await {
            seen = pairs;
            if !seen.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen.first(), Some(&(0, 41)));
    c.kill_all_processes();
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}
