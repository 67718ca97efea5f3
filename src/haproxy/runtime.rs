//! Typed client for HAProxy's Runtime API (the stats socket): commands, replies, batches and atomic map replacement.
//!
//! Wire facts this module relies on (checked against HAProxy 2.6.12):
//! - a connection in the default, non-interactive mode takes one request line, runs every
//!   `;`-separated command on it, and closes; after the `prompt` command it stays open and
//!   prints `"> "` after every reply;
//! - every reply ends with an empty line, and a reply never contains one, so a command whose
//!   success prints nothing (`add map`, `set map`, `del map`, `clear map`, `commit map`,
//!   `shutdown sessions server`) answers with a lone `"\n"`;
//! - errors are plain text with no status code (`"entry not found."`, `"Unknown map
//!   identifier. Please use #<id> or <file>."`, `"Permission denied"`, ...): a reply is judged
//!   by whether it has the shape the command's success has;
//! - map changes made here are not written to the map file: a reload re-reads the file.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

/// Time allowed to connect to the socket.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for each read or write on an open connection.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line sent, newline included: HAProxy's default `tune.bufsize` (16384)
/// less the default `tune.maxrewrite` reserve (1024) that a channel buffer keeps free.
pub const DEFAULT_MAX_LINE: usize = 16384 - 1024;

/// Where the Runtime API listens: `stats socket /path` or `stats socket ipv4@addr:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

impl From<PathBuf> for Endpoint {
    fn from(path: PathBuf) -> Self {
        Endpoint::Unix(path)
    }
}

impl From<&Path> for Endpoint {
    fn from(path: &Path) -> Self {
        Endpoint::Unix(path.to_path_buf())
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint::Tcp(addr)
    }
}

/// What HAProxy's error text says went wrong (the text itself stays in the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// `Unknown map identifier. Please use #<id> or <file>.`
    UnknownMap,
    /// `entry not found.` (set map), `Key not found.` (del map), `key or pattern not found.`
    EntryNotFound,
    /// `Unknown command...` followed by the usage list.
    UnknownCommand,
    /// `Permission denied`: the socket's `level` is too low.
    PermissionDenied,
    /// `No such backend.`, `Can't find backend.`
    NoSuchBackend,
    /// `No such server.`
    NoSuchServer,
    /// `Version number in the future, please use 'prepare map' before.`
    VersionInFuture,
    /// `Version number out of range.`
    VersionOutOfRange,
    /// `Missing version number.`
    MissingVersion,
    /// `Can't display the certificate: Not found or the certificate is a bundle!`
    CertificateNotFound,
    /// A usage complaint such as `'set map' expects three parameters: ...`.
    Usage,
    /// Any other text where the command's success shape was expected.
    Other,
}

impl ReplyError {
    /// Classifies an error reply by its (2.6) text.
    pub fn classify(reply: &str) -> Self {
        let r = reply.trim_start();
        let has = |p: &str| r.starts_with(p);
        if has("Unknown map identifier") {
            ReplyError::UnknownMap
        } else if has("entry not found") || has("Key not found") || has("key or pattern not found")
        {
            ReplyError::EntryNotFound
        } else if has("Unknown command") {
            ReplyError::UnknownCommand
        } else if has("Permission denied") {
            ReplyError::PermissionDenied
        } else if has("No such backend") || has("Can't find backend") {
            ReplyError::NoSuchBackend
        } else if has("No such server") {
            ReplyError::NoSuchServer
        } else if has("Version number in the future") {
            ReplyError::VersionInFuture
        } else if has("Version number out of range") {
            ReplyError::VersionOutOfRange
        } else if has("Missing version number") {
            ReplyError::MissingVersion
        } else if has("Can't display the certificate: Not found") {
            ReplyError::CertificateNotFound
        } else if r.contains(" expects ") || has("Require ") || has("Missing ") {
            ReplyError::Usage
        } else {
            ReplyError::Other
        }
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ReplyError::UnknownMap => "unknown map",
            ReplyError::EntryNotFound => "entry not found",
            ReplyError::UnknownCommand => "unknown command",
            ReplyError::PermissionDenied => "permission denied",
            ReplyError::NoSuchBackend => "no such backend",
            ReplyError::NoSuchServer => "no such server",
            ReplyError::VersionInFuture => "map version not prepared",
            ReplyError::VersionOutOfRange => "map version out of range",
            ReplyError::MissingVersion => "missing map version",
            ReplyError::CertificateNotFound => "certificate not loaded",
            ReplyError::Usage => "bad usage",
            ReplyError::Other => "error",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong talking to the Runtime API.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("HAProxy runtime socket {endpoint}: {}", describe_connect_error(.source))]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error(
        "HAProxy runtime socket {endpoint}: no connection within {timeout:?} — is HAProxy running?"
    )]
    ConnectTimeout {
        endpoint: Endpoint,
        timeout: Duration,
    },
    #[error("HAProxy runtime socket {endpoint}: no progress within {timeout:?} on `{command}`")]
    Timeout {
        endpoint: Endpoint,
        timeout: Duration,
        command: String,
    },
    #[error("HAProxy runtime socket {endpoint}: {source} on `{command}`")]
    Io {
        endpoint: Endpoint,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("HAProxy runtime socket {endpoint}: connection closed after {got} of {expected} replies to `{command}`")]
    Truncated {
        endpoint: Endpoint,
        command: String,
        expected: usize,
        got: usize,
    },
    #[error("refusing to send {what} {value:?} to HAProxy: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("request line of {len} bytes is over the {max}-byte limit: `{command}`")]
    LineTooLong {
        command: String,
        len: usize,
        max: usize,
    },
    #[error("HAProxy rejected `{command}` ({kind}): {}", first_line(.reply))]
    Rejected {
        command: String,
        kind: ReplyError,
        reply: String,
    },
    #[error("unexpected reply to `{command}` ({reason}): {}", first_line(.reply))]
    UnexpectedReply {
        command: String,
        reason: &'static str,
        reply: String,
    },
}

