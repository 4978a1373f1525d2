//! The `postgres` driver: a PostgreSQL server whose data directory lives on
//! the shared filesystem (F5, S1.3).
//!
//! Commands come from `bin_dir` (default: the newest
//! `/usr/lib/postgresql/<version>/bin`) and run as `user` (default
//! `postgres`; the server refuses to run as root): the driver drops
//! privileges in the child, exactly like the `process` driver does for its
//! `user`, unless the agent already runs as that user. Like every command the
//! drivers run, they run in a new session, die with the agent, have `/` as
//! their working directory and append their output to
//! `<state_dir>/logs/<resource>.log`, after a header line per operation.
//!
//! - **start** runs `pg_ctl start -D DATA_DIR -w -t SECS -o "-p PORT
//!   [-k SOCKET_DIR] -c listen_addresses='*'"` and then waits, within the
//!   operation's timeout, until the server answers `SELECT 1` (see monitor).
//!   `pg_ctl` is not given `-l`: it would make the server open the log as
//!   `user`, which needs the agent's state directory to be writable by that
//!   user; instead the server inherits the log file already opened by the
//!   agent as `pg_ctl`'s stdout and stderr, so its messages land in the same
//!   file. Starting a running server succeeds (after it answers). If the
//!   start fails or runs over, the driver shuts down whatever it started
//!   (as stop does, with up to 10 s more) so nothing is left using the data
//!   directory.
//! - **stop** runs `pg_ctl stop -m fast -w` with half of the operation's
//!   timeout; if the server is still there, `pg_ctl stop -m immediate -w`
//!   with half of what is left; if it is *still* there, it SIGKILLs the
//!   postmaster's process group and every postgres process whose working
//!   directory is the data directory (postgres puts each backend in a
//!   process group of its own), waits for them to vanish and removes the
//!   stale `postmaster.pid`. A zero timeout (the agent's urgent stop) goes
//!   straight to SIGKILL: the next start then does crash recovery, which
//!   PostgreSQL is built for. Stopping a stopped server succeeds.
//! - **monitor** opens a real connection with `tokio-postgres` — over the
//!   Unix socket in `socket_dir` if one is set, else over TCP to
//!   `127.0.0.1:PORT` — as `user`, to `database`, without a password, and
//!   runs `SELECT 1`, all within the operation's timeout: `Running` if it
//!   answers 1, `Failed` with the error otherwise (a live server that does
//!   not answer, e.g. stopped with SIGSTOP or still in crash recovery, is
//!   `Failed`). `Stopped` when the server is cleanly not running: no
//!   `postmaster.pid`. A `postmaster.pid` whose postmaster is not running
//!   here (the server crashed) is `Failed`, and so are postgres processes
//!   still using the data directory without their postmaster.
//! - **probe** reports `Running` if a postmaster for this data directory
//!   runs on this node, `Failed` if only orphaned postgres processes use it,
//!   else `Stopped`.
//!
//! **Which server is "ours".** A postmaster runs here if the pid in
//! `DATA_DIR/postmaster.pid` is a live (non-zombie) process called
//! `postgres` whose working directory is the data directory (the postmaster
//! `chdir`s there; compared by device and inode). This is stricter than
//! `pg_ctl status`, which only asks whether *some* process has that pid — on
//! shared storage the file may come from another node, where that pid means
//! nothing.
//!
//! **Stale `postmaster.pid`.** When the owner crashes, its `postmaster.pid`
//! stays on the shared disk. If its pid is not in use on the node taking
//! over, PostgreSQL itself ignores the file, replaces it and runs crash
//! recovery. If the pid *is* in use here by a process of `user` (or is a
//! not-yet-reaped zombie), PostgreSQL refuses to start ("lock file
//! postmaster.pid already exists"); processes of other users do not count
//! (`kill(pid, 0)` fails with `EPERM`). So before starting, when no postgres
//! process uses the data directory on this node, the driver removes a
//! `postmaster.pid` whose pid exists here but is not a postmaster of this
//! data directory, or that names no pid at all (a crash while it was
//! written), and logs it. The same goes for the node-local socket lock
//! `SOCKET_DIR/.s.PGSQL.PORT.lock`, but only when its pid is not a postgres
//! process at all (a live postgres there may be another server on the same
//! port, which must be reported, not overridden). This is safe because the
//! file cannot protect against a server on *another* node anyway: the
//! cluster's ownership does, and the agent starts a resource only with it.
//!
//! **Listening.** The server listens on every address
//! (`listen_addresses='*'`, overriding `postgresql.conf`): it then accepts
//! connections on the floating IP whenever that address is present, whatever
//! the order in which the IP and the database come up, and on loopback for
//! the health check. Restrict who may connect with `pg_hba.conf`.
//!
//! **Authentication (`pg_hba.conf`).** The health check sends no password
//! and the agent runs as root, so peer authentication as `postgres` fails
//! unless root is mapped. The data directory's `pg_hba.conf` must let the
//! agent in, e.g. with a `socket_dir`:
//! `local DATABASE USER trust`, or `local DATABASE USER peer map=understudy`
//! plus `understudy root USER` in `pg_ident.conf`; without a `socket_dir`:
//! `host DATABASE USER 127.0.0.1/32 trust`. Authentication errors and a
//! missing database make start fail at once rather than after its timeout.
//!
//! **The fence guard and the agent's death.** `pg_ctl` daemonizes the
//! postmaster (it leads a new session, reparented to init), so unlike a
//! `process` resource it does not die with the agent. The driver records the
//! postmaster's process group in the [`ProcessRegistry`] as soon as
//! `postmaster.pid` names it (while `pg_ctl start` still waits), so the fence
//! guard kills it when the node's lease deadline passes and a restarted agent
//! kills it as a leftover. Two gaps remain, noted for the registry's owners:
//! the few milliseconds between the fork and the pid file, and postgres's
//! own children (each leads its own process group, so the guard's SIGKILL of
//! the postmaster's group does not reach them; they exit when they next
//! notice the postmaster is gone — an idle backend at once, a busy one when
//! its query next waits).
//!
//! A default `bin_dir` that does not exist is reported by start and stop,
//! not when the driver is built, so an agent can run on a node that
//! installs PostgreSQL later.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, User, chown, geteuid};
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};
use understudy_core::spec::PostgresSpec;

