//! Logging and audit: journald running and persistent with its retention, auditd running, the audit rules in force.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use super::{Assessment, Context, Severity};
use crate::baseline::Logging;

/// The `[Journal]` settings that matter, after drop-ins (later files win).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct JournaldConfig {
    pub storage: Option<String>,
    pub max_retention_sec: Option<u64>,
    pub files: Vec<String>,
}

/// A systemd time span ("1year", "6month", "30d", "3600") in seconds.
pub fn parse_timespan(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    let mut total = 0u64;
    for part in text.split_whitespace() {
        let split = part.find(|c: char| !c.is_ascii_digit())?;
        let (num, unit) = part.split_at(split);
        let n: u64 = num.parse().ok()?;
        let factor = match unit {
            "s" | "sec" | "second" | "seconds" => 1,
            "m" | "min" | "minute" | "minutes" => 60,
            "h" | "hr" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 604_800,
            "M" | "month" | "months" => 2_630_016,
            "y" | "year" | "years" => 31_557_600,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(factor)?)?;
    }
    Some(total)
}

/// Reads journald.conf and its drop-ins under `root` as journald would.
pub fn read_journald_config(root: &Path) -> JournaldConfig {
    let mut files = vec![root.join("etc/systemd/journald.conf")];
    let mut dropins = Vec::new();
    for dir in [
        "usr/lib/systemd/journald.conf.d",
        "run/systemd/journald.conf.d",
        "etc/systemd/journald.conf.d",
    ] {
        if let Ok(entries) = fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "conf") {
                    dropins.push(e.path());
                }
            }
        }
    }
    // Drop-ins apply in file-name order across directories.
    dropins.sort_by_key(|p| p.file_name().map(|f| f.to_os_string()));
    files.extend(dropins);
    let mut config = JournaldConfig::default();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        config.files.push(file.display().to_string());
        let mut in_journal = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_journal = line == "[Journal]";
                continue;
            }
            if !in_journal || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                match k.trim() {
                    "Storage" => config.storage = Some(v.trim().to_owned()),
                    "MaxRetentionSec" => config.max_retention_sec = parse_timespan(v),
                    _ => {}
                }
            }
        }
    }
    config
}

/// Audit rules as comparable lines, in one canonical form for what the
/// baseline declares (auditctl's input) and what `auditctl -l` prints:
/// whitespace folded, `-k KEY` as `-F key=KEY`, the unset login uid
/// (4294967295, -1 or `unset`) as `unset`, and the syscalls of a rule as one
/// sorted `-S` list (auditctl lists them in syscall-number order).
pub fn normalize_rules(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && *l != "No rules")
        .map(canonical_rule)
        .collect()
}

fn canonical_rule(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let is_watch = words.first() == Some(&"-w");
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut syscalls: Vec<&str> = Vec::new();
    let mut syscall_slot = None;
    let mut i = 0;
    while i < words.len() {
        match (words[i], words.get(i + 1)) {
            ("-S", Some(list)) => {
                syscalls.extend(list.split(',').filter(|s| !s.is_empty()));
                syscall_slot.get_or_insert(out.len());
                i += 2;
            }
            ("-k", Some(key)) if !is_watch => {
                out.push(format!("-F key={key}"));
                i += 2;
            }
            ("-F", Some(field)) if !is_watch => {
                out.push(format!("-F {}", canonical_field(field)));
                i += 2;
            }
            (word, _) => {
                out.push(word.to_owned());
                i += 1;
            }
        }
    }
    if let Some(slot) = syscall_slot {
        syscalls.sort_unstable();
        syscalls.dedup();
        out.insert(slot, format!("-S {}", syscalls.join(",")));
    }
    out.join(" ")
}

fn canonical_field(field: &str) -> String {
    for op in ["!=", ">=", "<=", "=", ">", "<"] {
        if let Some((name, value)) = field.split_once(op) {
            let value = match value {
                "4294967295" | "-1" | "unset" if name.ends_with("uid") => "unset",
                other => other,
            };
            return format!("{name}{op}{value}");
        }
    }
    field.to_owned()
}

