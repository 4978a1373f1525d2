//! Containment: every resource's processes in a cgroup (v2) of their own.
//!
//! A process group is not a container: a worker that calls `setsid` (a
//! double-forking daemon, `pg_ctl`'s postmaster, a script's background
//! job) leaves it, and `killpg` no longer reaches it. A cgroup cannot be
//! left by an unprivileged child, and `cgroup.kill` kills everything in it
//! in one step, forks in flight included. So when the host has a writable
//! cgroup2 hierarchy, the drivers start each resource's commands inside
//! `NODE_DIR/<resource>`, and stopping, the fence guard and the start-up
//! sweep kill the whole cgroup and wait until it is empty.
//!
//! Layout. The cgroup2 mount is found in `/proc/self/mountinfo` (under
//! systemd it is `/sys/fs/cgroup`; on hybrid hosts such as CI containers
//! it can be `/sys/fs/cgroup/unified`, or anywhere else). The node's
//! subtree is created beside the agent, inside the agent's own cgroup (from
//! `/proc/self/cgroup`): under systemd that is the agent's unit, which the
//! shipped unit delegates to it (`Delegate=yes`). Its name is
//! `understudy-<node>-<hash of the state directory>`, so two agents on one
//! host (a demo, a test) never share a subtree, and a restarted agent with
//! the same state directory finds its predecessor's. The subtree's path is
//! also written to `<state_dir>/cgroup`, so a restarted agent that runs in
//! another cgroup still sweeps the old one. No controller is enabled: only
//! the core files (`cgroup.procs`, `cgroup.kill`, `cgroup.freeze`,
//! `cgroup.events`) are used, so the "no internal processes" rule never
//! applies.
//!
//! A command enters its cgroup between fork and exec (it writes `0` to the
//! cgroup's `cgroup.procs`, opened before the fork), before it changes user,
//! so everything it forks is born inside.
//!
//! Where no writable cgroup2 exists, [`Cgroups::setup`] says why and the
//! drivers fall back to process groups; the agent says so at start-up and
//! in `status`.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The file in the state directory that names the node's cgroup subtree.
pub const CGROUP_FILE: &str = "cgroup";

/// How long stop, the guard and the sweep wait for a killed cgroup to empty.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// The node's cgroup subtree (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    node_dir: PathBuf,
}

impl Cgroups {
    /// Finds the writable cgroup2 hierarchy, creates the node's subtree in
    /// the agent's own cgroup and records it in `<state_dir>/cgroup`.
    /// `Err` says why containment falls back to process groups.
    pub fn setup(state_dir: &Path, node: &str) -> Result<Cgroups, String> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let (mount, root) = find_cgroup2(&mountinfo).ok_or("no writable cgroup2 hierarchy is mounted")?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_cgroup(&own).unwrap_or_else(|| "/".to_owned());
        let parent = join_cgroup(&mount, &root, &own);
        let state = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
        let name = format!(
            "understudy-{}-{:08x}",
            sanitize(node),
            fnv1a(state.as_os_str().as_encoded_bytes()) as u32
        );
        let node_dir = parent.join(name);
        fs::create_dir_all(&node_dir).map_err(|e| format!("cannot create the cgroup {}: {e}", node_dir.display()))?;
        // Prove it is usable: the core files must be there and writable.
        let probe = node_dir.join(".probe");
        match fs::create_dir(&probe) {
            Ok(()) => {
                let _ = fs::remove_dir(&probe);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_dir(&probe);
            }
            Err(e) => return Err(format!("cannot create cgroups under {}: {e}", node_dir.display())),
        }
        if !node_dir.join("cgroup.procs").exists() {
            return Err(format!("{} is not a cgroup2 directory", node_dir.display()));
        }
        let record = state_dir.join(CGROUP_FILE);
        let mut previous = recorded_dirs(state_dir);
        previous.retain(|p| p != &node_dir);
        let mut text = format!("{}\n", node_dir.display());
        // Keep an older subtree that still holds something, so the sweep
        // finds it even after this run rewrote the file.
        for p in previous.iter().filter(|p| p.exists()) {
            text.push_str(&format!("{}\n", p.display()));
        }
        crate::registry::write_private(&record, &text)
            .map_err(|e| format!("cannot record the cgroup in {}: {e}", record.display()))?;
        Ok(Cgroups { node_dir })
    }

    /// A tree rooted at `node_dir` (tests).
    pub fn at(node_dir: PathBuf) -> Cgroups {
        Cgroups { node_dir }
    }

    /// The node's subtree.
    pub fn node_dir(&self) -> &Path {
        &self.node_dir
    }

    /// The cgroup of `resource`.
    pub fn dir(&self, resource: &str) -> PathBuf {
        self.node_dir.join(sanitize(resource))
    }

    /// Creates `resource`'s cgroup (if needed) and opens its
    /// `cgroup.procs` for a child to enter before exec.
    pub(crate) fn entry(&self, resource: &str) -> Result<OwnedFd, String> {
        let dir = self.dir(resource);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create the cgroup {}: {e}", dir.display()))?;
        let procs = dir.join("cgroup.procs");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| format!("cannot open {}: {e}", procs.display()))?;
        Ok(OwnedFd::from(file))
    }

    /// Kills everything in `resource`'s cgroup, waits (asynchronously) until
    /// it is empty and removes it. A missing cgroup is already empty.
    pub async fn kill_resource(&self, resource: &str) -> Result<Vec<i32>, String> {
        let dir = self.dir(resource);
        let killed = kill(&dir).map_err(|e| format!("cannot kill the cgroup {}: {e}", dir.display()))?;
        let deadline = Instant::now() + KILL_WAIT;
        while populated(&dir) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "cgroup {} still holds processes {KILL_WAIT:?} after SIGKILL: {:?}",
                    dir.display(),
                    procs(&dir)
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        remove(&dir);
        Ok(killed)
    }

    /// Whether `resource`'s cgroup holds a process.
    pub fn resource_populated(&self, resource: &str) -> bool {
        populated(&self.dir(resource))
    }
}

