//! The agent's main loop: feeds the core's `Agent` with events from the
//! coordinator, the drivers, timers and signals, and carries out its actions.
//!
//! Architecture invariant: this loop runs on a current-thread tokio runtime
//! on the process's main thread. Drivers spawn resource processes from the
//! task that runs them, i.e. from this thread, which lives as long as the
//! agent — `PR_SET_PDEATHSIG` fires when the *spawning thread* exits, so
//! spawning from a pool thread could kill resources at random.
//!
//! Every decision is the core's; this file only translates. The one check it
//! adds is defence in depth: a `Start` of a group resource runs only with an
//! authority whose deadline has not passed on this node's monotonic clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use understudy_coord::{Compare, CoordError, Coordinator, Fence, KeyValue, Refused};
use understudy_core::ClusterSpec;
use understudy_core::agent::{
    Action, Agent, AgentIdentity, Entry, EntryKind, Event, GroupAdmin, Health, NodeRecord, Op,
};
use understudy_core::observed::Failure;
use understudy_core::spec::Role;
use understudy_drivers::cgroup::Cgroups;
use understudy_drivers::{Driver, DriverEnv, OpCtx, ProcessRegistry, StoreError, driver_for};

use crate::clock;
use crate::guard::{Guard, GuardHealth};
use crate::instance;
use crate::keys::{Keys, OwnerValue, build_view};
use crate::writer::{self, Ordered};

/// Everything the agent needs to run.
pub struct AgentOptions {
    pub spec: ClusterSpec,
    pub node: String,
    /// The definition's directory (`./` paths resolve here).
    pub base_dir: PathBuf,
    /// Logs and process records of this node's agent.
    pub state_dir: PathBuf,
    /// The `understudy` binary, for the fence guard.
    pub guard_exe: PathBuf,
    /// The definition's path: the fence guard revokes a dead agent's
    /// session through it (`None`: the session just expires).
    pub config: Option<PathBuf>,
    pub keys: Keys,
}

/// A journal record as stored in the coordinator (`understudy events`).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct JournalRecord {
    /// Wall-clock milliseconds since the Unix epoch.
    pub at: u64,
    pub node: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// This node's registration as it should be: the session lease it must be
/// attached to and whether the node is leaving. The watch loop repairs the
/// registration key when it differs (a late put from a timed-out request, or
/// from an earlier run of the agent, can attach it to a lease nobody renews).
#[derive(Default)]
struct Registration {
    lease: Option<i64>,
    leaving: bool,
    /// Who this agent is: the registration names it.
    identity: AgentIdentity,
}

impl Registration {
    fn record(&self) -> NodeRecord {
        NodeRecord {
            leaving: self.leaving,
            agent: Some(self.identity.clone()),
        }
    }
}

struct Shell {
    opts: Arc<AgentOptions>,
    registration: Arc<std::sync::Mutex<Registration>>,
    ordered: UnboundedSender<Ordered>,
    coord: Arc<dyn Coordinator>,
    drivers: HashMap<String, Arc<dyn Driver>>,
    guard: Arc<Guard>,
    tx: UnboundedSender<Event>,
    lease: Option<i64>,
    /// The status last published, and the lease it was attached to: a new
    /// session must republish even an unchanged status.
    last_status: Option<(i64, String)>,
    /// Owned resources that hold a cgroup, a mount, an address or a systemd
    /// unit (from the start being issued until a stop succeeded): the fence
    /// guard takes them away.
    guarded: BTreeMap<String, Guarded>,
    /// The node's cgroup subtree; `None`: process groups only.
    cgroups: Option<Cgroups>,
    /// The fencing token each group resource was last started under: its
    /// stop stores final state (a `sync` copy) fenced by it.
    started_under: HashMap<String, i64>,
}

/// A mount point, floating address or systemd unit the fence guard must
/// take away.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Guarded {
    /// The resource's cgroup (processes, scripts, databases).
    Cgroup(String),
    Mount(String),
    Address(String),
    Unit(String),
}

