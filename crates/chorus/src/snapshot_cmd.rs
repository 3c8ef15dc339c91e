//! `chorus snapshot save|status|restore`: backups of the replicated state, as
//! `etcdctl snapshot save` and `etcdutl snapshot status|restore` do for etcd.
//!
//! A backup file is the member's state image followed by its SHA-256 (see
//! `chorus_core::snapshot`). `save` asks one member for a consistent image
//! (`Maintenance.Snapshot`), checks the hash, and writes the file atomically
//! (`FILE.part`, fsync, rename).

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Instant;

use chorus_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use chorus_proto::etcdserverpb::SnapshotRequest;
use chorus_server::backup::{self, RestoreConfig};
use futures::StreamExt as _;
use serde_json::json;

use crate::client_cmd::{GlobalOpts, WriteOut};

#[derive(clap::Args, Debug, Clone)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum SnapshotCommand {
    /// Save a consistent backup of one member's state to FILE (give one endpoint)
    Save { file: PathBuf },
    /// Print a backup's hash, revision, key count and size
    Status { file: PathBuf },
    /// Write a new member's data directory from a backup, to start a new cluster from it
    Restore(RestoreArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    pub file: PathBuf,
    /// The new member's data directory (must not exist, or be empty; default `<name>.chorus`)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The new member's name
    #[arg(long, default_value = "default")]
    pub name: String,
    /// The new cluster: `name=peer-url,...` (the same for every member restored)
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// The new cluster's token
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// The new member's peer URLs (as in --initial-cluster)
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Accept a backup without a valid SHA-256 trailer
    #[arg(long)]
    pub skip_hash_check: bool,
}

pub async fn run(global: &GlobalOpts, args: SnapshotArgs) -> i32 {
    let result = match args.command {
        SnapshotCommand::Save { file } => save(global, file).await,
        SnapshotCommand::Status { file } => status(global, file),
        SnapshotCommand::Restore(args) => restore(args),
    };
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("Error: {error:#}");
            1
        }
    }
}

async fn save(global: &GlobalOpts, file: PathBuf) -> anyhow::Result<()> {
    let [endpoint] = global.endpoints.as_slice() else {
        anyhow::bail!(
            "snapshot must be requested from one member, not {} (give one --endpoints)",
            global.endpoints.len()
        );
    };
    let url = if endpoint.contains("://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?.connect_timeout(global.dial_timeout);
    let channel = tokio::time::timeout(global.dial_timeout, channel.connect())
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect to {url} within {:?}", global.dial_timeout))??;
    let mut client = MaintenanceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let started = Instant::now();
    let mut stream = client.snapshot(SnapshotRequest {}).await?.into_inner();
    let part = file.with_extension(match file.extension() {
        Some(extension) => format!("{}.part", extension.to_string_lossy()),
        None => "part".to_string(),
    });
    let mut bytes = Vec::new();
    let mut revision = 0;
    let progress = std::io::stderr().is_terminal();
    let mut last_draw = Instant::now();
    // Bounded by the server: it sends the image once, in pieces, and ends.
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        revision = piece.header.map_or(revision, |h| h.revision);
        bytes.extend_from_slice(&piece.blob);
        if progress && (last_draw.elapsed().as_millis() >= 100 || piece.remaining_bytes == 0) {
            let total = bytes.len() as u64 + piece.remaining_bytes;
            let percent = bytes.len() as f64 * 100.0 / total.max(1) as f64;
            eprint!(
                "\rreceived {} of {} ({percent:.0}%)",
                human_bytes(bytes.len() as u64),
                human_bytes(total)
            );
            last_draw = Instant::now();
        }
    }
    if progress {
        eprintln!();
    }
    let image = chorus_core::snapshot::decode_backup(&bytes)
        .map_err(|e| anyhow::anyhow!("the snapshot received is unusable: {e}"))?;
    {
        let mut out = std::fs::File::create(&part)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
    }
    std::fs::rename(&part, &file)?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    match global.write_out {
        WriteOut::Json => println!(
            "{}",
            json!({"file": file, "revision": revision, "applied_index": image.applied_index,
                   "size": bytes.len(), "seconds": seconds})
        ),
        _ => println!(
            "Snapshot saved at {} (revision {revision}, {}, {:.1} MB/s)",
            file.display(),
            human_bytes(bytes.len() as u64),
            bytes.len() as f64 / 1e6 / seconds.max(1e-9)
        ),
    }
    Ok(())
}

fn status(global: &GlobalOpts, file: PathBuf) -> anyhow::Result<()> {
    let bytes = std::fs::read(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let image = chorus_core::snapshot::decode_backup(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let state =
        chorus_core::snapshot::restore(&image).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let hash = state.mvcc.state_hash();
    let revision = state.mvcc.revision();
    let keys = state.mvcc.key_count();
    let size = bytes.len() as u64;
    match global.write_out {
        WriteOut::Json => println!(
            "{}",
            json!({"hash": hash, "revision": revision, "totalKey": keys, "totalSize": size,
                   "appliedIndex": image.applied_index, "records": image.kv.len(), "leases": image.leases.len()})
        ),
        WriteOut::Table => {
            println!("+----------+----------+------------+------------+");
            println!("|   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |");
            println!("+----------+----------+------------+------------+");
            println!("| {hash:08x} | {revision:>8} | {keys:>10} | {:>10} |", human_bytes(size));
            println!("+----------+----------+------------+------------+");
        }
        WriteOut::Simple => println!("{hash:08x}, {revision}, {keys}, {}", human_bytes(size)),
    }
    Ok(())
}

fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    let config = RestoreConfig {
        data_dir: args.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.chorus", args.name))),
        name: args.name,
        initial_cluster: args.initial_cluster,
        initial_cluster_token: args.initial_cluster_token,
        initial_advertise_peer_urls: chorus_server::config::split_urls(&args.initial_advertise_peer_urls),
        skip_hash_check: args.skip_hash_check,
    };
    let restored = backup::restore(&bytes, &config)?;
    println!(
        "restored snapshot to {} (member {:x}, cluster {:x}, revision {}, {} keys)",
        config.data_dir.display(),
        restored.member_id,
        restored.cluster_id,
        restored.revision,
        restored.keys_count
    );
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.1} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}
