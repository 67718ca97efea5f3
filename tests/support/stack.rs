//! The two-tenant stack most routing tests stand on: `acme` on a unix socket and `globex` on
//! loopback TCP, each its own real PostgreSQL server (`cluster_name` tells which answered),
//! behind a real HAProxy on a layout made by `pgs-agent init`.

use super::{free_port, have_tools, psql, temp_dir, Haproxy, Layout, Postgres};

/// How a test wants its stack; `Options::default()` is both tenants enabled.
#[derive(Default)]
pub struct Options<'a> {
    /// Extra `pgs-agent init` arguments.
    pub init_args: &'a [&'a str],
    /// The directory the layout goes in (a test that made files there first); default: new.
    pub dir: Option<tempfile::TempDir>,
    /// Text replacements in pgs.toml, made before `render`.
    pub settings: &'a [(&'a str, &'a str)],
    /// globex's `access`; default `enabled`.
    pub globex_access: Option<&'a str>,
    /// Extra JSON fields for each tenant's entry, e.g. `"connection_limit": 2,`.
    pub acme_fields: &'a str,
    pub globex_fields: &'a str,
}

pub struct TwoTenants {
    pub haproxy: Haproxy,
    pub acme: Postgres,
    pub globex: Postgres,
    pub layout: Layout,
}

impl TwoTenants {
    /// Both tenants, globex's access as given.
    pub fn start(globex_access: &str) -> Option<TwoTenants> {
        Self::with(Options {
            globex_access: Some(globex_access),
            ..Options::default()
        })
    }

    pub fn with(o: Options) -> Option<TwoTenants> {
        if !have_tools(&["haproxy", "psql", "initdb", "postgres", "pg_isready"]) {
            return None;
        }
        let layout = Layout::init_with(o.dir.unwrap_or_else(temp_dir), o.init_args);
        for (from, to) in o.settings {
            layout.edit_settings(|s| s.replace(from, to));
        }
        let acme = Postgres::start(layout.dir.path(), "pg_acme", "acme", None);
        let globex = Postgres::start(layout.dir.path(), "pg_globex", "globex", Some(free_port()));
        layout.write_tenants(&format!(
            r#"{{"version": 1, "tenants": {{
                "acme":   {{"access": "enabled", {} "external": {{"address": "{}"}}}},
                "globex": {{"access": "{}", {} "external": {{"address": "127.0.0.1:{}"}}}}
            }}}}"#,
            o.acme_fields,
            acme.socket_path().display(),
            o.globex_access.unwrap_or("enabled"),
            o.globex_fields,
            globex.port
        ));
        layout.render();
        let haproxy = layout.start_haproxy();
        Some(TwoTenants {
            haproxy,
            acme,
            globex,
            layout,
        })
    }

    /// The password of a tenant's server (a wrong one for any other user).
    pub fn password(&self, user: &str) -> &str {
        match user {
            "acme" => &self.acme.password,
            "globex" => &self.globex.password,
            _ => "nope",
        }
    }

    /// Runs `sql` through HAProxy as `user`, with the right password for that tenant.
    pub fn query(&self, user: &str, extra: &str, sql: &str) -> (bool, String, String) {
        psql(&self.layout.conninfo(user, extra), self.password(user), sql)
    }

    /// Sessions HAProxy handed to the tenants' servers (a backend may see a session it then
    /// refuses; its server does not).
    pub fn server_sessions(&self) -> u64 {
        self.haproxy.stat("pgs_acme", "acme", "stot")
            + self.haproxy.stat("pgs_globex", "globex", "stot")
    }
}
