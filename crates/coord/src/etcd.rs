//! The etcd backend: the coordinator for clusters that span several hosts.
//!
//! One [`EtcdCoordinator`] is one gRPC client onto an etcd v3 cluster (every
//! member's endpoint; requests are balanced over them and go to another
//! member when one fails). The trait maps onto etcd's API almost one to one:
//!
//! | trait | etcd |
//! |---|---|
//! | `grant(ttl)` | `LeaseGrant`, the TTL rounded up to whole seconds (etcd may raise it to its minimum) |
//! | `keep_alive` | one `LeaseKeepAlive` request on a fresh stream, returning after *its* response; TTL 0 in the response = `LeaseNotFound` |
//! | `revoke` | `LeaseRevoke`; an unknown lease is not an error |
//! | `get`, `range` | `Range` (a prefix is `[prefix, prefix+1)`), paged at one revision; the header revision is the store revision |
//! | `put` | a `Txn` with no condition: `Put` then `Range` of the key (the written key exactly as stored) |
//! | `put_if`, `delete_if` | a `Txn` comparing `create_revision` (0 = absent) or `mod_revision`; the failure branch reads the key |
//! | `put_fenced` | a `Txn` comparing the fence key's `create_revision` and the key's condition; the failure branch reads both keys |
//! | `delete` | `DeleteRange` of the key |
//! | `watch(prefix, after)` | `Watch` from `start_revision = after + 1` |
//! | `append` | `Put` of `{journal_prefix}{handle id}{counter}`; the sequence number is the put's revision |
//! | `read_journal` | `Range` of the journal prefix with `min_mod_revision = after + 1`, sorted by mod revision |
//!
//! # Errors and retries
//!
//! Every call is bounded by [`EtcdOptions::request_timeout`]; running out of
//! time, an unreachable cluster, a member without a leader and other
//! transient gRPC failures are [`CoordError::Unavailable`] with the operation
//! and the endpoints as context. Within that bound a call is retried (with a
//! short backoff, possibly on another member) when that cannot apply it
//! twice: reads, `keep_alive`, `revoke`, `grant` (a duplicate lease has no keys
//! and expires) and watch creation on any transient failure; writes only when
//! the request certainly never reached etcd (the connection to the chosen
//! member could not be made, or the member answered "no leader", which etcd
//! sends before proposing anything). A write whose outcome is unknown is
//! `Unavailable`, and the caller decides (re-reads, retries).
//!
//! Requests carry etcd's *require leader* flag, so a member cut off from the
//! quorum refuses them (and ends its watches) once it has noticed, within
//! about an election timeout, instead of serving stale data or hanging.
//!
//! When the etcd leader dies, renewals sent meanwhile are answered once the
//! survivors have elected a new one (etcd's election timeout, 1 s by default,
//! and a little more); the new leader also extends every lease by that much.
//! `lease_ttl` should leave room for that.
//!
//! # Watches
//!
//! Each watch is its own gRPC stream with a task that forwards every
//! response's events as one batch. [`watch`](Coordinator::watch) returns once
//! etcd confirmed the watch. The stream ends after sending one error:
//! [`CoordError::Compacted`] when etcd no longer has the history asked for
//! (etcd reports this on the stream, right after creating the watch), and
//! [`CoordError::Unavailable`] when the stream breaks (the member died, lost
//! its leader, the connection failed); the caller re-reads and watches again.
//! Dropping the receiver cancels the watch.
//!
//! # The journal
//!
//! The journal is a set of keys under [`EtcdOptions::journal_prefix`] (the
//! cluster's `…/journal/`), one per record, never overwritten, so a record's
//! create revision is its sequence number: strictly increasing and shared
//! with the store's revisions. Keys are `{handle id}{counter}`, both 16 hex
//! digits; the handle id is random per [`EtcdCoordinator`]. Now and then (at
//! the first append of a handle, then every `keep_journal / 10` appends, at
//! most 1,000) an append counts the records and deletes the oldest beyond
//! [`EtcdOptions::keep_journal`]; failing to prune is logged, not an error.
//!
//! The journal lives in the same key space as the cluster's state, so a
//! `range` of the cluster's prefix returns it too; `range` pages through large
//! results so that never exceeds a gRPC message.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KvClient, LeaseClient, PutOptions,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchClient, WatchOptions,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout_at};
use tonic::Code;

