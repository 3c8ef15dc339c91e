//! `chorus lock` and `chorus elect`: hold a lock or an election's leadership for as
//! long as this process runs, or for as long as a command runs (`--exec`), with
//! the session's lease kept alive in the background.
//!
//! With a command, the supervisor starts it with the fencing token in its
//! environment (`CHORUS_FENCE=<name>:<token>`, which every `chorus put/del/txn`
//! inside it picks up as its `--fence`), stops it if the lease is lost (SIGTERM,
//! then SIGKILL after `--grace`), releases when the command exits, and exits with
//! the command's status. The command stays in the supervisor's process group, so
//! whatever stops the supervisor's group (a terminal's Ctrl-C, a service manager)
//! stops it too; the signals on loss go to the command's process only, so a shell
//! script should `exec` its long-running part.

use std::time::Duration;

use chorus_client::{Client, Session};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

use crate::client_cmd::{connect, emit, parse_duration, GlobalOpts};

/// Exit status when the lock or leadership is lost while held without a command.
const EXIT_LOST: i32 = 3;

/// `lock NAME [--exec] [-- CMD ARGS...]`.
#[derive(clap::Args, Debug, Clone)]
pub struct LockArgs {
    /// The lock's name (its keys live under NAME/)
    name: String,
    #[command(flatten)]
    hold: HoldOpts,
}

/// `elect NAME [PROPOSAL] [--listen] [--exec] [-- CMD ARGS...]`.
#[derive(clap::Args, Debug, Clone)]
pub struct ElectArgs {
    /// The election's name (its keys live under NAME/)
    name: String,
    /// The value to proclaim once elected (default: this host's name and pid)
    proposal: Option<String>,
    /// Only observe: print the leader's value at every change
    #[arg(short, long)]
    listen: bool,
    #[command(flatten)]
    hold: HoldOpts,
}

#[derive(clap::Args, Debug, Clone)]
struct HoldOpts {
    /// Session lease TTL in seconds: how long after this process stops (or is paused)
    /// the lock or leadership passes on
    #[arg(long, default_value_t = 10)]
    ttl: i64,
    /// Give up waiting after this long (e.g. 30s); wait forever by default
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Run the command after `--` while holding, and exit with its status
    #[arg(long)]
    exec: bool,
    /// After SIGTERM, how long the command has to exit before SIGKILL
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
    /// The command to run (after `--`)
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Serialize)]
struct HeldJson {
    name: String,
    key: String,
    token: i64,
    lease: String,
    fence: String,
}

pub async fn run_lock(global: &GlobalOpts, args: LockArgs) -> i32 {
    let result = async {
        check_hold(&args.hold)?;
        let client = connect(global).await.map_err(|e| e.to_string())?;
        let session = Session::new(&client, args.hold.ttl).await.map_err(|e| e.to_string())?;
        let name = args.name.as_bytes();
        let lost = session.lost();
        let guard = tokio::select! {
            guard = client.lock(name, session.lease(), args.hold.timeout) => guard.map_err(|e| e.to_string())?,
            () = wait_lost(lost.clone()) => return Err("session lease lost while waiting for the lock".to_string()),
            () = terminated() => return Ok(close(session, None, &client).await.map_or(1, |()| 130)),
        };
        let held = Held {
            name: args.name.clone(),
            key: guard.key.clone(),
            token: guard.token,
            lease: session.lease(),
            kind: "LOCK",
        };
        Ok(hold(global, &client, session, held, &args.hold, Release::Unlock(guard.key)).await)
    }
    .await;
    result.unwrap_or_else(|message| {
        eprintln!("Error: {message}");
        1
    })
}

pub async fn run_elect(global: &GlobalOpts, args: ElectArgs) -> i32 {
    let result = async {
        let client = connect(global).await.map_err(|e| e.to_string())?;
        if args.listen {
            return observe(&client, args.name.as_bytes()).await;
        }
        check_hold(&args.hold)?;
        let proposal = args.proposal.clone().unwrap_or_else(default_proposal);
        let session = Session::new(&client, args.hold.ttl).await.map_err(|e| e.to_string())?;
        let lost = session.lost();
        let name = args.name.as_bytes();
        let leader = tokio::select! {
            leader = client.campaign(name, session.lease(), proposal.as_bytes(), args.hold.timeout) => {
                leader.map_err(|e| e.to_string())?
            }
            () = wait_lost(lost.clone()) => return Err("session lease lost while campaigning".to_string()),
            () = terminated() => return Ok(close(session, None, &client).await.map_or(1, |()| 130)),
        };
        let held = Held {
            name: args.name.clone(),
            key: leader.key.clone(),
            token: leader.rev,
            lease: session.lease(),
            kind: "ELECTION",
        };
        Ok(hold(global, &client, session, held, &args.hold, Release::Resign(leader)).await)
    }
    .await;
    result.unwrap_or_else(|message| {
        eprintln!("Error: {message}");
        1
    })
}

