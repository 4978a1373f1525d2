//! The embedded coordinator: one SQLite file (WAL mode) shared by every agent
//! process on one host.
//!
//! Each process opens the file itself; all state that matters lives in the
//! file, so nothing relies on one process's memory. Every operation runs on
//! tokio's blocking pool with a connection from a small per-handle pool.
//!
//! # Model
//!
//! - `meta(name, value)`: `schema_version`, `cluster_id` (random, chosen at
//!   creation: which store this is), `revision` (the global store revision),
//!   `compacted` (every change at or below it has been pruned), `boot_id`
//!   (the kernel boot the lease deadlines belong to) and `clock_ns` (the
//!   coordinator clock's high-water mark).
//! - `kv(key, value, create_rev, mod_rev, lease)`: the live keys. Keys are
//!   stored as BLOBs of their UTF-8 bytes so SQLite's `memcmp` order is Rust's
//!   `str` order and a prefix is the half-open range `[prefix, prefix_end)`.
//! - `leases(id AUTOINCREMENT, ttl_ns, expires_at_ns)`: ids are never reused.
//! - `changes(revision, key, kind, value, create_rev, mod_rev, lease)`: the
//!   history watches read; one revision may hold several rows (a lease's keys
//!   deleted together).
//! - `journal(seq AUTOINCREMENT, record)`: the event journal.
//!
//! # Creating and opening
//!
//! Only [`SqliteCoordinator::create`] makes a store (`understudy init`): it
//! builds the file aside and hard-links it into place, so it appears whole or
//! not at all, and it refuses when anything is at the path or when SQLite's
//! `-wal`/`-shm` files are there without their store (a store deleted under
//! running agents, whose WAL a new file would otherwise adopt).
//! [`SqliteCoordinator::open`] never creates anything: a missing, empty or
//! non-store file is [`CoordError::NoStore`] ("no coordinator at PATH").
//!
//! # Identity
//!
//! A handle remembers the device and inode of the file it opened, the
//! store's cluster id and the largest size the file has had. Before and after
//! every operation (and every watch poll) it `stat`s the path: a missing path
//! (deleted, renamed away), another inode (replaced) or a smaller file
//! (truncated: without `VACUUM`, which is never run, a SQLite file never
//! shrinks) fails the operation with [`CoordError::StoreLost`], and every
//! write transaction re-reads the cluster id under the lock. A handle keeps
//! using the file it opened (an unlinked file stays readable), so without
//! these checks agents would carry on in a store nobody else can see. A store
//! truncated or found to hold another id is lost for good; a path that names
//! the original file again (renamed back) is accepted again. New pooled
//! connections open the path afresh and are checked the same way. The check
//! uses `stat`, never a file descriptor: closing a descriptor of the database
//! file would drop the process's SQLite locks on it.
//!
//! # Writes and the clock
//!
//! A write is one `BEGIN IMMEDIATE` transaction (the file's write lock is
//! taken first, so writers never deadlock upgrading a read lock). Inside it,
//! after the lock is held, the coordinator reads its clock: the host's
//! `CLOCK_BOOTTIME` as the *initial* time namespace sees it (the process's
//! own reading minus its time namespace's boot-time offset, from
//! `/proc/self/timens_offsets`). Every process of the host reads the same
//! value whatever time namespace it runs in; the clock is monotonic, not moved
//! by wall-clock changes, and counts during suspend. The store keeps the
//! highest reading any write used (`clock_ns`); a write whose reading is
//! behind it fails for that process (its clock cannot be trusted) instead of
//! stamping deadlines that are too early, and a reading at or past it
//! advances it. Expired leases are reaped first, then the operation runs. A
//! write that changes keys increments the revision once; reaping an expired
//! (or revoked) lease deletes its keys at one revision of their own, like
//! etcd's lease revocation. Writes that change no key (a failed condition,
//! deleting a missing key, granting or renewing a lease, revoking a lease
//! without keys, appending to the journal) leave the revision alone.
//!
//! `CLOCK_BOOTTIME` restarts at each boot, so the file records the kernel's
//! boot id; opening a file written during an earlier boot expires every lease
//! (their holders died with that boot) and resets the clock mark.
//!
//! # Expiry without writers
//!
//! Reads (`get`, `range`) and every watch poll first run a cheap read-only
//! query for a lease past its deadline and open a write transaction only when
//! one exists, so a lease expires on time even when nobody writes, and a read
//! never returns a key whose lease has expired by the coordinator's clock.
//!
//! # Watches and pruning
//!
//! Each watch is a tokio task with its own connection that polls every
//! [`SqliteOptions::poll_interval`]: a read of the current revision skips the
//! poll cheaply when nothing changed; otherwise it reads the new `changes`
//! rows under its prefix in revision order and sends them as one batch. The
//! task ends when the receiver is dropped, and after sending an error.
//! `changes` keeps the last [`SqliteOptions::keep_revisions`] revisions; a
//! watch that needs older history gets [`CoordError::Compacted`]. The journal
//! keeps the newest [`SqliteOptions::keep_journal`] records.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use nix::time::{ClockId, clock_gettime};
use rusqlite::config::DbConfig;
use rusqlite::types::Type;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use tokio::sync::mpsc;

use crate::{
    Compare, CoordError, Coordinator, Fence, KeyValue, LeaseId, Refused, Result, Revision, WatchEvent, WatchStream,
};

/// The schema this code reads and writes. Version 1 had no cluster id and no
/// clock mark; opening such a store adds them.
const SCHEMA_VERSION: i64 = 2;

/// Connections kept per handle for reuse.
const POOL_MAX: usize = 4;

/// At most this many revisions go into one watch batch.
const WATCH_BATCH_REVISIONS: i64 = 1_000;

/// Batches buffered per watch before the poller waits for the receiver.
const WATCH_CHANNEL: usize = 64;

const KIND_PUT: i64 = 0;
const KIND_DELETE: i64 = 1;

/// Where the kernel publishes the id of the current boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Where the kernel publishes this process's time-namespace clock offsets.
const TIMENS_OFFSETS_PATH: &str = "/proc/self/timens_offsets";

