//! The `fs` driver: a shared filesystem. (Being written.)

use async_trait::async_trait;
use understudy_core::spec::FsSpec;

use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

pub struct FsDriver {
    resource: String,
}

impl FsDriver {
    pub fn new(resource: &str, _spec: &FsSpec, _env: &DriverEnv) -> Result<Self, DriverError> {
        Ok(FsDriver {
            resource: resource.to_string(),
        })
    }
}

#[async_trait]
impl Driver for FsDriver {
    async fn start(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `fs`"))
    }
    async fn stop(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `fs`"))
    }
    async fn monitor(&self, _ctx: &OpCtx) -> Health {
        Health::Failed(format!("{}: kind `fs` is not supported yet", self.resource))
    }
    async fn probe(&self, _ctx: &OpCtx) -> Health {
        Health::Stopped
    }
}
