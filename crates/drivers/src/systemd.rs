//! The `systemd` driver: a systemd unit owned by the cluster (F4, S2.2a).
//!
//! The driver talks to systemd through `systemctl`, not D-Bus. `zbus` could
//! call the manager's `StartUnit`/`StopUnit` directly, but then the driver
//! would have to follow jobs through `JobRemoved` signals, map unit states
//! itself and keep up with the bus API, all to replace a command-line
//! interface that systemd documents as stable, that behaves the same on
//! every distribution, that an operator can run by hand to see exactly what
//! the agent sees, and that a test can replace with a script. A unit is
//! started and stopped a few times a day and checked every few seconds; one
//! short-lived process per operation costs nothing that matters.
//!
//! `systemctl` is `$UNDERSTUDY_SYSTEMCTL` when set (a path, or a name looked
//! up in `PATH`), else `systemctl`. Each call runs like every command the
//! drivers run (new session, dies with the agent) and is bounded by the
//! operation's timeout; a call that runs over is killed with its process
//! group (a job it queued keeps running in systemd; the next stop cancels
//! it). Its output is captured for messages.
//!
//! - **start**: `systemctl --no-ask-password start UNIT`, which returns once
//!   the start job is done (for `Type=notify` or `forking`, once the service
//!   is ready); then `systemctl is-active UNIT` is polled until it says
//!   `active`. A non-zero exit fails with systemctl's message; a unit that is
//!   `inactive` or `failed` after its start job fails; running over the
//!   timeout is a timeout. Starting an active unit succeeds (systemd does
//!   nothing).
//! - **stop**: `systemctl --no-ask-password stop UNIT` within the timeout. If
//!   that fails or runs over and the unit is not stopped, the driver
//!   escalates: `systemctl kill --signal=SIGKILL UNIT` (every process of the
//!   unit) and `systemctl stop UNIT` again (which also cancels an automatic
//!   restart), each within 5 s. A zero timeout goes straight to the
//!   escalation; the agent's urgent stop gives the plain stop a short budget
//!   (half the fence margin) before it escalates. If the agent itself dies
//!   or stalls while it owns the unit, its fence guard runs the same
//!   `kill --signal=SIGKILL` and `stop` (see the agent's `guard` module). Stop succeeds when `is-active` then says
//!   `inactive` or `failed` (a unit killed that way usually ends up
//!   `failed`; stop does not `reset-failed` it, so the operator still sees
//!   it). Stopping a stopped or unknown unit succeeds.
//! - **monitor**: `systemctl is-active UNIT`: `active` or `reloading` is
//!   `Running`; `inactive` is `Stopped`; `failed` is `Failed`; `activating`
//!   and `deactivating` are asked again every 200 ms and are `Failed` if they
//!   last the whole timeout (a unit in a restart loop, a start that hangs);
//!   anything else, a systemctl that fails without a state or runs over, is
//!   `Failed`. A unit that does not exist is `inactive` to systemd, hence
//!   `Stopped`.
//! - **probe**: one `is-active`: `active`, `reloading`, `activating`,
//!   `deactivating` are `Running` (the unit has processes), `inactive` and
//!   `failed` are `Stopped`, anything else `Failed`.
//!
//! The cluster, not the OS, must start a managed unit (S2.2a):
//! [`is_enabled_at_boot`] tells the definition check whether the OS would
//! start it at boot anyway.
//!
//! **How this is tested.** Where the tests run, PID 1 is not systemd, so
//! `crates/drivers/tests/systemd.rs` points the driver at a stand-in
//! `systemctl` shell script in the test's temporary directory. It keeps each
//! fake unit's state in files and implements `start`, `stop`, `kill`,
//! `is-active`, `is-enabled` and `show`, with knobs to fail, hang, stay
//! `activating` for a while or print something unexpected. The tests check
//! the exact command lines, the mapping of exit codes and states to
//! results, the timeouts (hung calls are killed, with their process group,
//! in time) and the escalation, and that `$UNDERSTUDY_SYSTEMCTL` is honoured
//! (in a child test process, so no test changes its own environment). Not
//! covered: a real systemd — real job semantics (`systemctl start` waiting
//! for readiness, queued jobs that outlive a killed `systemctl`, `Restart=`
//! racing with the escalation) and the exact words real `is-enabled` prints
//! for every kind of unit.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;
use understudy_core::spec::SystemdSpec;

use crate::spawn::{Exit, KILL_WAIT, Launch, Spawned, show_argv};
use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

/// The environment variable naming the `systemctl` to run.
pub const SYSTEMCTL_ENV: &str = "UNDERSTUDY_SYSTEMCTL";

