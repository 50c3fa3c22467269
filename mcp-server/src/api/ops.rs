//! The operator listener's router: JSON over HTTPS with bearer tokens. Each handler
//! authenticates once into a `Caller`, calls the library, and maps the error.
//!
//! Routes and their OpenAPI document come from one declaration per handler
//! (`#[utoipa::path]`, registered with `routes!`): a route cannot exist undocumented.
//! The document is served at `/api/v1/openapi.json`.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ConnInfo, blocking};
use crate::auth::{AuthError, Caller, token_hash};
use crate::services::Services;

/// Where the operator listener serves its OpenAPI document.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "mcp-server operator API",
        description = "The MSP's central server for compliance appliances: fleet status, enrollment tokens, hosts, orders and the audit log. JSON over HTTPS; every route but this document takes `Authorization: Bearer <operator token>` (`mcp-server users add` prints one). Errors are `{\"error\": \"...\"}` with the status.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "fleet", description = "Hosts, their chains and compliance state"),
        (name = "enrollment", description = "One-time tokens boxes enroll with"),
        (name = "orders", description = "Signed orders under the central guardrails"),
        (name = "audit", description = "The append-only log of operator actions and refusals"),
        (name = "incidents", description = "Incidents from the boxes' evidence, their plans, and the orders made from them"),
        (name = "log", description = "The transparency log: signed checkpoints, inclusion and consistency proofs"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme the operations name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An operator token (`mcp-server users add`)"))
                    .build(),
            ),
        );
    }
}

/// Every operator route with its documentation.
fn documented() -> OpenApiRouter<Services> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(status))
        .routes(routes!(hosts))
        .routes(routes!(host))
        .routes(routes!(revoke))
        .routes(routes!(token_create))
        .routes(routes!(orders, order_create))
        .routes(routes!(order_approve))
        .routes(routes!(audit))
        .routes(routes!(super::log::ops_checkpoint))
        .routes(routes!(super::log::ops_inclusion))
        .routes(routes!(super::log::ops_consistency))
        .routes(routes!(openapi_json))
        .merge(super::incidents::routes())
        .merge(super::sbom::routes())
}

/// The operator API's OpenAPI document, as generated from the routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

pub fn router(svc: Services) -> Router {
    let (router, _) = documented().split_for_parts();
    router
        .fallback(|| async { ApiError::new(404, "no such operator route") })
        .with_state(svc)
}

/// This document (no token needed: it describes, it holds nothing).
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of the operator API", body = Value))
)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The operator a bearer token names; a missing or wrong token is refused and audited.
pub(crate) async fn caller(
    svc: &Services,
    info: &ConnInfo,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    let (svc, peer) = (svc.clone(), info.peer.to_string());
    blocking(move || {
        let Some(token) = token else {
            crate::audit::record_anonymous(
                &*svc.store,
                Some(peer),
                "ops.authenticate",
                "-",
                "no token",
            );
            return Err(ApiError::new(401, AuthError::MissingToken.to_string()));
        };
        match svc.store.operator_by_token(&token_hash(&token)) {
            Ok(Some(op)) => Ok(Caller {
                actor: format!("operator:{}", op.name),
                role: op.role,
                tenants: op.tenants,
                peer: Some(peer),
            }),
            Ok(None) => {
                crate::audit::record_anonymous(
                    &*svc.store,
                    Some(peer),
                    "ops.authenticate",
                    "-",
                    "bad token",
                );
                Err(ApiError::new(401, AuthError::BadToken.to_string()))
            }
            Err(e) => Err(ApiError::new(503, e.to_string())),
        }
    })
    .await?
}

pub(super) fn err(status: u16, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(status, e.to_string())
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/status",
    tag = "fleet",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Hosts, overdue hosts and intake counters", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
    )
)]
async fn status(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let s = svc.clone();
    let fleet = blocking(move || crate::fleet::fleet(&*s.store, &c, jiff::Timestamp::now()))
        .await?
        .map_err(|e| err(503, e))?;
    let overdue = fleet.iter().filter(|h| h.overdue).count();
    Ok(Json(
        json!({ "hosts": fleet.len(), "overdue": overdue, "intake": svc.stats.snapshot() }),
    ))
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/hosts",
    tag = "fleet",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every host the caller may see: chain, gaps, last seen, overdue, score", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
    )
)]
async fn hosts(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let fleet = blocking(move || crate::fleet::fleet(&*svc.store, &c, jiff::Timestamp::now()))
        .await?
        .map_err(|e| err(503, e))?;
    Ok(Json(json!({ "hosts": fleet })))
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/hosts/{site}/{host}",
    tag = "fleet",
    security(("bearer" = [])),
    params(
        ("site" = String, Path, description = "Site id"),
        ("host" = String, Path, description = "Host id"),
    ),
    responses(
        (status = 200, description = "One host: chain, gaps, latest result per check", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 404, description = "No such host among the caller's tenants", body = Value),
    )
)]
async fn host(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        let h = svc
            .store
            .host(&c, &site, &host)
            .map_err(|e| err(503, e))?
            .ok_or_else(|| ApiError::new(404, format!("no such host {site}/{host}")))?;
        let st = crate::fleet::host_status(&*svc.store, &c, &h, jiff::Timestamp::now())
            .map_err(|e| err(503, e))?;
        Ok(Json(json!(st)))
    })
    .await?
}

