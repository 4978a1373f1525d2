//! Namespace plumbing through iproute2's `ip`.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::exec::{run, run_ok};

/// Where `ip netns` keeps its namespace handles.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Where beds register themselves (creator pid, start time, temp dir).
pub(crate) const REGISTRY_DIR: &str = "/run/understudy-testbed";

/// The bound on one `ip` invocation (they take milliseconds).
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip ARGS…`, failing with the command line and its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = run_ok(&mut cmd, IP_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static NS_LOCK: Mutex<()> = Mutex::new(());

/// Serialises `ip netns add/del` within this process (a mutex) and between
/// processes (`flock` on a file in the registry directory). Concurrent first
/// uses of `ip netns add` race on making `/run/netns` a shared mount point,
/// which can stack mounts and hide namespace handles.
struct NsLock {
    _flock: Option<Flock<File>>,
    _guard: MutexGuard<'static, ()>,
}

fn ns_lock() -> NsLock {
    let guard = NS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let flock = fs::create_dir_all(REGISTRY_DIR)
        .ok()
        .and_then(|()| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(Path::new(REGISTRY_DIR).join(".lock"))
                .ok()
        })
        .and_then(|file| Flock::lock(file, FlockArg::LockExclusive).ok());
    NsLock {
        _flock: flock,
        _guard: guard,
    }
}

/// `ip netns add NAME`.
pub(crate) fn netns_add(name: &str) -> Result<()> {
    let _lock = ns_lock();
    ip(&["netns", "add", name]).map(drop)
}

/// Whether `ip netns` knows a namespace called `name`.
pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// `ip netns del NAME`; a namespace that is already gone is fine.
pub(crate) fn netns_del(name: &str) -> Result<()> {
    let _lock = ns_lock();
    if !netns_exists(name) {
        return Ok(());
    }
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !netns_exists(name) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The names in `/run/netns` (empty when there is none).
pub(crate) fn list_netns() -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

fn netns_pids(name: &str) -> Result<Vec<u32>> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "pids", name]);
    let out = run(&mut cmd, IP_TIMEOUT)?;
    if !out.status.success() {
        if !netns_exists(name) {
            return Ok(Vec::new());
        }
        return Err(Error::Command {
            command: format!("ip netns pids {name}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let me = std::process::id();
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|word| word.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .collect())
}

/// SIGKILLs every process whose network namespace is `name` (never this
/// process), until none is left or a few seconds have passed. Returns how
/// many were killed. Zombies are not listed (they have left their
/// namespaces), so a killed child that nobody reaps does not hold this up.
pub(crate) fn netns_sweep(name: &str) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let pids = netns_pids(name)?;
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("killing the processes in namespace {name}"),
                waited: Duration::from_secs(5),
                detail: format!("still there: {pids:?}"),
            });
        }
        for pid in pids {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                killed.insert(pid);
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}
