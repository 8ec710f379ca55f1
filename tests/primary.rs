//! The primary role end to end: pgentry primary, pgentry replica, real PostgreSQL 15.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);

fn ready(env: &std::collections::BTreeMap<String, String>) -> Endpoint {
    let ep = endpoint_of(env);
    ep.wait_ready(LONG);
    // Ready means the real server, not the temporary one (which has no TCP listener).
    wait_until(LONG, "the real server", || {
        ep.try_psql("SHOW listen_addresses").as_deref() == Ok("127.0.0.1")
    });
    ep
}

#[test]
fn new_primary_serves_a_replica_and_restarts_without_setup() {
    let dir = TempDir::new("primary-new");
    let mut env = primary_env(&dir, "primary", "super pw", "repl pw");
    env.insert("PGENTRY_SLOTS".into(), "spare_1,spare_2".into());
    env.insert("POSTGRES_DB".into(), "app".into());
    env.insert("PGENTRY_MONITORING_FUNCTION".into(), "true".into());
    let mut primary = start_primary(&env, "primary");
    let ep = ready(&env);
    assert!(primary.log().contains("running initdb"));
    assert_eq!(ep.psql("SHOW data_checksums"), "on");
    assert_eq!(ep.psql("SHOW wal_log_hints"), "on");
    assert_eq!(ep.psql("SHOW max_slot_wal_keep_size"), "10GB");
    assert_eq!(
        ep.psql("SELECT datname FROM pg_database WHERE datname = 'app'"),
        "app"
    );
    assert_eq!(
        ep.psql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots"),
        "spare_1,spare_2"
    );
    ep.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1);");

    let secret = dir.join("primary-replication-pw");
    let renv = replica_env(&dir, "replica", ep.port, &secret);
    let rep = endpoint_of(&renv);
    let mut replica = Proc::spawn(&mut pgentry(&renv, &["run"]), "replica");
    rep.wait_streaming(LONG);
    ep.psql("INSERT INTO t VALUES (2);");
    wait_until(LONG, "rows to flow", || {
        rep.try_psql("SELECT count(*) FROM t").as_deref() == Ok("2")
    });
    // The seed's monitoring function, now created by pgentry.
    assert_eq!(
        ep.psql("SELECT application_name, state FROM pg_replication_status()"),
        "replica|streaming"
    );

    // Restart with nothing changed: no initdb, no temporary server.
    primary.stop();
    let mut primary = start_primary(&env, "primary-restart");
    let ep = ready(&env);
    let log = primary.log();
    assert!(!log.contains("running initdb"), "{log}");
    assert!(log.contains("no setup server needed"), "{log}");
    assert!(!log.contains("temporary server"), "{log}");
    assert_eq!(
        ep.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'spare_%'"),
        "2"
    );
    rep.wait_streaming(LONG);
    replica.stop();
    primary.stop();
}

#[test]
fn replication_password_rotation_end_to_end() {
    let dir = TempDir::new("primary-rotate");
    let env = primary_env(&dir, "primary", "super", "first:pw");
    let mut primary = start_primary(&env, "primary");
    let ep = ready(&env);
    let secret = dir.join("primary-replication-pw");
    let renv = replica_env(&dir, "replica", ep.port, &secret);
    let rep = endpoint_of(&renv);
    let mut replica = Proc::spawn(&mut pgentry(&renv, &["run"]), "replica");
    rep.wait_streaming(LONG);

    // Rotate: change the secret, restart the primary, then the replica.
    replica.stop();
    primary.stop();
    dir.secret("primary-replication-pw", "second\\'pw é");
    let mut primary = start_primary(&env, "primary-rotated");
    ready(&env);
    assert!(
        primary.log().contains("updated replication role"),
        "{}",
        primary.log()
    );
    let mut replica = Proc::spawn(&mut pgentry(&renv, &["run"]), "replica-rotated");
    rep.wait_streaming(LONG);
    replica.stop();
    primary.stop();
}

