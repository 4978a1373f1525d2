#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The etcd backend against real etcd servers on loopback (see
//! `understudy_coord::testing`): the whole conformance suite (two handles
//! onto one single-member etcd), then what only this backend has: endpoint
//! failover in a three-member cluster, leases through a member loss,
//! compaction, broken watches, an unreachable cluster, the journal's bound,
//! password authentication and TLS with client certificates.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use understudy_coord::etcd::{EtcdCoordinator, EtcdOptions};
use understudy_coord::testing::{EtcdCluster, ServerTls, TEST_JOURNAL_PREFIX};
use understudy_coord::{Compare, CoordError, Coordinator, WatchEvent, WatchStream};

/// Two independently connected handles onto one fresh single-member etcd.
async fn two_handles() -> (EtcdCoordinator, EtcdCoordinator, EtcdCluster) {
    let etcd = EtcdCluster::single().await.unwrap();
    let a = etcd.connect().await.unwrap();
    let b = etcd.connect().await.unwrap();
    (a, b, etcd)
}

mod conformance {
    understudy_coord::conformance_tests!(super::two_handles);
}

/// Three members with etcd's timing scaled down less than the single-member
/// default (heartbeat 100 ms, election 1 s), so a busy test machine does not
/// see spurious elections. The minimum lease TTL is then 2 s.
async fn three_members() -> EtcdCluster {
    EtcdCluster::builder()
        .members(3)
        .timing(Duration::from_millis(100), Duration::from_millis(1_000))
        .start()
        .await
        .unwrap()
}

async fn next_batch(watch: &mut WatchStream, within: Duration) -> Result<Vec<WatchEvent>, CoordError> {
    timeout(within, watch.recv())
        .await
        .expect("timed out waiting for the watch")
        .expect("the watch ended without an error")
}

/// Every operation of the trait once, through whichever members are up.
async fn exercise(c: &EtcdCoordinator, round: usize) {
    let key = format!("failover/{round}");
    let kv = c.put(&key, b"v", None).await.unwrap();
    assert_eq!(c.get(&key).await.unwrap(), Some(kv.clone()));
    let lost = c.put_if(&key, b"w", None, Compare::Absent).await.unwrap();
    assert_eq!(lost, Err(Some(kv.clone())));
    let won = c
        .put_if(&key, b"w", None, Compare::ModRevision(kv.mod_revision))
        .await
        .unwrap()
        .unwrap();
    let (kvs, rev) = c.range("failover/").await.unwrap();
    assert!(kvs.contains(&won) && rev >= won.mod_revision);
    let seq = c.append(key.as_bytes()).await.unwrap();
    assert_eq!(
        c.read_journal(seq - 1, 10).await.unwrap(),
        vec![(seq, key.clone().into_bytes())]
    );
    let mut watch = c.watch("failover/", won.mod_revision - 1).await.unwrap();
    let events = next_batch(&mut watch, Duration::from_secs(5)).await.unwrap();
    assert_eq!(events[0], WatchEvent::Put(won.clone()));
    let lease = c.grant(Duration::from_secs(5)).await.unwrap();
    c.keep_alive(lease).await.unwrap();
    c.revoke(lease).await.unwrap();
    assert!(
        c.delete_if(&key, Compare::CreateRevision(won.create_revision))
            .await
            .unwrap()
    );
    assert!(!c.delete(&key).await.unwrap());
}

