//! The primary role: initialise PGDATA on first start (initdb, replication settings,
//! pg_hba, /docker-entrypoint-initdb.d), then at every start reconcile the
//! replication role and slots on a temporary socket-only server, unless nothing
//! changed since the last start.

use crate::config::{Config, Primary};
use crate::pgdata::{self, PrimaryAction};
use crate::signals::{Interrupted, Shutdown};
use crate::staging::Staging;
use crate::standby::write_private;
use crate::tempserver::TempServer;
use crate::wire::{quote_ident, quote_literal, Connection};
use crate::{child, info, initscripts, pgbin, warn};
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// pgentry's own settings file, included from postgresql.conf.
pub const MANAGED_CONF: &str = "pgentry.conf";
/// What was last reconciled (a salted digest), to skip the temporary server.
pub const STATE_FILE: &str = "pgentry.state";
const INCLUDE_LINE: &str = "include_if_exists = 'pgentry.conf'\t# pgentry: replication defaults; settings below override them";

/// Pure: pgentry.conf. Included first, so postgresql.conf, ALTER SYSTEM and the
/// command line all override it.
pub fn managed_conf(p: &Primary) -> String {
    format!(
        "# Written by pgentry at every start; do not edit. Override any of these in\n\
         # postgresql.conf, with ALTER SYSTEM, or with `pgentry run -- -c name=value`.\n\
         listen_addresses = '*'\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         hot_standby = on\n\
         wal_log_hints = on\n\
         max_slot_wal_keep_size = {}\n\
         # A dead peer is noticed in 15 s, not 60: a cut-off replica turns unready\n\
         # sooner, and the primary frees its slot for the reconnect. Replicas inherit\n\
         # this file with their clone.\n\
         wal_sender_timeout = '15s'\n\
         wal_receiver_timeout = '15s'\n",
        crate::conninfo::quote_conf_string(&p.max_slot_wal_keep_size)
    )
}

/// Pure: postgresql.conf with the include as its first line, or None if present.
pub fn with_include(conf: &str) -> Option<String> {
    let present = conf.lines().any(|l| {
        l.trim_start()
            .starts_with("include_if_exists = 'pgentry.conf'")
    });
    (!present).then(|| format!("{INCLUDE_LINE}\n{conf}"))
}

/// Pure: the pg_hba lines pgentry needs. `fresh` adds the official image's
/// `host all all all` line, which a new cluster gets and an adopted one keeps as it
/// has it. That line does not match replication connections, hence the first.
pub fn hba_lines(p: &Primary, replication_user: &str, fresh: bool) -> Vec<String> {
    let mut lines = vec![format!(
        "host replication {} {} scram-sha-256",
        quote_ident(replication_user),
        p.replication_cidr
    )];
    if fresh {
        lines.push(format!("host all all all {}", p.host_auth_method));
    }
    lines
}

/// Pure: pg_hba.conf with the missing `lines` appended, or None if all are there.
pub fn with_hba_lines(hba: &str, lines: &[String]) -> Option<String> {
    let normal = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let present: Vec<String> = hba.lines().map(normal).collect();
    let missing: Vec<&String> = lines
        .iter()
        .filter(|l| !present.contains(&normal(l)))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut out = hba.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("# added by pgentry\n");
    for l in missing {
        out.push_str(l);
        out.push('\n');
    }
    Some(out)
}

