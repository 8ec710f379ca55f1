//! `pgentry healthcheck` and `pgentry status` against real PostgreSQL 15 servers (a
//! plain primary, a pgentry replica) in each state, and against hand-written fake
//! servers for the states a real one cannot be held in: starting up, and silent.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);
type Env = BTreeMap<String, String>;

/// The environment of a primary container, pointed at `server`.
fn primary_probe_env(server: &Endpoint) -> Env {
    let mut env = Env::new();
    env.insert("PATH".into(), std::env::var("PATH").unwrap_or_default());
    env.insert("PGENTRY_ROLE".into(), "primary".into());
    env.insert("PGPORT".into(), server.port.to_string());
    env.insert(
        "PGENTRY_SOCKET_DIR".into(),
        server.socket_dir.to_string_lossy().into(),
    );
    env.insert("POSTGRES_USER".into(), "postgres".into());
    env.insert("PGENTRY_CONFIG".into(), String::new());
    env
}

/// `env` with some variables changed.
fn with(env: &Env, changes: &[(&str, &str)]) -> Env {
    let mut env = env.clone();
    for (k, v) in changes {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// `env` aimed at another server (the wrong-role checks).
fn aimed_at(env: &Env, server: &Endpoint) -> Env {
    with(
        env,
        &[
            ("PGPORT", &server.port.to_string()),
            ("PGENTRY_SOCKET_DIR", &server.socket_dir.to_string_lossy()),
        ],
    )
}

/// Runs the healthcheck; checks the contract every run must keep (exit 0 or 1, one
/// line on stdout that agrees with the exit code) and returns (healthy, line).
fn probe(env: &Env, mode: &str) -> (bool, String) {
    let out = pgentry_output(env, &["healthcheck", mode]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "not one line: {stdout:?}");
    let healthy = match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("exit code {other:?} ({stdout})"),
    };
    assert_eq!(stdout.starts_with("healthy: "), healthy, "{stdout}");
    (healthy, stdout.trim_end().to_string())
}

/// Asserts the verdict of `mode` and that its line contains `reason`.
fn expect(env: &Env, mode: &str, healthy: bool, reason: &str) {
    let (got, line) = probe(env, mode);
    assert_eq!(got, healthy, "{mode}: {line}");
    assert!(line.contains(reason), "{mode}: {line:?} lacks {reason:?}");
}

/// Proof that the healthcheck creates no process (nor thread): under strace, when it
/// is installed, the only process event before the exit is its own execve.
fn assert_spawns_nothing(env: &Env, mode: &str) {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("strace is not installed: the /proc check in the timeout test stands alone");
        return;
    }
    let dir = TempDir::new("strace");
    let trace = dir.join("trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=process", "-o"])
        .arg(&trace)
        .arg(pgentry_bin())
        .args(["healthcheck", mode])
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let trace = std::fs::read_to_string(trace).unwrap();
    let events: Vec<&str> = trace
        .lines()
        .filter(|l| !l.contains("exit") && !l.contains("+++"))
        .collect();
    assert_eq!(events.len(), 1, "more than the execve:\n{trace}");
    assert!(events[0].contains("execve("), "{trace}");
}

fn start_replica(env: &Env, args: &[&str], tag: &str) -> Proc {
    let mut all = vec!["run"];
    all.extend(args);
    Proc::spawn(&mut pgentry(env, &all), tag)
}

/// A primary with a table, and a streaming pgentry replica of it.
fn primary_and_replica(name: &str) -> (PlainPrimary, Env, Proc) {
    let primary = PlainPrimary::new(name, "repl-pw");
    primary.endpoint.psql("CREATE TABLE t (id int);");
    let secret = primary.dir.secret("repl_pw", "repl-pw");
    let env = replica_env(&primary.dir, "replica", primary.endpoint.port, &secret);
    let replica = start_replica(&env, &[], &format!("{name}-replica"));
    endpoint_of(&env).wait_streaming(LONG);
    (primary, env, replica)
}

/// Received-but-not-replayed WAL on the replica, in bytes.
fn replay_backlog(replica: &Endpoint) -> i64 {
    replica
        .psql("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint")
        .parse()
        .unwrap()
}

