//! End to end on a real Docker engine: the image of docker/Dockerfile, built offline on
//! the PostgreSQL 15 base image of docker/build-base-image.sh from the static pgentry
//! binary; the stack of compose/docker-compose.yml driven by docker-compose; and the
//! same file deployed to a single-node Docker Swarm by compose/stack-deploy.sh.
//!
//! The tests skip, saying so loudly, only when no Docker daemon answers. They run one
//! at a time (the machine has two cores). Every compose project, swarm stack, volume
//! and secret they create carries a unique name and is removed when the test ends,
//! failed or not; a failing test first prints the containers' logs. The images stay,
//! cached by tag. Traffic flows only on Docker networks made here (internal bridges, an
//! internal overlay network): nothing is published, nothing leaves the machine.
//!
//! No assertion is about time: waits have generous limits and only fail when the
//! awaited state never comes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

const BASE_IMAGE: &str = "pgentry-base:pg15-bookworm";
const ALPINE_IMAGE: &str = "pgentry-e2e-alpine:3.20.3";
const TARGET: &str = "target/x86_64-unknown-linux-gnu";

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------
// Running commands with a limit, and waiting for states.

/// Runs `cmd` to completion, killing it (and failing) past `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

fn docker_with(args: &[&str], limit: Duration) -> Output {
    run(Command::new("docker").args(args), limit)
}

fn docker(args: &[&str]) -> Output {
    docker_with(args, SHORT)
}

/// stdout of a docker command that must succeed.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Polls `check` until it returns Ok, failing with its last error past `limit`.
fn wait_until<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => {
                eprintln!(
                    "docker_e2e: {what}: after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return v;
            }
            Err(e) if started.elapsed() > limit => {
                panic!("{what}: not reached within {limit:?}; last: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

// ---------------------------------------------------------------------------------
// Setup, once per test binary: the daemon, the base image, the project's image.

struct Env {
    image: String,
    cpus: u32,
}

static SERIAL: Mutex<()> = Mutex::new(());
static ENV: OnceLock<Option<Env>> = OnceLock::new();

/// The engine and the image, or None (after a loud message) when no daemon answers.
/// Holds the lock that runs the tests one at a time.
fn setup() -> Option<(MutexGuard<'static, ()>, &'static Env)> {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let env = ENV.get_or_init(|| {
        let answers = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !answers {
            loud(
                "SKIPPED: docker_e2e needs a Docker daemon and none answers (`docker version` \
                 failed): nothing in docker/ or compose/ was tested",
            );
            return None;
        }
        Some(build_images())
    });
    env.as_ref().map(|env| (guard, env))
}

/// A message the test harness does not capture: straight to the stderr descriptor,
/// where `cargo test` shows it even for a passing test.
fn loud(message: &str) {
    use std::io::Write;
    let bar = "#".repeat(78);
    let _ = writeln!(std::io::stderr(), "\n{bar}\n## {message}\n{bar}\n");
}

fn build_images() -> Env {
    let out = run(
        Command::new(repo().join("docker/build-base-image.sh")).arg(BASE_IMAGE),
        LONG,
    );
    eprintln!("{}", text(&out.stderr));
    assert!(out.status.success(), "docker/build-base-image.sh failed");

    let binary = pgentry_binary();
    let sha = text(&run(Command::new("sha256sum").arg(&binary), SHORT).stdout);
    let image = format!("pgentry-e2e:{}", &sha[..16]);
    if !docker(&["image", "inspect", &image]).status.success() {
        build_image(&image, BASE_IMAGE, &binary);
        // Images of earlier binaries go, but for the newest few (another test run may be
        // using them): one per run would pile up on a kept machine. Newest first.
        let tags = docker_ok(&[
            "images",
            "pgentry-e2e",
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ]);
        for old in tags.lines().filter(|t| *t != image).skip(2) {
            docker(&["image", "rm", old]);
        }
    }
    let cpus: u32 = docker_ok(&["info", "--format", "{{.NCPU}}"])
        .parse()
        .unwrap();
    eprintln!("docker_e2e: image {image} from {}", binary.display());
    Env { image, cpus }
}

/// The static binary to put in the image: the release binary (what ships) unless it is
/// older than the sources, then the test build of the same sources (also static).
fn pgentry_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PGENTRY_E2E_BINARY") {
        return PathBuf::from(path);
    }
    let release = repo().join(TARGET).join("release/pgentry");
    let newest_source = ["src", "Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|p| newest_mtime(&repo().join(p)))
        .max()
        .unwrap();
    match std::fs::metadata(&release).and_then(|m| m.modified()) {
        Ok(built) if built >= newest_source => release,
        _ => {
            eprintln!("docker_e2e: the release binary is missing or older than the sources; using the test build");
            PathBuf::from(env!("CARGO_BIN_EXE_pgentry"))
        }
    }
}

fn newest_mtime(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap();
    let mut newest = meta.modified().unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            newest = newest.max(newest_mtime(&entry.unwrap().path()));
        }
    }
    newest
}

