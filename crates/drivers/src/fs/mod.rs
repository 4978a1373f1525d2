//! The `fs` driver: a shared filesystem (F3) — a block device every node of
//! the group can reach, mounted on exactly one of them at a time.
//!
//! # Operations
//!
//! - **start**
//!   1. Refuses without a fencing token (`ctx.token` is `None` for clones):
//!      a shared disk is mounted only by its group's owner.
//!   2. Resolves `device`: a path (symlinks such as `/dev/disk/by-id/…` are
//!      followed), `UUID=…` or `LABEL=…` (through `/dev/disk/by-uuid|by-label`,
//!      else `blkid -c /dev/null -U|-L`, which probes the devices without
//!      trusting blkid's cache). It must be a block device.
//!   3. Reads `/proc/self/mountinfo`. If the device is already mounted at the
//!      mountpoint, start skips to step 7 (idempotent). If the mountpoint holds
//!      another filesystem, or the device is mounted somewhere else, start
//!      fails and says where.
//!   4. Unless `fsck = false`, runs `fsck -p -T -t <fstype> <device>` (output
//!      appended to `<state_dir>/logs/<resource>.log`, `LC_ALL=C`). Exit status
//!      0 (clean) and 1 (errors corrected) go on; 2 (reboot advised; 3 = 1|2)
//!      goes on with a warning in the agent's log — the advice is about a
//!      mounted root filesystem, which this is not; 4 and above (uncorrected
//!      errors, operational error, usage, cancelled) refuse to mount, quoting
//!      fsck's last output lines. A signal or a timeout refuses too (fsck's
//!      process group is killed).
//!   5. Creates the mountpoint directory if missing.
//!   6. Mounts with `mount(2)` (never the `mount` program). `options` are
//!      translated: `ro`/`rw`, `nosuid`/`suid`, `nodev`/`dev`,
//!      `noexec`/`exec`, `sync`/`async`, `dirsync`, `noatime`/`atime`,
//!      `nodiratime`/`diratime`, `relatime`/`norelatime`,
//!      `strictatime`/`nostrictatime`, `lazytime`/`nolazytime`,
//!      `mand`/`nomand`, `iversion`/`noiversion`, `silent`/`loud` become
//!      `MsFlags`; `defaults` and fstab-only words (`auto`, `noauto`, `user`,
//!      `nouser`, `users`, `owner`, `group`, `nofail`, `_netdev`, `comment=…`,
//!      `x-…`) are dropped; everything else is passed to the filesystem as its
//!      data string (`errors=remount-ro,data=ordered`, …).
//!   7. Checks and records the **fencing marker** (below); a newer token
//!      there refuses (and a fresh mount is undone).
//!   8. Creates `directories` (relative to the mountpoint), gives each the
//!      owner, group and mode it asks for (every start, so a change by hand
//!      is undone; only the last component, not parents it had to create),
//!      and removes probe files a crashed monitor may have left.
//!
//!   The whole start is bounded by `ctx.timeout`. Every step that may block
//!   on the disk (mount, marker, directories, unmount) runs on its own thread
//!   and is awaited with a timeout; a thread stuck in the kernel is left
//!   behind rather than blocking the agent. A `mount(2)` that times out may
//!   still complete later: start reports it, and the agent's stop will
//!   unmount it. If anything fails after a fresh mount, start unmounts again
//!   (a slice of the timeout, at most 1 s, is kept for that), so a failed
//!   start leaves nothing mounted.
//!
//! - **stop** does nothing when the filesystem is not mounted at the
//!   mountpoint (if the device is mounted elsewhere, that mount is not ours
//!   and is left alone with a warning). Otherwise, until the mount is gone or
//!   the timeout is spent (first, the monitor's I/O probe is stopped: one
//!   in flight gets SIGKILL and is waited for, up to a third of the time, and
//!   none starts until stop returns):
//!   1. finds the processes holding the mount with the [`holders`] scan
//!      (`cwd`, `root` or `exe` under the mountpoint, an open file on this
//!      very mount, a mapped file; this mount namespace only; pid and start
//!      time, so a reused pid is never signalled). The fence guard uses the
//!      same scan;
//!   2. sends them SIGTERM, waits up to 5 s (at most a third of the time
//!      left) for them to exit, SIGKILLs the rest and waits for them (up to
//!      5 s). A process that already had SIGKILL in an earlier round gets it
//!      again at once. The agent itself, pid 1, and forks of the agent that
//!      have not exec'd yet (they hold copies of the agent's descriptors for
//!      an instant; see `find_holders`) are never signalled;
//!   3. calls `umount2(mountpoint, 0)`; on `EBUSY` it scans again and retries
//!      every 100 ms.
//!
//!   If the mount is still busy when the time is up, stop fails **loudly**
//!   with every holder it can find — pid, command line, process state
//!   (`D` = stuck in the kernel, typically on a hung disk), whether it
//!   survived SIGKILL, and what it holds — plus any filesystem mounted below
//!   the mountpoint. It **never unmounts lazily** (`MNT_DETACH`), not even as
//!   a last resort: a detached mount hides its writers but keeps the
//!   filesystem live and writable, so another node mounting the disk after
//!   such a "successful" stop would corrupt it. A failed stop is the honest
//!   answer: the agent retries it (forced) and, if it fails again, records
//!   that it needs an operator. `MNT_FORCE` is not used either (it only
//!   aborts requests on network filesystems). A `umount2` that blocks (hung
//!   disk) is bounded like the rest. Of the operation's time, up to 1 s (a
//!   fifth at most) is kept back from the killing, half of it still usable
//!   by the last unmount attempt, the rest for the final scan that names the
//!   holders.
//!
//! - **monitor** (bounded by `ctx.timeout`):
//!   - reads the mount table on a helper thread. `Failed` when the
//!     filesystem is not mounted at the mountpoint any more, when something
//!     else is mounted on top of it, or when a read-write filesystem has been
//!     remounted read-only (ext4 `errors=remount-ro`). An unmount behind the
//!     agent's back is a failure, not `Stopped`: the driver cannot tell an
//!     administrator's `umount` from a lost disk, and the agent treats both
//!     alike (restart or failover), which is right for a resource it
//!     believes it runs.
//!   - Otherwise an I/O probe, in a **child process** (`/bin/sh` running
//!     `dd conv=excl,fsync`, `cat` and `rm`, in its own process group, dying
//!     with the agent; see the `probe` module): creates
//!     `.understudy-probe-<pid>-<nonce>` with a random nonce, writes the
//!     nonce, fsyncs, reads it back, deletes the file (read-only mounts:
//!     lists the root directory instead). The agent itself never opens a
//!     file on the mount it guards, so a probe stuck on a hung disk is an
//!     ordinary holder stop can kill and name, never "the agent itself".
//!   - A probe that does not finish in time gives
//!     `Failed("I/O probe timed out after …")` and its process group gets
//!     SIGKILL. It may stay stuck in the kernel; until its group is gone,
//!     later monitors report `Failed` at once ("an earlier I/O probe … is
//!     still stuck") instead of piling up more stuck probes. Helper threads
//!     are plain detached `std` threads, never tokio's blocking pool, whose
//!     shutdown would wait for them.
//!
//! - **probe**: `Running` when the device is mounted at the mountpoint, else
//!   `Stopped` (also when the device is mounted elsewhere, logged as a
//!   warning: start will refuse that).
//!
//! After a successful start the resolved device (path, device number) is
//! remembered: stop, monitor and probe use it, so a stop still works when the
//! disk has vanished and `LABEL=` no longer resolves. Without it (agent
//! restarted) they resolve again; if that fails, whatever filesystem of the
//! configured `fstype` is mounted at the mountpoint counts as ours.
//!
//! # The fencing marker
//!
//! `<mountpoint>/.understudy-fence` records the highest fencing token under
//! which the filesystem was ever mounted:
//!
//! ```text
//! # understudy fencing marker: the highest fencing token that mounted this
//! # filesystem. A node holding an older token must not use it. Do not edit.
//! token=42
//! node=node1
//! group=g
//! resource=shared
//! time=2025-01-01T12:00:00Z
//! ```
//!
//! Lines are `key=value`; `#` lines and unknown keys are ignored; `token` is
//! required. After mounting (or finding the filesystem already mounted),
//! start reads it:
//!
//! - no marker, or a token lower than `ctx.token`: start writes a new marker
//!   (temp file `.understudy-fence.tmp`, fsync, rename over the marker, fsync
//!   the directory, so a crash leaves either the old or the new marker);
//! - the same token: nothing to write (unless the node differs, which cannot
//!   happen with unique tokens; it is rewritten then);
//! - a **newer** token: the node's ownership is stale (another node took the
//!   group over since). Start unmounts again (if it mounted) and fails: "the
//!   shared disk was last mounted under fencing token N by node X; this
//!   node's token M is older: refusing". A stale owner must never write to
//!   the disk;
//! - an unreadable or unparsable marker: refused the same way (nothing
//!   proves this node is not stale); an operator who knows better removes
//!   the file.
//!
//! Read-only mounts check the marker but cannot write it, and only check
//! that `directories` exist.
//!
//! The marker is defence in depth behind the lease protocol (the old owner's
//! resources are dead before a new owner can win the key). It cannot stop
//! what happens before it is read: `fsck -p` and the mount itself (journal
//! replay) write to the device. It catches a stale owner before any
//! application writes to the disk.
//!
//! # Modules
//!
//! - this one: the driver (start, stop, monitor, probe), mount options and
//!   the helper-thread wrapper for calls that may block;
//! - `probe`: the monitor's I/O probe in a child process, and the record of
//!   the one in flight;
//! - `mountinfo`: `/proc/self/mountinfo` parsed, and classified for one
//!   resource;
//! - `marker`: the fencing marker and the other steps after mounting
//!   (directories, leftover probe files);
//! - `fsck`: running fsck and what its exit status means;
//! - [`holders`]: the `/proc` scan for the processes holding a mount.

