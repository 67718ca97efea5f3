//! The integration suite: one binary, real HAProxy, PostgreSQL and dockerd.
//! `PGS_REQUIRE_INTEGRATION=1` (set by .ci/run) turns a missing tool into a failure.

#[path = "support/mod.rs"]
mod support;

#[path = "access.rs"]
mod access;
#[path = "api.rs"]
mod api;
#[path = "backups.rs"]
mod backups;
#[path = "cancel_limits.rs"]
mod cancel_limits;
#[path = "cli.rs"]
mod cli;
#[path = "daemon.rs"]
mod daemon;
#[path = "faults.rs"]
mod faults;
#[path = "golden_check.rs"]
mod golden_check;
#[path = "instances.rs"]
mod instances;
#[path = "lua.rs"]
mod lua;
#[path = "package.rs"]
mod package;
#[path = "protocol.rs"]
mod protocol;
#[path = "roles.rs"]
mod roles;
#[path = "routing.rs"]
mod routing;
#[path = "runtime_api.rs"]
mod runtime_api;
#[path = "sleep.rs"]
mod sleep;
#[path = "tenants.rs"]
mod tenants;
#[path = "tls.rs"]
mod tls;
