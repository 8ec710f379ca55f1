//! /docker-entrypoint-initdb.d on first start, as the official image runs it:
//! `*.sql` and `*.sql.gz` through pgentry's own connection, `*.sh` with /bin/sh where
//! there is one, everything else ignored, in name order.

use crate::wire::Connection;
use crate::{info, warn};
use anyhow::{anyhow, bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    Sql(PathBuf),
    SqlGz(PathBuf),
    Shell(PathBuf),
    Ignored(PathBuf),
}

/// Pure: the kind of each file name, sorted by name.
pub fn classify(mut paths: Vec<PathBuf>) -> Vec<Script> {
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".sql") {
                Script::Sql(p)
            } else if name.ends_with(".sql.gz") {
                Script::SqlGz(p)
            } else if name.ends_with(".sh") {
                Script::Shell(p)
            } else {
                Script::Ignored(p)
            }
        })
        .collect()
}

/// One unit of a script, as psql reads a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    Sql(String),
    /// `COPY ... FROM stdin` and its data, the lines up to `\.` (pg_dump's form).
    CopyIn {
        sql: String,
        data: String,
    },
    /// A psql meta-command line (`\connect`, `\restrict`...).
    Meta(String),
}

/// Splits SQL text into statements on top-level semicolons, honouring quotes,
/// quoted identifiers, dollar quoting and both comment styles. Each statement then
/// runs on its own, as psql runs a file: `CREATE DATABASE` cannot share a
/// multi-statement query.
pub fn split_statements(sql: &str) -> Vec<Statement> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut comment_depth = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if comment_depth > 0 {
            if c == '*' && next == Some('/') {
                comment_depth -= 1;
                i += 2;
            } else if c == '/' && next == Some('*') {
                comment_depth += 1;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        match c {
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                comment_depth = 1;
                i += 2;
            }
            '\'' | '"' => {
                i += 1;
                while i < chars.len() {
                    if chars[i] == c && chars.get(i + 1) == Some(&c) {
                        i += 2;
                    } else if chars[i] == c {
                        i += 1;
                        break;
                    } else {
                        i += 1;
                    }
                }
            }
            '$' => match dollar_tag(&chars[i..]) {
                Some(tag) => {
                    let tag: Vec<char> = tag.chars().collect();
                    i += tag.len();
                    while i < chars.len() && !chars[i..].starts_with(&tag) {
                        i += 1;
                    }
                    i = (i + tag.len()).min(chars.len());
                }
                None => i += 1,
            },
            '\\' if statement_text(&chars[start..i]).is_none() => {
                let end = line_after(&chars, i);
                let line: String = chars[i..end].iter().collect();
                out.push(Statement::Meta(line.trim_end().to_string()));
                i = end;
                start = i;
            }
            ';' => {
                let sql = statement_text(&chars[start..i]);
                i += 1;
                match sql {
                    Some(sql) if is_copy_from_stdin(&sql) => {
                        let (data, end) = copy_data(&chars, i);
                        out.push(Statement::CopyIn { sql, data });
                        i = end;
                    }
                    Some(sql) => out.push(Statement::Sql(sql)),
                    None => {}
                }
                start = i;
            }
            _ => i += 1,
        }
    }
    out.extend(statement_text(&chars[start..]).map(Statement::Sql));
    out
}

/// `COPY ... FROM STDIN`, comment lines aside.
fn is_copy_from_stdin(sql: &str) -> bool {
    let words: Vec<String> = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .flat_map(|l| l.split_whitespace())
        .map(|w| w.to_ascii_uppercase())
        .collect();
    words.first().is_some_and(|w| w == "COPY")
        && words
            .windows(2)
            .any(|w| w[0] == "FROM" && w[1].starts_with("STDIN"))
}

/// Where the line after the one holding `at` begins.
fn line_after(chars: &[char], at: usize) -> usize {
    chars[at..]
        .iter()
        .position(|&c| c == '\n')
        .map_or(chars.len(), |p| at + p + 1)
}

/// The COPY data: the lines after the one where the statement ended (at `from`), up
/// to the line `\.`. Returns the data and where the script goes on.
fn copy_data(chars: &[char], from: usize) -> (String, usize) {
    let data_start = line_after(chars, from);
    let mut line_start = data_start;
    while line_start < chars.len() {
        let next = line_after(chars, line_start);
        let line: String = chars[line_start..next].iter().collect();
        if line.trim_end_matches(['\n', '\r']) == "\\." {
            return (chars[data_start..line_start].iter().collect(), next);
        }
        line_start = next;
    }
    (chars[data_start..].iter().collect(), chars.len())
}

/// `$tag$` or `$$` at the start of `s`.
fn dollar_tag(s: &[char]) -> Option<String> {
    let end = s.iter().skip(1).position(|&c| c == '$')? + 1;
    let inner = &s[1..end];
    let valid = inner.iter().all(|c| c.is_alphanumeric() || *c == '_')
        && !inner.first().is_some_and(|c| c.is_ascii_digit());
    valid.then(|| s[..=end].iter().collect())
}

/// The statement's text, or None if it is only white space and comments.
fn statement_text(chars: &[char]) -> Option<String> {
    let text: String = chars.iter().collect();
    (!is_blank_sql(&text)).then(|| text.trim().to_string())
}

/// Only white space and comments.
fn is_blank_sql(text: &str) -> bool {
    text.lines()
        .map(|l| l.split("--").next().unwrap_or("").trim())
        .all(|l| l.is_empty())
        && !text.contains("/*")
}

