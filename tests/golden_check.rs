//! Every golden config (tests/golden/*.cfg, checked by the render unit tests) is also accepted
//! by the real `haproxy -c`, with its paths moved into a temp dir.

use crate::support::tls::TestCerts;
use crate::support::{have_tools, temp_dir};
use std::process::Command;

#[test]
fn golden_configs_pass_haproxy_check() {
    if !have_tools(&["haproxy", "openssl"]) {
        return;
    }
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("cfg") {
            continue;
        }
        let dir = temp_dir();
        let root = dir.path().to_str().unwrap();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/srv/pgs", root);
        std::fs::create_dir_all(dir.path().join("haproxy/maps")).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        for map in ["backends.map", "access.map", "servers.map", "asleep.map"] {
            std::fs::write(dir.path().join("haproxy/maps").join(map), "").unwrap();
        }
        std::fs::write(
            dir.path().join("haproxy/pg-route.lua"),
            include_str!("../lua/pg-route.lua"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("haproxy/pgs_wire.lua"),
            include_str!("../lua/pgs_wire.lua"),
        )
        .unwrap();
        if text.contains("ssl crt ") {
            // The TLS golden serves the certificates directory: give it one.
            let certs = TestCerts::new(dir.path());
            std::fs::create_dir_all(dir.path().join("haproxy/tls")).unwrap();
            std::fs::copy(&certs.server_pem, dir.path().join("haproxy/tls/server.pem")).unwrap();
        }
        let pgs_cfg = dir.path().join("pgs.cfg");
        std::fs::write(&pgs_cfg, &text).unwrap();
        let mut files = vec![pgs_cfg];
        if text.contains("Fragment mode") {
            // A fragment is loaded after the operator's own file, which owns `global`.
            let base = dir.path().join("operator.cfg");
            std::fs::write(&base, "global\n    log stderr format short local0\n").unwrap();
            files.insert(0, base);
        }
        let mut cmd = Command::new("haproxy");
        cmd.arg("-c");
        for f in &files {
            cmd.arg("-f").arg(f);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 4, "expected the golden configs, found {checked}");
}
