//! The agent listener's router: protocol v1 (docs/protocol.md) plus enrollment. Every route
//! but enrollment needs a client certificate whose `SITE/HOST` is an enrolled, unrevoked
//! host, and a host acts only for itself.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};

use super::{ApiError, ConnInfo, blocking};
use crate::auth::Caller;
use crate::enroll::{EnrollRequest, exchange};
use crate::services::Services;
use crate::store::Host;

/// A canned answer for fault injection in tests of the agent's error handling.
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Canned {
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            headers: vec![],
            content_type: "application/json",
            body: body.to_string().into_bytes(),
        }
    }
}

/// Given the method and path, an answer to send instead of the real one (tests only).
pub type Intercept = Arc<dyn Fn(&str, &str) -> Option<Canned> + Send + Sync>;

#[derive(Clone)]
pub struct AgentState {
    pub svc: Services,
    pub api_key: Option<Arc<String>>,
}

pub fn router(state: AgentState, intercept: Option<Intercept>) -> Router {
    let body_limit = state.svc.config.limits.max_body_bytes;
    let router = Router::new()
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/health", get(health))
        .route("/api/v1/evidence", post(evidence))
        .route("/api/v1/hosts/{site}/{host}/orders", get(orders))
        .route(
            "/api/v1/hosts/{site}/{host}/orders/{order_id}/result",
            post(result),
        )
        .route(
            "/api/v1/hosts/{site}/{host}/bundles/{bundle_id}/sbom",
            axum::routing::put(sbom).layer(DefaultBodyLimit::max(
                state.svc.config.limits.max_sbom_bytes,
            )),
        )
        .route("/api/v1/log/checkpoint", get(super::log::agent_checkpoint))
        .route("/api/v1/log/inclusion", get(super::log::agent_inclusion))
        .route(
            "/api/v1/log/consistency",
            get(super::log::agent_consistency),
        )
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state);
    match intercept {
        None => router,
        Some(intercept) => router.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let intercept = intercept.clone();
                async move {
                    match intercept(req.method().as_str(), req.uri().path()) {
                        Some(c) => {
                            // Read the request first, as a real handler does: closing with
                            // unread data resets the connection before the answer arrives.
                            let _ = axum::body::to_bytes(req.into_body(), 4 * 1024 * 1024).await;
                            canned(c)
                        }
                        None => next.run(req).await,
                    }
                }
            },
        )),
    }
}

fn canned(c: Canned) -> Response {
    let mut builder = axum::http::Response::builder()
        .status(c.status)
        .header("content-type", c.content_type);
    for (k, v) in &c.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder
        .body(axum::body::Body::from(c.body))
        .unwrap_or_else(|_| ApiError::new(500, "bad canned answer").into_response())
}

async fn fallback(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        404,
        format!("no route {method} {} in protocol v1", uri.path()),
    )
}

/// The message for every certificate that may not act here: the same for an unknown,
/// revoked or replaced certificate, so answers do not tell enrolled hosts from others.
const NOT_AUTHORIZED: &str = "this client certificate is not authorized on this server (unknown or revoked host); enroll the box again with a new token";

