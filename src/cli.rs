//! The command line: a few subcommands, parsed by hand (a CLI framework would cost
//! more binary than the whole parser).

use crate::config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Readiness,
    Liveness,
    Startup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Prepare PGDATA for the role, then exec postgres with these extra arguments.
    Run(Vec<String>),
    Healthcheck(Probe),
    Status {
        json: bool,
    },
    CheckConfig,
    Help,
    Version,
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let (first, rest) = match args.split_first() {
        None => return Ok(Command::Run(Vec::new())),
        Some((first, rest)) => (first.as_str(), rest),
    };
    let no_more = |cmd: Command| match rest.first() {
        None => Ok(cmd),
        Some(extra) => Err(format!(
            "unexpected argument {extra:?} after {first:?}; see `pgentry --help`"
        )),
    };
    match first {
        "run" => match rest.split_first() {
            None => Ok(Command::Run(Vec::new())),
            Some((sep, extra)) if sep == "--" => Ok(Command::Run(extra.to_vec())),
            // `pgentry run -c x=y` reads naturally too: everything goes to postgres.
            Some(_) => Ok(Command::Run(rest.to_vec())),
        },
        "healthcheck" => match rest {
            [] => Ok(Command::Healthcheck(Probe::Readiness)),
            [mode] => match mode.as_str() {
                "--readiness" => Ok(Command::Healthcheck(Probe::Readiness)),
                "--liveness" => Ok(Command::Healthcheck(Probe::Liveness)),
                "--startup" => Ok(Command::Healthcheck(Probe::Startup)),
                other => Err(format!(
                    "unknown healthcheck mode {other:?}; use --readiness, --liveness or --startup"
                )),
            },
            _ => Err("healthcheck takes one mode at most; see `pgentry --help`".into()),
        },
        "status" => match rest {
            [] => Ok(Command::Status { json: false }),
            [flag] if flag == "--json" => Ok(Command::Status { json: true }),
            _ => Err("status takes only --json; see `pgentry --help`".into()),
        },
        "check-config" => no_more(Command::CheckConfig),
        "help" | "--help" | "-h" => Ok(Command::Help),
        "version" | "--version" | "-V" => Ok(Command::Version),
        // The official image's convention: `docker run image postgres -c x=y`.
        "postgres" => Ok(Command::Run(rest.to_vec())),
        other if other.starts_with('-') => Ok(Command::Run(args.to_vec())),
        other => Err(format!("unknown command {other:?}; see `pgentry --help`")),
    }
}

pub fn help() -> String {
    format!(
        "pgentry {} - entrypoint, healthcheck and status for PostgreSQL 15 streaming replication

USAGE:
  pgentry run [-- POSTGRES_ARGS...]   prepare PGDATA for the role, then exec postgres
  pgentry healthcheck [--readiness|--liveness|--startup]
                                      exit 0 healthy, 1 not; one line on stdout says why
  pgentry status [--json]             the replication picture of this server
  pgentry check-config                print the effective configuration, secrets redacted
  pgentry --version | --help

With no command, pgentry runs (`pgentry -c x=y` and `pgentry postgres -c x=y` pass the
arguments to postgres, as the official image does).

CONFIGURATION (environment, over the TOML file PGENTRY_CONFIG [default: {}];
the TOML key is the name in lower case without PGENTRY_, and pgdata, port):
{}",
        env!("CARGO_PKG_VERSION"),
        config::DEFAULT_CONFIG_FILE,
        config::help_table()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn commands() {
        assert_eq!(p(&[]), Ok(Command::Run(vec![])));
        assert_eq!(p(&["run"]), Ok(Command::Run(vec![])));
        assert_eq!(
            p(&["run", "--", "-c", "a=b"]),
            Ok(Command::Run(vec!["-c".into(), "a=b".into()]))
        );
        assert_eq!(
            p(&["-c", "a=b"]),
            Ok(Command::Run(vec!["-c".into(), "a=b".into()]))
        );
        assert_eq!(
            p(&["postgres", "-c", "a=b"]),
            Ok(Command::Run(vec!["-c".into(), "a=b".into()]))
        );
        assert_eq!(
            p(&["healthcheck"]),
            Ok(Command::Healthcheck(Probe::Readiness))
        );
        assert_eq!(
            p(&["healthcheck", "--liveness"]),
            Ok(Command::Healthcheck(Probe::Liveness))
        );
        assert_eq!(
            p(&["healthcheck", "--startup"]),
            Ok(Command::Healthcheck(Probe::Startup))
        );
        assert_eq!(p(&["status", "--json"]), Ok(Command::Status { json: true }));
        assert_eq!(p(&["check-config"]), Ok(Command::CheckConfig));
        assert_eq!(p(&["--version"]), Ok(Command::Version));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
    }

    #[test]
    fn mistakes() {
        assert!(p(&["bogus"]).unwrap_err().contains("unknown command"));
        assert!(p(&["healthcheck", "--deep"]).is_err());
        assert!(p(&["status", "--yaml"]).is_err());
        assert!(p(&["check-config", "x"]).is_err());
    }

    #[test]
    fn help_lists_every_setting() {
        let text = help();
        for s in config::SETTINGS {
            assert!(text.contains(s.env), "{}", s.env);
        }
    }
}
