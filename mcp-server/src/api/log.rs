//! The transparency log's routes on both listeners: the newest checkpoint, inclusion
//! proofs (scoped: a box proves only its own bundles, an operator those of its tenants)
//! and consistency proofs. A proof the log cannot give yet is answered 202 "pending"
//! with Retry-After, never with a wrong proof.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::agent::{AgentState, identify};
use super::{ApiError, ConnInfo, blocking};
use crate::auth::Caller;
use crate::services::Services;
use crate::tlog::{LeafKey, LogError, RETRY_AFTER_SEC};

/// `?bundle_id=` or `?leaf_hash=`, and an optional `tree_size`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InclusionQuery {
    /// The bundle whose leaf to prove.
    pub bundle_id: Option<String>,
    /// Or the leaf hash (hex or standard base64).
    pub leaf_hash: Option<String>,
    /// The tree to prove it in; default the newest checkpoint's size.
    pub tree_size: Option<u64>,
}

/// `?old=&new=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyQuery {
    /// The size of the older checkpoint (the one the client holds).
    pub old: u64,
    /// The newer size; default the newest checkpoint's.
    pub new: Option<u64>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(400, format!("bad query: {}", e.body_text())))
}

/// The answer for a log error: pending is 202 with Retry-After, the rest an error body.
fn log_answer(e: LogError) -> Response {
    if e.is_pending() {
        let retry = RETRY_AFTER_SEC.to_string();
        return (
            axum::http::StatusCode::ACCEPTED,
            [("retry-after", retry.as_str())],
            Json(json!({ "status": "pending", "error": e.to_string(), "retry_after_sec": RETRY_AFTER_SEC })),
        )
            .into_response();
    }
    ApiError::new(e.status(), e.to_string()).into_response()
}

fn ok(v: impl serde::Serialize) -> Response {
    match serde_json::to_value(v) {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError::new(500, e.to_string()).into_response(),
    }
}

/// Runs a log call for `caller`, auditing a refusal of scope (an unknown bundle or leaf).
async fn run<T: serde::Serialize + Send + 'static>(
    svc: Services,
    caller: Caller,
    action: &'static str,
    target: String,
    f: impl FnOnce(&Services, &Caller) -> Result<T, LogError> + Send + 'static,
) -> Response {
    let result = blocking(move || {
        let r = f(&svc, &caller);
        if let Err(e @ (LogError::UnknownBundle(_) | LogError::UnknownLeaf(_))) = &r {
            crate::audit::record(&*svc.store, &caller, action, &target, Some(&e.to_string()));
        }
        r
    })
    .await;
    match result {
        Ok(Ok(v)) => ok(v),
        Ok(Err(e)) => log_answer(e),
        Err(e) => e.into_response(),
    }
}

/// A checked inclusion request: how the leaf is named and in which tree.
struct InclusionCall {
    by_bundle: bool,
    name: String,
    tree_size: Option<u64>,
}

impl InclusionCall {
    fn parse(q: InclusionQuery) -> Result<Self, ApiError> {
        let (by_bundle, name) = match (q.bundle_id, q.leaf_hash) {
            (Some(b), None) => (true, b),
            (None, Some(h)) => (false, h),
            _ => {
                return Err(ApiError::new(
                    400,
                    "name the leaf by exactly one of bundle_id and leaf_hash",
                ));
            }
        };
        Ok(Self {
            by_bundle,
            name,
            tree_size: q.tree_size,
        })
    }

    fn run(
        self,
        svc: &Services,
        caller: &Caller,
    ) -> Result<crate::tlog::InclusionAnswer, LogError> {
        let key = if self.by_bundle {
            LeafKey::Bundle(&self.name)
        } else {
            LeafKey::Hash(&self.name)
        };
        crate::tlog::inclusion(svc, caller, key, self.tree_size)
    }
}

// ---- the agent listener (mTLS; the box's own bundles only) ----

pub async fn agent_checkpoint(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let (caller, _) = match identify(&state, &info, &headers, "log.checkpoint").await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    run(
        state.svc.clone(),
        caller,
        "log.checkpoint",
        "-".into(),
        |svc, _| crate::tlog::checkpoint(svc),
    )
    .await
}

