//! The primary role (initdb, replication setup): see issue 3.

use crate::config::{Config, Primary};
use crate::signals::Shutdown;
use anyhow::Result;

pub async fn prepare(_config: &Config, _primary: &Primary, _shutdown: &mut Shutdown) -> Result<()> {
    anyhow::bail!("the primary role is not implemented yet")
}
