//! A real third-party client against a real cluster: etcd's own `etcdctl` (v3 API,
//! Debian's `etcd-client` package) run as a subprocess against three `chorus serve`
//! members on loopback. Every check compares etcdctl's exact output with what etcd
//! would print for the same commands.
//!
//! One cluster serves every check, so the run stays short; each check uses its own
//! key prefix. The checks run in sequence and every failure is collected, so one
//! broken command does not hide the others. The compaction check runs after every
//! check that reads an old revision.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use base64::Engine as _;
use common::Cluster;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

/// etcdctl's own deadline for one request (`--command-timeout`).
const COMMAND_TIMEOUT_S: u64 = 5;
/// Our deadline for one etcdctl process, dial and exit included.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(15);

/// Where etcdctl is, or a failure that says how to install it. Never a skip: a
/// machine without etcdctl would otherwise pass this suite without running it.
fn find_etcdctl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcdctl"))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| {
            panic!(
                "etcdctl is not on PATH; this test needs etcd's command-line client: \
                 `apt-get install etcd-client` (Debian/Ubuntu)"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What one etcdctl process did.
#[derive(Debug)]
struct Run {
    /// Exit code; None if killed by a signal.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// etcdctl, pointed at every member of the cluster.
struct Etcdctl {
    path: PathBuf,
    endpoints: String,
}

impl Etcdctl {
    async fn run(&self, args: &[&str]) -> anyhow::Result<Run> {
        self.run_with_stdin(args, None).await
    }

    async fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Run> {
        let mut command = tokio::process::Command::new(&self.path);
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .arg(format!("--command-timeout={COMMAND_TIMEOUT_S}s"))
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("spawn etcdctl")?;
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(text.as_bytes()).await?;
            drop(pipe); // EOF ends etcdctl's interactive txn
        }
        let output = tokio::time::timeout(PROCESS_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("etcdctl {args:?} did not exit within {PROCESS_TIMEOUT:?}"))??;
        Ok(Run {
            code: output.status.code(),
            stdout: String::from_utf8(output.stdout)?,
            stderr: String::from_utf8(output.stderr)?,
        })
    }

    /// Runs a command that must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let run = self.run(args).await?;
        ensure!(run.success(), "etcdctl {args:?} failed: {run:?}");
        Ok(run.stdout)
    }

    /// Runs a command that must succeed with `-w json`; returns the parsed output.
    async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut args = args.to_vec();
        args.extend(["-w", "json"]);
        let stdout = self.ok(&args).await?;
        serde_json::from_str(&stdout)
            .with_context(|| format!("etcdctl {args:?} printed non-JSON: {stdout:?}"))
    }

    /// Runs a command that must fail; returns its stderr.
    async fn fails(&self, args: &[&str]) -> anyhow::Result<String> {
        let run = self.run(args).await?;
        ensure!(run.code.is_some_and(|code| code != 0), "etcdctl {args:?} should exit non-zero: {run:?}");
        Ok(run.stderr)
    }

    /// The store revision after a `put` (from its `-w json` header).
    async fn put_revision(&self, key: &str, value: &str) -> anyhow::Result<i64> {
        let response = self.json(&["put", key, value]).await?;
        int(&response["header"]["revision"])
    }
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, actual: T, expected: T) -> anyhow::Result<()> {
    ensure!(actual == expected, "{what}: got {actual:?}, expected {expected:?}");
    Ok(())
}

/// A JSON integer (etcd prints int64 and uint64 fields as numbers).
fn int(value: &Value) -> anyhow::Result<i64> {
    value.as_i64().ok_or_else(|| anyhow!("not an int64: {value}"))
}

fn uint(value: &Value) -> anyhow::Result<u64> {
    value.as_u64().ok_or_else(|| anyhow!("not a uint64: {value}"))
}

/// A base64 field of etcd's JSON (keys and values), decoded.
fn text(value: &Value) -> anyhow::Result<String> {
    let encoded = value.as_str().ok_or_else(|| anyhow!("not a string: {value}"))?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
    Ok(String::from_utf8(bytes)?)
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
}

/// The keys of a range's `kvs`, decoded, in the order given.
fn keys_of(response: &Value) -> anyhow::Result<Vec<String>> {
    response["kvs"].as_array().into_iter().flatten().map(|kv| text(&kv["key"])).collect()
}

