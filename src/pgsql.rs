//! The SQL the agent speaks to a tenant's server, over its unix socket with `tokio-postgres`:
//! the readiness login, the roles pgs manages (create, align, drop) and password changes.
//! Passwords travel only as SCRAM verifiers computed here, so no cleartext reaches the
//! server's log; none is ever logged or put in an error. It decides nothing about *which*
//! roles should exist (that is `roles`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// How long a login may take: a paused or wedged server must not hold a reconcile pass.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds for every statement of the agent's sessions, enforced by the server itself (a
/// `DROP ROLE` waiting behind a tenant's long transaction gives up instead of hanging).
const SESSION_OPTIONS: &str = "-c statement_timeout=15s -c lock_timeout=5s";

/// The comment that marks a role as created and kept by pgs; roles without it are the
/// tenant's own and never touched.
pub const MANAGED_COMMENT: &str = "managed by pgs-agent";

/// How to log in to a tenant's server as its own superuser.
#[derive(Clone)]
pub struct Login {
    /// The server's socket file (`.../.s.PGSQL.5432`).
    pub socket: PathBuf,
    /// The tenant's own role (its id); also the database connected to.
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("socket", &self.socket)
            .field("user", &self.user)
            .field("password", &"********")
            .finish()
    }
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Not there yet, or starting up: try again.
    #[error("{0}")]
    NotYet(String),
    /// The server answered and refused (wrong password, no such role): waiting will not help.
    #[error("{0}")]
    Refused(String),
}

impl ConnectError {
    /// Whether the server refused the password (SQLSTATE 28P01).
    pub fn is_wrong_password(&self) -> bool {
        matches!(self, ConnectError::Refused(m) if m.contains("28P01"))
    }
}

/// A statement the server refused; the text is PostgreSQL's message, detail and SQLSTATE.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SqlError {
    pub message: String,
    /// PostgreSQL's SQLSTATE, when the server answered.
    pub code: Option<String>,
}

impl From<tokio_postgres::Error> for SqlError {
    fn from(e: tokio_postgres::Error) -> SqlError {
        match e.as_db_error() {
            Some(db) => SqlError {
                message: match db.detail() {
                    Some(d) => format!("{} ({d}) [{}]", db.message(), db.code().code()),
                    None => format!("{} [{}]", db.message(), db.code().code()),
                },
                code: Some(db.code().code().to_owned()),
            },
            None => SqlError {
                message: with_causes(&e),
                code: None,
            },
        }
    }
}

/// One role as the server has it (pg_authid, memberships, per-role settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleState {
    pub name: String,
    /// Carries `MANAGED_COMMENT`.
    pub managed: bool,
    pub can_login: bool,
    /// -1: no limit.
    pub connection_limit: i32,
    pub reads_all: bool,
    pub writes_all: bool,
    /// `default_transaction_read_only = on` for the role.
    pub read_only_default: bool,
    /// The stored verifier (never printed).
    verifier: Option<String>,
}

impl RoleState {
    /// Whether `password` is the role's password.
    pub fn password_is(&self, password: &str) -> bool {
        self.verifier
            .as_deref()
            .is_some_and(|v| scram::verifier_matches(v, password))
    }
}

/// What pgs keeps in line on a role it manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleAttrs {
    pub read_only: bool,
    /// `None`: no limit.
    pub connection_limit: Option<u32>,
}

/// An open session as the tenant's superuser. Dropping it ends the session cleanly: the
/// connection task sends Terminate once the client is gone, then ends.
pub struct Session {
    client: tokio_postgres::Client,
}

/// Logs in (SCRAM or whatever the server asks for) and waits for ReadyForQuery, within
/// `CONNECT_TIMEOUT`.
pub async fn connect(login: &Login) -> Result<Session, ConnectError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_now(login)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::NotYet(format!(
            "{}: no answer within {CONNECT_TIMEOUT:?}",
            login.socket.display()
        ))),
    }
}

