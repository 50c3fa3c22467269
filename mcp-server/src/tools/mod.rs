//! The Model Context Protocol server (rmcp): the operator's tools for an LLM client over
//! stdio (`mcp-server mcp --token-file F`) and streamable HTTP (`/mcp` on the operator
//! listener). Every call is scoped by the caller's operator token and audited with the
//! tool, its arguments and its outcome.
//!
//! The tools are grouped one file per concern, each group an rmcp tool router:
//! `fleet` and `evidence` read, `orders` changes things. [`McpTools::new`] adds the
//! routers of mutating groups only when the server is not read-only, so a read-only
//! server lists and runs no mutating tool at all.

mod evidence;
mod fleet;
mod incidents;
mod orders;
mod resources;

use std::sync::Arc;

use jiff::Timestamp;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListResourceTemplatesResult, ListToolsResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::auth::{Caller, Tenants, token_hash};
use crate::services::Services;
use crate::store::{AuditEntry, StoreError};

/// The `[mcp]` section of the configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct McpSettings {
    /// Register only the tools that change nothing (for the HTTP endpoint and stdio;
    /// `mcp-server mcp --read-only` asks the same for one stdio session).
    #[serde(default)]
    pub read_only: bool,
    /// Do not serve `/mcp` on the operator listener (stdio still works).
    #[serde(default)]
    pub disable_http: bool,
}

/// Arguments are at most this large in the audit log; longer ones are cut, and say so.
const AUDIT_ARGS_MAX: usize = 2048;

/// Why a tool call did not do what was asked: the text the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments for {tool}: {reason}")]
    Arguments { tool: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("the database is unavailable: {0}; nothing was done, try again later")]
    Unavailable(String),
    #[error("the archive is unavailable: {0}; nothing was done, try again later")]
    Archive(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ToolError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                ToolError::NotFound(format!("not found among your tenants: {what}"))
            }
            StoreError::Forbidden(m) => ToolError::Refused(m),
            StoreError::Unavailable(m) => ToolError::Unavailable(m),
            other => ToolError::Internal(other.to_string()),
        }
    }
}

/// How a call's operator is found: a token fixed for the session (stdio), or the
/// caller the HTTP layer authenticated for each request.
#[derive(Clone)]
enum Identity {
    /// Looked up again on every call, so a disabled operator stops at once.
    Token {
        hash: [u8; 32],
        peer: String,
    },
    PerRequest,
}

/// One MCP server: the services, how callers are identified, and the registered tools.
#[derive(Clone)]
pub struct McpTools {
    svc: Services,
    identity: Identity,
    read_only: bool,
    router: Arc<ToolRouter<McpTools>>,
}

impl McpTools {
    fn new(svc: Services, identity: Identity, read_only: bool) -> Self {
        let mut router = Self::read_only_tools();
        if !read_only {
            router += Self::mutating_tools();
        }
        Self {
            svc,
            identity,
            read_only,
            router: Arc::new(router),
        }
    }

    /// The groups that change nothing. A new read-only group is one more `+` here.
    fn read_only_tools() -> ToolRouter<Self> {
        Self::fleet_tools() + Self::evidence_tools() + Self::incident_tools()
    }

    /// The groups that change things; a read-only server registers none of them.
    fn mutating_tools() -> ToolRouter<Self> {
        Self::order_tools() + Self::incident_write_tools()
    }

    /// For stdio: every call acts as the operator whose token this is.
    pub fn for_token(svc: Services, token: &str, read_only: bool) -> Self {
        Self::new(
            svc,
            Identity::Token {
                hash: token_hash(token.trim()),
                peer: "mcp-stdio".into(),
            },
            read_only,
        )
    }

    /// For HTTP: each request carries the [`Caller`] the operator listener authenticated.
    pub fn per_request(svc: Services, read_only: bool) -> Self {
        Self::new(svc, Identity::PerRequest, read_only)
    }

    /// The tools this server registered, sorted by name.
    pub fn tools(&self) -> Vec<Tool> {
        self.router.list_all()
    }