/// Runs the agent until it has moved its groups away after SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions, coord: Arc<dyn Coordinator>) -> Result<()> {
    let opts = Arc::new(opts);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.state_dir)
        .with_context(|| format!("cannot create the state directory {}", opts.state_dir.display()))?;
    // One agent per node: the lock on this host, the registration across
    // hosts. Nothing is touched before both say this agent may run.
    let instance_lock = instance::lock(&opts.state_dir, &opts.node)?;
    let identity = instance::identity(&opts.state_dir)
        .with_context(|| format!("cannot read or create {}/agent-id", opts.state_dir.display()))?;
    let predecessor = registered_predecessor(&*coord, &opts, &identity).await?;
    // Records for the journal made before the journal writer runs.
    let mut early: Vec<Entry> = Vec::new();
    let cgroups = match Cgroups::setup(&opts.state_dir, &opts.node) {
        Ok(c) => {
            tracing::info!(cgroup = %c.node_dir().display(), "resources are contained in cgroups");
            Some(c)
        }
        Err(why) => {
            let message = format!(
                "no cgroup containment ({why}): resources are contained by process groups only, so a \
                 worker that leaves its process group (setsid) can outlive a stop or the agent"
            );
            tracing::warn!("{message}");
            early.push(entry(EntryKind::Containment, None, message));
            None
        }
    };
    // Leftovers of an earlier run of this node, and only of this node:
    // its cgroups first (exact), then the recorded process groups.
    for (resource, pids, emptied) in understudy_drivers::cgroup::sweep(&opts.state_dir, cgroups.as_ref()) {
        let message = if emptied {
            format!("killed processes {pids:?} an earlier run of this node left in the cgroup of {resource}")
        } else {
            format!("processes {pids:?} an earlier run left in the cgroup of {resource} survive SIGKILL")
        };
        tracing::warn!(resource, "{message}");
        early.push(entry(EntryKind::LeftoverStopped, Some(&resource), message));
    }
    for (resource, pgid) in understudy_drivers::registry::kill_leftovers(&opts.state_dir) {
        let message = format!("killed process group {pgid} an earlier run of this node left behind");
        tracing::warn!(resource, "{message}");
        early.push(entry(EntryKind::LeftoverStopped, Some(&resource), message));
    }
    let guard = Arc::new(Guard::spawn(&opts.guard_exe, &guard_reports(&opts))?);
    tracing::info!(pid = guard.pid(), "fence guard started");
    if let Some(c) = &cgroups {
        guard.set_node_cgroup(&c.node_dir().to_string_lossy());
    }
    if let Some(config) = &opts.config {
        guard.set_config(config);
    }
    let owned: HashSet<String> = opts
        .spec
        .groups
        .iter()
        .flat_map(|g| g.resources.iter())
        .filter(|r| r.role == Role::Managed)
        .map(|r| r.name.clone())
        .collect();
    let guard_for_registry = Arc::clone(&guard);
    let registry = Arc::new(
        ProcessRegistry::new(
            &opts.state_dir,
            Box::new(move |groups: &[(&str, i32)]| {
                let pgids: Vec<i32> = groups
                    .iter()
                    .filter(|(r, _)| owned.contains(*r))
                    .map(|(_, g)| *g)
                    .collect();
                guard_for_registry.set_pgids(&pgids);
            }),
        )
        .with_cgroups(cgroups.clone()),
    );
    let env = DriverEnv {
        base_dir: opts.base_dir.clone(),
        state_dir: opts.state_dir.clone(),
        registry,
        sync: Some(Arc::new(CoordSyncStore {
            coord: Arc::clone(&coord),
            keys: opts.keys.clone(),
        })),
    };
    let mut drivers: HashMap<String, Arc<dyn Driver>> = HashMap::new();
    let mut unsupported = Vec::new();
    for r in opts
        .spec
        .groups
        .iter()
        .flat_map(|g| g.resources.iter())
        .filter(|r| r.enabled)
    {
        match driver_for(r, &env) {
            Ok(d) => {
                drivers.insert(r.name.clone(), Arc::from(d));
            }
            Err(e) => unsupported.push(format!("{} ({e})", r.name)),
        }
    }
    if !unsupported.is_empty() {
        bail!(
            "this build cannot run every resource of the definition: {}",
            unsupported.join(", ")
        );
    }

    let (tx, mut rx) = unbounded_channel::<Event>();
    let registration = Arc::new(std::sync::Mutex::new(Registration {
        identity,
        ..Registration::default()
    }));
    let watcher = tokio::spawn(watch_loop(
        Arc::clone(&coord),
        opts.keys.clone(),
        opts.node.clone(),
        Arc::clone(&registration),
        tx.clone(),
    ));
    let (ordered, ordered_rx) = unbounded_channel::<Ordered>();
    let writer = tokio::spawn(writer::run(Arc::clone(&coord), opts.node.clone(), ordered_rx));
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    // SIGHUP never kills the agent. It logs to stderr (journald) and opens
    // resource logs per operation, so there is nothing to reopen; reloading
    // the definition comes with replicated configuration.
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut agent = Agent::new(opts.spec.clone(), &opts.node);
    let mut shell = Shell {
        opts: Arc::clone(&opts),
        registration,
        ordered,
        coord,
        drivers,
        guard,
        tx,
        lease: None,
        last_status: None,
        guarded: BTreeMap::new(),
        cgroups,
        started_under: HashMap::new(),
    };
    for e in early {
        shell.journal_now(e);
    }
    for e in stop_leftovers(&opts, &shell.drivers, shell.cgroups.is_some()).await {
        shell.journal_now(e);
    }
    // Everything an earlier run of this node left is gone now: its session
    // can end at once instead of a whole lease TTL later, so peers take its
    // groups over without waiting.
    if let Some(lease) = predecessor {
        let message = match shell.coord.revoke(lease).await {
            Ok(()) => format!(
                "revoked the session (lease {lease}) of this node's earlier run after taking away what it left: \
                 its groups are free at once"
            ),
            Err(e) => format!("could not revoke the session (lease {lease}) of this node's earlier run: {e}"),
        };
        tracing::info!("{message}");
        shell.journal_now(entry(EntryKind::SessionLost, None, message));
    }
    tracing::info!(node = %opts.node, cluster = %opts.spec.name, "agent started");
    agent.handle(clock::now(), Event::Tick);
    let mut guard_retry: Option<std::time::Instant> = None;
    loop {
        while let Some(action) = agent.poll_action() {
            shell.execute(action, &agent);
        }
        // The guard is the safety net: a dead one is replaced at once; if
        // that fails the core fences (and retries come once a second).
        if let Some(event) = shell.watch_guard(&mut guard_retry) {
            agent.handle(clock::now(), event);
            continue;
        }
        if agent.exited() {
            break;
        }
        shell.publish_status(&agent);
        let mut sleep = match agent.poll_timeout() {
            Some(at) => Duration::from_millis(at.as_millis().saturating_sub(clock::mono().as_millis())),
            None => Duration::from_secs(3600),
        };
        if let Some(t) = guard_retry {
            sleep = sleep.min(t.saturating_duration_since(std::time::Instant::now()));
        }
        tokio::select! {
            Some(event) = rx.recv() => {
                shell.observe(&event);
                agent.handle(clock::now(), event);
                // Take whatever else is already waiting before acting.
                while let Ok(event) = rx.try_recv() {
                    shell.observe(&event);
                    agent.handle(clock::now(), event);
                }
            }
            () = tokio::time::sleep(sleep) => agent.handle(clock::now(), Event::Tick),
            _ = sigterm.recv() => agent.handle(clock::now(), Event::Shutdown),
            _ = sigint.recv() => agent.handle(clock::now(), Event::Shutdown),
            _ = sighup.recv() => tracing::info!(
                "SIGHUP: nothing to reopen (logs go to stderr; resource logs are opened per operation); \
                 the definition is not reloaded"
            ),
        }
    }
    watcher.abort();
    // Let the journal's last entries reach the coordinator.
    drop(shell.ordered);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    shell.guard.clear_session();
    if let Some(lease) = shell.lease
        && let Err(e) = shell.coord.revoke(lease).await
    {
        tracing::warn!("could not revoke the session lease on exit: {e}");
    }
    if let Some(c) = &shell.cgroups {
        // Every resource is stopped; an empty subtree is not left behind.
        understudy_drivers::cgroup::remove(c.node_dir());
    }
    tracing::info!("agent stopped: every group moved away or stopped");
    drop(instance_lock);
    Ok(())
}

