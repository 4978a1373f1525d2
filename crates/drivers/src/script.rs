//! The `script` driver: the user's own start, stop and status commands.
//!
//! Each command runs like a `process` resource's command (see
//! [`process`](crate::process)): a first element starting with `./` resolves
//! against the definition's directory, `cwd` defaults to that directory, the
//! environment is the resource's `env` plus `UNDERSTUDY_NODE`,
//! `UNDERSTUDY_GROUP`, `UNDERSTUDY_RESOURCE`, `UNDERSTUDY_TOKEN` (unset for
//! clones) and `UNDERSTUDY_OP` (`start`, `stop` or `status`). It runs in a
//! new session and is killed if the agent dies. Its stdout and stderr are
//! appended to `<state_dir>/logs/<resource>.log` (start and stop after a
//! header line). Each command is bounded by the operation's timeout: when it
//! runs over, its whole process group is killed and the operation fails
//! with a timeout.
//!
//! Exit codes:
//!
//! | command | exit code | meaning |
//! |---------|-----------|---------|
//! | start, stop | 0 | success |
//! | start, stop | anything else | failure (the message quotes the code and the last lines of the log) |
//! | status | 0 | running |
//! | status | 3 (LSB "not running") or 7 (OCF "not running") | cleanly stopped |
//! | status | anything else, a signal, or running over the timeout | failed |
//!
//! A start command may leave a daemon running in the background: only the
//! command itself is waited for, and nothing it leaves behind is killed
//! after it exits successfully. The stop command is run even when the
//! resource looks stopped, so it must succeed (exit 0) when there is nothing
//! to stop, as LSB init scripts do.
//!
//! A monitor-only script has no start or stop command; the agent never
//! starts or stops it, and doing so anyway succeeds without running
//! anything.
//!
//! Without a status command the driver cannot look: monitor and probe
//! report `Running` after a successful start and `Stopped` otherwise
//! (including after an agent restart), remembered in memory only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::Mutex;
use understudy_core::spec::ScriptSpec;

use crate::spawn::{Exit, Launch, Log, Spawned, show_argv};
use crate::{Driver, DriverEnv, DriverError, Health, OpCtx, ProcessRegistry};

/// How many log lines a failure quotes.
const TAIL_LINES: usize = 10;

/// Runs a resource's scripts (see the module docs).
pub struct ScriptDriver {
    resource: String,
    spec: ScriptSpec,
    launch: Launch,
    log_path: std::path::PathBuf,
    registry: Arc<ProcessRegistry>,
    /// Serialises start and stop.
    op: Mutex<()>,
    /// Whether the last start succeeded and no stop followed (used when
    /// there is no status command).
    started: AtomicBool,
}

impl std::fmt::Debug for ScriptDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptDriver")
            .field("resource", &self.resource)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// How one run of a command ended.
enum Outcome {
    Exited(Exit, Log),
    TimedOut,
}

impl ScriptDriver {
    pub fn new(name: &str, spec: &ScriptSpec, env: &DriverEnv) -> Self {
        ScriptDriver {
            resource: name.to_owned(),
            spec: spec.clone(),
            launch: Launch {
                resource: name.to_owned(),
                base_dir: env.base_dir.clone(),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                user: None,
            },
            log_path: env.state_dir.join("logs").join(format!("{name}.log")),
            registry: Arc::clone(&env.registry),
            op: Mutex::new(()),
            started: AtomicBool::new(false),
        }
    }

    /// The file that receives the scripts' output.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    /// Runs `argv` for `op`, bounded by `ctx.timeout`.
    async fn run(&self, op: &'static str, argv: &[String], ctx: &OpCtx) -> Result<Outcome, String> {
        let mut log = Log::open(&self.log_path)?;
        // A start runs in the resource's cgroup, so a daemon it leaves
        // behind is contained; status and stop run beside it.
        let cgroup = if op == "start" {
            self.registry.cgroup_entry(&self.resource)?
        } else {
            None
        };
        let mut cmd = self.launch.command_in(argv, ctx, &[("UNDERSTUDY_OP", op)], cgroup)?;
        // Status runs every monitor interval: no header, the log stays readable.
        if op != "status" {
            log.header(&format!("{op} {}: {}", self.resource, show_argv(argv)));
        }
        cmd.stdout(log.stdio()?).stderr(log.stdio()?);
        let spawned = Spawned::spawn(&mut cmd).map_err(|e| {
            format!(
                "cannot run `{}` (in {}): {e}",
                self.launch.program(argv.first().map_or("", String::as_str)).display(),
                self.launch.workdir().display()
            )
        })?;
        // Start and stop change things: let the fence guard see them while
        // they run. Status runs too often to be worth recording.
        let recorded = op != "status";
        if recorded && let Err(e) = self.registry.add(&self.resource, spawned.pid()) {
            tracing::warn!("{}: {e}", self.resource);
        }
        let outcome = match spawned.wait_exit(ctx.timeout).await {
            Some(exit) => Outcome::Exited(exit, log),
            None => {
                if let Err(e) = spawned.terminate(Signal::SIGKILL, Duration::ZERO).await {
                    tracing::warn!("{}: {op} command: {e}", self.resource);
                }
                Outcome::TimedOut
            }
        };
        spawned.reap().await;
        if recorded && let Err(e) = self.registry.remove(&self.resource) {
            tracing::warn!("{}: {e}", self.resource);
        }
        Ok(outcome)
    }

    /// Runs start or stop: exit 0 is success.
    async fn change(&self, op: &'static str, argv: &[String], ctx: &OpCtx) -> Result<(), DriverError> {
        match self.run(op, argv, ctx).await.map_err(|e| self.failed(op, e))? {
            Outcome::Exited(Exit::Code(0), _) => Ok(()),
            Outcome::Exited(exit, log) => {
                Err(self.failed(op, format!("`{}` {exit}{}", show_argv(argv), log.tail(TAIL_LINES))))
            }
            Outcome::TimedOut => Err(DriverError::timeout(op, &self.resource, ctx.timeout)),
        }
    }

    async fn status(&self, ctx: &OpCtx) -> Health {
        let Some(argv) = self.spec.monitor.as_deref().filter(|a| !a.is_empty()) else {
            return if self.started.load(Ordering::SeqCst) {
                Health::Running
            } else {
                Health::Stopped
            };
        };
        match self.run("status", argv, ctx).await {
            Ok(Outcome::Exited(Exit::Code(0), _)) => Health::Running,
            Ok(Outcome::Exited(Exit::Code(3 | 7), _)) => Health::Stopped,
            Ok(Outcome::Exited(exit, _)) => Health::Failed(format!("status `{}` {exit}", show_argv(argv))),
            Ok(Outcome::TimedOut) => Health::Failed(format!(
                "status `{}` timed out after {:?}",
                show_argv(argv),
                ctx.timeout
            )),
            Err(e) => Health::Failed(format!("status: {e}")),
        }
    }
}

#[async_trait]
impl Driver for ScriptDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        if self.spec.start.is_empty() {
            return Ok(());
        }
        self.change("start", &self.spec.start, ctx).await?;
        self.started.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        if self.spec.stop.is_empty() {
            return Ok(());
        }
        self.change("stop", &self.spec.stop, ctx).await?;
        self.started.store(false, Ordering::SeqCst);
        // Whatever the start left behind that the stop command did not end.
        self.registry
            .kill_cgroup(&self.resource)
            .await
            .map_err(|e| self.failed("stop", e))
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        self.status(ctx).await
    }

    async fn probe(&self, ctx: &OpCtx) -> Health {
        self.status(ctx).await
    }
}
