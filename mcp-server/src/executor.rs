//! The executor: turns plans into orders per site mode — `auto` (non-disruptive plans
//! become orders at once), `approve` (plans wait for an operator) or `off` — always through
//! `orders::create`, so every order meets the central guardrails (allowlist, cooldown,
//! second-operator approval for disruptive runbooks, TTL). Also the background task that
//! plans new incidents and runs the sweep.

use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

use crate::auth::Caller;
use crate::config::ExecutorMode;
use crate::incidents::{IncidentError, system_caller};
use crate::orders::{OrderDraft, OrderError};
use crate::planner::Plan;
use crate::services::Services;
use crate::store::incidents::{IncidentEvent, IncidentRecord, IncidentState, PlanState};
use crate::store::{OrderRecord, OrderState, StoreError};

/// A claim older than this is taken again (its worker died).
const STALE_CLAIM: jiff::SignedDuration = jiff::SignedDuration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "site {0}'s executor mode is off: no plan becomes an order (`mcp-server sites mode --site {0} --mode approve`)"
    )]
    Off(String),
    #[error("the plan orders nothing: {0}")]
    NoRunbook(String),
    #[error(transparent)]
    Incident(#[from] IncidentError),
    #[error(transparent)]
    Order(#[from] OrderError),
}

impl ExecError {
    pub fn status(&self) -> u16 {
        match self {
            ExecError::Off(_) => 409,
            ExecError::NoRunbook(_) => 422,
            ExecError::Incident(e) => e.status(),
            ExecError::Order(e) => e.status(),
        }
    }
}

impl From<StoreError> for ExecError {
    fn from(e: StoreError) -> Self {
        ExecError::Incident(e.into())
    }
}

/// A site's executor mode: its own, else the configured default.
pub fn site_mode(
    svc: &Services,
    caller: &Caller,
    site_id: &str,
) -> Result<ExecutorMode, StoreError> {
    Ok(svc
        .store
        .site_executor_mode(caller, site_id)?
        .as_deref()
        .and_then(ExecutorMode::parse)
        .unwrap_or(svc.config.remediation.default_site_mode))
}

/// Sets (or with None, clears back to the default) a site's executor mode; audited.
pub fn set_site_mode(
    svc: &Services,
    caller: &Caller,
    site_id: &str,
    mode: Option<ExecutorMode>,
) -> Result<ExecutorMode, StoreError> {
    let result = svc
        .store
        .set_site_executor_mode(caller, site_id, mode.map(ExecutorMode::as_str))
        .and_then(|()| site_mode(svc, caller, site_id));
    let refused = crate::audit::refusal(&result);
    crate::audit::record(
        &*svc.store,
        caller,
        &format!(
            "site.executor_mode:{}",
            mode.map_or("default", ExecutorMode::as_str)
        ),
        site_id,
        refused.as_deref(),
    );
    result
}

/// What executing a plan made.
#[derive(Clone, Debug, Serialize)]
pub struct Execution {
    pub plan: Plan,
    /// Pending (signed) or awaiting a second operator's approval.
    pub order: OrderRecord,
}

/// An operator turns an open incident's plan (the last one proposed, else a new one) into
/// an order through the central guardrails. Audited, and on the incident's timeline.
pub fn execute(svc: &Services, caller: &Caller, incident_id: &str) -> Result<Execution, ExecError> {
    let result = execute_inner(svc, caller, incident_id);
    crate::incidents::audit(svc, caller, "incident.execute", incident_id, &result);
    result
}

fn execute_inner(
    svc: &Services,
    caller: &Caller,
    incident_id: &str,
) -> Result<Execution, ExecError> {
    caller
        .require_write("execute plans")
        .map_err(IncidentError::from)?;
    let incident = svc
        .store
        .incident(caller, incident_id)?
        .ok_or_else(|| IncidentError::NotFound(incident_id.into()))?;
    if incident.state != IncidentState::Open {
        return Err(IncidentError::Invalid(format!(
            "incident {incident_id} is {}; only open incidents are remediated",
            incident.state.as_str()
        ))
        .into());
    }
    if site_mode(svc, caller, &incident.site_id)? == ExecutorMode::Off {
        return Err(ExecError::Off(incident.site_id.clone()));
    }
    let stored: Option<Plan> = incident
        .plan
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .filter(|p: &Plan| p.incident_id == incident.incident_id);
    let plan = match stored {
        Some(p) => p,
        None => crate::planner::propose(svc, caller, incident_id)?,
    };
    order_from(svc, caller, &incident, plan)
}

/// The order of a plan, via `orders::create` (which checks the guardrails and audits);
/// the outcome goes on the incident's timeline and state.
fn order_from(
    svc: &Services,
    caller: &Caller,
    incident: &IncidentRecord,
    plan: Plan,
) -> Result<Execution, ExecError> {
    let Some(runbook) = plan.runbook.clone() else {
        return Err(ExecError::NoRunbook(plan.rationale));
    };
    let draft = OrderDraft {
        site_id: incident.site_id.clone(),
        host_id: incident.host_id.clone(),
        runbook_id: runbook.clone(),
        params: plan.params.clone(),
        ttl: None,
    };
    let event = |kind: &str, order_id: Option<String>, detail: String| IncidentEvent {
        id: 0,
        incident_id: incident.incident_id.clone(),
        at: Timestamp::now(),
        kind: kind.into(),
        bundle_id: None,
        order_id,
        actor: caller.actor.clone(),
        detail,
    };
    let value = serde_json::to_value(&plan).ok();
    match crate::orders::create(svc, caller, &draft) {
        Ok(order) => {
            svc.store.set_incident_plan(
                caller,
                &incident.incident_id,
                PlanState::Ordered,
                value.as_ref(),
                Some(&order.order_id),
            )?;
            let detail = match order.state {
                OrderState::AwaitingApproval => format!(
                    "order {} ({runbook}) waits for a second operator's approval",
                    order.order_id
                ),
                _ => format!("order {} ({runbook}) signed and pending", order.order_id),
            };
            svc.store.add_incident_event(
                caller,
                &incident.incident_id,
                &event("order", Some(order.order_id.clone()), detail),
            )?;
            Ok(Execution { plan, order })
        }
        Err(e) => {
            svc.store.set_incident_plan(
                caller,
                &incident.incident_id,
                PlanState::Refused,
                value.as_ref(),
                None,
            )?;
            svc.store.add_incident_event(
                caller,
                &incident.incident_id,
                &event("order_refused", None, format!("{runbook}: {e}")),
            )?;
            Err(e.into())
        }
    }
}

/// What one executor pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    pub planned: u64,
    pub ordered: u64,
    pub awaiting_operator: u64,
    pub refused: u64,
    pub off: u64,
}

