//! The `sync` driver: files replicated between nodes through the coordinator
//! (F8; the seed's synchronised registry keys, S2.2c, S2.3b, S2.3e, S2.5, and
//! its settings files that must follow the active node, S2.6).
//!
//! The owner's copy is authoritative and lives in the coordinator (the agent
//! provides the store, `DriverEnv::sync`):
//!
//! - **start** (on the node that is taking the group over): the stored copy,
//!   if there is one, is written over the local files, so the services that
//!   depend on this resource start with the newest settings; then the local
//!   state is stored (the first owner of a new cluster seeds the store with
//!   its own files);
//! - **monitor** (every monitor interval, on the owner): if the files changed
//!   since they were last stored, the new state is stored — an edit made on
//!   the active node reaches the store within one interval;
//! - **stop**: the final state is stored.
//!
//! Every store is a fenced write on behalf of the group's owner (`ctx.token`,
//! see `SyncStore::store`): a node that no longer owns the group — a stale
//! owner resumed after a pause — cannot overwrite its successor's copy. A
//! refused store fails a start or a monitor; a stop still succeeds (the
//! copy is the new owner's, and nothing of ours is left to store).
//!
//! `paths` are files or directories (taken recursively). A path that does not
//! exist is recorded as absent; applying a copy where a path is absent leaves
//! a local one alone (deletions are not replicated: a file removed on the
//! owner stays on the others). Files are written atomically (temporary file,
//! fsync, rename) with their recorded mode; a file that exists locally keeps
//! its local owner and group, a new one gets the numeric owner recorded on
//! the node that stored it. The copy is kept small: at most 1 MiB in
//! all (etcd's request limit is 1.5 MiB), larger copies are refused with an
//! error naming the biggest files.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use understudy_core::spec::SyncSpec;

use crate::{Driver, DriverEnv, DriverError, Health, OpCtx, StoreError, SyncStore};

/// Largest copy stored.
const MAX_BYTES: usize = 1 << 20;

/// The replicated copy: every file under the resource's paths.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Copy {
    /// Absolute file path → mode and content.
    files: BTreeMap<String, File>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct File {
    mode: u32,
    data: Vec<u8>,
    /// Numeric owner on the node that stored it (absent in copies stored
    /// by older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gid: Option<u32>,
}

pub struct SyncDriver {
    resource: String,
    paths: Vec<PathBuf>,
    store: Option<Arc<dyn SyncStore>>,
    /// The copy as last stored or applied by this driver.
    last: Mutex<Option<Copy>>,
    running: std::sync::atomic::AtomicBool,
}