impl RuntimeError {
    /// The classified HAProxy error, when HAProxy answered with one.
    pub fn reply_error(&self) -> Option<ReplyError> {
        match self {
            RuntimeError::Rejected { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// True when HAProxy could not be reached at all (not running, wrong path, timed out).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RuntimeError::Connect { .. } | RuntimeError::ConnectTimeout { .. }
        )
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

pub(crate) fn describe_connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused — is HAProxy running?".into(),
        io::ErrorKind::NotFound => "no such socket — is HAProxy running?".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// One Runtime API command. [`Command::render`] is the only place that knows the wire syntax.
///
/// Map paths must be absolute; keys, values, backend and server names must be single
/// tokens the line protocol carries as they are (see [`Command::render`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `show map <map>`: the current version's entries.
    ShowMap { map: PathBuf },
    /// `show map @<ver> <map>`: the entries of a prepared version.
    ShowMapVersion { map: PathBuf, version: u32 },
    /// `add map <map> <key> <value>` (does not check for an existing entry).
    AddMap {
        map: PathBuf,
        key: String,
        value: String,
    },
    /// `set map <map> <key> <value>`: changes every entry with that key.
    SetMap {
        map: PathBuf,
        key: String,
        value: String,
    },
    /// `del map <map> <key>`: removes every entry with that key.
    DelMap { map: PathBuf, key: String },
    /// `clear map <map>`: empties the current version.
    ClearMap { map: PathBuf },
    /// `clear map @<ver> <map>`: drops a prepared version's entries.
    ClearMapVersion { map: PathBuf, version: u32 },
    /// `prepare map <map>`: allocates a version for an atomic replacement.
    PrepareMap { map: PathBuf },
    /// `add map @<ver> <map> <key> <value>`: adds to a prepared version.
    AddMapVersion {
        map: PathBuf,
        version: u32,
        key: String,
        value: String,
    },
    /// `commit map @<ver> <map>`: atomically makes a prepared version current.
    CommitMap { map: PathBuf, version: u32 },
    /// `show info`
    ShowInfo,
    /// `show stat` (CSV)
    ShowStat,
    /// `show stat <backend> 2 -1`: one backend's own row (CSV), cheap with many backends.
    ShowStatOf { backend: String },
    /// `show stat -1 2 -1`: every backend's own row, without frontends and servers.
    ShowStatBackends,
    /// `show servers state` for every backend.
    ShowServersState,
    /// `show servers state <backend>`
    ShowServersStateOf { backend: String },
    /// `shutdown sessions server <backend>/<server>` (needs `level admin`).
    ShutdownSessionsServer { backend: String, server: String },
    /// `pgs show refused`: the refusal counters pg-route.lua registers on the stats socket
    /// (not a HAProxy built-in; an older Lua answers "Unknown command").
    ShowPgsRefused,
    /// `pgs show negotiations`: pg-route.lua's counts of new connections by negotiation.
    ShowPgsNegotiations,
    /// `show ssl cert <file>`: the certificate HAProxy serves under that file name.
    ShowSslCert { file: PathBuf },
    /// `new ssl cert <file>`: an empty certificate store for a file HAProxy did not load.
    NewSslCert { file: PathBuf },
    /// `set ssl cert <file> <<` + PEM: opens (or updates) a transaction with the new content.
    SetSslCert { file: PathBuf, pem: String },
    /// `commit ssl cert <file>`: serves the transaction's certificate to new handshakes.
    CommitSslCert { file: PathBuf },
    /// `abort ssl cert <file>`: drops an open transaction.
    AbortSslCert { file: PathBuf },
    /// `add ssl crt-list <list> <file>`: serves a committed new certificate on every bind
    /// that loads the crt-list or directory `list`.
    AddSslCrtList { list: PathBuf, file: PathBuf },
    /// `show table`: every stick table's name, size and entries in use.
    ShowTables,
    /// `show table <table>`: a stick table's entries.
    ShowTable { table: String },
    /// `set table <table> key <key> data.server_id <id>`: records which server a key maps to.
    SetTableServerId {
        table: String,
        key: String,
        server_id: u32,
    },
}

/// The shape of a successful reply, by command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Empty,
    VersionCreated,
    MapEntries,
    Info,
    Stat,
    ServersState,
    PgsRefused,
    PgsNegotiations,
    SslCert,
    SslNewStore,
    SslTransaction,
    /// A multi-step command that ends its reply with `Success!`.
    SslSuccess,
    Table,
}

impl Command {
    pub fn show_map(map: impl Into<PathBuf>) -> Self {
        Command::ShowMap { map: map.into() }
    }