use crate::{
    Compare, CoordError, Coordinator, Fence, KeyValue, LeaseId, Refused, Result, Revision, WatchEvent, WatchStream,
};

/// Keys per page when `range` reads a large prefix.
const RANGE_PAGE: i64 = 1_000;

/// The largest gRPC message accepted from etcd (a page of `range`, a watch
/// response with many events). tonic's default is 4 MiB.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Batches buffered per watch before the forwarding task waits for the receiver.
const WATCH_CHANNEL: usize = 64;

/// Deletes per transaction when pruning the journal (etcd's default
/// `--max-txn-ops` is 128).
const PRUNE_BATCH: usize = 100;

/// First and longest wait between retries of one call.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// HTTP/2 keep-alive on connections with open streams (watches): a dead
/// member is noticed within `interval + timeout`. etcd refuses pings more
/// often than every 5 s (`--grpc-keepalive-min-time`).
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd. Paths are used as given (the CLI resolves relative
/// paths against the definition's directory first).
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client endpoints of the members, `host:port` (or with `http://` /
    /// `https://`). Requests are balanced over all of them.
    pub endpoints: Vec<String>,
    /// Where the journal's keys go: `{base}/journal/{cluster}/`, beside (not
    /// under) the cluster's state, so watching the state skips the journal.
    pub journal_prefix: String,
    /// CA certificate (PEM) to verify the members with. Required for TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for client-certificate authentication;
    /// both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// User for password authentication, with the file holding the password
    /// (trailing newlines are ignored); both or neither.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The bound on every call, retries included.
    pub request_timeout: Duration,
    /// The bound on opening a TCP (and TLS) connection to one member.
    pub connect_timeout: Duration,
    /// Roughly how many of the newest journal records are kept (default
    /// 100,000, as the embedded backend).
    pub keep_journal: u64,
}

impl EtcdOptions {
    /// Options with defaults for everything but the endpoints and the journal prefix.
    pub fn new(endpoints: Vec<String>, journal_prefix: impl Into<String>) -> Self {
        EtcdOptions {
            endpoints,
            journal_prefix: journal_prefix.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            keep_journal: 100_000,
        }
    }

    /// Whether the connection uses TLS: a CA file, a client certificate or an
    /// `https://` endpoint asks for it.
    fn tls(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

/// The etcd coordinator backend. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdCoordinator {
    inner: Arc<Inner>,
}

struct Inner {
    kv: KvClient,
    lease: LeaseClient,
    watch: WatchClient,
    opts: EtcdOptions,
    /// `a:2379, b:2379` for messages.
    endpoints: String,
    /// This handle's part of journal keys.
    journal_id: u64,
    appended: AtomicU64,
    /// Granted TTLs of the leases this handle has seen (`keep_alive` reports
    /// the TTL; etcd's keep-alive response carries it, but the client library
    /// consumes that response).
    ttls: Mutex<HashMap<LeaseId, Duration>>,
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// Which failures a call may retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// The call can be repeated without harm: retry every transient failure.
    Always,
    /// A write: retry only when the request surely was not applied.
    IfNotSent,
}

/// What a failure says about the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// It never reached etcd, or etcd refused it before proposing it.
    NotSent,
    /// Unknown outcome, worth trying again.
    Transient,
    /// etcd's definite answer (bad request, permission, missing lease, …).
    Definite,
}

impl EtcdCoordinator {
    /// Connects to the members in `opts`. Without a user this opens no
    /// connection yet (the first call does, and reports an unreachable
    /// cluster as `Unavailable`); with one it authenticates, which needs a
    /// reachable cluster.
    pub async fn connect(opts: EtcdOptions) -> Result<Self> {
        if opts.endpoints.is_empty() {
            return Err(CoordError::Other("no etcd endpoints given".into()));
        }
        if opts.journal_prefix.is_empty() {
            return Err(CoordError::Other("the etcd journal prefix is empty".into()));
        }
        if opts.keep_journal < 1 || opts.request_timeout.is_zero() || opts.connect_timeout.is_zero() {
            return Err(CoordError::Other(format!(
                "invalid etcd coordinator options: keep_journal ({}) must be at least 1 and the timeouts \
                 ({:?}, {:?}) above zero",
                opts.keep_journal, opts.request_timeout, opts.connect_timeout
            )));
        }
        let endpoints = opts.endpoints.join(", ");
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if opts.tls() {
            connect = connect.with_tls(tls_options(&opts)?);
        }
        match (&opts.username, &opts.password_file) {
            (Some(user), Some(file)) => connect = connect.with_user(user.clone(), read_password(file)?),
            (None, None) => {}
            _ => {
                return Err(CoordError::Other(
                    "etcd `username` and `password_file` go together".into(),
                ));
            }
        }
        let deadline = Instant::now() + opts.request_timeout;
        let mut backoff = BACKOFF_MIN;
        let client = loop {
            let err = match timeout_at(deadline, Client::connect(&opts.endpoints, Some(connect.clone()))).await {
                Ok(Ok(client)) => break client,
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(CoordError::Unavailable(format!(
                        "connecting to etcd ({endpoints}): no answer within {:?}",
                        opts.request_timeout
                    )));
                }
            };
            // Only authentication talks to etcd here, and it can be repeated.
            if classify(&err) == Class::Definite || Instant::now() + backoff >= deadline {
                return Err(map_error("connecting to etcd", &endpoints, &err, None));
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        };
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let lease = client.lease_client();
        Ok(EtcdCoordinator {
            inner: Arc::new(Inner {
                kv,
                lease,
                watch,
                endpoints,
                journal_id: random_u64(),
                appended: AtomicU64::new(0),
                ttls: Mutex::new(HashMap::new()),
                opts,
            }),
        })
    }

    /// The options this handle was opened with.
    pub fn options(&self) -> &EtcdOptions {
        &self.inner.opts
    }

    /// Runs `attempt` until it succeeds, fails for good, or the call's time is
    /// up; errors get the operation and the endpoints as context. `lease`
    /// turns etcd's "lease not found" into [`CoordError::LeaseNotFound`].
    async fn call<T, F, Fut>(&self, op: &str, retry: Retry, lease: Option<LeaseId>, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.inner.opts.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = BACKOFF_MIN;
        let mut earlier: Option<String> = None;
        loop {
            let err = match timeout_at(deadline, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => e,
                Err(_) => {
                    let earlier = earlier.map(|e| format!(" (earlier: {e})")).unwrap_or_default();
                    return Err(CoordError::Unavailable(format!(
                        "{op} on etcd ({}): no answer within {timeout:?}{earlier}",
                        self.inner.endpoints
                    )));
                }
            };
            let again = match classify(&err) {
                Class::NotSent => true,
                Class::Transient => retry == Retry::Always,
                Class::Definite => false,
            };
            if !again || Instant::now() + backoff >= deadline {
                return Err(map_error(op, &self.inner.endpoints, &err, lease));
            }
            tracing::debug!(op, "etcd call failed, retrying: {err}");
            earlier = Some(error_text(&err));
            sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn txn(&self, op: &str, retry: Retry, lease: Option<LeaseId>, txn: Txn) -> Result<TxnResponse> {
        self.call(op, retry, lease, || {
            let mut kv = self.inner.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    fn ttls(&self) -> MutexGuard<'_, HashMap<LeaseId, Duration>> {
        // A plain map; a panic elsewhere cannot leave it inconsistent.
        self.inner.ttls.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remember_ttl(&self, lease: LeaseId, ttl: Duration) {
        let mut ttls = self.ttls();
        if ttls.len() >= 1_024 {
            ttls.clear();
        }
        ttls.insert(lease, ttl);
    }

    /// Deletes the oldest journal records beyond `keep_journal` (with some
    /// slack, so this runs seldom).
    async fn prune_journal(&self, every: u64) -> Result<()> {
        let prefix = self.inner.opts.journal_prefix.as_bytes().to_vec();
        let (start, end) = key_range(&prefix);
        let count = self
            .call("counting the journal", Retry::Always, None, || {
                let mut kv = self.inner.kv.clone();
                let opts = GetOptions::new().with_range(end.clone()).with_count_only();
                let start = start.clone();
                async move { kv.get(start, Some(opts)).await }
            })
            .await?
            .count();
        let keep = i64::try_from(self.inner.opts.keep_journal).unwrap_or(i64::MAX);
        let slack = i64::try_from(every).unwrap_or(0);
        if count <= keep.saturating_add(slack) {
            return Ok(());
        }
        let excess = count - keep;
        let oldest = self
            .call("listing old journal records", Retry::Always, None, || {
                let mut kv = self.inner.kv.clone();
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_keys_only()
                    .with_sort(SortTarget::Mod, SortOrder::Ascend)
                    .with_limit(excess);
                let start = start.clone();
                async move { kv.get(start, Some(opts)).await }
            })
            .await?;
        let keys: Vec<Vec<u8>> = oldest.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        for batch in keys.chunks(PRUNE_BATCH) {
            let ops: Vec<TxnOp> = batch.iter().map(|k| TxnOp::delete(k.clone(), None)).collect();
            self.txn("pruning the journal", Retry::Always, None, Txn::new().and_then(ops))
                .await?;
        }
        tracing::debug!(deleted = keys.len(), "pruned the journal");
        Ok(())
    }
}

fn tls_options(opts: &EtcdOptions) -> Result<TlsOptions> {
    let Some(ca_file) = &opts.ca_file else {
        return Err(CoordError::Other(
            "TLS to etcd (an https:// endpoint or a client certificate) needs `ca_file`, the CA that signed the members' certificates"
                .into(),
        ));
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read_file(ca_file, "CA certificate")?));
    match (&opts.cert_file, &opts.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read_file(cert, "client certificate")?,
                read_file(key, "client key")?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(CoordError::Other("etcd `cert_file` and `key_file` go together".into()));
        }
    }
    Ok(tls)
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| CoordError::Other(format!("cannot read the etcd {what} {}: {e}", path.display())))
}

fn read_password(path: &Path) -> Result<String> {
    let bytes = read_file(path, "password file")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| CoordError::Other(format!("the etcd password file {} is not UTF-8", path.display())))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// 64 random bits from the standard library's per-process random keys.
fn random_u64() -> u64 {
    let state = std::collections::hash_map::RandomState::new();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    state.hash_one((std::process::id(), nanos))
}

/// The key range `[start, end)` of every key with `prefix`, etcd style: the
/// empty prefix is everything (`["\0", "\0")` means "from \0 on").
fn key_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    // Only 0xFF bytes (never valid UTF-8): everything from the prefix on.
    (prefix.to_vec(), vec![0])
}

fn classify(err: &etcd_client::Error) -> Class {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => {
            if never_sent(status) || status.message().contains("no leader") {
                return Class::NotSent;
            }
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Unknown
                | Code::Internal => Class::Transient,
                _ => Class::Definite,
            }
        }
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => Class::Transient,
        E::LeaseKeepAliveError(msg) if is_lease_not_found(msg) => Class::Definite,
        E::LeaseKeepAliveError(_) => Class::Transient,
        _ => Class::Definite,
    }
}

