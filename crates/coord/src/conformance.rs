//! The conformance suite every [`Coordinator`] backend passes.
//!
//! Each case is a `pub async fn(a, b)` taking two handles onto the **same**
//! store, modelling two agents (two processes, or two hosts): a write through
//! one must be seen by the other. Cases assume a fresh store; they use their
//! own key prefixes, but some (the journal, revision checks) also assume that
//! nobody else writes while they run.
//!
//! A backend's test file runs every case as its own `#[tokio::test]` with
//! [`conformance_tests!`](crate::conformance_tests), given an async factory
//! that returns `(handle_a, handle_b, guard)`; the guard (a temporary
//! directory, a server process) is kept alive until the case ends:
//!
//! ```text
//! async fn two_handles() -> (SqliteCoordinator, SqliteCoordinator, tempfile::TempDir) {
//!     let dir = tempfile::tempdir().unwrap();
//!     let path = dir.path().join("coord.db");
//!     let a = SqliteCoordinator::create(&path).await.unwrap();
//!     let b = SqliteCoordinator::open(&path).await.unwrap();
//!     (a, b, dir)
//! }
//! mod conformance {
//!     understudy_coord::conformance_tests!(super::two_handles);
//! }
//! ```
//!
//! Timing: lease cases use a TTL of [`SHORT_TTL`] and accept a backend that
//! rounds TTLs up (etcd counts whole seconds and has a minimum): they check
//! that nothing expires *before* the TTL and wait for expiry with a bounded
//! timeout ([`EXPIRY_WAIT`]). Events are awaited, never slept for.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

use crate::{Compare, CoordError, Coordinator, Fence, KeyValue, Refused, Revision, WatchEvent, WatchStream};

/// The TTL of the leases the expiry cases grant.
pub const SHORT_TTL: Duration = Duration::from_millis(600);

/// How long a case waits for an expected watch event.
pub const EVENT_WAIT: Duration = Duration::from_secs(5);

/// How long a case waits, past the TTL, for an expired lease's keys to go.
pub const EXPIRY_WAIT: Duration = Duration::from_secs(5);

/// How long a case listens to check that no event arrives.
const QUIET: Duration = Duration::from_millis(100);

/// Expands to one `#[tokio::test]` per conformance case. The argument is a
/// function (or closure) with no arguments returning a future of
/// `(A, B, Guard)`, where `A` and `B` implement [`Coordinator`] and are two
/// handles onto one fresh store.
#[macro_export]
macro_rules! conformance_tests {
    (@cases $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (a, b, guard) = ($make)().await;
                $crate::conformance::$case(&a, &b).await;
                drop((a, b, guard));
            }
        )+
    };
    ($make:expr) => {
        // Keep in sync with `run_all`.
        $crate::conformance_tests!(@cases $make;
            put_get_range,
            revisions,
            put_if_absent_once,
            put_if_absent_race,
            compare_revisions,
            fenced_put_needs_the_token,
            fenced_put_with_condition,
            fenced_put_race,
            lease_revoke_deletes_keys,
            lease_expiry_deletes_keys,
            keep_alive_extends_expiry,
            watch_sees_changes_in_order,
            watch_replays_history,
            watches_are_independent,
            journal,
            journal_concurrent_appends,
        );
    };
}

/// Runs every case, each on a fresh pair of handles from `make`, one after the
/// other (for harnesses that cannot use [`conformance_tests!`](crate::conformance_tests)).
pub async fn run_all<A, B, G, F, Fut>(make: F)
where
    A: Coordinator,
    B: Coordinator,
    F: Fn() -> Fut,
    Fut: Future<Output = (A, B, G)>,
{
    macro_rules! run {
        ($($case:ident),+ $(,)?) => {
            $(
                let (a, b, guard) = make().await;
                $case(&a, &b).await;
                drop((a, b, guard));
            )+
        };
    }
    // Keep in sync with `conformance_tests!`.
    run!(
        put_get_range,
        revisions,
        put_if_absent_once,
        put_if_absent_race,
        compare_revisions,
        fenced_put_needs_the_token,
        fenced_put_with_condition,
        fenced_put_race,
        lease_revoke_deletes_keys,
        lease_expiry_deletes_keys,
        keep_alive_extends_expiry,
        watch_sees_changes_in_order,
        watch_replays_history,
        watches_are_independent,
        journal,
        journal_concurrent_appends,
    );
}

// ---------------------------------------------------------------------------
// Helpers

/// The value of a result that must be `Ok`, or a panic naming the step.
fn ok<T, E: Debug>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: unexpected error {e:?}"),
    }
}

fn some<T>(option: Option<T>, what: &str) -> T {
    match option {
        Some(value) => value,
        None => panic!("{what}: expected a value, got None"),
    }
}

