//! Cloning the primary with pg_basebackup into the staging directory.
//!
//! The password reaches pg_basebackup through a 0600 passfile (PGPASSFILE), never
//! its command line or environment. pg_basebackup runs in its own process group with
//! a parent-death signal, so that a signal to pgentry, or pgentry's death, stops it
//! and its WAL-streaming child together.

use crate::config::{Config, Replica};
use crate::signals::{Interrupted, Shutdown};
use crate::staging::Staging;
use crate::standby::{self, write_private};
use crate::{child, conninfo, info, warn};
use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Seconds pg_basebackup waits for each connection.
const CONNECT_TIMEOUT: &str = "10";
/// How often a progress line is logged at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// pg_basebackup's arguments. Pure; the password is not among them.
pub fn basebackup_args(replica: &Replica, user: &str, target: &std::path::Path) -> Vec<String> {
    let port = replica.primary_port.to_string();
    let dbname = conninfo::build(&[
        ("host", &replica.primary_host),
        ("port", &port),
        ("user", user),
        ("application_name", replica.slot.as_str()),
        ("connect_timeout", CONNECT_TIMEOUT),
    ]);
    vec![
        "--pgdata".into(),
        target.to_string_lossy().into_owned(),
        "--dbname".into(),
        dbname,
        "--wal-method=stream".into(),
        "--checkpoint=fast".into(),
        "--slot".into(),
        replica.slot.as_str().into(),
        "--no-password".into(),
        "--progress".into(),
    ]
}

/// Clones into `staging`, configures the clone as a standby, marks it complete and
/// moves it into PGDATA.
pub async fn clone(config: &Config, replica: &Replica, shutdown: &mut Shutdown) -> Result<()> {
    let staging = Staging::new(&config.pgdata);
    staging.create()?;
    let passfile = staging.root().join("pgpass");
    write_private(
        &passfile,
        conninfo::pgpass_line(&config.replication_user, replica.password.expose()).as_bytes(),
    )?;
    let program = crate::pgbin::find(config.pg_bin.as_deref(), "pg_basebackup")?;
    let target = staging.data_dir();
    info!(
        "cloning {}:{} with pg_basebackup (slot {})",
        replica.primary_host,
        replica.primary_port,
        replica.slot.as_str()
    );
    let started = Instant::now();
    let mut command = child::command(&program, Signal::SIGKILL);
    command
        .args(basebackup_args(replica, &config.replication_user, &target))
        .env("PGPASSFILE", &passfile)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut basebackup = command
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pgid = Pid::from_raw(basebackup.id().unwrap_or_default() as i32);
    let mut stderr = basebackup
        .stderr
        .take()
        .context("pg_basebackup has no stderr")?;
    let mut progress = Progress::default();
    let mut buf = [0u8; 4096];
    let mut stderr_open = true;
    let status = loop {
        tokio::select! {
            n = stderr.read(&mut buf), if stderr_open => match n {
                Ok(0) | Err(_) => stderr_open = false,
                Ok(n) => progress.feed(&buf[..n]),
            },
            status = basebackup.wait() => break status?,
            s = shutdown.recv() => {
                stop_group(pgid, &mut basebackup).await;
                return Err(Interrupted(s).into());
            }
        }
    };
    if !status.success() {
        // Its WAL-streaming child would hold stderr open and stream on.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    // The last lines (often the error) may still be in the pipe.
    let drain = tokio::time::timeout(Duration::from_millis(500), async {
        while stderr_open {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => stderr_open = false,
                Ok(n) => progress.feed(&buf[..n]),
            }
        }
    });
    let _ = drain.await;
    progress.finish();
    if !status.success() {
        bail!(
            "pg_basebackup failed ({status}): {}; the next start discards this partial clone and tries again",
            progress.last_error.as_deref().unwrap_or("no message")
        );
    }
    std::fs::remove_file(&passfile).context("cannot remove the clone's passfile")?;
    standby::apply(
        &target,
        &standby::desired(replica, &config.replication_user, &config.pgdata),
    )?;
    staging.mark_complete()?;
    staging.promote()?;
    info!("clone finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Kills pg_basebackup processes still writing into `target`: when pgentry is killed
/// with -9 outside a container, pg_basebackup dies with it (parent-death signal) but
/// its WAL-streaming child may linger until it notices, and must not write into the
/// next clone.
pub fn stop_leftovers(target: &std::path::Path) -> Result<()> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("cannot read /proc")?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if is_clone_into(&cmdline, target) {
                found.push(Pid::from_raw(pid));
            }
        }
    }
    for pid in &found {
        warn!("stopping pg_basebackup (pid {pid}) left over from an interrupted clone");
        let _ = nix::sys::signal::kill(*pid, Signal::SIGKILL);
    }
    for pid in found {
        while nix::sys::signal::kill(pid, None).is_ok()
            && std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        {
            if std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.is_empty())
                .unwrap_or(true)
            {
                break; // a zombie: its parent is gone too, init reaps it
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Whether a NUL-separated command line is pg_basebackup writing into `target`.
fn is_clone_into(cmdline: &[u8], target: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let mut args = cmdline.split(|&b| b == 0);
    let is_basebackup = args.next().is_some_and(|a| a.ends_with(b"pg_basebackup"));
    let mut args = args.peekable();
    let mut writes_target = false;
    while let Some(a) = args.next() {
        if a == b"--pgdata" && args.peek() == Some(&target.as_os_str().as_bytes()) {
            writes_target = true;
        }
    }
    is_basebackup && writes_target
}

/// SIGTERM to pg_basebackup's process group; SIGKILL to what is left of it once
/// pg_basebackup has exited or 300 ms have passed (its WAL-streaming child included).
async fn stop_group(pgid: Pid, basebackup: &mut tokio::process::Child) {
    if pgid.as_raw() > 0 {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(Duration::from_millis(300), basebackup.wait()).await;
    if pgid.as_raw() > 0 {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let _ = basebackup.wait().await;
}

/// Turns pg_basebackup's `\r`-separated progress output into occasional log lines,
/// and remembers its last other line for the error message.
#[derive(Default)]
struct Progress {
    partial: Vec<u8>,
    last_logged: Option<Instant>,
    last_progress: Option<String>,
    last_error: Option<String>,
}

impl Progress {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\r' || b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).trim().to_string();
                self.partial.clear();
                self.line(line);
            } else {
                self.partial.push(b);
            }
        }
    }

    fn line(&mut self, line: String) {
        if line.is_empty() {
            return;
        }
        if is_progress(&line) {
            if self
                .last_logged
                .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY)
            {
                info!("pg_basebackup: {line}");
                self.last_logged = Some(Instant::now());
                self.last_progress = None;
            } else {
                self.last_progress = Some(line);
            }
        } else if line.contains("error:") || line.contains("warning:") {
            warn!("{line}");
            self.last_error = Some(line);
        } else {
            info!("pg_basebackup: {line}");
        }
    }

    fn finish(&mut self) {
        let rest = std::mem::take(&mut self.partial);
        self.line(String::from_utf8_lossy(&rest).trim().to_string());
        if let Some(line) = self.last_progress.take() {
            info!("pg_basebackup: {line}");
        }
    }
}

