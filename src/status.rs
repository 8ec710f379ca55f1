//! `pgentry status [--json]`: the replication picture from wherever it runs.
//!
//! Three queries on one connection (the server itself, its standbys, its slots)
//! become a [`Status`], which renders as a table for people or as JSON for scripts.
//! The role shown is the server's actual state (in recovery or not), not the
//! configured one: status describes, the healthcheck judges.
//!
//! JSON schema, version 1 (fields are only ever added; `schema` changes on any
//! other change). Byte counts are integers, seconds are numbers, LSNs are
//! PostgreSQL's text form ("0/3000148"); null means unknown or not applicable.
//!
//! ```text
//! {
//!   "schema": 1,
//!   "role": "primary" | "replica",      // replica = the server is in recovery
//!   "timeline": 1,
//!   "wal_lsn": "0/3000148",             // primary: current WAL position; replica: last
//!                                       //   received (or replayed) position
//!   "replica": null | {                 // null on a primary
//!     "receive_lsn": "0/3000148" | null,
//!     "replay_lsn": "0/3000148" | null,
//!     "lag_bytes": 0,                   // received but not yet replayed
//!     "lag_seconds": 0.0 | null,        // age of the last replayed transaction while
//!                                       //   WAL awaits replay, else 0; null: unknown
//!     "replay_paused": false,
//!     "receiver_status": "streaming" | null,   // null: no WAL receiver runs
//!     "upstream_host": "10.0.0.2" | null,
//!     "upstream_port": 5432 | null
//!   },
//!   "standbys": [{                      // pg_stat_replication, by application_name
//!     "application_name": "replica1",
//!     "client_addr": "10.0.0.3" | null, // null: over a unix socket
//!     "state": "streaming",
//!     "sync_state": "async",
//!     "sent_lag_bytes": 0,              // behind "wal_lsn"; null: not reported yet
//!     "write_lag_bytes": 0, "flush_lag_bytes": 0, "replay_lag_bytes": 0,
//!     "write_lag_seconds": 0.001 | null,  // null: not measured (an idle standby)
//!     "flush_lag_seconds": 0.001 | null, "replay_lag_seconds": 0.002 | null
//!   }],
//!   "slots": [{                         // pg_replication_slots, by slot_name
//!     "slot_name": "replica1",
//!     "slot_type": "physical",
//!     "active": true,
//!     "retained_bytes": 16777216 | null, // WAL kept for it, from "wal_lsn"
//!     "wal_status": "reserved" | null
//!   }]
//! }
//! ```

use crate::config::Config;
use crate::local;
use crate::log::json_string;
use crate::wire::Row;
use anyhow::{anyhow, Context, Result};
use std::fmt::Write as _;
use std::io::Write as _;

/// The position standbys and slots are measured from: the current WAL position of
/// a primary, what a standby has (for its own cascading standbys).
const REFERENCE_LSN: &str = "CASE WHEN pg_is_in_recovery() \
     THEN GREATEST(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
     ELSE pg_current_wal_lsn() END";

fn server_query() -> String {
    format!(
        "SELECT pg_is_in_recovery(), ({REFERENCE_LSN})::text, \
         CASE WHEN pg_is_in_recovery() \
              THEN COALESCE(r.received_tli, (pg_control_checkpoint()).timeline_id) \
              ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
         pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
         GREATEST(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::bigint, \
         CASE WHEN pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() \
              THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) ELSE 0 END, \
         CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
         r.status, r.sender_host, r.sender_port \
         FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true"
    )
}

fn standbys_query() -> String {
    format!(
        "WITH ref AS (SELECT {REFERENCE_LSN} AS lsn) \
         SELECT application_name, host(client_addr), state, sync_state, \
         pg_wal_lsn_diff(ref.lsn, sent_lsn)::bigint, pg_wal_lsn_diff(ref.lsn, write_lsn)::bigint, \
         pg_wal_lsn_diff(ref.lsn, flush_lsn)::bigint, pg_wal_lsn_diff(ref.lsn, replay_lsn)::bigint, \
         extract(epoch FROM write_lag), extract(epoch FROM flush_lag), extract(epoch FROM replay_lag) \
         FROM pg_stat_replication, ref ORDER BY application_name, client_addr"
    )
}

