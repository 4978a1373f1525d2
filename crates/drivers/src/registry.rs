//! The record of process groups the drivers have started.
//!
//! Every process a driver starts leads a process group of its own (it runs in
//! a new session), and the driver records that group here. The record serves
//! two readers:
//!
//! - the agent's fence guard, which must be able to kill everything the
//!   drivers started for owned groups the moment the node loses a lease:
//!   `on_change` hands it the full list of `(resource, pgid)` after every
//!   change;
//! - a restarted agent, which kills what its predecessor left behind
//!   ([`kill_leftovers`], called before the registry is created).
//!
//! The file (`<state_dir>/processes`, see [`registry_file`]) is rewritten
//! atomically (temporary file + rename) on every change. It is not fsynced:
//! it guards against the agent dying, and a machine crash takes the
//! processes with it. Each line reads `PGID START_TIME RESOURCE`, where
//! `START_TIME` is field 22 of `/proc/PGID/stat` (clock ticks since boot) when
//! the group was recorded, or `-` if the process was already gone; a pid that
//! has been reused by a stranger since has another start time and is left
//! alone. Lines starting with `#` are comments.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::cgroup::Cgroups;
use crate::procfs;

/// Name of the registry file inside the state directory.
pub const REGISTRY_FILE: &str = "processes";

/// How long [`kill_leftovers`] waits for killed groups to disappear.
const LEFTOVER_WAIT: Duration = Duration::from_secs(2);

/// The path of the registry file for a state directory.
pub fn registry_file(state_dir: &Path) -> PathBuf {
    state_dir.join(REGISTRY_FILE)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    resource: String,
    pgid: i32,
    /// `None`: the process was gone when recorded; never killed as a leftover.
    start_time: Option<u64>,
}

/// Callback receiving the full list of recorded process groups, as
/// `(resource, pgid)`, after every change.
pub type OnChange = Box<dyn Fn(&[(&str, i32)]) + Send + Sync>;

/// The process groups the drivers have started (see the module docs).
pub struct ProcessRegistry {
    file: PathBuf,
    on_change: OnChange,
    entries: Mutex<Vec<Entry>>,
    /// The node's cgroup subtree, when the host has one: drivers start each
    /// resource's commands in its own cgroup and kill it as a whole.
    cgroups: Option<Cgroups>,
}

impl std::fmt::Debug for ProcessRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRegistry")
            .field("file", &self.file)
            .field("pgids", &self.pgids())
            .finish_non_exhaustive()
    }
}

impl ProcessRegistry {
    /// An empty registry persisting to `<state_dir>/processes` (the directory
    /// is created on the first change). It does not read the file: call
    /// [`kill_leftovers`] first, the first change overwrites the file.
    ///
    /// `on_change` is called with every recorded `(resource, pgid)` after each
    /// change, in order, while the registry's lock is held: it must not call
    /// back into the registry.
    pub fn new(state_dir: &Path, on_change: OnChange) -> Self {
        ProcessRegistry {
            file: registry_file(state_dir),
            on_change,
            entries: Mutex::new(Vec::new()),
            cgroups: None,
        }
    }

    /// Contains resources in cgroups under `cgroups` (see [`crate::cgroup`]).
    #[must_use]
    pub fn with_cgroups(mut self, cgroups: Option<Cgroups>) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// The node's cgroup subtree; `None`: process groups only.
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// The cgroup entry for a command of `resource` that must be contained
    /// (`None` without cgroups). Errors say which file.
    pub(crate) fn cgroup_entry(&self, resource: &str) -> Result<Option<std::os::fd::OwnedFd>, String> {
        self.cgroups.as_ref().map(|c| c.entry(resource)).transpose()
    }

    /// Kills whatever is left in `resource`'s cgroup (a worker that left
    /// the process group, a daemon a script started) and waits until it is
    /// empty. Without cgroups there is nothing more to do.
    pub(crate) async fn kill_cgroup(&self, resource: &str) -> Result<(), String> {
        let Some(c) = &self.cgroups else { return Ok(()) };
        let killed = c.kill_resource(resource).await?;
        if !killed.is_empty() {
            tracing::info!("{resource}: killed {killed:?} left in its cgroup");
        }
        Ok(())
    }

    /// Records that `resource` runs as process group `pgid` (replacing an
    /// earlier record for the same resource). The in-memory record and
    /// `on_change` are updated even when writing the file fails; the error
    /// says which file.
    pub fn add(&self, resource: &str, pgid: i32) -> io::Result<()> {
        let start_time = procfs::start_time(pgid);
        let mut entries = self.lock();
        let entry = Entry {
            resource: resource.to_owned(),
            pgid,
            start_time,
        };
        match entries.iter_mut().find(|e| e.resource == resource) {
            Some(e) => *e = entry,
            None => entries.push(entry),
        }
        self.changed(&entries)
    }

