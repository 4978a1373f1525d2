//! The simulation engine: a virtual clock, a queue of timed events, the
//! coordinator model, the network, the nodes (agent, shell, fence guard,
//! resource processes) and the checkers.
//!
//! Everything that happens is an entry in one priority queue ordered by
//! (virtual ms, sequence number); every random draw comes from one seeded
//! stream in the order events are processed. A seed therefore replays the
//! same run bit for bit, with or without tracing.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use understudy_core::agent::{Action, Agent, Authority, ClusterView, Event, Health, Now, Op};
use understudy_core::graph::Catalog;
use understudy_core::observed::Failure;
use understudy_core::planner;
use understudy_core::spec::{ClusterSpec, Role};
use understudy_core::time::{Time, millis};

use crate::coord::{Coord, Fenced};
use crate::fault::{Fault, Named, Schedule};
use crate::report::Violation;
use crate::rng::Rng;

/// Wall-clock time (ms since the Unix epoch) at virtual time zero.
pub const WALL_BASE: u64 = 1_750_000_000_000;
/// How long the shell waits for a coordinator response.
pub const REQUEST_TIMEOUT_MS: u64 = 500;

/// Knobs of a run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The fence guard kills the node's group resources when its deadline
    /// passes. Off = a deliberately broken shell, to prove the checker bites.
    pub guard: bool,
    /// The shell refuses a `Start` whose authority has expired on the
    /// node's clock. Off = a deliberately broken shell.
    pub start_check: bool,
    /// Keep trace lines (slower; failing seeds are replayed with it on).
    pub trace: bool,
    /// How many trace lines to keep.
    pub trace_lines: usize,
    /// Length of the fault phase (virtual ms).
    pub fault_phase_ms: u64,
    /// Longest settle phase after healing (virtual ms).
    pub settle_ms: u64,
    /// The settle phase ends early once liveness has held this long.
    pub stable_ms: u64,
    /// Check liveness after settling.
    pub liveness: bool,
    /// Give up (as a violation) after this many steps.
    pub max_steps: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            guard: true,
            start_check: true,
            trace: false,
            trace_lines: 200,
            fault_phase_ms: 15_000,
            settle_ms: 60_000,
            stable_ms: 2_500,
            liveness: true,
            max_steps: 5_000_000,
        }
    }
}

/// Counters of a run (summed over runs by the tests, to show the faults
/// bite and the checks are not vacuous).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Queue entries processed.
    pub steps: u64,
    /// `Agent::handle` calls.
    pub handled: u64,
    /// Resource starts that passed the shell's authority check.
    pub starts: u64,
    /// Starts the shell refused because their authority had expired.
    pub refused_starts: u64,
    /// Times a fence guard killed live group resources.
    pub guard_kills: u64,
    /// Agents fencing themselves (journal `Fenced`).
    pub fences: u64,
    /// Agents seeing a held owner key gone (journal `OwnershipLost`).
    pub ownership_lost: u64,
    /// Failure-driven failovers (journal `FailingOver`).
    pub failovers: u64,
    /// A group's resources coming alive on another node than before.
    pub takeovers: u64,
    pub crashes: u64,
    pub exits: u64,
    /// Requests that reached the coordinator after the shell gave up on them.
    pub late_requests: u64,
    /// Groups placed and fully running at the final liveness check.
    pub groups_placed: u64,
    /// Groups the planner left unplaced at the final liveness check.
    pub groups_unplaced: u64,
    /// Virtual ms the settle phase took to converge (the maximum, summed).
    pub settle_ms: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.handled += o.handled;
        self.starts += o.starts;
        self.refused_starts += o.refused_starts;
        self.guard_kills += o.guard_kills;
        self.fences += o.fences;
        self.ownership_lost += o.ownership_lost;
        self.failovers += o.failovers;
        self.takeovers += o.takeovers;
        self.crashes += o.crashes;
        self.exits += o.exits;
        self.late_requests += o.late_requests;
        self.groups_placed += o.groups_placed;
        self.groups_unplaced += o.groups_unplaced;
        self.settle_ms = self.settle_ms.max(o.settle_ms);
    }
}

/// What the liveness check found (when it holds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Groups fully running where the planner places them.
    pub placed: usize,
    /// Groups the planner leaves unplaced (failure bans, threshold, only
    /// clones), running nowhere.
    pub unplaced: usize,
}

/// Who killed a resource process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Killer {
    /// The fence guard's deadline passed.
    Guard,
    /// An injected fault.
    Fault,
    /// The agent crashed (PR_SET_PDEATHSIG).
    Crash,
    /// The agent exited.
    Exit,
}

/// A change of a resource process, kept for scenario tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The shell began starting it (the authority check passed).
    StartBegun,
    /// The shell refused a start: its authority had expired.
    StartRefused,
    Started,
    StartFailed,
    StopBegun {
        urgent: bool,
    },
    Stopped,
    Killed(Killer),
}

/// One entry of the world's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Happening {
    pub at: u64,
    pub node: usize,
    pub resource: usize,
    pub change: Change,
}

/// The actual state of a resource process on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Actual {
    Stopped,
    Starting,
    Running,
    Stopping,
}

impl Actual {
    fn alive(self) -> bool {
        self != Actual::Stopped
    }
}

#[derive(Clone, Copy, Debug)]
struct ResRun {
    state: Actual,
    /// The operation in flight (0: none).
    op: u64,
    op_kind: Op,
    /// The operation in flight will fail (injected).
    fail: bool,
}

/// What the simulator knows of a resource, from the definition.
#[derive(Clone, Debug)]
struct ResInfo {
    name: String,
    group: usize,
    role: Role,
    enabled: bool,
    optional: bool,
    /// It has a monitor (without one, nobody notices it died).
    monitored: bool,
    /// Effective dependencies (indices).
    deps: Vec<usize>,
    /// Resources whose effective dependencies include this one.
    dependents: Vec<usize>,
}

#[derive(Clone, Debug)]
struct GroupInfo {
    name: String,
    /// Enabled managed members.
    managed: Vec<usize>,
}

/// A request of a node's shell to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ReqKind {
    OpenSession,
    Renew {
        lease: i64,
    },
    Campaign {
        group: String,
        lease: i64,
    },
    Resign {
        group: String,
        token: i64,
    },
    RecordFailure {
        group: String,
        failure: Failure,
        token: i64,
    },
    ClearMove {
        group: String,
    },
    /// Marks the registration of session `lease` (only that one: a late
    /// request of an earlier process must not mark a later registration).
    SetLeaving {
        lease: i64,
    },
    Revoke {
        lease: i64,
    },
    /// The shell's own repair: put its node record back under its session
    /// lease (see `Sim::on_view`).
    Register {
        lease: i64,
        leaving: bool,
    },
}

impl ReqKind {
    /// What the agent hears when the request fails or times out; `None`
    /// for writes the shell retries until acknowledged.
    fn failure(&self) -> Option<Event> {
        match self {
            ReqKind::OpenSession => Some(Event::SessionOpenFailed),
            ReqKind::Renew { lease } => Some(Event::RenewFailed { lease: *lease }),
            ReqKind::Campaign { group, lease } => Some(Event::CampaignResult {
                group: group.clone(),
                lease: *lease,
                won: None,
            }),
            ReqKind::Resign { group, .. } => Some(Event::Resigned {
                group: group.clone(),
                ok: false,
            }),
            ReqKind::RecordFailure { .. }
            | ReqKind::ClearMove { .. }
            | ReqKind::SetLeaving { .. }
            | ReqKind::Revoke { .. }
            | ReqKind::Register { .. } => None,
        }
    }

    /// Writes the agent hears nothing about: the shell retries them until
    /// they are acknowledged (they are idempotent at the coordinator).
    fn retried(&self) -> bool {
        matches!(
            self,
            ReqKind::RecordFailure { .. } | ReqKind::ClearMove { .. } | ReqKind::SetLeaving { .. }
        )
    }
}

