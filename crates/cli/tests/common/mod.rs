//! A cluster of real agent processes on this host, on the embedded
//! coordinator, for integration tests and the failover benchmark.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod bed;
pub mod dbbed;
pub mod seed;
pub mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use understudy_agent::JournalRecord;
use understudy_agent::keys::{KeyKind, Keys, build_view};
use understudy_agent::local::LocalCluster;
use understudy_coord::sqlite::SqliteCoordinator;
use understudy_coord::{Coordinator, KeyValue};
use understudy_core::agent::{ClusterView, EntryKind};

pub const STANDIN: &str = include_str!("../../../../profiles/sigmasystemcenter-2.1/bin/standin");

/// Group `web`'s processes: database <- app <- frontend, and a clone
/// `metrics`, all stand-ins.
pub const WEB_RESOURCES: &str = r#"[group.web.resource.database]
kind = "process"
command = ["./standin", "database"]

[group.web.resource.app]
kind = "process"
command = ["./standin", "app"]
depends_on = ["database"]

[group.web.resource.frontend]
kind = "process"
command = ["./standin", "frontend"]
depends_on = ["app"]

[group.web.resource.metrics]
kind = "process"
command = ["./standin", "metrics"]
clone = true
"#;

/// Three nodes, one group `web` (database <- app <- frontend, a clone, a
/// monitor-only check), short timings: TTL 1 s.
pub fn definition(ttl_ms: u64) -> String {
    let renew = ttl_ms / 4;
    format!(
        r#"
[cluster]
name = "it"
coordinator = {{ embedded = {{ path = "coordinator.db" }} }}
lease_ttl = "{ttl_ms}ms"
renew_interval = "{renew}ms"
fence_margin = "{renew}ms"

[[node]]
name = "node1"
address = "127.0.0.11/8"
priority = 1

[[node]]
name = "node2"
address = "127.0.0.12/8"
priority = 2

[[node]]
name = "node3"
address = "127.0.0.13/8"
priority = 3

[group.web]
monitor = {{ interval = "300ms", timeout = "250ms", restarts = 2, within = "1m" }}
failover = {{ threshold = 5, within = "10m" }}

{WEB_RESOURCES}
[group.web.resource.health]
kind = "script"
status = ["/bin/true"]
monitor_only = true
"#
    )
}

pub struct TestCluster {
    // Dropped first: the agents are stopped and their cgroups removed
    // while the state directories still say where those are.
    pub agents: LocalCluster,
    pub dir: tempfile::TempDir,
    pub coord: Arc<dyn Coordinator>,
    pub keys: Keys,
}

pub const NODES: [&str; 3] = ["node1", "node2", "node3"];

/// Runs `body` on a current-thread runtime inside `host` (so it reaches the
/// bed's addresses), with a cluster of agents (started through `command`)
/// in `dir`, on the etcd at `endpoints`, under cluster name `name`.
pub fn in_host<F, Fut>(
    host: &understudy_testbed::Host,
    endpoints: Vec<String>,
    name: &str,
    dir: tempfile::TempDir,
    command: understudy_agent::local::CommandFactory,
    body: F,
) where
    F: FnOnce(TestCluster) -> Fut + Send,
    Fut: std::future::Future<Output = ()>,
{
    let name = name.to_string();
    host.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let keys = Keys::new("/understudy", &name);
            let opts = understudy_coord::etcd::EtcdOptions::new(endpoints, keys.journal_prefix().to_string());
            let coord = understudy_coord::etcd::EtcdCoordinator::connect(opts).await.unwrap();
            body(TestCluster::with(dir, Arc::new(coord), keys, Some(command))).await;
        });
    })
    .unwrap();
}

