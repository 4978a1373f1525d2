//! The fence guard: a small separate process that kills the owned groups'
//! processes when the agent can no longer vouch for its lease.
//!
//! Why a separate process: an agent that is paused (SIGSTOP, a long GC-like
//! stall, a frozen VM thread) cannot stop anything, yet its resources keep
//! running. The guard is told the self-fencing deadline after every renewal
//! (`deadline MS`, CLOCK_MONOTONIC milliseconds) and the process groups of
//! owned resources (`pgids A B C`). If the deadline passes without a newer
//! one, it SIGKILLs those groups — before the coordinator can expire the
//! lease and let another node start the group. If the agent dies (its end
//! of the pipe closes), it kills them too and exits.
//!
//! It runs in its own process group, so signals aimed at the agent's group
//! (a terminal's Ctrl-C, `kill -STOP -PGID`) do not reach it.
//!
//! Architecture invariant: the guard is std-only and does nothing but wait
//! and kill; it holds no lock the agent could hold.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::clock;

/// The agent's handle on its guard.
pub struct Guard {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
}

impl Guard {
    /// Starts `exe fence-guard` (the `understudy` binary).
    pub fn spawn(exe: &Path) -> io::Result<Guard> {
        let mut child = Command::new(exe)
            .arg("fence-guard")
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the fence guard {}: {e}", exe.display())))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the fence guard has no stdin pipe"))?;
        Ok(Guard {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
        })
    }

    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()) {
            tracing::error!("cannot reach the fence guard: {e}");
        }
    }

    /// Kill owned processes if no newer deadline arrives before `deadline_ms`
    /// (CLOCK_MONOTONIC milliseconds).
    pub fn arm(&self, deadline_ms: u64) {
        self.send(&format!("deadline {deadline_ms}\n"));
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

/// The guard's main loop (`understudy fence-guard`). Returns when the agent
/// is gone.
pub fn run() -> io::Result<()> {
    let stdin = io::stdin();
    let mut deadline: Option<u64> = None;
    let mut pgids: Vec<i32> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let now = clock::mono().as_millis();
        if let Some(d) = deadline
            && now >= d
            && !pgids.is_empty()
        {
            kill_all(&pgids);
            eprintln!(
                "{} understudy fence-guard: lease deadline passed {} ms ago without renewal; killed process groups {:?}",
                humantime::format_rfc3339_millis(std::time::SystemTime::now()),
                now - d,
                pgids
            );
            pgids.clear();
        }
        let wait_ms = match deadline {
            Some(d) if !pgids.is_empty() => d.saturating_sub(now).clamp(1, 1_000),
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
            if !pgids.is_empty() {
                kill_all(&pgids);
                eprintln!(
                    "{} understudy fence-guard: the agent is gone; killed process groups {pgids:?}",
                    humantime::format_rfc3339_millis(std::time::SystemTime::now())
                );
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
                Some("pgids") => pgids = words.filter_map(|w| w.parse().ok()).collect(),
                _ => {}
            }
        }
    }
}

fn kill_all(pgids: &[i32]) {
    for &pgid in pgids {
        if pgid > 1 {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}