/// The session of this node's earlier run, if its registration is still
/// alive at the coordinator; an error if another agent registered the node.
/// (The lock already proved no agent of this state directory runs here.)
/// An unreachable coordinator is no reason to stop here: the registration
/// itself is conditional.
async fn registered_predecessor(
    coord: &dyn Coordinator,
    opts: &AgentOptions,
    me: &AgentIdentity,
) -> Result<Option<i64>> {
    let key = opts.keys.node(&opts.node);
    let kv = match tokio::time::timeout(opts.spec.settings.lease_ttl, coord.get(&key)).await {
        Ok(Ok(kv)) => kv,
        Ok(Err(e)) => {
            tracing::warn!("cannot check this node's registration at start-up: {e}");
            return Ok(None);
        }
        Err(_) => {
            tracing::warn!("checking this node's registration at start-up timed out");
            return Ok(None);
        }
    };
    let Some(kv) = kv else { return Ok(None) };
    let Some(lease) = kv.lease else { return Ok(None) };
    let record: NodeRecord = serde_json::from_slice(&kv.value).unwrap_or_default();
    match record.agent {
        Some(other) if other.instance != me.instance => Err(instance::Refused::RegisteredElsewhere {
            node: opts.node.clone(),
            host: other.host,
            pid: other.pid,
        }
        .into()),
        _ => Ok(Some(lease)),
    }
}

/// Why the node's registration could not be made.
enum RegisterError {
    Coord(CoordError),
    /// Another agent's live registration holds the key.
    Taken(AgentIdentity),
}

/// Registers the node on `lease`, unless another agent's registration holds
/// the key (one of this agent's, from an earlier session or run, is
/// replaced).
async fn register(coord: &dyn Coordinator, key: &str, record: &NodeRecord, lease: i64) -> Result<(), RegisterError> {
    let me = record.agent.as_ref().map(|a| a.instance.as_str());
    let value = json(record);
    let mut cond = Compare::Absent;
    for _ in 0..5 {
        match coord
            .put_if(key, &value, Some(lease), cond)
            .await
            .map_err(RegisterError::Coord)?
        {
            Ok(_) => return Ok(()),
            Err(None) => cond = Compare::Absent,
            Err(Some(current)) => {
                let theirs: NodeRecord = serde_json::from_slice(&current.value).unwrap_or_default();
                match theirs.agent {
                    Some(other) if current.lease.is_some() && Some(other.instance.as_str()) != me => {
                        return Err(RegisterError::Taken(other));
                    }
                    _ => cond = Compare::ModRevision(current.mod_revision),
                }
            }
        }
    }
    Err(RegisterError::Coord(CoordError::Other(format!(
        "{key} kept changing under us"
    ))))
}

impl Shell {
    /// Remembers what the shell itself needs from events (the session lease,
    /// what the guard must take away).
    fn observe(&mut self, event: &Event) {
        match event {
            Event::OpDone {
                resource,
                op: Op::Stop,
                result: Ok(()),
            }
            | Event::OpDone {
                resource,
                op: Op::Start,
                result: Err(_),
            } if self.guarded.remove(resource).is_some() => self.update_guard(),
            Event::SessionOpened { lease, .. } => {
                self.lease = Some(*lease);
                self.guard.set_session(*lease);
                // After a crash (this is a new run) or a stall (the session
                // was lost), the guard may have fired: say so in the journal.
                self.journal_guard_reports();
            }
            Event::SessionLost { lease } if self.lease == Some(*lease) => self.lease = None,
            _ => {}
        }
        lock(&self.registration).lease = self.lease;
    }