use crate::spawn::{Exit, KILL_WAIT, Launch, Log, Spawned, resolve_path, show_argv};
use crate::{Driver, DriverEnv, DriverError, Health, OpCtx, ProcessRegistry, procfs};

/// Where the default `bin_dir` is looked for.
const DEFAULT_ROOT: &str = "/usr/lib/postgresql";
/// How many log lines a failure quotes.
const TAIL_LINES: usize = 10;
/// How often start polls `pg_ctl` and the health check.
const POLL: Duration = Duration::from_millis(50);
/// How long stop waits for a postmaster that has removed its pid file to
/// exit (and for its children), before it kills them.
const SETTLE: Duration = Duration::from_secs(1);
/// What a failed start may spend, beyond its timeout, to shut down what it
/// started.
const CLEANUP: Duration = Duration::from_secs(10);

/// Runs one PostgreSQL server (see the module docs).
pub struct PostgresDriver {
    resource: String,
    spec: PostgresSpec,
    data_dir: PathBuf,
    socket_dir: Option<PathBuf>,
    launch: Launch,
    log_path: PathBuf,
    registry: Arc<ProcessRegistry>,
    /// Serialises start and stop.
    op: Mutex<()>,
}

impl std::fmt::Debug for PostgresDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDriver")
            .field("resource", &self.resource)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// What runs from the data directory on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Server {
    /// The postmaster named by `postmaster.pid` runs here.
    Running { pid: i32 },
    /// No postmaster, but these postgres processes still use the data
    /// directory (children of a postmaster that was killed).
    Orphans(Vec<i32>),
    /// `postmaster.pid` exists but names no postmaster of this data
    /// directory on this node (`None`: it names no pid at all).
    Stale { pid: Option<i32> },
    /// No `postmaster.pid`, no process.
    Down,
}