/// Pure: a salted digest of everything the reconcile applies. The salt keeps the
/// digest from being a fast, unsalted hash of the password.
pub fn reconcile_digest(salt: &str, replication_user: &str, p: &Primary) -> String {
    let mut h = Sha256::new();
    for part in [
        salt,
        env!("CARGO_PKG_VERSION"),
        replication_user,
        p.replication_password
            .as_ref()
            .map_or("\u{0}none", |s| s.expose()),
        &p.slots
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(","),
        if p.monitoring_function {
            "monitoring"
        } else {
            ""
        },
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

/// What the last reconcile applied: a salt and the digest made with it.
struct State {
    salt: String,
    digest: String,
}

impl State {
    /// The state the configuration asks for, digested with `salt`.
    fn wanted(salt: String, config: &Config, primary: &Primary) -> State {
        let digest = reconcile_digest(&salt, &config.replication_user, primary);
        State { salt, digest }
    }

    fn read(dir: &Path) -> Option<State> {
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
        let (salt, digest) = text.trim().split_once(' ')?;
        Some(State {
            salt: salt.into(),
            digest: digest.into(),
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        write_private(
            &dir.join(STATE_FILE),
            format!("{} {}\n", self.salt, self.digest).as_bytes(),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_salt() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom_fill(&mut bytes)?;
    Ok(hex(&bytes))
}

fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    // SAFETY: getrandom(2) writes at most buf.len() bytes into buf.
    let n = unsafe { nix::libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        bail!("getrandom failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub async fn prepare(config: &Config, primary: &Primary, shutdown: &mut Shutdown) -> Result<()> {
    let pgdata = &config.pgdata;
    let facts = pgdata::inspect(pgdata)
        .with_context(|| format!("cannot inspect PGDATA {}", pgdata.display()))?;
    let staging = Staging::new(pgdata);
    match pgdata::decide_primary(&facts)? {
        PrimaryAction::Adopt => {}
        PrimaryAction::FinishStaging => {
            info!("finishing an interrupted move of a completed initdb");
            staging.promote()?;
        }
        action @ (PrimaryAction::Initdb | PrimaryAction::DiscardAndInitdb) => {
            require_password(config, primary)?;
            if action == PrimaryAction::DiscardAndInitdb {
                info!("discarding an interrupted initialisation");
                staging.discard()?;
            }
            initialise(config, primary, &staging, shutdown).await?;
            staging.mark_complete()?;
            staging.promote()?;
            info!("initialised a new primary in {}", pgdata.display());
            return Ok(());
        }
    }
    write_settings(pgdata, config, primary, false)?;
    let last = State::read(pgdata);
    let salt = match &last {
        Some(state) => state.salt.clone(),
        None => new_salt()?,
    };
    let wanted = State::wanted(salt, config, primary);
    if last.is_some_and(|l| l.digest == wanted.digest) {
        info!("replication role and slots unchanged since the last start; no setup server needed");
        return Ok(());
    }
    info!("reconciling the replication role and slots on a temporary server");
    on_setup_server(config, pgdata, shutdown, async |server| {
        let mut conn = connect_superuser(config, server).await?;
        reconcile(&mut conn, config, primary).await?;
        conn.close().await;
        Ok(())
    })
    .await?;
    wanted.write(pgdata)
}

/// An empty password only works with trust, and trust must be asked for.
fn require_password(config: &Config, primary: &Primary) -> Result<()> {
    let empty = config
        .superuser_password
        .as_ref()
        .is_none_or(|s| s.expose().is_empty());
    match (empty, primary.host_auth_method.as_str()) {
        (true, "trust") => {
            warn!("POSTGRES_HOST_AUTH_METHOD=trust: anyone who can reach this server connects without a password");
            Ok(())
        }
        (true, _) => bail!(
            "a new primary needs a superuser password: set POSTGRES_PASSWORD_FILE (or POSTGRES_PASSWORD), or POSTGRES_HOST_AUTH_METHOD=trust to allow all connections without one"
        ),
        (false, _) => Ok(()),
    }
}

/// initdb into the staging directory, then settings, scripts and the reconcile on a
/// temporary server, all before anything is moved into PGDATA: a failure or a kill
/// leaves an incomplete staging directory, which the next start discards.
async fn initialise(
    config: &Config,
    primary: &Primary,
    staging: &Staging,
    shutdown: &mut Shutdown,
) -> Result<()> {
    staging.create()?;
    let data = staging.data_dir();
    run_initdb(config, primary, staging, shutdown).await?;
    write_settings(&data, config, primary, true)?;
    on_setup_server(config, &data, shutdown, async |server| {
        let mut conn = connect_superuser(config, server).await?;
        if primary.db != "postgres" {
            conn.simple_query(&format!("CREATE DATABASE {}", quote_ident(&primary.db)))
                .await
                .map_err(|e| anyhow!("cannot create database {:?}: {e}", primary.db))?;
        }
        reconcile(&mut conn, config, primary).await?;
        conn.close().await;
        let mut db_conn = server
            .connect(
                &config.superuser,
                config.superuser_password.as_ref(),
                &primary.db,
            )
            .await
            .map_err(|e| anyhow!("cannot connect to database {:?}: {e}", primary.db))?;
        initscripts::run_all(
            &primary.initdb_dir,
            &mut db_conn,
            &script_env(config, primary, server),
        )
        .await?;
        db_conn.close().await;
        Ok(())
    })
    .await?;
    State::wanted(new_salt()?, config, primary).write(&data)
}

/// What a `.sh` init script sees, as in the official image: libpq's variables point
/// at the temporary server.
fn script_env(config: &Config, primary: &Primary, server: &TempServer) -> Vec<(String, String)> {
    let crate::wire::Endpoint::Unix { dir, port } = &server.endpoint else {
        return Vec::new();
    };
    vec![
        ("PGHOST".into(), dir.to_string_lossy().into_owned()),
        ("PGPORT".into(), port.to_string()),
        ("PGUSER".into(), config.superuser.clone()),
        ("PGDATABASE".into(), primary.db.clone()),
    ]
}

async fn run_initdb(
    config: &Config,
    primary: &Primary,
    staging: &Staging,
    shutdown: &mut Shutdown,
) -> Result<()> {
    let program = pgbin::find(config.pg_bin.as_deref(), "initdb")?;
    let mut args: Vec<String> = vec![
        "-D".into(),
        staging.data_dir().to_string_lossy().into_owned(),
        format!("--username={}", config.superuser),
        "--data-checksums".into(),
    ];
    let pwfile = staging.root().join("pwfile");
    if let Some(pw) = config
        .superuser_password
        .as_ref()
        .filter(|p| !p.expose().is_empty())
    {
        write_private(&pwfile, format!("{}\n", pw.expose()).as_bytes())?;
        args.push(format!("--pwfile={}", pwfile.display()));
    }
    if let Some(waldir) = &primary.initdb_waldir {
        args.push(format!("--waldir={}", waldir.display()));
    }
    args.extend(primary.initdb_args.iter().cloned());
    info!("running initdb");
    let mut command = child::command(&program, nix::sys::signal::Signal::SIGKILL);
    command.args(&args);
    let output = tokio::select! {
        o = command.output() => o.with_context(|| format!("cannot run {}", program.display()))?,
        s = shutdown.recv() => return Err(Interrupted(s).into()),
    };
    let _ = std::fs::remove_file(&pwfile);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        bail!(
            "initdb failed ({}): {last}; check POSTGRES_INITDB_ARGS",
            output.status
        );
    }
    Ok(())
}

/// pgentry.conf, its include in postgresql.conf, and the pg_hba lines, in `dir`.
fn write_settings(dir: &Path, config: &Config, primary: &Primary, fresh: bool) -> Result<()> {
    let conf_path = dir.join(MANAGED_CONF);
    let wanted = managed_conf(primary);
    if std::fs::read_to_string(&conf_path).ok().as_deref() != Some(wanted.as_str()) {
        write_private(&conf_path, wanted.as_bytes())?;
    }
    let main_conf = dir.join("postgresql.conf");
    if let Some(updated) = with_include(&read(&main_conf)?) {
        write_private(&main_conf, updated.as_bytes())?;
    }
    let hba = dir.join("pg_hba.conf");
    if let Some(updated) = with_hba_lines(
        &read(&hba)?,
        &hba_lines(primary, &config.replication_user, fresh),
    ) {
        write_private(&hba, updated.as_bytes())?;
        if !fresh {
            info!(
                "added a replication entry for {:?} to pg_hba.conf",
                config.replication_user
            );
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The temporary server's private socket directory, beside the real one.
fn setup_socket_dir(config: &Config) -> PathBuf {
    config.socket_dir.join(".pgentry-setup")
}

/// Runs `work` against a temporary server on `data`, and stops the server however
/// the work ends: done, failed, or cut short by a signal.
async fn on_setup_server(
    config: &Config,
    data: &Path,
    shutdown: &mut Shutdown,
    work: impl AsyncFnOnce(&TempServer) -> Result<()>,
) -> Result<()> {
    let socket_dir = setup_socket_dir(config);
    let server = TempServer::start(
        config.pg_bin.as_deref(),
        data,
        &socket_dir,
        config.port,
        &config.superuser,
        shutdown,
    )
    .await?;
    let result = tokio::select! {
        r = work(&server) => r,
        s = shutdown.recv() => Err(Interrupted(s).into()),
    };
    server.stop().await?;
    result
}

async fn connect_superuser(config: &Config, server: &TempServer) -> Result<Connection> {
    let mut conn = server
        .connect(
            &config.superuser,
            config.superuser_password.as_ref(),
            "postgres",
        )
        .await
        .map_err(|e| {
            anyhow!(
                "cannot connect to the temporary server as {:?}: {e}",
                config.superuser
            )
        })?;
    // Statement logging is for the application's statements: keep pgentry's (which
    // carry a password verifier) out of the server log even with log_statement=all.
    // A separate query, because a statement is logged before it runs.
    conn.simple_query("SET log_statement = 'none'; SET log_min_duration_statement = -1; SET log_min_error_statement = 'panic'; SET log_duration = off")
        .await
        .map_err(|e| anyhow!("cannot configure the setup session: {e}"))?;
    Ok(conn)
}

/// Pure: the statements that make the monitoring function exist.
pub fn monitoring_function_sql() -> &'static str {
    "CREATE OR REPLACE FUNCTION public.pg_replication_status() \
     RETURNS TABLE (application_name text, client_addr inet, state text, sync_state text, replay_lag_bytes numeric, replay_lag interval) \
     LANGUAGE sql STABLE AS $pgentry$ \
     SELECT application_name, client_addr, state, sync_state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), replay_lag \
     FROM pg_stat_replication $pgentry$"
}

async fn reconcile(conn: &mut Connection, config: &Config, primary: &Primary) -> Result<()> {
    let user = &config.replication_user;
    match &primary.replication_password {
        Some(password) => {
            let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
            let exists = !conn
                .simple_query(&format!("SELECT 1 FROM pg_roles WHERE rolname = {}", quote_literal(user)))
                .await?
                .is_empty();
            let verb = if exists { "ALTER" } else { "CREATE" };
            conn.simple_query(&format!("{verb} ROLE {} WITH LOGIN REPLICATION PASSWORD {}", quote_ident(user), quote_literal(&verifier)))
                .await
                .map_err(|e| anyhow!("cannot {} role {user:?}: {e}", verb.to_lowercase()))?;
            info!("{} replication role {user:?}", if exists { "updated" } else { "created" });
        }
        None => warn!("no PGENTRY_REPLICATION_PASSWORD_FILE: no replication role is managed, replicas cannot connect"),
    }
    for slot in &primary.slots {
        let name = quote_literal(slot.as_str());
        conn.simple_query(&format!(
            "SELECT pg_create_physical_replication_slot({name}, true) WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = {name})"
        ))
        .await
        .map_err(|e| anyhow!("cannot create slot {}: {e}", slot.as_str()))?;
    }
    if primary.monitoring_function {
        conn.simple_query(monitoring_function_sql())
            .await
            .map_err(|e| anyhow!("cannot create pg_replication_status(): {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlotName;
    use crate::secrets::Secret;

    fn primary() -> Primary {
        Primary {
            db: "app".into(),
            initdb_args: vec![],
            initdb_waldir: None,
            host_auth_method: "scram-sha-256".into(),
            slots: vec![SlotName::parse("r1").unwrap()],
            replication_cidr: "all".into(),
            max_slot_wal_keep_size: "10GB".into(),
            monitoring_function: false,
            initdb_dir: "/d".into(),
            replication_password: Some(Secret::new("pw".into())),
        }
    }

    #[test]
    fn managed_conf_has_the_replication_settings() {
        let conf = managed_conf(&primary());
        for line in [
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
            "wal_log_hints = on",
            "max_slot_wal_keep_size = '10GB'",
            "wal_sender_timeout = '15s'",
            "wal_receiver_timeout = '15s'",
        ] {
            assert!(conf.contains(line), "{line}");
        }
    }

    #[test]
    fn include_goes_first_once() {
        let once = with_include("max_connections = 100\n").unwrap();
        assert!(once.starts_with("include_if_exists = 'pgentry.conf'"));
        assert!(once.ends_with("max_connections = 100\n"));
        assert_eq!(with_include(&once), None);
    }

    #[test]
    fn hba_lines_are_added_once() {
        let lines = hba_lines(&primary(), "replicator", true);
        assert_eq!(
            lines,
            [
                "host replication \"replicator\" all scram-sha-256",
                "host all all all scram-sha-256"
            ]
        );
        let once = with_hba_lines("local all all trust", &lines).unwrap();
        assert!(once.starts_with("local all all trust\n# added by pgentry\nhost replication"));
        assert_eq!(with_hba_lines(&once, &lines), None);
        // White space differences do not duplicate a line.
        assert_eq!(
            with_hba_lines(
                "host  replication \"replicator\"\tall scram-sha-256\n",
                &lines[..1]
            ),
            None
        );
        assert_eq!(hba_lines(&primary(), "replicator", false).len(), 1);
    }

    #[test]
    fn digest_changes_with_what_is_applied() {
        let p = primary();
        let d = reconcile_digest("s", "replicator", &p);
        assert_eq!(d, reconcile_digest("s", "replicator", &p));
        assert_ne!(d, reconcile_digest("t", "replicator", &p));
        assert_ne!(d, reconcile_digest("s", "other", &p));
        let mut rotated = p.clone();
        rotated.replication_password = Some(Secret::new("new".into()));
        assert_ne!(d, reconcile_digest("s", "replicator", &rotated));
        let mut more = p.clone();
        more.slots.push(SlotName::parse("r2").unwrap());
        assert_ne!(d, reconcile_digest("s", "replicator", &more));
        assert!(!d.contains("pw"));
    }
}
