//! Talking to the primary over the replication protocol: waiting until it answers
//! IDENTIFY_SYSTEM, and creating this replica's slot.

use crate::signals::{Interrupted, Shutdown};
use crate::wire::{self, Connection, Endpoint, Params};
use crate::{info, warn};
use anyhow::{anyhow, Result};
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};

/// How long one attempt (connect, authenticate, identify) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Capped well under a second: a refused connection costs the primary nothing, and
/// the cap is the latency added between the primary coming up and the clone starting.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

pub struct Upstream<'a> {
    pub endpoint: Endpoint,
    pub user: &'a str,
    pub password: &'a crate::secrets::Secret,
    pub application_name: &'a str,
}

/// The primary's answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: u32,
}

/// What one attempt means for the wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep waiting; the text names the state, for one log line per change.
    Retry(String),
    /// Waiting cannot help (wrong password, no pg_hba entry, not a primary we can use).
    Fatal(String),
}

/// Classifies a failed attempt. Pure, so every case is tested.
pub fn classify(error: &wire::Error) -> Verdict {
    match error {
        wire::Error::Connect(e) => Verdict::Retry(connect_state(e)),
        wire::Error::Io(e) => Verdict::Retry(format!("connection lost ({e})")),
        wire::Error::Server(e) if e.is_auth_failure() => Verdict::Fatal(e.message.clone()),
        // 57P03 starting up or shutting down, 53300 too many connections or WAL
        // senders, 08xxx connection trouble, 57P01 admin shutdown: all pass.
        wire::Error::Server(e)
            if ["57P03", "53300", "57P01"].contains(&e.code.as_str())
                || e.code.starts_with("08") =>
        {
            Verdict::Retry(e.message.clone())
        }
        wire::Error::Server(e) => Verdict::Fatal(format!("{} (SQLSTATE {})", e.message, e.code)),
        wire::Error::Protocol(m) => Verdict::Fatal(m.clone()),
    }
}

fn connect_state(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        TimedOut => "connection timed out".into(),
        NotFound => "no such socket".into(),
        _ => e.to_string(),
    }
}

/// The next pause: doubling from 50 ms, capped.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

