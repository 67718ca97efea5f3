//! A private Docker engine for tests that kill dockerd: its own containerd (so a `kill -9` of
//! dockerd leaves containerd and the container shims running, as with Debian's
//! containerd.service), its own socket, data root, exec root and pid file, no bridge and no
//! iptables, and a copy of the tenant image. The shared engine at /var/run/docker.sock is
//! never touched. Drop removes its containers and volumes, stops dockerd and containerd (by
//! pid, reaped), unmounts what dockerd mounted and deletes its directories.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::docker::IMAGE;
use super::{dump_log, stop_child, wait_for};

/// dockerd's start (and a restart's container restore) on a busy 2-CPU machine.
const START: Duration = Duration::from_secs(60);

pub struct PrivateDockerd {
    /// Short (unix socket paths are limited to 107 bytes), under /tmp.
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    containerd: Option<Child>,
    dockerd: Option<Child>,
    pub log: PathBuf,
}

impl PrivateDockerd {
    /// Starts containerd and dockerd (`live_restore` on or off) and loads the tenant image.
    pub fn start(live_restore: bool) -> PrivateDockerd {
        let dir = tempfile::Builder::new().prefix("pgsd-").tempdir().unwrap();
        let root = dir.path();
        let ctd = root.join("ctd");
        std::fs::create_dir_all(&ctd).unwrap();
        let config = ctd.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{r}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{r}/containerd.sock.ttrpc\"\n\
                 [debug]\n  address = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{r}/opt\"\n",
                r = ctd.display()
            ),
        )
        .unwrap();
        let log = root.join("engine.log");
        let containerd = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .expect("start containerd");
        let ctd_sock = ctd.join("containerd.sock");
        wait_for("the private containerd's socket", START, || {
            ctd_sock.exists().then_some(())
        });
        let mut d = PrivateDockerd {
            socket: root.join("docker.sock"),
            dir,
            containerd: Some(containerd),
            dockerd: None,
            log,
        };
        d.start_dockerd(live_restore);
        let load = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {IMAGE} | docker -H unix://{} load",
                d.socket.display()
            ))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(load.status.success(), "loading {IMAGE}: {load:?}");
        d
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Starts dockerd (again) on the same directories; returns once it answers, and when.
    pub fn start_dockerd(&mut self, live_restore: bool) -> Instant {
        assert!(self.dockerd.is_none(), "dockerd is already running");
        let root = self.root().to_owned();
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("--containerd")
            .arg(root.join("ctd/containerd.sock"))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .stdin(Stdio::null())
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log));
        if live_restore {
            cmd.arg("--live-restore");
        }
        let child = cmd.spawn().expect("start dockerd");
        self.dockerd = Some(child);
        wait_for("the private dockerd to answer", START, || {
            if let Some(Ok(Some(status))) = self.dockerd.as_mut().map(Child::try_wait) {
                dump_log("private dockerd", &self.log);
                panic!("the private dockerd exited: {status}");
            }
            self.answers().then(Instant::now)
        })
    }

    /// Whether dockerd answers its API.
    pub fn answers(&self) -> bool {
        self.docker(&["version", "--format", "{{.Server.Version}}"])
            .status
            .success()
    }

    /// `kill -9` of dockerd, reaped; containerd and the shims keep running.
    pub fn kill9(&mut self) {
        let mut child = self.dockerd.take().expect("dockerd running");
        stop_child(&mut child, libc::SIGKILL, Duration::from_secs(10));
    }

    /// Runs `docker -H <this engine> ARGS`.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    fn mounts_below(&self) -> Vec<String> {
        let root = self.root().to_string_lossy().into_owned();
        let mut m: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|p| p.starts_with(&root))
            .map(str::to_owned)
            .collect();
        m.sort_by_key(|p| std::cmp::Reverse(p.len()));
        m
    }
}

fn log_file(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_log("private dockerd and containerd", &self.log);
        }
        if self.dockerd.is_some() && self.answers() {
            // Everything on this engine is the test's.
            let ids = self.docker(&["ps", "-aq"]);
            let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids.iter().map(String::as_str));
                self.docker(&args);
            }
            let vols = self.docker(&["volume", "ls", "-q"]);
            let vols: Vec<String> = String::from_utf8_lossy(&vols.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !vols.is_empty() {
                let mut args = vec!["volume", "rm", "-f"];
                args.extend(vols.iter().map(String::as_str));
                self.docker(&args);
            }
        }
        if let Some(mut child) = self.dockerd.take() {
            stop_child(&mut child, libc::SIGTERM, Duration::from_secs(20));
        }
        if let Some(mut child) = self.containerd.take() {
            stop_child(&mut child, libc::SIGTERM, Duration::from_secs(10));
        }
        for m in self.mounts_below() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}