/// docker/Dockerfile's offline path: a build context holding only the binary.
fn build_image(tag: &str, base: &str, binary: &Path) {
    let context = TempDir::new("context");
    std::fs::copy(binary, context.0.join("pgentry")).unwrap();
    let dockerfile = repo().join("docker/Dockerfile");
    let out = docker_with(
        &[
            "build",
            "--quiet",
            "--file",
            dockerfile.to_str().unwrap(),
            "--build-arg",
            &format!("BASE={base}"),
            "--build-arg",
            &format!("RUST_IMAGE={BASE_IMAGE}"),
            "--build-arg",
            "PREBUILT=pgentry",
            "--tag",
            tag,
            context.0.to_str().unwrap(),
        ],
        LONG,
    );
    assert!(
        out.status.success(),
        "docker build of {tag} failed: {}",
        text(&out.stderr)
    );
    // The classic builder leaves the binary stage's image untagged; only ours carry
    // this label. Those of the last hour stay: a concurrent build may still need its own.
    docker(&[
        "image",
        "prune",
        "--force",
        "--filter",
        "label=pgentry.stage=binary",
        "--filter",
        "until=1h",
    ]);
}

/// A directory removed at drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "pgentry-e2e-{name}-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------
// A compose project on compose/docker-compose.yml, removed with its volumes at drop.

struct Stack {
    project: String,
    files: Vec<PathBuf>,
    secrets: TempDir,
    image: String,
    cpus: u32,
    env: Vec<(&'static str, &'static str)>,
}

impl Stack {
    /// A project with fresh secrets made by compose/make-secrets.sh.
    fn new(env: &Env, name: &str, overrides: &[&str]) -> Stack {
        let stack = Stack::without_secrets(env, name, overrides);
        let out = run(
            Command::new(repo().join("compose/make-secrets.sh"))
                .env("PGENTRY_SECRETS_DIR", &stack.secrets.0),
            SHORT,
        );
        assert!(
            out.status.success(),
            "make-secrets.sh failed: {}",
            text(&out.stderr)
        );
        stack
    }

    fn without_secrets(env: &Env, name: &str, overrides: &[&str]) -> Stack {
        let project = format!("pgentry-e2e-{name}-{}", std::process::id());
        let mut files = vec![repo().join("compose/docker-compose.yml")];
        files.extend(overrides.iter().map(|f| repo().join("compose").join(f)));
        let secrets = TempDir::new(&project);
        std::fs::write(secrets.0.join("empty.env"), "").unwrap();
        Stack {
            secrets,
            project,
            files,
            image: env.image.clone(),
            cpus: env.cpus,
            env: Vec::new(),
        }
    }

