//! `/metrics` on the operator listener: fleet state in the Prometheus text format,
//! computed from the database on each scrape (several server processes share it), plus
//! this process's intake counters. Names follow the agent's own metrics, at fleet level.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use compliance_agent::evidence::Check;
use jiff::Timestamp;

use crate::api::{ConnInfo, blocking};
use crate::auth::{Caller, token_hash};
use crate::config::MetricsAccess;
use crate::fleet::HostStatus;
use crate::services::Services;
use crate::store::{OrderRecord, OrderState, Store, StoreError};

/// Where the operator listener serves the metrics.
pub const PATH: &str = "/metrics";

/// Upper bounds of the remediation duration histogram, seconds (order created to answered:
/// approval and the box's polling are part of it, so the range is wider than the agent's).
pub const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// The label a direct-mode site (no reseller) carries, as in the archive's keys.
pub const DIRECT: &str = "_direct";

/// Prometheus text exposition, one family at a time.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; label values are escaped.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let parts: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.text, "{{{}}}", parts.join(","));
        }
        let _ = writeln!(self.text, " {value}");
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

fn reseller(r: &Option<String>) -> &str {
    r.as_deref().unwrap_or(DIRECT)
}

/// Incidents by type and severity, for `msp_incidents_total`. Today the index knows
/// drift as the alert bundles the boxes delivered, per check; the bundle's severity is
/// in the archived bytes, not the index, so it reads `unrated`. An incident store
/// replaces or extends this function with its own counts; the family stays the same.
pub fn incident_counts(
    store: &dyn Store,
    caller: &Caller,
) -> Result<BTreeMap<(String, String), u64>, StoreError> {
    let mut out = BTreeMap::new();
    for c in store.bundle_counts(caller)? {
        if c.outcome == "alert" {
            *out.entry((c.check, "unrated".to_owned())).or_default() += c.count;
        }
    }
    Ok(out)
}

/// The fleet's compliance score: the mean of the hosts' scores (hosts without a
/// result yet left out); None with no scored host.
pub fn fleet_score(hosts: &[HostStatus]) -> Option<f64> {
    let scores: Vec<f64> = hosts
        .iter()
        .filter(|h| h.revoked_at.is_none())
        .filter_map(|h| h.score)
        .collect();
    (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64)
}

/// The status label of an order for `msp_remediations_total`.
fn order_status(o: &OrderRecord) -> String {
    match o.state {
        OrderState::AwaitingApproval => "awaiting_approval".into(),
        OrderState::Pending => "pending".into(),
        OrderState::Answered => o
            .result_outcome
            .clone()
            .unwrap_or_else(|| "answered".into()),
    }
}