/// Polls every future concurrently and returns their outputs in order.
async fn join_all<'a, T>(futures: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut pending: Vec<Option<Pin<Box<dyn Future<Output = T> + Send + 'a>>>> =
        futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (slot, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Receives exactly `n` events (in as many batches as they come), failing on
/// an error, the end of the stream, a timeout or a surplus in the last batch.
async fn next_events(watch: &mut WatchStream, n: usize, what: &str) -> Vec<WatchEvent> {
    let deadline = Instant::now() + EVENT_WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        match timeout_at(deadline, watch.recv()).await {
            Err(_) => panic!(
                "{what}: waited {EVENT_WAIT:?} for {n} events, got {}: {got:?}",
                got.len()
            ),
            Ok(None) => panic!("{what}: the watch ended early; got {got:?}"),
            Ok(Some(Err(e))) => panic!("{what}: watch error {e:?}; got {got:?}"),
            Ok(Some(Ok(batch))) => {
                assert!(!batch.is_empty(), "{what}: a watch delivered an empty batch");
                got.extend(batch);
            }
        }
    }
    assert_eq!(got.len(), n, "{what}: more events than expected: {got:?}");
    got
}

/// Checks that no event arrives for a short while.
async fn assert_quiet(watch: &mut WatchStream, what: &str) {
    if let Ok(item) = timeout(QUIET, watch.recv()).await {
        panic!("{what}: expected no event, got {item:?}");
    }
}

fn put_event(event: &WatchEvent) -> &KeyValue {
    match event {
        WatchEvent::Put(kv) => kv,
        other => panic!("expected a put, got {other:?}"),
    }
}

fn assert_delete(event: &WatchEvent, key: &str) -> Revision {
    match event {
        WatchEvent::Delete { key: k, revision } if k == key => *revision,
        other => panic!("expected the deletion of {key}, got {other:?}"),
    }
}

/// Revisions never decrease along a watch; a new revision is a new change.
fn assert_in_revision_order(events: &[WatchEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].revision() <= pair[1].revision(),
            "events out of revision order: {events:?}"
        );
    }
}

async fn store_revision(c: &dyn Coordinator, prefix: &str) -> Revision {
    ok(c.range(prefix).await, "range for the store revision").1
}

// ---------------------------------------------------------------------------
// Cases

/// `put`, `get` and `range`: values round-trip, `range` is sorted by key
/// (bytewise, as Rust orders `str`) and holds exactly the prefixed keys, and
/// reports the store's revision.
pub async fn put_get_range(a: &dyn Coordinator, b: &dyn Coordinator) {
    let inside = [
        "t/range/b",
        "t/range/a",
        "t/range/ü",
        "t/range/c/x",
        "t/range/z",
        "t/range/e",
    ];
    let outside = ["t/range", "t/range0", "t/rangd/z", "t/rangf", "u/range/a"];
    let mut last = None;
    for key in inside.iter().chain(outside.iter()) {
        let value: &[u8] = if *key == "t/range/e" { b"" } else { key.as_bytes() };
        let kv = ok(a.put(key, value, None).await, "put");
        assert_eq!(kv.key, *key);
        assert_eq!(kv.value, value);
        assert_eq!(
            kv.create_revision, kv.mod_revision,
            "a new key's create and mod revisions"
        );
        assert_eq!(kv.lease, None);
        last = Some(kv);
    }
    let last = some(last, "the last put");

    let (kvs, rev) = ok(b.range("t/range/").await, "range");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    let mut expected: Vec<&str> = inside.to_vec();
    expected.sort();
    assert_eq!(keys, expected, "range must hold exactly the prefixed keys, sorted");
    assert_eq!(rev, last.mod_revision, "range reports the store revision");
    for kv in &kvs {
        let value: &[u8] = if kv.key == "t/range/e" { b"" } else { kv.key.as_bytes() };
        assert_eq!(kv.value, value, "value of {}", kv.key);
        let got = some(ok(a.get(&kv.key).await, "get"), "get of a ranged key");
        assert_eq!(&got, kv, "get and range agree");
    }

    let (sub, _) = ok(a.range("t/range/c").await, "range");
    assert_eq!(
        sub.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["t/range/c/x"]
    );
    let (sub, _) = ok(a.range("t/range/ü").await, "range with a multi-byte prefix");
    assert_eq!(sub.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["t/range/ü"]);
    let (none, _) = ok(a.range("t/nothing/").await, "empty range");
    assert!(none.is_empty());

    let (all, _) = ok(b.range("").await, "range of everything");
    let all_keys: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    let mut sorted = all_keys.clone();
    sorted.sort();
    assert_eq!(all_keys, sorted, "the whole store is sorted");
    for key in inside.iter().chain(outside.iter()) {
        assert!(all_keys.contains(key), "{key} missing from the whole store");
    }

    assert_eq!(ok(a.get("t/range/").await, "get"), None, "a prefix is not a key");
    assert_eq!(ok(a.get("t/range/missing").await, "get"), None);
}

