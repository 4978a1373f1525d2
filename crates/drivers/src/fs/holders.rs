//! The holder scan: which processes hold a mount.
//!
//! A native `/proc` scan (not `fuser`/`lsof`: no extra packages, no output
//! parsing, and it tells *what* each process holds). A process holds the
//! mount when its `cwd`, `root` or `exe` lies under the mountpoint on the
//! mount's device, an open file descriptor is on this very mount (`mnt_id`
//! in `/proc/<pid>/fdinfo/<fd>`; a chrooted process's descriptors are
//! checked whatever their path), or `/proc/<pid>/maps` maps a file under the
//! mountpoint from its device. Processes in another mount namespace hold
//! their own copy of the mount and are left out. Processes are identified
//! by pid *and* start time, so a reused pid is never signalled.
//!
//! The `fs` driver's stop and the fence guard both use it ([`find`]), so
//! both take away the same set of processes. It is synchronous and reads
//! only `/proc`; a caller that must stay bounded runs it on a thread of its
//! own (a `stat` of a `/proc/<pid>/cwd` link on a hung disk may block).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::makedev;
use nix::unistd::Pid;

use super::mountinfo::{MountEntry, mountpoint_key, read_mountinfo, top_at, under};
use crate::procfs;

/// A process holding the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    /// Start time (clock ticks since boot): with the pid, the identity.
    pub start: u64,
    /// Its state (`/proc/<pid>/stat` field 3): `D` = stuck in the kernel.
    pub state: char,
    pub cmdline: String,
    /// What it holds: `cwd /srv/x`, `fd 3 → /srv/x/f`, `maps /srv/x/lib.so`.
    pub what: Vec<String>,
    /// A child of the scanning process still running the scanner's program:
    /// forked but not yet exec'd, holding copies of the scanner's own
    /// descriptors for an instant. The `fs` driver leaves it alone (exec
    /// closes them).
    pub unexeced_fork: bool,
}

impl Holder {
    pub(super) fn key(&self) -> (i32, u64) {
        (self.pid, self.start)
    }

    /// Still the same live (non-zombie) process.
    pub fn alive(&self) -> bool {
        procfs::stat(self.pid).is_some_and(|s| s.is_live() && s.start_time == self.start)
    }

    /// Sends `sig` if the pid still names the same process; `ESRCH` when it
    /// does not (it is gone, or the pid was reused).
    pub fn signal(&self, sig: Signal) -> Result<(), Errno> {
        if procfs::start_time(self.pid) != Some(self.start) {
            return Err(Errno::ESRCH);
        }
        kill(Pid::from_raw(self.pid), sig)
    }
}

pub(super) fn cmdline(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text: String = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if text.is_empty() {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        format!("[{}]", comm.trim())
    } else {
        text
    }
}

/// A `/proc` link target without the ` (deleted)` suffix.
pub(super) fn link_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned()
}

