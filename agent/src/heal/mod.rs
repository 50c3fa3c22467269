//! Self-healing: for each drifted check pick a runbook, apply the guardrails, run it, verify, roll back when health fails.

pub mod runbooks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::baseline::Baseline;
use crate::config::Config;
use crate::drift::{self, CheckResult, Context, Status};
use crate::evidence::{Check, Draft, Outcome};
use crate::systemd::Systemd;
pub use runbooks::Runbook;

/// After this many failed fixes in a row a check goes to alert instead of looping.
pub const BREAKER_THRESHOLD: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error("heal state {path}: {message}")]
    State { path: PathBuf, message: String },
}

/// A fix that waits for the maintenance window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deferred {
    pub check: Check,
    pub runbook: String,
    pub params: Value,
    pub since: jiff::Timestamp,
    pub window_opens: jiff::Timestamp,
}

/// A generation change the agent started; cleared when its outcome is recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub runbook: String,
    pub params: Value,
    pub from_generation: Option<u64>,
    pub from_system: Option<String>,
    pub started: jiff::Timestamp,
}

/// What the guardrails remember between runs (`<state_dir>/heal-state.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealState {
    /// cooldown key -> last run
    #[serde(default)]
    pub last_run: BTreeMap<String, jiff::Timestamp>,
    /// check -> failed fixes in a row
    #[serde(default)]
    pub failures: BTreeMap<String, u32>,
    #[serde(default)]
    pub deferred: Vec<Deferred>,
    #[serde(default)]
    pub in_flight: Option<InFlight>,
}

