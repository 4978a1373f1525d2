//! The registry of live beds and the clean-up of dead ones.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::NAME_PREFIX;
use crate::error::{Error, Result};
use crate::ns::{REGISTRY_DIR, list_netns, netns_del, netns_sweep};

/// What [`cleanup_leftovers`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Processes killed inside them.
    pub processes: usize,
    /// Temporary directories removed.
    pub dirs: Vec<PathBuf>,
    /// Registry entries removed.
    pub registrations: Vec<String>,
    /// What could not be removed (clean-up goes on past a failure).
    pub errors: Vec<String>,
}

impl Leftovers {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.processes == 0
            && self.dirs.is_empty()
            && self.registrations.is_empty()
            && self.errors.is_empty()
    }
}

/// A bed id `ustb<pid>x<seq>` split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BedId {
    pub(crate) pid: u32,
    pub(crate) seq: u32,
}

impl BedId {
    pub(crate) fn render(self) -> String {
        format!("{NAME_PREFIX}{}x{}", self.pid, self.seq)
    }

    /// Reads the id at the start of a namespace, directory or registry
    /// name: `ustb<pid>x<seq>` followed by nothing or by `-`.
    pub(crate) fn parse_prefix(name: &str) -> Option<BedId> {
        let rest = name.strip_prefix(NAME_PREFIX)?;
        let (pid, rest) = rest.split_once('x')?;
        let end = rest.find('-').unwrap_or(rest.len());
        let (seq, _) = rest.split_at(end);
        if pid.is_empty() || seq.is_empty() {
            return None;
        }
        if !pid.bytes().all(|b| b.is_ascii_digit()) || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(BedId {
            pid: pid.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// The start time of process `pid` (clock ticks since boot, field 22 of
/// `/proc/PID/stat`), which tells a pid's reuse apart from its first owner.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    // After ')' come field 3 (state) onwards; start time is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// One registry entry.
#[derive(Debug)]
struct Registration {
    path: PathBuf,
    start: Option<u64>,
    dir: Option<PathBuf>,
}

/// Records a new bed: who made it (pid and start time) and its temp dir.
pub(crate) fn register(id: BedId, hint: &str, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(REGISTRY_DIR).map_err(|e| Error::io(format!("create {REGISTRY_DIR}"), e))?;
    let path = Path::new(REGISTRY_DIR).join(id.render());
    let start = start_time(id.pid).map(|t| t.to_string()).unwrap_or_default();
    let text = format!("pid={}\nstart={start}\nhint={hint}\ndir={}\n", id.pid, dir.display());
    fs::write(&path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(path)
}

fn read_registry() -> BTreeMap<BedId, Registration> {
    let mut entries = BTreeMap::new();
    let Ok(dir) = fs::read_dir(REGISTRY_DIR) else {
        return entries;
    };
    for entry in dir.filter_map(|e| e.ok()) {
        let Some(name) = entry.file_name().into_string().ok() else {
            continue;
        };
        let Some(id) = BedId::parse_prefix(&name) else {
            continue;
        };
        if id.render() != name {
            continue;
        }
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        let mut registration = Registration {
            path: entry.path(),
            start: None,
            dir: None,
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("start", v)) => registration.start = v.parse().ok(),
                Some(("dir", v)) if !v.is_empty() => registration.dir = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        entries.insert(id, registration);
    }
    entries
}

/// Whether the process that created bed `id` is still alive. With a
/// registry entry the start time must match too (pids are reused); without
/// one, an existing pid counts as alive (the safe answer).
fn owner_alive(id: BedId, registry: &BTreeMap<BedId, Registration>) -> bool {
    let recorded = registry.get(&id).and_then(|r| r.start);
    match (start_time(id.pid), recorded) {
        (None, _) => false,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
    }
}

/// A temp dir may only be removed by us if it is one a bed made.
fn is_bed_dir(path: &Path, id: BedId) -> bool {
    path.is_absolute()
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{}-", id.render())))
}

fn remove_dir(path: &Path, report: &mut Leftovers) {
    if !path.exists() {
        return;
    }
    match fs::remove_dir_all(path) {
        Ok(()) => report.dirs.push(path.to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.errors.push(format!("remove {}: {e}", path.display())),
    }
}

/// Removes what beds of dead processes left behind: their namespaces (after
/// SIGKILLing every process still inside), their temporary directories and
/// their registry entries. A bed whose creator is alive is never touched, so
/// this is safe to run while other tests (in this or other processes) use
/// their beds. [`crate::Bed::new`] runs it first; call it yourself to clean a
/// machine after a crashed run.
///
/// Fails only if not root; individual failures are listed in
/// [`Leftovers::errors`].
pub fn cleanup_leftovers() -> Result<Leftovers> {
    crate::bed::require_root()?;
    let mut report = Leftovers::default();
    let registry = read_registry();

    for name in list_netns() {
        let Some(id) = BedId::parse_prefix(&name) else {
            continue;
        };
        if owner_alive(id, &registry) {
            continue;
        }
        match netns_sweep(&name) {
            Ok(n) => report.processes += n,
            Err(e) => report.errors.push(e.to_string()),
        }
        match netns_del(&name) {
            Ok(()) => report.namespaces.push(name),
            Err(e) => report.errors.push(e.to_string()),
        }
    }

    for (&id, registration) in &registry {
        if owner_alive(id, &registry) {
            continue;
        }
        if let Some(dir) = registration.dir.as_deref().filter(|d| is_bed_dir(d, id)) {
            remove_dir(dir, &mut report);
        }
        match fs::remove_file(&registration.path) {
            Ok(()) => report.registrations.push(id.render()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report
                .errors
                .push(format!("remove {}: {e}", registration.path.display())),
        }
    }

    // Temp dirs of a run that died before registering, or whose registry
    // entry is gone.
    if let Ok(dir) = fs::read_dir(std::env::temp_dir()) {
        for entry in dir.filter_map(|e| e.ok()) {
            let path = entry.path();
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(BedId::parse_prefix) else {
                continue;
            };
            if is_bed_dir(&path, id) && path.is_dir() && !owner_alive(id, &registry) {
                remove_dir(&path, &mut report);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids() {
        assert_eq!(BedId::parse_prefix("ustb123x4-sw"), Some(BedId { pid: 123, seq: 4 }));
        assert_eq!(BedId::parse_prefix("ustb123x4"), Some(BedId { pid: 123, seq: 4 }));
        assert_eq!(
            BedId::parse_prefix("ustb123x4-etcd-1"),
            Some(BedId { pid: 123, seq: 4 })
        );
        assert_eq!(BedId::parse_prefix("ustbx4-sw"), None);
        assert_eq!(BedId::parse_prefix("ustb12a3x4-sw"), None);
        assert_eq!(BedId::parse_prefix("ustb123x-sw"), None);
        assert_eq!(BedId::parse_prefix("ustb123x4x-sw"), None);
        assert_eq!(BedId::parse_prefix("other123x4-sw"), None);
        assert_eq!(BedId { pid: 7, seq: 0 }.render(), "ustb7x0");
    }

    #[test]
    fn reads_own_start_time() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn only_bed_dirs_are_ours() {
        let id = BedId { pid: 5, seq: 1 };
        assert!(is_bed_dir(Path::new("/tmp/ustb5x1-hint-abc"), id));
        assert!(!is_bed_dir(Path::new("/tmp/ustb5x10-hint-abc"), id));
        assert!(!is_bed_dir(Path::new("ustb5x1-hint"), id));
        assert!(!is_bed_dir(Path::new("/"), id));
    }
}
