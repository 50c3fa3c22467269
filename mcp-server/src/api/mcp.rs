//! The Model Context Protocol endpoint on the operator listener: streamable HTTP at
//! `/mcp` (rmcp), behind the same bearer-token authentication as the operator API.
//!
//! Stateless: no MCP session lives in this process (each POST is answered on its own,
//! as JSON), so several server processes behind one load balancer serve it alike, and
//! each request's own token decides its caller: a session id cannot carry another
//! operator's scope.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::{Extension, Router};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use super::ConnInfo;
use crate::services::Services;
use crate::tools::McpTools;

/// Where the operator listener serves MCP.
pub const MCP_PATH: &str = "/mcp";

/// The `/mcp` route, to merge into the operator router.
pub fn router(svc: Services) -> Router {
    let read_only = svc.config.mcp.read_only;
    // The Host header must name this server (DNS rebinding): the names its certificate has.
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_allowed_hosts(svc.config.server_names.clone())
        .with_max_request_body_bytes(svc.config.limits.max_body_bytes);
    let tools_svc = svc.clone();
    let service = StreamableHttpService::new(
        move || Ok(McpTools::per_request(tools_svc.clone(), read_only)),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .route_service(MCP_PATH, service)
        .layer(middleware::from_fn_with_state(svc, authenticate))
}

/// The operator a bearer token names, put where the tools find it; a missing or wrong
/// token is refused (401) and audited before MCP sees the request.
async fn authenticate(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    mut request: Request,
    next: Next,
) -> Response {
    match super::ops::caller(&svc, &info, request.headers()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}
