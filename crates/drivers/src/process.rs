//! The `process` driver: a long-running process the agent spawns and
//! supervises.
//!
//! **Callers must spawn from a long-lived thread.** Each process is started
//! with `PR_SET_PDEATHSIG = SIGKILL` so it dies when the agent dies. Linux
//! sends that signal when the *thread* that forked the child exits, not the
//! process. [`ProcessDriver::start`] forks on the thread that polls it, so it
//! must run on a thread that lives as long as the agent: the agent uses a
//! current-thread tokio runtime on its main thread (a multi-thread runtime's
//! worker threads also live as long as the runtime). Never start a process
//! from `spawn_blocking` or any other short-lived thread: the blocking pool
//! retires idle threads, and the process would be SIGKILLed with it.
//!
//! How it works:
//!
//! - **start** spawns `command` in a new session (its process group id is its
//!   pid, so signals reach everything it forks), with the resource's
//!   environment plus `UNDERSTUDY_NODE`, `UNDERSTUDY_GROUP`,
//!   `UNDERSTUDY_RESOURCE` and `UNDERSTUDY_TOKEN` (unset for clones), in `cwd`
//!   (default: the definition's directory), as `user` if set (with that
//!   user's groups, and `HOME`, `USER`, `LOGNAME` set from its passwd entry).
//!   stdout and stderr append to `log` (default
//!   `<state_dir>/logs/<resource>.log`) after a header line. The process group
//!   is recorded in the [`ProcessRegistry`]. Without
//!   a `check`, start succeeds once the process is spawned; with one, once the
//!   check passes, polled every 100 ms within the operation's timeout. If the
//!   process exits meanwhile, or the check does not pass in time, start fails
//!   and leaves nothing running. Starting a running process succeeds at once.
//! - **stop** sends `stop_signal` to the process group, waits up to the
//!   operation's timeout (the agent passes the resource's `stop_timeout`) for
//!   the process to exit, then SIGKILLs whatever is left of the group, stray
//!   children included. Stopping a stopped process succeeds.
//! - **monitor** reports `Running` while the process lives and its check (if
//!   any) passes within the operation's timeout, `Failed` with the exit status
//!   once it has died, or with the check's reason.
//! - **probe** reports `Running` if this driver has a live process, otherwise
//!   `Stopped`: processes left by a previous agent are killed at agent start
//!   (see [`kill_leftovers`](crate::registry::kill_leftovers)), never adopted.
//!
//! A `command` check runs with the process's environment, directory and
//! user, plus `UNDERSTUDY_OP=check`; its output is discarded and exit 0 is
//! healthy. On timeout its process group is killed. A `tcp` check connects,
//! an `http` check sends an HTTP/1.0 GET and wants a 2xx status line.
//!
//! Relative `log` and `cwd` paths, and a first command element starting with
//! `./`, resolve against the definition's directory.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::Mutex;
use understudy_core::spec::ProcessSpec;

use crate::spawn::{Launch, Log, Spawned, resolve_path, show_argv};
use crate::{Driver, DriverEnv, DriverError, Health, OpCtx, ProcessRegistry, check};

/// How often start polls the check.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How many log lines a failure quotes.
const TAIL_LINES: usize = 10;

/// Supervises one process (see the module docs).
pub struct ProcessDriver {
    resource: String,
    spec: ProcessSpec,
    launch: Launch,
    stop_signal: Signal,
    /// Grace before SIGKILL when a failed start cleans up after itself.
    stop_timeout: Duration,
    log_path: PathBuf,
    registry: Arc<ProcessRegistry>,
    running: Mutex<Option<Spawned>>,
}

impl std::fmt::Debug for ProcessDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessDriver")
            .field("resource", &self.resource)
            .field("command", &self.spec.command)
            .finish_non_exhaustive()
    }
}

/// `TERM`, `SIGTERM`, `term` → SIGTERM.
fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).ok()
}

impl ProcessDriver {
    pub fn new(name: &str, spec: &ProcessSpec, stop_timeout: Duration, env: &DriverEnv) -> Self {
        let stop_signal = parse_signal(&spec.stop_signal).unwrap_or_else(|| {
            tracing::warn!("{name}: unknown stop_signal `{}`, using SIGTERM", spec.stop_signal);
            Signal::SIGTERM
        });
        let log_path = match &spec.log {
            Some(p) => resolve_path(&env.base_dir, p),
            None => env.state_dir.join("logs").join(format!("{name}.log")),
        };
        ProcessDriver {
            resource: name.to_owned(),
            spec: spec.clone(),
            launch: Launch {
                resource: name.to_owned(),
                base_dir: env.base_dir.clone(),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                user: spec.user.clone(),
            },
            stop_signal,
            stop_timeout,
            log_path,
            registry: Arc::clone(&env.registry),
            running: Mutex::new(None),
        }
    }