#[test]
fn missing_superuser_password_is_refused_before_anything_is_written() {
    let dir = TempDir::new("primary-nopw");
    let mut env = primary_env(&dir, "primary", "x", "y");
    env.remove("POSTGRES_PASSWORD_FILE");
    let out = pgentry_output(&env, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a superuser password"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let pgdata = PathBuf::from(&env["PGDATA"]);
    assert_eq!(
        std::fs::read_dir(&pgdata).map(|d| d.count()).unwrap_or(0),
        0
    );
}

#[test]
fn plain_initdb_pgdata_is_adopted_with_its_data() {
    let mut plain = PlainPrimary::new("primary-adopt", "unused");
    plain
        .endpoint
        .psql("CREATE TABLE keep (v text); INSERT INTO keep VALUES ('mine');");
    plain.stop();
    let mut env = primary_env(&plain.dir, "unused", "super", "repl");
    env.insert("PGDATA".into(), plain.pgdata.to_string_lossy().into());
    let mut primary = start_primary(&env, "adopt");
    let ep = ready(&env);
    assert!(!primary.log().contains("running initdb"));
    assert!(
        primary.log().contains("added a replication entry"),
        "{}",
        primary.log()
    );
    assert_eq!(ep.psql("SELECT v FROM keep"), "mine");
    let secret = plain.dir.join("unused-replication-pw");
    let renv = replica_env(&plain.dir, "replica", ep.port, &secret);
    let mut replica = Proc::spawn(&mut pgentry(&renv, &["run"]), "adopt-replica");
    endpoint_of(&renv).wait_streaming(LONG);
    assert_eq!(endpoint_of(&renv).psql("SELECT v FROM keep"), "mine");
    replica.stop();
    primary.stop();
}

#[test]
fn init_scripts_run_once_and_a_failing_one_is_never_half_applied() {
    let dir = TempDir::new("primary-scripts");
    let env = primary_env(&dir, "primary", "super", "repl");
    let scripts = PathBuf::from(&env["PGENTRY_INITDB_DIR"]);
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(
        scripts.join("01-good.sql"),
        "CREATE TABLE runs (n int);\nINSERT INTO runs VALUES (1);\nCREATE DATABASE other;\n",
    )
    .unwrap();
    std::fs::write(
        scripts.join("02-bad.sql"),
        "INSERT INTO runs VALUES (2);\nSELEC broken;\n",
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"INSERT INTO runs VALUES (3);").unwrap();
    std::fs::write(scripts.join("03-zipped.sql.gz"), gz.finish().unwrap()).unwrap();
    // A real pg_dump in its plain form: COPY ... FROM stdin with awkward data, and the
    // \restrict meta-commands of current pg_dump versions.
    let mut source = PlainPrimary::new("primary-scripts-source", "unused");
    source.endpoint.psql(
        "CREATE TABLE dumped (id int, note text); \
         INSERT INTO dumped VALUES (1, E'tab\\there;semi'), (2, NULL), (3, E'back\\\\slash é'), (4, E'new\\nline'), (5, '\\.');",
    );
    let fingerprint =
        "SELECT md5(string_agg(id || ':' || coalesce(note, 'NULL'), ',' ORDER BY id)) FROM dumped";
    let expected = source.endpoint.psql(fingerprint);
    let dump = scripts.join("04-dump.sql");
    source.endpoint.run_client(
        "pg_dump",
        &[
            "--no-owner",
            "-t",
            "dumped",
            "-d",
            "postgres",
            "-f",
            &dump.to_string_lossy(),
        ],
    );
    source.stop();

    let out = pgentry_output(&env, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("02-bad.sql failed") && last.contains("syntax error"),
        "{err}"
    );
    let pgdata = PathBuf::from(&env["PGDATA"]);
    assert!(
        !pgdata.join("PG_VERSION").exists(),
        "a failed initialisation must not be in PGDATA"
    );

    std::fs::write(scripts.join("02-bad.sql"), "INSERT INTO runs VALUES (2);\n").unwrap();
    let mut primary = start_primary(&env, "scripts");
    let ep = ready(&env);
    assert!(primary
        .log()
        .contains("discarding an interrupted initialisation"));
    assert_eq!(
        ep.psql("SELECT string_agg(n::text, ',' ORDER BY n) FROM runs"),
        "1,2,3"
    );
    assert_eq!(
        ep.psql("SELECT count(*) FROM pg_database WHERE datname = 'other'"),
        "1"
    );
    assert_eq!(ep.psql(fingerprint), expected);
    primary.stop();
    let mut primary = start_primary(&env, "scripts-restart");
    let ep = ready(&env);
    assert!(!primary.log().contains("01-good.sql"));
    assert_eq!(ep.psql("SELECT count(*) FROM runs"), "3");
    primary.stop();
}

#[test]
fn replication_password_reaches_no_log_command_line_or_readable_file() {
    let pw = "Zq'9\\x\" y:$é-unique-marker";
    let dir = TempDir::new("primary-secret");
    let env = primary_env(&dir, "primary", "super-secret-pw", pw);
    let mut args = vec![
        "run",
        "--",
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "log_statement=all",
        "-c",
        "log_min_messages=debug1",
    ];
    args.extend(["-c", "log_connections=on"]);
    let mut primary = Proc::spawn(&mut pgentry(&env, &args), "secret-primary");
    let mut seen_cmdlines = Vec::new();
    let start = Instant::now();
    while endpoint_of(&env).try_psql("SHOW log_statement").as_deref() != Ok("all") {
        seen_cmdlines.extend(all_cmdlines());
        assert!(start.elapsed() < LONG);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Rotate once so the reconcile runs on an existing cluster too.
    primary.stop();
    dir.secret("primary-replication-pw", &format!("{pw}2"));
    let mut primary = Proc::spawn(&mut pgentry(&env, &args), "secret-primary-2");
    let ep = endpoint_of(&env);
    wait_until(LONG, "restart", || {
        ep.try_psql("SHOW log_statement").as_deref() == Ok("all")
    });
    let renv = replica_env(
        &dir,
        "replica",
        ep.port,
        &dir.join("primary-replication-pw"),
    );
    let mut replica = Proc::spawn(&mut pgentry(&renv, &["run"]), "secret-replica");
    endpoint_of(&renv).wait_streaming(LONG);
    seen_cmdlines.extend(all_cmdlines());
    replica.stop();
    primary.stop();
    for c in &seen_cmdlines {
        assert!(!c.contains(pw), "password on a command line: {c}");
    }
    for log in [primary.log(), replica.log()] {
        assert!(
            !log.contains(pw) && !log.contains("unique-marker"),
            "password in a log"
        );
    }
    // No file but the 0600 secrets and passfile holds it, and none of those is world-readable.
    use std::os::unix::fs::MetadataExt;
    for hit in files_containing(&dir.0, "unique-marker") {
        let mode = std::fs::metadata(&hit).unwrap().mode();
        assert_eq!(mode & 0o077, 0, "{} is readable by others", hit.display());
        let name = hit.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name == "primary-replication-pw" || name == "pgentry.pgpass",
            "password in {}",
            hit.display()
        );
    }
}

#[test]
fn sigterm_during_setup_stops_cleanly_and_the_next_start_succeeds() {
    let dir = TempDir::new("primary-sigterm");
    let env = primary_env(&dir, "primary", "super", "repl");
    let scripts = PathBuf::from(&env["PGENTRY_INITDB_DIR"]);
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("01-slow.sql"), "SELECT pg_sleep(60);").unwrap();
    let mut primary = start_primary(&env, "sigterm");
    wait_until(LONG, "the slow script", || {
        primary.log().contains("01-slow.sql")
    });
    let start = Instant::now();
    primary.signal(Signal::SIGTERM);
    let status = primary
        .wait_timeout(Duration::from_secs(30))
        .expect("stops");
    eprintln!("stopped {:?} after SIGTERM", start.elapsed());
    assert!(!status.success());
    assert!(primary.log().contains("stopped by SIGTERM"));
    assert!(primary.log().contains("temporary server stopped"));
    assert!(
        !all_cmdlines().iter().any(|c| c.contains(&env["PGDATA"])),
        "a process outlived pgentry"
    );
    std::fs::remove_file(scripts.join("01-slow.sql")).unwrap();
    let mut primary = start_primary(&env, "sigterm-restart");
    ready(&env);
    primary.stop();
}
