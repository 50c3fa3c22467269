//! The crate's error: one variant per concern, each carrying its own message.

use crate::config::ConfigError;
use crate::crypto::CryptoError;
use crate::evidence::EvidenceError;
use crate::mcp::McpError;
use crate::queue::QueueError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Mcp(#[from] McpError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, Error>;
