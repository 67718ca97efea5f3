//! pgs-agent: the control plane that gives every tenant its own PostgreSQL server behind one
//! HAProxy port. HAProxy is the data plane; this crate renders its files and drives it.
//!
//! # Layout
//! - `access`    — access flips (file, map file, Runtime API) and their status.
//! - `cancel_keys` — cancel keys copied into HAProxy's new worker after a reload.
//! - `backups`   — pgBackRest per tenant: backups, restores, verify, restore tests, schedule.
//! - `cli`       — clap definitions only.
//! - `commands`  — what each CLI command does, in terms of the modules below.
//! - `daemon`    — `run`: pokes, periodic resync, coalescing, systemd notify.
//! - `api`       — the HTTP API `run` serves: tenants, access, health, metrics (hyper).
//! - `settings`  — agent settings (`pgs.toml`) and `Paths`, where every file path comes from.
//! - `layout`    — `init`: a new self-contained layout.
//! - `tenant_ops` — tenant add/remove in the file and the user-facing view (CLI and API).
//! - `tenants`   — the tenants file: raw JSON → validated `Tenants`, `TenantId`, locked writer.
//! - `plan`      — the pure planner: (desired, observed) → `Plan`.
//! - `reconcile` — observe, plan, apply: the single writer of HAProxy's files and maps.
//! - `haproxy`   — rendered files and `haproxy -c` (`render`), maps in file and memory
//!   (`maps`), Runtime API (`runtime`), master CLI (`master`).
//! - `instances` — drivers that run managed tenants' servers (`docker`).
//! - `fsutil`    — atomic writes and file locks.
//! - `tls`       — certificates HAProxy serves to clients: files, status, pushes without reload.
//! - `pgsql`     — the SQL the agent speaks to tenants' servers (tokio-postgres): readiness,
//!   roles, passwords.
//! - `roles`     — managed tenants' extra roles: the tenants file's `roles` → their servers,
//!   password files, rotation.

pub mod access;
pub mod api;
pub mod backups;
pub mod cancel_keys;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod fsutil;
pub mod haproxy;
pub mod instances;
pub mod layout;
pub mod pgsql;
pub mod plan;
pub mod reconcile;
pub mod roles;
pub mod settings;
pub mod sleep;
pub mod tenant_ops;
pub mod tenants;
pub mod tls;