impl TestCluster {
    /// Writes `definition` and the stand-in script into a temp dir.
    pub fn prepare(definition: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.toml"), definition).unwrap();
        let standin = dir.path().join("standin");
        std::fs::write(&standin, STANDIN).unwrap();
        std::fs::set_permissions(&standin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        dir
    }

    /// A cluster on the embedded coordinator, whose store it creates (as
    /// `understudy init` does); starts nothing.
    pub async fn new(definition: &str) -> TestCluster {
        let dir = Self::prepare(definition);
        let coord = SqliteCoordinator::create(&dir.path().join("coordinator.db"))
            .await
            .unwrap();
        Self::with(dir, Arc::new(coord), Keys::new("/understudy", "it"), None)
    }

    /// A cluster in `dir` (see `prepare`) on `coord`; agents are started
    /// through `command` when given (e.g. inside network namespaces).
    pub fn with(
        dir: tempfile::TempDir,
        coord: Arc<dyn Coordinator>,
        keys: Keys,
        command: Option<understudy_agent::local::CommandFactory>,
    ) -> TestCluster {
        let config = dir.path().join("cluster.toml");
        let mut agents = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_understudy")), dir.path(), &config);
        if let Some(command) = command {
            agents = agents.with_command(command);
        }
        TestCluster {
            dir,
            agents,
            coord,
            keys,
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    pub fn start_all(&mut self) {
        for n in NODES {
            self.agents.start(n).unwrap();
        }
    }

    pub async fn snapshot(&self) -> Snapshot {
        let (kvs, revision) = self.coord.range(self.keys.prefix()).await.unwrap();
        Snapshot::new(
            &self.keys,
            kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
            revision,
        )
    }

    /// Waits, driven by the coordinator's watch, until `done` holds; panics
    /// after `timeout` with the state and the agents' logs.
    pub async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + timeout;
        let (kvs, mut revision) = self.coord.range(self.keys.prefix()).await.unwrap();
        let mut map: BTreeMap<String, KeyValue> = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let mut stream = self.coord.watch(self.keys.prefix(), revision).await.unwrap();
        loop {
            let snap = Snapshot::new(&self.keys, map.clone(), revision);
            if done(&snap) {
                return snap;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.recv()).await {
                Ok(Some(Ok(events))) => revision = understudy_coord::apply_events(&mut map, revision, events),
                Ok(other) => panic!("watch ended while waiting for {what}: {other:?}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}\nowners: {:?}\nstatus: {:#?}\n{}",
                    snap.view.owners,
                    snap.status,
                    self.logs()
                ),
            }
        }
    }

    pub fn logs(&self) -> String {
        NODES
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.agents.log_path(n)).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("--- {n} agent log (tail)\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    pub async fn journal(&self) -> Vec<JournalRecord> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.coord.read_journal(after, 1000).await.unwrap();
            let Some((seq, _)) = page.last() else { break };
            after = *seq;
            out.extend(page.into_iter().filter_map(|(_, b)| serde_json::from_slice(&b).ok()));
        }
        out
    }

    /// The wall time of `node`'s first "group running" entry for `web` at
    /// or after `after`.
    pub async fn group_running_at(&self, node: &str, after: u64) -> u64 {
        self.journal()
            .await
            .into_iter()
            .filter(|e| e.node == node && e.entry.kind == EntryKind::GroupStarted && e.at >= after)
            .map(|e| e.at)
            .min()
            .expect("the new owner journaled the group as running")
    }

    /// One crash failover of `web` (benchmarks): waits for a settled
    /// cluster, `kill -9`s the owner's agent, waits for `web` to run
    /// elsewhere, then restarts the killed agent. Returns the old owner, the
    /// new owner and the milliseconds from the kill to the new owner's
    /// "group running" entry.
    pub async fn crash_failover(&mut self, wait: Duration) -> (String, String, u64) {
        let snap = self
            .wait_for("a settled cluster", wait, |s| {
                s.running_on("web", &WEB).is_some() && NODES.iter().all(|n| s.view.nodes.contains_key(*n))
            })
            .await;
        let owner = snap.owner("web").unwrap().to_string();
        let t0 = wall_ms();
        self.agents.signal(&owner, nix::sys::signal::Signal::SIGKILL).unwrap();
        let snap = self
            .wait_for("web running elsewhere", wait, |s| {
                s.running_on("web", &WEB).is_some_and(|n| n != owner)
            })
            .await;
        let new_owner = snap.owner("web").unwrap().to_string();
        let t1 = self.group_running_at(&new_owner, t0).await;
        self.agents.reap();
        self.agents.start(&owner).unwrap();
        (owner, new_owner, t1 - t0)
    }

    /// The pid recorded for `resource` in `node`'s process registry.
    pub fn pid_of(&self, node: &str, resource: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.agents.state_dir(node).join("processes")).ok()?;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.split_whitespace().nth(2) == Some(resource))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
    }
}

/// The cluster's state at one revision.
pub struct Snapshot {
    pub view: ClusterView,
    pub status: BTreeMap<String, Value>,
}

impl Snapshot {
    fn new(keys: &Keys, map: BTreeMap<String, KeyValue>, revision: i64) -> Snapshot {
        let view = build_view(keys, &map, revision, &mut Vec::new());
        let status = map
            .iter()
            .filter_map(|(k, kv)| match keys.kind(k) {
                Some(KeyKind::Status(n)) => serde_json::from_slice(&kv.value).ok().map(|v| (n, v)),
                _ => None,
            })
            .collect();
        Snapshot { view, status }
    }

    pub fn owner(&self, group: &str) -> Option<&str> {
        self.view.owners.get(group).map(|o| o.node.as_str())
    }

    pub fn state(&self, node: &str, resource: &str) -> Option<&str> {
        self.status
            .get(node)?
            .get("resources")?
            .get(resource)?
            .get("state")?
            .as_str()
    }

    /// The group runs fully on its owner (every listed resource running there).
    pub fn running_on(&self, group: &str, resources: &[&str]) -> Option<String> {
        let owner = self.owner(group)?;
        resources
            .iter()
            .all(|r| self.state(owner, r) == Some("running"))
            .then(|| owner.to_string())
    }
}

pub const WEB: [&str; 3] = ["database", "app", "frontend"];

/// The process exists and is not a zombie (a killed process whose parent
/// is dead or stopped stays a zombie until someone reaps it; it runs nothing).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Journal entries of `kind` for `resource` on `node`, in journal order.
pub fn entries<'a>(
    journal: &'a [JournalRecord],
    node: &str,
    kind: EntryKind,
    resource: &str,
) -> Vec<&'a JournalRecord> {
    journal
        .iter()
        .filter(|r| r.node == node && r.entry.kind == kind && r.entry.resource.as_deref() == Some(resource))
        .collect()
}

/// Prints `min / p50 / p99 / max` of `v` (milliseconds) under `name`.
pub fn summary(name: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:50} n={:2}  min {:5} ms  p50 {:5} ms  p99 {:5} ms  max {:5} ms",
        v.len(),
        v[0],
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    );
}

/// Milliseconds since the Unix epoch (journal entries carry the same).
pub fn wall_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}