    /// The operator behind this call, or the refusal (audited).
    async fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
        match &self.identity {
            Identity::PerRequest => ctx
                .extensions
                .get::<axum::http::request::Parts>()
                .and_then(|p| p.extensions.get::<Caller>())
                .cloned()
                .ok_or_else(|| ErrorData::invalid_request("no authenticated operator", None)),
            Identity::Token { hash, peer } => {
                let (svc, hash, peer) = (self.svc.clone(), *hash, peer.clone());
                blocking(move || match svc.store.operator_by_token(&hash) {
                    Ok(Some(op)) if !op.disabled => Ok(Caller {
                        actor: format!("operator:{}", op.name),
                        role: op.role,
                        tenants: op.tenants,
                        peer: Some(peer),
                    }),
                    Ok(_) => {
                        crate::audit::record_anonymous(
                            &*svc.store,
                            Some(peer),
                            "mcp.authenticate",
                            "-",
                            "bad token",
                        );
                        Err(ErrorData::invalid_request(
                            crate::auth::AuthError::BadToken.to_string(),
                            None,
                        ))
                    }
                    Err(e) => Err(ErrorData::internal_error(e.to_string(), None)),
                })
                .await?
            }
        }
    }

    /// Runs one tool: parses the arguments strictly into `A`, calls `f` off the async
    /// threads, writes the audit entry, and answers with the result or the refusal.
    async fn run<A, F>(
        &self,
        tool: &'static str,
        ctx: &RequestContext<RoleServer>,
        arguments: JsonObject,
        f: F,
    ) -> Result<CallToolResult, ErrorData>
    where
        A: DeserializeOwned + Send + 'static,
        F: FnOnce(&Services, &Caller, A) -> Result<Value, ToolError> + Send + 'static,
    {
        let caller = self.caller(ctx).await?;
        let svc = self.svc.clone();
        blocking(move || {
            let args = Value::Object(arguments);
            let result = serde_json::from_value::<A>(args.clone())
                .map_err(|e| ToolError::Arguments {
                    tool,
                    reason: e.to_string(),
                })
                .and_then(|parsed| f(&svc, &caller, parsed));
            let audited = append_audit(
                &svc,
                &caller,
                tool,
                &args,
                result.as_ref().err().map(ToString::to_string),
            );
            if let Err(e) = audited {
                tracing::error!(error = %e, tool, "cannot append to the audit log");
                return CallToolResult::error(vec![ContentBlock::text(format!(
                    "the audit log is unavailable ({e}); the answer is withheld{}",
                    if result.is_ok() && tool == orders::REQUEST_ORDER {
                        ", and the order was stored: list the host's orders before asking again"
                    } else {
                        ""
                    }
                ))]);
            }
            match result {
                Ok(value) => CallToolResult::structured(value),
                Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
            }
        })
        .await
    }
}

/// One audit entry for a call: `mcp.ACTION`, the target its arguments name, the
/// arguments, and the refusal's reason if refused.
fn append_audit(
    svc: &Services,
    caller: &Caller,
    action: &str,
    args: &Value,
    refusal: Option<String>,
) -> Result<i64, StoreError> {
    svc.store.append_audit(&AuditEntry {
        id: 0,
        at: Timestamp::now(),
        actor: caller.actor.clone(),
        peer: caller.peer.clone(),
        action: format!("mcp.{action}"),
        target: audit_target(args),
        outcome: if refusal.is_some() { "refused" } else { "ok" }.into(),
        detail: audit_detail(args, refusal.as_deref()),
    })
}

/// The input schema of a tool from its argument type (a bug here fails the unit tests).
fn schema<T: schemars::JsonSchema + 'static>() -> Arc<JsonObject> {
    rmcp::handler::server::common::schema_for_input::<T>()
        .unwrap_or_else(|e| panic!("input schema of {}: {e}", std::any::type_name::<T>()))
}

