//! The failure detector, indirect probes and clock monitor in the simulator: the
//! production `HealthMonitor` on every node, under scripted faults over a seeded
//! network (delay, up to 2% loss, clock drift).

use chorus_core::health::{Diagnosis, HealthConfig};
use chorus_sim::health_world::HealthWorld;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const SECOND_US: u64 = 1_000_000;

fn all_healthy(world: &HealthWorld, nodes: &[usize]) -> Result<(), String> {
    for &node in nodes {
        for &peer in nodes {
            if node != peer {
                let diagnosis = world.diagnosis(node, peer);
                if !matches!(diagnosis, Diagnosis::Healthy) {
                    return Err(format!("node {node} sees {peer} {}", diagnosis.as_str()));
                }
            }
        }
    }
    Ok(())
}

/// Runs every scripted fault of the issue on one seed; returns the trace hash.
fn scenario(seed: u64) -> u64 {
    let mut world = HealthWorld::new(seed, 3, HealthConfig::default());
    world.run_for(5 * SECOND_US);
    all_healthy(&world, &[A, B, C]).unwrap_or_else(|e| panic!("seed {seed}, at start: {e}"));

    // 1. Only the link A-B is cut: A and B blame the link, C sees both healthy.
    let cut_at = world.now_us();
    world.set_link(A, B, false);
    world.run_for(6 * SECOND_US);
    assert_eq!(world.diagnosis(A, B), Diagnosis::LinkFailure, "seed {seed}: A's view of B");
    assert_eq!(world.diagnosis(B, A), Diagnosis::LinkFailure, "seed {seed}: B's view of A");
    assert_eq!(world.diagnosis(C, A), Diagnosis::Healthy, "seed {seed}: C's view of A");
    assert_eq!(world.diagnosis(C, B), Diagnosis::Healthy, "seed {seed}: C's view of B");
    assert_eq!(world.diagnosis(A, C), Diagnosis::Healthy, "seed {seed}");
    assert_eq!(world.diagnosis(B, C), Diagnosis::Healthy, "seed {seed}");
    let wrongly_down =
        world.transitions.iter().filter(|t| t.at_us >= cut_at && t.to == Diagnosis::NodeDown).count();
    assert_eq!(wrongly_down, 0, "seed {seed}: a cut link was taken for a dead node");

    // Heal: back to healthy.
    world.set_link(A, B, true);
    world.run_for(3 * SECOND_US);
    all_healthy(&world, &[A, B, C]).unwrap_or_else(|e| panic!("seed {seed}, after healing the link: {e}"));

    // 2. B crashes: everyone else reports it down.
    world.crash(B);
    world.run_for(6 * SECOND_US);
    assert_eq!(world.diagnosis(A, B), Diagnosis::NodeDown, "seed {seed}");
    assert_eq!(world.diagnosis(C, B), Diagnosis::NodeDown, "seed {seed}");
    all_healthy(&world, &[A, C]).unwrap_or_else(|e| panic!("seed {seed}, B crashed: {e}"));
    world.restart(B);
    world.run_for(4 * SECOND_US);
    all_healthy(&world, &[A, B, C]).unwrap_or_else(|e| panic!("seed {seed}, after B restarted: {e}"));

    // 3. B's wall clock jumps two seconds ahead: the alarm fires on every node
    //    (A and C about B, B about A and C); Raft and the diagnoses do not care.
    assert!(world.alarms.is_empty(), "seed {seed}: alarms before any skew: {:?}", world.alarms);
    world.set_wall_offset(B, 2_000);
    world.run_for(3 * SECOND_US);
    let expected: Vec<(usize, usize)> = vec![(A, B), (B, A), (B, C), (C, B)];
    assert_eq!(world.alarms.iter().copied().collect::<Vec<_>>(), expected, "seed {seed}");
    all_healthy(&world, &[A, B, C]).unwrap_or_else(|e| panic!("seed {seed}, skewed: {e}"));

    // Heal the clock: the alarms clear (once the skewed samples leave the window).
    world.set_wall_offset(B, 0);
    world.run_for(3 * SECOND_US);
    assert!(world.alarms.is_empty(), "seed {seed}: alarms after healing: {:?}", world.alarms);
    all_healthy(&world, &[A, B, C]).unwrap_or_else(|e| panic!("seed {seed}, at the end: {e}"));
    world.trace_hash()
}

#[test]
fn link_cut_crash_and_clock_skew_are_diagnosed_and_heal() {
    for seed in 1..=20 {
        scenario(seed);
    }
}

#[test]
fn health_runs_are_deterministic() {
    assert_eq!(scenario(42), scenario(42));
    assert_ne!(scenario(42), scenario(43));
}

#[test]
fn a_node_cut_off_from_everyone_is_down_for_all() {
    let mut world = HealthWorld::new(7, 3, HealthConfig::default());
    world.run_for(3 * SECOND_US);
    world.set_link(A, B, false);
    world.set_link(A, C, false);
    world.run_for(6 * SECOND_US);
    // B and C each ask the other, who cannot reach A either: node down (or isolated).
    assert_eq!(world.diagnosis(B, A), Diagnosis::NodeDown);
    assert_eq!(world.diagnosis(C, A), Diagnosis::NodeDown);
    // A has no peer left to ask: from where it stands, both are down.
    assert_eq!(world.diagnosis(A, B), Diagnosis::NodeDown);
    assert_eq!(world.diagnosis(A, C), Diagnosis::NodeDown);
    assert_eq!(world.diagnosis(B, C), Diagnosis::Healthy);
}
