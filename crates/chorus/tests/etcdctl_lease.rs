//! `etcdctl lease ...` and `etcdctl put --lease` (Debian's etcd-client) against a
//! real chorus cluster, with etcd's output.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Cluster;

fn etcdctl(endpoints: &str, args: &[&str]) -> (bool, String, String) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let binary = std::env::split_paths(&path)
        .map(|dir| dir.join("etcdctl"))
        .find(|candidate| candidate.is_file())
        .expect("etcdctl is not on PATH: apt-get install etcd-client (CI installs it)");
    let output = Command::new(binary)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoints, "--command-timeout", "5s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.success(), text(output.stdout), text(output.stderr))
}

fn ok(endpoints: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = etcdctl(endpoints, args);
    assert!(success, "etcdctl {args:?} failed: {stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lease_commands_behave_as_against_etcd() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = cluster.endpoint((0..3).find(|i| *i != leader).unwrap());
    let all = cluster.endpoints().join(",");

    // grant: "lease <hex id> granted with TTL(<n>s)"
    let granted = ok(&all, &["lease", "grant", "30"]);
    let words: Vec<&str> = granted.split_whitespace().collect();
    assert_eq!(
        (words[0], words[2], words[3], words[4]),
        ("lease", "granted", "with", "TTL(30s)"),
        "{granted}"
    );
    let id = words[1].to_string();
    assert_eq!(ok(&all, &["put", "--lease", &id, "leased/a", "1"]), "OK\n");
    assert_eq!(ok(&all, &["put", "--lease", &id, "leased/b", "2"]), "OK\n");

    // timetolive --keys, asked of a follower (answered by the leader).
    let ttl = ok(&follower, &["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.starts_with(&format!("lease {id} granted with TTL(30s), remaining(")), "{ttl}");
    assert!(ttl.trim_end().ends_with("attached keys([leased/a leased/b])"), "{ttl}");

    // list
    let list = ok(&all, &["lease", "list"]);
    assert_eq!(list, format!("found 1 leases\n{id}\n"));

    // keep-alive --once, through a follower
    let kept = ok(&follower, &["lease", "keep-alive", "--once", &id]);
    assert_eq!(kept, format!("lease {id} keepalived with TTL(30)\n"));

    // A lease that does not exist: put refuses it with etcd's message.
    let (success, _, stderr) = etcdctl(&all, &["put", "--lease", "1234abcd", "x", "y"]);
    assert!(!success && stderr.contains("etcdserver: requested lease not found"), "{stderr}");

    // revoke deletes the keys.
    assert_eq!(ok(&all, &["lease", "revoke", &id]), format!("lease {id} revoked\n"));
    assert_eq!(ok(&all, &["get", "--prefix", "leased/"]), "");
    let gone = ok(&all, &["lease", "timetolive", &id]);
    assert_eq!(gone, format!("lease {id} already expired\n"));
    // A keep-alive of the revoked lease is answered "gone" (TTL 0) by the leader once it
    // has confirmed it still leads, through a follower too.
    for endpoints in [&all, &follower] {
        let (success, stdout, stderr) = etcdctl(endpoints, &["lease", "keep-alive", "--once", &id]);
        assert!(!success && stderr.contains("requested lease not found"), "{stdout}{stderr}");
    }
    assert_eq!(ok(&all, &["lease", "list"]), "found 0 leases\n");

    // A short lease nobody keeps alive expires by itself, and its key goes.
    let short = ok(&all, &["lease", "grant", "5"]);
    let short_id = short.split_whitespace().nth(1).unwrap().to_string();
    ok(&all, &["put", "--lease", &short_id, "short", "x"]);
    let start = Instant::now();
    while !ok(&all, &["get", "short"]).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(9), "a 5 s lease still holds its key after 9 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}
