//! Database failover on the multi-host bed (not a test): two nodes (own
//! network and mount namespaces), etcd, an ext4 loop disk, PostgreSQL on it, a
//! floating IP; lease TTL 2 s. 20 runs of `kill -9` of the owner's agent →
//! PostgreSQL answering `SELECT 1` on the floating IP, from a client host,
//! broken down from the new owner's journal: detection (kill → ownership
//! acquired), fs (fsck + mount), postgres (start + crash recovery), ip (probe
//! + add + first announcement). Needs root, etcd, PostgreSQL.
//!
//! Run: `cargo bench -p understudy --bench failover_db`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::TestCluster;
use common::dbbed::{WAIT, db_running, db_world, definition, node_command};
use common::shared::{init_postgres, postgres_dir};
use nix::sys::signal::Signal;
use understudy_agent::Keys;
use understudy_coord::etcd::{EtcdCoordinator, EtcdOptions};
use understudy_core::agent::EntryKind;

const RUNS: usize = 20;

fn wall_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn summary(name: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:40} n={:2}  min {:5} ms  p50 {:5} ms  p99 {:5} ms  max {:5} ms",
        v.len(),
        v[0],
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    );
}

fn main() {
    let w = db_world("dbbench");
    let mountpoint = format!("/srv/understudy-bench-{}", std::process::id());
    let socket_dir = w.dir.path().join("sock");
    postgres_dir(&socket_dir);
    w.disk
        .with_mounted(&w.dir.path().join("init"), |m| init_postgres(&m.join("pgdata"), true));
    std::fs::create_dir_all(&mountpoint).unwrap();
    let def = definition(&w, &mountpoint, &socket_dir.display().to_string());
    let hosts = w.nodes.clone();
    let endpoints = w.etcd.endpoints();
    let vip = w.vip;
    let mut rows: Vec<[u64; 5]> = Vec::new();
    let out = &mut rows;
    w.client
        .enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let keys = Keys::new("/understudy", "db");
                let coord = EtcdCoordinator::connect(EtcdOptions::new(endpoints, keys.journal_prefix().to_string()))
                    .await
                    .unwrap();
                let mut c = TestCluster::with(TestCluster::prepare(&def), Arc::new(coord), keys, Some(node_command(hosts)));
                c.agents.start("node1").unwrap();
                c.agents.start("node2").unwrap();
                let url = format!("host={vip} port=5432 user=postgres dbname=postgres connect_timeout=1");
                for i in 0..RUNS {
                    let snap = c
                        .wait_for("a settled cluster", WAIT, |s| {
                            db_running(s).is_some() && s.view.nodes.len() == 2
                        })
                        .await;
                    let owner = snap.owner("db").unwrap().to_string();
                    let t0 = wall_ms();
                    c.agents.signal(&owner, Signal::SIGKILL).unwrap();
                    // The client's view: when does the database answer again?
                    // A fresh attempt every 20 ms (a SYN sent to the old owner's
                    // MAC just before the takeover would otherwise wait for a
                    // TCP retransmission); the first answer wins.
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
                    let answered = loop {
                        let (tx, url) = (tx.clone(), url.clone());
                        tokio::spawn(async move {
                            let attempt = async {
                                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
                                tokio::spawn(conn);
                                let row = client.query_one("SELECT 1", &[]).await.ok()?;
                                (row.get::<_, i32>(0) == 1).then_some(())
                            };
                            if tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten().is_some() {
                                let _ = tx.send(wall_ms());
                            }
                        });
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        // Answers from before the old owner's processes died do not count.
                        if let Some(t) = std::iter::from_fn(|| rx.try_recv().ok()).find(|t| *t > t0 + 200) {
                            break t;
                        }
                    };
                    let snap = c
                        .wait_for("the database running elsewhere", WAIT, |s| db_running(s).is_some_and(|n| n != owner))
                        .await;
                    let new_owner = snap.owner("db").unwrap().to_string();
                    let journal = c.journal().await;
                    let at = |kind: EntryKind, res: Option<&str>| {
                        journal
                            .iter()
                            .filter(|e| e.node == new_owner && e.at >= t0 && e.entry.kind == kind && e.entry.resource.as_deref() == res)
                            .map(|e| e.at)
                            .min()
                            .unwrap()
                    };
                    let acquired = at(EntryKind::Acquired, None);
                    let span = |r: &str| at(EntryKind::Started, Some(r)) - at(EntryKind::Starting, Some(r));
                    let row = [answered - t0, acquired - t0, span("disk"), span("pg"), span("vip")];
                    eprintln!(
                        "run {i}: {owner} -> {new_owner}: answering after {} ms (detection {} ms, fs {} ms, postgres {} ms, ip {} ms)",
                        row[0], row[1], row[2], row[3], row[4]
                    );
                    out.push(row);
                    c.agents.reap();
                    c.agents.start(&owner).unwrap();
                }
            });
        })
        .unwrap();
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<_>>();
    println!("database failover on the bed (etcd, TTL 2 s), {RUNS} runs:");
    summary("kill -9 → SELECT 1 answers on the VIP", col(0));
    summary("  detection (kill → ownership acquired)", col(1));
    summary("  fs (fsck + mount + marker)", col(2));
    summary("  postgres (start, crash recovery)", col(3));
    summary("  ip (ARP probe + add + announce)", col(4));
    let _ = std::fs::remove_dir(&mountpoint);
}