    /// Runs an operation concurrently; its result comes back as an event.
    /// (On the current-thread runtime this task still runs on the main thread.)
    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = Option<Event>> + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Some(event) = f.await {
                let _ = tx.send(event);
            }
        });
    }

    fn execute(&mut self, action: Action, agent: &Agent) {
        let coord = Arc::clone(&self.coord);
        let keys = self.opts.keys.clone();
        let node = self.opts.node.clone();
        let settings = self.opts.spec.settings.clone();
        match action {
            Action::OpenSession => {
                let record = lock(&self.registration).record();
                self.spawn(async move {
                    let sent_at = clock::mono();
                    let open = async {
                        let lease = coord.grant(settings.lease_ttl).await.map_err(RegisterError::Coord)?;
                        if let Err(e) = register(&*coord, &keys.node(&node), &record, lease).await {
                            let _ = coord.revoke(lease).await;
                            return Err(e);
                        }
                        Ok::<_, RegisterError>(lease)
                    };
                    Some(match tokio::time::timeout(settings.lease_ttl, open).await {
                        Ok(Ok(lease)) => Event::SessionOpened { lease, sent_at },
                        Ok(Err(RegisterError::Coord(e))) => {
                            tracing::warn!("cannot open a session: {e}");
                            Event::SessionOpenFailed
                        }
                        Ok(Err(RegisterError::Taken(other))) => {
                            tracing::error!(
                                "node {node} is registered by another agent (host {}, pid {}): not joining \
                             while that registration lives; stop the other agent",
                                other.host,
                                other.pid
                            );
                            Event::SessionOpenFailed
                        }
                        Err(_) => {
                            tracing::warn!("opening a session timed out");
                            Event::SessionOpenFailed
                        }
                    })
                });
            }
            Action::Renew { lease } => self.spawn(async move {
                let sent_at = clock::mono();
                // Leave time to retry once before the self-fencing deadline
                // (`ttl - margin` after the previous renewal was sent).
                let timeout = (settings
                    .lease_ttl
                    .saturating_sub(settings.fence_margin + settings.renew_interval)
                    / 2)
                .max(Duration::from_millis(50));
                Some(match tokio::time::timeout(timeout, coord.keep_alive(lease)).await {
                    Ok(Ok(_)) => Event::Renewed { lease, sent_at },
                    Ok(Err(CoordError::LeaseNotFound(_))) => Event::SessionLost { lease },
                    // The store this lease lives in is not the cluster's any
                    // more (deleted, replaced, truncated): the lease is as good
                    // as gone, and so is the authority it gave.
                    Ok(Err(CoordError::StoreLost(why))) => {
                        tracing::error!("fencing: the coordinator store is lost: {why}");
                        Event::SessionLost { lease }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("renewal failed: {e}");
                        Event::RenewFailed { lease }
                    }
                    Err(_) => {
                        tracing::warn!("renewal timed out");
                        Event::RenewFailed { lease }
                    }
                })
            }),
            Action::Campaign { group, lease } => self.spawn(async move {
                let value = json(&OwnerValue { node });
                let won = match coord
                    .put_if(&keys.owner(&group), &value, Some(lease), Compare::Absent)
                    .await
                {
                    Ok(Ok(kv)) => Some(kv.create_revision),
                    Ok(Err(_)) => None,
                    Err(e) => {
                        tracing::warn!(group, "campaign failed: {e}");
                        None
                    }
                };
                Some(Event::CampaignResult { group, lease, won })
            }),
            Action::Resign { group, token } => self.spawn(async move {
                let ok = match coord
                    .delete_if(&keys.owner(&group), Compare::CreateRevision(token))
                    .await
                {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(group, "resign failed: {e}");
                        false
                    }
                };
                Some(Event::Resigned { group, ok })
            }),
            Action::Start {
                group,
                resource,
                authority,
            } => {
                let Some(driver) = self.drivers.get(&resource).cloned() else {
                    return;
                };
                let spec = agent_resource(&self.opts.spec, &resource);
                let is_clone = spec.is_some_and(|r| r.role == Role::Clone);
                if authority.is_none() && !is_clone {
                    tracing::error!(
                        group,
                        resource,
                        "refusing to start: no lease authority for a group resource"
                    );
                    let _ = self.tx.send(Event::OpDone {
                        resource,
                        op: Op::Start,
                        result: Err("no lease authority for a group resource".into()),
                    });
                    return;
                }
                // The guard must be able to take a mount, an address or a
                // unit away from the moment the start may have created it.
                if authority.is_some()
                    && let Some(g) = spec.and_then(|r| guarded_of(r, self.cgroups.as_ref()))
                {
                    self.guarded.insert(resource.clone(), g);
                    self.update_guard();
                }
                let timeout = spec.map_or(Duration::from_secs(60), |r| r.start_timeout);
                if let Some(a) = authority {
                    self.started_under.insert(resource.clone(), a.token);
                }
                let ctx = OpCtx {
                    node,
                    group,
                    token: authority.map(|a| a.token),
                    timeout,
                };
                self.spawn(async move {
                    // Defence in depth, checked right before the driver runs:
                    // a group resource starts only with a live authority.
                    if let Some(a) = authority
                        && a.valid_until <= clock::mono()
                    {
                        tracing::error!(
                            group = ctx.group,
                            resource,
                            "refusing to start: the lease authority expired"
                        );
                        return Some(Event::OpDone {
                            resource,
                            op: Op::Start,
                            result: Err("the lease authority expired before the start ran".into()),
                        });
                    }
                    let result = driver.start(&ctx).await.map_err(|e| e.to_string());
                    Some(Event::OpDone {
                        resource,
                        op: Op::Start,
                        result,
                    })
                });
            }
            Action::Stop {
                group,
                resource,
                urgent,
            } => {
                let Some(driver) = self.drivers.get(&resource).cloned() else {
                    return;
                };
                let stop_timeout =
                    agent_resource(&self.opts.spec, &resource).map_or(Duration::from_secs(30), |r| r.stop_timeout);
                // An urgent stop skips patience, not the work: a process gets
                // little time to exit before SIGKILL, an unmount or an address
                // removal still gets the milliseconds it needs. Half the fence
                // margin ends it before the guard would act.
                let timeout = if urgent {
                    (settings.fence_margin / 2)
                        .max(Duration::from_millis(100))
                        .min(stop_timeout)
                } else {
                    stop_timeout
                };
                let ctx = OpCtx {
                    node,
                    group,
                    // What the stop stores is fenced by the token the
                    // resource ran under: refused if the group has moved on.
                    token: self.started_under.get(&resource).copied(),
                    timeout,
                };
                self.spawn(async move {
                    let result = driver.stop(&ctx).await.map_err(|e| e.to_string());
                    Some(Event::OpDone {
                        resource,
                        op: Op::Stop,
                        result,
                    })
                });
            }
            Action::Monitor { group, resource, epoch } => {
                let Some(driver) = self.drivers.get(&resource).cloned() else {
                    return;
                };
                let timeout = agent_resource(&self.opts.spec, &resource)
                    .and_then(|r| r.monitor)
                    .map_or(Duration::from_secs(5), |m| m.timeout);
                let token = agent.authority(&group, clock::mono()).map(|a| a.token);
                let ctx = OpCtx {
                    node,
                    group,
                    token,
                    timeout,
                };
                self.spawn(async move {
                    // The driver bounds its own checks; this bound is a backstop.
                    let health =
                        match tokio::time::timeout(timeout + Duration::from_millis(500), driver.monitor(&ctx)).await {
                            Ok(understudy_drivers::Health::Running) => Health::Running,
                            Ok(understudy_drivers::Health::Stopped) => Health::Stopped,
                            Ok(understudy_drivers::Health::Failed(why)) => Health::Failed(why),
                            Err(_) => Health::Failed(format!("monitor timed out after {timeout:?}")),
                        };
                    Some(Event::MonitorDone {
                        resource,
                        epoch,
                        health,
                    })
                });
            }
            Action::RecordFailure { group, failure, token } => {
                let within = self
                    .opts
                    .spec
                    .groups
                    .iter()
                    .find(|g| g.name == group)
                    .map_or(Duration::from_secs(3600), |g| g.failover.within);
                self.spawn(async move {
                    // Other nodes must learn of the failure, or they keep
                    // preferring this node: retry for up to a minute, while
                    // the key is ours (the write is fenced by its token;
                    // the failure's id makes a retry that had landed count once).
                    let fence = Fence::new(keys.owner(&group), token);
                    let id = failure.id.clone();
                    for attempt in 0..60u32 {
                        match record_failure(&*coord, &keys.failures(&group), &fence, failure.clone(), within).await {
                            Ok(true) => {
                                return Some(Event::FailureRecorded {
                                    group,
                                    id,
                                    landed: true,
                                });
                            }
                            Ok(false) => {
                                tracing::warn!(
                                    group,
                                    id,
                                    token,
                                    "failure not recorded: this node no longer owns the group"
                                );
                                break;
                            }
                            Err(e) if attempt == 59 => tracing::error!(group, "could not record the failure: {e}"),
                            Err(e) => tracing::warn!(group, "recording the failure failed, retrying: {e}"),
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Some(Event::FailureRecorded {
                        group,
                        id,
                        landed: false,
                    })
                });
            }
            Action::ClearMoveRequest { group } => {
                // Written on behalf of the group's owner: fenced by its token.
                let Some(token) = agent.authority(&group, clock::mono()).map(|a| a.token) else {
                    return;
                };
                self.spawn(async move {
                    let key = keys.admin_group(&group);
                    let fence = Fence::new(keys.owner(&group), token);
                    let result = update_json_fenced::<GroupAdmin>(&*coord, &key, &fence, |admin| {
                        if admin.move_to.as_deref() == Some(node.as_str()) {
                            admin.move_to = None;
                            true
                        } else {
                            false
                        }
                    })
                    .await;
                    match result {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(group, "move request left alone: this node no longer owns the group")
                        }
                        Err(e) => tracing::warn!(group, "could not clear the move request: {e}"),
                    }
                    None
                })
            }
            Action::SetLeaving => {
                let record = {
                    let mut r = lock(&self.registration);
                    r.leaving = true;
                    r.record()
                };
                let Some(lease) = self.lease else { return };
                self.spawn(async move {
                    if let Err(e) = coord.put(&keys.node(&node), &json(&record), Some(lease)).await {
                        tracing::warn!("could not mark this node as leaving: {e}");
                    }
                    None
                });
            }
            Action::ArmGuard { deadline } => self.guard.arm(deadline.as_millis()),
            Action::Journal(entry) => {
                tracing::info!(
                    kind = ?entry.kind,
                    group = entry.group.as_deref().unwrap_or("-"),
                    resource = entry.resource.as_deref().unwrap_or("-"),
                    "{}",
                    entry.message
                );
                let record = JournalRecord {
                    at: clock::wall().as_millis(),
                    node,
                    entry,
                };
                let _ = self.ordered.send(Ordered::Journal(json(&record)));
            }
            Action::Exit => {}
        }
    }

    fn journal_guard_reports(&self) {
        let path = guard_reports(&self.opts);
        let reports = match crate::guard::take_reports(&path) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read the fence guard's reports in {}: {e}", path.display());
                return;
            }
        };
        // Repeated firings that took the same things away for the same kind
        // of reason are one record ("repeated 12 times in 5.2 s").
        let mut runs: Vec<(crate::guard::Report, usize, u64)> = Vec::new();
        for r in reports {
            match runs.last_mut() {
                Some((first, n, last)) if first.same_action(&r) => {
                    *n += 1;
                    *last = r.at;
                }
                _ => {
                    let at = r.at;
                    runs.push((r, 1, at));
                }
            }
        }
        for (r, n, last) in runs {
            let repeated = if n > 1 {
                format!(
                    " (repeated {n} times in {:.1} s)",
                    last.saturating_sub(r.at) as f64 / 1000.0
                )
            } else {
                String::new()
            };
            let entry = Entry {
                kind: EntryKind::GuardFired,
                group: None,
                resource: None,
                message: format!(
                    "fence guard (recorded when the agent was back): {}{repeated}",
                    r.summary()
                ),
            };
            tracing::warn!("{}", entry.message);
            let record = JournalRecord {
                at: r.at,
                node: self.opts.node.clone(),
                entry,
            };
            let _ = self.ordered.send(Ordered::Journal(json(&record)));
        }
    }

    /// Checks the fence guard; replaces a dead one. Returns the event for
    /// the core when the guard is lost or back.
    fn watch_guard(&mut self, retry: &mut Option<std::time::Instant>) -> Option<Event> {
        let GuardHealth::Dead(how) = self.guard.health() else {
            return None;
        };
        if retry.is_some_and(|t| std::time::Instant::now() < t) {
            return None;
        }
        let was_lost = retry.is_some();
        match self.guard.restart() {
            Ok(pid) => {
                *retry = None;
                let message = format!("the fence guard died ({how}); started a new one (pid {pid})");
                tracing::warn!("{message}");
                self.journal_now(entry(EntryKind::GuardRestarted, None, message));
                was_lost.then_some(Event::GuardUp)
            }
            Err(e) => {
                *retry = Some(std::time::Instant::now() + Duration::from_secs(1));
                tracing::error!("the fence guard died ({how}) and cannot be restarted: {e}");
                (!was_lost).then(|| Event::GuardDown {
                    reason: format!("it died ({how}); restarting it failed: {e}"),
                })
            }
        }
    }

    /// Sends a journal record now (it needs no session).
    fn journal_now(&self, e: Entry) {
        let record = JournalRecord {
            at: clock::wall().as_millis(),
            node: self.opts.node.clone(),
            entry: e,
        };
        let _ = self.ordered.send(Ordered::Journal(json(&record)));
    }

    fn update_guard(&self) {
        let (mut mounts, mut addresses, mut units, mut cgroups) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for g in self.guarded.values() {
            match g {
                Guarded::Cgroup(c) => cgroups.push(c.clone()),
                Guarded::Mount(m) => mounts.push(m.clone()),
                Guarded::Address(a) => addresses.push(a.clone()),
                Guarded::Unit(u) => units.push(u.clone()),
            }
        }
        self.guard.set_cgroups(&cgroups);
        self.guard.set_mounts(&mounts);
        self.guard.set_addresses(&addresses);
        self.guard.set_units(&units);
    }

    /// Publishes this node's status (attached to its lease) when it changed.
    fn publish_status(&mut self, agent: &Agent) {
        let Some(lease) = self.lease else { return };
        let mut value = serde_json::to_value(agent.status()).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            // How this node contains what its resources start.
            let containment = match &self.cgroups {
                Some(c) => format!("cgroups ({})", c.node_dir().display()),
                None => "process groups only (no writable cgroup2)".to_owned(),
            };
            map.insert("containment".into(), containment.into());
        }
        let status = value.to_string();
        if self
            .last_status
            .as_ref()
            .is_some_and(|(l, s)| *l == lease && *s == status)
        {
            return;
        }
        self.last_status = Some((lease, status.clone()));
        let _ = self.ordered.send(Ordered::Status {
            key: self.opts.keys.status(&self.opts.node),
            value: status.into_bytes(),
            lease,
        });
    }
}