/// `mcp-server mcp --token-file F`: serves the tools on stdin/stdout until the client
/// closes them, as the operator whose token is in `token_file`.
pub fn serve_stdio(
    svc: Services,
    token_file: &std::path::Path,
    read_only: bool,
) -> crate::Result<()> {
    use rmcp::ServiceExt as _;
    let token = std::fs::read_to_string(token_file).map_err(crate::Error::io(token_file))?;
    let token = token.trim();
    let read_only = match svc.store.operator_by_token(&token_hash(token))? {
        // An auditor's role changes nothing, so its server lists nothing that would.
        Some(op) if !op.disabled => read_only || op.role == crate::auth::Role::Auditor,
        _ => {
            crate::audit::record_anonymous(
                &*svc.store,
                Some("mcp-stdio".into()),
                "mcp.authenticate",
                "-",
                "bad token",
            );
            return Err(crate::Error::Invalid(format!(
                "{}: the operator token is not valid (mcp-server users add prints one)",
                token_file.display()
            )));
        }
    };
    let tools = McpTools::for_token(svc, token, read_only);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mcp-stdio")
        .enable_all()
        .build()
        .map_err(|e| crate::Error::Invalid(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let running = tools
            .serve(rmcp::transport::stdio())
            .await
            .map_err(|e| crate::Error::Invalid(format!("MCP over stdio: {e}")))?;
        running
            .waiting()
            .await
            .map_err(|e| crate::Error::Invalid(format!("MCP over stdio: {e}")))?;
        Ok(())
    })
}

/// What the audit entry is about: the host or bundle named by the arguments.
fn audit_target(args: &Value) -> String {
    ["host", "bundle_id", "site", "uri"]
        .iter()
        .find_map(|k| args.get(k).and_then(Value::as_str))
        .map(|s| s.chars().take(200).collect())
        .unwrap_or_else(|| "-".into())
}

fn audit_detail(args: &Value, error: Option<&str>) -> String {
    let mut arguments = args.to_string();
    if arguments.len() > AUDIT_ARGS_MAX {
        let mut cut = AUDIT_ARGS_MAX;
        while !arguments.is_char_boundary(cut) {
            cut -= 1;
        }
        arguments.truncate(cut);
        arguments.push_str("...(cut)");
    }
    match error {
        None => format!("arguments {arguments}"),
        Some(e) => format!("arguments {arguments}; {e}"),
    }
}

/// Blocking store and archive work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ErrorData> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ErrorData::internal_error(format!("internal error: {e}"), None))
}

/// `SITE/HOST` split into its ids, or an argument error.
fn split_host(tool: &'static str, host: &str) -> Result<(String, String), ToolError> {
    match host.split_once('/') {
        Some((s, h)) if crate::valid_id(s) && crate::valid_id(h) => Ok((s.into(), h.into())),
        _ => Err(ToolError::Arguments {
            tool,
            reason: format!("host {host:?} is not SITE/HOST"),
        }),
    }
}

/// Who is asking and which tenants they reach, as every answer states it.
fn caller_json(caller: &Caller) -> Value {
    json!({ "actor": caller.actor, "role": caller.role, "scope": scope_json(&caller.tenants) })
}