/// Every change gets a new, higher revision; overwrites keep the create
/// revision; delete then re-create starts a new one; writes that change
/// nothing leave the revision alone.
pub async fn revisions(a: &dyn Coordinator, b: &dyn Coordinator) {
    let (k, other) = ("t/rev/k", "t/rev/other");
    let r0 = store_revision(a, "t/rev/").await;
    let kv1 = ok(a.put(k, b"1", None).await, "put");
    assert!(kv1.mod_revision > r0);
    let kv2 = ok(b.put(other, b"x", None).await, "put through b");
    assert!(kv2.mod_revision > kv1.mod_revision, "revisions increase across handles");
    let kv3 = ok(a.put(k, b"2", None).await, "overwrite");
    assert!(kv3.mod_revision > kv2.mod_revision);
    assert_eq!(
        kv3.create_revision, kv1.create_revision,
        "an overwrite keeps create_revision"
    );
    assert_eq!(ok(b.get(k).await, "get through b"), Some(kv3.clone()));

    assert!(
        ok(b.delete(k).await, "delete"),
        "delete of an existing key reports true"
    );
    let rd = store_revision(a, "t/rev/").await;
    assert!(rd > kv3.mod_revision, "a delete is a change with its own revision");
    assert_eq!(ok(a.get(k).await, "get after delete"), None);

    assert!(!ok(a.delete(k).await, "delete of a missing key"), "nothing to delete");
    assert!(!ok(
        a.delete_if(other, Compare::ModRevision(kv1.mod_revision)).await,
        "delete_if"
    ));
    let failed = ok(a.put_if(other, b"y", None, Compare::Absent).await, "put_if");
    assert!(failed.is_err(), "put_if Absent on an existing key fails");
    assert_eq!(
        store_revision(b, "t/rev/").await,
        rd,
        "writes that change nothing keep the revision"
    );

    let kv4 = ok(b.put(k, b"3", None).await, "re-create");
    assert!(kv4.mod_revision > rd);
    assert_eq!(
        kv4.create_revision, kv4.mod_revision,
        "a re-created key gets a new create_revision"
    );
    assert_ne!(kv4.create_revision, kv1.create_revision);
}

/// `put_if(Absent)` succeeds once; later attempts, from either handle, fail
/// with the current key; after a delete it succeeds again.
pub async fn put_if_absent_once(a: &dyn Coordinator, b: &dyn Coordinator) {
    let k = "t/absent/owner";
    let won = ok(
        ok(a.put_if(k, b"first", None, Compare::Absent).await, "put_if"),
        "first put_if Absent",
    );
    assert_eq!(won.value, b"first");
    assert_eq!(won.create_revision, won.mod_revision);
    let lost = ok(a.put_if(k, b"second", None, Compare::Absent).await, "put_if");
    assert_eq!(
        lost,
        Err(Some(won.clone())),
        "a second put_if Absent fails with the current key"
    );
    let lost = ok(b.put_if(k, b"third", None, Compare::Absent).await, "put_if through b");
    assert_eq!(lost, Err(Some(won.clone())), "so does one from another handle");
    assert_eq!(
        ok(b.get(k).await, "get"),
        Some(won.clone()),
        "the failed attempts wrote nothing"
    );

    assert!(ok(b.delete(k).await, "delete"));
    let again = ok(
        ok(b.put_if(k, b"fourth", None, Compare::Absent).await, "put_if"),
        "put_if after delete",
    );
    assert!(
        again.create_revision > won.create_revision,
        "a new owner, a new fencing token"
    );
}

/// Many concurrent `put_if(Absent)` through two handles: exactly one wins and
/// every loser sees the winner's key.
pub async fn put_if_absent_race(a: &dyn Coordinator, b: &dyn Coordinator) {
    const RACERS: usize = 20;
    let k = "t/race/owner";
    let values: Vec<String> = (0..RACERS).map(|i| format!("racer-{i}")).collect();
    let attempts = values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let handle = if i % 2 == 0 { a } else { b };
            handle.put_if(k, value.as_bytes(), None, Compare::Absent)
        })
        .collect();
    let results = join_all(attempts).await;
    let results: Vec<_> = results.into_iter().map(|r| ok(r, "racing put_if")).collect();
    let winners: Vec<&KeyValue> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one racer wins: {results:?}");
    let winner = winners[0];
    for result in &results {
        if let Err(current) = result {
            assert_eq!(current.as_ref(), Some(winner), "a loser sees the winner's key");
        }
    }
    assert_eq!(ok(a.get(k).await, "get").as_ref(), Some(winner));
}