#[derive(Clone, Debug)]
struct Request {
    id: u64,
    node: usize,
    inc: u64,
    kind: ReqKind,
    /// When it was sent, on the node's monotonic clock.
    sent_at: Time,
    /// When it was sent, virtual.
    sent_virtual: u64,
}

/// Something for a node's agent process (shell + agent): held while the
/// process is stopped, dropped when it belongs to an earlier incarnation.
#[derive(Clone, Debug)]
enum Input {
    Event(Event),
    /// A watch update: the view, and (what the shell sees in the raw key)
    /// the lease the node's own registration is attached to.
    View {
        view: ClusterView,
        my_lease: Option<i64>,
    },
    /// `rev`: the coordinator revision after the request was applied.
    Response {
        req: u64,
        reply: Option<Event>,
        rev: i64,
    },
    Timeout {
        req: u64,
    },
    Timer {
        at: u64,
    },
    ExecStart {
        resource: usize,
        authority: Option<Authority>,
    },
}

/// Conditions that faults switch on for a while (counted, so overlapping
/// faults compose).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cond {
    Partition(usize),
    LoseRenewRequests(usize),
    LoseRenewResponses(usize),
    SlowLink(usize),
    FailMonitor(usize, usize),
    SlowOps(usize),
    FailStarts(usize, usize),
    FailStops(usize),
    GroupMaintenance(usize),
    ClusterMaintenance,
    NodeMaintenance(usize),
    NodeStandby(usize),
    StopGroup(usize),
}

#[derive(Clone, Debug)]
enum Ev {
    Input {
        node: usize,
        inc: u64,
        /// Crossed the network: lost if the node is partitioned on arrival.
        net: bool,
        input: Input,
    },
    AtCoord(Request),
    LeaseCheck {
        lease: i64,
    },
    Guard {
        node: usize,
        arm: u64,
    },
    OpFinish {
        node: usize,
        res: usize,
        op: u64,
    },
    MonitorFinish {
        node: usize,
        inc: u64,
        res: usize,
        epoch: u64,
    },
    Inject(Fault),
    CondEnd {
        cond: Cond,
        era: u64,
    },
    Resume {
        node: usize,
        pause: u64,
    },
    Restart {
        node: usize,
        down: u64,
    },
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    /// Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One node: its clocks, its agent process, its fence guard, its resources.
struct NodeSim {
    name: String,
    /// Monotonic clock = virtual + offset.
    offset: u64,
    /// Wall clock = virtual + wall.
    wall: u64,
    agent: Option<Agent>,
    /// Bumped when the agent process dies or starts: older inputs are dropped.
    inc: u64,
    /// The current pause, if the process is stopped.
    paused: Option<u64>,
    held: Vec<Input>,
    /// The virtual time of the agent's next timer.
    timer_at: Option<u64>,
    guard_gen: u64,
    /// The guard's deadline passed with no newer one: like the real guard,
    /// it kills any group process it is told about until it is re-armed.
    guard_expired: bool,
    res: Vec<ResRun>,
    /// Views arrive in order: none before this virtual time.
    last_view_at: u64,
    /// The last session the shell saw granted: lease and the revision of
    /// its registration (revoked on exit, repaired by `on_view`).
    session: Option<(i64, i64)>,
    /// The shell marked the registration as leaving.
    leaving: bool,
    /// A registration repair is in flight.
    registering: bool,
    /// Bumped when the process goes down; a restart must match it.
    down: u64,
    /// After SIGTERM: how long the node stays down once the agent exited.
    down_after_exit: Option<u64>,
    /// Busy-loop detection: (virtual ms, agent calls at that ms).
    calls_at: (u64, u32),
}

/// The simulator.
pub struct Sim {
    spec: ClusterSpec,
    opts: Options,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Queued>,
    coord: Coord,
    nodes: Vec<NodeSim>,
    res: Vec<ResInfo>,
    res_index: HashMap<String, usize>,
    groups: Vec<GroupInfo>,
    /// Requests awaiting an answer: id → (node, request).
    pending: BTreeMap<u64, (usize, ReqKind)>,
    next_req: u64,
    next_op: u64,
    next_pause: u64,
    conds: BTreeMap<Cond, u32>,
    /// Bumped by `heal`: condition ends from before are void.
    era: u64,
    healed: bool,
    /// The world changed since the last safety check.
    dirty: bool,
    violation: Option<(u64, Violation)>,
    history: Vec<Happening>,
    /// Trace lines: (virtual ms, text, how many times it repeated).
    trace: VecDeque<(u64, String, u32)>,
    stats: Stats,
    /// Coordinator owner per group at the last check (takeover counting).
    last_owner: Vec<Option<String>>,
}

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.opts.trace {
            let line = format!($($arg)*);
            $sim.push_trace(line);
        }
    };
}

