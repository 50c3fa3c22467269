//! `scan`: every check against the baseline, the score, and one signed bundle per applicable check.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use crate::baseline::Baseline;
use crate::config::{Config, ConfigSource};
use crate::drift::{self, CheckResult, Context, Status};
use crate::evidence::{Check, Draft, EvidenceStore, Outcome, StoredBundle};
use crate::systemd::Systemd;
use crate::{Error, Result};

/// The baseline a scan uses: `--baseline`, else `baseline_path`, else the local default.
pub fn load_baseline(
    config: &Config,
    explicit: Option<&Path>,
    root: &Path,
) -> Result<(Baseline, Option<PathBuf>)> {
    let path = explicit
        .map(Path::to_owned)
        .or_else(|| config.baseline_path.clone());
    match path {
        Some(p) => {
            let b = Baseline::load(&p).map_err(|e| Error::Usage(e.to_string()))?;
            Ok((b, Some(p)))
        }
        None => Ok((Baseline::local_default(root, config.ntp_max_skew_ms), None)),
    }
}

/// Why a check is left out of the local default on this machine.
fn local_default_reason(check: Check) -> &'static str {
    match check {
        Check::Patching => "not NixOS here (no /nix/var/nix/profiles/system)",
        Check::AvHealth => "no ClamAV daemon here (no /run/clamav/clamd.ctl)",
        Check::Backup => "no backup repository is declared without a baseline",
        Check::Logging => "systemd is not running here (no /run/systemd/system)",
        Check::Firewall => "nftables is not installed here",
        Check::TimeSync => "chrony is not installed here",
        Check::Services => "no units are declared without a baseline",
        _ => "not in the local default baseline",
    }
}

/// Runs every check of `baseline`.
pub async fn run_checks(baseline: &Baseline, root: &Path) -> Vec<CheckResult> {
    let (systemd, systemd_error) = match Systemd::system().await {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let ctx = Context {
        baseline,
        systemd: systemd.as_ref(),
        systemd_error,
        root: root.to_owned(),
        now: jiff::Timestamp::now(),
        credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    };
    drift::run_all(&ctx).await
}

/// The evidence draft of one check result.
pub fn draft_for(result: &CheckResult) -> Draft {
    let outcome = match result.status {
        Status::Compliant => Outcome::Success,
        _ => Outcome::Alert,
    };
    let mut draft = Draft::new(result.check, outcome);
    draft.timestamp_start = result.started;
    draft.hipaa_controls = Some(result.hipaa_controls.clone());
    draft.pre_state = json!({
        "status": result.status,
        "severity": result.severity,
        "reason": result.reason,
        "facts": result.facts,
        "recommended": result.recommended,
    });
    if result.status != Status::Compliant {
        draft.error = Some(result.reason.clone());
    }
    if result.check == Check::Firewall {
        draft.ruleset_hash = result
            .facts
            .get("ruleset_hash")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    if result.check == Check::TimeSync {
        draft.ntp_offset_ms = result
            .facts
            .get("tracking")
            .and_then(|t| t.get("system_offset_sec"))
            .and_then(Value::as_f64)
            .map(|s| (s * 1000.0).round() as i64);
    }
    draft
}

#[derive(Serialize)]
struct ScanReport<'a> {
    score: f64,
    baseline: Option<&'a Path>,
    policy_version: &'a str,
    results: &'a [CheckResult],
    bundles: &'a [StoredBundle],
}

/// Exit status of a scan: 2 when a check could not run, 1 on drift, else 0.
pub fn exit_code(results: &[CheckResult]) -> u8 {
    if results.iter().any(|r| r.status == Status::Error) {
        2
    } else if results.iter().any(|r| r.status == Status::Drifted) {
        1
    } else {
        0
    }
}

/// What `scan` was asked to do.
pub struct ScanOptions<'a> {
    pub baseline: Option<&'a Path>,
    pub root: &'a Path,
    pub write_evidence: bool,
    pub json: bool,
}

