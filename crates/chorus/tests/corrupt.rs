//! The leader's corruption check with real processes: members that agree raise
//! no alarm while writes go on; a member whose stored key space was altered on
//! disk while it was down is found by the leader's next HashKV comparison, the
//! CORRUPT alarm names it (`etcdctl alarm list`), and the cluster then refuses
//! key-space writes with etcd's "corrupt cluster" while reads go on, until the
//! operator disarms it.

mod common;

use std::time::{Duration, Instant};

use chorus_proto::mvccpb::KeyValue;
use common::{etcdctl, Cluster};
use prost::Message as _;
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};

/// chorus's kv table (see chorus-storage): revision key to `mvccpb.KeyValue`.
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// Rewrites, in a stopped member's database, the value of every stored record of
/// `key` to `value`: what a bad disk or a buggy tool could do.
fn alter_stored_value(data_dir: &std::path::Path, key: &[u8], value: &[u8]) -> usize {
    let db = redb::Database::open(data_dir.join("member").join("chorus.redb"))
        .expect("open the member's database");
    let mut altered = Vec::new();
    {
        let read = db.begin_read().unwrap();
        let table = read.open_table(KV).unwrap();
        for row in table.iter().unwrap() {
            let (rev_key, record) = row.unwrap();
            let mut kv = KeyValue::decode(record.value()).unwrap();
            if kv.key == key && !kv.value.is_empty() {
                kv.value = value.to_vec();
                altered.push((rev_key.value().to_vec(), kv.encode_to_vec()));
            }
        }
    }
    let write = db.begin_write().unwrap();
    {
        let mut table = write.open_table(KV).unwrap();
        for (rev_key, record) in &altered {
            table.insert(rev_key.as_slice(), record.as_slice()).unwrap();
        }
    }
    write.commit().unwrap();
    altered.len()
}

fn alarms(endpoints: &str) -> String {
    let out = etcdctl(endpoints, &["alarm", "list"]);
    assert!(out.status.success(), "alarm list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_finds_a_member_whose_key_space_differs() {
    let mut cluster = Cluster::start(3, &["--corrupt-check-time", "300"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let endpoints = cluster.endpoints().join(",");
    let mut client = cluster.client().await;

    // Members that applied the same log agree: several check rounds under writes
    // raise nothing.
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) && i < 2_000 {
        client.put(format!("k{}", i % 50), format!("v{i}"), None).await.expect("put");
        i += 1;
    }
    client.put("victim", "good", None).await.expect("put");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alarms(&endpoints), "", "an alarm was raised though every member agrees");

    // Alter one follower's stored value while it is down.
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let victim = (leader + 1) % 3;
    // From here on through the leader only: a client of every endpoint would lose
    // its connection to the member restarted below, and the altered member serves
    // its own altered value.
    let mut through_leader = cluster.client_of(leader).await;
    let revision = client.get("victim", None).await.unwrap().header().unwrap().revision();
    let started = Instant::now();
    while cluster.local_range(victim, "victim").await != vec![("victim".to_string(), "good".to_string())] {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "member {victim} never applied revision {revision}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A graceful stop, so the member's last writes are in its file.
    cluster.signal(victim, "TERM");
    assert!(cluster.wait_exit(victim, Duration::from_secs(10)).is_some(), "member {victim} did not stop");
    assert_eq!(alter_stored_value(&cluster.members[victim].data_dir, b"victim", b"evil"), 1);
    cluster.restart(victim);

    let victim_id = {
        let members = through_leader.member_list().await.expect("member list");
        let name = &cluster.members[victim].name;
        members.members().iter().find(|m| m.name() == name).expect("the victim is listed").id()
    };
    let started = Instant::now();
    let listed = loop {
        let listed = alarms(&endpoints);
        if listed.contains("alarm:CORRUPT") {
            break listed;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no CORRUPT alarm: {listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        listed.trim(),
        format!("memberID:{victim_id} alarm:CORRUPT"),
        "only the altered member is named"
    );

    // Writes are refused, changing nothing; reads go on.
    let refused = through_leader.put("after", "v", None).await.expect_err("a put under CORRUPT");
    assert!(refused.to_string().contains("corrupt cluster"), "{refused}");
    let read = through_leader.get("victim", None).await.expect("a read under CORRUPT");
    assert_eq!(read.kvs()[0].value(), b"good", "the leader serves its own value");
    assert_eq!(read.header().unwrap().revision(), revision, "the refused put changed the revision");

    // The operator takes the member out of service, then disarms; writes resume.
    cluster.kill(victim);
    let disarm = etcdctl(&endpoints, &["alarm", "disarm"]);
    assert!(disarm.status.success(), "{}", String::from_utf8_lossy(&disarm.stderr));
    through_leader.put("after", "v", None).await.expect("a put after disarming");
}