impl Sim {
    /// A simulator for `spec`; `seed` drives every random choice of the
    /// run (latencies, durations, clock offsets). Nothing runs until
    /// [`Sim::boot`].
    pub fn new(spec: ClusterSpec, opts: Options, seed: u64) -> Sim {
        let mut rng = Rng::stream(seed, "run");
        let catalog = Catalog::new(&spec);
        let mut res = Vec::new();
        let mut res_index = HashMap::new();
        let mut groups = Vec::new();
        for (gi, g) in spec.groups.iter().enumerate() {
            groups.push(GroupInfo {
                name: g.name.clone(),
                managed: Vec::new(),
            });
            for r in &g.resources {
                res_index.insert(r.name.clone(), res.len());
                res.push(ResInfo {
                    name: r.name.clone(),
                    group: gi,
                    role: r.role,
                    enabled: r.enabled,
                    optional: r.optional,
                    monitored: r.monitor.is_some(),
                    deps: Vec::new(),
                    dependents: Vec::new(),
                });
            }
        }
        for g in &spec.groups {
            for r in &g.resources {
                let Some(&ri) = res_index.get(&r.name) else { continue };
                let deps: Vec<usize> = catalog
                    .effective_deps(r)
                    .into_iter()
                    .filter_map(|d| res_index.get(d).copied())
                    .filter(|&d| res[d].role != Role::MonitorOnly)
                    .collect();
                for &d in &deps {
                    res[d].dependents.push(ri);
                }
                res[ri].deps = deps;
            }
        }
        for (ri, r) in res.iter().enumerate() {
            if r.enabled && r.role == Role::Managed {
                groups[r.group].managed.push(ri);
            }
        }
        let nodes = spec
            .nodes
            .iter()
            .map(|n| NodeSim {
                name: n.name.clone(),
                offset: 1_000 + rng.below(1_000_000_000),
                wall: WALL_BASE + rng.below(200),
                agent: None,
                inc: 0,
                paused: None,
                held: Vec::new(),
                timer_at: None,
                guard_gen: 0,
                guard_expired: false,
                res: vec![
                    ResRun {
                        state: Actual::Stopped,
                        op: 0,
                        op_kind: Op::Start,
                        fail: false,
                    };
                    res.len()
                ],
                last_view_at: 0,
                session: None,
                leaving: false,
                registering: false,
                down: 0,
                down_after_exit: None,
                calls_at: (u64::MAX, 0),
            })
            .collect();
        let ttl = millis(spec.settings.lease_ttl);
        Sim {
            last_owner: vec![None; groups.len()],
            spec,
            opts,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            coord: Coord::new(ttl),
            nodes,
            res,
            res_index,
            groups,
            pending: BTreeMap::new(),
            next_req: 1,
            next_op: 1,
            next_pause: 1,
            conds: BTreeMap::new(),
            era: 0,
            healed: false,
            dirty: false,
            violation: None,
            history: Vec::new(),
            trace: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    // ----- public API -----

    /// Starts every agent within the first 100 ms.
    pub fn boot(&mut self) {
        for n in 0..self.nodes.len() {
            let at = self.now + self.rng.below(100);
            let down = self.nodes[n].down;
            self.push(at, Ev::Restart { node: n, down });
        }
    }

    /// Queues every fault of `schedule` at its time.
    pub fn load(&mut self, schedule: &Schedule) {
        for (at, f) in &schedule.faults {
            self.push(*at, Ev::Inject(f.clone()));
        }
    }

    /// Queues one fault at virtual time `at`.
    pub fn inject_at(&mut self, at: u64, fault: Fault) {
        self.push(at.max(self.now), Ev::Inject(fault));
    }

    /// Runs every event up to and including virtual time `t`, checking
    /// after each step. Stops at the first violation.
    pub fn run_until(&mut self, t: u64) -> Result<(), Violation> {
        while let Some(top) = self.queue.peek() {
            if top.at > t {
                break;
            }
            self.step();
            if let Some((_, v)) = &self.violation {
                return Err(v.clone());
            }
            if self.stats.steps >= self.opts.max_steps {
                let v = Violation::Runaway {
                    steps: self.stats.steps,
                };
                self.fail(v.clone());
                return Err(v);
            }
        }
        self.now = self.now.max(t);
        Ok(())
    }

    /// Ends every fault: conditions off, paused agents resumed, operator
    /// maintenance/standby/stop cleared (move requests stay), every agent
    /// that is down started again. Later faults of the schedule are ignored.
    pub fn heal(&mut self) {
        trace!(self, "== heal: every fault ends");
        self.healed = true;
        self.era += 1;
        self.conds.clear();
        let mut changed = self.coord.set_cluster_maintenance(false);
        for n in 0..self.nodes.len() {
            changed |= self.sync_node_admin(n);
        }
        for g in 0..self.groups.len() {
            changed |= self.sync_group_admin(g);
        }
        for n in 0..self.nodes.len() {
            if let Some(p) = self.nodes[n].paused {
                self.resume(n, p);
            }
            if self.nodes[n].agent.is_none() {
                let at = self.now + self.rng.range(10, 500);
                let down = self.nodes[n].down;
                self.push(at, Ev::Restart { node: n, down });
            }
        }
        if changed {
            self.broadcast();
        } else {
            for n in 0..self.nodes.len() {
                self.send_view(n);
            }
        }
    }

    /// After `heal`: runs until liveness has held for `stable_ms` (checked
    /// every 250 ms) or `settle_ms` has passed, then checks it.
    pub fn settle(&mut self) -> Result<(), Violation> {
        let start = self.now;
        let end = start + self.opts.settle_ms;
        let mut held_since: Option<u64> = None;
        while self.now < end {
            self.run_until(self.now + 250)?;
            if self.liveness().is_ok() {
                let since = *held_since.get_or_insert(self.now);
                if self.now - since >= self.opts.stable_ms {
                    break;
                }
            } else {
                held_since = None;
            }
        }
        self.stats.settle_ms = held_since.unwrap_or(self.now) - start;
        match self.liveness() {
            Ok(placed) => {
                self.stats.groups_placed += placed.placed as u64;
                self.stats.groups_unplaced += placed.unplaced as u64;
                Ok(())
            }
            Err(v) => {
                self.fail(v.clone());
                Err(v)
            }
        }
    }

    /// Liveness: every group the planner (run on the coordinator's true
    /// state) places on a node is fully running there and nowhere else,
    /// under an owner key of that node; every group it leaves unplaced runs
    /// nowhere. Optional members may be down (a failed optional member is
    /// skipped until the group restarts), but not elsewhere; a member
    /// without a monitor may be dead if its agent believes it runs (nothing
    /// can notice its death).
    pub fn liveness(&self) -> Result<Placement, Violation> {
        let mut counts = Placement::default();
        let observed = self.coord.observed(&self.spec);
        let plan = planner::plan(&self.spec, &observed, Time(WALL_BASE + self.now));
        for (gi, g) in self.groups.iter().enumerate() {
            let Some(gp) = plan.group(&g.name) else { continue };
            let owner = self.coord.owner(&g.name).map(|(n, _)| n.to_string());
            let fail = |detail: String| {
                Err(Violation::Liveness {
                    group: g.name.clone(),
                    detail: format!("{detail} (plan: {:?}, {})", gp.target, gp.reason),
                })
            };
            let alive: Vec<String> = self
                .nodes_alive(gi)
                .into_iter()
                .map(|n| self.nodes[n].name.clone())
                .collect();
            match gp.target.as_deref() {
                Some(target) => {
                    if owner.as_deref() != Some(target) {
                        return fail(format!("owner key is {owner:?}, not {target}"));
                    }
                    if alive.iter().any(|n| n != target) {
                        return fail(format!("resources alive on {alive:?}"));
                    }
                    let Some(t) = self.node_index(target) else {
                        return fail(format!("unknown node {target}"));
                    };
                    let missing: Vec<&str> = g
                        .managed
                        .iter()
                        .filter(|&&ri| !self.res[ri].optional && !self.runs_as_far_as_known(t, ri))
                        .map(|&ri| self.res[ri].name.as_str())
                        .collect();
                    if !missing.is_empty() {
                        return fail(format!("not running on {target}: {}", missing.join(", ")));
                    }
                    counts.placed += 1;
                }
                None => {
                    if !g.managed.is_empty() && owner.is_some() {
                        return fail(format!("unplaced, but the owner key is {owner:?}"));
                    }
                    if !alive.is_empty() {
                        return fail(format!("unplaced, but resources alive on {alive:?}"));
                    }
                    counts.unplaced += 1;
                }
            }
        }
        Ok(counts)
    }

    /// The agent on node `n` believes the resource runs (it started it
    /// and has not seen it die: a process killed behind its back is noticed
    /// only at its next check, or never without a monitor).
    fn believed_running(&self, n: usize, ri: usize) -> bool {
        self.nodes[n]
            .agent
            .as_ref()
            .and_then(|a| a.resource_state(&self.res[ri].name))
            == Some(understudy_core::agent::ResState::Running)
    }

    /// The resource runs on node `n`, or — for a resource without a monitor,
    /// whose death nothing can notice — the agent there believes it does.
    fn runs_as_far_as_known(&self, n: usize, ri: usize) -> bool {
        self.nodes[n].res[ri].state == Actual::Running || (!self.res[ri].monitored && self.believed_running(n, ri))
    }

    /// Virtual time (ms).
    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The first violation and when it happened.
    pub fn violation(&self) -> Option<&(u64, Violation)> {
        self.violation.as_ref()
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Index of a resource in declaration order (as faults name them).
    pub fn resource_index(&self, name: &str) -> Option<usize> {
        self.res_index.get(name).copied()
    }

    pub fn resource_name(&self, i: usize) -> &str {
        self.res.get(i).map_or("?", |r| r.name.as_str())
    }

    pub fn node_name(&self, i: usize) -> &str {
        self.nodes.get(i).map_or("?", |n| n.name.as_str())
    }

    /// The coordinator model (its true state).
    pub fn coordinator(&self) -> &Coord {
        &self.coord
    }

    /// The coordinator's owner key of `group`: node and fencing token.
    pub fn owner(&self, group: &str) -> Option<(String, i64)> {
        self.coord.owner(group).map(|(n, t)| (n.to_string(), t))
    }

    /// Nodes where some managed resource of `group` is alive.
    pub fn alive_on(&self, group: &str) -> Vec<String> {
        let Some(gi) = self.groups.iter().position(|g| g.name == group) else {
            return Vec::new();
        };
        self.nodes_alive(gi)
            .into_iter()
            .map(|n| self.nodes[n].name.clone())
            .collect()
    }

    /// Every enabled, non-optional managed member of `group` runs on `node`.
    pub fn fully_running(&self, group: &str, node: &str) -> bool {
        let (Some(g), Some(n)) = (self.groups.iter().find(|g| g.name == group), self.node_index(node)) else {
            return false;
        };
        g.managed
            .iter()
            .all(|&ri| self.res[ri].optional || self.nodes[n].res[ri].state == Actual::Running)
    }

    /// Whether the node's agent process is running.
    pub fn agent_up(&self, node: &str) -> bool {
        self.node_index(node).is_some_and(|n| self.nodes[n].agent.is_some())
    }

    /// Every resource change so far, in order.
    pub fn history(&self) -> &[Happening] {
        &self.history
    }

    /// The kept trace lines (empty unless `Options::trace`).
    pub fn trace_lines(&self) -> Vec<String> {
        self.trace
            .iter()
            .map(|(t, line, times)| {
                let again = if *times > 1 {
                    format!(" (x{times})")
                } else {
                    String::new()
                };
                format!("{:>6}.{:03} {line}{again}", t / 1_000, t % 1_000)
            })
            .collect()
    }

    /// A `Happening` as text.
    pub fn describe(&self, h: &Happening) -> String {
        format!(
            "t={} {} {} {:?}",
            h.at,
            self.node_name(h.node),
            self.resource_name(h.resource),
            h.change
        )
    }

    // ----- the queue -----

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Queued { at, seq: self.seq, ev });
    }

    fn push_trace(&mut self, line: String) {
        if let Some(last) = self.trace.back_mut()
            && last.1 == line
        {
            last.2 += 1;
            return;
        }
        if self.trace.len() >= self.opts.trace_lines.max(1) {
            self.trace.pop_front();
        }
        self.trace.push_back((self.now, line, 1));
    }

    fn fail(&mut self, v: Violation) {
        if self.violation.is_none() {
            trace!(self, "!! {v}");
            self.violation = Some((self.now, v));
        }
    }

    fn step(&mut self) {
        let Some(q) = self.queue.pop() else { return };
        self.now = self.now.max(q.at);
        self.stats.steps += 1;
        match q.ev {
            Ev::Input { node, inc, net, input } => {
                if self.nodes[node].inc != inc || self.nodes[node].agent.is_none() {
                    return;
                }
                if net && self.active(Cond::Partition(node)) {
                    trace!(
                        self,
                        "{} lost (partition): {}",
                        self.nodes[node].name,
                        input_summary(&input)
                    );
                    return;
                }
                if self.nodes[node].paused.is_some() {
                    self.nodes[node].held.push(input);
                    return;
                }
                self.input(node, input);
            }
            Ev::AtCoord(req) => self.at_coord(req),
            Ev::LeaseCheck { lease } => match self.coord.expiry(lease) {
                Some(e) if e <= self.now => {
                    trace!(self, "coordinator: lease {lease} expired");
                    if self.coord.expire_if_due(lease, self.now) {
                        self.broadcast();
                    }
                }
                Some(e) => self.push(e, Ev::LeaseCheck { lease }),
                None => {}
            },
            Ev::Guard { node, arm } => {
                if self.nodes[node].guard_gen == arm && self.opts.guard {
                    self.nodes[node].guard_expired = true;
                    self.guard_fires(node);
                }
            }
            Ev::OpFinish { node, res, op } => self.op_finish(node, res, op),
            Ev::MonitorFinish { node, inc, res, epoch } => {
                if self.nodes[node].inc == inc {
                    let health = self.health(node, res);
                    let event = Event::MonitorDone {
                        resource: self.res[res].name.clone(),
                        epoch,
                        health,
                    };
                    self.notify(node, event);
                }
            }
            Ev::Inject(f) => {
                if !self.healed {
                    self.inject(f);
                }
            }
            Ev::CondEnd { cond, era } => {
                if era == self.era {
                    self.cond_end(cond);
                }
            }
            Ev::Resume { node, pause } => self.resume(node, pause),
            Ev::Restart { node, down } => {
                if self.nodes[node].agent.is_none() && self.nodes[node].down == down {
                    self.start_agent(node);
                }
            }
        }
        self.check_after_step();
    }

    fn check_after_step(&mut self) {
        if self.dirty {
            self.dirty = false;
            if let Err(v) = self.check_safety() {
                self.fail(v);
            }
        }
    }

    // ----- nodes and agents -----

    fn mono(&self, n: usize) -> Time {
        Time(self.now + self.nodes[n].offset)
    }

    fn node_now(&self, n: usize) -> Now {
        Now {
            mono: self.mono(n),
            wall: Time(self.now + self.nodes[n].wall),
        }
    }

    /// The virtual time at which node `n`'s monotonic clock reads `t`.
    fn virtual_at(&self, n: usize, t: Time) -> u64 {
        t.0.saturating_sub(self.nodes[n].offset).max(self.now)
    }

    fn start_agent(&mut self, n: usize) {
        trace!(self, "{}: agent starts", self.nodes[n].name);
        let node = &mut self.nodes[n];
        node.agent = Some(Agent::new(self.spec.clone(), &node.name));
        node.inc += 1;
        node.paused = None;
        node.held.clear();
        node.timer_at = None;
        node.session = None;
        node.leaving = false;
        node.registering = false;
        node.down_after_exit = None;
        node.calls_at = (u64::MAX, 0);
        // The shell reads the current state before watching it.
        self.send_view(n);
        self.handle(n, Event::Tick);
    }

    /// The agent process dies: resources die with it, so does the guard.
    fn crash(&mut self, n: usize) {
        if self.nodes[n].agent.is_none() {
            return;
        }
        trace!(self, "{}: CRASH", self.nodes[n].name);
        self.stats.crashes += 1;
        self.kill_all(n, Killer::Crash, false);
        self.process_gone(n);
    }

    /// Common to crash and exit: the process is gone.
    fn process_gone(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.agent = None;
        node.inc += 1;
        node.down += 1;
        node.paused = None;
        node.held.clear();
        node.timer_at = None;
        node.guard_gen += 1;
        node.guard_expired = false;
        for r in &mut node.res {
            r.op = 0;
        }
        self.pending.retain(|_, (node, _)| *node != n);
    }

    /// Delivers one input to a running, unpaused agent process.
    fn input(&mut self, n: usize, input: Input) {
        match input {
            Input::Event(e) => self.handle(n, e),
            Input::View { view, my_lease } => self.on_view(n, view, my_lease),
            Input::Response { req, reply, rev } => {
                if let Some((_, kind)) = self.pending.remove(&req) {
                    if matches!(kind, ReqKind::Register { .. }) {
                        self.nodes[n].registering = false;
                    }
                    if let Some(Event::SessionOpened { lease, .. }) = &reply {
                        self.nodes[n].session = Some((*lease, rev));
                    }
                    if let Some(e) = reply {
                        self.handle(n, e);
                    }
                } else {
                    trace!(self, "{}: late response to request {req} ignored", self.nodes[n].name);
                }
            }
            Input::Timeout { req } => {
                if let Some((_, kind)) = self.pending.remove(&req) {
                    trace!(self, "{}: request {req} timed out: {kind:?}", self.nodes[n].name);
                    if matches!(kind, ReqKind::Register { .. }) {
                        self.nodes[n].registering = false;
                    }
                    if let Some(e) = kind.failure() {
                        self.handle(n, e);
                    } else if kind.retried() {
                        self.send(n, kind);
                    }
                }
            }
            Input::Timer { at } => {
                if self.nodes[n].timer_at == Some(at) {
                    self.nodes[n].timer_at = None;
                    self.handle(n, Event::Tick);
                }
            }
            Input::ExecStart { resource, authority } => self.exec_start(n, resource, authority),
        }
    }

    /// `agent.handle(now, event)`, then carries out its actions.
    fn handle(&mut self, n: usize, event: Event) {
        let now = self.node_now(n);
        let inc = self.nodes[n].inc;
        trace!(self, "{} <- {}", self.nodes[n].name, event_summary(&event));
        {
            let calls = &mut self.nodes[n].calls_at;
            if calls.0 == self.now {
                calls.1 += 1;
            } else {
                *calls = (self.now, 1);
            }
            if calls.1 > 2_000 {
                let v = Violation::BusyLoop {
                    node: self.nodes[n].name.clone(),
                    detail: format!(
                        "more than 2000 agent calls at one instant; last event {}; poll_timeout {:?} at mono {}; {:?}",
                        event_summary(&event),
                        self.nodes[n].agent.as_ref().and_then(Agent::poll_timeout),
                        now.mono.0,
                        self.nodes[n].agent.as_ref().map(Agent::status)
                    ),
                };
                self.fail(v);
                return;
            }
        }
        let Some(agent) = self.nodes[n].agent.as_mut() else {
            return;
        };
        self.stats.handled += 1;
        agent.handle(now, event);
        let actions: Vec<Action> = std::iter::from_fn(|| agent.poll_action()).collect();
        for a in actions {
            if self.nodes[n].inc != inc {
                break;
            }
            self.execute(n, a);
        }
        self.reschedule_timer(n);
    }

    fn reschedule_timer(&mut self, n: usize) {
        let Some(agent) = self.nodes[n].agent.as_ref() else {
            return;
        };
        let Some(t) = agent.poll_timeout() else {
            self.nodes[n].timer_at = None;
            return;
        };
        let at = self.virtual_at(n, t);
        if self.nodes[n].timer_at != Some(at) {
            self.nodes[n].timer_at = Some(at);
            let inc = self.nodes[n].inc;
            self.push(
                at,
                Ev::Input {
                    node: n,
                    inc,
                    net: false,
                    input: Input::Timer { at },
                },
            );
        }
    }

    /// The shell got a watch update. Besides passing it on, it keeps its
    /// registration attached to its current session: an `OpenSession` that
    /// timed out may still reach the coordinator later and move the node
    /// record to a lease nobody renews, which would then take the record
    /// with it and leave a live agent looking down to everyone else.
    fn on_view(&mut self, n: usize, view: ClusterView, my_lease: Option<i64>) {
        let node = &self.nodes[n];
        let opening = self
            .pending
            .values()
            .any(|(at, kind)| *at == n && *kind == ReqKind::OpenSession);
        if let Some((lease, rev)) = node.session
            && view.revision > rev
            && my_lease != Some(lease)
            && !node.registering
            && !opening
        {
            let leaving = node.leaving;
            trace!(
                self,
                "{}: registration is on lease {my_lease:?}, not {lease}: re-registering", self.nodes[n].name
            );
            self.nodes[n].registering = true;
            self.send(n, ReqKind::Register { lease, leaving });
        }
        self.handle(n, Event::View(view));
    }

    /// Tells the agent something local (an operation or monitor result).
    fn notify(&mut self, n: usize, event: Event) {
        let inc = self.nodes[n].inc;
        self.push(
            self.now,
            Ev::Input {
                node: n,
                inc,
                net: false,
                input: Input::Event(event),
            },
        );
    }

    /// The shell carries out one action.
    fn execute(&mut self, n: usize, action: Action) {
        match action {
            Action::Journal(e) => {
                use understudy_core::agent::EntryKind as K;
                match e.kind {
                    K::Fenced => self.stats.fences += 1,
                    K::OwnershipLost => self.stats.ownership_lost += 1,
                    K::FailingOver => self.stats.failovers += 1,
                    _ => {}
                }
                trace!(
                    self,
                    "{} journal {:?} {}{}: {}",
                    self.nodes[n].name,
                    e.kind,
                    e.group.as_deref().unwrap_or(""),
                    e.resource.as_deref().map(|r| format!("/{r}")).unwrap_or_default(),
                    e.message
                );
            }
            Action::OpenSession => self.send(n, ReqKind::OpenSession),
            Action::Renew { lease } => self.send(n, ReqKind::Renew { lease }),
            Action::Campaign { group, lease } => self.send(n, ReqKind::Campaign { group, lease }),
            Action::Resign { group, token } => self.send(n, ReqKind::Resign { group, token }),
            Action::RecordFailure { group, failure, token } => {
                self.send(n, ReqKind::RecordFailure { group, failure, token })
            }
            Action::ClearMoveRequest { group } => self.send(n, ReqKind::ClearMove { group }),
            Action::SetLeaving => {
                self.nodes[n].leaving = true;
                if let Some((lease, _)) = self.nodes[n].session {
                    self.send(n, ReqKind::SetLeaving { lease });
                }
            }
            Action::ArmGuard { deadline } => {
                trace!(self, "{} arms guard for mono {}", self.nodes[n].name, deadline.0);
                self.nodes[n].guard_gen += 1;
                self.nodes[n].guard_expired = false;
                let arm = self.nodes[n].guard_gen;
                let at = self.virtual_at(n, deadline);
                self.push(at, Ev::Guard { node: n, arm });
            }
            Action::Start {
                resource, authority, ..
            } => {
                let Some(&ri) = self.res_index.get(&resource) else {
                    return;
                };
                // The shell spawns the start a moment later (a task); if the
                // process is stopped in between, the start runs after SIGCONT.
                let at = self.now + self.rng.below(3);
                let inc = self.nodes[n].inc;
                self.push(
                    at,
                    Ev::Input {
                        node: n,
                        inc,
                        net: false,
                        input: Input::ExecStart {
                            resource: ri,
                            authority,
                        },
                    },
                );
            }
            Action::Stop { resource, urgent, .. } => {
                if let Some(&ri) = self.res_index.get(&resource) {
                    self.exec_stop(n, ri, urgent);
                }
            }
            Action::Monitor { resource, epoch, .. } => {
                if let Some(&ri) = self.res_index.get(&resource) {
                    let at = self.now + self.rng.range(1, 20);
                    let inc = self.nodes[n].inc;
                    self.push(
                        at,
                        Ev::MonitorFinish {
                            node: n,
                            inc,
                            res: ri,
                            epoch,
                        },
                    );
                }
            }
            Action::Exit => self.exit(n),
        }
    }

    /// The agent asked to exit: the shell revokes its session and exits.
    fn exit(&mut self, n: usize) {
        trace!(self, "{}: agent exits", self.nodes[n].name);
        self.stats.exits += 1;
        if let Some((lease, _)) = self.nodes[n].session {
            // Best effort, nobody waits for the answer.
            self.send(n, ReqKind::Revoke { lease });
        }
        let alive: Vec<String> = self.nodes[n]
            .res
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state.alive())
            .map(|(i, _)| self.res[i].name.clone())
            .collect();
        if !alive.is_empty() {
            let v = Violation::ExitWithLiveResources {
                node: self.nodes[n].name.clone(),
                resources: alive,
            };
            self.fail(v);
        }
        self.kill_all(n, Killer::Exit, false);
        let delay = match self.nodes[n].down_after_exit {
            Some(d) if !self.healed => d,
            _ => self.rng.range(100, 1_000),
        };
        self.process_gone(n);
        let down = self.nodes[n].down;
        self.push(self.now + delay, Ev::Restart { node: n, down });
    }

