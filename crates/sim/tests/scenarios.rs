//! Hand-written fault scenarios with timing assertions, and proof that the
//! checkers are not vacuous.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use understudy_core::spec::ClusterSpec;
use understudy_core::testkit;
use understudy_sim::{Change, Fault, Killer, Options, Sim, Violation, run_seed};

const TTL: u64 = 2_000;

/// Two nodes, group `web` preferring node1: vip <- db <- app.
fn spec() -> ClusterSpec {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "web");
    g.resources = vec![
        testkit::process("vip", &[]),
        testkit::process("db", &["vip"]),
        testkit::process("app", &["db"]),
    ];
    spec.groups.push(g);
    spec
}

/// Boots the cluster and checks node1 runs `web` by t = 3 s.
fn running(opts: Options) -> Sim {
    let mut sim = Sim::new(spec(), opts, 7);
    sim.boot();
    sim.run_until(3_000).unwrap();
    assert!(sim.fully_running("web", "node1"), "{:?}", sim.history());
    assert_eq!(sim.owner("web").map(|o| o.0).as_deref(), Some("node1"));
    sim
}

/// The first time a resource began starting on `node` at or after `after`.
fn first_start(sim: &Sim, node: &str, after: u64) -> Option<u64> {
    let n = sim.node_index(node).unwrap();
    sim.history()
        .iter()
        .find(|h| h.node == n && h.at >= after && h.change == Change::StartBegun)
        .map(|h| h.at)
}

/// When every one of node's resources had died by `killer` after `after`.
fn kills(sim: &Sim, node: &str, after: u64, killer: Killer) -> Vec<u64> {
    let n = sim.node_index(node).unwrap();
    sim.history()
        .iter()
        .filter(|h| h.node == n && h.at >= after && h.change == Change::Killed(killer))
        .map(|h| h.at)
        .collect()
}

#[test]
fn owner_crash_is_taken_over_once_its_lease_expires() {
    let mut sim = running(Options::default());
    sim.inject_at(
        5_000,
        Fault::Crash {
            node: 0,
            down_for: 100_000,
        },
    );
    sim.run_until(15_000).unwrap();
    assert!(sim.fully_running("web", "node2"));
    assert_eq!(sim.owner("web").map(|o| o.0).as_deref(), Some("node2"));
    // node1's last keep-alive reached the coordinator at most one renew
    // interval (500 ms) before the crash: the key cannot go before
    // crash - 500 + TTL, and is taken soon after it goes.
    let takeover = first_start(&sim, "node2", 5_000).expect("node2 starts the group");
    assert!(
        (5_000 + TTL - 500..=5_000 + TTL + 500).contains(&takeover),
        "takeover at {takeover}"
    );
}

/// SIGSTOP of node1 for 5 s (longer than the TTL) at t = 5 s.
fn sigstop(opts: Options) -> (Sim, Result<(), Violation>) {
    let mut sim = running(opts);
    sim.inject_at(5_000, Fault::Pause { node: 0, ms: 5_000 });
    let result = sim.run_until(20_000);
    (sim, result)
}

#[test]
fn a_stopped_owner_is_fenced_by_its_guard_before_another_node_starts() {
    let (sim, result) = sigstop(Options::default());
    result.unwrap();
    let killed = kills(&sim, "node1", 5_000, Killer::Guard);
    assert_eq!(killed.len(), 3, "the guard kills vip, db, app: {:?}", sim.history());
    let takeover = first_start(&sim, "node2", 5_000).expect("node2 takes over");
    let last_kill = *killed.iter().max().unwrap();
    assert!(last_kill < takeover, "guard at {last_kill}, takeover at {takeover}");
    assert!(last_kill <= 5_000 + TTL, "the guard acts before the lease can expire");
    // After SIGCONT node1 finds its deadline passed and starts nothing.
    assert!(sim.fully_running("web", "node2"));
    assert_eq!(first_start(&sim, "node1", 5_000), None);
}

