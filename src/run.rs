//! `pgentry run`: load the configuration, become postgres, prepare PGDATA for the
//! role, then exec postgres.

use crate::config::{Config, RoleConfig, Sources};
use crate::signals::Shutdown;
use crate::{exec, log, primary, privileges, replica};
use anyhow::{Context, Result};

/// Loads the configuration the way every subcommand does.
pub fn load_config() -> Result<(Config, Sources)> {
    let sources = Sources::from_process()?;
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let config = Config::from_sources(&sources, &host)?;
    log::set_format(config.log_format);
    Ok((config, sources))
}

/// A current-thread runtime: pgentry does one thing at a time, and a second thread
/// would only cost start-up time and memory.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Returns only on failure: on success the process is postgres.
pub fn run(extra: &[String]) -> Result<()> {
    let (config, _) = load_config()?;
    let mut private_dirs = vec![config.pgdata.as_path()];
    if let RoleConfig::Primary(p) = &config.role {
        private_dirs.extend(p.initdb_waldir.as_deref());
    }
    privileges::become_postgres(&private_dirs, &[config.socket_dir.as_path()])?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut shutdown = Shutdown::install()?;
        match &config.role {
            RoleConfig::Replica(r) => replica::prepare(&config, r, &mut shutdown).await,
            RoleConfig::Primary(p) => primary::prepare(&config, p, &mut shutdown).await,
        }
    })?;
    drop(rt);
    Err(exec::exec_postgres(&config, extra))
}

pub fn check_config() -> Result<()> {
    let (config, sources) = load_config()?;
    print!("{}", config.describe(&sources));
    let postgres = crate::pgbin::find(config.pg_bin.as_deref(), "postgres");
    if let Err(e) = &postgres {
        crate::warn!("{e:#}");
    }
    Ok(())
}