async fn put_and_get(ctl: &Etcdctl) -> anyhow::Result<()> {
    expect_eq("put output", ctl.ok(&["put", "ctl/basic/k", "v1"]).await?, "OK\n".into())?;
    expect_eq("get output", ctl.ok(&["get", "ctl/basic/k"]).await?, "ctl/basic/k\nv1\n".into())?;
    expect_eq("get of a missing key", ctl.ok(&["get", "ctl/basic/missing"]).await?, String::new())?;
    expect_eq("overwrite", ctl.ok(&["put", "ctl/basic/k", "v2"]).await?, "OK\n".into())?;
    expect_eq(
        "--print-value-only",
        ctl.ok(&["get", "--print-value-only", "ctl/basic/k"]).await?,
        "v2\n".into(),
    )?;
    expect_eq(
        "serializable get",
        ctl.ok(&["get", "--consistency=s", "ctl/basic/k"]).await?,
        "ctl/basic/k\nv2\n".into(),
    )
}

/// `--prefix`, `--keys-only`, `--limit` and the count, on keys chosen to sit at the
/// prefix's edges: `ctl/prefix` and `ctl/prefix0` (the range end) are outside.
async fn prefix_limit_and_keys_only(ctl: &Etcdctl) -> anyhow::Result<()> {
    for (key, value) in [("ctl/prefix", "out"), ("ctl/prefix/a", "1"), ("ctl/prefix/b", "2")] {
        ctl.ok(&["put", key, value]).await?;
    }
    for (key, value) in [("ctl/prefix/c", "3"), ("ctl/prefix0", "out")] {
        ctl.ok(&["put", key, value]).await?;
    }
    expect_eq(
        "get --prefix",
        ctl.ok(&["get", "--prefix", "ctl/prefix/"]).await?,
        "ctl/prefix/a\n1\nctl/prefix/b\n2\nctl/prefix/c\n3\n".into(),
    )?;
    expect_eq(
        "get --prefix --keys-only",
        ctl.ok(&["get", "--prefix", "--keys-only", "ctl/prefix/"]).await?,
        "ctl/prefix/a\n\nctl/prefix/b\n\nctl/prefix/c\n\n".into(),
    )?;
    let keys_only = ctl.json(&["get", "--prefix", "--keys-only", "ctl/prefix/"]).await?;
    expect_eq(
        "--keys-only keys",
        keys_of(&keys_only)?,
        vec!["ctl/prefix/a".into(), "ctl/prefix/b".into(), "ctl/prefix/c".into()],
    )?;
    for kv in keys_only["kvs"].as_array().into_iter().flatten() {
        ensure!(kv.get("value").is_none(), "--keys-only returned a value: {kv}");
    }
    expect_eq(
        "get --prefix --limit 2",
        ctl.ok(&["get", "--prefix", "--limit", "2", "ctl/prefix/"]).await?,
        "ctl/prefix/a\n1\nctl/prefix/b\n2\n".into(),
    )?;
    // count is every key in the range, not just the ones returned; more says so.
    let limited = ctl.json(&["get", "--prefix", "--limit", "1", "ctl/prefix/"]).await?;
    expect_eq("limited keys", keys_of(&limited)?, vec!["ctl/prefix/a".to_string()])?;
    expect_eq("limited count", int(&limited["count"])?, 3)?;
    expect_eq("limited more", limited["more"].as_bool(), Some(true))?;
    expect_eq(
        "descending by key",
        ctl.ok(&["get", "--prefix", "--keys-only", "--order=DESCEND", "ctl/prefix/"]).await?,
        "ctl/prefix/c\n\nctl/prefix/b\n\nctl/prefix/a\n\n".into(),
    )?;
    count_only(ctl).await
}

