//! The embedded coordinator under abuse, with real agent processes: the
//! store deleted, renamed, truncated or re-created under running agents, and
//! an agent whose clocks are an hour off (a time namespace).
//!
//! Tests here run one at a time (lease timing is what they test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NODES, TestCluster, WEB, alive, definition};
use nix::sys::signal::Signal;
use understudy_agent::keys::Keys;
use understudy_agent::local::CommandFactory;
use understudy_coord::sqlite::SqliteCoordinator;
use understudy_core::agent::EntryKind;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TTL_MS: u64 = 1_000;
const WAIT: Duration = Duration::from_secs(20);

fn understudy(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn store(c: &TestCluster) -> PathBuf {
    c.dir.path().join("coordinator.db")
}

async fn running_cluster(c: &mut TestCluster) -> String {
    c.start_all();
    let snap = c
        .wait_for("web running with all three nodes registered", WAIT, |s| {
            s.running_on("web", &WEB).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
        })
        .await;
    snap.owner("web").unwrap().to_string()
}

/// Waits (bounded) until `node`'s agent log contains `needle` `times` times.
async fn wait_for_log(c: &TestCluster, node: &str, needle: &str, times: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(c.agents.log_path(node)).unwrap_or_default();
        if log.matches(needle).count() >= times {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {times}× {needle:?} in {node}'s log\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until none of `pids` runs.
async fn wait_dead(c: &TestCluster, pids: &[i32], what: &str) {
    let deadline = Instant::now() + WAIT;
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "{what}: still running\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The web processes (database, app, frontend) of every node that are
/// alive, from every record of each node's process registry.
fn running_web(c: &TestCluster) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for n in NODES {
        let text = std::fs::read_to_string(c.agents.state_dir(n).join("processes")).unwrap_or_default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut fields = line.split_whitespace();
            let (Some(pid), Some(resource)) = (fields.next(), fields.nth(1)) else {
                continue;
            };
            if let Ok(pid) = pid.parse::<i32>()
                && WEB.contains(&resource)
                && alive(pid)
                && !out.contains(&(n.to_string(), pid))
            {
                out.push((n.to_string(), pid));
            }
        }
    }
    out
}

/// Every agent fences with a clear record when the store's path stops
/// naming its file, and the owner's processes die; the agents keep running.
async fn all_fence(c: &mut TestCluster, owner: &str, why: &str) {
    let pids: Vec<i32> = WEB.iter().map(|r| c.pid_of(owner, r).unwrap()).collect();
    for n in NODES {
        let log = wait_for_log(c, n, "fencing: the coordinator store is lost", 1).await;
        assert!(log.contains(why), "{n}'s record does not say {why:?}:\n{log}");
    }
    wait_dead(c, &pids, "the owner's processes after the store was lost").await;
    assert!(running_web(c).is_empty(), "web still runs: {:?}", running_web(c));
    for n in NODES {
        assert!(c.agents.pid(n).is_some(), "{n}'s agent exited\n{}", c.logs());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_deleted_store_fences_every_agent_and_is_never_recreated_behind_their_back() {
    let _serial = SERIAL.lock().await;
    let mut c = TestCluster::new(&definition(TTL_MS)).await;
    let owner = running_cluster(&mut c).await;
    let db = store(&c);
    std::fs::remove_file(&db).unwrap();
    all_fence(&mut c, &owner, "no longer exists").await;

    // Read commands say so and create nothing.
    for args in [&["status"][..], &["events"], &["move", "web"], &["maintenance", "on"]] {
        let out = understudy(&c.config(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("no coordinator at {}", db.display())),
            "{args:?}: {stderr}"
        );
        assert!(!db.exists(), "`understudy {args:?}` created a store");
    }
    // `init` refuses while the old store's WAL is in use.
    let out = understudy(&c.config(), &["init"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists without the store it belongs to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!db.exists());

    // A restarted agent waits for its store instead of exiting.
    c.agents.signal("node2", Signal::SIGKILL).unwrap();
    c.agents.wait("node2", WAIT).unwrap();
    c.agents.reap();
    c.agents.start("node2").unwrap();
    wait_for_log(&c, "node2", "cannot join cluster `it`: no coordinator at", 2).await;
    assert!(c.agents.pid("node2").is_some(), "the restarted agent exited");

    // The old cluster stopped: the WAL goes, `init` makes a new store, and
    // agents that were members of the old one refuse it...
    c.agents.stop_all(WAIT);
    for sidecar in ["coordinator.db-wal", "coordinator.db-shm"] {
        let _ = std::fs::remove_file(c.dir.path().join(sidecar));
    }
    let out = understudy(&c.config(), &["init"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = SqliteCoordinator::open(&db).await.unwrap();
    c.coord = Arc::new(fresh);
    c.agents.start("node1").unwrap();
    wait_for_log(&c, "node1", "this node was a member of the store with id", 2).await;
    assert!(c.agents.pid("node1").is_some(), "the refusing agent exited");
    assert!(
        c.snapshot().await.view.nodes.is_empty(),
        "the refusing agent registered in the new store"
    );
    // ...unless told to.
    c.agents.signal("node1", Signal::SIGTERM).unwrap();
    let status = c.agents.wait("node1", WAIT).unwrap().expect("node1 stopped on SIGTERM");
    assert!(status.success(), "a waiting agent stops cleanly on SIGTERM: {status}");
    c.agents.reap();
    c.agents.start_with("node1", &["--join-new-store"]).unwrap();
    c.wait_for("node1 running web on the new store", WAIT, |s| {
        s.running_on("web", &WEB).as_deref() == Some("node1")
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_renamed_away_fences_the_agents_until_it_is_back() {
    let _serial = SERIAL.lock().await;
    let mut c = TestCluster::new(&definition(TTL_MS)).await;
    let owner = running_cluster(&mut c).await;
    let old_token = c.snapshot().await.view.owners["web"].token;
    let aside = c.dir.path().join("aside.db");
    let renamed_at = common::wall_ms();
    std::fs::rename(store(&c), &aside).unwrap();
    all_fence(&mut c, &owner, "no longer exists").await;
    let healed_at = common::wall_ms();
    // Renamed back: the same file is the store again and the cluster heals
    // by itself, with web on exactly one node.
    std::fs::rename(&aside, store(&c)).unwrap();
    // (The old sessions' leases expire first: nobody renewed them.)
    c.wait_for("web running again under a new owner key", WAIT, |s| {
        s.running_on("web", &WEB).is_some()
            && s.view.owners["web"].token > old_token
            && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
    })
    .await;
    let running = running_web(&c);
    assert_eq!(running.len(), WEB.len(), "web runs once: {running:?}");
    // What happened while the store was away is in the journal, with the
    // times it happened: the outage, then the owner's fencing and stops.
    let deadline = Instant::now() + WAIT;
    loop {
        let journal = c.journal().await;
        let during = |kind: EntryKind| {
            journal
                .iter()
                .any(|e| e.node == owner && e.entry.kind == kind && e.at >= renamed_at && e.at <= healed_at)
        };
        if during(EntryKind::CoordinatorUnreachable) && during(EntryKind::Fenced) && during(EntryKind::Stopped) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outage's records did not reach the journal: {:?}",
            journal
                .iter()
                .filter(|e| e.node == owner && e.at >= renamed_at)
                .map(|e| (e.at, e.entry.kind, e.entry.message.clone()))
                .collect::<Vec<_>>()
        );
        // The journal has no watch: poll it, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_truncated_store_fences_the_agents_and_restarted_agents_wait() {
    let _serial = SERIAL.lock().await;
    let mut c = TestCluster::new(&definition(TTL_MS)).await;
    let owner = running_cluster(&mut c).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(store(&c))
        .unwrap()
        .set_len(0)
        .unwrap();
    all_fence(&mut c, &owner, "truncated").await;
    let out = understudy(&c.config(), &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no coordinator at") && stderr.contains("not a coordinator store"),
        "{stderr}"
    );
    // A restarted agent waits (with a backoff), it does not crash-loop.
    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    c.agents.wait(&owner, WAIT).unwrap();
    c.agents.reap();
    c.agents.start(&owner).unwrap();
    wait_for_log(&c, &owner, "cannot join cluster `it`", 2).await;
    assert!(c.agents.pid(&owner).is_some(), "the restarted agent exited");
    assert!(running_web(&c).is_empty());
}

// ---------------------------------------------------------------------------
// Clocks.

/// The host's uptime in whole seconds (a boot-time offset cannot take the
/// clock below zero).
fn uptime_secs() -> i64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap();
    text.split('.').next().unwrap().parse().unwrap()
}

/// Node1's agent runs in a time namespace whose boot-time and monotonic
/// clocks are `offset` seconds off the host's. Nothing flaps, nothing runs
/// twice, and when node1 dies its group moves within a few TTLs.
async fn a_skewed_agent_disturbs_nobody(offset: i64) {
    let skewed = "node1";
    let dir = TestCluster::prepare(&definition(TTL_MS));
    let coord = SqliteCoordinator::create(&dir.path().join("coordinator.db"))
        .await
        .unwrap();
    let factory: CommandFactory = Box::new(move |node, exe| {
        if node == skewed {
            let mut cmd = Command::new("unshare");
            let off = offset.to_string();
            cmd.args(["--time", "--boottime", &off, "--monotonic", &off, "--"])
                .arg(exe);
            cmd
        } else {
            Command::new(exe)
        }
    });
    let mut c = TestCluster::with(dir, Arc::new(coord), Keys::new("/understudy", "it"), Some(factory));
    let owner = running_cluster(&mut c).await;
    // Five TTLs: the web group never on two nodes, every node registered.
    let two_or_gone = |s: &common::Snapshot| {
        let on = NODES
            .iter()
            .filter(|n| {
                WEB.iter()
                    .any(|r| matches!(s.state(n, r), Some("running" | "starting")))
            })
            .count();
        on > 1 || !NODES.iter().all(|n| s.view.nodes.contains_key(*n))
    };
    let quiet = tokio::time::timeout(
        Duration::from_millis(5 * TTL_MS),
        c.wait_for("web on two nodes or a node gone", WAIT, two_or_gone),
    )
    .await;
    assert!(
        quiet.is_err(),
        "a node flapped or web ran twice (node1 {offset} s off)\n{}",
        c.logs()
    );
    let journal = c.journal().await;
    for n in NODES {
        let count = |k: EntryKind| journal.iter().filter(|e| e.node == n && e.entry.kind == k).count();
        assert_eq!(
            count(EntryKind::SessionOpened),
            1,
            "{n}'s sessions (node1 {offset} s off)"
        );
        assert_eq!(
            count(EntryKind::SessionLost) + count(EntryKind::Fenced),
            0,
            "{n} lost its session"
        );
        assert_eq!(count(EntryKind::Restarting), 0, "{n} restarted something");
    }
    // The owner dies: the group moves within a few TTLs, not after the skew.
    let t0 = Instant::now();
    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    c.wait_for("web running on another node", Duration::from_secs(10), |s| {
        s.running_on("web", &WEB).is_some_and(|n| n != owner)
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    let running = running_web(&c);
    assert_eq!(running.len(), WEB.len(), "web runs once: {running:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_an_hour_ahead_disturbs_nobody() {
    let _serial = SERIAL.lock().await;
    a_skewed_agent_disturbs_nobody(3600).await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_behind_disturbs_nobody() {
    let _serial = SERIAL.lock().await;
    // As far behind as the host's uptime allows (at most an hour).
    a_skewed_agent_disturbs_nobody(-(uptime_secs() - 5).clamp(1, 3600)).await;
}
