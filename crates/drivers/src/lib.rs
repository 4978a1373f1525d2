//! Resource drivers: one per resource kind, behind the [`Driver`] trait.
//!
//! Every operation is idempotent (starting a running resource or stopping a
//! stopped one succeeds) and bounded by the timeout it is given. Drivers know
//! nothing of leases or groups' placement: the agent decides, drivers do.
//!
//! Architecture invariant: drivers never decide *whether* to act, only *how*;
//! they depend on `understudy-core` for the resource settings and on nothing
//! else of ours.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use understudy_core::spec::{Kind, ResourceSpec};

pub mod cgroup;
mod check;
pub mod fs;
pub mod ip;
pub mod postgres;
pub mod process;
mod procfs;
pub mod registry;
pub mod script;
mod spawn;
pub mod sync;
pub mod systemd;

pub use registry::ProcessRegistry;

/// What a monitor or probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Running and healthy.
    Running,
    /// Cleanly not running.
    Stopped,
    /// Running but unhealthy, or in an unknown state; the text says why.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{op} of {resource} timed out after {timeout:?}")]
    Timeout {
        op: &'static str,
        resource: String,
        timeout: Duration,
    },
    #[error("{op} of {resource} failed: {message}")]
    Failed {
        op: &'static str,
        resource: String,
        message: String,
    },
    #[error("{0} is not supported by this build yet")]
    Unsupported(&'static str),
}

impl DriverError {
    /// `op` of `resource` failed, with what went wrong.
    pub fn failed(op: &'static str, resource: &str, message: impl Into<String>) -> DriverError {
        DriverError::Failed {
            op,
            resource: resource.to_string(),
            message: message.into(),
        }
    }

    /// `op` of `resource` ran over `timeout`.
    pub fn timeout(op: &'static str, resource: &str, timeout: Duration) -> DriverError {
        DriverError::Timeout {
            op,
            resource: resource.to_string(),
            timeout,
        }
    }
}

/// Everything an operation needs to know besides the resource's own settings.
#[derive(Clone, Debug)]
pub struct OpCtx {
    pub node: String,
    pub group: String,
    /// The owner's fencing token (the owner key's create revision); `None`
    /// for clones, which run without ownership.
    pub token: Option<i64>,
    /// How long the operation may take.
    pub timeout: Duration,
}

/// Why a [`SyncStore`] did not store a copy.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The write was refused because it was not made by the group's current
    /// owner (`OpCtx::token` is stale, or absent): the stored copy belongs to
    /// the owner and was left alone. Retrying cannot help.
    #[error("refused: {0}")]
    Fenced(String),
    /// The store could not be reached or failed; the text says why.
    #[error("{0}")]
    Failed(String),
}

/// Where a `sync` resource keeps its replicated copy: the coordinator, as
/// the agent provides it (keys are the resource's; values are opaque bytes).
#[async_trait]
pub trait SyncStore: Send + Sync {
    /// The stored copy for `key`, if any.
    async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Replaces the stored copy for `key` on behalf of `ctx.group`'s owner:
    /// the write lands only while the group's owner key still has
    /// `ctx.token` (a fenced write), so a stale owner resumed after a pause
    /// cannot overwrite its successor's copy.
    async fn store(&self, ctx: &OpCtx, key: &str, value: &[u8]) -> Result<(), StoreError>;
}

/// Where drivers keep their files and how they report spawned processes.
#[derive(Clone)]
pub struct DriverEnv {
    /// Directory of the cluster definition: `./` paths in commands resolve here.
    pub base_dir: PathBuf,
    /// The agent's state directory (logs, pid records).
    pub state_dir: PathBuf,
    /// Receives the process groups drivers start, so the fence guard can kill
    /// them and a restarted agent can find leftovers.
    pub registry: Arc<ProcessRegistry>,
    /// The replicated store for `sync` resources (`None`: not available).
    pub sync: Option<Arc<dyn SyncStore>>,
}

/// One resource's start/stop/monitor/probe.
#[async_trait]
pub trait Driver: Send + Sync {
    /// Brings the resource up. Returns once it is running (or fails).
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError>;
    /// Brings the resource down. Returns once it is stopped (or fails).
    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError>;
    /// Checks a running resource.
    async fn monitor(&self, ctx: &OpCtx) -> Health;
    /// Finds out whether the resource is running right now (agent start).
    async fn probe(&self, ctx: &OpCtx) -> Health;
}

/// The driver for a resource, or `Unsupported` for kinds this build cannot run yet.
pub fn driver_for(spec: &ResourceSpec, env: &DriverEnv) -> Result<Box<dyn Driver>, DriverError> {
    match &spec.kind {
        Kind::Process(p) => Ok(Box::new(process::ProcessDriver::new(
            &spec.name,
            p,
            spec.stop_timeout,
            env,
        ))),
        Kind::Script(s) => Ok(Box::new(script::ScriptDriver::new(&spec.name, s, env))),
        Kind::Ip(s) => Ok(Box::new(ip::IpDriver::new(&spec.name, s, env)?)),
        Kind::Fs(s) => Ok(Box::new(fs::FsDriver::new(&spec.name, s, env)?)),
        Kind::Systemd(s) => Ok(Box::new(systemd::SystemdDriver::new(&spec.name, s, env)?)),
        Kind::Postgres(s) => Ok(Box::new(postgres::PostgresDriver::new(&spec.name, s, env)?)),
        Kind::Sync(s) => Ok(Box::new(sync::SyncDriver::new(&spec.name, s, env)?)),
    }
}
