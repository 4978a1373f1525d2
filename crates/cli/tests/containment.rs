//! Containment on real agent processes: whatever a resource starts dies with
//! its authority, even a worker that left its session, and one agent per
//! node.
//!
//! Every resource here double-forks a worker that calls `setsid`: it leaves
//! the resource's process group, so only its cgroup still holds it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{NODES, Snapshot, TestCluster, alive};
use nix::sys::signal::Signal;
use understudy_core::agent::EntryKind;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(20);

/// Starts a worker that leaves the session, records its pid in
/// `NAME.NODE.pid`, then sleeps.
const FORK: &str = r#"#!/bin/sh
(setsid sh -c "echo \$\$ > $1.$UNDERSTUDY_NODE.pid.tmp && mv $1.$UNDERSTUDY_NODE.pid.tmp $1.$UNDERSTUDY_NODE.pid; exec sleep 300" &)
exec sleep 300
"#;

fn definition() -> String {
    r#"
[cluster]
name = "it"
coordinator = { embedded = { path = "coordinator.db" } }
lease_ttl = "1s"
renew_interval = "250ms"
fence_margin = "250ms"

[[node]]
name = "node1"
address = "127.0.0.11/8"
priority = 1

[[node]]
name = "node2"
address = "127.0.0.12/8"
priority = 2

[[node]]
name = "node3"
address = "127.0.0.13/8"
priority = 3

[group.web]
monitor = { interval = "300ms", timeout = "250ms" }

[group.web.resource.worker]
kind = "process"
command = ["./fork", "worker"]

[group.web.resource.agent-of-web]
kind = "process"
command = ["./fork", "clone"]
clone = true
"#
    .to_string()
}