/// `put_if` and `delete_if` with `CreateRevision` (fencing) and `ModRevision`
/// (optimistic update).
pub async fn compare_revisions(a: &dyn Coordinator, b: &dyn Coordinator) {
    let k = "t/cmp/k";
    assert_eq!(
        ok(a.put_if(k, b"x", None, Compare::CreateRevision(1)).await, "put_if"),
        Err(None),
        "CreateRevision on a missing key fails with None"
    );
    assert_eq!(
        ok(a.put_if(k, b"x", None, Compare::ModRevision(1)).await, "put_if"),
        Err(None),
        "ModRevision on a missing key fails with None"
    );
    assert!(!ok(
        a.delete_if(k, Compare::CreateRevision(1)).await,
        "delete_if on a missing key"
    ));

    let kv1 = ok(a.put(k, b"1", None).await, "put");
    let token = kv1.create_revision;
    let kv2 = ok(
        ok(b.put_if(k, b"2", None, Compare::CreateRevision(token)).await, "put_if"),
        "fenced put_if",
    );
    assert_eq!(kv2.create_revision, token);
    assert!(kv2.mod_revision > kv1.mod_revision);
    let failed = ok(
        a.put_if(k, b"3", None, Compare::CreateRevision(token + 1000)).await,
        "put_if",
    );
    assert_eq!(
        failed,
        Err(Some(kv2.clone())),
        "a wrong fencing token fails with the current key"
    );
    let failed = ok(
        a.put_if(k, b"3", None, Compare::ModRevision(kv1.mod_revision)).await,
        "put_if",
    );
    assert_eq!(
        failed,
        Err(Some(kv2.clone())),
        "a stale mod revision fails with the current key"
    );
    let kv3 = ok(
        ok(
            a.put_if(k, b"3", None, Compare::ModRevision(kv2.mod_revision)).await,
            "put_if",
        ),
        "cas",
    );
    assert_eq!(kv3.value, b"3");
    assert_eq!(kv3.create_revision, token);

    assert!(!ok(
        b.delete_if(k, Compare::ModRevision(kv2.mod_revision)).await,
        "stale delete_if"
    ));
    assert!(!ok(
        b.delete_if(k, Compare::CreateRevision(token + 1000)).await,
        "fenced delete_if"
    ));
    assert!(!ok(
        b.delete_if(k, Compare::Absent).await,
        "delete_if Absent on an existing key"
    ));
    assert_eq!(
        ok(a.get(k).await, "get"),
        Some(kv3.clone()),
        "failed deletes left the key"
    );
    assert!(ok(
        b.delete_if(k, Compare::ModRevision(kv3.mod_revision)).await,
        "delete_if"
    ));
    assert_eq!(ok(a.get(k).await, "get"), None);

    // The old owner's token is void once the key is re-created by someone else.
    let kv4 = ok(b.put(k, b"new owner", None).await, "re-create");
    let failed = ok(
        a.put_if(k, b"old owner", None, Compare::CreateRevision(token)).await,
        "put_if",
    );
    assert_eq!(failed, Err(Some(kv4.clone())));
    assert!(!ok(
        a.delete_if(k, Compare::CreateRevision(token)).await,
        "delete_if with an old token"
    ));
    assert!(ok(
        a.delete_if(k, Compare::CreateRevision(kv4.create_revision)).await,
        "delete_if"
    ));
}

/// A fenced write lands only while the fence key exists with the token as
/// its create revision: an overwrite of the fence key keeps the token; once
/// the key is deleted and re-created (a new owner), the old token's writes
/// are refused with the fence key's current state, and change nothing.
pub async fn fenced_put_needs_the_token(a: &dyn Coordinator, b: &dyn Coordinator) {
    let (owner, data) = ("t/fenced/owner", "t/fenced/data");
    let lease = ok(a.grant(Duration::from_secs(60)).await, "grant");
    let first = ok(
        ok(a.put_if(owner, b"a", Some(lease), Compare::Absent).await, "put_if"),
        "campaign",
    );
    let fence = Fence::new(owner, first.create_revision);
    let kv1 = ok(
        ok(a.put_fenced(data, b"1", None, None, &fence).await, "put_fenced"),
        "a fenced put under the live token",
    );
    assert_eq!(kv1.value, b"1");
    assert_eq!(kv1.lease, None);
    assert_eq!(ok(b.get(data).await, "get"), Some(kv1.clone()));
    // A write to the fence key itself keeps its create revision: still fenced in.
    ok(
        a.put(owner, b"a again", Some(lease)).await,
        "overwrite of the owner key",
    );
    let kv2 = ok(
        ok(b.put_fenced(data, b"2", Some(lease), None, &fence).await, "put_fenced"),
        "a fenced put after the owner key was overwritten",
    );
    assert_eq!(kv2.create_revision, kv1.create_revision);
    assert!(kv2.mod_revision > kv1.mod_revision);
    assert_eq!(kv2.lease, Some(lease), "a fenced put attaches its lease");

    // The owner goes (its lease is revoked) and another takes over.
    ok(a.revoke(lease).await, "revoke");
    let r0 = store_revision(b, "t/fenced/").await;
    let refused = ok(a.put_fenced(data, b"stale", None, None, &fence).await, "put_fenced");
    assert_eq!(refused, Err(Refused::FenceLost(None)), "no owner key: refused");
    let second = ok(
        ok(b.put_if(owner, b"b", None, Compare::Absent).await, "put_if"),
        "the successor's campaign",
    );
    assert!(second.create_revision > first.create_revision);
    let successor = Fence::new(owner, second.create_revision);
    let kv3 = ok(
        ok(b.put_fenced(data, b"3", None, None, &successor).await, "put_fenced"),
        "the successor's fenced put",
    );
    let r1 = store_revision(a, "t/fenced/").await;
    let refused = ok(a.put_fenced(data, b"stale", None, None, &fence).await, "put_fenced");
    assert_eq!(
        refused,
        Err(Refused::FenceLost(Some(second.clone()))),
        "the stale owner's write is refused with the current owner key"
    );
    let refused = ok(
        a.put_fenced(
            data,
            b"stale",
            None,
            Some(Compare::ModRevision(kv3.mod_revision)),
            &fence,
        )
        .await,
        "put_fenced",
    );
    assert_eq!(
        refused,
        Err(Refused::FenceLost(Some(second.clone()))),
        "even with a condition that holds"
    );
    for token in [0, -1] {
        let refused = ok(
            a.put_fenced(data, b"x", None, None, &Fence::new(owner, token)).await,
            "put_fenced with an impossible token",
        );
        assert_eq!(refused, Err(Refused::FenceLost(Some(second.clone()))), "token {token}");
    }
    assert_eq!(
        ok(b.get(data).await, "get"),
        Some(kv3.clone()),
        "the refused writes left the successor's value"
    );
    assert_eq!(
        store_revision(b, "t/fenced/").await,
        r1,
        "refused writes change nothing"
    );
    assert!(r1 > r0);
    let fresh = ok(
        ok(
            a.put_fenced("t/fenced/new", b"n", None, None, &successor).await,
            "put_fenced",
        ),
        "a fenced put creating a key",
    );
    assert_eq!(fresh.create_revision, fresh.mod_revision);
}

