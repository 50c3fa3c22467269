//! The mutating tool: request an order, exactly through the central guardrails of
//! `crate::orders::create` (allowlist, params, TTL bounds, cooldown, and a second
//! operator for disruptive runbooks). There is no approving tool: a disruptive order
//! waits for a person (`mcp-server order approve` or the operator API).

use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{McpTools, ToolError, caller_json, split_host, tenant_json};
use crate::auth::Caller;
use crate::orders::{OrderDraft, OrderError};
use crate::services::Services;
use crate::store::OrderState;

pub(super) const REQUEST_ORDER: &str = "request_order";

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestOrderArgs {
    /// The host as SITE/HOST.
    pub host: String,
    /// A runbook on the site's allowlist (show_host lists it).
    pub runbook: String,
    /// The runbook's parameters (a JSON object; default none).
    #[serde(default)]
    pub params: Option<serde_json::Map<String, Value>>,
    /// Seconds the order stays valid, within the server's bounds (default: the server's).
    #[serde(default)]
    pub ttl: Option<u64>,
}

fn refusal(e: OrderError) -> ToolError {
    match e {
        OrderError::Store(s) => s.into(),
        OrderError::NoSuchHost(h) => {
            ToolError::NotFound(format!("not found among your tenants: host {h}"))
        }
        other => ToolError::Refused(format!("order refused: {other}")),
    }
}

pub(super) fn request_order(
    svc: &Services,
    caller: &Caller,
    args: RequestOrderArgs,
) -> Result<Value, ToolError> {
    let (site_id, host_id) = split_host(REQUEST_ORDER, &args.host)?;
    let draft = OrderDraft {
        site_id,
        host_id,
        runbook_id: args.runbook,
        params: Value::Object(args.params.unwrap_or_default()),
        ttl: args.ttl,
    };
    let order = crate::orders::create(svc, caller, &draft).map_err(refusal)?;
    let reseller = svc
        .store
        .site(caller, &order.site_id)?
        .and_then(|s| s.reseller_id);
    let next = match order.state {
        OrderState::AwaitingApproval => format!(
            "runbook {} is disruptive: the order is not signed and waits for a second operator (mcp-server order approve {}); no tool can approve it",
            order.runbook_id, order.order_id
        ),
        _ => "signed: the host fetches it on its next poll and reports the result as a bundle"
            .to_string(),
    };
    Ok(json!({
        "caller": caller_json(caller),
        "host": format!("{}/{}", order.site_id, order.host_id),
        "tenant": tenant_json(reseller.as_deref(), &order.site_id),
        "order_id": order.order_id,
        "runbook": order.runbook_id,
        "params": order.params,
        "ttl": order.ttl,
        "state": order.state,
        "signed": order.envelope.is_some(),
        "created_by": order.created_by,
        "created_at": order.created_at,
        "next": next,
    }))
}

#[tool_router(router = order_tools, vis = "pub(super)")]
impl McpTools {
    /// Requests an order for a host. The server's guardrails decide: the runbook must be
    /// on the site's allowlist with valid params and TTL, and outside the cooldown for
    /// this host and runbook; a disruptive runbook is not signed until a second operator
    /// approves it. A refusal names the reason and creates no order.
    #[tool(
        input_schema = super::schema::<RequestOrderArgs>(),
        annotations(
            title = "Request an order",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn request_order(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run(REQUEST_ORDER, &ctx, args, request_order).await
    }
}
