//! The `compliance-agent` binary: logging, the command line, and the library.

use std::process::ExitCode;

use clap::Parser;
use compliance_agent::cli::{Cli, Command};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Logging: for the service the journal (structured fields) when its socket
/// exists, else stderr; `log_file` when configured; `log_level` from the
/// configuration unless COMPLIANCE_AGENT_LOG says otherwise. Commands log
/// warnings to stderr.
fn init_logging(cli: &Cli) {
    let service = matches!(cli.command, Command::Run { .. });
    let config = if service {
        compliance_agent::config::Config::load(cli.config.as_deref()).ok()
    } else {
        None
    };
    let level = config
        .as_ref()
        .map_or(if service { "info" } else { "warn" }, |c| {
            c.log_level.as_filter()
        });
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMPLIANCE_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let journal = service
        .then(|| std::path::Path::new("/run/systemd/journal/socket").exists())
        .filter(|&exists| exists)
        .and_then(|_| tracing_journald::layer().ok());
    let file = config
        .as_ref()
        .and_then(|c| c.log_file.as_ref())
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map(|f| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
        });
    let stderr = journal
        .is_none()
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(file)
        .with(stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match compliance_agent::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("compliance-agent: {e}");
            ExitCode::from(2)
        }
    }
}