mod fsck;
pub mod holders;
mod marker;
mod mountinfo;
mod probe;

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs;
use std::hash::BuildHasher;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;
use understudy_core::spec::FsSpec;

use self::holders::{Holder, find_holders, own_pid, wait_gone};
pub use self::marker::MARKER;
use self::marker::{Marker, Settle, settle};
use self::mountinfo::{Device, Ident, MountEntry, MountState, mount_state, mountpoint_key, read_mountinfo, under};
use crate::spawn::KILL_WAIT;
use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

/// Prefix of the monitor's probe files.
const PROBE_PREFIX: &str = ".understudy-probe-";
/// How long stop waits after SIGTERM before SIGKILL (at most).
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Pause between unmount attempts while the mount is busy.
const UMOUNT_RETRY: Duration = Duration::from_millis(100);
/// How long blkid may take at most.
const BLKID_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much of an operation's time is kept for cleaning up.
const RESERVE: Duration = Duration::from_secs(1);

/// Mounts, checks and hands over one shared filesystem (see the module docs).
pub struct FsDriver {
    resource: String,
    spec: FsSpec,
    log_path: PathBuf,
    /// The device as resolved by the last successful resolution.
    device: Mutex<Option<Device>>,
    /// The monitor's I/O probe in flight, if any.
    probes: Arc<probe::Probes>,
    /// Serialises start and stop.
    op: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for FsDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsDriver")
            .field("resource", &self.resource)
            .field("device", &self.spec.device)
            .field("mountpoint", &self.spec.mountpoint)
            .finish_non_exhaustive()
    }
}

