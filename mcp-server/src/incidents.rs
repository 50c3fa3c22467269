//! Incidents: opened from what the boxes report (a bundle failed, alerted, was deferred or
//! rejected; a chain gap; a bad signature or chain break at intake; a host overdue), one
//! open per host and cause, with a timeline, and closed by compliant evidence or by an
//! operator with a reason. The library API every interface calls, scoped by the `Caller`.

use compliance_agent::evidence::{Bundle, Check};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::{Caller, Role, Tenants};
use crate::intake::IntakeError;
use crate::services::Services;
use crate::store::incidents::{
    IncidentEvent, IncidentFilter, IncidentRecord, IncidentState, Observation, Observed, PlanState,
    Resolution, SEVERITIES,
};
use crate::store::{BundleRecord, Host, OrderRecord, OrderState, StoreError};

/// Causes that are not a check.
pub const CHAIN_GAP: &str = "chain_gap";
pub const CHAIN_BREAK: &str = "chain_break";
pub const BAD_SIGNATURE: &str = "bad_signature";
pub const OVERDUE: &str = "overdue";

/// Outcomes that open (or update) the incident of their check.
pub const OPENING_OUTCOMES: &[&str] = &[
    "failed", "alert", "deferred", "rejected", "reverted", "expired",
];

/// Longest summary or reason kept from a box or an operator.
const MAX_TEXT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("no incident {0} among the caller's tenants")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for IncidentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                IncidentError::NotFound(what.strip_prefix("incident ").unwrap_or(&what).to_owned())
            }
            other => IncidentError::Store(other),
        }
    }
}

impl IncidentError {
    pub fn status(&self) -> u16 {
        match self {
            IncidentError::NotFound(_) => 404,
            IncidentError::Invalid(_) => 422,
            IncidentError::Auth(_) => 403,
            IncidentError::Store(StoreError::Forbidden(_)) => 403,
            IncidentError::Store(StoreError::Exists(_)) => 409,
            IncidentError::Store(StoreError::Unavailable(_)) => 503,
            IncidentError::Store(_) => 500,
        }
    }
}

/// The server acting on its own (the sweep, the executor), named as such in the audit log.
pub fn system_caller(name: &str) -> Caller {
    Caller {
        actor: format!("system:{name}"),
        role: Role::Admin,
        tenants: Tenants::All,
        peer: None,
    }
}

/// The cause of a check's incidents.
pub fn check_cause(check: &str) -> String {
    format!("check:{check}")
}

/// One incident with its timeline and the order made for it.
#[derive(Clone, Debug, Serialize)]
pub struct IncidentView {
    pub incident: IncidentRecord,
    pub timeline: Vec<IncidentEvent>,
    pub order: Option<OrderRecord>,
}

/// The caller's incidents, newest first.
pub fn list(
    svc: &Services,
    caller: &Caller,
    filter: &IncidentFilter,
) -> Result<Vec<IncidentRecord>, IncidentError> {
    Ok(svc.store.incidents(caller, filter)?)
}

/// One incident, its timeline and its order.
pub fn show(
    svc: &Services,
    caller: &Caller,
    incident_id: &str,
) -> Result<IncidentView, IncidentError> {
    let incident = svc
        .store
        .incident(caller, incident_id)?
        .ok_or_else(|| IncidentError::NotFound(incident_id.into()))?;
    let timeline = svc.store.incident_events(caller, incident_id)?;
    let order = match &incident.order_id {
        Some(id) => svc.store.order(caller, id)?,
        None => None,
    };
    Ok(IncidentView {
        incident,
        timeline,
        order,
    })
}

/// An operator closes an open incident, with a reason; audited either way.
pub fn close(
    svc: &Services,
    caller: &Caller,
    incident_id: &str,
    reason: &str,
) -> Result<IncidentRecord, IncidentError> {
    let result = (|| {
        caller.require_write("close incidents")?;
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(IncidentError::Invalid(
                "closing an incident needs a reason (what was done, or why nothing needs doing)"
                    .into(),
            ));
        }
        if reason.chars().count() > MAX_TEXT {
            return Err(IncidentError::Invalid(format!(
                "the reason is longer than {MAX_TEXT} characters"
            )));
        }
        Ok(svc.store.close_incident(
            caller,
            incident_id,
            &Resolution {
                at: Timestamp::now(),
                by: caller.actor.clone(),
                reason: reason.to_owned(),
                bundle_id: None,
            },
        )?)
    })();
    audit(svc, caller, "incident.close", incident_id, &result);
    result
}

