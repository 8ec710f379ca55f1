//! Quoting for the three little languages a replica's settings pass through:
//! libpq connection strings, postgresql.conf string literals and .pgpass lines.
//!
//! primary_conninfo is quoted twice: each value as a libpq conninfo value, then the
//! whole string as a configuration-file literal. Getting either wrong breaks on the
//! first password or host name with a quote or backslash in it.

/// Quotes a libpq conninfo value: single quotes around it, `\` and `'` escaped by a
/// backslash (libpq's rule for quoted values).
pub fn quote_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Builds a conninfo string from key/value pairs, every value quoted.
pub fn build(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", quote_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a postgresql.conf string literal: single quotes, an embedded `'` doubled and
/// `\` escaped, as the configuration file parser expects.
pub fn quote_conf_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Escapes one .pgpass field: `:` and `\` are escaped by a backslash.
pub fn escape_pgpass_field(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A .pgpass line matching any host, port and database for `user`: the passfile
/// serves exactly one connection, so wildcards cannot match anything unintended.
pub fn pgpass_line(user: &str, password: &str) -> String {
    format!(
        "*:*:*:{}:{}\n",
        escape_pgpass_field(user),
        escape_pgpass_field(password)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_escape_quote_and_backslash() {
        assert_eq!(quote_value("plain"), "'plain'");
        assert_eq!(quote_value(r"a'b\c d"), r"'a\'b\\c d'");
        assert_eq!(quote_value(""), "''");
        assert_eq!(quote_value("é"), "'é'");
    }

    #[test]
    fn conninfo_joins_pairs() {
        assert_eq!(
            build(&[("host", "db 1"), ("port", "5432")]),
            "host='db 1' port='5432'"
        );
    }

    #[test]
    fn conf_strings_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_conf_string(r"host='a\'b'"), r"'host=''a\\''b'''");
    }

    #[test]
    fn pgpass_escapes_colon_and_backslash_only() {
        assert_eq!(escape_pgpass_field(r#"a:b\c' "$é"#), r#"a\:b\\c' "$é"#);
        assert_eq!(pgpass_line("rep", "p:w"), "*:*:*:rep:p\\:w\n");
    }

    /// The two layers compose: unquoting the conf literal, then the conninfo value,
    /// gives back the original password.
    #[test]
    fn double_quoting_round_trips() {
        let pw = r#"' \ " : $ é"#;
        let conf = quote_conf_string(&build(&[("password", pw)]));
        let inner = conf[1..conf.len() - 1]
            .replace("''", "'")
            .replace("\\\\", "\\");
        assert_eq!(inner, build(&[("password", pw)]));
        let value = &inner["password='".len()..inner.len() - 1];
        let mut unescaped = String::new();
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            unescaped.push(if c == '\\' { chars.next().unwrap() } else { c });
        }
        assert_eq!(unescaped, pw);
    }
}