impl Upstream<'_> {
    async fn connect(&self) -> Result<Connection, wire::Error> {
        Connection::connect(&Params {
            endpoint: &self.endpoint,
            user: self.user,
            password: Some(self.password),
            database: None,
            replication: true,
            application_name: self.application_name,
        })
        .await
    }

    /// One attempt: connect and IDENTIFY_SYSTEM.
    async fn attempt(&self) -> Result<(Connection, SystemInfo), wire::Error> {
        let mut conn = self.connect().await?;
        let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| wire::Error::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let info = SystemInfo {
            system_identifier: field(0).parse().map_err(|_| {
                wire::Error::Protocol("IDENTIFY_SYSTEM: bad system identifier".into())
            })?,
            timeline: field(1).parse().unwrap_or(0),
        };
        Ok((conn, info))
    }

    async fn bounded_attempt(
        &self,
        limit: Duration,
    ) -> Result<(Connection, SystemInfo), wire::Error> {
        match timeout(limit, self.attempt()).await {
            Ok(result) => result,
            Err(_) => Err(wire::Error::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))),
        }
    }

    /// Waits until the primary answers, logging each change of state once. Gives up
    /// at `deadline` (None: never) or on a fatal answer; ends early on a signal.
    pub async fn wait(
        &self,
        wait_timeout: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Result<(Connection, SystemInfo)> {
        let started = Instant::now();
        let deadline = wait_timeout.map(|t| started + t);
        let mut backoff = FIRST_BACKOFF;
        let mut last_state: Option<String> = None;
        loop {
            let limit = deadline.map_or(ATTEMPT_TIMEOUT, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(ATTEMPT_TIMEOUT)
            });
            let attempt = tokio::select! {
                r = self.bounded_attempt(limit) => r,
                s = shutdown.recv() => return Err(Interrupted(s).into()),
            };
            let error = match attempt {
                Ok(ok) => {
                    if last_state.is_some() {
                        info!(
                            "primary {} answers after {:.1} s",
                            self.endpoint,
                            started.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(ok);
                }
                Err(e) => e,
            };
            let state = match classify(&error) {
                Verdict::Fatal(message) => {
                    return Err(anyhow!(
                        "primary {} refused user {:?}: {message}; check PGENTRY_REPLICATION_USER, its password and the primary's pg_hba.conf",
                        self.endpoint,
                        self.user
                    ))
                }
                Verdict::Retry(state) => state,
            };
            if last_state.as_deref() != Some(&state) {
                info!("waiting for primary {}: {state}", self.endpoint);
                last_state = Some(state);
            }
            if let Some(deadline) = deadline {
                if Instant::now() + backoff >= deadline {
                    return Err(anyhow!(
                        "primary {} did not answer within {:.0} s ({}); check PGENTRY_PRIMARY_HOST and that the primary runs, or raise PGENTRY_WAIT_TIMEOUT",
                        self.endpoint,
                        wait_timeout.unwrap_or_default().as_secs_f64(),
                        last_state.unwrap_or_default()
                    ));
                }
            }
            tokio::select! {
                _ = sleep(backoff) => {}
                s = shutdown.recv() => return Err(Interrupted(s).into()),
            }
            backoff = next_backoff(backoff);
        }
    }

    /// A connection to the primary and its identity, if it answers within `limit`:
    /// a standby restarting while its primary is down must not wait for it.
    pub async fn probe(&self, limit: Duration) -> Option<(Connection, SystemInfo)> {
        match self.bounded_attempt(limit).await {
            Ok(answer) => Some(answer),
            Err(e) => {
                warn!(
                    "primary {} does not answer ({e}); starting the standby with its data as it is",
                    self.endpoint
                );
                None
            }
        }
    }
}

/// Creates the physical slot `slot` with WAL reserved from now, unless it exists.
pub async fn ensure_slot(conn: &mut Connection, slot: &str) -> Result<()> {
    let sql = format!(
        "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
        wire::quote_ident(slot)
    );
    match conn.simple_query(&sql).await {
        Ok(_) => {
            info!("created replication slot {slot} on the primary");
            Ok(())
        }
        Err(wire::Error::Server(e)) if e.code == "42710" => Ok(()),
        Err(e) => Err(anyhow!("cannot create replication slot {slot} on the primary: {e}; check max_replication_slots there")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    fn server(code: &str) -> wire::Error {
        wire::Error::Server(wire::ServerError {
            code: code.into(),
            message: format!("m{code}"),
        })
    }

    #[test]
    fn unreachable_and_starting_keep_waiting() {
        assert_eq!(
            classify(&wire::Error::Connect(Error::from(
                ErrorKind::ConnectionRefused
            ))),
            Verdict::Retry("connection refused".into())
        );
        assert!(matches!(
            classify(&wire::Error::Connect(Error::other(
                "failed to lookup address"
            ))),
            Verdict::Retry(_)
        ));
        assert!(matches!(
            classify(&wire::Error::Io(Error::from(ErrorKind::ConnectionReset))),
            Verdict::Retry(_)
        ));
        for code in ["57P03", "53300", "57P01", "08006"] {
            assert_eq!(
                classify(&server(code)),
                Verdict::Retry(format!("m{code}")),
                "{code}"
            );
        }
    }

    #[test]
    fn authentication_and_unknown_errors_are_fatal() {
        assert_eq!(classify(&server("28P01")), Verdict::Fatal("m28P01".into()));
        assert_eq!(classify(&server("28000")), Verdict::Fatal("m28000".into()));
        assert!(matches!(classify(&server("42601")), Verdict::Fatal(_)));
        assert!(matches!(
            classify(&wire::Error::Protocol("x".into())),
            Verdict::Fatal(_)
        ));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut b = FIRST_BACKOFF;
        let mut seen = vec![b];
        for _ in 0..5 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(
            seen.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            [50, 100, 200, 250, 250, 250]
        );
    }
}