/// Runs every script of `dir` in name order. A missing directory is no scripts.
pub async fn run_all(
    dir: &Path,
    conn: &mut Connection,
    shell_env: &[(String, String)],
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    for script in classify(entries) {
        match script {
            Script::Sql(path) => {
                let sql = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                run_sql(&path, &sql, conn).await?;
            }
            Script::SqlGz(path) => {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let mut sql = String::new();
                flate2::read::GzDecoder::new(file)
                    .read_to_string(&mut sql)
                    .with_context(|| format!("cannot decompress {}", path.display()))?;
                run_sql(&path, &sql, conn).await?;
            }
            Script::Shell(path) => run_shell(&path, shell_env).await?,
            Script::Ignored(path) => {
                warn!("ignoring {} (not .sql, .sql.gz or .sh)", path.display())
            }
        }
    }
    Ok(())
}

fn is_restrict(meta: &str) -> bool {
    matches!(
        meta.split_whitespace().next(),
        Some("\\restrict" | "\\unrestrict")
    )
}

async fn run_sql(path: &Path, sql: &str, conn: &mut Connection) -> Result<()> {
    info!("running {}", path.display());
    for statement in split_statements(sql) {
        let result = match &statement {
            Statement::Sql(sql) => conn.simple_query(sql).await.map(drop),
            Statement::CopyIn { sql, data } => conn.copy_in(sql, data.as_bytes()).await,
            // pg_dump's guard (since 15.14) against a server injecting meta-commands
            // into psql: there is no psql here to guard.
            Statement::Meta(line) if is_restrict(line) => Ok(()),
            Statement::Meta(line) => bail!(
                "{} uses the psql meta-command {line:?}, which pgentry does not run; remove it, or use a .sh script with psql",
                path.display()
            ),
        };
        result.map_err(|e| {
            anyhow!(
                "{} failed: {e}; fix the script: the next start initialises the cluster afresh",
                path.display()
            )
        })?;
    }
    Ok(())
}

async fn run_shell(path: &Path, env: &[(String, String)]) -> Result<()> {
    const SH: &str = "/bin/sh";
    if !Path::new(SH).exists() {
        bail!(
            "{} needs {SH}, which this image does not have; rewrite it as a .sql file",
            path.display()
        );
    }
    info!("running {}", path.display());
    let status = crate::child::command(SH, nix::sys::signal::Signal::SIGKILL)
        .arg(path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .await
        .with_context(|| format!("cannot run {}", path.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); fix the script: the next start initialises the cluster afresh",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_and_sorts() {
        let got = classify(vec![
            "b.sh".into(),
            "a.sql".into(),
            "c.sql.gz".into(),
            "README".into(),
        ]);
        assert_eq!(
            got,
            [
                Script::Ignored("README".into()),
                Script::Sql("a.sql".into()),
                Script::Shell("b.sh".into()),
                Script::SqlGz("c.sql.gz".into())
            ]
        );
    }

    #[test]
    fn splits_on_top_level_semicolons_only() {
        let sql = "CREATE DATABASE a;\n-- a comment; with a semicolon\nINSERT INTO t VALUES ('x;y', \"we;ird\");\n\
                   CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n\
                   /* block; /* nested; */ still */ SELECT $$a;b$$;\n  ;\n-- trailing comment";
        assert_eq!(
            sqls(sql),
            [
                "CREATE DATABASE a",
                "-- a comment; with a semicolon\nINSERT INTO t VALUES ('x;y', \"we;ird\")",
                "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql",
                "/* block; /* nested; */ still */ SELECT $$a;b$$",
            ]
        );
    }

    fn sqls(sql: &str) -> Vec<String> {
        split_statements(sql)
            .into_iter()
            .map(|s| match s {
                Statement::Sql(sql) => sql,
                other => panic!("not plain SQL: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn quotes_with_doubled_quotes_and_positional_params() {
        assert_eq!(
            sqls("SELECT 'it''s;'; SELECT $1"),
            ["SELECT 'it''s;'", "SELECT $1"]
        );
        assert_eq!(sqls("SELECT 1"), ["SELECT 1"]);
        assert!(sqls("  -- nothing\n").is_empty());
    }

    #[test]
    fn copy_from_stdin_takes_the_lines_up_to_backslash_dot() {
        let dump = "\\restrict abc\nCREATE TABLE t (a int, b text);\n\
                    COPY public.t (a, b) FROM stdin;\n1\tx;y\n2\t\\N\n\\.\n\
                    SELECT 1;\ncopy t from STDIN;\r\n3\tz\r\n\\.\r\n\\unrestrict abc\n";
        let copy = |sql: &str, data: &str| Statement::CopyIn {
            sql: sql.into(),
            data: data.into(),
        };
        assert_eq!(
            split_statements(dump),
            [
                Statement::Meta("\\restrict abc".into()),
                Statement::Sql("CREATE TABLE t (a int, b text)".into()),
                copy("COPY public.t (a, b) FROM stdin", "1\tx;y\n2\t\\N\n"),
                Statement::Sql("SELECT 1".into()),
                copy("copy t from STDIN", "3\tz\r\n"),
                Statement::Meta("\\unrestrict abc".into()),
            ]
        );
        // COPY to the client is the server's answer, not data in the script.
        assert_eq!(
            split_statements("COPY t TO STDOUT; SELECT 2")[0],
            Statement::Sql("COPY t TO STDOUT".into())
        );
        // A backslash inside a statement is the statement's.
        assert_eq!(sqls("SELECT E'\\n' \\gx"), ["SELECT E'\\n' \\gx"]);
        assert!(
            is_restrict("\\restrict k")
                && is_restrict("\\unrestrict k")
                && !is_restrict("\\connect db")
        );
    }
}
