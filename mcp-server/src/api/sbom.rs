//! The operator routes of the SBOM index: which hosts run a package or a store path,
//! and a host's latest SBOM document.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ops::{caller, err};
use super::{ApiError, ConnInfo, blocking};
use crate::services::Services;
use crate::store::StoreError;
use crate::store::sbom::SbomQuery;

pub(super) fn routes() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(hosts))
        .routes(routes!(document))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsQuery {
    package: Option<String>,
    version: Option<String>,
    path: Option<String>,
}

fn store_status(e: &StoreError) -> u16 {
    match e {
        StoreError::NotFound(_) => 404,
        StoreError::Forbidden(_) => 422,
        _ => 503,
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/sbom/hosts",
    tag = "fleet",
    security(("bearer" = [])),
    params(
        ("package" = Option<String>, Query, description = "A package name as the SBOM names its component (openssl)"),
        ("version" = Option<String>, Query, description = "Only this version of the package"),
        ("path" = Option<String>, Query, description = "Or a full Nix store path"),
    ),
    responses(
        (status = 200, description = "The hosts among the caller's tenants whose latest SBOM holds a matching component", body = serde_json::Value),
        (status = 401, description = "Missing or wrong operator token", body = serde_json::Value),
        (status = 422, description = "Neither or both of package and path, or a bad path", body = serde_json::Value),
    )
)]
async fn hosts(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    query: Result<Query<HostsQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let Query(q) = query.map_err(|e| err(422, e.body_text()))?;
    let q = SbomQuery {
        package: q.package,
        version: q.version,
        store_path: q.path,
    };
    blocking(move || {
        svc.store
            .sbom_hosts(&c, &q)
            .map(|m| Json(json!({ "hosts": m })))
            .map_err(|e| err(store_status(&e), e))
    })
    .await?
}

#[utoipa::path(
    get,
    path = "/api/v1/ops/hosts/{site}/{host}/sbom",
    tag = "fleet",
    security(("bearer" = [])),
    params(
        ("site" = String, Path, description = "Site id"),
        ("host" = String, Path, description = "Host id"),
    ),
    responses(
        (status = 200, description = "The host's latest SBOM (CycloneDX 1.6 JSON, as the box signed its SHA-256)", content_type = "application/vnd.cyclonedx+json"),
        (status = 401, description = "Missing or wrong operator token", body = serde_json::Value),
        (status = 404, description = "No such host among the caller's tenants, or no SBOM from it yet", body = serde_json::Value),
    )
)]
async fn document(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let c = caller(&svc, &info, &headers).await?;
    let found = blocking(move || {
        svc.store
            .latest_sbom(&c, &site, &host)
            .map_err(|e| err(store_status(&e), e))?
            .ok_or_else(|| ApiError::new(404, format!("no SBOM from {site}/{host} yet")))
    })
    .await??;
    Ok((
        [
            ("content-type", "application/vnd.cyclonedx+json".to_owned()),
            ("x-sbom-bundle-id", found.bundle_id.clone()),
            ("x-sbom-sha256", found.sha256.clone()),
        ],
        found.document,
    )
        .into_response())
}
