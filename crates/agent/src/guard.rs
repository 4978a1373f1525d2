//! The fence guard: a small separate process that kills the owned groups'
//! processes when the agent can no longer vouch for its lease.
//!
//! Why a separate process: an agent that is paused (SIGSTOP, a long GC-like
//! stall, a frozen VM thread) cannot stop anything, yet its resources keep
//! running. The guard is told the self-fencing deadline after every renewal
//! (`deadline MS`, CLOCK_MONOTONIC milliseconds), the cgroups of owned
//! resources (`cgroups C D`), the node's whole cgroup subtree
//! (`node-cgroup N`, killed only when the agent is gone), the process
//! groups of owned resources (`pgids A B C`), the systemd units of owned resources
//! (`units U V`), the mount points of owned filesystems (`mounts P Q`) and
//! the floating addresses of owned groups (`addresses A/N`). If the deadline
//! passes without a newer one, it SIGKILLs those groups and units, unmounts
//! those filesystems and removes those addresses — before the coordinator
//! can expire the lease and let another node take the disk and the address.
//! If the agent dies (its end of the pipe closes), it does the same and
//! exits. Each time it fires it appends a [`Report`] to a file in the
//! agent's state directory; the agent journals it when it next opens a
//! session (`understudy events` shows what the guard took away, and why).
//!
//! It runs in its own process group, so signals aimed at the agent's group
//! (a terminal's Ctrl-C, `kill -STOP -PGID`) do not reach it.
//!
//! Architecture invariant: the guard is synchronous (std, nix, iproute2,
//! systemctl) and does nothing but wait and take things away; it holds no
//! lock the agent could hold, and every command it runs is bounded in time.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::clock;

/// The agent's handle on its guard.
pub struct Guard {
    exe: std::path::PathBuf,
    report: std::path::PathBuf,
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    /// The last line sent for each command word, in the order a new guard
    /// must be told (what it holds first, the deadline last).
    last: Mutex<Vec<(&'static str, String)>>,
}

/// Whether the guard process still runs.
#[derive(Debug, PartialEq, Eq)]
pub enum GuardHealth {
    Running,
    /// It exited or was killed: how.
    Dead(String),
}

/// The order a restarted guard is told what its predecessor knew.
const WORDS: [&str; 9] = [
    "config",
    "session",
    "node-cgroup",
    "cgroups",
    "pgids",
    "units",
    "mounts",
    "addresses",
    "deadline",
];

impl Guard {
    /// Starts `exe fence-guard --report REPORT` (the `understudy` binary).
    pub fn spawn(exe: &Path, report: &Path) -> io::Result<Guard> {
        let (child, stdin) = Self::start(exe, report)?;
        Ok(Guard {
            exe: exe.to_path_buf(),
            report: report.to_path_buf(),
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            last: Mutex::new(Vec::new()),
        })
    }

    /// Whether the guard still runs (does not block).
    pub fn health(&self) -> GuardHealth {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.try_wait() {
            Ok(None) => GuardHealth::Running,
            Ok(Some(status)) => GuardHealth::Dead(status.to_string()),
            Err(e) => GuardHealth::Dead(format!("cannot wait for it: {e}")),
        }
    }

    /// Starts a new guard in place of a dead one and tells it everything
    /// the old one was told (what is held, then the deadline). Returns the
    /// new guard's pid.
    pub fn restart(&self) -> io::Result<u32> {
        let (child, stdin) = Self::start(&self.exe, &self.report)?;
        let pid = child.id();
        {
            let mut old = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let _ = old.wait();
            *old = child;
        }
        *self.stdin.lock().unwrap_or_else(|p| p.into_inner()) = stdin;
        let mut lines: Vec<String> = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            WORDS
                .iter()
                .filter_map(|w| last.iter().find(|(k, _)| k == w).map(|(_, l)| l.clone()))
                .collect()
        };
        for line in lines.drain(..) {
            self.write(&line)?;
        }
        Ok(pid)
    }

