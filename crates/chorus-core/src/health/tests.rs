use super::phi::{phi_of, PhiConfig, PhiDetector};
use super::*;

fn phi_config(min_std_deviation_ms: f64) -> PhiConfig {
    PhiConfig {
        window_samples: 100,
        min_std_deviation_ms,
        acceptable_pause_ms: 500.0,
        first_estimate_ms: 100.0,
    }
}

/// The y at which Akka's logistic tail reaches 10^-8, i.e. phi = 8, solved here by
/// bisection of `y (1.5976 + 0.070566 y^2) = ln((1 - 1e-8) / 1e-8)`: 5.22599.
fn y_at_phi_8() -> f64 {
    let target = ((1.0 - 1e-8) / 1e-8_f64).ln();
    let (mut low, mut high) = (0.0_f64, 20.0_f64);
    for _ in 0..200 {
        let mid = (low + high) / 2.0;
        if mid * (1.5976 + 0.070566 * mid * mid) < target {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

/// First ms after the last heartbeat at which phi reaches 8.
fn first_ms_with_phi_8(detector: &PhiDetector, last_ms: u64) -> u64 {
    (last_ms..last_ms + 100_000).find(|&t| detector.phi(t) >= 8.0).expect("phi reaches 8")
}

#[test]
fn phi_is_low_while_heartbeats_are_steady() {
    let mut detector = PhiDetector::new(phi_config(100.0), 0);
    let mut now = 0;
    for i in 0..300u64 {
        now += 100 + (i % 5) * 10 - 20; // 80..120 ms, mean 100
        assert!(detector.phi(now) < 1.0, "phi {} at a heartbeat arriving on time", detector.phi(now));
        detector.heartbeat(now, 8.0);
    }
    // Even a heartbeat 300 ms late (400 ms gap) is well below "slow" (3) with the pause of 500 ms.
    assert!(detector.phi(now + 400) < 1.0);
    assert!((detector.mean_ms() - 100.0).abs() < 1.0);
}

#[test]
fn phi_crosses_8_when_analytically_expected_with_the_minimum_deviation() {
    let mut detector = PhiDetector::new(phi_config(100.0), 0);
    let mut now = 0;
    for _ in 0..200 {
        now += 100;
        detector.heartbeat(now, 8.0);
    }
    // Every interval is 100 ms: the window's deviation is 0, so the floor (100 ms)
    // is used; the mean is 100 ms + 500 ms of acceptable pause.
    let expected_ms = 600.0 + 100.0 * y_at_phi_8(); // 1122.6 ms
    let crossed_ms = (first_ms_with_phi_8(&detector, now) - now) as f64;
    assert!(
        (crossed_ms - expected_ms).abs() <= 2.0,
        "phi crossed 8 after {crossed_ms} ms, expected {expected_ms}"
    );
    assert!((expected_ms - 1122.6).abs() < 0.1);
    // And the detector is monotonic in elapsed time.
    assert!(detector.phi(now + 700) < detector.phi(now + 900));
}

#[test]
fn phi_crosses_8_when_analytically_expected_with_the_measured_deviation() {
    let mut detector = PhiDetector::new(phi_config(10.0), 0);
    let mut now = 0;
    for i in 0..200u64 {
        now += if i % 2 == 0 { 50 } else { 150 }; // mean 100 ms, deviation 50 ms
        detector.heartbeat(now, 8.0);
    }
    assert!((detector.std_deviation_ms() - 50.0).abs() < 0.5);
    let expected_ms = 600.0 + 50.0 * y_at_phi_8(); // 861.3 ms
    let crossed_ms = (first_ms_with_phi_8(&detector, now) - now) as f64;
    assert!(
        (crossed_ms - expected_ms).abs() <= 2.0,
        "phi crossed 8 after {crossed_ms} ms, expected {expected_ms}"
    );
}

#[test]
fn phi_of_matches_the_normal_tail_near_the_mean() {
    assert!((phi_of(100.0, 100.0, 10.0) - 2f64.log10()).abs() < 1e-9); // P = 1/2
    assert!(phi_of(0.0, 100.0, 10.0) < 1e-3);
    let far = phi_of(1e9, 0.0, 1.0);
    assert!(far.is_finite() && far > 100.0);
}

#[test]
fn an_outage_is_not_learned_as_a_normal_interval() {
    let mut detector = PhiDetector::new(phi_config(100.0), 0);
    let mut now = 0;
    for _ in 0..100 {
        now += 100;
        detector.heartbeat(now, 8.0);
    }
    now += 10_000; // a ten-second outage
    detector.heartbeat(now, 8.0);
    assert!((detector.mean_ms() - 100.0).abs() < 1e-9);
}

#[test]
fn clock_offset_uses_the_tightest_round_trip() {
    let mut clock = clock::ClockEstimator::new(8);
    clock.sample(1_000, 3_050, 100.0); // offset 2000 ± 50
    clock.sample(2_000, 4_010, 20.0); // offset 2000 ± 10
    let estimate = clock.estimate().unwrap();
    assert_eq!(estimate.offset_ms, 2000.0);
    assert_eq!(estimate.bound_ms, 11.0); // half the round trip + 1 ms of clock resolution
    assert_eq!(estimate.skew_at_least_ms(), 1989.0);
}

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;

fn pong_for(ping: &Ping, wall_offset_ms: i64) -> Pong {
    answer_ping(ping, ping.sent_wall_ms + wall_offset_ms)
}

/// Drives A's monitor for `duration_ms` in 10 ms steps; pings to peers in `answering`
/// are answered 1 ms later. Returns every effect seen.
fn drive(
    monitor: &mut HealthMonitor,
    now: &mut u64,
    duration_ms: u64,
    answering: &[u64],
    probe_answers: &dyn Fn(u64, u64) -> Option<bool>,
) -> Vec<HealthEffect> {
    let mut seen = Vec::new();
    let end = *now + duration_ms;
    while *now < end {
        *now += 10;
        let effects = monitor.on_tick(*now, *now as i64 + 1_000_000);
        for effect in effects {
            match &effect {
                HealthEffect::SendPing { to, ping } if answering.contains(to) => {
                    seen.extend(monitor.on_pong(*to, &pong_for(ping, 0), *now + 1));
                }
                HealthEffect::AskProbe { helper, target, round } => {
                    if let Some(reached) = probe_answers(*helper, *target) {
                        seen.extend(monitor.on_probe_result(*helper, *target, *round, reached, *now + 2));
                    }
                }
                _ => {}
            }
            seen.push(effect);
        }
    }
    seen
}

#[test]
fn a_peer_reached_by_a_helper_is_a_link_failure_and_recovers() {
    let mut monitor = HealthMonitor::new(A, [A, B, C], HealthConfig::default(), 0);
    let mut now = 0;
    drive(&mut monitor, &mut now, 3_000, &[B, C], &|_, _| None);
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::Healthy));
    // B stops answering A, but C reaches it.
    drive(&mut monitor, &mut now, 3_000, &[C], &|helper, _| Some(helper == C));
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::LinkFailure));
    assert_eq!(monitor.diagnosis(C), Some(Diagnosis::Healthy));
    let effects = drive(&mut monitor, &mut now, 1_000, &[B, C], &|_, _| None);
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::Healthy));
    assert!(effects.iter().any(|e| matches!(
        e,
        HealthEffect::DiagnosisChanged { peer: B, from: Diagnosis::LinkFailure, to: Diagnosis::Healthy, .. }
    )));
}

