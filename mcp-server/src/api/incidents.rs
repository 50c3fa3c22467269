//! The operator routes of incidents and remediation: list, show, close, plan, execute, and
//! a site's executor mode. Each handler authenticates once, calls the library, maps the error.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ops::{caller, err};
use super::{ApiError, ConnInfo, blocking};
use crate::config::ExecutorMode;
use crate::services::Services;
use crate::store::incidents::{IncidentFilter, IncidentState, PlanState};

pub(super) fn routes() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(close))
        .routes(routes!(plan))
        .routes(routes!(execute))
        .routes(routes!(mode_show, mode_set))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    plan_state: Option<String>,
    site: Option<String>,
    host: Option<String>,
    limit: Option<u32>,
}

fn filter(q: ListQuery) -> Result<IncidentFilter, ApiError> {
    let state = q
        .state
        .map(|s| {
            IncidentState::parse(&s).ok_or_else(|| {
                ApiError::new(422, format!("state {s:?}: one of open, resolved, closed"))
            })
        })
        .transpose()?;
    let plan_state = q
        .plan_state
        .map(|s| {
            PlanState::parse(&s).ok_or_else(|| {
                ApiError::new(422, format!("plan_state {s:?}: one of wanted, claimed, awaiting_operator, ordered, refused, failed, off, none"))
            })
        })
        .transpose()?;
    Ok(IncidentFilter {
        state,
        plan_state,
        site_id: q.site,
        host_id: q.host,
        limit: Some(q.limit.unwrap_or(100).min(10_000)),
    })
}

#[utoipa::path(
    get,
    path = "/api/v1/incidents",
    tag = "incidents",
    security(("bearer" = [])),
    params(
        ("state" = Option<String>, Query, description = "open, resolved or closed"),
        ("plan_state" = Option<String>, Query, description = "wanted, claimed, awaiting_operator, ordered, refused, failed, off or none"),
        ("site" = Option<String>, Query, description = "Only this site"),
        ("host" = Option<String>, Query, description = "Only this host id"),
        ("limit" = Option<u32>, Query, description = "Newest incidents to return (default 100, at most 10000)"),
    ),
    responses(
        (status = 200, description = "The caller's incidents, newest first", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 422, description = "A bad query parameter, named", body = Value),
    )
)]
async fn list(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let Query(q) = query.map_err(|e| err(422, e.body_text()))?;
    let f = filter(q)?;
    blocking(move || {
        crate::incidents::list(&svc, &c, &f)
            .map(|i| Json(json!({ "incidents": i })))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

#[utoipa::path(
    get,
    path = "/api/v1/incidents/{incident_id}",
    tag = "incidents",
    security(("bearer" = [])),
    params(("incident_id" = String, Path, description = "The incident")),
    responses(
        (status = 200, description = "The incident, its timeline and its order", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 404, description = "No such incident among the caller's tenants", body = Value),
    )
)]
async fn show(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        crate::incidents::show(&svc, &c, &id)
            .map(|v| Json(json!(v)))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

/// Why an operator closes an incident.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    /// What was done, or why nothing needs doing (kept on the timeline).
    reason: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/incidents/{incident_id}/close",
    tag = "incidents",
    security(("bearer" = [])),
    params(("incident_id" = String, Path, description = "The open incident")),
    request_body(content = CloseBody, description = "The reason"),
    responses(
        (status = 200, description = "Closed, with the remediation duration", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "The role may not close incidents", body = Value),
        (status = 404, description = "No such incident among the caller's tenants", body = Value),
        (status = 409, description = "The incident is not open", body = Value),
        (status = 422, description = "No reason, or a malformed body", body = Value),
    )
)]
async fn close(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let b: CloseBody = serde_json::from_slice(&body).map_err(|e| err(422, e))?;
    blocking(move || {
        crate::incidents::close(&svc, &c, &id, &b.reason)
            .map(|i| Json(json!(i)))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

#[utoipa::path(
    post,
    path = "/api/v1/incidents/{incident_id}/plan",
    tag = "incidents",
    security(("bearer" = [])),
    params(("incident_id" = String, Path, description = "The open incident")),
    responses(
        (status = 200, description = "The plan (runbook, params, rationale, planner, fallback reason), kept on the incident", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "The role may not plan", body = Value),
        (status = 404, description = "No such incident among the caller's tenants", body = Value),
        (status = 422, description = "The incident is not open", body = Value),
    )
)]
async fn plan(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        crate::planner::propose(&svc, &c, &id)
            .map(|p| Json(json!(p)))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

#[utoipa::path(
    post,
    path = "/api/v1/incidents/{incident_id}/execute",
    tag = "incidents",
    security(("bearer" = [])),
    params(("incident_id" = String, Path, description = "The open incident")),
    responses(
        (status = 200, description = "The order made from the incident's plan: signed and pending, or (disruptive) awaiting a second operator", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "Not on the site's allowlist, or the role may not order", body = Value),
        (status = 404, description = "No such incident among the caller's tenants", body = Value),
        (status = 409, description = "The site's executor mode is off", body = Value),
        (status = 422, description = "The plan orders nothing, or bad params", body = Value),
        (status = 429, description = "Cooldown: when the next order is allowed", body = Value),
    )
)]
async fn execute(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        crate::executor::execute(&svc, &c, &id)
            .map(|x| Json(json!(x)))
            .map_err(|e| err(e.status(), e))
    })
    .await?
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/sites/{site}/executor",
    tag = "incidents",
    security(("bearer" = [])),
    params(("site" = String, Path, description = "Site id")),
    responses(
        (status = 200, description = "The site's executor mode (auto, approve or off)", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 404, description = "No such site among the caller's tenants", body = Value),
    )
)]
async fn mode_show(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(site): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    blocking(move || {
        crate::executor::site_mode(&svc, &c, &site)
            .map(|m| Json(json!({ "site": site, "mode": m })))
            .map_err(|e| {
                let e = crate::incidents::IncidentError::from(e);
                err(e.status(), e)
            })
    })
    .await?
}

/// A site's executor mode.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    /// auto, approve or off; null: the configured default.
    mode: Option<String>,
}

#[utoipa::path(
    put,
    path = "/api/v1/ops/sites/{site}/executor",
    tag = "incidents",
    security(("bearer" = [])),
    params(("site" = String, Path, description = "Site id")),
    request_body(content = ModeBody, description = "The mode"),
    responses(
        (status = 200, description = "The site's executor mode now", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 403, description = "The role may not change sites", body = Value),
        (status = 404, description = "No such site among the caller's tenants", body = Value),
        (status = 422, description = "An unknown mode, named", body = Value),
    )
)]
async fn mode_set(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(site): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let b: ModeBody = serde_json::from_slice(&body).map_err(|e| err(422, e))?;
    let mode = b
        .mode
        .map(|m| {
            ExecutorMode::parse(&m)
                .ok_or_else(|| ApiError::new(422, format!("mode {m:?}: one of auto, approve, off")))
        })
        .transpose()?;
    blocking(move || {
        crate::executor::set_site_mode(&svc, &c, &site, mode)
            .map(|m| Json(json!({ "site": site, "mode": m })))
            .map_err(|e| {
                let e = crate::incidents::IncidentError::from(e);
                err(e.status(), e)
            })
    })
    .await?
}
