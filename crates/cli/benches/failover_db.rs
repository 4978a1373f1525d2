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

use std::time::Duration;

use common::TestCluster;
use common::dbbed::{WAIT, db_running, db_world, in_client, prepare_db};
use nix::sys::signal::Signal;
use understudy_core::agent::EntryKind;

const RUNS: usize = 20;

fn main() {
    let w = db_world("dbbench");
    let (mountpoint, def) = prepare_db(&w, "bench");
    let vip = w.vip;
    let mut rows: Vec<[u64; 5]> = Vec::new();
    let out = &mut rows;
    in_client(&w, "db", TestCluster::prepare(&def), |mut c| async move {
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
            let t0 = common::wall_ms();
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
                    if tokio::time::timeout(Duration::from_secs(2), attempt)
                        .await
                        .ok()
                        .flatten()
                        .is_some()
                    {
                        let _ = tx.send(common::wall_ms());
                    }
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Answers from before the old owner's processes died do not count.
                if let Some(t) = std::iter::from_fn(|| rx.try_recv().ok()).find(|t| *t > t0 + 200) {
                    break t;
                }
            };
            let snap = c
                .wait_for("the database running elsewhere", WAIT, |s| {
                    db_running(s).is_some_and(|n| n != owner)
                })
                .await;
            let new_owner = snap.owner("db").unwrap().to_string();
            let journal = c.journal().await;
            let at = |kind: EntryKind, res: Option<&str>| {
                journal
                    .iter()
                    .filter(|e| {
                        e.node == new_owner && e.at >= t0 && e.entry.kind == kind && e.entry.resource.as_deref() == res
                    })
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
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<_>>();
    println!("database failover on the bed (etcd, TTL 2 s), {RUNS} runs:");
    common::summary("kill -9 → SELECT 1 answers on the VIP", col(0));
    common::summary("  detection (kill → ownership acquired)", col(1));
    common::summary("  fs (fsck + mount + marker)", col(2));
    common::summary("  postgres (start, crash recovery)", col(3));
    common::summary("  ip (ARP probe + add + announce)", col(4));
    let _ = std::fs::remove_dir(&mountpoint);
}