impl SyncDriver {
    pub fn new(resource: &str, spec: &SyncSpec, env: &DriverEnv) -> Result<Self, DriverError> {
        Ok(SyncDriver {
            resource: resource.to_string(),
            paths: spec.paths.iter().map(PathBuf::from).collect(),
            store: env.sync.clone(),
            last: Mutex::new(None),
            running: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    fn store(&self, op: &'static str) -> Result<&Arc<dyn SyncStore>, DriverError> {
        self.store
            .as_ref()
            .ok_or_else(|| self.failed(op, "no replicated store is available to this driver"))
    }

    /// Reads the local files (on a blocking thread).
    async fn snapshot(&self, op: &'static str) -> Result<Copy, DriverError> {
        let paths = self.paths.clone();
        let copy = tokio::task::spawn_blocking(move || read_paths(&paths))
            .await
            .map_err(|e| self.failed(op, format!("reading the files panicked: {e}")))?
            .map_err(|e| self.failed(op, e))?;
        let size: usize = copy.files.values().map(|f| f.data.len()).sum();
        if size > MAX_BYTES {
            let mut big: Vec<(&String, usize)> = copy.files.iter().map(|(p, f)| (p, f.data.len())).collect();
            big.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            let list: Vec<String> = big.iter().take(3).map(|(p, n)| format!("{p} ({n} bytes)")).collect();
            return Err(self.failed(
                op,
                format!(
                    "{size} bytes to replicate, more than the 1 MiB limit; biggest: {}",
                    list.join(", ")
                ),
            ));
        }
        Ok(copy)
    }

    /// Stores `copy`; `Ok(Err(why))` when the store refused it because
    /// this node no longer owns the group.
    async fn push(&self, op: &'static str, ctx: &OpCtx, copy: &Copy) -> Result<Result<(), String>, DriverError> {
        let bytes = serde_json::to_vec(copy).map_err(|e| self.failed(op, format!("cannot encode the copy: {e}")))?;
        match self.store(op)?.store(ctx, &self.resource, &bytes).await {
            Ok(()) => {}
            Err(StoreError::Fenced(why)) => return Ok(Err(why)),
            Err(StoreError::Failed(e)) => return Err(self.failed(op, format!("cannot store the copy: {e}"))),
        }
        *self.last.lock().await = Some(copy.clone());
        Ok(Ok(()))
    }

    /// Stores the local state if it differs from what was last stored;
    /// `Ok(Err(why))` when the store refused it (see `push`).
    async fn push_if_changed(&self, op: &'static str, ctx: &OpCtx) -> Result<Result<(), String>, DriverError> {
        let copy = self.snapshot(op).await?;
        if self.last.lock().await.as_ref() == Some(&copy) {
            return Ok(Ok(()));
        }
        self.push(op, ctx, &copy).await
    }

    /// A refused store is an error (start, monitor).
    fn owned(&self, op: &'static str, pushed: Result<(), String>) -> Result<(), DriverError> {
        pushed.map_err(|why| self.failed(op, format!("the copy was not stored: {why}")))
    }
}

#[async_trait]
impl Driver for SyncDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let work = async {
            let stored = self
                .store("start")?
                .load(&self.resource)
                .await
                .map_err(|e| self.failed("start", format!("cannot load the stored copy: {e}")))?;
            if let Some(bytes) = stored {
                let copy: Copy = serde_json::from_slice(&bytes)
                    .map_err(|e| self.failed("start", format!("the stored copy is unreadable: {e}")))?;
                let apply = copy.clone();
                tokio::task::spawn_blocking(move || write_copy(&apply))
                    .await
                    .map_err(|e| self.failed("start", format!("writing the files panicked: {e}")))?
                    .map_err(|e| self.failed("start", e))?;
                *self.last.lock().await = Some(copy);
            }
            let pushed = self.push_if_changed("start", ctx).await?;
            self.owned("start", pushed)
        };
        tokio::time::timeout(ctx.timeout, work)
            .await
            .map_err(|_| DriverError::timeout("start", &self.resource, ctx.timeout))??;
        self.running.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        if !self.running.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        // A forced stop (zero timeout) does not wait for the store.
        if ctx.timeout.is_zero() {
            return Ok(());
        }
        match tokio::time::timeout(ctx.timeout, self.push_if_changed("stop", ctx)).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => {
                // The copy is the current owner's: leave it alone. Stopping
                // needed nothing else.
                tracing::warn!(
                    resource = self.resource,
                    "stopped without storing the final copy: {why}"
                );
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DriverError::timeout("stop", &self.resource, ctx.timeout)),
        }
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        if !self.running.load(std::sync::atomic::Ordering::SeqCst) {
            return Health::Stopped;
        }
        match tokio::time::timeout(ctx.timeout, self.push_if_changed("monitor", ctx)).await {
            Ok(Ok(pushed)) => match self.owned("monitor", pushed) {
                Ok(()) => Health::Running,
                Err(e) => Health::Failed(e.to_string()),
            },
            Ok(Err(e)) => Health::Failed(e.to_string()),
            Err(_) => Health::Failed(format!("replicating the files took longer than {:?}", ctx.timeout)),
        }
    }

    async fn probe(&self, _ctx: &OpCtx) -> Health {
        if self.running.load(std::sync::atomic::Ordering::SeqCst) {
            Health::Running
        } else {
            Health::Stopped
        }
    }
}

fn read_paths(paths: &[PathBuf]) -> Result<Copy, String> {
    let mut copy = Copy::default();
    for p in paths {
        read_into(p, &mut copy)?;
    }
    Ok(copy)
}

fn read_into(path: &Path, copy: &mut Copy) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("cannot list {}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            read_into(&e, copy)?;
        }
    } else if meta.is_file() {
        let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        copy.files.insert(
            path.display().to_string(),
            File {
                mode: meta.permissions().mode() & 0o7777,
                data,
                uid: Some(meta.uid()),
                gid: Some(meta.gid()),
            },
        );
    }
    Ok(())
}