    /// The file that receives the process's output.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// The pid (and process group id) of the process, while one is recorded.
    pub async fn pid(&self) -> Option<i32> {
        self.running.lock().await.as_ref().map(Spawned::pid)
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    /// Ends `spawned`'s group (`first`, then SIGKILL after `grace`), reaps
    /// it and forgets it. On failure it is handed back.
    async fn finish(&self, spawned: Spawned, first: Signal, grace: Duration) -> Result<(), (Spawned, String)> {
        let ended = match spawned.terminate(first, grace).await {
            // A worker that left the process group (setsid) is still in the
            // resource's cgroup: it goes too, before the leader is reaped.
            Ok(exit) => match self.registry.kill_cgroup(&self.resource).await {
                Ok(()) => Ok(exit),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match ended {
            Ok(exit) => {
                tracing::debug!("{}: process {} {exit}", self.resource, spawned.pid());
                spawned.reap().await;
                if let Err(e) = self.registry.remove(&self.resource) {
                    // The record names a dead group; a restarted agent checks
                    // the start time and will leave the pid alone.
                    tracing::warn!("{}: {e}", self.resource);
                }
                Ok(())
            }
            Err(e) => Err((spawned, e)),
        }
    }

    async fn spawn(&self, ctx: &OpCtx) -> Result<(Spawned, Log), String> {
        let mut log = Log::open(&self.log_path)?;
        let cgroup = self.registry.cgroup_entry(&self.resource)?;
        let mut cmd = self.launch.command_in(&self.spec.command, ctx, &[], cgroup)?;
        log.header(&format!(
            "starting {}: {}",
            self.resource,
            show_argv(&self.spec.command)
        ));
        cmd.stdout(log.stdio()?).stderr(log.stdio()?);
        let spawned = Spawned::spawn(&mut cmd).map_err(|e| {
            format!(
                "cannot run `{}` (in {}): {e}",
                self.launch
                    .program(self.spec.command.first().map_or("", String::as_str))
                    .display(),
                self.launch.workdir().display()
            )
        })?;
        Ok((spawned, log))
    }

    /// After spawning: waits for the check to pass. `Err` says why not.
    async fn await_ready(&self, spawned: &Spawned, log: &Log, ctx: &OpCtx, deadline: Instant) -> Result<(), String> {
        let Some(check) = &self.spec.check else {
            return Ok(());
        };
        let mut last = String::from("the check has not run");
        loop {
            if let Some(exit) = spawned.peek() {
                return Err(format!("process {exit}{}", log.tail(TAIL_LINES)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("check did not pass within {:?}: {last}", ctx.timeout));
            }
            match check::run(check, &self.launch, ctx, deadline - now).await {
                Ok(()) => {
                    // A check may pass against a port someone else holds;
                    // make sure ours is still there.
                    if let Some(exit) = spawned.peek() {
                        return Err(format!("process {exit}{}", log.tail(TAIL_LINES)));
                    }
                    return Ok(());
                }
                Err(reason) => last = reason,
            }
            let now = Instant::now();
            if now < deadline {
                tokio::time::sleep(CHECK_INTERVAL.min(deadline - now)).await;
            }
        }
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let deadline = Instant::now() + ctx.timeout;
        let mut running = self.running.lock().await;
        if let Some(old) = running.take() {
            if old.peek().is_none() {
                *running = Some(old);
                return Ok(());
            }
            // Died since we last looked: clear what is left of it first.
            if let Err((old, e)) = self.finish(old, Signal::SIGKILL, Duration::ZERO).await {
                *running = Some(old);
                return Err(self.failed("start", e));
            }
        }
        if self.spec.command.is_empty() {
            return Err(self.failed("start", "empty command"));
        }
        let (spawned, log) = self.spawn(ctx).await.map_err(|e| self.failed("start", e))?;
        if let Err(e) = self.registry.add(&self.resource, spawned.pid()) {
            let msg = format!("cannot record process group {}: {e}", spawned.pid());
            return match self.finish(spawned, Signal::SIGKILL, Duration::ZERO).await {
                Ok(()) => Err(self.failed("start", msg)),
                Err((spawned, e2)) => {
                    *running = Some(spawned);
                    Err(self.failed("start", format!("{msg}; {e2}")))
                }
            };
        }
        match self.await_ready(&spawned, &log, ctx, deadline).await {
            Ok(()) => {
                *running = Some(spawned);
                Ok(())
            }
            Err(msg) => match self.finish(spawned, self.stop_signal, self.stop_timeout).await {
                Ok(()) => Err(self.failed("start", msg)),
                Err((spawned, e2)) => {
                    *running = Some(spawned);
                    Err(self.failed("start", format!("{msg}; {e2}")))
                }
            },
        }
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let mut running = self.running.lock().await;
        let Some(spawned) = running.take() else {
            return Ok(());
        };
        match self.finish(spawned, self.stop_signal, ctx.timeout).await {
            Ok(()) => Ok(()),
            Err((spawned, e)) => {
                *running = Some(spawned);
                Err(self.failed("stop", e))
            }
        }
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        {
            let running = self.running.lock().await;
            match running.as_ref().map(Spawned::peek) {
                None => return Health::Stopped,
                Some(Some(exit)) => return Health::Failed(exit.to_string()),
                Some(None) => {}
            }
        }
        let Some(check) = &self.spec.check else {
            return Health::Running;
        };
        match check::run(check, &self.launch, ctx, ctx.timeout).await {
            Ok(()) => Health::Running,
            Err(reason) => Health::Failed(reason),
        }
    }

    async fn probe(&self, _ctx: &OpCtx) -> Health {
        match self.running.lock().await.as_ref().map(Spawned::peek) {
            Some(None) => Health::Running,
            _ => Health::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("sigint"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("USR1"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("NOPE"), None);
    }
}
