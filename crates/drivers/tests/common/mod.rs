//! Helpers shared by the driver tests: a scratch environment, bounded
//! polling, and guards that kill what a test started even when it fails.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use understudy_drivers::{DriverEnv, OpCtx, ProcessRegistry};

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The async twin of [`wait_until`], for use inside a tokio test while the
/// runtime must keep running.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `pid` names a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = text.rfind(')') else { return false };
    !matches!(text[close + 1..].trim_start().chars().next(), Some('Z' | 'X') | None)
}

/// Whether any live process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some(close) = text.rfind(')') else { return false };
        let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
        f.len() > 2 && !matches!(f[0], "Z" | "X") && f[2] == pgid.to_string()
    })
}

/// Kills process group(s) on drop, so a failing test leaves nothing behind.
#[derive(Default)]
pub struct GroupGuard(pub Vec<i32>);

impl GroupGuard {
    pub fn add(&mut self, pgid: i32) {
        if pgid > 1 {
            self.0.push(pgid);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        for &pgid in &self.0 {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// A scratch state and definition directory with a registry that records
/// every list it is handed.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub env: DriverEnv,
    pub changes: Arc<Mutex<Vec<Vec<i32>>>>,
    /// Process groups to kill when the test ends.
    pub guard: GroupGuard,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("def");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&base).unwrap();
        let changes: Arc<Mutex<Vec<Vec<i32>>>> = Arc::default();
        let sink = Arc::clone(&changes);
        let registry = ProcessRegistry::new(
            &state,
            Box::new(move |groups: &[(&str, i32)]| sink.lock().unwrap().push(groups.iter().map(|(_, g)| *g).collect())),
        );
        TestEnv {
            env: DriverEnv {
                base_dir: base,
                state_dir: state,
                registry: Arc::new(registry),
                sync: None,
            },
            dir,
            changes,
            guard: GroupGuard::default(),
        }
    }

    pub fn base(&self) -> &Path {
        &self.env.base_dir
    }

    pub fn state(&self) -> &Path {
        &self.env.state_dir
    }

    /// A path in the scratch directory (outside base and state).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes an executable shell script into the definition directory.
    pub fn script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.base().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

pub fn ctx(timeout: Duration) -> OpCtx {
    OpCtx {
        node: "node1".into(),
        group: "g".into(),
        token: Some(42),
        timeout,
    }
}

pub fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Reads a pid written to `file` by a test command, waiting for it.
pub fn read_pid(file: &Path) -> i32 {
    let mut pid = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            pid = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok());
            pid.is_some()
        }),
        "no pid in {}",
        file.display()
    );
    pid.unwrap()
}