    fn start(exe: &Path, report: &Path) -> io::Result<(Child, ChildStdin)> {
        let mut child = Command::new(exe)
            .arg("fence-guard")
            .arg("--report")
            .arg(report)
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the fence guard {}: {e}", exe.display())))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the fence guard has no stdin pipe"))?;
        Ok((child, stdin))
    }

    fn write(&self, line: &str) -> io::Result<()> {
        let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush())
    }

    /// Sends a command and remembers it for a restarted guard. A guard
    /// that cannot be reached is dead: [`Guard::health`] says so and the
    /// agent replaces it (no log line per failed write).
    fn send(&self, line: &str) {
        let word = WORDS.iter().find(|w| line.split_whitespace().next() == Some(**w));
        if let Some(word) = word {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match last.iter_mut().find(|(k, _)| k == word) {
                Some(slot) => slot.1 = line.to_owned(),
                None => last.push((word, line.to_owned())),
            }
        }
        if let Err(e) = self.write(line) {
            tracing::debug!("cannot reach the fence guard: {e}");
        }
    }

    /// Kill owned processes if no newer deadline arrives before `deadline_ms`
    /// (CLOCK_MONOTONIC milliseconds).
    pub fn arm(&self, deadline_ms: u64) {
        self.send(&format!("deadline {deadline_ms}\n"));
    }

    /// Mount points of owned filesystems, replacing the previous list.
    pub fn set_mounts(&self, mounts: &[String]) {
        let list: Vec<String> = mounts.iter().map(|m| escape(m)).collect();
        self.send(&format!("mounts {}\n", list.join(" ")));
    }

    /// Floating addresses (`ADDR/PREFIX`) of owned groups, replacing the previous list.
    pub fn set_addresses(&self, addresses: &[String]) {
        self.send(&format!("addresses {}\n", addresses.join(" ")));
    }

    /// Systemd units of owned resources, replacing the previous list.
    pub fn set_units(&self, units: &[String]) {
        let list: Vec<String> = units.iter().map(|u| escape(u)).collect();
        self.send(&format!("units {}\n", list.join(" ")));
    }

    /// The cgroups of owned resources, replacing the previous list.
    pub fn set_cgroups(&self, cgroups: &[String]) {
        let list: Vec<String> = cgroups.iter().map(|c| escape(c)).collect();
        self.send(&format!("cgroups {}\n", list.join(" ")));
    }

    /// The node's whole cgroup subtree (clones included): killed when the
    /// agent is gone, never merely because a deadline passed.
    pub fn set_node_cgroup(&self, dir: &str) {
        self.send(&format!("node-cgroup {}\n", escape(dir)));
    }

    /// The cluster definition, so the guard can revoke the agent's session
    /// (`understudy revoke-session`) once it has taken everything away.
    pub fn set_config(&self, path: &Path) {
        self.send(&format!("config {}\n", escape(&path.to_string_lossy())));
    }

    /// The agent's current session lease.
    pub fn set_session(&self, lease: i64) {
        self.send(&format!("session {lease}\n"));
    }

    /// The agent ended its session itself (an orderly exit): nothing for
    /// the guard to revoke.
    pub fn clear_session(&self) {
        self.send("session -\n");
    }

    /// The process groups of owned resources, replacing the previous list.
    pub fn set_pgids(&self, pgids: &[i32]) {
        let list: Vec<String> = pgids.iter().map(i32::to_string).collect();
        self.send(&format!("pgids {}\n", list.join(" ")));
    }

    /// Pid of the guard process.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing stdin makes the guard kill what is left and exit; reap it.
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.stdin.take();
        drop(self.stdin.lock());
    }
}