    fn resume(&mut self, n: usize, pause: u64) {
        if self.nodes[n].paused != Some(pause) {
            return;
        }
        trace!(
            self,
            "{}: SIGCONT ({} held inputs)",
            self.nodes[n].name,
            self.nodes[n].held.len()
        );
        self.nodes[n].paused = None;
        let inc = self.nodes[n].inc;
        let held = std::mem::take(&mut self.nodes[n].held);
        for input in held {
            if self.nodes[n].inc != inc || self.violation.is_some() {
                break;
            }
            self.input(n, input);
            self.check_after_step();
        }
        self.reschedule_timer(n);
    }

    // ----- network and coordinator -----

    fn active(&self, c: Cond) -> bool {
        self.conds.contains_key(&c)
    }

    fn latency(&mut self, n: usize) -> u64 {
        if self.active(Cond::SlowLink(n)) {
            self.rng.range(100, 900)
        } else {
            self.rng.range(1, 10)
        }
    }

    /// Sends a request; its answer (or its timeout) comes back as an input.
    fn send(&mut self, n: usize, kind: ReqKind) {
        let id = self.next_req;
        self.next_req += 1;
        let inc = self.nodes[n].inc;
        let revoke = matches!(kind, ReqKind::Revoke { .. });
        if !revoke {
            self.pending.insert(id, (n, kind.clone()));
            self.push(
                self.now + REQUEST_TIMEOUT_MS,
                Ev::Input {
                    node: n,
                    inc,
                    net: false,
                    input: Input::Timeout { req: id },
                },
            );
        }
        let renew = matches!(kind, ReqKind::Renew { .. });
        if self.active(Cond::Partition(n)) || (renew && self.active(Cond::LoseRenewRequests(n))) {
            trace!(
                self,
                "{} -> coordinator: request {id} lost: {kind:?}", self.nodes[n].name
            );
            return;
        }
        let at = self.now + self.latency(n);
        let sent_at = self.mono(n);
        self.push(
            at,
            Ev::AtCoord(Request {
                id,
                node: n,
                inc,
                kind,
                sent_at,
                sent_virtual: self.now,
            }),
        );
    }

