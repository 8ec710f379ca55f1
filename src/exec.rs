//! Replacing pgentry with postgres (execve), so that postgres is PID 1 and receives
//! the container's stop signal itself.

use anyhow::{Context, Result};
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// postgres' argument vector: data directory, port and socket directory from the
/// configuration, then the user's extra arguments (which may override them).
pub fn postgres_args(
    pgdata: &Path,
    port: u16,
    socket_dir: &Path,
    extra: &[String],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "postgres".into(),
        "-D".into(),
        pgdata.into(),
        "-p".into(),
        port.to_string().into(),
        "-k".into(),
        socket_dir.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// The environment postgres inherits: pgentry's, without inline secrets (the
/// `NAME` forms; `NAME_FILE` paths are harmless), which postgres does not need and
/// which would otherwise sit in /proc/<pid>/environ for the life of the server.
pub fn scrubbed_env(
    vars: impl Iterator<Item = (OsString, OsString)>,
    secret_names: &[&str],
) -> Vec<(OsString, OsString)> {
    vars.filter(|(k, _)| !secret_names.iter().any(|s| k.as_bytes() == s.as_bytes()))
        .collect()
}

/// Reaps every child that has already exited. pgentry may be PID 1 and so the parent
/// of orphans (a WAL-streaming child of a killed pg_basebackup, a background job of
/// an init script); once postgres has replaced pgentry it would reap them itself, and
/// the non-zero exit of a child it does not know makes the postmaster restart every
/// backend (docker-library/postgres#1349).
fn reap_exited_children() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// execve; returns only on failure.
pub fn exec(program: &Path, args: &[OsString], env: &[(OsString, OsString)]) -> anyhow::Error {
    let result: Result<()> = (|| {
        let c = |s: &[u8]| CString::new(s).context("argument contains a NUL byte");
        let path = c(program.as_os_str().as_bytes())?;
        let argv = args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<Result<Vec<_>>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<Result<Vec<_>>>()?;
        nix::unistd::execve(&path, &argv, &envp)
            .with_context(|| format!("cannot execute {}", program.display()))?;
        Ok(())
    })();
    match result {
        Err(e) => e,
        Ok(()) => anyhow::anyhow!("execve returned without error"),
    }
}

/// Execs postgres with the configuration's data directory, port and socket.
pub fn exec_postgres(config: &crate::config::Config, extra: &[String]) -> anyhow::Error {
    let program = match crate::pgbin::find(config.pg_bin.as_deref(), "postgres") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let args = postgres_args(&config.pgdata, config.port, &config.socket_dir, extra);
    let secrets: Vec<&str> = crate::config::inline_secret_names().collect();
    let env = scrubbed_env(std::env::vars_os(), &secrets);
    reap_exited_children();
    crate::info!(
        "starting postgres: {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    exec(&program, &args, &env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_put_extras_last() {
        let args = postgres_args(
            Path::new("/d"),
            5433,
            Path::new("/s"),
            &["-c".into(), "x=1".into()],
        );
        assert_eq!(
            args,
            ["postgres", "-D", "/d", "-p", "5433", "-k", "/s", "-c", "x=1"].map(OsString::from)
        );
    }

    #[test]
    fn inline_secrets_are_scrubbed() {
        let vars = [
            ("A", "1"),
            ("POSTGRES_PASSWORD", "x"),
            ("POSTGRES_PASSWORD_FILE", "/f"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = scrubbed_env(vars.into_iter(), &["POSTGRES_PASSWORD"]);
        let keys: Vec<_> = env.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(keys, ["A", "POSTGRES_PASSWORD_FILE"]);
    }
}
