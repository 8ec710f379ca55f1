//! Secrets: values that must never reach a log, a command line or a child's environment.
//!
//! A secret comes either inline (`NAME`) or from a file (`NAME_FILE`, the Docker
//! secrets convention). Giving both is ambiguous and therefore an error.

use std::fmt;
use std::path::Path;

/// A password or other secret. Its `Debug` and `Display` print a redaction marker,
/// so a secret cannot leak through a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the few places that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret's value was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource<'a> {
    Inline(&'a str),
    File(&'a str),
}

/// Strips exactly one trailing newline (`\n` or `\r\n`): what `echo` or an editor adds
/// to a secret file. Other trailing white space is part of the password.
pub fn strip_one_newline(content: &str) -> &str {
    let content = content.strip_suffix('\n').unwrap_or(content);
    content.strip_suffix('\r').unwrap_or(content)
}

/// Reads a secret from its source; `name` is the setting's name, for the error.
pub fn load(name: &str, source: SecretSource<'_>) -> anyhow::Result<Secret> {
    match source {
        SecretSource::Inline(value) => Ok(Secret::new(value.to_string())),
        SecretSource::File(path) => {
            let content = std::fs::read(Path::new(path)).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read {name}_FILE={path}: {e}; mount the secret there or fix the path"
                )
            })?;
            let content = String::from_utf8(content).map_err(|_| {
                anyhow::anyhow!(
                    "{name}_FILE={path} is not valid UTF-8; store the secret as UTF-8 text"
                )
            })?;
            Ok(Secret::new(strip_one_newline(&content).to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_in_debug_and_display() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
    }

    #[test]
    fn strips_one_trailing_newline_only() {
        assert_eq!(strip_one_newline("pw\n"), "pw");
        assert_eq!(strip_one_newline("pw\r\n"), "pw");
        assert_eq!(strip_one_newline("pw\n\n"), "pw\n");
        assert_eq!(strip_one_newline("pw "), "pw ");
        assert_eq!(strip_one_newline(""), "");
    }

    #[test]
    fn file_errors_name_the_setting() {
        let err = load("X_PASSWORD", SecretSource::File("/nonexistent/pw")).unwrap_err();
        assert!(err.to_string().contains("X_PASSWORD_FILE=/nonexistent/pw"));
    }
}
