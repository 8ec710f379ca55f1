//! Configuration: environment variables (the container convention) over an optional
//! TOML file. Every name is listed once, in [`SETTINGS`], which drives parsing, the
//! unknown-key check, `--help` and `check-config`, so the four cannot drift apart.

use crate::log::Format;
use crate::secrets::{self, Secret, SecretSource};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configuration name: its environment variable, its TOML key, its default and help.
pub struct Setting {
    pub env: &'static str,
    pub key: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    /// Secrets also accept `<env>_FILE` / `<key>_file` and are never printed.
    pub secret: bool,
}

const fn setting(
    env: &'static str,
    key: &'static str,
    default: &'static str,
    help: &'static str,
) -> Setting {
    Setting {
        env,
        key,
        default,
        help,
        secret: false,
    }
}

const fn secret(env: &'static str, key: &'static str, help: &'static str) -> Setting {
    Setting {
        env,
        key,
        default: "",
        help,
        secret: true,
    }
}

pub const DEFAULT_CONFIG_FILE: &str = "/etc/pgentry/pgentry.toml";

pub const SETTINGS: &[Setting] = &[
    setting(
        "PGENTRY_ROLE",
        "role",
        "replica if PGENTRY_PRIMARY_HOST is set, else primary",
        "primary | replica",
    ),
    setting(
        "PGDATA",
        "pgdata",
        "/var/lib/postgresql/data",
        "the data directory",
    ),
    setting("PGPORT", "port", "5432", "the port this server listens on"),
    setting(
        "PGENTRY_SOCKET_DIR",
        "socket_dir",
        "/var/run/postgresql",
        "directory of the server's unix socket",
    ),
    setting(
        "PGENTRY_PG_BIN",
        "pg_bin",
        "found on PATH",
        "directory of the PostgreSQL 15 binaries",
    ),
    setting(
        "PGENTRY_LOG_FORMAT",
        "log_format",
        "text",
        "text | json (one object per line)",
    ),
    setting(
        "PGENTRY_REPLICATION_USER",
        "replication_user",
        "replicator",
        "role replicas connect as",
    ),
    secret(
        "PGENTRY_REPLICATION_PASSWORD",
        "replication_password",
        "its password (required on a replica)",
    ),
    setting(
        "PGENTRY_PRIMARY_HOST",
        "primary_host",
        "",
        "replica: host of the primary",
    ),
    setting(
        "PGENTRY_PRIMARY_PORT",
        "primary_port",
        "5432",
        "replica: port of the primary",
    ),
    setting(
        "PGENTRY_SLOT",
        "slot",
        "from the host name",
        "replica: its physical replication slot",
    ),
    setting(
        "PGENTRY_WAIT_TIMEOUT",
        "wait_timeout",
        "0 (forever)",
        "replica: seconds to wait for the primary",
    ),
    setting(
        "POSTGRES_USER",
        "postgres_user",
        "postgres",
        "superuser, as in the official image",
    ),
    secret(
        "POSTGRES_PASSWORD",
        "postgres_password",
        "superuser password (primary: required unless trust)",
    ),
    setting(
        "POSTGRES_DB",
        "postgres_db",
        "$POSTGRES_USER",
        "primary: database created at first start",
    ),
    setting(
        "POSTGRES_INITDB_ARGS",
        "postgres_initdb_args",
        "",
        "primary: extra initdb arguments",
    ),
    setting(
        "POSTGRES_INITDB_WALDIR",
        "postgres_initdb_waldir",
        "",
        "primary: initdb --waldir",
    ),
    setting(
        "POSTGRES_HOST_AUTH_METHOD",
        "postgres_host_auth_method",
        "scram-sha-256",
        "primary: pg_hba method for `host all all all`",
    ),
    setting(
        "PGENTRY_SLOTS",
        "slots",
        "",
        "primary: comma-separated physical slots to create",
    ),
    setting(
        "PGENTRY_REPLICATION_CIDR",
        "replication_cidr",
        "all",
        "primary: addresses allowed to replicate",
    ),
    setting(
        "PGENTRY_MAX_SLOT_WAL_KEEP_SIZE",
        "max_slot_wal_keep_size",
        "10GB",
        "primary: WAL a slot may retain (-1: no limit)",
    ),
    setting(
        "PGENTRY_MONITORING_FUNCTION",
        "monitoring_function",
        "false",
        "primary: create pg_replication_status()",
    ),
    setting(
        "PGENTRY_INITDB_DIR",
        "initdb_dir",
        "/docker-entrypoint-initdb.d",
        "primary: scripts run at first start",
    ),
    setting(
        "PGENTRY_HEALTH_TIMEOUT",
        "health_timeout",
        "3",
        "healthcheck: seconds for the whole check",
    ),
    setting(
        "PGENTRY_MAX_LAG_BYTES",
        "max_lag_bytes",
        "16777216",
        "healthcheck: replica lag limit in bytes",
    ),
    setting(
        "PGENTRY_MAX_LAG_SECONDS",
        "max_lag_seconds",
        "",
        "healthcheck: replica lag limit in seconds",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// A physical replication slot name: lower-case letters, digits and `_`, at most 63.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotName(String);

impl SlotName {
    pub fn parse(name: &str) -> Result<SlotName> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            bail!("invalid slot name {name:?}: use 1 to 63 lower-case letters, digits or _");
        }
        Ok(SlotName(name.to_string()))
    }

    /// A valid slot name made from a host name: a container's host name is unique
    /// per replica, so it makes a stable default without configuration.
    pub fn from_hostname(host: &str) -> SlotName {
        let mut name: String = host
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '_'
                }
            })
            .take(63)
            .collect();
        if name.is_empty() {
            name.push_str("replica");
        }
        SlotName(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone)]
