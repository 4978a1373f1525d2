//! A cluster of agent processes on this host, sharing one embedded
//! coordinator: what `understudy demo`, the integration tests and the
//! failover benchmark run.
//!
//! Each agent runs as `understudy agent --config … --node …` in its own
//! process group (so a terminal's Ctrl-C reaches only the caller), with its
//! state directory at `DIR/NODE/`, its log at `DIR/NODE/agent.log` and its
//! pid in `DIR/NODE/agent.pid`. Dropping a `LocalCluster` kills every agent
//! it started (their resources die with them). The coordinator's store is
//! created explicitly ([`LocalCluster::init`], or by the caller) before the
//! first agent starts: agents never create it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Agents get SIGTERM when the process (thread) that started them dies, so
/// a killed demo or test does not leave a cluster behind.
trait StopWithParent {
    fn stop_with_parent(&mut self) -> &mut Self;
}

impl StopWithParent for Command {
    #[allow(unsafe_code)]
    fn stop_with_parent(&mut self) -> &mut Self {
        // SAFETY: the closure runs between fork and exec and only makes the
        // async-signal-safe prctl(2) system call.
        unsafe { self.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::other)) }
    }
}

/// Makes the `Command` that runs a node's agent program (e.g. one that
/// enters the node's network namespace first).
pub type CommandFactory = Box<dyn Fn(&str, &Path) -> Command + Send>;

pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    agents: BTreeMap<String, Child>,
    /// Every node started at least once: its cgroups are removed on drop.
    started: std::collections::BTreeSet<String>,
    command: CommandFactory,
}

impl LocalCluster {
    /// A cluster whose definition is `config`, with agents' state under `dir`.
    pub fn new(exe: &Path, dir: &Path, config: &Path) -> LocalCluster {
        LocalCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            agents: BTreeMap::new(),
            started: std::collections::BTreeSet::new(),
            command: Box::new(|_, exe| Command::new(exe)),
        }
    }

    /// Runs each node's agent through `factory(node, exe)` instead of
    /// `Command::new(exe)`.
    pub fn with_command(mut self, factory: CommandFactory) -> LocalCluster {
        self.command = factory;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }

    pub fn log_path(&self, node: &str) -> PathBuf {
        self.state_dir(node).join("agent.log")
    }

    /// Creates the definition's coordinator store (`understudy init`); an
    /// embedded store must exist before the first agent starts (agents wait
    /// for it, and never create it).
    pub fn init(&self) -> io::Result<()> {
        let out = Command::new(&self.exe)
            .arg("init")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {} init: {e}", self.exe.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "understudy init failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Starts `node`'s agent (replacing a dead one). Returns its pid.
    pub fn start(&mut self, node: &str) -> io::Result<u32> {
        self.start_with(node, &[])
    }

    /// Starts `node`'s agent with extra arguments (e.g. `--join-new-store`).
    pub fn start_with(&mut self, node: &str, extra: &[&str]) -> io::Result<u32> {
        if let Some(pid) = self.pid(node) {
            return Ok(pid);
        }
        let state = self.state_dir(node);
        fs::create_dir_all(&state)?;
        let log = File::options().create(true).append(true).open(self.log_path(node))?;
        let child = (self.command)(node, &self.exe)
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(node)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .stop_with_parent()
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {} agent: {e}", self.exe.display())))?;
        let pid = child.id();
        fs::write(state.join("agent.pid"), format!("{pid}\n"))?;
        self.agents.insert(node.to_string(), child);
        self.started.insert(node.to_string());
        Ok(pid)
    }

    /// The pid of `node`'s agent if it is running.
    pub fn pid(&mut self, node: &str) -> Option<u32> {
        let child = self.agents.get_mut(node)?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// Sends `signal` to `node`'s agent.
    pub fn signal(&mut self, node: &str, signal: Signal) -> io::Result<()> {
        let pid = self
            .pid(node)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{node}'s agent is not running")))?;
        let pid = i32::try_from(pid).map_err(io::Error::other)?;
        kill(Pid::from_raw(pid), signal).map_err(io::Error::other)
    }

    /// Waits up to `timeout` for `node`'s agent to exit; returns its status.
    pub fn wait(&mut self, node: &str, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let Some(child) = self.agents.get_mut(node) else {
            return Ok(None);
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Agents that exited since the last call, with their status.
    pub fn reap(&mut self) -> Vec<(String, ExitStatus)> {
        let mut out = Vec::new();
        self.agents.retain(|node, child| match child.try_wait() {
            Ok(Some(status)) => {
                out.push((node.clone(), status));
                false
            }
            _ => true,
        });
        out
    }

    /// Asks every agent to stop (SIGTERM: groups are stopped in order), then
    /// kills what is still running after `timeout`.
    pub fn stop_all(&mut self, timeout: Duration) {
        for child in self.agents.values() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let start = Instant::now();
        while start.elapsed() < timeout && self.agents.values_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.agents) {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.kill_all();
        // Nothing an agent started outlives the cluster, and no cgroup is
        // left behind on the host.
        for node in &self.started {
            for (resource, pids, _) in understudy_drivers::cgroup::sweep(&self.state_dir(node), None) {
                tracing::debug!("{node}: killed {pids:?} left in the cgroup of {resource}");
            }
        }
    }
}
