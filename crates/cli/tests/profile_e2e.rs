//! The seed's whole management server (profiles/sigmasystemcenter-2.1) running
//! for real on the multi-host bed: its stand-in services, its two databases as
//! PostgreSQL with their data on a loop-device ext4 shared disk, its floating
//! IP, its clones and monitor-only checks. The group is moved from node1 to
//! node2 with `understudy move`; the journal must show the seed's stop tables
//! on node1 and its start tables on node2 (§2.2.6–2.2.7, §2.3.5–2.3.6,
//! §2.4.5–2.4.6, §2.5.5–2.5.6, §2.6.5–2.6.6). Needs root, etcd, PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Mutex;

use common::Snapshot;
use common::dbbed::{WAIT, db_world, in_client};
use common::seed::{
    DPM_SERVICES, ESMPRO_START, ESMPRO_STOP, HPUX_START, HPUX_STOP, PVM_START, PVM_STOP, SYSMON_START, SYSMON_STOP,
};
use common::shared::{MountWatch, init_postgres};
use understudy_agent::JournalRecord;
use understudy_core::ClusterSpec;
use understudy_core::agent::EntryKind;
use understudy_core::spec::Role;

static SERIAL: Mutex<()> = Mutex::new(());

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Resource name of the seed's display name.
fn name_of<'a>(spec: &'a ClusterSpec, display: &str) -> &'a str {
    spec.groups[0]
        .resources
        .iter()
        .find(|r| r.display_name() == display)
        .map(|r| r.name.as_str())
        .unwrap_or_else(|| panic!("no resource {display:?}"))
}

/// Position in `node`'s journal of the first entry of `kind` for `resource`.
fn pos(journal: &[JournalRecord], node: &str, kind: EntryKind, resource: &str) -> usize {
    journal
        .iter()
        .position(|e| e.node == node && e.entry.kind == kind && e.entry.resource.as_deref() == Some(resource))
        .unwrap_or_else(|| panic!("no {kind:?} of {resource} on {node}"))
}