/// `sync` resources keep their replicated copy in the coordinator.
struct CoordSyncStore {
    coord: Arc<dyn Coordinator>,
    keys: Keys,
}

#[async_trait::async_trait]
impl understudy_drivers::SyncStore for CoordSyncStore {
    async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.coord
            .get(&self.keys.sync(key))
            .await
            .map(|kv| kv.map(|kv| kv.value))
            .map_err(|e| e.to_string())
    }

    async fn store(&self, ctx: &OpCtx, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let Some(token) = ctx.token else {
            return Err(StoreError::Fenced(format!(
                "no fencing token: only the owner of group {} stores its copy",
                ctx.group
            )));
        };
        let fence = Fence::new(self.keys.owner(&ctx.group), token);
        match self
            .coord
            .put_fenced(&self.keys.sync(key), value, None, None, &fence)
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(Refused::FenceLost(owner))) => {
                Err(StoreError::Fenced(fence_lost(&ctx.group, token, owner.as_ref())))
            }
            Ok(Err(Refused::Conflict(_))) => Err(StoreError::Failed(
                "the store reported a conflict on an unconditional write".into(),
            )),
            Err(e) => Err(StoreError::Failed(e.to_string())),
        }
    }
}

/// The mount, address or unit a resource holds, for the fence guard. (A
/// process's group reaches the guard from the driver registry; a script's
/// daemon is invisible to it.)
fn guarded_of(r: &understudy_core::spec::ResourceSpec, cgroups: Option<&Cgroups>) -> Option<Guarded> {
    match &r.kind {
        understudy_core::spec::Kind::Process(_)
        | understudy_core::spec::Kind::Script(_)
        | understudy_core::spec::Kind::Postgres(_) => {
            cgroups.map(|c| Guarded::Cgroup(c.dir(&r.name).to_string_lossy().into_owned()))
        }
        understudy_core::spec::Kind::Fs(f) => Some(Guarded::Mount(f.mountpoint.clone())),
        understudy_core::spec::Kind::Ip(i) => Some(Guarded::Address(i.address.to_string())),
        understudy_core::spec::Kind::Systemd(u) => Some(Guarded::Unit(u.unit.clone())),
        _ => None,
    }
}