    fn at_coord(&mut self, req: Request) {
        let n = req.node;
        if self.active(Cond::Partition(n)) {
            trace!(
                self,
                "{} -> coordinator: request {} lost (partition)", self.nodes[n].name, req.id
            );
            return;
        }
        if self.now >= req.sent_virtual + REQUEST_TIMEOUT_MS {
            self.stats.late_requests += 1;
        }
        let name = self.nodes[n].name.clone();
        let (reply, changed) = match req.kind.clone() {
            ReqKind::OpenSession => {
                let lease = self.coord.open_session(&name, self.now);
                if let Some(e) = self.coord.expiry(lease) {
                    self.push(e, Ev::LeaseCheck { lease });
                }
                (
                    Some(Event::SessionOpened {
                        lease,
                        sent_at: req.sent_at,
                    }),
                    true,
                )
            }
            ReqKind::Renew { lease } => {
                if self.coord.keep_alive(lease, self.now) {
                    (
                        Some(Event::Renewed {
                            lease,
                            sent_at: req.sent_at,
                        }),
                        false,
                    )
                } else {
                    (Some(Event::SessionLost { lease }), false)
                }
            }
            ReqKind::Campaign { group, lease } => {
                let won = self.coord.campaign(&group, &name, lease);
                (Some(Event::CampaignResult { group, lease, won }), won.is_some())
            }
            ReqKind::Resign { group, token } => {
                let changed = self.coord.resign(&group, token);
                (Some(Event::Resigned { group, ok: true }), changed)
            }
            ReqKind::RecordFailure { group, failure, token } => {
                let id = failure.id.clone();
                let result = self.coord.record_failure(&group, failure.clone(), token);
                if result == Fenced::Written {
                    self.check_failure_record(&group, &failure);
                }
                let landed = result != Fenced::FenceLost;
                (
                    Some(Event::FailureRecorded { group, id, landed }),
                    result == Fenced::Written,
                )
            }
            ReqKind::ClearMove { group } => (None, self.coord.clear_move(&group, &name)),
            ReqKind::SetLeaving { lease } => (None, self.coord.set_leaving(&name, lease)),
            ReqKind::Revoke { lease } => (None, self.coord.revoke(lease)),
            ReqKind::Register { lease, leaving } => (None, self.coord.register(&name, lease, leaving)),
        };
        trace!(
            self,
            "coordinator <- {} request {}: {:?} => {}",
            name,
            req.id,
            req.kind,
            reply.as_ref().map_or("ack".to_string(), event_summary)
        );
        if changed {
            self.broadcast();
        }
        if matches!(req.kind, ReqKind::Revoke { .. }) {
            return;
        }
        let renew = matches!(req.kind, ReqKind::Renew { .. });
        if renew && self.active(Cond::LoseRenewResponses(n)) {
            trace!(self, "coordinator -> {}: response {} lost", name, req.id);
            return;
        }
        let at = self.now + self.latency(n);
        self.push(
            at,
            Ev::Input {
                node: n,
                inc: req.inc,
                net: true,
                input: Input::Response {
                    req: req.id,
                    reply,
                    rev: self.coord.revision(),
                },
            },
        );
    }