/// `--count-only` exists from etcdctl 3.5 on. With 3.4 (Debian's package) the flag
/// is refused by etcdctl itself, so the count is checked through `--limit` above.
async fn count_only(ctl: &Etcdctl) -> anyhow::Result<()> {
    let help = ctl.run(&["get", "--help"]).await?;
    if !format!("{}{}", help.stdout, help.stderr).contains("--count-only") {
        let stderr = ctl.fails(&["get", "--prefix", "--count-only", "ctl/prefix/"]).await?;
        ensure!(stderr.contains("unknown flag: --count-only"), "unexpected stderr: {stderr}");
        eprintln!("etcdctl has no --count-only (3.4); the count was checked with --limit");
        return Ok(());
    }
    let counted = ctl.json(&["get", "--prefix", "--count-only", "ctl/prefix/"]).await?;
    expect_eq("--count-only count", int(&counted["count"])?, 3)?;
    ensure!(counted.get("kvs").is_none(), "--count-only returned kvs: {counted}");
    Ok(())
}

/// `--from-key` reads to the end of the key space, so it uses keys that sort after
/// every other key this suite writes.
async fn from_key(ctl: &Etcdctl) -> anyhow::Result<()> {
    for (key, value) in [("~from/a", "1"), ("~from/b", "2"), ("~from/c", "3")] {
        ctl.ok(&["put", key, value]).await?;
    }
    expect_eq(
        "get --from-key",
        ctl.ok(&["get", "--from-key", "~from/b"]).await?,
        "~from/b\n2\n~from/c\n3\n".into(),
    )
}

/// `get --rev` reads an old value; `-w json` shows the header and the revisions.
async fn revisions_and_json(
    ctl: &Etcdctl,
    leader_term: u64,
    cluster_id: u64,
    member_ids: &[u64],
) -> anyhow::Result<()> {
    let created = ctl.put_revision("ctl/rev/k", "old").await?;
    let modified = ctl.put_revision("ctl/rev/k", "new").await?;
    expect_eq("revision of the second put", modified, created + 1)?;
    let old = ctl.ok(&["get", "ctl/rev/k", "--rev", &created.to_string()]).await?;
    expect_eq("get --rev (old revision)", old, "ctl/rev/k\nold\n".into())?;
    let now = ctl.ok(&["get", "ctl/rev/k", "--rev", &modified.to_string()]).await?;
    expect_eq("get --rev (latest)", now, "ctl/rev/k\nnew\n".into())?;
    expect_eq("get (latest)", ctl.ok(&["get", "ctl/rev/k"]).await?, "ctl/rev/k\nnew\n".into())?;

    let response = ctl.json(&["get", "ctl/rev/k"]).await?;
    let header = &response["header"];
    expect_eq("header.cluster_id", uint(&header["cluster_id"])?, cluster_id)?;
    let member_id = uint(&header["member_id"])?;
    ensure!(member_ids.contains(&member_id), "header.member_id {member_id} is not a member");
    expect_eq("header.revision", int(&header["revision"])?, modified)?;
    let raft_term = uint(&header["raft_term"])?;
    ensure!(
        raft_term >= leader_term,
        "header.raft_term {raft_term} is below the term {leader_term} seen before"
    );
    expect_eq("count", int(&response["count"])?, 1)?;
    let kvs = response["kvs"].as_array().context("kvs")?;
    expect_eq("kvs length", kvs.len(), 1)?;
    let kv = &kvs[0];
    expect_eq("key", text(&kv["key"])?, "ctl/rev/k".into())?;
    expect_eq("value", text(&kv["value"])?, "new".into())?;
    expect_eq("create_revision", int(&kv["create_revision"])?, created)?;
    expect_eq("mod_revision", int(&kv["mod_revision"])?, modified)?;
    expect_eq("version", int(&kv["version"])?, 2)?;
    ensure!(kv.get("lease").is_none(), "a key without a lease shows one: {kv}");
    Ok(())
}

async fn delete(ctl: &Etcdctl) -> anyhow::Result<()> {
    for key in ["ctl/del/a", "ctl/del/b", "ctl/del/c", "ctl/del0"] {
        ctl.ok(&["put", key, "x"]).await?;
    }
    expect_eq("del one key", ctl.ok(&["del", "ctl/del/a"]).await?, "1\n".into())?;
    expect_eq("del a missing key", ctl.ok(&["del", "ctl/del/a"]).await?, "0\n".into())?;
    expect_eq("del --prefix", ctl.ok(&["del", "--prefix", "ctl/del/"]).await?, "2\n".into())?;
    expect_eq("get after del --prefix", ctl.ok(&["get", "--prefix", "ctl/del/"]).await?, String::new())?;
    expect_eq("key past the prefix", ctl.ok(&["get", "ctl/del0"]).await?, "ctl/del0\nx\n".into())?;
    ctl.ok(&["put", "ctl/del/p", "gone"]).await?;
    let deleted = ctl.json(&["del", "--prev-kv", "ctl/del/p"]).await?;
    expect_eq("del --prev-kv deleted", int(&deleted["deleted"])?, 1)?;
    let prev = deleted["prev_kvs"].as_array().context("prev_kvs")?;
    expect_eq("del --prev-kv count", prev.len(), 1)?;
    expect_eq("del --prev-kv value", text(&prev[0]["value"])?, "gone".into())
}

