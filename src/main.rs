//! pgentry: the entrypoint, healthcheck and status tool of a PostgreSQL 15
//! streaming-replication container. main only parses the command and dispatches.

mod child;
mod cli;
mod clone;
mod config;
mod conninfo;
mod exec;
mod health;
mod initscripts;
mod local;
mod log;
mod pgbin;
mod pgdata;
mod primary;
mod privileges;
mod replica;
mod run;
mod secrets;
mod signals;
mod staging;
mod standby;
mod status;
mod tempserver;
mod upstream;
mod wire;

use cli::Command;
use std::process::ExitCode;

fn main() -> ExitCode {
    log::set_format_from_env();
    let args: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let command = match args
        .map_err(|_| "arguments must be UTF-8".to_string())
        .and_then(|a| cli::parse(&a))
    {
        Ok(c) => c,
        // Docker and Kubernetes read a healthcheck's exit code as 0 or 1 only.
        Err(message) if std::env::args().nth(1).as_deref() == Some("healthcheck") => {
            return health::report(&health::Verdict::unhealthy(message));
        }
        Err(message) => {
            log::emit(log::Level::Error, &message);
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Run(extra) => run::run(&extra),
        Command::CheckConfig => run::check_config(),
        // Exit 0 or 1 and nothing else, with its own line on stdout: not main's way.
        Command::Healthcheck(probe) => return health::run(probe),
        Command::Status { json } => status::run(json),
        Command::Help => {
            print!("{}", cli::help());
            Ok(())
        }
        Command::Version => {
            println!("pgentry {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<signals::Interrupted>() {
            Some(signals::Interrupted(name)) => {
                log::emit(log::Level::Info, &format!("stopped by {name}"));
                ExitCode::from(if *name == "SIGINT" { 130 } else { 143 })
            }
            None => {
                log::emit(log::Level::Error, &format!("{e:#}"));
                ExitCode::FAILURE
            }
        },
    }
}
