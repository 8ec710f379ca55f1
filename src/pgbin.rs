//! Where the PostgreSQL binaries are: PGENTRY_PG_BIN, or PATH (the official image
//! puts them in /usr/local/bin).

use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};

pub fn find(pg_bin: Option<&Path>, name: &str) -> Result<PathBuf> {
    match pg_bin {
        Some(dir) => {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(anyhow!("{} not found; set PGENTRY_PG_BIN to the directory of the PostgreSQL 15 binaries", path.display()))
            }
        }
        None => which::which(name)
            .map_err(|_| anyhow!("{name} is not on PATH; set PGENTRY_PG_BIN to the directory of the PostgreSQL 15 binaries")),
    }
}