/// `mount(2)` flags and data string for `options`.
fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for o in options {
        let o = o.trim();
        let (flag, on) = match o {
            "ro" => (MsFlags::MS_RDONLY, true),
            "rw" => (MsFlags::MS_RDONLY, false),
            "nosuid" => (MsFlags::MS_NOSUID, true),
            "suid" => (MsFlags::MS_NOSUID, false),
            "nodev" => (MsFlags::MS_NODEV, true),
            "dev" => (MsFlags::MS_NODEV, false),
            "noexec" => (MsFlags::MS_NOEXEC, true),
            "exec" => (MsFlags::MS_NOEXEC, false),
            "sync" => (MsFlags::MS_SYNCHRONOUS, true),
            "async" => (MsFlags::MS_SYNCHRONOUS, false),
            "dirsync" => (MsFlags::MS_DIRSYNC, true),
            "noatime" => (MsFlags::MS_NOATIME, true),
            "atime" => (MsFlags::MS_NOATIME, false),
            "nodiratime" => (MsFlags::MS_NODIRATIME, true),
            "diratime" => (MsFlags::MS_NODIRATIME, false),
            "relatime" => (MsFlags::MS_RELATIME, true),
            "norelatime" => (MsFlags::MS_RELATIME, false),
            "strictatime" => (MsFlags::MS_STRICTATIME, true),
            "nostrictatime" => (MsFlags::MS_STRICTATIME, false),
            "lazytime" => (MsFlags::MS_LAZYTIME, true),
            "nolazytime" => (MsFlags::MS_LAZYTIME, false),
            "mand" => (MsFlags::MS_MANDLOCK, true),
            "nomand" => (MsFlags::MS_MANDLOCK, false),
            "iversion" => (MsFlags::MS_I_VERSION, true),
            "noiversion" => (MsFlags::MS_I_VERSION, false),
            "silent" => (MsFlags::MS_SILENT, true),
            "loud" => (MsFlags::MS_SILENT, false),
            "" | "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "owner" | "group" | "nofail"
            | "_netdev" => continue,
            _ if o.starts_with("x-") || o.starts_with("comment=") => continue,
            _ => {
                data.push(o);
                continue;
            }
        };
        flags.set(flag, on);
    }
    (flags, data.join(","))
}

/// A random hex nonce (std's per-instance random hash keys).
fn nonce() -> String {
    let a = RandomState::new().hash_one(std::process::id());
    let b = RandomState::new().hash_one(SystemTime::now());
    format!("{a:016x}{b:016x}")
}

