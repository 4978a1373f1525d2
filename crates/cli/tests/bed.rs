//! Three agents, each in its own network namespace ("host"), on a 3-member
//! etcd whose members have hosts of their own: crash of the owner, an owner
//! cut off from etcd (but not from its clients), loss of one etcd member,
//! loss of quorum and recovery. Needs root (network namespaces) and etcd.
//!
//! The test's own code runs inside an observer host, so it reaches etcd on
//! the bed's addresses like any client would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::bed::{host_of, run, world};
use common::{NODES, Snapshot, TestCluster, WEB, alive};
use nix::sys::signal::Signal;
use understudy_core::agent::EntryKind;

static SERIAL: Mutex<()> = Mutex::new(());

use common::bed::TTL_MS;
const WAIT: Duration = Duration::from_secs(30);

async fn settled(c: &TestCluster) -> Snapshot {
    c.wait_for("web running with all three nodes registered", WAIT, |s| {
        s.running_on("web", &WEB).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
    })
    .await
}

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// Wall-clock times (ms) of the agent log lines matching all of `needles`.
fn log_times(log: &str, needles: &[&str]) -> Vec<u64> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?;
            let t = humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')).ok()?;
            u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
        })
        .collect()
}

#[test]
fn a_crashed_owner_is_taken_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let w = world("crash");
    run(&w, |mut c| async move {
        let owner = settled(&c).await.owner("web").unwrap().to_string();
        let pids: Vec<i32> = WEB.iter().map(|r| c.pid_of(&owner, r).unwrap()).collect();
        c.agents.signal(&owner, Signal::SIGKILL).unwrap();
        c.wait_for("web running on another node", WAIT, |s| {
            s.running_on("web", &WEB).is_some_and(|n| n != owner)
        })
        .await;
        assert!(
            pids.iter().all(|p| !alive(*p)),
            "the crashed owner's processes are gone"
        );
    });
}

#[test]
fn an_owner_cut_off_from_etcd_stops_its_group_before_another_node_starts_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let w = world("isolate");
    let etcd_hosts = w.etcd.hosts();
    let (bed, nodes, wr) = (&w.bed, &w.nodes, &w);
    run(&w, |c| async move {
        let owner = settled(&c).await.owner("web").unwrap().to_string();
        let owner_host = host_of(wr, &owner).clone();
        let pids: Vec<i32> = WEB.iter().map(|r| c.pid_of(&owner, r).unwrap()).collect();
        let cut_at = now_ms();
        for e in &etcd_hosts {
            bed.cut_between(&owner_host, e).unwrap();
        }
        // Only etcd is out of reach: clients on other hosts still reach it.
        let listener = owner_host.tcp_listen(7070).unwrap();
        let peer = nodes.iter().find(|h| h.name() != owner_host.name()).unwrap();
        peer.tcp_connect((owner_host.addr(), 7070), Duration::from_secs(2))
            .expect("a client on another host still reaches the cut-off owner");
        drop(listener);
        let snap = c
            .wait_for("web running on another node", WAIT, |s| {
                s.running_on("web", &WEB).is_some_and(|n| n != owner)
            })
            .await;
        let new_owner = snap.owner("web").unwrap().to_string();
        assert!(
            pids.iter().all(|p| !alive(*p)),
            "the cut-off owner's processes are gone"
        );
        // From the two nodes' own records: every stop on the old owner came
        // before the first start on the new one.
        let old_log = std::fs::read_to_string(c.agents.log_path(&owner)).unwrap();
        let stops: Vec<u64> = WEB
            .iter()
            .flat_map(|r| log_times(&old_log, &["Stopped", r]))
            .filter(|t| *t >= cut_at)
            .collect();
        assert_eq!(
            stops.len(),
            WEB.len(),
            "the old owner logged stopping each resource:\n{old_log}"
        );
        let journal = c.journal().await;
        let first_start = journal
            .iter()
            .filter(|e| e.node == new_owner && e.entry.kind == EntryKind::Starting && e.at >= cut_at)
            .map(|e| e.at)
            .min()
            .unwrap();
        let new_log = std::fs::read_to_string(c.agents.log_path(&new_owner)).unwrap();
        let first_start_log = log_times(&new_log, &["Starting", "database"])
            .into_iter()
            .filter(|t| *t >= cut_at)
            .min()
            .unwrap();
        let last_stop = stops.iter().copied().max().unwrap();
        assert!(
            last_stop < first_start && last_stop < first_start_log,
            "overlap: old owner's last stop at {last_stop}, new owner's first start at {first_start}"
        );
        for e in &etcd_hosts {
            bed.restore_between(&owner_host, e).unwrap();
        }
        c.wait_for("the cut-off node back in the cluster", WAIT, |s| {
            s.view.nodes.contains_key(&owner) && s.status.get(&owner).is_some_and(|v| v["session"] == true)
        })
        .await;
        assert_eq!(c.snapshot().await.owner("web"), Some(new_owner.as_str()));
    });
}

