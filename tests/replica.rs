//! The replica role end to end: real PostgreSQL 15 primary, real pgentry replica.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);

fn start_replica(env: &std::collections::BTreeMap<String, String>, tag: &str) -> Proc {
    Proc::spawn(&mut pgentry(env, &["run"]), tag)
}

#[test]
fn clone_streams_restarts_without_recloning_and_serves_reads_without_primary() {
    let pw = "plain-password";
    let mut primary = PlainPrimary::new("basic", pw);
    primary
        .endpoint
        .psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100);");
    let secret = primary.dir.secret("repl_pw", &format!("{pw}\n"));
    let env = replica_env(&primary.dir, "replica", primary.endpoint.port, &secret);
    let replica_ep = endpoint_of(&env);

    let mut replica = start_replica(&env, "replica");
    replica_ep.wait_streaming(LONG);
    assert_eq!(replica_ep.psql("SELECT count(*) FROM t"), "100");
    primary.endpoint.psql("INSERT INTO t VALUES (101);");
    wait_until(LONG, "row to replicate", || {
        replica_ep.try_psql("SELECT count(*) FROM t").as_deref() == Ok("101")
    });
    assert!(replica.log().contains("cloning"));
    // pgentry exec'd postgres: same pid, now the postmaster.
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", replica.pid())).unwrap();
    assert!(cmdline.starts_with("postgres\0-D\0"), "{cmdline:?}");
    // The slot is named after the replica and in use.
    assert_eq!(
        primary
            .endpoint
            .psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'replica'"),
        "t"
    );
    replica.stop();

    // Restart: no second clone.
    let mut replica = start_replica(&env, "replica-restart");
    replica_ep.wait_streaming(LONG);
    let log = replica.log();
    assert!(!log.contains("cloning"), "cloned again:\n{log}");
    assert!(
        log.contains("PGDATA holds a standby of this primary"),
        "{log}"
    );
    replica.stop();

    // Primary down: the standby still starts and serves reads.
    primary.stop();
    let mut replica = start_replica(&env, "replica-no-primary");
    wait_until(LONG, "standby to serve reads", || {
        replica_ep.try_psql("SELECT count(*) FROM t").as_deref() == Ok("101")
    });
    assert!(replica.log().contains("does not answer"));
    replica.stop();
}

