//! `tls status`: the certificates directory as files and as the running HAProxy serves it.

use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::access::runtime_api;
use crate::cli::TlsCommand;
use crate::settings::Agent;
use crate::tls;

pub async fn run(agent: &Agent, cmd: TlsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TlsCommand::Status { json } => status(agent, json).await,
    }
}

async fn status(agent: &Agent, json: bool) -> anyhow::Result<ExitCode> {
    if agent.settings.tls.is_none() {
        bail!(
            "TLS is off: {} has no [tls] section (README.md, \"TLS\", says how to turn it on)",
            agent.paths.config.display()
        );
    }
    let dir = &agent.paths.tls_dir;
    let api = runtime_api(agent);
    let running = api.show_info().await.is_ok();
    let certs = tls::status(dir, &agent.paths.tls_served_dir, running.then_some(&api))
        .await
        .with_context(|| format!("cannot read the certificates directory {}", dir.display()))?;
    if json {
        let doc = serde_json::json!({ "haproxy_running": running, "certificates": certs });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    if certs.is_empty() {
        println!("no certificate in {}", dir.display());
    }
    for c in &certs {
        println!("{}", c.file.display());
        match (&c.certificate, &c.problem) {
            (Some(info), _) => {
                println!("  subject   {}", info.subject);
                println!("  names     {}", info.names.join(", "));
                println!(
                    "  expires   {} ({})",
                    utc_date(info.not_after),
                    describe_expiry(c.expires_in_secs.unwrap_or(0))
                );
                println!("  serial    {}", info.serial);
            }
            (None, Some(p)) => println!("  problem   {p}"),
            (None, None) => {}
        }
        let served = match (c.in_sync, &c.served) {
            (None, _) => "unknown: HAProxy is not running".to_string(),
            (Some(true), _) => "yes, this certificate".to_string(),
            (Some(false), Some(s)) => format!(
                "NO: HAProxy serves serial {} (`{} sync` or the daemon pushes the file)",
                s.serial,
                agent.cli()
            ),
            (Some(false), None) => format!(
                "NO: HAProxy has not loaded this file (`{} sync` or the daemon adds it)",
                agent.cli()
            ),
        };
        println!("  served    {served}");
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_expiry(secs: i64) -> String {
    match secs / 86_400 {
        _ if secs >= 0 => format!("in {} day(s)", secs / 86_400),
        0 => "EXPIRED less than a day ago".to_string(),
        days => format!("EXPIRED {} day(s) ago", -days),
    }
}

/// `YYYY-MM-DD HH:MM UTC` from seconds since the epoch (proleptic Gregorian).
fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3_600,
        (rem % 3_600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_expiry_read_plainly() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(1_798_400_272), "2026-12-27 19:37 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(describe_expiry(86_400 * 3 + 5), "in 3 day(s)");
        assert_eq!(describe_expiry(-10), "EXPIRED less than a day ago");
        assert_eq!(describe_expiry(-86_400 * 2 - 1), "EXPIRED 2 day(s) ago");
    }
}