/// Everything `/metrics` says to `caller`, scoped by its tenants.
pub fn render(svc: &Services, caller: &Caller, now: Timestamp) -> Result<String, StoreError> {
    let store = &*svc.store;
    let hosts = crate::fleet::fleet(store, caller, now)?;
    let orders = store.orders(caller, None)?;
    let counts = store.bundle_counts(caller)?;
    let mut e = Exposition::default();

    e.family(
        "msp_compliance_score",
        "gauge",
        "Checks whose latest bundle is a success, percent, per host.",
    );
    for h in hosts.iter().filter(|h| h.revoked_at.is_none()) {
        if let Some(score) = h.score {
            e.sample(
                "msp_compliance_score",
                &[
                    ("reseller", reseller(&h.reseller_id)),
                    ("site", &h.site_id),
                    ("host", &h.host_id),
                ],
                score,
            );
        }
    }
    e.family(
        "msp_fleet_compliance_score",
        "gauge",
        "Mean of the active hosts' compliance scores, percent.",
    );
    if let Some(score) = fleet_score(&hosts) {
        e.sample("msp_fleet_compliance_score", &[], score);
    }

    e.family(
        "msp_control_status",
        "gauge",
        "Per host, check and HIPAA control from the latest bundle: 0 pass, 2 fail.",
    );
    for h in hosts.iter().filter(|h| h.revoked_at.is_none()) {
        for r in h.latest.iter().filter(|r| r.check != "mcp_order") {
            let value = if r.outcome == "success" { 0.0 } else { 2.0 };
            let controls = Check::parse(&r.check).map_or(&[][..], |c| c.hipaa_controls());
            for control in controls {
                e.sample(
                    "msp_control_status",
                    &[
                        ("reseller", reseller(&h.reseller_id)),
                        ("site", &h.site_id),
                        ("host", &h.host_id),
                        ("check", &r.check),
                        ("control", control),
                    ],
                    value,
                );
            }
        }
    }

    e.family(
        "msp_incidents_total",
        "counter",
        "Incidents by type and severity.",
    );
    for ((kind, severity), n) in incident_counts(store, caller)? {
        e.sample(
            "msp_incidents_total",
            &[("type", &kind), ("severity", &severity)],
            n as f64,
        );
    }

    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut buckets = [0u64; DURATION_BUCKETS.len()];
    let (mut sum, mut count) = (0.0f64, 0u64);
    for o in &orders {
        *by_status.entry(order_status(o)).or_default() += 1;
        if let (OrderState::Answered, Some(done)) = (o.state, o.answered_at) {
            let secs = done.duration_since(o.created_at).as_secs_f64().max(0.0);
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                if secs <= *bound {
                    buckets[i] += 1;
                }
            }
            sum += secs;
            count += 1;
        }
    }
    e.family(
        "msp_remediations_total",
        "counter",
        "Orders by status: awaiting_approval, pending, or the box's outcome.",
    );
    for (status, n) in &by_status {
        e.sample("msp_remediations_total", &[("status", status)], *n as f64);
    }
    e.family(
        "msp_remediation_duration_seconds",
        "histogram",
        "Time from an order's creation to the box's answer.",
    );
    for (bound, n) in DURATION_BUCKETS.iter().zip(buckets) {
        e.sample(
            "msp_remediation_duration_seconds_bucket",
            &[("le", &bound.to_string())],
            n as f64,
        );
    }
    e.sample(
        "msp_remediation_duration_seconds_bucket",
        &[("le", "+Inf")],
        count as f64,
    );
    e.sample("msp_remediation_duration_seconds_sum", &[], sum);
    e.sample("msp_remediation_duration_seconds_count", &[], count as f64);

    // Intake verifies every signature before it stores: an unsigned bundle is never indexed.
    let stored: u64 = counts.iter().map(|c| c.count).sum();
    e.family(
        "msp_evidence_bundles_total",
        "counter",
        "Evidence bundles in the index (every one verified against its host's key).",
    );
    e.sample(
        "msp_evidence_bundles_total",
        &[("signed", "true")],
        stored as f64,
    );
    e.sample("msp_evidence_bundles_total", &[("signed", "false")], 0.0);
    e.family(
        "msp_host_evidence_bundles_total",
        "counter",
        "Evidence bundles in the index per host; rate() of it is the intake rate.",
    );
    let mut per_host: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    for c in &counts {
        *per_host
            .entry((reseller(&c.reseller_id), &c.site_id, &c.host_id))
            .or_default() += c.count;
    }
    for ((r, s, h), n) in per_host {
        e.sample(
            "msp_host_evidence_bundles_total",
            &[("reseller", r), ("site", s), ("host", h)],
            n as f64,
        );
    }

    // One pass over the hosts for three families; each family's samples stay together.
    let (mut gaps, mut overdue, mut seen) = (
        Exposition::default(),
        Exposition::default(),
        Exposition::default(),
    );
    for h in &hosts {
        let labels = [
            ("reseller", reseller(&h.reseller_id)),
            ("site", h.site_id.as_str()),
            ("host", h.host_id.as_str()),
        ];
        gaps.sample("msp_chain_gaps", &labels, h.gaps.len() as f64);
        if h.revoked_at.is_none() {
            overdue.sample("msp_host_overdue", &labels, f64::from(u8::from(h.overdue)));
        }
        if let Some(t) = h.last_seen {
            seen.sample(
                "msp_host_last_seen_timestamp_seconds",
                &labels,
                t.as_millisecond() as f64 / 1000.0,
            );
        }
    }
    e.family(
        "msp_chain_gaps",
        "gauge",
        "Missing seq ranges in a host's chain after its first stored bundle.",
    );
    e.text.push_str(&gaps.text);
    e.family(
        "msp_host_overdue",
        "gauge",
        "1 when an active host has been silent for more than twice its scan interval.",
    );
    e.text.push_str(&overdue.text);
    e.family(
        "msp_host_last_seen_timestamp_seconds",
        "gauge",
        "When the host last delivered a bundle (Unix time).",
    );
    e.text.push_str(&seen.text);

    let active = hosts.iter().filter(|h| h.revoked_at.is_none()).count();
    e.family("msp_hosts", "gauge", "Hosts by state (active or revoked).");
    e.sample("msp_hosts", &[("state", "active")], active as f64);
    e.sample(
        "msp_hosts",
        &[("state", "revoked")],
        (hosts.len() - active) as f64,
    );
    e.family(
        "msp_hosts_overdue",
        "gauge",
        "Active hosts silent for more than twice their scan interval.",
    );
    e.sample(
        "msp_hosts_overdue",
        &[],
        hosts.iter().filter(|h| h.overdue).count() as f64,
    );

    let s = svc.stats.snapshot();
    e.family(
        "msp_intake_bundles_total",
        "counter",
        "Uploads this server process answered, by result.",
    );
    for (result, n) in [
        ("stored", s.stored),
        ("duplicate", s.duplicates),
        ("refused", s.refused),
    ] {
        e.sample("msp_intake_bundles_total", &[("result", result)], n as f64);
    }
    e.family(
        "msp_archive_errors_total",
        "counter",
        "Archive writes that failed in this server process (the bundle was not acknowledged).",
    );
    e.sample("msp_archive_errors_total", &[], s.archive_errors as f64);
    Ok(e.into_text())
}