/// A data directory's identity: device and inode.
type DirId = (u64, u64);

impl PostgresDriver {
    pub fn new(resource: &str, spec: &PostgresSpec, env: &DriverEnv) -> Result<Self, DriverError> {
        let failed = |message: String| DriverError::failed("configure", resource, message);
        // pg_ctl pastes the data directory between double quotes into a
        // shell command line.
        if let Some(c) = spec.data_dir.chars().find(|c| matches!(c, '"' | '$' | '`' | '\\')) {
            return Err(failed(format!(
                "the data directory `{}` holds `{c}`, which pg_ctl cannot pass to the server",
                spec.data_dir
            )));
        }
        if spec.user.is_empty() {
            return Err(failed("no user to run the server as".into()));
        }
        // Switching to the user we already are would fail (setgroups needs
        // privileges): only switch when it changes something.
        let already = User::from_name(&spec.user)
            .ok()
            .flatten()
            .is_some_and(|u| u.uid == geteuid());
        Ok(PostgresDriver {
            resource: resource.to_owned(),
            spec: spec.clone(),
            data_dir: resolve_path(&env.base_dir, &spec.data_dir),
            socket_dir: spec.socket_dir.as_deref().map(|d| resolve_path(&env.base_dir, d)),
            launch: Launch {
                resource: resource.to_owned(),
                base_dir: env.base_dir.clone(),
                env: Vec::new(),
                cwd: Some("/".into()),
                user: (!already).then(|| spec.user.clone()),
            },
            log_path: env.state_dir.join("logs").join(format!("{resource}.log")),
            registry: Arc::clone(&env.registry),
            op: Mutex::new(()),
        })
    }