async fn put_prev_kv(ctl: &Etcdctl) -> anyhow::Result<()> {
    expect_eq(
        "put --prev-kv of a new key",
        ctl.ok(&["put", "--prev-kv", "ctl/prev/k", "v1"]).await?,
        "OK\n".into(),
    )?;
    expect_eq(
        "put --prev-kv of an existing key",
        ctl.ok(&["put", "--prev-kv", "ctl/prev/k", "v2"]).await?,
        "OK\nctl/prev/k\nv1\n".into(),
    )?;
    let response = ctl.json(&["put", "--prev-kv", "ctl/prev/k", "v3"]).await?;
    expect_eq("prev_kv.value", text(&response["prev_kv"]["value"])?, "v2".into())?;
    expect_eq("prev_kv.version", int(&response["prev_kv"]["version"])?, 2)
}

/// etcdctl's interactive txn: compares, a blank line, success ops, a blank line,
/// failure ops, a blank line.
async fn txn(ctl: &Etcdctl) -> anyhow::Result<()> {
    let created = ctl.put_revision("ctl/txn/k", "v").await?;
    let success_script = format!(
        "value(\"ctl/txn/k\") = \"v\"\nmod(\"ctl/txn/k\") > \"0\"\nver(\"ctl/txn/k\") = \"1\"\n\
         create(\"ctl/txn/k\") = \"{created}\"\n\n\
         put ctl/txn/then yes\nget ctl/txn/k\n\n\
         put ctl/txn/else yes\n\n"
    );
    let run = ctl.run_with_stdin(&["txn"], Some(&success_script)).await?;
    ensure!(run.success(), "txn (success) failed: {run:?}");
    expect_eq("txn success output", run.stdout, "SUCCESS\n\nOK\n\nctl/txn/k\nv\n".into())?;

    let failure_script = "mod(\"ctl/txn/k\") > \"0\"\nvalue(\"ctl/txn/k\") = \"zz\"\n\n\
                          put ctl/txn/then2 yes\n\n\
                          put ctl/txn/else yes\nget ctl/txn/k\n\n";
    let run = ctl.run_with_stdin(&["txn"], Some(failure_script)).await?;
    ensure!(run.success(), "txn (failure) failed: {run:?}");
    expect_eq("txn failure output", run.stdout, "FAILURE\n\nOK\n\nctl/txn/k\nv\n".into())?;

    let run = ctl
        .run_with_stdin(
            &["txn", "-w", "json"],
            Some("value(\"ctl/txn/k\") = \"v\"\n\ndel ctl/txn/then\n\n\n"),
        )
        .await?;
    ensure!(run.success(), "txn -w json failed: {run:?}");
    let response: Value = serde_json::from_str(&run.stdout)?;
    expect_eq("txn -w json succeeded", response["succeeded"].as_bool(), Some(true))?;
    let deleted = &response["responses"][0]["Response"]["ResponseDeleteRange"]["deleted"];
    expect_eq("txn -w json deleted", int(deleted)?, 1)?;

    expect_eq(
        "keys after the txns",
        ctl.ok(&["get", "--prefix", "ctl/txn/"]).await?,
        "ctl/txn/else\nyes\nctl/txn/k\nv\n".into(),
    )
}

