//! Finding the cluster definition and the coordinator it names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use understudy_agent::Keys;
use understudy_config::Source;
use understudy_coord::etcd::{EtcdCoordinator, EtcdOptions};
use understudy_coord::sqlite::SqliteCoordinator;
use understudy_coord::{CoordError, Coordinator};
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

/// A checked definition and its directory, before connecting to anything.
pub struct Definition {
    /// Where the definition was read from.
    pub path: PathBuf,
    pub spec: ClusterSpec,
    pub base_dir: PathBuf,
    pub keys: Keys,
}

/// A checked definition, its directory, and the coordinator it names.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub base_dir: PathBuf,
    pub keys: Keys,
    pub coord: Arc<dyn Coordinator>,
    pub coordinator_desc: String,
    /// The embedded store's id (`None` on etcd).
    pub store_id: Option<String>,
}

/// Loads the definition (errors printed, then refused).
pub fn load(explicit: Option<&Path>) -> Result<Definition> {
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
    let keys = match &spec.settings.coordinator {
        CoordinatorSpec::Embedded { .. } => Keys::new("/understudy", &spec.name),
        CoordinatorSpec::Etcd(etcd) => Keys::new(&etcd.prefix, &spec.name),
    };
    Ok(Definition {
        path,
        spec,
        base_dir,
        keys,
    })
}

impl Definition {
    /// The embedded store's file (`None` on etcd): `path` relative to the
    /// definition, by default `/var/lib/understudy/CLUSTER.db`.
    pub fn embedded_path(&self) -> Option<PathBuf> {
        match &self.spec.settings.coordinator {
            CoordinatorSpec::Embedded { path: db } => Some(match db {
                Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
                Some(p) => self.base_dir.join(p),
                None => PathBuf::from(format!("/var/lib/understudy/{}.db", self.spec.name)),
            }),
            CoordinatorSpec::Etcd(_) => None,
        }
    }

    /// Opens the coordinator the definition names. The embedded store must
    /// exist (`understudy init`); nothing is created here.
    pub async fn connect(&self) -> Result<Cluster> {
        let (coord, coordinator_desc, store_id): (Arc<dyn Coordinator>, String, Option<String>) =
            match &self.spec.settings.coordinator {
                CoordinatorSpec::Embedded { .. } => {
                    let db = self.embedded_path().unwrap_or_default();
                    let coord = SqliteCoordinator::open(&db).await.map_err(|e| match e {
                        CoordError::NoStore(m) => anyhow::anyhow!("{m}"),
                        e => anyhow::Error::new(e)
                            .context(format!("cannot open the embedded coordinator {}", db.display())),
                    })?;
                    let id = coord.cluster_id().to_owned();
                    (Arc::new(coord), format!("embedded ({})", db.display()), Some(id))
                }
                CoordinatorSpec::Etcd(etcd) => {
                    let base_dir = &self.base_dir;
                    let resolve = |file: &Option<String>| {
                        file.as_ref().map(|p| match Path::new(p) {
                            p if p.is_absolute() => p.to_path_buf(),
                            p => base_dir.join(p),
                        })
                    };
                    // The journal lives beside the cluster's state, not under it, so
                    // watching the state does not stream every journal record.
                    let mut opts = EtcdOptions::new(etcd.endpoints.clone(), self.keys.journal_prefix().to_string());
                    opts.ca_file = resolve(&etcd.ca_file);
                    opts.cert_file = resolve(&etcd.cert_file);
                    opts.key_file = resolve(&etcd.key_file);
                    opts.username = etcd.username.clone();
                    opts.password_file = resolve(&etcd.password_file);
                    let desc = format!("etcd ({})", etcd.endpoints.join(", "));
                    let coord = EtcdCoordinator::connect(opts)
                        .await
                        .with_context(|| format!("cannot connect to {desc}"))?;
                    (Arc::new(coord), desc, None)
                }
            };
        Ok(Cluster {
            spec: self.spec.clone(),
            base_dir: self.base_dir.clone(),
            keys: self.keys.clone(),
            coord,
            coordinator_desc,
            store_id,
        })
    }
}

/// Loads the definition and opens its coordinator (which must exist).
pub async fn open(explicit: Option<&Path>) -> Result<Cluster> {
    load(explicit)?.connect().await
}

/// `understudy init`: creates the embedded store the definition names (and
/// its directory). Idempotent: an existing store is reported and kept. On
/// etcd there is nothing to create.
pub async fn init(explicit: Option<&Path>) -> Result<()> {
    let def = load(explicit)?;
    let Some(db) = def.embedded_path() else {
        println!(
            "cluster `{}` uses etcd: nothing to create (etcd keeps the cluster's keys itself)",
            def.spec.name
        );
        return Ok(());
    };
    if db.exists() {
        return match SqliteCoordinator::open(&db).await {
            Ok(coord) => {
                println!(
                    "{} already holds the embedded coordinator (store id {}); nothing changed",
                    db.display(),
                    coord.cluster_id()
                );
                Ok(())
            }
            Err(CoordError::NoStore(m)) => bail!(
                "{m}; {} exists but is not a coordinator store: move it away first (it is never overwritten)",
                db.display()
            ),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot open {}", db.display()))),
        };
    }
    if let Some(parent) = db.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the coordinator's directory {}", parent.display()))?;
    }
    let coord = SqliteCoordinator::create(&db)
        .await
        .with_context(|| format!("cannot create the embedded coordinator {}", db.display()))?;
    println!(
        "created the embedded coordinator {} for cluster `{}` (store id {})",
        db.display(),
        def.spec.name,
        coord.cluster_id()
    );
    Ok(())
}

/// A current-thread runtime on this thread (see the agent shell's invariant).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
