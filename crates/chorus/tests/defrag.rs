//! Defragmentation with real processes and etcdctl: the operator's way out of a
//! database grown by old revisions (compact, then `etcdctl defrag`) shrinks every
//! member's file while a write load goes on, loses no acknowledged write, and
//! leaves files a restarted member opens, with equal hashes on every member.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{etcdctl, status_of, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defrag_shrinks_every_member_while_writes_go_on() {
    let mut cluster = Cluster::start(3, &["--max-request-bytes", "2000000"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let endpoints = cluster.endpoints().join(",");
    let mut client = cluster.client().await;

    // 24 MB of revisions, then all of it deleted and compacted away.
    let value = vec![b'x'; 400_000];
    for round in 0..3 {
        for i in 0..20 {
            client
                .put(format!("bulk/{i}"), value.clone(), None)
                .await
                .unwrap_or_else(|e| panic!("put {round}/{i}: {e}"));
        }
    }
    let deleted =
        client.delete("bulk/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.expect("delete");
    assert_eq!(deleted.deleted(), 20);
    client.compact(deleted.header().unwrap().revision(), None).await.expect("compact");
    let mut before = Vec::new();
    for endpoint in cluster.endpoints() {
        // Every member has applied the compaction once its in-use size drops.
        let started = Instant::now();
        let status = loop {
            let status = status_of(&endpoint).await.expect("status");
            if status.raft_used_db_size() < status.db_size() / 2 {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{endpoint} never applied the compaction: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(status.db_size() > 20_000_000, "{endpoint}: {status:?}");
        before.push(status.db_size());
    }

    // A write load runs through the defragmentation of every member.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let mut client = cluster.client().await;
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut slowest = Duration::ZERO;
            for i in 0..20_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let started = Instant::now();
                if client.put(format!("load/{i:05}"), format!("v{i}"), None).await.is_ok() {
                    acked.push(i);
                }
                slowest = slowest.max(started.elapsed());
            }
            (acked, slowest)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let defrag =
        tokio::task::spawn_blocking(move || etcdctl(&endpoints, &["defrag", "--command-timeout", "60s"]))
            .await
            .unwrap();
    let text = String::from_utf8_lossy(&defrag.stdout).to_string();
    assert!(defrag.status.success(), "etcdctl defrag: {text} {}", String::from_utf8_lossy(&defrag.stderr));
    assert_eq!(text.matches("Finished defragmenting etcd member").count(), 3, "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, slowest) = load.await.unwrap();
    println!("{} puts acknowledged during the defragmentation; slowest {slowest:?}", acked.len());
    assert!(!acked.is_empty(), "no write was acknowledged during the defragmentation");

    for (i, endpoint) in cluster.endpoints().iter().enumerate() {
        let status = status_of(endpoint).await.expect("status");
        println!("member {i}: {} bytes before, {} after", before[i], status.db_size());
        assert!(status.db_size() < before[i] / 2, "member {i}: {} -> {}", before[i], status.db_size());
    }
    let response = client
        .get("load/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .expect("read the load back");
    let present: std::collections::BTreeSet<String> =
        response.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    for i in &acked {
        assert!(present.contains(&format!("load/{i:05}")), "acknowledged put load/{i:05} is missing");
    }

    // The defragmented files are what restarted members open.
    cluster.kill(1);
    cluster.restart(1);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    // Through the leader: a client of every endpoint lost its connection to m2.
    let mut client = cluster.client_of(leader).await;
    client.put("after-restart", "v", None).await.expect("a put after the restart");
    let revision = client.get("after-restart", None).await.unwrap().header().unwrap().revision();
    let mut hashes = Vec::new();
    for i in 0..3 {
        let started = Instant::now();
        let mut member = cluster.client_of(i).await;
        loop {
            match member.hash_kv(revision).await {
                Ok(hashed) => {
                    hashes.push(hashed.hash());
                    break;
                }
                Err(error) => {
                    assert!(started.elapsed() < Duration::from_secs(20), "member {i} HashKV: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "HashKV differs across members: {hashes:?}");
}