    fn compose_command(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        // Only what this test sets reaches the file's ${...}.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("PGENTRY_") || k.starts_with("POSTGRES_") || k.starts_with("COMPOSE_")
            {
                cmd.env_remove(&key);
            }
        }
        cmd.env("PGENTRY_IMAGE", &self.image)
            .env("PGENTRY_SECRETS_DIR", &self.secrets.0)
            .env("PGENTRY_PRIMARY_CPUS", self.cpus.min(4).to_string())
            .env("PGENTRY_REPLICA_CPUS", self.cpus.min(2).to_string())
            .envs(self.env.iter().copied())
            .args(["--ansi", "never"])
            // Not compose/.env, which a developer may have written for their own stack.
            .arg("--env-file")
            .arg(self.secrets.0.join("empty.env"))
            .arg("--project-name")
            .arg(&self.project);
        for f in &self.files {
            cmd.arg("--file").arg(f);
        }
        cmd
    }

    fn compose(&self, args: &[&str], limit: Duration) -> Output {
        run(self.compose_command().args(args), limit)
    }

    fn compose_ok(&self, args: &[&str], limit: Duration) {
        let out = self.compose(args, limit);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {}",
            text(&out.stderr)
        );
    }

    fn up(&self, extra: &[&str]) {
        let mut args = vec!["up", "--detach", "--no-build"];
        args.extend(extra);
        self.compose_ok(&args, LONG);
    }

    /// The containers of `service`, by container number.
    fn containers(&self, service: &str) -> Vec<String> {
        let ids = docker_ok(&[
            "ps",
            "--all",
            "--quiet",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let mut numbered: Vec<(u32, String)> = ids
            .lines()
            .map(|id| {
                let n = docker_ok(&[
                    "inspect",
                    "--format",
                    "{{index .Config.Labels \"com.docker.compose.container-number\"}}",
                    id,
                ]);
                (n.parse().unwrap(), id.to_string())
            })
            .collect();
        numbered.sort();
        numbered.into_iter().map(|(_, id)| id).collect()
    }

    fn container(&self, service: &str) -> String {
        let all = self.containers(service);
        assert_eq!(
            all.len(),
            1,
            "expected one {service} container, found {all:?}"
        );
        all.into_iter().next().unwrap()
    }

    fn network(&self) -> String {
        format!("{}_backend", self.project)
    }

    fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.secrets.0.join(name)).unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = self.compose(&["logs", "--no-color", "--tail=200"], SHORT);
            eprintln!(
                "==== logs of {} ====\n{}\n{}",
                self.project,
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        let out = self.compose(
            &["down", "--volumes", "--remove-orphans", "--timeout", "60"],
            LONG,
        );
        if !out.status.success() {
            eprintln!(
                "docker-compose down of {} failed: {}",
                self.project,
                text(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Looking into containers.

/// psql as the postgres user over the container's unix socket.
fn psql(container: &str, sql: &str) -> Result<String, String> {
    let out = docker(&[
        "exec",
        "--user",
        "postgres",
        container,
        "psql",
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "postgres",
        "-c",
        sql,
    ]);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("psql on {container}: {}", text(&out.stderr)))
    }
}

fn psql_ok(container: &str, sql: &str) -> String {
    psql(container, sql).unwrap_or_else(|e| panic!("{e}"))
}

fn health(container: &str) -> String {
    docker_ok(&[
        "inspect",
        "--format",
        "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
        container,
    ])
}

fn wait_health(container: &str, wanted: &str, limit: Duration) {
    wait_until(limit, &format!("{container} {wanted}"), || {
        let state = docker_ok(&["inspect", "--format", "{{.State.Status}}", container]);
        match health(container) {
            h if h == wanted => Ok(()),
            h => Err(format!(
                "state {state}, health {h:?}; last check: {}",
                last_health_output(container)
            )),
        }
    });
}

fn last_health_output(container: &str) -> String {
    docker_ok(&[
        "inspect",
        "--format",
        "{{if .State.Health}}{{range .State.Health.Log}}{{.ExitCode}} {{.Output}}|{{end}}{{end}}",
        container,
    ])
    .rsplit('|')
    .find(|s| !s.trim().is_empty())
    .unwrap_or("")
    .trim()
    .to_string()
}

fn logs(container: &str) -> String {
    let out = docker(&["logs", container]);
    format!("{}\n{}", text(&out.stdout), text(&out.stderr))
}

/// The slot pgentry in `container` uses, as its own `check-config` reports it.
fn slot_in(container: &str) -> String {
    let out = docker_ok(&["exec", container, "pgentry", "check-config"]);
    out.lines()
        .find_map(|l| l.strip_prefix("# slot in use: "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no slot in the check-config of {container}:\n{out}"))
}

// The test table: rows written on the primary, compared by count and checksum.
const CREATE: &str = "CREATE TABLE IF NOT EXISTS e2e (id bigint PRIMARY KEY, note text NOT NULL)";
const CHECKSUM: &str = "SELECT count(*) || ' ' || coalesce(md5(string_agg(id || ':' || note, ',' ORDER BY id)), '-') FROM e2e";

fn insert(primary: &str, from: u64, to: u64) {
    psql_ok(
        primary,
        &format!("{CREATE}; INSERT INTO e2e SELECT i, md5(i::text) || repeat('x', 200) FROM generate_series({from}, {to}) i"),
    );
}

/// Waits until the replica's copy of e2e equals the primary's: same count, same checksum.
fn wait_same_rows(primary: &str, replica: &str, limit: Duration) -> String {
    let expected = psql_ok(primary, CHECKSUM);
    wait_until(
        limit,
        &format!("{replica} has the primary's rows ({expected})"),
        || match psql(replica, CHECKSUM)? {
            got if got == expected => Ok(got),
            got => Err(format!("replica has {got}, primary {expected}")),
        },
    )
}

// ---------------------------------------------------------------------------------
// The tests.

#[test]
fn image_has_the_entrypoint_healthcheck_and_stop_signal() {
    let Some((_serial, env)) = setup() else {
        return;
    };
    let config = docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Config.StopSignal}} {{json .Config.Healthcheck.Test}} {{.Config.User}}|",
        &env.image,
    ]);
    assert_eq!(
        config,
        r#"["pgentry"] ["run"] SIGINT ["CMD","pgentry","healthcheck"] |"#
    );
    let version = docker_ok(&["run", "--rm", "--network", "none", &env.image, "--version"]);
    assert!(version.starts_with("pgentry "), "{version}");
}

/// The final stage on Alpine (musl, no glibc), as postgres:15-alpine is: the root
/// file system of ../shared/fixtures stands in for it (it has no PostgreSQL).
#[test]
fn image_builds_and_runs_on_an_alpine_base() {
    let Some((_serial, _env)) = setup() else {
        return;
    };
    if !docker(&["image", "inspect", ALPINE_IMAGE]).status.success() {
        let fixture = repo().join("../shared/fixtures/alpine-minirootfs-3.20.3-x86_64.tar.gz");
        docker_ok(&["import", fixture.to_str().unwrap(), ALPINE_IMAGE]);
    }
    let tag = format!("pgentry-e2e-on-alpine:{}", std::process::id());
    build_image(&tag, ALPINE_IMAGE, &pgentry_binary());
    let version = docker(&["run", "--rm", "--network", "none", &tag, "--version"]);
    let config = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "PGENTRY_PRIMARY_HOST=db",
        "-e",
        "PGENTRY_SLOT=r1",
        "-e",
        "PGENTRY_REPLICATION_PASSWORD=unused",
        &tag,
        "check-config",
    ]);
    docker(&["image", "rm", &tag]);
    assert!(
        version.status.success() && text(&version.stdout).starts_with("pgentry "),
        "{version:?}"
    );
    assert!(
        text(&config.stdout).contains("# role: replica"),
        "{config:?}"
    );
}

