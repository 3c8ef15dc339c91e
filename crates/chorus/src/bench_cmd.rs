//! `chorus bench`: a load generator that speaks only etcd's public v3 gRPC API (the generated
//! `KvClient`, no chorus-only calls), so that the same run can be pointed at chorus or at etcd
//! and the numbers compared.
//!
//! Flow: check the options (bad usage exits 2 before anything is dialed); dial `--conns` gRPC
//! connections, spread round-robin over the endpoints; for workloads that read, put every key
//! they will read; then run `--clients` workers, each with one request in flight, until
//! `--total` operations have been issued or `--duration-max` has passed, whichever comes first.
//! Each worker records latencies into its own HDR histogram; they are merged at the end and
//! printed as one table row, or as one JSON object with `-w json`.
//!
//! What is measured: the time from sending an operation's request to receiving its response,
//! for operations that succeeded (a txn-cas operation is its read plus its txn; a txn whose
//! compare lost a race is a success: the server answered correctly). With `--rate`, operations
//! are scheduled at even intervals and latency is measured from when the request was sent,
//! not from when it was scheduled, as etcd's `benchmark` tool does: a server that falls behind
//! the rate shows up as lower ops/s rather than as higher latency.
//!
//! Every loop is bounded: by `--total` and by `--duration-max`. An operation still in flight
//! when the time cap passes is abandoned and counted neither as an op nor as an error.
//!
//! Cost: by default every client runs on one thread (`--threads 1`, a current-thread tokio
//! runtime) and requests go straight onto each HTTP/2 connection (`Conn`). On a machine the
//! generator shares with the servers it measures, whatever it spends is taken from them: a
//! multi-threaded runtime and tonic's `Channel` queue cost it about twice the CPU per request
//! (`scripts/cpu-split.sh` prints the generator's share).
//!
//! Exit codes: 0 when at least one operation succeeded (errors are counted, not fatal), 1 when
//! none did or the cluster could not be reached, 2 for bad usage.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chorus_proto::etcdserverpb::kv_client::KvClient;
use chorus_proto::etcdserverpb::{
    compare, request_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::client_cmd::{GlobalOpts, WriteOut};

/// Most concurrent workers: each is a tokio task with one request in flight, and beyond this a
/// 2-core load generator measures itself more than the server.
const CLIENTS_MAX: u32 = 10_000;
/// Most gRPC connections. HTTP/2 multiplexes, so a handful is enough to spread load.
const CONNS_MAX: u32 = 1_000;
/// Most load generator threads (`--threads`).
const THREADS_MAX: u32 = 1_024;
/// Most operations in one run (also bounds the key space, which is put before reads).
const TOTAL_OPS_MAX: u64 = 1_000_000_000;
/// Largest key. etcd accepts larger, but a benchmark key this big is almost surely a typo.
const KEY_SIZE_BYTES_MAX: u32 = 64 * 1024;
/// Largest value: under etcd's default request limit of 1.5 MiB, so a put is never refused
/// for its size alone.
const VALUE_SIZE_BYTES_MAX: u32 = 1024 * 1024;
/// Longest `--duration-max`.
const DURATION_MAX_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Every key starts with this unless `--key-prefix` says otherwise, so a person can find the
/// benchmark's keys and delete them (`chorus del --prefix bench/`).
const KEY_PREFIX: &str = "bench/";
/// Workers that put the keys that reads will read, when `--clients` is smaller: filling the
/// key space one put at a time would take longer than the measurement.
const POPULATE_WORKERS_MIN: u32 = 32;
/// Highest latency the histogram tells apart (one hour); slower ones are recorded as this.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits the histogram keeps: 0.1% error, as most HDR users choose.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// How often the progress line is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// `bench WORKLOAD [options]`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What each operation does
    #[arg(value_enum)]
    workload: Workload,
    /// Concurrent requests in flight (one per client)
    #[arg(long, default_value_t = 1)]
    clients: u32,
    /// gRPC connections, spread over the endpoints round-robin
    #[arg(long, default_value_t = 1)]
    conns: u32,
    /// Operations to run
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Stop after this long even if --total is not reached (e.g. 60s, 500ms, 5m)
    #[arg(long, default_value = "60s", value_parser = parse_duration_max)]
    duration_max: Duration,
    /// Size of every key in bytes
    #[arg(long, default_value_t = 32)]
    key_size: u32,
    /// Size of every value in bytes
    #[arg(long, default_value_t = 256)]
    val_size: u32,
    /// Distinct keys used (reads pre-populate all of them)
    #[arg(long, default_value_t = 1_000)]
    key_space: u64,
    /// Every key starts with this (counted in --key-size); a new prefix gives a run a fresh key
    /// space on a cluster that earlier runs wrote to
    #[arg(long, default_value = KEY_PREFIX)]
    key_prefix: String,
    /// Use keys in order (operation number modulo --key-space) instead of at random
    #[arg(long)]
    sequential_keys: bool,
    /// Target operations per second over all clients; 0 for as fast as possible
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Reads are linearizable (l) or serializable (s)
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    consistency: Consistency,
    /// Share of operations that are reads in the mixed workload (0 to 1)
    #[arg(long, default_value_t = 0.9)]
    read_ratio: f64,
    /// Threads the load generator runs on. One (the default) runs every client on a single
    /// thread, which costs the least CPU per request and so takes the least from a server on
    /// the same machine; more for a generator on a machine of its own
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=THREADS_MAX as i64))]
    pub threads: u32,
}