impl HealState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("heal-state.json")
    }

    pub fn load(state_dir: &Path) -> Result<Self, HealError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| HealError::State {
                path,
                message: format!("not valid ({e}); move it away to reset the guardrails"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(HealError::State {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Atomic and durable: a crash leaves the old or the new state.
    pub fn save(&self, state_dir: &Path) -> Result<(), HealError> {
        use std::io::Write;
        let path = Self::path(state_dir);
        let err = |e: std::io::Error| HealError::State {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(state_dir).map_err(err)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| HealError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        std::fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

/// What the guardrails decided for one drifted check.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Run,
    /// Disruptive, outside the maintenance window.
    Defer {
        window_opens: jiff::Timestamp,
    },
    /// Ran too recently against the same target.
    Cooldown {
        until: jiff::Timestamp,
    },
    /// Too many failures in a row.
    BreakerOpen {
        failures: u32,
    },
    /// Nothing the agent may do: an operator must act.
    NoRunbook {
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanItem {
    pub check: Check,
    pub runbook: Option<Runbook>,
    pub decision: Decision,
    pub drift: String,
}

/// Units the agent may act on: the baseline's units and the units its checks name.
pub fn allowlist(baseline: &Baseline) -> Vec<String> {
    let mut units: Vec<String> = baseline.units.iter().map(|u| u.name.clone()).collect();
    let c = &baseline.checks;
    if let Some(av) = &c.av_health {
        units.extend(av.units.iter().cloned());
    }
    if let Some(b) = &c.backup {
        units.extend(b.unit.iter().cloned());
        units.extend(b.restore_test_unit.iter().cloned());
    }
    if let Some(f) = &c.firewall {
        units.extend(f.unit.iter().cloned());
    }
    if let Some(t) = &c.time_sync {
        units.extend(t.unit.iter().cloned());
    }
    if c.logging.is_some() {
        units.push("systemd-journald.service".into());
        units.push("auditd.service".into());
    }
    units.sort();
    units.dedup();
    units
}

/// The cooldown of a runbook on this box: restarts and stops as configured.
fn cooldown(runbook: &Runbook, config: &Config) -> Duration {
    match runbook {
        Runbook::RestartUnit(_) | Runbook::StopUnit(_) => {
            Duration::from_secs(config.restart_cooldown_sec)
        }
        other => other.cooldown(),
    }
}

/// Decides, for every drifted check, what to do now.
pub fn plan(
    results: &[CheckResult],
    config: &Config,
    baseline: &Baseline,
    state: &HealState,
    now: jiff::Timestamp,
) -> Vec<PlanItem> {
    let allowed = allowlist(baseline);
    let mut items = Vec::new();
    for r in results.iter().filter(|r| r.status == Status::Drifted) {
        let item = |runbook: Option<Runbook>, decision: Decision| PlanItem {
            check: r.check,
            runbook,
            decision,
            drift: r.reason.clone(),
        };
        if r.recommended.is_empty() {
            items.push(item(
                None,
                Decision::NoRunbook {
                    reason: "no runbook fixes this drift; an operator must act".into(),
                },
            ));
            continue;
        }
        let failures = state.failures.get(r.check.as_str()).copied().unwrap_or(0);
        for rec in &r.recommended {
            let runbook = match Runbook::parse(&rec.runbook, &rec.params) {
                Ok(rb) => rb,
                Err(e) => {
                    items.push(item(None, Decision::NoRunbook { reason: e }));
                    continue;
                }
            };
            if let Some(unit) = runbook.target()
                && !allowed.iter().any(|u| u == unit)
            {
                items.push(item(
                    Some(runbook.clone()),
                    Decision::NoRunbook {
                        reason: format!("{unit} is not on the allowlist"),
                    },
                ));
                continue;
            }
            let decision = if failures >= BREAKER_THRESHOLD {
                Decision::BreakerOpen { failures }
            } else if runbook.disruptive(&config.service_health_checks)
                && !config.maintenance_window.is_open(now)
            {
                Decision::Defer {
                    window_opens: config.maintenance_window.next_start(now).timestamp(),
                }
            } else if let Some(last) = state.last_run.get(&runbook.cooldown_key())
                && let Ok(until) = last.checked_add(cooldown(&runbook, config))
                && until > now
            {
                Decision::Cooldown { until }
            } else {
                Decision::Run
            };
            items.push(item(Some(runbook), decision));
        }
    }
    items
}

/// The services the site relies on are active, and the MCP answers when one is configured.
pub async fn healthy(systemd: &Systemd, config: &Config, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    for unit in &config.service_health_checks {
        loop {
            let state = systemd.unit_state(unit).await.map_err(|e| e.to_string())?;
            if state.is_active() {
                break;
            }
            if tokio::time::Instant::now() >= deadline || state.active_state == "failed" {
                return Err(format!(
                    "{unit} is {} ({})",
                    state.active_state, state.sub_state
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if let Some(url) = &config.mcp_url {
        let hostport = url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let addr = if hostport.contains(':') {
            hostport
        } else {
            format!("{hostport}:443")
        };
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(5));
        match tokio::time::timeout(left, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("the MCP at {addr} is unreachable: {e}")),
            Err(_) => return Err(format!("the MCP at {addr} did not answer")),
        }
    }
    Ok(())
}

/// Runs the checks, plans, and carries out the plan, returning one draft per fix attempted.
pub struct Engine<'a> {
    pub config: &'a Config,
    pub baseline: &'a Baseline,
    pub systemd: &'a Systemd,
    pub root: PathBuf,
    pub state: HealState,
}

/// One fix attempt and its evidence.
pub struct Attempt {
    pub item: PlanItem,
    pub draft: Draft,
}

impl Engine<'_> {
    fn context(&self) -> Context<'_> {
        Context {
            baseline: self.baseline,
            systemd: Some(self.systemd),
            systemd_error: None,
            root: self.root.clone(),
            now: jiff::Timestamp::now(),
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }

    pub async fn check(&self, check: Check) -> CheckResult {
        drift::run_check(check, &self.context()).await
    }

    /// Every check, concurrently.
    pub async fn check_all(&self) -> Vec<CheckResult> {
        drift::run_all(&self.context()).await
    }

    /// Records how a generation change the agent did not live to see ended.
    pub async fn resolve_in_flight(&mut self) -> Option<Draft> {
        let flight = self.state.in_flight.take()?;
        let now = self.check(Check::Patching).await;
        let mut draft = Draft::new(Check::Patching, Outcome::Alert);
        draft.runbook_id = Some(flight.runbook.clone());
        draft.pre_state = json!({ "interrupted": flight });
        draft.post_state = now.facts.clone();
        draft.error = Some(format!(
            "the agent stopped during {} (started {}); the box now runs generation {} ({})",
            flight.runbook,
            flight.started,
            now.facts
                .get("current_generation")
                .cloned()
                .unwrap_or(Value::Null),
            now.facts
                .get("running_system")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
        ));
        draft.rollback_available = flight.from_generation.is_some();
        draft.rollback_generation = flight.from_generation;
        Some(draft)
    }

    /// Carries out one plan item; returns its evidence draft (None for a cooldown skip).
    pub async fn carry_out(&mut self, item: &PlanItem, before: &CheckResult) -> Option<Draft> {
        let now = jiff::Timestamp::now();
        let mut draft = Draft::new(item.check, Outcome::Alert);
        draft.timestamp_start = now;
        draft.pre_state =
            json!({ "status": before.status, "reason": before.reason, "facts": before.facts });
        draft.runbook_id = item.runbook.as_ref().map(|r| r.id().to_owned());
        match &item.decision {
            Decision::Cooldown { .. } => return None,
            Decision::NoRunbook { reason } => {
                draft.error = Some(format!("{}; {reason}", item.drift));
                return Some(draft);
            }
            Decision::BreakerOpen { failures } => {
                draft.error = Some(format!(
                    "{}; {failures} fixes failed in a row, so the agent stopped trying (circuit breaker open) until the check passes again",
                    item.drift
                ));
                return Some(draft);
            }
            Decision::Defer { window_opens } => {
                let runbook = item.runbook.as_ref()?;
                draft.outcome = Outcome::Deferred;
                draft.error = Some(format!(
                    "{}; {} is disruptive and waits for the maintenance window ({} at {window_opens})",
                    item.drift,
                    runbook.id(),
                    self.config.maintenance_window
                ));
                draft.post_state = json!({ "window_opens": window_opens, "runbook": runbook.id(), "params": runbook.params() });
                let deferred = Deferred {
                    check: item.check,
                    runbook: runbook.id().into(),
                    params: runbook.params(),
                    since: now,
                    window_opens: *window_opens,
                };
                if !self.state.deferred.iter().any(|d| {
                    d.check == deferred.check
                        && d.runbook == deferred.runbook
                        && d.params == deferred.params
                }) {
                    self.state.deferred.push(deferred);
                }
                return Some(draft);
            }
            Decision::Run => {}
        }
        let runbook = item.runbook.as_ref()?;
        self.state
            .deferred
            .retain(|d| !(d.check == item.check && d.runbook == runbook.id()));
        self.state.last_run.insert(runbook.cooldown_key(), now);
        let generation_change = matches!(
            runbook,
            Runbook::SwitchGeneration(_) | Runbook::RollbackGeneration(_)
        );
        let from_generation = before
            .facts
            .get("current_generation")
            .and_then(Value::as_u64);
        if generation_change {
            let before_patch = self.check(Check::Patching).await;
            self.state.in_flight = Some(InFlight {
                runbook: runbook.id().into(),
                params: runbook.params(),
                from_generation: before_patch
                    .facts
                    .get("current_generation")
                    .and_then(Value::as_u64)
                    .or(from_generation),
                from_system: before_patch
                    .facts
                    .get("running_system")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                started: now,
            });
            // The intent is durable before the switch starts, so a kill -9 is recorded at the next start.
            if let Err(e) = self.state.save(&self.config.state_dir) {
                draft.error = Some(format!("not switching: {e}"));
                return Some(draft);
            }
        }
        let mut steps = runbooks::execute(runbook, self.systemd).await;
        let mut outcome = if steps.failed.is_none() {
            Outcome::Success
        } else {
            Outcome::Failed
        };

        if generation_change {
            let from = self
                .state
                .in_flight
                .as_ref()
                .and_then(|f| f.from_generation);
            draft.rollback_available = from.is_some();
            draft.rollback_generation = from;
            let health = if steps.failed.is_none() {
                healthy(
                    self.systemd,
                    self.config,
                    Duration::from_secs(self.config.health_check_timeout_sec),
                )
                .await
            } else {
                Err(steps.failed.clone().unwrap_or_default())
            };
            if let Err(why) = health {
                // Health gate failed: back to the previous generation.
                if let Some(generation) = from {
                    let back = Runbook::SwitchGeneration(runbooks::SwitchParams {
                        generation: Some(generation),
                        store_path: None,
                    });
                    let mut rollback = runbooks::execute(&back, self.systemd).await;
                    steps.actions.append(&mut rollback.actions);
                    let restored = rollback.failed.is_none()
                        && healthy(
                            self.systemd,
                            self.config,
                            Duration::from_secs(self.config.health_check_timeout_sec),
                        )
                        .await
                        .is_ok();
                    outcome = if restored {
                        Outcome::Reverted
                    } else {
                        Outcome::Failed
                    };
                    draft.error = Some(format!(
                        "health check failed after {} ({why}); {}",
                        runbook.id(),
                        if restored {
                            format!("rolled back to generation {generation}")
                        } else {
                            format!(
                                "rollback to generation {generation} failed: {}",
                                rollback.failed.unwrap_or_else(|| "unhealthy".into())
                            )
                        }
                    ));
                } else {
                    outcome = Outcome::Failed;
                    draft.error = Some(format!(
                        "health check failed after {} ({why}) and no previous generation is known",
                        runbook.id()
                    ));
                }
            }
            self.state.in_flight = None;
        }

        let after = self.check(item.check).await;
        draft.post_state =
            json!({ "status": after.status, "reason": after.reason, "facts": after.facts });
        if outcome == Outcome::Success && after.status != Status::Compliant {
            outcome = Outcome::Failed;
            draft.error = Some(format!(
                "{} ran but the check still fails: {}",
                runbook.id(),
                after.reason
            ));
        } else if outcome == Outcome::Failed && draft.error.is_none() {
            draft.error = steps.failed.clone();
        }
        let key = item.check.as_str().to_owned();
        if outcome == Outcome::Success {
            self.state.failures.remove(&key);
        } else {
            *self.state.failures.entry(key).or_default() += 1;
        }
        draft.outcome = outcome;
        draft.action_taken = steps.actions;
        draft.timestamp_end = Some(jiff::Timestamp::now());
        Some(draft)
    }

    /// A check that passes closes its circuit breaker and drops its deferred fixes.
    pub fn note_compliant(&mut self, results: &[CheckResult]) {
        for r in results.iter().filter(|r| r.status == Status::Compliant) {
            self.state.failures.remove(r.check.as_str());
            self.state.deferred.retain(|d| d.check != r.check);
        }
    }
}

/// What an order's runbook did.
pub struct OrderRun {
    pub outcome: Outcome,
    pub post_state: Value,
    pub actions: Vec<crate::evidence::ActionTaken>,
    pub error: Option<String>,
}

/// Runs a runbook an MCP order asked for, through the same runbooks and
/// guardrails as `heal`: the unit allowlist of the baseline and the
/// maintenance window for disruptive runbooks (a signed order does not
/// bypass them). Cooldowns and the circuit breaker apply to the agent's own
/// decisions, not to an operator's explicit order.
pub async fn run_order(config: &Config, runbook: &Runbook, now: jiff::Timestamp) -> OrderRun {
    let refuse = |outcome: Outcome, error: String, post: Value| OrderRun {
        outcome,
        post_state: post,
        actions: Vec::new(),
        error: Some(error),
    };
    let baseline = match &config.baseline_path {
        Some(p) => match Baseline::load(p) {
            Ok(b) => Some(b),
            Err(e) => return refuse(Outcome::Failed, e.to_string(), json!({ "ran": false })),
        },
        None => None,
    };
    if let Some(unit) = runbook.target() {
        let allowed = baseline.as_ref().map(allowlist).unwrap_or_default();
        if !allowed.iter().any(|u| u == unit) {
            return refuse(
                Outcome::Failed,
                format!("{unit} is not on this box's unit allowlist (the baseline's units)"),
                json!({ "ran": false }),
            );
        }
    }
    if runbook.disruptive(&config.service_health_checks) && !config.maintenance_window.is_open(now)
    {
        let opens = config.maintenance_window.next_start(now).timestamp();
        return refuse(
            Outcome::Deferred,
            format!(
                "{} is disruptive and this box's maintenance window ({}) opens at {opens}",
                runbook.id(),
                config.maintenance_window
            ),
            json!({ "ran": false, "window_opens": opens }),
        );
    }
    let systemd = match Systemd::system().await {
        Ok(s) => s,
        Err(e) => return refuse(Outcome::Failed, e.to_string(), json!({ "ran": false })),
    };
    let steps = runbooks::execute(runbook, &systemd).await;
    let unit_state = match runbook.target() {
        Some(unit) => systemd.unit_state(unit).await.ok().map(|s| json!(s)),
        None => None,
    };
    OrderRun {
        outcome: if steps.failed.is_none() {
            Outcome::Success
        } else {
            Outcome::Failed
        },
        post_state: json!({ "ran": true, "runbook": runbook.id(), "params": runbook.params(), "unit": unit_state }),
        actions: steps.actions,
        error: steps.failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::{Checks, UnitExpectation};
    use crate::config::ConfigSource;
    use crate::drift::{Recommendation, Severity};
    use std::collections::BTreeMap as Map;

    fn config(window: &str, health: &[&str]) -> Config {
        let list = health
            .iter()
            .map(|h| format!("\"{h}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!("maintenance_window = \"{window}\"\nservice_health_checks = [{list}]\n");
        Config::from_toml(&text, ConfigSource::Embedded, &Map::<String, String>::new())
            .expect("config")
    }

    fn baseline() -> Baseline {
        Baseline {
            version: 1,
            policy_version: "t".into(),
            units: vec![
                UnitExpectation {
                    name: "clinic-app.service".into(),
                    active: true,
                    enabled: true,
                },
                UnitExpectation {
                    name: "sshd.service".into(),
                    active: true,
                    enabled: true,
                },
            ],
            checks: Checks::default(),
        }
    }

    fn drifted(check: Check, runbook: &str, params: Value) -> CheckResult {
        CheckResult {
            check,
            status: Status::Drifted,
            severity: Severity::High,
            hipaa_controls: Vec::new(),
            reason: "drifted".into(),
            facts: json!({}),
            recommended: vec![Recommendation {
                runbook: runbook.into(),
                params,
            }],
            started: jiff::Timestamp::now(),
            duration_ms: 0,
        }
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn guardrails_decide() {
        let cfg = config("02:00-04:00", &["clinic-app.service"]);
        let b = baseline();
        let state = HealState::default();
        let noon = ts("2026-11-29T12:00:00Z");
        let night = ts("2026-11-30T02:30:00Z");

        let ssh = drifted(
            Check::Services,
            "restart_unit",
            json!({"unit": "sshd.service"}),
        );
        assert_eq!(
            plan(std::slice::from_ref(&ssh), &cfg, &b, &state, noon)[0].decision,
            Decision::Run,
            "non-disruptive runs at once"
        );

        let app = drifted(
            Check::Services,
            "restart_unit",
            json!({"unit": "clinic-app.service"}),
        );
        let p = plan(std::slice::from_ref(&app), &cfg, &b, &state, noon);
        assert_eq!(
            p[0].decision,
            Decision::Defer {
                window_opens: ts("2026-11-30T02:00:00Z")
            },
            "disruptive waits"
        );
        assert_eq!(
            plan(std::slice::from_ref(&app), &cfg, &b, &state, night)[0].decision,
            Decision::Run,
            "and runs when the window opens"
        );

        let other = drifted(
            Check::Services,
            "restart_unit",
            json!({"unit": "not-allowlisted.service"}),
        );
        assert!(
            matches!(
                plan(&[other], &cfg, &b, &state, noon)[0].decision,
                Decision::NoRunbook { .. }
            ),
            "allowlist"
        );

        let mut cooling = HealState::default();
        cooling.last_run.insert(
            "restart_unit:sshd.service".into(),
            ts("2026-11-29T11:59:50Z"),
        );
        assert!(matches!(
            plan(std::slice::from_ref(&ssh), &cfg, &b, &cooling, noon)[0].decision,
            Decision::Cooldown { .. }
        ));
        assert_eq!(
            plan(
                std::slice::from_ref(&ssh),
                &cfg,
                &b,
                &cooling,
                ts("2026-11-29T12:01:00Z")
            )[0]
            .decision,
            Decision::Run,
            "cooldown ends"
        );

        let mut broken = HealState::default();
        broken.failures.insert("services".into(), BREAKER_THRESHOLD);
        assert_eq!(
            plan(&[ssh], &cfg, &b, &broken, noon)[0].decision,
            Decision::BreakerOpen {
                failures: BREAKER_THRESHOLD
            }
        );

        let mut none = drifted(Check::Encryption, "x", json!({}));
        none.recommended.clear();
        assert!(matches!(
            plan(&[none], &cfg, &b, &state, noon)[0].decision,
            Decision::NoRunbook { .. }
        ));
        let bad = drifted(Check::Services, "restart_unit", json!({"unit": 7}));
        assert!(
            matches!(
                plan(&[bad], &cfg, &b, &state, noon)[0].decision,
                Decision::NoRunbook { .. }
            ),
            "bad params"
        );
    }

    #[test]
    fn orders_pass_the_same_guardrails() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = config("02:00-04:00", &["clinic-app.service"]);
        let restart =
            Runbook::parse("restart_unit", &json!({"unit": "sshd.service"})).expect("valid");
        let run = rt.block_on(run_order(&cfg, &restart, ts("2026-11-29T12:00:00Z")));
        assert_eq!(
            run.outcome,
            Outcome::Failed,
            "no baseline: no unit is on the allowlist"
        );
        assert!(
            run.error
                .as_deref()
                .is_some_and(|e| e.contains("allowlist")),
            "{:?}",
            run.error
        );
        let switch = Runbook::parse("switch_generation", &json!({"generation": 3})).expect("valid");
        let run = rt.block_on(run_order(&cfg, &switch, ts("2026-11-29T12:00:00Z")));
        assert_eq!(
            run.outcome,
            Outcome::Deferred,
            "disruptive orders wait for the window too"
        );
        assert_eq!(run.post_state["ran"], false);
        assert!(crate::orders::check_params("restart_unit", &json!({"unit": "a.service"})).is_ok());
        assert!(crate::orders::check_params("restart_unit", &json!({"unit": 5})).is_err());
    }

    #[test]
    fn state_round_trips_and_garbage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = HealState::default();
        s.failures.insert("backup".into(), 2);
        s.save(dir.path()).expect("save");
        assert_eq!(HealState::load(dir.path()).expect("load"), s);
        std::fs::write(HealState::path(dir.path()), "{").expect("write");
        let e = HealState::load(dir.path()).expect_err("garbage");
        assert!(e.to_string().contains("move it away"), "{e}");
    }
}
