//! Read-only fleet tools: the status of every host the caller sees, and one host.

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{McpTools, ToolError, caller_json, split_host, tenant_json};
use crate::auth::Caller;
use crate::fleet::HostStatus;
use crate::services::Services;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetStatusArgs {
    /// Only hosts of this site.
    #[serde(default)]
    pub site: Option<String>,
    /// Only hosts that are overdue (silent for more than twice their scan interval).
    #[serde(default)]
    pub overdue_only: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShowHostArgs {
    /// The host as SITE/HOST.
    pub host: String,
}

/// The summary line of a host in the fleet view.
fn summary(h: &HostStatus) -> Value {
    json!({
        "host": format!("{}/{}", h.site_id, h.host_id),
        "tenant": tenant_json(h.reseller_id.as_deref(), &h.site_id),
        "last_seen": h.last_seen,
        "overdue": h.overdue,
        "revoked": h.revoked_at.is_some(),
        "bundles": h.bundles,
        "chain_gaps": h.gaps.len(),
        "score": h.score,
        "failing_checks": h.latest.iter().filter(|r| r.check != "mcp_order" && r.outcome != "success").map(|r| &r.check).collect::<Vec<_>>(),
    })
}

pub(super) fn fleet_status(
    svc: &Services,
    caller: &Caller,
    args: FleetStatusArgs,
) -> Result<Value, ToolError> {
    let all = crate::fleet::fleet(&*svc.store, caller, jiff::Timestamp::now())?;
    let hosts: Vec<&HostStatus> = all
        .iter()
        .filter(|h| args.site.as_deref().is_none_or(|s| s == h.site_id))
        .filter(|h| !args.overdue_only || h.overdue)
        .collect();
    if let Some(site) = &args.site
        && svc.store.site(caller, site)?.is_none()
    {
        return Err(ToolError::NotFound(format!(
            "not found among your tenants: site {site}"
        )));
    }
    Ok(json!({
        "caller": caller_json(caller),
        "hosts": hosts.len(),
        "overdue": hosts.iter().filter(|h| h.overdue).count(),
        "with_chain_gaps": hosts.iter().filter(|h| !h.gaps.is_empty()).count(),
        "host_list": hosts.iter().map(|h| summary(h)).collect::<Vec<_>>(),
    }))
}

pub(super) fn show_host(
    svc: &Services,
    caller: &Caller,
    args: ShowHostArgs,
) -> Result<Value, ToolError> {
    let (site_id, host_id) = split_host("show_host", &args.host)?;
    let host = svc.store.host(caller, &site_id, &host_id)?.ok_or_else(|| {
        ToolError::NotFound(format!("not found among your tenants: host {}", args.host))
    })?;
    let status = crate::fleet::host_status(&*svc.store, caller, &host, jiff::Timestamp::now())?;
    let site = svc.store.site(caller, &site_id)?;
    let orders = svc.store.orders(caller, Some((&site_id, &host_id)))?;
    Ok(json!({
        "caller": caller_json(caller),
        "host": args.host,
        "tenant": tenant_json(host.reseller_id.as_deref(), &host.site_id),
        "status": status,
        "runbook_allowlist": site.map(|s| s.runbook_allowlist).unwrap_or_default(),
        "recent_orders": orders.iter().take(10).map(|o| json!({
            "order_id": o.order_id, "runbook": o.runbook_id, "state": o.state,
            "created_by": o.created_by, "created_at": o.created_at,
            "result_outcome": o.result_outcome, "result_error": o.result_error,
        })).collect::<Vec<_>>(),
    }))
}

#[tool_router(router = fleet_tools, vis = "pub(super)")]
impl McpTools {
    /// The fleet the caller may see: each host's tenant, last contact, overdue flag,
    /// chain gaps, compliance score and failing checks.
    #[tool(
        input_schema = super::schema::<FleetStatusArgs>(),
        annotations(
            title = "Fleet status",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn fleet_status(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("fleet_status", &ctx, args, fleet_status).await
    }

    /// One host: its tenant, chain (contiguous through, gaps), latest result per check,
    /// last contact, the site's runbook allowlist and its recent orders.
    #[tool(
        input_schema = super::schema::<ShowHostArgs>(),
        annotations(
            title = "Show a host",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn show_host(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("show_host", &ctx, args, show_host).await
    }
}