/// A fenced read-modify-write: the key's own condition and the fence are
/// checked together; a failed condition under a live fence is a
/// `Conflict` with the key's current state, a lost fence wins over it.
pub async fn fenced_put_with_condition(a: &dyn Coordinator, b: &dyn Coordinator) {
    let (owner, list) = ("t/fencedcas/owner", "t/fencedcas/list");
    let held = ok(
        ok(a.put_if(owner, b"a", None, Compare::Absent).await, "put_if"),
        "campaign",
    );
    let fence = Fence::new(owner, held.create_revision);
    let kv1 = ok(
        ok(
            a.put_fenced(list, b"[1]", None, Some(Compare::Absent), &fence).await,
            "put_fenced",
        ),
        "create if absent, fenced",
    );
    let refused = ok(
        b.put_fenced(list, b"[9]", None, Some(Compare::Absent), &fence).await,
        "put_fenced",
    );
    assert_eq!(refused, Err(Refused::Conflict(Some(kv1.clone()))));
    let kv2 = ok(
        ok(
            b.put_fenced(
                list,
                b"[1,2]",
                None,
                Some(Compare::ModRevision(kv1.mod_revision)),
                &fence,
            )
            .await,
            "put_fenced",
        ),
        "compare-and-swap, fenced",
    );
    assert_eq!(kv2.value, b"[1,2]");
    let refused = ok(
        a.put_fenced(
            list,
            b"[1,3]",
            None,
            Some(Compare::ModRevision(kv1.mod_revision)),
            &fence,
        )
        .await,
        "put_fenced",
    );
    assert_eq!(
        refused,
        Err(Refused::Conflict(Some(kv2.clone()))),
        "a stale read is a conflict"
    );
    let refused = ok(
        a.put_fenced(
            list,
            b"[1,3]",
            None,
            Some(Compare::CreateRevision(kv2.mod_revision + 1000)),
            &fence,
        )
        .await,
        "put_fenced",
    );
    assert_eq!(refused, Err(Refused::Conflict(Some(kv2.clone()))));
    let refused = ok(
        a.put_fenced(list, b"[1,3]", None, Some(Compare::ModRevision(-1)), &fence)
            .await,
        "put_fenced with an impossible condition",
    );
    assert_eq!(refused, Err(Refused::Conflict(Some(kv2.clone()))));

    // The owner key changes hands: both conditions fail, the fence is reported.
    assert!(ok(b.delete(owner).await, "delete"));
    let other = ok(b.put(owner, b"b", None).await, "re-create");
    let refused = ok(
        a.put_fenced(
            list,
            b"[1,3]",
            None,
            Some(Compare::ModRevision(kv1.mod_revision)),
            &fence,
        )
        .await,
        "put_fenced",
    );
    assert_eq!(refused, Err(Refused::FenceLost(Some(other))));
    let refused = ok(
        a.put_fenced("t/fencedcas/none", b"x", None, Some(Compare::ModRevision(-1)), &fence)
            .await,
        "put_fenced with an impossible condition and a lost fence",
    );
    assert!(matches!(refused, Err(Refused::FenceLost(Some(_)))), "{refused:?}");
    assert_eq!(ok(a.get(list).await, "get"), Some(kv2));
}

/// Fenced writes racing the owner key's replacement: every write that
/// succeeded did so under the token the key had at that moment, so once
/// the successor's write is in, no write of the old token follows it.
pub async fn fenced_put_race(a: &dyn Coordinator, b: &dyn Coordinator) {
    const WRITES: usize = 20;
    let (owner, data) = ("t/fencedrace/owner", "t/fencedrace/data");
    let old = ok(
        ok(a.put_if(owner, b"old", None, Compare::Absent).await, "put_if"),
        "campaign",
    );
    let stale = Fence::new(owner, old.create_revision);
    let values: Vec<String> = (0..WRITES).map(|i| format!("stale-{i}")).collect();
    let mut writes: Vec<Pin<Box<dyn Future<Output = Option<Revision>> + Send + '_>>> = values
        .iter()
        .map(|value| {
            let stale = &stale;
            Box::pin(async move {
                match ok(
                    a.put_fenced(data, value.as_bytes(), None, None, stale).await,
                    "stale put_fenced",
                ) {
                    Ok(kv) => Some(kv.mod_revision),
                    Err(Refused::FenceLost(_)) => None,
                    Err(other) => panic!("a fenced put without a condition refused with {other:?}"),
                }
            }) as Pin<Box<dyn Future<Output = Option<Revision>> + Send + '_>>
        })
        .collect();
    writes.push(Box::pin(async {
        assert!(ok(
            b.delete_if(owner, Compare::CreateRevision(old.create_revision)).await,
            "resign"
        ));
        let new = ok(
            ok(b.put_if(owner, b"new", None, Compare::Absent).await, "put_if"),
            "the successor's campaign",
        );
        let kv = ok(
            ok(
                b.put_fenced(data, b"successor", None, None, &Fence::new(owner, new.create_revision))
                    .await,
                "put_fenced",
            ),
            "the successor's fenced put",
        );
        Some(-kv.mod_revision)
    }));
    let results = join_all(writes).await;
    let successor = results.iter().flatten().find(|r| **r < 0).map(|r| -r);
    let successor = some(successor, "the successor's write");
    for rev in results.iter().flatten().filter(|r| **r > 0) {
        assert!(
            *rev < successor,
            "a stale write landed at {rev}, after the successor's at {successor}"
        );
    }
    assert_eq!(
        some(ok(a.get(data).await, "get"), "the data key").value,
        b"successor",
        "the successor's copy is intact"
    );
}

