//! Backups: the backup unit's last run, the newest snapshot read from the repository itself (restic), the last restore test.

use std::fs;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Assessment, Context, Severity, age_secs};
use crate::baseline::Backup;

/// One entry of `restic snapshots --json`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Snapshot {
    pub time: jiff::Timestamp,
    #[serde(default)]
    pub short_id: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Parses `restic snapshots --json` output.
pub fn parse_snapshots(json: &[u8]) -> Result<Vec<Snapshot>, String> {
    serde_json::from_slice::<Option<Vec<Snapshot>>>(json)
        .map(Option::unwrap_or_default)
        .map_err(|e| format!("restic printed something that is not a snapshot list: {e}"))
}

/// A local repository path (restic's `local:` backend or a plain path), read directly.
fn local_repository(repository: &str) -> Option<&str> {
    if let Some(path) = repository.strip_prefix("local:") {
        return Some(path);
    }
    (!repository.contains(':') && repository.starts_with('/')).then_some(repository)
}

/// The newest snapshot of a local repository, read from the repository's
/// layout itself: each snapshot is one file under `snapshots/`, written when
/// the backup finished. Needs no password, so no key derivation (restic's
/// scrypt takes about half a second and 50 MB per call).
pub fn local_snapshots(repo: &std::path::Path) -> Result<Vec<Snapshot>, String> {
    if !repo.join("config").is_file() {
        return Err(format!(
            "{} is not a restic repository (no config file)",
            repo.display()
        ));
    }
    let dir = repo.join("snapshots");
    let entries = fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let written = entry
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| format!("cannot stat snapshot {name}: {e}"))?;
        let time =
            jiff::Timestamp::try_from(written).map_err(|e| format!("snapshot {name}: {e}"))?;
        out.push(Snapshot {
            time,
            short_id: name[..8].to_owned(),
            hostname: String::new(),
            paths: Vec::new(),
        });
    }
    Ok(out)
}

async fn restic_snapshots(
    repository: &str,
    password_file: &std::path::Path,
) -> Result<Vec<Snapshot>, String> {
    let run = tokio::process::Command::new("restic")
        .args([
            "snapshots",
            "--json",
            "--latest",
            "1",
            "--no-lock",
            "--no-cache",
            "--quiet",
        ])
        .env("RESTIC_REPOSITORY", repository)
        .env("RESTIC_PASSWORD_FILE", password_file)
        .env_remove("RESTIC_PASSWORD")
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run restic: {e}")),
        Err(_) => return Err("restic did not answer within 60 s".into()),
    };
    if !out.status.success() {
        return Err(format!(
            "restic snapshots failed (exit {}): {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_snapshots(&out.stdout)
}

pub async fn check(ctx: &Context<'_>, spec: &Backup, mut a: Assessment) -> Assessment {
    a.fact("tool", &spec.tool);
    a.fact("repository", &spec.repository);
    if spec.tool != "restic" {
        a.error(format!(
            "backup tool {:?} is not supported (restic is)",
            spec.tool
        ));
        return a;
    }
    let unit_state = match &spec.unit {
        Some(unit) => Some((unit, ctx.unit(unit).await)),
        None => None,
    };
    match unit_state {
        None => {}
        Some((unit, Ok(state))) => {
            let result = state.result.clone().unwrap_or_default();
            if !state.exists() {
                a.drift(
                    Severity::High,
                    format!("the backup unit {unit} does not exist"),
                );
            } else if state.active_state == "failed" || (!result.is_empty() && result != "success")
            {
                a.drift(
                    Severity::High,
                    format!(
                        "the last backup run failed ({} / {result})",
                        state.active_state
                    ),
                );
                a.recommend("run_backup", json!({ "unit": spec.unit }));
            }
            a.fact("unit", state);
        }
        Some((unit, Err(e))) => a.error(format!("{unit}: {e}")),
    }

    let local = local_repository(&spec.repository).filter(|_| !spec.verify_with_restic);
    let snapshots = match local {
        Some(path) => {
            a.fact("snapshot_source", "repository layout (local)");
            local_snapshots(&ctx.path(path))
        }
        None => {
            a.fact("snapshot_source", "restic snapshots");
            match ctx.credential_path(&spec.password_file) {
                Err(e) => Err(e),
                Ok(password_file) => restic_snapshots(&spec.repository, &password_file).await,
            }
        }
    };
    {
        match snapshots {
            Ok(snaps) => match snaps.iter().max_by_key(|s| s.time) {
                None => {
                    a.drift(
                        Severity::Critical,
                        "the repository holds no snapshot".to_owned(),
                    );
                    a.recommend("run_backup", json!({ "unit": spec.unit }));
                }
                Some(newest) => {
                    let hours = age_secs(ctx.now, newest.time) / 3600;
                    a.fact("latest_snapshot", newest);
                    a.fact("snapshot_age_hours", hours);
                    if hours as u64 > spec.max_snapshot_age_hours {
                        a.drift(
                            Severity::High,
                            format!(
                                "the newest snapshot is {hours} h old (limit {} h)",
                                spec.max_snapshot_age_hours
                            ),
                        );
                        a.recommend("run_backup", json!({ "unit": spec.unit }));
                    }
                }
            },
            Err(e) => a.error(e),
        }
    }

    if let Some(unit) = &spec.restore_test_unit {
        let mut last_success = None;
        if let Some(marker) = &spec.restore_test_marker {
            last_success = fs::metadata(ctx.path(marker))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| jiff::Timestamp::try_from(t).ok());
        }
        match ctx.unit(unit).await {
            Ok(state) => {
                if state.result.as_deref().is_some_and(|r| r != "success")
                    || state.active_state == "failed"
                {
                    a.drift(
                        Severity::High,
                        format!(
                            "the last restore test failed ({})",
                            state.result.as_deref().unwrap_or("?")
                        ),
                    );
                    a.recommend("restore_test", json!({}));
                }
                if last_success.is_none() && state.result.as_deref() == Some("success") {
                    last_success = state.exec_main_exit;
                }
                a.fact("restore_test_unit", state);
            }
            Err(e) => a.error(format!("{unit}: {e}")),
        }
        a.fact("restore_test_last_success", last_success);
        if let Some(max_days) = spec.max_restore_test_age_days {
            match last_success {
                None => {
                    a.drift(
                        Severity::Medium,
                        "no successful restore test is recorded".to_owned(),
                    );
                    a.recommend("restore_test", json!({}));
                }
                Some(t) if age_secs(ctx.now, t) / 86_400 > max_days as i64 => {
                    a.drift(
                        Severity::Medium,
                        format!(
                            "the last successful restore test is {} days old (limit {max_days})",
                            age_secs(ctx.now, t) / 86_400
                        ),
                    );
                    a.recommend("restore_test", json!({}));
                }
                Some(_) => {}
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists() {
        let s = parse_snapshots(br#"[{"time":"2026-11-29T02:00:01.123456789+01:00","short_id":"4f1c2b3a","hostname":"fd","paths":["/srv/ehr"],"tree":"x","id":"y"}]"#)
            .expect("restic output");
        assert_eq!(s[0].short_id, "4f1c2b3a");
        assert!(
            parse_snapshots(b"null")
                .expect("empty repository")
                .is_empty()
        );
        assert!(parse_snapshots(b"Fatal: wrong password").is_err());
    }
}
