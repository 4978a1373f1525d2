//! The cluster definition, validated and typed.
//!
//! A `ClusterSpec` is what `understudy-config` produces from a `cluster.toml`
//! after every check has passed: names are unique, every dependency points at a
//! resource that exists, there is no cycle. Code that receives a `ClusterSpec`
//! may rely on those facts; the planner still never panics when they are broken
//! (it reports the group as unplaceable instead).

use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

/// The whole cluster definition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterSpec {
    pub name: String,
    pub description: Option<String>,
    pub settings: Settings,
    /// Nodes in declaration order.
    pub nodes: Vec<NodeSpec>,
    /// Groups in declaration order.
    pub groups: Vec<GroupSpec>,
}

/// Cluster-wide settings (`[cluster]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub coordinator: CoordinatorSpec,
    /// How long an owner's lease lives at the coordinator without renewal.
    #[serde(with = "crate::time::serde_duration")]
    pub lease_ttl: Duration,
    /// How often an owner renews its leases.
    #[serde(with = "crate::time::serde_duration")]
    pub renew_interval: Duration,
    /// Self-fencing margin: an owner that has not had a renewal acknowledged
    /// stops its groups `lease_ttl - fence_margin` after sending the last
    /// acknowledged renewal (measured on its own monotonic clock).
    #[serde(with = "crate::time::serde_duration")]
    pub fence_margin: Duration,
    /// Most IP addresses one node may carry, its own and floating ones (S1.4).
    pub max_addresses_per_node: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            coordinator: CoordinatorSpec::Embedded { path: None },
            lease_ttl: Duration::from_secs(2),
            renew_interval: Duration::from_millis(500),
            fence_margin: Duration::from_millis(500),
            max_addresses_per_node: 128,
        }
    }
}

/// Where the agents keep shared state.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordinatorSpec {
    /// A SQLite file every node can open (one host: demo, tests).
    Embedded { path: Option<String> },
    /// An etcd v3 cluster.
    Etcd(EtcdSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EtcdSpec {
    pub endpoints: Vec<String>,
    /// Key prefix under which the cluster keeps its state.
    pub prefix: String,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
}

/// One machine that runs an agent (`[[node]]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSpec {
    pub name: String,
    /// The node's own address with its prefix length (its subnet).
    pub address: IpNet,
    /// Lower is preferred; ties are broken by declaration order.
    pub priority: u32,
    /// Other addresses the node carries permanently; they count towards
    /// `max_addresses_per_node`.
    pub other_addresses: Vec<IpNet>,
}

/// What happens when the preferred node comes back after a failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failback {
    /// The group stays where it is until an operator moves it.
    Manual,
    /// The group moves back to the most preferred eligible node.
    Auto,
}

/// How many failure-driven failovers a group may make in a period, and for
/// how long a node where the group failed is avoided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FailoverPolicy {
    /// Failovers allowed within `within`; one more failure stops the group.
    pub threshold: u32,
    /// The window for `threshold`, and how long a node where the group
    /// failed stays ineligible for it.
    #[serde(with = "crate::time::serde_duration")]
    pub within: Duration,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        FailoverPolicy {
            threshold: 3,
            within: Duration::from_secs(3600),
        }
    }
}

/// A failover group (`[group.NAME]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupSpec {
    pub name: String,
    pub description: Option<String>,
    /// Nodes allowed to run the group, most preferred first.
    pub nodes: Vec<String>,
    pub failback: Failback,
    pub failover: FailoverPolicy,
    /// Groups this group must run together with (on the same node).
    pub colocate_with: Vec<String>,
    /// Resources in declaration order.
    pub resources: Vec<ResourceSpec>,
}

impl GroupSpec {
    pub fn resource(&self, name: &str) -> Option<&ResourceSpec> {
        self.resources.iter().find(|r| r.name == name)
    }
}

/// How the cluster treats a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Started on the group's owner, in dependency order.
    Managed,
    /// Runs on every eligible node of its group at once (S1.2, Tomcat).
    Clone,
    /// Checked on the group's owner, never started or stopped (S1.2).
    MonitorOnly,
}

/// What a monitor does when its check fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFail {
    /// Restart the resource up to `restarts` times within `within`, then fail
    /// the group over.
    Restart,
    /// Fail the group over at once.
    Failover,
    /// Record the failure as an event; do nothing else.
    Report,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MonitorSpec {
    #[serde(with = "crate::time::serde_duration")]
    pub interval: Duration,
    #[serde(with = "crate::time::serde_duration")]
    pub timeout: Duration,
    pub restarts: u32,
    #[serde(with = "crate::time::serde_duration")]
    pub within: Duration,
    pub on_fail: OnFail,
}

impl Default for MonitorSpec {
    fn default() -> Self {
        MonitorSpec {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            restarts: 3,
            within: Duration::from_secs(600),
            on_fail: OnFail::Restart,
        }
    }
}

