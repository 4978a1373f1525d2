#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The SQLite backend: the whole conformance suite (two handles opened
//! separately on one file), then what only this backend has: several OS
//! processes, reopening, pruning, reboots, a busy file.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, sleep, timeout};
use understudy_coord::sqlite::{SqliteCoordinator, SqliteOptions};
use understudy_coord::{Compare, CoordError, Coordinator, WatchEvent, WatchStream};

/// Two independently opened handles onto one fresh file.
async fn two_handles() -> (SqliteCoordinator, SqliteCoordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coord.db");
    let a = SqliteCoordinator::create(&path).await.unwrap();
    let b = SqliteCoordinator::open(&path).await.unwrap();
    (a, b, dir)
}

mod conformance {
    understudy_coord::conformance_tests!(super::two_handles);
}

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coord.db");
    (dir, path)
}

async fn next_batch(watch: &mut WatchStream, within: Duration) -> Vec<WatchEvent> {
    timeout(within, watch.recv())
        .await
        .expect("timed out waiting for a watch event")
        .expect("the watch ended")
        .expect("watch error")
}

/// Reads a lease's row straight from the file (bypassing the coordinator,
/// which would reap it).
fn lease_row_exists(path: &Path, lease: i64) -> bool {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT EXISTS (SELECT 1 FROM leases WHERE id = ?1)", [lease], |row| {
        row.get(0)
    })
    .unwrap()
}

#[tokio::test]
async fn reopening_keeps_data_revision_and_lease_ids() {
    let (_dir, path) = temp_db();
    let (kv, lease, rev) = {
        let c = SqliteCoordinator::create(&path).await.unwrap();
        let lease = c.grant(Duration::from_secs(60)).await.unwrap();
        c.put("k/1", b"one", None).await.unwrap();
        let kv = c.put("k/2", b"two", Some(lease)).await.unwrap();
        c.append(b"journal").await.unwrap();
        let (_, rev) = c.range("").await.unwrap();
        (kv, lease, rev)
    };
    let c = SqliteCoordinator::open(&path).await.unwrap();
    let (kvs, rev2) = c.range("k/").await.unwrap();
    assert_eq!(rev2, rev, "the revision survives a reopen");
    assert_eq!(kvs.len(), 2);
    assert_eq!(kvs[1], kv);
    assert_eq!(
        c.keep_alive(lease).await.unwrap(),
        Duration::from_secs(60),
        "leases survive too"
    );
    assert_eq!(c.read_journal(0, 10).await.unwrap(), vec![(1, b"journal".to_vec())]);
    let next = c.put("k/3", b"three", None).await.unwrap();
    assert_eq!(next.mod_revision, rev + 1, "revisions continue where they were");
    c.revoke(lease).await.unwrap();
    let fresh = c.grant(Duration::from_secs(1)).await.unwrap();
    assert!(
        fresh > lease,
        "lease ids are never reused, even after revoke and reopen"
    );
}

#[tokio::test]
async fn expired_lease_is_reaped_by_keep_alive_without_any_watcher() {
    let (_dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_millis(150)).await.unwrap();
    let kv = c.put("k", b"v", Some(lease)).await.unwrap();
    sleep(Duration::from_millis(300)).await;
    // Nobody wrote, read or watched since: the row is still in the file.
    assert!(lease_row_exists(&path, lease));
    assert!(matches!(c.keep_alive(lease).await, Err(CoordError::LeaseNotFound(id)) if id == lease));
    assert!(!lease_row_exists(&path, lease), "keep_alive reaped the expired lease");
    let mut watch = c.watch("", kv.mod_revision).await.unwrap();
    let events = next_batch(&mut watch, Duration::from_secs(2)).await;
    assert_eq!(
        events,
        vec![WatchEvent::Delete {
            key: "k".into(),
            revision: kv.mod_revision + 1
        }]
    );
}

#[tokio::test]
async fn reads_never_return_keys_of_expired_leases() {
    let (_dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_millis(150)).await.unwrap();
    c.put("k/owned", b"v", Some(lease)).await.unwrap();
    sleep(Duration::from_millis(300)).await;
    assert!(lease_row_exists(&path, lease));
    assert_eq!(c.get("k/owned").await.unwrap(), None);
    assert!(c.range("k/").await.unwrap().0.is_empty());
}