/// What the guard must take away from this node when it fires.
#[derive(Default)]
struct Held {
    /// Cgroups of owned resources (everything they started, however it
    /// forked).
    cgroups: Vec<String>,
    /// Process groups of owned resources.
    pgids: Vec<i32>,
    /// Systemd units of owned resources.
    units: Vec<String>,
    /// Mount points of owned filesystems.
    mounts: Vec<String>,
    /// Floating addresses (`ADDR/PREFIX`) of owned groups.
    addresses: Vec<String>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.cgroups.is_empty()
            && self.pgids.is_empty()
            && self.units.is_empty()
            && self.mounts.is_empty()
            && self.addresses.is_empty()
    }

    /// Kills the processes and the units' processes, then unmounts the
    /// filesystems (they are no longer busy once their users are dead) and
    /// removes the addresses, so a taken-over disk and address are no longer
    /// used here; last it stops the units, so systemd does not restart them.
    fn fire(&mut self, why: &str, report: Option<&Path>, revoke: Option<(&str, i64)>) {
        // Cgroups first: nothing in them can fork away while they die.
        let (cgroups_killed, cgroups_emptied) = kill_cgroups(&self.cgroups);
        kill_all(&self.pgids);
        // A unit's processes may live in a mount namespace of their own
        // (PrivateTmp=, ProtectSystem=), out of reach of the scan below.
        let killed_units = systemctl_all("kill", &["--signal=SIGKILL"], &self.units, UNIT_KILL_WAIT);
        let mut users = Vec::new();
        let (mut unmounted, mut detached) = (Vec::new(), Vec::new());
        for m in &self.mounts {
            // Whatever still uses the disk (a database's backends are
            // process-group leaders of their own) dies before the unmount.
            users.extend(kill_users_of(Path::new(m)));
            // A plain unmount flushes and finishes now; if something survived
            // SIGKILL (stuck in the kernel on a hung disk) it is busy, and is
            // detached instead — no worse than leaving it mounted, and the
            // report says which it was.
            if nix::mount::umount2(m.as_str(), nix::mount::MntFlags::empty()).is_ok() {
                unmounted.push(m.clone());
            } else if nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH).is_ok() {
                detached.push(m.clone());
            }
        }
        let mut removed = Vec::new();
        let deadline = Instant::now() + ADDRESS_WAIT;
        for a in &self.addresses {
            if remove_address(a, deadline) {
                removed.push(a.clone());
            }
        }
        // `stop` also cancels a restart systemd may have queued after the kill.
        let stopped_units = systemctl_all("stop", &[], &self.units, UNIT_STOP_WAIT);
        // Everything is gone only if every cgroup emptied, every mount was
        // really unmounted and every address and unit went: only then may
        // the session end before its TTL (peers take over at once).
        let all_gone = cgroups_emptied
            && detached.is_empty()
            && unmounted.len() == self.mounts.len()
            && removed.len() == self.addresses.len()
            && stopped_units.len() == self.units.len();
        let session_revoked = match revoke {
            Some((config, lease)) if all_gone => revoke_session(config, lease).then_some(lease),
            _ => None,
        };
        let held = std::mem::take(self);
        let r = Report {
            at: clock::wall().as_millis(),
            why: why.to_string(),
            cgroups_killed,
            pgids: held.pgids,
            units_killed: killed_units,
            users_killed: users,
            unmounted,
            detached_lazily: detached,
            addresses_removed: removed,
            units_stopped: stopped_units,
            session_revoked,
        };
        eprintln!(
            "{} understudy fence-guard: {}",
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(r.at)),
            r.summary()
        );
        if let Some(path) = report
            && let Err(e) = r.append_to(path)
        {
            eprintln!("understudy fence-guard: cannot record this in {}: {e}", path.display());
        }
    }
}