/// Tunables; [`Default`] suits production.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How long an operation waits for another process's write lock before
    /// failing with [`CoordError::Unavailable`].
    pub busy_timeout: Duration,
    /// How often a watch looks for new changes (and for expired leases).
    pub poll_interval: Duration,
    /// How many of the latest revisions the change history keeps for watches.
    pub keep_revisions: i64,
    /// How many of the newest journal records are kept.
    pub keep_journal: i64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(10),
            keep_revisions: 10_000,
            keep_journal: 100_000,
        }
    }
}

/// The embedded coordinator backend. Cheap to clone; clones share a
/// connection pool.
#[derive(Clone)]
pub struct SqliteCoordinator {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    opts: SqliteOptions,
    pool: Mutex<Vec<Connection>>,
    identity: Identity,
}

/// Which file this handle opened: checked before and after every operation
/// (see the module documentation, "Identity").
struct Identity {
    cluster_id: String,
    dev: u64,
    ino: u64,
    /// The largest size the file has had: without `VACUUM` (never run) a
    /// SQLite file never shrinks, so a smaller one was truncated.
    max_size: AtomicU64,
    /// Why the store is lost for good (truncated, another store's content).
    lost: Mutex<Option<String>>,
}

impl std::fmt::Debug for SqliteCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCoordinator")
            .field("path", &self.inner.path)
            .field("cluster_id", &self.inner.identity.cluster_id)
            .field("opts", &self.inner.opts)
            .finish()
    }
}

impl SqliteCoordinator {
    /// Opens the existing store at `path` with default options; never
    /// creates one (see [`SqliteCoordinator::create`]).
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the existing store at `path`. [`CoordError::NoStore`] when there
    /// is no file there, or the file is not a store (empty, truncated).
    pub async fn open_with(path: impl Into<PathBuf>, opts: SqliteOptions) -> Result<Self> {
        check_options(&opts)?;
        let path = path.into();
        let task_path = path.clone();
        let task_opts = opts.clone();
        let opened = tokio::task::spawn_blocking(move || open_store(&task_path, &task_opts))
            .await
            .map_err(|e| CoordError::Other(format!("blocking task failed: {e}")))
            .and_then(|r| r)
            .map_err(|e| with_context("open", &path, e))?;
        let (conn, identity) = opened;
        let inner = Arc::new(Inner {
            path,
            opts,
            pool: Mutex::new(vec![conn]),
            identity,
        });
        Ok(SqliteCoordinator { inner })
    }

    /// Creates a new, empty store at `path` with a fresh cluster id, then
    /// opens it. Refuses when anything is at `path` already, or when SQLite's
    /// `-wal`/`-shm` files of an earlier store are still beside it (agents
    /// may still be using that store). The file appears complete or not at
    /// all (built aside, then hard-linked into place).
    pub async fn create(path: impl Into<PathBuf>) -> Result<Self> {
        Self::create_with(path, SqliteOptions::default()).await
    }

    /// [`SqliteCoordinator::create`] with options.
    pub async fn create_with(path: impl Into<PathBuf>, opts: SqliteOptions) -> Result<Self> {
        check_options(&opts)?;
        let path = path.into();
        let task_path = path.clone();
        tokio::task::spawn_blocking(move || create_store(&task_path))
            .await
            .map_err(|e| CoordError::Other(format!("blocking task failed: {e}")))
            .and_then(|r| r)
            .map_err(|e| with_context("create", &path, e))?;
        Self::open_with(path, opts).await
    }

    /// The file this coordinator uses.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store's cluster id: random, chosen when the store was created,
    /// and the same for every handle onto the same store.
    pub fn cluster_id(&self) -> &str {
        &self.inner.identity.cluster_id
    }

    /// Runs `f` with a pooled connection on the blocking pool, after and
    /// before checking the store's identity; errors get the operation and
    /// the file as context.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let joined = tokio::task::spawn_blocking(move || {
            inner.check()?;
            let mut conn = inner.take()?;
            let result = f(&mut conn, &inner);
            inner.give(conn);
            // A result read from, or written to, a file that stopped being
            // the store meanwhile is not the store's answer.
            inner.check()?;
            result
        })
        .await;
        match joined {
            Ok(result) => result.map_err(|e| self.inner.context(op, e)),
            Err(e) => Err(self
                .inner
                .context(op, CoordError::Other(format!("blocking task failed: {e}")))),
        }
    }
}

fn check_options(opts: &SqliteOptions) -> Result<()> {
    if opts.keep_revisions < 1 || opts.keep_journal < 1 {
        return Err(CoordError::Other(format!(
            "invalid SQLite coordinator options: keep_revisions ({}) and keep_journal ({}) must be at least 1",
            opts.keep_revisions, opts.keep_journal
        )));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data; a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn take(&self) -> Result<Connection> {
        if let Some(conn) = lock(&self.pool).pop() {
            return Ok(conn);
        }
        // A new connection opens whatever the path names now: make sure it
        // is still this store before using it.
        let conn = open_connection(&self.path, &self.opts)?;
        let id = read_cluster_id(&conn)?;
        if id.as_deref() != Some(self.identity.cluster_id.as_str()) {
            return Err(self.lose(format!(
                "{} now holds another store (cluster id {}, expected {})",
                self.path.display(),
                id.as_deref().unwrap_or("none"),
                self.identity.cluster_id
            )));
        }
        self.check()?;
        trust(&conn)?;
        Ok(conn)
    }

    fn give(&self, conn: Connection) {
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_MAX {
            pool.push(conn);
        }
    }

    /// Marks the store lost for good and returns the error saying why.
    fn lose(&self, why: String) -> CoordError {
        let mut lost = lock(&self.identity.lost);
        if lost.is_none() {
            tracing::error!("{why}");
            *lost = Some(why.clone());
        }
        CoordError::StoreLost(why)
    }

    /// Does the path still name the file this handle opened, no smaller
    /// than it was? (One `stat`, no file descriptor: closing a descriptor of
    /// the database file would drop SQLite's POSIX locks.)
    fn check(&self) -> Result<()> {
        if let Some(why) = lock(&self.identity.lost).clone() {
            return Err(CoordError::StoreLost(why));
        }
        let path = self.path.display();
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CoordError::StoreLost(format!(
                    "{path} no longer exists (deleted or renamed away); this process still has the old \
                     file open, which is no longer the cluster's store"
                )));
            }
            Err(e) => return Err(CoordError::Unavailable(format!("cannot stat {path}: {e}"))),
        };
        let id = &self.identity;
        if (meta.dev(), meta.ino()) != (id.dev, id.ino) {
            return Err(CoordError::StoreLost(format!(
                "{path} is now another file (device {} inode {}, opened as device {} inode {}): the store was \
                 replaced",
                meta.dev(),
                meta.ino(),
                id.dev,
                id.ino
            )));
        }
        let size = meta.size();
        let largest = id.max_size.fetch_max(size, Ordering::SeqCst);
        if size < largest {
            return Err(self.lose(format!(
                "{path} shrank from {largest} to {size} bytes: the store was truncated"
            )));
        }
        Ok(())
    }

    /// Adds the operation and the file to an error's message.
    fn context(&self, op: &str, e: CoordError) -> CoordError {
        with_context(op, &self.path, e)
    }
}

