//! A temporary postgres for setup work: it listens on a private unix socket only,
//! so nothing outside (replicas, the healthcheck, clients) sees a half-ready primary.

use crate::signals::{Interrupted, Shutdown};
use crate::wire::{self, Connection, Endpoint, Params};
use crate::{child, info, pgbin};
use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Child;

/// How long the temporary server may take to accept connections.
const START_LIMIT: Duration = Duration::from_secs(60);

pub struct TempServer {
    child: Child,
    pub endpoint: Endpoint,
    socket_dir: PathBuf,
}

impl TempServer {
    /// Starts postgres on `pgdata` with its socket in `socket_dir` (created, private)
    /// and waits until it accepts connections as `user`.
    pub async fn start(
        pg_bin: Option<&Path>,
        pgdata: &Path,
        socket_dir: &Path,
        port: u16,
        user: &str,
        shutdown: &mut Shutdown,
    ) -> Result<TempServer> {
        std::fs::create_dir_all(socket_dir)
            .with_context(|| format!("cannot create {}", socket_dir.display()))?;
        let program = pgbin::find(pg_bin, "postgres")?;
        // If pgentry dies, the temporary server shuts down at once (SIGQUIT)
        // instead of lingering on its private socket.
        let mut command = child::command(program, Signal::SIGQUIT);
        command
            .arg("-D")
            .arg(pgdata)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=", "-k"])
            .arg(socket_dir)
            .stdout(Stdio::null())
            // Its log goes where ours goes: setup errors belong in `docker logs`.
            .stderr(Stdio::inherit());
        let child = command
            .spawn()
            .context("cannot start the temporary server")?;
        let mut server = TempServer {
            child,
            endpoint: Endpoint::Unix {
                dir: socket_dir.to_path_buf(),
                port,
            },
            socket_dir: socket_dir.to_path_buf(),
        };
        let ready = tokio::select! {
            r = server.wait_ready(user) => r,
            s = shutdown.recv() => {
                server.stop().await?;
                return Err(Interrupted(s).into());
            }
        };
        if let Err(e) = ready {
            let _ = server.stop().await;
            return Err(e);
        }
        Ok(server)
    }

    async fn wait_ready(&mut self, user: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the temporary server exited ({status}) before accepting connections; see its log above");
            }
            match self.connect(user, None, "postgres").await {
                Ok(conn) => {
                    conn.close().await;
                    return Ok(());
                }
                Err(wire::Error::Connect(_)) => {}
                Err(wire::Error::Server(e)) if e.code == "57P03" => {}
                Err(e) => return Err(anyhow!("the temporary server refused a local connection: {e}; local connections must be allowed for user {user:?} in pg_hba.conf")),
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the temporary server did not accept connections within {} s",
                    START_LIMIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn connect(
        &self,
        user: &str,
        password: Option<&crate::secrets::Secret>,
        database: &str,
    ) -> Result<Connection, wire::Error> {
        Connection::connect(&Params {
            endpoint: &self.endpoint,
            user,
            password,
            database: Some(database),
            replication: false,
            application_name: "pgentry",
        })
        .await
    }

    /// Fast shutdown (SIGINT) and wait: a clean checkpoint, nothing left running.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
        }
        let status = self
            .child
            .wait()
            .await
            .context("cannot wait for the temporary server")?;
        let _ = std::fs::remove_dir(&self.socket_dir);
        info!("temporary server stopped ({status})");
        Ok(())
    }
}