/// What the guard did when it fired, as recorded for the agent's journal.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Wall-clock milliseconds since the Unix epoch.
    pub at: u64,
    pub why: String,
    /// Cgroups that still held processes, killed as a whole.
    #[serde(default)]
    pub cgroups_killed: Vec<String>,
    pub pgids: Vec<i32>,
    pub units_killed: Vec<String>,
    /// Processes killed for using an owned filesystem.
    pub users_killed: Vec<i32>,
    pub unmounted: Vec<String>,
    /// Mounts still busy after their users were killed (a hung disk):
    /// detached from the tree, released by the kernel once idle.
    #[serde(default)]
    pub detached_lazily: Vec<String>,
    pub addresses_removed: Vec<String>,
    pub units_stopped: Vec<String>,
    /// The agent's session, revoked after everything was taken away (the
    /// agent died): its groups were free at once, not a TTL later.
    #[serde(default)]
    pub session_revoked: Option<i64>,
}

impl Report {
    /// One line for logs and the journal: why, then what was taken away
    /// (only what there was).
    pub fn summary(&self) -> String {
        let parts = [
            list("killed cgroups", &self.cgroups_killed),
            list("killed process groups", &self.pgids),
            list("killed units", &self.units_killed),
            list("killed processes using owned filesystems", &self.users_killed),
            list("unmounted", &self.unmounted),
            list("detached lazily (still busy)", &self.detached_lazily),
            list("removed addresses", &self.addresses_removed),
            list("stopped units", &self.units_stopped),
            self.session_revoked.map(|l| format!("revoked session lease {l}")),
        ];
        let done: Vec<String> = parts.into_iter().flatten().collect();
        if done.is_empty() {
            format!("{}; nothing was left to take away", self.why)
        } else {
            format!("{}; {}", self.why, done.join(", "))
        }
    }

    /// The same things taken away for the same kind of reason (the time
    /// and the milliseconds in the reason aside).
    pub fn same_action(&self, other: &Report) -> bool {
        let kind = |why: &str| why.split(|c: char| c.is_ascii_digit()).next().unwrap_or("").to_owned();
        let strip = |r: &Report| Report {
            at: 0,
            why: kind(&r.why),
            ..r.clone()
        };
        strip(self) == strip(other)
    }

    fn append_to(&self, path: &Path) -> io::Result<()> {
        let mut line = serde_json::to_vec(self).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(&line)?;
        f.sync_all()
    }
}

fn list<T: std::fmt::Debug>(what: &str, items: &[T]) -> Option<String> {
    (!items.is_empty()).then(|| format!("{what} {items:?}"))
}

/// Takes the reports in `path` (the file is renamed away first, so a guard
/// firing meanwhile starts a new one). Lines that do not parse are skipped.
pub fn take_reports(path: &Path) -> io::Result<Vec<Report>> {
    let taken = path.with_extension("taken");
    match std::fs::rename(path, &taken) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let text = std::fs::read_to_string(&taken)?;
    let reports = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    std::fs::remove_file(&taken)?;
    Ok(reports)
}

/// How long the guard waits for `systemctl kill` of all units together
/// before it goes on to the mounts and addresses.
const UNIT_KILL_WAIT: Duration = Duration::from_secs(2);
/// How long the guard waits for `systemctl stop` of all units together.
const UNIT_STOP_WAIT: Duration = Duration::from_secs(5);