/// What one operation does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Put one key
    Put,
    /// Get one pre-populated key
    Get,
    /// Read a key's mod revision, then a txn that puts it if the mod revision is unchanged
    TxnCas,
    /// Gets and puts, in the proportion --read-ratio
    Mixed,
    /// One writer puts one key --total times; --clients watchers watch it; latency is from
    /// put sent and from put acknowledged to event received, at every watcher
    Watch,
    /// Each client grants a lease, then sends keep-alives on its own stream, one at a time
    LeaseKeepalive,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::TxnCas => "txn-cas",
            Workload::Mixed => "mixed",
            Workload::Watch => "watch",
            Workload::LeaseKeepalive => "lease-keepalive",
        }
    }

    /// Whether the workload reads keys that must exist, and so must put them first.
    fn reads_existing_keys(self) -> bool {
        matches!(self, Workload::Get | Workload::Mixed)
    }
}

/// Read consistency, named as etcdctl's `--consistency` names it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Consistency {
    /// Linearizable: the read goes through the leader's read index
    #[value(name = "l")]
    Linearizable,
    /// Serializable: the member answers from its own state, possibly stale
    #[value(name = "s")]
    Serializable,
}

/// Why the command failed, which decides the exit code.
#[derive(Debug, PartialEq)]
enum BenchError {
    /// Bad options or endpoints: exit 2.
    Usage(String),
    /// The cluster could not be reached, or no operation succeeded: exit 1.
    Failed(String),
}

/// Runs `chorus bench` and returns the process exit code. Errors are printed to standard error
/// as `Error: <message>`, as the client commands print them.
pub async fn run(global: &GlobalOpts, args: BenchArgs) -> i32 {
    match execute(global, args).await {
        Ok(()) => 0,
        Err(BenchError::Usage(message)) => {
            eprintln!("Error: {message}");
            2
        }
        Err(BenchError::Failed(message)) => {
            eprintln!("Error: {message}");
            1
        }
    }
}

async fn execute(global: &GlobalOpts, args: BenchArgs) -> Result<(), BenchError> {
    if args.workload == Workload::Watch {
        return execute_watch(global, &args).await;
    }
    if args.workload == Workload::LeaseKeepalive {
        return execute_keepalive(global, &args).await;
    }
    let plan = plan_from_args(&args).map_err(BenchError::Usage)?;
    let uris = parse_endpoints(&global.endpoints).map_err(BenchError::Usage)?;
    let channels = connect_channels(&uris, args.conns, global).await.map_err(BenchError::Failed)?;
    let show_progress = std::io::stderr().is_terminal();
    if args.workload.reads_existing_keys() {
        populate_keys(&plan, &args, &channels, show_progress).await?;
    }
    let measured = plan.with_clock(args.duration_max);
    let label = show_progress.then_some(args.workload.name());
    let outcome = run_phase(measured, &channels, args.clients, label).await;
    print_report(&Report::new(args.workload, args.clients, &outcome), global.write_out)?;
    match (outcome.ops, outcome.first_error) {
        (0, Some(error)) => Err(BenchError::Failed(format!("every operation failed; first error: {error}"))),
        (0, None) => Err(BenchError::Failed("no operation completed within --duration-max".to_string())),
        _ => Ok(()),
    }
}

/// Puts every key that a reading workload will read, with at least `POPULATE_WORKERS_MIN`
/// workers, and fails unless every put succeeded.
async fn populate_keys(
    measured: &Plan,
    args: &BenchArgs,
    channels: &[(Conn, Uri)],
    show_progress: bool,
) -> Result<(), BenchError> {
    let populate = populate_plan(measured, args.duration_max);
    let workers = args.clients.max(POPULATE_WORKERS_MIN);
    let label = show_progress.then_some("populate");
    check_populated(&run_phase(populate, channels, workers, label).await)
}

/// What every worker of one phase follows. Built once, shared read-only.
#[derive(Clone, Debug)]
struct Plan {
    workload: Workload,
    total_ops: u64,
    /// 0 for unlimited.
    rate_ops_per_s: u64,
    keys: KeyGenerator,
    value: Vec<u8>,
    serializable: bool,
    read_ratio: f64,
    /// When the phase started: the origin of the `--rate` schedule.
    start: Instant,
    /// When the phase stops issuing operations and abandons those in flight.
    deadline: Instant,
}

impl Plan {
    /// The same plan with its clock started now. Called right before a phase runs, so that
    /// dialing and pre-populating do not eat into the measurement's time cap.
    fn with_clock(&self, duration_max: Duration) -> Plan {
        let start = Instant::now();
        Plan { start, deadline: start + duration_max, ..self.clone() }
    }

    /// The operation numbered `op_index`. Random choices come from the worker's own `rng`.
    fn operation(&self, op_index: u64, rng: &mut StdRng) -> Operation {
        let key = self.keys.key(self.keys.key_number(op_index, rng));
        match self.workload {
            Workload::Put => Operation::Put(key),
            Workload::Get => Operation::Get(key),
            Workload::TxnCas => Operation::TxnCas(key),
            Workload::Mixed if rng.random::<f64>() < self.read_ratio => Operation::Get(key),
            Workload::Mixed => Operation::Put(key),
            // The watch workload has its own loop (`execute_watch`) and no plan.
            Workload::Watch | Workload::LeaseKeepalive => {
                unreachable!("this workload has its own loop and runs no plan")
            }
        }
    }
}

/// Checks the options and turns them into the measurement's plan (its clock not yet started).
fn plan_from_args(args: &BenchArgs) -> Result<Plan, String> {
    check_range("--clients", u64::from(args.clients), 1, u64::from(CLIENTS_MAX))?;
    check_range("--conns", u64::from(args.conns), 1, u64::from(CONNS_MAX))?;
    check_range("--total", args.total, 1, TOTAL_OPS_MAX)?;
    check_range("--key-space", args.key_space, 1, TOTAL_OPS_MAX)?;
    check_range("--val-size", u64::from(args.val_size), 0, u64::from(VALUE_SIZE_BYTES_MAX))?;
    check_range("--rate", args.rate, 0, TOTAL_OPS_MAX)?;
    if !(0.0..=1.0).contains(&args.read_ratio) {
        return Err(format!("--read-ratio must be between 0 and 1, not {}", args.read_ratio));
    }
    let keys = KeyGenerator::new(&args.key_prefix, args.key_size, args.key_space, args.sequential_keys)?;
    let now = Instant::now();
    Ok(Plan {
        workload: args.workload,
        total_ops: args.total,
        rate_ops_per_s: args.rate,
        keys,
        value: vec![b'v'; args.val_size as usize],
        serializable: args.consistency == Consistency::Serializable,
        read_ratio: args.read_ratio,
        start: now,
        deadline: now,
    })
}