pub struct Replica {
    pub primary_host: String,
    pub primary_port: u16,
    pub slot: SlotName,
    /// None waits forever.
    pub wait_timeout: Option<Duration>,
    pub password: Secret,
}

#[derive(Debug, Clone)]
pub struct Primary {
    pub db: String,
    pub initdb_args: Vec<String>,
    pub initdb_waldir: Option<PathBuf>,
    pub host_auth_method: String,
    pub slots: Vec<SlotName>,
    pub replication_cidr: String,
    pub max_slot_wal_keep_size: String,
    pub monitoring_function: bool,
    pub initdb_dir: PathBuf,
    pub replication_password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub enum RoleConfig {
    Primary(Primary),
    Replica(Replica),
}

#[derive(Debug, Clone)]
pub struct Health {
    pub timeout: Duration,
    pub max_lag_bytes: u64,
    pub max_lag_seconds: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub role: RoleConfig,
    pub pgdata: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub pg_bin: Option<PathBuf>,
    pub log_format: Format,
    pub replication_user: String,
    pub superuser: String,
    pub superuser_password: Option<Secret>,
    pub health: Health,
}

impl Config {
    pub fn role(&self) -> Role {
        match self.role {
            RoleConfig::Primary(_) => Role::Primary,
            RoleConfig::Replica(_) => Role::Replica,
        }
    }
}

/// Where a value came from, for `check-config` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Env,
    File,
}

/// The raw inputs: environment and the parsed TOML file (key → value as text).
pub struct Sources {
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
    file_path: Option<PathBuf>,
}

impl Sources {
    /// Reads the process environment and the TOML file it points to (or the default
    /// file when it exists).
    pub fn from_process() -> Result<Sources> {
        let env: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        let path = match env.get("PGENTRY_CONFIG").filter(|p| !p.is_empty()) {
            Some(p) => Some(PathBuf::from(p)),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        let text = match &path {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| {
                format!(
                    "cannot read config file {}; fix PGENTRY_CONFIG",
                    p.display()
                )
            })?),
            None => None,
        };
        Sources::new(env, text.as_deref(), path)
    }

    pub fn new(
        env: BTreeMap<String, String>,
        toml_text: Option<&str>,
        file_path: Option<PathBuf>,
    ) -> Result<Sources> {
        let file = match toml_text {
            Some(text) => parse_toml(text).map_err(|e| {
                let path = file_path.as_deref().unwrap_or(Path::new("config"));
                anyhow!("{}: {e}", path.display())
            })?,
            None => BTreeMap::new(),
        };
        Ok(Sources {
            env,
            file,
            file_path,
        })
    }

    fn get(&self, s: &Setting) -> Option<(&str, Origin)> {
        match self.env.get(s.env).filter(|v| !v.is_empty()) {
            Some(v) => Some((v, Origin::Env)),
            None => self.file.get(s.key).map(|v| (v.as_str(), Origin::File)),
        }
    }

    fn secret(&self, s: &Setting) -> Result<Option<(SecretSource<'_>, Origin)>> {
        let env_file = format!("{}_FILE", s.env);
        let from_env = (
            self.env.get(s.env).filter(|v| !v.is_empty()),
            self.env.get(&env_file).filter(|v| !v.is_empty()),
        );
        let key_file = format!("{}_file", s.key);
        let from_file = (self.file.get(s.key), self.file.get(&key_file));
        Ok(match (from_env, from_file) {
            ((Some(_), Some(_)), _) => bail!("both {} and {env_file} are set; set only one", s.env),
            ((Some(v), None), _) => Some((SecretSource::Inline(v), Origin::Env)),
            ((None, Some(p)), _) => Some((SecretSource::File(p), Origin::Env)),
            (_, (Some(_), Some(_))) => bail!(
                "both {} and {key_file} are set in the config file; set only one",
                s.key
            ),
            (_, (Some(v), None)) => Some((SecretSource::Inline(v), Origin::File)),
            (_, (None, Some(p))) => Some((SecretSource::File(p), Origin::File)),
            (_, (None, None)) => None,
        })
    }
}