    pub fn add_map(
        map: impl Into<PathBuf>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Command::AddMap {
            map: map.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn set_map(
        map: impl Into<PathBuf>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Command::SetMap {
            map: map.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn del_map(map: impl Into<PathBuf>, key: impl Into<String>) -> Self {
        Command::DelMap {
            map: map.into(),
            key: key.into(),
        }
    }

    pub fn add_map_version(
        map: impl Into<PathBuf>,
        version: u32,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Command::AddMapVersion {
            map: map.into(),
            version,
            key: key.into(),
            value: value.into(),
        }
    }

    /// The request as HAProxy reads it, without the newline. Arguments that could change how
    /// HAProxy splits the line are refused here, before anything is sent: empty strings,
    /// whitespace, control and non-ASCII characters, `;`, `\`, quotes, a leading `#` (HAProxy
    /// reads `#...` as an entry reference) and `<<` (starts a payload); map paths must be
    /// absolute; backend and server names may hold only `[A-Za-z0-9_.:-]`.
    pub fn render(&self) -> Result<String, RuntimeError> {
        Ok(match self {
            Command::ShowMap { map } => format!("show map {}", check_map(map)?),
            Command::ShowMapVersion { map, version } => {
                format!("show map @{version} {}", check_map(map)?)
            }
            Command::AddMap { map, key, value } => format!(
                "add map {} {} {}",
                check_map(map)?,
                check_token("map key", key)?,
                check_token("map value", value)?
            ),
            Command::SetMap { map, key, value } => format!(
                "set map {} {} {}",
                check_map(map)?,
                check_token("map key", key)?,
                check_token("map value", value)?
            ),
            Command::DelMap { map, key } => format!(
                "del map {} {}",
                check_map(map)?,
                check_token("map key", key)?
            ),
            Command::ClearMap { map } => format!("clear map {}", check_map(map)?),
            Command::ClearMapVersion { map, version } => {
                format!("clear map @{version} {}", check_map(map)?)
            }
            Command::PrepareMap { map } => format!("prepare map {}", check_map(map)?),
            Command::AddMapVersion {
                map,
                version,
                key,
                value,
            } => format!(
                "add map @{version} {} {} {}",
                check_map(map)?,
                check_token("map key", key)?,
                check_token("map value", value)?
            ),
            Command::CommitMap { map, version } => {
                format!("commit map @{version} {}", check_map(map)?)
            }
            Command::ShowInfo => "show info".to_string(),
            Command::ShowStat => "show stat".to_string(),
            Command::ShowStatOf { backend } => {
                format!("show stat {} 2 -1", check_name("backend", backend)?)
            }
            Command::ShowStatBackends => "show stat -1 2 -1".to_string(),
            Command::ShowServersState => "show servers state".to_string(),
            Command::ShowServersStateOf { backend } => {
                format!("show servers state {}", check_name("backend", backend)?)
            }
            Command::ShutdownSessionsServer { backend, server } => format!(
                "shutdown sessions server {}/{}",
                check_name("backend", backend)?,
                check_name("server", server)?
            ),
            Command::ShowPgsRefused => "pgs show refused".to_string(),
            Command::ShowPgsNegotiations => "pgs show negotiations".to_string(),
            Command::ShowSslCert { file } => {
                format!("show ssl cert {}", check_path("certificate file", file)?)
            }
            Command::NewSslCert { file } => {
                format!("new ssl cert {}", check_path("certificate file", file)?)
            }
            Command::SetSslCert { file, pem } => format!(
                "set ssl cert {} <<\n{}\n",
                check_path("certificate file", file)?,
                check_payload(pem)?
            ),
            Command::CommitSslCert { file } => {
                format!("commit ssl cert {}", check_path("certificate file", file)?)
            }
            Command::AbortSslCert { file } => {
                format!("abort ssl cert {}", check_path("certificate file", file)?)
            }
            Command::AddSslCrtList { list, file } => format!(
                "add ssl crt-list {} {}",
                check_path("crt-list", list)?,
                check_path("certificate file", file)?
            ),
            Command::ShowTables => "show table".to_string(),
            Command::ShowTable { table } => format!("show table {}", check_name("table", table)?),
            Command::SetTableServerId {
                table,
                key,
                server_id,
            } => format!(
                "set table {} key {} data.server_id {server_id}",
                check_name("table", table)?,
                check_token("table key", key)?
            ),
        })
    }

    /// The request as logs and errors show it: a certificate's PEM (its private key) and a
    /// cancel key (a session's secret) are left out.
    pub fn label(&self, rendered: &str) -> String {
        match self {
            Command::SetSslCert { file, pem } => format!(
                "set ssl cert {} <<(PEM payload, {} bytes)",
                file.display(),
                pem.len()
            ),
            Command::SetTableServerId {
                table, server_id, ..
            } => format!("set table {table} key <cancel key> data.server_id {server_id}"),
            _ => rendered.to_string(),
        }
    }

    fn expect(&self) -> Expect {
        match self {
            Command::ShowMap { .. } | Command::ShowMapVersion { .. } => Expect::MapEntries,
            Command::PrepareMap { .. } => Expect::VersionCreated,
            Command::ShowInfo => Expect::Info,
            Command::ShowStat | Command::ShowStatOf { .. } | Command::ShowStatBackends => {
                Expect::Stat
            }
            Command::ShowServersState | Command::ShowServersStateOf { .. } => Expect::ServersState,
            Command::ShowPgsRefused => Expect::PgsRefused,
            Command::ShowPgsNegotiations => Expect::PgsNegotiations,
            Command::ShowSslCert { .. } => Expect::SslCert,
            Command::NewSslCert { .. } => Expect::SslNewStore,
            Command::SetSslCert { .. } | Command::AbortSslCert { .. } => Expect::SslTransaction,
            Command::CommitSslCert { .. } | Command::AddSslCrtList { .. } => Expect::SslSuccess,
            Command::ShowTable { .. } | Command::ShowTables => Expect::Table,
            Command::SetTableServerId { .. } => Expect::Empty,
            Command::AddMap { .. }
            | Command::SetMap { .. }
            | Command::DelMap { .. }
            | Command::ClearMap { .. }
            | Command::ClearMapVersion { .. }
            | Command::AddMapVersion { .. }
            | Command::CommitMap { .. }
            | Command::ShutdownSessionsServer { .. } => Expect::Empty,
        }
    }
}

const LINE_BREAKERS: &str =
    "whitespace, control or non-ASCII characters, ';', '\\' and quotes are not allowed";

fn check_chars(what: &'static str, s: &str) -> Result<(), RuntimeError> {
    let invalid = |reason| RuntimeError::InvalidArgument {
        what,
        value: s.to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(invalid("it is empty"));
    }
    if s.bytes()
        .any(|b| !b.is_ascii_graphic() || matches!(b, b';' | b'\\' | b'"' | b'\''))
    {
        return Err(invalid(LINE_BREAKERS));
    }
    if s.contains("<<") {
        return Err(invalid("'<<' would start a payload"));
    }
    Ok(())
}

fn check_map(map: &Path) -> Result<&str, RuntimeError> {
    check_path("map path", map)
}

fn check_path<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, RuntimeError> {
    let Some(s) = path.to_str() else {
        return Err(RuntimeError::InvalidArgument {
            what,
            value: path.display().to_string(),
            reason: "it is not valid UTF-8",
        });
    };
    check_chars(what, s)?;
    if !s.starts_with('/') {
        return Err(RuntimeError::InvalidArgument {
            what,
            value: s.to_string(),
            reason: "it must be an absolute path",
        });
    }
    Ok(s)
}

/// A payload ends at the first empty line: only non-empty lines of printable ASCII.
fn check_payload(pem: &str) -> Result<&str, RuntimeError> {
    let invalid = |reason| RuntimeError::InvalidArgument {
        what: "payload",
        value: pem.chars().take(40).collect(),
        reason,
    };
    if pem.is_empty() || pem.lines().any(|l| l.trim().is_empty()) {
        return Err(invalid(
            "it is empty or has an empty line, which ends a payload",
        ));
    }
    if pem
        .bytes()
        .any(|b| b != b'\n' && !(0x20..0x7f).contains(&b))
    {
        return Err(invalid("only printable ASCII lines are allowed"));
    }
    Ok(pem.trim_end_matches('\n'))
}

fn check_token<'a>(what: &'static str, s: &'a str) -> Result<&'a str, RuntimeError> {
    check_chars(what, s)?;
    if s.starts_with('#') {
        return Err(RuntimeError::InvalidArgument {
            what,
            value: s.to_string(),
            reason: "a leading '#' makes HAProxy read an entry reference",
        });
    }
    Ok(s)
}

fn check_name<'a>(what: &'static str, s: &'a str) -> Result<&'a str, RuntimeError> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(s)
    } else {
        Err(RuntimeError::InvalidArgument {
            what,
            value: s.to_string(),
            reason: "HAProxy names hold only [A-Za-z0-9_.:-]",
        })
    }
}

/// Checks a reply body (its final empty line removed) against the command's success shape.
fn check_reply(cmd: &Command, rendered: &str, body: String) -> Result<String, RuntimeError> {
    let ok = match cmd.expect() {
        Expect::Empty => body.is_empty(),
        Expect::VersionCreated => body.starts_with("New version created: "),
        Expect::MapEntries => body.lines().all(|l| l.starts_with("0x")),
        Expect::Info => body.starts_with("Name: "),
        Expect::Stat => body.starts_with("# pxname,"),
        Expect::PgsRefused => body.starts_with("# pgs refused"),
        Expect::PgsNegotiations => body.starts_with("# pgs negotiations"),
        Expect::SslCert => body.starts_with("Filename: "),
        Expect::SslNewStore => body.starts_with("New empty certificate store"),
        Expect::SslTransaction => body.starts_with("Transaction "),
        Expect::SslSuccess => body.lines().any(|l| l.trim() == "Success!"),
        Expect::Table => body.starts_with("# table: "),
        Expect::ServersState => body
            .lines()
            .next()
            .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit())),
    };
    if ok {
        Ok(body)
    } else {
        Err(RuntimeError::Rejected {
            command: rendered.to_string(),
            kind: ReplyError::classify(&body),
            reply: body,
        })
    }
}

/// Parses `show map` output (`0x55a04dbe1c50 acme pgs_acme` lines) into (key, value) pairs.
/// The value is the rest of the line; an entry loaded from a file may hold spaces.
pub fn parse_map_entries(body: &str) -> Result<Vec<(String, String)>, &'static str> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (id, rest) = line.split_once(' ').ok_or("entry line without a key")?;
            if !id.starts_with("0x") {
                return Err("entry line does not start with a 0x reference");
            }
            Ok(match rest.split_once(' ') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (rest.to_string(), String::new()),
            })
        })
        .collect()
}

/// Parses `New version created: 3`.
pub fn parse_prepared_version(body: &str) -> Result<u32, &'static str> {
    body.trim()
        .strip_prefix("New version created:")
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no version number after 'New version created:'")
}

/// `show info`: the fields pgs reads, plus every `Name: value` line in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub pid: u32,
    pub version: String,
    pub uptime_sec: u64,
    pub fields: Vec<(String, String)>,
}

impl Info {
    pub fn parse(body: &str) -> Result<Info, &'static str> {
        let fields: Vec<(String, String)> = body
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        let find = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let pid = find("Pid")
            .and_then(|v| v.parse().ok())
            .ok_or("no numeric Pid field")?;
        let version = find("Version").ok_or("no Version field")?.to_string();
        let uptime_sec = find("Uptime_sec")
            .and_then(|v| v.parse().ok())
            .ok_or("no numeric Uptime_sec field")?;
        Ok(Info {
            pid,
            version,
            uptime_sec,
            fields,
        })
    }

    /// Any field by its name as HAProxy prints it (`"CurrConns"`, `"Unstoppable Jobs"`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One `show stat` CSV row (a frontend, backend or server), with its column names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatRow {
    columns: Arc<[String]>,
    values: Vec<String>,
}

