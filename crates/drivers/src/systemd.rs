//! The `systemd` driver: a systemd unit. (Being written.)

use async_trait::async_trait;
use understudy_core::spec::SystemdSpec;

use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

pub struct SystemdDriver {
    resource: String,
}

impl SystemdDriver {
    pub fn new(resource: &str, _spec: &SystemdSpec, _env: &DriverEnv) -> Result<Self, DriverError> {
        Ok(SystemdDriver {
            resource: resource.to_string(),
        })
    }
}

#[async_trait]
impl Driver for SystemdDriver {
    async fn start(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `systemd`"))
    }
    async fn stop(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `systemd`"))
    }
    async fn monitor(&self, _ctx: &OpCtx) -> Health {
        Health::Failed(format!("{}: kind `systemd` is not supported yet", self.resource))
    }
    async fn probe(&self, _ctx: &OpCtx) -> Health {
        Health::Stopped
    }
}