#[test]
fn the_safety_checker_catches_a_missing_guard() {
    let (sim, result) = sigstop(Options {
        guard: false,
        ..Options::default()
    });
    match result {
        Err(Violation::Safety { group, nodes }) => {
            assert_eq!(group, "web");
            assert_eq!(nodes, ["node1", "node2"]);
        }
        other => panic!("expected a safety violation, got {other:?}; {:?}", sim.history()),
    }
}

#[test]
fn a_partitioned_owner_fences_itself_before_another_node_starts() {
    let mut sim = running(Options::default());
    sim.inject_at(5_000, Fault::Partition { node: 0, ms: 5_000 });
    sim.run_until(20_000).unwrap();
    let n1 = sim.node_index("node1").unwrap();
    let fenced: Vec<u64> = sim
        .history()
        .iter()
        .filter(|h| h.node == n1 && h.at >= 5_000 && h.change == Change::StopBegun { urgent: true })
        .map(|h| h.at)
        .collect();
    assert_eq!(fenced.len(), 3, "node1 stops everything at once: {:?}", sim.history());
    assert!(kills(&sim, "node1", 5_000, Killer::Guard).is_empty(), "no guard needed");
    let takeover = first_start(&sim, "node2", 5_000).expect("node2 takes over");
    assert!(fenced.iter().all(|&t| t < takeover));
    // The partition heals; manual failback: node2 keeps the group.
    assert!(sim.fully_running("web", "node2"));
    assert_eq!(first_start(&sim, "node1", 5_000), None);
}

#[test]
fn monitor_failures_past_the_restart_limit_fail_the_group_over() {
    let mut sim = running(Options::default());
    let db = sim.resource_index("db").unwrap();
    sim.inject_at(
        5_000,
        Fault::FailMonitor {
            node: 0,
            resource: db,
            ms: 30_000,
        },
    );
    sim.run_until(20_000).unwrap();
    // Two restarts allowed (testkit: 2 within 1 min), then failover.
    let n1 = sim.node_index("node1").unwrap();
    let db_starts = sim
        .history()
        .iter()
        .filter(|h| h.node == n1 && h.resource == db && h.at >= 5_000 && h.change == Change::StartBegun)
        .count();
    assert_eq!(db_starts, 2, "{:?}", sim.history());
    assert!(sim.fully_running("web", "node2"));
    let view = sim.coordinator().view();
    let failures = view.failures.get("web").cloned().unwrap_or_default();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].node, "node1");
    assert_eq!(failures[0].resource.as_deref(), Some("db"));
}

#[test]
fn the_liveness_checker_notices_a_group_that_is_not_running() {
    let mut sim = running(Options::default());
    assert!(sim.liveness().is_ok());
    sim.inject_at(
        5_000,
        Fault::Crash {
            node: 0,
            down_for: 100_000,
        },
    );
    sim.run_until(5_500).unwrap();
    // node1's registration and key are still there, but nothing runs.
    assert!(matches!(sim.liveness(), Err(Violation::Liveness { .. })));
    sim.run_until(15_000).unwrap();
    assert!(sim.liveness().is_ok(), "{:?}", sim.liveness());
}

#[test]
fn a_seed_replays_bit_for_bit() {
    for seed in [1, 2, 3] {
        let a = run_seed(seed, &Options::default());
        let b = run_seed(seed, &Options::default());
        assert_eq!(a.map_err(|r| r.to_string()), b.map_err(|r| r.to_string()));
    }
    let opts = Options::default();
    let (shape, schedule) = understudy_sim::scenario(42, &opts);
    let (one, r1) = understudy_sim::run(42, &shape, &schedule, &opts);
    let traced = Options { trace: true, ..opts };
    let (two, r2) = understudy_sim::run(42, &shape, &schedule, &traced);
    assert_eq!(r1, r2);
    assert_eq!(one.history(), two.history(), "tracing changes nothing");
    assert!(!two.trace_lines().is_empty());
}