/// At start-up nothing runs here with authority yet: whatever the drivers
/// find running (an address still on the interface, a filesystem still
/// mounted, a database an earlier run left) is stopped, dependents first.
/// Returns a journal record for each.
///
/// With cgroups, the kinds that run processes (`process`, `postgres`) were
/// swept exactly before (their cgroups); probing them here could find what
/// another node on the same host runs from the same files, so they are
/// left out. Addresses and mounts belong to the whole host: on a host that
/// runs several nodes of one cluster (a demo), an address or mount another
/// node holds is found here too (see the operations guide).
async fn stop_leftovers(
    opts: &AgentOptions,
    drivers: &HashMap<String, Arc<dyn Driver>>,
    contained: bool,
) -> Vec<Entry> {
    let mut stopped = Vec::new();
    let catalog = understudy_core::graph::Catalog::new(&opts.spec);
    for g in &opts.spec.groups {
        let order = catalog.group_order(g).unwrap_or_default();
        let names = order.stop_waves.iter().flatten().chain(order.clones.iter());
        for name in names {
            let (Some(driver), Some(r)) = (drivers.get(name), g.resource(name)) else {
                continue;
            };
            if contained
                && matches!(
                    r.kind,
                    understudy_core::spec::Kind::Process(_) | understudy_core::spec::Kind::Postgres(_)
                )
            {
                continue;
            }
            let ctx = OpCtx {
                node: opts.node.clone(),
                group: g.name.clone(),
                token: None,
                timeout: r.stop_timeout,
            };
            if driver.probe(&ctx).await == understudy_drivers::Health::Running {
                tracing::warn!(
                    group = g.name,
                    resource = name,
                    "found running from an earlier run: stopping it"
                );
                let message = match driver.stop(&ctx).await {
                    Ok(()) => "found running from an earlier run of this node: stopped".to_owned(),
                    Err(e) => {
                        tracing::error!(group = g.name, resource = name, "could not stop a leftover: {e}");
                        format!("found running from an earlier run of this node; stopping it failed: {e}")
                    }
                };
                let mut e = entry(EntryKind::LeftoverStopped, Some(name), message);
                e.group = Some(g.name.clone());
                stopped.push(e);
            }
        }
    }
    stopped
}