async fn connect_now(login: &Login) -> Result<Session, ConnectError> {
    let not_yet = |e: String| ConnectError::NotYet(format!("{}: {e}", login.socket.display()));
    let stream = UnixStream::connect(&login.socket)
        .await
        .map_err(|e| not_yet(e.to_string()))?;
    let mut config = tokio_postgres::Config::new();
    config
        .user(&login.user)
        .dbname(&login.user)
        .password(&login.password)
        .application_name("pgs-agent")
        .options(SESSION_OPTIONS);
    let (client, connection) = config.connect_raw(stream, NoTls).await.map_err(|e| {
        match e.as_db_error() {
            // "the database system is starting up" and friends: ask again.
            Some(db) if *db.code() == SqlState::CANNOT_CONNECT_NOW => {
                not_yet(db.message().to_owned())
            }
            Some(db) => {
                ConnectError::Refused(format!("{} (SQLSTATE {})", db.message(), db.code().code()))
            }
            None => not_yet(with_causes(&e)),
        }
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Session { client })
}

/// Proves the server accepts logins: connects, then drops the session.
pub async fn login(login: &Login) -> Result<(), ConnectError> {
    let session = connect(login).await?;
    session
        .client
        .simple_query("")
        .await
        .map_err(|e| ConnectError::NotYet(with_causes(&e)))?;
    Ok(())
}

impl Session {
    /// Every role but PostgreSQL's own (`pg_*`) and the superuser connected.
    pub async fn roles(&self) -> Result<Vec<RoleState>, SqlError> {
        let rows = self
            .client
            .query(
                "select r.rolname::text, \
                   coalesce(shobj_description(r.oid, 'pg_authid') = $1, false), \
                   r.rolcanlogin, r.rolconnlimit, a.rolpassword, \
                   exists(select 1 from pg_auth_members m \
                          where m.member = r.oid and m.roleid = 'pg_read_all_data'::regrole), \
                   exists(select 1 from pg_auth_members m \
                          where m.member = r.oid and m.roleid = 'pg_write_all_data'::regrole), \
                   coalesce((select 'default_transaction_read_only=on' = any(s.setconfig) \
                             from pg_db_role_setting s \
                             where s.setrole = r.oid and s.setdatabase = 0), false) \
                 from pg_roles r join pg_authid a on a.oid = r.oid \
                 where r.rolname !~ '^pg_' and r.rolname <> current_user",
                &[&MANAGED_COMMENT],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RoleState {
                name: r.get(0),
                managed: r.get(1),
                can_login: r.get(2),
                connection_limit: r.get(3),
                verifier: r.get(4),
                reads_all: r.get(5),
                writes_all: r.get(6),
                read_only_default: r.get(7),
            })
            .collect())
    }

    /// Client sessions other than this one (a backup job's, a session through an old HAProxy
    /// worker that a fresh worker's counters do not see).
    pub async fn other_sessions(&self) -> Result<i64, SqlError> {
        let row = self
            .client
            .query_one(
                "select count(*) from pg_stat_activity \
                 where backend_type = 'client backend' and pid <> pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// With WAL archiving on, closes the current WAL segment and waits until it is archived
    /// (at most `timeout`), so a stop loses nothing the repository does not hold. Returns the
    /// segment, or `None` when archiving is off.
    pub async fn archive_current_wal(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Option<String>, SqlError> {
        let on: String = self
            .client
            .query_one("select current_setting('archive_mode')", &[])
            .await?
            .get(0);
        if on != "on" && on != "always" {
            return Ok(None);
        }
        let segment: String = self
            .client
            .query_one("select pg_walfile_name(pg_switch_wal())", &[])
            .await?
            .get(0);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row = self
                .client
                .query_one(
                    "select coalesce(last_archived_wal, ''), failed_count, \
                            coalesce(last_failed_wal, '') from pg_stat_archiver",
                    &[],
                )
                .await?;
            let last: String = row.get(0);
            if last.as_str() >= segment.as_str() {
                return Ok(Some(segment));
            }
            if tokio::time::Instant::now() >= deadline {
                let failed: i64 = row.get(1);
                let last_failed: String = row.get(2);
                return Err(SqlError {
                    message: format!(
                        "WAL segment {segment} was not archived within {timeout:?} (archiving \
                         failed {failed} times, last {last_failed:?})"
                    ),
                    code: None,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Creates a login role marked as pgs's, with `password` (sent as a verifier).
    pub async fn create_role(&self, name: &str, password: &str) -> Result<(), SqlError> {
        let verifier = scram_verifier(password);
        self.batch(&[
            format!(
                "create role {} login password {}",
                ident(name),
                literal(&verifier)
            ),
            format!(
                "comment on role {} is {}",
                ident(name),
                literal(MANAGED_COMMENT)
            ),
        ])
        .await
    }

    /// Brings a role's attributes, memberships and settings to `want`; returns what changed.
    pub async fn align_role(
        &self,
        have: &RoleState,
        want: RoleAttrs,
    ) -> Result<Vec<&'static str>, SqlError> {
        let name = ident(&have.name);
        let limit = want.connection_limit.map_or(-1, |n| n as i32);
        let mut sql = Vec::new();
        let mut changed = Vec::new();
        if !have.can_login || have.connection_limit != limit {
            sql.push(format!("alter role {name} login connection limit {limit}"));
            changed.push("login and connection limit");
        }
        if !have.reads_all {
            sql.push(format!("grant pg_read_all_data to {name}"));
            changed.push("reads all data");
        }
        if have.writes_all == want.read_only {
            sql.push(if want.read_only {
                format!("revoke pg_write_all_data from {name}")
            } else {
                format!("grant pg_write_all_data to {name}")
            });
            changed.push("writes all data");
        }
        if have.read_only_default != want.read_only {
            sql.push(if want.read_only {
                format!("alter role {name} set default_transaction_read_only = on")
            } else {
                format!("alter role {name} reset default_transaction_read_only")
            });
            changed.push("read-only transactions");
        }
        self.batch(&sql).await?;
        Ok(changed)
    }

    /// Sets a role's password (sent as a verifier).
    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), SqlError> {
        let verifier = scram_verifier(password);
        self.batch(&[format!(
            "alter role {} password {}",
            ident(name),
            literal(&verifier)
        )])
        .await
    }

    /// Drops a role. PostgreSQL refuses while it owns objects or holds privileges (SQLSTATE
    /// 2BP01, with what depends on it in the message); nothing is reassigned or forced.
    pub async fn drop_role(&self, name: &str) -> Result<(), SqlError> {
        self.batch(&[format!("drop role {}", ident(name))]).await
    }

    async fn batch(&self, statements: &[String]) -> Result<(), SqlError> {
        for s in statements {
            self.client.batch_execute(s).await?;
        }
        Ok(())
    }
}

/// A SCRAM-SHA-256 verifier for `password` (random salt), as `ALTER ROLE ... PASSWORD` takes
/// it: the server stores it as is and never sees the password.
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// `"name"`, doubled quotes inside.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, doubled quotes inside (standard_conforming_strings is on since PostgreSQL 9.1).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Checking a password against a stored SCRAM-SHA-256 verifier (RFC 5802's StoredKey), so
/// drift is found without a login attempt that would leave a FATAL in the server's log.
mod scram {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::{Digest, Sha256};

    /// Iterations above this are not a verifier pgs or PostgreSQL's defaults would write; a
    /// bound keeps a hostile catalog entry from costing minutes.
    const MAX_ITERATIONS: u32 = 1 << 20;

    /// Whether `verifier` (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`) was made
    /// from `password`. Anything else (MD5, plain text, a malformed entry) is a mismatch.
    pub fn verifier_matches(verifier: &str, password: &str) -> bool {
        let parse = || -> Option<bool> {
            let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
            let (params, keys) = rest.split_once('$')?;
            let (iterations, salt) = params.split_once(':')?;
            let (stored_key, _server_key) = keys.split_once(':')?;
            let iterations: u32 = iterations.parse().ok().filter(|i| *i <= MAX_ITERATIONS)?;
            let salt = STANDARD.decode(salt).ok()?;
            let stored_key = STANDARD.decode(stored_key).ok()?;
            let salted = hi(password.as_bytes(), &salt, iterations);
            let client_key = hmac(&salted, b"Client Key");
            Some(Sha256::digest(client_key).as_slice() == stored_key.as_slice())
        };
        parse().unwrap_or(false)
    }

    fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    /// SCRAM's `Hi`: PBKDF2-HMAC-SHA-256 with one output block.
    fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(password, &block);
        let mut out = u;
        for _ in 1..iterations {
            u = hmac(password, &u);
            for (o, x) in out.iter_mut().zip(u) {
                *o ^= x;
            }
        }
        out
    }

    #[cfg(test)]
    #[test]
    fn pbkdf2_matches_the_published_vector() {
        let hex: String = hi(b"password", b"salt", 4096)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_match_their_password_only() {
        let v = scram_verifier("s3cret");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        assert!(!v.contains("s3cret"));
        assert!(scram::verifier_matches(&v, "s3cret"));
        assert!(!scram::verifier_matches(&v, "s3cret "));
        assert_ne!(v, scram_verifier("s3cret"), "salted");
        for other in ["md5abc", "s3cret", "SCRAM-SHA-256$x:y$z:w", ""] {
            assert!(!scram::verifier_matches(other, "s3cret"), "{other}");
        }
    }

    #[test]
    fn logins_never_show_their_password() {
        let l = Login {
            socket: "/s".into(),
            user: "acme".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{l:?}").contains("hunter2"));
    }

    #[test]
    fn names_and_texts_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