/// Runs `systemctl --no-ask-password VERB ARGS UNIT` for every unit at once
/// (the `systemctl` the drivers use, `$UNDERSTUDY_SYSTEMCTL` included) and
/// waits for them together, at most `wait`; a call still running then is
/// killed. Returns the units whose call succeeded.
fn systemctl_all(verb: &str, args: &[&str], units: &[String], wait: Duration) -> Vec<String> {
    let program = understudy_drivers::systemd::systemctl_program();
    let mut calls: Vec<(&String, Child)> = units
        .iter()
        .filter_map(|u| {
            Command::new(&program)
                .arg("--no-ask-password")
                .arg(verb)
                .args(args)
                .arg(u)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| eprintln!("understudy fence-guard: cannot run {}: {e}", program.display()))
                .ok()
                .map(|c| (u, c))
        })
        .collect();
    let deadline = Instant::now() + wait;
    let mut ok = Vec::new();
    while !calls.is_empty() {
        calls.retain_mut(|(unit, child)| match child.try_wait() {
            Ok(Some(status)) => {
                if status.success() {
                    ok.push((*unit).clone());
                } else {
                    eprintln!("understudy fence-guard: systemctl {verb} {unit} failed: {status}");
                }
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        if Instant::now() >= deadline {
            for (unit, child) in &mut calls {
                eprintln!("understudy fence-guard: systemctl {verb} {unit} did not finish in {wait:?}");
                let _ = child.kill();
                let _ = child.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ok
}

/// How long the guard gives `ip` for all the addresses together.
const ADDRESS_WAIT: Duration = Duration::from_secs(2);

/// Removes `addr` (`ADDR/PREFIX`) from whichever interface carries it,
/// giving up at `deadline`. An emergency backstop, so it uses iproute2
/// rather than a netlink client. True when it was removed somewhere.
fn remove_address(addr: &str, deadline: Instant) -> bool {
    let ip = addr.split('/').next().unwrap_or(addr);
    let Some(out) = run_bounded(Command::new("ip").args(["-o", "addr", "show", "to", ip]), deadline) else {
        return false;
    };
    let mut removed = false;
    for line in out.lines() {
        // "2: eth0    inet 10.0.0.100/24 scope global eth0 ..."
        if let Some(dev) = line.split_whitespace().nth(1) {
            removed |= run_bounded(
                Command::new("ip").args(["addr", "del", addr, "dev", dev.trim_end_matches(':')]),
                deadline,
            )
            .is_some();
        }
    }
    removed
}

/// Runs `cmd` until `deadline`; kills it if it runs over. Its standard
/// output when it exited 0, else `None`.
fn run_bounded(cmd: &mut Command, deadline: Instant) -> Option<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("understudy fence-guard: cannot run {cmd:?}: {e}"))
        .ok()?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut so) = child.stdout.take() {
                    let _ = io::Read::read_to_string(&mut so, &mut out);
                }
                return status.success().then_some(out);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                eprintln!("understudy fence-guard: {cmd:?} did not finish in time; killed");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The guard's main loop (`understudy fence-guard`), recording what it does
/// in `report`. Returns when the agent is gone.
pub fn run(report: Option<&Path>) -> io::Result<()> {
    let stdin = io::stdin();
    let mut deadline: Option<u64> = None;
    let mut held = Held::default();
    let mut node_cgroup: Option<String> = None;
    let mut config: Option<String> = None;
    let mut session: Option<i64> = None;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let now = clock::mono().as_millis();
        if let Some(d) = deadline
            && now >= d
            && !held.is_empty()
        {
            held.fire(
                &format!("lease deadline passed {} ms ago without renewal", now - d),
                report,
                None,
            );
        }
        let wait_ms = match deadline {
            Some(d) if !held.is_empty() => d.saturating_sub(now).clamp(1, 1_000),
            _ => 1_000,
        };
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(io::Error::other(format!("poll: {e}"))),
        }
        let n = match nix::unistd::read(&stdin, &mut chunk) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::other(format!("read: {e}"))),
        };
        if n == 0 {
            // Everything the agent started dies with it, clones included:
            // the node's whole subtree joins what is held.
            if let Some(dir) = node_cgroup.take()
                && understudy_drivers::cgroup::populated(Path::new(&dir))
            {
                held.cgroups.push(dir);
            }
            let revoke = config.as_deref().zip(session);
            if !held.is_empty() || revoke.is_some() {
                held.fire("the agent is gone", report, revoke);
            }
            return Ok(());
        }
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let mut words = line.split_whitespace();
            match words.next() {
                Some("deadline") => deadline = words.next().and_then(|w| w.parse().ok()),
                Some("cgroups") => held.cgroups = words.map(unescape).collect(),
                Some("node-cgroup") => node_cgroup = words.next().map(unescape),
                Some("config") => config = words.next().map(unescape),
                Some("session") => session = words.next().and_then(|w| w.parse().ok()),
                Some("pgids") => held.pgids = words.filter_map(|w| w.parse().ok()).collect(),
                Some("units") => held.units = words.map(unescape).collect(),
                Some("mounts") => held.mounts = words.map(unescape).collect(),
                Some("addresses") => held.addresses = words.map(str::to_string).collect(),
                _ => {}
            }
        }
    }
}

