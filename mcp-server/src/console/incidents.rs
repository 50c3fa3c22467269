//! The console's incident pages: open and ended incidents, one incident with its plan
//! and timeline, and the actions an operator may take on it (plan, turn the plan into
//! an order, close with a reason). Each action is the library call the API and the CLI
//! make, with the viewer's `Caller`, so scoping, roles, guardrails and audit are theirs.

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Form};
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::pages::{attempt, ser, viewer, when, work};
use super::{Console, Viewer, redirect};
use crate::api::ConnInfo;
use crate::store::incidents::{IncidentFilter, IncidentState};

#[derive(Deserialize, Default)]
pub struct ListQuery {
    /// `open` (default) or `all`.
    state: Option<String>,
}

#[derive(Serialize)]
struct IncidentRow {
    incident_id: String,
    host: String,
    cause: String,
    severity: String,
    state: &'static str,
    plan_state: &'static str,
    opened_at: String,
    summary: String,
}

pub async fn list(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let all = query
        .ok()
        .and_then(|Query(q)| q.state)
        .is_some_and(|s| s == "all");
    let filter = IncidentFilter {
        state: (!all).then_some(IncidentState::Open),
        limit: Some(500),
        ..IncidentFilter::default()
    };
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(work(move || crate::incidents::list(&svc, &caller, &filter)).await);
    let list = match found {
        Ok(l) => l,
        Err(e) => {
            return st.message(
                &v,
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &e.to_string(),
            );
        }
    };
    let rows: Vec<IncidentRow> = list
        .iter()
        .map(|i| IncidentRow {
            incident_id: i.incident_id.clone(),
            host: format!("{}/{}", i.site_id, i.host_id),
            cause: i.cause.clone(),
            severity: i.severity.clone(),
            state: i.state.as_str(),
            plan_state: i.plan_state.as_str(),
            opened_at: when(i.opened_at),
            summary: i.summary.clone(),
        })
        .collect();
    st.page(
        &v,
        StatusCode::OK,
        "incidents.html",
        "/console/incidents",
        context! { incidents => ser(&rows), all },
    )
}

async fn incident_page(
    st: &Console,
    v: &Viewer,
    id: String,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(work(move || crate::incidents::show(&svc, &caller, &id)).await);
    let view = match found {
        Ok(view) => view,
        Err(e) => {
            let code = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::NOT_FOUND);
            return st.message(v, code, "Not found", &e.to_string());
        }
    };
    let i = &view.incident;
    let open = i.state == IncidentState::Open;
    let may_act = open && v.caller.require_write("act on incidents").is_ok();
    let timeline: Vec<_> = view
        .timeline
        .iter()
        .map(|e| {
            context! {
                at => when(e.at), kind => e.kind.clone(), actor => e.actor.clone(),
                detail => e.detail.clone(), bundle_id => e.bundle_id.clone(),
                order_id => e.order_id.clone(),
            }
        })
        .collect();
    let plan = i
        .plan
        .as_ref()
        .map(|p| serde_json::to_string_pretty(p).unwrap_or_default());
    st.page(
        v,
        status,
        "incident.html",
        "/console/incidents",
        context! {
            incident => context! {
                incident_id => i.incident_id.clone(),
                host => format!("{}/{}", i.site_id, i.host_id),
                cause => i.cause.clone(), check => i.check.clone(),
                state => i.state.as_str(), severity => i.severity.clone(),
                controls => i.hipaa_controls.clone(), summary => i.summary.clone(),
                opened_at => when(i.opened_at), updated_at => when(i.updated_at),
                resolved_at => i.resolved_at.map(when), resolved_by => i.resolved_by.clone(),
                resolution => i.resolution.clone(), remediation_sec => i.remediation_sec,
                plan_state => i.plan_state.as_str(), order_id => i.order_id.clone(),
            },
            plan, timeline, may_act, notice, error,
            order => view.order.as_ref().map(|o| context! {
                order_id => o.order_id.clone(), runbook => o.runbook_id.clone(),
                state => o.state.as_str(), result => o.result_outcome.clone(),
            }),
        },
    )
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

pub async fn show(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<DoneQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    // Fixed texts only: nothing from the URL is shown back.
    let notice = match query.ok().and_then(|Query(q)| q.done).as_deref() {
        Some("plan") => Some("A plan was proposed and kept on the incident.".to_owned()),
        Some("execute") => {
            Some("The plan went through the guardrails and became an order.".to_owned())
        }
        Some("close") => Some("The incident is closed.".to_owned()),
        _ => None,
    };
    incident_page(&st, &v, id, StatusCode::OK, notice, None).await
}

#[derive(Deserialize)]
pub struct ActionForm {
    csrf: Option<String>,
    /// Closing only: why (required).
    reason: Option<String>,
}

pub async fn action(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((id, what)): Path<(String, String)>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let form = form.ok().map(|Form(f)| f);
    let sent = form.as_ref().and_then(|f| f.csrf.clone());
    attempt!(
        st.check_csrf(&v, sent.as_deref(), &format!("incident.{what}:{id}"))
            .await
    );
    let (svc, caller, iid) = (st.svc.clone(), v.caller.clone(), id.clone());
    let reason = form.and_then(|f| f.reason).unwrap_or_default();
    let outcome: Result<(), (u16, String)> = match what.as_str() {
        "plan" => attempt!(work(move || crate::planner::propose(&svc, &caller, &iid)).await)
            .map(|_| ())
            .map_err(|e| (e.status(), e.to_string())),
        "execute" => attempt!(work(move || crate::executor::execute(&svc, &caller, &iid)).await)
            .map(|_| ())
            .map_err(|e| (e.status(), e.to_string())),
        "close" => {
            attempt!(work(move || crate::incidents::close(&svc, &caller, &iid, &reason)).await)
                .map(|_| ())
                .map_err(|e| (e.status(), e.to_string()))
        }
        other => Err((404, format!("no incident action {other:?}"))),
    };
    match outcome {
        Ok(()) => redirect(&format!("/console/incidents/{id}?done={what}")),
        Err((code, e)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN);
            incident_page(&st, &v, id, status, None, Some(format!("Not done: {e}"))).await
        }
    }
}