/// Compacts the whole store: run after every check that reads old revisions.
async fn compaction(ctl: &Etcdctl) -> anyhow::Result<()> {
    let first = ctl.put_revision("ctl/compact/k", "v1").await?;
    let second = ctl.put_revision("ctl/compact/k", "v2").await?;
    ctl.put_revision("ctl/compact/k", "v3").await?;
    let stdout = ctl.ok(&["compaction", &second.to_string()]).await?;
    expect_eq("compaction output", stdout, format!("compacted revision {second}\n"))?;
    let stderr = ctl.fails(&["get", "ctl/compact/k", "--rev", &first.to_string()]).await?;
    ensure!(
        stderr.contains("Error: etcdserver: mvcc: required revision has been compacted"),
        "get below the compaction: {stderr}"
    );
    // The compaction revision itself is still readable.
    let kept = ctl.ok(&["get", "ctl/compact/k", "--rev", &second.to_string()]).await?;
    expect_eq("get at the compaction revision", kept, "ctl/compact/k\nv2\n".into())?;
    let stderr = ctl.fails(&["compaction", &first.to_string()]).await?;
    ensure!(stderr.contains("required revision has been compacted"), "compaction again: {stderr}");
    let stderr = ctl.fails(&["compaction", "1000000"]).await?;
    ensure!(stderr.contains("required revision is a future revision"), "future compaction: {stderr}");
    let stderr = ctl.fails(&["get", "ctl/compact/k", "--rev", "1000000"]).await?;
    ensure!(
        stderr.contains("Error: etcdserver: mvcc: required revision is a future revision"),
        "future get: {stderr}"
    );
    Ok(())
}

/// What `endpoint status -w json` says, checked; returns (leader term, cluster id,
/// member ids in endpoint order).
async fn endpoint_status(ctl: &Etcdctl, cluster: &Cluster) -> anyhow::Result<(u64, u64, Vec<u64>)> {
    let statuses = ctl.json(&["endpoint", "status"]).await?;
    let statuses = statuses.as_array().context("endpoint status is not a list")?;
    let endpoints: Vec<String> =
        statuses.iter().filter_map(|s| s["Endpoint"].as_str().map(String::from)).collect();
    expect_eq("endpoints", endpoints, cluster.endpoints())?;
    let mut member_ids = Vec::new();
    let mut leaders = Vec::new();
    let mut cluster_ids = Vec::new();
    let mut terms = Vec::new();
    for entry in statuses {
        let status = &entry["Status"];
        let member_id = uint(&status["header"]["member_id"])?;
        member_ids.push(member_id);
        cluster_ids.push(uint(&status["header"]["cluster_id"])?);
        leaders.push(uint(&status["leader"])?);
        terms.push(uint(&status["raftTerm"])?);
        expect_eq(
            "header.raft_term = raftTerm",
            uint(&status["header"]["raft_term"])?,
            uint(&status["raftTerm"])?,
        )?;
        let version = status["version"].as_str().unwrap_or_default();
        ensure!(version.starts_with("3.") && version.split('.').count() == 3, "version {version:?}");
        let (index, applied) = (uint(&status["raftIndex"])?, uint(&status["raftAppliedIndex"])?);
        ensure!(
            index > 0 && applied > 0 && applied <= index,
            "raftIndex {index}, raftAppliedIndex {applied}"
        );
        ensure!(int(&status["dbSize"])? > 0, "dbSize in {status}");
        ensure!(status.get("isLearner").is_none(), "a member is a learner: {status}");
    }
    let mut distinct = member_ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    expect_eq("distinct member ids", distinct.len(), 3)?;
    ensure!(cluster_ids.iter().all(|id| *id == cluster_ids[0] && *id != 0), "cluster ids {cluster_ids:?}");
    ensure!(leaders.iter().all(|l| *l == leaders[0]), "members disagree on the leader: {leaders:?}");
    let is_leader: Vec<bool> = member_ids.iter().map(|id| *id == leaders[0]).collect();
    expect_eq("leaders among the endpoints", is_leader.iter().filter(|l| **l).count(), 1)?;
    ensure!(terms.iter().all(|t| *t == terms[0] && *t >= 1), "terms {terms:?}");

    // The simple format: endpoint, id in hex, version, size, is leader, ...
    let simple = ctl.ok(&["endpoint", "status"]).await?;
    let lines: Vec<&str> = simple.lines().collect();
    expect_eq("endpoint status lines", lines.len(), 3)?;
    for ((line, endpoint), (id, leader)) in
        lines.iter().zip(cluster.endpoints()).zip(member_ids.iter().zip(&is_leader))
    {
        let fields: Vec<&str> = line.split(", ").collect();
        expect_eq("status endpoint", fields[0], endpoint.as_str())?;
        expect_eq("status id", fields[1].to_string(), format!("{id:x}"))?;
        expect_eq("status is leader", fields[4].to_string(), leader.to_string())?;
        expect_eq("status is learner", fields[5], "false")?;
    }
    Ok((terms[0], cluster_ids[0], member_ids))
}

