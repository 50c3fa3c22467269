//! `mcp-server incidents ...` and `mcp-server sites mode`: the incident commands, acting on
//! the server's own database as the local admin, each with `--json`.

use clap::Subcommand;
use jiff::Timestamp;
use serde_json::json;

use super::{print_json, split_host};
use crate::auth::Caller;
use crate::config::ExecutorMode;
use crate::services::Services;
use crate::store::incidents::{IncidentFilter, IncidentState};
use crate::{Error, Result};

#[derive(Debug, Subcommand)]
pub enum IncidentsCommand {
    /// Incidents, newest first.
    List {
        /// open, resolved or closed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        site: Option<String>,
        /// SITE/HOST
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One incident with its timeline and its order.
    Show {
        incident_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Close an open incident, saying why.
    Close {
        incident_id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Propose a plan (runbook, params, rationale) for an open incident.
    Plan {
        incident_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Turn the incident's plan into an order, through the central guardrails.
    Execute {
        incident_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the sweep once: overdue hosts, orders without a result past their TTL.
    Sweep {
        #[arg(long)]
        json: bool,
    },
}

fn mode_arg(mode: &str) -> Result<Option<ExecutorMode>> {
    if mode == "default" {
        return Ok(None);
    }
    ExecutorMode::parse(mode).map(Some).ok_or_else(|| {
        Error::Invalid(format!(
            "--mode {mode:?}: one of auto, approve, off, default"
        ))
    })
}

/// `sites mode`: shows, or with `mode` sets, a site's executor mode.
pub fn site_mode(
    svc: &Services,
    caller: &Caller,
    site: &str,
    mode: Option<&str>,
    json: bool,
) -> Result<()> {
    let now = match mode {
        Some(m) => crate::executor::set_site_mode(svc, caller, site, mode_arg(m)?)?,
        None => crate::executor::site_mode(svc, caller, site)?,
    };
    if json {
        print_json(&json!({ "site": site, "mode": now }));
    } else {
        println!("{site}: {}", now.as_str());
    }
    Ok(())
}

fn incident_err(e: crate::incidents::IncidentError) -> Error {
    Error::Invalid(e.to_string())
}

pub fn run(svc: &Services, caller: &Caller, command: IncidentsCommand) -> Result<()> {
    match command {
        IncidentsCommand::List {
            state,
            site,
            host,
            limit,
            json,
        } => {
            let state = state
                .map(|s| {
                    IncidentState::parse(&s).ok_or_else(|| {
                        Error::Invalid(format!("--state {s:?}: one of open, resolved, closed"))
                    })
                })
                .transpose()?;
            let (mut site_id, mut host_id) = (site, None);
            if let Some(h) = host {
                let (s, h) = split_host(&h)?;
                if site_id.as_ref().is_some_and(|x| *x != s) {
                    return Err(Error::Invalid(
                        "--site and --host name different sites".into(),
                    ));
                }
                site_id = Some(s);
                host_id = Some(h);
            }
            let list = crate::incidents::list(
                svc,
                caller,
                &IncidentFilter {
                    state,
                    site_id,
                    host_id,
                    plan_state: None,
                    limit: Some(limit),
                },
            )
            .map_err(incident_err)?;
            if json {
                print_json(&json!({ "incidents": list }));
            } else {
                for i in list {
                    println!(
                        "{}\t{}/{}\t{}\t{}\t{}\t{}\t{}",
                        i.incident_id,
                        i.site_id,
                        i.host_id,
                        i.cause,
                        i.severity,
                        i.state.as_str(),
                        i.plan_state.as_str(),
                        i.summary
                    );
                }
            }
        }
        IncidentsCommand::Show { incident_id, json } => {
            let v = crate::incidents::show(svc, caller, &incident_id).map_err(incident_err)?;
            if json {
                print_json(&json!(v));
            } else {
                let i = &v.incident;
                println!(
                    "{} {}/{} {} ({}) {} since {}; plan {}",
                    i.incident_id,
                    i.site_id,
                    i.host_id,
                    i.cause,
                    i.severity,
                    i.state.as_str(),
                    i.opened_at,
                    i.plan_state.as_str()
                );
                println!("  {}", i.summary);
                if let Some(secs) = i.remediation_sec {
                    println!(
                        "  remediated in {secs} s: {}",
                        i.resolution.as_deref().unwrap_or("-")
                    );
                }
                for e in &v.timeline {
                    println!("  {}\t{}\t{}\t{}", e.at, e.kind, e.actor, e.detail);
                }
            }
        }
        IncidentsCommand::Close {
            incident_id,
            reason,
            json,
        } => {
            let i = crate::incidents::close(svc, caller, &incident_id, &reason)
                .map_err(incident_err)?;
            if json {
                print_json(&json!(i));
            } else {
                println!(
                    "closed {} after {} s",
                    i.incident_id,
                    i.remediation_sec.unwrap_or(0)
                );
            }
        }
        IncidentsCommand::Plan { incident_id, json } => {
            let p = crate::planner::propose(svc, caller, &incident_id).map_err(incident_err)?;
            if json {
                print_json(&json!(p));
            } else {
                println!(
                    "{}\t{}\t{}",
                    p.runbook.as_deref().unwrap_or("(no order)"),
                    p.params,
                    p.rationale
                );
                if let Some(f) = &p.fallback_reason {
                    println!("  LLM answer not used: {f}");
                }
            }
        }
        IncidentsCommand::Execute { incident_id, json } => {
            let x = crate::executor::execute(svc, caller, &incident_id)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            if json {
                print_json(&json!(x));
            } else {
                println!("{}\t{}", x.order.order_id, x.order.state.as_str());
            }
        }
        IncidentsCommand::Sweep { json } => {
            let r = crate::incidents::sweep(svc, Timestamp::now())?;
            if json {
                print_json(&json!(r));
            } else {
                println!(
                    "{} overdue host(s) opened, {} order(s) without a result, {} repaired",
                    r.overdue_opened, r.orders_without_result, r.repaired
                );
            }
        }
    }
    Ok(())
}
