//! One agent per node.
//!
//! Two agents for one node fight: each takes the other's registration and
//! keys for its own, the group flaps and the fencing token races upwards.
//! The classic way to get there is starting an agent by hand while systemd
//! also runs it. Two checks refuse the second agent before it touches
//! anything:
//!
//! - **On one host**, an exclusive `flock` on `<state_dir>/agent.lock`,
//!   held for the agent's life (the kernel drops it when the process dies,
//!   however it dies). The file holds the holder's pid for the message.
//! - **Across hosts**, the node's registration names the agent that made it
//!   ([`AgentIdentity`]: host, pid and the state directory's instance id,
//!   kept in `<state_dir>/agent-id`). A live registration by another
//!   instance refuses the start; one by this instance is a predecessor
//!   (the lock proves it is dead), whose session the new agent revokes once
//!   it has swept what the predecessor left.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use understudy_core::agent::AgentIdentity;

/// The exit code of an agent refused because another agent runs the node.
pub const EXIT_ALREADY_RUNNING: u8 = 3;

/// Why this agent may not run.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "another agent for node `{node}` is already running on this host (pid {pid}, state directory {dir}); \
         stop it first (`systemctl stop understudy`, or SIGTERM to that pid)"
    )]
    LockedHere { node: String, pid: String, dir: PathBuf },
    #[error(
        "node `{node}` is already registered by another agent (host {host}, pid {pid}) at the coordinator; \
         two agents for one node would fight over its groups: stop that agent first, or give this one \
         another node name"
    )]
    RegisteredElsewhere { node: String, host: String, pid: u32 },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process dying) releases it.
pub struct InstanceLock {
    _lock: Flock<File>,
}

/// Takes the node's lock in `state_dir`, or says who holds it.
pub fn lock(state_dir: &Path, node: &str) -> Result<InstanceLock, Refused> {
    let path = state_dir.join("agent.lock");
    let io = |source| Refused::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = match pid.trim() {
                "" => "unknown".to_owned(),
                p => p.to_owned(),
            };
            return Err(Refused::LockedHere {
                node: node.to_owned(),
                pid,
                dir: state_dir.to_path_buf(),
            });
        }
        Err((_, e)) => return Err(io(std::io::Error::from(e))),
    };
    lock.set_len(0).map_err(io)?;
    lock.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(lock, "{}", std::process::id()).map_err(io)?;
    Ok(InstanceLock { _lock: lock })
}

/// This agent's identity: the host name, its pid and the state
/// directory's instance id (created on first use).
pub fn identity(state_dir: &Path) -> std::io::Result<AgentIdentity> {
    let path = state_dir.join("agent-id");
    let instance = match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => {
            let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
                .trim()
                .to_owned();
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            writeln!(f, "{id}")?;
            f.sync_all()?;
            id
        }
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    Ok(AgentIdentity {
        host,
        pid: std::process::id(),
        instance,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path(), "node1").unwrap();
        let err = lock(dir.path(), "node1").err().unwrap();
        let text = err.to_string();
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        assert!(text.contains("node `node1`"), "{text}");
        drop(held);
        assert!(lock(dir.path(), "node1").is_ok(), "released when dropped");
    }

    #[test]
    fn the_instance_id_is_kept_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let a = identity(dir.path()).unwrap();
        let b = identity(dir.path()).unwrap();
        assert_eq!(a.instance, b.instance);
        assert_eq!(a.instance.len(), 36, "a uuid: {}", a.instance);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(identity(other.path()).unwrap().instance, a.instance);
    }
}
