//! A 3-agent cluster of real processes on the embedded coordinator: start
//! order, crash failover, restart then failover, a paused owner, maintenance,
//! and a dead owner's systemd unit taken away by its fence guard.
//!
//! Tests here run one at a time (they share the machine's two cores, and
//! lease timing is what they test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{NODES, TestCluster, WEB, alive, definition, entries};
use nix::sys::signal::Signal;
use understudy_agent::keys::Keys;
use understudy_agent::local::CommandFactory;
use understudy_coord::sqlite::SqliteCoordinator;
use understudy_core::agent::EntryKind;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TTL_MS: u64 = 1_000;
const WAIT: Duration = Duration::from_secs(20);

async fn running_cluster() -> (TestCluster, String) {
    let mut c = TestCluster::new(&definition(TTL_MS)).await;
    c.start_all();
    let snap = c
        .wait_for("web running with all three nodes registered", WAIT, |s| {
            s.running_on("web", &WEB).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
        })
        .await;
    let owner = snap.owner("web").unwrap().to_string();
    (c, owner)
}

fn understudy(c: &TestCluster, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(args)
        .arg("--config")
        .arg(c.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "understudy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kill_pid(pid: i32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn resources_start_in_dependency_order_and_status_reports_them() {
    let _serial = SERIAL.lock().await;
    let (c, owner) = running_cluster().await;
    let journal = c.journal().await;
    let started = |r: &str| {
        journal
            .iter()
            .position(|e| {
                e.node == owner && e.entry.kind == EntryKind::Started && e.entry.resource.as_deref() == Some(r)
            })
            .unwrap_or_else(|| panic!("no `started` for {r} on {owner}"))
    };
    let starting = |r: &str| {
        journal
            .iter()
            .position(|e| {
                e.node == owner && e.entry.kind == EntryKind::Starting && e.entry.resource.as_deref() == Some(r)
            })
            .unwrap()
    };
    let acquired = journal
        .iter()
        .position(|e| e.node == owner && e.entry.kind == EntryKind::Acquired && e.entry.group.as_deref() == Some("web"))
        .expect("the owner recorded acquiring the group");
    assert!(acquired < starting("database"), "nothing starts before ownership");
    assert!(started("database") < starting("app"), "app starts after database is up");
    assert!(started("app") < starting("frontend"), "frontend starts after app is up");
    // The clone runs everywhere; the monitor-only check is never started.
    let snap = c
        .wait_for("the clone on every node and a first monitor result", WAIT, |s| {
            NODES.iter().all(|n| s.state(n, "metrics") == Some("running"))
                && s.status[&owner]["resources"]["database"]["last_monitor"]["health"] == "running"
        })
        .await;
    assert!(entries(&journal, &owner, EntryKind::Starting, "health").is_empty());
    assert_eq!(snap.owner("web"), Some(owner.as_str()));

    let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["status", "--json", "--config"])
        .arg(c.config())
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["groups"][0]["owner"], owner.as_str());
    assert_eq!(status["groups"][0]["state"], "running");
    assert_eq!(status["groups"][0]["resources"][0]["last_monitor"], "ok");
}

