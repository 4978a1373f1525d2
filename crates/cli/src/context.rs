//! Finding the cluster definition and the coordinator it names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use understudy_agent::Keys;
use understudy_config::Source;
use understudy_coord::Coordinator;
use understudy_coord::etcd::{EtcdCoordinator, EtcdOptions};
use understudy_coord::sqlite::SqliteCoordinator;
use understudy_core::ClusterSpec;
use understudy_core::spec::CoordinatorSpec;

/// Where `understudy demo` keeps its cluster: a per-user directory.
pub fn demo_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("understudy-demo"),
        _ => PathBuf::from(format!("/tmp/understudy-demo-{}", nix::unistd::getuid())),
    }
}

/// The definition to use: `--config`, else `$UNDERSTUDY_CONFIG`, else a
/// running demo's, else `/etc/understudy/cluster.toml`.
pub fn find_config(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("UNDERSTUDY_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let demo = demo_dir().join("cluster.toml");
    if demo.exists() {
        return Ok(demo);
    }
    let system = PathBuf::from("/etc/understudy/cluster.toml");
    if system.exists() {
        return Ok(system);
    }
    bail!(
        "no cluster definition found: pass --config FILE, set UNDERSTUDY_CONFIG, \
         or start a local cluster with `understudy demo`"
    )
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Loads and checks a definition; prints diagnostics to stderr. `None` when invalid.
pub fn load_checked(path: &Path) -> Result<Option<ClusterSpec>> {
    let text = read(path)?;
    let name = path.display().to_string();
    let checked = understudy_config::check(&text);
    eprint!("{}", Source::new(&name, &text).render_all(&checked.diagnostics));
    Ok(checked.spec)
}

/// A checked definition, its path and directory, and the coordinator it names.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub base_dir: PathBuf,
    pub keys: Keys,
    pub coord: Arc<dyn Coordinator>,
    pub coordinator_desc: String,
}

/// Loads the definition (errors printed, then refused) and opens its coordinator.
pub async fn open(explicit: Option<&Path>) -> Result<Cluster> {
    let path = find_config(explicit)?;
    let Some(spec) = load_checked(&path)? else {
        bail!(
            "{} is not a valid cluster definition (see the errors above)",
            path.display()
        );
    };
    let base_dir = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let (coord, keys, coordinator_desc): (Arc<dyn Coordinator>, Keys, String) = match &spec.settings.coordinator {
        CoordinatorSpec::Embedded { path: db } => {
            let db = match db {
                Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
                Some(p) => base_dir.join(p),
                None => PathBuf::from(format!("/var/lib/understudy/{}.db", spec.name)),
            };
            if let Some(parent) = db.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create the coordinator's directory {}", parent.display()))?;
            }
            let coord = SqliteCoordinator::open(&db)
                .await
                .with_context(|| format!("cannot open the embedded coordinator {}", db.display()))?;
            (
                Arc::new(coord),
                Keys::new("/understudy", &spec.name),
                format!("embedded ({})", db.display()),
            )
        }
        CoordinatorSpec::Etcd(etcd) => {
            let keys = Keys::new(&etcd.prefix, &spec.name);
            let resolve = |file: &Option<String>| {
                file.as_ref().map(|p| match Path::new(p) {
                    p if p.is_absolute() => p.to_path_buf(),
                    p => base_dir.join(p),
                })
            };
            // The journal lives beside the cluster's state, not under it, so
            // watching the state does not stream every journal record.
            let mut opts = EtcdOptions::new(etcd.endpoints.clone(), keys.journal_prefix().to_string());
            opts.ca_file = resolve(&etcd.ca_file);
            opts.cert_file = resolve(&etcd.cert_file);
            opts.key_file = resolve(&etcd.key_file);
            opts.username = etcd.username.clone();
            opts.password_file = resolve(&etcd.password_file);
            let desc = format!("etcd ({})", etcd.endpoints.join(", "));
            let coord = EtcdCoordinator::connect(opts)
                .await
                .with_context(|| format!("cannot connect to {desc}"))?;
            (Arc::new(coord), keys, desc)
        }
    };
    Ok(Cluster {
        spec,
        base_dir,
        keys,
        coord,
        coordinator_desc,
    })
}

/// A current-thread runtime on this thread (see the agent shell's invariant).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
