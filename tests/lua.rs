//! The router's pure Lua (lua/pgs_wire.lua) under a plain `lua5.3`, outside HAProxy: its unit
//! tests in lua/tests/ run in milliseconds.

use std::process::Command;

use crate::support::have_tools;

#[test]
fn the_routers_wire_module_passes_its_unit_tests_under_plain_lua() {
    if !have_tools(&["lua5.3"]) {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    for entry in std::fs::read_dir(format!("{root}/lua/tests")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("lua") {
            continue;
        }
        let out = Command::new("lua5.3")
            .arg(&path)
            .current_dir(root)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(" passed, 0 failed"),
            "{}: {stdout}{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