fn api_key_ok(state: &AgentState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.api_key else {
        return true;
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    crate::auth::hashes_equal(
        &crate::auth::token_hash(given),
        &crate::auth::token_hash(expected),
    )
}

/// Decides who the caller is: the enrolled host its certificate names, or a refusal (audited).
pub(crate) async fn identify(
    state: &AgentState,
    info: &ConnInfo,
    headers: &HeaderMap,
    action: &'static str,
) -> Result<(Caller, Host), ApiError> {
    let peer = Some(info.peer.to_string());
    let svc = state.svc.clone();
    if !api_key_ok(state, headers) {
        let store = svc.store.clone();
        blocking(move || {
            crate::audit::record_anonymous(&*store, peer, action, "-", "missing or wrong API key")
        })
        .await?;
        return Err(ApiError::new(
            401,
            "missing or wrong API key (Authorization: Bearer ...)",
        ));
    }
    let Some(der) = info.client_cert.clone() else {
        let store = svc.store.clone();
        blocking(move || {
            crate::audit::record_anonymous(&*store, peer, action, "-", "no client certificate")
        })
        .await?;
        return Err(ApiError::new(
            401,
            "this server requires a client certificate on this route; set client_cert_file and client_key_file (compliance-agent enroll makes them)",
        ));
    };
    blocking(move || {
        let id = match crate::pki::identity(&der) {
            Ok(id) => id,
            Err(e) => {
                crate::audit::record_anonymous(&*svc.store, peer, action, "-", &e.to_string());
                return Err(ApiError::new(403, NOT_AUTHORIZED));
            }
        };
        let caller = Caller::host(&id.site_id, &id.host_id, peer);
        let target = format!("{}/{}", id.site_id, id.host_id);
        let host = match svc.store.host(&caller, &id.site_id, &id.host_id) {
            Ok(Some(h)) => h,
            Ok(None) => {
                crate::audit::record(&*svc.store, &caller, action, &target, Some("not enrolled"));
                return Err(ApiError::new(403, NOT_AUTHORIZED));
            }
            Err(e) => return Err(ApiError::new(503, e.to_string())),
        };
        let refusal = if host.revoked_at.is_some() {
            Some("revoked")
        } else if host.cert_serial.as_ref().is_some_and(|s| *s != id.serial) {
            Some("certificate is not the one issued at enrollment")
        } else {
            None
        };
        if let Some(reason) = refusal {
            crate::audit::record(&*svc.store, &caller, action, &target, Some(reason));
            return Err(ApiError::new(403, NOT_AUTHORIZED));
        }
        Ok((caller, host))
    })
    .await?
}

/// Refuses (and audits) a host acting for another.
async fn require_self(
    state: &AgentState,
    caller: &Caller,
    host: &Host,
    site: &str,
    host_id: &str,
    action: &'static str,
) -> Result<(), ApiError> {
    if (host.site_id.as_str(), host.host_id.as_str()) == (site, host_id) {
        return Ok(());
    }
    let (store, caller2, target) = (
        state.svc.store.clone(),
        caller.clone(),
        format!("{site}/{host_id}"),
    );
    blocking(move || {
        crate::audit::record(
            &*store,
            &caller2,
            action,
            &target,
            Some("acting for another host"),
        )
    })
    .await?;
    Err(ApiError::new(
        403,
        format!(
            "this certificate is for {}/{}; it may act only for itself",
            host.site_id, host.host_id
        ),
    ))
}

async fn enroll(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: EnrollRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            422,
            format!("the enrollment request is not valid JSON of the expected shape: {e}"),
        )
    })?;
    let svc = state.svc.clone();
    let peer = Some(info.peer.to_string());
    let answer = blocking(move || exchange(&svc, peer, &req)).await?;
    match answer {
        Ok(r) => Ok(Json(
            serde_json::to_value(r).map_err(|e| ApiError::new(500, e.to_string()))?,
        )),
        Err(e) => Err(ApiError::new(e.status(), e.to_string())),
    }
}

async fn health(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    identify(&state, &info, &headers, "health").await?;
    Ok(Json(json!({
        "status": "ok",
        "protocol": 1,
        "server": format!("mcp-server {}", env!("CARGO_PKG_VERSION")),
    })))
}

async fn orders(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (caller, host) = identify(&state, &info, &headers, "orders.list").await?;
    require_self(&state, &caller, &host, &site, &host_id, "orders.list").await?;
    let svc = state.svc.clone();
    let pending = blocking(move || svc.store.pending_orders(&caller, &site, &host_id))
        .await?
        .map_err(|e| ApiError::new(503, e.to_string()))?;
    let mut listed = Vec::new();
    for o in pending {
        let Some(env) = o.envelope else { continue };
        let envelope: Value = serde_json::from_str(&env).unwrap_or(Value::String(env));
        listed.push(json!({ "order_id": o.order_id, "envelope": envelope }));
    }
    Ok(Json(json!({ "orders": listed })))
}