#[utoipa::path(
    post,
    path = "/api/v1/ops/hosts/{site}/{host}/revoke",
    tag = "fleet",
    security(("bearer" = [])),
    params(
        ("site" = String, Path, description = "Site id"),
        ("host" = String, Path, description = "Host id"),
    ),
    responses(
        (status = 200, description = "Revoked: the host's certificate is refused from its next request on", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "The caller may not revoke this host", body = Value),
    )
)]
async fn revoke(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        crate::cli::revoke(&svc, &c, &site, &host)
            .map(|changed| Json(json!({ "revoked": format!("{site}/{host}"), "changed": changed })))
            .map_err(|e| err(403, e))
    })
    .await?
}

/// A token request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// The site the box joins (made when new).
    site: String,
    /// The site's reseller; none for a direct-mode site of the MSP.
    reseller: Option<String>,
    /// How many boxes may enroll with it (default 1).
    #[serde(default = "one")]
    uses: u32,
    /// Lifetime: 30m, 24h (default), 7d.
    #[serde(default = "day")]
    expires: String,
}
fn one() -> u32 {
    1
}
fn day() -> String {
    "24h".into()
}

#[utoipa::path(
    post,
    path = "/api/v1/ops/tokens",
    tag = "enrollment",
    security(("bearer" = [])),
    request_body(content = TokenBody, description = "The site, its reseller, uses and lifetime"),
    responses(
        (status = 200, description = "The token (shown once) with the CA fingerprint it carries", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 422, description = "A bad request, named", body = Value),
    )
)]
async fn token_create(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let b: TokenBody = serde_json::from_slice(&body).map_err(|e| err(422, e))?;
    blocking(move || {
        let expires_in = crate::cli::parse_duration(&b.expires).map_err(|e| err(422, e))?;
        let req = crate::enroll::TokenRequest {
            site_id: b.site,
            reseller_id: b.reseller,
            uses: b.uses,
            expires_in,
        };
        crate::enroll::create_token(&svc, &c, &req)
            .map(|t| Json(json!(t)))
            .map_err(|e| err(422, e))
    })
    .await?
}

#[derive(Deserialize)]
struct OrderQuery {
    host: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/orders",
    tag = "orders",
    security(("bearer" = [])),
    params(("host" = Option<String>, Query, description = "Only this SITE/HOST")),
    responses(
        (status = 200, description = "Orders, newest first, with their state and result", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
    )
)]
async fn orders(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Query(q): Query<OrderQuery>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        let host = q.host.as_deref().and_then(|h| h.split_once('/'));
        svc.store
            .orders(&c, host)
            .map(|o| Json(json!({ "orders": o })))
            .map_err(|e| err(503, e))
    })
    .await?
}

/// An order request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    /// SITE/HOST
    host: String,
    /// A runbook on the site's allowlist.
    runbook: String,
    /// The runbook's parameters (a JSON object).
    #[serde(default)]
    params: Option<Value>,
    /// Seconds the order is valid (within the configured bounds).
    ttl: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/api/v1/ops/orders",
    tag = "orders",
    security(("bearer" = [])),
    request_body(content = OrderBody, description = "Host, runbook, params, TTL"),
    responses(
        (status = 200, description = "Signed and pending, or (disruptive) awaiting a second operator", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "Not on the site's allowlist, or the role may not order", body = Value),
        (status = 422, description = "Bad params or TTL, named", body = Value),
        (status = 429, description = "Cooldown: when the next order is allowed", body = Value),
    )
)]
async fn order_create(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let b: OrderBody = serde_json::from_slice(&body).map_err(|e| err(422, e))?;
    let (site, host) = b
        .host
        .split_once('/')
        .ok_or_else(|| ApiError::new(422, "host must be SITE/HOST"))?;
    let draft = crate::orders::OrderDraft {
        site_id: site.into(),
        host_id: host.into(),
        runbook_id: b.runbook,
        params: b.params.unwrap_or_else(|| json!({})),
        ttl: b.ttl,
    };
    blocking(move || {
        crate::orders::create(&svc, &c, &draft)
            .map(|o| Json(json!(o)))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

#[utoipa::path(
    post,
    path = "/api/v1/ops/orders/{order_id}/approve",
    tag = "orders",
    security(("bearer" = [])),
    params(("order_id" = String, Path, description = "The order awaiting approval")),
    responses(
        (status = 200, description = "Approved by a second operator, signed now", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "The creator may not approve their own order", body = Value),
        (status = 404, description = "No such order awaiting approval", body = Value),
    )
)]
async fn order_approve(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        crate::orders::approve(&svc, &c, &order_id)
            .map(|o| Json(json!(o)))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/audit",
    tag = "audit",
    security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, description = "Newest entries to return (default 100, at most 10000)")),
    responses(
        (status = 200, description = "Audit entries the caller may read, newest first", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
    )
)]
async fn audit(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        svc.store
            .audit(&c, q.limit.unwrap_or(100).min(10_000))
            .map(|a| Json(json!({ "audit": a })))
            .map_err(|e| err(503, e))
    })
    .await?
}
