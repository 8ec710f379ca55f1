//! `pgentry healthcheck`: is the server in this container fit for its role?
//!
//! One process, one connection, one query, and never a child process: a client
//! forked by a probe is orphaned when Docker's timeout kills the probe, postgres
//! (PID 1) adopts it, and the non-zero exit of an adopted child makes the postmaster
//! restart every backend (docker-library/postgres#1349).
//!
//! The decision is [`verdict`], a pure function of an [`Observation`]; the rest is
//! the thin I/O that makes the observation, bounded by PGENTRY_HEALTH_TIMEOUT so the
//! answer comes before Docker gives up. Exit 0 healthy, 1 unhealthy, nothing else,
//! with one line on stdout saying why (Docker keeps it in `docker inspect`).

use crate::cli::Probe;
use crate::config::{Config, Health, Role};
use crate::local;
use crate::wire::{self, Endpoint, Row};
use std::io::Write;
use std::process::ExitCode;

/// Everything any verdict needs, in one statement of raw facts: the arithmetic is
/// done here, where it is tested, and every operator or view a fresh backend must
/// look up costs it catalog reads (this form answers in about two thirds of the
/// time of one computing the lag in SQL; hence also the function instead of the
/// pg_stat_wal_receiver view). pg_is_wal_replay_paused() fails outside recovery,
/// hence the CASE.
const QUERY: &str = "SELECT pg_is_in_recovery(), \
     (SELECT status FROM pg_stat_get_wal_receiver()), \
     pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp()), \
     CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END";

/// What the probe saw of the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// No PostgreSQL answer: nothing listens, the connection broke, or the server
    /// stayed silent past the timeout.
    NoAnswer(String),
    /// The server answered but would not serve this connection (starting up,
    /// shutting down, too many clients, authentication...). `recovering`: it said it
    /// is in archive recovery and not yet consistent, i.e. alive and replaying.
    Refused { message: String, recovering: bool },
    /// The server ran the health query.
    Answered(ServerState),
}

/// The answer to [`QUERY`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    pub in_recovery: bool,
    /// pg_stat_wal_receiver.status ("streaming", "waiting"...); None when no WAL
    /// receiver runs.
    pub receiver: Option<String>,
    /// WAL positions received and replayed; None on a primary, and before any.
    pub received: Option<Lsn>,
    pub replayed: Option<Lsn>,
    /// Seconds since the last replayed transaction committed on the primary; None
    /// before the first.
    pub last_replay_age: Option<f64>,
    pub replay_paused: bool,
}

/// A WAL position, as a byte offset.
pub type Lsn = u64;

impl ServerState {
    /// WAL received but not yet replayed.
    pub fn lag_bytes(&self) -> u64 {
        match (self.received, self.replayed) {
            (Some(received), Some(replayed)) => received.saturating_sub(replayed),
            _ => 0,
        }
    }