    /// Every watcher gets the new state.
    fn broadcast(&mut self) {
        let view = self.coord.view();
        trace!(self, "coordinator: now {}", view_summary(&view));
        for n in 0..self.nodes.len() {
            self.send_view_of(n, &view);
        }
    }

    fn send_view(&mut self, n: usize) {
        let view = self.coord.view();
        self.send_view_of(n, &view);
    }

    fn send_view_of(&mut self, n: usize, view: &ClusterView) {
        if self.nodes[n].agent.is_none() || self.active(Cond::Partition(n)) {
            return;
        }
        let at = (self.now + self.latency(n)).max(self.nodes[n].last_view_at);
        self.nodes[n].last_view_at = at;
        let inc = self.nodes[n].inc;
        let my_lease = self.coord.node_lease(&self.nodes[n].name);
        self.push(
            at,
            Ev::Input {
                node: n,
                inc,
                net: true,
                input: Input::View {
                    view: view.clone(),
                    my_lease,
                },
            },
        );
    }

    // ----- the world: resource processes -----

    fn record(&mut self, n: usize, ri: usize, change: Change) {
        self.history.push(Happening {
            at: self.now,
            node: n,
            resource: ri,
            change,
        });
        trace!(self, "{} world: {} {:?}", self.nodes[n].name, self.res[ri].name, change);
    }

    /// The shell runs a `Start`: it refuses one whose authority has expired
    /// on the node's clock (checked when the start really runs, after any
    /// SIGSTOP in between), then the process starts; a guard whose deadline
    /// passed kills it at once.
    fn exec_start(&mut self, n: usize, ri: usize, authority: Option<Authority>) {
        let name = self.res[ri].name.clone();
        if self.opts.start_check {
            let mono = self.mono(n);
            let valid = match authority {
                Some(a) => a.valid_until > mono,
                None => self.res[ri].role == Role::Clone,
            };
            if !valid {
                self.stats.refused_starts += 1;
                self.record(n, ri, Change::StartRefused);
                self.notify(
                    n,
                    Event::OpDone {
                        resource: name,
                        op: Op::Start,
                        result: Err("authority expired before the start".into()),
                    },
                );
                return;
            }
        }
        match self.nodes[n].res[ri].state {
            Actual::Running => {
                self.notify(
                    n,
                    Event::OpDone {
                        resource: name,
                        op: Op::Start,
                        result: Ok(()),
                    },
                );
            }
            Actual::Starting | Actual::Stopping => {
                self.notify(
                    n,
                    Event::OpDone {
                        resource: name,
                        op: Op::Start,
                        result: Err("an operation is already in progress".into()),
                    },
                );
            }
            Actual::Stopped => {
                self.check_authority(n, ri, authority);
                self.check_start_order(n, ri);
                let fail = self.active(Cond::FailStarts(n, ri));
                let took = if self.active(Cond::SlowOps(n)) {
                    self.rng.range(1_000, 6_000)
                } else {
                    self.rng.range(5, 50)
                };
                let op = self.next_op;
                self.next_op += 1;
                self.nodes[n].res[ri] = ResRun {
                    state: Actual::Starting,
                    op,
                    op_kind: Op::Start,
                    fail,
                };
                self.stats.starts += 1;
                self.dirty = true;
                self.record(n, ri, Change::StartBegun);
                self.push(self.now + took, Ev::OpFinish { node: n, res: ri, op });
                if self.opts.guard && self.nodes[n].guard_expired && self.res[ri].role == Role::Managed {
                    self.kill(n, ri, Killer::Guard);
                }
            }
        }
    }

    fn exec_stop(&mut self, n: usize, ri: usize, urgent: bool) {
        let state = self.nodes[n].res[ri].state;
        if state == Actual::Stopped {
            let resource = self.res[ri].name.clone();
            let inc = self.nodes[n].inc;
            self.push(
                self.now + 1,
                Ev::Input {
                    node: n,
                    inc,
                    net: false,
                    input: Input::Event(Event::OpDone {
                        resource,
                        op: Op::Stop,
                        result: Ok(()),
                    }),
                },
            );
            return;
        }
        if !urgent && state != Actual::Stopping {
            self.check_stop_order(n, ri);
        }
        let took = if urgent {
            1
        } else if self.active(Cond::SlowOps(n)) {
            self.rng.range(500, 3_000)
        } else {
            self.rng.range(2, 20)
        };
        let fail = !urgent && self.active(Cond::FailStops(n));
        let op = self.next_op;
        self.next_op += 1;
        self.nodes[n].res[ri] = ResRun {
            state: Actual::Stopping,
            op,
            op_kind: Op::Stop,
            fail,
        };
        self.record(n, ri, Change::StopBegun { urgent });
        self.push(self.now + took, Ev::OpFinish { node: n, res: ri, op });
    }

