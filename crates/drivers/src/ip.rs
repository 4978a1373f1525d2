//! The `ip` driver: a floating IP address. (Being written.)

use async_trait::async_trait;
use understudy_core::spec::IpSpec;

use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

pub struct IpDriver {
    resource: String,
}

impl IpDriver {
    pub fn new(resource: &str, _spec: &IpSpec, _env: &DriverEnv) -> Result<Self, DriverError> {
        Ok(IpDriver {
            resource: resource.to_string(),
        })
    }
}

#[async_trait]
impl Driver for IpDriver {
    async fn start(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `ip`"))
    }
    async fn stop(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `ip`"))
    }
    async fn monitor(&self, _ctx: &OpCtx) -> Health {
        Health::Failed(format!("{}: kind `ip` is not supported yet", self.resource))
    }
    async fn probe(&self, _ctx: &OpCtx) -> Health {
        Health::Stopped
    }
}