/// The node subtrees recorded in `<state_dir>/cgroup` (current first).
pub fn recorded_dirs(state_dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string(state_dir.join(CGROUP_FILE))
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// `(mount point, root)` of the first read-write cgroup2 mount in a
/// mountinfo text.
pub fn find_cgroup2(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        if r.next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let root = unescape_mount(fields.get(3)?);
        let point = unescape_mount(fields.get(4)?);
        let opts = fields.get(5)?;
        opts.split(',').any(|o| o == "rw").then(|| (PathBuf::from(point), root))
    })
}

/// The v2 path in a `/proc/<pid>/cgroup` text (`0::/path`).
pub fn own_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| {
        // A cgroup whose process left it reads "… (deleted)".
        p.trim().trim_end_matches(" (deleted)").to_owned()
    })
}

/// The directory of cgroup `path` under a mount whose root is `root`.
fn join_cgroup(mount: &Path, root: &str, path: &str) -> PathBuf {
    let rel = if root == "/" {
        path
    } else {
        path.strip_prefix(root).unwrap_or("/")
    };
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

/// Mountinfo escapes spaces and the like as `\040` (octal).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A name usable as one path component.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether the cgroup at `dir` (or a descendant) holds a process. A
/// missing cgroup holds none.
pub fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(text) => text.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// The pids in the cgroup at `dir` and its descendants.
pub fn procs(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default();
    for child in child_cgroups(dir) {
        pids.extend(procs(&child));
    }
    pids
}

fn child_cgroups(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs everything in the cgroup at `dir` (descendants too) and
/// returns the pids that were in it. Uses `cgroup.kill` (Linux 5.14);
/// without it, freezes the cgroup, kills each process and thaws it, so
/// nothing can fork between the listing and the kill. Does not wait.
pub fn kill(dir: &Path) -> io::Result<Vec<i32>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let pids = procs(dir);
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        fs::write(&kill_file, "1")?;
        return Ok(pids);
    }
    let freeze = dir.join("cgroup.freeze");
    fs::write(&freeze, "1")?;
    let deadline = Instant::now() + Duration::from_secs(1);
    while !frozen(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let pids = procs(dir);
    for &pid in &pids {
        let _ = kill_pid(pid);
    }
    fs::write(&freeze, "0")?;
    Ok(pids)
}

fn kill_pid(pid: i32) -> nix::Result<()> {
    signal::kill(Pid::from_raw(pid), Signal::SIGKILL)
}

fn frozen(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|t| t.lines().any(|l| l.trim() == "frozen 1"))
}

/// Kills the cgroup at `dir` and waits (blocking, at most `wait`) until it
/// is empty, then removes it. For the fence guard and the start-up sweep,
/// which run before or outside the agent's event loop. Returns the pids
/// killed and whether it emptied in time.
pub fn kill_and_wait(dir: &Path, wait: Duration) -> (Vec<i32>, bool) {
    let killed = kill(dir).unwrap_or_default();
    let deadline = Instant::now() + wait;
    while populated(dir) {
        if Instant::now() >= deadline {
            return (killed, false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    remove(dir);
    (killed, true)
}

/// Removes an empty cgroup and its empty descendants (best effort).
pub fn remove(dir: &Path) {
    for child in child_cgroups(dir) {
        remove(&child);
    }
    let _ = fs::remove_dir(dir);
}

/// What the start-up sweep found and killed in this node's subtrees:
/// `(resource, pids)` for every cgroup that still held processes.
pub fn sweep(state_dir: &Path, current: Option<&Cgroups>) -> Vec<(String, Vec<i32>, bool)> {
    let mut dirs = recorded_dirs(state_dir);
    if let Some(c) = current
        && !dirs.contains(&c.node_dir)
    {
        dirs.push(c.node_dir.clone());
    }
    let mut found = Vec::new();
    for node_dir in dirs {
        for dir in child_cgroups(&node_dir) {
            let resource = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if populated(&dir) {
                let (pids, emptied) = kill_and_wait(&dir, KILL_WAIT);
                found.push((resource, pids, emptied));
            } else {
                remove(&dir);
            }
        }
        if current.is_none_or(|c| c.node_dir != node_dir) {
            remove(&node_dir);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_host() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(text),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_owned()))
        );
        let ro = "41 31 0:38 / /sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(ro), None, "a read-only mount is not usable");
        let spaced = "41 31 0:38 /a /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(spaced),
            Some((PathBuf::from("/mnt/cg two"), "/a".to_owned()))
        );
    }

    #[test]
    fn own_cgroup_and_its_directory() {
        let text = "4:memory:/x\n0::/system.slice/understudy.service\n";
        assert_eq!(own_cgroup(text).as_deref(), Some("/system.slice/understudy.service"));
        assert_eq!(
            join_cgroup(Path::new("/sys/fs/cgroup"), "/", "/system.slice/u.service"),
            PathBuf::from("/sys/fs/cgroup/system.slice/u.service")
        );
        assert_eq!(join_cgroup(Path::new("/cg"), "/", "/"), PathBuf::from("/cg"));
        assert_eq!(
            join_cgroup(Path::new("/cg"), "/lxc/c1", "/lxc/c1/inner"),
            PathBuf::from("/cg/inner")
        );
    }

    #[test]
    fn names_are_one_path_component() {
        assert_eq!(sanitize("web/../x"), "web_.._x");
        assert_eq!(sanitize("db-1_a.b"), "db-1_a.b");
    }
}
