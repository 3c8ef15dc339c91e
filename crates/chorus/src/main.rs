//! `chorus`: the one command users run.
//!
//! - `chorus serve ...`: one member of a cluster, with etcd's flags;
//! - `chorus dev`: a local three-member cluster for development;
//! - `chorus put|get|del|txn|status|compact ...`: a client, like etcdctl;
//! - `chorus lock|elect NAME [-- CMD]`: hold a lock or leadership, optionally while a command runs.

mod bench_cmd;
mod client_cmd;
mod cluster_cmd;
mod coord_cmd;
mod member_cmd;
mod queue_cmd;
mod serve_cmd;
mod snapshot_cmd;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates small buffers
/// on one thread and frees them on another, which glibc's arenas handle slowly
/// (a quarter of a member's CPU under load went to malloc and free).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser, Debug)]
#[command(
    name = "chorus",
    version,
    about = "chorus: a fault-tolerant coordination service that speaks etcd's v3 API"
)]
struct Cli {
    #[command(flatten)]
    global: client_cmd::GlobalOpts,
    /// Log format for serve and dev: text or json.
    #[arg(long, global = true, env = "CHORUS_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run one member of a chorus cluster.
    Serve(Box<serve_cmd::ServeArgs>),
    /// Start a local three-member cluster (ports 2379/22379/32379) for development.
    Dev(serve_cmd::DevArgs),
    /// Load-test a cluster through the public etcd v3 API (works against etcd too).
    Bench(bench_cmd::BenchArgs),
    /// Acquire a lock and hold it until interrupted, or while running a command (`-- CMD`)
    Lock(coord_cmd::LockArgs),
    /// Campaign in an election and lead until interrupted, or while running a command; or
    /// observe it (`--listen`)
    Elect(coord_cmd::ElectArgs),
    /// Work queues: push, pop, ack, nack, len, peek (chorus.v1.Queue)
    Queue(queue_cmd::QueueArgs),
    /// Barriers: enter, leave (chorus.v1.Barrier)
    Barrier(queue_cmd::BarrierArgs),
    /// Cluster-wide views: `chorus cluster health` (every member's diagnosis of every peer).
    Cluster(cluster_cmd::ClusterArgs),
    /// Membership: list, add (--learner), remove, update, promote (etcd's Cluster service)
    Member(member_cmd::MemberArgs),
    /// Backups: `save FILE` from a member, `status FILE`, `restore FILE` into a new member's data directory
    Snapshot(snapshot_cmd::SnapshotArgs),
    #[command(flatten)]
    Client(client_cmd::ClientCommand),
}

fn init_logging(format: &str, default_filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().init(),
        other => anyhow::bail!("--log-format must be text or json, not {other:?}"),
    }
    Ok(())
}

/// A multi-thread runtime with `threads` workers.
fn multi_thread(threads: u32) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads as usize);
    builder
}

fn main() {
    let cli = Cli::parse();
    let runtime = match &cli.command {
        // A benchmark's clients share one thread unless told otherwise: handing requests
        // between worker threads costs the generator more CPU than the requests themselves.
        Command::Bench(args) if args.threads == 1 => tokio::runtime::Builder::new_current_thread(),
        Command::Bench(args) => multi_thread(args.threads),
        Command::Serve(args) if args.threads > 0 => multi_thread(args.threads),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .expect("tokio runtime");
    let code = runtime.block_on(async move {
        let result = match cli.command {
            Command::Serve(args) => match init_logging(&cli.log_format, "info") {
                Ok(()) => serve_cmd::run_serve(*args).await,
                Err(error) => Err(error),
            },
            Command::Dev(args) => match init_logging(&cli.log_format, "warn") {
                Ok(()) => serve_cmd::run_dev(args).await,
                Err(error) => Err(error),
            },
            Command::Client(command) => return client_cmd::run(&cli.global, command).await,
            Command::Bench(args) => return bench_cmd::run(&cli.global, args).await,
            Command::Lock(args) => return coord_cmd::run_lock(&cli.global, args).await,
            Command::Elect(args) => return coord_cmd::run_elect(&cli.global, args).await,
            Command::Queue(args) => return queue_cmd::run_queue(&cli.global, args).await,
            Command::Barrier(args) => return queue_cmd::run_barrier(&cli.global, args).await,
            Command::Cluster(args) => return cluster_cmd::run(&cli.global, args).await,
            Command::Member(args) => return member_cmd::run(&cli.global, args).await,
            Command::Snapshot(args) => return snapshot_cmd::run(&cli.global, args).await,
        };
        match result {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("chorus: {error:#}");
                1
            }
        }
    });
    std::process::exit(code);
}
