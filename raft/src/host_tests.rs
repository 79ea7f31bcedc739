//! Whole-host tests: real tokio runtime, real disk, real loopback TCP.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_storage::{batch, LogConfig};
use tokio::net::TcpListener;

use crate::test_util::{data_batch, init_tracing, RecordingApp};
use crate::{PartitionGroup, RaftError, RaftHost, RaftHostConfig};

/// Held by every test here while it runs: they start real hosts whose liveness marks a peer
/// gone after 1 s without an answer. Two of them at once in a debug build on a 2-core machine
/// starve each other's pings long enough to trigger elections mid-test, and an append then
/// fails as it should when a leader loses its majority (the "flaky" timeouts in CI).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE.lock().await
}

async fn wait_for<F: FnMut() -> bool>(
    what: &str,
    timeout: Duration,
    mut cond: F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Starts a host, retrying briefly: after a shutdown in the same process, openraft's state
/// machine task may still hold the sled database for a moment.
async fn start_host(
    node_id: u64,
    dir: &Path,
    listener: TcpListener,
    peers: BTreeMap<u64, String>,
    app: Arc<RecordingApp>,
) -> anyhow::Result<Arc<RaftHost>> {
    start_host_with_tls(node_id, dir, listener, peers, app, None).await
}

async fn start_host_with_tls(
    node_id: u64,
    dir: &Path,
    listener: TcpListener,
    peers: BTreeMap<u64, String>,
    app: Arc<RecordingApp>,
    tls: Option<crate::tls::PeerTls>,
) -> anyhow::Result<Arc<RaftHost>> {
    let addr = listener.local_addr()?.to_string();
    let cfg = RaftHostConfig {
        node_id,
        raft_addr: addr,
        data_dir: dir.to_path_buf(),
        peers,
        tls,
    };
    let mut listener = Some(listener);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => TcpListener::bind(&cfg.raft_addr).await?,
        };
        match RaftHost::start_with_listener(cfg.clone(), l, app.clone()).await {
            Ok(h) => return Ok(h),
            Err(RaftError::Storage(e)) if Instant::now() < deadline => {
                tracing::info!(error = %e, "store still busy; retrying start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Splits a fetch result into (base offset, last offset, record values count) per batch.
fn batches(bytes: &[u8]) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for b in batch::split(bytes) {
        let h = batch::validate(b?)?;
        out.push((
            h.base_offset,
            h.base_offset + i64::from(h.last_offset_delta),
        ));
    }
    Ok(out)
}

/// Whether a future is ready on its first poll: a deterministic "has not happened yet".
fn ready_now<F: std::future::Future>(fut: F) -> bool {
    let fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    fut.poll(&mut cx).is_ready()
}

async fn append_values(p: &PartitionGroup, values: &[&[u8]]) -> anyhow::Result<(i64, i64)> {
    Ok(p.append(Bytes::from(data_batch(1_700_000_000_000, values)))
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_meta_and_partition_survive_restart() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let part_dir = dir.path().join("partitions").join("t-0");
    let group = "p/t/0".to_string();
    let voters: BTreeSet<u64> = [1].into_iter().collect();

    tracing::info!("--- a fresh single node initializes the metadata group and leads it");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let peers: BTreeMap<u64, String> = [(1, addr.clone())].into_iter().collect();
    let app = Arc::new(RecordingApp::default());
    let host = start_host(1, dir.path(), listener, peers.clone(), app.clone()).await?;
    wait_for("meta leader", Duration::from_secs(5), || {
        host.meta().is_leader()
    })
    .await?;
    let r1 = host.meta().propose(b"create topic t".to_vec()).await?;
    let r2 = host.meta().propose(b"create topic u".to_vec()).await?;
    assert!(
        r1.starts_with(b"applied "),
        "reply {:?}",
        String::from_utf8_lossy(&r1)
    );
    assert_ne!(r1, r2, "each command is applied at its own index");
    assert_eq!(
        app.commands(),
        vec![b"create topic t".to_vec(), b"create topic u".to_vec()]
    );

    tracing::info!("--- a new single-voter partition leads at once and assigns contiguous offsets");
    let p = host
        .open_partition(
            group.clone(),
            part_dir.clone(),
            LogConfig::default(),
            voters.clone(),
        )
        .await?;
    wait_for("partition leader", Duration::from_secs(5), || p.is_leader()).await?;
    assert_eq!(p.high_watermark(), 0);
    let mut hw_rx = p.subscribe_high_watermark();
    assert_eq!(append_values(&p, &[b"a"]).await?, (0, 0));
    assert_eq!(append_values(&p, &[b"b", b"c", b"d"]).await?, (1, 3));
    assert_eq!(append_values(&p, &[b"e", b"f"]).await?, (4, 5));
    assert_eq!(p.high_watermark(), 6);
    assert_eq!(*hw_rx.borrow_and_update(), 6);
    let mut corrupt = data_batch(0, &[b"z"]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert!(
        matches!(
            p.append(Bytes::from(corrupt)).await,
            Err(RaftError::InvalidBatch(_))
        ),
        "a batch with a bad CRC is refused before it reaches the log"
    );
    assert_eq!(
        append_values(&p, &[b"e2"]).await?,
        (6, 6),
        "the group survives a refused batch"
    );
    assert_eq!(p.high_watermark(), 7);
    assert_eq!(p.log_end_offset(), 7);
    assert_eq!(p.log_start_offset(), 0);
    assert!(p.leader_epoch() >= 1);
    assert_eq!(
        batches(&p.read(0, 1 << 20).await?)?,
        vec![(0, 0), (1, 3), (4, 5), (6, 6)]
    );
    assert_eq!(
        batches(&p.read(2, 1 << 20).await?)?,
        vec![(1, 3), (4, 5), (6, 6)]
    );
    let status = host.status();
    assert_eq!(status.len(), 2);
    assert_eq!(status[1].group, group);
    assert_eq!(status[1].role, "leader");
    assert_eq!(status[1].voters, vec![1]);

    tracing::info!("--- restart the host from the same directory");
    let epoch_before = p.leader_epoch();
    drop(p);
    host.shutdown().await;
    drop(host);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app = Arc::new(RecordingApp::default());
    let host = start_host(1, dir.path(), listener, peers.clone(), app.clone()).await?;
    wait_for("meta re-applied", Duration::from_secs(5), || {
        app.commands().len() == 2
    })
    .await?;
    assert_eq!(
        app.commands(),
        vec![b"create topic t".to_vec(), b"create topic u".to_vec()]
    );
    wait_for("meta leader after restart", Duration::from_secs(5), || {
        host.meta().is_leader()
    })
    .await?;
    host.meta().propose(b"create topic v".to_vec()).await?;
    assert_eq!(app.commands().len(), 3);

    tracing::info!(
        "--- the partition reopens, leads before an election timeout, and continues its offsets"
    );
    let opened = Instant::now();
    let p = host
        .open_partition(
            group.clone(),
            part_dir.clone(),
            LogConfig::default(),
            voters.clone(),
        )
        .await?;
    wait_for(
        "partition leader after restart",
        Duration::from_secs(5),
        || p.is_leader(),
    )
    .await?;
    assert!(
        opened.elapsed() < Duration::from_millis(1500),
        "took {:?}: the sole voter should not wait for an election timeout",
        opened.elapsed()
    );
    assert!(
        p.leader_epoch() >= epoch_before,
        "the epoch never goes back"
    );
    wait_for("high watermark restored", Duration::from_secs(5), || {
        p.high_watermark() == 7
    })
    .await?;
    assert_eq!(append_values(&p, &[b"g", b"h", b"i"]).await?, (7, 9));
    assert_eq!(p.high_watermark(), 10);
    assert_eq!(
        batches(&p.read(0, 1 << 20).await?)?,
        vec![(0, 0), (1, 3), (4, 5), (6, 6), (7, 9)]
    );

    tracing::info!("--- closing with delete removes the data");
    host.close_partition(&group, true).await?;
    assert!(host.partition(&group).is_none());
    assert!(!part_dir.exists());
    host.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_replicate_a_partition_over_tcp() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let group = "p/t/1".to_string();
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();

    tracing::info!("--- three hosts on loopback ports");
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        peers.insert(id, l.local_addr()?.to_string());
        listeners.push((id, l));
    }
    let mut hosts = BTreeMap::new();
    for (id, l) in listeners {
        let h = start_host(
            id,
            &dir.path().join(format!("n{id}")),
            l,
            peers.clone(),
            Arc::new(RecordingApp::default()),
        )
        .await?;
        hosts.insert(id, h);
    }

    tracing::info!(
        "--- open the group on the followers first, then on node 1, which initializes it"
    );
    let mut parts = BTreeMap::new();
    for id in [3u64, 2, 1] {
        let p = hosts[&id]
            .open_partition(
                group.clone(),
                dir.path().join(format!("n{id}")).join("t-1"),
                LogConfig::default(),
                voters.clone(),
            )
            .await?;
        parts.insert(id, p);
    }
    wait_for("a leader known to all", Duration::from_secs(10), || {
        let leaders: BTreeSet<Option<u64>> = parts.values().map(|p| p.leader()).collect();
        leaders.len() == 1 && leaders.iter().next().copied().flatten().is_some()
    })
    .await?;
    let leader_id = parts[&1]
        .leader()
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let leader = parts[&leader_id].clone();
    assert!(leader.is_leader());

    tracing::info!("--- a follower refuses appends and names the leader");
    let follower_id = *voters
        .iter()
        .find(|id| **id != leader_id)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    match append_values(&parts[&follower_id], &[b"x"]).await {
        Err(e) => match e.downcast_ref::<RaftError>() {
            Some(RaftError::NotLeader { leader }) => assert_eq!(*leader, Some(leader_id)),
            other => panic!("expected NotLeader, got {other:?}"),
        },
        Ok(o) => panic!("follower accepted an append at {o:?}"),
    }

    tracing::info!("--- appends through the leader commit with contiguous offsets");
    let mut next = 0i64;
    for n in 1..=5usize {
        let values: Vec<Vec<u8>> = (0..n).map(|i| format!("v{n}-{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
        let (base, last) = append_values(&leader, &refs).await?;
        assert_eq!((base, last), (next, next + n as i64 - 1));
        next = last + 1;
    }
    assert_eq!(leader.high_watermark(), next);

    tracing::info!(
        "--- concurrent appends share the connection and get disjoint, contiguous offsets"
    );
    let mut tasks = Vec::new();
    for i in 0..20 {
        let p = leader.clone();
        tasks.push(tokio::spawn(async move {
            let v = format!("concurrent-{i}").into_bytes();
            append_values(&p, &[v.as_slice(), b"second"]).await
        }));
    }
    let mut ranges = Vec::new();
    for t in tasks {
        ranges.push(t.await??);
    }
    ranges.sort();
    for (base, last) in &ranges {
        assert_eq!((*base, *last), (next, next + 1));
        next += 2;
    }
    assert_eq!(leader.high_watermark(), next);

    tracing::info!("--- every replica commits the same log");
    wait_for(
        "all replicas at the high watermark",
        Duration::from_secs(10),
        || parts.values().all(|p| p.high_watermark() == next),
    )
    .await?;
    let reference = leader.read(0, 1 << 20).await?;
    assert_eq!(batches(&reference)?.len(), 25);
    for (id, p) in &parts {
        let got = p.read(0, 1 << 20).await?;
        assert_eq!(got, reference, "replica {id} differs from the leader");
        assert_eq!(
            p.leader_epoch(),
            leader.leader_epoch(),
            "replica {id} epoch"
        );
    }
    let st = hosts[&leader_id].status();
    let ps = st
        .iter()
        .find(|s| s.group == group)
        .ok_or_else(|| anyhow::anyhow!("no status"))?;
    assert_eq!(ps.voters, vec![1, 2, 3]);
    assert_eq!(ps.match_index.len(), 3);

    tracing::info!("--- stop the leader; the other two elect a new one and keep the offsets going");
    let old_epoch = leader.leader_epoch();
    drop(leader);
    parts.remove(&leader_id);
    if let Some(h) = hosts.remove(&leader_id) {
        h.shutdown().await;
    }
    wait_for("a new leader", Duration::from_secs(15), || {
        parts
            .values()
            .any(|p| p.is_leader() && p.leader_epoch() > old_epoch)
    })
    .await?;
    // As a client would: a leader that doubts its quorum right after the election (liveness
    // pings starved by a loaded 2-core machine) answers Timeout, outcome unknown; retry.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (at, new_leader) = loop {
        let Some(p) = parts.values().find(|p| p.is_leader()).cloned() else {
            anyhow::ensure!(Instant::now() < deadline, "no leader after the failover");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        match append_values(&p, &[b"after failover"]).await {
            Ok(off) => break (off, p),
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "append after failover failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // Offsets go on where the old leader stopped; an attempt that timed out but committed sits
    // right before, as a one-record batch of its own.
    assert_eq!(at.0, at.1);
    assert!(at.0 >= next, "offsets went backwards: {at:?} after {next}");
    let since = batches(&new_leader.read(next, 1 << 20).await?)?;
    let want: Vec<(i64, i64)> = (next..=at.0).map(|o| (o, o)).collect();
    assert_eq!(
        since, want,
        "only the retried append lies between {next} and {at:?}"
    );
    let end = at.0 + 1;
    wait_for(
        "survivors at the new high watermark",
        Duration::from_secs(10),
        || parts.values().all(|p| p.high_watermark() == end),
    )
    .await?;

    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Multi-node: metadata bootstrap, application RPCs, membership, leadership transfer.

/// Starts a host on a fixed address (a restart), retrying while the port or the store is busy.
async fn restart_host(
    node_id: u64,
    dir: &Path,
    addr: &str,
    peers: BTreeMap<u64, String>,
    app: Arc<RecordingApp>,
) -> anyhow::Result<Arc<RaftHost>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "raft port still busy; retrying bind");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    start_host(node_id, dir, listener, peers, app).await
}

/// Binds `n` loopback listeners (ids 1..=n) and returns them with the peers map.
async fn bind_nodes(n: u64) -> anyhow::Result<(Vec<(u64, TcpListener)>, BTreeMap<u64, String>)> {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=n {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        peers.insert(id, l.local_addr()?.to_string());
        listeners.push((id, l));
    }
    Ok((listeners, peers))
}

/// Starts hosts 1..=n, all with the same `peers`, in id order.
async fn start_cluster(
    dir: &Path,
    n: u64,
) -> anyhow::Result<(BTreeMap<u64, Arc<RaftHost>>, BTreeMap<u64, String>)> {
    let (listeners, peers) = bind_nodes(n).await?;
    let mut hosts = BTreeMap::new();
    for (id, l) in listeners {
        let h = start_host(
            id,
            &dir.join(format!("n{id}")),
            l,
            peers.clone(),
            Arc::new(RecordingApp::default()),
        )
        .await?;
        hosts.insert(id, h);
    }
    Ok((hosts, peers))
}

/// Opens `group` on every host (in `n{id}/{sub}` under `dir`) with all hosts as voters.
async fn open_on_all(
    hosts: &BTreeMap<u64, Arc<RaftHost>>,
    dir: &Path,
    group: &str,
    sub: &str,
) -> anyhow::Result<BTreeMap<u64, Arc<PartitionGroup>>> {
    let voters: BTreeSet<u64> = hosts.keys().copied().collect();
    open_on(hosts, &voters, dir, group, sub).await
}

/// Opens `group` on the hosts in `voters` (in `n{id}/{sub}` under `dir`), with them as voters.
async fn open_on(
    hosts: &BTreeMap<u64, Arc<RaftHost>>,
    voters: &BTreeSet<u64>,
    dir: &Path,
    group: &str,
    sub: &str,
) -> anyhow::Result<BTreeMap<u64, Arc<PartitionGroup>>> {
    let mut parts = BTreeMap::new();
    for id in voters {
        let h = hosts
            .get(id)
            .ok_or_else(|| anyhow::anyhow!("no host {id}"))?;
        let p = h
            .open_partition(
                group.to_string(),
                dir.join(format!("n{id}")).join(sub),
                LogConfig::default(),
                voters.clone(),
            )
            .await?;
        parts.insert(*id, p);
    }
    Ok(parts)
}

/// The one node every host in `hosts` agrees leads the metadata group.
async fn meta_leader(hosts: &BTreeMap<u64, Arc<RaftHost>>) -> anyhow::Result<u64> {
    wait_for(
        "one meta leader known to all",
        Duration::from_secs(15),
        || {
            let leaders: BTreeSet<Option<u64>> =
                hosts.values().map(|h| h.meta().leader()).collect();
            match leaders.iter().next().copied().flatten() {
                Some(l) if leaders.len() == 1 => {
                    hosts.get(&l).is_some_and(|h| h.meta().is_leader())
                }
                _ => false,
            }
        },
    )
    .await?;
    hosts
        .values()
        .next()
        .and_then(|h| h.meta().leader())
        .ok_or_else(|| anyhow::anyhow!("no meta leader"))
}

/// The one node every group in `parts` agrees leads the partition.
async fn partition_leader(parts: &BTreeMap<u64, Arc<PartitionGroup>>) -> anyhow::Result<u64> {
    wait_for(
        "one partition leader known to all",
        Duration::from_secs(15),
        || {
            let leaders: BTreeSet<Option<u64>> = parts.values().map(|p| p.leader()).collect();
            match leaders.iter().next().copied().flatten() {
                Some(l) if leaders.len() == 1 => parts.get(&l).is_some_and(|p| p.is_leader()),
                _ => false,
            }
        },
    )
    .await?;
    parts
        .values()
        .next()
        .and_then(|p| p.leader())
        .ok_or_else(|| anyhow::anyhow!("no partition leader"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_bootstraps_once_on_three_nodes_in_any_start_order() -> anyhow::Result<()> {
    use rand::seq::SliceRandom;
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (listeners, peers) = bind_nodes(3).await?;
    let mut order: Vec<(u64, TcpListener)> = listeners;
    order.shuffle(&mut rand::thread_rng());
    let ids: Vec<u64> = order.iter().map(|(id, _)| *id).collect();
    tracing::info!(
        ?ids,
        "--- start three hosts with the same peers, shuffled, with delays"
    );
    let mut hosts = BTreeMap::new();
    let mut apps = BTreeMap::new();
    for (id, l) in order {
        let delay = rand::Rng::gen_range(&mut rand::thread_rng(), 0..400u64);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let app = Arc::new(RecordingApp::default());
        let h = start_host(
            id,
            &dir.path().join(format!("n{id}")),
            l,
            peers.clone(),
            app.clone(),
        )
        .await?;
        hosts.insert(id, h);
        apps.insert(id, app);
    }

    tracing::info!("--- one leader emerges and every node sees all three as voters");
    let leader = meta_leader(&hosts).await?;
    for (id, h) in &hosts {
        assert_eq!(h.meta().voters(), peers, "node {id} membership");
    }

    tracing::info!("--- proposals from the leader apply on all three, in order");
    for i in 0..3 {
        hosts[&leader]
            .meta()
            .propose(format!("cmd {i}").into_bytes())
            .await?;
    }
    let expected: Vec<Vec<u8>> = (0..3).map(|i| format!("cmd {i}").into_bytes()).collect();
    wait_for("all applied", Duration::from_secs(10), || {
        apps.values().all(|a| a.commands() == expected)
    })
    .await?;
    let follower = *hosts
        .keys()
        .find(|id| **id != leader)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    assert!(
        matches!(
            hosts[&follower].meta().propose(b"x".to_vec()).await,
            Err(RaftError::NotLeader { leader: Some(l) }) if l == leader
        ),
        "a follower refuses proposals and names the leader"
    );

    tracing::info!("--- restart node 1 (the bootstrapper): it rejoins with its state, no new init");
    let h1 = hosts
        .remove(&1)
        .ok_or_else(|| anyhow::anyhow!("no host 1"))?;
    h1.shutdown().await;
    drop(h1);
    let app1 = Arc::new(RecordingApp::default());
    let h1 = restart_host(
        1,
        &dir.path().join("n1"),
        &peers[&1],
        peers.clone(),
        app1.clone(),
    )
    .await?;
    hosts.insert(1, h1);
    apps.insert(1, app1);
    wait_for("node 1 replays its log", Duration::from_secs(10), || {
        apps[&1].commands() == expected
    })
    .await?;
    let leader = meta_leader(&hosts).await?;
    hosts[&leader]
        .meta()
        .propose(b"after restart".to_vec())
        .await?;
    let mut expected = expected;
    expected.push(b"after restart".to_vec());
    wait_for("all applied after restart", Duration::from_secs(10), || {
        apps.values().all(|a| a.commands() == expected)
    })
    .await?;
    for (id, h) in &hosts {
        assert_eq!(
            h.meta().voters(),
            peers,
            "node {id} membership after restart"
        );
    }
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// Echoes `"{from}>{payload}"`; `"fail"` is refused, `"slow"` sleeps past any test timeout.
struct EchoHandler {
    me: u64,
}

impl crate::AppHandler for EchoHandler {
    fn handle(
        &self,
        from: u64,
        payload: Bytes,
    ) -> crate::BoxFuture<'static, Result<Bytes, String>> {
        let me = self.me;
        Box::pin(async move {
            match &payload[..] {
                b"fail" => Err(format!("node {me} refuses")),
                b"slow" => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(Bytes::new())
                }
                p => Ok(Bytes::from(format!(
                    "{me}:{from}>{}",
                    String::from_utf8_lossy(p)
                ))),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_rpcs_share_the_raft_connection() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 2).await?;
    let t = Duration::from_secs(5);

    tracing::info!("--- before a handler is set, requests get an error reply");
    match hosts[&2].call_app(1, Bytes::from_static(b"hi"), t).await {
        Err(RaftError::Other(m)) => assert!(m.contains("no application handler"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    match hosts[&1].call_app(1, Bytes::from_static(b"hi"), t).await {
        Err(RaftError::Other(m)) => assert!(m.contains("no application handler"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }

    tracing::info!("--- with handlers: remote calls, calls to self, errors, timeouts");
    for (id, h) in &hosts {
        h.set_app_handler(Arc::new(EchoHandler { me: *id }));
    }
    assert_eq!(
        &hosts[&2]
            .call_app(1, Bytes::from_static(b"ping"), t)
            .await?[..],
        b"1:2>ping"
    );
    assert_eq!(
        &hosts[&1]
            .call_app(2, Bytes::from_static(b"pong"), t)
            .await?[..],
        b"2:1>pong"
    );
    assert_eq!(
        &hosts[&1]
            .call_app(1, Bytes::from_static(b"self"), t)
            .await?[..],
        b"1:1>self"
    );
    assert_eq!(
        hosts[&2].call_app(1, Bytes::from_static(b"fail"), t).await,
        Err(RaftError::Other("node 1 refuses".into()))
    );
    let started = Instant::now();
    assert_eq!(
        hosts[&2]
            .call_app(1, Bytes::from_static(b"slow"), Duration::from_millis(300))
            .await,
        Err(RaftError::Timeout)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        hosts[&1].call_app(9, Bytes::from_static(b"?"), t).await,
        Err(RaftError::Other(_))
    ));

    tracing::info!("--- many concurrent calls are matched to their replies");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let h = hosts[&2].clone();
        tasks.push(tokio::spawn(async move {
            let r = h.call_app(1, Bytes::from(format!("m{i}")), t).await;
            (i, r)
        }));
    }
    for task in tasks {
        let (i, r) = task.await?;
        assert_eq!(r?, Bytes::from(format!("1:2>m{i}")));
    }

    tracing::info!("--- a stopped peer is an error, a stopped host is Shutdown");
    hosts[&1].shutdown().await;
    assert!(matches!(
        hosts[&2].call_app(1, Bytes::from_static(b"x"), t).await,
        Err(RaftError::Other(_) | RaftError::Timeout)
    ));
    assert_eq!(
        hosts[&1].call_app(2, Bytes::from_static(b"x"), t).await,
        Err(RaftError::Shutdown)
    );
    hosts[&2].shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_voters_are_added_and_removed_on_the_leader() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (listeners, all) = bind_nodes(3).await?;
    let mut listeners: BTreeMap<u64, TcpListener> = listeners.into_iter().collect();
    let mut hosts = BTreeMap::new();
    let mut apps = BTreeMap::new();

    tracing::info!("--- node 1 alone bootstraps; nodes 2 and 3 start knowing node 1 and wait");
    for id in 1..=3u64 {
        // Node 1 knows only itself; the others know node 1 (a lower id: they never initialize).
        let peers: BTreeMap<u64, String> = all
            .iter()
            .filter(|(p, _)| **p == 1 || **p == id)
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        let l = listeners
            .remove(&id)
            .ok_or_else(|| anyhow::anyhow!("no listener"))?;
        let app = Arc::new(RecordingApp::default());
        let h = start_host(
            id,
            &dir.path().join(format!("n{id}")),
            l,
            peers,
            app.clone(),
        )
        .await?;
        hosts.insert(id, h);
        apps.insert(id, app);
    }
    wait_for("node 1 leads", Duration::from_secs(5), || {
        hosts[&1].meta().is_leader()
    })
    .await?;
    hosts[&1].meta().propose(b"one".to_vec()).await?;
    assert_eq!(
        hosts[&2].meta().leader(),
        None,
        "node 2 was not contacted yet"
    );

    tracing::info!("--- a follower cannot add voters");
    tracing::info!("--- the leader adds node 2, then node 3; they catch up and vote");
    hosts[&1].meta().add_voter(2, all[&2].clone()).await?;
    assert!(matches!(
        hosts[&2].meta().add_voter(3, all[&3].clone()).await,
        Err(RaftError::NotLeader { leader: Some(1) })
    ));
    hosts[&1].meta().add_voter(3, all[&3].clone()).await?;
    hosts[&1].meta().add_voter(3, all[&3].clone()).await?; // a no-op
    assert_eq!(hosts[&1].meta().voters(), all);
    hosts[&1].meta().propose(b"two".to_vec()).await?;
    let expected = vec![b"one".to_vec(), b"two".to_vec()];
    wait_for("all three applied", Duration::from_secs(10), || {
        apps.values().all(|a| a.commands() == expected)
    })
    .await?;
    wait_for(
        "membership known everywhere",
        Duration::from_secs(10),
        || hosts.values().all(|h| h.meta().voters() == all),
    )
    .await?;

    tracing::info!("--- node 2 reaches node 3 through the membership's address book");
    hosts[&3].set_app_handler(Arc::new(EchoHandler { me: 3 }));
    assert_eq!(hosts[&2].peer_addr(3), Some(all[&3].clone()));
    assert_eq!(
        &hosts[&2]
            .call_app(3, Bytes::from_static(b"hello"), Duration::from_secs(5))
            .await?[..],
        b"3:2>hello"
    );

    tracing::info!("--- remove node 2; the group goes on with 1 and 3");
    hosts[&1].meta().remove_voter(2).await?;
    let expect: BTreeMap<u64, String> = all
        .iter()
        .filter(|(id, _)| **id != 2)
        .map(|(id, a)| (*id, a.clone()))
        .collect();
    assert_eq!(hosts[&1].meta().voters(), expect);
    hosts[&1].meta().propose(b"three".to_vec()).await?;
    wait_for("1 and 3 applied", Duration::from_secs(10), || {
        apps[&1].commands().len() == 3 && apps[&3].commands().len() == 3
    })
    .await?;
    hosts[&1].meta().remove_voter(2).await?; // a no-op

    tracing::info!("--- node 3 takes the leadership over");
    hosts[&3].meta().trigger_elect().await?;
    assert!(hosts[&3].meta().is_leader());
    hosts[&3].meta().propose(b"four".to_vec()).await?;
    wait_for(
        "1 applied the new leader's command",
        Duration::from_secs(10),
        || apps[&1].commands().len() == 4,
    )
    .await?;
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_elect_moves_partition_leadership_and_offsets_stay_contiguous() -> anyhow::Result<()>
{
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let parts = open_on_all(&hosts, dir.path(), "p/t/2", "t-2").await?;
    let leader = partition_leader(&parts).await?;
    let mut next = 0i64;
    for i in 0..3 {
        let v = format!("before-{i}");
        assert_eq!(
            append_values(&parts[&leader], &[v.as_bytes()]).await?,
            (next, next)
        );
        next += 1;
    }

    tracing::info!("--- the leader reports every voter's match index");
    wait_for("match indexes", Duration::from_secs(5), || {
        let st = parts[&leader].status();
        st.match_index.len() == 3
            && st
                .match_index
                .values()
                .all(|m| m.is_some() && *m == st.last_log_index)
    })
    .await?;
    assert!(parts
        .iter()
        .all(|(id, p)| *id == leader || p.status().match_index.is_empty()));

    for round in 0..2 {
        let current = partition_leader(&parts).await?;
        let target = *voters
            .iter()
            .find(|id| **id != current)
            .ok_or_else(|| anyhow::anyhow!("no follower"))?;
        tracing::info!(
            round,
            current,
            target,
            "--- trigger an election on a follower"
        );
        // Leadership goes only to a replica holding the whole log, as a transfer does: a
        // follower behind it now steps aside (see the lagging-follower test below).
        wait_for(
            "the target has the whole log",
            Duration::from_secs(10),
            || parts[&current].caught_up(target),
        )
        .await?;
        let epoch = parts[&current].leader_epoch();
        let started = Instant::now();
        // As a caller would: on a 2-core machine running other tests, a campaign can be refused
        // while the voters still hear the old leader, and one try times out. The second round
        // of the same test had failed that way about one run in five, before and after the
        // crate's split; the outcome is what this test checks, not one try's timing.
        let mut tries = 0;
        loop {
            tries += 1;
            match parts[&target].trigger_elect().await {
                Err(RaftError::Timeout) if tries < 5 => continue,
                r => r?,
            }
            break;
        }
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "transferred"
        );
        // Raft leadership is won; serving also needs the pings to show a reachable majority,
        // which on a loaded machine can lag the election by a moment.
        wait_for(
            "the target serves as leader",
            Duration::from_secs(10),
            || parts[&target].is_leader(),
        )
        .await?;
        assert!(parts[&target].leader_epoch() > epoch);
        assert_eq!(partition_leader(&parts).await?, target);
        parts[&target].trigger_elect().await?; // on the leader: Ok at once

        tracing::info!("--- appends go on through the new leader with contiguous offsets");
        for i in 0..3 {
            let v = format!("round{round}-{i}");
            assert_eq!(
                append_values(&parts[&target], &[v.as_bytes(), b"second"]).await?,
                (next, next + 1)
            );
            next += 2;
        }
    }
    wait_for(
        "all replicas at the high watermark",
        Duration::from_secs(10),
        || parts.values().all(|p| p.high_watermark() == next),
    )
    .await?;
    let reference = parts[&1].read(0, 1 << 20).await?;
    let b = batches(&reference)?;
    assert_eq!(b.len(), 9);
    for w in b.windows(2) {
        assert_eq!(w[1].0, w[0].1 + 1, "offsets are contiguous");
    }
    for (id, p) in &parts {
        assert_eq!(p.read(0, 1 << 20).await?, reference, "replica {id}");
    }
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_partition_gets_a_leader_without_its_lowest_voter() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/t/3".to_string();
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let open = |id: u64| {
        hosts[&id].open_partition(
            group.clone(),
            dir.path().join(format!("n{id}")).join("t-3"),
            LogConfig::default(),
            voters.clone(),
        )
    };

    tracing::info!("--- open the group on nodes 2 and 3 only: node 1 is 'down'");
    let mut parts = BTreeMap::new();
    for id in [2u64, 3] {
        parts.insert(id, open(id).await?);
    }
    let leader = partition_leader(&parts).await?;
    assert!(leader == 2 || leader == 3);
    let mut next = 0i64;
    for i in 0..4 {
        let v = format!("v{i}");
        assert_eq!(
            append_values(&parts[&leader], &[v.as_bytes()]).await?,
            (next, next)
        );
        next += 1;
    }

    tracing::info!("--- node 1 opens it late: it follows and catches up");
    parts.insert(1, open(1).await?);
    wait_for("node 1 caught up", Duration::from_secs(15), || {
        parts[&1].high_watermark() == next && parts[&1].leader().is_some()
    })
    .await?;
    let leader = partition_leader(&parts).await?;
    assert_ne!(leader, 1, "node 1's log was behind");
    assert_eq!(parts[&1].status().role, "follower");
    assert_eq!(
        append_values(&parts[&leader], &[b"after"]).await?,
        (next, next)
    );
    next += 1;
    wait_for("all at the high watermark", Duration::from_secs(10), || {
        parts.values().all(|p| p.high_watermark() == next)
    })
    .await?;
    let reference = parts[&leader].read(0, 1 << 20).await?;
    for (id, p) in &parts {
        assert_eq!(p.read(0, 1 << 20).await?, reference, "replica {id}");
        assert_eq!(p.status().voters, vec![1, 2, 3]);
    }
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_voters_change_on_the_leader() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/t/4".to_string();
    let pdir = |id: u64| dir.path().join(format!("n{id}")).join("t-4");
    let voters: BTreeSet<u64> = [1, 2].into_iter().collect();
    let mut parts = BTreeMap::new();
    for id in [1u64, 2] {
        let p = hosts[&id]
            .open_partition(
                group.clone(),
                pdir(id),
                LogConfig::default(),
                voters.clone(),
            )
            .await?;
        parts.insert(id, p);
    }
    let leader = partition_leader(&parts).await?;
    let mut next = 0i64;
    for i in 0..3 {
        let v = format!("v{i}");
        assert_eq!(
            append_values(&parts[&leader], &[v.as_bytes()]).await?,
            (next, next)
        );
        next += 1;
    }

    tracing::info!("--- node 3 joins: it is opened first, then the leader changes the voters");
    parts.insert(
        3,
        hosts[&3]
            .join_partition(group.clone(), pdir(3), LogConfig::default())
            .await?,
    );
    let all: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let follower = if leader == 1 { 2 } else { 1 };
    assert!(matches!(
        parts[&follower].change_voters(all.clone()).await,
        Err(RaftError::NotLeader { leader: Some(l) }) if l == leader
    ));
    parts[&leader].change_voters(all.clone()).await?;
    assert_eq!(parts[&leader].voters(), all);
    wait_for("node 3 caught up", Duration::from_secs(10), || {
        parts[&3].high_watermark() == next && parts[&3].voters() == all
    })
    .await?;
    assert_eq!(
        append_values(&parts[&leader], &[b"three voters"]).await?,
        (next, next)
    );
    next += 1;

    tracing::info!("--- remove the other original voter");
    let keep: BTreeSet<u64> = [leader, 3].into_iter().collect();
    parts[&leader].change_voters(keep.clone()).await?;
    assert_eq!(parts[&leader].voters(), keep);
    assert_eq!(
        append_values(&parts[&leader], &[b"two voters"]).await?,
        (next, next)
    );
    next += 1;
    wait_for(
        "node 3 at the high watermark",
        Duration::from_secs(10),
        || parts[&3].high_watermark() == next,
    )
    .await?;
    assert_eq!(
        parts[&3].read(0, 1 << 20).await?,
        parts[&leader].read(0, 1 << 20).await?
    );
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// Quiet groups run without openraft's tick, and openraft steps a leader removed from the voters
/// down only on a tick: the supervisor ticks such a leader until it has stepped down, and the
/// remaining voters, whose leader then stops claiming the group, elect one of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_removes_itself_from_the_voters_steps_down_and_the_rest_elect(
) -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/t/9";
    let parts = open_on_all(&hosts, dir.path(), group, "t-9").await?;
    let leader = partition_leader(&parts).await?;
    assert_eq!(append_values(&parts[&leader], &[b"v0"]).await?, (0, 0));

    tracing::info!("--- the leader replaces the voters with the two others");
    let rest: BTreeSet<u64> = parts.keys().copied().filter(|id| *id != leader).collect();
    parts[&leader].change_voters(rest.clone()).await?;
    wait_for(
        "the removed leader stepped down",
        Duration::from_secs(10),
        || !parts[&leader].is_raft_leader(),
    )
    .await?;
    let remaining: BTreeMap<u64, Arc<PartitionGroup>> = parts
        .iter()
        .filter(|(id, _)| rest.contains(id))
        .map(|(id, p)| (*id, p.clone()))
        .collect();
    let new_leader = partition_leader(&remaining).await?;
    assert!(rest.contains(&new_leader));
    assert_eq!(parts[&new_leader].voters(), rest);
    assert_eq!(append_values(&parts[&new_leader], &[b"v1"]).await?, (1, 1));
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_the_leader_and_a_returning_follower_catches_up_by_snapshot(
) -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/ret/0".to_string();
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let cfg = LogConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 512,
    };
    let part_dir = |id: u64| dir.path().join(format!("n{id}")).join("ret-0");
    let mut parts = BTreeMap::new();
    for id in [1u64, 2, 3] {
        let p = hosts[&id]
            .open_partition(group.clone(), part_dir(id), cfg, voters.clone())
            .await?;
        parts.insert(id, p);
    }
    let leader_id = partition_leader(&parts).await?;
    let leader = parts[&leader_id].clone();
    let value = vec![b'x'; 200];
    for _ in 0..5 {
        append_values(&leader, &[&value, &value]).await?;
    }

    tracing::info!("--- a follower goes away; the leader writes many segments without it");
    let away = *voters.iter().find(|id| **id != leader_id).unwrap_or(&0);
    wait_for(
        "follower at the high watermark",
        Duration::from_secs(10),
        || parts[&away].high_watermark() == leader.high_watermark(),
    )
    .await?;
    let away_end = parts[&away].log_end_offset();
    hosts[&away].close_partition(&group, false).await?;
    parts.remove(&away);
    for _ in 0..60 {
        append_values(&leader, &[&value, &value]).await?;
    }
    let hw = leader.high_watermark();
    assert_eq!(hw, 130);

    tracing::info!("--- nothing is due without limits; then size retention keeps ~4 KiB");
    assert_eq!(leader.apply_retention(i64::MAX, -1, -1).await?, None);
    let out = leader
        .apply_retention(0, -1, 4096)
        .await?
        .ok_or_else(|| anyhow::anyhow!("nothing deleted"))?;
    assert!(out.segments_deleted > 5, "{out:?}");
    assert_eq!(leader.log_start_offset(), out.log_start_offset);
    assert!(out.log_start_offset > away_end, "{out:?} vs {away_end}");
    let st = leader.status();
    assert_eq!(st.purged_index, Some(out.purged_upto_index));
    assert!(st.snapshot_index >= Some(out.purged_upto_index));
    assert!(matches!(
        leader.read(out.log_start_offset - 1, 1 << 20).await,
        Err(RaftError::OffsetOutOfRange { .. })
    ));
    // The other follower purges its own log on its own.
    let other = *voters
        .iter()
        .find(|id| **id != leader_id && **id != away)
        .unwrap_or(&0);
    wait_for(
        "other follower at the high watermark",
        Duration::from_secs(10),
        || parts[&other].high_watermark() == hw,
    )
    .await?;
    let o = parts[&other]
        .apply_retention(0, -1, 4096)
        .await?
        .ok_or_else(|| anyhow::anyhow!("follower deleted nothing"))?;
    assert_eq!(o.log_start_offset, out.log_start_offset);

    // Written after the snapshot: the returning follower must get these as log entries.
    for _ in 0..10 {
        append_values(&leader, &[&value, &value]).await?;
    }
    let hw_before = hw;
    let hw = leader.high_watermark();

    tracing::info!("--- the follower returns: it gets a snapshot, not the purged history");
    let back = hosts[&away]
        .open_partition(group.clone(), part_dir(away), cfg, voters.clone())
        .await?;
    wait_for(
        "returning follower at the high watermark",
        Duration::from_secs(20),
        || back.high_watermark() == hw && back.log_end_offset() == hw,
    )
    .await?;
    let start = back.log_start_offset();
    // The snapshot is cut at the leader's purge point, so the follower's log starts exactly
    // where the leader's does and holds every record the leader retains.
    assert_eq!(start, out.log_start_offset);
    assert!(start > away_end && start <= hw_before, "{start}");
    assert_eq!(back.status().snapshot_index, Some(out.purged_upto_index));
    let bases: Vec<i64> = std::fs::read_dir(part_dir(away))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        bases.iter().all(|b| *b > away_end),
        "old segments survived on the returning follower: {bases:?}"
    );
    let copied = back.read(start, 1 << 20).await?;
    assert_eq!(
        batches(&copied)?.last().map(|b| b.1),
        Some(hw - 1),
        "everything up to the high watermark"
    );
    assert_eq!(copied, leader.read(start, 1 << 20).await?);

    tracing::info!("--- and writes keep replicating to it");
    assert_eq!(append_values(&leader, &[b"after"]).await?, (hw, hw));
    wait_for(
        "returning follower replicates new writes",
        Duration::from_secs(10),
        || back.high_watermark() == hw + 1,
    )
    .await?;
    assert_eq!(
        back.read(hw, 1 << 20).await?,
        leader.read(hw, 1 << 20).await?
    );
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_ack_answers_from_the_leaders_disk_and_quorum_ack_waits_for_a_majority(
) -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/t/acks".to_string();
    let parts = open_on_all(&hosts, dir.path(), &group, "t-acks").await?;
    let leader = partition_leader(&parts).await?;
    let batch = |v: &str| Bytes::from(data_batch(1_700_000_000_000, &[v.as_bytes()]));
    assert_eq!(parts[&leader].append(batch("all-0")).await?, (0, 0));
    assert_eq!(
        parts[&leader].append_leader_ack(batch("one-1")).await?,
        (1, 1)
    );
    // acks=1 answers before the commit; with the followers up, "one-1" commits soon after.
    // Wait for that, or its commit could land after the snapshot of the high watermark below
    // and look like the uncommitted batch moved it (seen under CPU contention).
    let lp = parts[&leader].clone();
    wait_for(
        "the acks=1 batch commits while the followers are up",
        Duration::from_secs(10),
        || lp.high_watermark() == 2,
    )
    .await?;

    tracing::info!("--- both followers close the group: nothing can commit any more");
    for (id, h) in &hosts {
        if *id != leader {
            h.close_partition(&group, false).await?;
        }
    }
    // The nodes still answer pings, so the leader keeps claiming the group.
    assert!(lp.is_leader());
    let hw = lp.high_watermark();
    let acked = tokio::time::timeout(Duration::from_secs(5), lp.append_leader_ack(batch("one-2")))
        .await
        .map_err(|_| anyhow::anyhow!("acks=1 append did not answer from the leader's disk"))??;
    assert_eq!(acked, (2, 2));
    assert_eq!(
        lp.high_watermark(),
        hw,
        "an uncommitted batch moved the high watermark"
    );
    let all = tokio::time::timeout(Duration::from_secs(2), lp.append(batch("all-3"))).await;
    assert!(
        all.is_err(),
        "acks=all answered without a majority: {all:?}"
    );
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// Opens a single-node host with one single-voter partition that leads.
async fn single_node_partition(dir: &Path) -> anyhow::Result<(Arc<RaftHost>, Arc<PartitionGroup>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let peers: BTreeMap<u64, String> = [(1, listener.local_addr()?.to_string())]
        .into_iter()
        .collect();
    let host = start_host(1, dir, listener, peers, Arc::new(RecordingApp::default())).await?;
    let p = host
        .open_partition(
            "p/t/0".to_string(),
            dir.join("partitions").join("t-0"),
            LogConfig::default(),
            [1u64],
        )
        .await?;
    wait_for("partition leader", Duration::from_secs(5), || p.is_leader()).await?;
    Ok((host, p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs_on_the_leader() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (host, p) = single_node_partition(dir.path()).await?;
    let (fsyncs_before, batches_before) = p.io_counters();

    tracing::info!("--- 200 one-record appends proposed together");
    const N: usize = 200;
    let appends = (0..N).map(|i| {
        let p = p.clone();
        async move {
            let value = format!("v{i}");
            p.append(Bytes::from(data_batch(
                1_700_000_000_000,
                &[value.as_bytes()],
            )))
            .await
        }
    });
    let results = futures_join_all(appends).await;
    let mut offsets = Vec::new();
    for r in results {
        offsets.push(r?.0);
    }
    assert_eq!(
        offsets,
        (0..N as i64).collect::<Vec<_>>(),
        "each append gets its own offset, in proposal order"
    );
    assert_eq!(p.high_watermark(), N as i64);

    let (fsyncs, batches) = p.io_counters();
    let (fsyncs, batches) = (fsyncs - fsyncs_before, batches - batches_before);
    assert_eq!(batches, N as u64);
    // Without group commit every append is its own fsync (200); with it, the appends that queue
    // behind one fsync share the next one.
    assert!(
        fsyncs * 10 <= batches,
        "{fsyncs} fsyncs for {batches} batches: appends did not share fsyncs"
    );
    host.shutdown().await;
    Ok(())
}

/// Polls every future once, in order, on the current task, then drives them all to completion.
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_proposed_on_its_first_poll_even_without_coop_budget() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (host, p) = single_node_partition(dir.path()).await?;

    tracing::info!(
        "--- spend this task's cooperative budget, as a read loop decoding many frames does"
    );
    let noop = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(noop);
    for _ in 0..10_000 {
        if !tokio::task::coop::has_budget_remaining() {
            break;
        }
        let mut spend = std::pin::pin!(tokio::task::coop::consume_budget());
        let _ = spend.as_mut().poll(&mut cx);
    }
    assert!(!tokio::task::coop::has_budget_remaining());

    tracing::info!(
        "--- poll each append once, in order, as the connection does, then finish them in reverse"
    );
    const N: usize = 50;
    let mut pending = Vec::new();
    for i in 0..N {
        let p = p.clone();
        let mut fut = Box::pin(async move {
            let value = format!("v{i}");
            p.append(Bytes::from(data_batch(
                1_700_000_000_000,
                &[value.as_bytes()],
            )))
            .await
        });
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => {
                anyhow::bail!("append {i} finished on its first poll: {r:?}")
            }
            std::task::Poll::Pending => pending.push((i, fut)),
        }
    }
    // The most recently spawned task tends to run first; the order must not depend on it.
    let mut tasks = Vec::new();
    for (i, fut) in pending.into_iter().rev() {
        tasks.push((i, tokio::spawn(fut)));
    }
    let mut offsets = vec![-1i64; N];
    for (i, t) in tasks {
        offsets[i] = t.await??.0;
    }
    assert_eq!(
        offsets,
        (0..N as i64).collect::<Vec<_>>(),
        "offsets follow the order of the first polls"
    );
    host.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_subscriptions_report_only_what_happens_after_them() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let peers: BTreeMap<u64, String> = [(1, addr)].into_iter().collect();
    let host = start_host(
        1,
        dir.path(),
        listener,
        peers,
        Arc::new(RecordingApp::default()),
    )
    .await?;
    wait_for("meta leader", Duration::from_secs(5), || {
        host.meta().is_leader()
    })
    .await?;
    let cfg = LogConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 512,
    };
    let p = host
        .open_partition("p/w/0".to_string(), dir.path().join("w-0"), cfg, [1u64])
        .await?;
    wait_for("partition leader", Duration::from_secs(5), || p.is_leader()).await?;
    let value = vec![b'x'; 200];
    for _ in 0..20 {
        append_values(&p, &[&value, &value]).await?;
    }

    tracing::info!("--- a subscription made after the commits has nothing to report");
    let rx = p.subscribe_high_watermark();
    assert!(
        !rx.has_changed()?,
        "a fresh subscription reports commits made before it, so a long poll would spin"
    );
    let mut changes = p.subscribe_changes();
    assert!(!changes.has_changed());
    assert!(
        !ready_now(changes.changed()),
        "nothing happened, yet the wait is over"
    );

    tracing::info!("--- a commit after subscribing wakes the waiter, once");
    append_values(&p, &[b"late"]).await?;
    assert!(rx.has_changed()?);
    assert!(changes.has_changed());
    tokio::time::timeout(Duration::from_secs(5), changes.changed()).await?;
    assert!(!changes.has_changed());
    assert!(!ready_now(changes.changed()));

    tracing::info!("--- retention moving the log start wakes it too");
    let hw = p.high_watermark();
    let out = p
        .apply_retention(0, -1, 4096)
        .await?
        .ok_or_else(|| anyhow::anyhow!("nothing deleted"))?;
    assert!(out.log_start_offset > 0, "{out:?}");
    assert_eq!(p.high_watermark(), hw, "retention committed nothing");
    assert!(changes.has_changed(), "the log start moved to {out:?}");
    tokio::time::timeout(Duration::from_secs(5), changes.changed()).await?;
    assert!(!changes.has_changed());
    host.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_bad_frames_are_refused_and_the_group_keeps_serving() -> anyhow::Result<()> {
    use crate::codec::{ResponseStatus, RpcKind};
    use crate::transport::Transport;
    use openraft::raft::{AppendEntriesRequest, VoteRequest};

    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (host, p) = single_node_partition(dir.path()).await?;
    assert_eq!(append_values(&p, &[b"a"]).await?, (0, 0));
    let epoch = p.leader_epoch();
    let addr = host.local_addr().to_string();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let peer = Transport::new(2, BTreeMap::new(), None, rx);

    tracing::info!("--- a vote whose term no Kafka leader epoch can hold");
    let vote = VoteRequest::new(crate::Vote::new(i32::MAX as u64 + 1, 2), None);
    let (status, why) = peer
        .call(
            1,
            &addr,
            RpcKind::Vote,
            "p/t/0",
            |out| Ok(serde_json::to_writer(bytes::BufMut::writer(out), &vote)?),
            Duration::from_secs(5),
        )
        .await?;
    assert_eq!(status, ResponseStatus::Failed, "{why:?}");

    tracing::info!("--- an AppendEntries whose batch fails its CRC");
    let mut corrupt = data_batch(0, &[b"z"]);
    batch::set_base_offset(&mut corrupt, 1);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let append: AppendEntriesRequest<crate::TypeConfig> = AppendEntriesRequest {
        vote: crate::Vote::new_committed(epoch as u64 + 1, 2),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![crate::Entry {
            log_id: crate::log_id(epoch as u64 + 1, 1),
            payload: openraft::EntryPayload::Normal(Bytes::from(corrupt)),
        }],
    };
    let (status, why) = peer
        .call(
            1,
            &addr,
            RpcKind::AppendEntries,
            "p/t/0",
            |out| crate::codec::encode_append(&append, out),
            Duration::from_secs(5),
        )
        .await?;
    assert_eq!(status, ResponseStatus::Failed, "{why:?}");

    tracing::info!("--- the group still leads in the same term and appends");
    assert_eq!(p.leader_epoch(), epoch);
    assert_eq!(append_values(&p, &[b"b"]).await?, (1, 1));
    peer.shutdown_peers();
    host.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_becomes_a_voter_only_with_the_whole_committed_log() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 4).await?;
    let group = "p/t/9".to_string();
    let pdir = |id: u64| dir.path().join(format!("n{id}")).join("t-9");
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let mut parts = open_on(&hosts, &voters, dir.path(), &group, "t-9").await?;
    let leader = partition_leader(&parts).await?;

    tracing::info!("--- 3,000 entries: fewer than openraft's learner lag threshold (5,000)");
    let value = [7u8; 1000];
    for chunk in 0..30 {
        let appends = (0..100)
            .map(|_| parts[&leader].append(Bytes::from(data_batch(1_700_000_000_000, &[&value]))));
        for r in futures_join_all(appends).await {
            r?;
        }
        tracing::debug!(chunk, "appended");
    }
    let committed = parts[&leader].high_watermark();
    assert_eq!(committed, 3000);

    tracing::info!("--- node 4 replaces a follower; the other two voters are a majority without it, so only the move itself can make it wait for node 4");
    parts.insert(
        4,
        hosts[&4]
            .join_partition(group.clone(), pdir(4), LogConfig::default())
            .await?,
    );
    let leaving = *voters.iter().find(|&&v| v != leader).expect("a follower");
    let target: BTreeSet<u64> = voters
        .iter()
        .copied()
        .filter(|&v| v != leaving)
        .chain([4])
        .collect();
    parts[&leader].change_voters(target.clone()).await?;
    assert_eq!(parts[&leader].voters(), target);
    let on_new = parts[&4].log_end_offset();
    assert!(
        on_new >= committed,
        "node 4 became a voter holding offsets below {on_new} of the {committed} committed"
    );
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// A quiet group sends nothing while idle, so a voter that raises its term just after an
/// election (here: one election of its own, refused by the others' fresh leader lease) knew no
/// leader until the next write: it waited for the leader its pings showed, and the leader never
/// heard of the higher term. The leader now heartbeats a voter whose pings say it has no leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_left_leaderless_by_its_own_election_learns_a_leader_while_the_group_is_idle(
) -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/idle-term/0".to_string();
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let parts = open_on(&hosts, &voters, dir.path(), &group, "idle-term-0").await?;
    let leader = partition_leader(&parts).await?;
    let follower = *voters.iter().find(|&&v| v != leader).expect("a follower");
    // The append renews the followers' leases: for the next two seconds they refuse votes.
    append_values(&parts[&leader], &[b"before"]).await?;
    wait_for("the follower has it", Duration::from_secs(10), || {
        parts[&follower].high_watermark() == 1
    })
    .await?;
    let term = parts[&leader].raft.metrics().borrow().current_term;
    parts[&follower].raft.trigger().elect().await?;
    wait_for("the follower's term rose", Duration::from_secs(5), || {
        parts[&follower].raft.metrics().borrow().current_term > term
    })
    .await?;
    let now = partition_leader(&parts).await?;
    append_values(&parts[&now], &[b"after"]).await?;
    wait_for("everyone has both", Duration::from_secs(10), || {
        parts.values().all(|p| p.high_watermark() == 2)
    })
    .await?;
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// A leader whose log fsync fails stops its Raft core (retrying an fsync after a failure is
/// unsafe). Its node must stop claiming the group in ping answers at once, so the followers elect
/// without waiting for the replica to be reopened: the raft crate alone never reopens it, so
/// only that makes a new leader appear here (the broker's reopen loop hid a regression where a
/// stopped core was still claimed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_elect_when_the_leaders_disk_fails_without_waiting_for_a_reopen(
) -> anyhow::Result<()> {
    use sluice_storage::fault::{self, FaultErrno, FaultOp, FaultRule};
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    // Process-wide, but inert without rules; this test's rule names only its own directory.
    let layer = fault::install(&dir.path().join("faults.journal"))?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/disk/0".to_string();
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let parts = open_on(&hosts, &voters, dir.path(), &group, "disk-0").await?;
    let leader = partition_leader(&parts).await?;
    append_values(&parts[&leader], &[b"before"]).await?;

    layer.set_rules(vec![FaultRule {
        op: FaultOp::Fsync,
        error: FaultErrno::Eio,
        path_contains: Some(parts[&leader].dir().to_string_lossy().into_owned()),
    }]);
    let failed = append_values(&parts[&leader], &[b"lost?"]).await;
    assert!(
        failed.is_err(),
        "an append whose fsync failed was acknowledged"
    );
    wait_for("the leader's core stops", Duration::from_secs(10), || {
        parts[&leader].failure().is_some()
    })
    .await?;
    let followers: BTreeMap<u64, Arc<PartitionGroup>> = parts
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(id, p)| (*id, p.clone()))
        .collect();
    let now = partition_leader(&followers).await?;
    assert_ne!(now, leader);
    append_values(&followers[&now], &[b"after"]).await?;
    layer.set_rules(Vec::new());
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// A follower whose log is behind cannot win an election, and each attempt raises its term,
/// which makes the voters that could win give up theirs. Asked to elect (the fenced-leader loop
/// does that), it used to retry every few hundred milliseconds for 8 s and keep a group of three
/// without any leader all that time; now it stops once a leaderless peer's ping shows a longer
/// log, and that peer is elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_asked_to_elect_steps_aside_for_a_longer_log() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/lag/0".to_string();
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let mut parts = open_on(&hosts, &voters, dir.path(), &group, "lag-0").await?;
    let leader = partition_leader(&parts).await?;
    let lagging = *voters.iter().find(|&&v| v != leader).expect("a follower");

    tracing::info!(
        "--- the follower goes away; 20 entries commit without it; it comes back behind"
    );
    hosts[&lagging].close_partition(&group, false).await?;
    parts.remove(&lagging);
    for i in 0..20 {
        let v = format!("v{i}");
        append_values(&parts[&leader], &[v.as_bytes()]).await?;
    }
    let reopened = hosts[&lagging]
        .open_partition(
            group.clone(),
            dir.path().join(format!("n{lagging}")).join("lag-0"),
            LogConfig::default(),
            voters.clone(),
        )
        .await?;
    parts.insert(lagging, reopened);
    assert!(parts[&lagging].log_end_offset() < 20);

    let started = Instant::now();
    let res = parts[&lagging].trigger_elect().await;
    assert!(
        matches!(res, Err(RaftError::NotLeader { leader: None })),
        "the lagging follower should step aside, got {res:?} after {:?}",
        started.elapsed()
    );
    let now = partition_leader(&parts).await?;
    assert_ne!(
        now, lagging,
        "a replica without the committed entries leads"
    );
    assert!(parts[&now].log_end_offset() >= 20);
    assert_eq!(append_values(&parts[&now], &[b"after"]).await?.0, 20);
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

/// Flips a byte in the middle of the partition's (only) segment, breaking one batch's CRC.
fn damage_middle_of_log(part_dir: &Path) -> anyhow::Result<()> {
    let seg = std::fs::read_dir(part_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .ok_or_else(|| anyhow::anyhow!("no segment in {}", part_dir.display()))?;
    let mut bytes = std::fs::read(&seg)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_acknowledged_entries_does_not_vote_until_it_has_them_again(
) -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let (hosts, _peers) = start_cluster(dir.path(), 3).await?;
    let group = "p/lost/0".to_string();
    let pdir = |id: u64| dir.path().join(format!("n{id}")).join("lost-0");
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    let mut parts = open_on(&hosts, &voters, dir.path(), &group, "lost-0").await?;
    let leader = partition_leader(&parts).await?;
    let others: Vec<u64> = voters.iter().copied().filter(|&v| v != leader).collect();
    let (keeper, stale) = (others[0], others[1]);

    tracing::info!(
        "--- one follower goes away; 40 entries commit on the leader and the other follower"
    );
    hosts[&stale].close_partition(&group, false).await?;
    parts.remove(&stale);
    for i in 0..40 {
        let v = format!("v{i}");
        append_values(&parts[&leader], &[v.as_bytes()]).await?;
    }
    wait_for("the keeper has them", Duration::from_secs(10), || {
        parts[&keeper].high_watermark() == 40
    })
    .await?;

    tracing::info!("--- the leader goes down; the keeper stops and its disk loses half of what it acknowledged");
    hosts[&leader].close_partition(&group, false).await?;
    hosts[&keeper].close_partition(&group, false).await?;
    parts.clear();
    damage_middle_of_log(&pdir(keeper))?;

    tracing::info!(
        "--- keeper and stale follower come back: no leader may be elected between them"
    );
    let k = hosts[&keeper]
        .open_partition(
            group.clone(),
            pdir(keeper),
            LogConfig::default(),
            voters.clone(),
        )
        .await?;
    let s = hosts[&stale]
        .open_partition(
            group.clone(),
            pdir(stale),
            LogConfig::default(),
            voters.clone(),
        )
        .await?;
    assert!(k.log_end_offset() < 40, "the damaged log was cut");
    let _ = s.trigger_elect().await;
    assert!(k.trigger_elect().await.is_err(), "the keeper may not stand");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !k.is_leader() && !s.is_leader(),
        "a leader was elected without the lost entries (keeper leads: {}, stale leads: {})",
        k.is_leader(),
        s.is_leader()
    );

    tracing::info!("--- the old leader returns: it leads, and the keeper gets every entry back");
    let l = hosts[&leader]
        .open_partition(
            group.clone(),
            pdir(leader),
            LogConfig::default(),
            voters.clone(),
        )
        .await?;
    let parts: BTreeMap<u64, Arc<PartitionGroup>> =
        [(leader, l.clone()), (keeper, k.clone()), (stale, s.clone())]
            .into_iter()
            .collect();
    let new_leader = partition_leader(&parts).await?;
    assert!(
        parts[&new_leader].log_end_offset() >= 40,
        "node {new_leader} leads without every committed entry"
    );
    wait_for(
        "everyone has the 40 entries",
        Duration::from_secs(10),
        || parts.values().all(|p| p.high_watermark() >= 40),
    )
    .await?;
    assert_eq!(k.read(0, 1 << 20).await?, l.read(0, 1 << 20).await?);
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_with_damaged_acknowledged_data_refuses_to_open() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let part_dir = dir.path().join("partitions").join("t-0");
    {
        let (host, p) = single_node_partition(dir.path()).await?;
        for i in 0..20 {
            let v = format!("v{i}");
            append_values(&p, &[v.as_bytes()]).await?;
        }
        host.close_partition("p/t/0", false).await?;
        host.shutdown().await;
    }
    damage_middle_of_log(&part_dir)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let peers: BTreeMap<u64, String> = [(1, listener.local_addr()?.to_string())]
        .into_iter()
        .collect();
    let host = start_host(
        1,
        dir.path(),
        listener,
        peers,
        Arc::new(RecordingApp::default()),
    )
    .await?;
    let opened = host
        .open_partition(
            "p/t/0".to_string(),
            part_dir.clone(),
            LogConfig::default(),
            [1u64],
        )
        .await;
    let err = opened
        .err()
        .ok_or_else(|| anyhow::anyhow!("the damaged partition opened"))?;
    assert!(err.to_string().contains("durable point"), "{err}");
    host.shutdown().await;
    Ok(())
}

/// Remembers the base offset of every committed batch, in apply order.
#[derive(Default)]
struct BaseOffsets(std::sync::Mutex<Vec<i64>>);

impl crate::PartitionStm for BaseOffsets {
    fn name(&self) -> &str {
        "base_offsets"
    }
    fn apply(&self, e: &crate::CommittedBatch<'_>) -> Result<(), crate::StmError> {
        self.0.lock().expect("lock").push(e.base_offset);
        Ok(())
    }
    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.0.lock().expect("lock")).unwrap_or_default()
    }
    fn restore(&self, snapshot: Option<&[u8]>) -> Result<(), crate::StmError> {
        let v = match snapshot {
            None => Vec::new(),
            Some(b) => serde_json::from_slice(b)
                .map_err(|e| crate::StmError::new("base_offsets", e.to_string()))?,
        };
        *self.0.lock().expect("lock") = v;
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_order_is_log_order_and_registered_machines_see_it() -> anyhow::Result<()> {
    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let peers: BTreeMap<u64, String> = [(1, listener.local_addr()?.to_string())]
        .into_iter()
        .collect();
    let host = start_host(
        1,
        dir.path(),
        listener,
        peers,
        Arc::new(RecordingApp::default()),
    )
    .await?;
    host.set_partition_machines(Arc::new(|_: &crate::GroupId| {
        vec![Arc::new(BaseOffsets::default()) as Arc<dyn crate::PartitionStm>]
    }));
    let p = host
        .open_partition(
            "p/t/0",
            dir.path().join("partitions").join("t-0"),
            LogConfig::default(),
            [1u64],
        )
        .await?;
    wait_for("partition leader", Duration::from_secs(5), || p.is_leader()).await?;

    // Only the enqueue step is awaited before the next request starts; the commits are awaited
    // afterwards, all at once.
    let mut pending = Vec::new();
    for i in 0..20u8 {
        let b = Bytes::from(data_batch(1_700_000_000_000, &[&[i], &[i]]));
        pending.push(p.enqueue(b, crate::Acks::All).await?);
    }
    let mut offsets = Vec::new();
    for c in pending {
        offsets.push(c.await?);
    }
    let expected: Vec<(i64, i64)> = (0..20).map(|i| (2 * i, 2 * i + 1)).collect();
    assert_eq!(offsets, expected, "log order is enqueue order");
    let seen = p
        .with_machine::<BaseOffsets, _>("base_offsets", |m| m.0.lock().expect("lock").clone())
        .expect("the registered machine");
    assert_eq!(seen, (0..20).map(|i| 2 * i).collect::<Vec<i64>>());
    assert!(p
        .with_machine::<BaseOffsets, _>(crate::HIGH_WATERMARK, |_| ())
        .is_none());
    assert!(p.machine(crate::HIGH_WATERMARK).is_some());
    host.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_cluster_works_and_refuses_strangers_and_impostors() -> anyhow::Result<()> {
    use crate::codec::{ResponseStatus, RpcKind};
    use crate::tls::test_certs::TestCa;
    use crate::transport::Transport;
    use openraft::raft::VoteRequest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    init_tracing();
    let _one_at_a_time = serial().await;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("cluster ca");
    let (listeners, peers) = bind_nodes(3).await?;
    let mut hosts = BTreeMap::new();
    let mut apps = BTreeMap::new();
    for (id, l) in listeners {
        let app = Arc::new(RecordingApp::default());
        let h = start_host_with_tls(
            id,
            &dir.path().join(format!("n{id}")),
            l,
            peers.clone(),
            app.clone(),
            Some(ca.node(id)),
        )
        .await?;
        hosts.insert(id, h);
        apps.insert(id, app);
    }

    tracing::info!("--- the TLS cluster elects a leader and replicates to every node");
    let leader = meta_leader(&hosts).await?;
    let host = |id: u64| {
        hosts
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no host {id}"))
    };
    host(leader)?
        .meta()
        .propose(b"create topic t".to_vec())
        .await?;
    wait_for(
        "every node applied the command",
        Duration::from_secs(10),
        || {
            apps.values()
                .all(|a| a.commands() == vec![b"create topic t".to_vec()])
        },
    )
    .await?;
    let voters_before = host(leader)?.meta().voters();
    let addr = peers
        .get(&1)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no addr"))?;

    tracing::info!("--- plaintext: the connection is closed in the handshake, no frame is read");
    let mut plain = tokio::net::TcpStream::connect(&addr).await?;
    let frame = crate::codec::finish_frame(crate::codec::begin_request(1, RpcKind::Ping, "2"))?;
    plain.write_all(&frame).await?;
    // At most a TLS alert record (type 0x15) comes back before the close, never a response.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got)).await?;
    assert!(
        got.is_empty() || got[0] == 0x15,
        "plaintext peer got {got:?}"
    );

    let call_as = |tls: crate::tls::PeerTls, claimed: u64| {
        let addr = addr.clone();
        async move {
            let (_stop, rx) = tokio::sync::watch::channel(false);
            let t = Transport::new(claimed, BTreeMap::new(), Some(tls), rx);
            let vote = VoteRequest::new(crate::Vote::new(1_000, claimed), None);
            let res = t
                .call(
                    1,
                    &addr,
                    RpcKind::Vote,
                    crate::META_GROUP,
                    |out| Ok(serde_json::to_writer(bytes::BufMut::writer(out), &vote)?),
                    Duration::from_secs(5),
                )
                .await;
            t.shutdown_peers();
            res
        }
    };

    tracing::info!("--- a certificate from another CA fails the handshake");
    let stranger = TestCa::new("another ca");
    let res = call_as(stranger.node(2), 2).await;
    assert!(res.is_err(), "a foreign CA's node got {res:?}");

    tracing::info!("--- a client certificate of the cluster CA that names no node is refused");
    let res = call_as(ca.peer_tls(&["alice".into()]), 2).await;
    assert!(res.is_err(), "a certificate naming no node got {res:?}");

    tracing::info!("--- node 4's certificate may not vote as node 2, with a term that would win");
    let (status, why) = call_as(ca.node(4), 2).await?;
    assert_eq!(
        status,
        ResponseStatus::Failed,
        "{}",
        String::from_utf8_lossy(&why)
    );
    assert!(String::from_utf8_lossy(&why).contains("node 4's"));

    tracing::info!("--- nothing changed: same leader term, voters and commands");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host(leader)?.meta().voters(), voters_before);
    assert!(host(leader)?.meta().is_leader(), "the leader was deposed");
    for a in apps.values() {
        assert_eq!(a.commands(), vec![b"create topic t".to_vec()]);
    }
    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}
