//! The HTTP side: the TLS accept loop with its bounds, and one axum router per audience.

pub mod agent;
pub mod incidents;
pub mod listener;
pub mod log;
pub mod mcp;
pub mod ops;
pub mod sbom;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

/// Runs blocking store/archive work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, format!("internal error: {e}")))
}

/// What the accept loop knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    /// The verified client certificate (DER), when the peer presented one.
    pub client_cert: Option<Vec<u8>>,
}