/// Whether the request failed while connecting to the member, before it was sent.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn is_lease_not_found(msg: &str) -> bool {
    msg.contains("lease not found")
}

/// The error's message with its causes (tonic keeps the cause of a
/// transport failure, e.g. "connection refused", out of the status message).
fn error_text(err: &etcd_client::Error) -> String {
    let mut text = match err {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            if message.is_empty() {
                format!("{:?}", status.code())
            } else {
                message.to_owned()
            }
        }
        other => other.to_string(),
    };
    let mut source = match err {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn map_error(op: &str, endpoints: &str, err: &etcd_client::Error, lease: Option<LeaseId>) -> CoordError {
    if let Some(lease) = lease {
        let not_found = match err {
            etcd_client::Error::GRpcStatus(status) => {
                status.code() == Code::NotFound && status.message().contains("lease not found")
            }
            etcd_client::Error::LeaseKeepAliveError(msg) => is_lease_not_found(msg),
            _ => false,
        };
        if not_found {
            return CoordError::LeaseNotFound(lease);
        }
    }
    let message = format!("{op} on etcd ({endpoints}): {}", error_text(err));
    match classify(err) {
        Class::NotSent | Class::Transient => CoordError::Unavailable(message),
        Class::Definite => CoordError::Other(message),
    }
}

fn utf8_key(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| {
        CoordError::Other(format!(
            "etcd holds a key that is not UTF-8: {:?}",
            String::from_utf8_lossy(key)
        ))
    })
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: utf8_key(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>, op: &str) -> Result<Revision> {
    header
        .map(etcd_client::ResponseHeader::revision)
        .ok_or_else(|| CoordError::Other(format!("{op}: etcd answered without a response header")))
}

/// The key read by the last `Get` of a transaction branch.
fn txn_read(resp: &TxnResponse, op: &str) -> Result<Option<KeyValue>> {
    for op_resp in resp.op_responses().iter().rev() {
        if let TxnOpResponse::Get(get) = op_resp {
            return get.kvs().first().map(convert_kv).transpose();
        }
    }
    Err(CoordError::Other(format!(
        "{op}: etcd's transaction response has no read"
    )))
}

/// Every key read by the `Get`s of a transaction branch, in order.
fn txn_reads(resp: &TxnResponse) -> Result<Vec<Option<KeyValue>>> {
    resp.op_responses()
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get.kvs().first().map(convert_kv).transpose()),
            _ => None,
        })
        .collect()
}