/// One pass of the background executor: takes incidents that want a plan, plans each and
/// acts by its site's mode. Each incident is taken by one server process only.
pub fn run_pending(svc: &Services) -> Result<PassReport, StoreError> {
    let sys = system_caller("executor");
    let now = Timestamp::now();
    let stale = now.checked_sub(STALE_CLAIM).unwrap_or(Timestamp::MIN);
    let mut report = PassReport::default();
    for incident in svc
        .store
        .claim_incidents(&sys, svc.config.remediation.batch, now, stale)?
    {
        match handle(svc, &sys, &incident) {
            Ok(state) => {
                report.planned += 1;
                match state {
                    PlanState::Ordered => report.ordered += 1,
                    PlanState::Refused => report.refused += 1,
                    PlanState::Off => report.off += 1,
                    _ => report.awaiting_operator += 1,
                }
            }
            // The incident was resolved meanwhile: nothing to do.
            Err(ExecError::Incident(IncidentError::Store(StoreError::Exists(_)))) => {}
            Err(ExecError::Incident(IncidentError::Store(e))) => return Err(e),
            Err(e) => {
                tracing::warn!(incident = %incident.incident_id, error = %e, "executor could not act on the incident");
            }
        }
    }
    Ok(report)
}

fn handle(svc: &Services, sys: &Caller, incident: &IncidentRecord) -> Result<PlanState, ExecError> {
    let note = |detail: String| {
        svc.store.add_incident_event(
            sys,
            &incident.incident_id,
            &IncidentEvent {
                id: 0,
                incident_id: incident.incident_id.clone(),
                at: Timestamp::now(),
                kind: "executor".into(),
                bundle_id: None,
                order_id: None,
                actor: sys.actor.clone(),
                detail,
            },
        )
    };
    let mode = site_mode(svc, sys, &incident.site_id)?;
    if mode == ExecutorMode::Off {
        svc.store
            .set_incident_plan(sys, &incident.incident_id, PlanState::Off, None, None)?;
        note(format!(
            "site {}'s executor mode is off: not planned",
            incident.site_id
        ))?;
        return Ok(PlanState::Off);
    }
    let site = svc
        .store
        .site(sys, &incident.site_id)?
        .ok_or_else(|| StoreError::NotFound(format!("site {}", incident.site_id)))?;
    let plan = crate::planner::plan_for(svc, incident, &site);
    let waits = match (mode, &plan.runbook) {
        (ExecutorMode::Approve, _) => Some(format!(
            "site {}'s executor mode is approve: the plan waits for an operator",
            incident.site_id
        )),
        (_, None) => Some("the plan orders nothing: it waits for an operator".into()),
        (_, Some(r)) if plan.disruptive => Some(format!(
            "{r} is disruptive: the plan waits for an operator, and its order for a second one"
        )),
        _ => None,
    };
    crate::planner::record(
        svc,
        sys,
        incident,
        &plan,
        Some(if waits.is_some() {
            PlanState::AwaitingOperator
        } else {
            PlanState::Claimed
        }),
    )
    .map_err(ExecError::Incident)?;
    if let Some(why) = waits {
        note(why)?;
        return Ok(PlanState::AwaitingOperator);
    }
    match order_from(svc, sys, incident, plan) {
        Ok(_) => Ok(PlanState::Ordered),
        Err(ExecError::Order(_)) => Ok(PlanState::Refused),
        Err(e) => Err(e),
    }
}

/// The background task: an executor pass whenever an incident is opened (or every
/// `worker_interval_ms`), and the sweep every `sweep_interval_sec`, until shutdown.
pub async fn background(svc: Services, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let worker = Duration::from_millis(svc.config.remediation.worker_interval_ms);
    let sweep_every = Duration::from_secs(svc.config.remediation.sweep_interval_sec);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = svc.remediation_wake.notified() => {}
            _ = tokio::time::sleep(worker) => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let s = svc.clone();
        let sweep_due = last_sweep.elapsed() >= sweep_every;
        if sweep_due {
            last_sweep = tokio::time::Instant::now();
        }
        let done = tokio::task::spawn_blocking(move || {
            // Keep passing while there is work: a burst of incidents is drained at once.
            loop {
                match run_pending(&s) {
                    Ok(r) if r.planned == 0 => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "executor pass failed");
                        break;
                    }
                }
            }
            if sweep_due && let Err(e) = crate::incidents::sweep(&s, Timestamp::now()) {
                tracing::error!(error = %e, "incident sweep failed");
            }
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "executor task panicked");
        }
    }
}