fn check_range(flag: &str, value: u64, min: u64, max: u64) -> Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!("{flag} must be between {min} and {max}, not {value}"))
    }
}

/// The plan that puts every key of the key space once, in order, before a workload reads them:
/// a get of a missing key is cheaper than a real one and would flatter the numbers.
fn populate_plan(measured: &Plan, duration_max: Duration) -> Plan {
    let keys = KeyGenerator { sequential: true, ..measured.keys.clone() };
    let populate = Plan {
        workload: Workload::Put,
        total_ops: keys.key_space,
        rate_ops_per_s: 0,
        keys,
        ..measured.clone()
    };
    populate.with_clock(duration_max)
}

fn check_populated(outcome: &PhaseOutcome) -> Result<(), BenchError> {
    match &outcome.first_error {
        Some(error) => Err(BenchError::Failed(format!(
            "pre-populating the key space: {} of {} puts failed; first error: {error}",
            outcome.errors,
            outcome.ops + outcome.errors
        ))),
        None if outcome.ops < outcome.total_ops => Err(BenchError::Failed(format!(
            "pre-populating the key space: only {} of {} keys put within --duration-max",
            outcome.ops, outcome.total_ops
        ))),
        None => Ok(()),
    }
}

/// Turns operation numbers into keys: `bench/`, then the key's number in decimal, zero-padded
/// to exactly `--key-size` bytes. Readable, so a person can find the keys; all one size, so
/// every request of a workload costs the same to send.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KeyGenerator {
    /// What every key starts with.
    prefix: String,
    key_size_bytes: usize,
    /// Distinct keys: key numbers run from 0 to `key_space - 1`.
    key_space: u64,
    /// In order (operation number modulo the key space) rather than uniformly at random.
    sequential: bool,
}

impl KeyGenerator {
    /// Refuses a key size too small to hold the prefix and the largest key number, since
    /// truncating would make distinct key numbers collide.
    fn new(prefix: &str, key_size_bytes: u32, key_space: u64, sequential: bool) -> Result<Self, String> {
        let digits = (key_space.max(1) - 1).to_string().len();
        let needed = prefix.len() + digits;
        if (key_size_bytes as usize) < needed || key_size_bytes > KEY_SIZE_BYTES_MAX {
            return Err(format!(
                "--key-size must be between {needed} (\"{prefix}\" and {digits} digits for \
                 --key-space {key_space}) and {KEY_SIZE_BYTES_MAX}, not {key_size_bytes}"
            ));
        }
        let prefix = prefix.to_string();
        Ok(KeyGenerator { prefix, key_size_bytes: key_size_bytes as usize, key_space, sequential })
    }

    fn key_number(&self, op_index: u64, rng: &mut StdRng) -> u64 {
        if self.sequential {
            op_index % self.key_space
        } else {
            rng.random_range(0..self.key_space)
        }
    }

    fn key(&self, key_number: u64) -> Vec<u8> {
        let width = self.key_size_bytes - self.prefix.len();
        format!("{}{key_number:0width$}", self.prefix).into_bytes()
    }
}

/// One operation, with its key.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Operation {
    Put(Vec<u8>),
    Get(Vec<u8>),
    TxnCas(Vec<u8>),
}

/// Parses `host:port` or `http://host:port` into the URI to dial, as the client commands
/// accept endpoints. (chorus-client's parser is private to that crate.) Plain-text only: the
/// benchmark has no TLS, and dialing `https://` without it would fail later, less clearly.
fn parse_endpoint(text: &str) -> Result<Uri, String> {
    let trimmed = text.trim();
    let host_port = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some((scheme, _)) => return Err(format!("endpoint {text:?}: unsupported scheme {scheme:?}")),
    };
    let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
    let uri: Uri =
        format!("http://{host_port}").parse().map_err(|error| format!("endpoint {text:?}: {error}"))?;
    match uri.authority() {
        Some(authority) if !authority.host().is_empty() && authority.port_u16().is_some() => Ok(uri),
        _ => Err(format!("endpoint {text:?}: expected host:port")),
    }
}

fn parse_endpoints(texts: &[String]) -> Result<Vec<Uri>, String> {
    if texts.is_empty() {
        return Err("no endpoints given".to_string());
    }
    texts.iter().map(|text| parse_endpoint(text)).collect()
}

/// One HTTP/2 connection of the load generator, for tonic's typed clients. A tonic `Channel`
/// hands every request to a task that owns the connection through a queue; the generator
/// sends on the connection itself, which halves its scheduling work per request and so
/// takes less CPU from the servers it measures on a shared machine. Each request is
/// bounded by `--command-timeout`.
#[derive(Clone)]
struct Conn {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    timeout: Duration,
}

type ConnError = Box<dyn std::error::Error + Send + Sync>;

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Conn {
    type Response = tonic::codegen::http::Response<hyper::body::Incoming>;
    type Error = ConnError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, ConnError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), ConnError>> {
        self.send.poll_ready(cx).map_err(ConnError::from)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.send.send_request(request);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(result) => result.map_err(ConnError::from),
                Err(_) => Err(format!("no answer within --command-timeout {timeout:?}").into()),
            }
        })
    }
}

/// A typed client on `conn`, whose requests name `origin` as their authority.
fn kv_client(conn: &(Conn, Uri)) -> KvClient<Conn> {
    KvClient::with_origin(conn.0.clone(), conn.1.clone())
}

