//! The Debian package, installed for real on the test machine: it builds, lintian finds no
//! errors, `dpkg -i` creates a fresh layout and starts nothing, systemd accepts the units, an
//! upgrade keeps settings and layout, and remove and purge leave the tenants' data alone.
//! It owns /etc/pgs and /var/lib/pgs while it runs: on a machine where a real pgs-agent
//! package (or those directories) already exist it fails instead of touching them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::{agent_bin, have_tools};

const CONF: &str = "/etc/pgs/pgs.toml";
const DATA: &str = "/var/lib/pgs";
/// Written into /var/lib/pgs before the install, so a leftover of this test is recognised as
/// its own and nothing else is ever removed.
const MARKER: &str = "/var/lib/pgs/.pgs-package-test";

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg, waiting for a lock another apt or dpkg on the machine may hold.
fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = run("dpkg", args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned() + &err;
        }
        if err.contains("lock") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        panic!(
            "dpkg {args:?}: {}\n{}{err}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${db:Status-Status}", "pgs-agent"]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() != "not-installed"
}

/// Removes what this test installed and created, and only that.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if Path::new(MARKER).exists() {
            if installed() {
                let _ = run("dpkg", &["--purge", "pgs-agent"]);
            }
            let _ = fs::remove_dir_all(DATA);
            let _ = fs::remove_dir_all("/etc/pgs");
        }
    }
}

fn take_over_or_fail() -> Cleanup {
    if Path::new(MARKER).exists() {
        drop(Cleanup); // a leftover of an interrupted run of this test
    }
    assert!(
        !installed() && !Path::new(DATA).exists() && !Path::new("/etc/pgs").exists(),
        "a pgs-agent package, {DATA} or /etc/pgs exists on this machine: the package test \
         installs into exactly those places and will not touch someone's installation"
    );
    fs::create_dir_all(DATA).unwrap();
    fs::write(MARKER, "created by the package test\n").unwrap();
    Cleanup
}

#[test]
fn the_package_installs_upgrades_and_keeps_data_on_remove_and_purge() {
    if !have_tools(&[
        "dpkg-deb",
        "lintian",
        "systemd-analyze",
        "dpkg-shlibdeps",
        "haproxy",
    ]) {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("PGS_REQUIRE_INTEGRATION").is_none(),
            "the package test installs a .deb: run it as root"
        );
        eprintln!("skipping: not root");
        return;
    }
    // One package test per machine at a time (several checkouts may run their suites).
    let lock = crate::support::MachineLock::take("pgs-package-test");
    let out_dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let built = ok(
        &format!("{root}/scripts/build-deb.sh"),
        &[
            "--binary",
            agent_bin(),
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
    );
    let deb = PathBuf::from(built.lines().last().unwrap());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("pgs-agent_{version}_amd64.deb")
    );
    let deb = deb.to_str().unwrap();
    let depends = ok("dpkg-deb", &["--field", deb, "Depends"]);
    assert!(depends.contains("haproxy (>= 2.6)"), "{depends}");
    assert!(depends.contains("docker.io | docker-ce"), "{depends}");

    // lintian: warnings are allowed, errors are not.
    let lint = run("lintian", &["--no-tag-display-limit", deb]);
    let report = String::from_utf8_lossy(&lint.stdout);
    assert!(
        lint.status.success() && !report.lines().any(|l| l.starts_with("E:")),
        "lintian:\n{report}{}",
        String::from_utf8_lossy(&lint.stderr)
    );

    let _cleanup = take_over_or_fail();
    let said = dpkg(&["-i", deb]);
    assert!(said.contains("new layout in /var/lib/pgs"), "{said}");
    let v = ok("/usr/bin/pgs-agent", &["--version"]);
    assert!(v.contains(version), "{v}");
    // A fresh layout under /var/lib/pgs, its settings in /etc/pgs, usable as they are.
    let conf = fs::read_to_string(CONF).unwrap();
    assert!(
        conf.contains("tenants_file = \"/var/lib/pgs/tenants.json\""),
        "{conf}"
    );
    assert!(conf.contains("mode = \"fragment\""), "{conf}");
    // Everything the agent writes lives under /var/lib/pgs (the unit makes /etc/pgs read-only).
    for line in [
        "state_dir = \"/var/lib/pgs/state\"",
        "repository = \"/var/lib/pgs/backups\"",
    ] {
        assert!(conf.contains(line), "{line} missing in:\n{conf}");
    }
    assert!(!Path::new(DATA).join("pgs.toml").exists());
    let token = fs::read(Path::new(DATA).join("secrets/api-token")).unwrap();
    ok("/usr/bin/pgs-agent", &["-c", CONF, "check"]);
    // Nothing was started: no daemon holds the layout's lock.
    let lock_file = Path::new(DATA).join("run/daemon.lock");
    assert!(
        !lock_file.exists()
            || pgs_agent::fsutil::FileLock::try_exclusive(&lock_file)
                .unwrap()
                .is_some(),
        "the install started a pgs-agent"
    );

    // systemd accepts the units: the agent's, and Debian's haproxy.service with pgs's drop-in.
    ok(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/pgs-agent.service"],
    );
    let units = tempfile::tempdir().unwrap();
    fs::copy(
        "/lib/systemd/system/haproxy.service",
        units.path().join("haproxy.service"),
    )
    .unwrap();
    fs::create_dir(units.path().join("haproxy.service.d")).unwrap();
    fs::copy(
        "/usr/share/pgs/haproxy.service.d/pgs.conf",
        units.path().join("haproxy.service.d/pgs.conf"),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args([
            "verify",
            units.path().join("haproxy.service").to_str().unwrap(),
        ])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.path().display()))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "haproxy.service + pgs.conf: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let shown = fs::read_to_string("/usr/share/pgs/haproxy.service.d/pgs.conf").unwrap();
    assert!(shown.contains("-f /var/lib/pgs/haproxy/pgs.cfg"), "{shown}");

    // An upgrade (the same package again) overwrites neither settings nor layout.
    let edited = format!("{conf}# kept across upgrades\n");
    fs::write(CONF, &edited).unwrap();
    let tenants = Path::new(DATA).join("tenants.json");
    let tenants_before = fs::read(&tenants).unwrap();
    dpkg(&["-i", deb]);
    assert_eq!(fs::read_to_string(CONF).unwrap(), edited);
    assert_eq!(
        fs::read(Path::new(DATA).join("secrets/api-token")).unwrap(),
        token
    );
    assert_eq!(fs::read(&tenants).unwrap(), tenants_before);

    // Remove, then purge: the program goes, the tenants' settings and secrets stay.
    dpkg(&["-r", "pgs-agent"]);
    assert!(!Path::new("/usr/bin/pgs-agent").exists());
    dpkg(&["-P", "pgs-agent"]);
    assert!(!installed());
    assert_eq!(fs::read(&tenants).unwrap(), tenants_before);
    assert_eq!(
        fs::read(Path::new(DATA).join("secrets/api-token")).unwrap(),
        token
    );
    assert_eq!(fs::read_to_string(CONF).unwrap(), edited);
    drop(lock);
}