fn txn_deleted(resp: &TxnResponse) -> bool {
    resp.op_responses()
        .iter()
        .any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0))
}

/// The etcd comparison for `cond`, or `None` when it can never hold (a
/// revision below 1 names no key's revision).
fn compare(key: &str, cond: Compare) -> Option<etcd_client::Compare> {
    match cond {
        Compare::Absent => Some(etcd_client::Compare::create_revision(key, CompareOp::Equal, 0)),
        Compare::CreateRevision(rev) if rev > 0 => {
            Some(etcd_client::Compare::create_revision(key, CompareOp::Equal, rev))
        }
        Compare::ModRevision(rev) if rev > 0 => Some(etcd_client::Compare::mod_revision(key, CompareOp::Equal, rev)),
        Compare::CreateRevision(_) | Compare::ModRevision(_) => None,
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|id| PutOptions::new().with_lease(id))
}

fn convert_events(resp: &etcd_client::WatchResponse) -> Result<Vec<WatchEvent>> {
    resp.events()
        .iter()
        .filter_map(|event| event.kv().map(|kv| (event.event_type(), kv)))
        .map(|(kind, kv)| match kind {
            EventType::Put => convert_kv(kv).map(WatchEvent::Put),
            EventType::Delete => Ok(WatchEvent::Delete {
                key: utf8_key(kv.key())?,
                revision: kv.mod_revision(),
            }),
        })
        .collect()
}