#[tokio::test]
async fn watching_compacted_history_fails() {
    let (_dir, path) = temp_db();
    let opts = SqliteOptions {
        keep_revisions: 5,
        ..SqliteOptions::default()
    };
    let c = SqliteCoordinator::create_with(&path, opts).await.unwrap();
    for i in 0..20 {
        c.put(&format!("k/{i}"), b"v", None).await.unwrap();
    }
    // Revisions 16..=20 are kept; 15 and older are gone.
    match c.watch("k/", 14).await {
        Err(CoordError::Compacted(rev)) => assert_eq!(rev, 15),
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    assert!(matches!(c.watch("k/", 0).await, Err(CoordError::Compacted(1))));
    let mut watch = c.watch("k/", 15).await.unwrap();
    let mut events = Vec::new();
    while events.len() < 5 {
        events.extend(next_batch(&mut watch, Duration::from_secs(2)).await);
    }
    let revs: Vec<i64> = events.iter().map(WatchEvent::revision).collect();
    assert_eq!(revs, vec![16, 17, 18, 19, 20]);
    // Another handle with default options sees the same compaction.
    let other = SqliteCoordinator::open(&path).await.unwrap();
    assert!(matches!(other.watch("k/", 3).await, Err(CoordError::Compacted(4))));
}

#[tokio::test]
async fn journal_keeps_the_newest_records() {
    let (_dir, path) = temp_db();
    let opts = SqliteOptions {
        keep_journal: 3,
        ..SqliteOptions::default()
    };
    let c = SqliteCoordinator::create_with(&path, opts).await.unwrap();
    for i in 1..=5u8 {
        assert_eq!(c.append(&[i]).await.unwrap(), u64::from(i));
    }
    assert_eq!(
        c.read_journal(0, 100).await.unwrap(),
        vec![(3, vec![3]), (4, vec![4]), (5, vec![5])]
    );
}

#[tokio::test]
async fn a_reboot_expires_every_lease() {
    let (_dir, path) = temp_db();
    let (lease, kv) = {
        let c = SqliteCoordinator::create(&path).await.unwrap();
        let lease = c.grant(Duration::from_secs(3600)).await.unwrap();
        c.put("k/plain", b"p", None).await.unwrap();
        (lease, c.put("k/owned", b"o", Some(lease)).await.unwrap())
    };
    // Pretend the file was last used during another boot.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE meta SET value = 'another-boot' WHERE name = 'boot_id'", [])
        .unwrap();
    let c = SqliteCoordinator::open(&path).await.unwrap();
    assert_eq!(c.get("k/owned").await.unwrap(), None);
    assert!(c.get("k/plain").await.unwrap().is_some());
    assert!(matches!(c.keep_alive(lease).await, Err(CoordError::LeaseNotFound(_))));
    let mut watch = c.watch("k/", kv.mod_revision).await.unwrap();
    let events = next_batch(&mut watch, Duration::from_secs(2)).await;
    assert_eq!(
        events,
        vec![WatchEvent::Delete {
            key: "k/owned".into(),
            revision: kv.mod_revision + 1
        }]
    );
    // A second open in the same boot changes nothing.
    let again = SqliteCoordinator::open(&path).await.unwrap();
    assert_eq!(again.range("").await.unwrap().1, kv.mod_revision + 1);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let (_dir, path) = temp_db();
    drop(SqliteCoordinator::create(&path).await.unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'", [])
        .unwrap();
    match SqliteCoordinator::open(&path).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("schema version 99"), "{msg}"),
        other => panic!("expected a schema error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_locked_too_long_is_unavailable() {
    let (_dir, path) = temp_db();
    let opts = SqliteOptions {
        busy_timeout: Duration::from_millis(100),
        ..SqliteOptions::default()
    };
    let c = SqliteCoordinator::create_with(&path, opts).await.unwrap();
    let mut holder = rusqlite::Connection::open(&path).unwrap();
    let tx = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    match c.put("k", b"v", None).await {
        Err(CoordError::Unavailable(msg)) => {
            assert!(msg.contains("put on ") && msg.contains("coord.db"), "context: {msg}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Reads are not blocked by a writer in WAL mode.
    assert_eq!(c.get("k").await.unwrap(), None);
    tx.rollback().unwrap();
    assert!(
        c.put("k", b"v", None).await.is_ok(),
        "the same handle works once the lock is gone"
    );
}

// ---------------------------------------------------------------------------
// Two OS processes on one file.

/// Set in the environment of the child process this binary re-executes.
const CHILD_DB_ENV: &str = "UNDERSTUDY_COORD_TEST_CHILD_DB";
const CHILD_TTL: Duration = Duration::from_millis(500);

/// Not a test by itself: the second process of
/// `a_killed_process_loses_its_lease`. Without the environment variable it
/// returns at once. With it, it takes ownership of a key under a lease, says
/// so on stdout and renews the lease until it is killed.
#[tokio::test]
async fn child_process_holding_a_lease() {
    let Some(path) = std::env::var_os(CHILD_DB_ENV) else {
        return;
    };
    let c = SqliteCoordinator::open(PathBuf::from(path)).await.unwrap();
    let lease = c.grant(CHILD_TTL).await.unwrap();
    let kv = c
        .put_if("proc/owner", b"child", Some(lease), Compare::Absent)
        .await
        .unwrap()
        .expect("the key is free");
    println!("READY {lease} {}", kv.mod_revision);
    loop {
        sleep(CHILD_TTL / 5).await;
        c.keep_alive(lease).await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_process_loses_its_lease() {
    let (_dir, path) = temp_db();
    let survivor = SqliteCoordinator::create(&path).await.unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_holding_a_lease",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest may have printed the test's name on the same line.
            if let Some((_, rest)) = line.split_once("READY ") {
                return rest.to_owned();
            }
        }
        panic!("the child exited before taking the lease");
    })
    .await
    .expect("the child did not take the lease in time");
    let mut fields = ready.split(' ').map(|f| f.parse::<i64>().unwrap());
    let (lease, rev) = (fields.next().unwrap(), fields.next().unwrap());

    // The child's write is visible here, and its keep-alives hold the key
    // well past the TTL.
    let kv = survivor.get("proc/owner").await.unwrap().expect("the child's key");
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.mod_revision),
        (&b"child"[..], Some(lease), rev)
    );
    assert!(
        survivor
            .put_if("proc/owner", b"survivor", None, Compare::Absent)
            .await
            .unwrap()
            .is_err(),
        "the survivor cannot take the key while the child holds it"
    );
    let mut watch = survivor.watch("proc/", rev).await.unwrap();
    sleep(CHILD_TTL * 3).await;
    assert_eq!(survivor.get("proc/owner").await.unwrap(), Some(kv.clone()));
    assert!(watch.try_recv().is_err(), "nothing happened while the child renewed");

    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    kill(pid, Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "the child was killed");

    let events = next_batch(&mut watch, CHILD_TTL + Duration::from_secs(5)).await;
    assert_eq!(
        events,
        vec![WatchEvent::Delete {
            key: "proc/owner".into(),
            revision: rev + 1
        }]
    );
    // Its last renewal was at most TTL/5 before the kill.
    assert!(
        killed.elapsed() >= CHILD_TTL - CHILD_TTL / 5 - Duration::from_millis(20),
        "the lease expired {:?} after the kill, before its TTL",
        killed.elapsed()
    );
    assert!(matches!(
        survivor.keep_alive(lease).await,
        Err(CoordError::LeaseNotFound(_))
    ));
    let taken = survivor
        .put_if("proc/owner", b"survivor", None, Compare::Absent)
        .await
        .unwrap()
        .expect("the survivor takes over");
    assert!(taken.create_revision > kv.create_revision, "with a new fencing token");
}

// ---------------------------------------------------------------------------
// The store's identity: never created by opening, and a handle notices when
// its path stops naming its store.

fn no_store_message(result: Result<SqliteCoordinator, CoordError>) -> String {
    match result {
        Err(CoordError::NoStore(msg)) => msg,
        other => panic!("expected NoStore, got {other:?}"),
    }
}

#[tokio::test]
async fn opening_never_creates_a_store() {
    let (_dir, path) = temp_db();
    let msg = no_store_message(SqliteCoordinator::open(&path).await);
    assert!(
        msg.starts_with(&format!("no coordinator at {}", path.display())),
        "{msg}"
    );
    assert!(msg.contains("understudy init"), "{msg}");
    assert!(!path.exists(), "opening created a file");
    // An empty file (a truncated store) is not a store either, and stays empty.
    std::fs::write(&path, b"").unwrap();
    let msg = no_store_message(SqliteCoordinator::open(&path).await);
    assert!(msg.contains("empty or truncated"), "{msg}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    // Nor is some other file.
    std::fs::write(
        &path,
        b"hello, this is not a database at all, not even close to one....................",
    )
    .unwrap();
    no_store_message(SqliteCoordinator::open(&path).await);
}

#[tokio::test]
async fn create_refuses_to_overwrite_and_ids_name_stores() {
    let (dir, path) = temp_db();
    let a = SqliteCoordinator::create(&path).await.unwrap();
    let b = SqliteCoordinator::open(&path).await.unwrap();
    assert_eq!(a.cluster_id(), b.cluster_id(), "one store, one id");
    assert_eq!(a.cluster_id().len(), 32);
    match SqliteCoordinator::create(&path).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("already exists"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let other = SqliteCoordinator::create(dir.path().join("other.db")).await.unwrap();
    assert_ne!(other.cluster_id(), a.cluster_id(), "each store gets its own id");
    // No temporary file is left beside them.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
        .collect();
    names.sort();
    assert_eq!(names, ["coord.db", "other.db"]);
}

#[tokio::test]
async fn create_refuses_the_wal_of_a_deleted_store() {
    let (_dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    c.put("k", b"v", None).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    // `c` still has the old store open: its WAL is still beside the path.
    match SqliteCoordinator::create(&path).await {
        Err(CoordError::Other(msg)) => {
            assert!(msg.contains("coord.db-wal exists without the store"), "{msg}");
            assert!(msg.contains("Stop every agent"), "{msg}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!path.exists());
}

fn assert_lost<T: std::fmt::Debug>(result: Result<T, CoordError>, what: &str, needle: &str) {
    match result {
        Err(CoordError::StoreLost(msg)) => assert!(msg.contains(needle), "{what}: {msg}"),
        other => panic!("{what}: expected StoreLost ({needle}), got {other:?}"),
    }
}

#[tokio::test]
async fn a_deleted_or_renamed_store_is_lost_until_it_is_back() {
    let (dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_secs(60)).await.unwrap();
    c.put("k/owned", b"v", Some(lease)).await.unwrap();
    let mut watch = c.watch("k/", 0).await.unwrap();
    next_batch(&mut watch, Duration::from_secs(2)).await;

    let aside = dir.path().join("aside.db");
    std::fs::rename(&path, &aside).unwrap();
    assert_lost(c.keep_alive(lease).await, "keep_alive", "no longer exists");
    assert_lost(c.grant(Duration::from_secs(1)).await, "grant", "no longer exists");
    assert_lost(c.get("k/owned").await, "get", "no longer exists");
    assert_lost(c.watch("k/", 0).await, "watch", "no longer exists");
    // The running watch ends with the same error.
    let end = timeout(Duration::from_secs(2), watch.recv())
        .await
        .expect("the watch noticed")
        .expect("an error, then the end");
    assert_lost(end, "watch stream", "no longer exists");
    assert!(!path.exists(), "nothing was created at the path");
    // Renamed back, the same file is the store again.
    std::fs::rename(&aside, &path).unwrap();
    c.keep_alive(lease).await.unwrap();
    assert!(c.get("k/owned").await.unwrap().is_some());
}

#[tokio::test]
async fn a_replaced_store_is_lost() {
    let (dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_secs(60)).await.unwrap();
    let other = dir.path().join("other.db");
    drop(SqliteCoordinator::create(&other).await.unwrap());
    std::fs::rename(&other, &path).unwrap();
    assert_lost(c.keep_alive(lease).await, "keep_alive", "is now another file");
    // While the old store's WAL is beside the new file, SQLite would read
    // the new file through it: opening refuses.
    assert_lost(SqliteCoordinator::open(&path).await, "open", "-wal");
    // As the refusal says: once the old store's users are gone, remove its
    // -wal and -shm; a handle opened then is the new store's, with its own id.
    let old_id = c.cluster_id().to_owned();
    drop(c);
    for sidecar in ["coord.db-wal", "coord.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(sidecar));
    }
    let fresh = SqliteCoordinator::open(&path).await.unwrap();
    assert_ne!(fresh.cluster_id(), old_id);
    assert!(matches!(
        fresh.keep_alive(lease).await,
        Err(CoordError::LeaseNotFound(_))
    ));
}

#[tokio::test]
async fn a_truncated_store_is_lost_for_good() {
    let (_dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_secs(60)).await.unwrap();
    c.put("k", b"v", Some(lease)).await.unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_lost(c.keep_alive(lease).await, "keep_alive", "truncated");
    assert_lost(c.put("k", b"w", None).await, "put", "truncated");
    // A new handle refuses the empty file.
    no_store_message(SqliteCoordinator::open(&path).await);
}

#[tokio::test]
async fn a_store_of_another_cluster_in_the_same_file_is_lost() {
    let (_dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_secs(60)).await.unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE meta SET value = 'another' WHERE name = 'cluster_id'", [])
        .unwrap();
    assert_lost(c.keep_alive(lease).await, "keep_alive", "another store");
}

// ---------------------------------------------------------------------------
// One clock for every process.

#[tokio::test]
async fn a_clock_behind_the_mark_cannot_write() {
    let (_dir, path) = temp_db();
    let c = SqliteCoordinator::create(&path).await.unwrap();
    let lease = c.grant(Duration::from_millis(300)).await.unwrap();
    c.put("k/owned", b"v", Some(lease)).await.unwrap();
    // Pretend another process wrote with a clock an hour ahead of ours.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE meta SET value = value + 3600000000000 WHERE name = 'clock_ns'",
        [],
    )
    .unwrap();
    match c.keep_alive(lease).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("behind the store's high-water mark"), "{msg}"),
        other => panic!("expected a clock error, got {other:?}"),
    }
    assert!(c.put("k/other", b"v", None).await.is_err());
    // The mark is not rewritten by the refused writes.
    let mark: i64 = raw
        .query_row("SELECT value FROM meta WHERE name = 'clock_ns'", [], |r| r.get(0))
        .unwrap();
    raw.execute(
        "UPDATE meta SET value = ?1 - 3600000000000 WHERE name = 'clock_ns'",
        [mark],
    )
    .unwrap();
    c.put("k/other", b"v", None).await.unwrap();
}

/// `unshare` arguments that run a program in a new time namespace whose
/// boot-time and monotonic clocks are `secs` off the host's.
fn in_time_namespace(secs: i64) -> Vec<String> {
    let offset = secs.to_string();
    ["--time", "--boottime", &offset, "--monotonic", &offset, "--"]
        .into_iter()
        .map(String::from)
        .collect()
}

/// The host's uptime in whole seconds (a boot-time offset cannot take the
/// clock below zero).
fn uptime_secs() -> i64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap();
    text.split('.').next().unwrap().parse().unwrap()
}

async fn skewed_child_and_parent_keep_their_leases(offset: i64) {
    let (_dir, path) = temp_db();
    let parent = SqliteCoordinator::create(&path).await.unwrap();
    let mine = parent.grant(CHILD_TTL).await.unwrap();
    parent.put("proc/parent", b"parent", Some(mine)).await.unwrap();
    let mut child = tokio::process::Command::new("unshare")
        .args(in_time_namespace(offset))
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_holding_a_lease",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, rest)) = line.split_once("READY ") {
                return rest.to_owned();
            }
        }
        panic!("the child (clock offset {offset} s) exited before taking its lease");
    })
    .await
    .expect("the child did not take its lease in time");
    let theirs: i64 = ready.split(' ').next().unwrap().parse().unwrap();
    // Both renew every TTL/5 for 6 TTLs: neither clock expires the other's lease.
    let mut watch = parent.watch("proc/", 0).await.unwrap();
    let until = Instant::now() + CHILD_TTL * 6;
    while Instant::now() < until {
        sleep(CHILD_TTL / 5).await;
        parent
            .keep_alive(mine)
            .await
            .unwrap_or_else(|e| panic!("the parent's lease was lost while a child {offset} s off renewed: {e}"));
    }
    let mut deleted = Vec::new();
    while let Ok(Ok(batch)) = watch.try_recv() {
        deleted.extend(batch.into_iter().filter(|e| matches!(e, WatchEvent::Delete { .. })));
    }
    assert!(deleted.is_empty(), "keys expired (child {offset} s off): {deleted:?}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child (clock offset {offset} s) lost its lease"
    );
    let kv = parent.get("proc/owner").await.unwrap().expect("the child's key");
    assert_eq!(kv.lease, Some(theirs));
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_process_an_hour_ahead_expires_nobody_elses_lease() {
    skewed_child_and_parent_keep_their_leases(3600).await;
}

#[tokio::test]
async fn a_process_behind_expires_nobody_elses_lease() {
    // As far behind as the host's uptime allows (at most an hour).
    let behind = (uptime_secs() - 5).clamp(1, 3600);
    skewed_child_and_parent_keep_their_leases(-behind).await;
}