/// Keys attached to a lease vanish together when it is revoked; the lease is
/// then gone for good, and ids are not reused.
pub async fn lease_revoke_deletes_keys(a: &dyn Coordinator, b: &dyn Coordinator) {
    let p = "t/revoke/";
    let lease = ok(a.grant(Duration::from_secs(60)).await, "grant");
    let kv1 = ok(a.put("t/revoke/1", b"1", Some(lease)).await, "put with lease");
    assert_eq!(kv1.lease, Some(lease));
    ok(b.put("t/revoke/2", b"2", Some(lease)).await, "put with lease through b");
    ok(a.put("t/revoke/plain", b"p", None).await, "put");
    ok(a.put("t/revoke/detached", b"d", Some(lease)).await, "put with lease");
    let detached = ok(a.put("t/revoke/detached", b"d", None).await, "overwrite without lease");
    assert_eq!(detached.lease, None, "a put without a lease detaches the key");
    assert_eq!(some(ok(b.get("t/revoke/2").await, "get"), "key 2").lease, Some(lease));

    let r = store_revision(b, p).await;
    let mut watch = ok(b.watch(p, r).await, "watch");
    ok(a.revoke(lease).await, "revoke");
    let mut events = next_events(&mut watch, 2, "deletions by revoke").await;
    events.sort_by(|x, y| x.key().cmp(y.key()));
    let rev1 = assert_delete(&events[0], "t/revoke/1");
    let rev2 = assert_delete(&events[1], "t/revoke/2");
    assert_eq!(rev1, rev2, "a lease's keys are deleted in one step");
    assert!(rev1 > r);
    assert_eq!(ok(a.get("t/revoke/1").await, "get"), None);
    assert_eq!(ok(b.get("t/revoke/2").await, "get"), None);
    assert!(
        ok(a.get("t/revoke/plain").await, "get").is_some(),
        "keys without the lease stay"
    );
    assert!(
        ok(a.get("t/revoke/detached").await, "get").is_some(),
        "detached keys stay"
    );

    ok(a.revoke(lease).await, "revoking again is not an error");
    ok(b.revoke(lease).await, "revoking through b is not an error");
    match a.keep_alive(lease).await {
        Err(CoordError::LeaseNotFound(id)) => assert_eq!(id, lease),
        other => panic!("keep_alive of a revoked lease: expected LeaseNotFound, got {other:?}"),
    }
    assert!(
        matches!(
            a.put("t/revoke/1", b"x", Some(lease)).await,
            Err(CoordError::LeaseNotFound(_))
        ),
        "put with a revoked lease"
    );
    assert!(
        matches!(
            b.put_if("t/revoke/1", b"x", Some(lease), Compare::Absent).await,
            Err(CoordError::LeaseNotFound(_))
        ),
        "put_if with a revoked lease"
    );
    assert_eq!(
        ok(a.get("t/revoke/1").await, "get"),
        None,
        "the failed puts wrote nothing"
    );

    let fresh = ok(b.grant(Duration::from_secs(60)).await, "grant");
    assert_ne!(fresh, lease, "lease ids are not reused");
    let before = store_revision(a, p).await;
    ok(b.revoke(fresh).await, "revoke a lease without keys");
    assert_eq!(
        store_revision(a, p).await,
        before,
        "revoking a lease without keys changes nothing"
    );
    assert_quiet(&mut watch, "after the revocations").await;
}

/// A lease expires `ttl` after its last keep-alive, not before, as measured by
/// the coordinator: its keys are deleted (the other handle's watch sees it)
/// and keep-alives then fail with `LeaseNotFound`.
pub async fn lease_expiry_deletes_keys(a: &dyn Coordinator, b: &dyn Coordinator) {
    let p = "t/expiry/";
    let lease = ok(a.grant(SHORT_TTL).await, "grant");
    let granted = Instant::now();
    ok(a.put("t/expiry/owned", b"o", Some(lease)).await, "put with lease");
    ok(a.put("t/expiry/plain", b"p", None).await, "put");
    let r = store_revision(b, p).await;
    let mut watch = ok(b.watch(p, r).await, "watch");

    sleep_until(granted + SHORT_TTL / 2).await;
    let renewed = Instant::now();
    let ttl = ok(a.keep_alive(lease).await, "keep_alive");
    assert!(ttl >= SHORT_TTL, "keep_alive reports the TTL ({ttl:?} < {SHORT_TTL:?})");

    // Past the original deadline, well before the renewed one.
    sleep_until(granted + SHORT_TTL + SHORT_TTL / 12).await;
    assert!(
        ok(b.get("t/expiry/owned").await, "get").is_some(),
        "the key must outlive its first deadline after a keep-alive"
    );
    assert!(
        renewed.elapsed() < SHORT_TTL,
        "test machine too slow: the check ran after the renewed deadline"
    );
    assert!(watch.try_recv().is_err(), "no event before the lease expires");

    let events = next_events_within(&mut watch, SHORT_TTL + EXPIRY_WAIT, "deletion by expiry").await;
    assert_delete(&events[0], "t/expiry/owned");
    assert!(
        renewed.elapsed() >= SHORT_TTL,
        "the key was deleted {:?} after the keep-alive, before the TTL",
        renewed.elapsed()
    );
    assert_eq!(ok(b.get("t/expiry/owned").await, "get"), None);
    assert!(
        ok(b.get("t/expiry/plain").await, "get").is_some(),
        "keys without the lease stay"
    );
    for handle in [a, b] {
        match handle.keep_alive(lease).await {
            Err(CoordError::LeaseNotFound(id)) => assert_eq!(id, lease),
            other => panic!("keep_alive of an expired lease: expected LeaseNotFound, got {other:?}"),
        }
    }
    assert!(matches!(
        a.put("t/expiry/owned", b"again", Some(lease)).await,
        Err(CoordError::LeaseNotFound(_))
    ));
}

