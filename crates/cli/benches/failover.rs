//! Failover benchmark (not a test): real agent processes on the embedded
//! coordinator, 20 runs each of
//! - crash failover: `kill -9` of the owner's agent → the group fully started
//!   on another node (the new owner's "group running" journal entry);
//! - monitor failover: a resource killed, with no restarts allowed → the group
//!   fully started elsewhere; split into detection (kill → the owner's
//!   monitor reports it) and handover (detection → running elsewhere).
//!
//! Run: `cargo bench -p understudy --bench failover` (prints p50/p99).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{NODES, TestCluster, WEB};
use nix::sys::signal::Signal;
use understudy_core::agent::EntryKind;

const RUNS: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

fn bench_definition(ttl_ms: u64, monitor_ms: u64) -> String {
    common::definition(ttl_ms)
        .replace(
            r#"monitor = { interval = "300ms", timeout = "250ms", restarts = 2, within = "1m" }"#,
            &format!(
                r#"monitor = {{ interval = "{monitor_ms}ms", timeout = "{}ms", restarts = 0, within = "1m" }}"#,
                monitor_ms * 3 / 4
            ),
        )
        .replace(
            r#"failover = { threshold = 5, within = "10m" }"#,
            r#"failover = { threshold = 1000, within = "1s" }"#,
        )
}

async fn crash_failovers(ttl_ms: u64) -> Vec<u64> {
    let mut c = TestCluster::new(&bench_definition(ttl_ms, 500)).await;
    c.start_all();
    let mut out = Vec::new();
    for run in 0..RUNS {
        let (owner, new_owner, ms) = c.crash_failover(WAIT).await;
        out.push(ms);
        eprintln!("crash run {run}: {owner} -> {new_owner} in {ms} ms");
    }
    out
}

async fn monitor_failovers() -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let mut c = TestCluster::new(&bench_definition(2_000, 100)).await;
    c.start_all();
    let (mut total, mut detect, mut handover) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let snap = c
            .wait_for("a settled cluster", WAIT, |s| {
                s.running_on("web", &WEB).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
            })
            .await;
        let owner = snap.owner("web").unwrap().to_string();
        // Let the previous run's failure age out of the 1 s window.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let pid = c.pid_of(&owner, "frontend").unwrap();
        let t0 = common::wall_ms();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let snap = c
            .wait_for("web running elsewhere", WAIT, |s| {
                s.running_on("web", &WEB).is_some_and(|n| n != owner)
            })
            .await;
        let new_owner = snap.owner("web").unwrap().to_string();
        let t2 = c.group_running_at(&new_owner, t0).await;
        let journal = c.journal().await;
        let t1 = journal
            .iter()
            .filter(|e| e.node == owner && e.entry.kind == EntryKind::MonitorFailed && e.at >= t0)
            .map(|e| e.at)
            .min()
            .expect("the failure was detected");
        total.push(t2 - t0);
        detect.push(t1 - t0);
        handover.push(t2 - t1);
        eprintln!(
            "monitor run {run}: {owner} -> {new_owner}: detected {} ms, running elsewhere {} ms later",
            t1 - t0,
            t2 - t1
        );
    }
    (total, detect, handover)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("failover benchmark: 3 agents on the embedded coordinator, {RUNS} runs each");
        let crash = crash_failovers(2_000).await;
        let (total, detect, handover) = monitor_failovers().await;
        println!();
        common::summary("crash failover, TTL 2s (kill -9 → running)", crash);
        common::summary("monitor failover, 100ms interval (kill → running)", total);
        common::summary("  detection (kill → monitor failure)", detect);
        common::summary("  handover (detection → running elsewhere)", handover);
    });
}
