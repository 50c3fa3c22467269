//! Incident tools: list and show (read-only), and propose a remediation (keeps a plan on
//! the incident; the executor and the central guardrails decide whether it becomes an
//! order).

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{McpTools, ToolError, caller_json, split_host, tenant_json};
use crate::auth::Caller;
use crate::incidents::IncidentError;
use crate::services::Services;
use crate::store::StoreError;
use crate::store::incidents::{IncidentFilter, IncidentRecord, IncidentState};

/// Most incidents one call lists.
const MAX_LISTED: u32 = 500;

impl From<IncidentError> for ToolError {
    fn from(e: IncidentError) -> Self {
        match e {
            IncidentError::NotFound(id) => {
                ToolError::NotFound(format!("not found among your tenants: incident {id}"))
            }
            IncidentError::Invalid(m) => ToolError::Refused(m),
            IncidentError::Auth(a) => ToolError::Refused(a.to_string()),
            IncidentError::Store(s) => ToolError::from(s),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListIncidentsArgs {
    /// `open` (the default), `resolved`, `closed` or `all`.
    #[serde(default)]
    pub state: Option<String>,
    /// Only incidents of this site.
    #[serde(default)]
    pub site: Option<String>,
    /// Only incidents of this host, as SITE/HOST.
    #[serde(default)]
    pub host: Option<String>,
    /// At most this many, newest first (default 100, at most 500).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentArgs {
    /// The incident's id (from list_incidents).
    pub incident_id: String,
}

fn tenant_of(svc: &Services, caller: &Caller, site_id: &str) -> Result<Value, StoreError> {
    let reseller = svc.store.site(caller, site_id)?.and_then(|s| s.reseller_id);
    Ok(tenant_json(reseller.as_deref(), site_id))
}

fn summary(i: &IncidentRecord, tenant: Value) -> Value {
    json!({
        "incident_id": i.incident_id,
        "host": format!("{}/{}", i.site_id, i.host_id),
        "tenant": tenant,
        "cause": i.cause,
        "check": i.check,
        "state": i.state.as_str(),
        "severity": i.severity,
        "hipaa_controls": i.hipaa_controls,
        "summary": i.summary,
        "opened_at": i.opened_at,
        "updated_at": i.updated_at,
        "plan_state": i.plan_state,
        "order_id": i.order_id,
    })
}

pub(super) fn list_incidents(
    svc: &Services,
    caller: &Caller,
    args: ListIncidentsArgs,
) -> Result<Value, ToolError> {
    let bad = |reason: String| ToolError::Arguments {
        tool: "list_incidents",
        reason,
    };
    let state = match args.state.as_deref() {
        None | Some("open") => Some(IncidentState::Open),
        Some("all") => None,
        Some(s) => Some(IncidentState::parse(s).ok_or_else(|| {
            bad(format!(
                "state {s:?} is not one of open, resolved, closed, all"
            ))
        })?),
    };
    let limit = args.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LISTED {
        return Err(bad(format!("limit {limit} is not within 1..={MAX_LISTED}")));
    }
    let (mut site_id, mut host_id) = (args.site.clone(), None);
    if let Some(h) = &args.host {
        let (s, h) = split_host("list_incidents", h)?;
        if site_id.as_ref().is_some_and(|x| *x != s) {
            return Err(bad(format!(
                "host {s}/{h} is not in site {}",
                site_id.unwrap_or_default()
            )));
        }
        svc.store.host(caller, &s, &h)?.ok_or_else(|| {
            ToolError::NotFound(format!("not found among your tenants: host {s}/{h}"))
        })?;
        site_id = Some(s);
        host_id = Some(h);
    } else if let Some(s) = &site_id {
        svc.store.site(caller, s)?.ok_or_else(|| {
            ToolError::NotFound(format!("not found among your tenants: site {s}"))
        })?;
    }
    let filter = IncidentFilter {
        state,
        site_id,
        host_id,
        plan_state: None,
        limit: Some(limit),
    };
    let found = crate::incidents::list(svc, caller, &filter)?;
    // One site lookup per site listed, not per incident.
    let mut tenants = std::collections::BTreeMap::new();
    let mut listed = Vec::with_capacity(found.len());
    for i in &found {
        let tenant = match tenants.get(&i.site_id) {
            Some(t) => Value::clone(t),
            None => {
                let t = tenant_of(svc, caller, &i.site_id)?;
                tenants.insert(i.site_id.clone(), t.clone());
                t
            }
        };
        listed.push(summary(i, tenant));
    }
    Ok(json!({
        "caller": caller_json(caller),
        "incidents": listed.len(),
        "incident_list": listed,
    }))
}

pub(super) fn show_incident(
    svc: &Services,
    caller: &Caller,
    args: IncidentArgs,
) -> Result<Value, ToolError> {
    let view = crate::incidents::show(svc, caller, &args.incident_id)?;
    Ok(json!({
        "caller": caller_json(caller),
        "tenant": tenant_of(svc, caller, &view.incident.site_id)?,
        "incident": view.incident,
        "timeline": view.timeline,
        "order": view.order.map(|o| json!({
            "order_id": o.order_id, "runbook": o.runbook_id, "state": o.state,
            "created_by": o.created_by, "approved_by": o.approved_by,
            "result_outcome": o.result_outcome, "result_error": o.result_error,
        })),
    }))
}

pub(super) fn propose_remediation(
    svc: &Services,
    caller: &Caller,
    args: IncidentArgs,
) -> Result<Value, ToolError> {
    let plan = crate::planner::propose(svc, caller, &args.incident_id)?;
    Ok(json!({
        "caller": caller_json(caller),
        "tenant": tenant_of(svc, caller, &plan.site_id)?,
        "plan": plan,
        "next": "the plan is kept on the incident; request_order (or the site's executor in auto mode) turns it into an order through the central guardrails, and a disruptive runbook waits for a second operator",
    }))
}

#[tool_router(router = incident_tools, vis = "pub(super)")]
impl McpTools {
    /// Incidents the caller may see, newest first: host, tenant, cause, severity,
    /// HIPAA controls, state and plan state.
    #[tool(
        input_schema = super::schema::<ListIncidentsArgs>(),
        annotations(
            title = "List incidents",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_incidents(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("list_incidents", &ctx, args, list_incidents).await
    }

    /// One incident: its facts, its timeline of bundles and actions, its plan and its order.
    #[tool(
        input_schema = super::schema::<IncidentArgs>(),
        annotations(
            title = "Show an incident",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn show_incident(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("show_incident", &ctx, args, show_incident).await
    }
}

#[tool_router(router = incident_write_tools, vis = "pub(super)")]
impl McpTools {
    /// Proposes a remediation for an open incident (runbook, params, rationale) with the
    /// server's planner and keeps it on the incident; it signs nothing.
    #[tool(
        input_schema = super::schema::<IncidentArgs>(),
        annotations(
            title = "Propose a remediation",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn propose_remediation(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("propose_remediation", &ctx, args, propose_remediation)
            .await
    }
}
