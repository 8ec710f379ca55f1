//! pgentry's children (pg_basebackup, initdb, the temporary server, init scripts):
//! none inherits an inline secret, and none outlives pgentry.

use nix::sys::signal::Signal;
use std::ffi::OsStr;
use std::process::Stdio;
use tokio::process::Command;

/// A command for `program` with stdin closed and no inline secret in its environment
/// (postgres and its tools read passwords from files). It is killed when its handle
/// is dropped, and sent `on_parent_death` by the kernel if pgentry dies first, even by
/// kill -9. (The parent-death signal follows the spawning thread; pgentry's runtime
/// is single-threaded, so that is pgentry itself.)
pub fn command(program: impl AsRef<OsStr>, on_parent_death: Signal) -> Command {
    let mut command = Command::new(program);
    command.stdin(Stdio::null()).kill_on_drop(true);
    for name in crate::config::inline_secret_names() {
        command.env_remove(name);
    }
    let signal = on_parent_death as nix::libc::c_ulong;
    // SAFETY: prctl is async-signal-safe, and the closure allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}