#[test]
fn a_peer_nobody_reaches_is_down_and_goes_through_suspected() {
    let mut monitor = HealthMonitor::new(A, [A, B, C], HealthConfig::default(), 0);
    let mut now = 0;
    drive(&mut monitor, &mut now, 3_000, &[B, C], &|_, _| None);
    let effects = drive(&mut monitor, &mut now, 1_500, &[C], &|_, _| None); // C's probe never answers
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::Suspected));
    assert!(effects.iter().any(|e| matches!(e, HealthEffect::AskProbe { helper: C, target: B, .. })));
    drive(&mut monitor, &mut now, 1_500, &[C], &|_, _| None); // the probe times out
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::NodeDown));
    drive(&mut monitor, &mut now, 3_000, &[C], &|_, _| Some(false)); // later rounds: C says no
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::NodeDown));
}

#[test]
fn a_link_failure_becomes_node_down_only_after_two_unreached_rounds() {
    let mut monitor = HealthMonitor::new(A, [A, B, C], HealthConfig::default(), 0);
    let mut now = 0;
    drive(&mut monitor, &mut now, 3_000, &[B, C], &|_, _| None);
    drive(&mut monitor, &mut now, 2_000, &[C], &|_, _| Some(true));
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::LinkFailure));
    // Now C no longer reaches B either (B crashed after the link failed). Rounds start
    // every probe timeout (1 s): the first unreached round keeps the link failure.
    let effects = drive(&mut monitor, &mut now, 4_000, &[C], &|_, _| Some(false));
    let changes: Vec<(Diagnosis, Diagnosis)> = effects
        .iter()
        .filter_map(|e| match e {
            HealthEffect::DiagnosisChanged { peer: B, from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(changes, vec![(Diagnosis::LinkFailure, Diagnosis::NodeDown)]);
    let asked = effects.iter().filter(|e| matches!(e, HealthEffect::AskProbe { target: B, .. })).count();
    assert!(asked >= 2, "{asked} probe rounds");
}

#[test]
fn suspicion_takes_as_long_as_phi_says() {
    // Two members: no helper to ask, so B goes straight to node-down when phi reaches 8.
    let mut monitor = HealthMonitor::new(A, [A, B], HealthConfig::default(), 0);
    let mut now = 0;
    drive(&mut monitor, &mut now, 5_000, &[B], &|_, _| None);
    let mut silent_ms_at_detection = None;
    while now < 10_000 {
        now += 1;
        let effects = monitor.on_tick(now, 0);
        if effects.iter().any(|e| matches!(e, HealthEffect::DiagnosisChanged { to: Diagnosis::NodeDown, .. }))
        {
            silent_ms_at_detection = Some(monitor.report(now)[0].last_heard_ms_ago);
            break;
        }
    }
    // Steady pongs every 100 ms: phi reaches 8 1122.6 ms after the last (see the phi
    // tests); the first interval (start to first pong, 11 ms) pulls the mean of the 52
    // samples down to 98.3 ms, hence 1120.9 ms.
    let silent_ms = silent_ms_at_detection.expect("B is diagnosed down");
    assert!((1_119..=1_124).contains(&silent_ms), "detected after {silent_ms} ms of silence");
}

#[test]
fn slow_round_trips_make_a_peer_slow() {
    let mut monitor = HealthMonitor::new(A, [A, B], HealthConfig::default(), 0);
    let mut now = 0;
    drive(&mut monitor, &mut now, 5_000, &[B], &|_, _| None);
    // Now B answers 60 ms late (usual round trip: 1 ms).
    let mut slow_seen = false;
    for _ in 0..20 {
        now += 100;
        for effect in monitor.on_tick(now, 0) {
            if let HealthEffect::SendPing { to: B, ping } = effect {
                monitor.on_pong(B, &pong_for(&ping, 0), now + 60);
            }
        }
        slow_seen |= monitor.diagnosis(B) == Some(Diagnosis::Slow);
    }
    assert!(slow_seen);
    assert_eq!(monitor.diagnosis(B), Some(Diagnosis::Slow));
}

#[test]
fn clock_skew_raises_and_clears_an_alarm() {
    let mut monitor = HealthMonitor::new(A, [A, B], HealthConfig::default(), 0);
    let mut now = 0;
    let mut alarms = Vec::new();
    for step in 0..40u64 {
        now += 100;
        let skew = if step < 20 { 2_000 } else { 0 };
        for effect in monitor.on_tick(now, 5_000 + now as i64) {
            if let HealthEffect::SendPing { to: B, ping } = effect {
                alarms.extend(monitor.on_pong(B, &pong_for(&ping, skew), now + 4));
            }
        }
    }
    let raised: Vec<bool> = alarms
        .iter()
        .filter_map(|e| match e {
            HealthEffect::ClockAlarm { raised, offset, .. } => {
                if *raised {
                    assert!((offset.offset_ms - 1998.0).abs() < 1e-9 && offset.bound_ms == 3.0);
                }
                Some(*raised)
            }
            _ => None,
        })
        .collect();
    assert_eq!(raised, vec![true, false]);
}

#[test]
fn bad_configurations_are_refused_with_the_flag_named() {
    assert!(HealthConfig::default().validate().is_ok());
    let bad = |change: fn(&mut HealthConfig), flag: &str| {
        let mut config = HealthConfig::default();
        change(&mut config);
        let error = config.validate().unwrap_err();
        assert!(error.contains(flag), "{error}");
    };
    bad(|c| c.heartbeat_interval_ms = 0, "--health-heartbeat-interval");
    bad(|c| c.phi_threshold = f64::NAN, "--phi-threshold");
    bad(|c| c.phi_threshold = 0.0, "--phi-threshold");
    bad(|c| c.phi_slow_threshold = 9.0, "--phi-slow-threshold");
    bad(|c| c.phi_window_samples = 1, "--phi-window");
    bad(|c| c.phi_min_std_deviation_ms = 0, "--phi-min-std-deviation");
    bad(|c| c.probe_timeout_ms = 1, "--probe-timeout");
    bad(|c| c.max_clock_skew_ms = 0, "--max-clock-skew");
}