    fn op_finish(&mut self, n: usize, ri: usize, op: u64) {
        let r = self.nodes[n].res[ri];
        if r.op != op {
            return;
        }
        self.nodes[n].res[ri].op = 0;
        let result = match (r.op_kind, r.state) {
            (Op::Start, Actual::Starting) if r.fail => {
                self.nodes[n].res[ri].state = Actual::Stopped;
                self.record(n, ri, Change::StartFailed);
                Err("start failed (injected)".to_string())
            }
            (Op::Start, Actual::Starting) => {
                self.nodes[n].res[ri].state = Actual::Running;
                self.record(n, ri, Change::Started);
                Ok(())
            }
            (Op::Start, _) => {
                self.record(n, ri, Change::StartFailed);
                Err("the process died while starting".to_string())
            }
            (Op::Stop, Actual::Stopping) if r.fail => {
                self.nodes[n].res[ri].state = Actual::Running;
                Err("stop failed (injected)".to_string())
            }
            (Op::Stop, Actual::Stopping) => {
                self.nodes[n].res[ri].state = Actual::Stopped;
                self.record(n, ri, Change::Stopped);
                Ok(())
            }
            (Op::Stop, _) => Ok(()),
        };
        self.dirty = true;
        let resource = self.res[ri].name.clone();
        self.notify(
            n,
            Event::OpDone {
                resource,
                op: r.op_kind,
                result,
            },
        );
    }

    fn health(&self, n: usize, ri: usize) -> Health {
        let failing = self.active(Cond::FailMonitor(n, ri));
        if self.res[ri].role == Role::MonitorOnly {
            return if failing {
                Health::Failed("check failed (injected)".into())
            } else {
                Health::Running
            };
        }
        if self.nodes[n].res[ri].state != Actual::Running {
            Health::Failed("not running".into())
        } else if failing {
            Health::Failed("check failed (injected)".into())
        } else {
            Health::Running
        }
    }

    /// Kills resource processes on `n` (group members only, or all).
    fn kill_all(&mut self, n: usize, killer: Killer, groups_only: bool) {
        for ri in 0..self.res.len() {
            if groups_only && self.res[ri].role != Role::Managed {
                continue;
            }
            self.kill(n, ri, killer);
        }
    }

    /// Kills a resource process; a start or stop in progress ends at once
    /// (the driver sees its child exit).
    fn kill(&mut self, n: usize, ri: usize, killer: Killer) {
        if self.nodes[n].res[ri].state.alive() {
            self.nodes[n].res[ri].state = Actual::Stopped;
            self.dirty = true;
            self.record(n, ri, Change::Killed(killer));
            let op = self.nodes[n].res[ri].op;
            if op != 0 {
                self.op_finish(n, ri, op);
            }
        }
    }

    fn guard_fires(&mut self, n: usize) {
        let any = self
            .res
            .iter()
            .enumerate()
            .any(|(ri, r)| r.role == Role::Managed && self.nodes[n].res[ri].state.alive());
        if any {
            trace!(self, "{}: FENCE GUARD fires", self.nodes[n].name);
            self.stats.guard_kills += 1;
        }
        self.kill_all(n, Killer::Guard, true);
    }

    // ----- faults -----

    fn cond_begin(&mut self, c: Cond, ms: u64) {
        *self.conds.entry(c).or_insert(0) += 1;
        let era = self.era;
        self.push(self.now + ms, Ev::CondEnd { cond: c, era });
        self.sync_cond(c);
    }

    fn cond_end(&mut self, c: Cond) {
        if let Some(count) = self.conds.get_mut(&c) {
            *count -= 1;
            if *count == 0 {
                self.conds.remove(&c);
                trace!(self, "fault ends: {c:?}");
                self.sync_cond(c);
                if let Cond::Partition(n) = c {
                    // The shell's watch reconnects and re-reads the state.
                    self.send_view(n);
                }
            }
        }
    }

    /// Writes operator conditions through to the coordinator.
    fn sync_cond(&mut self, c: Cond) {
        let changed = match c {
            Cond::GroupMaintenance(g) | Cond::StopGroup(g) => self.sync_group_admin(g),
            Cond::NodeMaintenance(n) | Cond::NodeStandby(n) => self.sync_node_admin(n),
            Cond::ClusterMaintenance => self.coord.set_cluster_maintenance(self.active(c)),
            _ => false,
        };
        if changed {
            self.broadcast();
        }
    }

    fn sync_group_admin(&mut self, g: usize) -> bool {
        let name = self.groups[g].name.clone();
        let mut admin = self.coord.group_admin(&name);
        admin.maintenance = self.active(Cond::GroupMaintenance(g));
        admin.stopped = self.active(Cond::StopGroup(g));
        self.coord.set_group_admin(&name, admin)
    }

    fn sync_node_admin(&mut self, n: usize) -> bool {
        let name = self.nodes[n].name.clone();
        let mut admin = self.coord.node_admin(&name);
        admin.maintenance = self.active(Cond::NodeMaintenance(n));
        admin.standby = self.active(Cond::NodeStandby(n));
        self.coord.set_node_admin(&name, admin)
    }

    /// Whether the fault's indices name a node, group and resource of the run.
    fn fault_in_range(&self, f: &Fault) -> bool {
        let node_ok = |n: usize| n < self.nodes.len();
        let res_ok = |r: usize| r < self.res.len();
        let group_ok = |g: usize| g < self.groups.len();
        match *f {
            Fault::Crash { node, .. }
            | Fault::Pause { node, .. }
            | Fault::LoseRenewals { node, .. }
            | Fault::Partition { node, .. }
            | Fault::SlowLink { node, .. }
            | Fault::SlowOps { node, .. }
            | Fault::FailStops { node, .. }
            | Fault::Sigterm { node, .. }
            | Fault::NodeMaintenance { node, .. }
            | Fault::NodeStandby { node, .. } => node_ok(node),
            Fault::FailMonitor { node, resource, .. }
            | Fault::Kill { node, resource }
            | Fault::FailStarts { node, resource, .. } => node_ok(node) && res_ok(resource),
            Fault::MoveTo { group, node } => group_ok(group) && node_ok(node),
            Fault::GroupMaintenance { group, .. } | Fault::StopGroup { group, .. } => group_ok(group),
            Fault::ClusterMaintenance { .. } => true,
        }
    }

