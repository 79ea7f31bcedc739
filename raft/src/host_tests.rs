//! Whole-host tests: real tokio runtime, real disk, real loopback TCP.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_storage::{batch, LogConfig};
use tokio::net::TcpListener;

use crate::test_util::{data_batch, init_tracing, RecordingApp};
use crate::{PartitionGroup, RaftError, RaftHost, RaftHostConfig};

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
    let addr = listener.local_addr()?.to_string();
    let cfg = RaftHostConfig {
        node_id,
        raft_addr: addr,
        data_dir: dir.to_path_buf(),
        peers,
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

async fn append_values(p: &PartitionGroup, values: &[&[u8]]) -> anyhow::Result<(i64, i64)> {
    Ok(p.append(Bytes::from(data_batch(1_700_000_000_000, values)))
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_meta_and_partition_survive_restart() -> anyhow::Result<()> {
    init_tracing();
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
            Err(RaftError::Other(_))
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
    let new_leader = parts
        .values()
        .find(|p| p.is_leader())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    assert_eq!(
        append_values(&new_leader, &[b"after failover"]).await?,
        (next, next)
    );
    wait_for(
        "survivors at the new high watermark",
        Duration::from_secs(10),
        || parts.values().all(|p| p.high_watermark() == next + 1),
    )
    .await?;

    for h in hosts.values() {
        h.shutdown().await;
    }
    Ok(())
}