impl StatRow {
    /// Parses the whole `show stat` CSV: the `# pxname,svname,...` header, then one row a line.
    pub fn parse_all(body: &str) -> Result<Vec<StatRow>, &'static str> {
        let mut lines = body.lines();
        let header = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .ok_or("no '# pxname,...' header line")?;
        let mut columns = split_csv(header);
        if columns.last().is_some_and(|c| c.is_empty()) {
            columns.pop();
        }
        if columns.first().map(String::as_str) != Some("pxname") {
            return Err("header does not start with pxname");
        }
        let columns: Arc<[String]> = columns.into();
        lines
            .filter(|l| !l.is_empty())
            .map(|line| {
                let mut values = split_csv(line);
                values.truncate(columns.len());
                if values.len() < 2 {
                    return Err("row with fewer than two columns");
                }
                Ok(StatRow {
                    columns: Arc::clone(&columns),
                    values,
                })
            })
            .collect()
    }

    /// A column by name; `None` when the column is unknown or empty for this row.
    pub fn get(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values
            .get(i)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A numeric column by name.
    pub fn get_u64(&self, column: &str) -> Option<u64> {
        self.get(column)?.parse().ok()
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Proxy name.
    pub fn pxname(&self) -> &str {
        &self.values[0]
    }

    /// `FRONTEND`, `BACKEND` or the server name.
    pub fn svname(&self) -> &str {
        &self.values[1]
    }

    /// Current sessions.
    pub fn scur(&self) -> Option<u64> {
        self.get_u64("scur")
    }

    /// Total sessions.
    pub fn stot(&self) -> Option<u64> {
        self.get_u64("stot")
    }

    /// Bytes in.
    pub fn bin(&self) -> Option<u64> {
        self.get_u64("bin")
    }

    /// Bytes out.
    pub fn bout(&self) -> Option<u64> {
        self.get_u64("bout")
    }

    /// `OPEN`, `UP`, `DOWN`, `no check`, `MAINT`, ...
    pub fn status(&self) -> Option<&str> {
        self.get("status")
    }
}

/// Splits one CSV line; HAProxy quotes a field (doubling `"`) when it holds `,` or `"`.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    out.push(field);
    out
}

/// A server's operational state (`srv_op_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOpState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Unknown(u8),
}

impl From<u8> for ServerOpState {
    fn from(v: u8) -> Self {
        match v {
            0 => ServerOpState::Stopped,
            1 => ServerOpState::Starting,
            2 => ServerOpState::Running,
            3 => ServerOpState::Stopping,
            n => ServerOpState::Unknown(n),
        }
    }
}

/// One `show servers state` row (format version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub backend_id: u32,
    pub backend: String,
    pub server_id: u32,
    pub server: String,
    pub addr: String,
    pub port: Option<u16>,
    pub op_state: ServerOpState,
    /// The `srv_admin_state` bit mask (see [`ServerState::in_maintenance`], [`ServerState::draining`]).
    pub admin_state: u32,
    columns: Arc<[String]>,
    values: Vec<String>,
}

impl ServerState {
    /// Any maintenance bit: forced, inherited, from config, or from a DNS failure.
    pub const ADMIN_MAINT: u32 = 0x01 | 0x02 | 0x04 | 0x20;
    /// Any drain bit: forced or inherited.
    pub const ADMIN_DRAIN: u32 = 0x08 | 0x10;

    pub fn parse_all(body: &str) -> Result<Vec<ServerState>, &'static str> {
        let mut lines = body.lines();
        match lines.next().map(str::trim) {
            Some("1") => {}
            Some(v) if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() => {
                return Err("unsupported servers state format version")
            }
            _ => return Err("no format version line"),
        }
        let header = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .ok_or("no '# be_id ...' header line")?;
        let columns: Arc<[String]> = header.split_whitespace().map(String::from).collect();
        let col = |name: &str| columns.iter().position(|c| c == name);
        let (Some(be_id), Some(be), Some(sv_id), Some(sv), Some(addr), Some(op), Some(adm)) = (
            col("be_id"),
            col("be_name"),
            col("srv_id"),
            col("srv_name"),
            col("srv_addr"),
            col("srv_op_state"),
            col("srv_admin_state"),
        ) else {
            return Err("header lacks a required column");
        };
        let port = col("srv_port");
        let mut out = Vec::new();
        for line in lines {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let values: Vec<String> = line.split_whitespace().map(String::from).collect();
            if values.len() < columns.len().min(adm + 1) {
                return Err("row shorter than the header");
            }
            let num = |i: usize| values.get(i).and_then(|v| v.parse::<u32>().ok());
            out.push(ServerState {
                backend_id: num(be_id).ok_or("be_id is not a number")?,
                backend: values[be].clone(),
                server_id: num(sv_id).ok_or("srv_id is not a number")?,
                server: values[sv].clone(),
                addr: values[addr].clone(),
                port: port
                    .and_then(|i| values.get(i))
                    .and_then(|v| v.parse().ok()),
                op_state: values[op]
                    .parse::<u8>()
                    .map_err(|_| "srv_op_state is not a number")?
                    .into(),
                admin_state: num(adm).ok_or("srv_admin_state is not a number")?,
                columns: Arc::clone(&columns),
                values,
            });
        }
        Ok(out)
    }

    /// Any column by its header name (`"srv_check_status"`, `"srv_fqdn"`, ...).
    pub fn get(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values.get(i).map(String::as_str)
    }

    pub fn in_maintenance(&self) -> bool {
        self.admin_state & Self::ADMIN_MAINT != 0
    }

    pub fn draining(&self) -> bool {
        self.admin_state & Self::ADMIN_DRAIN != 0
    }
}

/// How [`RuntimeApi::batch`] carries many commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchMode {
    /// One connection in `prompt` mode; `;`-joined lines are written while replies are read.
    #[default]
    Prompt,
    /// One non-interactive connection per `;`-joined line.
    Lines,
}

/// What [`RuntimeApi::set_entry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// An entry with that key existed and now has the value.
    Updated,
    /// There was none, so one was added.
    Added,
}

/// A Runtime API client. Cheap to clone; opens a connection per call (or per batch).
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    endpoint: Endpoint,
    connect_timeout: Duration,
    read_timeout: Duration,
    max_line: usize,
    batch_mode: BatchMode,
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

impl RuntimeApi {
    pub fn new(endpoint: impl Into<Endpoint>) -> Self {
        RuntimeApi {
            endpoint: endpoint.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_line: DEFAULT_MAX_LINE,
            batch_mode: BatchMode::default(),
        }
    }

    /// `connect` bounds connecting; `read` bounds each read or write after that.
    pub fn with_timeouts(mut self, connect: Duration, read: Duration) -> Self {
        self.connect_timeout = connect;
        self.read_timeout = read;
        self
    }