fn with_context(op: &str, path: &Path, e: CoordError) -> CoordError {
    let path = path.display();
    match e {
        CoordError::Unavailable(m) => CoordError::Unavailable(format!("{op} on {path}: {m}")),
        CoordError::Other(m) => CoordError::Other(format!("{op} on {path}: {m}")),
        other => other,
    }
}

/// Maps SQLite errors: a busy or locked file and IO failures are
/// `Unavailable` (retry later), a file that is not (or no longer) a database
/// is `StoreLost`, anything else is `Other`.
fn sql_error(what: &str, e: rusqlite::Error) -> CoordError {
    let code = e.sqlite_error_code();
    let message = format!("{what}: {e}");
    match code {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::DiskFull
            | ErrorCode::FileLockingProtocolFailed,
        ) => CoordError::Unavailable(message),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => CoordError::StoreLost(message),
        _ => CoordError::Other(message),
    }
}

trait SqlContext<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| sql_error(what, e))
    }
}

fn no_store(path: &Path, why: &str) -> CoordError {
    CoordError::NoStore(format!(
        "no coordinator at {}{why} (create it with `understudy init`)",
        path.display()
    ))
}

/// Opens a connection onto an existing store (never creating the file) and
/// makes sure it looks like one before changing anything in it.
fn open_connection(path: &Path, opts: &SqliteOptions) -> Result<Connection> {
    if !path.exists() {
        return Err(no_store(path, ""));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).ctx("opening the database")?;
    // Until the caller has checked that this is the store it expects, closing
    // the connection must not checkpoint: SQLite may be reading the file
    // through the `-wal` of a store that was replaced under running agents,
    // and a checkpoint would copy that store's pages into this file.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .ctx("configuring the connection")?;
    conn.busy_timeout(opts.busy_timeout).ctx("setting busy_timeout")?;
    // Read-only first: an empty or truncated file must not be turned into a
    // fresh database by the pragmas below.
    let is_store: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
            [],
            |row| row.get(0),
        )
        .map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                no_store(path, &format!(": the file is not a coordinator store ({e})"))
            }
            _ => sql_error("reading the schema", e),
        })?;
    if !is_store {
        return Err(no_store(
            path,
            ": the file is not a coordinator store (empty or truncated)",
        ));
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .ctx("enabling WAL")?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(CoordError::Other(format!(
            "the database refused WAL mode (journal_mode is {mode}); it must be on a local filesystem"
        )));
    }
    // Durable commits: a revision handed out as a fencing token is never handed out again.
    conn.pragma_update(None, "synchronous", "FULL")
        .ctx("setting synchronous")?;
    Ok(conn)
}

/// The connection is onto the expected store: closing it may checkpoint.
fn trust(conn: &Connection) -> Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
        .ctx("configuring the connection")
        .map(|_| ())
}

fn read_cluster_id(conn: &Connection) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE name = 'cluster_id'", [], |row| row.get(0))
        .optional()
        .ctx("reading the cluster id")
}

/// Nanoseconds of this process's `CLOCK_BOOTTIME`.
fn boot_now_ns() -> Result<i64> {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map_err(|e| CoordError::Other(format!("reading CLOCK_BOOTTIME: {e}")))?;
    #[allow(clippy::useless_conversion)] // time_t and c_long are i64 on 64-bit targets only
    let (secs, nanos) = (i64::from(ts.tv_sec()), i64::from(ts.tv_nsec()));
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// The boot-time offset of this process's time namespace, in nanoseconds
/// (0 outside one, and on kernels without time namespaces).
fn parse_timens_boottime(text: &str) -> Result<i64, String> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        // The clock is named ("boottime") or numbered (CLOCK_BOOTTIME = 7).
        if matches!(fields.next(), Some("boottime" | "7")) {
            let secs: i64 = fields
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad line {line:?}"))?;
            let nanos: i64 = fields
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad line {line:?}"))?;
            return Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos));
        }
    }
    Ok(0)
}

/// Read once: a process's time namespace is fixed from its `execve` on (we
/// never `setns` into another one).
fn timens_boot_offset_ns() -> Result<i64> {
    static OFFSET: OnceLock<Result<i64, String>> = OnceLock::new();
    OFFSET
        .get_or_init(|| match std::fs::read_to_string(TIMENS_OFFSETS_PATH) {
            Ok(text) => parse_timens_boottime(&text).map_err(|e| format!("parsing {TIMENS_OFFSETS_PATH}: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("reading {TIMENS_OFFSETS_PATH}: {e}")),
        })
        .clone()
        .map_err(CoordError::Other)
}

/// The coordinator's clock: the host's `CLOCK_BOOTTIME` as the initial time
/// namespace reads it, whatever time namespace this process runs in.
fn coord_now_ns() -> Result<i64> {
    Ok(boot_now_ns()?.saturating_sub(timens_boot_offset_ns()?))
}

fn duration_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn current_boot_id() -> Result<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_owned())
        .map_err(|e| CoordError::Other(format!("reading {BOOT_ID_PATH}: {e}")))
}

