//! Watches against real processes: a watcher on a follower sees every write made
//! through the leader exactly once, in order; a watcher resumes from any revision
//! not compacted; a compacted start revision cancels the watch as etcd does.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use etcd_client::{EventType, WatchOptions};

const WRITES_COUNT: usize = 300;

/// Collects put events from a watch stream until `count` arrived (bounded in time).
async fn collect_events(stream: &mut etcd_client::WatchStream, count: usize) -> Vec<(i64, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    while events.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, stream.message()).await.expect("events in time");
        let response = message.expect("stream ok").expect("stream open");
        assert!(!response.canceled(), "cancelled: {}", response.cancel_reason());
        for event in response.events() {
            assert_eq!(event.event_type(), EventType::Put);
            let kv = event.kv().unwrap();
            events.push((
                kv.mod_revision(),
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            ));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_follower_sees_every_write_through_the_leader_once_in_order() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let mut watching = cluster.client_of(follower).await;
    let mut stream = watching.watch("w/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let mut writer = cluster.client_of(leader).await;
    let mut written = Vec::new();
    for i in 0..WRITES_COUNT {
        let (key, value) = (format!("w/{:03}", i % 50), format!("v{i}"));
        let response = writer.put(key.as_str(), value.as_str(), None).await.unwrap();
        written.push((response.header().unwrap().revision(), key, value));
    }
    let seen = collect_events(&mut stream, WRITES_COUNT).await;
    assert_eq!(seen, written, "every write once, in revision order, with its value");

    // Resume from a revision in the middle, on another member.
    let resume_at = written[WRITES_COUNT / 2].0;
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let mut resuming = cluster.client_of(other).await;
    let options = WatchOptions::new().with_prefix().with_start_revision(resume_at);
    let mut resumed = resuming.watch("w/", Some(options)).await.unwrap();
    let rest = collect_events(&mut resumed, WRITES_COUNT - WRITES_COUNT / 2).await;
    assert_eq!(rest, written[WRITES_COUNT / 2..].to_vec());

    // A start revision below the compaction is cancelled with the compact revision.
    writer.compact(resume_at, None).await.unwrap();
    // Each member compacts when it applies the compaction: a linearizable read
    // through `other` makes sure it has, before the watch starts there.
    resuming.get("w/", None).await.unwrap();
    let options = WatchOptions::new().with_prefix().with_start_revision(2);
    let mut old = resuming.watch("w/", Some(options)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let response =
            tokio::time::timeout(left, old.message()).await.expect("answer in time").unwrap().unwrap();
        if response.canceled() {
            assert_eq!(response.compact_revision(), resume_at);
            break;
        }
        assert!(response.created() && response.events().is_empty(), "no events before the cancel");
    }
}