    /// Longest request line, newline included (set it from a non-default `tune.bufsize`).
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes;
        self
    }

    pub fn with_batch_mode(mut self, mode: BatchMode) -> Self {
        self.batch_mode = mode;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Runs one command on its own connection; the reply body when it has its success shape.
    pub async fn execute(&self, cmd: &Command) -> Result<String, RuntimeError> {
        let rendered = cmd.render()?;
        self.check_len(&rendered)?;
        let label = cmd.label(&rendered);
        tracing::debug!(endpoint = %self.endpoint, command = %label, "runtime api");
        let mut replies = self
            .exchange(std::slice::from_ref(&rendered), 1, false, &label)
            .await?;
        check_reply(cmd, &label, replies.pop().unwrap_or_default())
    }

    /// Runs many commands over as few connections as the line limit allows (see [`BatchMode`]).
    /// The outer error is for the transport; each command gets its own result. Not atomic:
    /// commands before a failing one stay applied (use [`RuntimeApi::replace_map`] for that).
    pub async fn batch(
        &self,
        commands: &[Command],
    ) -> Result<Vec<Result<String, RuntimeError>>, RuntimeError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let rendered = commands
            .iter()
            .map(|c| {
                let r = c.render()?;
                self.check_len(&r)?;
                Ok(r)
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let lines = self.join_lines(&rendered);
        tracing::debug!(
            endpoint = %self.endpoint,
            commands = commands.len(),
            lines = lines.len(),
            mode = ?self.batch_mode,
            "runtime api batch"
        );
        let mut bodies = Vec::with_capacity(commands.len());
        match self.batch_mode {
            BatchMode::Prompt => {
                let label = format!("batch of {} commands", commands.len());
                bodies = self.exchange(&lines, commands.len(), true, &label).await?;
            }
            BatchMode::Lines => {
                for (line, count) in &lines_with_counts(&lines) {
                    let got = self
                        .exchange(std::slice::from_ref(line), *count, false, line)
                        .await?;
                    bodies.extend(got);
                }
            }
        }
        Ok(commands
            .iter()
            .zip(rendered)
            .zip(bodies)
            .map(|((cmd, r), body)| check_reply(cmd, &cmd.label(&r), body))
            .collect())
    }

    /// [`RuntimeApi::batch`], failing with the first command error (after all have run).
    pub async fn batch_all(&self, commands: &[Command]) -> Result<Vec<String>, RuntimeError> {
        self.batch(commands).await?.into_iter().collect()
    }

    pub async fn show_map(&self, map: &Path) -> Result<Vec<(String, String)>, RuntimeError> {
        self.parsed(&Command::show_map(map), parse_map_entries)
            .await
    }

    pub async fn show_map_version(
        &self,
        map: &Path,
        version: u32,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        let cmd = Command::ShowMapVersion {
            map: map.into(),
            version,
        };
        self.parsed(&cmd, parse_map_entries).await
    }

    pub async fn add_map(&self, map: &Path, key: &str, value: &str) -> Result<(), RuntimeError> {
        self.execute(&Command::add_map(map, key, value))
            .await
            .map(drop)
    }

    pub async fn set_map(&self, map: &Path, key: &str, value: &str) -> Result<(), RuntimeError> {
        self.execute(&Command::set_map(map, key, value))
            .await
            .map(drop)
    }

    pub async fn del_map(&self, map: &Path, key: &str) -> Result<(), RuntimeError> {
        self.execute(&Command::del_map(map, key)).await.map(drop)
    }

    pub async fn clear_map(&self, map: &Path) -> Result<(), RuntimeError> {
        self.execute(&Command::ClearMap { map: map.into() })
            .await
            .map(drop)
    }

    /// `prepare map`: the new version number.
    pub async fn prepare_map(&self, map: &Path) -> Result<u32, RuntimeError> {
        self.parsed(
            &Command::PrepareMap { map: map.into() },
            parse_prepared_version,
        )
        .await
    }

    pub async fn add_map_version(
        &self,
        map: &Path,
        version: u32,
        key: &str,
        value: &str,
    ) -> Result<(), RuntimeError> {
        self.execute(&Command::add_map_version(map, version, key, value))
            .await
            .map(drop)
    }

    pub async fn commit_map(&self, map: &Path, version: u32) -> Result<(), RuntimeError> {
        let cmd = Command::CommitMap {
            map: map.into(),
            version,
        };
        self.execute(&cmd).await.map(drop)
    }

    pub async fn show_info(&self) -> Result<Info, RuntimeError> {
        self.parsed(&Command::ShowInfo, Info::parse).await
    }

    pub async fn show_stat(&self) -> Result<Vec<StatRow>, RuntimeError> {
        self.parsed(&Command::ShowStat, StatRow::parse_all).await
    }

    pub async fn show_stat_backends(&self) -> Result<Vec<StatRow>, RuntimeError> {
        self.parsed(&Command::ShowStatBackends, StatRow::parse_all)
            .await
    }

    pub async fn show_stat_of(&self, backend: &str) -> Result<Vec<StatRow>, RuntimeError> {
        let cmd = Command::ShowStatOf {
            backend: backend.to_owned(),
        };
        self.parsed(&cmd, StatRow::parse_all).await
    }

    pub async fn show_servers_state(&self) -> Result<Vec<ServerState>, RuntimeError> {
        self.parsed(&Command::ShowServersState, ServerState::parse_all)
            .await
    }

    pub async fn shutdown_sessions_server(
        &self,
        backend: &str,
        server: &str,
    ) -> Result<(), RuntimeError> {
        let cmd = Command::ShutdownSessionsServer {
            backend: backend.into(),
            server: server.into(),
        };
        self.execute(&cmd).await.map(drop)
    }

    /// Sets `key` to `value`: `set map`, then `add map` only when the key is not there yet.
    /// One round trip when the entry exists, two when it is new.
    pub async fn set_entry(
        &self,
        map: &Path,
        key: &str,
        value: &str,
    ) -> Result<SetOutcome, RuntimeError> {
        match self.set_map(map, key, value).await {
            Ok(()) => Ok(SetOutcome::Updated),
            Err(e) if e.reply_error() == Some(ReplyError::EntryNotFound) => {
                self.add_map(map, key, value).await?;
                Ok(SetOutcome::Added)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes every entry with `key`; `false` when there was none.
    pub async fn del_entry(&self, map: &Path, key: &str) -> Result<bool, RuntimeError> {
        match self.del_map(map, key).await {
            Ok(()) => Ok(true),
            Err(e) if e.reply_error() == Some(ReplyError::EntryNotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Replaces a map's whole content atomically: `prepare map`, `add map @ver` for every
    /// entry (batched), `commit map @ver`. Lookups see the old content until the commit and
    /// the new one after it, never a mix. Returns the committed version. On failure nothing
    /// is committed and the prepared version is cleared (best effort). Callers serialize
    /// replacements of one map: committing an older version after a newer one fails.
    pub async fn replace_map<K, V>(
        &self,
        map: &Path,
        entries: &[(K, V)],
    ) -> Result<u32, RuntimeError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let adds = |version: u32| -> Vec<Command> {
            entries
                .iter()
                .map(|(k, v)| Command::add_map_version(map, version, k.as_ref(), v.as_ref()))
                .collect()
        };
        // Refuse bad entries before allocating a version.
        for cmd in adds(0) {
            cmd.render()?;
        }
        let version = self.prepare_map(map).await?;
        if let Err(e) = self.batch_all(&adds(version)).await {
            let clear = Command::ClearMapVersion {
                map: map.into(),
                version,
            };
            if let Err(ce) = self.execute(&clear).await {
                tracing::warn!(map = %map.display(), version, error = %ce, "could not clear an abandoned map version");
            }
            return Err(e);
        }
        self.commit_map(map, version).await?;
        tracing::debug!(map = %map.display(), version, entries = entries.len(), "map replaced");
        Ok(version)
    }

    async fn parsed<T>(
        &self,
        cmd: &Command,
        parse: impl FnOnce(&str) -> Result<T, &'static str>,
    ) -> Result<T, RuntimeError> {
        let body = self.execute(cmd).await?;
        parse(&body).map_err(|reason| RuntimeError::UnexpectedReply {
            command: cmd.render().unwrap_or_default(),
            reason,
            reply: body,
        })
    }

    fn check_len(&self, rendered: &str) -> Result<(), RuntimeError> {
        let len = rendered.len() + 1;
        if len > self.max_line {
            return Err(RuntimeError::LineTooLong {
                // Never a payload (a certificate's private key) in an error.
                command: rendered
                    .split("<<")
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(120)
                    .collect(),
                len,
                max: self.max_line,
            });
        }
        Ok(())
    }

    /// Joins rendered commands with `;` into lines of at most `max_line` bytes with the newline.
    fn join_lines(&self, rendered: &[String]) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        let mut cur = String::new();
        for r in rendered {
            if !cur.is_empty() && cur.len() + 1 + r.len() + 1 > self.max_line {
                lines.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push(';');
            }
            cur.push_str(r);
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        lines
    }

    async fn connect(&self) -> Result<(Reader, Writer), RuntimeError> {
        let endpoint = &self.endpoint;
        let fut = async {
            match endpoint {
                Endpoint::Unix(path) => UnixStream::connect(path).await.map(|s| {
                    let (r, w) = s.into_split();
                    (Box::new(r) as Reader, Box::new(w) as Writer)
                }),
                Endpoint::Tcp(addr) => TcpStream::connect(addr).await.map(|s| {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    (Box::new(r) as Reader, Box::new(w) as Writer)
                }),
            }
        };
        match timeout(self.connect_timeout, fut).await {
            Ok(Ok(halves)) => Ok(halves),
            Ok(Err(source)) => Err(RuntimeError::Connect {
                endpoint: endpoint.clone(),
                source,
            }),
            Err(_) => Err(RuntimeError::ConnectTimeout {
                endpoint: endpoint.clone(),
                timeout: self.connect_timeout,
            }),
        }
    }

    /// Sends `lines` on one connection and reads `expected` replies. Non-interactive: a single
    /// line. Prompt: `prompt` first, then every line, written while replies are read so that
    /// neither side's buffer can fill up and stall the other.
    async fn exchange(
        &self,
        lines: &[String],
        expected: usize,
        prompt: bool,
        label: &str,
    ) -> Result<Vec<String>, RuntimeError> {
        debug_assert!(prompt || lines.len() == 1);
        let (mut reader, mut writer) = self.connect().await?;
        let mut request =
            String::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 8);
        if prompt {
            request.push_str("prompt\n");
        }
        for line in lines {
            request.push_str(line);
            request.push('\n');
        }
        let io_err = |source: io::Error| RuntimeError::Io {
            endpoint: self.endpoint.clone(),
            command: label.to_string(),
            source,
        };
        let timed_out = || RuntimeError::Timeout {
            endpoint: self.endpoint.clone(),
            timeout: self.read_timeout,
            command: label.to_string(),
        };
        let write = async {
            for chunk in request.as_bytes().chunks(64 * 1024) {
                timeout(self.read_timeout, writer.write_all(chunk))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(io_err)?;
            }
            Ok::<_, RuntimeError>(())
        };
        let read = async {
            let mut framer = Framer::new(prompt);
            let total = expected + usize::from(prompt);
            let mut replies = Vec::with_capacity(total);
            let mut chunk = vec![0u8; 64 * 1024];
            while replies.len() < total {
                if let Some(reply) = framer.next_reply() {
                    replies.push(reply);
                    continue;
                }
                let n = timeout(self.read_timeout, reader.read(&mut chunk))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(io_err)?;
                if n == 0 {
                    return Err(RuntimeError::Truncated {
                        endpoint: self.endpoint.clone(),
                        command: label.to_string(),
                        expected,
                        got: replies.len().saturating_sub(usize::from(prompt)),
                    });
                }
                framer.buf.extend_from_slice(&chunk[..n]);
            }
            if prompt {
                replies.remove(0);
            }
            Ok(replies)
        };
        let (w, r) = tokio::join!(write, read);
        // A failed write usually shows up on the read side too, where it says more
        // (closed after N replies); all replies in hand means the exchange worked.
        match (w, r) {
            (_, Ok(replies)) => Ok(replies),
            (_, Err(re)) => Err(re),
        }
    }
}

/// How many commands each `;`-joined line carries.
fn lines_with_counts(lines: &[String]) -> Vec<(String, usize)> {
    lines
        .iter()
        .map(|l| (l.clone(), count_commands(l)))
        .collect()
}

/// Commands on a rendered line: rendered arguments never hold `;`, so every `;` separates two.
fn count_commands(line: &str) -> usize {
    line.bytes().filter(|&b| b == b';').count() + 1
}

/// Cuts the reply stream into replies: each is zero or more non-empty lines then an empty
/// line; in prompt mode each is followed by the `"> "` prompt.
struct Framer {
    buf: Vec<u8>,
    pos: usize,
    prompt: bool,
}

impl Framer {
    fn new(prompt: bool) -> Self {
        Framer {
            buf: Vec::new(),
            pos: 0,
            prompt,
        }
    }

    fn next_reply(&mut self) -> Option<String> {
        let data = &self.buf[self.pos..];
        let (body_end, consumed) = if data.first() == Some(&b'\n') {
            (0, 1)
        } else {
            let i = data.windows(2).position(|w| w == b"\n\n")?;
            (i, i + 2)
        };
        let mut consumed = consumed;
        if self.prompt {
            if data.len() < consumed + 2 {
                return None;
            }
            if &data[consumed..consumed + 2] == b"> " {
                consumed += 2;
            }
        }
        let body = String::from_utf8_lossy(&data[..body_end]).into_owned();
        self.pos += consumed;
        if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Replies captured from HAProxy 2.6.12-1+deb12u4, byte for byte.
    const SHOW_MAP: &str = "0x55a04dbe1c50 acme pgs_acme\n0x55a04dbe1ce0 10.0.0.1 be_default\n\n";
    const UNKNOWN_MAP: &str = "Unknown map identifier. Please use #<id> or <file>.\n\n";
    const SET_NOT_FOUND: &str = "entry not found.\n\n";
    const DEL_NOT_FOUND: &str = "Key not found.\n\n";
    const PREPARED: &str = "New version created: 1\n\n";
    const FUTURE: &str = "Version number in the future, please use 'prepare map' before.\n\n";
    const OUT_OF_RANGE: &str = "Version number out of range.\n\n";
    const UNKNOWN_CMD: &str = "Unknown command, but maybe one of the following ones is a better match:\n  add map [@<ver>] <map> <key> <val>      : add a map entry (payload supported instead of key/val)\n  commit map @<ver> <map>                 : commit the map at this version\n  help [<command>]                        : list matching or all commands\n  prompt                                  : toggle interactive mode with prompt\n  quit                                    : disconnect\n\n";
    const DENIED: &str = "Permission denied\n\n";
    const NO_SERVER: &str = "No such server.\n\n";
    const NO_BACKEND: &str = "No such backend.\n\n";
    const CANT_FIND_BACKEND: &str = "Can't find backend.\n\n";
    const SET_USAGE: &str =
        "'set map' expects three parameters: map identifier, key and value.\n\n";
    const SERVERS_STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n3 be_default 1 s1 127.0.0.1 2 0 1 1 10 1 0 2 0 0 0 0 - 5999 - 0 0 - - 0\n4 pgs_acme 1 s1 127.0.0.1 0 0 1 1 10 8 2 0 6 0 0 0 - 6000 - 0 0 - - 0\n\n";
    const SHOW_INFO: &str = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nRelease_date: 2026/10/17\nNbthread: 2\nNbproc: 1\nProcess_num: 1\nPid: 7692\nUptime: 0d 0h00m16s\nUptime_sec: 16\nMemmax_MB: 0\nUlimit-n: 19999\nMaxconn: 9978\nCurrConns: 0\nCumConns: 48\nStopping: 0\nJobs: 6\nUnstoppable Jobs: 1\nListeners: 5\nBuild info: 2.6.12-1+deb12u4\nStart_time_sec: 1795861131\nTainted: 0\n\n";
    const SHOW_STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,\nfe,FRONTEND,,,0,0,9978,0,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,0,,,,,,,,,,,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,tcp,,\npgs_acme,s1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,18,18,,1,4,1,,0,,2,0,,0,L4CON,,0,,,,,,,,,,,0,0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,3,0,,,,127.0.0.1:6000,,tcp,,\npgs_acme,BACKEND,0,0,3,5,1,17,1234,5678,0,0,,0,0,0,0,DOWN,0,0,0,,1,18,18,,1,4,0,,0,,1,0,,0,,,,,,,,,,,,,,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,tcp,roundrobin,\n\n";

    fn frame(stream: &str, prompt: bool) -> Vec<String> {
        let mut f = Framer::new(prompt);
        f.buf.extend_from_slice(stream.as_bytes());
        std::iter::from_fn(|| f.next_reply()).collect()
    }

    fn one(stream: &str) -> String {
        let mut r = frame(stream, false);
        assert_eq!(r.len(), 1, "{stream:?}");
        r.remove(0)
    }

    fn map() -> PathBuf {
        PathBuf::from("/etc/pgs/backends.map")
    }

    #[test]
    fn renders_every_command() {
        let m = map();
        let cases = [
            (Command::show_map(&m), "show map /etc/pgs/backends.map"),
            (
                Command::ShowMapVersion {
                    map: m.clone(),
                    version: 4,
                },
                "show map @4 /etc/pgs/backends.map",
            ),
            (
                Command::add_map(&m, "acme", "pgs_acme"),
                "add map /etc/pgs/backends.map acme pgs_acme",
            ),
            (
                Command::set_map(&m, "acme", "enabled"),
                "set map /etc/pgs/backends.map acme enabled",
            ),
            (
                Command::del_map(&m, "acme"),
                "del map /etc/pgs/backends.map acme",
            ),
            (
                Command::ClearMap { map: m.clone() },
                "clear map /etc/pgs/backends.map",
            ),
            (
                Command::ClearMapVersion {
                    map: m.clone(),
                    version: 2,
                },
                "clear map @2 /etc/pgs/backends.map",
            ),
            (
                Command::PrepareMap { map: m.clone() },
                "prepare map /etc/pgs/backends.map",
            ),
            (
                Command::add_map_version(&m, 7, "acme", "pgs_acme"),
                "add map @7 /etc/pgs/backends.map acme pgs_acme",
            ),
            (
                Command::CommitMap {
                    map: m.clone(),
                    version: 7,
                },
                "commit map @7 /etc/pgs/backends.map",
            ),
            (Command::ShowInfo, "show info"),
            (Command::ShowStat, "show stat"),
            (
                Command::ShowStatOf {
                    backend: "pgs_acme".into(),
                },
                "show stat pgs_acme 2 -1",
            ),
            (Command::ShowStatBackends, "show stat -1 2 -1"),
            (Command::ShowServersState, "show servers state"),
            (
                Command::ShowServersStateOf {
                    backend: "pgs_acme".into(),
                },
                "show servers state pgs_acme",
            ),
            (
                Command::ShutdownSessionsServer {
                    backend: "pgs_acme".into(),
                    server: "pg".into(),
                },
                "shutdown sessions server pgs_acme/pg",
            ),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.render().unwrap(), want);
        }
    }

    #[test]
    fn refuses_arguments_that_break_the_line_protocol() {
        let m = map();
        let bad_tokens = [
            "", "a b", "a\tb", "a\nb", "a;b", "a\\b", "a\"b", "a'b", "#1", "<<", "a<<", "é", "a\rb",
        ];
        for bad in bad_tokens {
            for cmd in [
                Command::add_map(&m, bad, "v"),
                Command::add_map(&m, "k", bad),
                Command::set_map(&m, "k", bad),
                Command::del_map(&m, bad),
                Command::add_map_version(&m, 1, bad, "v"),
            ] {
                let err = cmd.render().unwrap_err();
                assert!(
                    matches!(err, RuntimeError::InvalidArgument { .. }),
                    "{bad:?}: {err}"
                );
            }
        }
        for bad_map in ["relative.map", "/a b.map", "/a;b.map", "", "#2"] {
            assert!(Command::show_map(bad_map).render().is_err(), "{bad_map:?}");
        }
        for bad_name in ["a/b", "a b", "", "a;b"] {
            let cmd = Command::ShutdownSessionsServer {
                backend: bad_name.into(),
                server: "s".into(),
            };
            assert!(cmd.render().is_err(), "{bad_name:?}");
            let cmd = Command::ShutdownSessionsServer {
                backend: "b".into(),
                server: bad_name.into(),
            };
            assert!(cmd.render().is_err(), "{bad_name:?}");
        }
        // What pgs does send is fine: tenant ids, addresses, CIDRs, backend names.
        for good in [
            "acme",
            "t_1",
            "10.0.0.1",
            "10.0.0.0/8",
            "pgs_acme",
            "enabled",
            "a#b",
        ] {
            Command::add_map(&m, good, good).render().unwrap();
        }
    }

    #[test]
    fn invalid_argument_error_names_what_and_why() {
        let err = Command::add_map(map(), "acme", "x y").render().unwrap_err();
        assert_eq!(
            err.to_string(),
            "refusing to send map value \"x y\" to HAProxy: whitespace, control or non-ASCII \
             characters, ';', '\\' and quotes are not allowed"
        );
    }

    #[test]
    fn frames_non_interactive_replies() {
        // `add map ...;add map /nope.map ...;set map ... zz 3;add map ...;show map ...` as sent
        // on one line to 2.6.12.
        let stream = "\nUnknown map identifier. Please use #<id> or <file>.\n\nentry not found.\n\n\n0x7f94e8047b70 a 1\n0x7f94e8047c90 c 4\n\n";
        assert_eq!(
            frame(stream, false),
            vec![
                "",
                "Unknown map identifier. Please use #<id> or <file>.",
                "entry not found.",
                "",
                "0x7f94e8047b70 a 1\n0x7f94e8047c90 c 4",
            ]
        );
    }

    #[test]
    fn frames_prompt_replies() {
        // `prompt`, then `add map ...;set map ... zz 1;show map ...` in prompt mode, 2.6.12.
        let stream = "\n> \n> entry not found.\n\n> 0x7f94e8047b70 a 1\n0x7f94e804a4f0 b 2\n\n> ";
        assert_eq!(
            frame(stream, true),
            vec![
                "",
                "",
                "entry not found.",
                "0x7f94e8047b70 a 1\n0x7f94e804a4f0 b 2"
            ]
        );
        // A reply is only complete once its prompt has arrived.
        assert_eq!(frame("entry not found.\n\n", true), Vec::<String>::new());
        assert_eq!(frame("\n", true), Vec::<String>::new());
    }

    #[test]
    fn framer_survives_split_reads() {
        let stream = "\n> entry not found.\n\n> \n> ";
        let mut f = Framer::new(true);
        let mut got = Vec::new();
        for b in stream.bytes() {
            f.buf.push(b);
            while let Some(r) = f.next_reply() {
                got.push(r);
            }
        }
        assert_eq!(got, vec!["", "entry not found.", ""]);
    }

    #[test]
    fn success_shapes_and_error_classification() {
        let m = map();
        let add = Command::add_map(&m, "k", "v");
        let set = Command::set_map(&m, "k", "v");
        let del = Command::del_map(&m, "k");
        let show = Command::show_map(&m);
        let commit = Command::CommitMap {
            map: m.clone(),
            version: 9,
        };
        let addv = Command::add_map_version(&m, 9, "k", "v");
        let shut = Command::ShutdownSessionsServer {
            backend: "b".into(),
            server: "s".into(),
        };
        let chk = |cmd: &Command, stream: &str| check_reply(cmd, "cmd", one(stream));

        assert_eq!(chk(&add, "\n").unwrap(), "");
        assert_eq!(chk(&show, "\n").unwrap(), "");
        assert!(chk(&show, SHOW_MAP).is_ok());
        assert!(chk(&Command::ShowInfo, SHOW_INFO).is_ok());
        assert!(chk(&Command::ShowStat, SHOW_STAT).is_ok());
        assert!(chk(&Command::ShowServersState, SERVERS_STATE).is_ok());
        assert!(chk(&Command::PrepareMap { map: m.clone() }, PREPARED).is_ok());

        let kind = |cmd: &Command, stream: &str| chk(cmd, stream).unwrap_err().reply_error();
        assert_eq!(kind(&add, UNKNOWN_MAP), Some(ReplyError::UnknownMap));
        assert_eq!(kind(&show, UNKNOWN_MAP), Some(ReplyError::UnknownMap));
        assert_eq!(kind(&set, SET_NOT_FOUND), Some(ReplyError::EntryNotFound));
        assert_eq!(kind(&del, DEL_NOT_FOUND), Some(ReplyError::EntryNotFound));
        assert_eq!(kind(&addv, FUTURE), Some(ReplyError::VersionInFuture));
        assert_eq!(
            kind(&commit, OUT_OF_RANGE),
            Some(ReplyError::VersionOutOfRange)
        );
        assert_eq!(
            kind(&commit, "Missing version number.\n\n"),
            Some(ReplyError::MissingVersion)
        );
        assert_eq!(kind(&add, UNKNOWN_CMD), Some(ReplyError::UnknownCommand));
        assert_eq!(kind(&shut, DENIED), Some(ReplyError::PermissionDenied));
        assert_eq!(kind(&shut, NO_SERVER), Some(ReplyError::NoSuchServer));
        assert_eq!(kind(&shut, NO_BACKEND), Some(ReplyError::NoSuchBackend));
        assert_eq!(
            kind(&Command::ShowServersState, CANT_FIND_BACKEND),
            Some(ReplyError::NoSuchBackend)
        );
        assert_eq!(kind(&set, SET_USAGE), Some(ReplyError::Usage));
        assert_eq!(
            kind(&Command::ShowInfo, DENIED),
            Some(ReplyError::PermissionDenied)
        );

        let err = chk(&set, SET_NOT_FOUND).unwrap_err();
        assert_eq!(
            err.to_string(),
            "HAProxy rejected `cmd` (entry not found): entry not found."
        );
        let err = chk(&add, UNKNOWN_CMD).unwrap_err();
        assert_eq!(
            err.to_string(),
            "HAProxy rejected `cmd` (unknown command): Unknown command, but maybe one of the \
             following ones is a better match:"
        );
    }

    #[test]
    fn parses_show_map() {
        let entries = parse_map_entries(&one(SHOW_MAP)).unwrap();
        assert_eq!(
            entries,
            vec![
                ("acme".to_string(), "pgs_acme".to_string()),
                ("10.0.0.1".to_string(), "be_default".to_string())
            ]
        );
        assert_eq!(parse_map_entries("").unwrap(), vec![]);
        // A value loaded from the file may hold spaces.
        assert_eq!(
            parse_map_entries("0x7f94e804a6f0 k2 v2 with space").unwrap(),
            vec![("k2".to_string(), "v2 with space".to_string())]
        );
    }

    #[test]
    fn parses_prepared_version() {
        assert_eq!(parse_prepared_version(&one(PREPARED)).unwrap(), 1);
        assert_eq!(
            parse_prepared_version("New version created: 4294967295").unwrap(),
            u32::MAX
        );
        assert!(parse_prepared_version("New version created:").is_err());
    }

    #[test]
    fn parses_show_info() {
        let info = Info::parse(&one(SHOW_INFO)).unwrap();
        assert_eq!(info.pid, 7692);
        assert_eq!(info.version, "2.6.12-1+deb12u4");
        assert_eq!(info.uptime_sec, 16);
        assert_eq!(info.get("Unstoppable Jobs"), Some("1"));
        assert_eq!(info.get("Build info"), Some("2.6.12-1+deb12u4"));
        assert_eq!(info.get("Uptime"), Some("0d 0h00m16s"));
        assert_eq!(info.get("Nope"), None);
        assert!(Info::parse("Name: HAProxy").is_err());
    }

    #[test]
    fn parses_show_stat() {
        let rows = StatRow::parse_all(&one(SHOW_STAT)).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].pxname(), rows[0].svname()), ("fe", "FRONTEND"));
        assert_eq!(rows[0].status(), Some("OPEN"));
        assert_eq!(rows[0].scur(), Some(0));
        assert_eq!(rows[0].get("mode"), Some("tcp"));
        let srv = &rows[1];
        assert_eq!((srv.pxname(), srv.svname()), ("pgs_acme", "s1"));
        assert_eq!(srv.status(), Some("DOWN"));
        assert_eq!(srv.get("check_desc"), Some("Layer4 connection problem"));
        assert_eq!(srv.get("addr"), Some("127.0.0.1:6000"));
        assert_eq!(srv.get("slim"), None);
        let be = &rows[2];
        assert_eq!(
            (be.scur(), be.stot(), be.bin(), be.bout()),
            (Some(3), Some(17), Some(1234), Some(5678))
        );
        assert_eq!(be.get("algo"), Some("roundrobin"));
        assert_eq!(be.columns()[0], "pxname");
        assert!(StatRow::parse_all("pxname,svname\n").is_err());
    }

    #[test]
    fn splits_quoted_csv() {
        assert_eq!(
            split_csv("a,\"b,c\",\"d\"\"e\",,"),
            vec!["a", "b,c", "d\"e", "", ""]
        );
    }

    #[test]
    fn parses_show_servers_state() {
        let rows = ServerState::parse_all(&one(SERVERS_STATE)).unwrap();
        assert_eq!(rows.len(), 2);
        let acme = &rows[1];
        assert_eq!((acme.backend_id, acme.backend.as_str()), (4, "pgs_acme"));
        assert_eq!((acme.server_id, acme.server.as_str()), (1, "s1"));
        assert_eq!(acme.addr, "127.0.0.1");
        assert_eq!(acme.port, Some(6000));
        assert_eq!(acme.op_state, ServerOpState::Stopped);
        assert_eq!(rows[0].op_state, ServerOpState::Running);
        assert_eq!(acme.admin_state, 0);
        assert!(!acme.in_maintenance() && !acme.draining());
        assert_eq!(acme.get("srv_check_status"), Some("8"));
        assert!(ServerState::parse_all("2\n# be_id\n").is_err());
        assert!(ServerState::parse_all(&one(CANT_FIND_BACKEND)).is_err());
        let maint = SERVERS_STATE.replace(" 0 0 1 1 10 8", " 0 1 1 1 10 8");
        assert!(ServerState::parse_all(&maint).unwrap()[1].in_maintenance());
    }

    #[test]
    fn joins_lines_under_the_limit() {
        let api = RuntimeApi::new(PathBuf::from("/x")).with_max_line(40);
        let cmds: Vec<String> = (0..10).map(|i| format!("set map /m k{i} v")).collect();
        let lines = api.join_lines(&cmds);
        assert!(lines.iter().all(|l| l.len() < 40), "{lines:?}");
        assert_eq!(lines.join(";"), cmds.join(";"));
        assert_eq!(
            lines.iter().map(|l| count_commands(l)).sum::<usize>(),
            cmds.len()
        );
        let long = Command::add_map(map(), "k".repeat(40), "v");
        let err = api.check_len(&long.render().unwrap()).unwrap_err();
        assert!(matches!(err, RuntimeError::LineTooLong { .. }));
    }

    #[tokio::test]
    async fn refused_socket_names_the_path() {
        let dir = std::env::temp_dir().join(format!("pgs-runtime-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        // A socket file nobody listens on any more: what a crashed HAProxy leaves behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = RuntimeApi::new(path.clone()).show_info().await.unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "HAProxy runtime socket {}: connection refused — is HAProxy running?",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn missing_socket_names_the_path() {
        let api = RuntimeApi::new(PathBuf::from("/nonexistent/pgs/admin.sock"));
        let err = api.show_info().await.unwrap_err();
        assert!(err.is_unreachable());
        assert_eq!(
            err.to_string(),
            "HAProxy runtime socket /nonexistent/pgs/admin.sock: no such socket — is HAProxy running?"
        );
    }

    #[test]
    fn logs_and_errors_never_carry_a_private_key_or_a_cancel_key() {
        let pem = "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----";
        let cmd = Command::SetSslCert {
            file: "/srv/pgs/haproxy/tls/a.pem".into(),
            pem: pem.into(),
        };
        let rendered = cmd.render().unwrap();
        assert!(rendered.contains("SECRETSECRET"));
        let label = cmd.label(&rendered);
        assert!(!label.contains("SECRET"), "{label}");
        let err = check_reply(&cmd, &label, "unable to load".into()).unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
        let api = RuntimeApi::new(PathBuf::from("/nonexistent")).with_max_line(16);
        let err = api.check_len(&rendered).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        let key = Command::SetTableServerId {
            table: "pgs-cancel-keys".into(),
            key: "0000ABCD12345678".into(),
            server_id: 7,
        };
        assert!(!key.label(&key.render().unwrap()).contains("12345678"));
    }
}