/// Dials `conns` connections, connection `i` to endpoint `i` modulo the endpoint count. Dialed
/// up front, all within `--dial-timeout`, so an unreachable endpoint is a clear error instead
/// of a run where every operation failed.
async fn connect_channels(uris: &[Uri], conns: u32, global: &GlobalOpts) -> Result<Vec<(Conn, Uri)>, String> {
    let dials = (0..conns as usize).map(|index| {
        let uri = uris[index % uris.len()].clone();
        let timeout = global.command_timeout;
        async move {
            let failed = |error: &dyn std::fmt::Display| format!("cannot connect to {uri}: {error}");
            let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
            let stream = tokio::net::TcpStream::connect(&authority).await.map_err(|e| failed(&e))?;
            stream.set_nodelay(true).map_err(|e| failed(&e))?;
            let (send, connection) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| failed(&error_chain(&e)))?;
            tokio::spawn(connection);
            Ok((Conn { send, timeout }, uri))
        }
    });
    match tokio::time::timeout(global.dial_timeout, futures::future::try_join_all(dials)).await {
        Ok(result) => result,
        Err(_) => Err(format!("cannot connect within --dial-timeout {:?}", global.dial_timeout)),
    }
}

/// What the workers of one phase share: the counter that hands out operation numbers (so the
/// total is exact however many workers run), live counts for the progress line, and the first
/// error, kept for the report.
#[derive(Default)]
struct Shared {
    next_op_index: AtomicU64,
    ops_done: AtomicU64,
    errors: AtomicU64,
    first_error: OnceLock<String>,
}

/// The result of one phase.
struct PhaseOutcome {
    total_ops: u64,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latencies_us: Histogram<u64>,
}

/// Runs one phase: `workers` workers, worker `i` on connection `i` modulo the connection count,
/// until the plan's total or deadline. Returns when every worker has stopped. With a
/// `progress_label`, a progress line so labelled is drawn on standard error meanwhile.
async fn run_phase(
    plan: Plan,
    channels: &[(Conn, Uri)],
    workers: u32,
    progress_label: Option<&'static str>,
) -> PhaseOutcome {
    let plan = Arc::new(plan);
    let shared = Arc::new(Shared::default());
    let progress =
        progress_label.map(|label| tokio::spawn(draw_progress(label, plan.clone(), shared.clone())));
    let tasks: Vec<_> = (0..workers)
        .map(|worker_index| {
            let kv = kv_client(&channels[worker_index as usize % channels.len()]);
            tokio::spawn(run_worker(plan.clone(), shared.clone(), kv, worker_index))
        })
        .collect();
    let mut latencies_us = new_histogram();
    for task in tasks {
        let worker_latencies = task.await.expect("a bench worker panicked");
        latencies_us.add(worker_latencies).expect("histograms with the same bounds add");
    }
    let elapsed = plan.start.elapsed();
    if let Some(progress) = progress {
        progress.abort();
        eprint!("\r\x1b[K");
    }
    PhaseOutcome {
        total_ops: plan.total_ops,
        ops: shared.ops_done.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: shared.first_error.get().cloned(),
        elapsed,
        latencies_us,
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// One worker: takes the next operation number, waits for its slot under `--rate`, runs it
/// with one request in flight, and records its latency. Stops when the numbers run out or the
/// deadline passes. Its random keys come from a generator seeded with its index, so that a
/// run's key sequence is the same every time.
async fn run_worker(
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    mut kv: KvClient<Conn>,
    worker_index: u32,
) -> Histogram<u64> {
    let mut rng = StdRng::seed_from_u64(u64::from(worker_index));
    let mut latencies_us = new_histogram();
    loop {
        let op_index = shared.next_op_index.fetch_add(1, Ordering::Relaxed);
        if op_index >= plan.total_ops || !wait_for_slot(&plan, op_index).await {
            break;
        }
        let operation = plan.operation(op_index, &mut rng);
        let sent = Instant::now();
        let result =
            tokio::time::timeout_at(plan.deadline, execute_operation(&mut kv, operation, &plan)).await;
        match result {
            Err(_deadline_passed) => break,
            Ok(Ok(())) => {
                let latency_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                latencies_us.saturating_record(latency_us.max(1));
                shared.ops_done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                let _ = shared.first_error.set(error);
            }
        }
    }
    latencies_us
}

/// Waits until operation `op_index` may start: at once without `--rate`, else at its even
/// share of the schedule (late operations start at once, to catch up). Returns false when the
/// deadline comes first.
async fn wait_for_slot(plan: &Plan, op_index: u64) -> bool {
    if plan.rate_ops_per_s > 0 {
        let offset_s = op_index as f64 / plan.rate_ops_per_s as f64;
        let slot = plan.start + Duration::from_secs_f64(offset_s);
        if slot >= plan.deadline {
            return false;
        }
        tokio::time::sleep_until(slot).await;
    }
    Instant::now() < plan.deadline
}

async fn execute_operation(kv: &mut KvClient<Conn>, operation: Operation, plan: &Plan) -> Result<(), String> {
    match operation {
        Operation::Put(key) => put(kv, key, plan.value.clone()).await,
        Operation::Get(key) => get(kv, key, plan.serializable).await.map(|_| ()),
        Operation::TxnCas(key) => txn_cas(kv, key, plan).await,
    }
}

async fn put(kv: &mut KvClient<Conn>, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
    let request = PutRequest { key, value, ..Default::default() };
    kv.put(request).await.map(|_| ()).map_err(|status| status_error("put", &status))
}

/// Gets one key and returns its mod revision, 0 when it does not exist (which is what a txn
/// compares a missing key's mod revision against).
async fn get(kv: &mut KvClient<Conn>, key: Vec<u8>, serializable: bool) -> Result<i64, String> {
    let request = RangeRequest { key, serializable, ..Default::default() };
    let response = kv.range(request).await.map_err(|status| status_error("range", &status))?;
    Ok(response.into_inner().kvs.first().map_or(0, |kv| kv.mod_revision))
}

/// Compare-and-swap: reads the key's mod revision, then puts it in a txn that succeeds only if
/// the mod revision is still that. Losing the race to another client is a correct answer, not
/// an error.
async fn txn_cas(kv: &mut KvClient<Conn>, key: Vec<u8>, plan: &Plan) -> Result<(), String> {
    let mod_revision = get(kv, key.clone(), plan.serializable).await?;
    let compare = Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.clone(),
        target_union: Some(compare::TargetUnion::ModRevision(mod_revision)),
        ..Default::default()
    };
    let put = PutRequest { key, value: plan.value.clone(), ..Default::default() };
    let request = TxnRequest {
        compare: vec![compare],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put)) }],
        failure: Vec::new(),
    };
    kv.txn(request).await.map(|_| ()).map_err(|status| status_error("txn", &status))
}