    fn inject(&mut self, f: Fault) {
        trace!(
            self,
            "== fault: {}",
            Named {
                spec: &self.spec,
                fault: &f
            }
        );
        if !self.fault_in_range(&f) {
            return;
        }
        match f {
            Fault::Crash { node, down_for } => {
                if self.nodes[node].agent.is_some() {
                    self.crash(node);
                    let down = self.nodes[node].down;
                    self.push(self.now + down_for, Ev::Restart { node, down });
                }
            }
            Fault::Pause { node, ms } => {
                if self.nodes[node].agent.is_some() && self.nodes[node].paused.is_none() {
                    let pause = self.next_pause;
                    self.next_pause += 1;
                    self.nodes[node].paused = Some(pause);
                    self.push(self.now + ms, Ev::Resume { node, pause });
                }
            }
            Fault::LoseRenewals {
                node,
                requests,
                responses,
                ms,
            } => {
                if requests {
                    self.cond_begin(Cond::LoseRenewRequests(node), ms);
                }
                if responses {
                    self.cond_begin(Cond::LoseRenewResponses(node), ms);
                }
            }
            Fault::Partition { node, ms } => self.cond_begin(Cond::Partition(node), ms),
            Fault::SlowLink { node, ms } => self.cond_begin(Cond::SlowLink(node), ms),
            Fault::FailMonitor { node, resource, ms } => self.cond_begin(Cond::FailMonitor(node, resource), ms),
            Fault::Kill { node, resource } => {
                if self.res[resource].role != Role::MonitorOnly {
                    self.kill(node, resource, Killer::Fault);
                }
            }
            Fault::SlowOps { node, ms } => self.cond_begin(Cond::SlowOps(node), ms),
            Fault::FailStarts { node, resource, ms } => self.cond_begin(Cond::FailStarts(node, resource), ms),
            Fault::FailStops { node, ms } => self.cond_begin(Cond::FailStops(node), ms),
            Fault::Sigterm { node, down_for } => {
                if self.nodes[node].agent.is_some() {
                    self.nodes[node].down_after_exit = Some(down_for);
                    self.notify(node, Event::Shutdown);
                }
            }
            Fault::MoveTo { group, node } => {
                let name = self.groups[group].name.clone();
                let mut admin = self.coord.group_admin(&name);
                admin.move_to = Some(self.nodes[node].name.clone());
                if self.coord.set_group_admin(&name, admin) {
                    self.broadcast();
                }
            }
            Fault::GroupMaintenance { group, ms } => self.cond_begin(Cond::GroupMaintenance(group), ms),
            Fault::ClusterMaintenance { ms } => self.cond_begin(Cond::ClusterMaintenance, ms),
            Fault::NodeMaintenance { node, ms } => self.cond_begin(Cond::NodeMaintenance(node), ms),
            Fault::NodeStandby { node, ms } => self.cond_begin(Cond::NodeStandby(node), ms),
            Fault::StopGroup { group, ms } => self.cond_begin(Cond::StopGroup(group), ms),
        }
    }

    // ----- checkers -----

    fn nodes_alive(&self, gi: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&n| {
                self.groups[gi]
                    .managed
                    .iter()
                    .any(|&ri| self.nodes[n].res[ri].state.alive())
            })
            .collect()
    }

    /// Check 1: at most one node has any of a group's managed resources alive.
    fn check_safety(&mut self) -> Result<(), Violation> {
        for gi in 0..self.groups.len() {
            let alive = self.nodes_alive(gi);
            if alive.len() > 1 {
                return Err(Violation::Safety {
                    group: self.groups[gi].name.clone(),
                    nodes: alive.iter().map(|&n| self.nodes[n].name.clone()).collect(),
                });
            }
            let owner = alive.first().map(|&n| self.nodes[n].name.clone());
            if owner.is_some() && owner != self.last_owner[gi] {
                if self.last_owner[gi].is_some() {
                    self.stats.takeovers += 1;
                }
                self.last_owner[gi] = owner;
            }
        }
        Ok(())
    }

    /// Check 5: a failure record lands only while its node owns the group
    /// (the write is fenced by the node's token), and a failure counts once
    /// however often its write was retried.
    fn check_failure_record(&mut self, group: &str, failure: &Failure) {
        let owner = self.coord.owner(group).map(|(node, _)| node.to_string());
        let detail = if owner.as_deref() != Some(failure.node.as_str()) {
            Some(format!(
                "the failure {} of {} landed while {owner:?} owned the group",
                failure.id, failure.node
            ))
        } else {
            let list = self.coord.failures(group);
            let copies = list.iter().filter(|f| f.id == failure.id).count();
            (copies != 1).then(|| format!("the failure {} is recorded {copies} times", failure.id))
        };
        if let Some(detail) = detail {
            self.fail(Violation::Fencing {
                group: group.to_string(),
                detail,
            });
        }
    }

    /// Check 2: a group resource starts only under the coordinator's owner
    /// key of this node with the Start's token.
    fn check_authority(&mut self, n: usize, ri: usize, authority: Option<Authority>) {
        if self.res[ri].role != Role::Managed {
            return;
        }
        let group = &self.groups[self.res[ri].group].name;
        let node = &self.nodes[n].name;
        let owner = self.coord.owner(group);
        let ok = match (owner, authority) {
            (Some((o, token)), Some(a)) => o == node && token == a.token,
            _ => false,
        };
        if !ok {
            let v = Violation::Authority {
                node: node.clone(),
                resource: self.res[ri].name.clone(),
                detail: format!(
                    "coordinator owner key of {group} is {owner:?}, start carried {:?}",
                    authority.map(|a| a.token)
                ),
            };
            self.fail(v);
        }
    }

    /// Check 3a: every effective dependency runs on this node (an optional
    /// one may instead be stopped: the agent skips failed optional members;
    /// one that was killed and whose death the agent has not noticed yet
    /// counts as running).
    fn check_start_order(&mut self, n: usize, ri: usize) {
        let bad: Vec<String> = self.res[ri]
            .deps
            .iter()
            .filter(|&&d| {
                let s = self.nodes[n].res[d].state;
                !(s == Actual::Running || self.believed_running(n, d) || (self.res[d].optional && s == Actual::Stopped))
            })
            .map(|&d| format!("{} is {:?}", self.res[d].name, self.nodes[n].res[d].state))
            .collect();
        if !bad.is_empty() {
            let v = Violation::Order {
                node: self.nodes[n].name.clone(),
                resource: self.res[ri].name.clone(),
                detail: format!("started while dependencies were not running: {}", bad.join(", ")),
            };
            self.fail(v);
        }
    }

    /// Check 3b: an orderly stop happens only once nothing depending on the
    /// resource is alive on this node.
    fn check_stop_order(&mut self, n: usize, ri: usize) {
        let bad: Vec<String> = self.res[ri]
            .dependents
            .iter()
            .filter(|&&d| self.nodes[n].res[d].state.alive())
            .map(|&d| format!("{} is {:?}", self.res[d].name, self.nodes[n].res[d].state))
            .collect();
        if !bad.is_empty() {
            let v = Violation::Order {
                node: self.nodes[n].name.clone(),
                resource: self.res[ri].name.clone(),
                detail: format!("orderly stop while dependents alive: {}", bad.join(", ")),
            };
            self.fail(v);
        }
    }
}

// ----- compact text for traces -----

fn view_summary(v: &ClusterView) -> String {
    let owners: Vec<String> = v
        .owners
        .iter()
        .map(|(g, o)| format!("{g}={}@{}", o.node, o.token))
        .collect();
    let nodes: Vec<String> = v
        .nodes
        .iter()
        .map(|(n, r)| if r.leaving { format!("{n}(leaving)") } else { n.clone() })
        .collect();
    let mut s = format!(
        "rev {} nodes [{}] owners [{}]",
        v.revision,
        nodes.join(" "),
        owners.join(" ")
    );
    if v.maintenance {
        s.push_str(" MAINTENANCE");
    }
    for (n, a) in &v.node_admin {
        if a.maintenance || a.standby {
            s.push_str(&format!(
                " {n}:{}{}",
                if a.maintenance { "m" } else { "" },
                if a.standby { "s" } else { "" }
            ));
        }
    }
    for (g, a) in &v.group_admin {
        if a.maintenance || a.stopped || a.move_to.is_some() {
            s.push_str(&format!(
                " {g}:{}{}{}",
                if a.maintenance { "m" } else { "" },
                if a.stopped { "x" } else { "" },
                a.move_to.as_deref().map(|t| format!("->{t}")).unwrap_or_default()
            ));
        }
    }
    for (g, l) in &v.failures {
        let f: Vec<String> = l.iter().map(|f| f.node.clone()).collect();
        s.push_str(&format!(" failures {g}:[{}]", f.join(",")));
    }
    s
}

fn event_summary(e: &Event) -> String {
    match e {
        Event::View(v) => format!("View {}", view_summary(v)),
        other => format!("{other:?}"),
    }
}

fn input_summary(i: &Input) -> String {
    match i {
        Input::Event(e) => event_summary(e),
        Input::View { view, .. } => format!("View {}", view_summary(view)),
        Input::Response { req, reply, .. } => format!(
            "response {req}: {}",
            reply.as_ref().map_or("ack".to_string(), event_summary)
        ),
        other => format!("{other:?}"),
    }
}