async fn cluster() -> TestCluster {
    let c = TestCluster::new(&definition()).await;
    let fork = c.dir.path().join("fork");
    std::fs::write(&fork, FORK).unwrap();
    std::fs::set_permissions(&fork, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    c
}

/// The pid a worker recorded, once its file exists.
fn worker_pid(c: &TestCluster, name: &str, node: &str) -> Option<i32> {
    std::fs::read_to_string(c.dir.path().join(format!("{name}.{node}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn settled(s: &Snapshot) -> bool {
    s.running_on("web", &["worker"]).is_some()
        && NODES
            .iter()
            .all(|n| s.view.nodes.contains_key(*n) && s.state(n, "agent-of-web") == Some("running"))
}

/// Waits (bounded) until the workers of `node` have recorded their pids.
fn workers_of(c: &TestCluster, node: &str, names: &[&str]) -> Vec<i32> {
    let deadline = Instant::now() + WAIT;
    loop {
        let pids: Vec<Option<i32>> = names.iter().map(|n| worker_pid(c, n, node)).collect();
        if pids.iter().all(Option::is_some) {
            return pids.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "the workers of {node} never recorded their pids"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the processes on drop (a failed test leaves no worker behind; the
/// cluster's own drop removes the cgroups).
struct Pids(Vec<i32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

fn wait_dead(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "{what}: {pids:?} still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The fence guard of `agent` (its child running `fence-guard`).
fn guard_of(agent: u32) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(agent) && String::from_utf8_lossy(&cmdline).contains("fence-guard") {
            return pid;
        }
    }
    panic!("agent {agent} has no fence guard");
}

#[tokio::test(flavor = "current_thread")]
async fn workers_that_left_their_session_die_with_a_killed_agent() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    c.start_all();
    let snap = c.wait_for("web and the clones running", WAIT, settled).await;
    let owner = snap.owner("web").unwrap().to_string();
    let workers = Pids(workers_of(&c, &owner, &["worker", "clone"]));
    assert!(workers.0.iter().all(|&p| alive(p)));

    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    let snap = c
        .wait_for("web running on another node", WAIT, |s| {
            s.running_on("web", &["worker"]).is_some_and(|n| n != owner)
        })
        .await;
    let new_owner = snap.owner("web").unwrap().to_string();
    // The guard acted when the agent died, long before the lease expired:
    // the group's worker is gone by the time another node runs the group,
    // and the clone's worker too (everything the agent started).
    assert!(
        !alive(workers.0[0]),
        "the dead owner's worker still runs while {new_owner} runs the group"
    );
    wait_dead(&workers.0[1..], "the dead agent's clone worker");
    // Having taken everything away, the guard revoked the dead agent's
    // session (so the group moved at once): its report says so once the
    // agent is back.
    c.agents.reap();
    c.agents.start(&owner).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let journal = c.journal().await;
        if let Some(e) = journal
            .iter()
            .find(|e| e.node == owner && e.entry.kind == EntryKind::GuardFired)
        {
            assert!(e.entry.message.contains("the agent is gone"), "{}", e.entry.message);
            assert!(e.entry.message.contains("revoked session lease"), "{}", e.entry.message);
            break;
        }
        assert!(Instant::now() < deadline, "no guard report\n{}", c.logs());
        // The journal has no watch: poll it, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_agent_kills_what_an_agent_killed_with_its_guard_left() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    c.start_all();
    let snap = c.wait_for("web and the clones running", WAIT, settled).await;
    let owner = snap.owner("web").unwrap().to_string();
    let workers = Pids(workers_of(&c, &owner, &["worker", "clone"]));
    let agent = c.agents.pid(&owner).unwrap();
    let guard = guard_of(agent);

    // Agent and guard die together: nothing is left to take the workers
    // away until the agent is back.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guard), Signal::SIGKILL).unwrap();
    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    c.agents.wait(&owner, WAIT).unwrap();
    c.agents.reap();
    let restarted = c.agents.start(&owner).unwrap();
    c.wait_for("the restarted agent registered", WAIT, |s| {
        s.view
            .nodes
            .get(&owner)
            .and_then(|r| r.agent.as_ref())
            .is_some_and(|a| a.pid == restarted)
    })
    .await;
    wait_dead(&workers.0, "the restarted agent's sweep");
    let deadline = Instant::now() + WAIT;
    loop {
        let journal = c.journal().await;
        let swept: Vec<String> = journal
            .iter()
            .filter(|e| e.node == owner && e.entry.kind == EntryKind::LeftoverStopped)
            .filter_map(|e| e.entry.resource.clone())
            .collect();
        if swept.iter().any(|r| r == "worker") && swept.iter().any(|r| r == "agent-of-web") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sweep is not in the journal: {swept:?}\n{}",
            c.logs()
        );
        // The journal has no watch: poll it, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn agent_command(c: &TestCluster, node: &str, state: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["agent", "--node", node, "--config"])
        .arg(c.config())
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_agent_for_a_node_is_refused_and_touches_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    c.start_all();
    let snap = c.wait_for("web and the clones running", WAIT, settled).await;
    let owner = snap.owner("web").unwrap().to_string();
    let token = snap.view.owners["web"].token;
    let workers = Pids(workers_of(&c, &owner, &["worker", "clone"]));
    let before = c.journal().await.len();

    // On this host: the same state directory is locked.
    let out = agent_command(&c, &owner, &c.agents.state_dir(&owner));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let pid = c.agents.pid(&owner).unwrap();
    assert!(
        stderr.contains(&format!("already running on this host (pid {pid}")),
        "{stderr}"
    );

    // From elsewhere (another state directory, as on another host): the
    // live registration names the running agent.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = agent_command(&c, &owner, elsewhere.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("already registered by another agent") && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );

    // Neither touched anything.
    let snap = c.snapshot().await;
    assert_eq!(snap.owner("web"), Some(owner.as_str()));
    assert_eq!(snap.view.owners["web"].token, token, "no new campaign");
    assert!(
        workers.0.iter().all(|&p| alive(p)),
        "the running node's processes are untouched"
    );
    let journal = c.journal().await;
    let added: Vec<_> = journal[before..]
        .iter()
        .filter(|e| e.node == owner)
        .map(|e| (e.entry.kind, e.entry.message.clone()))
        .collect();
    assert!(
        added.iter().all(|(k, _)| *k != EntryKind::LeftoverStopped),
        "a refused agent swept: {added:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_guard_is_replaced_and_the_new_one_fences_a_paused_owner() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    c.start_all();
    let snap = c.wait_for("web and the clones running", WAIT, settled).await;
    let owner = snap.owner("web").unwrap().to_string();
    let token = snap.view.owners["web"].token;
    let workers = Pids(workers_of(&c, &owner, &["worker"]));
    let agent = c.agents.pid(&owner).unwrap();
    let guard = guard_of(agent);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guard), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + WAIT;
    let replaced = loop {
        let journal = c.journal().await;
        if let Some(e) = journal
            .iter()
            .find(|e| e.node == owner && e.entry.kind == EntryKind::GuardRestarted)
        {
            break e.entry.message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the dead guard was not replaced\n{}",
            c.logs()
        );
        // The journal has no watch: poll it, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let new_guard = guard_of(agent);
    assert_ne!(new_guard, guard);
    assert!(replaced.contains(&format!("pid {new_guard}")), "{replaced}");
    let snap = c.snapshot().await;
    assert_eq!(
        snap.owner("web"),
        Some(owner.as_str()),
        "losing the guard is no failover"
    );
    assert_eq!(snap.view.owners["web"].token, token);

    // The new guard knows the deadline and what is held: a paused owner's
    // worker dies before another node runs the group.
    c.agents.signal(&owner, Signal::SIGSTOP).unwrap();
    let snap = c
        .wait_for("web running on another node", WAIT, |s| {
            s.running_on("web", &["worker"]).is_some_and(|n| n != owner)
        })
        .await;
    assert!(
        !alive(workers.0[0]),
        "the paused owner's worker runs beside {}'s",
        snap.owner("web").unwrap()
    );
    c.agents.signal(&owner, Signal::SIGCONT).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn sweep_is_refused_while_the_agent_runs_and_kills_what_a_dead_one_left() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    c.start_all();
    let snap = c.wait_for("web and the clones running", WAIT, settled).await;
    let owner = snap.owner("web").unwrap().to_string();
    let workers = Pids(workers_of(&c, &owner, &["worker", "clone"]));
    let state = c.agents.state_dir(&owner);
    let sweep = || {
        Command::new(env!("CARGO_BIN_EXE_understudy"))
            .args(["sweep", "--node", &owner, "--state-dir"])
            .arg(&state)
            .output()
            .unwrap()
    };
    let out = sweep();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(workers.0.iter().all(|&p| alive(p)), "a refused sweep touched nothing");

    // The agent and its guard die together, as under systemd's ExecStopPost
    // after a crash that took both.
    let agent = c.agents.pid(&owner).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guard_of(agent)), Signal::SIGKILL).unwrap();
    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    c.agents.wait(&owner, WAIT).unwrap();
    let out = sweep();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("worker: killed") && stdout.contains("agent-of-web: killed"),
        "{stdout}"
    );
    wait_dead(&workers.0, "after the sweep");
}