/// An error and its causes, `: `-separated: tonic's transport error alone says only
/// "transport error", and the cause (connection refused, timed out) is what the user needs.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // hyper repeats its cause's message in its own; say each message once.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text
}

fn status_error(call: &str, status: &tonic::Status) -> String {
    format!("{call}: {:?}: {}", status.code(), status.message())
}

/// Redraws one progress line on standard error every second until aborted or the deadline.
async fn draw_progress(label: &'static str, plan: Arc<Plan>, shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.tick().await;
    while Instant::now() < plan.deadline {
        ticker.tick().await;
        eprint!(
            "\r\x1b[K{}: {}/{} ops, {} errors, {:.0}s",
            label,
            shared.ops_done.load(Ordering::Relaxed),
            plan.total_ops,
            shared.errors.load(Ordering::Relaxed),
            plan.start.elapsed().as_secs_f64()
        );
    }
}

/// The printed result: one row of the table, or one JSON object with these field names.
#[derive(Serialize, Debug, PartialEq)]
struct Report {
    workload: &'static str,
    clients: u32,
    ops: u64,
    errors: u64,
    ops_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Report {
    fn new(workload: Workload, clients: u32, outcome: &PhaseOutcome) -> Report {
        let latency_ms = |latency_us: u64| round_to(latency_us as f64 / 1000.0, 3);
        let elapsed_s = outcome.elapsed.as_secs_f64();
        let ops_per_s = if elapsed_s > 0.0 { outcome.ops as f64 / elapsed_s } else { 0.0 };
        let latencies = &outcome.latencies_us;
        Report {
            workload: workload.name(),
            clients,
            ops: outcome.ops,
            errors: outcome.errors,
            ops_per_s: round_to(ops_per_s, 1),
            p50_ms: latency_ms(latencies.value_at_quantile(0.50)),
            p90_ms: latency_ms(latencies.value_at_quantile(0.90)),
            p99_ms: latency_ms(latencies.value_at_quantile(0.99)),
            max_ms: latency_ms(latencies.max()),
        }
    }
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10_f64.powi(decimals);
    (value * scale).round() / scale
}

/// The report as a header line and one row, columns as wide as their widest cell.
fn format_table(report: &Report) -> String {
    let header = ["WORKLOAD", "CLIENTS", "OPS", "ERRORS", "OPS/S", "P50 MS", "P90 MS", "P99 MS", "MAX MS"];
    let row = [
        report.workload.to_string(),
        report.clients.to_string(),
        report.ops.to_string(),
        report.errors.to_string(),
        format!("{:.1}", report.ops_per_s),
        format!("{:.3}", report.p50_ms),
        format!("{:.3}", report.p90_ms),
        format!("{:.3}", report.p99_ms),
        format!("{:.3}", report.max_ms),
    ];
    let widths: Vec<usize> = header.iter().zip(&row).map(|(h, cell)| h.len().max(cell.len())).collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let header_line = line(header.to_vec());
    let row_line = line(row.iter().map(String::as_str).collect());
    format!("{header_line}\n{row_line}\n")
}

fn print_report(report: &Report, write_out: WriteOut) -> Result<(), BenchError> {
    let text = match write_out {
        WriteOut::Json => {
            let json = serde_json::to_string(report).expect("a report serializes");
            format!("{json}\n")
        }
        WriteOut::Simple | WriteOut::Table => format_table(report),
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|error| BenchError::Failed(format!("writing the report: {error}")))
}

/// Parses `--duration-max` as a number and a unit: `500ms`, `60s`, `1.5m`, `1h`. (The client
/// commands' fuller Go-style parser is private to `client_cmd`; a time cap needs only this.)
fn parse_duration_max(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let unit_start = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(unit_start);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected a number and a unit, as in 60s"))?;
    let unit_s = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid duration {text:?}: the unit must be ms, s, m or h")),
    };
    let seconds = number * unit_s;
    if seconds <= 0.0 || seconds > DURATION_MAX_LIMIT.as_secs_f64() {
        return Err(format!("invalid duration {text:?}: must be more than 0 and at most 24h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

// ---- the lease keep-alive workload --------------------------------------------------------

/// TTL of the leases the keep-alive workload grants (long: they must not expire mid-run).
const KEEPALIVE_LEASE_TTL_S: i64 = 60;

async fn execute_keepalive(global: &GlobalOpts, args: &BenchArgs) -> Result<(), BenchError> {
    check_range("--clients", u64::from(args.clients), 1, u64::from(WATCHERS_MAX))
        .map_err(BenchError::Usage)?;
    let uris = parse_endpoints(&global.endpoints).map_err(BenchError::Usage)?;
    let channels = connect_channels(&uris, args.conns, global).await.map_err(BenchError::Failed)?;
    let per_client = args.total.div_ceil(u64::from(args.clients));
    let deadline = Instant::now() + args.duration_max;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..args.clients as usize {
        let channel = channels[index % channels.len()].clone();
        tasks.push(tokio::spawn(keep_alive_client(channel, per_client, deadline)));
    }
    let mut latencies = new_histogram();
    let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
    for task in tasks {
        match task.await.map_err(|e| BenchError::Failed(format!("client failed: {e}")))? {
            Ok(client_latencies) => {
                ops += client_latencies.len();
                latencies.add(&client_latencies).map_err(|e| BenchError::Failed(e.to_string()))?;
            }
            Err(error) => {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    let outcome = PhaseOutcome {
        total_ops: per_client * u64::from(args.clients),
        ops,
        errors,
        first_error: first_error.clone(),
        elapsed: started.elapsed(),
        latencies_us: latencies,
    };
    print_report(&Report::new(Workload::LeaseKeepalive, args.clients, &outcome), global.write_out)?;
    match (ops, first_error) {
        (0, Some(error)) => Err(BenchError::Failed(format!("every client failed; first error: {error}"))),
        _ => Ok(()),
    }
}

/// Grants a lease, then keeps it alive `count` times (or until the deadline), one
/// keep-alive in flight at a time, recording each round trip.
async fn keep_alive_client(
    channel: (Conn, Uri),
    count: u64,
    deadline: Instant,
) -> Result<Histogram<u64>, String> {
    use chorus_proto::etcdserverpb::lease_client::LeaseClient;
    use chorus_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest};
    let mut client = LeaseClient::with_origin(channel.0, channel.1);
    let grant = LeaseGrantRequest { ttl: KEEPALIVE_LEASE_TTL_S, id: 0 };
    let id = client.lease_grant(grant).await.map_err(|s| status_error("lease grant", &s))?.into_inner().id;
    let mut latencies = new_histogram();
    if count == 0 || Instant::now() >= deadline {
        return Ok(latencies);
    }
    // The first keep-alive is queued before the stream is opened: etcd (grpc-go) sends the
    // response headers only with its first answer, so waiting for them before sending
    // anything would wait until the command timeout.
    let (requests, request_stream) = tokio::sync::mpsc::channel(1);
    let mut sent = Instant::now();
    requests.send(LeaseKeepAliveRequest { id }).await.map_err(|_| "keep-alive stream closed".to_string())?;
    let response = client
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(request_stream))
        .await
        .map_err(|s| status_error("lease keep-alive", &s))?;
    let mut responses = response.into_inner();
    for index in 0..count {
        if index > 0 {
            if Instant::now() >= deadline {
                break;
            }
            sent = Instant::now();
            requests
                .send(LeaseKeepAliveRequest { id })
                .await
                .map_err(|_| "keep-alive stream closed".to_string())?;
        }
        match tokio::time::timeout_at(deadline, responses.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl > 0 => {
                let _ = latencies.record(sent.elapsed().as_micros().min(u128::from(LATENCY_US_MAX)) as u64);
            }
            Ok(Ok(Some(_))) => return Err(format!("lease {id:x} expired during the run")),
            Ok(Err(status)) => return Err(status_error("lease keep-alive", &status)),
            _ => break,
        }
    }
    Ok(latencies)
}

// ---- the watch workload ------------------------------------------------------------------

/// Watchers a watch run may open.
const WATCHERS_MAX: u32 = 10_000;
/// How long watchers wait for the last events after the last put.
const WATCH_DRAIN: Duration = Duration::from_secs(5);

/// When each put was sent and acknowledged, by the revision it created.
type PutTimes = std::collections::BTreeMap<i64, (Instant, Instant)>;

async fn execute_watch(global: &GlobalOpts, args: &BenchArgs) -> Result<(), BenchError> {
    check_range("--clients", u64::from(args.clients), 1, u64::from(WATCHERS_MAX))
        .map_err(BenchError::Usage)?;
    check_range("--total", args.total, 1, 10_000_000).map_err(BenchError::Usage)?;
    let uris = parse_endpoints(&global.endpoints).map_err(BenchError::Usage)?;
    // Streams live for the whole run: these channels have no per-request timeout.
    let mut channels = Vec::new();
    for index in 0..args.conns.max(1) as usize {
        let uri = &uris[index % uris.len()];
        let endpoint = Endpoint::from(uri.clone()).connect_timeout(global.dial_timeout).tcp_nodelay(true);
        let channel = tokio::time::timeout(global.dial_timeout, endpoint.connect())
            .await
            .map_err(|_| BenchError::Failed(format!("cannot connect to {uri} within --dial-timeout")))?
            .map_err(|error| {
                BenchError::Failed(format!("cannot connect to {uri}: {}", error_chain(&error)))
            })?;
        channels.push(channel);
    }
    let key = format!("{}watch/{}", args.key_prefix, std::process::id()).into_bytes();
    let deadline = Instant::now() + args.duration_max;
    let (created_tx, mut created_rx) = tokio::sync::mpsc::channel::<()>(args.clients as usize);
    let mut watchers = Vec::new();
    for index in 0..args.clients as usize {
        let channel = channels[index % channels.len()].clone();
        watchers.push(tokio::spawn(watch_events(
            channel,
            key.clone(),
            args.total,
            deadline + WATCH_DRAIN,
            created_tx.clone(),
        )));
    }
    drop(created_tx);
    for _ in 0..args.clients {
        let created =
            tokio::time::timeout(global.dial_timeout + Duration::from_secs(5), created_rx.recv()).await;
        if !matches!(created, Ok(Some(()))) {
            return Err(BenchError::Failed("not every watcher was created in time".to_string()));
        }
    }
    let (put_times, errors) = put_sequence(&channels[0], &key, args, global.command_timeout, deadline).await;
    let mut from_sent = new_histogram();
    let mut from_acked = new_histogram();
    let mut received = 0u64;
    for watcher in watchers {
        let events = watcher.await.map_err(|e| BenchError::Failed(format!("watcher failed: {e}")))?;
        for (revision, at) in events {
            let Some((sent, acked)) = put_times.get(&revision) else { continue };
            received += 1;
            let _ = from_sent
                .record(at.saturating_duration_since(*sent).as_micros().min(LATENCY_US_MAX as u128) as u64);
            let _ = from_acked
                .record(at.saturating_duration_since(*acked).as_micros().min(LATENCY_US_MAX as u128) as u64);
        }
    }
    let expected = put_times.len() as u64 * u64::from(args.clients);
    let elapsed = put_times.values().next().zip(put_times.values().last()).map(|(a, b)| b.1 - a.0);
    let row = |name: &'static str, latencies: &Histogram<u64>| {
        let outcome = PhaseOutcome {
            total_ops: expected,
            ops: received,
            errors: errors + expected.saturating_sub(received),
            first_error: None,
            elapsed: elapsed.unwrap_or_default(),
            latencies_us: latencies.clone(),
        };
        let mut report = Report::new(Workload::Watch, args.clients, &outcome);
        report.workload = name;
        report
    };
    print_report(&row("watch-from-put-sent", &from_sent), global.write_out)?;
    print_report(&row("watch-from-put-acked", &from_acked), global.write_out)?;
    if received == 0 {
        return Err(BenchError::Failed("no watcher received any event".to_string()));
    }
    Ok(())
}

/// One writer puts `key` up to `--total` times (bounded by the deadline), one at a time.
async fn put_sequence(
    channel: &Channel,
    key: &[u8],
    args: &BenchArgs,
    timeout: Duration,
    deadline: Instant,
) -> (PutTimes, u64) {
    let mut kv = KvClient::new(channel.clone());
    let value = vec![b'v'; args.val_size as usize];
    let mut times = PutTimes::new();
    let mut errors = 0u64;
    for _ in 0..args.total {
        if Instant::now() >= deadline {
            break;
        }
        let sent = Instant::now();
        let request = PutRequest { key: key.to_vec(), value: value.clone(), ..Default::default() };
        match tokio::time::timeout(timeout, kv.put(request)).await {
            Ok(Ok(response)) => {
                let revision = response.into_inner().header.map_or(0, |h| h.revision);
                times.insert(revision, (sent, Instant::now()));
            }
            _ => errors += 1,
        }
    }
    (times, errors)
}

/// Watches `key` until `total` events arrived or the deadline; returns (revision, received at).
async fn watch_events(
    channel: Channel,
    key: Vec<u8>,
    total: u64,
    deadline: Instant,
    created: tokio::sync::mpsc::Sender<()>,
) -> Vec<(i64, Instant)> {
    use chorus_proto::etcdserverpb::watch_client::WatchClient;
    use chorus_proto::etcdserverpb::{watch_request::RequestUnion, WatchCreateRequest, WatchRequest};
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest { key, ..Default::default() })),
    };
    // The request side stays open (held here) until the watcher is done.
    let (requests, request_stream) = tokio::sync::mpsc::channel(1);
    let _ = requests.send(create).await;
    let mut client = WatchClient::new(channel);
    let mut events = Vec::new();
    let Ok(response) = client.watch(tokio_stream::wrappers::ReceiverStream::new(request_stream)).await else {
        return events;
    };
    let mut stream = response.into_inner();
    while (events.len() as u64) < total {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let Ok(Ok(Some(message))) = next else { break };
        let at = Instant::now();
        if message.created {
            let _ = created.send(()).await;
        }
        for event in &message.events {
            events.push((event.kv.as_ref().map_or(0, |kv| kv.mod_revision), at));
        }
    }
    drop(requests);
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    /// Parses a command line written as one string, words split on whitespace.
    fn parse(line: &str) -> Result<BenchArgs, String> {
        let argv = std::iter::once("bench").chain(line.split_whitespace());
        TestCli::try_parse_from(argv).map(|cli| cli.bench).map_err(|error| error.to_string())
    }

    fn plan(line: &str) -> Result<Plan, String> {
        plan_from_args(&parse(line)?)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let args = parse("put").unwrap();
        assert_eq!(args.workload, Workload::Put);
        assert_eq!((args.clients, args.conns, args.total), (1, 1, 10_000));
        assert_eq!(args.duration_max, Duration::from_secs(60));
        assert_eq!((args.key_size, args.val_size, args.key_space), (32, 256, 1_000));
        assert_eq!(args.key_prefix, "bench/");
        assert!(!args.sequential_keys);
        assert_eq!(args.rate, 0);
        assert_eq!(args.consistency, Consistency::Linearizable);
        assert_eq!(args.read_ratio, 0.9);
    }

    #[test]
    fn parses_every_workload_and_option() {
        let args = parse(
            "txn-cas --clients 64 --conns 8 --total 20000 --duration-max 500ms --key-size 16 \
             --val-size 0 --key-space 50 --sequential-keys --rate 100 --consistency s \
             --read-ratio 0.5",
        )
        .unwrap();
        assert_eq!(args.workload, Workload::TxnCas);
        assert_eq!((args.clients, args.conns, args.total), (64, 8, 20_000));
        assert_eq!(args.duration_max, Duration::from_millis(500));
        assert_eq!((args.key_size, args.val_size, args.key_space), (16, 0, 50));
        assert!(args.sequential_keys);
        assert_eq!(args.consistency, Consistency::Serializable);
        assert_eq!(args.read_ratio, 0.5);
        for (name, workload) in [("get", Workload::Get), ("mixed", Workload::Mixed), ("put", Workload::Put)] {
            assert_eq!(parse(name).unwrap().workload, workload);
        }
    }

    #[test]
    fn refuses_unknown_workloads_and_consistencies() {
        assert!(parse("scan").is_err());
        assert!(parse("").is_err());
        assert!(parse("get --consistency x").is_err());
        assert!(parse("get --duration-max 60").is_err());
    }

    #[test]
    fn refuses_out_of_range_options_before_dialing() {
        for bad in [
            "put --clients 0",
            "put --conns 0",
            "put --total 0",
            "put --key-space 0",
            "put --val-size 2000000",
            "mixed --read-ratio 1.5",
            "put --key-size 7 --key-space 100",
        ] {
            assert!(plan(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(plan("put --key-size 8 --key-space 100").is_ok());
    }

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration_max("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration_max("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration_max("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration_max("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "60", "60x", "0s", "25h", "-1s"] {
            assert!(parse_duration_max(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn keys_have_the_prefix_and_exactly_the_key_size() {
        let keys = KeyGenerator::new(KEY_PREFIX, 32, 1_000, false).unwrap();
        assert_eq!(keys.key(7), b"bench/00000000000000000000000007".to_vec());
        assert_eq!(keys.key(999).len(), 32);
        let smallest = KeyGenerator::new(KEY_PREFIX, 9, 1_000, false).unwrap();
        assert_eq!(smallest.key(999), b"bench/999".to_vec());
        assert!(KeyGenerator::new(KEY_PREFIX, 8, 1_000, false).is_err());
        assert!(KeyGenerator::new(KEY_PREFIX, 7, 1, true).is_ok(), "key space 1 needs one digit");
        let custom = KeyGenerator::new("cmp/r2/put64/", 32, 1_000, false).unwrap();
        assert_eq!(custom.key(5), b"cmp/r2/put64/0000000000000000005".to_vec());
        let error = KeyGenerator::new("a-very-long-prefix-for-32-bytes/", 32, 1_000, false).unwrap_err();
        assert!(error.contains("a-very-long-prefix-for-32-bytes/"), "{error}");
    }

    #[test]
    fn sequential_keys_wrap_around_the_key_space() {
        let keys = KeyGenerator::new(KEY_PREFIX, 32, 3, true).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let numbers: Vec<u64> = (0..7).map(|op_index| keys.key_number(op_index, &mut rng)).collect();
        assert_eq!(numbers, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn random_keys_stay_in_the_key_space_cover_it_and_repeat_per_seed() {
        let keys = KeyGenerator::new(KEY_PREFIX, 32, 10, false).unwrap();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..1_000).map(|op_index| keys.key_number(op_index, &mut rng)).collect::<Vec<u64>>()
        };
        let numbers = draw(3);
        assert!(numbers.iter().all(|number| *number < 10));
        assert_eq!(numbers.iter().collect::<std::collections::BTreeSet<_>>().len(), 10);
        assert_eq!(numbers, draw(3));
        assert_ne!(numbers, draw(4));
    }

    #[test]
    fn mixed_reads_in_the_read_ratio() {
        let mut rng = StdRng::seed_from_u64(1);
        let mixed = plan("mixed --read-ratio 0.9").unwrap();
        let reads = (0..10_000)
            .filter(|index| matches!(mixed.operation(*index, &mut rng), Operation::Get(_)))
            .count();
        assert!((8_800..=9_200).contains(&reads), "{reads} reads of 10000");
        let writes_only = plan("mixed --read-ratio 0").unwrap();
        assert!(matches!(writes_only.operation(0, &mut rng), Operation::Put(_)));
    }

    #[test]
    fn populate_puts_every_key_once_in_order() {
        let measured = plan("get --key-space 5 --rate 10").unwrap();
        let populate = populate_plan(&measured, Duration::from_secs(1));
        assert_eq!((populate.workload, populate.total_ops, populate.rate_ops_per_s), (Workload::Put, 5, 0));
        let mut rng = StdRng::seed_from_u64(0);
        let keys: Vec<Operation> = (0..5).map(|index| populate.operation(index, &mut rng)).collect();
        let expected: Vec<Operation> =
            (0..5).map(|number| Operation::Put(measured.keys.key(number))).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn endpoints_accept_host_port_and_http_only() {
        assert_eq!(parse_endpoint("127.0.0.1:2379").unwrap().to_string(), "http://127.0.0.1:2379/");
        assert_eq!(parse_endpoint("http://localhost:2379/").unwrap().to_string(), "http://localhost:2379/");
        for bad in ["https://127.0.0.1:2379", "127.0.0.1", "", "unix://x:1"] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_endpoints(&[]).is_err());
    }

    #[test]
    fn table_aligns_columns_and_json_has_numbers() {
        let report = Report {
            workload: "put",
            clients: 64,
            ops: 20_000,
            errors: 0,
            ops_per_s: 1234.5,
            p50_ms: 1.25,
            p90_ms: 2.0,
            p99_ms: 4.5,
            max_ms: 10.0,
        };
        let table = format_table(&report);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "WORKLOAD  CLIENTS  OPS    ERRORS  OPS/S   P50 MS  P90 MS  P99 MS  MAX MS");
        assert_eq!(lines[1], "put       64       20000  0       1234.5  1.250   2.000   4.500   10.000");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ops_per_s"], serde_json::json!(1234.5));
        assert_eq!(json["clients"], serde_json::json!(64));
        assert_eq!(json["workload"], serde_json::json!("put"));
    }

    #[test]
    fn report_takes_percentiles_from_the_histogram() {
        let mut latencies_us = new_histogram();
        for latency_us in 1..=1_000 {
            latencies_us.saturating_record(latency_us * 10);
        }
        let outcome = PhaseOutcome {
            total_ops: 1_000,
            ops: 1_000,
            errors: 2,
            first_error: None,
            elapsed: Duration::from_secs(2),
            latencies_us,
        };
        let report = Report::new(Workload::Get, 4, &outcome);
        assert_eq!((report.ops, report.errors, report.ops_per_s), (1_000, 2, 500.0));
        assert!((report.p50_ms - 5.0).abs() < 0.01, "{report:?}");
        assert!((report.p99_ms - 9.9).abs() < 0.01, "{report:?}");
        assert!((report.max_ms - 10.0).abs() < 0.01, "{report:?}");
    }
}
