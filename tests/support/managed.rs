//! A layout whose tenants run on the real Docker engine (its own docker prefix), with HAProxy
//! running on the rendered files, driven through the CLI as a user would.

use std::process::Output;

use super::docker::DockerEnv;
use super::{agent, have_tools, Haproxy, Layout};

pub struct Managed {
    pub haproxy: Haproxy,
    pub layout: Layout,
    pub docker: DockerEnv,
}

impl Managed {
    pub fn start() -> Option<Managed> {
        if !have_tools(&["haproxy", "psql", "docker"]) {
            return None;
        }
        let docker = DockerEnv::new()?;
        let layout = Layout::init();
        layout.use_docker_prefix(&docker.prefix);
        layout.render();
        let haproxy = layout.start_haproxy();
        Some(Managed {
            haproxy,
            layout,
            docker,
        })
    }

    /// `pgs-agent -c CFG ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["-c", self.layout.config.to_str().unwrap()];
        all.extend_from_slice(args);
        agent(&all)
    }

    /// `run`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pgs-agent {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A file under the layout's secrets directory, trimmed (`acme.password`, `roles/...`).
    pub fn secret(&self, rel: &str) -> String {
        std::fs::read_to_string(self.layout.root().join("secrets").join(rel))
            .unwrap_or_else(|e| panic!("secrets/{rel}: {e}"))
            .trim()
            .to_owned()
    }

    /// The tenant's own generated password.
    pub fn password(&self, id: &str) -> String {
        self.secret(&format!("{id}.password"))
    }

    pub fn container(&self, id: &str) -> String {
        format!("{}-{id}", self.docker.prefix)
    }
}
