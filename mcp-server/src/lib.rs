//! The MSP's central server: enrollment bound to host identity, evidence intake into a
//! database and an archive, fleet state, operators with roles, audited and guarded orders.
//!
//! Data flows one way: `api` -> `intake` / `enroll` / `orders` / `incidents` (`planner`,
//! `executor`) -> `store` / `archive`.
//! Nothing that matters lives in process memory: several processes can share one
//! database and one archive.

pub mod api;
pub mod archive;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod enroll;
pub mod executor;
pub mod export;
pub mod fleet;
pub mod incidents;
pub mod intake;
pub mod metrics;
pub mod orders;
pub mod pki;
pub mod planner;
pub mod sbom;
pub mod server;
pub mod services;
pub mod store;
pub mod tlog;
pub mod tools;
pub mod verify;

pub use server::{Running, StartOptions};
pub use services::Services;

/// The crate's error: one variant per concern, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollError),
    #[error(transparent)]
    Order(#[from] orders::OrderError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Crypto(#[from] compliance_agent::crypto::CryptoError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Site, host, reseller, order and bundle ids as they may appear in paths and URLs.
pub fn valid_id(id: &str) -> bool {
    compliance_agent::orders::valid_order_id(id)
}

/// Writes a file atomically and durably (temp file, fsync, rename, fsync of the
/// directory) with `mode`; used for keys, certificates and archive objects.
pub fn write_durable(path: &std::path::Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", path.display())))?;
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    write_new_synced(&tmp, data, mode)?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))?;
    sync_dir(dir)
}

/// Creates `path` (which must not exist) with `data` and `mode` and fsyncs the file,
/// not its directory: for files written into a directory that is synced once after
/// all of them.
pub fn write_new_synced(path: &std::path::Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(Error::io(path))?;
    f.write_all(data).map_err(Error::io(path))?;
    f.sync_all().map_err(Error::io(path))
}

/// Fsyncs a directory, making the entries created or renamed in it durable.
pub fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}
