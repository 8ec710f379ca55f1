//! Build a new cluster aside, then move it into PGDATA: the crash safety of clone and
//! initdb.
//!
//! pg_basebackup and initdb write into `PGDATA/.pgentry-staging/data`. Only when they
//! have finished (and their output is synced) is the marker `complete` written. Then
//! each top-level entry is renamed into PGDATA, and the staging directory removed.
//!
//! A kill at any moment leaves one of three states, each repaired by the next start:
//! no staging directory (nothing began, or everything finished); a staging directory
//! without the marker (discard it, it is ours, and build again); one with the marker
//! (finish the renames). PGDATA itself is often a mount point and cannot be renamed,
//! which is why entries move one by one.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub const COMPLETE_MARKER: &str = "complete";

pub struct Staging {
    pgdata: PathBuf,
    root: PathBuf,
}

impl Staging {
    pub fn new(pgdata: &Path) -> Staging {
        Staging {
            pgdata: pgdata.to_path_buf(),
            root: pgdata.join(crate::pgdata::STAGING_DIR),
        }
    }

    /// Where pg_basebackup or initdb writes the new cluster.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// A private place for files the build needs but the cluster must not hold yet.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates an empty staging directory (mode 0700).
    pub fn create(&self) -> Result<()> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))
    }

    /// Removes an interrupted build. Only ever called on our own staging directory.
    pub fn discard(&self) -> Result<()> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| {
                format!(
                    "cannot remove the interrupted build {}",
                    self.root.display()
                )
            }),
            _ => Ok(()),
        }
    }

    /// Declares the build finished: from here on, a restart completes the move
    /// instead of starting over.
    pub fn mark_complete(&self) -> Result<()> {
        let marker = self.root.join(COMPLETE_MARKER);
        let file = fs::File::create(&marker)
            .with_context(|| format!("cannot write {}", marker.display()))?;
        file.sync_all()?;
        sync_dir(&self.root)
    }

    /// Moves every entry of the finished build into PGDATA, then removes the staging
    /// directory. Safe to call again after an interruption.
    pub fn promote(&self) -> Result<()> {
        let data = self.data_dir();
        if data.exists() {
            for entry in
                fs::read_dir(&data).with_context(|| format!("cannot read {}", data.display()))?
            {
                let name = entry?.file_name();
                let target = self.pgdata.join(&name);
                if target.symlink_metadata().is_ok() {
                    bail!(
                        "cannot finish the build: {} exists in both {} and PGDATA; move the one in PGDATA away",
                        name.to_string_lossy(),
                        data.display()
                    );
                }
                fs::rename(data.join(&name), &target).with_context(|| {
                    format!("cannot move {} into PGDATA", name.to_string_lossy())
                })?;
            }
            sync_dir(&self.pgdata)?;
            fs::remove_dir(&data).with_context(|| format!("cannot remove {}", data.display()))?;
        }
        fs::remove_dir_all(&self.root)
            .with_context(|| format!("cannot remove {}", self.root.display()))?;
        sync_dir(&self.pgdata)
    }
}

/// Makes renames and creations in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgdata::{inspect, Staging as State};

    fn temp_pgdata(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pgentry-staging-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_interrupted_move_finishes_on_the_next_promote() {
        let pgdata = temp_pgdata("resume");
        let staging = Staging::new(&pgdata);
        staging.create().unwrap();
        fs::create_dir(staging.data_dir()).unwrap();
        fs::write(staging.data_dir().join("PG_VERSION"), "15\n").unwrap();
        fs::create_dir(staging.data_dir().join("base")).unwrap();
        assert_eq!(inspect(&pgdata).unwrap().staging, State::Incomplete);
        staging.mark_complete().unwrap();
        // Simulate a kill after the first rename.
        fs::rename(staging.data_dir().join("base"), pgdata.join("base")).unwrap();
        let facts = inspect(&pgdata).unwrap();
        assert_eq!(facts.staging, State::Complete);
        staging.promote().unwrap();
        let facts = inspect(&pgdata).unwrap();
        assert_eq!(facts.staging, State::Absent);
        assert_eq!(facts.entries, ["PG_VERSION", "base"]);
        fs::remove_dir_all(&pgdata).unwrap();
    }

    #[test]
    fn promote_never_overwrites() {
        let pgdata = temp_pgdata("clash");
        let staging = Staging::new(&pgdata);
        staging.create().unwrap();
        fs::create_dir(staging.data_dir()).unwrap();
        fs::write(staging.data_dir().join("PG_VERSION"), "15\n").unwrap();
        fs::write(pgdata.join("PG_VERSION"), "mine").unwrap();
        staging.mark_complete().unwrap();
        assert!(staging.promote().is_err());
        assert_eq!(
            fs::read_to_string(pgdata.join("PG_VERSION")).unwrap(),
            "mine"
        );
        fs::remove_dir_all(&pgdata).unwrap();
    }
}
