//! The agent's decision logic, as a deterministic state machine.
//!
//! One `Agent` runs per node. It is driven from outside — by the tokio shell
//! in `understudy-agent`, or by the simulator — in the style of quinn-proto:
//!
//! ```text
//! agent.handle(now, event);               // something happened
//! while let Some(a) = agent.poll_action() // what to do about it
//! agent.poll_timeout()                    // when to call handle(now, Event::Tick)
//! ```
//!
//! It never does IO and never reads a clock: `now` carries the node's
//! monotonic time (for lease deadlines) and wall time (for records shared with
//! other nodes). Every decision is level-triggered: after each event the agent
//! recomputes the plan from the cluster view and moves its local resources one
//! step towards it.
//!
//! Safety rule (no two nodes run one group): the agent issues `Start` for a
//! group's resource only while it holds the group's owner key — it won the
//! campaign for it and its session lease is still inside the self-fencing
//! deadline. Every `Start` carries an [`Authority`] saying so. The deadline is
//! `sent_at(last acknowledged renewal) + lease_ttl - fence_margin` on the
//! node's own monotonic clock; the coordinator cannot expire the lease before
//! `sent_at + lease_ttl`, so the node has stopped (or its fence guard has
//! killed) the group before any other node can win the key.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::graph::{Catalog, GroupOrder};
use crate::observed::{Failure, Observed};
use crate::planner::{self, Plan};
use crate::spec::{ClusterSpec, OnFail, ResourceSpec, Role};
use crate::time::Time;

/// The two clocks the agent is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// The node's monotonic clock: lease deadlines, timers.
    pub mono: Time,
    /// Wall-clock time (ms since the Unix epoch): failure records shared
    /// with other nodes, failure windows.
    pub wall: Time,
}

/// A node's registration, written by its own agent and attached to its lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The agent is shutting down and moving its groups away.
    #[serde(default)]
    pub leaving: bool,
    /// The agent process that registered the node (a second agent for the
    /// node is refused). `None` in records of older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentIdentity>,
}

/// Which agent process runs a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub host: String,
    pub pid: u32,
    /// Kept in the agent's state directory: the same across restarts of
    /// one node's agent, different for any other agent.
    pub instance: String,
}

/// A group's owner key: who holds it and the key's create revision (the
/// fencing token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub node: String,
    pub token: i64,
}

/// Operator settings for a node (`understudy standby|maintenance`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdmin {
    #[serde(default)]
    pub standby: bool,
    #[serde(default)]
    pub maintenance: bool,
}

/// Operator settings for a group (`understudy move|stop|maintenance`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupAdmin {
    #[serde(default)]
    pub maintenance: bool,
    #[serde(default)]
    pub stopped: bool,
    #[serde(default)]
    pub move_to: Option<String>,
}

/// What the coordinator shows, as maintained by the shell from its watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// The coordinator revision this view reflects.
    pub revision: i64,
    /// Registered (alive) nodes.
    pub nodes: BTreeMap<String, NodeRecord>,
    pub owners: BTreeMap<String, OwnerRecord>,
    pub maintenance: bool,
    pub node_admin: BTreeMap<String, NodeAdmin>,
    pub group_admin: BTreeMap<String, GroupAdmin>,
    pub failures: BTreeMap<String, Vec<Failure>>,
}

/// What a monitor found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "health", content = "detail", rename_all = "snake_case")]
pub enum Health {
    Running,
    Stopped,
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Start,
    Stop,
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passed (the shell calls this at `poll_timeout()`).
    Tick,
    /// A session lease was granted and the node registered; `sent_at` is when
    /// the grant request was sent (monotonic).
    SessionOpened { lease: i64, sent_at: Time },
    /// Opening the session failed (coordinator unavailable); retried later.
    SessionOpenFailed,
    /// A keep-alive of `lease` sent at `sent_at` was acknowledged.
    Renewed { lease: i64, sent_at: Time },
    /// A keep-alive failed or timed out (coordinator unreachable).
    RenewFailed { lease: i64 },
    /// The coordinator says the lease no longer exists.
    SessionLost { lease: i64 },
    /// The cluster view changed.
    View(ClusterView),
    /// Result of the campaign made with `lease`: the fencing token when won.
    CampaignResult {
        group: String,
        lease: i64,
        won: Option<i64>,
    },
    /// A resign request completed (`ok = false`: the coordinator could not be reached).
    Resigned { group: String, ok: bool },
    /// A start or stop finished.
    OpDone {
        resource: String,
        op: Op,
        result: Result<(), String>,
    },
    /// A monitor finished; `epoch` is the one its `Action::Monitor` carried.
    MonitorDone {
        resource: String,
        epoch: u64,
        health: Health,
    },
    /// The operator asked the agent to stop (SIGTERM): move groups away, then exit.
    Shutdown,
    /// The fence guard died and no new one could be started: without its
    /// safety net the node must not hold groups.
    GuardDown { reason: String },
    /// A fence guard runs again.
    GuardUp,
    /// The outcome of `RecordFailure` for the failure `id`: `landed` when the
    /// record is in the group's list (written now or by an earlier attempt);
    /// false when the coordinator refused it (the token is no longer the
    /// owner key's) or the shell gave up.
    FailureRecorded { group: String, id: String, landed: bool },
}

/// Why this node may start a group's resources: it holds the owner key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Authority {
    pub lease: i64,
    /// The owner key's create revision (fencing token).
    pub token: i64,
    /// The self-fencing deadline (monotonic) this authority expires at.
    pub valid_until: Time,
}

/// Kinds of journal entries (`understudy events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    SessionOpened,
    SessionLost,
    Fenced,
    Acquired,
    Released,
    OwnershipLost,
    Starting,
    Started,
    StartFailed,
    Stopping,
    Stopped,
    StopFailed,
    GroupStarted,
    GroupStopped,
    MonitorFailed,
    MonitorRecovered,
    Restarting,
    FailingOver,
    GaveUp,
    ShuttingDown,
    Frozen,
    /// The node's fence guard took owned resources away (recorded by the
    /// shell when the agent next opens a session).
    GuardFired,
    /// At start-up, the agent found something an earlier run of this node
    /// left running (processes in its cgroups, a mount, an address) and
    /// stopped it.
    LeftoverStopped,
    /// How the node contains what its resources start (cgroups, or the
    /// process-group fallback and why).
    Containment,
    /// The node could not write to the coordinator for a while; the
    /// records it made meanwhile follow with their own times.
    CoordinatorUnreachable,
    /// The fence guard died and the agent started a new one.
    GuardRestarted,
    /// The fence guard died and could not be restarted: the node fenced
    /// itself and holds nothing until a guard runs again.
    GuardLost,
}

/// One journal entry; the shell adds node and time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: EntryKind,
    pub group: Option<String>,
    pub resource: Option<String>,
    pub message: String,
}

