//! Drift detection: one module per check, each comparing the live box with the baseline.

pub mod av_health;
pub mod backup;
pub mod encryption;
pub mod firewall;
pub mod logging;
pub mod patching;
pub mod services;
pub mod time_sync;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::baseline::Baseline;
use crate::evidence::Check;
use crate::systemd::{Systemd, UnitState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Compliant,
    Drifted,
    NotApplicable,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Compliant => "compliant",
            Status::Drifted => "drifted",
            Status::NotApplicable => "not_applicable",
            Status::Error => "error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// A fix the healing engine may apply: a runbook and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    pub runbook: String,
    pub params: Value,
}

/// The outcome of one check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub check: Check,
    pub status: Status,
    pub severity: Severity,
    pub hipaa_controls: Vec<String>,
    /// One line: why this status.
    pub reason: String,
    /// What was observed (the bundle's pre_state).
    pub facts: Value,
    pub recommended: Vec<Recommendation>,
    pub started: jiff::Timestamp,
    pub duration_ms: u64,
}

/// Everything a check may look at.
pub struct Context<'a> {
    pub baseline: &'a Baseline,
    /// None when the system bus cannot be reached; checks that need it report an error.
    pub systemd: Option<&'a Systemd>,
    pub systemd_error: Option<String>,
    /// The file system root checks read from: "/" on a box; a captured tree in tests.
    pub root: PathBuf,
    pub now: jiff::Timestamp,
    /// `$CREDENTIALS_DIRECTORY`, for `%d/` paths in the baseline.
    pub credentials_dir: Option<PathBuf>,
}

impl Context<'_> {
    /// `path` (absolute, as on the box) under the context's root.
    pub fn path(&self, path: impl AsRef<Path>) -> PathBuf {
        let p = path.as_ref();
        match p.strip_prefix("/") {
            Ok(rel) => self.root.join(rel),
            Err(_) => self.root.join(p),
        }
    }

    /// Expands `%d/NAME` to the credentials directory.
    pub fn credential_path(&self, value: &str) -> Result<PathBuf, String> {
        match value.strip_prefix("%d/") {
            Some(rest) => self
                .credentials_dir
                .as_ref()
                .map(|d| d.join(rest))
                .ok_or_else(|| {
                    format!(
                        "{value} names a systemd credential but CREDENTIALS_DIRECTORY is not set"
                    )
                }),
            None => Ok(PathBuf::from(value)),
        }
    }

    /// A unit's state over D-Bus, or the reason it cannot be read.
    pub async fn unit(&self, name: &str) -> Result<UnitState, String> {
        match self.systemd {
            Some(s) => s.unit_state(name).await.map_err(|e| e.to_string()),
            None => Err(self
                .systemd_error
                .clone()
                .unwrap_or_else(|| "the system bus is not available".into())),
        }
    }
}

/// Collects a check's facts, drift and errors, then decides its status.
#[derive(Default)]
pub struct Assessment {
    facts: Map<String, Value>,
    drift: Vec<(Severity, String)>,
    errors: Vec<String>,
    recommended: Vec<Recommendation>,
}

impl Assessment {
    pub fn fact(&mut self, key: &str, value: impl Serialize) {
        self.facts.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
    }

    pub fn drift(&mut self, severity: Severity, message: impl Into<String>) {
        self.drift.push((severity, message.into()));
    }

    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    pub fn recommend(&mut self, runbook: &str, params: Value) {
        let rec = Recommendation {
            runbook: runbook.to_owned(),
            params,
        };
        if !self.recommended.contains(&rec) {
            self.recommended.push(rec);
        }
    }

    /// Checks that a unit is active, recording its state; drift recommends a restart.
    pub async fn require_active(
        &mut self,
        ctx: &Context<'_>,
        unit: &str,
        severity: Severity,
    ) -> Option<UnitState> {
        match ctx.unit(unit).await {
            Ok(state) => {
                self.facts
                    .entry("units")
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .map(|m| {
                        m.insert(
                            unit.to_owned(),
                            serde_json::to_value(&state).unwrap_or(Value::Null),
                        )
                    });
                if !state.exists() {
                    self.drift(severity, format!("{unit} does not exist"));
                } else if !state.is_active() {
                    self.drift(
                        severity,
                        format!("{unit} is {} ({})", state.active_state, state.sub_state),
                    );
                    self.recommend("restart_unit", json!({ "unit": unit }));
                }
                Some(state)
            }
            Err(e) => {
                self.error(format!("{unit}: {e}"));
                None
            }
        }
    }