pub fn run_scan(config: &Config, options: &ScanOptions<'_>) -> Result<ExitCode> {
    let (write_evidence, json) = (options.write_evidence, options.json);
    let (baseline, baseline_path) = load_baseline(config, options.baseline, options.root)?;
    let runtime = crate::runtime()?;
    let mut results = runtime.block_on(run_checks(&baseline, options.root));
    if baseline_path.is_none() {
        for r in results
            .iter_mut()
            .filter(|r| r.status == Status::NotApplicable)
        {
            r.reason = local_default_reason(r.check).into();
        }
    }
    let score = drift::score(&results);

    let bundles = if write_evidence {
        let store = crate::resources::open_evidence_store(config)?;
        let drafts: Vec<Draft> = results
            .iter()
            .filter(|r| r.status != Status::NotApplicable)
            .map(draft_for)
            .collect();
        store.store_many(drafts)?
    } else {
        Vec::new()
    };

    if json {
        let report = ScanReport {
            score,
            baseline: baseline_path.as_deref(),
            policy_version: &baseline.policy_version,
            results: &results,
            bundles: &bundles,
        };
        let text =
            serde_json::to_string_pretty(&report).map_err(crate::evidence::EvidenceError::from)?;
        out!("{text}");
    } else {
        out!(
            "{:<12} {:<15} {:<9} {:<62} REASON",
            "CHECK",
            "STATUS",
            "SEVERITY",
            "HIPAA CONTROLS"
        );
        for r in &results {
            let severity = if matches!(r.status, Status::Compliant | Status::NotApplicable) {
                "-"
            } else {
                r.severity.as_str()
            };
            out!(
                "{:<12} {:<15} {:<9} {:<62} {}",
                r.check.as_str(),
                r.status.as_str(),
                severity,
                r.hipaa_controls.join(", "),
                r.reason
            );
        }
        let applicable = results
            .iter()
            .filter(|r| r.status != Status::NotApplicable)
            .count();
        let compliant = results
            .iter()
            .filter(|r| r.status == Status::Compliant)
            .count();
        let source = match (&baseline_path, &config.source) {
            (Some(p), _) => format!("baseline {}", p.display()),
            (None, ConfigSource::Embedded) => "the embedded local default baseline".into(),
            (None, ConfigSource::File(_)) => {
                "the embedded local default baseline (no baseline_path configured)".into()
            }
        };
        out!("");
        out!(
            "compliance score: {score:.0}% ({compliant} of {applicable} applicable checks compliant) against {source}"
        );
        if write_evidence {
            out!(
                "{} signed bundle(s) written to {} (verify: compliance-agent evidence verify)",
                bundles.len(),
                config.evidence_dir.display()
            );
        }
    }
    Ok(ExitCode::from(exit_code(&results)))
}

/// One drifted check's fix: what the guardrails decided and what came of it.
#[derive(Clone, Debug, Serialize)]
pub struct HealLine {
    pub check: Check,
    pub runbook: Option<String>,
    pub params: Value,
    pub decision: crate::heal::Decision,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    pub bundle_id: Option<String>,
    pub duration_ms: u64,
}

/// What one heal cycle saw and did.
pub struct Cycle {
    pub results: Vec<CheckResult>,
    pub lines: Vec<HealLine>,
    /// Bundles written, in order (heal attempts, and with `scan_evidence` every applicable check).
    pub stored: Vec<StoredBundle>,
}

/// Stores a draft off the async threads (signing and fsync block).
async fn store_draft(store: &Arc<EvidenceStore>, draft: Draft) -> Result<StoredBundle> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.store(draft))
        .await
        .map_err(|e| Error::Usage(format!("evidence writer task failed: {e}")))?
        .map_err(Error::from)
}