#[test]
fn stack_refuses_to_start_without_its_secrets() {
    let Some((_serial, env)) = setup() else {
        return;
    };
    let stack = Stack::without_secrets(env, "nosecrets", &[]);
    let out = stack.compose(&["up", "--detach", "--no-build"], LONG);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "up without secrets succeeded: {err}");
    assert!(
        err.contains("postgres_password") || err.contains("replication_password"),
        "{err}"
    );
    assert!(stack.containers("primary").iter().all(|c| docker_ok(&[
        "inspect",
        "--format",
        "{{.State.Running}}",
        c
    ]) == "false"));
}

/// up; a row flows; the primary restarts; the replica is cut off for 30 s; down and up
/// again; each service stops cleanly.
#[test]
fn compose_stack_replicates_and_survives_restarts_partitions_and_down_up() {
    let Some((_serial, env)) = setup() else {
        return;
    };
    let stack = Stack::new(env, "life", &[]);

    // up: both healthy, a row written on the primary is read on the replica.
    stack.up(&[]);
    let (primary, replica) = (stack.container("primary"), stack.container("replica"));
    wait_health(&primary, "healthy", LONG);
    wait_health(&replica, "healthy", LONG);
    insert(&primary, 1, 100);
    wait_same_rows(&primary, &replica, SHORT);
    let streaming = psql_ok(
        &primary,
        "SELECT application_name || ' ' || state FROM pg_stat_replication",
    );
    assert_eq!(
        streaming, "replica streaming",
        "the replica's slot is named after its host name"
    );
    for c in [&primary, &replica] {
        let out = docker(&["exec", c, "pgentry", "status"]);
        assert!(
            out.status.success(),
            "pgentry status on {c}: {}",
            text(&out.stderr)
        );
    }
    // The passwords are in no container's configuration and no log.
    for secret in ["postgres_password", "replication_password"] {
        let password = stack.secret(secret);
        for c in [&primary, &replica] {
            assert!(
                !docker_ok(&["inspect", c]).contains(&password),
                "{secret} in docker inspect {c}"
            );
            assert!(!logs(c).contains(&password), "{secret} in the logs of {c}");
        }
    }

    // The primary stops: the replica turns unhealthy but keeps serving reads; the
    // primary starts again: both healthy, nothing lost, new rows flow.
    stack.compose_ok(&["stop", "primary"], LONG);
    wait_health(&replica, "unhealthy", LONG);
    assert_eq!(
        psql_ok(&replica, "SELECT count(*) FROM e2e"),
        "100",
        "a hot standby serves reads"
    );
    stack.compose_ok(&["start", "primary"], LONG);
    wait_health(&primary, "healthy", LONG);
    wait_health(&replica, "healthy", LONG);
    insert(&primary, 101, 200);
    wait_same_rows(&primary, &replica, SHORT);

    // Cut the replica off for at least 30 s while the primary is written to: it turns
    // unhealthy; back on the network it catches up.
    let network = stack.network();
    docker_ok(&["network", "disconnect", &network, &replica]);
    let cut = Instant::now();
    insert(&primary, 201, 20_000);
    wait_health(&replica, "unhealthy", LONG);
    if let Some(rest) = Duration::from_secs(30).checked_sub(cut.elapsed()) {
        std::thread::sleep(rest);
    }
    docker_ok(&[
        "network", "connect", "--alias", "replica", &network, &replica,
    ]);
    wait_health(&replica, "healthy", LONG);
    let rows = wait_same_rows(&primary, &replica, LONG);
    assert!(rows.starts_with("20000 "), "{rows}");

    // down and up with the volumes kept: the same data, no second initdb or clone.
    stack.compose_ok(&["down"], LONG);
    stack.up(&[]);
    let (primary, replica) = (stack.container("primary"), stack.container("replica"));
    wait_health(&primary, "healthy", LONG);
    wait_health(&replica, "healthy", LONG);
    assert_eq!(wait_same_rows(&primary, &replica, SHORT), rows);
    let (primary_log, replica_log) = (logs(&primary), logs(&replica));
    assert!(
        !primary_log.contains("initdb"),
        "the primary ran initdb again:\n{primary_log}"
    );
    assert!(
        !replica_log.contains("pg_basebackup"),
        "the replica cloned again:\n{replica_log}"
    );

    // docker stop of each service: postgres' fast shutdown within the grace period
    // (exit code 0, not 137 from SIGKILL), and its last words in the log.
    for (service, container) in [("replica", &replica), ("primary", &primary)] {
        let started = Instant::now();
        stack.compose_ok(&["stop", service], LONG);
        let state = docker_ok(&[
            "inspect",
            "--format",
            "{{.State.ExitCode}} {{.State.OOMKilled}}",
            container,
        ]);
        eprintln!(
            "docker_e2e: {service} stopped in {:.1} s ({state})",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(state, "0 false", "{service} did not stop cleanly");
        let log = logs(container);
        assert!(
            log.trim_end().ends_with("database system is shut down"),
            "{service}:\n{log}"
        );
    }
}

/// docker kill of the replica while pg_basebackup copies a primary filled by pgbench;
/// started again, it discards the partial clone, clones anew and streams.
#[test]
fn replica_killed_during_its_clone_streams_after_a_start() {
    let Some((_serial, env)) = setup() else {
        return;
    };
    let stack = Stack::new(env, "kill", &[]);
    stack.up(&["primary"]);
    let primary = stack.container("primary");
    wait_health(&primary, "healthy", LONG);
    let out = docker_with(
        &[
            "exec", "--user", "postgres", &primary, "pgbench", "-i", "-q", "-s", "30", "postgres",
        ],
        LONG,
    );
    assert!(out.status.success(), "pgbench -i: {}", text(&out.stderr));

    // Killed once pg_basebackup reports progress. Should the clone be finished by then
    // (a very fast machine), the replica and its volume go and the race is run again.
    let volume = format!("{}_replica-data", stack.project);
    let replica = (1..=3)
        .find_map(|attempt| {
            stack.up(&["replica"]);
            let replica = stack.container("replica");
            wait_until(SHORT * 2, "pg_basebackup copying", || {
                match logs(&replica) {
                    l if l.contains(" kB (") => Ok(()),
                    l if l.contains("clone finished") => Ok(()),
                    _ => Err("no progress yet".to_string()),
                }
            });
            docker_ok(&["kill", &replica]);
            let log = logs(&replica);
            if !log.contains("clone finished") {
                return Some(replica);
            }
            eprintln!("docker_e2e: attempt {attempt}: the clone finished before the kill; again");
            stack.compose_ok(&["rm", "--stop", "--force", "replica"], LONG);
            docker_ok(&["volume", "rm", &volume]);
            None
        })
        .expect("the clone always finished before the kill");

    docker_ok(&["start", &replica]);
    wait_health(&replica, "healthy", LONG);
    let log = logs(&replica);
    assert!(
        log.contains("interrupted clone"),
        "the restart did not see the partial clone:\n{log}"
    );
    assert!(log.contains("clone finished"), "{log}");
    insert(&primary, 1, 10);
    wait_same_rows(&primary, &replica, SHORT);
    let count = "SELECT count(*) FROM pgbench_accounts";
    assert_eq!(psql_ok(&replica, count), psql_ok(&primary, count));
}

/// docker-compose.scale.yml and --scale replica=2: two replicas, each streaming on a
/// slot of its own, named after its host name.
#[test]
fn scaled_replicas_stream_each_on_its_own_slot() {
    let Some((_serial, env)) = setup() else {
        return;
    };
    let mut stack = Stack::new(
        env,
        "scale",
        &["docker-compose.scale.yml", "docker-compose.ports.yml"],
    );
    // Published on loopback ports Docker picks, so that nothing on the host collides.
    stack.env = vec![
        ("PGENTRY_PRIMARY_PORTS", "127.0.0.1:"),
        ("PGENTRY_REPLICA_PORTS", "127.0.0.1:"),
    ];
    stack.up(&["--scale", "replica=2"]);
    let primary = stack.container("primary");
    let replicas = stack.containers("replica");
    assert_eq!(replicas.len(), 2);
    wait_health(&primary, "healthy", LONG);
    for r in &replicas {
        wait_health(r, "healthy", LONG);
    }
    let mut slots: Vec<String> = replicas.iter().map(|r| slot_in(r)).collect();
    slots.sort();
    assert_ne!(slots[0], slots[1]);
    let expected = slots.join(",");
    wait_until(SHORT, "both replicas streaming on their slots", || {
        let streaming = psql(
            &primary,
            "SELECT string_agg(application_name, ',' ORDER BY application_name) FROM pg_stat_replication WHERE state = 'streaming'",
        )?;
        let active = psql(
            &primary,
            "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots WHERE active",
        )?;
        if streaming == expected && active == expected {
            Ok(())
        } else {
            Err(format!(
                "streaming {streaming:?}, active slots {active:?}, expected {expected:?}"
            ))
        }
    });
    insert(&primary, 1, 50);
    for r in &replicas {
        wait_same_rows(&primary, r, SHORT);
    }
    // docker-compose.ports.yml: each server answers on its published loopback port.
    for c in replicas.iter().chain([&primary]) {
        let published = docker_ok(&["port", c, "5432/tcp"]);
        let address = published.lines().next().unwrap().to_string();
        assert!(
            address.starts_with("127.0.0.1:"),
            "{c} published on {published}"
        );
        assert!(
            answers_ssl_request(&address),
            "no PostgreSQL answer on {address} ({c})"
        );
    }
}

/// Whether a PostgreSQL server answers an SSLRequest at `address` ('S' or 'N').
fn answers_ssl_request(address: &str) -> bool {
    use std::io::Write;
    let Ok(mut conn) = std::net::TcpStream::connect(address) else {
        return false;
    };
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = [0u8; 1];
    conn.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .is_ok()
        && conn.read_exact(&mut answer).is_ok()
        && (answer[0] == b'S' || answer[0] == b'N')
}

/// A swarm made for the test, left again at drop (with the bridge it made).
struct Swarm {
    had_gwbridge: bool,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        docker_with(&["swarm", "leave", "--force"], LONG);
        if !self.had_gwbridge {
            docker(&["network", "rm", "docker_gwbridge"]);
        }
    }
}

