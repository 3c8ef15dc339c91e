//! `chorus`: the one command users run.
//!
//! - `chorus serve ...`: one member of a cluster, with etcd's flags;
//! - `chorus dev`: a local three-member cluster for development;
//! - `chorus put|get|del|txn|status|compact ...`: a client, like etcdctl.

mod bench_cmd;
mod client_cmd;
mod cluster_cmd;
mod serve_cmd;

use clap::Parser;

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
    /// Cluster-wide views: `chorus cluster health` (every member's diagnosis of every peer).
    Cluster(cluster_cmd::ClusterArgs),
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

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
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
            Command::Cluster(args) => return cluster_cmd::run(&cli.global, args).await,
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