/// Checks, plans and (unless `store` is None: a dry run) fixes, storing each
/// bundle as soon as it exists so that a kill loses no finished fix. With
/// `scan_evidence`, every applicable check's result is recorded too.
pub async fn heal_cycle(
    engine: &mut crate::heal::Engine<'_>,
    store: Option<&Arc<EvidenceStore>>,
    only: Option<Check>,
    scan_evidence: bool,
) -> Result<Cycle> {
    let mut stored = Vec::new();
    if let Some(store) = store
        && let Some(draft) = engine.resolve_in_flight().await
    {
        stored.push(store_draft(store, draft).await?);
    }
    let results: Vec<CheckResult> = engine
        .check_all()
        .await
        .into_iter()
        .filter(|r| only.is_none_or(|c| c == r.check))
        .collect();
    engine.note_compliant(&results);
    if scan_evidence && let Some(store) = store {
        let drafts: Vec<Draft> = results
            .iter()
            .filter(|r| r.status != Status::NotApplicable)
            .map(draft_for)
            .collect();
        let writer = store.clone();
        let written = tokio::task::spawn_blocking(move || writer.store_many(drafts))
            .await
            .map_err(|e| Error::Usage(format!("evidence writer task failed: {e}")))??;
        stored.extend(written);
    }
    let items = crate::heal::plan(
        &results,
        engine.config,
        engine.baseline,
        &engine.state,
        jiff::Timestamp::now(),
    );
    let mut lines = Vec::new();
    for item in &items {
        let started = std::time::Instant::now();
        let mut line = HealLine {
            check: item.check,
            runbook: item.runbook.as_ref().map(|r| r.id().to_owned()),
            params: item
                .runbook
                .as_ref()
                .map(|r| r.params())
                .unwrap_or(Value::Null),
            decision: item.decision.clone(),
            outcome: None,
            error: None,
            bundle_id: None,
            duration_ms: 0,
        };
        if let Some(store) = store
            && let Some(before) = results.iter().find(|r| r.check == item.check)
            && let Some(draft) = engine.carry_out(item, before).await
        {
            line.outcome = Some(draft.outcome);
            line.error = draft.error.clone();
            let bundle = store_draft(store, draft).await?;
            line.bundle_id = Some(bundle.bundle_id.clone());
            stored.push(bundle);
            engine
                .state
                .save(&engine.config.state_dir)
                .map_err(|e| Error::Usage(e.to_string()))?;
        }
        line.duration_ms = started.elapsed().as_millis() as u64;
        lines.push(line);
    }
    if store.is_some() {
        engine
            .state
            .save(&engine.config.state_dir)
            .map_err(|e| Error::Usage(e.to_string()))?;
    }
    // After fixes, report the box as it is now, not as it was found.
    let results = if lines.iter().any(|l| l.outcome.is_some()) {
        engine
            .check_all()
            .await
            .into_iter()
            .filter(|r| only.is_none_or(|c| c == r.check))
            .collect()
    } else {
        results
    };
    Ok(Cycle {
        results,
        lines,
        stored,
    })
}

/// `heal`: checks, plan, guardrails, fixes, evidence.
pub fn run_heal(
    config: &Config,
    baseline_arg: Option<&Path>,
    only: Option<Check>,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode> {
    use crate::heal::{Decision, Engine, HealState};
    let (baseline, _) = load_baseline(config, baseline_arg, Path::new("/"))?;
    let runtime = crate::runtime()?;
    runtime.block_on(async {
        let systemd = Systemd::system()
            .await
            .map_err(|e| Error::Usage(format!("healing needs systemd: {e}")))?;
        let state = HealState::load(&config.state_dir).map_err(|e| Error::Usage(e.to_string()))?;
        let mut engine = Engine {
            config,
            baseline: &baseline,
            systemd: &systemd,
            root: PathBuf::from("/"),
            state,
        };
        let store = if dry_run {
            None
        } else {
            Some(Arc::new(crate::resources::open_evidence_store(config)?))
        };
        let lines = heal_cycle(&mut engine, store.as_ref(), only, false)
            .await?
            .lines;
        let all_fixed = lines.iter().all(|l| {
            matches!(l.outcome, Some(Outcome::Success))
                || matches!(l.decision, Decision::Cooldown { .. })
        });
        if json {
            let text = serde_json::to_string_pretty(&json!({ "dry_run": dry_run, "plan": lines }))
                .map_err(crate::evidence::EvidenceError::from)?;
            out!("{text}");
        } else if lines.is_empty() {
            out!("nothing to heal: no applicable check has drifted");
        } else {
            out!(
                "{:<12} {:<22} {:<14} {:<9} DETAIL",
                "CHECK",
                "RUNBOOK",
                "DECISION",
                "OUTCOME"
            );
            for l in &lines {
                let decision = serde_json::to_value(&l.decision)
                    .ok()
                    .and_then(|v| v.get("decision").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                let detail = match (&l.error, &l.decision) {
                    (Some(e), _) => e.clone(),
                    (None, Decision::Defer { window_opens }) => {
                        format!("waits for the window at {window_opens}")
                    }
                    (None, Decision::Cooldown { until }) => format!("cooling down until {until}"),
                    (None, Decision::NoRunbook { reason }) => reason.clone(),
                    (None, _) => l.params.to_string(),
                };
                out!(
                    "{:<12} {:<22} {:<14} {:<9} {}",
                    l.check.as_str(),
                    l.runbook.as_deref().unwrap_or("-"),
                    decision,
                    l.outcome
                        .map_or(if dry_run { "(dry run)" } else { "-" }, |o| o.as_str()),
                    detail
                );
            }
        }
        Ok(ExitCode::from(if all_fixed { 0 } else { 1 }))
    })
}