/// Forwards one etcd watch stream until the receiver goes away or the stream
/// ends (with an error sent first).
async fn forward_watch(
    mut stream: etcd_client::WatchStream,
    tx: mpsc::Sender<Result<Vec<WatchEvent>>>,
    mut next: Revision,
    endpoints: String,
) {
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return,
            message = stream.message() => message,
        };
        let failure = match message {
            Ok(Some(resp)) if resp.compact_revision() > 0 => CoordError::Compacted(next),
            Ok(Some(resp)) if resp.canceled() => CoordError::Unavailable(format!(
                "watch on etcd ({endpoints}): canceled by etcd: {}",
                resp.cancel_reason()
            )),
            Ok(Some(resp)) => match convert_events(&resp) {
                Ok(events) if events.is_empty() => continue,
                Ok(events) => {
                    if let Some(last) = events.last() {
                        next = last.revision().saturating_add(1);
                    }
                    if tx.send(Ok(events)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => e,
            },
            Ok(None) => CoordError::Unavailable(format!("watch on etcd ({endpoints}): the stream ended")),
            Err(e) => map_error("watch", &endpoints, &e, None),
        };
        let _ = tx.send(Err(failure)).await;
        return;
    }
}

#[async_trait]
impl Coordinator for EtcdCoordinator {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        // Whole seconds, rounded up, at least one.
        let secs = i64::try_from(ttl.as_millis().div_ceil(1_000).max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call("grant", Retry::Always, None, || {
                let mut lease = self.inner.lease.clone();
                async move { lease.grant(secs, None).await }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(CoordError::Other(format!(
                "grant on etcd ({}): {}",
                self.inner.endpoints,
                resp.error()
            )));
        }
        let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
        self.remember_ttl(resp.id(), granted);
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        // A fresh stream per renewal: its one response answers this request,
        // so returning means etcd's leader has renewed the lease since the call.
        let renewed = self
            .call("keep_alive", Retry::Always, Some(lease), || {
                let mut client = self.inner.lease.clone();
                async move { client.keep_alive(lease).await.map(drop) }
            })
            .await;
        if let Err(CoordError::LeaseNotFound(_)) = renewed {
            self.ttls().remove(&lease);
        }
        renewed?;
        if let Some(ttl) = self.ttls().get(&lease) {
            return Ok(*ttl);
        }
        // A lease granted through another handle: ask once for its TTL.
        let resp = self
            .call("keep_alive", Retry::Always, Some(lease), || {
                let mut client = self.inner.lease.clone();
                async move { client.time_to_live(lease, None).await }
            })
            .await?;
        if resp.ttl() < 0 {
            return Err(CoordError::LeaseNotFound(lease));
        }
        let ttl = Duration::from_secs(u64::try_from(resp.granted_ttl()).unwrap_or(0));
        self.remember_ttl(lease, ttl);
        Ok(ttl)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let revoked = self
            .call("revoke", Retry::Always, Some(lease), || {
                let mut client = self.inner.lease.clone();
                async move { client.revoke(lease).await.map(drop) }
            })
            .await;
        self.ttls().remove(&lease);
        match revoked {
            Ok(()) | Err(CoordError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .call("get", Retry::Always, None, || {
                let mut kv = self.inner.kv.clone();
                let key = key.to_owned();
                async move { kv.get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let (mut from, end) = key_range(prefix.as_bytes());
        let mut kvs = Vec::new();
        let mut revision = 0;
        loop {
            let resp = self
                .call("range", Retry::Always, None, || {
                    let mut kv = self.inner.kv.clone();
                    let mut opts = GetOptions::new().with_range(end.clone()).with_limit(RANGE_PAGE);
                    if revision > 0 {
                        // Later pages read the same revision as the first.
                        opts = opts.with_revision(revision);
                    }
                    let from = from.clone();
                    async move { kv.get(from, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = header_revision(resp.header(), "range")?;
            }
            for kv in resp.kvs() {
                kvs.push(convert_kv(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((kvs, revision))
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<KeyValue> {
        let txn = Txn::new().and_then(vec![TxnOp::put(key, value, put_options(lease)), TxnOp::get(key, None)]);
        let resp = self.txn("put", Retry::IfNotSent, lease, txn).await?;
        txn_read(&resp, "put")?.ok_or_else(|| CoordError::Other(format!("put of {key}: etcd did not return the key")))
    }

    async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        cond: Compare,
    ) -> Result<Result<KeyValue, Option<KeyValue>>> {
        let Some(cmp) = compare(key, cond) else {
            return self.get(key).await.map(Err);
        };
        let txn = Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::put(key, value, put_options(lease)), TxnOp::get(key, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.txn("put_if", Retry::IfNotSent, lease, txn).await?;
        let current = txn_read(&resp, "put_if")?;
        if !resp.succeeded() {
            return Ok(Err(current));
        }
        current
            .map(Ok)
            .ok_or_else(|| CoordError::Other(format!("put_if of {key}: etcd did not return the key")))
    }

    async fn put_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        cond: Option<Compare>,
        fence: &Fence,
    ) -> Result<Result<KeyValue, Refused>> {
        let read_both = || vec![TxnOp::get(fence.key.as_str(), None), TxnOp::get(key, None)];
        let fence_cmp = compare(&fence.key, Compare::CreateRevision(fence.token));
        let key_cmp = match cond {
            Some(cond) => compare(key, cond).map(Some),
            None => Some(None),
        };
        let txn = match (fence_cmp, key_cmp) {
            (Some(fence_cmp), Some(key_cmp)) => Txn::new()
                .when(std::iter::once(fence_cmp).chain(key_cmp).collect::<Vec<_>>())
                .and_then(vec![TxnOp::put(key, value, put_options(lease)), TxnOp::get(key, None)])
                .or_else(read_both()),
            // A condition that can never hold: read both keys to say why.
            _ => Txn::new().when(vec![]).and_then(read_both()),
        };
        let resp = self.txn("put_fenced", Retry::IfNotSent, lease, txn).await?;
        let reads = txn_reads(&resp)?;
        if let [owner, current] = reads.as_slice() {
            return Ok(Err(if fence.holds(owner.as_ref()) {
                Refused::Conflict(current.clone())
            } else {
                Refused::FenceLost(owner.clone())
            }));
        }
        txn_read(&resp, "put_fenced")?
            .map(Ok)
            .ok_or_else(|| CoordError::Other(format!("put_fenced of {key}: etcd did not return the key")))
    }

    async fn delete_if(&self, key: &str, cond: Compare) -> Result<bool> {
        let Some(cmp) = compare(key, cond) else {
            return Ok(false);
        };
        let txn = Txn::new().when(vec![cmp]).and_then(vec![TxnOp::delete(key, None)]);
        let resp = self.txn("delete_if", Retry::IfNotSent, None, txn).await?;
        Ok(resp.succeeded() && txn_deleted(&resp))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let resp = self
            .call("delete", Retry::IfNotSent, None, || {
                let mut kv = self.inner.kv.clone();
                let key = key.to_owned();
                async move { kv.delete(key, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let start = after.max(0).saturating_add(1);
        let (key, end) = key_range(prefix.as_bytes());
        let created = self
            .call("watch", Retry::Always, None, || {
                let mut client = self.inner.watch.clone();
                let opts = WatchOptions::new().with_range(end.clone()).with_start_revision(start);
                let key = key.clone();
                async move {
                    let mut stream = client.watch(key, Some(opts)).await?;
                    // The first response confirms (or refuses) the watch.
                    match stream.message().await? {
                        Some(resp) if resp.created() && !resp.canceled() => Ok(Ok(stream)),
                        Some(resp) => Ok(Err(resp)),
                        None => Err(etcd_client::Error::WatchError(
                            "the stream ended before etcd created the watch".into(),
                        )),
                    }
                }
            })
            .await?;
        let stream = match created {
            Ok(stream) => stream,
            Err(resp) if resp.compact_revision() > 0 => return Err(CoordError::Compacted(start)),
            Err(resp) => {
                return Err(CoordError::Other(format!(
                    "watch on etcd ({}): etcd refused the watch: {}",
                    self.inner.endpoints,
                    resp.cancel_reason()
                )));
            }
        };
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(forward_watch(stream, tx, start, self.inner.endpoints.clone()));
        Ok(rx)
    }

    async fn append(&self, record: &[u8]) -> Result<u64> {
        let n = self.inner.appended.fetch_add(1, Ordering::Relaxed);
        let key = format!(
            "{}{:016x}{n:016x}",
            self.inner.opts.journal_prefix, self.inner.journal_id
        );
        let resp = self
            .call("append", Retry::IfNotSent, None, || {
                let mut kv = self.inner.kv.clone();
                let (key, record) = (key.clone(), record.to_vec());
                async move { kv.put(key, record, None).await }
            })
            .await?;
        let revision = header_revision(resp.header(), "append")?;
        let seq = u64::try_from(revision)
            .map_err(|_| CoordError::Other(format!("append: etcd answered with revision {revision}")))?;
        let every = (self.inner.opts.keep_journal / 10).clamp(1, 1_000);
        if n.is_multiple_of(every)
            && let Err(e) = self.prune_journal(every).await
        {
            tracing::warn!("could not prune the journal: {e}");
        }
        Ok(seq)
    }

    async fn read_journal(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let (Ok(after), Ok(limit)) = (i64::try_from(after), i64::try_from(limit)) else {
            return Ok(Vec::new());
        };
        if limit == 0 || after == i64::MAX {
            return Ok(Vec::new());
        }
        let (start, end) = key_range(self.inner.opts.journal_prefix.as_bytes());
        let resp = self
            .call("read_journal", Retry::Always, None, || {
                let mut kv = self.inner.kv.clone();
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_min_mod_revision(after + 1)
                    .with_sort(SortTarget::Mod, SortOrder::Ascend)
                    .with_limit(limit);
                let start = start.clone();
                async move { kv.get(start, Some(opts)).await }
            })
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                u64::try_from(kv.mod_revision())
                    .map(|seq| (seq, kv.value().to_vec()))
                    .map_err(|_| CoordError::Other(format!("journal record with revision {}", kv.mod_revision())))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges_bound_exactly_the_prefixed_keys() {
        assert_eq!(key_range(b"a/"), (b"a/".to_vec(), b"a0".to_vec()));
        assert_eq!(key_range(b""), (vec![0], vec![0]));
        let (start, end) = key_range("ü".as_bytes());
        let key = "üx".as_bytes();
        assert!(key >= start.as_slice() && key < end.as_slice());
        assert_eq!(key_range(&[b'a', 0xFF]), (vec![b'a', 0xFF], vec![b'b']));
    }

    #[test]
    fn conditions_on_impossible_revisions_never_hold() {
        assert!(compare("k", Compare::CreateRevision(0)).is_none());
        assert!(compare("k", Compare::ModRevision(-1)).is_none());
        assert!(compare("k", Compare::Absent).is_some());
        assert!(compare("k", Compare::CreateRevision(1)).is_some());
    }

    #[test]
    fn errors_are_classified() {
        let unavailable = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: request timed out"));
        assert_eq!(classify(&unavailable), Class::Transient);
        let no_leader = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader"));
        assert_eq!(classify(&no_leader), Class::NotSent);
        let denied = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("etcdserver: permission denied"));
        assert_eq!(classify(&denied), Class::Definite);
        assert!(
            matches!(map_error("put", "e", &denied, None), CoordError::Other(m) if m.contains("permission denied"))
        );
        let missing = etcd_client::Error::GRpcStatus(tonic::Status::not_found("etcdserver: requested lease not found"));
        assert!(matches!(
            map_error("put", "e", &missing, Some(7)),
            CoordError::LeaseNotFound(7)
        ));
        let gone = etcd_client::Error::LeaseKeepAliveError("lease not found".into());
        assert_eq!(classify(&gone), Class::Definite);
        assert!(matches!(
            map_error("keep_alive", "e", &gone, Some(3)),
            CoordError::LeaseNotFound(3)
        ));
        assert!(
            matches!(map_error("get", "a:1", &unavailable, None), CoordError::Unavailable(m) if m == "get on etcd (a:1): etcdserver: request timed out")
        );
    }

    #[test]
    fn journal_ids_differ_between_handles() {
        assert_ne!(random_u64(), random_u64());
    }
}
