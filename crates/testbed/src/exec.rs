//! Running processes: entering a namespace at exec, bounded runs, tracked
//! processes and signal helpers.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// How long a process may take to disappear after SIGKILL before we report it.
const REAP_BOUND: Duration = Duration::from_secs(10);

/// Opens `/run/netns/<name>`, the handle `setns(2)` takes.
pub(crate) fn open_netns(name: &str) -> Result<File> {
    let path = Path::new("/run/netns").join(name);
    File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))
}

/// Makes `cmd` join the network namespace `ns` in the child, right before
/// `exec`.
#[allow(unsafe_code)]
pub(crate) fn enter_netns_at_exec(cmd: &mut Command, ns: File) {
    // SAFETY: the closure runs in the forked child between fork and exec,
    // where only async-signal-safe work is allowed. It makes one raw system
    // call (setns(2)) on a file descriptor that was opened in the parent and
    // is owned by the closure; it allocates nothing and takes no lock (an
    // `io::Error` built from an errno is a plain value, no allocation).
    unsafe {
        cmd.pre_exec(move || setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
    }
}

/// Joins the network namespace `ns` on the calling thread only.
pub(crate) fn enter_netns_on_this_thread(ns: &File, name: &str) -> Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::errno(format!("setns into {name}"), e))
}

/// The command line of `cmd`, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn read_to_channel(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error just ends the capture; what was read is kept.
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// SIGKILLs `pid` and, if it leads one, its process group. Only call this
/// for a child that has not been reaped yet (so the pid cannot have been
/// reused).
fn kill_child_and_group(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    // ESRCH for the group just means the child is not a group leader.
    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
}

/// Polls `child` until it exits or `deadline` passes.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with stdin from `/dev/null` and captured
/// stdout/stderr, waiting at most `timeout`. On timeout the process (and its
/// process group, if it leads one — commands from [`crate::Host::command`]
/// do) is SIGKILLed and reaped and [`Error::Timeout`] returned, with what it
/// had written to stderr. A non-zero exit is *not* an error here; see
/// [`run_ok`].
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let command = describe(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    let out = read_to_channel(child.stdout.take());
    let err = read_to_channel(child.stderr.take());
    let status =
        wait_until(&mut child, Instant::now() + timeout).map_err(|e| Error::io(format!("wait for `{command}`"), e))?;
    let status = match status {
        Some(status) => status,
        None => {
            kill_child_and_group(child.id());
            let _ = wait_until(&mut child, Instant::now() + REAP_BOUND);
            let stderr = err.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
            return Err(Error::Timeout {
                what: format!("`{command}`"),
                waited: timeout,
                detail: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
    };
    // The pipes close when the process exits, unless it left children
    // holding them; do not wait forever for those.
    let stdout = out.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    let stderr = err.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

/// [`run`], and a non-zero exit becomes [`Error::Command`] carrying the
/// command line and its stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        Err(Error::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr,
        })
    }
}

fn to_pid(pid: u32) -> Result<Pid> {
    i32::try_from(pid)
        .map(Pid::from_raw)
        .map_err(|_| Error::Invalid(format!("pid {pid} out of range")))
}

/// Sends SIGSTOP to `pid` (one process; use [`Process::pause`] for a whole
/// process group).
pub fn pause(pid: u32) -> Result<()> {
    kill(to_pid(pid)?, Signal::SIGSTOP).map_err(|e| Error::errno(format!("SIGSTOP {pid}"), e))
}

/// Sends SIGCONT to `pid`.
pub fn resume(pid: u32) -> Result<()> {
    kill(to_pid(pid)?, Signal::SIGCONT).map_err(|e| Error::errno(format!("SIGCONT {pid}"), e))
}

/// A process started through the bed ([`crate::Host::spawn`]). It leads its
/// own process group (commands from [`crate::Host::command`] do), and the
/// bed SIGKILLs that group and reaps it when the bed is dropped.
///
/// Cheap to clone: clones share the one child handle, so the process is
/// reaped exactly once and a reaped pid is never signalled again.
#[derive(Clone, Debug)]
pub struct Process {
    inner: Arc<ProcessInner>,
}

#[derive(Debug)]
struct ProcessInner {
    pid: u32,
    label: String,
    child: Mutex<Child>,
}

impl Process {
    pub(crate) fn new(child: Child, label: String) -> Self {
        Process {
            inner: Arc::new(ProcessInner {
                pid: child.id(),
                label,
                child: Mutex::new(child),
            }),
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.inner.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pid (also the process group id).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The command line it was started with.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Its exit status if it has exited (reaping it), without waiting.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.child()
            .try_wait()
            .map_err(|e| Error::io(format!("wait for {}", self.inner.label), e))
    }

    /// Whether it is known to have exited, without blocking on another
    /// thread that is waiting for it (then it counts as running).
    pub(crate) fn known_exited(&self) -> bool {
        match self.inner.child.try_lock() {
            Ok(mut child) => matches!(child.try_wait(), Ok(Some(_))),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                matches!(p.into_inner().try_wait(), Ok(Some(_)))
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    /// Whether it is still running (a stopped process is running).
    pub fn is_running(&self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        wait_until(&mut self.child(), Instant::now() + timeout)
            .map_err(|e| Error::io(format!("wait for {}", self.inner.label), e))
    }

    /// Sends `signal` to its process group. Fails with [`Error::Exited`] if
    /// it has already exited (its pid may be reused; nothing is sent).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let mut child = self.child();
        let status = child
            .try_wait()
            .map_err(|e| Error::io(format!("wait for {}", self.inner.label), e))?;
        if let Some(status) = status {
            return Err(Error::Exited {
                what: self.inner.label.clone(),
                status: status.to_string(),
                detail: String::new(),
            });
        }
        let pid = to_pid(self.inner.pid)?;
        match killpg(pid, signal) {
            Ok(()) => Ok(()),
            // Not a group leader (started without `Host::command`).
            Err(Errno::ESRCH) => kill(pid, signal),
            Err(e) => Err(e),
        }
        .map_err(|e| Error::errno(format!("{signal} to {}", self.inner.label), e))
    }

    /// SIGSTOPs its process group.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONTs its process group.
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGKILLs its process group and reaps it. Returns the exit status
    /// (also when it had exited already).
    pub fn kill(&self) -> Result<ExitStatus> {
        let mut child = self.child();
        let waited = child
            .try_wait()
            .map_err(|e| Error::io(format!("wait for {}", self.inner.label), e))?;
        if let Some(status) = waited {
            return Ok(status);
        }
        kill_child_and_group(self.inner.pid);
        self.reap(&mut child)
    }

    /// Sends SIGTERM to its process group, waits up to `grace`, then
    /// SIGKILLs it. Returns the exit status.
    pub fn terminate(&self, grace: Duration) -> Result<ExitStatus> {
        match self.signal(Signal::SIGTERM) {
            Ok(()) => {}
            Err(Error::Exited { .. }) => return self.kill(),
            Err(e) => return Err(e),
        }
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill()
    }

    fn reap(&self, child: &mut Child) -> Result<ExitStatus> {
        match wait_until(child, Instant::now() + REAP_BOUND) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(Error::Timeout {
                what: format!("reaping {} (pid {})", self.inner.label, self.inner.pid),
                waited: REAP_BOUND,
                detail: String::new(),
            }),
            Err(e) => Err(Error::io(format!("wait for {}", self.inner.label), e)),
        }
    }
}
