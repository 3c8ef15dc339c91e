//! Bad input gets the right status and changes nothing (STYLE.md, habit 6), checked
//! on real processes: every refused request is answered with etcd's gRPC code and
//! message, and afterwards the store revision, the keys the request named and the
//! raft log are exactly as before. Also `chorus serve` with bad flags or a data
//! directory of another cluster: it exits non-zero with a one-line message.
//!
//! Requests go through the `etcd-client` crate where it can build them, and through
//! the raw generated `KvClient` where it cannot (an empty `RequestOp`, an unknown
//! sort order). They are sent to a follower, so the follower's own validation is
//! what answers.

mod common;

use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _};
use chorus_proto::etcdserverpb::kv_client::KvClient;
use chorus_proto::etcdserverpb::request_op::Request as RawOp;
use chorus_proto::etcdserverpb::{RangeRequest, RequestOp, TxnRequest};
use chorus_proto::mvccpb::KeyValue;
use common::{free_port, Cluster};
use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// etcd's `--max-request-bytes` default, which chorus shares.
const REQUEST_BYTES_MAX: usize = 1_572_864;
/// The longest key chorus accepts.
const KEY_BYTES_MAX: usize = 65_536;
/// etcd's `--max-txn-ops` default.
const TXN_OPS_MAX: usize = 128;
/// Our deadline for one `chorus serve` run that must fail at once.
const SERVE_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a member looks like from outside, to compare before and after a request.
#[derive(Debug, PartialEq)]
struct Observed {
    /// The store revision, from a linearizable range's header.
    revision: i64,
    /// Every key under the case's prefix, with all its fields.
    kvs: Vec<KeyValue>,
    /// The leader's last raft log index: a request refused before proposing never
    /// reaches the log.
    raft_index: Option<u64>,
}

/// The clients of one run: `kv` and `raw` send the bad requests (to a follower);
/// `probe` (a raw client of the leader) and `leader_endpoint` observe.
struct Clients {
    kv: Client,
    raw: KvClient<Channel>,
    probe: KvClient<Channel>,
    leader_endpoint: String,
}

/// Whether a refused request may still go through the raft log: etcd, and chorus,
/// check a compaction's revision against the store only when the entry is applied.
#[derive(Clone, Copy, PartialEq)]
enum Log {
    Unchanged,
    MayGrow,
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

async fn raw_client(endpoint: &str) -> KvClient<Channel> {
    KvClient::connect(format!("http://{endpoint}")).await.expect("connect raw KvClient")
}

/// etcd-client's error as the gRPC status it carries.
fn grpc(error: etcd_client::Error) -> Status {
    match error {
        etcd_client::Error::GRpcStatus(status) => status,
        other => Status::unknown(format!("not a gRPC status: {other}")),
    }
}

impl Clients {
    async fn observe(&mut self, prefix: &str) -> anyhow::Result<Observed> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        let response = self.probe.range(request).await?.into_inner();
        let status = common::status_of(&self.leader_endpoint).await;
        Ok(Observed {
            revision: response.header.context("range header")?.revision,
            kvs: response.kvs,
            raft_index: status.map(|s| s.raft_index()),
        })
    }

