//! The `compliance-agent` binary: logging, the command line, and the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COMPLIANCE_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = compliance_agent::cli::Cli::parse();
    match compliance_agent::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("compliance-agent: {e}");
            ExitCode::from(2)
        }
    }
}
