//! Test harness: real PostgreSQL 15 servers and the real pgentry binary, as plain
//! processes with their own PGDATA, port and socket directory, exactly as in a
//! container. Run as root, servers and pgentry's children run as the `postgres` user.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn pgentry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgentry")
}

/// The postgres account (uid, gid), when the tests run as root.
pub fn postgres_ids() -> Option<(u32, u32)> {
    if !nix::unistd::getuid().is_root() {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == "postgres").then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

/// Runs `cmd` as the postgres user when we are root.
pub fn as_postgres(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = postgres_ids() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A directory removed at drop; traversable by the postgres user.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("pgentry-it-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// A directory owned by postgres (for servers the harness starts itself).
    pub fn postgres_dir(&self, name: &str, mode: u32) -> PathBuf {
        let p = self.join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some((uid, gid)) = postgres_ids() {
            chown(&p, Some(uid), Some(gid)).unwrap();
        }
        p
    }

    /// A root-only (0600) secret file, as Docker mounts secrets.
    pub fn secret(&self, name: &str, content: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("PGENTRY_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process whose stderr is collected (and echoed for failing tests' output).
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, tag: &str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let tag = tag.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for exit up to `limit`; None if still running.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fast shutdown (SIGINT), as Docker's STOPSIGNAL does.
    pub fn stop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            self.signal(nix::sys::signal::Signal::SIGINT);
            if self.wait_timeout(Duration::from_secs(30)).is_none() {
                self.signal(nix::sys::signal::Signal::SIGKILL);
                let _ = self.child.wait();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connection facts of a server: where its socket is.
#[derive(Clone)]
pub struct Endpoint {
    pub port: u16,
    pub socket_dir: PathBuf,
}

impl Endpoint {
    /// Runs SQL through psql over the unix socket as the postgres superuser (SQL on
    /// stdin, never on the command line). Err carries psql's stderr.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(format!("{PG_BIN}/psql"));
        cmd.args([
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-h")
        .arg(&self.socket_dir)
        .arg("-p")
        .arg(self.port.to_string())
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // psql may exit before reading (server not up yet): its status says so.
        let _ = child.stdin.take().unwrap().write_all(sql.as_bytes());
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Runs a PostgreSQL client tool (pgbench, pg_dump...) against this server as the
    /// postgres superuser, over the socket; panics with its stderr if it fails.
    pub fn run_client(&self, tool: &str, args: &[&str]) {
        let out = Command::new(format!("{PG_BIN}/{tool}"))
            .args(["-U", "postgres", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql failed: {e}\nSQL: {sql}"))
    }

    pub fn wait_ready(&self, limit: Duration) {
        wait_until(limit, "server to accept connections", || {
            self.try_psql("SELECT 1").is_ok()
        });
    }

    pub fn is_streaming(&self) -> bool {
        self.try_psql("SELECT status FROM pg_stat_wal_receiver")
            .as_deref()
            == Ok("streaming")
    }

    pub fn wait_streaming(&self, limit: Duration) {
        wait_until(limit, "replica to stream", || self.is_streaming());
    }
}

/// A primary made by plain initdb and started by the harness (not by pgentry).
pub struct PlainPrimary {
    pub dir: TempDir,
    pub pgdata: PathBuf,
    pub endpoint: Endpoint,
    pub proc: Option<Proc>,
}

pub const REPL_USER: &str = "replicator";

impl PlainPrimary {
    /// initdb, replication settings, a `replicator` role with `password`.
    pub fn new(name: &str, password: &str) -> PlainPrimary {
        let dir = TempDir::new(name);
        let pgdata = dir.postgres_dir("primary", 0o700);
        let socket_dir = dir.postgres_dir("primary-sock", 0o755);
        let out = as_postgres(
            Command::new(format!("{PG_BIN}/initdb"))
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-D",
                ])
                .arg(&pgdata),
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(pgdata.join("pg_hba.conf"))
            .unwrap();
        writeln!(
            hba,
            "host replication {REPL_USER} 127.0.0.1/32 scram-sha-256"
        )
        .unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(pgdata.join("postgresql.conf"))
            .unwrap();
        writeln!(conf, "listen_addresses = '127.0.0.1'\nfsync = off\nwal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10").unwrap();
        let endpoint = Endpoint {
            port: free_port(),
            socket_dir,
        };
        let mut p = PlainPrimary {
            dir,
            pgdata,
            endpoint,
            proc: None,
        };
        p.start();
        p.endpoint.psql(&format!(
            "CREATE ROLE {REPL_USER} LOGIN REPLICATION PASSWORD '{}';",
            password.replace('\'', "''")
        ));
        p
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.arg("-D")
            .arg(&self.pgdata)
            .arg("-p")
            .arg(self.endpoint.port.to_string())
            .arg("-k")
            .arg(&self.endpoint.socket_dir);
        as_postgres(&mut cmd);
        self.proc = Some(Proc::spawn(&mut cmd, "primary"));
        self.endpoint.wait_ready(Duration::from_secs(60));
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}

/// What every pgentry server in these tests has: its own PGDATA, port and socket
/// directory in `dir`, the PostgreSQL binaries, no config file, PATH from outside.
fn server_env(dir: &TempDir, name: &str) -> BTreeMap<String, String> {
    let path = |p: String| dir.join(&p).to_string_lossy().into_owned();
    BTreeMap::from([
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("PGDATA".into(), path(name.to_string())),
        ("PGPORT".into(), free_port().to_string()),
        ("PGENTRY_SOCKET_DIR".into(), path(format!("{name}-sock"))),
        ("PGENTRY_PG_BIN".into(), PG_BIN.into()),
        ("PGENTRY_CONFIG".into(), String::new()),
    ])
}

/// The environment of a pgentry replica of the primary on `primary_port`.
pub fn replica_env(
    dir: &TempDir,
    name: &str,
    primary_port: u16,
    password_file: &Path,
) -> BTreeMap<String, String> {
    let mut env = server_env(dir, name);
    env.insert("PGENTRY_PRIMARY_HOST".into(), "127.0.0.1".into());
    env.insert("PGENTRY_PRIMARY_PORT".into(), primary_port.to_string());
    env.insert("PGENTRY_SLOT".into(), name.replace('-', "_"));
    env.insert(
        "PGENTRY_REPLICATION_PASSWORD_FILE".into(),
        password_file.to_string_lossy().into(),
    );
    env
}

pub fn pgentry(env: &BTreeMap<String, String>, args: &[&str]) -> Command {
    let mut cmd = Command::new(pgentry_bin());
    cmd.env_clear().envs(env).args(args);
    cmd
}

/// Runs pgentry to completion.
pub fn pgentry_output(env: &BTreeMap<String, String>, args: &[&str]) -> Output {
    pgentry(env, args).stdin(Stdio::null()).output().unwrap()
}

pub fn endpoint_of(env: &BTreeMap<String, String>) -> Endpoint {
    Endpoint {
        port: env["PGPORT"].parse().unwrap(),
        socket_dir: PathBuf::from(&env["PGENTRY_SOCKET_DIR"]),
    }
}

/// Every file below `dir` with its mode and content hash: to prove nothing changed.
pub fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, (u32, String)> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
                out.insert(e.path(), (meta.mode(), String::new()));
            } else {
                let digest = Sha256::digest(std::fs::read(e.path()).unwrap());
                let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                out.insert(e.path(), (meta.mode(), hash));
            }
        }
    }
    out
}

/// Command lines of every process, for secret checks.
pub fn all_cmdlines() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(bytes) = std::fs::read(e.path().join("cmdline")) {
            out.push(String::from_utf8_lossy(&bytes).replace('\0', " "));
        }
    }
    out
}

/// Files below `dir` whose content contains `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else if let Ok(bytes) = std::fs::read(e.path()) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(e.path());
                }
            }
        }
    }
    hits
}

/// The environment of a pgentry primary in `dir`, its secrets written there.
pub fn primary_env(
    dir: &TempDir,
    name: &str,
    superuser_pw: &str,
    replication_pw: &str,
) -> BTreeMap<String, String> {
    let mut env = server_env(dir, name);
    let secret =
        |file: String, content: &str| dir.secret(&file, content).to_string_lossy().into_owned();
    env.insert("PGENTRY_ROLE".into(), "primary".into());
    env.insert(
        "PGENTRY_INITDB_DIR".into(),
        dir.join(&format!("{name}-initdb.d"))
            .to_string_lossy()
            .into(),
    );
    env.insert(
        "POSTGRES_PASSWORD_FILE".into(),
        secret(format!("{name}-postgres-pw"), superuser_pw),
    );
    env.insert(
        "PGENTRY_REPLICATION_PASSWORD_FILE".into(),
        secret(format!("{name}-replication-pw"), replication_pw),
    );
    env
}

/// Starts `pgentry run` as a primary listening on loopback only.
pub fn start_primary(env: &BTreeMap<String, String>, tag: &str) -> Proc {
    Proc::spawn(
        &mut pgentry(
            env,
            &[
                "run",
                "--",
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
        ),
        tag,
    )
}