/// Parses the TOML file into key → text, rejecting unknown keys with their position.
fn parse_toml(text: &str) -> Result<BTreeMap<String, String>> {
    let table: BTreeMap<toml::Spanned<String>, toml::Value> =
        toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            anyhow!(
                "invalid TOML at line {line}, column {col}: {}",
                e.message().replace('\n', " ")
            )
        })?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let name = key.get_ref();
        let known = SETTINGS
            .iter()
            .any(|s| s.key == name || (s.secret && name.strip_suffix("_file") == Some(s.key)));
        if !known {
            let (line, col) = line_col(text, key.span().start);
            bail!("unknown key {name:?} at line {line}, column {col}; see `pgentry --help` for the valid keys");
        }
        let text_value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                let (line, col) = line_col(text, key.span().start);
                bail!("key {name:?} at line {line}, column {col} must be a string, number or boolean, not {}", other.type_str());
            }
        };
        out.insert(name.clone(), text_value);
    }
    Ok(out)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    (line, col)
}

fn find(env: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.env == env)
        .expect("setting is listed in SETTINGS")
}

/// Reads one setting, parsed by `parse`, with the name in any error.
fn value<T>(src: &Sources, env: &str, parse: impl FnOnce(&str) -> Result<T>) -> Result<Option<T>> {
    let s = find(env);
    match src.get(s) {
        None => Ok(None),
        Some((v, origin)) => parse(v).map(Some).map_err(|e| {
            let name = if origin == Origin::Env { s.env } else { s.key };
            anyhow!("{name}={v:?}: {e}")
        }),
    }
}

fn text(src: &Sources, env: &str) -> Option<String> {
    src.get(find(env)).map(|(v, _)| v.to_string())
}

fn load_secret(src: &Sources, env: &str) -> Result<Option<Secret>> {
    let s = find(env);
    src.secret(s)?
        .map(|(source, _)| secrets::load(s.env, source))
        .transpose()
}

fn parse_port(v: &str) -> Result<u16> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => bail!("not a port number (1-65535)"),
    }
}

fn parse_seconds(v: &str) -> Result<f64> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => bail!("not a number of seconds"),
    }
}

fn parse_bool(v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => bail!("not a boolean (true or false)"),
    }
}

/// A size as postgresql.conf accepts it: -1, or digits with an optional unit.
fn parse_size(v: &str) -> Result<String> {
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &v[digits.len()..];
    let number_ok = v == "-1" || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    if !number_ok || !["", "kB", "MB", "GB", "TB"].contains(&unit) {
        bail!("not a size: use -1 or a number with kB, MB, GB or TB");
    }
    Ok(v.to_string())
}

fn parse_identifier(v: &str) -> Result<String> {
    if v.len() > 63 || v.contains('\0') {
        bail!("not a valid role name (at most 63 bytes)");
    }
    Ok(v.to_string())
}

/// Splits POSTGRES_INITDB_ARGS the way the official image's shell word-splitting
/// does for the common cases: on white space, honouring single and double quotes.
pub fn split_args(v: &str) -> Result<Vec<String>> {
    let mut args = Vec::new();
    let mut current: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in v.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => current.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                current.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => args.extend(current.take()),
            (None, c) => current.get_or_insert_with(String::new).push(c),
        }
    }
    if quote.is_some() {
        bail!("unbalanced quote");
    }
    args.extend(current);
    Ok(args)
}

