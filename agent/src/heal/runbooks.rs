//! The runbooks: typed parameters, whether each is disruptive, its cooldown, and how it runs.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::evidence::ActionTaken;
use crate::systemd::{JobOp, Systemd, valid_unit_name};

/// Root oneshot units the NixOS module installs for what the agent may not do itself.
pub const SWITCH_TEMPLATE: &str = "compliance-agent-switch@";
pub const ROLLBACK_UNIT: &str = "compliance-agent-rollback.service";
pub const FRESHCLAM_UNIT: &str = "clamav-freshclam.service";

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnitParams {
    pub unit: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A unit the runbook may fall back on: nftables' unit for `reapply_firewall`
/// (default nftables.service); chronyd's for `resync_time`, restarted (its
/// `makestep` steps the clock) when `chronyc makestep` is not allowed, as for
/// an unprivileged agent.
#[derive(Clone, Debug, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptionalUnit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchParams {
    /// A generation of the system profile to switch to ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// ... or a system store path already in the store (it becomes a new generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_path: Option<String>,
}

impl SwitchParams {
    /// The switch unit's instance: the generation number, or the store path's name.
    pub fn instance(&self) -> Result<String, String> {
        match (&self.generation, &self.store_path) {
            (Some(g), None) => Ok(g.to_string()),
            (None, Some(p)) => {
                let name = p
                    .strip_prefix("/nix/store/")
                    .filter(|n| !n.is_empty() && !n.contains('/'))
                    .ok_or_else(|| format!("{p:?} is not a top-level Nix store path"))?;
                let hash_ok = name.len() > 33 && name.as_bytes()[32] == b'-';
                if !hash_ok
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                {
                    return Err(format!("{p:?} is not a store path the switch unit accepts"));
                }
                Ok(name.to_owned())
            }
            _ => Err("give exactly one of generation and store_path".into()),
        }
    }
}

/// A runbook with its validated parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "runbook", content = "params", rename_all = "snake_case")]
pub enum Runbook {
    RestartUnit(UnitParams),
    StopUnit(UnitParams),
    ReapplyFirewall(OptionalUnit),
    RunBackup(UnitParams),
    RestoreTest(UnitParams),
    RefreshAvSignatures(NoParams),
    ResyncTime(OptionalUnit),
    SwitchGeneration(SwitchParams),
    RollbackGeneration(NoParams),
    CollectEvidence(NoParams),
}

pub use crate::runbook_ids::RUNBOOK_IDS;

fn params<T: for<'de> Deserialize<'de>>(id: &str, value: &Value) -> Result<T, String> {
    let value = if value.is_null() {
        Value::Object(Default::default())
    } else {
        value.clone()
    };
    serde_json::from_value(value).map_err(|e| format!("runbook {id}: bad params: {e}"))
}

fn unit(id: &str, value: &Value) -> Result<UnitParams, String> {
    let p: UnitParams = params(id, value)?;
    if !valid_unit_name(&p.unit) {
        return Err(format!("runbook {id}: {:?} is not a unit name", p.unit));
    }
    Ok(p)
}

fn optional_unit(id: &str, value: &Value) -> Result<OptionalUnit, String> {
    let p: OptionalUnit = params(id, value)?;
    if let Some(u) = &p.unit
        && !valid_unit_name(u)
    {
        return Err(format!("runbook {id}: {u:?} is not a unit name"));
    }
    Ok(p)
}

impl Runbook {
    /// Validates `params` against the runbook's schema.
    pub fn parse(id: &str, value: &Value) -> Result<Self, String> {
        Ok(match id {
            "restart_unit" => Runbook::RestartUnit(unit(id, value)?),
            "stop_unit" => Runbook::StopUnit(unit(id, value)?),
            "reapply_firewall" => Runbook::ReapplyFirewall(optional_unit(id, value)?),
            "run_backup" => Runbook::RunBackup(unit(id, value)?),
            "restore_test" => Runbook::RestoreTest(unit(id, value)?),
            "refresh_av_signatures" => Runbook::RefreshAvSignatures(params(id, value)?),
            "resync_time" => Runbook::ResyncTime(optional_unit(id, value)?),
            "switch_generation" => {
                let p: SwitchParams = params(id, value)?;
                p.instance().map_err(|e| format!("runbook {id}: {e}"))?;
                Runbook::SwitchGeneration(p)
            }
            "rollback_generation" => Runbook::RollbackGeneration(params(id, value)?),
            "collect_evidence" => Runbook::CollectEvidence(params(id, value)?),
            other => {
                return Err(format!(
                    "unknown runbook {other:?}; known: {}",
                    RUNBOOK_IDS.join(", ")
                ));
            }
        })
    }