/// Paths travel space-separated; a space inside one is sent as `%20`, a `%` as `%25`.
fn escape(path: &str) -> String {
    path.replace('%', "%25").replace(' ', "%20")
}

fn unescape(word: &str) -> String {
    word.replace("%20", " ").replace("%25", "%")
}

/// How long the guard lets the scan for a mount's holders run.
const HOLDER_SCAN_WAIT: Duration = Duration::from_secs(2);
/// How long the guard waits for a mount's killed holders to vanish before
/// it unmounts.
const HOLDER_KILL_WAIT: Duration = Duration::from_secs(2);

/// SIGKILLs every process of this mount namespace that holds the filesystem
/// mounted at `mountpoint` — the `fs` driver's own holder scan
/// ([`understudy_drivers::fs::holders::find`]: working directory, root,
/// executable, open files on the mount, mapped files), so the guard and the
/// driver's stop take away the same set — except the guard itself and pid
/// 1, then waits (at most [`HOLDER_KILL_WAIT`]) for them to vanish. The
/// scan runs on a thread of its own, bounded by [`HOLDER_SCAN_WAIT`] (it
/// may block on a hung disk). Returns the pids killed.
fn kill_users_of(mountpoint: &Path) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let Some(holders) = bounded(HOLDER_SCAN_WAIT, {
        let mp = mountpoint.to_path_buf();
        move || understudy_drivers::fs::holders::find(&mp)
    }) else {
        eprintln!(
            "understudy fence-guard: the scan for processes holding {} did not finish in {HOLDER_SCAN_WAIT:?}",
            mountpoint.display()
        );
        return Vec::new();
    };
    let killed: Vec<_> = holders
        .into_iter()
        .filter(|h| h.pid != me && h.pid > 1 && h.signal(Signal::SIGKILL).is_ok())
        .collect();
    let deadline = Instant::now() + HOLDER_KILL_WAIT;
    while killed.iter().any(|h| h.alive()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.into_iter().map(|h| h.pid).collect()
}

/// Runs `f` on a thread of its own and waits at most `wait` for its result;
/// `None` if it did not finish (the thread is left behind).
fn bounded<T: Send + 'static>(wait: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("us-guard-scan".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| eprintln!("understudy fence-guard: cannot start a thread: {e}"))
        .ok()?;
    rx.recv_timeout(wait).ok()
}

/// How long the guard waits, in all, for killed cgroups to empty.
const CGROUP_WAIT: Duration = Duration::from_secs(2);

/// Kills every cgroup in `dirs` that holds processes (all at once, then
/// waits for them together, at most [`CGROUP_WAIT`]); returns those.
fn kill_cgroups(dirs: &[String]) -> (Vec<String>, bool) {
    use understudy_drivers::cgroup;
    let held: Vec<&String> = dirs.iter().filter(|d| cgroup::populated(Path::new(d))).collect();
    for d in &held {
        if let Err(e) = cgroup::kill(Path::new(d)) {
            eprintln!("understudy fence-guard: cannot kill the cgroup {d}: {e}");
        }
    }
    let deadline = Instant::now() + CGROUP_WAIT;
    let mut all = true;
    for d in &held {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, emptied) = cgroup::kill_and_wait(Path::new(d), left);
        if !emptied {
            all = false;
            eprintln!("understudy fence-guard: the cgroup {d} still holds processes after SIGKILL");
        }
    }
    (held.into_iter().cloned().collect(), all)
}

