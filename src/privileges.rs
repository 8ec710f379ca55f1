//! Running as the `postgres` OS user.
//!
//! Started as root (the container default), pgentry creates the directories postgres
//! needs, hands them to the postgres user and drops to it before touching PGDATA's
//! contents. Started as the postgres user, it goes straight on. Any other user is
//! refused: postgres would fail later with a less helpful error.
//!
//! /etc/passwd is read directly rather than through getpwnam, which in a static
//! glibc binary depends on NSS modules a musl image does not have.

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{chown, getuid, setgid, setgroups, setuid, Gid, Uid};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

pub const POSTGRES_USER: &str = "postgres";

/// Finds `name` in the text of an /etc/passwd file.
pub fn parse_passwd(content: &str, name: &str) -> Option<Account> {
    content.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        Some(Account {
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5].to_string(),
        })
    })
}

pub fn postgres_account() -> Result<Account> {
    let passwd = fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    parse_passwd(&passwd, POSTGRES_USER).ok_or_else(|| {
        anyhow!("no user {POSTGRES_USER:?} in /etc/passwd; run pgentry in a PostgreSQL image")
    })
}

/// Who pgentry runs as, relative to the postgres account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Root,
    Postgres,
    Other(u32),
}

pub fn identity(current_uid: u32, account: &Account) -> Identity {
    match current_uid {
        0 => Identity::Root,
        uid if uid == account.uid => Identity::Postgres,
        uid => Identity::Other(uid),
    }
}

/// Makes sure pgentry runs as postgres, with `private_dirs` (mode 0700, like PGDATA)
/// and `shared_dirs` (mode 3775, like the socket directory) existing and owned by it.
pub fn become_postgres(private_dirs: &[&Path], shared_dirs: &[&Path]) -> Result<Account> {
    let account = postgres_account()?;
    match identity(getuid().as_raw(), &account) {
        Identity::Root => {
            for dir in private_dirs {
                prepare_dir(dir, &account, 0o700)?;
            }
            for dir in shared_dirs {
                prepare_dir(dir, &account, 0o3775)?;
            }
            drop_to(&account)?;
        }
        Identity::Postgres => {
            for dir in private_dirs {
                create_dir(dir, 0o700)?;
            }
            for dir in shared_dirs {
                create_dir(dir, 0o3775)?;
            }
        }
        Identity::Other(uid) => bail!(
            "pgentry runs as root (it drops to postgres) or as the postgres user (uid {}), not as uid {uid}; fix the container's user",
            account.uid
        ),
    }
    Ok(account)
}

/// Creates `dir` with `mode`; missing parents get the default mode, so that the
/// postgres user can traverse parents that root created.
fn create_dir(dir: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("cannot create {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Creates `dir` if missing and gives the directory itself (not its contents) to the
/// postgres user: a new volume arrives owned by root.
fn prepare_dir(dir: &Path, account: &Account, mode: u32) -> Result<()> {
    let existed = dir.exists();
    create_dir(dir, mode)?;
    let meta = fs::metadata(dir).with_context(|| format!("cannot stat {}", dir.display()))?;
    if meta.uid() != account.uid {
        chown(
            dir,
            Some(Uid::from_raw(account.uid)),
            Some(Gid::from_raw(account.gid)),
        )
        .with_context(|| format!("cannot give {} to the postgres user", dir.display()))?;
    }
    let current = meta.permissions().mode() & 0o7777;
    // postgres accepts 0700 and 0750 for PGDATA: an owner's choice of either stays.
    // A new directory (narrowed by the umask) or a new volume (root's) gets `mode`.
    let acceptable = current == mode || (mode == 0o700 && current == 0o750);
    if !existed || meta.uid() != account.uid || !acceptable {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    Ok(())
}

/// setgroups, setgid, setuid, in that order, and a check that root is really gone.
fn drop_to(account: &Account) -> Result<()> {
    let gid = Gid::from_raw(account.gid);
    setgroups(&[gid]).context("setgroups failed")?;
    setgid(gid).context("setgid failed")?;
    setuid(Uid::from_raw(account.uid)).context("setuid failed")?;
    if setuid(Uid::from_raw(0)).is_ok() {
        bail!("could not drop root privileges; refusing to go on");
    }
    std::env::set_var("HOME", &account.home);
    std::env::set_var("USER", POSTGRES_USER);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        postgresql:x:1:1::/:/bin/false\n\
        postgres:x:70:70:PostgreSQL:/var/lib/postgresql:/bin/sh\n";

    #[test]
    fn finds_the_exact_user() {
        let a = parse_passwd(PASSWD, "postgres").unwrap();
        assert_eq!(
            a,
            Account {
                uid: 70,
                gid: 70,
                home: "/var/lib/postgresql".into()
            }
        );
        assert_eq!(parse_passwd(PASSWD, "nobody"), None);
        assert_eq!(
            parse_passwd("postgres:x:bad:70::/:/bin/sh", "postgres"),
            None
        );
    }

    #[test]
    fn identities() {
        let a = parse_passwd(PASSWD, "postgres").unwrap();
        assert_eq!(identity(0, &a), Identity::Root);
        assert_eq!(identity(70, &a), Identity::Postgres);
        assert_eq!(identity(1000, &a), Identity::Other(1000));
    }
}