/// pg_basebackup's progress lines look like `1234/5678 kB (21%), 0/1 tablespace`.
fn is_progress(line: &str) -> bool {
    line.contains(" kB (") && line.contains("tablespace")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlotName;
    use crate::secrets::Secret;
    use std::path::Path;

    #[test]
    fn arguments_carry_no_password() {
        let r = Replica {
            primary_host: "db".into(),
            primary_port: 5433,
            slot: SlotName::parse("r1").unwrap(),
            wait_timeout: None,
            password: Secret::new("sekrit".into()),
        };
        let args = basebackup_args(&r, "rep", Path::new("/d/.s/data"));
        assert!(!args.iter().any(|a| a.contains("sekrit")));
        assert!(args.contains(&"--wal-method=stream".to_string()));
        assert!(args.contains(&"--checkpoint=fast".to_string()));
        assert!(args.contains(&"--no-password".to_string()));
        assert_eq!(
            args[3],
            "host='db' port='5433' user='rep' application_name='r1' connect_timeout='10'"
        );
    }

    #[test]
    fn recognises_leftover_clones() {
        let t = Path::new("/d/.pgentry-staging/data");
        assert!(is_clone_into(
            b"/usr/bin/pg_basebackup\0--pgdata\0/d/.pgentry-staging/data\0--progress\0",
            t
        ));
        assert!(!is_clone_into(
            b"/usr/bin/pg_basebackup\0--pgdata\0/e/.pgentry-staging/data\0",
            t
        ));
        assert!(!is_clone_into(
            b"/bin/cat\0--pgdata\0/d/.pgentry-staging/data\0",
            t
        ));
    }

    #[test]
    fn recognises_progress_lines() {
        assert!(is_progress("22862/22862 kB (100%), 1/1 tablespace"));
        assert!(!is_progress("pg_basebackup: error: could not connect"));
    }
}