/// One event, waiting up to `within`.
async fn next_events_within(watch: &mut WatchStream, within: Duration, what: &str) -> Vec<WatchEvent> {
    match timeout(within, watch.recv()).await {
        Err(_) => panic!("{what}: no event within {within:?}"),
        Ok(None) => panic!("{what}: the watch ended"),
        Ok(Some(Err(e))) => panic!("{what}: watch error {e:?}"),
        Ok(Some(Ok(batch))) => {
            assert_eq!(batch.len(), 1, "{what}: expected one event, got {batch:?}");
            batch
        }
    }
}

/// Keep-alives (from either handle) keep a lease alive well past its TTL.
pub async fn keep_alive_extends_expiry(a: &dyn Coordinator, b: &dyn Coordinator) {
    let k = "t/renew/owned";
    let lease = ok(a.grant(SHORT_TTL).await, "grant");
    ok(a.put(k, b"o", Some(lease)).await, "put with lease");
    let start = Instant::now();
    let step = SHORT_TTL / 3;
    let mut i = 0;
    while start.elapsed() < SHORT_TTL * 2 {
        sleep(step).await;
        let handle = if i % 2 == 0 { a } else { b };
        ok(handle.keep_alive(lease).await, "keep_alive");
        let kv = ok(b.get(k).await, "get");
        assert!(
            kv.is_some(),
            "the key vanished {:?} after grant despite keep-alives",
            start.elapsed()
        );
        i += 1;
    }
    assert!(i >= 4, "too few renewals to prove anything ({i})");
    ok(a.revoke(lease).await, "revoke");
    assert_eq!(ok(b.get(k).await, "get"), None);
}

/// A watch sees puts and deletes under its prefix, made through either
/// handle, in revision order, and nothing else.
pub async fn watch_sees_changes_in_order(a: &dyn Coordinator, b: &dyn Coordinator) {
    let p = "t/watch/";
    let r0 = store_revision(a, p).await;
    let mut watch = ok(a.watch(p, r0).await, "watch");
    let put1 = ok(b.put("t/watch/1", b"a", None).await, "put");
    let put2 = ok(a.put("t/watch/2", b"b", None).await, "put");
    ok(b.put("t/watch-not/x", b"x", None).await, "put outside the prefix");
    ok(b.put("t/watcg", b"x", None).await, "put outside the prefix");
    assert!(ok(a.delete("t/watch/1").await, "delete"));
    assert!(!ok(b.delete("t/watch/missing").await, "delete of a missing key"));
    let put3 = ok(b.put("t/watch/2", b"c", None).await, "overwrite");

    let events = next_events(&mut watch, 4, "watched changes").await;
    assert_in_revision_order(&events);
    assert_eq!(put_event(&events[0]), &put1);
    assert_eq!(put_event(&events[1]), &put2);
    let deleted_at = assert_delete(&events[2], "t/watch/1");
    assert!(deleted_at > put2.mod_revision && deleted_at < put3.mod_revision);
    assert_eq!(put_event(&events[3]), &put3);
    assert_eq!(put3.create_revision, put2.create_revision);
    assert_quiet(&mut watch, "after the expected events").await;

    let put4 = ok(a.put("t/watch/3", b"d", None).await, "put");
    let events = next_events(&mut watch, 1, "a later change").await;
    assert_eq!(put_event(&events[0]), &put4);
}

