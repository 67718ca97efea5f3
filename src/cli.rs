//! Command-line definitions (clap) and nothing else: what each command does lives in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::DEFAULT_CONFIG;

#[derive(Debug, Parser)]
#[command(
    name = "pgs-agent",
    version,
    about = "Give every tenant its own PostgreSQL server behind one HAProxy port.",
    long_about = "Give every tenant its own PostgreSQL server behind one HAProxy port.\n\n\
        HAProxy carries every byte; pgs-agent is the control plane. It renders HAProxy's \
        configuration and maps from a tenants file, and flips access through HAProxy's \
        Runtime API without reloads.",
    after_help = "Start here:\n  \
        pgs-agent init /srv/pgs                      create a layout (settings, tenants file, folders)\n  \
        pgs-agent -c /srv/pgs/pgs.toml render        write HAProxy's config, maps and Lua\n  \
        haproxy -W -S /srv/pgs/run/master.sock -f /srv/pgs/haproxy/pgs.cfg"
)]
pub struct Cli {
    /// Agent settings file (pgs.toml), as written by `pgs-agent init`.
    #[arg(
        short,
        long,
        global = true,
        env = "PGS_CONFIG",
        default_value = DEFAULT_CONFIG,
        value_name = "FILE"
    )]
    pub config: PathBuf,

    /// Log filter (tracing syntax), e.g. `debug` or `pgs_agent=trace`.
    #[arg(long, global = true, env = "PGS_LOG", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a self-contained layout in DIR: pgs.toml, an empty tenants.json and the folders
    /// HAProxy and the agent use. Works without root. Refuses to touch an existing layout.
    Init(InitArgs),

    /// Render HAProxy's configuration, maps and Lua router from the tenants file, check them with
    /// `haproxy -c`, and write them (atomically, only files that changed). Does not reload.
    Render,

    /// Check what `render` would write with `haproxy -c`, without writing it. Prints HAProxy's
    /// own message when it refuses.
    Check,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to create the layout in (created if missing; must not hold a layout yet).
    pub dir: PathBuf,

    /// Address HAProxy accepts PostgreSQL clients on.
    #[arg(long, value_name = "HOST:PORT", default_value = crate::settings::DEFAULT_LISTEN)]
    pub listen: String,
}