#[test]
fn every_probe_against_a_primary_and_a_replica_in_each_state() {
    let (mut primary, replica_env, mut replica) = primary_and_replica("states");
    let replica_ep = endpoint_of(&replica_env);
    let primary_env = primary_probe_env(&primary.endpoint);

    // Healthy.
    expect(
        &primary_env,
        "--readiness",
        true,
        "primary accepting connections",
    );
    expect(&primary_env, "--liveness", true, "alive");
    expect(&primary_env, "--startup", true, "started");
    expect(&replica_env, "--readiness", true, "replica streaming");
    expect(&replica_env, "--liveness", true, "alive");
    expect(&replica_env, "--startup", true, "started");
    assert_spawns_nothing(&primary_env, "--readiness");
    assert_spawns_nothing(&replica_env, "--readiness");

    // The wrong role: not ready, though alive and started.
    let primary_expected_on_replica = aimed_at(&primary_env, &replica_ep);
    expect(
        &primary_expected_on_replica,
        "--readiness",
        false,
        "expected a primary, but the server is in recovery",
    );
    expect(&primary_expected_on_replica, "--liveness", true, "alive");
    expect(&primary_expected_on_replica, "--startup", true, "started");
    let replica_expected_on_primary = aimed_at(&replica_env, &primary.endpoint);
    expect(
        &replica_expected_on_primary,
        "--readiness",
        false,
        "expected a replica, but the server is not in recovery",
    );
    expect(&replica_expected_on_primary, "--liveness", true, "alive");
    expect(&replica_expected_on_primary, "--startup", true, "started");

    // No socket: TCP to 127.0.0.1, with the superuser's password (SCRAM).
    primary
        .endpoint
        .psql("ALTER ROLE postgres PASSWORD 'super pw';");
    let no_socket = primary.dir.postgres_dir("no-socket", 0o755);
    let over_tcp = with(
        &primary_env,
        &[
            ("PGENTRY_SOCKET_DIR", &no_socket.to_string_lossy()),
            ("POSTGRES_PASSWORD", "super pw"),
        ],
    );
    expect(
        &over_tcp,
        "--readiness",
        true,
        "primary accepting connections",
    );
    let wrong_password = with(&over_tcp, &[("POSTGRES_PASSWORD", "wrong")]);
    expect(
        &wrong_password,
        "--readiness",
        false,
        "password authentication failed",
    );
    expect(&wrong_password, "--liveness", true, "alive");

    // Lagging: replay paused on the replica, writes on the primary. A transaction
    // replayed first gives the replica a last-replay time to measure from.
    primary.endpoint.psql("INSERT INTO t VALUES (0);");
    wait_until(LONG, "the first row to replay", || {
        replica_ep.try_psql("SELECT count(*) FROM t").as_deref() == Ok("1")
    });
    replica_ep.psql("SELECT pg_wal_replay_pause();");
    wait_until(LONG, "replay to pause", || {
        replica_ep
            .try_psql("SELECT pg_get_wal_replay_pause_state()")
            .as_deref()
            == Ok("paused")
    });
    primary
        .endpoint
        .psql("INSERT INTO t SELECT generate_series(1, 50000);");
    wait_until(LONG, "WAL to arrive unreplayed", || {
        replay_backlog(&replica_ep) > 1024 * 1024
    });
    // By bytes: within the default 16 MiB, over a small limit.
    expect(&replica_env, "--readiness", true, "replay is paused");
    let small_limit = with(&replica_env, &[("PGENTRY_MAX_LAG_BYTES", "65536")]);
    expect(
        &small_limit,
        "--readiness",
        false,
        "over PGENTRY_MAX_LAG_BYTES=65536",
    );
    expect(&small_limit, "--liveness", true, "alive");
    expect(&small_limit, "--startup", true, "started");
    // By seconds: once the last replayed transaction is over a second old.
    let one_second = with(&replica_env, &[("PGENTRY_MAX_LAG_SECONDS", "1")]);
    wait_until(LONG, "lag in seconds to exceed 1 s", || {
        !probe(&one_second, "--readiness").0
    });
    expect(
        &one_second,
        "--readiness",
        false,
        "over PGENTRY_MAX_LAG_SECONDS=1",
    );
    expect(&one_second, "--liveness", true, "alive");
    expect(&one_second, "--startup", true, "started");
    // Caught up, the primary idle: an old last transaction is not lag.
    replica_ep.psql("SELECT pg_wal_replay_resume();");
    wait_until(LONG, "the replica to catch up", || {
        replay_backlog(&replica_ep) == 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    expect(&one_second, "--readiness", true, "replica streaming");

    // The primary stopped: the replica is alive and started, not ready.
    primary.stop();
    wait_until(LONG, "the WAL receiver to stop streaming", || {
        !replica_ep.is_streaming()
    });
    expect(
        &replica_env,
        "--readiness",
        false,
        "replica is not streaming",
    );
    expect(&replica_env, "--liveness", true, "alive");
    expect(&replica_env, "--startup", true, "started");
    // ... and the stopped primary is unhealthy whatever the probe.
    for mode in ["--readiness", "--liveness", "--startup"] {
        expect(&primary_env, mode, false, "nothing answers at 127.0.0.1");
    }

    // A standby that cannot accept connections yet (hot_standby off stands in for a
    // long replay before the consistent point): alive and started, not ready.
    replica.stop();
    let mut replica = start_replica(
        &replica_env,
        &["--", "-c", "hot_standby=off"],
        "states-cold-standby",
    );
    wait_until(LONG, "the standby to answer", || {
        probe(&replica_env, "--liveness").0
    });
    expect(
        &replica_env,
        "--readiness",
        false,
        "not accepting connections",
    );
    expect(&replica_env, "--liveness", true, "alive");
    expect(&replica_env, "--startup", true, "in recovery");
    replica.stop();

    // The replica stopped too.
    expect(&replica_env, "--liveness", false, "nothing answers");
}

/// A fake server at `<dir>/.s.PGSQL.<port>`: it accepts every connection and, when
/// `answer` is given, reads the startup packet and sends `answer`; otherwise it
/// holds the connection and never says a word.
fn fake_server(dir: &Path, port: u16, answer: Option<Vec<u8>>) {
    let listener = UnixListener::bind(dir.join(format!(".s.PGSQL.{port}"))).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if let Some(answer) = &answer {
                let _ = reply(&mut stream, answer);
            }
            held.push(stream);
        }
    });
}

