//! The `postgres` driver: a PostgreSQL server. (Being written.)

use async_trait::async_trait;
use understudy_core::spec::PostgresSpec;

use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

pub struct PostgresDriver {
    resource: String,
}

impl PostgresDriver {
    pub fn new(resource: &str, _spec: &PostgresSpec, _env: &DriverEnv) -> Result<Self, DriverError> {
        Ok(PostgresDriver {
            resource: resource.to_string(),
        })
    }
}

#[async_trait]
impl Driver for PostgresDriver {
    async fn start(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `postgres`"))
    }
    async fn stop(&self, _ctx: &OpCtx) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("kind `postgres`"))
    }
    async fn monitor(&self, _ctx: &OpCtx) -> Health {
        Health::Failed(format!("{}: kind `postgres` is not supported yet", self.resource))
    }
    async fn probe(&self, _ctx: &OpCtx) -> Health {
        Health::Stopped
    }
}
