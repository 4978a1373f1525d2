//! The coordinator: the strongly consistent store every agent shares.
//!
//! The model is etcd v3's, reduced to what understudy needs:
//! - a key-value store with a global **revision** that increases with every
//!   write; each key carries the revision that created it and the one that last
//!   modified it;
//! - **leases** with a TTL, renewed by keep-alives; when a lease expires *at
//!   the coordinator* (never by a client's clock) every key attached to it is
//!   deleted in one step;
//! - **conditional writes** (compare a key's existence or revision, then write
//!   or delete) — a group's owner key is created only if absent, and its create
//!   revision is the owner's **fencing token**;
//! - **fenced writes**: a write that lands only while another key (the owner
//!   key) still has a given create revision, checked in the same transaction
//!   as the write's own condition, so a stale owner's write is refused;
//! - **watches**: every change under a prefix after a given revision, in order;
//! - an append-only **event journal** (`understudy events`).
//!
//! Backends: [`sqlite::SqliteCoordinator`] (embedded, one host, one file shared
//! by every agent process) and, for multi-host clusters,
//! [`etcd::EtcdCoordinator`]. Both pass the same [`conformance`] suite. With
//! the `testing` feature, `testing` starts real etcd servers on loopback.

use std::time::Duration;

use async_trait::async_trait;

pub mod conformance;
pub mod etcd;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

/// A store revision. Starts at 1 for the first write; 0 means "before anything".
pub type Revision = i64;

/// A lease identifier, chosen by the coordinator.
pub type LeaseId = i64;

/// One key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (stable while it exists).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or overwritten; `kv.mod_revision` is the change's revision.
    Put(KeyValue),
    /// The key was deleted (explicitly or by its lease's expiry) at `revision`.
    Delete { key: String, revision: Revision },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// Applies a batch of watch events to a local copy of the keys; returns the
/// highest revision seen (at least `revision`).
pub fn apply_events(
    map: &mut std::collections::BTreeMap<String, KeyValue>,
    revision: Revision,
    events: Vec<WatchEvent>,
) -> Revision {
    let mut revision = revision;
    for e in events {
        revision = revision.max(e.revision());
        match e {
            WatchEvent::Put(kv) => {
                map.insert(kv.key.clone(), kv);
            }
            WatchEvent::Delete { key, .. } => {
                map.remove(&key);
            }
        }
    }
    revision
}

/// A condition on one key for [`Coordinator::put_if`] and [`Coordinator::delete_if`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent,
    /// The key exists and was created at this revision (a fencing token check).
    CreateRevision(Revision),
    /// The key exists and was last modified at this revision (optimistic update).
    ModRevision(Revision),
}

/// The condition of a fenced write: `key` exists and was created at `token`
/// ("store this while `owner/G` is still token T"). Overwriting the key
/// keeps its create revision, so the fence holds until the key is deleted
/// (or expires with its lease) and someone else creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub token: Revision,
}

impl Fence {
    pub fn new(key: impl Into<String>, token: Revision) -> Fence {
        Fence { key: key.into(), token }
    }

    /// Whether the fence holds given the fence key's current state.
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        current.is_some_and(|kv| kv.create_revision == self.token)
    }
}

/// Why a fenced write wrote nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The fence no longer holds: the fence key's current state (`None`:
    /// absent). The writer's token is stale; it must not retry.
    FenceLost(Option<KeyValue>),
    /// The fence holds but the write's own condition failed: the written
    /// key's current state (read-modify-write: read again and retry).
    Conflict(Option<KeyValue>),
}

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The coordinator cannot be reached or did not answer in time. Callers retry.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (it expired or was revoked).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A watch asked for history the coordinator no longer keeps.
    #[error("revision {0} has been compacted; re-read the current state and watch from there")]
    Compacted(Revision),
    /// There is no store where the coordinator should be (the embedded store
    /// was never created with `understudy init`, or was deleted). Opening
    /// never creates one. The message names the place.
    #[error("{0}")]
    NoStore(String),
    /// The store this handle opened is no longer the cluster's store: its
    /// file was deleted, renamed away, replaced or truncated, or holds
    /// another cluster's store. Nothing it says can be trusted any more; a
    /// lease holder must treat its session as lost (and fence).
    #[error("coordinator store lost: {0}")]
    StoreLost(String),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

/// A watch: batches of changes in revision order. Dropping it cancels the watch.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<Vec<WatchEvent>>>;

/// What every backend provides. All methods are linearizable.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Grants a lease that expires `ttl` after its last keep-alive, as measured
    /// by the coordinator.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease. Returns its TTL. `LeaseNotFound` once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Revokes a lease now, deleting its keys. Revoking an unknown lease is not an error.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix`, sorted by key, and the revision of
    /// the store at the time of reading (watch from there to miss nothing).
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Writes a key unconditionally; returns the written key.
    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<KeyValue>;

    /// Writes a key if `cond` holds. `Ok(Ok(written))`, or `Ok(Err(current))`
    /// with the key's current state when the condition failed.
    async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        cond: Compare,
    ) -> Result<Result<KeyValue, Option<KeyValue>>>;

    /// Writes a key if `fence` holds and, when given, `cond` holds for the
    /// key, both checked in one transaction. `Ok(Err(FenceLost))` takes
    /// precedence over `Ok(Err(Conflict))` when both fail. A refused write
    /// changes nothing (not even the revision).
    async fn put_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        cond: Option<Compare>,
        fence: &Fence,
    ) -> Result<Result<KeyValue, Refused>>;

    /// Deletes a key if `cond` holds; `Ok(true)` when it was deleted.
    async fn delete_if(&self, key: &str, cond: Compare) -> Result<bool>;

    /// Deletes a key; `Ok(true)` when it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Every change under `prefix` with a revision above `after`, in order,
    /// including deletions caused by lease expiry.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// Appends a record to the event journal; returns its sequence number
    /// (strictly increasing).
    async fn append(&self, record: &[u8]) -> Result<u64>;

    /// Journal records with a sequence number above `after`, oldest first, at
    /// most `limit` of them.
    async fn read_journal(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;
}
