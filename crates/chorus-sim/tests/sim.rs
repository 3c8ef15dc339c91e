//! The simulator in CI: a batch of seeds must pass, every kept regression seed must
//! pass, the same seed must give the same trace, and each deliberate bug must be
//! caught within a bounded number of seeds (a checker that never fails is a defect).

use chorus_sim::{run_seed, Bug};

/// Seeds run in CI, in two halves that run in parallel; `docs/TESTING.md` says how
/// to run many more.
const CI_SEEDS_HALF_COUNT: u64 = 150;
/// A deliberate bug must be caught within this many seeds.
const BUG_SEEDS_MAX: u64 = 30;

fn assert_clean(seed: u64, bug: Option<Bug>) {
    let outcome = run_seed(seed, bug);
    assert!(
        outcome.violations.is_empty(),
        "seed {seed} found: {:#?}\nlast events:\n{}\nreplay: cargo run -p chorus-sim --release -- --seed {seed}",
        outcome.violations,
        outcome.trace.join("\n")
    );
}

fn seed_batch_start() -> u64 {
    std::env::var("CHORUS_SIM_START").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

#[test]
fn a_first_batch_of_seeds_finds_no_violation() {
    let start = seed_batch_start();
    for seed in start..start + CI_SEEDS_HALF_COUNT {
        assert_clean(seed, None);
    }
}

#[test]
fn a_second_batch_of_seeds_finds_no_violation() {
    let start = seed_batch_start() + CI_SEEDS_HALF_COUNT;
    for seed in start..start + CI_SEEDS_HALF_COUNT {
        assert_clean(seed, None);
    }
}

#[test]
fn every_kept_regression_seed_passes() {
    let text = include_str!("../regressions.txt");
    let seeds: Vec<u64> = text
        .lines()
        .map(|line| line.split('#').next().unwrap().trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a seed number"))
        .collect();
    for seed in seeds {
        assert_clean(seed, None);
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [3, 17] {
        let first = run_seed(seed, None);
        let second = run_seed(seed, None);
        assert_eq!(first.trace_hash, second.trace_hash, "seed {seed} is not deterministic");
        assert_eq!(first.summary, second.summary);
    }
}

/// The first seed on which `bug` is caught: a checker's violation, or a panic of
/// the production code's own consistency assertions (raft-rs refuses a commit index
/// beyond a log that lost acknowledged entries: that is the bug detected too). A run
/// without a bug switch never gets this allowance (`assert_clean`).
fn first_seed_catching(bug: Bug) -> Option<(u64, Vec<String>)> {
    (0..BUG_SEEDS_MAX).find_map(|seed| match std::panic::catch_unwind(|| run_seed(seed, Some(bug))) {
        Ok(outcome) => (!outcome.violations.is_empty()).then_some((seed, outcome.violations)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some((seed, vec![format!("the node panicked: {message}")]))
        }
    })
}

#[test]
fn stale_reads_are_caught() {
    let (seed, violations) = first_seed_catching(Bug::StaleReads).expect("stale reads went unnoticed");
    eprintln!("stale-reads caught at seed {seed}: {}", violations[0]);
    assert!(violations.iter().any(|v| v.contains("not linearizable")), "{violations:?}");
}

#[test]
fn acknowledging_before_fsync_is_caught() {
    let (seed, violations) = first_seed_catching(Bug::AckBeforeFsync).expect("lost fsyncs went unnoticed");
    eprintln!("ack-before-fsync caught at seed {seed}: {}", violations[0]);
}

#[test]
fn acknowledging_lease_keep_alives_without_renewing_is_caught() {
    let (seed, violations) =
        first_seed_catching(Bug::LeaseAckWithoutRenew).expect("early lease expiry went unnoticed");
    eprintln!("lease-ack-without-renew caught at seed {seed}: {}", violations[0]);
    assert!(violations.iter().any(|v| v.contains("gone")), "{violations:?}");
}

#[test]
fn unfenced_lock_writes_lose_updates_and_are_caught() {
    let (seed, violations) =
        first_seed_catching(Bug::UnfencedLock).expect("stale writes of paused lock holders went unnoticed");
    eprintln!("unfenced-lock caught at seed {seed}: {}", violations[0]);
    assert!(violations.iter().any(|v| v.contains("lost update")), "{violations:?}");
}

#[test]
fn snapshots_that_lose_a_record_are_caught() {
    let (seed, violations) =
        first_seed_catching(Bug::SnapshotDropsRecord).expect("a snapshot missing a record went unnoticed");
    eprintln!("snapshot-drops-record caught at seed {seed}: {}", violations[0]);
}

#[test]
fn queue_acks_that_ignore_the_claim_token_are_caught() {
    let (seed, violations) =
        first_seed_catching(Bug::QueueAckWithoutToken).expect("stale queue acks went unnoticed");
    eprintln!("queue-ack-without-token caught at seed {seed}: {}", violations[0]);
    assert!(violations.iter().any(|v| v.contains("had already ended")), "{violations:?}");
}

/// The queue and barrier workloads really run: messages are delivered and acked,
/// stale acks are refused, and barriers trip (a workload that did nothing would
/// make its checkers pass vacuously).
#[test]
fn the_queue_and_barrier_workloads_do_work() {
    let mut totals = [0u64; 6];
    for seed in 0..8 {
        let outcome = run_seed(seed, None);
        assert!(outcome.violations.is_empty(), "seed {seed}: {:?}", outcome.violations);
        let line =
            outcome.trace.iter().find(|l| l.contains("coord:")).expect("the coordination summary line");
        let numbers: Vec<u64> =
            line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).skip(2).collect();
        for (total, n) in totals.iter_mut().zip(numbers) {
            *total += n;
        }
    }
    eprintln!("8 seeds: enqueued, delivered, settled, stale refused, barrier passes, timeouts = {totals:?}");
    assert!(totals[0] > 0 && totals[1] > 0 && totals[2] > 0, "{totals:?}");
    assert!(totals[3] > 0, "no stale ack was ever tried: {totals:?}");
    assert!(totals[4] > 0, "no barrier ever tripped: {totals:?}");
}
