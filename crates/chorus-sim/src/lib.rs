//! chorus-sim: the deterministic simulator.
//!
//! One seed derives every option of a run ([`options`]); the [`world`] runs a
//! whole cluster of the production node and storage code under those faults on
//! simulated time, in one thread; the [`checker`]s judge the recorded history.
//! The same seed always gives the same run, down to the trace hash.
//!
//! New capabilities (leases, watches, locks, queues) add their workload to the
//! world and their checker under [`checker`], leaving the others alone.

pub mod barrier_workload;
pub mod checker;
pub mod coord_workload;
pub mod health_world;
pub mod lease_workload;
pub mod lock_workload;
pub mod options;
pub mod queue_workload;
pub mod watch_workload;
pub mod world;

pub use options::{Bug, SimOptions};

/// What one seed found.
#[derive(Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    pub options: SimOptions,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    pub trace_hash: u64,
    pub summary: String,
}

/// Runs one seed and checks everything.
pub fn run_seed(seed: u64, bug: Option<Bug>) -> SeedOutcome {
    let options = SimOptions::from_seed(seed, bug);
    let report = world::World::new(options.clone()).run();
    let mut violations = report.violations.clone();
    for checker in checker::all() {
        violations.extend(checker.check(&report).into_iter().map(|v| format!("[{}] {v}", checker.name())));
    }
    let history = &report.history;
    let ops_unknown = history.iter().filter(|o| o.return_us.is_none()).count();
    let summary = format!(
        "seed {seed}: {} nodes, {} ops ({} acknowledged, {} unknown), {} leader terms, {} crashes, {} snapshots installed, {} events, trace {:016x}",
        options.nodes_count,
        history.len(),
        history.len() - ops_unknown,
        ops_unknown,
        report.leader_changes,
        report.crashes,
        report.snapshots_installed,
        report.events_count,
        report.trace_hash
    );
    SeedOutcome { seed, options, violations, trace: report.trace, trace_hash: report.trace_hash, summary }
}