/// Something the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Grant a session lease (`lease_ttl`), register the node with it, and
    /// report `SessionOpened` (or `SessionOpenFailed`).
    OpenSession,
    /// Send a keep-alive for the session lease; report `Renewed`, `RenewFailed`
    /// or `SessionLost`.
    Renew { lease: i64 },
    /// Create the group's owner key, attached to the session lease, if absent.
    Campaign { group: String, lease: i64 },
    /// Delete the group's owner key if its create revision is `token`.
    Resign { group: String, token: i64 },
    /// Start a resource. `authority` is `None` only for clones.
    Start {
        group: String,
        resource: String,
        authority: Option<Authority>,
    },
    /// Stop a resource; `urgent` means as fast as possible (SIGKILL at once).
    Stop {
        group: String,
        resource: String,
        urgent: bool,
    },
    /// Run a resource's monitor once; report `MonitorDone` with the same `epoch`.
    Monitor {
        group: String,
        resource: String,
        epoch: u64,
    },
    /// Append a failure of `group` on this node, stamped `at` (wall), to the
    /// group's failure list, fenced by `token` (the owner key must still
    /// have it) and idempotent by the failure's id; report `FailureRecorded`.
    RecordFailure {
        group: String,
        failure: Failure,
        token: i64,
    },
    /// The group reached its requested node: clear the operator's move request.
    ClearMoveRequest { group: String },
    /// Mark this node as leaving in its registration (shutdown).
    SetLeaving,
    /// Tell the fence guard: kill every owned resource's processes if no
    /// newer deadline arrives before `deadline` (monotonic).
    ArmGuard { deadline: Time },
    /// Write a journal entry.
    Journal(Entry),
    /// Everything is stopped and released: revoke the session and exit.
    Exit,
}

/// Local state of one resource on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResState {
    Stopped,
    Starting,
    Running,
    Stopping,
    /// Start failed, or it died beyond its restart limit; not running.
    Failed,
    /// Stop failed even when urgent: needs an operator.
    StopFailed,
}

#[derive(Clone, Debug)]
struct Res {
    state: ResState,
    /// Stop requested to restart it (and its dependents).
    restart: bool,
    restarts: Vec<Time>,
    monitor_due: Option<Time>,
    monitor_in_flight: bool,
    last_health: Option<Health>,
    /// An optional member that failed: skipped until the group restarts.
    skipped: bool,
    /// Stop it at once (authority lost, or an orderly stop failed).
    urgent: bool,
    /// It may still be alive although this node lost the authority it ran
    /// under (fenced, ownership lost): the fence guard must not be moved
    /// past the deadline already armed until it has stopped.
    lost: bool,
    /// The stop in flight was forced (`urgent` may have been set after an
    /// orderly stop was issued; only a forced stop's failure is final).
    forced: bool,
    /// Increases with every start, so a monitor result about an earlier
    /// instance is recognised and ignored.
    epoch: u64,
}

impl Res {
    fn new() -> Res {
        Res {
            state: ResState::Stopped,
            restart: false,
            restarts: Vec::new(),
            monitor_due: None,
            monitor_in_flight: false,
            last_health: None,
            skipped: false,
            urgent: false,
            lost: false,
            forced: false,
            epoch: 0,
        }
    }

    fn busy(&self) -> bool {
        matches!(self.state, ResState::Starting | ResState::Stopping)
    }

    /// Holds something that must be stopped.
    fn needs_stop(&self) -> bool {
        matches!(self.state, ResState::Running | ResState::Failed)
    }
}

