//! The mount table: `/proc/self/mountinfo` parsed, and classified for one
//! resource (is its filesystem mounted at its mountpoint, covered by another,
//! mounted elsewhere?).

use std::fs;
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::makedev;

/// A resolved block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Device {
    /// Canonical path, e.g. `/dev/sdb1`.
    pub(super) path: PathBuf,
    /// Its device number (`st_rdev`).
    pub(super) rdev: u64,
}

/// How a mount is recognised as this resource's.
#[derive(Clone, Debug)]
pub(super) enum Ident {
    Device(Device),
    /// The device cannot be resolved: any filesystem of this type at the
    /// mountpoint counts as ours.
    FsType(String),
}

impl Ident {
    pub(super) fn matches(&self, e: &MountEntry) -> bool {
        match self {
            Ident::Device(d) => {
                e.dev == d.rdev
                    || Path::new(&e.source) == d.path
                    || (e.source.starts_with('/') && fs::canonicalize(&e.source).is_ok_and(|p| p == d.path))
            }
            Ident::FsType(t) => &e.fstype == t,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Ident::Device(d) => d.path.display().to_string(),
            Ident::FsType(t) => format!("a {t} filesystem"),
        }
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MountEntry {
    pub(super) id: u64,
    pub(super) parent: u64,
    /// `st_dev` of files on it.
    pub(super) dev: u64,
    pub(super) mountpoint: String,
    /// Per-mount options (`rw,noatime`).
    pub(super) options: String,
    pub(super) fstype: String,
    pub(super) source: String,
    /// Superblock options (`rw,errors=remount-ro`).
    pub(super) super_options: String,
}

impl MountEntry {
    pub(super) fn read_only(&self) -> bool {
        has_opt(&self.options, "ro") || has_opt(&self.super_options, "ro")
    }
}

pub(super) fn has_opt(list: &str, opt: &str) -> bool {
    list.split(',').any(|o| o == opt)
}

/// What the mount table says about the resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum MountState {
    /// Ours, on top at the mountpoint.
    Mounted(MountEntry),
    /// Nothing of ours at the mountpoint, nor anywhere else.
    NotMounted,
    /// Something else is on top at the mountpoint; `ours_beneath` when our
    /// filesystem is mounted there too, covered by it.
    Other { top: MountEntry, ours_beneath: bool },
    /// Not at the mountpoint, but mounted at these other places.
    Elsewhere(Vec<MountEntry>),
}

/// Decodes the octal escapes (`\040` for a space) of mountinfo fields.
pub(super) fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one mountinfo line:
/// `36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
pub(super) fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    if l.len() < 6 || r.len() < 2 {
        return None;
    }
    let (major, minor) = l[2].split_once(':')?;
    Some(MountEntry {
        id: l[0].parse().ok()?,
        parent: l[1].parse().ok()?,
        dev: makedev(major.parse().ok()?, minor.parse().ok()?),
        mountpoint: unescape(l[4]),
        options: l[5].to_owned(),
        fstype: unescape(r[0]),
        source: unescape(r[1]),
        super_options: r.get(2).map(|s| unescape(s)).unwrap_or_default(),
    })
}

pub(super) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

pub(super) fn read_mountinfo() -> Result<Vec<MountEntry>, String> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))
}

/// The mount on top at `mp`: of a stack of mounts at one place, the one no
/// other mount there sits on.
pub(super) fn top_at<'a>(entries: &'a [MountEntry], mp: &str) -> Option<&'a MountEntry> {
    let at: Vec<&MountEntry> = entries.iter().filter(|e| e.mountpoint == mp).collect();
    at.iter()
        .rev()
        .find(|e| !at.iter().any(|o| o.parent == e.id))
        .or(at.last())
        .copied()
}

