//! The reference MCP server: protocol v1 of the compliance agent's channel over HTTPS with mutual TLS.
//!
//! It is the agent's real peer in integration tests (and later in the VM
//! tests): it checks each uploaded bundle's signature against the host's
//! enrolled key and its place in the host's hash chain, stores it once per
//! bundle_id, and serves orders signed with its Ed25519 order key.

pub mod http;
pub mod pki;
pub mod server;
pub mod store;

use std::path::{Path, PathBuf};

pub use server::{Handler, Running, ServerConfig, start, start_with};
pub use store::{OrderRequest, ResultRecord, ServerStats, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("certificates: {0}")]
    Pki(String),
    #[error(transparent)]
    Crypto(#[from] compliance_agent::crypto::CryptoError),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Site and host ids, order ids and bundle ids as they may appear in paths.
pub fn valid_id(id: &str) -> bool {
    compliance_agent::orders::valid_order_id(id)
}