    /// The file that receives `pg_ctl`'s and the server's output.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    fn pid_file(&self) -> PathBuf {
        self.data_dir.join("postmaster.pid")
    }

    /// The directory holding `pg_ctl`.
    fn bin_dir(&self) -> Result<PathBuf, String> {
        if let Some(d) = &self.spec.bin_dir {
            return Ok(resolve_path(&self.launch.base_dir, d));
        }
        let names = fs::read_dir(DEFAULT_ROOT)
            .map_err(|e| format!("no bin_dir set and cannot list {DEFAULT_ROOT}: {e}"))?
            .flatten()
            .filter(|e| e.path().join("bin").join("pg_ctl").is_file())
            .filter_map(|e| e.file_name().into_string().ok());
        newest_version(names)
            .map(|v| Path::new(DEFAULT_ROOT).join(v).join("bin"))
            .ok_or_else(|| format!("no bin_dir set and no {DEFAULT_ROOT}/<version>/bin/pg_ctl found"))
    }

    /// The postmaster named by `postmaster.pid`, if it runs here.
    fn postmaster(&self) -> Option<i32> {
        let id = dir_id(&self.data_dir)?;
        let pid = read_pid_file(&self.pid_file())??;
        is_postmaster_of(pid, id).then_some(pid)
    }

    fn server(&self) -> Server {
        let Some(id) = dir_id(&self.data_dir) else {
            return Server::Down;
        };
        let pid_file = read_pid_file(&self.pid_file());
        if let Some(Some(pid)) = pid_file
            && is_postmaster_of(pid, id)
        {
            return Server::Running { pid };
        }
        let users = processes_using(id);
        if !users.is_empty() {
            return Server::Orphans(users);
        }
        match pid_file {
            Some(pid) => Server::Stale { pid },
            None => Server::Down,
        }
    }

    /// Records the postmaster's process group for the fence guard.
    fn record(&self, pid: i32) {
        match procfs::stat(pid) {
            Some(st) if st.pgrp == pid => {
                if let Err(e) = self.registry.add(&self.resource, pid) {
                    tracing::warn!("{}: {e}", self.resource);
                }
            }
            Some(st) => tracing::warn!(
                "{}: postmaster {pid} is in process group {}, not its own; the fence guard cannot kill it",
                self.resource,
                st.pgrp
            ),
            None => {}
        }
    }

    fn forget(&self) {
        if let Err(e) = self.registry.remove(&self.resource) {
            tracing::warn!("{}: {e}", self.resource);
        }
    }

    /// Runs `pg_ctl ARGS` within `budget`. `Ok(None)`: it ran over and was
    /// killed. With `watch`, records the postmaster as soon as it appears.
    async fn pg_ctl(
        &self,
        args: &[String],
        ctx: &OpCtx,
        log: &mut Log,
        what: &str,
        budget: Duration,
        watch: bool,
    ) -> Result<Option<Exit>, String> {
        let mut argv = vec![self.bin_dir()?.join("pg_ctl").to_string_lossy().into_owned()];
        argv.extend(args.iter().cloned());
        log.header(&format!("{what} {}: {}", self.resource, show_argv(&argv)));
        // `pg_ctl start` runs in the resource's cgroup, so the postmaster it
        // daemonizes and every backend are contained (stop and the guard
        // kill the cgroup as a whole).
        let cgroup = if watch {
            self.registry.cgroup_entry(&self.resource)?
        } else {
            None
        };
        let mut cmd = self.launch.command_in(&argv, ctx, &[], cgroup)?;
        cmd.stdout(log.stdio()?).stderr(log.stdio()?);
        let spawned = Spawned::spawn(&mut cmd).map_err(|e| format!("cannot run `{}`: {e}", argv[0]))?;
        drop(cmd);
        let deadline = Instant::now() + budget;
        let mut recorded = None;
        let exit = loop {
            let now = Instant::now();
            let slice = POLL.min(deadline.saturating_duration_since(now));
            if let Some(exit) = spawned.wait_exit(slice).await {
                break Some(exit);
            }
            if watch
                && let Some(pid) = self.postmaster()
                && recorded != Some(pid)
            {
                self.record(pid);
                recorded = Some(pid);
            }
            if Instant::now() >= deadline {
                // `pg_ctl start` forks the postmaster into a session of its
                // own: stop pg_ctl (so it cannot reap its child and free the
                // pid), kill its children, then pg_ctl.
                if let Err(e) = spawned.signal_group(Signal::SIGSTOP) {
                    tracing::warn!("{}: pg_ctl: {e}", self.resource);
                }
                for child in children(spawned.pid()) {
                    kill_process_or_group(child);
                }
                if let Err(e) = spawned.terminate(Signal::SIGKILL, Duration::ZERO).await {
                    tracing::warn!("{}: pg_ctl: {e}", self.resource);
                }
                break None;
            }
        };
        spawned.reap().await;
        Ok(exit)
    }

    /// Before a start, with nothing of ours running: clears what would stop
    /// PostgreSQL from starting (see the module docs).
    async fn clear_leftovers(&self, log: &mut Log) -> Result<(), String> {
        let mut state = self.server();
        if let Server::Orphans(pids) = &state {
            log.header(&format!(
                "{}: killing postgres processes {pids:?} left without their postmaster",
                self.resource
            ));
            self.kill_all(None).await?;
            // The pid file is still there, naming the dead postmaster (a
            // zombie until someone reaps it, which PostgreSQL takes for a
            // live server): look again.
            state = self.server();
        }
        match state {
            Server::Running { .. } | Server::Down | Server::Orphans(_) => {}
            Server::Stale { pid } => {
                if pid.is_none_or(proc_exists) {
                    let text = fs::read_to_string(self.pid_file()).unwrap_or_default();
                    let first = text.lines().next().unwrap_or("");
                    log.header(&format!(
                        "{}: removing stale {} (pid `{first}` is not a postgres server of this data directory here)",
                        self.resource,
                        self.pid_file().display()
                    ));
                    remove_if_present(&self.pid_file())?;
                }
            }
        }
        if let Some(dir) = &self.socket_dir {
            let lock = dir.join(format!(".s.PGSQL.{}.lock", self.spec.port));
            if let Some(pid) = read_pid_file(&lock)
                && pid.is_none_or(|p| proc_exists(p) && !is_live_postgres(p))
            {
                log.header(&format!(
                    "{}: removing stale socket lock {} (its pid is no postgres process)",
                    self.resource,
                    lock.display()
                ));
                remove_if_present(&lock)?;
            }
        }
        Ok(())
    }

    /// Creates `socket_dir` (owned by the user) when it does not exist.
    fn ensure_socket_dir(&self) -> Result<(), String> {
        let Some(dir) = &self.socket_dir else { return Ok(()) };
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir).map_err(|e| format!("cannot create socket_dir {}: {e}", dir.display()))?;
        if let Some(name) = &self.launch.user {
            let user = User::from_name(name)
                .map_err(|e| format!("cannot look up user `{name}`: {e}"))?
                .ok_or_else(|| format!("no such user `{name}`"))?;
            chown(dir, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("cannot hand socket_dir {} to `{name}`: {e}", dir.display()))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o2775))
            .map_err(|e| format!("cannot set the mode of socket_dir {}: {e}", dir.display()))
    }

    /// The `-o` string handed to the server (pg_ctl passes it through `sh`).
    fn server_options(&self) -> String {
        let mut opts = format!("-p {}", self.spec.port);
        if let Some(dir) = &self.socket_dir {
            opts.push_str(" -k ");
            opts.push_str(&sh_quote(&dir.to_string_lossy()));
        }
        opts.push_str(" -c 'listen_addresses=*'");
        opts
    }

    async fn start_server(&self, ctx: &OpCtx, deadline: Instant) -> Result<(), DriverError> {
        let mut log = Log::open(&self.log_path).map_err(|e| self.failed("start", e))?;
        self.clear_leftovers(&mut log)
            .await
            .map_err(|e| self.failed("start", e))?;
        if !self.data_dir.join("PG_VERSION").is_file() {
            return Err(self.failed(
                "start",
                format!(
                    "{} is not a PostgreSQL data directory (no PG_VERSION); is its filesystem mounted?",
                    self.data_dir.display()
                ),
            ));
        }
        self.ensure_socket_dir().map_err(|e| self.failed("start", e))?;
        let budget = deadline.saturating_duration_since(Instant::now());
        let args: Vec<String> = vec![
            "start".into(),
            "-D".into(),
            self.data_dir.to_string_lossy().into_owned(),
            "-w".into(),
            "-t".into(),
            whole_secs(budget).to_string(),
            "-o".into(),
            self.server_options(),
        ];
        let outcome = self.pg_ctl(&args, ctx, &mut log, "starting", budget, true).await;
        let problem = match outcome {
            Err(e) => Some((false, e)),
            Ok(None) => Some((
                true,
                format!(
                    "pg_ctl start did not finish within {:?}{}",
                    ctx.timeout,
                    log.tail(TAIL_LINES)
                ),
            )),
            Ok(Some(Exit::Code(0))) => match self.postmaster() {
                Some(pid) => {
                    self.record(pid);
                    None
                }
                None => Some((false, "pg_ctl start succeeded but no postmaster runs".to_owned())),
            },
            Ok(Some(exit)) => Some((false, format!("pg_ctl start {exit}{}", log.tail(TAIL_LINES)))),
        };
        let problem = match problem {
            Some(p) => Some(p),
            None => self.await_answer(deadline).await.err().map(|e| (false, e)),
        };
        let Some((timed_out, message)) = problem else {
            return Ok(());
        };
        // Leave nothing behind that uses the data directory.
        let cleanup = self.shutdown(ctx, CLEANUP, &mut log).await;
        let message = match cleanup {
            Ok(()) => message,
            Err(e) => format!("{message}; cleaning up: {e}"),
        };
        if timed_out {
            tracing::warn!("{}: start: {message}", self.resource);
            Err(DriverError::timeout("start", &self.resource, ctx.timeout))
        } else {
            Err(self.failed("start", message))
        }
    }

    /// Waits until the server answers `SELECT 1`, or `deadline`. Errors that
    /// waiting cannot fix (authentication, a missing database) end it early.
    async fn await_answer(&self, deadline: Instant) -> Result<(), String> {
        let mut last = String::from("no answer yet");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the server did not answer `SELECT 1` in time: {last}"));
            }
            match self.select_one(left).await {
                Ok(()) => return Ok(()),
                Err(QueryError::Permanent(e)) => return Err(e),
                Err(QueryError::Transient(e)) => last = e,
            }
            if self.postmaster().is_none() {
                return Err(format!("the server stopped: {last}"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(POLL.min(left)).await;
        }
    }

    /// One connection and `SELECT 1`, bounded by `timeout`.
    async fn select_one(&self, timeout: Duration) -> Result<(), QueryError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(&self.spec.user)
            .dbname(&self.spec.database)
            .port(self.spec.port)
            .application_name("understudy")
            .connect_timeout(timeout);
        let target = match &self.socket_dir {
            Some(dir) => {
                cfg.host_path(dir);
                format!("{}/.s.PGSQL.{}", dir.display(), self.spec.port)
            }
            None => {
                cfg.host("127.0.0.1");
                format!("127.0.0.1:{}", self.spec.port)
            }
        };
        let work = async {
            let (client, connection) = cfg.connect(NoTls).await?;
            let query = client.simple_query("SELECT 1");
            tokio::pin!(connection);
            tokio::select! {
                r = query => r.map(Some),
                r = &mut connection => r.map(|()| None),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Err(_) => Err(QueryError::Transient(format!(
                "{target}: no answer to `SELECT 1` within {timeout:?}"
            ))),
            Ok(Ok(Some(messages))) => {
                let value = messages.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
                    _ => None,
                });
                match value {
                    Some(Some(v)) if v == "1" => Ok(()),
                    other => Err(QueryError::Transient(format!(
                        "{target}: `SELECT 1` returned {other:?}"
                    ))),
                }
            }
            Ok(Ok(None)) => Err(QueryError::Transient(format!(
                "{target}: the server closed the connection"
            ))),
            Ok(Err(e)) => {
                let text = format!("{target}: {}", describe(&e));
                let permanent = e.code().is_some_and(|c| {
                    let class = &c.code()[..2];
                    class == "28" || *c == SqlState::INVALID_CATALOG_NAME
                });
                Err(if permanent {
                    QueryError::Permanent(text)
                } else {
                    QueryError::Transient(text)
                })
            }
        }
    }

    /// Stops whatever runs from the data directory here: fast, immediate,
    /// then SIGKILL (see the module docs), within `budget` plus the time
    /// SIGKILL takes.
    async fn shutdown(&self, ctx: &OpCtx, budget: Duration, log: &mut Log) -> Result<(), String> {
        let deadline = Instant::now() + budget;
        let pid = match self.server() {
            Server::Down | Server::Stale { .. } => {
                self.forget();
                return Ok(());
            }
            Server::Orphans(pids) => {
                log.header(&format!(
                    "{}: killing postgres processes {pids:?} left without their postmaster",
                    self.resource
                ));
                self.kill_all(None).await?;
                self.forget();
                return Ok(());
            }
            Server::Running { pid } => pid,
        };
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        for (mode, share) in [("fast", 2), ("immediate", 2)] {
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left / share;
            if slice.is_zero() {
                continue;
            }
            let args: Vec<String> = vec![
                "stop".into(),
                "-D".into(),
                data_dir.clone(),
                "-m".into(),
                mode.into(),
                "-w".into(),
                "-t".into(),
                whole_secs(slice).to_string(),
            ];
            match self.pg_ctl(&args, ctx, log, "stopping", slice, false).await {
                Ok(Some(Exit::Code(0))) => {}
                Ok(Some(exit)) => tracing::info!("{}: pg_ctl stop -m {mode} {exit}", self.resource),
                Ok(None) => tracing::info!("{}: pg_ctl stop -m {mode} ran over {slice:?}", self.resource),
                Err(e) => tracing::warn!("{}: {e}", self.resource),
            }
            // The postmaster removes its pid file just before it exits.
            match self.settle(Instant::now() + SETTLE).await {
                Server::Down => {
                    self.forget();
                    return Ok(());
                }
                Server::Running { .. } => {}
                // The postmaster is gone but left something behind.
                Server::Orphans(_) | Server::Stale { .. } => break,
            }
        }
        log.header(&format!(
            "{}: the server (postmaster {pid}) is still there: SIGKILL",
            self.resource
        ));
        self.kill_all(Some(pid)).await?;
        // Only now that nothing runs: the file names our dead postmaster.
        if read_pid_file(&self.pid_file()) == Some(Some(pid)) {
            remove_if_present(&self.pid_file())?;
        }
        self.forget();
        Ok(())
    }

    /// The server's state once it stops changing: waits up to `until` while
    /// the postmaster has gone but processes or its pid file are left.
    async fn settle(&self, until: Instant) -> Server {
        loop {
            let state = self.server();
            if matches!(state, Server::Down | Server::Running { .. }) || Instant::now() >= until {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs `postmaster`'s process group and every postgres process
    /// using the data directory, and waits for them to vanish.
    async fn kill_all(&self, postmaster: Option<i32>) -> Result<(), String> {
        let Some(id) = dir_id(&self.data_dir) else {
            return Ok(());
        };
        let deadline = Instant::now() + KILL_WAIT;
        if let Some(pid) = postmaster {
            kill_process_or_group(pid);
        }
        loop {
            let users = processes_using(id);
            let postmaster_live = postmaster.is_some_and(|p| procfs::stat(p).is_some_and(|s| s.is_live()));
            if users.is_empty() && !postmaster_live {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "postgres processes {users:?} still use {} {KILL_WAIT:?} after SIGKILL",
                    self.data_dir.display()
                ));
            }
            for pid in users {
                kill_process_or_group(pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

enum QueryError {
    /// Might pass if tried again (not up yet, busy, recovering).
    Transient(String),
    /// Will not pass by waiting (authentication, no such database).
    Permanent(String),
}

/// A `tokio_postgres` error with the server's message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

#[async_trait]
impl Driver for PostgresDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        let deadline = Instant::now() + ctx.timeout;
        if let Server::Running { pid } = self.server() {
            self.record(pid);
            return self
                .await_answer(deadline)
                .await
                .map_err(|e| self.failed("start", format!("already running (postmaster {pid}), but {e}")));
        }
        self.start_server(ctx, deadline).await
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        if self.server() != Server::Down {
            let mut log = Log::open(&self.log_path).map_err(|e| self.failed("stop", e))?;
            self.shutdown(ctx, ctx.timeout, &mut log)
                .await
                .map_err(|e| self.failed("stop", e))?;
        }
        self.forget();
        // Whatever the server left in its cgroup (a child of an archive or
        // restore command, a backend on its way out) goes with it.
        self.registry
            .kill_cgroup(&self.resource)
            .await
            .map_err(|e| self.failed("stop", e))
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        match self.server() {
            Server::Running { .. } => match self.select_one(ctx.timeout).await {
                Ok(()) => Health::Running,
                Err(QueryError::Permanent(e) | QueryError::Transient(e)) => Health::Failed(e),
            },
            Server::Down => Health::Stopped,
            Server::Stale { pid } => Health::Failed(match pid {
                Some(pid) => format!(
                    "the server is not running: {} names pid {pid}, which is no postmaster of this data directory here (crashed?)",
                    self.pid_file().display()
                ),
                None => format!("the server is not running: {} names no pid", self.pid_file().display()),
            }),
            Server::Orphans(pids) => Health::Failed(orphans_message(&pids)),
        }
    }

    async fn probe(&self, _ctx: &OpCtx) -> Health {
        match self.server() {
            Server::Running { .. } => Health::Running,
            Server::Orphans(pids) => Health::Failed(orphans_message(&pids)),
            Server::Down | Server::Stale { .. } => Health::Stopped,
        }
    }
}

fn orphans_message(pids: &[i32]) -> String {
    format!("no postmaster runs, but postgres processes {pids:?} still use the data directory")
}

/// The newest of the version directory names (`9.6`, `15`, `16`), compared
/// number by number; names that are not versions are ignored.
fn newest_version(names: impl IntoIterator<Item = String>) -> Option<String> {
    names
        .into_iter()
        .filter_map(|n| {
            let key: Option<Vec<u32>> = n.split('.').map(|p| p.parse().ok()).collect();
            key.map(|k| (k, n))
        })
        .max()
        .map(|(_, n)| n)
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `d` in whole seconds, rounded up, at least 1 (pg_ctl's `-t`).
fn whole_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// The pid on the first line of a lock file: `None` when the file does not
/// exist, `Some(None)` when it names no pid.
fn read_pid_file(path: &Path) -> Option<Option<i32>> {
    match fs::read_to_string(path) {
        Ok(text) => Some(parse_pid(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => Some(None),
    }
}

fn parse_pid(text: &str) -> Option<i32> {
    text.lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
}

fn remove_if_present(path: &Path) -> Result<(), String> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

fn dir_id(path: &Path) -> Option<DirId> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether a process with this pid exists at all (zombies included): what
/// PostgreSQL's own check (`kill(pid, 0)`) would see.
fn proc_exists(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn is_postgres_comm(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| matches!(c.trim(), "postgres" | "postmaster"))
}

fn is_live_postgres(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.is_live()) && is_postgres_comm(pid)
}

/// Whether `pid`'s working directory is the directory `id`: `None` when we
/// may not look (another user's process, an agent without root).
fn cwd_is(pid: i32, id: DirId) -> Option<bool> {
    match fs::metadata(format!("/proc/{pid}/cwd")) {
        Ok(m) => Some((m.dev(), m.ino()) == id),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => None,
        Err(_) => Some(false),
    }
}

/// A live postgres process working in the data directory `id` (when its
/// directory cannot be seen, a live postgres is assumed to be it).
fn is_postmaster_of(pid: i32, id: DirId) -> bool {
    is_live_postgres(pid) && cwd_is(pid, id) != Some(false)
}

/// Every live postgres process whose working directory is `id`.
fn processes_using(id: DirId) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|&pid| {
            is_postgres_comm(pid) && procfs::stat(pid).is_some_and(|s| s.is_live()) && cwd_is(pid, id) == Some(true)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The children of `pid` (from `/proc/PID/task/*/children`).
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// SIGKILLs `pid`'s process group if it leads one, else `pid` alone.
fn kill_process_or_group(pid: i32) {
    let Some(st) = procfs::stat(pid) else { return };
    let target = Pid::from_raw(pid);
    let result = if st.pgrp == pid {
        killpg(target, Signal::SIGKILL)
    } else {
        kill(target, Signal::SIGKILL)
    };
    match result {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!("cannot SIGKILL postgres process {pid}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn newest_version_compares_numbers() {
        let names = ["9.6", "15", "12", "lost+found", "16beta", "13"].map(String::from);
        assert_eq!(newest_version(names), Some("15".into()));
        let names = ["9.6", "10"].map(String::from);
        assert_eq!(newest_version(names), Some("10".into()));
        assert_eq!(newest_version(Vec::new()), None);
    }

    #[test]
    fn quoting_and_seconds() {
        assert_eq!(sh_quote("/run/pg"), "'/run/pg'");
        assert_eq!(sh_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(whole_secs(Duration::ZERO), 1);
        assert_eq!(whole_secs(Duration::from_millis(1500)), 2);
        assert_eq!(whole_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn pid_file_first_line() {
        assert_eq!(parse_pid("1234\n/srv/pg\n1700000000\n5432\n"), Some(1234));
        assert_eq!(parse_pid(""), None);
        assert_eq!(parse_pid("-5\n"), None);
        assert_eq!(parse_pid("garbage\n"), None);
    }
}