    fn finish(self, check: Check, started: jiff::Timestamp, clock: Instant) -> CheckResult {
        let (status, severity, reason) = if !self.drift.is_empty() {
            let severity = self
                .drift
                .iter()
                .map(|(s, _)| *s)
                .max()
                .unwrap_or(Severity::Medium);
            let mut parts: Vec<String> = self.drift.iter().map(|(_, m)| m.clone()).collect();
            parts.extend(self.errors.iter().map(|e| format!("error: {e}")));
            (Status::Drifted, severity, parts.join("; "))
        } else if !self.errors.is_empty() {
            (Status::Error, Severity::High, self.errors.join("; "))
        } else {
            (Status::Compliant, Severity::Low, "as declared".to_owned())
        };
        let mut facts = self.facts;
        if !self.errors.is_empty() {
            facts.insert("errors".into(), json!(self.errors));
        }
        CheckResult {
            check,
            status,
            severity,
            hipaa_controls: check
                .hipaa_controls()
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            reason,
            facts: Value::Object(facts),
            recommended: if status == Status::Drifted {
                self.recommended
            } else {
                Vec::new()
            },
            started,
            duration_ms: clock.elapsed().as_millis() as u64,
        }
    }
}

fn not_applicable(check: Check, now: jiff::Timestamp, reason: &str) -> CheckResult {
    CheckResult {
        check,
        status: Status::NotApplicable,
        severity: Severity::Low,
        hipaa_controls: check
            .hipaa_controls()
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
        reason: reason.to_owned(),
        facts: json!({}),
        recommended: Vec::new(),
        started: now,
        duration_ms: 0,
    }
}

/// Runs a check's assessment (futures are lazy: the clock starts here).
async fn timed(check: Check, body: impl std::future::Future<Output = Assessment>) -> CheckResult {
    let started = jiff::Timestamp::now();
    let clock = Instant::now();
    body.await.finish(check, started, clock)
}

/// The checks in report order.
pub const CHECKS: [Check; 8] = [
    Check::Patching,
    Check::AvHealth,
    Check::Backup,
    Check::Logging,
    Check::Firewall,
    Check::Encryption,
    Check::TimeSync,
    Check::Services,
];

/// Runs one check.
pub async fn run_check(check: Check, ctx: &Context<'_>) -> CheckResult {
    let c = &ctx.baseline.checks;
    let absent = || not_applicable(check, ctx.now, "not in this host's baseline");
    macro_rules! run {
        ($spec:expr, $module:ident) => {
            match $spec {
                Some(spec) => timed(check, $module::check(ctx, spec, Assessment::default())).await,
                None => absent(),
            }
        };
    }
    match check {
        Check::Patching => run!(&c.patching, patching),
        Check::AvHealth => run!(&c.av_health, av_health),
        Check::Backup => run!(&c.backup, backup),
        Check::Logging => run!(&c.logging, logging),
        Check::Firewall => run!(&c.firewall, firewall),
        Check::Encryption => run!(&c.encryption, encryption),
        Check::TimeSync => run!(&c.time_sync, time_sync),
        Check::Services => {
            let units = (!ctx.baseline.units.is_empty()).then_some(&ctx.baseline.units);
            run!(units, services)
        }
        other => not_applicable(other, ctx.now, "not a drift check"),
    }
}

/// Runs every check concurrently; results in report order.
pub async fn run_all(ctx: &Context<'_>) -> Vec<CheckResult> {
    let futures = CHECKS.iter().map(|c| run_check(*c, ctx));
    futures_util::future::join_all(futures).await
}

/// Applicable checks that are compliant, as a percentage (100 when none apply).
pub fn score(results: &[CheckResult]) -> f64 {
    let applicable: Vec<&CheckResult> = results
        .iter()
        .filter(|r| r.status != Status::NotApplicable)
        .collect();
    if applicable.is_empty() {
        return 100.0;
    }
    let ok = applicable
        .iter()
        .filter(|r| r.status == Status::Compliant)
        .count();
    100.0 * ok as f64 / applicable.len() as f64
}

/// Seconds between two instants, never negative.
pub fn age_secs(now: jiff::Timestamp, then: jiff::Timestamp) -> i64 {
    (now.as_second() - then.as_second()).max(0)
}