#[test]
fn password_with_every_awkward_character_works_and_stays_secret() {
    let pw = "a'b\\c\"d e:f$g é";
    let mut primary = PlainPrimary::new("secret", pw);
    primary
        .endpoint
        .psql("CREATE TABLE t AS SELECT generate_series(1, 200000) AS id;");
    let secret = primary.dir.secret("repl_pw", pw);
    let env = replica_env(&primary.dir, "replica", primary.endpoint.port, &secret);
    let replica_ep = endpoint_of(&env);
    let mut replica = start_replica(&env, "secret-replica");
    // During the clone: no command line carries the password.
    let start = Instant::now();
    while !replica_ep.is_streaming() {
        for c in all_cmdlines() {
            assert!(!c.contains(pw), "password on a command line: {c}");
        }
        assert!(start.elapsed() < LONG, "no streaming");
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in all_cmdlines() {
        assert!(!c.contains(pw), "password on a command line: {c}");
    }
    assert_eq!(replica_ep.psql("SELECT count(*) FROM t"), "200000");
    // The only file holding the password (escaped, as .pgpass wants) is the 0600 passfile.
    let pgdata = std::path::PathBuf::from(&env["PGDATA"]);
    let escaped = "a'b\\\\c\"d e\\:f$g é";
    let hits = files_containing(&pgdata, escaped);
    assert_eq!(hits, [pgdata.join("pgentry.pgpass")]);
    assert!(files_containing(&pgdata, pw).is_empty());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(pgdata.join("pgentry.pgpass"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    // Not in the postmaster's environment, not in any log line.
    let environ = std::fs::read(format!("/proc/{}/environ", replica.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(pw));
    replica.stop();
    assert!(!replica.log().contains(pw));
    primary.stop();
    assert!(!primary
        .proc
        .as_ref()
        .map(|p| p.log())
        .unwrap_or_default()
        .contains(pw));
}

#[test]
fn rotated_password_and_new_slot_name_take_effect_on_restart() {
    let mut primary = PlainPrimary::new("rotate", "old-pw");
    let secret = primary.dir.secret("repl_pw", "old-pw");
    let env = replica_env(&primary.dir, "replica", primary.endpoint.port, &secret);
    let replica_ep = endpoint_of(&env);
    let mut replica = start_replica(&env, "rotate-1");
    replica_ep.wait_streaming(LONG);
    replica.stop();
    primary
        .endpoint
        .psql("ALTER ROLE replicator PASSWORD 'new:pw';");
    primary.dir.secret("repl_pw", "new:pw");
    // A recreated container has a new host name, and so a new default slot.
    let mut env = env.clone();
    env.insert("PGENTRY_SLOT".into(), "renamed".into());
    let mut replica = start_replica(&env, "rotate-2");
    replica_ep.wait_streaming(LONG);
    assert!(replica
        .log()
        .contains("updated the standby's connection settings"));
    assert_eq!(
        primary
            .endpoint
            .psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'renamed'"),
        "t"
    );
    replica.stop();
    primary.stop();
}

#[test]
fn kill_9_of_pgentry_or_pg_basebackup_mid_clone_is_repaired_by_the_next_start() {
    let mut primary = PlainPrimary::new("kill", "pw");
    primary
        .endpoint
        .run_client("pgbench", &["-i", "-q", "-s", "30", "postgres"]);
    let secret = primary.dir.secret("repl_pw", "pw");
    let env = replica_env(&primary.dir, "replica", primary.endpoint.port, &secret);
    let pgdata = std::path::PathBuf::from(&env["PGDATA"]);
    let staging_base = pgdata.join(".pgentry-staging/data/base");
    let replica_ep = endpoint_of(&env);

    // 0. SIGTERM mid-clone: pgentry ends promptly and takes pg_basebackup with it.
    let mut replica = start_replica(&env, "sigterm-clone");
    wait_until(LONG, "clone to begin", || staging_base.exists());
    let start = Instant::now();
    replica.signal(Signal::SIGTERM);
    let status = replica
        .wait_timeout(Duration::from_secs(10))
        .expect("pgentry ends on SIGTERM");
    eprintln!("SIGTERM ended the clone after {:?}", start.elapsed());
    assert_eq!(status.code(), Some(143));
    assert!(replica.log().contains("stopped by SIGTERM"));
    let basebackups = || {
        all_cmdlines()
            .iter()
            .filter(|c| c.contains("pg_basebackup") && c.contains(&*pgdata.to_string_lossy()))
            .count()
    };
    wait_until(Duration::from_secs(10), "pg_basebackup to stop", || {
        basebackups() == 0
    });

    // 1. kill -9 of pgentry itself mid-clone.
    let mut replica = start_replica(&env, "kill-pgentry");
    wait_until(LONG, "clone to begin", || staging_base.exists());
    std::thread::sleep(Duration::from_millis(300));
    replica.signal(Signal::SIGKILL);
    replica
        .wait_timeout(Duration::from_secs(10))
        .expect("pgentry killed");

    // 2. kill -9 of pg_basebackup mid-clone: pgentry fails clearly.
    let mut replica = start_replica(&env, "kill-basebackup");
    wait_until(LONG, "the interrupted clone to be discarded", || {
        replica.log().contains("discarding an interrupted clone")
    });
    // No pg_basebackup of the killed pgentry survives the repair.
    wait_until(LONG, "a single clone to run", || basebackups() <= 2);
    wait_until(LONG, "clone to begin", || staging_base.exists());
    std::thread::sleep(Duration::from_millis(300));
    let basebackup = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c).starts_with(&format!("{PG_BIN}/pg_basebackup"))
                        && String::from_utf8_lossy(&c).contains(&*pgdata.to_string_lossy())
                })
                .unwrap_or(false)
        })
        .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok());
    if let Some(pid) = basebackup {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        let status = replica
            .wait_timeout(LONG)
            .expect("pgentry exits after pg_basebackup dies");
        assert!(!status.success());
        assert!(
            replica.log().contains("pg_basebackup failed"),
            "{}",
            replica.log()
        );
    } else {
        // The clone finished before we could find it; stop the replica instead.
        replica.stop();
    }

    // 3. The next start repairs whatever was left, without a manual step.
    let mut replica = start_replica(&env, "kill-recover");
    replica_ep.wait_streaming(LONG);
    assert_eq!(
        replica_ep.psql("SELECT count(*) FROM pgbench_accounts"),
        primary
            .endpoint
            .psql("SELECT count(*) FROM pgbench_accounts")
    );
    assert!(!pgdata.join(".pgentry-staging").exists());
    replica.stop();
    primary.stop();
}