/// A watch from an old revision replays the history after it, then goes on live.
pub async fn watch_replays_history(a: &dyn Coordinator, b: &dyn Coordinator) {
    let p = "t/replay/";
    let r0 = store_revision(a, p).await;
    let k1 = ok(a.put("t/replay/1", b"1", None).await, "put");
    let k2 = ok(a.put("t/replay/2", b"2", None).await, "put");
    assert!(ok(a.delete("t/replay/1").await, "delete"));
    let k3 = ok(a.put("t/replay/3", b"3", None).await, "put");

    let mut all = ok(b.watch(p, r0).await, "watch from before the history");
    let events = next_events(&mut all, 4, "replayed history").await;
    assert_in_revision_order(&events);
    assert_eq!(put_event(&events[0]), &k1);
    assert_eq!(put_event(&events[1]), &k2);
    assert_delete(&events[2], "t/replay/1");
    assert_eq!(put_event(&events[3]), &k3);

    let mut tail = ok(b.watch(p, k2.mod_revision).await, "watch from the middle");
    let events = next_events(&mut tail, 2, "the tail of the history").await;
    assert_delete(&events[0], "t/replay/1");
    assert_eq!(put_event(&events[1]), &k3);

    let mut live = ok(b.watch(p, k3.mod_revision).await, "watch from now");
    assert_quiet(&mut live, "a watch from the current revision").await;
    let k4 = ok(a.put("t/replay/4", b"4", None).await, "put");
    for (watch, what) in [(&mut all, "all"), (&mut tail, "tail"), (&mut live, "live")] {
        let events = next_events(watch, 1, what).await;
        assert_eq!(put_event(&events[0]), &k4, "{what}");
    }
}

/// Watches have their own prefixes and cursors; dropping one leaves the others.
pub async fn watches_are_independent(a: &dyn Coordinator, b: &dyn Coordinator) {
    let r0 = store_revision(a, "t/indep/").await;
    let mut wp = ok(a.watch("t/indep/p/", r0).await, "watch p");
    let mut wq = ok(b.watch("t/indep/q/", r0).await, "watch q");
    let p1 = ok(a.put("t/indep/p/1", b"1", None).await, "put");
    let q1 = ok(b.put("t/indep/q/1", b"1", None).await, "put");
    let p2 = ok(b.put("t/indep/p/2", b"2", None).await, "put");

    let events = next_events(&mut wp, 2, "watch p").await;
    assert_eq!(put_event(&events[0]), &p1);
    assert_eq!(put_event(&events[1]), &p2);
    let events = next_events(&mut wq, 1, "watch q").await;
    assert_eq!(put_event(&events[0]), &q1);

    // A second watch on the same prefix has its own cursor.
    let mut wp2 = ok(a.watch("t/indep/p/", r0).await, "second watch p");
    let events = next_events(&mut wp2, 2, "second watch p").await;
    assert_eq!(put_event(&events[0]), &p1);
    assert_eq!(put_event(&events[1]), &p2);

    drop(wp);
    let p3 = ok(a.put("t/indep/p/3", b"3", None).await, "put");
    let q2 = ok(a.put("t/indep/q/2", b"2", None).await, "put");
    let events = next_events(&mut wq, 1, "watch q after dropping watch p").await;
    assert_eq!(put_event(&events[0]), &q2);
    let events = next_events(&mut wp2, 1, "second watch p after dropping the first").await;
    assert_eq!(put_event(&events[0]), &p3);
    assert_quiet(&mut wq, "watch q").await;
    assert_quiet(&mut wp2, "second watch p").await;
}

/// Journal records come back in append order; `after` and `limit` page.
pub async fn journal(a: &dyn Coordinator, b: &dyn Coordinator) {
    let s1 = ok(a.append(b"one").await, "append");
    let s2 = ok(b.append(b"").await, "append an empty record through b");
    let s3 = ok(a.append(b"three").await, "append");
    assert!(s1 < s2 && s2 < s3, "sequence numbers increase: {s1} {s2} {s3}");
    let start = s1.saturating_sub(1);
    let expected = vec![(s1, b"one".to_vec()), (s2, Vec::new()), (s3, b"three".to_vec())];
    assert_eq!(ok(b.read_journal(start, 100).await, "read"), expected);
    assert_eq!(ok(a.read_journal(s1, 100).await, "read after s1"), expected[1..]);
    assert_eq!(ok(a.read_journal(start, 2).await, "read with a limit"), expected[..2]);
    assert_eq!(ok(a.read_journal(s2, 1).await, "page"), expected[2..]);
    assert_eq!(ok(a.read_journal(s3, 10).await, "read past the end"), []);
    assert_eq!(ok(a.read_journal(start, 0).await, "limit 0"), []);
    let s4 = ok(b.append(b"four").await, "append");
    assert!(s4 > s3);
    assert_eq!(ok(a.read_journal(s3, 10).await, "read new"), [(s4, b"four".to_vec())]);
}

/// Concurrent appends through both handles get distinct sequence numbers and
/// are all read back in sequence order.
pub async fn journal_concurrent_appends(a: &dyn Coordinator, b: &dyn Coordinator) {
    let s0 = ok(a.append(b"start").await, "append");
    let records: Vec<String> = (0..20).map(|i| format!("record-{i}")).collect();
    let appends = records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let handle = if i % 2 == 0 { a } else { b };
            handle.append(record.as_bytes())
        })
        .collect();
    let seqs: Vec<u64> = join_all(appends)
        .await
        .into_iter()
        .map(|r| ok(r, "concurrent append"))
        .collect();
    let mut expected: Vec<(u64, Vec<u8>)> = seqs
        .iter()
        .zip(&records)
        .map(|(seq, record)| (*seq, record.clone().into_bytes()))
        .collect();
    expected.sort();
    for pair in expected.windows(2) {
        assert!(pair[0].0 < pair[1].0, "duplicate sequence number: {expected:?}");
    }
    assert!(expected[0].0 > s0);
    assert_eq!(ok(b.read_journal(s0, 100).await, "read"), expected);
}