/// How long the guard gives `understudy revoke-session`.
const REVOKE_WAIT: Duration = Duration::from_secs(2);

/// Revokes the dead agent's session lease through `understudy
/// revoke-session` (this very binary), bounded in time. True when it did.
fn revoke_session(config: &str, lease: i64) -> bool {
    let Ok(exe) = std::env::current_exe() else {
        return false;
    };
    let deadline = Instant::now() + REVOKE_WAIT;
    run_bounded(
        Command::new(exe)
            .arg("revoke-session")
            .arg("--config")
            .arg(config)
            .arg("--lease")
            .arg(lease.to_string()),
        deadline,
    )
    .is_some()
}

fn kill_all(pgids: &[i32]) {
    for &pgid in pgids {
        if pgid > 1 {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::PathBuf;

    use super::*;

    /// A tmpfs on a temporary directory and the processes a test started
    /// on it; dropping it (also when the test panics) kills and reaps them
    /// and unmounts the tmpfs. Needs root, like the `fs` driver's tests.
    struct Tmpfs {
        _dir: tempfile::TempDir,
        mp: PathBuf,
        children: Vec<Child>,
    }

    impl Tmpfs {
        fn new() -> Tmpfs {
            let dir = tempfile::Builder::new().prefix("understudy-guard-").tempdir().unwrap();
            let mp = std::fs::canonicalize(dir.path()).unwrap().join("mnt");
            std::fs::create_dir(&mp).unwrap();
            let none: Option<&str> = None;
            nix::mount::mount(Some("tmpfs"), &mp, Some("tmpfs"), nix::mount::MsFlags::empty(), none).unwrap();
            Tmpfs {
                _dir: dir,
                mp,
                children: Vec::new(),
            }
        }

        fn spawn(&mut self, cmd: &mut Command) -> i32 {
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let pid = i32::try_from(child.id()).unwrap();
            self.children.push(child);
            pid
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
            if nix::mount::umount2(&self.mp, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(&self.mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !f() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn comm(pid: i32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The guard kills what the `fs` driver's stop would: here a program
    /// run from the mount (only its executable and mappings are there), an
    /// open file and a working directory; a process elsewhere survives, and
    /// the mount then unmounts plainly (not lazily).
    #[test]
    fn kill_users_of_kills_every_holder_the_fs_driver_finds() {
        let mut t = Tmpfs::new();
        let mp = t.mp.clone();
        let sleep = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("sleep");
        let copy = mp.join("us-sleep");
        std::fs::copy(sleep, &copy).unwrap();
        std::fs::write(mp.join("held"), b"x").unwrap();

        let exe = t.spawn(Command::new(&copy).arg("300").current_dir("/"));
        let fd = t.spawn(
            Command::new("sh")
                .args(["-c", "exec 3<\"$1\"; exec sleep 300", "sh"])
                .arg(mp.join("held"))
                .current_dir("/"),
        );
        let cwd = t.spawn(Command::new("sleep").arg("300").current_dir(&mp));
        let bystander = t.spawn(Command::new("sleep").arg("300").current_dir("/"));
        assert!(wait_until(Duration::from_secs(5), || {
            comm(exe) == "us-sleep" && comm(fd) == "sleep" && comm(cwd) == "sleep" && comm(bystander) == "sleep"
        }));

        let mut killed = kill_users_of(&mp);
        killed.sort_unstable();
        let mut want = vec![exe, fd, cwd];
        want.sort_unstable();
        assert_eq!(killed, want);
        for c in &mut t.children[..3] {
            let status = c.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(Signal::SIGKILL as i32)
            );
        }
        assert_eq!(t.children[3].try_wait().unwrap(), None, "the bystander survives");
        nix::mount::umount2(&mp, nix::mount::MntFlags::empty()).unwrap();
        assert!(kill_users_of(&mp).is_empty(), "nothing mounted there any more");
    }
}