/// How often `activating` and `deactivating` are asked again.
const POLL: Duration = Duration::from_millis(200);
/// The most output kept from one call, per stream.
const MAX_OUTPUT: u64 = 64 * 1024;
/// How long [`is_enabled_at_boot`] waits for systemctl.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The `systemctl` to run: `$UNDERSTUDY_SYSTEMCTL` if set and not empty,
/// else `systemctl` (looked up in `PATH`).
pub fn systemctl_program() -> PathBuf {
    std::env::var_os(SYSTEMCTL_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("systemctl"), PathBuf::from)
}

/// Starts, stops and checks one unit (see the module docs).
pub struct SystemdDriver {
    resource: String,
    unit: String,
    systemctl: PathBuf,
    launch: Launch,
    /// Serialises start and stop.
    op: Mutex<()>,
}

impl std::fmt::Debug for SystemdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdDriver")
            .field("resource", &self.resource)
            .field("unit", &self.unit)
            .field("systemctl", &self.systemctl)
            .finish_non_exhaustive()
    }
}

/// What `is-active` said.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Active,
    Reloading,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    /// A word we do not know (`maintenance`, `refreshing`, …).
    Other(String),
}

impl State {
    fn word(&self) -> &str {
        match self {
            State::Active => "active",
            State::Reloading => "reloading",
            State::Inactive => "inactive",
            State::Failed => "failed",
            State::Activating => "activating",
            State::Deactivating => "deactivating",
            State::Other(word) => word,
        }
    }
}

/// How one systemctl call ended.
struct Output {
    exit: Exit,
    stdout: String,
    stderr: String,
}

impl Output {
    fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or("").trim()
    }

    /// `exited with status 1: Failed to start x.service: Unit x.service not found.`
    fn describe(&self) -> String {
        let err = self.stderr.trim();
        if err.is_empty() {
            self.exit.to_string()
        } else {
            format!("{}: {}", self.exit, err.lines().collect::<Vec<_>>().join(" / "))
        }
    }
}

impl SystemdDriver {
    /// A driver running `$UNDERSTUDY_SYSTEMCTL` (default `systemctl`).
    pub fn new(resource: &str, spec: &SystemdSpec, env: &DriverEnv) -> Result<Self, DriverError> {
        Self::with_systemctl(resource, spec, env, systemctl_program())
    }