/// Writes every file of `copy` whose content or mode differs here. A file
/// that exists here keeps its local owner (user ids may differ between
/// nodes; the node that installed the service knows its user); a new file
/// gets the owner recorded with it.
fn write_copy(copy: &Copy) -> Result<(), String> {
    for (path, file) in &copy.files {
        let path = Path::new(path);
        let local = std::fs::symlink_metadata(path).ok().filter(|m| m.is_file());
        if local
            .as_ref()
            .is_some_and(|m| m.permissions().mode() & 0o7777 == file.mode)
            && std::fs::read(path).is_ok_and(|d| d == file.data)
        {
            continue;
        }
        let (uid, gid) = match &local {
            Some(m) => (Some(m.uid()), Some(m.gid())),
            None => (file.uid, file.gid),
        };
        let dir = path
            .parent()
            .ok_or_else(|| format!("{} has no parent directory", path.display()))?;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.understudy-sync",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(&file.data)
            .and_then(|()| {
                std::os::unix::fs::fchown(&f, uid, gid)?;
                // After the chown, which clears set-id bits.
                f.set_permissions(std::fs::Permissions::from_mode(file.mode))
            })
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store fenced like the agent's: a write lands only with the owner's token.
    #[derive(Default)]
    struct FencedStore {
        owner: std::sync::Mutex<i64>,
        copies: std::sync::Mutex<BTreeMap<String, Vec<u8>>>,
    }

    #[async_trait]
    impl SyncStore for FencedStore {
        async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
            Ok(self.copies.lock().unwrap().get(key).cloned())
        }

        async fn store(&self, ctx: &OpCtx, key: &str, value: &[u8]) -> Result<(), StoreError> {
            let owner = *self.owner.lock().unwrap();
            if ctx.token != Some(owner) {
                return Err(StoreError::Fenced(format!("owned under token {owner}")));
            }
            self.copies.lock().unwrap().insert(key.to_string(), value.to_vec());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_stale_owner_cannot_overwrite_its_successors_copy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.conf");
        std::fs::write(&file, b"v1").unwrap();
        let store = Arc::new(FencedStore::default());
        *store.owner.lock().unwrap() = 7;
        let env = DriverEnv {
            base_dir: dir.path().to_path_buf(),
            state_dir: dir.path().to_path_buf(),
            registry: Arc::new(crate::ProcessRegistry::new(
                dir.path(),
                Box::new(|_: &[(&str, i32)]| {}),
            )),
            sync: Some(store.clone()),
        };
        let spec = SyncSpec {
            paths: vec![file.display().to_string()],
        };
        let driver = SyncDriver::new("settings", &spec, &env).unwrap();
        let ctx = |token| OpCtx {
            node: "node1".into(),
            group: "g".into(),
            token,
            timeout: std::time::Duration::from_secs(5),
        };
        driver.start(&ctx(Some(7))).await.unwrap();
        let stored = |store: &FencedStore| store.copies.lock().unwrap().get("settings").cloned().unwrap();
        let v1 = stored(&store);
        // Another node takes over (token 9) and stores its copy; this node,
        // resumed, still has its own edits.
        *store.owner.lock().unwrap() = 9;
        let successor = serde_json::to_vec(&Copy::default()).unwrap();
        store
            .copies
            .lock()
            .unwrap()
            .insert("settings".into(), successor.clone());
        std::fs::write(&file, b"stale edit").unwrap();
        let health = driver.monitor(&ctx(Some(7))).await;
        assert!(
            matches!(&health, Health::Failed(why) if why.contains("not stored")),
            "{health:?}"
        );
        driver.stop(&ctx(Some(7))).await.expect("the stop itself succeeds");
        assert_eq!(stored(&store), successor, "the successor's copy is intact");
        assert_ne!(v1, successor);
        // Without a token nothing is stored either, and a start says why.
        let err = driver.start(&ctx(None)).await.unwrap_err();
        assert!(err.to_string().contains("not stored"), "{err}");
        assert_eq!(stored(&store), successor);
    }

    #[test]
    fn a_copy_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("etc/app/a.conf");
        let b = dir.path().join("etc/app/sub/b.xml");
        std::fs::create_dir_all(b.parent().unwrap()).unwrap();
        std::fs::write(&a, b"alpha").unwrap();
        std::fs::write(&b, b"<b/>").unwrap();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::lchown(&a, Some(65534), Some(4242)).unwrap();
        let copy = read_paths(&[dir.path().join("etc"), dir.path().join("missing")]).unwrap();
        assert_eq!(copy.files.len(), 2);
        assert_eq!(copy.files[&a.display().to_string()].mode, 0o600);
        assert_eq!(copy.files[&a.display().to_string()].uid, Some(65534));

        std::fs::remove_dir_all(dir.path().join("etc")).unwrap();
        write_copy(&copy).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"alpha");
        assert_eq!(std::fs::read(&b).unwrap(), b"<b/>");
        assert_eq!(std::fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_paths(&[dir.path().join("etc")]).unwrap(), copy);
        assert_eq!(
            (
                std::fs::metadata(&a).unwrap().uid(),
                std::fs::metadata(&a).unwrap().gid()
            ),
            (65534, 4242),
            "a new file gets the recorded owner"
        );
    }

    #[test]
    fn an_existing_file_keeps_its_local_owner_and_gets_the_new_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("app.conf");
        std::fs::write(&a, b"old").unwrap();
        std::os::unix::fs::lchown(&a, Some(4243), Some(4244)).unwrap();
        let mut copy = Copy::default();
        let file = |data: &[u8], mode| File {
            mode,
            data: data.to_vec(),
            uid: Some(65534),
            gid: Some(65534),
        };
        copy.files.insert(a.display().to_string(), file(b"new", 0o640));
        write_copy(&copy).unwrap();
        let meta = std::fs::metadata(&a).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
        assert_eq!((meta.uid(), meta.gid()), (4243, 4244), "the local owner is kept");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);

        // Same content, another mode: the mode is still applied.
        copy.files.insert(a.display().to_string(), file(b"new", 0o600));
        write_copy(&copy).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777, 0o600);

        // A copy stored by an older version has no owner: root (ours) it is.
        let b = dir.path().join("new.conf");
        let mut old = Copy::default();
        old.files.insert(
            b.display().to_string(),
            serde_json::from_str(r#"{"mode":420,"data":[104,105]}"#).unwrap(),
        );
        write_copy(&old).unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().uid(), nix::unistd::geteuid().as_raw());
    }
}