/// Each entry of `table` finished (`done`) before the next one began (`begin`), on `node`.
fn assert_table(
    journal: &[JournalRecord],
    spec: &ClusterSpec,
    node: &str,
    table: &[&str],
    (begin, done): (EntryKind, EntryKind),
    section: &str,
) {
    for pair in table.windows(2) {
        let (a, b) = (name_of(spec, pair[0]), name_of(spec, pair[1]));
        assert!(
            pos(journal, node, done, a) < pos(journal, node, begin, b),
            "{section} on {node}: {:?} must be {done:?} before {:?} is {begin:?}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn the_management_server_moves_with_the_seed_orders() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let w = db_world("ssc");
    // The agents run the copied profile (its ./bin stand-ins resolve there).
    let pdir = tempfile::tempdir().unwrap();
    let root = pdir.path().to_path_buf();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/sigmasystemcenter-2.1"),
        &root,
    );
    let mountpoint = format!("/srv/understudy-ssc-{}", std::process::id());
    let etc = w.dir.path().join("etc-ssc");
    // The two SQL Server instances, as PostgreSQL clusters on the shared disk.
    w.disk.with_mounted(&w.dir.path().join("init"), |m| {
        init_postgres(&m.join("pgsql/dpmdb"), false);
        init_postgres(&m.join("pgsql/ssccmdb"), false);
    });
    std::fs::create_dir_all(&mountpoint).unwrap();
    // The replicated "registry": some settings to carry.
    let esmsm = etc.join("registry/HKLM/SOFTWARE/NEC/ESMSM");
    std::fs::create_dir_all(esmsm.parent().unwrap()).unwrap();
    std::fs::write(&esmsm, "WorkDir=NVWORK\n").unwrap();

    let text = std::fs::read_to_string(root.join("cluster.toml")).unwrap();
    let text = text
        .replacen(
            "name = \"sigmasystemcenter\"",
            &format!(
                "name = \"sigmasystemcenter\"\ncoordinator = {{ etcd = {{ endpoints = [\"{}\"] }} }}",
                w.etcd.endpoints()[0]
            ),
            1,
        )
        .replace(
            "address = \"10.213.0.1/24\"",
            &format!("address = \"{}\"", w.nodes[0].cidr()),
        )
        .replace(
            "address = \"10.213.0.2/24\"",
            &format!("address = \"{}\"", w.nodes[1].cidr()),
        )
        .replace(
            "address = \"10.213.0.100/24\"",
            &format!("address = \"{}/{}\"", w.vip, w.bed.prefix_len()),
        )
        .replace("LABEL=ssc-shared", &w.disk.device)
        .replace("/srv/ssc", &mountpoint)
        .replace("/etc/ssc", &etc.display().to_string());
    std::fs::write(root.join("cluster.toml"), &text).unwrap();
    let checked = understudy_config::check(&text);
    let spec = checked.spec.unwrap_or_else(|| panic!("{:#?}", checked.diagnostics));
    let managed: Vec<String> = spec.groups[0]
        .resources
        .iter()
        .filter(|r| r.role == Role::Managed)
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(managed.len(), 33, "37 resources: 33 managed, 2 clones, 2 monitor-only");
    let config = root.join("cluster.toml");
    let client = w.client.clone();
    let watch = MountWatch::start(&w.disk.dev_id);
    in_client(&w, "sigmasystemcenter", pdir, |mut c| async move {
        c.agents.start("node1").unwrap();
        c.agents.start("node2").unwrap();
        let names: Vec<&str> = managed.iter().map(String::as_str).collect();
        let running = |s: &Snapshot| s.running_on("ssc", &names);
        c.wait_for("the management server running on node1", WAIT, |s| {
            running(s).as_deref() == Some("node1")
                && ["node1", "node2"]
                    .iter()
                    .all(|n| s.state(n, "tomcat") == Some("running"))
        })
        .await;

        // An orderly move, as an operator does it.
        let out = client
            .command(env!("CARGO_BIN_EXE_understudy"))
            .args(["move", "ssc", "--to", "node2", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        c.wait_for("the management server running on node2", WAIT, |s| {
            running(s).as_deref() == Some("node2")
        })
        .await;

        let journal = c.journal().await;
        let stop = (EntryKind::Stopping, EntryKind::Stopped);
        let start = (EntryKind::Starting, EntryKind::Started);
        assert_table(&journal, &spec, "node1", &ESMPRO_STOP, stop, "§2.2.7");
        assert_table(&journal, &spec, "node1", &HPUX_STOP, stop, "§2.4.6");
        assert_table(&journal, &spec, "node1", &PVM_STOP, stop, "§2.5.6");
        assert_table(&journal, &spec, "node1", &SYSMON_STOP, stop, "§2.6.6");
        assert_table(&journal, &spec, "node2", &ESMPRO_START, start, "§2.2.6");
        assert_table(&journal, &spec, "node2", &HPUX_START, start, "§2.4.5");
        assert_table(&journal, &spec, "node2", &PVM_START, start, "§2.5.5");
        assert_table(&journal, &spec, "node2", &SYSMON_START, start, "§2.6.5");
        // §2.3.5: the 12 DeploymentManager services start only once the
        // failover IP is up; §2.3.6: they are stopped before it goes.
        let ip = name_of(&spec, "Failover IP");
        for d in DPM_SERVICES {
            let r = name_of(&spec, d);
            assert!(pos(&journal, "node2", EntryKind::Started, ip) < pos(&journal, "node2", EntryKind::Starting, r));
            assert!(pos(&journal, "node1", EntryKind::Stopped, r) < pos(&journal, "node1", EntryKind::Stopping, ip));
        }
        assert_eq!(c.snapshot().await.owner("ssc"), Some("node2"));
    });
    let (max, _) = watch.finish();
    assert_eq!(max, 1, "the shared disk was mounted on {max} nodes at once");
    let _ = std::fs::remove_dir(&mountpoint);
}