    /// Sends a bad request (the future is lazy: nothing is sent before `before` is
    /// observed) and checks its status and that nothing changed.
    async fn refused<T: std::fmt::Debug>(
        &mut self,
        prefix: &str,
        log: Log,
        request: impl Future<Output = Result<T, Status>>,
        code: Code,
        message: Message<'_>,
    ) -> anyhow::Result<()> {
        let before = self.observe(prefix).await?;
        ensure!(before.raft_index.is_some(), "the leader did not answer Status");
        let result = request.await;
        let after = self.observe(prefix).await?;
        let status = match result {
            Ok(response) => anyhow::bail!("accepted, expected {code:?}: {response:?}"),
            Err(status) => status,
        };
        ensure!(status.code() == code, "got {:?} {:?}, expected {code:?}", status.code(), status.message());
        ensure!(message.matches(status.message()), "message {:?}, expected {message:?}", status.message());
        ensure!(after.revision == before.revision, "revision {} -> {}", before.revision, after.revision);
        ensure!(
            after.kvs == before.kvs,
            "keys under {prefix:?} changed: {:?} -> {:?}",
            before.kvs,
            after.kvs
        );
        if log == Log::Unchanged {
            ensure!(
                after.raft_index == before.raft_index,
                "raft log {:?} -> {:?}",
                before.raft_index,
                after.raft_index
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Message<'a> {
    Exact(&'a str),
    StartsWith(&'a str),
}

impl Message<'_> {
    fn matches(&self, message: &str) -> bool {
        match self {
            Message::Exact(expected) => message == *expected,
            Message::StartsWith(expected) => message.starts_with(expected),
        }
    }
}

const EMPTY_KEY: Message = Message::Exact("etcdserver: key is not provided");
const BAD_RANGE_END: Message =
    Message::Exact("etcdserver: range_end must be empty, \"\\0\", or greater than key");
const TOO_MANY_OPS: Message = Message::Exact("etcdserver: too many operations in txn request");
const DUPLICATE_KEY: Message = Message::Exact("etcdserver: duplicate key given in txn request");
const REQUEST_TOO_LARGE: Message = Message::Exact("etcdserver: request is too large");
const KEY_TOO_LARGE: Message = Message::StartsWith("etcdserver: key is too large");
const FUTURE_REVISION: Message = Message::Exact("etcdserver: mvcc: required revision is a future revision");
const COMPACTED: Message = Message::Exact("etcdserver: mvcc: required revision has been compacted");

async fn empty_key(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/empty/";
    c.kv.put("bad/empty/k", "v", None).await?;
    let (mut kv, mut kv2, mut kv3, mut kv4) = (c.kv.clone(), c.kv.clone(), c.kv.clone(), c.kv.clone());
    let put = async move { kv.put("", "v", None).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, put, Code::InvalidArgument, EMPTY_KEY).await.context("put")?;
    let get = async move { kv2.get("", None).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, get, Code::InvalidArgument, EMPTY_KEY).await.context("range")?;
    let delete = async move { kv3.delete("", None).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, delete, Code::InvalidArgument, EMPTY_KEY).await.context("delete")?;
    // Inside a txn, next to a valid put: the whole txn is refused.
    let txn = Txn::new().and_then([TxnOp::put("bad/empty/k", "changed", None), TxnOp::put("", "v", None)]);
    let txn = async move { kv4.txn(txn).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, txn, Code::InvalidArgument, EMPTY_KEY).await.context("txn")
}

/// A 2 MiB value is larger than the gRPC message limit (the request limit plus
/// 64 KiB), so tonic refuses it while decoding, before chorus sees it. A value just
/// over the request limit fits the message limit and reaches chorus's validation.
async fn value_too_large(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/big/";
    c.kv.put("bad/big/k", "small", None).await?;
    let mut kv = c.kv.clone();
    let huge = async move { kv.put("bad/big/k", vec![b'x'; 2 << 20], None).await.map_err(grpc) };
    // tonic's words, in full: "Error, decoded message length too large: found
    // 2097168 bytes, the limit is: 1638400 bytes" (1 + 1 + 9 bytes of key, 1 + 4 of
    // value header, 2 MiB of value). etcd answers ResourceExhausted here.
    let frame = Message::StartsWith("Error, decoded message length too large");
    c.refused(p, Log::Unchanged, huge, Code::OutOfRange, frame).await.context("2 MiB value")?;

    // An encoded PutRequest for key "bad/big/k" (9 bytes) and a value of V bytes
    // (V > 16383) is 1 + 1 + 9 + 1 + 3 + V bytes.
    let largest_value = REQUEST_BYTES_MAX - 15;
    let mut kv = c.kv.clone();
    let over = async move { kv.put("bad/big/k", vec![b'y'; largest_value + 1], None).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, over, Code::InvalidArgument, REQUEST_TOO_LARGE)
        .await
        .context("limit + 1")?;
    let mut kv = c.kv.clone();
    let txn = Txn::new().and_then([TxnOp::put("bad/big/k", vec![b'z'; REQUEST_BYTES_MAX], None)]);
    let txn = async move { kv.txn(txn).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, txn, Code::InvalidArgument, REQUEST_TOO_LARGE).await.context("txn")?;

    // The largest request is accepted, replicated and readable.
    c.kv.put("bad/big/k", vec![b'y'; largest_value], None).await.context("a request of exactly the limit")?;
    let stored = c.kv.get("bad/big/k", None).await?;
    ensure!(
        stored.kvs().len() == 1 && stored.kvs()[0].value().len() == largest_value,
        "largest value not stored"
    );
    c.kv.delete("bad/big/k", None).await?;
    Ok(())
}

async fn key_too_large(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/longkey/";
    let longest = format!("{p}{}", "k".repeat(KEY_BYTES_MAX - p.len()));
    c.kv.put(longest.as_str(), "v", None).await.context("a key of exactly 64 KiB")?;
    let too_long = format!("{longest}k");
    let (mut kv, mut kv2, key, key2) = (c.kv.clone(), c.kv.clone(), too_long.clone(), too_long.clone());
    let put = async move { kv.put(key, "v", None).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, put, Code::InvalidArgument, KEY_TOO_LARGE).await.context("put")?;
    let get = async move { kv2.get(key2, None).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, get, Code::InvalidArgument, KEY_TOO_LARGE).await.context("range")?;
    let mut kv = c.kv.clone();
    let options = DeleteOptions::new().with_range(format!("{too_long}k"));
    let delete = async move { kv.delete(p, Some(options)).await.map_err(grpc) };
    c.refused(p, Log::Unchanged, delete, Code::InvalidArgument, KEY_TOO_LARGE).await.context("range_end")?;
    c.kv.delete(longest.as_str(), None).await?;
    Ok(())
}

fn puts(prefix: &str, count: usize) -> Vec<TxnOp> {
    (0..count).map(|i| TxnOp::put(format!("{prefix}{i:03}"), "v", None)).collect()
}

async fn too_many_txn_ops(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/ops/";
    let accepted = c.kv.txn(Txn::new().and_then(puts(p, TXN_OPS_MAX))).await.context("128 operations")?;
    ensure!(accepted.succeeded() && accepted.op_responses().len() == TXN_OPS_MAX, "128 ops: {accepted:?}");
    let branches: [(&str, Txn); 3] = [
        ("success", Txn::new().and_then(puts(p, TXN_OPS_MAX + 1))),
        ("failure", Txn::new().or_else(puts(p, TXN_OPS_MAX + 1))),
        (
            "compares",
            Txn::new().when(
                (0..=TXN_OPS_MAX)
                    .map(|i| Compare::version(format!("{p}{i:03}"), CompareOp::Equal, 1))
                    .collect::<Vec<_>>(),
            ),
        ),
    ];
    for (branch, txn) in branches {
        let mut kv = c.kv.clone();
        let txn = async move { kv.txn(txn).await.map_err(grpc) };
        c.refused(p, Log::Unchanged, txn, Code::InvalidArgument, TOO_MANY_OPS).await.context(branch)?;
    }
    Ok(())
}

async fn duplicate_key_in_txn(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/dup/";
    c.kv.put("bad/dup/k", "v", None).await?;
    let twice = Txn::new().and_then([TxnOp::put("bad/dup/k", "a", None), TxnOp::put("bad/dup/k", "b", None)]);
    let deleted = Txn::new().or_else([
        TxnOp::delete("bad/dup/", Some(DeleteOptions::new().with_prefix())),
        TxnOp::put("bad/dup/k", "b", None),
    ]);
    let nested = Txn::new().and_then([
        TxnOp::put("bad/dup/k", "a", None),
        TxnOp::txn(Txn::new().and_then([TxnOp::put("bad/dup/k", "b", None)])),
    ]);
    for (name, txn) in [("put twice", twice), ("put in a deleted range", deleted), ("nested", nested)] {
        let mut kv = c.kv.clone();
        let txn = async move { kv.txn(txn).await.map_err(grpc) };
        c.refused(p, Log::Unchanged, txn, Code::InvalidArgument, DUPLICATE_KEY).await.context(name)?;
    }
    // Control: the same key in the two branches is fine, only one of them runs.
    let branches = Txn::new()
        .when([Compare::value("bad/dup/k", CompareOp::Equal, "v")])
        .and_then([TxnOp::put("bad/dup/k", "then", None)])
        .or_else([TxnOp::put("bad/dup/k", "else", None)]);
    ensure!(c.kv.txn(branches).await?.succeeded(), "txn with one put per branch");
    let value = c.kv.get("bad/dup/k", None).await?;
    let value = value.kvs().first().map(|kv| kv.value());
    ensure!(value == Some(&b"then"[..]), "the success branch ran: {value:?}");
    Ok(())
}

async fn range_end_below_key(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/end/";
    for key in ["bad/end/a", "bad/end/b"] {
        c.kv.put(key, "v", None).await?;
    }
    let mut kv = c.kv.clone();
    let get = async move {
        kv.get("bad/end/b", Some(GetOptions::new().with_range("bad/end/a"))).await.map_err(grpc)
    };
    c.refused(p, Log::Unchanged, get, Code::InvalidArgument, BAD_RANGE_END).await.context("range")?;
    let mut kv = c.kv.clone();
    let delete = async move {
        kv.delete("bad/end/b", Some(DeleteOptions::new().with_range("bad/end/a"))).await.map_err(grpc)
    };
    c.refused(p, Log::Unchanged, delete, Code::InvalidArgument, BAD_RANGE_END).await.context("delete")?;
    // range_end equal to key is an empty range, not an error.
    let empty = c.kv.get("bad/end/a", Some(GetOptions::new().with_range("bad/end/a"))).await?;
    ensure!(empty.kvs().is_empty() && empty.count() == 0, "range [a, a) is empty: {empty:?}");
    Ok(())
}

async fn future_revision(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/future/";
    c.kv.put("bad/future/k", "v", None).await?;
    let current = c.observe(p).await?.revision;
    let now = c.kv.get("bad/future/k", Some(GetOptions::new().with_revision(current))).await?;
    ensure!(now.kvs().len() == 1, "range at the current revision");
    for revision in [current + 1, current + 1_000_000] {
        let mut kv = c.kv.clone();
        let get = async move {
            kv.get("bad/future/k", Some(GetOptions::new().with_revision(revision))).await.map_err(grpc)
        };
        c.refused(p, Log::Unchanged, get, Code::OutOfRange, FUTURE_REVISION)
            .await
            .with_context(|| format!("revision {revision}"))?;
    }
    Ok(())
}

/// Requests only the raw client can build.
async fn malformed_raw_requests(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/raw/";
    c.kv.put("bad/raw/k", "v", None).await?;
    let mut raw = c.raw.clone();
    let empty_op = TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() };
    let txn = async move { raw.txn(empty_op).await };
    c.refused(p, Log::Unchanged, txn, Code::InvalidArgument, Message::Exact("etcdserver: key not found"))
        .await
        .context("empty RequestOp")?;
    let mut raw = c.raw.clone();
    let nested_empty_key = TxnRequest {
        success: vec![RequestOp {
            request: Some(RawOp::RequestTxn(TxnRequest {
                failure: vec![RequestOp { request: Some(RawOp::RequestRange(RangeRequest::default())) }],
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    let txn = async move { raw.txn(nested_empty_key).await };
    c.refused(p, Log::Unchanged, txn, Code::InvalidArgument, EMPTY_KEY)
        .await
        .context("empty key in a nested txn")?;
    let mut raw = c.raw.clone();
    let bad_sort = RangeRequest { key: b"bad/raw/k".to_vec(), sort_order: 7, ..Default::default() };
    let range = async move { raw.range(bad_sort).await };
    c.refused(
        p,
        Log::Unchanged,
        range,
        Code::InvalidArgument,
        Message::Exact("etcdserver: invalid sort option"),
    )
    .await
    .context("sort order 7")
}

/// Compaction is checked against the store when applied, so a refused compaction
/// may still take a log entry; it must not move the revision or change any key.
async fn compaction(c: &mut Clients) -> anyhow::Result<()> {
    let p = "bad/compact/";
    let first = c.kv.put("bad/compact/k", "v1", None).await?.header().context("header")?.revision();
    let second = c.kv.put("bad/compact/k", "v2", None).await?.header().context("header")?.revision();
    c.kv.compact(second, None).await.context("compact")?;
    let mut kv = c.kv.clone();
    let get = async move {
        kv.get("bad/compact/k", Some(GetOptions::new().with_revision(first))).await.map_err(grpc)
    };
    c.refused(p, Log::Unchanged, get, Code::OutOfRange, COMPACTED)
        .await
        .context("range below the compaction")?;
    let kept = c.kv.get("bad/compact/k", Some(GetOptions::new().with_revision(second))).await?;
    let kept = kept.kvs().first().map(|kv| kv.value());
    ensure!(kept == Some(&b"v2"[..]), "at the compaction revision: {kept:?}");
    for (name, revision) in [("again", second), ("below", first)] {
        let mut kv = c.kv.clone();
        let compact = async move { kv.compact(revision, None).await.map_err(grpc) };
        c.refused(p, Log::MayGrow, compact, Code::OutOfRange, COMPACTED).await.context(name)?;
    }
    let current = c.observe(p).await?.revision;
    for revision in [current + 1, current + 1_000_000] {
        let mut kv = c.kv.clone();
        let compact = async move { kv.compact(revision, None).await.map_err(grpc) };
        c.refused(p, Log::MayGrow, compact, Code::OutOfRange, FUTURE_REVISION)
            .await
            .with_context(|| format!("future {revision}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_etcds_status_and_change_nothing() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    common::wait_members_published(&cluster, Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let mut clients = Clients {
        kv: cluster.client_of(follower).await,
        raw: raw_client(&cluster.endpoint(follower)).await,
        probe: raw_client(&cluster.endpoint(leader)).await,
        leader_endpoint: cluster.endpoint(leader),
    };
    let mut failures = Vec::new();
    macro_rules! case {
        ($name:ident) => {
            if let Err(error) = $name(&mut clients).await {
                failures.push(format!("{}: {error:#}", stringify!($name)));
            }
        };
    }
    case!(empty_key);
    case!(value_too_large);
    case!(key_too_large);
    case!(too_many_txn_ops);
    case!(duplicate_key_in_txn);
    case!(range_end_below_key);
    case!(future_revision);
    case!(malformed_raw_requests);
    case!(compaction); // last: it compacts the whole store
    if !failures.is_empty() {
        cluster.dump_logs();
        panic!("{} bad-input cases failed:\n{}", failures.len(), failures.join("\n"));
    }
}

/// What one `chorus serve` process did.
#[derive(Debug)]
struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `chorus serve` for a one-member cluster named `m1` in a temporary directory.
/// [`Serve::command`] takes flags that replace the defaults of the same name, or are
/// added after them.
struct Serve {
    data_dir: std::path::PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Serve {
    fn new(dir: &Path) -> Serve {
        Serve { data_dir: dir.join("m1"), client_port: free_port(), peer_port: free_port() }
    }

    fn command(&self, flags: &[(&str, String)]) -> tokio::process::Command {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let defaults = [
            ("--name", "m1".to_string()),
            ("--data-dir", self.data_dir.display().to_string()),
            ("--listen-client-urls", client_url.clone()),
            ("--advertise-client-urls", client_url),
            ("--listen-peer-urls", peer_url.clone()),
            ("--initial-advertise-peer-urls", peer_url.clone()),
            ("--initial-cluster", format!("m1={peer_url}")),
            ("--initial-cluster-token", "token-a".to_string()),
        ];
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"));
        command.arg("serve");
        for (flag, default) in defaults {
            let value = flags.iter().find(|(f, _)| *f == flag).map_or(default, |(_, v)| v.clone());
            command.arg(format!("{flag}={value}"));
        }
        for (flag, value) in flags.iter().filter(|(f, _)| !defaults_have(f)) {
            command.arg(format!("{flag}={value}"));
        }
        command.env_remove("CHORUS_LOG").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.kill_on_drop(true);
        command
    }

    /// Runs `chorus serve`, which must exit by itself within the timeout.
    async fn run_to_exit(&self, flags: &[(&str, String)]) -> anyhow::Result<Exit> {
        let child = self.command(flags).spawn()?;
        let output = tokio::time::timeout(SERVE_EXIT_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("chorus serve {flags:?} still running after {SERVE_EXIT_TIMEOUT:?}"))??;
        Ok(Exit {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

fn defaults_have(flag: &str) -> bool {
    matches!(
        flag,
        "--name"
            | "--data-dir"
            | "--listen-client-urls"
            | "--advertise-client-urls"
            | "--listen-peer-urls"
            | "--initial-advertise-peer-urls"
            | "--initial-cluster"
            | "--initial-cluster-token"
    )
}

/// A refused configuration: exit code 1, one line on stderr naming the problem,
/// nothing on stdout, and no data directory created.
fn check_config_refused(serve: &Serve, exit: &Exit, expected: &str) -> anyhow::Result<()> {
    ensure!(exit.code == Some(1), "exit code {:?}, expected 1: {exit:?}", exit.code);
    ensure!(exit.stdout.is_empty(), "stdout: {:?}", exit.stdout);
    let lines: Vec<&str> = exit.stderr.lines().collect();
    ensure!(lines.len() == 1, "stderr has {} lines, expected one: {:?}", lines.len(), exit.stderr);
    ensure!(
        lines[0].starts_with("chorus: ") && lines[0].contains(expected),
        "stderr {:?}, expected {expected:?}",
        lines[0]
    );
    ensure!(!serve.data_dir.exists(), "a refused configuration created {}", serve.data_dir.display());
    Ok(())
}

/// A bad configuration: its name, the flags that differ from a good one, and what
/// the error line must contain.
type ConfigCase = (&'static str, Vec<(&'static str, String)>, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_bad_flags_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::new(dir.path());
    let other_peer = format!("http://127.0.0.1:{}", free_port());
    let cases: Vec<ConfigCase> = vec![
        (
            "name not in --initial-cluster",
            vec![("--name", "m9".into())],
            "invalid configuration: --initial-cluster has no member named \"m9\" (--name)",
        ),
        (
            "--initial-cluster-state existing",
            vec![("--initial-cluster-state", "existing".into())],
            "--initial-cluster-state existing: --initial-cluster names no other member to join through",
        ),
        (
            "unknown --initial-cluster-state",
            vec![("--initial-cluster-state", "old".into())],
            "--initial-cluster-state must be new or existing, not \"old\"",
        ),
        (
            "client URL without a scheme",
            vec![("--listen-client-urls", "127.0.0.1:2379".into())],
            "127.0.0.1:2379: a URL must start with http://",
        ),
        (
            "peer URL without a port",
            vec![("--listen-peer-urls", "http://127.0.0.1".into())],
            "http://127.0.0.1: expected http://host:port",
        ),
        (
            "port out of range",
            vec![("--listen-client-urls", "http://127.0.0.1:99999".into())],
            "http://127.0.0.1:99999: expected http://host:port",
        ),
        (
            "--initial-cluster entry without a URL",
            vec![("--initial-cluster", "m1".into())],
            "--initial-cluster entry \"m1\" is not name=url",
        ),
        (
            "https (no TLS yet)",
            vec![("--listen-client-urls", "https://127.0.0.1:2379".into())],
            "TLS is not supported yet",
        ),
        (
            "--max-request-bytes above what one raft frame carries",
            vec![("--max-request-bytes", "33554433".into())],
            "--max-request-bytes must be between 1 and 33554432 (32 MiB)",
        ),
        (
            "--max-request-bytes 0",
            vec![("--max-request-bytes", "0".into())],
            "--max-request-bytes must be between 1 and 33554432 (32 MiB)",
        ),
        (
            "advertised peer URL not in --initial-cluster",
            vec![("--initial-advertise-peer-urls", other_peer)],
            "--initial-advertise-peer-urls",
        ),
    ];
    let mut failures = Vec::new();
    for (name, flags, expected) in cases {
        let result = match serve.run_to_exit(&flags).await {
            Ok(exit) => check_config_refused(&serve, &exit, expected),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            failures.push(format!("{name}: {error:#}"));
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// Starts a one-member cluster, waits until it serves, runs `check`, then stops it
/// with SIGTERM, which must end it cleanly.
async fn with_running_member<F, Fut>(serve: &Serve, token: &str, check: F) -> anyhow::Result<()>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut child =
        serve.command(&[("--initial-cluster-token", token.to_string())]).stderr(Stdio::null()).spawn()?;
    let endpoint = format!("127.0.0.1:{}", serve.client_port);
    let start = Instant::now();
    loop {
        if let Some(status) = common::status_of(&endpoint).await {
            if status.leader() != 0 {
                break;
            }
        }
        ensure!(child.try_wait()?.is_none(), "chorus serve exited while starting");
        ensure!(start.elapsed() < Duration::from_secs(20), "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = check(common::connect(&[endpoint]).await).await;
    let pid = child.id().context("pid")?;
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    ensure!(killed.success(), "kill -TERM {pid}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .map_err(|_| anyhow!("chorus serve did not stop within 20 s of SIGTERM"))??;
    result?;
    ensure!(status.success(), "chorus serve exited with {status} after SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_data_dir_of_another_cluster_and_leaves_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::new(dir.path());
    with_running_member(&serve, "token-a", |mut client| async move {
        client.put("kept", "across restarts", None).await?;
        Ok(())
    })
    .await
    .expect("first run with token A");

    let exit =
        serve.run_to_exit(&[("--initial-cluster-token", "token-b".into())]).await.expect("run with token B");
    assert_eq!(exit.code, Some(1), "a data dir of another cluster: {exit:?}");
    let last = exit.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("chorus: data directory ") && last.contains("belongs to cluster"),
        "stderr: {}",
        exit.stderr
    );
    let error_lines = exit.stderr.lines().filter(|l| l.starts_with("chorus: ")).count();
    assert_eq!(error_lines, 1, "one error line: {}", exit.stderr);

    with_running_member(&serve, "token-a", |mut client| async move {
        let response = client.get("kept", None).await?;
        ensure!(response.kvs().len() == 1, "the key written before is gone");
        ensure!(response.kvs()[0].value() == b"across restarts", "value changed");
        Ok(())
    })
    .await
    .expect("run with token A again");
}