/// A fresh random cluster id: 128 bits as hex.
fn new_cluster_id() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CoordError::Other(format!("reading /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value
);
CREATE TABLE IF NOT EXISTS kv (
    key        BLOB PRIMARY KEY NOT NULL,
    value      BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev    INTEGER NOT NULL,
    lease      INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ns        INTEGER NOT NULL,
    expires_at_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at_ns);
CREATE TABLE IF NOT EXISTS changes (
    revision   INTEGER NOT NULL,
    key        BLOB NOT NULL,
    kind       INTEGER NOT NULL,
    value      BLOB,
    create_rev INTEGER NOT NULL,
    mod_rev    INTEGER NOT NULL,
    lease      INTEGER,
    PRIMARY KEY (revision, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0), ('clock_ns', 0);
";

/// The `-wal` and `-shm` files SQLite keeps beside `path`.
fn sidecars(path: &Path) -> [PathBuf; 2] {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    [PathBuf::from(wal), PathBuf::from(shm)]
}

/// Builds a new store beside `path` (rollback journal, so no `-wal` is left
/// behind), then hard-links it into place, which fails if anything appeared
/// at `path` meanwhile.
fn create_store(path: &Path) -> Result<()> {
    if path.exists() {
        return Err(CoordError::Other(format!(
            "{} already exists; a store is never overwritten",
            path.display()
        )));
    }
    for sidecar in sidecars(path) {
        if sidecar.exists() {
            return Err(CoordError::Other(format!(
                "{} exists without the store it belongs to: the store was deleted or renamed while agents \
                 used it, and they may still write there. Stop every agent of the cluster, then remove {} \
                 and {} (or put the store back)",
                sidecar.display(),
                sidecars(path)[0].display(),
                sidecars(path)[1].display()
            )));
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| CoordError::Other(format!("{} names no file", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".creating-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp); // a leftover of this very pid only
    let built = build_store(&tmp).and_then(|()| {
        std::fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CoordError::Other(format!(
                "{} already exists; a store is never overwritten",
                path.display()
            )),
            _ => CoordError::Other(format!("cannot create {}: {e}", path.display())),
        })
    });
    let _ = std::fs::remove_file(&tmp);
    built
}

fn build_store(tmp: &Path) -> Result<()> {
    let mut conn = Connection::open_with_flags(
        tmp,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx("creating the database")?;
    let tx = conn.transaction().ctx("beginning the schema transaction")?;
    tx.execute_batch(SCHEMA).ctx("creating the schema")?;
    let cluster_id = new_cluster_id()?;
    tx.execute(
        "INSERT INTO meta (name, value) VALUES ('schema_version', ?1), ('cluster_id', ?2), ('boot_id', ?3)",
        params![SCHEMA_VERSION, cluster_id, current_boot_id()?],
    )
    .ctx("recording the store's identity")?;
    tx.execute("UPDATE meta SET value = ?1 WHERE name = 'clock_ns'", [coord_now_ns()?])
        .ctx("recording the clock")?;
    // The hard link into place keeps the inode.
    let file = std::fs::metadata(tmp).map_err(|e| CoordError::Other(format!("cannot stat {}: {e}", tmp.display())))?;
    tx.execute(
        "INSERT INTO meta (name, value) VALUES ('file_id', ?1)",
        [file_id(&file)],
    )
    .ctx("recording the store's file")?;
    tx.commit().ctx("committing the schema")?;
    conn.close().map_err(|(_, e)| sql_error("closing the new store", e))
}

/// Opens an existing store: its first connection and its identity.
fn open_store(path: &Path, opts: &SqliteOptions) -> Result<(Connection, Identity)> {
    let before = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => no_store(path, ""),
        _ => CoordError::Unavailable(format!("cannot stat {}: {e}", path.display())),
    })?;
    let sidecars_before = sidecars(path).iter().any(|p| p.exists());
    let mut conn = open_connection(path, opts)?;
    let cluster_id = init_schema(&mut conn, opts, &file_id(&before), sidecars_before)?;
    let after =
        std::fs::metadata(path).map_err(|e| CoordError::Unavailable(format!("cannot stat {}: {e}", path.display())))?;
    if (before.dev(), before.ino()) != (after.dev(), after.ino()) {
        return Err(CoordError::Unavailable(format!(
            "{} was replaced while it was being opened",
            path.display()
        )));
    }
    trust(&conn)?;
    let identity = Identity {
        cluster_id,
        dev: after.dev(),
        ino: after.ino(),
        max_size: AtomicU64::new(after.size()),
        lost: Mutex::new(None),
    };
    Ok((conn, identity))
}

/// The file a store lives in, as recorded in it: `DEV:INODE`.
fn file_id(meta: &std::fs::Metadata) -> String {
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Checks the schema version (upgrading version 1), that the content belongs
/// to this file (`file` is its `DEV:INODE`; `sidecars` says whether a
/// `-wal`/`-shm` was beside it before we opened it), expires the leases of
/// an earlier boot, and returns the store's cluster id.
fn init_schema(conn: &mut Connection, opts: &SqliteOptions, file: &str, sidecars: bool) -> Result<String> {
    let boot_id = current_boot_id()?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("beginning the schema transaction")?;
    let version: i64 = tx
        .query_row("SELECT value FROM meta WHERE name = 'schema_version'", [], |row| {
            row.get(0)
        })
        .ctx("reading the schema version")?;
    if version == 1 {
        // Version 1 stores predate the cluster id and the clock mark.
        tx.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('cluster_id', ?1), ('clock_ns', 0)",
            [new_cluster_id()?],
        )
        .ctx("upgrading the schema")?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'schema_version'",
            [SCHEMA_VERSION],
        )
        .ctx("upgrading the schema")?;
    } else if version != SCHEMA_VERSION {
        return Err(CoordError::Other(format!(
            "the database has schema version {version}; this build understands version {SCHEMA_VERSION}"
        )));
    }
    let cluster_id =
        read_cluster_id(&tx)?.ok_or_else(|| CoordError::Other("the store has no cluster id".to_owned()))?;
    let recorded: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE name = 'file_id'", [], |row| row.get(0))
        .optional()
        .ctx("reading the store's file")?;
    if recorded.as_deref() != Some(file) {
        if sidecars && recorded.is_some() {
            // SQLite found the `-wal` of the file that used to be here and
            // read it as this file's: what we see is the old store's.
            return Err(CoordError::StoreLost(format!(
                "the file was replaced while the previous store's -wal and -shm were beside it (they belong \
                 to file {}, this is {file}); stop every agent of the cluster, then remove the -wal and -shm \
                 files (or put the previous store back)",
                recorded.as_deref().unwrap_or("?")
            )));
        }
        // A store copied into place while nothing used it (a restored
        // backup), or a version 1 store: this is its file from now on.
        if recorded.is_some() {
            tracing::info!(
                was = recorded.as_deref(),
                now = file,
                "the store was copied; adopting its new file"
            );
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('file_id', ?1)",
            [file],
        )
        .ctx("recording the store's file")?;
    }
    let stored: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE name = 'boot_id'", [], |row| row.get(0))
        .optional()
        .ctx("reading the boot id")?;
    if stored.as_deref() != Some(boot_id.as_str()) {
        if stored.is_some() {
            // Lease deadlines are CLOCK_BOOTTIME values of an earlier boot:
            // meaningless now, and their holders did not survive the reboot.
            let ids = column_i64(&tx, "SELECT id FROM leases ORDER BY id", [])?;
            tracing::info!(leases = ids.len(), "host rebooted since last use; expiring every lease");
            for id in ids {
                revoke_lease(&tx, opts, id)?;
            }
        }
        // The clock restarted with the boot.
        tx.execute("UPDATE meta SET value = 0 WHERE name = 'clock_ns'", [])
            .ctx("resetting the clock mark")?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('boot_id', ?1)",
            [&boot_id],
        )
        .ctx("recording the boot id")?;
    }
    tx.commit().ctx("committing the schema")?;
    Ok(cluster_id)
}

fn column_i64<P: rusqlite::Params>(tx: &Transaction<'_>, sql: &str, params: P) -> Result<Vec<i64>> {
    let mut stmt = tx.prepare_cached(sql).ctx("preparing a query")?;
    let rows = stmt.query_map(params, |row| row.get(0)).ctx("querying")?;
    rows.collect::<rusqlite::Result<Vec<i64>>>().ctx("reading rows")
}

fn meta_int(conn: &Connection, name: &str) -> Result<i64> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |row| row.get(0))
        .ctx("reading store metadata")
}