fn entry(kind: EntryKind, resource: Option<&str>, message: String) -> Entry {
    Entry {
        kind,
        group: None,
        resource: resource.map(str::to_string),
        message,
    }
}

/// Where the fence guard records what it did (see `guard::Report`).
fn guard_reports(opts: &AgentOptions) -> PathBuf {
    opts.state_dir.join("guard-reports")
}

fn agent_resource<'a>(spec: &'a ClusterSpec, name: &str) -> Option<&'a understudy_core::spec::ResourceSpec> {
    spec.groups.iter().find_map(|g| g.resource(name))
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own plain data types always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Read-modify-write of a JSON value with compare-and-swap; `change` returns
/// false when nothing needs writing.
pub async fn update_json<T>(coord: &dyn Coordinator, key: &str, mut change: impl FnMut(&mut T) -> bool) -> Result<()>
where
    T: Serialize + serde::de::DeserializeOwned + Default,
{
    for _ in 0..20 {
        let current = coord.get(key).await?;
        let (mut value, cond) = match &current {
            Some(kv) => (
                serde_json::from_slice::<T>(&kv.value).with_context(|| format!("{key} holds invalid data"))?,
                Compare::ModRevision(kv.mod_revision),
            ),
            None => (T::default(), Compare::Absent),
        };
        if !change(&mut value) {
            return Ok(());
        }
        if coord.put_if(key, &json(&value), None, cond).await?.is_ok() {
            return Ok(());
        }
    }
    bail!("{key} kept changing under us; gave up after 20 attempts")
}

/// Why a fenced write was refused, for logs and errors.
fn fence_lost(group: &str, token: i64, owner: Option<&KeyValue>) -> String {
    match owner {
        None => format!("group {group} has no owner any more (this node held token {token})"),
        Some(kv) => {
            let node = serde_json::from_slice::<OwnerValue>(&kv.value).map_or_else(|_| "?".to_string(), |o| o.node);
            format!(
                "group {group} is owned by {node} under token {}, not token {token} held here",
                kv.create_revision
            )
        }
    }
}