fn check_hold(hold: &HoldOpts) -> Result<(), String> {
    if hold.exec && hold.command.is_empty() {
        return Err("--exec needs a command after `--`".to_string());
    }
    if hold.ttl <= 0 {
        return Err(format!("--ttl must be positive, not {}", hold.ttl));
    }
    Ok(())
}

fn default_proposal() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

struct Held {
    name: String,
    key: Vec<u8>,
    token: i64,
    lease: i64,
    /// LOCK or ELECTION, for the environment variable names.
    kind: &'static str,
}

impl Held {
    fn fence(&self) -> String {
        format!("{}:{}", self.name, self.token)
    }
}

enum Release {
    Unlock(Vec<u8>),
    Resign(chorus_client::proto::v3electionpb::LeaderKey),
}

/// Holds until a signal (no command) or the command's exit, then releases.
async fn hold(
    global: &GlobalOpts,
    client: &Client,
    session: Session,
    held: Held,
    opts: &HoldOpts,
    release: Release,
) -> i32 {
    let json = HeldJson {
        name: held.name.clone(),
        key: String::from_utf8_lossy(&held.key).into_owned(),
        token: held.token,
        lease: format!("{:x}", held.lease),
        fence: held.fence(),
    };
    let printed = emit(global.write_out, &json, |out| {
        out.extend_from_slice(&held.key);
        out.push(b'\n');
    });
    if printed.is_err() {
        return 1;
    }
    let lost = session.lost();
    if opts.command.is_empty() {
        tokio::select! {
            () = terminated() => {}
            () = wait_lost(lost) => {
                eprintln!("Error: lost {}: the session lease {:x} expired", held.name, held.lease);
                return EXIT_LOST;
            }
        }
        return match close(session, Some(release), client).await {
            Ok(()) => 0,
            Err(()) => 1,
        };
    }
    let mut command = Command::new(&opts.command[0]);
    command
        .args(&opts.command[1..])
        .env(format!("CHORUS_{}_NAME", held.kind), &held.name)
        .env(format!("CHORUS_{}_KEY", held.kind), String::from_utf8_lossy(&held.key).as_ref())
        .env("CHORUS_FENCE_TOKEN", held.token.to_string())
        .env("CHORUS_FENCE", held.fence())
        .env("CHORUS_LEASE", format!("{:x}", held.lease))
        .env("CHORUS_ENDPOINTS", global.endpoints.join(","))
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("Error: cannot run {:?}: {error}", opts.command[0]);
            let _ = close(session, Some(release), client).await;
            return 127;
        }
    };
    let pid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    let status = tokio::select! {
        status = child.wait() => status,
        () = wait_lost(lost) => {
            eprintln!(
                "Error: lost {} (session lease {:x} expired): stopping the command",
                held.name, held.lease
            );
            stop(&mut child, pid, opts.grace).await
        }
        () = terminated() => stop(&mut child, pid, opts.grace).await,
    };
    let _ = close(session, Some(release), client).await;
    match status {
        Ok(status) => exit_code(status),
        Err(error) => {
            eprintln!("Error: waiting for the command: {error}");
            1
        }
    }
}

/// SIGTERM to the command, then SIGKILL after `grace`.
async fn stop(
    child: &mut tokio::process::Child,
    pid: Option<Pid>,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = pid {
        let _ = kill(pid, Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Releases and revokes the session (its keys go with it either way).
async fn close(session: Session, release: Option<Release>, client: &Client) -> Result<(), ()> {
    let released = match release {
        Some(Release::Unlock(key)) => client.unlock(&key).await,
        Some(Release::Resign(leader)) => client.resign(leader).await,
        None => Ok(()),
    };
    let revoked = session.close().await;
    match (released, revoked) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("Error: releasing: {error} (the lease's expiry will release it)");
            Err(())
        }
    }
}

async fn observe(client: &Client, name: &[u8]) -> Result<i32, String> {
    use futures::StreamExt;
    let mut stream = client.observe(name).await.map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(response)) => {
                    if let Some(kv) = response.kv {
                        println!("{}", String::from_utf8_lossy(&kv.key));
                        println!("{}", String::from_utf8_lossy(&kv.value));
                    }
                }
                Some(Err(status)) => return Err(status.message().to_string()),
                None => return Err("the observe stream ended".to_string()),
            },
            () = terminated() => return Ok(0),
        }
    }
}

async fn wait_lost(mut lost: tokio::sync::watch::Receiver<bool>) {
    while !*lost.borrow() {
        if lost.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