#[test]
fn wrong_password_fails_fast_with_the_servers_message() {
    let mut primary = PlainPrimary::new("wrongpw", "right");
    let secret = primary.dir.secret("repl_pw", "wrong");
    let env = replica_env(&primary.dir, "replica", primary.endpoint.port, &secret);
    let mut replica = start_replica(&env, "wrongpw");
    let status = replica
        .wait_timeout(Duration::from_secs(30))
        .expect("fails fast");
    assert!(!status.success());
    let log = replica.log();
    assert!(log.contains("password authentication failed"), "{log}");
    assert!(log.contains("check PGENTRY_REPLICATION_USER"), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "{log}"
    );
    primary.stop();
}

#[test]
fn unreachable_primary_gives_up_after_the_wait_timeout() {
    let dir = TempDir::new("unreachable");
    let secret = dir.secret("repl_pw", "pw");
    let mut env = replica_env(&dir, "replica", free_port(), &secret);
    env.insert("PGENTRY_WAIT_TIMEOUT".into(), "3".into());
    let start = Instant::now();
    let mut replica = start_replica(&env, "unreachable");
    let status = replica
        .wait_timeout(Duration::from_secs(60))
        .expect("gives up");
    eprintln!("gave up after {:?}", start.elapsed());
    assert!(!status.success());
    let log = replica.log();
    assert!(log.contains("did not answer within 3 s"), "{log}");
    // One line per change of state, not per attempt.
    assert_eq!(log.matches("waiting for primary").count(), 1, "{log}");
}

#[test]
fn sigterm_during_the_wait_ends_pgentry_promptly() {
    let dir = TempDir::new("sigterm");
    let secret = dir.secret("repl_pw", "pw");
    let env = replica_env(&dir, "replica", free_port(), &secret);
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut replica = start_replica(&env, "sigterm");
        wait_until(Duration::from_secs(30), "the wait", || {
            replica.log().contains("waiting for primary")
        });
        let start = Instant::now();
        replica.signal(sig);
        let status = replica.wait_timeout(Duration::from_secs(10)).expect("ends");
        eprintln!("{sig} ended pgentry after {:?}", start.elapsed());
        assert!(!status.success());
        assert!(
            replica.log().contains(&format!("stopped by {sig}")),
            "{}",
            replica.log()
        );
    }
}

