//! End to end on the multi-host bed, with real parts: two nodes (each agent
//! in its own network AND mount namespace), etcd on a host of its own, an
//! ext4 filesystem on a loop device as the shared disk, PostgreSQL with its
//! data on it, a floating IP, and a client on a third host that writes
//! through the floating IP while the owner is killed.
//!
//! Checked: every row whose commit was acknowledged survives the failover,
//! none is duplicated, the client reconnects to the same address, and the
//! shared device is never mounted on two nodes at once. Needs root, etcd,
//! PostgreSQL, e2fsprogs and util-linux.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;

use common::TestCluster;
use common::dbbed::{WAIT, db_running, db_world, in_client, prepare_db, start_writer};
use common::shared::MountWatch;
use nix::sys::signal::Signal;

static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn a_crashed_database_owner_loses_no_acknowledged_commit() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let w = db_world("e2e");
    let (mountpoint, def) = prepare_db(&w, "e2e");
    let vip = w.vip;
    let watch = MountWatch::start(&w.disk.dev_id);
    in_client(&w, "db", TestCluster::prepare(&def), |mut c| async move {
        c.agents.start("node1").unwrap();
        c.agents.start("node2").unwrap();
        let owner = db_running(
            &c.wait_for("the database running", WAIT, |s| db_running(s).is_some())
                .await,
        )
        .unwrap();

        let writer = start_writer(vip);
        writer.wait_for(100).await;
        let before = writer.count();
        c.agents.signal(&owner, Signal::SIGKILL).unwrap();
        let snap = c
            .wait_for("the database running on the other node", WAIT, |s| {
                db_running(s).is_some_and(|n| n != owner)
            })
            .await;
        let new_owner = snap.owner("db").unwrap().to_string();
        writer.wait_for(before + 100).await;
        let (acked, attempted) = writer.finish().await;

        // Every acknowledged row is there, exactly once; nothing is duplicated.
        let url = format!("host={vip} port=5432 user=postgres dbname=postgres connect_timeout=2");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let rows = client.query("SELECT n FROM t ORDER BY n", &[]).await.unwrap();
        let stored: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let unique: std::collections::BTreeSet<i64> = stored.iter().copied().collect();
        assert_eq!(unique.len(), stored.len(), "duplicated rows");
        let missing: Vec<i64> = acked.iter().copied().filter(|n| !unique.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "acknowledged rows lost in the failover: {missing:?}"
        );
        assert!(
            stored.iter().all(|n| *n >= 1 && *n <= attempted),
            "only rows the client wrote"
        );
        eprintln!(
            "{owner} -> {new_owner}: {} rows acknowledged, {} stored, {} attempts",
            acked.len(),
            stored.len(),
            attempted
        );
    });
    let (max, samples) = watch.finish();
    assert!(samples > 100, "the mount watcher ran ({samples} samples)");
    assert_eq!(
        max, 1,
        "the shared disk was mounted on {max} nodes at once (0: the watcher never saw it mounted)"
    );
    let _ = std::fs::remove_dir(&mountpoint);
    drop(w);
}