#[test]
fn losing_one_etcd_member_moves_nothing_and_losing_quorum_stops_everything_until_it_returns() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let w = world("quorum");
    let etcd = &w.etcd;
    run(&w, |c| async move {
        let before = settled(&c).await;
        let owner = before.owner("web").unwrap().to_string();
        let token = before.view.owners["web"].token;
        let pids: Vec<i32> = WEB.iter().map(|r| c.pid_of(&owner, r).unwrap()).collect();

        // One member (the leader, the hardest case) goes: nothing moves.
        let leader = etcd.leader().unwrap().unwrap_or(0);
        etcd.kill(leader).unwrap();
        let t0 = now_ms();
        tokio::time::sleep(Duration::from_millis(3 * TTL_MS)).await;
        let snap = c.snapshot().await;
        assert_eq!(snap.owner("web"), Some(owner.as_str()));
        assert_eq!(snap.view.owners["web"].token, token, "no new owner, same fencing token");
        assert!(pids.iter().all(|p| alive(*p)), "the group kept running");
        let journal = c.journal().await;
        assert!(
            !journal.iter().any(|e| e.at >= t0
                && matches!(
                    e.entry.kind,
                    EntryKind::Fenced | EntryKind::SessionLost | EntryKind::Acquired
                )),
            "nobody fenced or took over"
        );

        // A second member goes: no quorum. The owner fences itself; nobody starts it.
        let second = (0..3).find(|&i| i != leader).unwrap();
        let lost_at = now_ms();
        etcd.kill(second).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while pids.iter().any(|p| alive(*p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the owner kept running without quorum\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // For three TTLs, no node runs any process of the group.
        let until = std::time::Instant::now() + Duration::from_millis(3 * TTL_MS);
        while std::time::Instant::now() < until {
            for n in NODES {
                for r in WEB {
                    if let Some(p) = c.pid_of(n, r) {
                        assert!(!alive(p), "{r} runs on {n} without quorum");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Quorum returns: the cluster converges on its own.
        etcd.restart(leader).unwrap();
        etcd.restart(second).unwrap();
        // etcd extends every lease by its TTL when a new leader is elected, so
        // the old keys linger briefly: wait for a new owner key.
        let snap = c
            .wait_for("web running again under a new fencing token", WAIT, |s| {
                s.view.owners.get("web").is_some_and(|o| o.token > token)
                    && s.running_on("web", &WEB).is_some()
                    && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
            })
            .await;
        let new_owner = snap.owner("web").unwrap().to_string();
        c.wait_for("the new owner's processes running", WAIT, |_| {
            WEB.iter().all(|r| c.pid_of(&new_owner, r).is_some_and(alive))
        })
        .await;
        let running: Vec<&str> = NODES
            .iter()
            .copied()
            .filter(|n| WEB.iter().any(|r| c.pid_of(n, r).is_some_and(alive)))
            .collect();
        assert_eq!(running.len(), 1, "exactly one node runs the group: {running:?}");
        // The owner's own log (its journal could not reach etcd) says it fenced itself.
        let log = std::fs::read_to_string(c.agents.log_path(&owner)).unwrap();
        assert!(
            log_times(&log, &["Fenced"]).iter().any(|t| *t >= lost_at),
            "the owner logged fencing itself after quorum was lost:\n{log}"
        );
    });
}