/// The `/metrics` route, answering as `config.metrics.access` says.
pub fn router(svc: Services) -> Router {
    Router::new().route(PATH, get(metrics)).with_state(svc)
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

async fn metrics(
    State(svc): State<Services>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let access = svc.config.metrics.access;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let peer = info.peer;
    let result = blocking(move || -> Result<String, (StatusCode, String)> {
        let refused = |status: StatusCode, why: &str| {
            crate::audit::record_anonymous(
                &*svc.store,
                Some(peer.to_string()),
                "metrics.read",
                PATH,
                why,
            );
            Err((status, why.to_owned()))
        };
        let caller = match access {
            MetricsAccess::Off => {
                return Err((
                    StatusCode::NOT_FOUND,
                    "metrics are off (metrics.access = \"off\")".into(),
                ));
            }
            MetricsAccess::Loopback => {
                if !peer.ip().is_loopback() {
                    return refused(
                        StatusCode::FORBIDDEN,
                        "metrics are served to loopback peers only (metrics.access = \"loopback\")",
                    );
                }
                Caller::local("metrics")
            }
            MetricsAccess::Token => {
                let Some(token) = token else {
                    return refused(
                        StatusCode::UNAUTHORIZED,
                        "missing operator token: send Authorization: Bearer <token>",
                    );
                };
                match svc.store.operator_by_token(&token_hash(&token)) {
                    Ok(Some(op)) => Caller {
                        actor: format!("operator:{}", op.name),
                        role: op.role,
                        tenants: op.tenants,
                        peer: Some(peer.to_string()),
                    },
                    Ok(None) => {
                        return refused(
                            StatusCode::UNAUTHORIZED,
                            "the operator token is not valid",
                        );
                    }
                    Err(e) => return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
                }
            }
        };
        render(&svc, &caller, Timestamp::now())
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    })
    .await;
    match result {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err((status, message))) => refuse(status, &message),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back one escaped label value (the exposition format's three escapes).
    fn unescape(v: &str) -> String {
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    proptest::proptest! {
        /// Whatever a label value holds (quotes, backslashes, newlines), its sample stays
        /// one line, the value stays inside its quotes and reads back unchanged: a
        /// hostile id cannot add a series or a label.
        #[test]
        fn any_label_value_stays_one_sample(v in "\\PC*|[\"\\\\\n a-z{}=,]*") {
            let mut e = Exposition::default();
            e.sample("m", &[("host", &v), ("site", "s")], 1.0);
            let text = e.into_text();
            proptest::prop_assert_eq!(text.lines().count(), 1, "{:?}", text);
            let inner = text
                .strip_prefix("m{host=\"")
                .and_then(|t| t.strip_suffix("\",site=\"s\"} 1\n"))
                .ok_or_else(|| proptest::test_runner::TestCaseError::fail(format!("shape: {text:?}")))?;
            let mut escaped = false;
            for c in inner.chars() {
                proptest::prop_assert!(escaped || c != '"', "an unescaped quote in {:?}", text);
                escaped = !escaped && c == '\\';
            }
            proptest::prop_assert_eq!(unescape(inner), v);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.sample("m", &[("host", "a\"b\\c\nd")], 1.0);
        assert_eq!(e.into_text(), "m{host=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
