//! The compliance agent of the HIPAA appliance: configuration, signing, evidence, the channel to the MSP, and the checks and fixes built on them.

/// `println!` that ends the process quietly when stdout is closed (`| head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

pub mod agent;
pub mod audit_export;
pub mod baseline;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod drift;
pub mod enroll;
pub mod error;
pub mod evidence;
pub mod heal;
pub mod luks;
pub mod mcp;
pub mod metrics;
pub mod nar;
pub mod nixos;
pub mod notify;
pub mod orders;
pub mod queue;
pub mod resources;
pub mod runbook_ids;
pub mod sbom;
pub mod scan;
pub mod schedule;
pub mod systemd;
pub mod tlog;
pub mod witness;

pub use error::{Error, Result};

/// The small runtime every async command runs on: one thread, plus tokio's
/// blocking pool for SQLite, the MCP client and fsync.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            context: "cannot start the async runtime".into(),
            source,
        })
}