/// Why a call on a helper thread gave no answer.
#[derive(Debug)]
enum BlockingError {
    TimedOut(Duration),
    Spawn(io::Error),
    /// The closure panicked.
    Lost,
}

impl std::fmt::Display for BlockingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockingError::TimedOut(t) => write!(f, "did not return within {t:?}"),
            BlockingError::Spawn(e) => write!(f, "cannot start a helper thread: {e}"),
            BlockingError::Lost => write!(f, "its helper thread panicked"),
        }
    }
}

/// Runs `f` on a new detached thread and waits up to `timeout` for its
/// result. On timeout the thread is left running (it may be stuck in the
/// kernel for good); nothing ever waits for it.
async fn run_blocking<T, F>(name: &str, timeout: Duration, f: F) -> Result<T, BlockingError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(BlockingError::Spawn)?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(BlockingError::Lost),
        Err(_) => Err(BlockingError::TimedOut(timeout)),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Where a system tool lives: the usual sbin/bin directories, else `PATH`.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

impl FsDriver {
    pub fn new(resource: &str, spec: &FsSpec, env: &DriverEnv) -> Result<Self, DriverError> {
        let bad = |message: String| DriverError::failed("configure", resource, message);
        if spec.device.trim().is_empty() {
            return Err(bad("`device` is empty".into()));
        }
        if !spec.mountpoint.starts_with('/') {
            return Err(bad(format!(
                "mount point `{}` is not an absolute path",
                spec.mountpoint
            )));
        }
        if mountpoint_key(&spec.mountpoint) == "/" {
            return Err(bad("the mount point cannot be `/`".into()));
        }
        if spec.fstype.trim().is_empty() {
            return Err(bad("`fstype` is empty".into()));
        }
        for d in &spec.directories {
            let p = Path::new(&d.path);
            if d.path.is_empty() || p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(bad(format!(
                    "directory `{}` must be relative to the mount point",
                    d.path
                )));
            }
            if d.mode.is_some_and(|m| m > 0o7777) {
                return Err(bad(format!("directory `{}` has an invalid mode", d.path)));
            }
        }
        Ok(FsDriver {
            resource: resource.to_owned(),
            spec: spec.clone(),
            log_path: env.state_dir.join("logs").join(format!("{resource}.log")),
            device: Mutex::new(None),
            probes: Arc::default(),
            op: tokio::sync::Mutex::new(()),
        })
    }

    /// The file that receives fsck's output.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    fn mountpoint(&self) -> String {
        mountpoint_key(&self.spec.mountpoint)
    }

    fn readonly(&self) -> bool {
        mount_options(&self.spec.options).0.contains(MsFlags::MS_RDONLY)
    }

    /// Resolves `device` to a block device.
    async fn resolve_device(&self, budget: Duration) -> Result<Device, String> {
        let spec = self.spec.device.trim();
        let path = if let Some(uuid) = spec.strip_prefix("UUID=") {
            self.lookup("/dev/disk/by-uuid", "-U", "UUID", uuid, budget).await?
        } else if let Some(label) = spec.strip_prefix("LABEL=") {
            self.lookup("/dev/disk/by-label", "-L", "LABEL", label, budget).await?
        } else {
            PathBuf::from(spec)
        };
        let canon = fs::canonicalize(&path).map_err(|e| format!("device {}: {e}", path.display()))?;
        let meta = fs::metadata(&canon).map_err(|e| format!("device {}: {e}", canon.display()))?;
        if !meta.file_type().is_block_device() {
            return Err(format!("{} is not a block device", canon.display()));
        }
        Ok(Device {
            path: canon,
            rdev: meta.rdev(),
        })
    }

    /// `UUID=`/`LABEL=`: the udev link if there is one, else blkid.
    async fn lookup(&self, dir: &str, flag: &str, tag: &str, value: &str, budget: Duration) -> Result<PathBuf, String> {
        let link = Path::new(dir).join(value);
        if link.exists() {
            return Ok(link);
        }
        let blkid = tool("blkid");
        let mut cmd = tokio::process::Command::new(&blkid);
        cmd.args(["-c", "/dev/null", flag, value])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let limit = budget.min(BLKID_TIMEOUT);
        let out = match tokio::time::timeout(limit, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(format!("cannot run {}: {e}", blkid.display())),
            Err(_) => return Err(format!("`blkid {flag} {value}` did not finish within {limit:?}")),
        };
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        if out.status.success() && !found.is_empty() {
            return Ok(PathBuf::from(found));
        }
        Err(format!(
            "no block device with {tag}={value} (neither {} nor blkid found one{})",
            link.display(),
            match String::from_utf8_lossy(&out.stderr).trim() {
                "" => String::new(),
                e => format!(": {e}"),
            }
        ))
    }

    /// How to recognise our mount: the remembered device, a fresh
    /// resolution, or failing that the configured fstype.
    async fn ident(&self, budget: Duration) -> Ident {
        if let Some(d) = lock(&self.device).clone() {
            return Ident::Device(d);
        }
        match self.resolve_device(budget).await {
            Ok(d) => {
                *lock(&self.device) = Some(d.clone());
                Ident::Device(d)
            }
            Err(e) => {
                tracing::debug!(
                    "{}: {e}; any {} filesystem at the mount point counts as ours",
                    self.resource,
                    self.spec.fstype
                );
                Ident::FsType(self.spec.fstype.clone())
            }
        }
    }

    /// One `umount2(mp, 0)` on a helper thread.
    async fn umount_once(&self, mp: &str, timeout: Duration) -> Result<Result<(), Errno>, BlockingError> {
        let target = mp.to_owned();
        run_blocking("us-fs-umount", timeout, move || {
            nix::mount::umount2(target.as_str(), MntFlags::empty())
        })
        .await
    }

    /// Undoes a fresh mount after a failed start; says how that went.
    async fn undo_mount(&self, mp: &str, deadline: Instant) -> String {
        let _quiet = self.probes.quiet();
        self.probes.kill(deadline).await;
        match self.umount_once(mp, left(deadline)).await {
            Ok(Ok(())) => format!("{mp} unmounted again"),
            Ok(Err(e)) => format!("and unmounting {mp} again failed: {e}; stop the resource to clean up"),
            Err(e) => format!("and unmounting {mp} again {e}; stop the resource to clean up"),
        }
    }

    /// Signals `holders` (SIGTERM, grace, SIGKILL) and waits for them.
    async fn evict(&self, holders: &[Holder], killed: &mut HashSet<(i32, u64)>, deadline: Instant) {
        let me = own_pid();
        let targets: Vec<&Holder> = holders
            .iter()
            .filter(|h| h.pid != me && h.pid > 1 && !h.unexeced_fork)
            .collect();
        if targets.is_empty() {
            return;
        }
        let fresh: Vec<&Holder> = targets.iter().copied().filter(|h| !killed.contains(&h.key())).collect();
        for h in &fresh {
            tracing::warn!(
                "{}: sending SIGTERM to process {} ({}), which holds {}: {}",
                self.resource,
                h.pid,
                h.cmdline,
                self.spec.mountpoint,
                h.what.join("; ")
            );
            self.send(h, Signal::SIGTERM);
        }
        if !fresh.is_empty() {
            wait_gone(&fresh, TERM_GRACE.min(left(deadline) / 3)).await;
        }
        let survivors: Vec<&Holder> = targets.iter().copied().filter(|h| h.alive()).collect();
        if survivors.is_empty() {
            return;
        }
        for h in &survivors {
            tracing::warn!(
                "{}: process {} ({}) still holds {}: sending SIGKILL",
                self.resource,
                h.pid,
                h.cmdline,
                self.spec.mountpoint
            );
            self.send(h, Signal::SIGKILL);
            killed.insert(h.key());
        }
        wait_gone(&survivors, KILL_WAIT.min(left(deadline))).await;
    }

    /// A monitor's answer while an earlier probe is still running.
    fn still_stuck(&self, since: Instant) -> Health {
        Health::Failed(format!(
            "an earlier I/O probe of {} is still stuck after {:?}: the disk may be hung",
            self.spec.mountpoint,
            since.elapsed()
        ))
    }

    /// Sends `sig` to a holder, if it is still the same process.
    fn send(&self, h: &Holder, sig: Signal) {
        if let Err(e) = h.signal(sig)
            && e != Errno::ESRCH
        {
            tracing::warn!(
                "{}: cannot send {} to process {}: {e}",
                self.resource,
                sig.as_str(),
                h.pid
            );
        }
    }

    /// The loud failure of a stop that could not unmount.
    async fn busy_error(
        &self,
        mount: &MountEntry,
        killed: &HashSet<(i32, u64)>,
        started: Instant,
        deadline: Instant,
        last: Option<String>,
    ) -> DriverError {
        let mp = mount.mountpoint.clone();
        let scan = {
            let m = mount.clone();
            run_blocking(
                "us-fs-scan",
                left(deadline).max(Duration::from_millis(100)),
                move || find_holders(&m),
            )
            .await
        };
        let mut msg = format!(
            "{mp} is still in use after {:?}; refusing to unmount it lazily (MNT_DETACH) while it is in use",
            started.elapsed()
        );
        if let Some(last) = last {
            let _ = write!(msg, " (last umount2: {last})");
        }
        msg.push_str(". Holders:");
        let me = own_pid();
        let mut any = false;
        match scan {
            Ok(holders) => {
                for h in &holders {
                    any = true;
                    let who = if h.pid == me {
                        format!("the agent itself (pid {})", h.pid)
                    } else if h.unexeced_fork {
                        format!("pid {} (a fork of the agent that has not exec'd yet)", h.pid)
                    } else {
                        format!("pid {} ({})", h.pid, h.cmdline)
                    };
                    let mut notes = vec![format!("state {}", h.state)];
                    if killed.contains(&h.key()) {
                        notes.push("survived SIGKILL".into());
                    }
                    if h.state == 'D' {
                        notes.push("stuck in the kernel, is the disk hung?".into());
                    }
                    let _ = write!(msg, "\n  {who} [{}]: {}", notes.join(", "), h.what.join("; "));
                }
            }
            Err(e) => {
                let _ = write!(msg, "\n  (the scan for holders {e})");
            }
        }
        if let Ok(entries) = read_mountinfo() {
            for e in entries
                .iter()
                .filter(|e| e.mountpoint != mp && under(&e.mountpoint, &mp))
            {
                any = true;
                let _ = write!(
                    msg,
                    "\n  mounted below it: {} ({} from {})",
                    e.mountpoint, e.fstype, e.source
                );
            }
        }
        if !any {
            msg.push_str(
                "\n  no process found: something in the kernel holds it (an NFS export, a loop device \
                 or swap file on it, a process in another mount namespace?)",
            );
        }
        self.failed("stop", msg)
    }
}

