//! The NOSPACE alarm with real processes and etcdctl: past `--quota-backend-bytes`
//! a member raises it through the log, every member then refuses writes that grow
//! the database (with etcd's message, changing nothing) while reads, deletes and
//! compaction still work; the operator raises the quota and disarms it.

mod common;

use std::time::{Duration, Instant};

use common::{etcdctl, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_refuses_growing_writes_until_disarmed() {
    let mut cluster =
        Cluster::start(3, &["--quota-backend-bytes", "4000000", "--max-request-bytes", "2000000"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let endpoints = cluster.endpoints().join(",");
    let mut client = cluster.client().await;
    client.put("keep", "me", None).await.expect("a first put");

    // Fill past the quota (bounded): the alarm is raised within a second or so.
    let value = vec![b'x'; 400_000];
    let started = Instant::now();
    let refusal = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "the NOSPACE alarm was never raised");
        match client.put("big", value.clone(), None).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => break error.to_string(),
        }
    };
    assert!(refusal.contains("etcdserver: mvcc: database space exceeded"), "{refusal}");

    let list = etcdctl(&endpoints, &["alarm", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(listed.contains("alarm:NOSPACE"), "alarm list: {listed:?}");
    let status = etcdctl(&cluster.endpoint(0), &["endpoint", "status", "-w", "json"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("alarm:NOSPACE"), "{status:?}");

    // Refused writes change nothing; reads, deletes and compaction work.
    let before = client.get("keep", None).await.expect("a read").header().unwrap().revision();
    let put = client.put("new", "small", None).await.expect_err("a put while NOSPACE is raised");
    assert!(put.to_string().contains("database space exceeded"), "{put}");
    let grant = client.lease_grant(60, None).await.expect_err("a lease grant while NOSPACE is raised");
    assert!(grant.to_string().contains("database space exceeded"), "{grant}");
    let txn = etcdctl(&endpoints, &["put", "via-etcdctl", "v"]);
    assert!(String::from_utf8_lossy(&txn.stderr).contains("database space exceeded"), "{txn:?}");
    let after = client.get("keep", None).await.expect("a read").header().unwrap().revision();
    assert_eq!(after, before, "a refused write changed the revision");
    let deleted = client.delete("big", None).await.expect("a delete while NOSPACE is raised");
    assert_eq!(deleted.deleted(), 1);
    let revision = deleted.header().unwrap().revision();
    client.compact(revision, None).await.expect("compaction while NOSPACE is raised");

    // The operator raises the quota (restarting the members), then disarms.
    for i in 0..3 {
        cluster.kill(i);
    }
    cluster.extra_args = vec!["--quota-backend-bytes".into(), "0".into()];
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_leader(Duration::from_secs(10)).await;
    let still = etcdctl(&endpoints, &["alarm", "list"]);
    assert!(String::from_utf8_lossy(&still.stdout).contains("alarm:NOSPACE"), "the alarm survives a restart");
    let disarm = etcdctl(&endpoints, &["alarm", "disarm"]);
    assert!(disarm.status.success(), "alarm disarm: {}", String::from_utf8_lossy(&disarm.stderr));
    let list = etcdctl(&endpoints, &["alarm", "list"]);
    assert!(list.stdout.is_empty(), "alarms after disarm: {:?}", String::from_utf8_lossy(&list.stdout));
    let mut client = cluster.client().await;
    client.put("new", "accepted", None).await.expect("a put after disarm");
}