    pub fn id(&self) -> &'static str {
        match self {
            Runbook::RestartUnit(_) => "restart_unit",
            Runbook::StopUnit(_) => "stop_unit",
            Runbook::ReapplyFirewall(_) => "reapply_firewall",
            Runbook::RunBackup(_) => "run_backup",
            Runbook::RestoreTest(_) => "restore_test",
            Runbook::RefreshAvSignatures(_) => "refresh_av_signatures",
            Runbook::ResyncTime(_) => "resync_time",
            Runbook::SwitchGeneration(_) => "switch_generation",
            Runbook::RollbackGeneration(_) => "rollback_generation",
            Runbook::CollectEvidence(_) => "collect_evidence",
        }
    }

    pub fn params(&self) -> Value {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("params").cloned())
            .unwrap_or(Value::Null)
    }

    /// The unit the runbook acts on, for cooldowns and the allowlist.
    pub fn target(&self) -> Option<&str> {
        match self {
            Runbook::RestartUnit(p)
            | Runbook::StopUnit(p)
            | Runbook::RunBackup(p)
            | Runbook::RestoreTest(p) => Some(&p.unit),
            Runbook::ReapplyFirewall(p) | Runbook::ResyncTime(p) => p.unit.as_deref(),
            _ => None,
        }
    }

    /// Disruptive runbooks wait for the maintenance window: generation
    /// changes, and restarts or stops of the services the site relies on.
    pub fn disruptive(&self, service_health_checks: &[String]) -> bool {
        match self {
            Runbook::SwitchGeneration(_) | Runbook::RollbackGeneration(_) => true,
            Runbook::RestartUnit(p) | Runbook::StopUnit(p) => {
                service_health_checks.contains(&p.unit)
            }
            _ => false,
        }
    }

    /// The least time between two runs against the same target.
    pub fn cooldown(&self) -> Duration {
        match self {
            Runbook::RestartUnit(_) | Runbook::StopUnit(_) => Duration::from_secs(30),
            Runbook::ReapplyFirewall(_) | Runbook::ResyncTime(_) => Duration::from_secs(60),
            Runbook::CollectEvidence(_) => Duration::ZERO,
            Runbook::RefreshAvSignatures(_) | Runbook::RunBackup(_) | Runbook::RestoreTest(_) => {
                Duration::from_secs(15 * 60)
            }
            Runbook::SwitchGeneration(_) | Runbook::RollbackGeneration(_) => {
                Duration::from_secs(10 * 60)
            }
        }
    }

    pub fn cooldown_key(&self) -> String {
        match self.target() {
            Some(t) => format!("{}:{t}", self.id()),
            None => self.id().to_owned(),
        }
    }
}

/// How long a job may take before it counts as failed.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restarted unit may take to become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The steps a runbook took, for the bundle's action_taken.
#[derive(Default)]
pub struct Steps {
    pub actions: Vec<ActionTaken>,
    pub failed: Option<String>,
}

impl Steps {
    fn push(
        &mut self,
        action: &str,
        command: String,
        exit_code: Option<i32>,
        started: Instant,
        result: String,
    ) {
        let step = self.actions.len() as u32 + 1;
        self.actions.push(ActionTaken {
            step,
            action: action.to_owned(),
            command: Some(command),
            exit_code,
            duration_sec: Some(started.elapsed().as_secs_f64()),
            result: Some(result),
        });
    }