/// Unconditional writes until five in a row succeed, right after a member
/// died. A write sent on the connection to the dead member before the client
/// noticed its end has an unknown outcome, so it fails with `Unavailable`
/// (not retried: it may have been applied); that happens at most once per
/// lost member, and later requests go to the other members.
async fn settle(c: &EtcdCoordinator, lost_members: usize) {
    let (mut failures, mut in_a_row) = (Vec::new(), 0);
    while in_a_row < 5 {
        match c.put("failover/settle", b"s", None).await {
            Ok(_) => in_a_row += 1,
            Err(CoordError::Unavailable(msg)) => {
                failures.push(msg);
                in_a_row = 0;
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
        assert!(
            failures.len() <= lost_members,
            "more failed writes than lost members: {failures:#?}"
        );
    }
}

#[tokio::test]
async fn requests_fail_over_to_the_other_members() {
    let mut etcd = three_members().await;
    let c = etcd.connect().await.unwrap();
    for round in 0..3 {
        exercise(&c, round).await;
    }
    // A follower dies: the client goes on with the other two.
    let leader = etcd.leader().await.unwrap();
    let follower = (leader + 1) % 3;
    etcd.kill(follower).unwrap();
    settle(&c, 1).await;
    for round in 3..13 {
        exercise(&c, round).await;
    }
    // Then the leader: one member of three has no quorum, and calls say so in time.
    etcd.kill(leader).unwrap();
    let lost_quorum = Instant::now();
    match c.get("failover/x").await {
        Err(CoordError::Unavailable(msg)) => assert!(msg.contains("get on etcd (127.0.0.1:"), "context: {msg}"),
        other => panic!("one member of three cannot answer; got {other:?}"),
    }
    assert!(
        lost_quorum.elapsed() < Duration::from_secs(5),
        "a call is bounded: {:?}",
        lost_quorum.elapsed()
    );
    // With the follower back the two elect a leader, and the client uses them.
    etcd.restart(follower).await.unwrap();
    settle(&c, 1).await;
    for round in 13..23 {
        exercise(&c, round).await;
    }
}

#[tokio::test]
async fn a_lease_is_kept_alive_through_the_loss_of_the_leader() {
    let mut etcd = three_members().await;
    // Room for an election on a busy test machine (etcd waits for the new
    // leader before it answers a renewal sent meanwhile).
    let mut opts = etcd.options(TEST_JOURNAL_PREFIX);
    opts.request_timeout = Duration::from_secs(5);
    let c = EtcdCoordinator::connect(opts).await.unwrap();
    let observer = etcd.connect().await.unwrap();
    let lease = c.grant(Duration::from_secs(2)).await.unwrap();
    let kv = c.put("lease/owner", b"me", Some(lease)).await.unwrap();
    let mut watch = observer.watch("lease/", kv.mod_revision).await.unwrap();

    let leader = etcd.leader().await.unwrap();
    let start = Instant::now();
    let mut killed: Option<Instant> = None;
    let (mut renewals, mut in_a_row, mut failures) = (0, 0, Vec::new());
    while start.elapsed() < Duration::from_secs(7) {
        if killed.is_none() && start.elapsed() > Duration::from_secs(1) {
            etcd.kill(leader).unwrap();
            killed = Some(Instant::now());
        }
        let sent = Instant::now();
        match c.keep_alive(lease).await {
            Ok(ttl) => {
                assert_eq!(ttl, Duration::from_secs(2));
                renewals += 1;
                in_a_row += 1;
            }
            // Only while the survivors elect a leader.
            Err(CoordError::Unavailable(msg)) if killed.is_some_and(|k| k.elapsed() < Duration::from_secs(6)) => {
                failures.push(format!("after {:?}: {msg}", sent.elapsed()));
                in_a_row = 0;
            }
            Err(e) => panic!("renewal {renewals} at {:?} failed: {e}", start.elapsed()),
        }
        sleep(Duration::from_millis(300)).await;
    }
    assert!(failures.len() <= 2, "renewals failed: {failures:#?}");
    assert!(
        in_a_row >= 5,
        "renewals work again after the election ({in_a_row} in a row)"
    );
    assert_eq!(c.get("lease/owner").await.unwrap(), Some(kv.clone()));
    // The observer's watch may have been on the dead member: then it says so.
    match timeout(Duration::from_millis(100), watch.recv()).await {
        Err(_) => {}
        Ok(Some(Err(CoordError::Unavailable(_)))) => {}
        Ok(other) => panic!("nothing happened to the key, yet the watch got {other:?}"),
    }

    // Without renewals the lease expires at the survivors.
    let mut watch = observer.watch("lease/", kv.mod_revision).await.unwrap();
    let stopped = Instant::now();
    let events = next_batch(&mut watch, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(&events[..], [WatchEvent::Delete { key, .. }] if key == "lease/owner"));
    assert!(
        stopped.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        stopped.elapsed()
    );
    assert!(matches!(c.keep_alive(lease).await, Err(CoordError::LeaseNotFound(id)) if id == lease));
}

#[tokio::test]
async fn watching_compacted_history_reports_compacted() {
    let etcd = EtcdCluster::single().await.unwrap();
    let c = etcd.connect().await.unwrap();
    let first = c.put("k/0", b"v", None).await.unwrap();
    let mut last = first.clone();
    for i in 1..10 {
        last = c.put(&format!("k/{i}"), b"v", None).await.unwrap();
    }
    let mut raw = etcd.client().await.unwrap();
    raw.compact(last.mod_revision - 2, None).await.unwrap();

    // etcd creates the watch, then reports the compaction on the stream.
    let after = first.mod_revision;
    match c.watch("k/", after).await {
        Err(CoordError::Compacted(rev)) => assert_eq!(rev, after + 1),
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(mut watch) => match next_batch(&mut watch, Duration::from_secs(5)).await {
            Err(CoordError::Compacted(rev)) => {
                assert_eq!(rev, after + 1);
                assert!(watch.recv().await.is_none(), "the stream ends after the error");
            }
            other => panic!("expected Compacted, got {other:?}"),
        },
    }
    // From the compaction revision on, the history is there.
    let mut watch = c.watch("k/", last.mod_revision - 2).await.unwrap();
    let mut events = Vec::new();
    while events.len() < 2 {
        events.extend(next_batch(&mut watch, Duration::from_secs(5)).await.unwrap());
    }
    let revs: Vec<i64> = events.iter().map(WatchEvent::revision).collect();
    assert_eq!(revs, vec![last.mod_revision - 1, last.mod_revision]);
}

#[tokio::test]
async fn a_watch_whose_member_dies_reports_unavailable() {
    let mut etcd = EtcdCluster::single().await.unwrap();
    let c = etcd.connect().await.unwrap();
    let (_, rev) = c.range("w/").await.unwrap();
    let mut watch = c.watch("w/", rev).await.unwrap();
    c.put("w/1", b"1", None).await.unwrap();
    assert_eq!(next_batch(&mut watch, Duration::from_secs(5)).await.unwrap().len(), 1);
    etcd.kill(0).unwrap();
    match next_batch(&mut watch, Duration::from_secs(20)).await {
        Err(CoordError::Unavailable(msg)) => assert!(msg.contains("watch"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(watch.recv().await.is_none(), "the stream ends after the error");
}

#[tokio::test]
async fn an_unreachable_cluster_is_unavailable_within_the_timeout() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut opts = EtcdOptions::new(vec![format!("127.0.0.1:{port}")], "/j/");
    opts.request_timeout = Duration::from_millis(500);
    let c = EtcdCoordinator::connect(opts).await.unwrap();
    let start = Instant::now();
    match c.put("k", b"v", None).await {
        Err(CoordError::Unavailable(msg)) => {
            assert!(
                msg.contains(&format!("put on etcd (127.0.0.1:{port})")),
                "context: {msg}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(c.keep_alive(1).await, Err(CoordError::Unavailable(_))));
    assert!(matches!(c.watch("k", 0).await, Err(CoordError::Unavailable(_))));
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
}

#[tokio::test]
async fn the_journal_keeps_about_the_newest_records_under_its_prefix() {
    let etcd = EtcdCluster::single().await.unwrap();
    let mut opts = etcd.options("/understudy/c1/journal/");
    opts.keep_journal = 5;
    let c = EtcdCoordinator::connect(opts).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..20u8 {
        seqs.push(c.append(&[i]).await.unwrap());
    }
    let records = c.read_journal(0, 100).await.unwrap();
    // Pruning runs every `keep_journal / 10` appends with as much slack.
    assert!((5..=6).contains(&records.len()), "{records:?}");
    let newest: Vec<(u64, Vec<u8>)> = seqs
        .iter()
        .zip(0..20u8)
        .map(|(s, i)| (*s, vec![i]))
        .skip(20 - records.len())
        .collect();
    assert_eq!(records, newest, "the oldest records went first");
    let (keys, _) = c.range("/understudy/c1/").await.unwrap();
    assert_eq!(keys.len(), records.len());
    assert!(keys.iter().all(|kv| kv.key.starts_with("/understudy/c1/journal/")));
}

#[tokio::test]
async fn a_range_larger_than_one_page_is_read_at_one_revision() {
    let etcd = EtcdCluster::single().await.unwrap();
    let c = etcd.connect().await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    // 2,500 keys in a few transactions (etcd allows 128 operations in one).
    for chunk in 0..25 {
        let ops: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| etcd_client::TxnOp::put(format!("big/{:05}", chunk * 100 + i), vec![b'x'; 10], None))
            .collect();
        raw.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let (kvs, rev) = c.range("big/").await.unwrap();
    assert_eq!(kvs.len(), 2_500);
    assert!(kvs.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(rev, kvs.iter().map(|kv| kv.mod_revision).max().unwrap());
}

#[tokio::test]
async fn password_authentication() {
    let etcd = EtcdCluster::single().await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    raw.user_add("root", "rootpw", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.user_add("agent", "s3cret", None).await.unwrap();
    raw.role_add("understudy").await.unwrap();
    raw.role_grant_permission(
        "understudy",
        etcd_client::Permission::read_write("/understudy/").with_prefix(),
    )
    .await
    .unwrap();
    raw.user_grant_role("agent", "understudy").await.unwrap();
    raw.auth_enable().await.unwrap();

    let dir = etcd.dir().to_path_buf();
    let password_file = dir.join("password");
    std::fs::write(&password_file, "s3cret\n").unwrap();
    let mut opts = etcd.options("/understudy/c/journal/");
    opts.username = Some("agent".into());
    opts.password_file = Some(password_file.clone());
    let c = EtcdCoordinator::connect(opts.clone()).await.unwrap();
    let kv = c.put("/understudy/c/k", b"v", None).await.unwrap();
    assert_eq!(c.get("/understudy/c/k").await.unwrap(), Some(kv));
    let seq = c.append(b"event").await.unwrap();
    assert_eq!(
        c.read_journal(seq - 1, 1).await.unwrap(),
        vec![(seq, b"event".to_vec())]
    );
    match c.put("/elsewhere", b"v", None).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("permission denied"), "{msg}"),
        other => panic!("expected a permission error, got {other:?}"),
    }

    std::fs::write(&password_file, "wrong").unwrap();
    match EtcdCoordinator::connect(opts.clone()).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("authentication failed"), "{msg}"),
        other => panic!("expected an authentication error, got {other:?}"),
    }
    opts.password_file = Some(dir.join("missing"));
    match EtcdCoordinator::connect(opts).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("password file"), "{msg}"),
        other => panic!("expected an error about the password file, got {other:?}"),
    }
    let anonymous = etcd.connect().await.unwrap();
    assert!(matches!(
        anonymous.get("/understudy/c/k").await,
        Err(CoordError::Other(_))
    ));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with the `openssl` command.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the TLS test needs the `openssl` command");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=understudy test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(&ca);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let subject = format!("/CN={name}");
        let mut req = vec!["req", "-subj", subject.as_str()];
        req.extend(ec);
        req.extend(["-keyout", key.as_str(), "-out", csr.as_str()]);
        openssl(&req);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ]);
    }
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let p = |name: &str| certs.path().join(name);
    let etcd = EtcdCluster::builder()
        .tls(ServerTls {
            ca_file: p("ca.pem"),
            cert_file: p("server.pem"),
            key_file: p("server.key"),
            client_cert_auth: true,
            client_cert: Some((p("client.pem"), p("client.key"))),
        })
        .start()
        .await
        .unwrap();
    let c = etcd.connect().await.unwrap();
    let (_, rev) = c.range("tls/").await.unwrap();
    let mut watch = c.watch("tls/", rev).await.unwrap();
    let kv = c.put("tls/k", b"v", None).await.unwrap();
    assert_eq!(
        next_batch(&mut watch, Duration::from_secs(5)).await.unwrap(),
        vec![WatchEvent::Put(kv)]
    );

    // Without a client certificate the members refuse the connection.
    let mut opts = etcd.options("/j/");
    opts.cert_file = None;
    opts.key_file = None;
    opts.request_timeout = Duration::from_millis(500);
    let anonymous = EtcdCoordinator::connect(opts.clone()).await.unwrap();
    assert!(matches!(anonymous.get("tls/k").await, Err(CoordError::Unavailable(_))));
    // Without the CA there is nothing to verify the members with.
    opts.ca_file = None;
    opts.cert_file = Some(p("client.pem"));
    opts.key_file = Some(p("client.key"));
    match EtcdCoordinator::connect(opts).await {
        Err(CoordError::Other(msg)) => assert!(msg.contains("ca_file"), "{msg}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}