/// Appends to the audit log, naming the incident's host in the target when known.
pub(crate) fn audit<T>(
    svc: &Services,
    caller: &Caller,
    action: &str,
    incident_id: &str,
    result: &Result<T, impl std::fmt::Display>,
) {
    let target = svc
        .store
        .incident(&system_caller("audit"), incident_id)
        .ok()
        .flatten()
        .map_or_else(
            || incident_id.to_owned(),
            |i| format!("{}/{}/{}", i.site_id, i.host_id, incident_id),
        );
    let refused = crate::audit::refusal(result);
    crate::audit::record(&*svc.store, caller, action, &target, refused.as_deref());
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_TEXT {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX_TEXT - 1).collect();
        t.push('…');
        t
    }
}

/// A check's severity when its bundle does not say.
fn default_severity(check: &str) -> &'static str {
    match check {
        "encryption" | "evidence_integrity" => "critical",
        "firewall" | "backup" | "patching" | "av_health" => "high",
        _ => "medium",
    }
}

fn check_controls(check: &str) -> Vec<String> {
    Check::parse(check)
        .map(|c| c.hipaa_controls().iter().map(|s| (*s).to_owned()).collect())
        .unwrap_or_default()
}

/// The fix the box recommended in a bundle, if it names a known runbook with valid params:
/// a scan's first recommendation, a deferred fix's runbook, or the runbook a fix ran.
pub fn recommended_fix(bundle: &Bundle) -> Option<Value> {
    let valid = |runbook: &str, params: &Value| {
        compliance_agent::runbook_ids::RUNBOOK_IDS.contains(&runbook)
            && compliance_agent::orders::check_params(runbook, params).is_ok()
    };
    let from_scan = bundle
        .pre_state
        .get("recommended")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|r| {
            let runbook = r.get("runbook")?.as_str()?;
            let params = r.get("params").cloned().unwrap_or_else(|| json!({}));
            valid(runbook, &params).then(|| json!({ "runbook": runbook, "params": params }))
        });
    if from_scan.is_some() {
        return from_scan;
    }
    let runbook = bundle
        .post_state
        .get("runbook")
        .and_then(Value::as_str)
        .or(bundle.runbook_id.as_deref())?;
    let params = bundle
        .post_state
        .get("params")
        .cloned()
        .unwrap_or_else(|| json!({}));
    valid(runbook, &params).then(|| json!({ "runbook": runbook, "params": params }))
}