fn slots_query() -> String {
    format!(
        "WITH ref AS (SELECT {REFERENCE_LSN} AS lsn) \
         SELECT slot_name, slot_type, active, pg_wal_lsn_diff(ref.lsn, restart_lsn)::bigint, wal_status \
         FROM pg_replication_slots, ref ORDER BY slot_name"
    )
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub in_recovery: bool,
    pub timeline: Option<i64>,
    pub wal_lsn: Option<String>,
    /// Only on a server in recovery.
    pub replica: Option<Replica>,
    pub standbys: Vec<Standby>,
    pub slots: Vec<Slot>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub receive_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub replay_paused: bool,
    pub receiver_status: Option<String>,
    pub upstream_host: Option<String>,
    pub upstream_port: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Standby {
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub sync_state: Option<String>,
    /// Sent, write, flush and replay positions behind the reference LSN.
    pub lag_bytes: [Option<i64>; 4],
    /// write_lag, flush_lag and replay_lag.
    pub lag_seconds: [Option<f64>; 3],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub slot_name: Option<String>,
    pub slot_type: Option<String>,
    pub active: bool,
    pub retained_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

/// `pgentry status`: prints the picture, or fails with one line.
pub fn run(json: bool) -> Result<()> {
    let (config, _) = crate::run::load_config()?;
    let status = crate::run::runtime()?.block_on(fetch(&config))?;
    let text = if json {
        render_json(&status)
    } else {
        render_table(&status)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}

async fn fetch(config: &Config) -> Result<Status> {
    let endpoint = local::endpoint(config);
    let place = local::describe(config, &endpoint);
    let mut conn = local::connect(config, &endpoint, "pgentry status")
        .await
        .map_err(|e| anyhow!("cannot reach the server at {place}: {e}"))?;
    let mut query = async |sql: String| {
        conn.simple_query(&sql)
            .await
            .map_err(|e| anyhow!("status query failed at {place}: {e}"))
    };
    let server = query(server_query()).await?;
    let standbys = query(standbys_query()).await?;
    let slots = query(slots_query()).await?;
    conn.close().await;
    parse(&server, &standbys, &slots).map_err(|e| anyhow!("unexpected answer from {place}: {e}"))
}

/// Column `i` of a row, as the text PostgreSQL sent.
fn text(row: &Row, i: usize) -> Option<String> {
    row.get(i).cloned().flatten()
}

fn parsed<T: std::str::FromStr>(row: &Row, i: usize) -> Result<Option<T>, String> {
    match row.get(i).and_then(Option::as_deref) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("column {} is {v:?}", i + 1)),
    }
}

fn flag(row: &Row, i: usize) -> Result<bool, String> {
    match row.get(i).and_then(Option::as_deref) {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        other => Err(format!("column {} is {other:?}, not a boolean", i + 1)),
    }
}

fn parse(server: &[Row], standbys: &[Row], slots: &[Row]) -> Result<Status, String> {
    let [row] = server else {
        return Err(format!("{} server rows instead of 1", server.len()));
    };
    let in_recovery = flag(row, 0)?;
    let replica = match in_recovery {
        false => None,
        true => Some(Replica {
            receive_lsn: text(row, 3),
            replay_lsn: text(row, 4),
            lag_bytes: parsed(row, 5)?,
            lag_seconds: parsed(row, 6)?,
            replay_paused: flag(row, 7)?,
            receiver_status: text(row, 8),
            upstream_host: text(row, 9),
            upstream_port: parsed(row, 10)?,
        }),
    };
    Ok(Status {
        in_recovery,
        wal_lsn: text(row, 1),
        timeline: parsed(row, 2)?,
        replica,
        standbys: standbys
            .iter()
            .map(|r| {
                Ok(Standby {
                    application_name: text(r, 0),
                    client_addr: text(r, 1),
                    state: text(r, 2),
                    sync_state: text(r, 3),
                    lag_bytes: [parsed(r, 4)?, parsed(r, 5)?, parsed(r, 6)?, parsed(r, 7)?],
                    lag_seconds: [parsed(r, 8)?, parsed(r, 9)?, parsed(r, 10)?],
                })
            })
            .collect::<Result<_, String>>()?,
        slots: slots
            .iter()
            .map(|r| {
                Ok(Slot {
                    slot_name: text(r, 0),
                    slot_type: text(r, 1),
                    active: flag(r, 2)?,
                    retained_bytes: parsed(r, 3)?,
                    wal_status: text(r, 4),
                })
            })
            .collect::<Result<_, String>>()?,
    })
}

fn role(status: &Status) -> &'static str {
    if status.in_recovery {
        "replica"
    } else {
        "primary"
    }
}