/// Local state of one group.
#[derive(Clone, Debug, Default)]
struct GroupRun {
    /// We won the campaign and have not lost or released the key.
    held: Option<i64>,
    /// The session lease an outstanding campaign was made with.
    campaign_lease: Option<i64>,
    /// The token of a key we released, so a view that still shows it is not
    /// mistaken for a stale key.
    released: Option<i64>,
    /// The owner key with our token has shown up in the view.
    confirmed: bool,
    resign_pending: bool,
    /// Leaving after a failure (or a stale key from an earlier run).
    failing_over: bool,
    /// A resign of the held key was sent: the key is being given up, even
    /// if the plan changes its mind or the resign fails (it may have taken
    /// effect), so nothing of the group starts under it again.
    resigning: bool,
    /// The token of the last resign sent (`Resigned` does not name it).
    resign_token: Option<i64>,
    /// No campaign or resign for this group before this time (backoff after
    /// a lost campaign or a resign the coordinator did not answer).
    retry_at: Option<Time>,
    /// Announced "group started" for the current run.
    started_announced: bool,
    /// Resources of the group were touched and not all stopped since.
    active: bool,
    /// A failure record (its id) not yet reported as landed or refused, and
    /// how long the resign waits for it: the record is fenced by the token,
    /// so it must land before the key is given back.
    recording: Option<(String, Time)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Session {
    None,
    Opening,
    Open {
        lease: i64,
        deadline: Time,
        next_renew: Time,
        renew_in_flight: bool,
    },
}

/// Per-node status, published for `understudy status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub session: bool,
    pub maintenance: bool,
    pub leaving: bool,
    /// Why the node has no fence guard (it holds nothing meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_down: Option<String>,
    /// Groups this node holds.
    pub holds: Vec<String>,
    pub resources: BTreeMap<String, ResourceStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResourceStatus {
    pub group: String,
    pub state: ResState,
    pub last_monitor: Option<Health>,
    pub restarts: usize,
}

/// The agent of one node.
pub struct Agent {
    spec: ClusterSpec,
    node: String,
    lease_ttl: Duration,
    renew_interval: Duration,
    fence_margin: Duration,
    /// Resource name → group name.
    group_of: HashMap<String, String>,
    /// Resource name → effective dependencies (names).
    deps: HashMap<String, Vec<String>>,
    /// Resource name → local dependents (names), transitive.
    dependents: HashMap<String, Vec<String>>,
    orders: BTreeMap<String, GroupOrder>,
    clone_waves: Vec<Vec<String>>,
    session: Session,
    view: Option<ClusterView>,
    groups: BTreeMap<String, GroupRun>,
    res: BTreeMap<String, Res>,
    /// Failures this node recorded that the view does not show yet.
    local_failures: Vec<(String, Failure)>,
    /// Failures issued by this run, for their ids.
    failure_seq: u64,
    shutting_down: bool,
    /// End of the join window: until then this agent does not take a group
    /// a more preferred node may be about to take (a cluster started all at
    /// once places groups on their preferred nodes).
    join_until: Option<Time>,
    /// Wake up at the end of the join window to look again (a wait for a
    /// peer ends earlier if the peer joins; it must not hold back a campaign
    /// the way a backoff does).
    join_wake: Option<Time>,
    leaving_sent: bool,
    exited: bool,
    retry_at: Option<Time>,
    actions: VecDeque<Action>,
    last_plan: Option<Plan>,
    /// The deadline last handed to the fence guard.
    guard: Option<Time>,
    /// The fence guard is dead and could not be restarted (why).
    guard_down: Option<String>,
}

impl Agent {
    /// An agent for `node` of `spec`. `spec` must be a checked definition.
    pub fn new(spec: ClusterSpec, node: &str) -> Agent {
        let catalog = Catalog::new(&spec);
        let mut group_of = HashMap::new();
        let mut deps = HashMap::new();
        let mut orders = BTreeMap::new();
        let mut res = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for g in &spec.groups {
            orders.insert(g.name.clone(), catalog.group_order(g).unwrap_or_default());
            groups.insert(g.name.clone(), GroupRun::default());
            for r in &g.resources {
                group_of.insert(r.name.clone(), g.name.clone());
                let d: Vec<String> = catalog.effective_deps(r).into_iter().map(str::to_string).collect();
                deps.insert(r.name.clone(), d);
                if r.enabled {
                    res.insert(r.name.clone(), Res::new());
                }
            }
        }
        let mut dependents: HashMap<String, Vec<String>> = HashMap::new();
        for (r, ds) in &deps {
            for d in ds {
                dependents.entry(d.clone()).or_default().push(r.clone());
            }
        }
        for list in dependents.values_mut() {
            list.sort();
        }
        let clone_waves = catalog.clone_waves().unwrap_or_default();
        Agent {
            lease_ttl: spec.settings.lease_ttl,
            renew_interval: spec.settings.renew_interval,
            fence_margin: spec.settings.fence_margin,
            node: node.to_string(),
            group_of,
            deps,
            dependents,
            orders,
            clone_waves,
            session: Session::None,
            view: None,
            groups,
            res,
            local_failures: Vec::new(),
            failure_seq: 0,
            shutting_down: false,
            join_until: None,
            join_wake: None,
            leaving_sent: false,
            exited: false,
            retry_at: None,
            actions: VecDeque::new(),
            last_plan: None,
            guard: None,
            guard_down: None,
            spec,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call `handle(now, Event::Tick)` next (monotonic).
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = self.retry_at;
        let mut at = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        if let Some(w) = self.join_wake {
            at(w);
        }
        for g in self.groups.values() {
            if let Some(r) = g.retry_at {
                at(r);
            }
            if let Some((_, until)) = &g.recording {
                at(*until);
            }
        }
        if let Session::Open {
            deadline,
            next_renew,
            renew_in_flight,
            ..
        } = self.session
        {
            at(deadline);
            if !renew_in_flight {
                at(next_renew);
            }
        }
        for (name, r) in &self.res {
            // Only checks `schedule_monitors` would run: a due time left on a
            // stopped resource, or on one waiting to restart, would wake the
            // agent at once, over and over.
            let checked =
                r.state == ResState::Running || self.spec_of(name).is_some_and(|s| s.role == Role::MonitorOnly);
            if let Some(due) = r.monitor_due
                && !r.monitor_in_flight
                && !r.restart
                && checked
            {
                at(due);
            }
        }
        t
    }

    /// True once the agent asked to exit.
    pub fn exited(&self) -> bool {
        self.exited
    }

    /// The local state of a resource, for tests and status.
    pub fn resource_state(&self, name: &str) -> Option<ResState> {
        self.res.get(name).map(|r| r.state)
    }

    /// The groups this node holds right now.
    pub fn holds(&self) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(_, g)| g.held.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Why this node may run `group` now, or `None`.
    pub fn authority(&self, group: &str, now: Time) -> Option<Authority> {
        let Session::Open { lease, deadline, .. } = self.session else {
            return None;
        };
        if now >= deadline {
            return None;
        }
        let token = self.groups.get(group)?.held?;
        Some(Authority {
            lease,
            token,
            valid_until: deadline,
        })
    }

    /// The last plan computed (for status and debugging).
    pub fn last_plan(&self) -> Option<&Plan> {
        self.last_plan.as_ref()
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            session: matches!(self.session, Session::Open { .. }),
            maintenance: self.frozen_node(),
            leaving: self.shutting_down,
            guard_down: self.guard_down.clone(),
            holds: self.holds(),
            resources: self
                .res
                .iter()
                .filter(|(_, r)| r.state != ResState::Stopped || r.last_health.is_some())
                .map(|(name, r)| {
                    (
                        name.clone(),
                        ResourceStatus {
                            group: self.group_of.get(name).cloned().unwrap_or_default(),
                            state: r.state,
                            last_monitor: r.last_health.clone(),
                            restarts: r.restarts.len(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Processes one event, then reconciles.
    pub fn handle(&mut self, now: Now, event: Event) {
        if self.exited {
            return;
        }
        match event {
            Event::Tick => {}
            Event::SessionOpened { .. } if self.guard_down.is_some() => {
                // Opened before the guard was lost: not used (its lease
                // expires unrenewed), nothing is won under it.
                self.session = Session::None;
            }
            Event::SessionOpened { lease, sent_at } => {
                if self.join_until.is_none() {
                    self.join_until = Some(now.mono + self.lease_ttl);
                }
                let deadline = self.deadline_from(sent_at);
                self.session = Session::Open {
                    lease,
                    deadline,
                    next_renew: sent_at + self.renew_interval,
                    renew_in_flight: false,
                };
                self.journal(
                    EntryKind::SessionOpened,
                    None,
                    None,
                    format!("session lease {lease} granted"),
                );
            }
            Event::SessionOpenFailed => {
                // Back off, so an unreachable coordinator is not hammered.
                self.session = Session::None;
                self.retry_at = Some(now.mono + self.renew_interval);
            }
            Event::Renewed {
                lease: renewed,
                sent_at,
            } => {
                if let Session::Open {
                    lease,
                    deadline,
                    next_renew,
                    ..
                } = self.session
                    && lease == renewed
                {
                    let fresh = self.deadline_from(sent_at);
                    // Only a renewal that moves the deadline forward counts, and
                    // never one that arrives after the deadline passed (we are
                    // fencing by then).
                    let deadline = if now.mono < deadline {
                        deadline.max(fresh)
                    } else {
                        deadline
                    };
                    self.session = Session::Open {
                        lease,
                        deadline,
                        next_renew: next_renew.max(sent_at + self.renew_interval),
                        renew_in_flight: false,
                    };
                }
            }
            Event::RenewFailed { lease: failed } => {
                if let Session::Open {
                    lease,
                    deadline,
                    next_renew,
                    ..
                } = self.session
                    && lease == failed
                {
                    // Retry soon, but never at once: the failed renewal was
                    // due (`next_renew` has passed), so retrying at
                    // `next_renew` would send the next one immediately, over
                    // and over, while the coordinator keeps refusing. The
                    // deadline does not move.
                    let retry = now.mono + self.renew_interval / 4;
                    let next_renew = if next_renew > now.mono {
                        next_renew.min(retry)
                    } else {
                        retry
                    };
                    self.session = Session::Open {
                        lease,
                        deadline,
                        next_renew,
                        renew_in_flight: false,
                    };
                }
            }
            Event::SessionLost { lease: lost } => {
                if matches!(self.session, Session::Open { lease, .. } if lease == lost) {
                    self.journal(
                        EntryKind::SessionLost,
                        None,
                        None,
                        "the coordinator no longer knows the session lease".into(),
                    );
                    self.fence("session lease lost");
                }
            }
            Event::View(view) => self.on_view(now, view),
            Event::CampaignResult { group, lease, won } => self.on_campaign(now, &group, lease, won),
            Event::Resigned { group, ok } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.resign_pending = false;
                    let token = g.resign_token.take();
                    if ok && g.held.is_some() && g.held != token {
                        // The answer is about an older key (given back, or
                        // stale); the key won since stays held.
                    } else if ok {
                        g.released = g.held.or(g.released);
                        g.held = None;
                        g.confirmed = false;
                        g.failing_over = false;
                        g.resigning = false;
                        g.started_announced = false;
                        g.recording = None;
                        for r in self.managed_of(&group) {
                            if let Some(x) = self.res.get_mut(&r) {
                                x.skipped = false;
                            }
                        }
                        self.journal(EntryKind::Released, Some(&group), None, "released ownership".into());
                    } else {
                        g.retry_at = Some(now.mono + self.renew_interval / 2);
                    }
                }
            }
            Event::OpDone { resource, op, result } => self.on_op_done(now, &resource, op, result),
            Event::MonitorDone {
                resource,
                epoch,
                health,
            } => {
                if self.res.get(&resource).is_some_and(|r| r.epoch == epoch) {
                    self.on_monitor(now, &resource, health);
                } else if let Some(r) = self.res.get_mut(&resource) {
                    r.monitor_in_flight = false;
                }
            }
            Event::GuardDown { reason } => {
                if self.guard_down.is_none() {
                    self.journal(
                        EntryKind::GuardLost,
                        None,
                        None,
                        format!(
                            "the fence guard is gone and cannot be restarted ({reason}): holding nothing until one runs"
                        ),
                    );
                    self.fence("no fence guard");
                    // No new session either: a session would let it win groups.
                    self.guard_down = Some(reason);
                    self.guard = None;
                }
            }
            Event::GuardUp => {
                if self.guard_down.take().is_some() {
                    self.journal(
                        EntryKind::GuardRestarted,
                        None,
                        None,
                        "a fence guard runs again: rejoining".into(),
                    );
                }
            }
            Event::FailureRecorded { group, id, landed } => {
                if let Some(g) = self.groups.get_mut(&group)
                    && g.recording.as_ref().is_some_and(|(waited, _)| *waited == id)
                {
                    // Landed or not (the shell logs why), the resign need
                    // not wait any longer: a refused record means the key
                    // is no longer ours.
                    g.recording = None;
                }
                if !landed {
                    // It will never show in the view: plan with what the
                    // coordinator holds, like every other node.
                    self.local_failures.retain(|(g, f)| !(*g == group && f.id == id));
                }
            }
            Event::Shutdown => {
                if !self.shutting_down {
                    self.shutting_down = true;
                    self.journal(
                        EntryKind::ShuttingDown,
                        None,
                        None,
                        "shutting down: moving groups away".into(),
                    );
                }
            }
        }
        self.reconcile(now);
    }

    fn deadline_from(&self, sent_at: Time) -> Time {
        sent_at + self.lease_ttl.saturating_sub(self.fence_margin)
    }

    /// Keeps the fence guard armed for the session's deadline. The guard
    /// acts half a margin after the agent would have fenced: still before
    /// the coordinator can expire the lease.
    ///
    /// Resources still alive after their authority was lost (fenced, or
    /// ownership lost, while they were starting or stopping) must be dead by
    /// the deadline already armed, which comes before their lease can
    /// expire: until they have stopped, a new session or a renewal does not
    /// move the guard. Once they have, the guard is armed for the current
    /// session before anything can start under it.
    fn sync_guard(&mut self) {
        let Session::Open { deadline, .. } = self.session else {
            return;
        };
        let lost_alive = self.res.iter().any(|(name, r)| {
            r.lost
                && matches!(r.state, ResState::Starting | ResState::Running | ResState::Stopping)
                && self.spec_of(name).is_some_and(|s| s.role == Role::Managed)
        });
        let want = deadline + self.fence_margin / 2;
        if !lost_alive && self.guard != Some(want) {
            self.guard = Some(want);
            self.actions.push_back(Action::ArmGuard { deadline: want });
        }
    }

    fn journal(&mut self, kind: EntryKind, group: Option<&str>, resource: Option<&str>, message: String) {
        self.actions.push_back(Action::Journal(Entry {
            kind,
            group: group.map(str::to_string),
            resource: resource.map(str::to_string),
            message,
        }));
    }

    /// The session cannot be trusted any more: stop every owned group now.
    fn fence(&mut self, why: &str) {
        let held: Vec<String> = self.holds();
        if !held.is_empty() {
            self.journal(
                EntryKind::Fenced,
                None,
                None,
                format!("{why}: stopping {} at once", held.join(", ")),
            );
        }
        // A resign in flight stays pending: its answer must not be taken
        // for one about a key won later (`Resigned` names no token).
        for g in self.groups.values_mut() {
            g.held = None;
            g.confirmed = false;
            g.campaign_lease = None;
            g.started_announced = false;
        }
        for name in self.group_resource_names() {
            if let Some(r) = self.res.get_mut(&name)
                && r.state != ResState::Stopped
            {
                r.urgent = true;
                r.lost = true;
            }
        }
        self.session = Session::None;
        self.retry_at = None;
    }

    fn group_resource_names(&self) -> Vec<String> {
        self.spec
            .groups
            .iter()
            .flat_map(|g| g.resources.iter())
            .filter(|r| r.enabled && r.role == Role::Managed)
            .map(|r| r.name.clone())
            .collect()
    }

    fn on_view(&mut self, now: Now, view: ClusterView) {
        // Ownership we believe in must match the coordinator.
        let mut lost = Vec::new();
        for (name, g) in &mut self.groups {
            let Some(token) = g.held else { continue };
            match view.owners.get(name) {
                Some(o) if o.node == self.node && o.token == token => g.confirmed = true,
                // A view older than our key (a lagging watch) says nothing
                // about it, whoever it shows as owner.
                _ if !g.confirmed && view.revision < token => {}
                _ => lost.push(name.clone()),
            }
        }
        for name in lost {
            // (A resign in flight stays pending, as in `fence`.)
            if let Some(g) = self.groups.get_mut(&name) {
                g.held = None;
                g.confirmed = false;
                g.started_announced = false;
            }
            let names: Vec<String> = self.managed_of(&name);
            for r in names {
                if let Some(res) = self.res.get_mut(&r)
                    && res.state != ResState::Stopped
                {
                    res.urgent = true;
                    res.lost = true;
                }
            }
            self.journal(
                EntryKind::OwnershipLost,
                Some(&name),
                None,
                "the owner key is gone or belongs to another node: stopping at once".into(),
            );
        }
        self.local_failures.retain(|(g, f)| {
            !view
                .failures
                .get(g)
                .is_some_and(|list| list.iter().any(|x| x.id == f.id))
        });
        let _ = now;
        self.view = Some(view);
    }

    fn on_campaign(&mut self, now: Now, group: &str, lease: i64, won: Option<i64>) {
        let current = match self.session {
            Session::Open { lease, deadline, .. } if now.mono < deadline => Some(lease),
            _ => None,
        };
        let Some(g) = self.groups.get_mut(group) else { return };
        if g.campaign_lease == Some(lease) {
            g.campaign_lease = None;
        }
        let Some(token) = won else {
            // Someone else holds it (or the request failed); the view will
            // say who. Do not ask again at once while the view is stale.
            g.retry_at = Some(now.mono + (self.renew_interval / 4).min(std::time::Duration::from_millis(100)));
            return;
        };
        if current == Some(lease) && g.held.is_none() {
            g.held = Some(token);
            g.confirmed = false;
            g.failing_over = false;
            g.resigning = false;
            g.started_announced = false;
            g.recording = None;
            self.journal(
                EntryKind::Acquired,
                Some(group),
                None,
                format!("acquired ownership (fencing token {token})"),
            );
        } else {
            // Won under a session we no longer trust: the key is attached to a
            // lease that may expire at any moment. Give it back, run nothing.
            g.released = Some(token);
            g.resign_pending = true;
            g.resign_token = Some(token);
            self.actions.push_back(Action::Resign {
                group: group.to_string(),
                token,
            });
        }
    }

    fn on_op_done(&mut self, now: Now, resource: &str, op: Op, result: Result<(), String>) {
        let group = self.group_of.get(resource).cloned().unwrap_or_default();
        let optional = self.spec_of(resource).is_some_and(|r| r.optional);
        let interval = self.spec_of(resource).and_then(|r| r.monitor).map(|m| m.interval);
        let Some(r) = self.res.get_mut(resource) else { return };
        match (op, result) {
            (Op::Start, Ok(())) => {
                r.state = ResState::Running;
                r.epoch += 1;
                r.monitor_due = interval.map(|i| now.mono + i);
                r.monitor_in_flight = false;
                self.journal(EntryKind::Started, Some(&group), Some(resource), "started".into());
            }
            (Op::Start, Err(e)) => {
                r.state = ResState::Failed;
                self.journal(
                    EntryKind::StartFailed,
                    Some(&group),
                    Some(resource),
                    format!("start failed: {e}"),
                );
                if optional {
                    if let Some(r) = self.res.get_mut(resource) {
                        r.skipped = true;
                    }
                } else if self.is_clone(resource) {
                    self.give_up_clone(now, resource);
                } else {
                    self.fail_over(now, &group, resource, "start failed");
                }
            }
            (Op::Stop, Ok(())) => {
                r.state = ResState::Stopped;
                r.monitor_due = None;
                r.urgent = false;
                r.lost = false;
                self.journal(EntryKind::Stopped, Some(&group), Some(resource), "stopped".into());
            }
            (Op::Stop, Err(e)) => {
                if r.forced {
                    r.state = ResState::StopFailed;
                    self.journal(
                        EntryKind::StopFailed,
                        Some(&group),
                        Some(resource),
                        format!("stop failed even when forced: {e}; needs an operator"),
                    );
                } else {
                    // Try again, forcefully.
                    r.state = ResState::Running;
                    r.urgent = true;
                    self.journal(
                        EntryKind::StopFailed,
                        Some(&group),
                        Some(resource),
                        format!("stop failed: {e}; forcing"),
                    );
                }
            }
        }
    }

    fn spec_of(&self, resource: &str) -> Option<&ResourceSpec> {
        let g = self.group_of.get(resource)?;
        self.spec.groups.iter().find(|x| &x.name == g)?.resource(resource)
    }

    fn is_clone(&self, resource: &str) -> bool {
        self.spec_of(resource).is_some_and(|r| r.role == Role::Clone)
    }

    fn managed_of(&self, group: &str) -> Vec<String> {
        self.orders
            .get(group)
            .map(|o| o.start_waves.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn frozen_node(&self) -> bool {
        let Some(view) = &self.view else { return false };
        view.maintenance || view.node_admin.get(&self.node).is_some_and(|a| a.maintenance)
    }

    fn frozen_group(&self, group: &str) -> bool {
        self.frozen_node()
            || self
                .view
                .as_ref()
                .and_then(|v| v.group_admin.get(group))
                .is_some_and(|a| a.maintenance)
    }

    fn on_monitor(&mut self, now: Now, resource: &str, health: Health) {
        let group = self.group_of.get(resource).cloned().unwrap_or_default();
        let Some(spec) = self.spec_of(resource).cloned() else {
            return;
        };
        let Some(monitor) = spec.monitor else { return };
        let frozen = self.frozen_group(&group);
        let Some(r) = self.res.get_mut(resource) else { return };
        r.monitor_in_flight = false;
        r.monitor_due = Some(now.mono + monitor.interval);
        let was_ok = !matches!(r.last_health, Some(Health::Failed(_)) | Some(Health::Stopped));
        r.last_health = Some(health.clone());
        let monitor_only = spec.role == Role::MonitorOnly;
        // A monitor result about a resource we are not running any more is stale.
        if !monitor_only && r.state != ResState::Running {
            return;
        }
        let problem = match &health {
            Health::Running => {
                if !was_ok {
                    self.journal(
                        EntryKind::MonitorRecovered,
                        Some(&group),
                        Some(resource),
                        "healthy again".into(),
                    );
                }
                return;
            }
            Health::Stopped => "not running".to_string(),
            Health::Failed(why) => why.clone(),
        };
        if frozen {
            self.journal(
                EntryKind::MonitorFailed,
                Some(&group),
                Some(resource),
                format!("monitor: {problem} (maintenance: no action taken)"),
            );
            return;
        }
        match monitor.on_fail {
            OnFail::Report => {
                if was_ok {
                    self.journal(
                        EntryKind::MonitorFailed,
                        Some(&group),
                        Some(resource),
                        format!("monitor: {problem} (reported only)"),
                    );
                }
            }
            OnFail::Failover => {
                self.journal(
                    EntryKind::MonitorFailed,
                    Some(&group),
                    Some(resource),
                    format!("monitor: {problem}"),
                );
                if spec.role == Role::Clone {
                    self.give_up_clone(now, resource);
                } else {
                    self.fail_over(now, &group, resource, &problem);
                }
            }
            OnFail::Restart => {
                self.journal(
                    EntryKind::MonitorFailed,
                    Some(&group),
                    Some(resource),
                    format!("monitor: {problem}"),
                );
                let Some(r) = self.res.get_mut(resource) else { return };
                r.restarts.retain(|t| now.mono.since(*t) < monitor.within);
                if (r.restarts.len() as u64) < u64::from(monitor.restarts) {
                    r.restarts.push(now.mono);
                    let n = r.restarts.len();
                    self.mark_restart(resource);
                    self.journal(
                        EntryKind::Restarting,
                        Some(&group),
                        Some(resource),
                        format!("restarting ({n} of {} within {:?})", monitor.restarts, monitor.within),
                    );
                } else if spec.role == Role::Clone {
                    self.give_up_clone(now, resource);
                } else if spec.optional {
                    self.journal(
                        EntryKind::GaveUp,
                        Some(&group),
                        Some(resource),
                        "restart limit reached; optional member left stopped".into(),
                    );
                    if let Some(r) = self.res.get_mut(resource) {
                        r.skipped = true;
                    }
                    self.mark_restart(resource);
                } else {
                    self.fail_over(
                        now,
                        &group,
                        resource,
                        &format!("restart limit reached after: {problem}"),
                    );
                }
            }
        }
    }

    /// Stops `resource` and every local resource depending on it; they
    /// start again in order (unless skipped or the group moves).
    fn mark_restart(&mut self, resource: &str) {
        let mut stack = vec![resource.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(n) = stack.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(r) = self.res.get_mut(&n)
                && r.state != ResState::Stopped
            {
                r.restart = true;
            }
            if let Some(ds) = self.dependents.get(&n) {
                stack.extend(ds.iter().cloned());
            }
        }
    }

    /// A clone failed beyond its limit: leave it stopped here, and move away
    /// any group on this node that needs it.
    fn give_up_clone(&mut self, now: Now, resource: &str) {
        let group = self.group_of.get(resource).cloned().unwrap_or_default();
        self.journal(
            EntryKind::GaveUp,
            Some(&group),
            Some(resource),
            "clone left stopped on this node".into(),
        );
        if let Some(r) = self.res.get_mut(resource) {
            r.skipped = true;
        }
        self.mark_restart(resource);
        let needing: Vec<(String, String)> = self
            .orders
            .iter()
            .flat_map(|(g, o)| {
                o.external
                    .iter()
                    .filter(|e| e.needs == resource)
                    .map(move |e| (g.clone(), e.resource.clone()))
            })
            .collect();
        for (g, r) in needing {
            if self.groups.get(&g).is_some_and(|x| x.held.is_some()) {
                self.fail_over(now, &g, &r, &format!("needed clone {resource} failed"));
            }
        }
    }

    /// Records a failure of `group` here and moves it away.
    fn fail_over(&mut self, now: Now, group: &str, resource: &str, why: &str) {
        let Some(g) = self.groups.get_mut(group) else { return };
        let Some(token) = g.held else { return };
        if g.failing_over {
            return;
        }
        g.failing_over = true;
        // Unique without a clock or random numbers: tokens are never
        // reused, and the counter tells apart failures under one token.
        self.failure_seq += 1;
        let id = format!("{}:{token}:{}", self.node, self.failure_seq);
        // Recorded now, while the key is ours (the write is fenced by it);
        // the resign waits, bounded, until it has landed or was refused.
        g.recording = Some((id.clone(), now.mono + self.lease_ttl));
        let failure = Failure {
            id,
            node: self.node.clone(),
            at: now.wall,
            resource: Some(resource.to_string()),
        };
        self.local_failures.push((group.to_string(), failure.clone()));
        self.actions.push_back(Action::RecordFailure {
            group: group.to_string(),
            failure,
            token,
        });
        self.journal(
            EntryKind::FailingOver,
            Some(group),
            Some(resource),
            format!("failing over: {why}"),
        );
    }

    /// The planner's view of the cluster, as this node sees it.
    fn observed(&self) -> Observed {
        let Some(view) = &self.view else {
            return Observed::default();
        };
        let mut observed = Observed::from_view(&self.spec, view);
        // This node knows better than the view whether it is alive (its
        // session) and leaving (its shutdown)...
        let alive = matches!(self.session, Session::Open { .. }) || view.nodes.contains_key(&self.node);
        let me = crate::observed::node_state(alive, self.shutting_down, view.node_admin.get(&self.node));
        observed.nodes.insert(self.node.clone(), me);
        for (name, g) in observed.groups.iter_mut() {
            // ...which failures it recorded (before the view shows them)...
            g.failures.extend(
                self.local_failures
                    .iter()
                    .filter(|(group, _)| group == name)
                    .map(|(_, f)| f.clone()),
            );
            // ...and which keys it holds (before a lagging view shows them).
            if self.groups.get(name).is_some_and(|x| x.held.is_some()) {
                g.owner = Some(self.node.clone());
            }
        }
        observed
    }

    fn reconcile(&mut self, now: Now) {
        // 1. Session upkeep and self-fencing.
        match self.session {
            Session::Open { deadline, .. } if now.mono >= deadline => {
                self.journal(
                    EntryKind::SessionLost,
                    None,
                    None,
                    "no renewal acknowledged in time: fencing deadline passed".into(),
                );
                self.fence("self-fencing deadline passed");
            }
            Session::Open {
                lease,
                deadline,
                next_renew,
                renew_in_flight: false,
            } if now.mono >= next_renew => {
                self.session = Session::Open {
                    lease,
                    deadline,
                    next_renew,
                    renew_in_flight: true,
                };
                self.actions.push_back(Action::Renew { lease });
            }
            _ => {}
        }
        if self.retry_at.is_some_and(|t| now.mono >= t) {
            self.retry_at = None;
        }
        if self.join_wake.is_some_and(|t| now.mono >= t) {
            self.join_wake = None;
        }
        for g in self.groups.values_mut() {
            if g.retry_at.is_some_and(|t| now.mono >= t) {
                g.retry_at = None;
            }
            // Waited long enough for a failure record: resign without it
            // (a write still retried is refused once the key is gone).
            if g.recording.as_ref().is_some_and(|(_, until)| now.mono >= *until) {
                g.recording = None;
            }
        }
        if self.session == Session::None && !self.shutting_down && self.retry_at.is_none() && self.guard_down.is_none()
        {
            self.session = Session::Opening;
            self.actions.push_back(Action::OpenSession);
        }
        if self.shutting_down && !self.leaving_sent && matches!(self.session, Session::Open { .. }) {
            self.leaving_sent = true;
            self.actions.push_back(Action::SetLeaving);
        }
        self.sync_guard();

        // 2. Nothing is decided before the first view arrives, except
        //    stopping what must stop.
        let plan = if self.view.is_some() {
            let plan = planner::plan(&self.spec, &self.observed(), now.wall);
            Some(plan)
        } else {
            None
        };

        // 3. Groups.
        let group_names: Vec<String> = self.spec.groups.iter().map(|g| g.name.clone()).collect();
        for name in &group_names {
            self.reconcile_group(now, name, plan.as_ref());
        }
        // 4. Clones.
        self.reconcile_clones(now, plan.as_ref());
        // 5. Monitors.
        self.schedule_monitors(now);
        // 6. Exit once everything is down after a shutdown request.
        if self.shutting_down && !self.exited {
            let all_stopped = self.res.values().all(|r| !r.needs_stop() && !r.busy());
            let none_held = self.groups.values().all(|g| g.held.is_none() && !g.resign_pending);
            if all_stopped && none_held {
                self.exited = true;
                self.actions.push_back(Action::Exit);
            }
        }
        self.last_plan = plan;
    }

    fn reconcile_group(&mut self, now: Now, name: &str, plan: Option<&Plan>) {
        let frozen = self.frozen_group(name);
        let target_me = plan
            .and_then(|p| p.group(name))
            .is_some_and(|gp| gp.target.as_deref() == Some(self.node.as_str()));
        let authority = self.authority(name, now.mono);
        let Some(g) = self.groups.get(name).cloned() else {
            return;
        };
        let order = self.orders.get(name).cloned().unwrap_or_default();
        let managed: Vec<String> = order.start_waves.iter().flatten().cloned().collect();
        let any_urgent = managed.iter().any(|r| self.res.get(r).is_some_and(|x| x.urgent));

        // Stale ownership from an earlier run of this agent (or an earlier
        // session of this one): release it, once nothing of the group runs
        // here any more — until then the key keeps other nodes away.
        let all_stopped = managed
            .iter()
            .all(|r| self.res.get(r).is_none_or(|x| x.state == ResState::Stopped));
        let session_lease = match self.session {
            Session::Open { lease, deadline, .. } if now.mono < deadline => Some(lease),
            _ => None,
        };
        if let Some(view) = &self.view
            && let Some(owner) = view.owners.get(name)
            && owner.node == self.node
            && g.held.is_none()
            && g.campaign_lease.is_none()
            && !g.resign_pending
            && g.released != Some(owner.token)
            && session_lease.is_some()
            && all_stopped
        {
            let token = owner.token;
            self.journal(
                EntryKind::Released,
                Some(name),
                None,
                format!("releasing ownership left by an earlier run (token {token})"),
            );
            if let Some(g) = self.groups.get_mut(name) {
                g.resign_pending = true;
                g.released = Some(token);
                g.resign_token = Some(token);
            }
            self.actions.push_back(Action::Resign {
                group: name.to_string(),
                token,
            });
        }

        // Resources that must stop at once (ownership lost, fenced): nothing
        // else happens to the group until they have.
        if any_urgent && !self.stop_in_order(name, &order, true) {
            return;
        }
        let Some(authority) = authority else {
            // Not ours: nothing of it may run here.
            if !self.stop_in_order(name, &order, true) {
                return;
            }
            let nobody = self.view.as_ref().is_some_and(|v| !v.owners.contains_key(name));
            // Join window: a more preferred node that has not registered yet
            // may be starting right now; give it until the window ends.
            let waiting_for_peer = self.join_until.is_some_and(|end| now.mono < end)
                && self.spec.groups.iter().find(|x| x.name == name).is_some_and(|spec| {
                    spec.nodes
                        .iter()
                        .take_while(|n| **n != self.node)
                        .any(|n| self.view.as_ref().is_some_and(|v| !v.nodes.contains_key(n)))
                });
            if waiting_for_peer
                && target_me
                && let Some(end) = self.join_until
            {
                self.join_wake = Some(end);
            }
            if target_me
                && !waiting_for_peer
                && nobody
                && !frozen
                && g.held.is_none()
                && g.campaign_lease.is_none()
                && !g.resign_pending
                && g.retry_at.is_none_or(|t| now.mono >= t)
                && let Some(lease) = session_lease
            {
                self.actions.push_back(Action::Campaign {
                    group: name.to_string(),
                    lease,
                });
                if let Some(g) = self.groups.get_mut(name) {
                    g.campaign_lease = Some(lease);
                }
            }
            return;
        };
        if frozen {
            return;
        }
        // A clone the group needs was given up on this node (after the group
        // had been placed here, or while it ran elsewhere): an optional
        // member needing it is skipped; otherwise the group cannot run here
        // and fails over like a group whose member failed.
        let mut given_up = false;
        for e in &order.external {
            if !e.clone || !self.clone_given_up(&e.needs) {
                continue;
            }
            let why = format!("needed clone {} was given up on this node", e.needs);
            if self.spec_of(&e.resource).is_some_and(|r| r.optional) {
                if let Some(r) = self.res.get_mut(&e.resource)
                    && !r.skipped
                {
                    r.skipped = true;
                    self.journal(
                        EntryKind::GaveUp,
                        Some(name),
                        Some(&e.resource),
                        format!("{why}; optional member left stopped"),
                    );
                }
            } else {
                given_up = true;
                self.fail_over(now, name, &e.resource, &why);
            }
        }
        let leave = g.failing_over || g.resigning || !target_me || given_up;
        if leave {
            let done = self.stop_in_order(name, &order, false);
            // A failure record still on its way is fenced by this key.
            let recording = self.groups.get(name).is_some_and(|g| g.recording.is_some());
            if done && !recording && !g.resign_pending && g.retry_at.is_none_or(|t| now.mono >= t) {
                if g.started_announced || g.active {
                    self.journal(EntryKind::GroupStopped, Some(name), None, "group stopped".into());
                }
                if let Some(g) = self.groups.get_mut(name) {
                    g.resign_pending = true;
                    g.resigning = true;
                    g.resign_token = Some(authority.token);
                    g.active = false;
                }
                self.actions.push_back(Action::Resign {
                    group: name.to_string(),
                    token: authority.token,
                });
            }
            return;
        }
        // Run: restarts first (stop the marked ones in reverse order), then start.
        let restarting: Vec<String> = managed
            .iter()
            .filter(|r| self.res.get(*r).is_some_and(|x| x.restart))
            .cloned()
            .collect();
        if !restarting.is_empty() {
            let mut sub = order.clone();
            for w in &mut sub.stop_waves {
                w.retain(|r| restarting.contains(r));
            }
            if self.stop_in_order(name, &sub, false) {
                for r in &restarting {
                    if let Some(x) = self.res.get_mut(r) {
                        x.restart = false;
                    }
                }
            } else {
                return;
            }
        }
        if let Some(g) = self.groups.get_mut(name) {
            g.active = true;
        }
        let complete = self.start_in_order(name, &order, Some(authority));
        if complete {
            let announce = !g.started_announced;
            if announce {
                self.journal(
                    EntryKind::GroupStarted,
                    Some(name),
                    None,
                    format!("group running on {}", self.node),
                );
                if let Some(g) = self.groups.get_mut(name) {
                    g.started_announced = true;
                }
            }
            let move_done = self
                .view
                .as_ref()
                .and_then(|v| v.group_admin.get(name))
                .and_then(|a| a.move_to.as_deref())
                == Some(self.node.as_str());
            if move_done && announce {
                self.actions.push_back(Action::ClearMoveRequest {
                    group: name.to_string(),
                });
            }
        }
    }

    /// Starts every resource whose dependencies run (in wave order, so the
    /// actions come out deterministically); a resource never starts before
    /// its dependencies, and need not wait for unrelated members of earlier
    /// waves. Returns true when every (non-skipped) resource runs.
    fn start_in_order(&mut self, group: &str, order: &GroupOrder, authority: Option<Authority>) -> bool {
        let mut complete = true;
        for r in order.start_waves.iter().flatten() {
            let Some(res) = self.res.get(r) else { continue };
            if res.skipped || res.state == ResState::Running {
                continue;
            }
            complete = false;
            if res.state == ResState::Stopped && self.deps_running(r) {
                self.issue_start(group, r, authority);
            }
        }
        complete
    }

    /// The clone, or a clone it depends on, was given up on this node: it
    /// will not run here again.
    fn clone_given_up(&self, clone: &str) -> bool {
        let mut stack = vec![clone];
        let mut seen = BTreeSet::new();
        while let Some(c) = stack.pop() {
            if !seen.insert(c) {
                continue;
            }
            if self.res.get(c).is_some_and(|x| x.skipped) {
                return true;
            }
            if let Some(ds) = self.deps.get(c) {
                stack.extend(ds.iter().map(String::as_str));
            }
        }
        false
    }

    fn deps_running(&self, resource: &str) -> bool {
        self.deps.get(resource).is_none_or(|ds| {
            ds.iter().all(|d| {
                let Some(spec) = self.spec_of(d) else { return true };
                if spec.role == Role::MonitorOnly {
                    return true;
                }
                // A dependency waiting to restart does not count as running:
                // it stops (after its dependents) and starts again first.
                // Nor does one whose last check failed while nothing was done
                // about it (maintenance): its next check decides. A skipped
                // optional member counts once it is no longer stopping.
                let acting = spec.monitor.is_some_and(|m| m.on_fail != OnFail::Report);
                self.res.get(d).is_some_and(|x| {
                    let failed = acting && matches!(x.last_health, Some(Health::Failed(_)) | Some(Health::Stopped));
                    (x.state == ResState::Running && !x.restart && !failed) || (x.skipped && spec.optional && !x.busy())
                })
            })
        })
    }

    fn issue_start(&mut self, group: &str, resource: &str, authority: Option<Authority>) {
        if let Some(r) = self.res.get_mut(resource) {
            r.state = ResState::Starting;
            r.last_health = None;
            r.epoch += 1;
        }
        self.journal(EntryKind::Starting, Some(group), Some(resource), "starting".into());
        self.actions.push_back(Action::Start {
            group: group.to_string(),
            resource: resource.to_string(),
            authority,
        });
    }

    /// Stops resources in reverse dependency order: a resource is stopped
    /// once no local resource depending on it still runs (`urgent`: at once).
    /// Returns true when all of them are stopped.
    fn stop_in_order(&mut self, group: &str, order: &GroupOrder, urgent: bool) -> bool {
        let mut all = true;
        for r in order.stop_waves.iter().flatten() {
            let Some(res) = self.res.get(r) else { continue };
            match res.state {
                ResState::Stopped => {
                    if let Some(x) = self.res.get_mut(r) {
                        x.urgent = false;
                        x.lost = false;
                    }
                }
                ResState::StopFailed | ResState::Starting | ResState::Stopping => all = false,
                ResState::Running | ResState::Failed => {
                    all = false;
                    let force = urgent || res.urgent;
                    if force || !self.dependents_running(r) {
                        self.issue_stop(group, r, force);
                    }
                }
            }
        }
        all
    }

    fn dependents_running(&self, resource: &str) -> bool {
        self.dependents.get(resource).is_some_and(|ds| {
            ds.iter().any(|d| {
                // A skipped member that failed is not running; one that was
                // given up while running still is, until it has stopped.
                self.res.get(d).is_some_and(|x| {
                    x.state != ResState::Stopped && !x.skipped || x.busy() || x.state == ResState::Running
                })
            })
        })
    }

    fn issue_stop(&mut self, group: &str, resource: &str, urgent: bool) {
        if let Some(r) = self.res.get_mut(resource) {
            r.state = ResState::Stopping;
            r.monitor_due = None;
            r.forced = urgent;
        }
        self.journal(
            EntryKind::Stopping,
            Some(group),
            Some(resource),
            if urgent {
                "stopping (forced)".into()
            } else {
                "stopping".into()
            },
        );
        self.actions.push_back(Action::Stop {
            group: group.to_string(),
            resource: resource.to_string(),
            urgent,
        });
    }

    fn reconcile_clones(&mut self, _now: Now, plan: Option<&Plan>) {
        let Some(plan) = plan else { return };
        let frozen = self.frozen_node();
        let mut want: BTreeSet<String> = plan
            .clones
            .iter()
            .filter(|c| !self.shutting_down && c.nodes.iter().any(|n| n == &self.node))
            .map(|c| c.resource.clone())
            .collect();
        // A clone needs no lease: losing the session (the coordinator out of
        // reach, a missed renewal) is no reason to stop one that runs. The
        // plan counts this node as down meanwhile, so keep what runs; new
        // clones wait for the session.
        if !self.shutting_down && !matches!(self.session, Session::Open { .. }) {
            for wave in &self.clone_waves {
                for r in wave {
                    if self
                        .res
                        .get(r)
                        .is_some_and(|x| matches!(x.state, ResState::Running | ResState::Starting))
                    {
                        want.insert(r.clone());
                    }
                }
            }
        }
        let waves = self.clone_waves.clone();
        if frozen {
            return;
        }
        // Stop unwanted clones (and ones being restarted) in reverse order.
        for wave in waves.iter().rev() {
            for r in wave {
                let Some(res) = self.res.get(r) else { continue };
                let stop = !want.contains(r) || res.restart || res.skipped;
                if stop && res.needs_stop() && !self.dependents_running(r) {
                    // Forced after an orderly stop failed.
                    let force = res.urgent;
                    let group = self.group_of.get(r).cloned().unwrap_or_default();
                    self.issue_stop(&group, r, force);
                }
                if let Some(res) = self.res.get_mut(r)
                    && res.restart
                    && res.state == ResState::Stopped
                {
                    res.restart = false;
                }
            }
        }
        for wave in &waves {
            for r in wave {
                let Some(res) = self.res.get(r) else { continue };
                if want.contains(r)
                    && res.state == ResState::Stopped
                    && !res.skipped
                    && !res.restart
                    && self.deps_running(r)
                {
                    let group = self.group_of.get(r).cloned().unwrap_or_default();
                    self.issue_start(&group, r, None);
                }
            }
        }
    }

    fn schedule_monitors(&mut self, now: Now) {
        // Monitor-only resources are checked on the owner while it holds the group.
        let mut owned_checks: Vec<(String, String)> = Vec::new();
        for (g, order) in &self.orders {
            if self.groups.get(g).is_some_and(|x| x.held.is_some() && x.confirmed) {
                owned_checks.extend(order.monitor_only.iter().map(|r| (g.clone(), r.clone())));
            }
        }
        for (g, r) in &owned_checks {
            let interval = self.spec_of(r).and_then(|s| s.monitor).map(|m| m.interval);
            if let (Some(res), Some(interval)) = (self.res.get_mut(r), interval)
                && res.monitor_due.is_none()
            {
                let _ = g;
                res.monitor_due = Some(now.mono + interval);
            }
        }
        let owned: BTreeSet<&String> = owned_checks.iter().map(|(_, r)| r).collect();
        let mut due = Vec::new();
        for (name, res) in &mut self.res {
            let is_check = owned.contains(name);
            if !is_check && res.state != ResState::Running {
                if res.state == ResState::Stopped && self.orders.values().any(|o| o.monitor_only.contains(name)) {
                    res.monitor_due = None;
                }
                continue;
            }
            if res.restart {
                continue;
            }
            if let Some(at) = res.monitor_due
                && at <= now.mono
                && !res.monitor_in_flight
            {
                res.monitor_in_flight = true;
                due.push(name.clone());
            }
        }
        for name in due {
            let group = self.group_of.get(&name).cloned().unwrap_or_default();
            let epoch = self.res.get(&name).map_or(0, |r| r.epoch);
            self.actions.push_back(Action::Monitor {
                group,
                resource: name,
                epoch,
            });
        }
    }
}

#[cfg(test)]
mod tests;