fn summary_of(bundle: &Bundle) -> String {
    let text = bundle
        .error
        .clone()
        .or_else(|| {
            bundle
                .pre_state
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{} {}", bundle.check, bundle.outcome));
    truncate(&text)
}

fn observe(svc: &Services, caller: &Caller, obs: &Observation) -> Result<Observed, StoreError> {
    let observed = svc
        .store
        .observe(caller, obs, &uuid::Uuid::new_v4().to_string())?;
    if let Observed::Opened(id) = &observed {
        tracing::info!(incident = %id, site = %obs.site_id, host = %obs.host_id, cause = %obs.cause, "incident opened");
        svc.remediation_wake.notify_one();
    }
    Ok(observed)
}

/// Updates incidents after intake recorded `record` (new or a duplicate). Idempotent:
/// a bundle already on a timeline is not applied again, so a crash between recording the
/// bundle and this is repaired when the box delivers it again (it got no acknowledgement)
/// or by the sweep.
pub fn after_bundle(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    bundle: &Bundle,
    record: &BundleRecord,
) -> Result<(), StoreError> {
    let (site, host_id) = (host.site_id.as_str(), host.host_id.as_str());
    let at = record.received_at;
    svc.store.resolve_incident(
        caller,
        site,
        host_id,
        OVERDUE,
        &Resolution {
            at,
            by: caller.actor.clone(),
            reason: format!(
                "the host delivered evidence again (bundle {})",
                record.bundle_id
            ),
            bundle_id: Some(record.bundle_id.clone()),
        },
    )?;
    let mut answered_incident = false;
    if let Some(order_id) = &record.order_id {
        answered_incident = order_result(svc, caller, bundle, record, order_id)?;
    }
    let check = record.check.as_str();
    let cause = check_cause(check);
    if record.outcome == "success" {
        svc.store.resolve_incident(
            caller,
            site,
            host_id,
            &cause,
            &Resolution {
                at,
                by: caller.actor.clone(),
                reason: format!("bundle {} shows {check} compliant", record.bundle_id),
                bundle_id: Some(record.bundle_id.clone()),
            },
        )?;
    } else if OPENING_OUTCOMES.contains(&record.outcome.as_str()) && !answered_incident {
        // A late copy of an older failure does not reopen what newer evidence shows fixed.
        let newer_success = svc
            .store
            .latest_results(caller, site, host_id)?
            .iter()
            .any(|r| {
                r.check == check && r.outcome == "success" && r.timestamp_end > record.timestamp_end
            });
        if !newer_success {
            let severity = bundle
                .pre_state
                .get("severity")
                .and_then(Value::as_str)
                .filter(|s| SEVERITIES.contains(s))
                .unwrap_or_else(|| default_severity(check));
            observe(
                svc,
                caller,
                &Observation {
                    site_id: site.into(),
                    host_id: host_id.into(),
                    cause,
                    check: Some(check.into()),
                    severity: severity.into(),
                    hipaa_controls: if bundle.hipaa_controls.is_empty() {
                        check_controls(check)
                    } else {
                        bundle.hipaa_controls.clone()
                    },
                    summary: summary_of(bundle),
                    recommended: recommended_fix(bundle),
                    bundle_id: Some(record.bundle_id.clone()),
                    at,
                    kind: "evidence".into(),
                    detail: format!(
                        "bundle {} (seq {}): {} {}",
                        record.bundle_id, record.seq, check, record.outcome
                    ),
                },
            )?;
        }
    }
    chain_shape(svc, caller, host, record)
}

/// An order's result bundle: on the timeline of the incident the order was made for.
/// Returns whether there was such an incident.
fn order_result(
    svc: &Services,
    caller: &Caller,
    bundle: &Bundle,
    record: &BundleRecord,
    order_id: &str,
) -> Result<bool, StoreError> {
    let Some(incident) = svc.store.incident_for_order(caller, order_id)? else {
        return Ok(false);
    };
    if incident.state != IncidentState::Open {
        return Ok(true);
    }
    let timeline = svc.store.incident_events(caller, &incident.incident_id)?;
    if timeline
        .iter()
        .any(|e| e.bundle_id.as_deref() == Some(record.bundle_id.as_str()))
    {
        return Ok(true);
    }
    let detail = match &bundle.error {
        Some(e) => format!("order {order_id}: {} ({})", record.outcome, truncate(e)),
        None => format!("order {order_id}: {}", record.outcome),
    };
    svc.store.add_incident_event(
        caller,
        &incident.incident_id,
        &IncidentEvent {
            id: 0,
            incident_id: incident.incident_id.clone(),
            at: record.received_at,
            kind: "order_result".into(),
            bundle_id: Some(record.bundle_id.clone()),
            order_id: Some(order_id.into()),
            actor: caller.actor.clone(),
            detail,
        },
    )?;
    if record.outcome != "success" {
        // The incident stays open with the failure on its timeline; an operator decides.
        svc.store.set_incident_plan(
            caller,
            &incident.incident_id,
            PlanState::Failed,
            None,
            None,
        )?;
    }
    Ok(true)
}

/// A gap before this bundle opens the host's chain-gap incident; a late bundle that
/// closes the last gap resolves it.
fn chain_shape(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    record: &BundleRecord,
) -> Result<(), StoreError> {
    let (site, host_id) = (host.site_id.as_str(), host.host_id.as_str());
    let n = svc.store.neighbours(caller, site, host_id, record.seq)?;
    if n.previous.is_none()
        && record.seq > 1
        && svc
            .store
            .min_seq(caller, site, host_id)?
            .is_some_and(|min| min < record.seq)
    {
        observe(
            svc,
            caller,
            &Observation {
                site_id: site.into(),
                host_id: host_id.into(),
                cause: CHAIN_GAP.into(),
                check: None,
                severity: "high".into(),
                hipaa_controls: vec!["164.312(c)(1)".into(), "164.312(b)".into()],
                summary: format!(
                    "seq {} arrived but seq {} is missing from the server's copy of the chain",
                    record.seq,
                    record.seq - 1
                ),
                recommended: None,
                bundle_id: Some(record.bundle_id.clone()),
                at: record.received_at,
                kind: "evidence".into(),
                detail: format!(
                    "bundle {} (seq {}) after a gap",
                    record.bundle_id, record.seq
                ),
            },
        )?;
    } else if n.next.is_some() {
        // A late bundle: if it filled the last hole, the chain is whole again.
        let seqs = svc.store.seqs(caller, site, host_id)?;
        if crate::fleet::chain_shape(&seqs).1.is_empty() {
            svc.store.resolve_incident(
                caller,
                site,
                host_id,
                CHAIN_GAP,
                &Resolution {
                    at: record.received_at,
                    by: caller.actor.clone(),
                    reason: format!(
                        "bundle {} (seq {}) filled the last gap",
                        record.bundle_id, record.seq
                    ),
                    bundle_id: Some(record.bundle_id.clone()),
                },
            )?;
        }
    }
    Ok(())
}

/// A refused upload that speaks of tampering (a bad signature, a broken chain) opens
/// the host's incident of that cause. Failures to record are logged, never hidden.
pub fn after_refusal(svc: &Services, caller: &Caller, host: &Host, error: &IntakeError) {
    let (cause, severity, controls) = match error {
        IntakeError::BadSignature(_) => (
            BAD_SIGNATURE,
            "critical",
            vec!["164.312(c)(1)".to_owned(), "164.312(d)".to_owned()],
        ),
        IntakeError::Chain(_) | IntakeError::Conflict(_) => (
            CHAIN_BREAK,
            "critical",
            vec!["164.312(c)(1)".to_owned(), "164.312(b)".to_owned()],
        ),
        _ => return,
    };
    let obs = Observation {
        site_id: host.site_id.clone(),
        host_id: host.host_id.clone(),
        cause: cause.into(),
        check: None,
        severity: severity.into(),
        hipaa_controls: controls,
        summary: truncate(&error.to_string()),
        recommended: None,
        bundle_id: None,
        at: Timestamp::now(),
        kind: "refused_upload".into(),
        detail: truncate(&error.to_string()),
    };
    if let Err(e) = observe(svc, caller, &obs) {
        tracing::error!(error = %e, site = %host.site_id, host = %host.host_id, cause, "cannot record the incident of a refused upload");
    }
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub overdue_opened: u64,
    pub orders_without_result: u64,
    pub repaired: u64,
}

/// The periodic sweep: overdue hosts, orders whose result never came within their TTL,
/// and the latest result of each check applied again (a no-op unless an update was lost).
pub fn sweep(svc: &Services, now: Timestamp) -> Result<SweepReport, StoreError> {
    let sys = system_caller("sweep");
    let mut report = SweepReport::default();
    let open = svc.store.incidents(
        &sys,
        &IncidentFilter {
            state: Some(IncidentState::Open),
            limit: Some(u32::MAX),
            ..IncidentFilter::default()
        },
    )?;
    let has_open = |site: &str, host: &str, cause: &str| {
        open.iter()
            .any(|i| i.site_id == site && i.host_id == host && i.cause == cause)
    };
    for host in svc.store.hosts(&sys)? {
        if host.revoked_at.is_some() {
            continue;
        }
        let reference = host.last_seen.unwrap_or(host.enrolled_at);
        let limit = SignedDuration::from_secs(2 * host.scan_interval_sec as i64);
        if now.duration_since(reference) > limit && !has_open(&host.site_id, &host.host_id, OVERDUE)
        {
            let observed = observe(
                svc,
                &sys,
                &Observation {
                    site_id: host.site_id.clone(),
                    host_id: host.host_id.clone(),
                    cause: OVERDUE.into(),
                    check: None,
                    severity: "high".into(),
                    hipaa_controls: vec!["164.308(a)(1)(ii)(D)".into(), "164.312(b)".into()],
                    summary: format!(
                        "no evidence since {reference} (more than twice the {} s scan interval)",
                        host.scan_interval_sec
                    ),
                    recommended: None,
                    bundle_id: None,
                    at: now,
                    kind: "overdue".into(),
                    detail: format!(
                        "last seen {}",
                        host.last_seen.map_or("never".into(), |t| t.to_string())
                    ),
                },
            )?;
            if matches!(observed, Observed::Opened(_)) {
                report.overdue_opened += 1;
            }
        }
        report.repaired += repair(svc, &sys, &host, &open)?;
    }
    for inc in open.iter().filter(|i| i.plan_state == PlanState::Ordered) {
        let Some(order_id) = &inc.order_id else {
            continue;
        };
        let Some(order) = svc.store.order(&sys, order_id)? else {
            continue;
        };
        let deadline = order
            .created_at
            .checked_add(SignedDuration::from_secs(order.ttl as i64))
            .unwrap_or(Timestamp::MAX);
        if order.state == OrderState::Pending && now > deadline {
            svc.store.add_incident_event(
                &sys,
                &inc.incident_id,
                &IncidentEvent {
                    id: 0,
                    incident_id: inc.incident_id.clone(),
                    at: now,
                    kind: "order_expired".into(),
                    bundle_id: None,
                    order_id: Some(order_id.clone()),
                    actor: sys.actor.clone(),
                    detail: format!(
                        "order {order_id} ({}) got no result within its TTL of {} s (deadline {deadline}); the box may be offline or may have refused to run it",
                        order.runbook_id, order.ttl
                    ),
                },
            )?;
            svc.store
                .set_incident_plan(&sys, &inc.incident_id, PlanState::Failed, None, None)?;
            report.orders_without_result += 1;
        }
    }
    Ok(report)
}

/// The latest result of each check against the open incidents: a failing one not on any
/// timeline opens its incident, a compliant one resolves an incident opened before it.
fn repair(
    svc: &Services,
    sys: &Caller,
    host: &Host,
    open: &[IncidentRecord],
) -> Result<u64, StoreError> {
    let mut repaired = 0;
    for latest in svc
        .store
        .latest_results(sys, &host.site_id, &host.host_id)?
    {
        let cause = check_cause(&latest.check);
        let incident = open
            .iter()
            .find(|i| i.site_id == host.site_id && i.host_id == host.host_id && i.cause == cause);
        if latest.outcome == "success" {
            if let Some(i) = incident
                && i.opened_at < latest.timestamp_end
                && svc
                    .store
                    .resolve_incident(
                        sys,
                        &host.site_id,
                        &host.host_id,
                        &cause,
                        &Resolution {
                            at: Timestamp::now(),
                            by: sys.actor.clone(),
                            reason: format!(
                                "bundle {} shows {} compliant",
                                latest.bundle_id, latest.check
                            ),
                            bundle_id: Some(latest.bundle_id.clone()),
                        },
                    )?
                    .is_some()
            {
                repaired += 1;
            }
        } else if incident.is_none()
            && latest.check != "mcp_order"
            && OPENING_OUTCOMES.contains(&latest.outcome.as_str())
        {
            let observed = observe(
                svc,
                sys,
                &Observation {
                    site_id: host.site_id.clone(),
                    host_id: host.host_id.clone(),
                    cause,
                    check: Some(latest.check.clone()),
                    severity: default_severity(&latest.check).into(),
                    hipaa_controls: check_controls(&latest.check),
                    summary: format!(
                        "{} {} (repaired by the sweep)",
                        latest.check, latest.outcome
                    ),
                    recommended: None,
                    bundle_id: Some(latest.bundle_id.clone()),
                    at: latest.timestamp_end,
                    kind: "evidence".into(),
                    detail: format!(
                        "bundle {}: {} {}",
                        latest.bundle_id, latest.check, latest.outcome
                    ),
                },
            )?;
            if matches!(observed, Observed::Opened(_)) {
                repaired += 1;
            }
        }
    }
    Ok(repaired)
}
