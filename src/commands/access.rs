//! `access enable|disable|status`.

use std::process::ExitCode;

use crate::access;
use crate::cli::AccessCommand;
use crate::settings::Agent;
use crate::tenants;

pub async fn run(agent: &Agent, cmd: AccessCommand) -> anyhow::Result<ExitCode> {
    let (id, want, terminate) = match cmd {
        AccessCommand::Enable { id } => (id, tenants::Access::Enabled, false),
        AccessCommand::Disable { id, terminate } => (id, tenants::Access::Disabled, terminate),
        AccessCommand::Status { id, json } => return access_status(agent, id.as_ref(), json).await,
    };
    let flip = access::set(agent, &id, want, terminate).await?;
    let file = if flip.file_changed {
        "tenants file updated"
    } else {
        "tenants file already said so"
    };
    println!("{}: access {} ({file})", flip.tenant, flip.access);
    match &flip.runtime {
        access::RuntimePush::Applied { changes } => println!(
            "  HAProxy: in effect for the next connection ({changes} map change(s), no reload)"
        ),
        access::RuntimePush::NotRunning { reason } => {
            println!("  HAProxy: not running ({reason}); the change takes effect when it starts")
        }
    }
    match flip.terminated {
        Some(true) => println!("  open sessions: ended"),
        Some(false) => println!("  open sessions: none to end (HAProxy not running)"),
        None if flip.access == tenants::Access::Disabled => {
            println!("  open sessions: left running (use --terminate to end them)")
        }
        None => {}
    }
    if flip.stopped && flip.access == tenants::Access::Enabled {
        println!(
            "  server: stopped, so still not routed; `{} tenant start {}` starts it",
            agent.cli(),
            flip.tenant
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn access_status(
    agent: &Agent,
    id: Option<&tenants::TenantId>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = access::status(agent, id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(e) = &report.haproxy_error {
        println!("HAProxy: not answering ({e})");
    }
    println!(
        "{:<24} {:<9} {:<9} {:<9}",
        "TENANT", "FILE", "MAP FILE", "HAPROXY"
    );
    let cli = agent.cli();
    for t in &report.tenants {
        let note = if !t.agree {
            format!("  <- disagrees; `{cli} sync` (or any `access` command) repairs it")
        } else if t.stopped && t.file == tenants::Access::Enabled {
            format!(
                "  (server stopped: not routed until `{cli} tenant start {}`)",
                t.tenant
            )
        } else {
            String::new()
        };
        println!(
            "{:<24} {:<9} {:<9} {:<9}{note}",
            t.tenant.as_str(),
            t.file.as_str(),
            t.map_file.as_str(),
            t.runtime.map_or("-", |a| a.as_str()),
        );
    }
    for k in &report.unexpected_runtime_entries {
        println!("{k:<24} (not in the tenants file, but enabled in HAProxy's memory)");
    }
    Ok(ExitCode::SUCCESS)
}