pub async fn agent_inclusion(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    q: Result<Query<InclusionQuery>, QueryRejection>,
) -> Response {
    let (caller, _) = match identify(&state, &info, &headers, "log.inclusion").await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    match query(q).and_then(InclusionCall::parse) {
        Ok(call) => {
            let target = call.name.clone();
            run(
                state.svc.clone(),
                caller,
                "log.inclusion",
                target,
                move |svc, c| call.run(svc, c),
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

pub async fn agent_consistency(
    State(state): State<AgentState>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    q: Result<Query<ConsistencyQuery>, QueryRejection>,
) -> Response {
    let (caller, _) = match identify(&state, &info, &headers, "log.consistency").await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    match query(q) {
        Ok(q) => {
            run(
                state.svc.clone(),
                caller,
                "log.consistency",
                "-".into(),
                move |svc, _| crate::tlog::consistency(svc, q.old, q.new),
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

// ---- the operator listener (bearer token; the caller's tenants) ----

/// The newest signed checkpoint and the key to verify it with.
#[utoipa::path(
    get,
    path = "/api/v1/ops/log/checkpoint",
    tag = "log",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "origin, tree_size, checkpoint (a C2SP signed note), log_key (its verifier key)", body = Value),
        (status = 202, description = "Pending: the log has no checkpoint yet", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
    )
)]
pub async fn ops_checkpoint(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let caller = match super::ops::caller(&svc, &info, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    run(svc, caller, "log.checkpoint", "-".into(), |svc, _| {
        crate::tlog::checkpoint(svc)
    })
    .await
}

/// An inclusion proof of one bundle of the caller's tenants.
#[utoipa::path(
    get,
    path = "/api/v1/ops/log/inclusion",
    tag = "log",
    security(("bearer" = [])),
    params(InclusionQuery),
    responses(
        (status = 200, description = "leaf (the bundle's identity and leaf hash), proof (RFC 9162 inclusion proof), checkpoint (the signed note at the proof's size)", body = Value),
        (status = 202, description = "Pending: accepted, not yet sequenced; ask again after Retry-After", body = Value),
        (status = 400, description = "A bad query, named", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 404, description = "No such bundle among the caller's tenants", body = Value),
        (status = 416, description = "tree_size beyond the log, or too small to hold the leaf", body = Value),
    )
)]
pub async fn ops_inclusion(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    q: Result<Query<InclusionQuery>, QueryRejection>,
) -> Response {
    let caller = match super::ops::caller(&svc, &info, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match query(q).and_then(InclusionCall::parse) {
        Ok(call) => {
            let target = call.name.clone();
            run(svc, caller, "log.inclusion", target, move |svc, c| {
                call.run(svc, c)
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

/// A consistency proof between two tree sizes.
#[utoipa::path(
    get,
    path = "/api/v1/ops/log/consistency",
    tag = "log",
    security(("bearer" = [])),
    params(ConsistencyQuery),
    responses(
        (status = 200, description = "proof (RFC 9162 consistency proof), old_checkpoint and new_checkpoint (signed notes at both sizes, when the log signed one there)", body = Value),
        (status = 202, description = "Pending: the log has no checkpoint yet", body = Value),
        (status = 400, description = "A bad query, or old above new", body = Value),
        (status = 401, description = "Missing or wrong operator token", body = Value),
        (status = 416, description = "A size beyond the log", body = Value),
    )
)]
pub async fn ops_consistency(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    q: Result<Query<ConsistencyQuery>, QueryRejection>,
) -> Response {
    let caller = match super::ops::caller(&svc, &info, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match query(q) {
        Ok(q) => {
            run(svc, caller, "log.consistency", "-".into(), move |svc, _| {
                crate::tlog::consistency(svc, q.old, q.new)
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant: a pending answer is never a 200, so no client takes it for a proof.
    #[test]
    fn pending_is_never_ok() {
        let r = log_answer(LogError::Pending("b".into()));
        assert_eq!(r.status().as_u16(), 202, "pending is 202");
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("2"),
            "with Retry-After"
        );
        let r = log_answer(LogError::SizeBeyondLog {
            size: 9,
            log_size: 3,
        });
        assert_eq!(r.status().as_u16(), 416, "a size beyond the log is refused");
    }
}
