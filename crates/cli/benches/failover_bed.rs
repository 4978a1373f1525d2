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

const RUNS: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let w = world("bench");
    let mut times = Vec::new();
    let out = &mut times;
    run(&w, |mut c| async move {
        for i in 0..RUNS {
            let (owner, new_owner, ms) = c.crash_failover(WAIT).await;
            eprintln!("run {i}: {owner} -> {new_owner} in {ms} ms");
            out.push(ms);
        }
    });
    common::summary(
        &format!("crash failover on the bed (etcd, 3 members; TTL {TTL_MS} ms)"),
        times,
    );
}