#[tokio::test(flavor = "current_thread")]
async fn kill_9_of_the_owner_moves_the_group_and_its_processes_die() {
    let _serial = SERIAL.lock().await;
    let (mut c, owner) = running_cluster().await;
    let old_token = c.snapshot().await.view.owners["web"].token;
    let pids: Vec<i32> = WEB.iter().map(|r| c.pid_of(&owner, r).unwrap()).collect();
    assert!(pids.iter().all(|&p| alive(p)));
    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    let snap = c
        .wait_for("web running on another node", WAIT, |s| {
            s.running_on("web", &WEB).is_some_and(|n| n != owner)
        })
        .await;
    for pid in pids {
        assert!(!alive(pid), "process {pid} of the crashed owner is still running");
    }
    assert!(snap.view.owners["web"].token > old_token, "a new fencing token");
    assert!(
        !snap.view.nodes.contains_key(&owner),
        "the crashed node's registration expired"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_process_is_restarted_then_the_group_fails_over() {
    let _serial = SERIAL.lock().await;
    let (c, owner) = running_cluster().await;
    // Two restarts are allowed within a minute.
    for round in 1..=2u64 {
        let pid = c.pid_of(&owner, "app").unwrap();
        kill_pid(pid, Signal::SIGKILL);
        c.wait_for(&format!("restart {round} of app"), WAIT, |s| {
            let restarts = s
                .status
                .get(&owner)
                .and_then(|v| v["resources"]["app"]["restarts"].as_u64());
            restarts == Some(round) && s.running_on("web", &WEB).as_deref() == Some(owner.as_str())
        })
        .await;
        assert_ne!(c.pid_of(&owner, "app"), Some(pid), "a new process");
    }
    let pid = c.pid_of(&owner, "app").unwrap();
    kill_pid(pid, Signal::SIGKILL);
    let snap = c
        .wait_for("web failed over after the restart limit", WAIT, |s| {
            s.running_on("web", &WEB).is_some_and(|n| n != owner)
        })
        .await;
    let journal = c.journal().await;
    assert_eq!(entries(&journal, &owner, EntryKind::Restarting, "app").len(), 2);
    assert_eq!(entries(&journal, &owner, EntryKind::FailingOver, "app").len(), 1);
    let failures = &snap.view.failures["web"];
    let mine: Vec<_> = failures.iter().filter(|f| f.node == owner).collect();
    assert_eq!(mine.len(), 1, "the failure is recorded once: {failures:?}");
    assert!(!mine[0].id.is_empty(), "a failure record has an id: {failures:?}");
    // The old owner stopped everything of the group in reverse order.
    let stopped = |r: &str| {
        journal
            .iter()
            .rposition(|e| {
                e.node == owner && e.entry.kind == EntryKind::Stopped && e.entry.resource.as_deref() == Some(r)
            })
            .unwrap()
    };
    assert!(stopped("frontend") < stopped("app") && stopped("app") < stopped("database"));
}

/// Three nodes, one group `web` with one `sync` resource replicating `file`
/// (the agents share this host's filesystem, so they share the file). TTL
/// 2 s: the urgent stop of a fenced owner gets 300 ms.
fn sync_definition(file: &str) -> String {
    format!(
        r#"
[cluster]
name = "it"
coordinator = {{ embedded = {{ path = "coordinator.db" }} }}
lease_ttl = "2s"
renew_interval = "400ms"
fence_margin = "600ms"

[[node]]
name = "node1"
address = "127.0.0.11/8"

[[node]]
name = "node2"
address = "127.0.0.12/8"

[[node]]
name = "node3"
address = "127.0.0.13/8"

[group.web]
monitor = {{ interval = "200ms", timeout = "1s", restarts = 2, within = "1m" }}

[group.web.resource.settings]
kind = "sync"
paths = ["{file}"]
"#
    )
}

/// The text of `file` in the stored copy `kv` of a `sync` resource.
fn copy_text(kv: &understudy_coord::KeyValue, file: &str) -> Option<String> {
    let copy: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
    let bytes: Vec<u8> = copy["files"][file]["data"]
        .as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect::<Option<_>>()?;
    String::from_utf8(bytes).ok()
}

/// Waits, on a watch of the copy's key, until the stored copy of `file`
/// reads `text`; returns the key as stored.
async fn wait_for_copy(c: &TestCluster, key: &str, file: &str, text: &str) -> understudy_coord::KeyValue {
    let (kvs, revision) = c.coord.range(key).await.unwrap();
    let mut current = kvs.into_iter().find(|kv| kv.key == key);
    let mut watch = c.coord.watch(key, revision).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(kv) = &current
            && copy_text(kv, file).as_deref() == Some(text)
        {
            return kv.clone();
        }
        match tokio::time::timeout_at(deadline, watch.recv()).await {
            Ok(Some(Ok(events))) => {
                for e in events {
                    match e {
                        understudy_coord::WatchEvent::Put(kv) if kv.key == key => current = Some(kv),
                        understudy_coord::WatchEvent::Delete { .. } => current = None,
                        understudy_coord::WatchEvent::Put(_) => {}
                    }
                }
            }
            Ok(other) => panic!("the watch of {key} ended: {other:?}"),
            Err(_) => panic!(
                "timed out after {WAIT:?} waiting for the stored copy to read {text:?}; it is {:?}\n{}",
                current.as_ref().map(|kv| copy_text(kv, file)),
                c.logs()
            ),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_stale_owner_resumed_after_a_pause_cannot_overwrite_its_successors_sync_copy() {
    let _serial = SERIAL.lock().await;
    let mut c = TestCluster::new(&sync_definition("/placeholder")).await;
    let file = c.dir.path().join("settings.conf");
    let path = file.display().to_string();
    std::fs::write(c.config(), sync_definition(&path)).unwrap();
    std::fs::write(&file, "written by the first owner").unwrap();
    c.start_all();
    let snap = c
        .wait_for("settings running with all three nodes registered", WAIT, |s| {
            s.running_on("web", &["settings"]).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
        })
        .await;
    let owner = snap.owner("web").unwrap().to_string();
    let key = c.keys.sync("settings");
    wait_for_copy(&c, &key, &path, "written by the first owner").await;

    // The owner is paused; another node takes over and changes the file.
    c.agents.signal(&owner, Signal::SIGSTOP).unwrap();
    let snap = c
        .wait_for("settings running on another node", WAIT, |s| {
            s.running_on("web", &["settings"]).is_some_and(|n| n != owner)
        })
        .await;
    let successor = snap.owner("web").unwrap().to_string();
    std::fs::write(&file, "written by the successor").unwrap();
    let stored = wait_for_copy(&c, &key, &path, "written by the successor").await;

    // The successor holds still (a short pause: far less than its lease),
    // the file changes under the stale owner, and the stale owner resumes:
    // its monitor or its stop tries to store that, under its old token.
    c.agents.signal(&successor, Signal::SIGSTOP).unwrap();
    std::fs::write(&file, "stale state of the old owner").unwrap();
    c.agents.signal(&owner, Signal::SIGCONT).unwrap();
    c.wait_for("the stale owner back with settings stopped", WAIT, |s| {
        s.status.get(&owner).is_some_and(|v| v["session"] == true)
            && !matches!(s.state(&owner, "settings"), Some("running" | "stopping"))
    })
    .await;
    let now = c.coord.get(&key).await.unwrap().expect("the copy is still stored");
    assert_eq!(
        copy_text(&now, &path).as_deref(),
        Some("written by the successor"),
        "the stale owner overwrote its successor's copy"
    );
    assert_eq!(now.mod_revision, stored.mod_revision, "nothing wrote the copy since");
    let log = std::fs::read_to_string(c.agents.log_path(&owner)).unwrap();
    assert!(
        log.contains("not stored") || log.contains("without storing the final copy"),
        "the stale owner's store was refused, not skipped:\n{}",
        c.logs()
    );
    c.agents.signal(&successor, Signal::SIGCONT).unwrap();
}

fn parse_guard_kill_time(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("fence-guard: lease deadline passed"))?;
    let stamp = line.split_whitespace().next()?;
    let t = humantime::parse_rfc3339(stamp).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

#[tokio::test(flavor = "current_thread")]
async fn a_paused_owner_is_fenced_before_another_node_starts_the_group() {
    let _serial = SERIAL.lock().await;
    let (mut c, owner) = running_cluster().await;
    let pids: Vec<i32> = WEB.iter().map(|r| c.pid_of(&owner, r).unwrap()).collect();
    let paused_at = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap();
    c.agents.signal(&owner, Signal::SIGSTOP).unwrap();
    let snap = c
        .wait_for("web running on another node", WAIT, |s| {
            s.running_on("web", &WEB).is_some_and(|n| n != owner)
        })
        .await;
    let new_owner = snap.owner("web").unwrap().to_string();
    for pid in &pids {
        assert!(!alive(*pid), "the paused owner's process {pid} still runs");
    }
    // The guard's kill happened before the new owner started anything.
    let log = std::fs::read_to_string(c.agents.log_path(&owner)).unwrap();
    let killed_at = parse_guard_kill_time(&log).expect("the guard logged its kill");
    let journal = c.journal().await;
    let first_start = journal
        .iter()
        .filter(|e| {
            e.node == new_owner && e.entry.kind == EntryKind::Starting && e.entry.group.as_deref() == Some("web")
        })
        .filter(|e| e.at >= paused_at)
        .map(|e| e.at)
        .min()
        .expect("the new owner started the group");
    assert!(
        killed_at < first_start,
        "guard killed at {killed_at}, new owner started at {first_start}: they overlap"
    );
    // Woken up, the old owner knows it lost the lease and rejoins cleanly.
    c.agents.signal(&owner, Signal::SIGCONT).unwrap();
    c.wait_for("the old owner back with a new session", WAIT, |s| {
        s.view.nodes.contains_key(&owner) && s.status.get(&owner).is_some_and(|v| v["session"] == true)
    })
    .await;
    let journal = c.journal().await;
    assert!(
        journal
            .iter()
            .any(|e| e.node == owner && matches!(e.entry.kind, EntryKind::Fenced | EntryKind::SessionLost)),
        "the woken owner recorded that it lost its lease"
    );
    // What the guard did is in the journal, with the guard's own time. (It
    // may fire again when the woken agent reports the groups it has not yet
    // reaped under the same stale deadline: that is a second record.)
    let fired: Vec<_> = journal
        .iter()
        .filter(|e| e.node == owner && e.entry.kind == EntryKind::GuardFired)
        .collect();
    assert!(!fired.is_empty(), "no guard report from {owner}");
    assert!(fired[0].entry.message.contains("lease deadline passed"), "{fired:?}");
    assert!(fired[0].entry.message.contains("killed process groups"), "{fired:?}");
    assert_eq!(fired[0].at, killed_at, "the journal keeps the time the guard acted");
    assert_eq!(
        c.snapshot().await.owner("web"),
        Some(new_owner.as_str()),
        "failback is manual"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn maintenance_holds_everything_still() {
    let _serial = SERIAL.lock().await;
    let (mut c, owner) = running_cluster().await;
    understudy(&c, &["maintenance", "on"]);
    c.wait_for("maintenance visible", WAIT, |s| s.view.maintenance).await;
    // A dead process is reported, not restarted.
    let pid = c.pid_of(&owner, "app").unwrap();
    kill_pid(pid, Signal::SIGKILL);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let journal = c.journal().await;
        if entries(&journal, &owner, EntryKind::MonitorFailed, "app")
            .iter()
            .any(|e| e.entry.message.contains("maintenance"))
        {
            assert!(entries(&journal, &owner, EntryKind::Restarting, "app").is_empty());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no monitor report in maintenance\n{}",
            c.logs()
        );
        c.wait_for("another change", Duration::from_secs(2), |_| true).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The owner dies: its lease expires, and nobody takes the group over.
    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    c.wait_for("the owner key expired", WAIT, |s| s.owner("web").is_none())
        .await;
    let quiet = tokio::time::timeout(
        Duration::from_millis(3 * TTL_MS),
        c.wait_for("someone taking web over", WAIT, |s| s.owner("web").is_some()),
    )
    .await;
    assert!(quiet.is_err(), "a node took the group over during maintenance");
    // Maintenance off: the group starts again.
    understudy(&c, &["maintenance", "off"]);
    c.wait_for("web running again", WAIT, |s| s.running_on("web", &WEB).is_some())
        .await;
}

/// A stand-in `systemctl` shared by the three agents: each node's units are
/// files `NODE.UNIT` next to it (the node comes from `$FAKE_NODE`, which the
/// fence guard inherits from its agent), and every call is appended to
/// `calls` as `NANOS NODE VERB UNIT`.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
dir=$(dirname "$0")
verb=""; unit=""
for a in "$@"; do
    case "$a" in --*) ;; *) if [ -z "$verb" ]; then verb=$a; else unit=$a; fi ;; esac
done
echo "$(date +%s%N) $FAKE_NODE $verb $unit" >> "$dir/calls"
st="$dir/$FAKE_NODE.$unit"
case "$verb" in
start) echo active > "$st" ;;
stop) [ "$(cat "$st" 2>/dev/null)" = failed ] || echo inactive > "$st" ;;
kill) echo failed > "$st" ;;
is-active)
    s=$(cat "$st" 2>/dev/null || echo inactive)
    echo "$s"
    [ "$s" = active ] && exit 0
    exit 3 ;;