/// Reads bundle.json and bundle.sig out of a multipart body.
async fn parts(
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
    let mut multipart = multipart
        .map_err(|e| ApiError::new(415, format!("the upload must be multipart/form-data: {e}")))?;
    let (mut json, mut sig) = (None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                let status = if e.status().as_u16() == 413 { 413 } else { 422 };
                return Err(ApiError::new(
                    status,
                    format!("malformed multipart body: {}", e.body_text()),
                ));
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        let data = field.bytes().await.map_err(|e| {
            ApiError::new(
                if e.status().as_u16() == 413 { 413 } else { 422 },
                format!("malformed multipart part {name:?}: {}", e.body_text()),
            )
        })?;
        match name.as_str() {
            "bundle.json" => json = Some(data.to_vec()),
            "bundle.sig" => sig = Some(data.to_vec()),
            _ => {}
        }
    }
    match (json, sig) {
        (Some(j), Some(s)) => Ok((j, s)),
        _ => Err(ApiError::new(
            422,
            "the upload needs the parts bundle.json and bundle.sig",
        )),
    }
}

async fn upload(
    state: AgentState,
    caller: Caller,
    host: Host,
    json: Vec<u8>,
    sig: Vec<u8>,
    order_id: Option<String>,
) -> Result<Json<Value>, ApiError> {
    let svc = state.svc.clone();
    let oid = order_id.clone();
    let result = blocking(move || {
        let r = crate::intake::receive(&svc, &caller, &host, &json, &sig, oid.as_deref());
        if let Err(e) = &r
            && e.status() != 503
        {
            crate::audit::record(
                &*svc.store,
                &caller,
                "evidence.upload",
                &format!("{}/{}", host.site_id, host.host_id),
                Some(&e.to_string()),
            );
        }
        r
    })
    .await?;
    match result {
        Ok(receipt) => {
            if receipt.status == "stored" {
                state.svc.log.wake();
            }
            let mut body = json!({ "bundle_id": receipt.bundle_id, "status": receipt.status });
            if let Some(id) = order_id {
                body["order_id"] = json!(id);
            }
            Ok(Json(body))
        }
        Err(e) => Err(ApiError::new(e.status(), e.to_string())),
    }
}

async fn evidence(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let (caller, host) = identify(&state, &info, &headers, "evidence.upload").await?;
    let (json, sig) = parts(multipart).await?;
    upload(state, caller, host, json, sig, None).await
}

/// The document of an sbom bundle the host delivered (sbom.cdx.json, raw JSON).
async fn sbom(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host_id, bundle_id)): Path<(String, String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (caller, host) = identify(&state, &info, &headers, "sbom.upload").await?;
    require_self(&state, &caller, &host, &site, &host_id, "sbom.upload").await?;
    let body = body.map_err(|e| {
        ApiError::new(
            if e.status().as_u16() == 413 { 413 } else { 422 },
            format!("the SBOM document: {}", e.body_text()),
        )
    })?;
    let svc = state.svc.clone();
    let result = blocking(move || {
        let r = crate::sbom::receive(&svc, &caller, &host, &bundle_id, &body);
        if let Err(e) = &r
            && e.status() != 503
        {
            crate::audit::record(
                &*svc.store,
                &caller,
                "sbom.upload",
                &format!("{}/{}/{bundle_id}", host.site_id, host.host_id),
                Some(&e.to_string()),
            );
        }
        r
    })
    .await?;
    match result {
        Ok(receipt) => Ok(Json(json!(receipt))),
        Err(e) => Err(ApiError::new(e.status(), e.to_string())),
    }
}

async fn result(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host_id, order_id)): Path<(String, String, String)>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let (caller, host) = identify(&state, &info, &headers, "order.result").await?;
    require_self(&state, &caller, &host, &site, &host_id, "order.result").await?;
    if !crate::valid_id(&order_id) {
        return Err(ApiError::new(404, "no such order"));
    }
    let (json, sig) = parts(multipart).await?;
    upload(state, caller, host, json, sig, Some(order_id)).await
}
