//! Keeping HAProxy's maps right in both places: the map file (read at start and on reload) and
//! the running process (changed through the Runtime API, lost on reload). The file is always
//! written first, so a crash between the two leaves the file right and the next sync repairs
//! memory by comparing `show map` with the desired entries.

use std::collections::BTreeMap;
use std::path::Path;

use crate::fsutil;
use crate::haproxy::render;
use crate::haproxy::runtime::{Command, RuntimeApi, RuntimeError};
use crate::plan::MapStep;

/// Above this many changes a map is replaced whole (`prepare`/`add @v`/`commit`), so no
/// connection sees a half-updated map; below it single commands are cheaper.
const REPLACE_THRESHOLD: usize = 16;

/// Desired entries of a map, by key.
pub type Entries = BTreeMap<String, String>;

pub fn entries(pairs: Vec<(String, String)>) -> Entries {
    pairs.into_iter().collect()
}

/// Writes the map file when it differs; returns whether it wrote. Atomic but not fsynced: the
/// file is derived from the tenants file, and every pass rewrites it.
pub fn write_file(path: &Path, want: &Entries) -> std::io::Result<bool> {
    let text = render::map_file(want.iter().map(|(k, v)| (k.clone(), v.clone())));
    fsutil::write_if_changed_with(path, text.as_bytes(), 0o644, fsutil::Durability::Derived)
}

/// The entries of a map file (comments and blank lines skipped); empty when unreadable.
pub fn read_file(path: &Path) -> Entries {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            Some((k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// What the running HAProxy holds in `map`.
pub async fn show(api: &RuntimeApi, map: &Path) -> Result<Entries, RuntimeError> {
    Ok(api.show_map(map).await?.into_iter().collect())
}

/// The changes that turn `current` into `want`.
pub fn diff(current: &Entries, want: &Entries) -> Vec<MapStep> {
    let mut steps: Vec<MapStep> = current
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(|k| MapStep::Del { key: k.clone() })
        .collect();
    steps.extend(
        want.iter()
            .filter(|(k, v)| current.get(*k) != Some(v))
            .map(|(k, v)| MapStep::Set {
                key: k.clone(),
                value: v.clone(),
            }),
    );
    steps
}

/// Applies `steps` to the running map, whose entries are `current`: one batch on one
/// connection (`add map` for new keys, `set map` for existing ones). Many steps replace the whole
/// map atomically with `want` instead.
pub async fn apply(
    api: &RuntimeApi,
    map: &Path,
    steps: &[MapStep],
    current: &Entries,
    want: &Entries,
) -> Result<(), RuntimeError> {
    if steps.is_empty() {
        return Ok(());
    }
    if steps.len() > REPLACE_THRESHOLD {
        let pairs: Vec<(&str, &str)> = want.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        api.replace_map(map, &pairs).await?;
        return Ok(());
    }
    let commands: Vec<Command> = steps
        .iter()
        .map(|step| match step {
            MapStep::Del { key } => Command::del_map(map, key.as_str()),
            MapStep::Set { key, value } if current.contains_key(key) => {
                Command::set_map(map, key.as_str(), value.as_str())
            }
            MapStep::Set { key, value } => Command::add_map(map, key.as_str(), value.as_str()),
        })
        .collect();
    api.batch_all(&commands).await.map(drop)
}

/// Makes the running map equal `want`; returns what it changed.
pub async fn sync(
    api: &RuntimeApi,
    map: &Path,
    want: &Entries,
) -> Result<Vec<MapStep>, RuntimeError> {
    let current = show(api, map).await?;
    let steps = diff(&current, want);
    apply(api, map, &steps, &current, want).await?;
    Ok(steps)
}

/// One command that ends every session of a tenant's backend server.
pub fn shutdown_sessions(backend: &str, server: &str) -> Command {
    Command::ShutdownSessionsServer {
        backend: backend.into(),
        server: server.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_deletes_extras_and_sets_missing_or_changed() {
        let cur = entries(vec![
            ("a".into(), "enabled".into()),
            ("x".into(), "enabled".into()),
            ("b".into(), "pgs_old".into()),
        ]);
        let want = entries(vec![
            ("a".into(), "enabled".into()),
            ("b".into(), "pgs_b".into()),
            ("c".into(), "enabled".into()),
        ]);
        assert_eq!(
            diff(&cur, &want),
            vec![
                MapStep::Del { key: "x".into() },
                MapStep::Set {
                    key: "b".into(),
                    value: "pgs_b".into()
                },
                MapStep::Set {
                    key: "c".into(),
                    value: "enabled".into()
                },
            ]
        );
        assert!(diff(&want, &want).is_empty());
    }
}