/// Runs `f` in a write transaction: under the write lock it checks that the
/// file still holds this handle's store, reads the coordinator's clock
/// (refusing a reading behind the store's mark, and advancing the mark),
/// and reaps expired leases. `LeaseNotFound` from `f` (which must not have
/// written anything then) still commits the reaping.
fn write_tx<T>(conn: &mut Connection, inner: &Inner, f: impl FnOnce(&Transaction<'_>, i64) -> Result<T>) -> Result<T> {
    let opts = &inner.opts;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("beginning a write transaction")?;
    let id = match read_cluster_id(&tx) {
        Ok(id) => id,
        Err(CoordError::Other(m) | CoordError::StoreLost(m)) => {
            return Err(inner.lose(format!("{} no longer reads as a store: {m}", inner.path.display())));
        }
        Err(e) => return Err(e),
    };
    if id.as_deref() != Some(inner.identity.cluster_id.as_str()) {
        return Err(inner.lose(format!(
            "{} now holds another store (cluster id {}, expected {})",
            inner.path.display(),
            id.as_deref().unwrap_or("none"),
            inner.identity.cluster_id
        )));
    }
    let now = coord_now_ns()?;
    let mark = meta_int(&tx, "clock_ns")?;
    if now < mark {
        return Err(CoordError::Other(format!(
            "this process reads the coordinator clock {} ms behind the store's high-water mark; \
             refusing to write with a clock that ran backwards",
            (mark - now) / 1_000_000
        )));
    }
    tx.execute("UPDATE meta SET value = ?1 WHERE name = 'clock_ns'", [now])
        .ctx("advancing the clock mark")?;
    reap(&tx, opts, now)?;
    match f(&tx, now) {
        Ok(value) => {
            tx.commit().ctx("committing")?;
            Ok(value)
        }
        Err(e @ CoordError::LeaseNotFound(_)) => {
            tx.commit().ctx("committing")?;
            Err(e)
        }
        Err(e) => Err(e), // dropping `tx` rolls back
    }
}

/// Reaps expired leases if there are any; cheap (one read) when there are none.
fn reap_if_expired(conn: &mut Connection, inner: &Inner) -> Result<()> {
    let now = coord_now_ns()?;
    let expired: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM leases WHERE expires_at_ns <= ?1)",
            [now],
            |row| row.get(0),
        )
        .ctx("looking for expired leases")?;
    if expired {
        write_tx(conn, inner, |_, _| Ok(()))?;
    }
    Ok(())
}

/// Runs `f` in a read transaction (one consistent snapshot), after reaping
/// expired leases.
fn read_tx<T>(conn: &mut Connection, inner: &Inner, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
    reap_if_expired(conn, inner)?;
    let tx = conn.transaction().ctx("beginning a read transaction")?;
    let value = f(&tx)?;
    tx.commit().ctx("ending a read transaction")?;
    Ok(value)
}

fn reap(tx: &Transaction<'_>, opts: &SqliteOptions, now: i64) -> Result<()> {
    let expired = column_i64(
        tx,
        "SELECT id FROM leases WHERE expires_at_ns <= ?1 ORDER BY expires_at_ns, id",
        [now],
    )?;
    for id in expired {
        tracing::debug!(lease = id, "lease expired");
        revoke_lease(tx, opts, id)?;
    }
    Ok(())
}