/// The kernel's audit state from a `# enabled N` line (the root export
/// writes `auditctl -s`'s `enabled` there): 2 means the rules are locked.
fn audit_enabled_state(text: &str) -> Option<u8> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("# enabled "))
        .and_then(|n| n.trim().parse().ok())
}

async fn rules_in_force(ctx: &Context<'_>, spec: &Logging) -> Result<String, String> {
    if let Some(file) = &spec.audit_rules_export_file {
        if let Some(unit) = &spec.audit_rules_export_unit {
            // A fresh export; if it cannot be started the last one is still read.
            if let Some(systemd) = ctx.systemd {
                let _ = systemd
                    .run_job(crate::systemd::JobOp::Start, unit, Duration::from_secs(10))
                    .await;
            }
        }
        return fs::read_to_string(ctx.path(file)).map_err(|e| {
            format!(
                "cannot read the exported audit rules {}: {e}",
                file.display()
            )
        });
    }
    let run = tokio::process::Command::new("auditctl")
        .arg("-l")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(out)) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Ok(out)) => Err(format!(
            "auditctl -l failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("cannot run auditctl: {e}")),
        Err(_) => Err("auditctl -l did not answer within 5 s".into()),
    }
}

pub async fn check(ctx: &Context<'_>, spec: &Logging, mut a: Assessment) -> Assessment {
    a.require_active(ctx, "systemd-journald.service", Severity::Critical)
        .await;
    let config = read_journald_config(&ctx.root);
    let journal_dir = ctx.path("/var/log/journal").is_dir();
    let storage = config.storage.clone().unwrap_or_else(|| "auto".into());
    let persistent = storage == "persistent" || (storage == "auto" && journal_dir);
    a.fact("journald_storage", &storage);
    a.fact("journal_directory", journal_dir);
    a.fact("journald_persistent", persistent);
    a.fact("journald_max_retention_sec", config.max_retention_sec);
    if spec.journald_persistent && !persistent {
        a.drift(
            Severity::High,
            format!("the journal is not persistent (Storage={storage}, /var/log/journal {}): logs are lost at reboot", if journal_dir { "exists" } else { "missing" }),
        );
    }
    if let Some(expected) = spec.journald_max_retention_sec
        && config.max_retention_sec != Some(expected)
    {
        a.drift(
            Severity::Medium,
            format!(
                "journald MaxRetentionSec is {} s, the baseline says {expected} s",
                config
                    .max_retention_sec
                    .map_or("unset".to_owned(), |v| v.to_string())
            ),
        );
    }
    a.fact("journald_config_files", &config.files);

    if spec.auditd {
        a.require_active(ctx, "auditd.service", Severity::High)
            .await;
        if !spec.audit_rules.is_empty() {
            match rules_in_force(ctx, spec).await {
                Ok(text) => {
                    let live = normalize_rules(&text);
                    let expected = normalize_rules(&spec.audit_rules.join("\n"));
                    let missing: Vec<&String> = expected.difference(&live).collect();
                    let extra: Vec<&String> = live.difference(&expected).collect();
                    let locked = audit_enabled_state(&text) == Some(2);
                    a.fact("audit_rules_missing", &missing);
                    a.fact("audit_rules_extra", &extra);
                    a.fact("audit_rules_in_force", live.len());
                    a.fact("audit_rules_locked", locked);
                    if !missing.is_empty() {
                        // Locked rules (-e 2) change only at boot: a generation
                        // that changed them is running with the old ones until
                        // a reboot, which no runbook does on its own.
                        let why = if locked {
                            "; the rules are locked (-e 2) until reboot, so this generation's rules load at the next reboot"
                        } else {
                            ""
                        };
                        a.fact("audit_rules_pending_reboot", locked);
                        a.drift(
                            Severity::High,
                            format!(
                                "{} audit rule(s) of the baseline are not in force{why}",
                                missing.len()
                            ),
                        );
                    }
                    if !extra.is_empty() {
                        a.drift(
                            Severity::Low,
                            format!(
                                "{} audit rule(s) in force are not in the baseline",
                                extra.len()
                            ),
                        );
                    }
                }
                Err(e) => a.error(e),
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespans() {
        assert_eq!(parse_timespan("3600"), Some(3600));
        assert_eq!(parse_timespan("1year"), Some(31_557_600));
        assert_eq!(parse_timespan("30d"), Some(2_592_000));
        assert_eq!(parse_timespan("1h 30min"), Some(5400));
        assert_eq!(parse_timespan("soon"), None);
    }

    #[test]
    fn journald_dropins_override() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("etc/systemd/journald.conf.d")).expect("mkdir");
        fs::write(
            root.join("etc/systemd/journald.conf"),
            "[Journal]\nStorage=volatile\n#MaxRetentionSec=1d\n",
        )
        .expect("write");
        let c = read_journald_config(root);
        assert_eq!(c.storage.as_deref(), Some("volatile"));
        assert_eq!(c.max_retention_sec, None);
        fs::write(
            root.join("etc/systemd/journald.conf.d/50-hipaa.conf"),
            "[Journal]\nStorage=persistent\nMaxRetentionSec=1year\n",
        )
        .expect("write");
        let c = read_journald_config(root);
        assert_eq!(c.storage.as_deref(), Some("persistent"));
        assert_eq!(c.max_retention_sec, Some(31_557_600));
    }

    /// Invariant: a rule as the baseline declares it and the same rule as
    /// `auditctl -l` prints it are one rule; a different rule is not.
    #[test]
    fn audit_rules_compare_in_auditctl_form() {
        let declared = normalize_rules(
            "-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k kernel-modules\n\
             -a always,exit -F arch=b64 -S adjtimex -F auid>=1000 -F auid!=4294967295 -k time-change\n\
             -w /etc/passwd -p wa -k identity\n",
        );
        for listed in [
            "-a always,exit -F arch=b64 -S init_module,delete_module,finit_module -F key=kernel-modules\n\
             -a always,exit -F arch=b64 -S adjtimex -F auid>=1000 -F auid!=-1 -F key=time-change\n\
             -w /etc/passwd -p wa -k identity\n",
            "-a always,exit -F arch=b64 -S init_module -S delete_module -S finit_module -F key=kernel-modules\n\
             -a always,exit -F arch=b64 -S adjtimex -F auid>=1000 -F auid!=unset -F key=time-change\n\
             -w /etc/passwd -p wa -k identity\n",
        ] {
            let live = normalize_rules(listed);
            assert_eq!(declared, live, "{listed}");
        }
        let other = normalize_rules(
            "-a always,exit -F arch=b32 -S init_module,finit_module,delete_module -k kernel-modules",
        );
        assert!(declared.is_disjoint(&other), "another arch is another rule");
        let other_uid = normalize_rules(
            "-a always,exit -F arch=b64 -S adjtimex -F auid>=0 -F auid!=-1 -k time-change",
        );
        assert!(
            declared.is_disjoint(&other_uid),
            "another auid bound is another rule"
        );
    }

    #[test]
    fn audit_lock_state_from_export() {
        assert_eq!(
            audit_enabled_state("# enabled 2\n-w /etc/passwd -p wa -k identity\n"),
            Some(2)
        );
        assert_eq!(audit_enabled_state("# enabled 1\n"), Some(1));
        assert_eq!(
            audit_enabled_state("-w /etc/passwd -p wa -k identity\n"),
            None
        );
    }

    #[test]
    fn audit_rules_compare_by_line() {
        let live = normalize_rules(
            "-w /etc/passwd  -p wa -k identity\n-w /etc/shadow -p wa -k identity\n",
        );
        let expected = normalize_rules("-w /etc/passwd -p wa -k identity");
        assert_eq!(expected.difference(&live).count(), 0);
        assert_eq!(live.difference(&expected).count(), 1);
        assert!(normalize_rules("No rules\n").is_empty());
    }
}