    /// A driver running the given `systemctl`.
    pub fn with_systemctl(
        resource: &str,
        spec: &SystemdSpec,
        env: &DriverEnv,
        systemctl: impl Into<PathBuf>,
    ) -> Result<Self, DriverError> {
        let unit = spec.unit.trim();
        if unit.is_empty() || unit.starts_with('-') || unit.chars().any(char::is_whitespace) {
            return Err(DriverError::failed(
                "configure",
                resource,
                format!("`{}` is not a unit name", spec.unit),
            ));
        }
        Ok(SystemdDriver {
            resource: resource.to_owned(),
            unit: unit.to_owned(),
            systemctl: systemctl.into(),
            launch: Launch {
                resource: resource.to_owned(),
                base_dir: env.base_dir.clone(),
                env: Vec::new(),
                cwd: Some("/".into()),
                user: None,
            },
            op: Mutex::new(()),
        })
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    fn timeout(&self, op: &'static str, timeout: Duration) -> DriverError {
        DriverError::timeout(op, &self.resource, timeout)
    }

    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![self.systemctl.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }

    /// Runs `systemctl ARGS` within `timeout`; `Ok(None)`: it ran over and
    /// was killed.
    async fn run(&self, args: &[&str], ctx: &OpCtx, timeout: Duration) -> Result<Option<Output>, String> {
        let argv = self.argv(args);
        let shown = show_argv(&argv);
        let (out_tx, mut out_rx) = tokio::net::unix::pipe::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
        let (err_tx, mut err_rx) = tokio::net::unix::pipe::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
        let mut cmd = self.launch.command(&argv, ctx, &[])?;
        cmd.stdout(Stdio::from(
            out_tx
                .into_blocking_fd()
                .map_err(|e| format!("cannot set up a pipe: {e}"))?,
        ))
        .stderr(Stdio::from(
            err_tx
                .into_blocking_fd()
                .map_err(|e| format!("cannot set up a pipe: {e}"))?,
        ));
        let spawned = Spawned::spawn(&mut cmd).map_err(|e| format!("cannot run `{shown}`: {e}"))?;
        // Close our copies of the pipes' write ends, or reading never ends.
        drop(cmd);
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let reading = async {
            let mut out = (&mut out_rx).take(MAX_OUTPUT);
            let mut err = (&mut err_rx).take(MAX_OUTPUT);
            let _ = tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr));
        };
        let (exit, _) = tokio::join!(spawned.wait_exit(timeout), tokio::time::timeout(timeout, reading));
        let result = match exit {
            Some(exit) => Some(Output {
                exit,
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            }),
            None => {
                if let Err(e) = spawned.terminate(Signal::SIGKILL, Duration::ZERO).await {
                    tracing::warn!("{}: `{shown}`: {e}", self.resource);
                }
                None
            }
        };
        spawned.reap().await;
        Ok(result)
    }

    /// One `systemctl is-active UNIT` within `timeout`. `Ok(None)`: it did
    /// not answer in time; `Err` says why there is no state.
    async fn state(&self, ctx: &OpCtx, timeout: Duration) -> Result<Option<State>, String> {
        let Some(out) = self.run(&["is-active", &self.unit], ctx, timeout).await? else {
            return Ok(None);
        };
        Ok(Some(match out.first_line() {
            "active" => State::Active,
            "reloading" => State::Reloading,
            "inactive" => State::Inactive,
            "failed" => State::Failed,
            "activating" => State::Activating,
            "deactivating" => State::Deactivating,
            "" if out.exit == Exit::Code(0) => State::Active,
            "" => return Err(format!("`systemctl is-active {}` {}", self.unit, out.describe())),
            other => State::Other(other.to_owned()),
        }))
    }

    fn no_answer(&self, limit: Duration) -> String {
        format!("`systemctl is-active {}` did not answer within {limit:?}", self.unit)
    }

    /// Asks `is-active` every 200 ms while the unit is between states, for
    /// up to `limit`; then the last answer.
    async fn settled_state(&self, ctx: &OpCtx, limit: Duration) -> Result<State, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let state = self.state(ctx, left).await?.ok_or_else(|| self.no_answer(limit))?;
            if !matches!(state, State::Activating | State::Deactivating) {
                return Ok(state);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(POLL.min(left)).await;
            if Instant::now() >= deadline {
                return Ok(state);
            }
        }
    }

    /// Whether the unit is stopped (`inactive` or `failed`), asked within 5 s.
    async fn is_stopped(&self, ctx: &OpCtx) -> Result<bool, String> {
        let state = self.settled_state(ctx, KILL_WAIT).await?;
        Ok(matches!(state, State::Inactive | State::Failed))
    }

    /// SIGKILLs the unit's processes and stops it, each within 5 s.
    async fn escalate(&self, ctx: &OpCtx) -> Result<(), String> {
        let mut problems = Vec::new();
        for args in [
            &["kill", "--signal=SIGKILL", self.unit.as_str()][..],
            &["--no-ask-password", "stop", self.unit.as_str()][..],
        ] {
            match self.run(args, ctx, KILL_WAIT).await? {
                Some(out) if out.exit == Exit::Code(0) => {}
                Some(out) => problems.push(format!("`systemctl {}` {}", args.join(" "), out.describe())),
                None => problems.push(format!("`systemctl {}` ran over {KILL_WAIT:?}", args.join(" "))),
            }
        }
        if self.is_stopped(ctx).await? {
            return Ok(());
        }
        Err(format!(
            "{} is still running after SIGKILL: {}",
            self.unit,
            problems.join("; ")
        ))
    }
}