/// A deployed stack, removed with its volumes at drop.
struct SwarmStack(String);

impl SwarmStack {
    fn containers(&self, service: &str) -> Vec<String> {
        let ids = docker_ok(&[
            "ps",
            "--quiet",
            "--filter",
            &format!("label=com.docker.swarm.service.name={}_{service}", self.0),
        ]);
        ids.lines().map(str::to_string).collect()
    }

    fn running(&self, service: &str) -> Result<String, String> {
        match self.containers(service).as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!(
                "{} {service} containers running: {other:?}",
                other.len()
            )),
        }
    }
}

impl Drop for SwarmStack {
    fn drop(&mut self) {
        let namespace = format!("label=com.docker.stack.namespace={}", self.0);
        if std::thread::panicking() {
            let out = docker(&[
                "service",
                "ps",
                "--no-trunc",
                &format!("{}_replica", self.0),
            ]);
            eprintln!("==== swarm tasks ====\n{}", text(&out.stdout));
            for id in docker_ok(&["ps", "--all", "--quiet", "--filter", &namespace]).lines() {
                eprintln!("==== logs of {id} ====\n{}", logs(id));
            }
        }
        docker_with(&["stack", "rm", &self.0], LONG);
        let started = Instant::now();
        while started.elapsed() < LONG
            && !docker_ok(&["ps", "--all", "--quiet", "--filter", &namespace]).is_empty()
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        for volume in ["primary-data", "replica-data"] {
            docker(&["volume", "rm", &format!("{}_{volume}", self.0)]);
        }
    }
}

