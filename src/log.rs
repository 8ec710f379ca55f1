//! One line per event on stderr: `docker logs` shows it, and a log shipper can read
//! the JSON form. Nothing here knows about secrets: callers pass messages that cannot
//! contain one (the `Secret` type redacts itself).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Chooses the format; until it is chosen, lines are text.
pub fn set_format(format: Format) {
    JSON.store(format == Format::Json, Ordering::Relaxed);
}

/// Takes PGENTRY_LOG_FORMAT from the environment before anything else runs, so that
/// even an error in the rest of the configuration reaches a log shipper as JSON.
pub fn set_format_from_env() {
    if std::env::var_os("PGENTRY_LOG_FORMAT").is_some_and(|v| v == "json") {
        set_format(Format::Json);
    }
}

fn format() -> Format {
    if JSON.load(Ordering::Relaxed) {
        Format::Json
    } else {
        Format::Text
    }
}

pub fn emit(level: Level, message: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let line = render(format(), level, now.as_millis(), message);
    // A closed stderr must not turn a log line into a failure of the entrypoint.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn render(format: Format, level: Level, unix_millis: u128, message: &str) -> String {
    let ts = rfc3339_millis(unix_millis);
    match format {
        Format::Text => format!(
            "{ts} {:<5} pgentry: {message}\n",
            level.as_str().to_uppercase()
        ),
        Format::Json => format!(
            "{{\"ts\":\"{ts}\",\"level\":\"{}\",\"logger\":\"pgentry\",\"msg\":{}}}\n",
            level.as_str(),
            json_string(message)
        ),
    }
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`, by Howard Hinnant's days-to-civil algorithm.
pub fn rfc3339_millis(unix_millis: u128) -> String {
    let secs = (unix_millis / 1000) as i64;
    let millis = (unix_millis % 1000) as u32;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::Level::Info, &format!($($arg)*)) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::Level::Warn, &format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_millis(1_795_716_170_999),
            "2026-11-26T18:02:50.999Z"
        );
    }

    #[test]
    fn text_and_json_lines() {
        assert_eq!(
            render(Format::Text, Level::Warn, 0, "x"),
            "1970-01-01T00:00:00.000Z WARN  pgentry: x\n"
        );
        assert_eq!(
            render(Format::Json, Level::Info, 0, "a \"b\"\n"),
            "{\"ts\":\"1970-01-01T00:00:00.000Z\",\"level\":\"info\",\"logger\":\"pgentry\",\"msg\":\"a \\\"b\\\"\\n\"}\n"
        );
    }
}
