//! TLS to clients: the certificates directory HAProxy serves (which files, what they hold) and
//! keeping the running HAProxy's certificates equal to the files, through the Runtime API and
//! without a reload. HAProxy terminates TLS; nothing here touches a client connection.

pub mod pem;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::haproxy::runtime::{Command, ReplyError, RuntimeApi, RuntimeError};

pub use pem::CertInfo;

/// Extensions HAProxy reads as companions of a certificate in a directory, not as certificates.
const COMPANION_EXTENSIONS: &[&str] = &["key", "ocsp", "issuer", "sctl"];

/// The files HAProxy loads from a `crt <dir>`, in its (alphabetical) order: regular files, not
/// hidden (the agent's and most tools' temporary files start with a dot), not companions.
pub fn served_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let companion = Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| COMPANION_EXTENSIONS.contains(&e));
        if name.starts_with('.') || companion || !entry.file_type()?.is_file() {
            continue;
        }
        files.push(entry.path());
    }
    files.sort();
    Ok(files)
}

/// What the running HAProxy serves under a file name (`show ssl cert <file>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Served {
    pub serial: String,
    pub sha1: String,
    pub not_after: String,
    pub subject: String,
}

impl Served {
    pub fn parse(body: &str) -> Served {
        let field = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        Served {
            serial: field("Serial:"),
            sha1: field("SHA1 FingerPrint:"),
            not_after: field("notAfter:"),
            subject: field("Subject:"),
        }
    }
}

/// The served certificate, or `None` when HAProxy has none under that name.
pub async fn served(api: &RuntimeApi, file: &Path) -> Result<Option<Served>, RuntimeError> {
    let cmd = Command::ShowSslCert { file: file.into() };
    match api.execute(&cmd).await {
        Ok(body) => Ok(Some(Served::parse(&body))),
        Err(e) if e.reply_error() == Some(ReplyError::CertificateNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What [`push`] did for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// HAProxy already served this certificate.
    Unchanged,
    /// A renewed certificate replaced the served one.
    Renewed { serial: String },
    /// A new file is served from now on.
    Added { serial: String },
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("certificate {file} is not usable ({reason}); HAProxy keeps serving what it had")]
    Unusable { file: PathBuf, reason: String },
    #[error("HAProxy refused certificate {file}: {source}; it keeps serving what it had")]
    Refused { file: PathBuf, source: RuntimeError },
}

/// Makes HAProxy serve what `file` (in the certificates directory `dir`) holds, if it does not
/// already: `set ssl cert` + `commit ssl cert` for a file it loaded, and `new ssl cert` first
/// plus `add ssl crt-list` after for a new one. New handshakes get the new certificate, open
/// sessions keep theirs, the worker stays the same. A file that does not parse, or that
/// HAProxy refuses, changes nothing (an open transaction is aborted).
pub async fn push(api: &RuntimeApi, dir: &Path, file: &Path) -> Result<Pushed, PushError> {
    let text = std::fs::read_to_string(file).map_err(|e| PushError::Unusable {
        file: file.into(),
        reason: format!("cannot read it: {e}"),
    })?;
    let info = pem::parse(&text).map_err(|e| PushError::Unusable {
        file: file.into(),
        reason: e.to_string(),
    })?;
    let refused = |source| PushError::Refused {
        file: file.into(),
        source,
    };
    let current = served(api, file).await.map_err(refused)?;
    if current.as_ref().is_some_and(|s| s.sha1 == info.sha1) {
        return Ok(Pushed::Unchanged);
    }
    let new = current.is_none();
    let mut steps = Vec::new();
    if new {
        steps.push(Command::NewSslCert { file: file.into() });
    }
    steps.push(Command::SetSslCert {
        file: file.into(),
        pem: pem::payload(&text),
    });
    steps.push(Command::CommitSslCert { file: file.into() });
    if new {
        steps.push(Command::AddSslCrtList {
            list: dir.into(),
            file: file.into(),
        });
    }
    for step in &steps {
        if let Err(e) = api.execute(step).await {
            if matches!(
                step,
                Command::SetSslCert { .. } | Command::CommitSslCert { .. }
            ) {
                let abort = Command::AbortSslCert { file: file.into() };
                if let Err(ae) = api.execute(&abort).await {
                    tracing::debug!(file = %file.display(), error = %ae, "nothing to abort");
                }
            }
            return Err(refused(e));
        }
    }
    Ok(if new {
        Pushed::Added {
            serial: info.serial,
        }
    } else {
        Pushed::Renewed {
            serial: info.serial,
        }
    })
}

/// One certificate file as `tls status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub file: PathBuf,
    /// The file's leaf certificate, when it parses.
    pub certificate: Option<CertInfo>,
    /// Why it does not parse.
    pub problem: Option<String>,
    /// Seconds until the file's certificate expires (negative: expired).
    pub expires_in_secs: Option<i64>,
    /// What HAProxy serves under this file name; `None` when HAProxy is not running or has
    /// not loaded it.
    pub served: Option<Served>,
    /// Whether HAProxy serves exactly this file's certificate (`None`: HAProxy not running).
    pub in_sync: Option<bool>,
}

/// Every file of the certificates directory, with what the running HAProxy serves for it.
/// `api` is `None` when HAProxy's state is not wanted (or it is known not to run).
pub async fn status(dir: &Path, api: Option<&RuntimeApi>) -> std::io::Result<Vec<CertStatus>> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for file in served_files(dir)? {
        let parsed = pem::read(&file);
        let served = match api {
            Some(api) => match served(api, &file).await {
                Ok(s) => Some(s),
                Err(e) if e.is_unreachable() => None,
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "show ssl cert failed");
                    None
                }
            },
            None => None,
        };
        let in_sync = served.as_ref().map(|s| match (s, &parsed) {
            (Some(s), Ok(info)) => s.sha1 == info.sha1,
            _ => false,
        });
        out.push(CertStatus {
            expires_in_secs: parsed.as_ref().ok().map(|i| i.expires_in(now)),
            certificate: parsed.as_ref().ok().cloned(),
            problem: parsed.err(),
            served: served.flatten(),
            in_sync,
            file,
        });
    }
    Ok(out)
}