#[async_trait]
impl Driver for SystemdDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        let deadline = Instant::now() + ctx.timeout;
        let out = self
            .run(&["--no-ask-password", "start", &self.unit], ctx, ctx.timeout)
            .await
            .map_err(|e| self.failed("start", e))?
            .ok_or_else(|| self.timeout("start", ctx.timeout))?;
        if out.exit != Exit::Code(0) {
            return Err(self.failed("start", format!("`systemctl start {}` {}", self.unit, out.describe())));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.settled_state(ctx, left).await {
            Ok(State::Active | State::Reloading) => Ok(()),
            Ok(State::Activating) => Err(self.failed(
                "start",
                format!("{} is still activating after {:?}", self.unit, ctx.timeout),
            )),
            Ok(state) => Err(self.failed("start", format!("{} is {} after its start", self.unit, state.word()))),
            Err(e) => Err(self.failed("start", e)),
        }
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        if !ctx.timeout.is_zero() {
            let result = self
                .run(&["--no-ask-password", "stop", &self.unit], ctx, ctx.timeout)
                .await
                .map_err(|e| self.failed("stop", e))?;
            match &result {
                Some(out) if out.exit != Exit::Code(0) => {
                    tracing::info!("{}: `systemctl stop {}` {}", self.resource, self.unit, out.describe());
                }
                Some(_) => {}
                None => tracing::info!(
                    "{}: `systemctl stop {}` ran over {:?}; killing the unit",
                    self.resource,
                    self.unit,
                    ctx.timeout
                ),
            }
            // A failed stop of a unit that is not running (an unknown unit,
            // say) is still a stop.
            if result.is_some() && self.is_stopped(ctx).await.map_err(|e| self.failed("stop", e))? {
                return Ok(());
            }
        }
        self.escalate(ctx).await.map_err(|e| self.failed("stop", e))
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        match self.settled_state(ctx, ctx.timeout).await {
            Ok(State::Active | State::Reloading) => Health::Running,
            Ok(State::Inactive) => Health::Stopped,
            Ok(State::Failed) => Health::Failed(format!("{} has failed", self.unit)),
            Ok(State::Activating) => {
                Health::Failed(format!("{} is still activating after {:?}", self.unit, ctx.timeout))
            }
            Ok(State::Deactivating) => {
                Health::Failed(format!("{} is still deactivating after {:?}", self.unit, ctx.timeout))
            }
            Ok(State::Other(word)) => Health::Failed(format!("{} is `{word}`", self.unit)),
            Err(e) => Health::Failed(e),
        }
    }

    async fn probe(&self, ctx: &OpCtx) -> Health {
        match self.state(ctx, ctx.timeout).await {
            Ok(Some(State::Active | State::Reloading | State::Activating | State::Deactivating)) => Health::Running,
            Ok(Some(State::Inactive | State::Failed)) => Health::Stopped,
            Ok(Some(State::Other(word))) => Health::Failed(format!("{} is `{word}`", self.unit)),
            Ok(None) => Health::Failed(self.no_answer(ctx.timeout)),
            Err(e) => Health::Failed(e),
        }
    }
}

/// Whether the OS would start `unit` at boot, for the definition check's
/// warning (S2.2a: the cluster, not the OS, starts managed units). Runs
/// `$UNDERSTUDY_SYSTEMCTL` (default `systemctl`); see
/// [`is_enabled_at_boot_with`].
pub fn is_enabled_at_boot(unit: &str) -> Option<bool> {
    is_enabled_at_boot_with(&systemctl_program(), unit)
}

/// [`is_enabled_at_boot`] with a given `systemctl`. From
/// `systemctl is-enabled UNIT`:
///
/// | is-enabled says | result |
/// |---|---|
/// | `enabled`, `enabled-runtime` | `Some(true)` |
/// | `disabled`, `masked`, `masked-runtime`, `linked`, `linked-runtime`, `transient` | `Some(false)` |
/// | `static`, `indirect`, `generated`, `alias` | whether another unit wants or requires it (`systemctl show --property=WantedBy --property=RequiredBy --value UNIT` prints a name): `Some(true)` or `Some(false)` |
/// | anything else, nothing (an unknown unit), or systemctl missing, failing or taking over 5 s | `None` |
///
/// `is-enabled` reads unit files and works even where systemd does not run;
/// `show` needs a running systemd, so without one a static unit is `None`.
pub fn is_enabled_at_boot_with(systemctl: &Path, unit: &str) -> Option<bool> {
    if unit.is_empty() || unit.starts_with('-') {
        return None;
    }
    let (ok, stdout) = run_sync(systemctl, &["is-enabled", unit])?;
    let word = stdout.lines().next().unwrap_or("").trim().to_owned();
    match word.as_str() {
        "enabled" | "enabled-runtime" => Some(true),
        "disabled" | "masked" | "masked-runtime" | "linked" | "linked-runtime" | "transient" => Some(false),
        "static" | "indirect" | "generated" | "alias" => {
            let (ok, stdout) = run_sync(
                systemctl,
                &["show", "--property=WantedBy", "--property=RequiredBy", "--value", unit],
            )?;
            ok.then(|| stdout.split_whitespace().next().is_some())
        }
        _ => {
            tracing::debug!("systemctl is-enabled {unit}: `{word}` (success: {ok})");
            None
        }
    }
}

/// Runs `program ARGS` and returns (exit 0?, stdout), or `None` if it
/// cannot run or takes over 5 s (then it is killed).
fn run_sync(program: &Path, args: &[&str]) -> Option<(bool, String)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Read on a thread: a full pipe must not stall the child, and whatever
    // the child leaves holding the pipe must not stall us.
    let mut pipe = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let read = (&mut pipe).take(MAX_OUTPUT).read_to_string(&mut text);
        let _ = tx.send(read.map(|_| text));
    });
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let stdout = rx.recv_timeout(left.max(Duration::from_millis(100))).ok()?.ok()?;
    Some((status.success(), stdout))
}
