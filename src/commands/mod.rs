//! What each CLI command does: load settings and tenants, call the library, print for people.

mod access;
mod backups;
mod sync;
mod tenant;
mod tls;

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{Cli, Command, InitArgs};
use crate::haproxy::render;
use crate::settings::{Agent, Settings, TlsMode, TlsSettings};
use crate::{layout, tenants};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Init(args) => init(args),
            Command::Render => {
                let agent = Agent::load(&cli.config)?;
                render_cmd(&agent).await
            }
            Command::Check => {
                let agent = Agent::load(&cli.config)?;
                check_cmd(&agent).await
            }
            Command::Plan { json } => sync::plan(&Agent::load(&cli.config)?, json).await,
            Command::Sync { dry_run, json } => {
                sync::sync(&Agent::load(&cli.config)?, dry_run, json).await
            }
            Command::Run { resync } => sync::run(&Agent::load(&cli.config)?, resync).await,
            Command::Tenant(cmd) => tenant::run(&Agent::load(&cli.config)?, cmd).await,
            Command::Access(cmd) => {
                let agent = Agent::load(&cli.config)?;
                access::run(&agent, cmd).await
            }
            Command::Tls(cmd) => tls::run(&Agent::load(&cli.config)?, cmd).await,
        }
    })
}

fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::default();
    settings.haproxy.listen = args.listen;
    settings.api.listen = args.api_listen;
    settings.docker.prefix = args.docker_prefix;
    if args.tls_cert.is_some() {
        settings.tls = Some(TlsSettings {
            domain: args.tls_domain,
            mode: if args.tls_mode == "required" {
                TlsMode::Required
            } else {
                TlsMode::Optional
            },
            ..TlsSettings::default()
        });
    }
    settings.check()?;
    let config = layout::init(&args.dir, &settings, args.tls_cert.as_deref())?;
    let agent = Agent::load(&config)?;
    let p = &agent.paths;
    println!("Created a pgs layout in {}", args.dir.display());
    println!("  settings      {}", config.display());
    println!("  tenants file  {}", p.tenants_file.display());
    if !agent.settings.api.listen.is_empty() {
        println!(
            "  HTTP API      {} (served by `run`; bearer token in {})",
            agent.settings.api.listen,
            p.api_token.display()
        );
    }
    println!(
        "  containers    {}-<tenant> (docker prefix)",
        agent.settings.docker.prefix
    );
    if let Some(tls) = &agent.settings.tls {
        println!(
            "  TLS           {} ({}; certificates in {})",
            tls.mode.as_str(),
            tls.domain
                .as_deref()
                .map(|d| format!("tenant domain {d}"))
                .unwrap_or_else(|| "no tenant domain".into()),
            p.tls_dir.display()
        );
    }
    println!("Next:");
    println!(
        "  pgs-agent -c {} render    # HAProxy's config, maps and Lua",
        config.display()
    );
    println!(
        "  haproxy -W -S {} -f {}    # stays in the foreground; add -D to detach",
        p.master_socket.display(),
        p.haproxy_cfg.display()
    );
    println!(
        "  pgs-agent -c {} run       # the daemon: tenants' servers, reloads, the HTTP API (or `sync` once)",
        config.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn render_cmd(agent: &Agent) -> anyhow::Result<ExitCode> {
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    render::check(agent, &tenants).await?;
    let rendered = render::render(&agent.settings, &agent.paths, &tenants);
    let installed = render::install(&agent.paths, &rendered)
        .with_context(|| format!("cannot write into {}", agent.paths.haproxy_dir.display()))?;
    let verb = if installed.any() {
        "wrote"
    } else {
        "unchanged:"
    };
    println!(
        "{verb} {} ({} tenant(s), {} enabled)",
        agent.paths.haproxy_cfg.display(),
        tenants.len(),
        tenants
            .iter()
            .filter(|t| t.access == tenants::Access::Enabled)
            .count()
    );
    Ok(ExitCode::SUCCESS)
}

async fn check_cmd(agent: &Agent) -> anyhow::Result<ExitCode> {
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    render::check(agent, &tenants).await?;
    println!(
        "HAProxy accepts the configuration for {} tenant(s)",
        tenants.len()
    );
    Ok(ExitCode::SUCCESS)
}