/// Deletes a lease and its keys (at one new revision if it had any). Returns
/// whether the lease existed.
fn revoke_lease(tx: &Transaction<'_>, opts: &SqliteOptions, id: LeaseId) -> Result<bool> {
    let keys = {
        let mut stmt = tx
            .prepare_cached("SELECT key, create_rev FROM kv WHERE lease = ?1 ORDER BY key")
            .ctx("preparing a query")?;
        let rows = stmt
            .query_map([id], |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?)))
            .ctx("listing a lease's keys")?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .ctx("listing a lease's keys")?
    };
    if !keys.is_empty() {
        let rev = next_revision(tx, opts)?;
        tx.execute("DELETE FROM kv WHERE lease = ?1", [id])
            .ctx("deleting a lease's keys")?;
        for (key, create_rev) in keys {
            record_delete(tx, rev, &key, create_rev)?;
        }
    }
    let deleted = tx
        .execute("DELETE FROM leases WHERE id = ?1", [id])
        .ctx("deleting a lease")?;
    Ok(deleted > 0)
}

/// Increments the store revision and prunes history that fell out of the window.
fn next_revision(tx: &Transaction<'_>, opts: &SqliteOptions) -> Result<Revision> {
    let rev: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value",
            [],
            |row| row.get(0),
        )
        .ctx("incrementing the revision")?;
    let floor = rev.saturating_sub(opts.keep_revisions);
    if floor > 0 && floor > meta_int(tx, "compacted")? {
        tx.execute("DELETE FROM changes WHERE revision <= ?1", [floor])
            .ctx("pruning the change history")?;
        tx.execute("UPDATE meta SET value = ?1 WHERE name = 'compacted'", [floor])
            .ctx("recording the compaction")?;
    }
    Ok(rev)
}

fn record_delete(tx: &Transaction<'_>, rev: Revision, key: &[u8], create_rev: Revision) -> Result<()> {
    tx.execute(
        "INSERT INTO changes (revision, key, kind, value, create_rev, mod_rev, lease)
         VALUES (?1, ?2, ?3, NULL, ?4, ?1, NULL)",
        params![rev, key, KIND_DELETE, create_rev],
    )
    .ctx("recording a deletion")?;
    Ok(())
}

fn utf8_key(column: usize, bytes: Vec<u8>) -> rusqlite::Result<String> {
    String::from_utf8(bytes).map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Blob, Box::new(e)))
}

/// Reads a `kv` row selected as `key, value, create_rev, mod_rev, lease`.
fn kv_from_row(row: &Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: utf8_key(0, row.get(0)?)?,
        value: row.get(1)?,
        create_revision: row.get(2)?,
        mod_revision: row.get(3)?,
        lease: row.get(4)?,
    })
}

fn get_kv(conn: &Connection, key: &str) -> Result<Option<KeyValue>> {
    let mut stmt = conn
        .prepare_cached("SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE key = ?1")
        .ctx("preparing a query")?;
    stmt.query_row([key.as_bytes()], kv_from_row)
        .optional()
        .ctx("reading a key")
}

fn ensure_lease(tx: &Transaction<'_>, id: LeaseId) -> Result<()> {
    let exists: bool = tx
        .query_row("SELECT EXISTS (SELECT 1 FROM leases WHERE id = ?1)", [id], |row| {
            row.get(0)
        })
        .ctx("looking up a lease")?;
    if exists {
        Ok(())
    } else {
        Err(CoordError::LeaseNotFound(id))
    }
}

/// The half-open byte range `[start, end)` holding every key with `prefix`.
/// Valid UTF-8 never contains 0xFF and never ends in 0xFF, so `[0xFF]` bounds
/// every key and incrementing the last byte never overflows.
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let start = prefix.as_bytes().to_vec();
    let mut end = start.clone();
    match end.last_mut() {
        Some(last) => *last += 1,
        None => end.push(0xFF),
    }
    (start, end)
}

fn compare_holds(cond: Compare, current: Option<&KeyValue>) -> bool {
    match (cond, current) {
        (Compare::Absent, None) => true,
        (Compare::CreateRevision(rev), Some(kv)) => kv.create_revision == rev,
        (Compare::ModRevision(rev), Some(kv)) => kv.mod_revision == rev,
        _ => false,
    }
}

fn put_in_tx(
    tx: &Transaction<'_>,
    opts: &SqliteOptions,
    key: &str,
    value: &[u8],
    lease: Option<LeaseId>,
    current: Option<&KeyValue>,
) -> Result<KeyValue> {
    if let Some(id) = lease {
        ensure_lease(tx, id)?;
    }
    let rev = next_revision(tx, opts)?;
    let kv = KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision: current.map_or(rev, |kv| kv.create_revision),
        mod_revision: rev,
        lease,
    };
    tx.execute(
        "INSERT OR REPLACE INTO kv (key, value, create_rev, mod_rev, lease) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key.as_bytes(), value, kv.create_revision, rev, lease],
    )
    .ctx("writing a key")?;
    tx.execute(
        "INSERT INTO changes (revision, key, kind, value, create_rev, mod_rev, lease)
         VALUES (?1, ?2, ?3, ?4, ?5, ?1, ?6)",
        params![rev, key.as_bytes(), KIND_PUT, value, kv.create_revision, lease],
    )
    .ctx("recording a write")?;
    Ok(kv)
}

fn delete_in_tx(tx: &Transaction<'_>, opts: &SqliteOptions, current: &KeyValue) -> Result<()> {
    let rev = next_revision(tx, opts)?;
    tx.execute("DELETE FROM kv WHERE key = ?1", [current.key.as_bytes()])
        .ctx("deleting a key")?;
    record_delete(tx, rev, current.key.as_bytes(), current.create_revision)
}

/// One poll's result: the events found and the revision read up to.
struct Polled {
    events: Vec<WatchEvent>,
    seen: Revision,
    more: bool,
}