impl Config {
    /// Builds and validates the configuration. `hostname` names the default slot.
    pub fn from_sources(src: &Sources, hostname: &str) -> Result<Config> {
        let primary_host = text(src, "PGENTRY_PRIMARY_HOST");
        let role = match value(src, "PGENTRY_ROLE", |v| match v {
            "primary" => Ok(Role::Primary),
            "replica" => Ok(Role::Replica),
            _ => bail!("must be primary or replica"),
        })? {
            Some(role) => role,
            None if primary_host.is_some() => Role::Replica,
            None => Role::Primary,
        };
        let replication_password = load_secret(src, "PGENTRY_REPLICATION_PASSWORD")?;
        let superuser =
            value(src, "POSTGRES_USER", parse_identifier)?.unwrap_or_else(|| "postgres".into());
        let role_config = match role {
            Role::Replica => {
                let primary_host = primary_host.ok_or_else(|| {
                    anyhow!("role replica needs PGENTRY_PRIMARY_HOST: set it to the primary's host name")
                })?;
                let password = replication_password.ok_or_else(|| {
                    anyhow!("a replica needs PGENTRY_REPLICATION_PASSWORD_FILE (or PGENTRY_REPLICATION_PASSWORD)")
                })?;
                let wait = value(src, "PGENTRY_WAIT_TIMEOUT", parse_seconds)?.unwrap_or(0.0);
                RoleConfig::Replica(Replica {
                    primary_host,
                    primary_port: value(src, "PGENTRY_PRIMARY_PORT", parse_port)?.unwrap_or(5432),
                    slot: value(src, "PGENTRY_SLOT", SlotName::parse)?
                        .unwrap_or_else(|| SlotName::from_hostname(hostname)),
                    wait_timeout: (wait > 0.0).then(|| Duration::from_secs_f64(wait)),
                    password,
                })
            }
            Role::Primary => {
                if primary_host.is_some() {
                    bail!("PGENTRY_ROLE=primary conflicts with PGENTRY_PRIMARY_HOST: unset one of them");
                }
                let slots = match text(src, "PGENTRY_SLOTS") {
                    Some(list) => list
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(SlotName::parse)
                        .collect::<Result<Vec<_>>>()
                        .context("PGENTRY_SLOTS")?,
                    None => Vec::new(),
                };
                RoleConfig::Primary(Primary {
                    db: text(src, "POSTGRES_DB").unwrap_or_else(|| superuser.clone()),
                    initdb_args: value(src, "POSTGRES_INITDB_ARGS", split_args)?
                        .unwrap_or_default(),
                    initdb_waldir: text(src, "POSTGRES_INITDB_WALDIR").map(PathBuf::from),
                    host_auth_method: text(src, "POSTGRES_HOST_AUTH_METHOD")
                        .unwrap_or_else(|| "scram-sha-256".into()),
                    slots,
                    replication_cidr: text(src, "PGENTRY_REPLICATION_CIDR")
                        .unwrap_or_else(|| "all".into()),
                    max_slot_wal_keep_size: value(
                        src,
                        "PGENTRY_MAX_SLOT_WAL_KEEP_SIZE",
                        parse_size,
                    )?
                    .unwrap_or_else(|| "10GB".into()),
                    monitoring_function: value(src, "PGENTRY_MONITORING_FUNCTION", parse_bool)?
                        .unwrap_or(false),
                    initdb_dir: text(src, "PGENTRY_INITDB_DIR")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/docker-entrypoint-initdb.d")),
                    replication_password,
                })
            }
        };
        let log_format = value(src, "PGENTRY_LOG_FORMAT", |v| match v {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => bail!("must be text or json"),
        })?
        .unwrap_or(Format::Text);
        Ok(Config {
            role: role_config,
            pgdata: text(src, "PGDATA")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/postgresql/data")),
            port: value(src, "PGPORT", parse_port)?.unwrap_or(5432),
            socket_dir: text(src, "PGENTRY_SOCKET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/run/postgresql")),
            pg_bin: text(src, "PGENTRY_PG_BIN").map(PathBuf::from),
            log_format,
            replication_user: value(src, "PGENTRY_REPLICATION_USER", parse_identifier)?
                .unwrap_or_else(|| "replicator".into()),
            superuser,
            superuser_password: load_secret(src, "POSTGRES_PASSWORD")?,
            health: Health {
                timeout: Duration::from_secs_f64(
                    value(src, "PGENTRY_HEALTH_TIMEOUT", parse_seconds)?.unwrap_or(3.0),
                ),
                max_lag_bytes: value(src, "PGENTRY_MAX_LAG_BYTES", |v| Ok(v.parse::<u64>()?))?
                    .unwrap_or(16 * 1024 * 1024),
                max_lag_seconds: value(src, "PGENTRY_MAX_LAG_SECONDS", parse_seconds)?,
            },
        })
    }

    /// The effective configuration for `check-config`: every setting with its value
    /// and origin, secrets redacted.
    pub fn describe(&self, src: &Sources) -> String {
        let mut out = String::new();
        let role = match self.role() {
            Role::Primary => "primary",
            Role::Replica => "replica",
        };
        if let Some(path) = &src.file_path {
            let _ = writeln!(out, "# config file: {}", path.display());
        }
        let _ = writeln!(out, "# role: {role}");
        for s in SETTINGS {
            let shown = if s.secret {
                match src.secret(s) {
                    Ok(Some((SecretSource::Inline(_), _))) => "<redacted>".to_string(),
                    Ok(Some((SecretSource::File(p), _))) => format!("<redacted> (from file {p})"),
                    _ => "(unset)".to_string(),
                }
            } else {
                match src.get(s) {
                    Some((v, Origin::Env)) => v.to_string(),
                    Some((v, Origin::File)) => format!("{v} (from config file)"),
                    None if s.default.is_empty() => "(unset)".into(),
                    None => format!("{} (default)", s.default),
                }
            };
            let _ = writeln!(out, "{:<32} {shown}", s.env);
        }
        if let RoleConfig::Replica(r) = &self.role {
            let _ = writeln!(out, "# slot in use: {}", r.slot.as_str());
        }
        out
    }
}

