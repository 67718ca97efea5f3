//! A private pgs installation on the real Docker engine, for driver tests: a unique
//! `docker.prefix` (so parallel tests, and real installations on the same engine, never meet),
//! a temp layout with `DockerSettings` and `Paths` for it, and on drop the removal of every
//! container and volume carrying that installation's label, even when the test panicked.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use pgs_agent::instances::docker::{DockerDriver, LABEL_INSTALLATION, LABEL_MANAGED};
use pgs_agent::settings::{DockerSettings, Paths, Settings};
use pgs_agent::tenants::TenantId;

use super::temp_dir;

/// The tenant image the tests run (`docker/build-image.sh 15` builds it).
pub const IMAGE: &str = "pgs/postgres:15";

/// The image under test: `PGS_TEST_IMAGE` (an image built with `PGS_IMAGE_REPO`, to try an
/// image change before it replaces the shared tag), else `IMAGE`.
pub fn image() -> String {
    std::env::var("PGS_TEST_IMAGE").unwrap_or_else(|_| IMAGE.to_owned())
}

/// Prefix of every test installation; `pgstest-<pid>-<n>`.
const TEST_PREFIX: &str = "pgstest-";

pub struct DockerEnv {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub settings: DockerSettings,
    pub paths: Paths,
}

impl DockerEnv {
    /// A fresh installation, or `None` (test skipped) when the engine or the image is missing.
    /// With `PGS_REQUIRE_INTEGRATION` set, a missing engine or image fails the test instead.
    pub fn new() -> Option<DockerEnv> {
        if let Err(why) = engine_ready() {
            if std::env::var_os("PGS_REQUIRE_INTEGRATION").is_some() {
                panic!("{why} (PGS_REQUIRE_INTEGRATION is set)");
            }
            eprintln!("skipping: {why}");
            return None;
        }
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_dead_runs);
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "{TEST_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = temp_dir();
        let mut settings = Settings::default();
        settings.docker.prefix = prefix.clone();
        settings.docker.default_image = image();
        if let Some(sock) = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        {
            settings.docker.socket = sock.into();
        }
        let config = dir.path().join("pgs.toml");
        std::fs::write(&config, settings.to_commented_toml()).unwrap();
        let paths = Paths::new(&config, &settings);
        Some(DockerEnv {
            prefix,
            dir,
            settings: settings.docker,
            paths,
        })
    }

    pub async fn driver(&self) -> DockerDriver {
        DockerDriver::connect(&self.settings, &self.paths)
            .await
            .expect("connect to the docker engine")
    }

    /// A raw engine client, independent of the driver under test.
    pub async fn engine(&self) -> bollard::Docker {
        bollard::Docker::connect_with_unix(
            self.settings.socket.to_str().unwrap(),
            60,
            bollard::API_DEFAULT_VERSION,
        )
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
    }

    /// A libpq conninfo that reaches the tenant's server directly through its socket directory.
    pub fn conninfo(&self, id: &TenantId) -> String {
        format!(
            "host={} user={id} dbname={id}",
            self.paths.tenant_socket_dir(id).display()
        )
    }

    /// Writes a file under the layout dir (where relative init scripts are looked up), 0644.
    pub fn write_file(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        super::set_mode(&path, 0o644);
    }

    fn label_filter(&self) -> String {
        format!("label={LABEL_INSTALLATION}={}", self.prefix)
    }

    /// IDs of this installation's containers.
    pub fn containers(&self) -> Vec<String> {
        lines(&docker(&["ps", "-aq", "--filter", &self.label_filter()]))
    }

    /// Names of this installation's volumes.
    pub fn volumes(&self) -> Vec<String> {
        lines(&docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &self.label_filter(),
        ]))
    }

    /// Removes every container and volume of this installation; returns what it removed.
    pub fn cleanup(&self) -> usize {
        remove_installation(&self.prefix)
    }
}

impl Drop for DockerEnv {
    fn drop(&mut self) {
        self.cleanup();
        let left = self.containers().len() + self.volumes().len();
        if left > 0 {
            eprintln!(
                "warning: {left} docker object(s) of {} are left behind",
                self.prefix
            );
        }
    }
}

/// Runs the docker CLI (independent of the driver under test) and returns its output.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn engine_ready() -> Result<(), String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "docker engine not answering ({}); start it with scripts/start-dockerd.sh",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Err(format!("docker CLI not runnable: {e}")),
    }
    let image = image();
    if !docker(&["image", "inspect", &image]).status.success() {
        return Err(format!(
            "image {image} is missing; build it with docker/build-image.sh 15"
        ));
    }
    Ok(())
}

/// Force-removes the containers (and their anonymous volumes), then the volumes, of one
/// installation. The CLI calls return once the engine is done.
fn remove_installation(prefix: &str) -> usize {
    let filter = format!("label={LABEL_INSTALLATION}={prefix}");
    let containers = lines(&docker(&["ps", "-aq", "--filter", &filter]));
    if !containers.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(containers.iter().map(String::as_str));
        docker(&args);
    }
    let volumes = lines(&docker(&["volume", "ls", "-q", "--filter", &filter]));
    if !volumes.is_empty() {
        let mut args = vec!["volume", "rm", "-f"];
        args.extend(volumes.iter().map(String::as_str));
        docker(&args);
    }
    containers.len() + volumes.len()
}

/// Removes what earlier test processes that died without dropping their fixtures left behind
/// (installations `pgstest-<pid>-<n>` whose pid is gone).
fn sweep_dead_runs() {
    let managed = format!("label={LABEL_MANAGED}=1");
    let format = format!("{{{{.Label \"{LABEL_INSTALLATION}\"}}}}");
    let mut prefixes: Vec<String> = lines(&docker(&[
        "ps", "-a", "--filter", &managed, "--format", &format,
    ]));
    prefixes.extend(lines(&docker(&[
        "volume", "ls", "--filter", &managed, "--format", &format,
    ])));
    prefixes.sort();
    prefixes.dedup();
    for prefix in prefixes {
        let Some(pid) = prefix
            .strip_prefix(TEST_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let n = remove_installation(&prefix);
            eprintln!("removed {n} docker object(s) left by an earlier test run ({prefix})");
        }
    }
}