fn poll_changes(conn: &mut Connection, inner: &Inner, range: &(Vec<u8>, Vec<u8>), after: Revision) -> Result<Polled> {
    inner.check()?;
    reap_if_expired(conn, inner)?;
    let current = meta_int(conn, "revision")?;
    if current <= after {
        return Ok(Polled {
            events: Vec::new(),
            seen: after,
            more: false,
        });
    }
    let upto = current.min(after.saturating_add(WATCH_BATCH_REVISIONS));
    let tx = conn.transaction().ctx("beginning a read transaction")?;
    if meta_int(&tx, "compacted")? > after {
        return Err(CoordError::Compacted(after.saturating_add(1)));
    }
    let events = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT key, kind, value, create_rev, mod_rev, lease, revision FROM changes
                 WHERE revision > ?1 AND revision <= ?2 AND key >= ?3 AND key < ?4
                 ORDER BY revision, key",
            )
            .ctx("preparing a query")?;
        let rows = stmt
            .query_map(params![after, upto, range.0, range.1], |row| {
                let key = utf8_key(0, row.get(0)?)?;
                if row.get::<_, i64>(1)? == KIND_DELETE {
                    Ok(WatchEvent::Delete {
                        key,
                        revision: row.get(6)?,
                    })
                } else {
                    Ok(WatchEvent::Put(KeyValue {
                        key,
                        value: row.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
                        create_revision: row.get(3)?,
                        mod_revision: row.get(4)?,
                        lease: row.get(5)?,
                    }))
                }
            })
            .ctx("reading changes")?;
        rows.collect::<rusqlite::Result<Vec<_>>>().ctx("reading changes")?
    };
    tx.commit().ctx("ending a read transaction")?;
    Ok(Polled {
        events,
        seen: upto,
        more: upto < current,
    })
}

async fn watch_loop(
    inner: Arc<Inner>,
    mut conn: Connection,
    range: Arc<(Vec<u8>, Vec<u8>)>,
    mut after: Revision,
    tx: mpsc::Sender<Result<Vec<WatchEvent>>>,
) {
    loop {
        let task_inner = Arc::clone(&inner);
        let task_range = Arc::clone(&range);
        let joined = tokio::task::spawn_blocking(move || {
            let polled = poll_changes(&mut conn, &task_inner, &task_range, after);
            (conn, polled)
        })
        .await;
        let polled = match joined {
            Ok((returned, polled)) => {
                conn = returned;
                polled
            }
            Err(e) => {
                let e = CoordError::Other(format!("blocking task failed: {e}"));
                let _ = tx.send(Err(inner.context("watch", e))).await;
                return;
            }
        };
        match polled {
            Ok(polled) => {
                after = polled.seen;
                if !polled.events.is_empty() && tx.send(Ok(polled.events)).await.is_err() {
                    break;
                }
                if polled.more {
                    continue;
                }
            }
            Err(e) => {
                // The stream ends after an error; the caller resumes from the
                // last revision it saw (or re-reads after `Compacted`).
                let _ = tx.send(Err(inner.context("watch", e))).await;
                break;
            }
        }
        tokio::select! {
            _ = tx.closed() => break,
            _ = tokio::time::sleep(inner.opts.poll_interval) => {}
        }
    }
    inner.give(conn);
}