/// `update_json` on behalf of a group's owner: every write is fenced by the
/// owner key's token, in the same transaction as the compare-and-swap.
/// `Ok(false)` when the fence no longer holds (nothing was written).
pub async fn update_json_fenced<T>(
    coord: &dyn Coordinator,
    key: &str,
    fence: &Fence,
    mut change: impl FnMut(&mut T) -> bool,
) -> Result<bool>
where
    T: Serialize + serde::de::DeserializeOwned + Default,
{
    for _ in 0..20 {
        let current = coord.get(key).await?;
        let (mut value, cond) = match &current {
            Some(kv) => (
                serde_json::from_slice::<T>(&kv.value).with_context(|| format!("{key} holds invalid data"))?,
                Compare::ModRevision(kv.mod_revision),
            ),
            None => (T::default(), Compare::Absent),
        };
        if !change(&mut value) {
            return Ok(true);
        }
        match coord.put_fenced(key, &json(&value), None, Some(cond), fence).await? {
            Ok(_) => return Ok(true),
            Err(Refused::FenceLost(_)) => return Ok(false),
            Err(Refused::Conflict(_)) => {}
        }
    }
    bail!("{key} kept changing under us; gave up after 20 attempts")
}

/// Appends a failure record (once: a failure with its id already in the
/// list is not added again), dropping records older than `within` before
/// it, while `fence` holds. `Ok(true)` when the record is in the list.
async fn record_failure(
    coord: &dyn Coordinator,
    key: &str,
    fence: &Fence,
    failure: Failure,
    within: Duration,
) -> Result<bool> {
    update_json_fenced::<Vec<Failure>>(coord, key, fence, |list| {
        if !failure.id.is_empty() && list.iter().any(|f| f.id == failure.id) {
            return false;
        }
        let horizon = failure.at - within;
        list.retain(|f| f.at >= horizon);
        list.push(failure.clone());
        let excess = list.len().saturating_sub(100);
        list.drain(..excess);
        true
    })
    .await
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts this node's registration back on its current session when the
/// coordinator shows it missing, on another lease, or with the wrong flag.
async fn repair_registration(
    coord: &dyn Coordinator,
    keys: &Keys,
    node: &str,
    registration: &std::sync::Mutex<Registration>,
    map: &BTreeMap<String, KeyValue>,
) {
    let (lease, record) = {
        let r = lock(registration);
        (r.lease, r.record())
    };
    let Some(lease) = lease else { return };
    let key = keys.node(node);
    let ok = map.get(&key).is_some_and(|kv| {
        kv.lease == Some(lease) && serde_json::from_slice::<NodeRecord>(&kv.value).is_ok_and(|r| r == record)
    });
    if !ok {
        tracing::info!("re-registering this node on its current session");
        match register(coord, &key, &record, lease).await {
            Ok(()) => {}
            Err(RegisterError::Coord(e)) => tracing::warn!("could not re-register this node: {e}"),
            Err(RegisterError::Taken(other)) => tracing::error!(
                "this node's registration was taken by another agent (host {}, pid {}): not re-registering",
                other.host,
                other.pid
            ),
        }
    }
}

/// Reads the cluster's keys and follows them, sending a fresh `View` after
/// every batch of changes, and keeps this node's registration right.
/// Reconnects (re-reading everything) after errors.
async fn watch_loop(
    coord: Arc<dyn Coordinator>,
    keys: Keys,
    node: String,
    registration: Arc<std::sync::Mutex<Registration>>,
    tx: UnboundedSender<Event>,
) {
    let mut last_sent = None;
    loop {
        match coord.range(keys.prefix()).await {
            Ok((kvs, mut revision)) => {
                let mut map: BTreeMap<String, KeyValue> = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
                send_view(&keys, &map, revision, &tx, &mut last_sent);
                match coord.watch(keys.prefix(), revision).await {
                    Ok(mut stream) => {
                        while let Some(batch) = stream.recv().await {
                            match batch {
                                Ok(events) => {
                                    revision = understudy_coord::apply_events(&mut map, revision, events);
                                    send_view(&keys, &map, revision, &tx, &mut last_sent);
                                    repair_registration(&*coord, &keys, &node, &registration, &map).await;
                                }
                                Err(e) => {
                                    tracing::warn!("watch interrupted: {e}; re-reading the cluster state");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!("cannot watch the cluster state: {e}"),
                }
            }
            Err(e) => tracing::warn!("cannot read the cluster state: {e}"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn send_view(
    keys: &Keys,
    map: &BTreeMap<String, KeyValue>,
    revision: i64,
    tx: &UnboundedSender<Event>,
    last: &mut Option<understudy_core::agent::ClusterView>,
) {
    let mut bad = Vec::new();
    let mut view = build_view(keys, map, revision, &mut bad);
    for key in bad {
        tracing::warn!(key, "ignoring a value that does not parse");
    }
    // Only the revision changed (status updates, journal): no need to wake the agent.
    if let Some(prev) = last {
        let mut same = view.clone();
        same.revision = prev.revision;
        if &same == prev {
            return;
        }
    }
    *last = Some(view.clone());
    view.revision = revision;
    let _ = tx.send(Event::View(view));
}