/// One resource (`[group.G.resource.NAME]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResourceSpec {
    /// Unique in the whole cluster.
    pub name: String,
    /// Human name, e.g. the seed's service display name.
    pub description: Option<String>,
    pub kind: Kind,
    /// Names of resources that must be running before this one starts.
    pub depends_on: Vec<String>,
    /// The group works without it: a failure to start it is reported, not
    /// fatal, and it may be switched off with `enabled = false`.
    pub optional: bool,
    /// Switched off resources are skipped; whoever depends on them inherits
    /// their dependencies, so the order of the rest is unchanged.
    pub enabled: bool,
    pub role: Role,
    /// `None` when monitoring is switched off for this resource.
    pub monitor: Option<MonitorSpec>,
    #[serde(with = "crate::time::serde_duration")]
    pub start_timeout: Duration,
    #[serde(with = "crate::time::serde_duration")]
    pub stop_timeout: Duration,
}

impl ResourceSpec {
    /// The name a person reads: the description when there is one.
    pub fn display_name(&self) -> &str {
        self.description.as_deref().unwrap_or(&self.name)
    }
}

/// A resource kind and its typed settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    Ip(IpSpec),
    Fs(FsSpec),
    Process(ProcessSpec),
    Systemd(SystemdSpec),
    Script(ScriptSpec),
    Postgres(PostgresSpec),
    Sync(SyncSpec),
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Ip(_) => "ip",
            Kind::Fs(_) => "fs",
            Kind::Process(_) => "process",
            Kind::Systemd(_) => "systemd",
            Kind::Script(_) => "script",
            Kind::Postgres(_) => "postgres",
            Kind::Sync(_) => "sync",
        }
    }
}

/// Floating IP address (F2, S1.4).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IpSpec {
    /// Address with prefix length, e.g. `10.213.0.100/24`.
    pub address: IpNet,
    /// Interface to add it to; default: the one up interface that carries an
    /// address in the floating address's subnet.
    pub interface: Option<String>,
    /// Gratuitous ARP / unsolicited NA announcements sent right after adding.
    pub announce_count: u32,
    /// Delay before the second burst of announcements (0 = no second burst).
    #[serde(with = "crate::time::serde_duration")]
    pub announce_repeat_after: Duration,
    /// Probe that no other host answers for the address before adding it.
    pub probe: bool,
}

/// Shared filesystem (F3).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FsSpec {
    /// Block device path, `UUID=…` or `LABEL=…`.
    pub device: String,
    pub mountpoint: String,
    pub fstype: String,
    pub options: Vec<String>,
    /// Run `fsck -p` before mounting.
    pub fsck: bool,
    /// Folders that must exist on the mounted filesystem, e.g. each
    /// component's work folder (S2.2b, S2.3b).
    pub directories: Vec<DirectorySpec>,
}

/// A folder on a shared filesystem, created after every mount (S2.2b: "folder
/// permissions are set").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectorySpec {
    /// Relative to the mount point.
    pub path: String,
    /// User name or numeric uid the folder is given to.
    pub owner: Option<String>,
    /// Group name or numeric gid.
    pub group: Option<String>,
    /// Permission bits (`0o7777` at most).
    pub mode: Option<u32>,
}

impl DirectorySpec {
    /// A folder with whatever owner and mode creating it gives.
    pub fn plain(path: impl Into<String>) -> DirectorySpec {
        DirectorySpec {
            path: path.into(),
            owner: None,
            group: None,
            mode: None,
        }
    }
}

/// How a process or script is checked beyond being alive.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheck {
    /// Exit status 0 means healthy.
    Command(Vec<String>),
    /// A TCP connect to `host:port` succeeds.
    Tcp(String),
    /// An HTTP GET to the URL answers 2xx.
    Http(String),
}

/// A process the agent spawns and supervises (F4).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessSpec {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Signal sent first on stop; SIGKILL follows after `stop_timeout`.
    pub stop_signal: String,
    /// File that receives stdout and stderr; default under the agent's state dir.
    pub log: Option<String>,
    pub check: Option<HealthCheck>,
}

/// A systemd unit (F4).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SystemdSpec {
    pub unit: String,
}

/// User-supplied start/stop/monitor commands.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScriptSpec {
    /// Empty for a monitor-only script.
    pub start: Vec<String>,
    /// Empty for a monitor-only script.
    pub stop: Vec<String>,
    pub monitor: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
}

/// A PostgreSQL server whose data directory lives on shared storage (F5, S1.3).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PostgresSpec {
    pub data_dir: String,
    pub port: u16,
    /// Directory holding `pg_ctl` and `postgres`; default: the newest under
    /// `/usr/lib/postgresql/*/bin`.
    pub bin_dir: Option<String>,
    /// OS user that runs the server.
    pub user: String,
    /// Database used by the health check.
    pub database: String,
    /// Directory for the server's Unix socket.
    pub socket_dir: Option<String>,
}

/// Files replicated from the owner to every other node of the group
/// (F8; the seed's synchronised registry keys and copied settings files).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyncSpec {
    pub paths: Vec<String>,
}