/// compose/stack-deploy.sh on a single-node swarm (secrets as swarm secrets, the
/// internal overlay network, node labels placing both services): the replica streams
/// on the slot named after the node.
#[test]
fn swarm_stack_deploy_streams() {
    let Some((_serial, env)) = setup() else {
        return;
    };
    let state = docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    if state != "inactive" {
        loud(&format!(
            "SKIPPED swarm_stack_deploy_streams: this engine is already in a swarm ({state}); not touching it"
        ));
        return;
    }
    let had_gwbridge = docker(&["network", "inspect", "docker_gwbridge"])
        .status
        .success();
    docker_ok(&[
        "swarm",
        "init",
        "--advertise-addr",
        "127.0.0.1",
        "--listen-addr",
        "127.0.0.1:2377",
    ]);
    let _swarm = Swarm { had_gwbridge };
    let node = docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]);
    docker_ok(&[
        "node",
        "update",
        "--label-add",
        "pgentry.primary=true",
        "--label-add",
        "pgentry.replica=true",
        &node,
    ]);

    let name = format!("pgentry-e2e-swarm-{}", std::process::id());
    let secrets = TempDir::new(&name);
    let out = run(
        Command::new(repo().join("compose/make-secrets.sh")).env("PGENTRY_SECRETS_DIR", &secrets.0),
        SHORT,
    );
    assert!(out.status.success());
    let stack = SwarmStack(name.clone());
    let out = run(
        Command::new(repo().join("compose/stack-deploy.sh"))
            .env("PGENTRY_IMAGE", &env.image)
            .env("PGENTRY_SECRETS_DIR", &secrets.0)
            .env("PGENTRY_PRIMARY_CPUS", env.cpus.min(4).to_string())
            .env("PGENTRY_REPLICA_CPUS", env.cpus.min(2).to_string())
            .args(["--resolve-image", "never", &name]),
        LONG,
    );
    assert!(
        out.status.success(),
        "stack-deploy.sh failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let replica = wait_until(LONG, "the swarm's replica running", || {
        stack.running("replica")
    });
    // The replica's host name is its node's, so its slot is named after the node.
    assert_eq!(
        docker_ok(&["exec", &replica, "cat", "/etc/hostname"]).trim(),
        docker_ok(&["info", "--format", "{{.Name}}"]).trim()
    );
    let slot = slot_in(&replica);
    let primary = wait_until(LONG, "the swarm's primary running", || {
        stack.running("primary")
    });
    wait_until(LONG, "the swarm's replica streaming", || {
        match psql(
            &primary,
            "SELECT application_name || ' ' || state FROM pg_stat_replication",
        )? {
            s if s == format!("{slot} streaming") => Ok(()),
            s => Err(format!("pg_stat_replication: {s:?}")),
        }
    });
    let replica = stack.running("replica").unwrap();
    insert(&primary, 1, 10);
    wait_same_rows(&primary, &replica, SHORT);
}
