//! Crash failover on the multi-host bed (not a test): three agents in their
//! own network namespaces, a 3-member etcd on hosts of its own, lease TTL 2 s
//! (renewals every 500 ms). 20 runs of: `kill -9` of the owner's agent → the
//! group fully started on another node (the new owner's "group running"
//! journal entry). Needs root and etcd.
//!
//! Run: `cargo bench -p understudy --bench failover_bed` (prints p50/p99).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::bed::{TTL_MS, run, world};
use common::{NODES, WEB};
use nix::sys::signal::Signal;
use understudy_core::agent::EntryKind;

const RUNS: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let w = world("bench");
    let mut times = Vec::new();
    let out = &mut times;
    run(&w, |mut c| async move {
        for i in 0..RUNS {
            let snap = c
                .wait_for("a settled cluster", WAIT, |s| {
                    s.running_on("web", &WEB).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
                })
                .await;
            let owner = snap.owner("web").unwrap().to_string();
            let t0 = common::wall_ms();
            c.agents.signal(&owner, Signal::SIGKILL).unwrap();
            let snap = c
                .wait_for("web running elsewhere", WAIT, |s| {
                    s.running_on("web", &WEB).is_some_and(|n| n != owner)
                })
                .await;
            let new_owner = snap.owner("web").unwrap().to_string();
            let t1 = c
                .journal()
                .await
                .into_iter()
                .filter(|e| e.node == new_owner && e.entry.kind == EntryKind::GroupStarted && e.at >= t0)
                .map(|e| e.at)
                .min()
                .unwrap();
            eprintln!("run {i}: {owner} -> {new_owner} in {} ms", t1 - t0);
            out.push(t1 - t0);
            c.agents.reap();
            c.agents.start(&owner).unwrap();
        }
    });
    common::summary(
        &format!("crash failover on the bed (etcd, 3 members; TTL {TTL_MS} ms)"),
        times,
    );
}