fn reply(stream: &mut UnixStream, answer: &[u8]) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let mut packet = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    stream.read_exact(&mut packet)?;
    stream.write_all(answer)?;
    stream.shutdown(std::net::Shutdown::Both)
}

/// An ErrorResponse message, as the postmaster sends before a backend exists.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

#[test]
fn a_server_starting_up_is_alive_but_neither_started_nor_ready() {
    let dir = TempDir::new("starting");
    let port = free_port();
    fake_server(
        &dir.0,
        port,
        Some(error_response(
            "57P03",
            "the database system is starting up",
        )),
    );
    let server = Endpoint {
        port,
        socket_dir: dir.0.clone(),
    };
    let env = primary_probe_env(&server);
    expect(
        &env,
        "--readiness",
        false,
        "not accepting connections: the database system is starting up (SQLSTATE 57P03)",
    );
    expect(
        &env,
        "--startup",
        false,
        "the database system is starting up",
    );
    expect(&env, "--liveness", true, "alive");
}

#[test]
fn the_timeout_bounds_a_silent_server_and_no_child_is_ever_spawned() {
    let dir = TempDir::new("silent");
    let port = free_port();
    fake_server(&dir.0, port, None);
    let env = with(
        &primary_probe_env(&Endpoint {
            port,
            socket_dir: dir.0.clone(),
        }),
        &[("PGENTRY_HEALTH_TIMEOUT", "1")],
    );
    let start = Instant::now();
    let mut child = pgentry(&env, &["healthcheck"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // While it waits on the silent server: no child process, on any of its threads.
    let pid = child.id();
    let mut samples = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                // A task that ended between the listing and the read has no file.
                if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                    assert_eq!(children.trim(), "", "the healthcheck has a child");
                    samples += 1;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no timeout");
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    assert!(samples > 0, "never saw the running healthcheck");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("unhealthy: no answer from")
            && stdout.contains("PGENTRY_HEALTH_TIMEOUT=1"),
        "{stdout}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_spawns_nothing(&env, "--liveness");
}

#[test]
fn configuration_errors_are_unhealthy_with_exit_1() {
    let server = Endpoint {
        port: free_port(),
        socket_dir: "/nonexistent".into(),
    };
    let env = primary_probe_env(&server);
    expect(
        &with(&env, &[("PGPORT", "not-a-port")]),
        "--liveness",
        false,
        "invalid configuration: PGPORT",
    );
    expect(
        &with(&env, &[("PGENTRY_ROLE", "replica")]),
        "--readiness",
        false,
        "invalid configuration",
    );
    expect(&env, "--readiness", false, "no socket in /nonexistent");
    // Even a mistyped mode is an answer of 1, not a usage error of 2.
    expect(&env, "--deep", false, "unknown healthcheck mode");
}

#[test]
fn status_shows_standbys_and_slots_on_the_primary_and_positions_on_the_replica() {
    let (mut primary, replica_env, mut replica) = primary_and_replica("status");
    let primary_env = primary_probe_env(&primary.endpoint);
    let json = |env: &Env| -> serde_json::Value {
        let out = pgentry_output(env, &["status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // Positions are null until the standby's first feedback message.
    let mut p = serde_json::Value::Null;
    wait_until(LONG, "the standby to report its positions", || {
        p = json(&primary_env);
        p["standbys"][0]["replay_lag_bytes"].is_i64()
    });
    assert_eq!(p["schema"], 1);
    assert_eq!(p["role"], "primary");
    assert_eq!(p["timeline"], 1);
    assert!(p["replica"].is_null());
    let standbys = p["standbys"].as_array().unwrap();
    assert_eq!(standbys.len(), 1, "{p}");
    let s = &standbys[0];
    assert_eq!(s["application_name"], "replica");
    assert_eq!(s["client_addr"], "127.0.0.1");
    assert_eq!(s["state"], "streaming");
    assert_eq!(s["sync_state"], "async");
    for field in [
        "sent_lag_bytes",
        "write_lag_bytes",
        "flush_lag_bytes",
        "replay_lag_bytes",
    ] {
        assert!(s[field].is_i64(), "{field}: {s}");
    }
    let slots = p["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 1, "{p}");
    assert_eq!(slots[0]["slot_name"], "replica");
    assert_eq!(slots[0]["slot_type"], "physical");
    assert_eq!(slots[0]["active"], true);
    assert!(slots[0]["retained_bytes"].is_i64(), "{p}");
    assert_eq!(slots[0]["wal_status"], "reserved");

    let table = pgentry_output(&primary_env, &["status"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("primary, timeline 1, WAL at "), "{table}");
    assert!(table.contains("\nreplica  "), "{table}");
    assert!(table.contains("SLOT"), "{table}");

    let r = json(&replica_env);
    assert_eq!(r["role"], "replica");
    assert_eq!(r["timeline"], 1);
    let info = &r["replica"];
    assert!(info["receive_lsn"].as_str().unwrap().contains('/'), "{r}");
    assert!(info["replay_lsn"].as_str().unwrap().contains('/'), "{r}");
    assert!(info["lag_bytes"].is_i64(), "{r}");
    assert_eq!(info["replay_paused"], false);
    assert_eq!(info["receiver_status"], "streaming");
    assert_eq!(info["upstream_host"], "127.0.0.1");
    assert_eq!(info["upstream_port"], primary.endpoint.port);
    assert_eq!(r["standbys"], serde_json::json!([]));

    let table = pgentry_output(&replica_env, &["status"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains(&format!(
            "upstream       127.0.0.1:{} (WAL receiver: streaming)",
            primary.endpoint.port
        )),
        "{table}"
    );

    // Unreachable: a non-zero exit and one line saying so.
    primary.stop();
    replica.stop();
    let out = pgentry_output(&primary_env, &["status", "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach the server"), "{stderr}");
}