#[test]
fn foreign_or_former_primary_pgdata_is_refused_untouched() {
    let mut primary = PlainPrimary::new("refuse", "pw");
    let secret = primary.dir.secret("repl_pw", "pw");

    // Foreign files.
    let env = replica_env(&primary.dir, "foreign", primary.endpoint.port, &secret);
    let foreign = std::path::PathBuf::from(&env["PGDATA"]);
    std::fs::create_dir_all(foreign.join("sub")).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    std::fs::write(foreign.join("sub/data.bin"), [1, 2, 3]).unwrap();
    let before = tree_digest(&foreign);
    let out = pgentry_output(&env, &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a PostgreSQL cluster (notes.txt, sub)"),
        "{err}"
    );
    assert_eq!(tree_digest(&foreign), before);

    // A former primary: a copy of a stopped primary's PGDATA without standby.signal.
    primary.stop();
    let env = replica_env(&primary.dir, "former", primary.endpoint.port, &secret);
    let former = std::path::PathBuf::from(&env["PGDATA"]);
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&primary.pgdata)
        .arg(&former)
        .output()
        .unwrap();
    assert!(out.status.success());
    let before = tree_digest(&former);
    primary.start();
    let out = pgentry_output(&env, &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a standby"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(tree_digest(&former), before);

    // A standby of another system: the former primary's copy made a standby, pointed
    // at a freshly initialised primary.
    std::fs::write(former.join("standby.signal"), "").unwrap();
    let other = PlainPrimary::new("refuse-other", "pw");
    let env = replica_env(&primary.dir, "former", other.endpoint.port, &secret);
    let before = tree_digest(&former);
    let out = pgentry_output(&env, &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a standby of database system"), "{err}");
    assert_eq!(tree_digest(&former), before);
    primary.stop();
}

#[test]
fn configuration_errors_are_one_clear_line() {
    let dir = TempDir::new("config");
    let secret = dir.secret("repl_pw", "pw");
    let base = replica_env(&dir, "replica", free_port(), &secret);
    let bad_toml = dir.join("bad.toml");
    std::fs::write(&bad_toml, "primary_host = \"db\"\nport = = 1\n").unwrap();
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "primary_host = \"db\"\n  primray_port = 5432\n").unwrap();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("PGENTRY_CONFIG", bad_toml.to_string_lossy().into())],
            "invalid TOML at line 2",
        ),
        (
            vec![("PGENTRY_CONFIG", unknown.to_string_lossy().into())],
            "unknown key \"primray_port\" at line 2, column 3",
        ),
        (
            vec![("PGENTRY_REPLICATION_PASSWORD", "x".into())],
            "both PGENTRY_REPLICATION_PASSWORD and PGENTRY_REPLICATION_PASSWORD_FILE are set",
        ),
        (
            vec![(
                "PGENTRY_REPLICATION_PASSWORD_FILE",
                "/nonexistent/secret".into(),
            )],
            "cannot read PGENTRY_REPLICATION_PASSWORD_FILE=/nonexistent/secret",
        ),
        (
            vec![("PGENTRY_CONFIG", "/nonexistent.toml".into())],
            "cannot read config file /nonexistent.toml",
        ),
        (
            vec![("PGPORT", "99999".into())],
            "PGPORT=\"99999\": not a port number",
        ),
    ];
    for (overrides, expected) in cases {
        let mut env = base.clone();
        for (k, v) in overrides {
            env.insert(k.into(), v);
        }
        for cmd in ["run", "check-config"] {
            let out = pgentry_output(&env, &[cmd]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {expected}: {err}");
            assert!(
                err.contains(expected),
                "{cmd}: expected {expected:?} in {err}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(!err.contains("panicked") && !err.contains("backtrace"));
        }
    }
    // The JSON log format carries the same one line, as an object.
    let mut env = base.clone();
    env.insert("PGENTRY_LOG_FORMAT".into(), "json".into());
    env.insert("PGPORT".into(), "0".into());
    let out = pgentry_output(&env, &["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("{\"ts\":\"")
            && err.contains("\"level\":\"error\"")
            && err.trim_end().ends_with('}'),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&base["PGDATA"]).exists(),
        "a config error must not create PGDATA"
    );
}

#[test]
fn another_user_than_root_or_postgres_is_refused() {
    if postgres_ids().is_none() {
        eprintln!("SKIPPED: needs root to start pgentry as another user");
        return;
    }
    let dir = TempDir::new("other-user");
    let mut env = replica_env(
        &dir,
        "replica",
        free_port(),
        std::path::Path::new("/unused"),
    );
    env.remove("PGENTRY_REPLICATION_PASSWORD_FILE");
    env.insert("PGENTRY_REPLICATION_PASSWORD".into(), "pw".into());
    let out = std::os::unix::process::CommandExt::uid(&mut pgentry(&env, &["run"]), 65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not as uid 65534"), "{err}");
    assert!(!std::path::Path::new(&env["PGDATA"]).exists());
}
