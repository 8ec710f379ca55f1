//! How pgentry's own probes (`healthcheck`, `status`) reach the server in this
//! container: as the superuser, over the unix socket, or over TCP to 127.0.0.1 when
//! there is no socket (a server configured without one, or a socket directory that
//! is not shared with the probe).

use crate::config::Config;
use crate::wire::{self, Connection, Endpoint, Params};

/// Every cluster has it from initdb on, unlike a database named after the
/// superuser (POSTGRES_DB may differ); and unlike template1, a session in it never
/// blocks CREATE DATABASE.
const DATABASE: &str = "postgres";

/// The unix socket when its file exists, else TCP to 127.0.0.1 on the same port.
pub fn endpoint(config: &Config) -> Endpoint {
    let socket = config.socket_dir.join(format!(".s.PGSQL.{}", config.port));
    if socket.exists() {
        Endpoint::Unix {
            dir: config.socket_dir.clone(),
            port: config.port,
        }
    } else {
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: config.port,
        }
    }
}

/// Where the probe knocked, for messages: a TCP endpoint means the socket was missing.
pub fn describe(config: &Config, endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Unix { .. } => endpoint.to_string(),
        Endpoint::Tcp { .. } => {
            format!("{endpoint} (no socket in {})", config.socket_dir.display())
        }
    }
}

/// One connection to `endpoint` as the configured superuser.
pub async fn connect(
    config: &Config,
    endpoint: &Endpoint,
    application_name: &str,
) -> Result<Connection, wire::Error> {
    Connection::connect(&Params {
        endpoint,
        user: &config.superuser,
        password: config.superuser_password.as_ref(),
        database: Some(DATABASE),
        replication: false,
        application_name,
    })
    .await
}
