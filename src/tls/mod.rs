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

/// A certificate file of the operator's directory that parses, and where its served copy (the
/// file HAProxy loads) lives.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub file: PathBuf,
    pub served: PathBuf,
    pub text: String,
    pub info: CertInfo,
}

/// The operator's certificates directory compared with the served copies.
#[derive(Debug, Default)]
pub struct Scan {
    /// Files that parse and differ from their served copy (or have none yet).
    pub changed: Vec<Candidate>,
    /// Files that parse and equal their served copy.
    pub current: Vec<Candidate>,
    /// Files that do not parse, with the reason: their served copy (if any) stays.
    pub unusable: Vec<(PathBuf, String)>,
    /// Served copies whose file is gone.
    pub orphans: Vec<PathBuf>,
}

impl Scan {
    pub fn usable(&self) -> usize {
        self.changed.len() + self.current.len()
    }
}

/// Compares the certificates directory `dir` with the served copies in `served_dir`.
pub fn scan(dir: &Path, served_dir: &Path) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    let files = served_files(dir)?;
    for file in &files {
        let served = served_dir.join(file.file_name().unwrap_or_default());
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                out.unusable
                    .push((file.clone(), format!("cannot read it: {e}")));
                continue;
            }
        };
        match pem::parse(&text) {
            Ok(info) => {
                let same = std::fs::read_to_string(&served).is_ok_and(|s| s == text);
                let c = Candidate {
                    file: file.clone(),
                    served,
                    text,
                    info,
                };
                if same {
                    out.current.push(c);
                } else {
                    out.changed.push(c);
                }
            }
            Err(e) => out.unusable.push((file.clone(), e.to_string())),
        }
    }
    if let Ok(served) = served_files(served_dir) {
        let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
        out.orphans = served
            .into_iter()
            .filter(|s| !s.file_name().is_some_and(|n| names.contains(&n)))
            .collect();
    }
    Ok(out)
}

/// Writes a candidate's served copy (mode 0600: it holds a private key).
pub fn write_served(c: &Candidate) -> std::io::Result<()> {
    if let Some(dir) = c.served.parent() {
        std::fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    crate::fsutil::write_atomic(&c.served, c.text.as_bytes(), 0o600)
}

/// Brings the served copies in line with the directory without asking HAProxy: for a
/// configuration about to be checked with `haproxy -c` (which then vets them) or installed
/// after that check. Files that do not parse keep their old copy. Whether anything changed.
pub fn install_served(dir: &Path, served_dir: &Path) -> std::io::Result<bool> {
    let scan = scan(dir, served_dir)?;
    for c in &scan.changed {
        write_served(c)?;
    }
    for o in &scan.orphans {
        std::fs::remove_file(o)?;
    }
    Ok(!scan.changed.is_empty() || !scan.orphans.is_empty())
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

/// Makes the running HAProxy serve `c` under its served file name, if it does not already:
/// `set ssl cert` + `commit ssl cert` for a file it loaded, and `new ssl cert` first plus
/// `add ssl crt-list` after for a new one. New handshakes get the new certificate, open
/// sessions keep theirs, the worker stays the same. When HAProxy refuses it, nothing changes
/// (an open transaction is aborted). The caller writes the served copy after a success.
pub async fn push(
    api: &RuntimeApi,
    served_dir: &Path,
    c: &Candidate,
) -> Result<Pushed, RuntimeError> {
    let file = &c.served;
    let current = served(api, file).await?;
    if current.as_ref().is_some_and(|s| s.sha1 == c.info.sha1) {
        return Ok(Pushed::Unchanged);
    }
    let new = current.is_none();
    let mut steps = Vec::new();
    if new {
        steps.push(Command::NewSslCert { file: file.clone() });
    }
    steps.push(Command::SetSslCert {
        file: file.clone(),
        pem: pem::payload(&c.text),
    });
    steps.push(Command::CommitSslCert { file: file.clone() });
    if new {
        steps.push(Command::AddSslCrtList {
            list: served_dir.into(),
            file: file.clone(),
        });
    }
    for step in &steps {
        if let Err(e) = api.execute(step).await {
            if matches!(
                step,
                Command::SetSslCert { .. } | Command::CommitSslCert { .. }
            ) {
                let abort = Command::AbortSslCert { file: file.clone() };
                if let Err(ae) = api.execute(&abort).await {
                    tracing::debug!(file = %file.display(), error = %ae, "nothing to abort");
                }
            }
            return Err(e);
        }
    }
    let serial = c.info.serial.clone();
    Ok(if new {
        Pushed::Added { serial }
    } else {
        Pushed::Renewed { serial }
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
    /// What HAProxy serves for this file; `None` when HAProxy is not running or has not loaded
    /// it.
    pub served: Option<Served>,
    /// Whether HAProxy serves exactly this file's certificate (`None`: HAProxy not running).
    pub in_sync: Option<bool>,
}

/// Every file of the certificates directory `dir`, with what the running HAProxy serves for
/// it (under its copy in `served_dir`). `api` is `None` when HAProxy is known not to run.
pub async fn status(
    dir: &Path,
    served_dir: &Path,
    api: Option<&RuntimeApi>,
) -> std::io::Result<Vec<CertStatus>> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for file in served_files(dir)? {
        let parsed = pem::read(&file);
        let copy = served_dir.join(file.file_name().unwrap_or_default());
        let served = match api {
            Some(api) => match served(api, &copy).await {
                Ok(s) => Some(s),
                Err(e) if e.is_unreachable() => None,
                Err(e) => {
                    tracing::warn!(file = %copy.display(), error = %e, "show ssl cert failed");
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
