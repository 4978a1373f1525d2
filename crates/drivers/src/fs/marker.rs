//! The fencing marker (see the module docs of [`super`]) and the other
//! steps start takes after mounting: directories, leftover probe files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use understudy_core::spec::DirectorySpec;

use super::PROBE_PREFIX;

/// The fencing marker, in the filesystem's root.
pub const MARKER: &str = ".understudy-fence";
/// Where a new marker is written before it is renamed over [`MARKER`].
const MARKER_TMP: &str = ".understudy-fence.tmp";

/// The contents of the fencing marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Marker {
    pub(super) token: i64,
    pub(super) node: String,
    pub(super) group: String,
    pub(super) resource: String,
    pub(super) time: String,
}

impl Marker {
    pub(super) fn render(&self) -> String {
        let clean = |s: &str| s.replace(['\n', '\r'], " ");
        format!(
            "# understudy fencing marker: the highest fencing token that mounted this\n\
             # filesystem. A node holding an older token must not use it. Do not edit.\n\
             token={}\nnode={}\ngroup={}\nresource={}\ntime={}\n",
            self.token,
            clean(&self.node),
            clean(&self.group),
            clean(&self.resource),
            clean(&self.time),
        )
    }

    pub(super) fn parse(text: &str) -> Result<Marker, String> {
        let mut token = None;
        let mut m = Marker {
            token: 0,
            node: "?".into(),
            group: String::new(),
            resource: String::new(),
            time: "?".into(),
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(format!("malformed line `{line}`"));
            };
            let v = v.trim().to_owned();
            match k.trim() {
                "token" => token = Some(v.parse::<i64>().map_err(|_| format!("bad token `{v}`"))?),
                "node" => m.node = v,
                "group" => m.group = v,
                "resource" => m.resource = v,
                "time" => m.time = v,
                _ => {}
            }
        }
        m.token = token.ok_or("no `token=` line")?;
        Ok(m)
    }
}

pub(super) fn read_marker(mp: &Path) -> Result<Option<Marker>, String> {
    let path = mp.join(MARKER);
    match fs::read_to_string(&path) {
        Ok(text) => Marker::parse(&text)
            .map(Some)
            .map_err(|e| format!("fencing marker {} is unreadable ({e})", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read fencing marker {}: {e}", path.display())),
    }
}

/// Replaces the marker atomically and durably.
pub(super) fn write_marker(mp: &Path, m: &Marker) -> io::Result<()> {
    let tmp = mp.join(MARKER_TMP);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(m.render().as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, mp.join(MARKER))?;
    File::open(mp)?.sync_all()
}

/// Why the steps after mounting failed.
#[derive(Debug)]
pub(super) enum Settle {
    /// The fencing marker forbids this node to use the disk.
    Refused(String),
    Failed(String),
}

/// After mounting: the fencing marker, directories, leftover probe files.
pub(super) fn settle(mp: &Path, me: &Marker, readonly: bool, directories: &[DirectorySpec]) -> Result<(), Settle> {
    let marker = read_marker(mp).map_err(|e| {
        Settle::Refused(format!(
            "{e}; cannot prove this node's token {} is current: refusing (remove the file if no other node uses the disk)",
            me.token
        ))
    })?;
    if let Some(m) = &marker
        && m.token > me.token
    {
        return Err(Settle::Refused(format!(
            "the shared disk was last mounted under fencing token {} by node {} (at {}); this node's token {} is older: refusing",
            m.token, m.node, m.time, me.token
        )));
    }
    if readonly {
        for d in directories {
            if !mp.join(&d.path).is_dir() {
                return Err(Settle::Failed(format!(
                    "directory {} does not exist and the filesystem is mounted read-only",
                    mp.join(&d.path).display()
                )));
            }
        }
        return Ok(());
    }
    if marker.as_ref().is_none_or(|m| m.token < me.token || m.node != me.node) {
        write_marker(mp, me).map_err(|e| {
            Settle::Failed(format!(
                "cannot write fencing marker {}: {e}",
                mp.join(MARKER).display()
            ))
        })?;
    }
    if let Ok(dir) = fs::read_dir(mp) {
        for entry in dir.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PROBE_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    for d in directories {
        let p = mp.join(&d.path);
        fs::create_dir_all(&p).map_err(|e| Settle::Failed(format!("cannot create directory {}: {e}", p.display())))?;
        set_owner_and_mode(&p, d).map_err(Settle::Failed)?;
    }
    Ok(())
}

/// A user or group id: a number as it is, a name through `by_name` (this
/// node's user database).
pub(super) fn lookup(
    p: &Path,
    what: &str,
    name: Option<&str>,
    by_name: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<Option<u32>, String> {
    let Some(name) = name else { return Ok(None) };
    if let Ok(n) = name.parse::<u32>() {
        return Ok(Some(n));
    }
    match by_name(name) {
        Ok(Some(id)) => Ok(Some(id)),
        Ok(None) => Err(format!("directory {}: no {what} `{name}` on this node", p.display())),
        Err(e) => Err(format!(
            "directory {}: cannot look up {what} `{name}`: {e}",
            p.display()
        )),
    }
}

/// Gives a directory the owner, group and mode its definition asks for
/// (after every mount, so a change by hand is undone). Names are looked up
/// on this node; a number is taken as it is.
pub(super) fn set_owner_and_mode(p: &Path, d: &DirectorySpec) -> Result<(), String> {
    let uid = lookup(p, "user", d.owner.as_deref(), |name| {
        nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw()))
    })?
    .map(nix::unistd::Uid::from_raw);
    let gid = lookup(p, "group", d.group.as_deref(), |name| {
        nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw()))
    })?
    .map(nix::unistd::Gid::from_raw);
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(p, uid, gid).map_err(|e| {
            format!(
                "cannot give directory {} to {}:{}: {e}",
                p.display(),
                d.owner.as_deref().unwrap_or("-"),
                d.group.as_deref().unwrap_or("-")
            )
        })?;
    }
    if let Some(mode) = d.mode {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set mode {mode:04o} on directory {}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn marker_round_trip() {
        let m = Marker {
            token: 42,
            node: "node1".into(),
            group: "g".into(),
            resource: "shared".into(),
            time: "2025-01-01T12:00:00Z".into(),
        };
        assert_eq!(Marker::parse(&m.render()).unwrap(), m);
        assert!(Marker::parse("# nothing\nnode=x\n").is_err());
        assert!(Marker::parse("token=abc\n").is_err());
        assert!(Marker::parse("token 5\n").is_err());
        assert_eq!(Marker::parse("token=7\nfuture=1\n").unwrap().token, 7);
    }
}
