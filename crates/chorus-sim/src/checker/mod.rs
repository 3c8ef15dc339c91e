//! Checkers of simulated runs. Each capability adds its own module here and one
//! entry to [`all`]; none needs to know about the others.
//!
//! Invariants that must hold at every step (one leader per term, committed entries
//! never change, applied index never goes back, serializable reads never go back)
//! are checked by the world as it runs, because they need its moment-to-moment
//! state; what can be judged from the finished run lives here.

pub mod linearizability;

use crate::world::RunReport;

/// Judges a finished run; returns one line per violation found.
pub trait Checker {
    /// A short name, for reports.
    fn name(&self) -> &'static str;
    fn check(&self, run: &RunReport) -> Vec<String>;
}

/// Every checker that judges a finished run.
pub fn all() -> Vec<Box<dyn Checker>> {
    vec![Box::new(KvLinearizability)]
}

/// Linearizability of the KV history, per key; a lost acknowledged write shows
/// here too, because the final reads after healing are part of the history.
pub struct KvLinearizability;

/// Search steps the linearizability checker may take per key before it gives up
/// (reported as inconclusive, which counts as a failure).
pub const CHECK_STEPS_MAX_PER_KEY: u64 = 5_000_000;

impl Checker for KvLinearizability {
    fn name(&self) -> &'static str {
        "kv-linearizability"
    }

    fn check(&self, run: &RunReport) -> Vec<String> {
        use linearizability::{check_history, Verdict};
        match check_history(&run.history, CHECK_STEPS_MAX_PER_KEY) {
            Verdict::Linearizable => Vec::new(),
            Verdict::NotLinearizable { key, detail } => {
                vec![format!("not linearizable on key {}: {detail}", String::from_utf8_lossy(&key))]
            }
            Verdict::Inconclusive { key, detail } => vec![format!(
                "linearizability check inconclusive on key {}: {detail}",
                String::from_utf8_lossy(&key)
            )],
        }
    }
}