/// Endpoints written as URLs (`http://host:port`, as most operators write them) and
/// `--cluster` (which takes the members' client URLs from MemberList): etcdctl 3.4
/// then sends the URL as the request's HTTP/2 authority for its per-endpoint
/// commands, which chorus must accept as etcd does.
async fn url_endpoints_and_cluster_flag(ctl: &Etcdctl, member_ids: &[u64]) -> anyhow::Result<()> {
    let first = ctl.endpoints.split(',').next().context("no endpoint")?;
    let url_ctl = Etcdctl { path: ctl.path.clone(), endpoints: format!("http://{first}") };
    let statuses = url_ctl.json(&["endpoint", "status", "--cluster"]).await?;
    let statuses = statuses.as_array().context("endpoint status is not a list")?;
    let mut ids: Vec<u64> =
        statuses.iter().map(|s| uint(&s["Status"]["header"]["member_id"])).collect::<anyhow::Result<_>>()?;
    ids.sort_unstable();
    let mut expected = member_ids.to_vec();
    expected.sort_unstable();
    expect_eq("members in endpoint status --cluster", ids, expected)?;
    for status in statuses {
        let endpoint = status["Endpoint"].as_str().unwrap_or_default();
        ensure!(endpoint.starts_with("http://127.0.0.1:"), "endpoint {endpoint:?}");
    }
    // Each member hashes its current revision: a follower may still be applying the
    // last write, so a difference is asked again a few times.
    let mut hashes = Vec::new();
    for _ in 0..10 {
        let answer = url_ctl.json(&["endpoint", "hashkv", "--cluster"]).await?;
        hashes = answer
            .as_array()
            .context("endpoint hashkv is not a list")?
            .iter()
            .map(|h| uint(&h["HashKV"]["hash"]))
            .collect::<anyhow::Result<_>>()?;
        if hashes.iter().all(|h| *h == hashes[0]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expect_eq("hashes from endpoint hashkv --cluster", hashes.len(), 3)?;
    ensure!(hashes.iter().all(|h| *h == hashes[0]), "members' hashes differ: {hashes:?}");
    let simple = url_ctl.ok(&["endpoint", "status"]).await?;
    ensure!(simple.starts_with(&format!("http://{first}, ")), "endpoint status: {simple:?}");
    Ok(())
}

async fn endpoint_health(ctl: &Etcdctl, cluster: &Cluster) -> anyhow::Result<()> {
    let health = ctl.json(&["endpoint", "health"]).await?;
    let mut healthy: Vec<String> = health
        .as_array()
        .context("endpoint health is not a list")?
        .iter()
        .filter(|h| h["health"].as_bool() == Some(true))
        .filter_map(|h| h["endpoint"].as_str().map(String::from))
        .collect();
    healthy.sort();
    let mut expected = cluster.endpoints();
    expected.sort();
    expect_eq("healthy endpoints", healthy, expected)?;
    // etcdctl 3.4 prints the simple form on stderr, later versions on stdout.
    let run = ctl.run(&["endpoint", "health"]).await?;
    ensure!(run.success(), "endpoint health failed: {run:?}");
    let output = format!("{}{}", run.stdout, run.stderr);
    for endpoint in cluster.endpoints() {
        let line = format!("{endpoint} is healthy: successfully committed proposal");
        ensure!(output.contains(&line), "no {line:?} in {output:?}");
    }
    Ok(())
}

async fn member_list(
    ctl: &Etcdctl,
    cluster: &Cluster,
    cluster_id: u64,
    member_ids: &[u64],
) -> anyhow::Result<()> {
    let response = ctl.json(&["member", "list"]).await?;
    expect_eq("member list cluster_id", uint(&response["header"]["cluster_id"])?, cluster_id)?;
    let members = response["members"].as_array().context("members")?;
    expect_eq("members", members.len(), 3)?;
    for member in members {
        let name = member["name"].as_str().unwrap_or_default();
        let index = cluster
            .members
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| anyhow!("unknown member name {name:?} in {member}"))?;
        let configured = &cluster.members[index];
        let id = uint(&member["ID"])?;
        expect_eq(&format!("{name} id (from endpoint status)"), id, member_ids[index])?;
        expect_eq(
            &format!("{name} peerURLs"),
            strings(&member["peerURLs"]),
            vec![format!("http://127.0.0.1:{}", configured.peer_port)],
        )?;
        expect_eq(
            &format!("{name} clientURLs"),
            strings(&member["clientURLs"]),
            vec![format!("http://127.0.0.1:{}", configured.client_port)],
        )?;
        ensure!(member.get("isLearner").is_none(), "{name} is a learner: {member}");
    }
    let mut names: Vec<&str> = members.iter().filter_map(|m| m["name"].as_str()).collect();
    names.sort_unstable();
    expect_eq("member names", names, vec!["m1", "m2", "m3"])?;

    // The simple format: id in hex, status, name, peer URLs, client URLs, is learner.
    let simple = ctl.ok(&["member", "list"]).await?;
    let mut lines: Vec<String> = simple.lines().map(String::from).collect();
    lines.sort();
    let mut expected: Vec<String> = cluster
        .members
        .iter()
        .zip(member_ids)
        .map(|(m, id)| {
            format!(
                "{id:x}, started, {}, http://127.0.0.1:{}, http://127.0.0.1:{}, false",
                m.name, m.peer_port, m.client_port
            )
        })
        .collect();
    expected.sort();
    expect_eq("member list lines", lines, expected)
}

/// A request etcd refuses makes etcdctl exit non-zero with etcd's message.
async fn errors(ctl: &Etcdctl) -> anyhow::Result<()> {
    let before = int(&ctl.json(&["get", "ctl/basic/k"]).await?["header"]["revision"])?;
    for args in [&["put", "", "x"][..], &["get", ""][..], &["del", ""][..]] {
        let stderr = ctl.fails(args).await?;
        ensure!(stderr.contains("Error: etcdserver: key is not provided"), "etcdctl {args:?}: {stderr}");
    }
    let after = int(&ctl.json(&["get", "ctl/basic/k"]).await?["header"]["revision"])?;
    expect_eq("revision after the refused requests", after, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_speaks_to_a_three_member_cluster() {
    let ctl_path = find_etcdctl();
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    common::wait_members_published(&cluster, Duration::from_secs(20)).await;
    let ctl = Etcdctl { path: ctl_path, endpoints: cluster.endpoints().join(",") };
    let version = ctl.ok(&["version"]).await.expect("etcdctl version");
    eprintln!("{}", version.trim());

    let (leader_term, cluster_id, member_ids) = match endpoint_status(&ctl, &cluster).await {
        Ok(found) => found,
        Err(error) => {
            cluster.dump_logs();
            panic!("endpoint status: {error:#}");
        }
    };
    let mut failures = Vec::new();
    let mut record = |name: &str, result: anyhow::Result<()>| {
        if let Err(error) = result {
            failures.push(format!("{name}: {error:#}"));
        }
    };
    record("put and get", put_and_get(&ctl).await);
    record("prefix, limit, keys-only, count", prefix_limit_and_keys_only(&ctl).await);
    record("from-key", from_key(&ctl).await);
    record("revisions and json", revisions_and_json(&ctl, leader_term, cluster_id, &member_ids).await);
    record("del", delete(&ctl).await);
    record("put --prev-kv", put_prev_kv(&ctl).await);
    record("txn", txn(&ctl).await);
    record("endpoint health", endpoint_health(&ctl, &cluster).await);
    record("member list", member_list(&ctl, &cluster, cluster_id, &member_ids).await);
    record("URL endpoints and --cluster", url_endpoints_and_cluster_flag(&ctl, &member_ids).await);
    record("errors", errors(&ctl).await);
    record("compaction", compaction(&ctl).await);
    if !failures.is_empty() {
        cluster.dump_logs();
        panic!("{} etcdctl checks failed:\n{}", failures.len(), failures.join("\n"));
    }
}
