//! Small filesystem helpers every writer shares: atomic replace (temp + fsync + rename) and
//! exclusive advisory locks. Nothing here knows what the files mean.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How hard a write works to survive a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: for sources of truth (the tenants file, secrets).
    Synced,
    /// Rename only, still atomic for every reader: for files derived from a source of truth that
    /// the next reconcile pass rewrites anyway (map files). Saves two fsyncs on the flip path.
    Derived,
}

/// Replaces `path` with `contents` so that readers see either the old or the new file, never a
/// mix, even across a crash: write a temp file beside it, fsync it, rename over, fsync the dir.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, contents, mode, Durability::Synced)
}

/// `write_atomic` with the fsyncs chosen by `durability`.
pub fn write_atomic_with(
    path: &Path,
    contents: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let synced = durability == Durability::Synced;
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` above is filtered by the umask; secrets must end up exactly as asked.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        if synced {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if synced {
            File::open(&dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `path` only when its contents differ; returns whether it wrote.
pub fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    write_if_changed_with(path, contents, mode, Durability::Synced)
}

/// `write_if_changed` with the fsyncs chosen by `durability`.
pub fn write_if_changed_with(
    path: &Path,
    contents: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<bool> {
    match fs::read(path) {
        Ok(old) if old == contents => Ok(false),
        _ => write_atomic_with(path, contents, mode, durability).map(|()| true),
    }
}

/// An exclusive `flock` held until drop. The lock lives on a sidecar file, not on the data file,
/// because atomic writes replace the data file's inode.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the lock at `path` is ours.
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        file.lock()?;
        Ok(FileLock {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// Takes the lock only if nobody holds it.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock {
                _file: file,
                path: path.to_owned(),
            })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomic(&path, b"one", 0o644).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_if_changed_skips_identical_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(write_if_changed(&path, b"x", 0o644).unwrap());
        assert!(!write_if_changed(&path, b"x", 0o644).unwrap());
        assert!(write_if_changed(&path, b"y", 0o644).unwrap());
    }

    #[test]
    fn second_lock_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = FileLock::exclusive(&path).unwrap();
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(first);
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }
}
