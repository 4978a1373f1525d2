//! Containment on the host's real cgroup2 hierarchy: a worker that
//! double-forks and calls `setsid` leaves its process group but not its
//! cgroup, and stop and the start-up sweep kill it.
//!
//! These tests need a writable cgroup2 mount (CI has one, as root); they
//! fail with the reason when the host has none.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, alive, ctx, read_pid, sh, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use understudy_core::spec::{ProcessSpec, ScriptSpec};
use understudy_drivers::cgroup::{self, Cgroups};
use understudy_drivers::process::ProcessDriver;
use understudy_drivers::script::ScriptDriver;
use understudy_drivers::{Driver, DriverEnv, ProcessRegistry};

const SHORT: Duration = Duration::from_secs(5);

/// The worker: a subshell starts `setsid sh` in the background and exits,
/// so the worker is orphaned, in a session of its own, and records its pid.
fn double_fork(pid_file: &Path) -> String {
    format!(
        "(setsid sh -c 'echo $$ > {f}.tmp; mv {f}.tmp {f}; exec sleep 300' &) ; ",
        f = pid_file.display()
    )
}

/// A state directory with a registry that contains in cgroups; removes
/// the node's subtree (killing anything left) when dropped.
struct Contained {
    env: TestEnv,
    cgroups: Cgroups,
    pids: Vec<i32>,
}

impl Contained {
    fn new() -> Contained {
        let env = TestEnv::new();
        std::fs::create_dir_all(env.state()).unwrap();
        let cgroups = Cgroups::setup(env.state(), "node1")
            .unwrap_or_else(|why| panic!("these tests need a writable cgroup2 hierarchy: {why}"));
        let registry = ProcessRegistry::new(env.state(), Box::new(|_| {})).with_cgroups(Some(cgroups.clone()));
        let mut env = env;
        env.env = DriverEnv {
            registry: Arc::new(registry),
            ..env.env.clone()
        };
        Contained {
            env,
            cgroups,
            pids: Vec::new(),
        }
    }

    fn env(&self) -> &DriverEnv {
        &self.env.env
    }

    fn watch(&mut self, pid: i32) -> i32 {
        self.pids.push(pid);
        pid
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        for &p in &self.pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let dir = self.cgroups.node_dir().to_path_buf();
        for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            cgroup::kill_and_wait(&child.path(), SHORT);
        }
        cgroup::remove(&dir);
    }
}

fn cgroup_of(pid: i32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    PathBuf::from(cgroup::own_cgroup(&text).unwrap())
}

fn process(command: Vec<String>) -> ProcessSpec {
    ProcessSpec {
        command,
        env: Vec::new(),
        cwd: None,
        user: None,
        stop_signal: "TERM".into(),
        log: None,
        check: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn stopping_a_process_kills_a_worker_that_left_its_process_group() {
    let mut t = Contained::new();
    let worker_file = t.env.path("worker.pid");
    let cmd = format!("{}exec sleep 300", double_fork(&worker_file));
    let d = ProcessDriver::new("app", &process(sh(&cmd)), SHORT, t.env());
    d.start(&ctx(SHORT)).await.unwrap();
    let worker = t.watch(read_pid(&worker_file));
    let leader = d.pid().await.unwrap();
    assert_ne!(
        nix::unistd::getsid(Some(Pid::from_raw(worker))).unwrap().as_raw(),
        leader,
        "the worker left the resource's session"
    );
    let dir = t.cgroups.dir("app");
    assert!(
        dir.ends_with(cgroup_of(worker).strip_prefix("/").unwrap()),
        "the worker is in the resource's cgroup {}: {}",
        dir.display(),
        cgroup_of(worker).display()
    );

    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(!alive(worker), "the worker outlived the stop");
    assert!(!alive(leader));
    assert!(!dir.exists(), "the emptied cgroup is removed");
}

#[tokio::test(flavor = "current_thread")]
async fn stopping_a_script_kills_the_daemon_its_start_left() {
    let mut t = Contained::new();
    let daemon_file = t.env.path("daemon.pid");
    let spec = ScriptSpec {
        start: sh(&format!("{}exit 0", double_fork(&daemon_file))),
        stop: sh("exit 0"),
        monitor: None,
        env: Vec::new(),
        cwd: None,
    };
    let d = ScriptDriver::new("job", &spec, t.env());
    d.start(&ctx(SHORT)).await.unwrap();
    let daemon = t.watch(read_pid(&daemon_file));
    assert!(alive(daemon), "a start may leave a daemon running");
    assert!(t.cgroups.resource_populated("job"));

    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(!alive(daemon), "the daemon outlived the stop");
}

#[tokio::test(flavor = "current_thread")]
async fn the_sweep_kills_what_an_earlier_run_left_and_only_that() {
    let mut t = Contained::new();
    let worker_file = t.env.path("worker.pid");
    let cmd = format!("{}exec sleep 300", double_fork(&worker_file));
    let d = ProcessDriver::new("app", &process(sh(&cmd)), SHORT, t.env());
    d.start(&ctx(SHORT)).await.unwrap();
    let worker = t.watch(read_pid(&worker_file));
    let leader = t.watch(d.pid().await.unwrap());
    // The earlier run ends without stopping anything (its leader would
    // die with it; the worker would not).
    std::mem::forget(d);
    kill(Pid::from_raw(leader), Signal::SIGKILL).unwrap();

    // Another node's agent on the same host has a subtree of its own.
    let other = Contained::new();
    let other_file = other.env.path("other.pid");
    let od = ProcessDriver::new(
        "app",
        &process(sh(&format!("echo $$ > {}; exec sleep 300", other_file.display()))),
        SHORT,
        other.env(),
    );
    od.start(&ctx(SHORT)).await.unwrap();
    let other_pid = read_pid(&other_file);

    let again = Cgroups::setup(t.env.state(), "node1").unwrap();
    assert_eq!(again, t.cgroups, "a restarted agent finds the same subtree");
    let found = cgroup::sweep(t.env.state(), Some(&again));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "app");
    assert!(found[0].1.contains(&worker), "{found:?}");
    assert!(found[0].2, "emptied");
    assert!(
        wait_until(SHORT, || !alive(worker)),
        "the leftover worker survived the sweep"
    );
    assert!(alive(other_pid), "another node's process on the same host was touched");
    od.stop(&ctx(SHORT)).await.unwrap();
}
