//! The operator listener's router: JSON over HTTPS with bearer tokens. Each handler
//! authenticates once into a `Caller`, calls the library, and maps the error.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ConnInfo, blocking};
use crate::auth::{AuthError, Caller, token_hash};
use crate::services::Services;

pub fn router(svc: Services) -> Router {
    Router::new()
        .route("/api/v1/ops/status", get(status))
        .route("/api/v1/ops/hosts", get(hosts))
        .route("/api/v1/ops/hosts/{site}/{host}", get(host))
        .route("/api/v1/ops/hosts/{site}/{host}/revoke", post(revoke))
        .route("/api/v1/ops/tokens", post(token_create))
        .route("/api/v1/ops/orders", get(orders).post(order_create))
        .route("/api/v1/ops/orders/{order_id}/approve", post(order_approve))
        .route("/api/v1/ops/audit", get(audit))
        .fallback(|| async { ApiError::new(404, "no such operator route") })
        .with_state(svc)
}

/// The operator a bearer token names; a missing or wrong token is refused and audited.
async fn caller(svc: &Services, info: &ConnInfo, headers: &HeaderMap) -> Result<Caller, ApiError> {
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

fn err(status: u16, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(status, e.to_string())
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    site: String,
    reseller: Option<String>,
    #[serde(default = "one")]
    uses: u32,
    #[serde(default = "day")]
    expires: String,
}
fn one() -> u32 {
    1
}
fn day() -> String {
    "24h".into()
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    host: String,
    runbook: String,
    #[serde(default)]
    params: Option<Value>,
    ttl: Option<u64>,
}

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