    /// Forgets `resource`'s process group, if any.
    pub fn remove(&self, resource: &str) -> io::Result<()> {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|e| e.resource != resource);
        if entries.len() == before {
            return Ok(());
        }
        self.changed(&entries)
    }

    /// Every recorded process-group id, in the order they were recorded.
    pub fn pgids(&self) -> Vec<i32> {
        self.lock().iter().map(|e| e.pgid).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // A panic while holding the lock cannot leave the Vec half-changed in
        // a way that matters here; keep going with what is there.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self, entries: &[Entry]) -> io::Result<()> {
        let groups: Vec<(&str, i32)> = entries.iter().map(|e| (e.resource.as_str(), e.pgid)).collect();
        (self.on_change)(&groups);
        write_atomically(&self.file, &render(entries))
    }
}

fn render(entries: &[Entry]) -> String {
    let mut text = String::from("# understudy process registry: PGID START_TIME RESOURCE\n");
    for e in entries {
        let start = e.start_time.map_or_else(|| "-".to_owned(), |t| t.to_string());
        text.push_str(&format!("{} {} {}\n", e.pgid, start, e.resource));
    }
    text
}

/// Parses the registry file; malformed lines are skipped (and reported).
fn parse(text: &str, file: &Path) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let pgid = parts.next().and_then(|p| p.parse::<i32>().ok());
        let start = parts
            .next()
            .map(|s| if s == "-" { Ok(None) } else { s.parse::<u64>().map(Some) });
        let resource = parts.next();
        match (pgid, start, resource) {
            (Some(pgid), Some(Ok(start_time)), Some(resource)) if pgid > 1 => entries.push(Entry {
                resource: resource.to_owned(),
                pgid,
                start_time,
            }),
            _ => tracing::warn!(
                "{}:{}: ignoring malformed process record `{line}`",
                file.display(),
                n + 1
            ),
        }
    }
    entries
}

/// Writes `text` to `file` atomically (temporary file + rename), readable
/// by its owner only (0600); creates the directory (0700) if needed.
pub(crate) fn write_private(file: &Path, text: &str) -> io::Result<()> {
    write_atomically(file, text)
}

fn write_atomically(file: &Path, text: &str) -> io::Result<()> {
    let context =
        |what: &str, path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    if let Some(dir) = file.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| context("cannot create directory", dir, e))?;
    }
    let mut tmp_name = file.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| context("cannot create", &tmp, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| context("cannot write", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, file).map_err(|e| context(&format!("cannot rename {} to", tmp.display()), file, e))
}

/// Kills the process groups a previous agent recorded in `state_dir` and
/// left running: for each record whose process still exists with the
/// recorded start time, SIGKILLs its whole process group and waits (at most
/// 2 s in all) until no live member is left. Records whose pid is gone or
/// belongs to another process now are ignored. Returns what it killed
/// (resource, pgid), then deletes the file.
///
/// Problems (an unreadable file, a group that outlives the wait) are logged
/// with `tracing`; there is nothing more useful a caller could do with them.
pub fn kill_leftovers(state_dir: &Path) -> Vec<(String, i32)> {
    let file = registry_file(state_dir);
    let text = match fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!("cannot read process registry {}: {e}", file.display());
            return Vec::new();
        }
    };
    let mut killed = Vec::new();
    for e in parse(&text, &file) {
        let Some(recorded) = e.start_time else { continue };
        // Gone, a stranger's now, or a zombie (already killed, e.g. with
        // its cgroup): nothing to do.
        match procfs::stat(e.pgid) {
            Some(st) if st.start_time == recorded && st.is_live() => {}
            _ => continue,
        }
        match killpg(Pid::from_raw(e.pgid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {
                tracing::info!("killed process group {} left over from {}", e.pgid, e.resource);
                killed.push((e.resource, e.pgid));
            }
            Err(err) => tracing::warn!("cannot kill process group {} of {}: {err}", e.pgid, e.resource),
        }
    }
    let pgids: Vec<i32> = killed.iter().map(|(_, p)| *p).collect();
    let deadline = Instant::now() + LEFTOVER_WAIT;
    loop {
        let live = procfs::live_groups(&pgids);
        if live.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!("process groups {live:?} still alive {LEFTOVER_WAIT:?} after SIGKILL");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = fs::remove_file(&file)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove process registry {}: {e}", file.display());
    }
    killed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn render_parse_round_trip() {
        let entries = vec![
            Entry {
                resource: "web".into(),
                pgid: 42,
                start_time: Some(7),
            },
            Entry {
                resource: "odd name".into(),
                pgid: 43,
                start_time: None,
            },
        ];
        let text = render(&entries);
        assert_eq!(parse(&text, Path::new("x")), entries);
    }

    #[test]
    fn parse_skips_garbage() {
        let text = "# comment\n\nnope\n12 x web\n1 5 init\n99 5 ok\n";
        let got = parse(text, Path::new("x"));
        assert_eq!(
            got,
            vec![Entry {
                resource: "ok".into(),
                pgid: 99,
                start_time: Some(5)
            }]
        );
    }
}