// ---- JSON ----

fn json_text(v: &Option<String>) -> String {
    v.as_deref().map_or_else(|| "null".into(), json_string)
}

fn json_number<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "null".into(), T::to_string)
}

/// Fields in the documented order, one object.
fn json_object(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_string(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

pub fn render_json(s: &Status) -> String {
    let replica = s.replica.as_ref().map_or_else(
        || "null".into(),
        |r| {
            json_object(&[
                ("receive_lsn", json_text(&r.receive_lsn)),
                ("replay_lsn", json_text(&r.replay_lsn)),
                ("lag_bytes", json_number(&r.lag_bytes)),
                ("lag_seconds", json_number(&r.lag_seconds)),
                ("replay_paused", r.replay_paused.to_string()),
                ("receiver_status", json_text(&r.receiver_status)),
                ("upstream_host", json_text(&r.upstream_host)),
                ("upstream_port", json_number(&r.upstream_port)),
            ])
        },
    );
    let standbys: Vec<String> = s
        .standbys
        .iter()
        .map(|st| {
            let [sent, write, flush, replay] = &st.lag_bytes;
            let [write_s, flush_s, replay_s] = &st.lag_seconds;
            json_object(&[
                ("application_name", json_text(&st.application_name)),
                ("client_addr", json_text(&st.client_addr)),
                ("state", json_text(&st.state)),
                ("sync_state", json_text(&st.sync_state)),
                ("sent_lag_bytes", json_number(sent)),
                ("write_lag_bytes", json_number(write)),
                ("flush_lag_bytes", json_number(flush)),
                ("replay_lag_bytes", json_number(replay)),
                ("write_lag_seconds", json_number(write_s)),
                ("flush_lag_seconds", json_number(flush_s)),
                ("replay_lag_seconds", json_number(replay_s)),
            ])
        })
        .collect();
    let slots: Vec<String> = s
        .slots
        .iter()
        .map(|sl| {
            json_object(&[
                ("slot_name", json_text(&sl.slot_name)),
                ("slot_type", json_text(&sl.slot_type)),
                ("active", sl.active.to_string()),
                ("retained_bytes", json_number(&sl.retained_bytes)),
                ("wal_status", json_text(&sl.wal_status)),
            ])
        })
        .collect();
    let mut out = json_object(&[
        ("schema", "1".into()),
        ("role", json_string(role(s))),
        ("timeline", json_number(&s.timeline)),
        ("wal_lsn", json_text(&s.wal_lsn)),
        ("replica", replica),
        ("standbys", format!("[{}]", standbys.join(","))),
        ("slots", format!("[{}]", slots.join(","))),
    ]);
    out.push('\n');
    out
}

// ---- Table ----

/// 1536 → "1.5 KiB": lag is read at a glance, the JSON has the exact count.
fn human_bytes(v: Option<i64>) -> String {
    let Some(n) = v else { return "-".into() };
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n.unsigned_abs() < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn human_seconds(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{s:.3} s"))
}

fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// Left-aligned columns two spaces apart, headers first.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

pub fn render_table(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}, timeline {}, WAL at {}",
        role(s),
        s.timeline.map_or_else(|| "-".into(), |t| t.to_string()),
        or_dash(&s.wal_lsn)
    );
    if let Some(r) = &s.replica {
        let upstream = match (&r.upstream_host, r.upstream_port) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            _ => "-".into(),
        };
        let rows = [
            (
                "upstream",
                format!(
                    "{upstream} (WAL receiver: {})",
                    r.receiver_status.as_deref().unwrap_or("not running")
                ),
            ),
            ("received", or_dash(&r.receive_lsn).to_string()),
            ("replayed", or_dash(&r.replay_lsn).to_string()),
            (
                "replay lag",
                format!(
                    "{}, {}",
                    human_bytes(r.lag_bytes),
                    human_seconds(r.lag_seconds)
                ),
            ),
            (
                "replay paused",
                if r.replay_paused { "yes" } else { "no" }.into(),
            ),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "{name:<14} {value}");
        }
    }
    // A replica usually has neither: say so only where their absence is news.
    if !s.standbys.is_empty() || s.replica.is_none() {
        out.push('\n');
        if s.standbys.is_empty() {
            out.push_str("no standbys connected\n");
        } else {
            let rows: Vec<Vec<String>> = s
                .standbys
                .iter()
                .map(|st| {
                    let mut row = vec![
                        or_dash(&st.application_name).to_string(),
                        st.client_addr.clone().unwrap_or_else(|| "local".into()),
                        or_dash(&st.state).to_string(),
                        or_dash(&st.sync_state).to_string(),
                    ];
                    row.extend(st.lag_bytes.iter().map(|b| human_bytes(*b)));
                    row.extend(st.lag_seconds.iter().map(|t| human_seconds(*t)));
                    row
                })
                .collect();
            out.push_str(&table(
                &[
                    "STANDBY",
                    "CLIENT",
                    "STATE",
                    "SYNC",
                    "SENT",
                    "WRITTEN",
                    "FLUSHED",
                    "REPLAYED",
                    "WRITE LAG",
                    "FLUSH LAG",
                    "REPLAY LAG",
                ],
                &rows,
            ));
        }
    }
    if !s.slots.is_empty() || s.replica.is_none() {
        out.push('\n');
        if s.slots.is_empty() {
            out.push_str("no replication slots\n");
        } else {
            let rows: Vec<Vec<String>> = s
                .slots
                .iter()
                .map(|sl| {
                    vec![
                        or_dash(&sl.slot_name).to_string(),
                        or_dash(&sl.slot_type).to_string(),
                        if sl.active { "yes" } else { "no" }.into(),
                        human_bytes(sl.retained_bytes),
                        or_dash(&sl.wal_status).to_string(),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["SLOT", "TYPE", "ACTIVE", "RETAINED", "WAL STATUS"],
                &rows,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[Option<&str>]) -> Row {
        v.iter().map(|f| f.map(String::from)).collect()
    }

    fn primary_rows() -> (Vec<Row>, Vec<Row>, Vec<Row>) {
        let server = vec![row(&[
            Some("f"),
            Some("0/3000148"),
            Some("1"),
            None,
            None,
            Some("0"),
            Some("0"),
            Some("f"),
            None,
            None,
            None,
        ])];
        let standbys = vec![row(&[
            Some("replica_1"),
            Some("10.0.0.3"),
            Some("streaming"),
            Some("async"),
            Some("0"),
            Some("0"),
            Some("128"),
            Some("2048"),
            Some("0.000512"),
            None,
            Some("1.5"),
        ])];
        let slots = vec![
            row(&[
                Some("replica_1"),
                Some("physical"),
                Some("t"),
                Some("16777216"),
                Some("reserved"),
            ]),
            row(&[Some("spare"), Some("physical"), Some("f"), None, None]),
        ];
        (server, standbys, slots)
    }

    fn replica_rows() -> Vec<Row> {
        vec![row(&[
            Some("t"),
            Some("0/5000000"),
            Some("2"),
            Some("0/5000000"),
            Some("0/4FFF000"),
            Some("4096"),
            Some("2.25"),
            Some("t"),
            Some("streaming"),
            Some("db-1"),
            Some("5432"),
        ])]
    }

    fn primary() -> Status {
        let (server, standbys, slots) = primary_rows();
        parse(&server, &standbys, &slots).unwrap()
    }

    fn replica() -> Status {
        parse(&replica_rows(), &[], &[]).unwrap()
    }

    #[test]
    fn parses_a_primary() {
        let s = primary();
        assert!(!s.in_recovery);
        assert_eq!(s.replica, None);
        assert_eq!(s.timeline, Some(1));
        assert_eq!(
            s.standbys[0].lag_bytes,
            [Some(0), Some(0), Some(128), Some(2048)]
        );
        assert_eq!(s.standbys[0].lag_seconds, [Some(0.000512), None, Some(1.5)]);
        assert_eq!(s.slots.len(), 2);
        assert_eq!(s.slots[1].retained_bytes, None);
    }

    #[test]
    fn parses_a_replica() {
        let r = replica().replica.unwrap();
        assert_eq!(r.lag_bytes, Some(4096));
        assert_eq!(r.lag_seconds, Some(2.25));
        assert!(r.replay_paused);
        assert_eq!(r.upstream_host.as_deref(), Some("db-1"));
        assert_eq!(r.upstream_port, Some(5432));
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        assert!(parse(&[], &[], &[]).is_err());
        let mut bad = replica_rows();
        bad[0][5] = Some("lots".into());
        assert!(parse(&bad, &[], &[]).unwrap_err().contains("column 6"));
    }

    #[test]
    fn json_of_a_primary_follows_the_schema() {
        assert_eq!(
            render_json(&primary()),
            concat!(
                r#"{"schema":1,"role":"primary","timeline":1,"wal_lsn":"0/3000148","replica":null,"#,
                r#""standbys":[{"application_name":"replica_1","client_addr":"10.0.0.3","state":"streaming","sync_state":"async","#,
                r#""sent_lag_bytes":0,"write_lag_bytes":0,"flush_lag_bytes":128,"replay_lag_bytes":2048,"#,
                r#""write_lag_seconds":0.000512,"flush_lag_seconds":null,"replay_lag_seconds":1.5}],"#,
                r#""slots":[{"slot_name":"replica_1","slot_type":"physical","active":true,"retained_bytes":16777216,"wal_status":"reserved"},"#,
                r#"{"slot_name":"spare","slot_type":"physical","active":false,"retained_bytes":null,"wal_status":null}]}"#,
                "\n"
            )
        );
    }

    #[test]
    fn json_of_a_replica_follows_the_schema() {
        assert_eq!(
            render_json(&replica()),
            concat!(
                r#"{"schema":1,"role":"replica","timeline":2,"wal_lsn":"0/5000000","#,
                r#""replica":{"receive_lsn":"0/5000000","replay_lsn":"0/4FFF000","lag_bytes":4096,"lag_seconds":2.25,"#,
                r#""replay_paused":true,"receiver_status":"streaming","upstream_host":"db-1","upstream_port":5432},"#,
                r#""standbys":[],"slots":[]}"#,
                "\n"
            )
        );
    }

    #[test]
    fn table_of_a_primary() {
        assert_eq!(
            render_table(&primary()),
            "primary, timeline 1, WAL at 0/3000148

STANDBY    CLIENT    STATE      SYNC   SENT  WRITTEN  FLUSHED  REPLAYED  WRITE LAG  FLUSH LAG  REPLAY LAG
replica_1  10.0.0.3  streaming  async  0 B   0 B      128 B    2.0 KiB   0.001 s    -          1.500 s

SLOT       TYPE      ACTIVE  RETAINED  WAL STATUS
replica_1  physical  yes     16.0 MiB  reserved
spare      physical  no      -         -
"
        );
    }

    #[test]
    fn table_of_a_replica() {
        assert_eq!(
            render_table(&replica()),
            "replica, timeline 2, WAL at 0/5000000
upstream       db-1:5432 (WAL receiver: streaming)
received       0/5000000
replayed       0/4FFF000
replay lag     4.0 KiB, 2.250 s
replay paused  yes
"
        );
    }

    #[test]
    fn an_idle_primary_says_what_is_missing() {
        let (server, _, _) = primary_rows();
        let text = render_table(&parse(&server, &[], &[]).unwrap());
        assert!(text.contains("no standbys connected"), "{text}");
        assert!(text.contains("no replication slots"), "{text}");
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(None), "-");
        assert_eq!(human_bytes(Some(1023)), "1023 B");
        assert_eq!(human_bytes(Some(1536)), "1.5 KiB");
        assert_eq!(human_bytes(Some(16 << 20)), "16.0 MiB");
        assert_eq!(human_bytes(Some(3 << 40)), "3.0 TiB");
        assert_eq!(human_bytes(Some(-2048)), "-2.0 KiB");
    }
}
