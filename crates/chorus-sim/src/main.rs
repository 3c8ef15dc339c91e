//! `chorus-sim`: run the simulator over one seed or many.
//!
//! - `cargo run -p chorus-sim --release -- --seed N` replays one seed, printing every
//!   derived option first and a summary last;
//! - `cargo run -p chorus-sim --release -- --seeds K [--start S]` runs K seeds and
//!   reports each violation with its replay command;
//! - the last line is always `seeds: K, violations: V (X seeds/s)`.

use std::process::ExitCode;
use std::time::Instant;

use chorus_sim::{run_seed, Bug, SimOptions};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "chorus-sim", about = "Deterministic simulation of a chorus cluster under faults")]
struct Args {
    /// Replay exactly this seed, verbosely.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of a --seeds run.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Switch on a deliberate bug (stale-reads, ack-before-fsync,
    /// lease-ack-without-renew, unfenced-lock, queue-ack-without-token,
    /// snapshot-drops-record) to test the checkers.
    #[arg(long)]
    bug: Option<Bug>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (first, count, verbose) = match (args.seed, args.seeds) {
        (Some(seed), _) => (seed, 1, true),
        (None, Some(count)) => (args.start, count, false),
        (None, None) => (args.start, 100, false),
    };
    let started = Instant::now();
    let mut violations_count = 0u64;
    for seed in first..first.saturating_add(count) {
        if verbose {
            print_options(&SimOptions::from_seed(seed, args.bug));
        }
        let outcome = run_seed(seed, args.bug);
        if verbose {
            for line in &outcome.trace {
                println!("  {line}");
            }
            println!("{}", outcome.summary);
        }
        if !outcome.violations.is_empty() {
            violations_count += 1;
            println!("VIOLATION at seed {seed}:");
            for violation in &outcome.violations {
                println!("  {violation}");
            }
            if !verbose {
                println!("  last events:");
                for line in &outcome.trace {
                    println!("    {line}");
                }
            }
            let bug = args.bug.map(|b| format!(" --bug {}", bug_name(b))).unwrap_or_default();
            println!("  replay: cargo run -p chorus-sim --release -- --seed {seed}{bug}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "seeds: {count}, violations: {violations_count} ({:.2} seeds/s)",
        count as f64 / seconds.max(1e-9)
    );
    if violations_count > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn bug_name(bug: Bug) -> &'static str {
    match bug {
        Bug::StaleReads => "stale-reads",
        Bug::AckBeforeFsync => "ack-before-fsync",
        Bug::LeaseAckWithoutRenew => "lease-ack-without-renew",
        Bug::UnfencedLock => "unfenced-lock",
        Bug::QueueAckWithoutToken => "queue-ack-without-token",
        Bug::SnapshotDropsRecord => "snapshot-drops-record",
    }
}

fn print_options(options: &SimOptions) {
    println!("seed {}: options", options.seed);
    println!("  bug: {:?}", options.bug);
    println!(
        "  nodes: {}, clients: {}, keys: {}",
        options.nodes_count, options.clients_count, options.keys_count
    );
    println!(
        "  phases: faults {} s, quiet {} s",
        options.fault_phase_us / 1_000_000,
        options.quiet_phase_us / 1_000_000
    );
    println!("  tick: {} us, drift per node (ppt): {:?}", options.tick_us, options.tick_drift_ppt);
    println!(
        "  network: delay {}..{} us, loss {} ppm, duplication {} ppm",
        options.delay_min_us, options.delay_max_us, options.drop_ppm, options.duplicate_ppm
    );
    println!("  fsync: {}..{} us", options.fsync_min_us, options.fsync_max_us);
    println!(
        "  storage: checkpoint every {} commits, log segments of {} bytes, up to {} cycles' database writes wait",
        options.checkpoint_commits, options.wal_segment_bytes, options.deferred_cycles_max
    );
    println!("  faults every ~{} ms: {}", options.fault_interval_us / 1000, options.fault_kinds().join(", "));
    println!(
        "  client timeout {} ms, think ~{} ms, serializable gets {}%",
        options.client_timeout_us / 1000,
        options.client_think_us / 1000,
        options.serializable_get_percent
    );
}
