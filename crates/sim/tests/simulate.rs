//! Random fault schedules against random cluster shapes.
//!
//! Environment:
//! - `SIM_SCHEDULES=n`: how many schedules run (default 10 000), seeds
//!   `SIM_FIRST..SIM_FIRST+n` (`SIM_FIRST` defaults to 0);
//! - `SIM_SEED=n`: replay one seed; on a violation it prints the shape, the
//!   faults and the last trace lines (`SIM_TRACE_LINES`, default 200);
//! - `SIM_PHASE_MS=n`: length of the fault phase (default 15 000; soak runs
//!   use 60 000);
//! - `SIM_VERBOSE=1`: one line per seed.
//!
//! `cargo test -p understudy-sim --test simulate -- --nocapture` shows the
//! summed counters (guard kills, fences, takeovers, …).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use understudy_sim::{Options, Report, Stats, run_seed};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn random_schedules_keep_every_invariant() {
    let mut opts = Options::default();
    if let Some(lines) = env_u64("SIM_TRACE_LINES") {
        opts.trace_lines = lines as usize;
    }
    if let Some(ms) = env_u64("SIM_PHASE_MS") {
        opts.fault_phase_ms = ms;
    }
    if let Some(seed) = env_u64("SIM_SEED") {
        match run_seed(seed, &opts) {
            Ok(stats) => println!("seed {seed}: ok {stats:?}"),
            Err(report) => panic!("{report}"),
        }
        return;
    }
    let count = env_u64("SIM_SCHEDULES").unwrap_or(10_000);
    let first = env_u64("SIM_FIRST").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(16) as u64;
    let verbose = std::env::var_os("SIM_VERBOSE").is_some();
    let started = Instant::now();
    let next = AtomicU64::new(first);
    let stop = AtomicBool::new(false);
    let failures: Mutex<Vec<Box<Report>>> = Mutex::new(Vec::new());
    let total: Mutex<Stats> = Mutex::new(Stats::default());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut mine = Stats::default();
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + count {
                        break;
                    }
                    let t = Instant::now();
                    let result = run_seed(seed, &opts);
                    if verbose {
                        let outcome = match &result {
                            Ok(st) => format!("ok steps {} handled {} settle {}ms", st.steps, st.handled, st.settle_ms),
                            Err(r) => format!("FAILED {}", r.violation),
                        };
                        println!("seed {seed}: {:.1}ms {outcome}", t.elapsed().as_secs_f64() * 1e3);
                    }
                    match result {
                        Ok(stats) => mine.add(&stats),
                        Err(report) => {
                            let mut f = failures.lock().unwrap();
                            f.push(report);
                            if f.len() >= 5 {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                total.lock().unwrap().add(&mine);
            });
        }
    });
    let total = total.into_inner().unwrap();
    println!(
        "{count} schedules in {:.1}s on {threads} threads: {total:?}",
        started.elapsed().as_secs_f64()
    );
    let mut failures = failures.into_inner().unwrap();
    if count >= 1_000 && failures.is_empty() {
        // The faults bite and the end checks check something.
        assert!(total.guard_kills > 0 && total.fences > 0 && total.ownership_lost > 0);
        assert!(total.takeovers > 0 && total.failovers > 0 && total.late_requests > 0);
        assert!(total.groups_placed > total.groups_unplaced);
    }
    failures.sort_by_key(|r| r.seed);
    if let Some(first) = failures.first() {
        let seeds: Vec<String> = failures
            .iter()
            .map(|r| format!("{} ({})", r.seed, r.violation.kind()))
            .collect();
        panic!("failing seeds: {}\n\n{first}", seeds.join(", "));
    }
}
