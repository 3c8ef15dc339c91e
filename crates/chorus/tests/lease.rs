//! Leases against real processes: a lease kept alive survives SIGKILL of the
//! leader; a lease left alone is not reset to its full TTL by a leader change and
//! expires within its TTL plus an election timeout, taking its keys with it.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use etcd_client::{GetOptions, LeaseTimeToLiveOptions, PutOptions};

/// The longest election timeout with the default flags (1 s plus up to 1 s of jitter).
const ELECTION_TIMEOUT_MAX: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_survives_sigkill_of_the_leader() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let mut client = cluster.client_of(follower).await;
    let lease = client.lease_grant(6, None).await.unwrap().id();
    client.put("held", "yes", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.unwrap();
    let start = Instant::now();
    let mut killed = false;
    // Keep alive every second for 14 s (more than twice the TTL), killing the leader at 3 s.
    while start.elapsed() < Duration::from_secs(14) {
        if !killed && start.elapsed() > Duration::from_secs(3) {
            cluster.kill(leader);
            killed = true;
        }
        if keeper.keep_alive().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), responses.message()).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let got = client.get("held", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1, "the key of a lease kept alive is still there");
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 6, "remaining TTL {} within the granted 6 s", ttl.ttl());
}

/// Many keep-alives at once, on the leader and through the followers: the leader
/// replicates the renewals of one pass over its inputs in one record, and each
/// caller gets its own lease's answer; after the leader is killed, keep-alives
/// through the followers are answered again and their leases are all alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_leases_kept_alive_at_once_survive_the_leader() {
    const LEASES: usize = 24;
    const TTL_S: i64 = 5;
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut keepers = Vec::new();
    for i in 0..LEASES {
        let member = i % 3;
        let mut client = cluster.client_of(member).await;
        let lease = client.lease_grant(TTL_S, None).await.unwrap().id();
        client.put(format!("many/{i:02}"), "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
        let killed = killed.clone();
        keepers.push(tokio::spawn(async move {
            // Every 300 ms until the leader is killed, then (through a follower)
            // until two more answers came, reopening the stream if it ends, as
            // etcd's Go client does. Returns the answers before and after the kill
            // and any that were not this lease's.
            let (mut before, mut after, mut wrong) = (0, 0, Vec::new());
            let mut stream = client.lease_keep_alive(lease).await.ok();
            let mut killed_seen = false;
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline && after < 2 {
                if !killed_seen && killed.load(std::sync::atomic::Ordering::SeqCst) {
                    killed_seen = true;
                    if member == leader {
                        break;
                    }
                }
                let mut answer = Ok(Ok(None));
                if let Some((keeper, responses)) = stream.as_mut() {
                    if keeper.keep_alive().await.is_ok() {
                        answer = tokio::time::timeout(Duration::from_secs(3), responses.message()).await;
                    }
                }
                match answer {
                    Ok(Ok(Some(response))) => {
                        if response.id() != lease || response.ttl() != TTL_S {
                            wrong.push((response.id(), response.ttl()));
                        }
                        if killed_seen {
                            after += 1;
                        } else {
                            before += 1;
                        }
                    }
                    Ok(_) => stream = client.lease_keep_alive(lease).await.ok(),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (lease, member, before, after, wrong)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill(leader);
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut leases = Vec::new();
    for keeper in keepers {
        let (lease, member, before, after, wrong) = keeper.await.unwrap();
        assert!(wrong.is_empty(), "lease {lease:x} got answers for (id, ttl) {wrong:?}");
        assert!(before >= 2, "lease {lease:x}: {before} keep-alives answered in the 3 s before the kill");
        if member != leader {
            assert_eq!(after, 2, "lease {lease:x}: keep-alives through member {member} after the kill");
            leases.push(lease);
        }
    }
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    let mut client = cluster.client_of(survivor).await;
    for lease in &leases {
        let ttl = client.lease_time_to_live(*lease, None).await.unwrap();
        assert!(ttl.ttl() > 0, "lease {lease:x} kept alive is gone after the leader's death");
    }
    let keys = client.get("many/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert!(keys.kvs().len() >= leases.len(), "the keys of the leases kept alive are still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_alone_is_not_reset_by_a_leader_change_and_expires_with_its_keys() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let mut client = cluster.client_of(follower).await;
    let ttl_s = 12;
    let granted_at = Instant::now();
    let lease = client.lease_grant(ttl_s, None).await.unwrap().id();
    for key in ["gone/a", "gone/b", "gone/c"] {
        client.put(key, "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    }
    // After a checkpoint (every 5 s) the leader dies; the new leader starts from the
    // checkpoint plus one election timeout, not from the full 12 s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster.kill(leader);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let options = LeaseTimeToLiveOptions::new().with_keys();
    let remaining = client.lease_time_to_live(lease, Some(options)).await.unwrap();
    assert_eq!(remaining.keys().len(), 3);
    assert!(
        remaining.ttl() < ttl_s - 2,
        "remaining {} s after a leader change at 7 s: not reset to the full {ttl_s} s",
        remaining.ttl()
    );
    // After a leader change it expires within TTL + the checkpoint interval (1 s) +
    // the election + one election timeout of grace (plus a second of slack for ticks
    // and the revoke's round trip), and all its keys go in one revision.
    let limit = Duration::from_secs(ttl_s as u64) + 2 * ELECTION_TIMEOUT_MAX + Duration::from_secs(2);
    loop {
        let left = client.get("gone/", Some(GetOptions::new().with_prefix())).await.unwrap();
        if left.kvs().is_empty() {
            break;
        }
        assert!(granted_at.elapsed() < limit, "still there after {:?}", granted_at.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired_after = granted_at.elapsed();
    eprintln!("lease of {ttl_s} s expired {} ms after the grant", expired_after.as_millis());
    assert!(expired_after >= Duration::from_secs(ttl_s as u64), "not before its TTL: {expired_after:?}");
    let gone = client.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(gone.ttl(), -1, "an expired lease answers TTL -1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_client_stops_expires_within_its_ttl_plus_an_election_timeout() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut client = cluster.client().await;
    let ttl_s = 5;
    let lease = client.lease_grant(ttl_s, None).await.unwrap().id();
    client.put("short/a", "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    client.put("short/b", "y", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    // One keep-alive, then the client stops.
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.unwrap();
    // The leader renews after this instant: the lease must outlive it by the TTL.
    let stopped_at = Instant::now();
    keeper.keep_alive().await.unwrap();
    let renewed = responses.message().await.unwrap().unwrap();
    assert_eq!(renewed.ttl(), ttl_s);
    drop(keeper);
    let limit = Duration::from_secs(ttl_s as u64) + ELECTION_TIMEOUT_MAX;
    loop {
        let left = client.get("short/", Some(GetOptions::new().with_prefix())).await.unwrap();
        let elapsed = stopped_at.elapsed();
        if left.kvs().is_empty() {
            assert!(
                elapsed >= Duration::from_secs(ttl_s as u64),
                "expired {elapsed:?} after the last keep-alive"
            );
            eprintln!("lease of {ttl_s} s expired {} ms after its last keep-alive", elapsed.as_millis());
            break;
        }
        assert_eq!(left.kvs().len(), 2, "both keys go together");
        assert!(elapsed < limit, "still there {elapsed:?} after the last keep-alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