    /// The age of the last replayed transaction, but only while received WAL awaits
    /// replay: an idle primary writes nothing, and no writes is not lag.
    pub fn lag_seconds(&self) -> Option<f64> {
        self.last_replay_age.filter(|_| self.lag_bytes() > 0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub healthy: bool,
    pub reason: String,
}

impl Verdict {
    fn healthy(reason: impl Into<String>) -> Verdict {
        Verdict {
            healthy: true,
            reason: reason.into(),
        }
    }

    pub fn unhealthy(reason: impl Into<String>) -> Verdict {
        Verdict {
            healthy: false,
            reason: reason.into(),
        }
    }

    /// The line for stdout: always exactly one.
    pub fn line(&self) -> String {
        let word = if self.healthy { "healthy" } else { "unhealthy" };
        format!("{word}: {}", self.reason.replace(['\n', '\r'], " "))
    }
}

/// The decision. Readiness is the full check for the role; liveness only asks
/// whether the server answers at all (a replica replaying a backlog, or whose primary
/// is down, is alive); startup asks whether it accepts connections, or is alive and
/// in recovery.
pub fn verdict(probe: Probe, role: Role, seen: &Observation, limits: &Health) -> Verdict {
    match (probe, seen) {
        (_, Observation::NoAnswer(why)) => Verdict::unhealthy(why.as_str()),
        (Probe::Liveness, Observation::Refused { message, .. }) => {
            Verdict::healthy(format!("alive, not accepting connections: {message}"))
        }
        (Probe::Liveness, Observation::Answered(_)) => {
            Verdict::healthy("alive, accepting connections")
        }
        (
            Probe::Startup,
            Observation::Refused {
                message,
                recovering: true,
            },
        ) => Verdict::healthy(format!(
            "started, in recovery, not yet accepting connections: {message}"
        )),
        (Probe::Startup | Probe::Readiness, Observation::Refused { message, .. }) => {
            Verdict::unhealthy(format!("not accepting connections: {message}"))
        }
        (Probe::Startup, Observation::Answered(_)) => {
            Verdict::healthy("started, accepting connections")
        }
        (Probe::Readiness, Observation::Answered(state)) => readiness(role, state, limits),
    }
}

fn readiness(role: Role, state: &ServerState, limits: &Health) -> Verdict {
    match (role, state.in_recovery) {
        (Role::Primary, false) => Verdict::healthy("primary accepting connections"),
        (Role::Primary, true) => Verdict::unhealthy(
            "expected a primary, but the server is in recovery (a standby); check PGENTRY_ROLE",
        ),
        (Role::Replica, false) => Verdict::unhealthy(
            "expected a replica, but the server is not in recovery (a primary, or promoted); check PGENTRY_ROLE",
        ),
        (Role::Replica, true) => replica_readiness(state, limits),
    }
}

fn replica_readiness(state: &ServerState, limits: &Health) -> Verdict {
    // Pausing is legitimate (an operator's pg_wal_replay_pause()); only the lag it
    // causes fails the check, but every line says it, since it explains the lag.
    let paused = if state.replay_paused {
        "; replay is paused (pg_wal_replay_resume() resumes it)"
    } else {
        ""
    };
    match state.receiver.as_deref() {
        Some("streaming") => {}
        None => {
            return Verdict::unhealthy(format!(
                "replica is not streaming: no WAL receiver runs (is the primary reachable?){paused}"
            ))
        }
        Some(status) => {
            return Verdict::unhealthy(format!(
                "replica is not streaming: its WAL receiver is {status}{paused}"
            ))
        }
    }
    let lag_bytes = state.lag_bytes();
    if lag_bytes > limits.max_lag_bytes {
        return Verdict::unhealthy(format!(
            "replica replay lags {lag_bytes} bytes behind received WAL, over PGENTRY_MAX_LAG_BYTES={}{paused}",
            limits.max_lag_bytes
        ));
    }
    if let (Some(lag), Some(max)) = (state.lag_seconds(), limits.max_lag_seconds) {
        if lag > max {
            return Verdict::unhealthy(format!(
                "replica replay lags {lag:.1} s, over PGENTRY_MAX_LAG_SECONDS={max}{paused}"
            ));
        }
    }
    let seconds = state
        .lag_seconds()
        .map(|s| format!(", {s:.1} s"))
        .unwrap_or_default();
    Verdict::healthy(format!(
        "replica streaming, replay lag {lag_bytes} bytes{seconds}{paused}"
    ))
}

/// `pgentry healthcheck`: prints the verdict and exits 0 or 1, whatever happens.
pub fn run(probe: Probe) -> ExitCode {
    let verdict = match crate::run::load_config() {
        Ok((config, _)) => check(probe, &config),
        Err(e) => Verdict::unhealthy(format!("invalid configuration: {e:#}")),
    };
    report(&verdict)
}

/// Prints the verdict's line and turns it into the exit code (0 or 1, nothing else).
pub fn report(verdict: &Verdict) -> ExitCode {
    // A closed stdout must not turn the verdict into a panic: the exit code is the answer.
    let _ = writeln!(std::io::stdout().lock(), "{}", verdict.line());
    if verdict.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn check(probe: Probe, config: &Config) -> Verdict {
    let endpoint = local::endpoint(config);
    let place = local::describe(config, &endpoint);
    let runtime = match crate::run::runtime() {
        Ok(runtime) => runtime,
        Err(e) => return Verdict::unhealthy(format!("{e:#}")),
    };
    let limit = config.health.timeout;
    let seen = runtime.block_on(async {
        tokio::time::timeout(limit, observe(config, &endpoint, &place))
            .await
            .unwrap_or_else(|_| {
                Observation::NoAnswer(format!(
                    "no answer from {place} within PGENTRY_HEALTH_TIMEOUT={} s",
                    limit.as_secs_f64()
                ))
            })
    });
    verdict(probe, config.role(), &seen, &config.health)
}

/// `place` names the endpoint in messages.
async fn observe(config: &Config, endpoint: &Endpoint, place: &str) -> Observation {
    let mut conn = match local::connect(config, endpoint, "pgentry healthcheck").await {
        Ok(conn) => conn,
        Err(e) => return failure(place, e),
    };
    let rows = conn.simple_query(QUERY).await;
    conn.close().await;
    match rows {
        Ok(rows) => parse_state(&rows).map_or_else(
            |e| Observation::NoAnswer(format!("unexpected answer from {place}: {e}")),
            Observation::Answered,
        ),
        Err(e) => failure(place, e),
    }
}

/// What a failed connection or query says about the server.
fn failure(place: &str, error: wire::Error) -> Observation {
    match error {
        wire::Error::Server(e) => Observation::Refused {
            recovering: is_not_yet_consistent(&e),
            message: format!("{} (SQLSTATE {})", e.message, e.code),
        },
        wire::Error::Connect(e) => {
            Observation::NoAnswer(format!("nothing answers at {place}: {e}"))
        }
        other => Observation::NoAnswer(format!("{place}: {other}")),
    }
}

/// The refusal of a server in archive recovery before its consistent point, or of a
/// standby with hot_standby off: alive and replaying. PostgreSQL gives every
/// "cannot connect now" the same SQLSTATE, so only the message tells them apart;
/// under a translated lc_messages this is false, and the probe errs on "starting".
fn is_not_yet_consistent(e: &wire::ServerError) -> bool {
    e.code == "57P03"
        && matches!(
            e.message.as_str(),
            "the database system is not yet accepting connections"
                | "the database system is not accepting connections"
        )
}

fn parse_state(rows: &[Row]) -> Result<ServerState, String> {
    let [row] = rows else {
        return Err(format!("{} rows instead of 1", rows.len()));
    };
    let [in_recovery, receiver, received, replayed, last_replay_age, replay_paused] =
        row.as_slice()
    else {
        return Err(format!("{} columns instead of 6", row.len()));
    };
    Ok(ServerState {
        in_recovery: flag(in_recovery)?,
        receiver: receiver.clone(),
        received: received.as_deref().map(lsn).transpose()?,
        replayed: replayed.as_deref().map(lsn).transpose()?,
        last_replay_age: last_replay_age.as_deref().map(seconds).transpose()?,
        replay_paused: flag(replay_paused)?,
    })
}

fn flag(field: &Option<String>) -> Result<bool, String> {
    match field.as_deref() {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        other => Err(format!("{other:?} is not a boolean")),
    }
}

/// PostgreSQL's text form of a WAL position: two hexadecimal halves, "16/B374D848".
fn lsn(field: &str) -> Result<Lsn, String> {
    field
        .split_once('/')
        .and_then(|(high, low)| {
            let high = u32::from_str_radix(high, 16).ok()?;
            let low = u32::from_str_radix(low, 16).ok()?;
            Some(u64::from(high) << 32 | u64::from(low))
        })
        .ok_or_else(|| format!("{field:?} is not a WAL position"))
}

fn seconds(field: &str) -> Result<f64, String> {
    field
        .parse()
        .map_err(|_| format!("{field:?} is not a number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1024 * 1024;

    fn limits(max_lag_seconds: Option<f64>) -> Health {
        Health {
            timeout: Duration::from_secs(3),
            max_lag_bytes: 16 * MIB,
            max_lag_seconds,
        }
    }

    fn primary() -> ServerState {
        ServerState {
            in_recovery: false,
            receiver: None,
            received: None,
            replayed: None,
            last_replay_age: None,
            replay_paused: false,
        }
    }

    /// A streaming replica, caught up; its last transaction an hour old.
    fn replica() -> ServerState {
        ServerState {
            in_recovery: true,
            receiver: Some("streaming".into()),
            received: Some(0x3000148),
            replayed: Some(0x3000148),
            last_replay_age: Some(3600.0),
            replay_paused: false,
        }
    }

    /// A streaming replica with `bytes` received but not replayed, its last replayed
    /// transaction `age` seconds old.
    fn lagging(bytes: u64, age: f64) -> ServerState {
        ServerState {
            received: Some(0x3000148 + bytes),
            last_replay_age: Some(age),
            ..replica()
        }
    }

    fn refused(recovering: bool) -> Observation {
        Observation::Refused {
            message: "the database system is starting up (SQLSTATE 57P03)".into(),
            recovering,
        }
    }

    fn check(probe: Probe, role: Role, seen: Observation, max_seconds: Option<f64>) -> Verdict {
        verdict(probe, role, &seen, &limits(max_seconds))
    }

    fn healthy(probe: Probe, role: Role, seen: Observation) -> bool {
        check(probe, role, seen, None).healthy
    }

    const ALL: [Probe; 3] = [Probe::Readiness, Probe::Liveness, Probe::Startup];
    const ROLES: [Role; 2] = [Role::Primary, Role::Replica];

    #[test]
    fn silence_is_unhealthy_for_every_probe_and_role() {
        for probe in ALL {
            for role in ROLES {
                let v = check(probe, role, Observation::NoAnswer("no socket".into()), None);
                assert_eq!(v, Verdict::unhealthy("no socket"));
            }
        }
    }

    #[test]
    fn a_refusal_is_alive_but_neither_started_nor_ready() {
        for role in ROLES {
            assert!(healthy(Probe::Liveness, role, refused(false)));
            assert!(!healthy(Probe::Startup, role, refused(false)));
            assert!(!healthy(Probe::Readiness, role, refused(false)));
        }
    }

    #[test]
    fn recovery_before_consistency_counts_as_started_not_ready() {
        for role in ROLES {
            assert!(healthy(Probe::Liveness, role, refused(true)));
            assert!(healthy(Probe::Startup, role, refused(true)));
            assert!(!healthy(Probe::Readiness, role, refused(true)));
        }
    }

    #[test]
    fn any_answer_is_alive_and_started() {
        for state in [primary(), replica()] {
            for role in ROLES {
                for probe in [Probe::Liveness, Probe::Startup] {
                    let seen = Observation::Answered(state.clone());
                    assert!(healthy(probe, role, seen), "{probe:?} {role:?}");
                }
            }
        }
    }

    #[test]
    fn a_primary_is_ready_when_not_in_recovery() {
        let v = check(
            Probe::Readiness,
            Role::Primary,
            Observation::Answered(primary()),
            None,
        );
        assert_eq!(v.line(), "healthy: primary accepting connections");
    }

    #[test]
    fn the_wrong_role_is_not_ready_and_says_so() {
        let v = check(
            Probe::Readiness,
            Role::Primary,
            Observation::Answered(replica()),
            None,
        );
        assert!(!v.healthy);
        assert!(v.reason.contains("expected a primary"), "{}", v.reason);
        let v = check(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(primary()),
            None,
        );
        assert!(!v.healthy);
        assert!(v.reason.contains("expected a replica"), "{}", v.reason);
    }

    #[test]
    fn a_streaming_replica_within_limits_is_ready() {
        let seen = lagging(16 * MIB, 4.96);
        let v = check(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(seen),
            Some(5.0),
        );
        assert_eq!(
            v.line(),
            "healthy: replica streaming, replay lag 16777216 bytes, 5.0 s"
        );
    }

    #[test]
    fn a_replica_that_does_not_stream_is_not_ready() {
        for (receiver, expected) in [
            (None, "no WAL receiver runs"),
            (Some("waiting"), "its WAL receiver is waiting"),
            (Some("starting"), "its WAL receiver is starting"),
        ] {
            let seen = ServerState {
                receiver: receiver.map(String::from),
                ..replica()
            };
            let v = check(
                Probe::Readiness,
                Role::Replica,
                Observation::Answered(seen),
                None,
            );
            assert!(!v.healthy);
            assert!(v.reason.contains(expected), "{}", v.reason);
        }
    }

    #[test]
    fn lag_in_bytes_over_the_limit_is_not_ready() {
        let seen = lagging(16 * MIB + 1, 0.5);
        let v = check(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(seen),
            None,
        );
        assert!(!v.healthy);
        assert!(v.reason.contains("PGENTRY_MAX_LAG_BYTES"), "{}", v.reason);
    }

    #[test]
    fn lag_in_seconds_counts_only_when_a_limit_is_set() {
        let seen = lagging(1, 3600.0);
        assert!(healthy(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(seen.clone())
        ));
        let v = check(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(seen),
            Some(1.0),
        );
        assert!(!v.healthy);
        assert!(
            v.reason.contains("PGENTRY_MAX_LAG_SECONDS=1"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn nothing_to_replay_is_no_lag_however_old_the_last_transaction() {
        // An idle primary: nothing awaits replay, so an hour-old last transaction
        // is no lag, whatever the limit.
        assert_eq!(replica().lag_seconds(), None);
        assert!(
            check(
                Probe::Readiness,
                Role::Replica,
                Observation::Answered(replica()),
                Some(0.0)
            )
            .healthy
        );
    }

    #[test]
    fn a_paused_replay_is_reported_and_judged_by_its_lag() {
        let paused = ServerState {
            replay_paused: true,
            ..replica()
        };
        let v = check(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(paused.clone()),
            None,
        );
        assert!(v.healthy);
        assert!(v.reason.contains("replay is paused"), "{}", v.reason);
        let behind = ServerState {
            replay_paused: true,
            ..lagging(17 * MIB, 1.0)
        };
        let v = check(
            Probe::Readiness,
            Role::Replica,
            Observation::Answered(behind),
            None,
        );
        assert!(!v.healthy);
        assert!(v.reason.contains("replay is paused"), "{}", v.reason);
    }

    #[test]
    fn the_line_is_always_one_line() {
        let v = Verdict::unhealthy("a\nb\r\nc");
        assert_eq!(v.line(), "unhealthy: a b  c");
    }

    #[test]
    fn refusals_while_replaying_are_told_apart_by_message() {
        let e = |code: &str, message: &str| wire::ServerError {
            code: code.into(),
            message: message.into(),
        };
        assert!(is_not_yet_consistent(&e(
            "57P03",
            "the database system is not yet accepting connections"
        )));
        assert!(is_not_yet_consistent(&e(
            "57P03",
            "the database system is not accepting connections"
        )));
        assert!(!is_not_yet_consistent(&e(
            "57P03",
            "the database system is starting up"
        )));
        assert!(!is_not_yet_consistent(&e(
            "57P03",
            "the database system is shutting down"
        )));
        assert!(!is_not_yet_consistent(&e(
            "53300",
            "sorry, too many clients already"
        )));
    }

    #[test]
    fn parses_the_answer() {
        let row = |v: [Option<&str>; 6]| vec![v.iter().map(|f| f.map(String::from)).collect()];
        assert_eq!(
            parse_state(&row([Some("f"), None, None, None, None, Some("f")])),
            Ok(primary())
        );
        assert_eq!(
            parse_state(&row([
                Some("t"),
                Some("streaming"),
                Some("16/B374D848"),
                Some("16/B374C848"),
                Some("12.345678"),
                Some("t")
            ])),
            Ok(ServerState {
                received: Some(0x16_B374_D848),
                replayed: Some(0x16_B374_C848),
                last_replay_age: Some(12.345678),
                replay_paused: true,
                ..replica()
            })
        );
        assert!(parse_state(&[]).is_err());
        let bad = [
            [Some("x"), None, None, None, None, Some("f")],
            [Some("t"), None, None, None, None, None],
            [Some("t"), None, Some("0"), None, None, Some("f")],
            [Some("t"), None, Some("1/G"), None, None, Some("f")],
            [Some("t"), None, None, None, Some("soon"), Some("f")],
        ];
        for fields in bad {
            assert!(parse_state(&row(fields)).is_err(), "{fields:?}");
        }
    }

    #[test]
    fn lag_is_what_awaits_replay() {
        assert_eq!(lagging(4096, 2.0).lag_bytes(), 4096);
        assert_eq!(lagging(4096, 2.0).lag_seconds(), Some(2.0));
        // Replay ahead of receipt (WAL read from pg_wal at start) is no lag.
        let ahead = ServerState {
            replayed: Some(0x3000148 + 8192),
            ..replica()
        };
        assert_eq!((ahead.lag_bytes(), ahead.lag_seconds()), (0, None));
        assert_eq!((primary().lag_bytes(), primary().lag_seconds()), (0, None));
    }
}