    /// Runs a systemd job and records it; false when it did not finish "done".
    pub async fn job(&mut self, systemd: &Systemd, op: JobOp, unit: &str) -> bool {
        let started = Instant::now();
        let command = format!(
            "org.freedesktop.systemd1.Manager.{}(\"{unit}\", \"replace\")",
            op.method()
        );
        match systemd.run_job(op, unit, JOB_TIMEOUT).await {
            Ok(outcome) => {
                let ok = outcome.result == "done";
                self.push(
                    op.method(),
                    command,
                    None,
                    started,
                    format!("job {}: {}", outcome.job, outcome.result),
                );
                if !ok {
                    self.failed = Some(format!(
                        "{} {unit}: job result {}",
                        op.method(),
                        outcome.result
                    ));
                }
                ok
            }
            Err(e) => {
                self.push(op.method(), command, None, started, format!("error: {e}"));
                self.failed = Some(e.to_string());
                false
            }
        }
    }

    /// Waits until `unit` is active (or failed), and records the wait.
    pub async fn wait_active(&mut self, systemd: &Systemd, unit: &str) -> bool {
        let started = Instant::now();
        loop {
            match systemd.unit_state(unit).await {
                Ok(s) if s.is_active() => {
                    self.push(
                        "WaitActive",
                        format!("ActiveState of {unit}"),
                        None,
                        started,
                        format!("{} ({})", s.active_state, s.sub_state),
                    );
                    return true;
                }
                Ok(s) if s.active_state == "failed" || started.elapsed() > ACTIVE_TIMEOUT => {
                    self.push(
                        "WaitActive",
                        format!("ActiveState of {unit}"),
                        None,
                        started,
                        format!("{} ({})", s.active_state, s.sub_state),
                    );
                    self.failed = Some(format!("{unit} is {} after the restart", s.active_state));
                    return false;
                }
                Err(e) => {
                    self.failed = Some(e.to_string());
                    return false;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Runs a command and records it.
    pub async fn command(&mut self, action: &str, program: &str, args: &[&str]) -> bool {
        let started = Instant::now();
        let command = format!("{program} {}", args.join(" "));
        let run = tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(JOB_TIMEOUT, run).await {
            Ok(Ok(out)) => {
                let ok = out.status.success();
                let text = String::from_utf8_lossy(if ok { &out.stdout } else { &out.stderr })
                    .trim()
                    .to_owned();
                self.push(
                    action,
                    command.clone(),
                    out.status.code(),
                    started,
                    text.clone(),
                );
                if !ok {
                    self.failed = Some(format!("{command} failed: {text}"));
                }
                ok
            }
            Ok(Err(e)) => {
                self.push(
                    action,
                    command.clone(),
                    None,
                    started,
                    format!("cannot run: {e}"),
                );
                self.failed = Some(format!("cannot run {program}: {e}"));
                false
            }
            Err(_) => {
                self.push(action, command.clone(), None, started, "timed out".into());
                self.failed = Some(format!("{command} timed out"));
                false
            }
        }
    }
}

/// The switch unit instance: `compliance-agent-switch@<generation or store name>.service`.
pub fn switch_unit(instance: &str) -> String {
    format!("{SWITCH_TEMPLATE}{instance}.service")
}

/// Runs `runbook`'s steps (not its verification: the engine re-checks afterwards).
pub async fn execute(runbook: &Runbook, systemd: &Systemd) -> Steps {
    let mut steps = Steps::default();
    match runbook {
        Runbook::RestartUnit(p) => {
            if steps.job(systemd, JobOp::Restart, &p.unit).await {
                steps.wait_active(systemd, &p.unit).await;
            }
        }
        Runbook::StopUnit(p) => {
            steps.job(systemd, JobOp::Stop, &p.unit).await;
        }
        Runbook::ReapplyFirewall(p) => {
            // nftables.service loads the whole file with `nft -f`: one transaction,
            // so the box never runs without a ruleset in between.
            let unit = p.unit.as_deref().unwrap_or("nftables.service");
            if steps.job(systemd, JobOp::Restart, unit).await {
                steps.wait_active(systemd, unit).await;
            }
        }
        Runbook::RunBackup(p) | Runbook::RestoreTest(p) => {
            // Oneshot units: the start job finishes when the run does.
            steps.job(systemd, JobOp::Start, &p.unit).await;
        }
        Runbook::RefreshAvSignatures(_) => {
            steps.job(systemd, JobOp::Start, FRESHCLAM_UNIT).await;
        }
        Runbook::ResyncTime(p) => {
            let stepped = steps.command("makestep", "chronyc", &["makestep"]).await;
            if !stepped && let Some(unit) = &p.unit {
                // Not allowed to command chronyd: restart it, and its makestep directive steps the clock.
                steps.failed = None;
                if steps.job(systemd, JobOp::Restart, unit).await {
                    steps.wait_active(systemd, unit).await;
                }
            }
        }
        Runbook::SwitchGeneration(p) => match p.instance() {
            Ok(instance) => {
                steps
                    .job(systemd, JobOp::Start, &switch_unit(&instance))
                    .await;
            }
            Err(e) => steps.failed = Some(e),
        },
        Runbook::RollbackGeneration(_) => {
            steps.job(systemd, JobOp::Start, ROLLBACK_UNIT).await;
        }
        Runbook::CollectEvidence(_) => {}
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_are_validated() {
        assert_eq!(
            Runbook::parse("restart_unit", &json!({"unit": "sshd.service"})),
            Ok(Runbook::RestartUnit(UnitParams {
                unit: "sshd.service".into()
            }))
        );
        assert!(
            Runbook::parse("restart_unit", &json!({})).is_err(),
            "unit is required"
        );
        assert!(
            Runbook::parse("restart_unit", &json!({"unit": "x; reboot"})).is_err(),
            "unit names are checked"
        );
        assert!(
            Runbook::parse("restart_unit", &json!({"unit": "a.service", "force": true})).is_err(),
            "unknown params refused"
        );
        assert!(
            Runbook::parse("switch_generation", &json!({"generation": "7"})).is_err(),
            "typed"
        );
        assert!(
            Runbook::parse("switch_generation", &json!({})).is_err(),
            "one of generation, store_path"
        );
        assert!(
            Runbook::parse("switch_generation", &json!({"store_path": "/etc/passwd"})).is_err()
        );
        assert!(
            Runbook::parse(
                "switch_generation",
                &json!({"store_path": "/nix/store/../../etc"})
            )
            .is_err()
        );
        let ok = Runbook::parse(
            "switch_generation",
            &json!({"store_path": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-fd-25.11"}),
        );
        assert!(ok.is_ok(), "{ok:?}");
        assert!(
            Runbook::parse("rm_rf", &json!({}))
                .expect_err("unknown")
                .contains("unknown runbook")
        );
        assert_eq!(
            Runbook::parse("collect_evidence", &Value::Null),
            Ok(Runbook::CollectEvidence(NoParams {}))
        );
        for id in RUNBOOK_IDS {
            let sample = match *id {
                "restart_unit" | "stop_unit" | "run_backup" | "restore_test" => {
                    json!({"unit": "a.service"})
                }
                "switch_generation" => json!({"generation": 3}),
                _ => json!({}),
            };
            let rb = Runbook::parse(id, &sample).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(rb.id(), *id);
            assert_eq!(
                Runbook::parse(id, &rb.params()),
                Ok(rb.clone()),
                "{id} params round-trip"
            );
        }
    }

    #[test]
    fn disruptive_runbooks() {
        let health = vec!["clinic-app.service".to_owned()];
        assert!(
            Runbook::parse("switch_generation", &json!({"generation": 2}))
                .is_ok_and(|r| r.disruptive(&health))
        );
        assert!(
            Runbook::parse("restart_unit", &json!({"unit": "clinic-app.service"}))
                .is_ok_and(|r| r.disruptive(&health))
        );
        assert!(
            Runbook::parse("restart_unit", &json!({"unit": "sshd.service"}))
                .is_ok_and(|r| !r.disruptive(&health))
        );
    }
}