*) echo disabled; exit 1 ;;
esac
"#;

#[tokio::test(flavor = "current_thread")]
async fn a_killed_owners_guard_kills_and_stops_its_unit_before_another_node_starts_it() {
    let _serial = SERIAL.lock().await;
    let definition = definition(TTL_MS);
    let (head, _) = definition.split_once("[group.web]").unwrap();
    let definition = format!(
        "{head}[group.svc]\nmonitor = {{ interval = \"300ms\", timeout = \"250ms\" }}\n\n\
         [group.svc.resource.web]\nkind = \"systemd\"\nunit = \"web.service\"\n"
    );
    let dir = TestCluster::prepare(&definition);
    let systemctl = dir.path().join("systemctl");
    std::fs::write(&systemctl, FAKE_SYSTEMCTL).unwrap();
    std::fs::set_permissions(&systemctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let coord = SqliteCoordinator::create(&dir.path().join("coordinator.db"))
        .await
        .unwrap();
    let factory: CommandFactory = Box::new(move |node, exe| {
        let mut cmd = Command::new(exe);
        cmd.env("UNDERSTUDY_SYSTEMCTL", &systemctl).env("FAKE_NODE", node);
        cmd
    });
    let mut c = TestCluster::with(dir, Arc::new(coord), Keys::new("/understudy", "it"), Some(factory));
    c.start_all();
    let snap = c
        .wait_for("svc running with all three nodes registered", WAIT, |s| {
            s.running_on("svc", &["web"]).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
        })
        .await;
    let owner = snap.owner("svc").unwrap().to_string();
    let unit_state = |node: &str| std::fs::read_to_string(c.dir.path().join(format!("{node}.web.service"))).unwrap();
    assert_eq!(unit_state(&owner).trim(), "active");

    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
    let snap = c
        .wait_for("svc running on another node", WAIT, |s| {
            s.running_on("svc", &["web"]).is_some_and(|n| n != owner)
        })
        .await;
    let new_owner = snap.owner("svc").unwrap().to_string();

    // Nothing of the unit survives on the dead agent's node, and the guard
    // was done with it before the new owner started it.
    assert_ne!(unit_state(&owner).trim(), "active", "the old owner's unit still runs");
    let calls = std::fs::read_to_string(c.dir.path().join("calls")).unwrap();
    let calls: Vec<(u128, &str, &str)> = calls
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?, w.next()?))
        })
        .collect();
    let at = |node: &str, verb: &str| {
        calls
            .iter()
            .filter(|(_, n, v)| *n == node && *v == verb)
            .map(|(t, _, _)| *t)
            .next_back()
            .unwrap_or_else(|| panic!("no `systemctl {verb}` from {node}: {calls:?}"))
    };
    let started = at(&new_owner, "start");
    assert!(
        at(&owner, "kill") < started,
        "the guard killed the unit after the new owner started it"
    );
    assert!(
        at(&owner, "stop") < started,
        "the guard stopped the unit after the new owner started it"
    );
    let log = std::fs::read_to_string(c.agents.log_path(&owner)).unwrap();
    assert!(
        log.contains("killed units [\"web.service\"]") && log.contains("stopped units [\"web.service\"]"),
        "the guard's report names the unit:\n{log}"
    );

    // Restarted, the agent journals what its guard did while it was dead
    // (before its first status, which comes through the same ordered writer).
    c.agents.start(&owner).unwrap();
    c.wait_for("the restarted node back with a session", WAIT, |s| {
        s.status.get(&owner).is_some_and(|v| v["session"] == true)
    })
    .await;
    let journal = c.journal().await;
    let fired: Vec<_> = journal
        .iter()
        .filter(|e| e.node == owner && e.entry.kind == EntryKind::GuardFired)
        .collect();
    assert_eq!(fired.len(), 1, "one guard report from {owner}: {fired:?}");
    let message = &fired[0].entry.message;
    assert!(message.contains("the agent is gone"), "{message}");
    assert!(message.contains("stopped units [\"web.service\"]"), "{message}");
}
