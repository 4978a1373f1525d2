//! A deterministic simulator for understudy's agents.
//!
//! It runs one [`understudy_core::agent::Agent`] per node against an
//! in-memory coordinator with etcd semantics, over a network with latency
//! and faults, on a virtual clock, with a model of each node's resource
//! processes and fence guard — the same things the tokio shell will do for
//! real. A random fault schedule (crashes, SIGSTOP, lost keep-alives,
//! partitions, slow links, failing monitors, killed processes, slow or
//! failing starts, SIGTERM, operator actions) is played against a random
//! cluster shape, and after every step the checkers verify:
//!
//! 1. **safety**: no group has live resources on two nodes;
//! 2. **authority**: a group resource starts only while the coordinator's
//!    owner key belongs to the node, with the Start's fencing token;
//! 3. **order**: a resource starts only when its dependencies run, and an
//!    orderly stop happens only when nothing depending on it is alive;
//! 4. **liveness** (after healing every fault and settling): every group is
//!    fully running exactly where the planner, run on the coordinator's
//!    true state, places it;
//! 5. **fencing**: a failure record (a write on behalf of a group, fenced by
//!    the writer's token) lands only while its node owns the group, and
//!    counts once however often it was retried.
//!
//! Everything random comes from the seed ([`rng::Rng`], SplitMix64), so a
//! failing seed replays bit for bit: `SIM_SEED=n cargo test -p understudy-sim`.

pub mod coord;
pub mod fault;
pub mod report;
pub mod rng;
pub mod shape;
pub mod sim;

pub use fault::{Fault, Schedule};
pub use report::{Report, Violation};
pub use shape::Shape;
pub use sim::{Change, Happening, Killer, Options, Placement, Sim, Stats};

use rng::Rng;

/// The shape and fault schedule a seed stands for.
pub fn scenario(seed: u64, opts: &Options) -> (Shape, Schedule) {
    let shape = shape::random(&mut Rng::stream(seed, "shape"));
    let schedule = fault::random(&mut Rng::stream(seed, "faults"), &shape.spec, opts.fault_phase_ms);
    (shape, schedule)
}

/// Runs `schedule` against `shape`: boot, fault phase, heal, settle,
/// liveness. Returns the simulator (for its stats and history) and the
/// first violation, if any.
pub fn run(seed: u64, shape: &Shape, schedule: &Schedule, opts: &Options) -> (Sim, Result<(), Violation>) {
    let mut sim = Sim::new(shape.spec.clone(), opts.clone(), seed);
    sim.boot();
    sim.load(schedule);
    let result = sim.run_until(opts.fault_phase_ms).and_then(|()| {
        sim.heal();
        if opts.liveness { sim.settle() } else { Ok(()) }
    });
    (sim, result)
}

/// Runs the random scenario of `seed`. On a violation, replays it with
/// tracing on and returns the full report.
pub fn run_seed(seed: u64, opts: &Options) -> Result<Stats, Box<Report>> {
    let (shape, schedule) = scenario(seed, opts);
    let (sim, result) = run(seed, &shape, &schedule, opts);
    match result {
        Ok(()) => Ok(sim.stats()),
        Err(violation) => {
            let traced = Options {
                trace: true,
                ..opts.clone()
            };
            let (replay, _) = run(seed, &shape, &schedule, &traced);
            let at = replay.violation().map_or(sim.now(), |(t, _)| *t);
            let phase = if opts.fault_phase_ms == Options::default().fault_phase_ms {
                String::new()
            } else {
                format!(" SIM_PHASE_MS={}", opts.fault_phase_ms)
            };
            Err(Box::new(Report {
                seed,
                replay: format!("SIM_SEED={seed}{phase} cargo test -p understudy-sim --test simulate -- --nocapture"),
                at,
                violation,
                shape: shape.describe(),
                schedule: schedule.describe(&shape.spec),
                trace: replay.trace_lines(),
            }))
        }
    }
}