/// The variables that carry a secret inline (`NAME`; `NAME_FILE` only names a
/// file): kept out of every child's environment and out of postgres'.
pub fn inline_secret_names() -> impl Iterator<Item = &'static str> {
    SETTINGS.iter().filter(|s| s.secret).map(|s| s.env)
}

/// The settings reference, for `--help`.
pub fn help_table() -> String {
    let mut out = String::new();
    for s in SETTINGS {
        let name = if s.secret {
            format!("{}[_FILE]", s.env)
        } else {
            s.env.to_string()
        };
        let default = if s.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", s.default)
        };
        let _ = writeln!(out, "  {name:<34} {}{default}", s.help);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(env: &[(&str, &str)], toml: Option<&str>) -> Result<Sources> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Sources::new(env, toml, None)
    }

    fn config(env: &[(&str, &str)], toml: Option<&str>) -> Result<Config> {
        Config::from_sources(&sources(env, toml)?, "Replica-1.example")
    }

    #[test]
    fn defaults_to_a_standalone_primary() {
        let c = config(&[], None).unwrap();
        assert_eq!(c.role(), Role::Primary);
        assert_eq!(c.port, 5432);
        assert_eq!(c.pgdata, PathBuf::from("/var/lib/postgresql/data"));
        assert_eq!(c.replication_user, "replicator");
    }

    #[test]
    fn a_primary_host_makes_a_replica() {
        let c = config(
            &[
                ("PGENTRY_PRIMARY_HOST", "db"),
                ("PGENTRY_REPLICATION_PASSWORD", "pw"),
            ],
            None,
        )
        .unwrap();
        let RoleConfig::Replica(r) = c.role else {
            panic!("not a replica")
        };
        assert_eq!(r.primary_host, "db");
        assert_eq!(r.primary_port, 5432);
        assert_eq!(r.slot.as_str(), "replica_1_example");
        assert_eq!(r.wait_timeout, None);
        assert_eq!(r.password.expose(), "pw");
    }

    #[test]
    fn role_and_host_must_agree() {
        let err = config(
            &[("PGENTRY_ROLE", "primary"), ("PGENTRY_PRIMARY_HOST", "db")],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("conflicts"), "{err}");
        let err = config(&[("PGENTRY_ROLE", "replica")], None).unwrap_err();
        assert!(err.to_string().contains("PGENTRY_PRIMARY_HOST"), "{err}");
        let err = config(&[("PGENTRY_ROLE", "leader")], None).unwrap_err();
        assert!(err.to_string().contains("PGENTRY_ROLE"), "{err}");
    }

    #[test]
    fn a_replica_needs_a_password() {
        let err = config(&[("PGENTRY_PRIMARY_HOST", "db")], None).unwrap_err();
        assert!(
            err.to_string()
                .contains("PGENTRY_REPLICATION_PASSWORD_FILE"),
            "{err}"
        );
    }

    #[test]
    fn secret_and_secret_file_together_is_an_error() {
        let err = config(
            &[("POSTGRES_PASSWORD", "a"), ("POSTGRES_PASSWORD_FILE", "/x")],
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "both POSTGRES_PASSWORD and POSTGRES_PASSWORD_FILE are set; set only one"
        );
    }

    #[test]
    fn env_overrides_the_file() {
        let c = config(
            &[("PGPORT", "6000")],
            Some("port = 5999\npgdata = \"/d\"\n"),
        )
        .unwrap();
        assert_eq!(c.port, 6000);
        assert_eq!(c.pgdata, PathBuf::from("/d"));
    }

    #[test]
    fn unknown_keys_report_line_and_column() {
        let err = sources(&[], Some("port = 1\n  prot = 2\n")).err().unwrap();
        assert!(
            err.to_string()
                .contains("unknown key \"prot\" at line 2, column 3"),
            "{err}"
        );
    }

    #[test]
    fn bad_toml_reports_position_on_one_line() {
        let err = sources(&[], Some("port = \n")).err().unwrap().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn values_are_validated() {
        for (k, v) in [
            ("PGPORT", "0"),
            ("PGPORT", "x"),
            ("PGENTRY_SLOT", "Bad-Slot"),
            ("PGENTRY_WAIT_TIMEOUT", "-1"),
            ("PGENTRY_LOG_FORMAT", "xml"),
            ("PGENTRY_MAX_SLOT_WAL_KEEP_SIZE", "10 GB"),
            ("PGENTRY_MONITORING_FUNCTION", "maybe"),
        ] {
            let mut env = vec![(k, v), ("PGENTRY_REPLICATION_PASSWORD", "pw")];
            if matches!(k, "PGENTRY_SLOT" | "PGENTRY_WAIT_TIMEOUT") {
                env.push(("PGENTRY_PRIMARY_HOST", "db"));
            }
            let err = config(&env, None).unwrap_err();
            assert!(err.to_string().starts_with(&format!("{k}=")), "{k}: {err}");
        }
    }

    #[test]
    fn slot_names_from_host_names() {
        assert_eq!(SlotName::from_hostname("4f2a-B.c").as_str(), "4f2a_b_c");
        assert_eq!(SlotName::from_hostname("").as_str(), "replica");
        assert_eq!(SlotName::from_hostname(&"x".repeat(80)).as_str().len(), 63);
    }

    #[test]
    fn slots_list_is_parsed() {
        let c = config(&[("PGENTRY_SLOTS", "a, b ,,c")], None).unwrap();
        let RoleConfig::Primary(p) = c.role else {
            panic!()
        };
        let names: Vec<_> = p.slots.iter().map(SlotName::as_str).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn initdb_args_split_like_a_shell() {
        assert_eq!(
            split_args("--locale=C  -E 'UTF 8' \"--x=y z\"").unwrap(),
            ["--locale=C", "-E", "UTF 8", "--x=y z"]
        );
        assert!(split_args("'open").is_err());
    }

    #[test]
    fn describe_redacts_secrets() {
        let src = sources(
            &[
                ("POSTGRES_PASSWORD", "sekrit"),
                ("PGENTRY_REPLICATION_PASSWORD_FILE", "/run/s"),
            ],
            None,
        )
        .unwrap();
        let c = Config::from_sources(&src, "h");
        // The replication file does not exist, so loading fails; describe a config without it.
        assert!(c.is_err());
        let src = sources(&[("POSTGRES_PASSWORD", "sekrit")], None).unwrap();
        let text = Config::from_sources(&src, "h").unwrap().describe(&src);
        assert!(!text.contains("sekrit"));
        assert!(
            text.contains("POSTGRES_PASSWORD                <redacted>"),
            "{text}"
        );
    }

    #[test]
    fn every_setting_has_a_distinct_env_name_and_key() {
        let mut envs: Vec<_> = SETTINGS.iter().map(|s| s.env).collect();
        let mut keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
        envs.sort();
        envs.dedup();
        keys.sort();
        keys.dedup();
        assert_eq!(envs.len(), SETTINGS.len());
        assert_eq!(keys.len(), SETTINGS.len());
    }
}