#[async_trait]
impl Driver for FsDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        let started = Instant::now();
        let deadline = started + ctx.timeout;
        // Time kept for undoing a fresh mount if a later step fails.
        let work = deadline - (ctx.timeout / 5).min(RESERVE);
        let Some(token) = ctx.token else {
            return Err(self.failed(
                "start",
                "no fencing token: a shared filesystem is mounted only by its group's owner (not as a clone)",
            ));
        };
        let dev = self
            .resolve_device(left(work))
            .await
            .map_err(|e| self.failed("start", e))?;
        *lock(&self.device) = Some(dev.clone());
        let mp = self.mountpoint();
        let entries = read_mountinfo().map_err(|e| self.failed("start", e))?;
        let (flags, data) = mount_options(&self.spec.options);
        let readonly = flags.contains(MsFlags::MS_RDONLY);
        let fresh = match mount_state(&entries, &mp, &Ident::Device(dev.clone())) {
            MountState::Mounted(_) => {
                tracing::debug!("{}: {} is already mounted at {mp}", self.resource, dev.path.display());
                false
            }
            MountState::Other { top, .. } => {
                return Err(self.failed(
                    "start",
                    format!(
                        "{mp} already holds another filesystem ({} from {}); refusing to mount {} there",
                        top.fstype,
                        top.source,
                        dev.path.display()
                    ),
                ));
            }
            MountState::Elsewhere(es) => {
                let places: Vec<&str> = es.iter().map(|e| e.mountpoint.as_str()).collect();
                return Err(self.failed(
                    "start",
                    format!(
                        "{} is already mounted at {}; refusing to mount it at {mp} as well",
                        dev.path.display(),
                        places.join(", ")
                    ),
                ));
            }
            MountState::NotMounted => true,
        };
        if fresh {
            if self.spec.fsck {
                self.fsck(ctx, &dev, work).await.map_err(|e| self.failed("start", e))?;
            }
            let (source, target, fstype) = (dev.path.clone(), PathBuf::from(&mp), self.spec.fstype.clone());
            let mounted = run_blocking("us-fs-mount", left(work), move || -> Result<(), String> {
                fs::create_dir_all(&target)
                    .map_err(|e| format!("cannot create mount point {}: {e}", target.display()))?;
                if !target.is_dir() {
                    return Err(format!("mount point {} is not a directory", target.display()));
                }
                let data = (!data.is_empty()).then_some(data.as_str());
                nix::mount::mount(Some(&source), &target, Some(fstype.as_str()), flags, data).map_err(|e| {
                    format!(
                        "mount(2) of {} at {} (type {fstype}, flags {flags:?}, data `{}`) failed: {e}",
                        source.display(),
                        target.display(),
                        data.unwrap_or("")
                    )
                })
            })
            .await;
            match mounted {
                Ok(Ok(())) => tracing::info!("{}: mounted {} at {mp}", self.resource, dev.path.display()),
                Ok(Err(e)) => return Err(self.failed("start", e)),
                Err(e) => {
                    return Err(self.failed(
                        "start",
                        format!(
                            "mounting {} at {mp} {e}; it may still complete (is the disk hung?): stop the resource to clean up",
                            dev.path.display()
                        ),
                    ));
                }
            }
        }
        let me = Marker {
            token,
            node: ctx.node.clone(),
            group: ctx.group.clone(),
            resource: self.resource.clone(),
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        let dirs = self.spec.directories.clone();
        let root = PathBuf::from(&mp);
        let settled = run_blocking("us-fs-settle", left(work), move || settle(&root, &me, readonly, &dirs)).await;
        let message = match settled {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(Settle::Refused(m) | Settle::Failed(m))) => m,
            Err(e) => format!("checking the fencing marker and directories on {mp} {e} (is the disk hung?)"),
        };
        if fresh {
            let undo = self.undo_mount(&mp, deadline).await;
            Err(self.failed("start", format!("{message}; {undo}")))
        } else {
            Err(self.failed(
                "start",
                format!("{message}; it stays mounted at {mp} until the resource is stopped"),
            ))
        }
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let _op = self.op.lock().await;
        let started = Instant::now();
        let deadline = started + ctx.timeout;
        // Scanning and killing end at `work`; the last unmount attempt may
        // run until `last_try`; the rest is for the scan that names the
        // holders when the mount stays busy.
        let reserve = (ctx.timeout / 5).min(RESERVE);
        let work = deadline - reserve;
        let last_try = deadline - reserve / 2;
        let ident = self.ident(left(work).min(BLKID_TIMEOUT)).await;
        let mp = self.mountpoint();
        // The monitor's I/O probe must not hold the mount: none starts from
        // now on, and one in flight is killed (it may be stuck on a hung
        // disk; then it is a holder like any other, named if the mount
        // stays busy).
        let _quiet = self.probes.quiet();
        if !self.probes.kill(Instant::now() + KILL_WAIT.min(left(work) / 3)).await {
            tracing::warn!(
                "{}: the I/O probe of {mp} survives SIGKILL (is the disk hung?)",
                self.resource
            );
        }
        let mut killed = HashSet::new();
        let mut last = None;
        loop {
            let entries = read_mountinfo().map_err(|e| self.failed("stop", e))?;
            let mount = match mount_state(&entries, &mp, &ident) {
                MountState::Mounted(m) => m,
                MountState::NotMounted => return Ok(()),
                MountState::Other {
                    top,
                    ours_beneath: false,
                } => {
                    tracing::debug!(
                        "{}: {mp} holds {} from {}, not ours",
                        self.resource,
                        top.fstype,
                        top.source
                    );
                    return Ok(());
                }
                MountState::Other {
                    top,
                    ours_beneath: true,
                } => {
                    return Err(self.failed(
                        "stop",
                        format!(
                            "{} is mounted at {mp} but covered by another filesystem ({} from {}) mounted on top of it; unmount that first",
                            ident.describe(),
                            top.fstype,
                            top.source
                        ),
                    ));
                }
                MountState::Elsewhere(es) => {
                    let places: Vec<&str> = es.iter().map(|e| e.mountpoint.as_str()).collect();
                    tracing::warn!(
                        "{}: {} is not mounted at {mp} but at {}: not ours, left alone",
                        self.resource,
                        ident.describe(),
                        places.join(", ")
                    );
                    return Ok(());
                }
            };
            if Instant::now() >= work {
                return Err(self.busy_error(&mount, &killed, started, deadline, last).await);
            }
            let scan = {
                let m = mount.clone();
                run_blocking("us-fs-scan", left(work), move || find_holders(&m)).await
            };
            match scan {
                Ok(holders) => self.evict(&holders, &mut killed, work).await,
                Err(e) => tracing::warn!("{}: the scan for processes holding {mp} {e}", self.resource),
            }
            match self.umount_once(&mp, left(last_try)).await {
                Ok(Ok(())) => {
                    tracing::info!("{}: unmounted {mp}", self.resource);
                }
                Ok(Err(e @ (Errno::EBUSY | Errno::EINVAL))) => {
                    // Busy, or (EINVAL) no longer a mount point: look again.
                    last = Some(e.to_string());
                    tokio::time::sleep(UMOUNT_RETRY.min(left(work))).await;
                }
                Ok(Err(e)) => return Err(self.failed("stop", format!("umount2({mp}) failed: {e}"))),
                Err(e) => {
                    return Err(self.failed(
                        "stop",
                        format!("unmounting {mp} {e} (is the disk hung?); not unmounting it lazily"),
                    ));
                }
            }
        }
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        let started = Instant::now();
        let deadline = started + ctx.timeout;
        if let Some(since) = self.probes.busy_since() {
            return self.still_stuck(since);
        }
        let ident = self.ident(left(deadline)).await;
        let slot = match self.probes.begin() {
            Ok(slot) => slot,
            Err(since) => return self.still_stuck(since),
        };
        let spec_mp = self.spec.mountpoint.clone();
        let want_rw = !self.readonly();
        // The mount table on a helper thread (bounded even if reading it
        // blocks); the slot comes back with the answer, or stays with a
        // stuck thread.
        let check = move || {
            let mp = mountpoint_key(&spec_mp);
            let entries = match read_mountinfo() {
                Ok(e) => e,
                Err(e) => return (slot, Err(Health::Failed(e))),
            };
            let verdict = match mount_state(&entries, &mp, &ident) {
                MountState::Mounted(m) => {
                    if want_rw && m.read_only() {
                        Err(Health::Failed(format!(
                            "{} at {mp} has been remounted read-only (filesystem errors?)",
                            ident.describe()
                        )))
                    } else {
                        Ok((mp, m.read_only()))
                    }
                }
                MountState::NotMounted => Err(Health::Failed(format!(
                    "{} is not mounted at {mp} any more",
                    ident.describe()
                ))),
                MountState::Other { top, .. } => Err(Health::Failed(format!(
                    "{mp} now holds another filesystem ({} from {}) instead of {}",
                    top.fstype,
                    top.source,
                    ident.describe()
                ))),
                MountState::Elsewhere(es) => Err(Health::Failed(format!(
                    "{} is not mounted at {mp} any more (it is mounted at {})",
                    ident.describe(),
                    es.iter().map(|e| e.mountpoint.as_str()).collect::<Vec<_>>().join(", ")
                ))),
            };
            (slot, verdict)
        };
        let timed_out = || {
            Health::Failed(format!(
                "I/O probe timed out after {:?} ({}): the disk may be hung",
                ctx.timeout, self.spec.mountpoint
            ))
        };
        let (slot, (mp, readonly)) = match run_blocking("us-fs-probe", left(deadline), check).await {
            Ok((_, Err(h))) => return h,
            Ok((slot, Ok(found))) => (slot, found),
            Err(BlockingError::TimedOut(_)) => return timed_out(),
            Err(e) => return Health::Failed(format!("the I/O probe of {} {e}", self.spec.mountpoint)),
        };
        match probe::run(&self.probes, slot, ctx, &self.resource, &mp, readonly, deadline).await {
            probe::Outcome::Passed => Health::Running,
            probe::Outcome::Failed(why) => Health::Failed(why),
            probe::Outcome::TimedOut => timed_out(),
        }
    }

    async fn probe(&self, ctx: &OpCtx) -> Health {
        let ident = self.ident(ctx.timeout.min(BLKID_TIMEOUT)).await;
        let mp = self.mountpoint();
        match read_mountinfo().map(|e| mount_state(&e, &mp, &ident)) {
            Ok(MountState::Mounted(_)) => Health::Running,
            Ok(MountState::Elsewhere(es)) => {
                tracing::warn!(
                    "{}: {} is mounted at {}, not at {mp}",
                    self.resource,
                    ident.describe(),
                    es.iter().map(|e| e.mountpoint.as_str()).collect::<Vec<_>>().join(", ")
                );
                Health::Stopped
            }
            Ok(_) => Health::Stopped,
            Err(e) => Health::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn translates_mount_options() {
        let opts = |v: &[&str]| mount_options(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        let (f, d) = opts(&[
            "ro",
            "noatime",
            "nodev",
            "nosuid",
            "noexec",
            "errors=remount-ro",
            "defaults",
            "_netdev",
            "x-systemd.automount",
            "data=ordered",
        ]);
        assert_eq!(
            f,
            MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC
        );
        assert_eq!(d, "errors=remount-ro,data=ordered");
        let (f, d) = opts(&["ro", "rw", "sync"]);
        assert_eq!(f, MsFlags::MS_SYNCHRONOUS);
        assert_eq!(d, "");
    }

    /// A closure that blocks (like a syscall on a hung disk) is abandoned
    /// after the timeout, without blocking the runtime; it finishes later.
    #[tokio::test]
    async fn blocking_calls_time_out_without_waiting() {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t0 = Instant::now();
        let r = run_blocking("us-fs-test", Duration::from_millis(100), move || {
            let _ = blocked.recv();
            let _ = done_tx.send(());
            7
        })
        .await;
        assert!(matches!(r, Err(BlockingError::TimedOut(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        release.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let ok = run_blocking("us-fs-test", Duration::from_secs(5), || 7).await;
        assert_eq!(ok.unwrap(), 7);
        let lost = run_blocking("us-fs-test", Duration::from_secs(5), || -> i32 { panic!("boom") }).await;
        assert!(matches!(lost, Err(BlockingError::Lost)));
    }
}
