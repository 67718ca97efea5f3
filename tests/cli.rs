//! The command line as a user meets it: init, check and render against the real `haproxy -c`,
//! help that teaches, and the README's command table kept true to `--help`.

use crate::support::{agent, have_tools, Layout};

#[test]
fn check_reports_haproxys_own_words_and_render_writes_nothing_bad() {
    if !have_tools(&["haproxy"]) {
        return;
    }
    let layout = Layout::init();
    let cfg = layout.config.to_str().unwrap();
    let out = agent(&["-c", cfg, "check"]);
    assert!(out.status.success(), "{out:?}");

    let good = std::fs::read_to_string(&layout.config).unwrap();
    let bad = good.replace(
        "log = \"stderr format short local0 info\"",
        "log = \"nowhere local0\"",
    );
    assert_ne!(good, bad);
    std::fs::write(&layout.config, bad).unwrap();
    for cmd in ["check", "render"] {
        let out = agent(&["-c", cfg, cmd]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted a bad config");
        assert!(
            err.contains("HAProxy rejected") && err.contains("invalid address: 'nowhere'"),
            "{cmd}: {err}"
        );
    }
    assert!(
        !layout.root().join("haproxy/pgs.cfg").exists(),
        "a rejected config must not be written"
    );
    std::fs::write(&layout.config, good).unwrap();
    layout.render();
    assert!(layout.root().join("haproxy/pgs.cfg").exists());
}

#[test]
fn bad_tenants_files_are_reported_with_every_problem() {
    let layout = Layout::init();
    layout.write_tenants(
        r#"{"version": 1, "tenants": {"Acme": {"external": {"address": "x"}}, "ok": {"acess": "enabled"}}}"#,
    );
    let out = agent(&["-c", layout.config.to_str().unwrap(), "render"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        "tenants.Acme: tenant id \"Acme\" is not valid",
        "tenants.Acme.external.address",
        "tenants.ok.acess: unknown field",
        "tenants.ok: needs \"external\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    layout.write_tenants("{\"version\": 1,\n\"tenants\": {\n,}}");
    let out = agent(&["-c", layout.config.to_str().unwrap(), "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn init_says_what_to_run_next_and_refuses_to_overwrite() {
    let dir = crate::support::temp_dir();
    let root = dir.path().join("pgs");
    let out = agent(&["init", root.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(&format!(
            "haproxy -W -S {0}/run/master.sock -f {0}/haproxy/pgs.cfg",
            root.display()
        )),
        "{text}"
    );
    let out = agent(&["init", root.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a pgs layout"));
    let out = agent(&["-c", "/nonexistent/pgs.toml", "render"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("pgs-agent init"));
}

/// Every command in README.md's command table exists, and every command has help that says
/// something.
#[test]
fn the_readme_command_table_matches_the_help() {
    let readme = include_str!("../README.md");
    let mut seen = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `pgs-agent ")) {
        let cmd = line
            .trim_start_matches("| `pgs-agent ")
            .split('`')
            .next()
            .unwrap();
        let words: Vec<&str> = cmd
            .split_whitespace()
            .filter(|w| {
                !w.starts_with('-') && *w != "CFG" && w.chars().any(|c| c.is_ascii_lowercase())
            })
            .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        let mut args = words.clone();
        args.push("--help");
        let out = agent(&args);
        assert!(
            out.status.success(),
            "README lists `{cmd}`, but `pgs-agent {}` fails",
            args.join(" ")
        );
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in cmd.split_whitespace().filter(|w| w.starts_with("--")) {
            let flag = flag.trim_matches(|c| c == '[' || c == ']');
            assert!(help.contains(flag), "`{cmd}`: {flag} not in its --help");
        }
        seen += 1;
    }
    assert!(seen >= 6, "README command table not found");
    let top = String::from_utf8_lossy(&agent(&["--help"]).stdout).into_owned();
    for sub in [
        "init", "render", "check", "plan", "sync", "run", "tenant", "access",
    ] {
        assert!(top.contains(sub), "{sub} missing from --help");
    }
}

/// `sync` with HAProxy down writes its files and says plainly that nothing is routed yet.
#[test]
fn sync_without_haproxy_says_nothing_is_routed_until_it_starts() {
    if !have_tools(&["haproxy"]) {
        return;
    }
    let layout = Layout::init();
    layout.write_tenants(
        r#"{"version": 1, "tenants": {"acme": {"access": "enabled", "external": {"address": "127.0.0.1:1"}}}}"#,
    );
    let out = agent(&["-c", layout.config.to_str().unwrap(), "sync"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text.contains("HAProxy is not running") && text.contains("nothing is routed"),
        "{text}"
    );
    let map = std::fs::read_to_string(layout.root().join("haproxy/maps/access.map")).unwrap();
    assert!(map.contains("acme enabled"), "{map}");
}

/// One daemon per layout: a second `run` refuses at once and says why, instead of two agents
/// racing over the same files.
#[test]
fn a_second_run_on_the_same_layout_is_refused() {
    if !have_tools(&["haproxy"]) {
        return;
    }
    let layout = Layout::init();
    let first = crate::support::agent::AgentProcess::start(
        &layout.config,
        60,
        &layout.root().join("agent1.log"),
    );
    let mut second = std::process::Command::new(crate::support::agent_bin())
        .args(["-c", layout.config.to_str().unwrap(), "run"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            crate::support::stop_child(
                &mut second,
                libc::SIGTERM,
                std::time::Duration::from_secs(5),
            );
            panic!("a second `run` on the same layout kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("already serving this layout"), "{err}");
    drop(first);
}