#[async_trait]
impl Coordinator for SqliteCoordinator {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ns = duration_ns(ttl);
        self.run("grant", move |conn, inner| {
            write_tx(conn, inner, |tx, now| {
                tx.execute(
                    "INSERT INTO leases (ttl_ns, expires_at_ns) VALUES (?1, ?2)",
                    [ttl_ns, now.saturating_add(ttl_ns)],
                )
                .ctx("granting a lease")?;
                Ok(tx.last_insert_rowid())
            })
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.run("keep_alive", move |conn, inner| {
            write_tx(conn, inner, |tx, now| {
                // Reaping ran first, so an expired lease is gone by now.
                let ttl_ns: i64 = tx
                    .query_row(
                        "UPDATE leases SET expires_at_ns = ?1 + ttl_ns WHERE id = ?2 RETURNING ttl_ns",
                        [now, lease],
                        |row| row.get(0),
                    )
                    .optional()
                    .ctx("renewing a lease")?
                    .ok_or(CoordError::LeaseNotFound(lease))?;
                Ok(Duration::from_nanos(u64::try_from(ttl_ns).unwrap_or(0)))
            })
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.run("revoke", move |conn, inner| {
            write_tx(conn, inner, |tx, _| revoke_lease(tx, &inner.opts, lease).map(|_| ()))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.run("get", move |conn, inner| read_tx(conn, inner, |tx| get_kv(tx, &key)))
            .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let (start, end) = prefix_range(prefix);
        self.run("range", move |conn, inner| {
            read_tx(conn, inner, |tx| {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT key, value, create_rev, mod_rev, lease FROM kv
                         WHERE key >= ?1 AND key < ?2 ORDER BY key",
                    )
                    .ctx("preparing a query")?;
                let kvs = stmt
                    .query_map([&start, &end], kv_from_row)
                    .ctx("reading keys")?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .ctx("reading keys")?;
                Ok((kvs, meta_int(tx, "revision")?))
            })
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<KeyValue> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run("put", move |conn, inner| {
            write_tx(conn, inner, |tx, _| {
                let current = get_kv(tx, &key)?;
                put_in_tx(tx, &inner.opts, &key, &value, lease, current.as_ref())
            })
        })
        .await
    }

    async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        cond: Compare,
    ) -> Result<Result<KeyValue, Option<KeyValue>>> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run("put_if", move |conn, inner| {
            write_tx(conn, inner, |tx, _| {
                let current = get_kv(tx, &key)?;
                if !compare_holds(cond, current.as_ref()) {
                    return Ok(Err(current));
                }
                put_in_tx(tx, &inner.opts, &key, &value, lease, current.as_ref()).map(Ok)
            })
        })
        .await
    }

    async fn put_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        cond: Option<Compare>,
        fence: &Fence,
    ) -> Result<Result<KeyValue, Refused>> {
        let (key, value, fence) = (key.to_owned(), value.to_vec(), fence.clone());
        self.run("put_fenced", move |conn, inner| {
            write_tx(conn, inner, |tx, _| {
                let owner = get_kv(tx, &fence.key)?;
                if !fence.holds(owner.as_ref()) {
                    return Ok(Err(Refused::FenceLost(owner)));
                }
                let current = get_kv(tx, &key)?;
                if let Some(cond) = cond
                    && !compare_holds(cond, current.as_ref())
                {
                    return Ok(Err(Refused::Conflict(current)));
                }
                put_in_tx(tx, &inner.opts, &key, &value, lease, current.as_ref()).map(Ok)
            })
        })
        .await
    }

    async fn delete_if(&self, key: &str, cond: Compare) -> Result<bool> {
        let key = key.to_owned();
        self.run("delete_if", move |conn, inner| {
            write_tx(conn, inner, |tx, _| match get_kv(tx, &key)? {
                Some(current) if compare_holds(cond, Some(&current)) => {
                    delete_in_tx(tx, &inner.opts, &current)?;
                    Ok(true)
                }
                _ => Ok(false),
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.run("delete", move |conn, inner| {
            write_tx(conn, inner, |tx, _| match get_kv(tx, &key)? {
                Some(current) => {
                    delete_in_tx(tx, &inner.opts, &current)?;
                    Ok(true)
                }
                None => Ok(false),
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let after = after.max(0); // 0 is "before anything"
        // The watch's own connection, checked against compaction up front so
        // the caller gets `Compacted` from this call rather than the stream.
        let inner = Arc::clone(&self.inner);
        let conn = tokio::task::spawn_blocking(move || {
            inner.check()?;
            let conn = inner.take()?;
            let compacted = meta_int(&conn, "compacted")?;
            if after < compacted {
                inner.give(conn);
                return Err(CoordError::Compacted(after.saturating_add(1)));
            }
            Ok(conn)
        })
        .await
        .map_err(|e| CoordError::Other(format!("blocking task failed: {e}")))
        .and_then(|r| r)
        .map_err(|e| self.inner.context("watch", e))?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let range = Arc::new(prefix_range(prefix));
        tokio::spawn(watch_loop(Arc::clone(&self.inner), conn, range, after, tx));
        Ok(rx)
    }

    async fn append(&self, record: &[u8]) -> Result<u64> {
        let record = record.to_vec();
        self.run("append", move |conn, inner| {
            write_tx(conn, inner, |tx, _| {
                tx.execute("INSERT INTO journal (record) VALUES (?1)", [&record])
                    .ctx("appending to the journal")?;
                let seq = tx.last_insert_rowid();
                tx.execute(
                    "DELETE FROM journal WHERE seq <= ?1",
                    [seq.saturating_sub(inner.opts.keep_journal)],
                )
                .ctx("pruning the journal")?;
                u64::try_from(seq).map_err(|_| CoordError::Other(format!("journal sequence {seq} is negative")))
            })
        })
        .await
    }

    async fn read_journal(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("read_journal", move |conn, _| {
            let mut stmt = conn
                .prepare_cached("SELECT seq, record FROM journal WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                .ctx("preparing a query")?;
            let rows = stmt
                .query_map([after, limit], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
                })
                .ctx("reading the journal")?
                .collect::<rusqlite::Result<Vec<_>>>()
                .ctx("reading the journal")?;
            rows.into_iter()
                .map(|(seq, record)| {
                    u64::try_from(seq)
                        .map(|seq| (seq, record))
                        .map_err(|_| CoordError::Other(format!("journal sequence {seq} is negative")))
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_bound_exactly_the_prefixed_keys() {
        let (start, end) = prefix_range("a/");
        assert_eq!(start, b"a/");
        assert_eq!(end, b"a0");
        let (start, end) = prefix_range("");
        assert!(start.is_empty());
        assert_eq!(end, vec![0xFF]);
        // A multi-byte last character: the range still holds its extensions.
        let (start, end) = prefix_range("ü");
        let key = "üx".as_bytes();
        assert!(key >= start.as_slice() && key < end.as_slice());
        assert!("v".as_bytes() < start.as_slice() || "v".as_bytes() >= end.as_slice());
    }

    #[test]
    fn compare_semantics() {
        let kv = KeyValue {
            key: "k".into(),
            value: vec![],
            create_revision: 3,
            mod_revision: 5,
            lease: None,
        };
        assert!(compare_holds(Compare::Absent, None));
        assert!(!compare_holds(Compare::Absent, Some(&kv)));
        assert!(compare_holds(Compare::CreateRevision(3), Some(&kv)));
        assert!(!compare_holds(Compare::CreateRevision(5), Some(&kv)));
        assert!(compare_holds(Compare::ModRevision(5), Some(&kv)));
        assert!(!compare_holds(Compare::ModRevision(3), Some(&kv)));
        assert!(!compare_holds(Compare::ModRevision(5), None));
    }

    #[test]
    fn time_namespace_offsets_parse() {
        assert_eq!(
            parse_timens_boottime("monotonic 0 0\nboottime 3600 5\n"),
            Ok(3_600_000_000_005)
        );
        assert_eq!(
            parse_timens_boottime("monotonic 10 0\nboottime -3600 0\n"),
            Ok(-3_600_000_000_000)
        );
        assert_eq!(parse_timens_boottime("1 0 0\n7 -2 500\n"), Ok(-1_999_999_500));
        assert_eq!(parse_timens_boottime(""), Ok(0));
        assert!(parse_timens_boottime("boottime x 0").is_err());
    }

    #[test]
    fn coordinator_clock_is_the_hosts() {
        // This test process runs in the initial time namespace (or its
        // offset is accounted for): both readings agree within a second.
        let host = coord_now_ns().unwrap();
        let own = boot_now_ns().unwrap() - timens_boot_offset_ns().unwrap();
        assert!((own - host).abs() < 1_000_000_000);
    }

    #[test]
    fn boot_clock_is_monotonic() {
        let a = boot_now_ns().unwrap();
        let b = boot_now_ns().unwrap();
        assert!(a > 0 && b >= a);
    }
}