fn scope_json(t: &Tenants) -> Value {
    match t {
        Tenants::All => json!({ "kind": "all" }),
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}

/// The tenant a host or bundle belongs to, named in every answer about it.
fn tenant_json(reseller_id: Option<&str>, site_id: &str) -> Value {
    json!({ "reseller_id": reseller_id, "site_id": site_id, "direct": reseller_id.is_none() })
}

impl ServerHandler for McpTools {
    fn get_info(&self) -> ServerConfig {
        let mode = if self.read_only {
            "This server is read-only: it lists and runs no tool that changes anything."
        } else {
            "request_order goes through the central guardrails (allowlist, cooldown, TTL); a disruptive runbook waits for a second operator, whom no tool can replace."
        };
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
            .with_server_info(Implementation::new("mcp-server", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "Tools of the MSP's compliance server: fleet status, hosts, their signed evidence and its verification. Every answer is limited to the tenants of your operator token and names them; every call is audited. {mode}"
            ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult {
            tools: self.router.list_all(),
            ..Default::default()
        })
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(resources::templates())
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let caller = self.caller(&context).await?;
        let svc = self.svc.clone();
        blocking(move || {
            let result = resources::read(&svc, &caller, &request.uri);
            let args = json!({ "uri": request.uri });
            let refusal = result.as_ref().err().map(ToString::to_string);
            if let Err(e) = append_audit(&svc, &caller, "read_resource", &args, refusal) {
                tracing::error!(error = %e, "cannot append to the audit log");
                return Err(ErrorData::internal_error(
                    format!("the audit log is unavailable ({e}); the answer is withheld"),
                    None,
                ));
            }
            match result {
                Ok(r) => Ok(r.into()),
                Err(e @ (ToolError::NotFound(_) | ToolError::Arguments { .. })) => {
                    Err(ErrorData::resource_not_found(e.to_string(), None))
                }
                Err(e) => Err(ErrorData::internal_error(e.to_string(), None)),
            }
        })
        .await?
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.router.get(name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !self.router.has_route(&request.name) {
            // Not registered (unknown, or mutating on a read-only server): refused and audited.
            let caller = self.caller(&context).await?;
            let reason = if self.read_only && Self::mutating_tools().has_route(&request.name) {
                format!(
                    "tool {} is not available: this server is read-only",
                    request.name
                )
            } else {
                format!("no tool named {:?}", request.name)
            };
            let svc = self.svc.clone();
            let (name, args) = (
                request.name.to_string(),
                Value::Object(request.arguments.clone().unwrap_or_default()),
            );
            let refusal = reason.clone();
            blocking(move || {
                let name: String = name.chars().take(64).collect();
                if let Err(e) = append_audit(&svc, &caller, &name, &args, Some(refusal)) {
                    tracing::error!(error = %e, "cannot append to the audit log");
                }
            })
            .await?;
            return Err(ErrorData::invalid_params(reason, None));
        }
        let router = self.router.clone();
        let tcc = ToolCallContext::new(self, request, context);
        router.call(tcc).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_detail_is_bounded_and_names_the_refusal() {
        let long = json!({ "host": "a/b", "params": { "x": "é".repeat(5000) } });
        let d = audit_detail(&long, Some("cooldown"));
        assert!(d.len() < AUDIT_ARGS_MAX + 100, "bounded: {}", d.len());
        assert!(d.contains("...(cut)") && d.ends_with("; cooldown"), "{d}");
        assert_eq!(audit_target(&long), "a/b", "the host is the target");
        assert_eq!(audit_target(&json!({})), "-", "no target");
    }

    /// Invariant: the annotations tell the truth: every tool of the read-only groups says
    /// read-only, every tool of the mutating groups (what a read-only server leaves out)
    /// says it changes things, and every schema refuses unknown arguments.
    #[test]
    fn annotations_say_which_tools_change_things() {
        let read = McpTools::read_only_tools().list_all();
        let write = McpTools::mutating_tools().list_all();
        assert_eq!(read.len(), 7, "seven read-only tools");
        for t in &read {
            let a = t.annotations.clone().expect("annotated");
            assert_eq!(
                (a.read_only_hint, a.destructive_hint),
                (Some(true), Some(false)),
                "{}",
                t.name
            );
        }
        let mut names: Vec<&str> = write.iter().map(|t| t.name.as_ref()).collect();
        names.sort();
        assert_eq!(
            names,
            ["propose_remediation", orders::REQUEST_ORDER],
            "the mutating tools"
        );
        for t in &write {
            let a = t.annotations.clone().expect("annotated");
            assert_eq!(a.read_only_hint, Some(false), "{}", t.name);
            // Only an order reaches a box; a proposal changes the incident's plan.
            assert_eq!(
                a.destructive_hint,
                Some(t.name == orders::REQUEST_ORDER),
                "{}",
                t.name
            );
        }
        for t in read.iter().chain(&write) {
            assert_eq!(
                t.input_schema.get("additionalProperties"),
                Some(&json!(false)),
                "{} refuses unknown arguments",
                t.name
            );
            assert!(
                t.description.as_deref().is_some_and(|d| d.len() > 40),
                "{} is described",
                t.name
            );
        }
    }

    #[test]
    fn hosts_must_be_site_slash_host() {
        assert!(split_host("t", "clinic-1/frontdesk").is_ok());
        for bad in ["clinic-1", "/x", "a/", "a/b/c", "a b/c", ""] {
            assert!(split_host("t", bad).is_err(), "{bad:?} refused");
        }
    }
}