/// Classifies the mount table for the filesystem `ident` at `mp`.
pub(super) fn mount_state(entries: &[MountEntry], mp: &str, ident: &Ident) -> MountState {
    let at: Vec<&MountEntry> = entries.iter().filter(|e| e.mountpoint == mp).collect();
    if let Some(top) = top_at(entries, mp) {
        if ident.matches(top) {
            return MountState::Mounted(top.clone());
        }
        return MountState::Other {
            top: top.clone(),
            ours_beneath: at.iter().any(|e| ident.matches(e)),
        };
    }
    let elsewhere: Vec<MountEntry> = match ident {
        Ident::Device(_) => entries.iter().filter(|e| ident.matches(e)).cloned().collect(),
        Ident::FsType(_) => Vec::new(),
    };
    if elsewhere.is_empty() {
        MountState::NotMounted
    } else {
        MountState::Elsewhere(elsewhere)
    }
}

/// `path` lies at or below `dir`.
pub(super) fn under(path: &str, dir: &str) -> bool {
    if dir == "/" {
        return path.starts_with('/');
    }
    path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// The mountpoint as mountinfo shows it: symlinks resolved when it exists,
/// else lexically cleaned up.
pub(super) fn mountpoint_key(mp: &str) -> String {
    if let Ok(p) = fs::canonicalize(mp) {
        return p.to_string_lossy().into_owned();
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(mp).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn entry(line: &str) -> MountEntry {
        parse_mountinfo_line(line).unwrap()
    }

    #[test]
    fn parses_mountinfo_lines() {
        let e = entry("36 35 98:0 /mnt1 /mnt/par\\040ent rw,noatime master:1 - ext3 /dev/root rw,errors=continue");
        assert_eq!(e.id, 36);
        assert_eq!(e.parent, 35);
        assert_eq!(e.dev, makedev(98, 0));
        assert_eq!(e.mountpoint, "/mnt/par ent");
        assert_eq!(e.fstype, "ext3");
        assert_eq!(e.source, "/dev/root");
        assert!(!e.read_only());
        let ro = entry("40 1 7:3 / /srv/x ro,relatime shared:5 - ext4 /dev/loop3 ro");
        assert!(ro.read_only());
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn classifies_the_mount_table() {
        let ours = Device {
            path: PathBuf::from("/dev/loop3"),
            rdev: makedev(7, 3),
        };
        let id = Ident::Device(ours);
        let root = "1 0 253:0 / / rw - ext4 /dev/vda rw";
        let at = "40 1 7:3 / /srv/x rw - ext4 /dev/loop3 rw";
        let other = "41 1 0:50 / /srv/x rw - tmpfs tmpfs rw";
        let on_top = "42 40 0:51 / /srv/x rw - tmpfs tmpfs rw";
        let elsewhere = "43 1 7:3 / /srv/y rw - ext4 /dev/loop3 rw";
        let t = |lines: &[&str]| parse_mountinfo(&lines.join("\n"));
        assert!(matches!(mount_state(&t(&[root, at]), "/srv/x", &id), MountState::Mounted(e) if e.id == 40));
        assert_eq!(mount_state(&t(&[root]), "/srv/x", &id), MountState::NotMounted);
        assert!(matches!(
            mount_state(&t(&[root, other]), "/srv/x", &id),
            MountState::Other {
                ours_beneath: false,
                ..
            }
        ));
        assert!(matches!(
            mount_state(&t(&[root, at, on_top]), "/srv/x", &id),
            MountState::Other { ours_beneath: true, .. }
        ));
        assert!(matches!(mount_state(&t(&[root, elsewhere]), "/srv/x", &id), MountState::Elsewhere(v) if v.len() == 1));
        let by_type = Ident::FsType("ext4".into());
        assert!(matches!(
            mount_state(&t(&[root, at]), "/srv/x", &by_type),
            MountState::Mounted(_)
        ));
        assert_eq!(
            mount_state(&t(&[root, elsewhere]), "/srv/x", &by_type),
            MountState::NotMounted
        );
    }

    #[test]
    fn paths() {
        assert!(under("/srv/x", "/srv/x"));
        assert!(under("/srv/x/a", "/srv/x"));
        assert!(!under("/srv/xy", "/srv/x"));
        assert!(!under("/srv", "/srv/x"));
        assert_eq!(
            mountpoint_key("/nonexistent-understudy/a/../b/"),
            "/nonexistent-understudy/b"
        );
    }
}