/// The `mnt_id` field of `/proc/<pid>/fdinfo/<fd>`.
pub(super) fn fd_mnt_id(pid: i32, fd: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `maj:min` in hex (as in `/proc/<pid>/maps`) to a device number.
pub(super) fn parse_hex_dev(s: &str) -> Option<u64> {
    let (a, b) = s.split_once(':')?;
    Some(makedev(
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// What process `pid` holds of `mount` (see the module docs).
pub(super) fn holdings(pid: i32, mount: &MountEntry) -> Vec<String> {
    let mp = mount.mountpoint.as_str();
    let proc_dir = format!("/proc/{pid}");
    let mut what = Vec::new();
    let on_dev = |link: &str| fs::metadata(format!("{proc_dir}/{link}")).is_ok_and(|m| m.dev() == mount.dev);
    let mut chrooted = false;
    for link in ["cwd", "root", "exe"] {
        let Ok(target) = fs::read_link(format!("{proc_dir}/{link}")) else {
            continue;
        };
        let path = link_path(&target);
        if link == "root" && path != "/" {
            chrooted = true;
        }
        if under(&path, mp) && on_dev(link) {
            what.push(format!("{link} {path}"));
        }
    }
    if let Ok(fds) = fs::read_dir(format!("{proc_dir}/fd")) {
        for fd in fds.flatten() {
            let name = fd.file_name().to_string_lossy().into_owned();
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let path = link_path(&target);
            if !path.starts_with('/') || !(chrooted || under(&path, mp)) {
                continue;
            }
            let ours = match fd_mnt_id(pid, &name) {
                Some(id) => id == mount.id,
                None => on_dev(&format!("fd/{name}")),
            };
            if ours {
                what.push(format!("fd {name} → {path}"));
            }
        }
    }
    if let Ok(maps) = fs::read_to_string(format!("{proc_dir}/maps")) {
        let mut seen = HashSet::new();
        for line in maps.lines() {
            // address perms offset dev inode path
            let mut rest = line;
            let mut fields = Vec::new();
            for _ in 0..5 {
                let t = rest.trim_start();
                let end = t.find(' ').unwrap_or(t.len());
                fields.push(&t[..end]);
                rest = &t[end..];
            }
            let path = link_path(Path::new(rest.trim()));
            if fields.len() == 5
                && parse_hex_dev(fields[3]) == Some(mount.dev)
                && under(&path, mp)
                && seen.insert(path.clone())
            {
                what.push(format!("maps {path}"));
            }
        }
    }
    what
}

/// Every process of this mount namespace holding the filesystem mounted at
/// `mountpoint` (the top one, when several are stacked there), the caller
/// included. Empty when nothing is mounted there (or the mount table cannot
/// be read). Symlinks in `mountpoint` are resolved as the kernel shows the
/// mount.
pub fn find(mountpoint: &Path) -> Vec<Holder> {
    let mp = mountpoint_key(&mountpoint.to_string_lossy());
    let Ok(entries) = read_mountinfo() else {
        return Vec::new();
    };
    match top_at(&entries, &mp) {
        Some(mount) => find_holders(mount),
        None => Vec::new(),
    }
}

/// Every process in our mount namespace holding `mount`.
///
/// A process the agent has just forked (to run any command, for any
/// resource) holds copies of *all* the agent's descriptors until it execs —
/// including, say, a monitor's probe file open on this mount at that moment.
/// Such a fork (parent: the agent, program: the agent's) is reported but
/// never signalled: killing it would kill an unrelated command before it
/// starts, and it lets go by itself at exec (stop retries on `EBUSY`).
pub(super) fn find_holders(mount: &MountEntry) -> Vec<Holder> {
    let my_ns = fs::read_link("/proc/self/ns/mnt").ok();
    let me = own_pid();
    let my_exe = fs::read_link("/proc/self/exe").ok();
    let mut holders = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return holders;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let (Some(mine), Ok(theirs)) = (&my_ns, fs::read_link(format!("/proc/{pid}/ns/mnt")))
            && *mine != theirs
        {
            continue;
        }
        let what = holdings(pid, mount);
        if what.is_empty() {
            continue;
        }
        let Some(st) = procfs::stat(pid) else { continue };
        if !st.is_live() {
            continue;
        }
        let unexeced_fork = pid != me
            && parent_pid(pid) == Some(me)
            && my_exe.is_some()
            && fs::read_link(format!("/proc/{pid}/exe")).ok() == my_exe;
        holders.push(Holder {
            pid,
            start: st.start_time,
            state: st.state,
            cmdline: cmdline(pid),
            what,
            unexeced_fork,
        });
    }
    holders
}

/// Field 4 of `/proc/<pid>/stat`: the parent's pid.
pub(super) fn parent_pid(pid: i32) -> Option<i32> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

pub(super) fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(i32::MAX)
}

/// Waits up to `timeout` until none of `holders` is alive.
pub(super) async fn wait_gone(holders: &[&Holder], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if holders.iter().all(|h| !h.alive()) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse_hex_dev("fd:01"), Some(makedev(0xfd, 1)));
        assert_eq!(link_path(Path::new("/a/b (deleted)")), "/a/b");
    }
}
