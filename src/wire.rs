//! A minimal PostgreSQL frontend: startup, authentication (SCRAM-SHA-256, md5,
//! cleartext, trust) and the simple query protocol, over TCP or a unix socket.
//!
//! It exists because pgentry needs replication connections (`replication=true`, for
//! IDENTIFY_SYSTEM and CREATE_REPLICATION_SLOT), which tokio-postgres cannot open,
//! and one small client serving every use beats two. Message encoding and the SCRAM
//! exchange come from `postgres-protocol`.

use crate::secrets::Secret;
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend::Message, frontend};
use std::fmt;
use std::io;
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp {
        host: String,
        port: u16,
    },
    /// The socket `<dir>/.s.PGSQL.<port>`.
    Unix {
        dir: PathBuf,
        port: u16,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix { dir, port } => write!(f, "{}/.s.PGSQL.{port}", dir.display()),
        }
    }
}

pub struct Params<'a> {
    pub endpoint: &'a Endpoint,
    pub user: &'a str,
    pub password: Option<&'a Secret>,
    /// None connects to the database named like the user (libpq's default).
    pub database: Option<&'a str>,
    /// A physical replication connection: replication commands only.
    pub replication: bool,
    pub application_name: &'a str,
}

/// An ErrorResponse from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// Wrong password or no pg_hba entry: waiting will not help.
    pub fn is_auth_failure(&self) -> bool {
        self.code.starts_with("28")
    }
}

#[derive(Debug)]
pub enum Error {
    /// The server could not be reached: resolution, refusal, unreachable network.
    Connect(io::Error),
    /// The server answered with an error.
    Server(ServerError),
    /// The connection broke after it was made.
    Io(io::Error),
    /// The server said something this client does not handle.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "{e}"),
            Error::Server(e) => write!(f, "{} (SQLSTATE {})", e.message, e.code),
            Error::Io(e) => write!(f, "connection lost: {e}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// A result row in text format; None is SQL NULL.
pub type Row = Vec<Option<String>>;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

pub struct Connection {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
}

impl Connection {
    pub async fn connect(p: &Params<'_>) -> Result<Connection, Error> {
        let stream = match p.endpoint {
            Endpoint::Tcp { host, port } => {
                let tcp = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(Error::Connect)?;
                tcp.set_nodelay(true).map_err(Error::Connect)?;
                Stream::Tcp(tcp)
            }
            Endpoint::Unix { dir, port } => Stream::Unix(
                UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                    .await
                    .map_err(Error::Connect)?,
            ),
        };
        let mut conn = Connection {
            stream,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::with_capacity(1024),
        };
        conn.startup(p).await?;
        Ok(conn)
    }

    async fn startup(&mut self, p: &Params<'_>) -> Result<(), Error> {
        let mut params = vec![("user", p.user), ("application_name", p.application_name)];
        if let Some(db) = p.database {
            params.push(("database", db));
        }
        if p.replication {
            params.push(("replication", "true"));
        }
        params.push(("client_encoding", "UTF8"));
        frontend::startup_message(params.iter().copied(), &mut self.write)?;
        self.flush().await?;
        loop {
            match self.next().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = password(p)?;
                    frontend::password_message(pw.expose().as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = password(p)?;
                    let hash = md5_hash(p.user.as_bytes(), pw.expose().as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let pw = password(p)?;
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(m) = mechanisms.next()? {
                        scram_offered |= m == sasl::SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(Error::Protocol(
                            "server offers no SASL mechanism pgentry supports".into(),
                        ));
                    }
                    self.scram(pw).await?;
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(Error::Server(server_error(body)?)),
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                _ => return Err(Error::Protocol("unexpected message during startup".into())),
            }
        }
    }

    async fn scram(&mut self, password: &Secret) -> Result<(), Error> {
        let mut scram = sasl::ScramSha256::new(
            password.expose().as_bytes(),
            sasl::ChannelBinding::unsupported(),
        );
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut self.write)?;
        self.flush().await?;
        match self.next().await? {
            Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
            Message::ErrorResponse(body) => return Err(Error::Server(server_error(body)?)),
            _ => return Err(Error::Protocol("unexpected message during SCRAM".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.write)?;
        self.flush().await?;
        match self.next().await? {
            Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
            Message::ErrorResponse(body) => return Err(Error::Server(server_error(body)?)),
            _ => return Err(Error::Protocol("unexpected message during SCRAM".into())),
        }
        Ok(())
    }

    /// Runs `sql` with the simple query protocol and returns the rows of every
    /// statement in it, in order. An error from any statement is returned after the
    /// server is ready again, so the connection stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, Error> {
        self.query(sql, None).await
    }

    /// Runs a `COPY ... FROM STDIN` statement, sending `data` (text format, as
    /// pg_dump writes it) when the server asks for it.
    pub async fn copy_in(&mut self, sql: &str, data: &[u8]) -> Result<(), Error> {
        self.query(sql, Some(data)).await.map(drop)
    }

    /// The simple query protocol; `copy_data` answers a CopyInResponse, and without
    /// it a COPY FROM STDIN is failed rather than left waiting.
    async fn query(&mut self, sql: &str, copy_data: Option<&[u8]>) -> Result<Vec<Row>, Error> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges.next()? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(body)?),
                Message::ReadyForQuery(_) => break,
                Message::CopyInResponse(_) => {
                    match copy_data {
                        Some(data) => {
                            frontend::CopyData::new(data)?.write(&mut self.write);
                            frontend::copy_done(&mut self.write);
                        }
                        None => frontend::copy_fail("no COPY data given", &mut self.write)?,
                    }
                    self.flush().await?;
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(Error::Server(e)),
            None => Ok(rows),
        }
    }

    /// Says goodbye, so the server logs no "unexpected EOF".
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> io::Result<()> {
        let buf = self.write.split();
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(&buf).await,
            Stream::Unix(s) => s.write_all(&buf).await,
        }
    }

    async fn next(&mut self) -> Result<Message, Error> {
        loop {
            if let Some(message) = Message::parse(&mut self.read)? {
                return Ok(message);
            }
            let n = match &mut self.stream {
                Stream::Tcp(s) => s.read_buf(&mut self.read).await?,
                Stream::Unix(s) => s.read_buf(&mut self.read).await?,
            };
            if n == 0 {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }
}

fn password<'a>(p: &Params<'a>) -> Result<&'a Secret, Error> {
    p.password.ok_or_else(|| {
        Error::Server(ServerError {
            code: "28P01".into(),
            message: format!(
                "the server asks a password for user {:?}, and none is configured",
                p.user
            ),
        })
    })
}

fn server_error(
    body: postgres_protocol::message::backend::ErrorResponseBody,
) -> Result<ServerError, Error> {
    let mut fields = body.fields();
    let mut e = ServerError {
        code: String::new(),
        message: String::new(),
    };
    while let Some(field) = fields.next()? {
        match field.type_() {
            b'C' => e.code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => e.message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    Ok(e)
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on by default).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn auth_failures_are_class_28() {
        let e = |code: &str| ServerError {
            code: code.into(),
            message: String::new(),
        };
        assert!(e("28P01").is_auth_failure());
        assert!(e("28000").is_auth_failure());
        assert!(!e("57P03").is_auth_failure());
    }
}
