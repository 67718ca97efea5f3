//! A tenant's pgBackRest repository as the host sees it: the backups its `backup.info` lists
//! (pgBackRest adds a backup there only once it is complete), the newest archived WAL, and the
//! window a restore can reach. Read-only; pgBackRest itself writes the repository.

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

/// One complete backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backup {
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Seconds since the epoch.
    pub start: i64,
    pub stop: i64,
    /// Size of the database it copied, in bytes.
    pub database_size: u64,
    /// What it takes in the repository (compressed; an incremental stores only changes).
    pub repository_size: u64,
    /// Taken from a running server (`false`: a stopped one, `--no-online`).
    pub online: bool,
    /// The first WAL segment it needs.
    pub wal_start: String,
}

/// From the oldest backup's end to the newest archived WAL: the times `restore --to` reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub from: i64,
    pub to: i64,
}

/// Parses `backup.info`'s `[backup:current]` section: `LABEL={json}` lines.
pub fn parse_backup_info(text: &str) -> Vec<Backup> {
    let mut out = Vec::new();
    let mut in_current = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_current = line == "[backup:current]";
            continue;
        }
        if !in_current {
            continue;
        }
        let Some((label, json)) = line.split_once('=') else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            continue;
        };
        if v["backup-error"].as_bool() == Some(true) {
            continue;
        }
        out.push(Backup {
            label: label.to_owned(),
            kind: v["backup-type"].as_str().unwrap_or("").to_owned(),
            start: v["backup-timestamp-start"].as_i64().unwrap_or(0),
            stop: v["backup-timestamp-stop"].as_i64().unwrap_or(0),
            database_size: v["backup-info-size"].as_u64().unwrap_or(0),
            repository_size: v["backup-info-repo-size"].as_u64().unwrap_or(0),
            online: v["option-online"].as_bool().unwrap_or(true),
            wal_start: v["backup-archive-start"].as_str().unwrap_or("").to_owned(),
        });
    }
    out.sort_by(|a, b| a.label.cmp(&b.label));
    out
}

/// The backups in the repository, oldest first (none when it has no stanza yet).
pub fn backups(repo: &Path, stanza: &str) -> io::Result<Vec<Backup>> {
    let path = repo.join("backup").join(stanza).join("backup.info");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(parse_backup_info(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Whether `stanza-create` has run for this repository.
pub fn has_stanza(repo: &Path, stanza: &str) -> bool {
    repo.join("archive")
        .join(stanza)
        .join("archive.info")
        .is_file()
        && repo
            .join("backup")
            .join(stanza)
            .join("backup.info")
            .is_file()
}

/// The newest archived WAL segment's name and when it was pushed (seconds since the epoch).
pub fn newest_wal(repo: &Path, stanza: &str) -> Option<(String, i64)> {
    let mut best: Option<(String, i64)> = None;
    let archive = repo.join("archive").join(stanza);
    for version in fs::read_dir(archive).ok()?.flatten() {
        if !version.path().is_dir() {
            continue;
        }
        for dir in fs::read_dir(version.path()).ok()?.flatten() {
            let Ok(files) = fs::read_dir(dir.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                // `<24 hex digits>-<sha1>[.gz|.lz4|...]`; skip .backup and .history files.
                let segment = name.split('-').next().unwrap_or("");
                if segment.len() != 24 || !segment.chars().all(|c| c.is_ascii_hexdigit()) {
                    continue;
                }
                let mtime = f
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let newer = best
                    .as_ref()
                    .is_none_or(|(n, t)| (segment, mtime) > (n.as_str(), *t));
                if newer {
                    best = Some((segment.to_owned(), mtime));
                }
            }
        }
    }
    best
}

/// The restore window: from the end of the oldest backup to the later of the newest backup's
/// end and the newest archived WAL.
pub fn window(backups: &[Backup], newest_wal_at: Option<i64>) -> Option<Window> {
    let from = backups.iter().map(|b| b.stop).min()?;
    let latest = backups.iter().map(|b| b.stop).max()?;
    Some(Window {
        from,
        to: latest.max(newest_wal_at.unwrap_or(0)),
    })
}

/// Bytes the repository takes on disk.
pub fn size_on_disk(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => size_on_disk(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[backrest]
backrest-format=5

[backup:current]
20261205-193428F={"backup-archive-start":"000000010000000000000002","backup-error":false,"backup-info-repo-size":4078553,"backup-info-size":30758977,"backup-timestamp-start":1796499268,"backup-timestamp-stop":1796499272,"backup-type":"full","option-online":true}
20261205-193428F_20261205-193500I={"backup-archive-start":"000000010000000000000004","backup-info-repo-size":1000,"backup-info-size":30758977,"backup-timestamp-start":1796499300,"backup-timestamp-stop":1796499302,"backup-type":"incr","option-online":false}
20261205-193428F_20261205-193600I={"backup-error":true,"backup-timestamp-stop":1796499362,"backup-type":"incr"}

[db]
db-id=1
"#;

    #[test]
    fn backup_info_lists_complete_backups() {
        let b = parse_backup_info(INFO);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0].kind, "full");
        assert_eq!(b[0].repository_size, 4_078_553);
        assert_eq!(b[0].wal_start, "000000010000000000000002");
        assert!(b[0].online);
        assert_eq!(b[1].kind, "incr");
        assert!(!b[1].online);
        assert_eq!(
            window(&b, Some(1_796_499_400)),
            Some(Window {
                from: 1_796_499_272,
                to: 1_796_499_400
            })
        );
        assert_eq!(window(&b, None).unwrap().to, 1_796_499_302);
        assert_eq!(window(&[], Some(5)), None);
    }
}
