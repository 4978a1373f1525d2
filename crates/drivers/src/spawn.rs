//! Spawning user commands the way every driver does, and handling the
//! process groups they lead.
//!
//! Every command runs in a new session (so its process group id is its pid
//! and a signal to the group reaches everything it forked), dies with the
//! agent (`PR_SET_PDEATHSIG = SIGKILL`, see the note in `process.rs` about
//! which thread must spawn), and optionally as another user.
//!
//! A child's exit is observed with `waitid(…, WNOWAIT)`, which does not reap
//! it: as long as the exited leader is an unreaped zombie its pid cannot be
//! reused, so signalling its process group can never hit a stranger. The
//! leader is reaped only after its group has been dealt with.

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::{Gid, Pid, Uid, User, getgrouplist, getppid, setgid, setgroups, setsid, setuid};

use crate::{OpCtx, procfs};

/// How long to wait for a process group to vanish after SIGKILL.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// What a command needs besides its argv: where `./` resolves, its
/// environment and working directory, the user it runs as.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub resource: String,
    pub base_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

/// The ids a command switches to, looked up before forking (name lookups
/// are not async-signal-safe).
#[derive(Clone, Debug)]
struct Creds {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

/// `path` as given when absolute, else relative to `base`.
pub(crate) fn resolve_path(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

impl Launch {
    /// The program to run: a first element starting with `./` resolves
    /// against the definition's directory; anything else is used as given
    /// (a bare name is looked up in the agent's PATH).
    pub(crate) fn program(&self, argv0: &str) -> PathBuf {
        match argv0.strip_prefix("./") {
            Some(rest) => self.base_dir.join(rest),
            None => PathBuf::from(argv0),
        }
    }

    /// The working directory: `cwd` (relative to the definition's
    /// directory), or that directory itself.
    pub(crate) fn workdir(&self) -> PathBuf {
        match &self.cwd {
            Some(c) => resolve_path(&self.base_dir, c),
            None => self.base_dir.clone(),
        }
    }

    /// Builds the command for `argv` with the environment (`extra` last, so it
    /// wins), cwd, user and session/death-signal setup. stdin is null; the
    /// caller sets stdout and stderr.
    pub(crate) fn command(
        &self,
        argv: &[String],
        ctx: &OpCtx,
        extra: &[(&str, &str)],
    ) -> Result<tokio::process::Command, String> {
        self.command_in(argv, ctx, extra, None)
    }

    /// [`Launch::command`], and the child enters the cgroup whose
    /// `cgroup.procs` is `cgroup` (see [`crate::cgroup`]) before anything
    /// else, so everything it forks is born inside.
    pub(crate) fn command_in(
        &self,
        argv: &[String],
        ctx: &OpCtx,
        extra: &[(&str, &str)],
        cgroup: Option<OwnedFd>,
    ) -> Result<tokio::process::Command, String> {
        let Some((first, args)) = argv.split_first() else {
            return Err("empty command".into());
        };
        let mut cmd = tokio::process::Command::new(self.program(first));
        cmd.args(args)
            .current_dir(self.workdir())
            .stdin(Stdio::null())
            .kill_on_drop(false);
        let creds = match &self.user {
            Some(name) => {
                let user = User::from_name(name)
                    .map_err(|e| format!("cannot look up user `{name}`: {e}"))?
                    .ok_or_else(|| format!("no such user `{name}`"))?;
                let cname = CString::new(name.as_str()).map_err(|_| format!("bad user name `{name}`"))?;
                let groups = getgrouplist(&cname, user.gid)
                    .map_err(|e| format!("cannot list the groups of user `{name}`: {e}"))?;
                cmd.env("HOME", &user.dir).env("USER", name).env("LOGNAME", name);
                Some(Creds {
                    uid: user.uid,
                    gid: user.gid,
                    groups,
                })
            }
            None => None,
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env("UNDERSTUDY_NODE", &ctx.node)
            .env("UNDERSTUDY_GROUP", &ctx.group)
            .env("UNDERSTUDY_RESOURCE", &self.resource);
        match ctx.token {
            Some(t) => cmd.env("UNDERSTUDY_TOKEN", t.to_string()),
            None => cmd.env_remove("UNDERSTUDY_TOKEN"),
        };
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let parent = Pid::from_raw(i32::try_from(std::process::id()).map_err(|_| "pid out of range".to_owned())?);
        install_child_setup(&mut cmd, parent, creds, cgroup);
        Ok(cmd)
    }
}

/// Arranges for [`child_setup`] to run in the child between fork and exec.
#[allow(unsafe_code)]
fn install_child_setup(cmd: &mut tokio::process::Command, parent: Pid, creds: Option<Creds>, cgroup: Option<OwnedFd>) {
    // SAFETY: the closure runs in the forked child, where only
    // async-signal-safe operations are allowed. `child_setup` makes only
    // direct system calls (write, setsid, setgroups, setgid, setuid, prctl,
    // getppid) on data prepared before the fork, and on failure builds an
    // `io::Error` from a raw errno, which does not allocate. It takes no
    // locks and allocates no memory.
    unsafe {
        cmd.pre_exec(move || child_setup(parent, creds.as_ref(), cgroup.as_ref()));
    }
}

/// In the child: cgroup, new session, user switch, death signal, parent check.
fn child_setup(parent: Pid, creds: Option<&Creds>, cgroup: Option<&OwnedFd>) -> io::Result<()> {
    // First, while still root: writing `0` to `cgroup.procs` moves the
    // writer itself.
    if let Some(fd) = cgroup {
        nix::unistd::write(fd, b"0")?;
    }
    setsid()?;
    if let Some(c) = creds {
        setgroups(&c.groups)?;
        setgid(c.gid)?;
        setuid(c.uid)?;
    }
    // After the credential change: changing uid or gid clears the death signal.
    prctl::set_pdeathsig(Signal::SIGKILL)?;
    // If the agent died before the prctl, we have been reparented and the
    // death signal will never come: do not run at all.
    if getppid() != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(Signal),
    /// Reaped by someone else; the status is lost.
    Unknown,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with status {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {}", s.as_str()),
            Exit::Unknown => write!(f, "exited (status unknown)"),
        }
    }
}

/// A spawned command that leads its own process group.
#[derive(Debug)]
pub(crate) struct Spawned {
    child: tokio::process::Child,
    pid: Pid,
}

impl Spawned {
    pub(crate) fn spawn(cmd: &mut tokio::process::Command) -> io::Result<Spawned> {
        let child = cmd.spawn()?;
        let raw = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| io::Error::other("spawned process has no pid"))?;
        Ok(Spawned {
            child,
            pid: Pid::from_raw(raw),
        })
    }

    /// The leader's standard error, when it was piped (once).
    pub(crate) fn take_stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The leader's pid, which is also its process group id.
    pub(crate) fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// How the leader ended, or `None` while it runs. Does not reap it.
    pub(crate) fn peek(&self) -> Option<Exit> {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        loop {
            return match waitid(Id::Pid(self.pid), flags) {
                Ok(WaitStatus::Exited(_, code)) => Some(Exit::Code(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => Some(Exit::Signal(sig)),
                Ok(_) => None,
                Err(Errno::EINTR) => continue,
                Err(_) => Some(Exit::Unknown),
            };
        }
    }

    /// Waits up to `timeout` for the leader to end (without reaping it).
    pub(crate) async fn wait_exit(&self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(exit) = self.peek() {
                return Some(exit);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `sig` to the whole process group. A group with no member left
    /// is not an error.
    pub(crate) fn signal_group(&self, sig: Signal) -> Result<(), String> {
        match killpg(self.pid, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(format!(
                "cannot send {} to process group {}: {e}",
                sig.as_str(),
                self.pid
            )),
        }
    }

    /// Waits up to `timeout` until the leader has ended and no other live
    /// member of its group is left.
    pub(crate) async fn wait_group_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.peek().is_some() && !procfs::group_is_live(self.pid.as_raw()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `first` to the group, waits up to `grace` for the leader to
    /// end, then SIGKILLs whatever is left of the group (stragglers too, even
    /// when the leader ended by itself) and waits for it to vanish. Returns
    /// how the leader ended, or an error if the group survives SIGKILL (a
    /// process stuck in uninterruptible sleep); the leader is not reaped.
    pub(crate) async fn terminate(&self, first: Signal, grace: Duration) -> Result<Exit, String> {
        if first != Signal::SIGKILL && self.peek().is_none() {
            self.signal_group(first)?;
            self.wait_exit(grace).await;
        }
        self.signal_group(Signal::SIGKILL)?;
        if !self.wait_group_gone(KILL_WAIT).await {
            return Err(format!(
                "process group {} is still alive {KILL_WAIT:?} after SIGKILL",
                self.pid
            ));
        }
        Ok(self.peek().unwrap_or(Exit::Unknown))
    }

    /// Reaps the leader, which must have ended (see [`Spawned::peek`]).
    pub(crate) async fn reap(mut self) {
        if let Err(e) = tokio::time::timeout(KILL_WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "reaping timed out")))
        {
            tracing::warn!("cannot reap process {}: {e}", self.pid);
        }
    }
}

/// A log file opened for appending, remembering where this run's output
/// begins so a failure can quote it.
#[derive(Debug)]
pub(crate) struct Log {
    pub path: PathBuf,
    file: File,
    start: u64,
}

impl Log {
    /// Opens (creating it and its directories) `path` for appending.
    pub(crate) fn open(path: &Path) -> Result<Log, String> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
        let start = file.seek(SeekFrom::End(0)).unwrap_or(0);
        Ok(Log {
            path: path.to_path_buf(),
            file,
            start,
        })
    }

    /// Appends a `=== TIME understudy: TEXT` line.
    pub(crate) fn header(&mut self, text: &str) {
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        if let Err(e) = writeln!(self.file, "=== {now} understudy: {text}") {
            tracing::warn!("cannot write to {}: {e}", self.path.display());
        }
        self.start = self.file.seek(SeekFrom::End(0)).unwrap_or(self.start);
    }

    /// A handle for a child's stdout or stderr.
    pub(crate) fn stdio(&self) -> Result<Stdio, String> {
        self.file
            .try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("cannot duplicate log file handle {}: {e}", self.path.display()))
    }

    /// The last `n` lines written since the file was opened (or the last
    /// header), formatted for an error message; empty when there are none.
    pub(crate) fn tail(&self, n: usize) -> String {
        const MAX: u64 = 4096;
        let Ok(mut f) = File::open(&self.path) else {
            return String::new();
        };
        let Ok(end) = f.seek(SeekFrom::End(0)) else {
            return String::new();
        };
        let from = self.start.max(end.saturating_sub(MAX)).min(end);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_err() || f.take(end - from).read_to_end(&mut buf).is_err() {
            return String::new();
        }
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return String::new();
        }
        let shown = &lines[lines.len().saturating_sub(n)..];
        let mut out = format!("; last lines of {}:", self.path.display());
        for l in shown {
            out.push_str("\n  ");
            out.push_str(l);
        }
        out
    }
}

/// A command line for messages: `a b c`.
pub(crate) fn show_argv(argv: &[String]) -> String {
    argv.join(" ")
}
