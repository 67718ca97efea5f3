//! `init`: creates a self-contained layout (settings, empty tenants file, folders) that works
//! without root. It never overwrites an existing layout.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::fsutil;
use crate::settings::{Paths, Settings};
use crate::tenants;

/// Creates the layout in `dir` and returns the path of its settings file. With `tls_cert` (and
/// `[tls]` in `settings`) the certificate is checked and copied into the certificates directory.
pub fn init(dir: &Path, settings: &Settings, tls_cert: Option<&Path>) -> anyhow::Result<PathBuf> {
    let tls_text = match tls_cert {
        Some(src) => {
            let text = fs::read_to_string(src)
                .with_context(|| format!("cannot read the certificate {}", src.display()))?;
            crate::tls::pem::parse(&text).with_context(|| {
                format!("{} is not a certificate HAProxy can serve", src.display())
            })?;
            Some((src, text))
        }
        None => None,
    };
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let config = dir.join("pgs.toml");
    let paths = Paths::new(&config, settings);
    for existing in [&config, &paths.tenants_file] {
        if existing.exists() {
            bail!(
                "{} already exists: {} already holds a pgs layout. Use it with \
                 `pgs-agent -c {}`, or choose an empty directory",
                existing.display(),
                dir.display(),
                config.display()
            );
        }
    }
    for d in [
        &paths.run_dir,
        &paths.tenant_sockets_dir,
        &paths.haproxy_dir,
        &paths.maps_dir,
    ] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    fs::create_dir_all(&paths.secrets_dir)
        .and_then(|()| fs::set_permissions(&paths.secrets_dir, fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("cannot create {}", paths.secrets_dir.display()))?;
    if let Some((src, text)) = &tls_text {
        fs::create_dir_all(&paths.tls_dir)
            .and_then(|()| fs::set_permissions(&paths.tls_dir, fs::Permissions::from_mode(0o700)))
            .with_context(|| format!("cannot create {}", paths.tls_dir.display()))?;
        let name = cert_file_name(src);
        let dest = paths.tls_dir.join(&name);
        fsutil::write_atomic(&dest, text.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", dest.display()))?;
    }
    fsutil::write_atomic(&paths.api_token, new_token()?.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", paths.api_token.display()))?;
    fsutil::write_atomic(&paths.tenants_file, tenants::empty_file().as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", paths.tenants_file.display()))?;
    // The settings file goes last: its presence marks a complete layout.
    fsutil::write_atomic(&config, settings.to_commented_toml().as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", config.display()))?;
    Ok(config)
}

/// The name a certificate gets in the certificates directory: its own, ending in `.pem`
/// (HAProxy skips `.key`, `.ocsp`, `.issuer` and `.sctl` files in a directory).
fn cert_file_name(src: &Path) -> String {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
        .unwrap_or("server");
    format!("{stem}.pem")
}

/// A new API token: 32 random bytes, hex.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for the API token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_loadable_layout_and_refuses_a_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::default();
        s.haproxy.listen = "127.0.0.1:7000".into();
        let config = init(dir.path(), &s, None).unwrap();
        let agent = crate::settings::Agent::load(&config).unwrap();
        assert_eq!(agent.settings.haproxy.listen, "127.0.0.1:7000");
        assert!(tenants::load(&agent.paths.tenants_file).unwrap().is_empty());
        let mode = fs::metadata(&agent.paths.secrets_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let err = init(dir.path(), &s, None).unwrap_err().to_string();
        assert!(err.contains("already holds a pgs layout"), "{err}");
    }
}
