//! Patching: the running NixOS generation, the system profile, the target the MSP declared, the generation's age.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::{Assessment, Context, Severity, age_secs};
use crate::baseline::Patching;

/// `system-42-link` -> 42, for the profile named `system`.
fn generation_number(profile_name: &str, link_name: &str) -> Option<u64> {
    link_name
        .strip_prefix(profile_name)?
        .strip_prefix('-')?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

/// The generations of a Nix profile, oldest first: (number, link path).
pub fn generations(profile: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let (Some(dir), Some(name)) = (
        profile.parent(),
        profile.file_name().and_then(|n| n.to_str()),
    ) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|f| generation_number(name, f))
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The generation the profile link points at.
pub fn current_generation(profile: &Path) -> std::io::Result<Option<u64>> {
    let target = fs::read_link(profile)?;
    let name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("system");
    Ok(target
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| generation_number(name, f)))
}

fn resolve(path: &Path) -> Option<String> {
    fs::canonicalize(path).ok().map(|p| p.display().to_string())
}

pub async fn check(ctx: &Context<'_>, spec: &Patching, mut a: Assessment) -> Assessment {
    let profile = ctx.path(&spec.system_profile);
    let current_gen = match current_generation(&profile) {
        Ok(g) => g,
        Err(e) => {
            a.error(format!(
                "no system profile at {} ({e}): is this NixOS?",
                spec.system_profile.display()
            ));
            return a;
        }
    };
    let gens = generations(&profile).unwrap_or_default();
    let profile_path = resolve(&profile);
    let running = resolve(&ctx.path("/run/current-system"));
    let booted = resolve(&ctx.path("/run/booted-system"));
    let kernel_now = resolve(&ctx.path("/run/current-system/kernel"));
    let kernel_booted = resolve(&ctx.path("/run/booted-system/kernel"));
    let flake_revision = running
        .as_ref()
        .and_then(|r| fs::read_to_string(Path::new(r).join("configuration-revision")).ok())
        .map(|s| s.trim().to_owned());
    let previous = current_gen.and_then(|c| gens.iter().rev().map(|(n, _)| *n).find(|n| *n < c));
    let age_days = current_gen
        .and_then(|c| gens.iter().find(|(n, _)| *n == c))
        .and_then(|(_, link)| fs::symlink_metadata(link).ok())
        .and_then(|m| m.modified().ok())
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| age_secs(ctx.now, t) / 86_400);

    a.fact("system_profile", &spec.system_profile);
    a.fact("current_generation", current_gen);
    a.fact("previous_generation", previous);
    a.fact(
        "generations",
        gens.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
    );
    a.fact("profile_system", &profile_path);
    a.fact("running_system", &running);
    a.fact("booted_system", &booted);
    a.fact("flake_revision", &flake_revision);
    a.fact("generation_age_days", age_days);
    a.fact("target_system", &spec.target_system);
    a.fact("target_revision", &spec.target_revision);
    let reboot_pending =
        kernel_now.is_some() && kernel_booted.is_some() && kernel_now != kernel_booted;
    a.fact("reboot_pending", reboot_pending);

    let Some(running) = running else {
        a.error("/run/current-system does not resolve to a system".to_owned());
        return a;
    };
    if profile_path.as_deref() != Some(running.as_str()) {
        a.drift(
            Severity::Medium,
            format!(
                "the system profile (generation {}) is {} but the running system is {running}",
                current_gen.map_or("?".into(), |g| g.to_string()),
                profile_path.as_deref().unwrap_or("unresolvable")
            ),
        );
        if let Some(target) = &profile_path {
            a.recommend("switch_generation", json!({ "store_path": target }));
        }
    }
    if let Some(target) = &spec.target_system
        && target != &running
    {
        a.drift(
            Severity::High,
            format!("running {running}, but the baseline's target is {target}"),
        );
        a.recommend("switch_generation", json!({ "store_path": target }));
    }
    if let Some(rev) = &spec.target_revision
        && flake_revision.as_deref() != Some(rev.as_str())
    {
        a.drift(
            Severity::High,
            format!(
                "running flake revision {}, but the baseline's target is {rev}",
                flake_revision.as_deref().unwrap_or("(none recorded)")
            ),
        );
    }
    if let Some(days) = age_days
        && days as u64 > spec.max_generation_age_days
    {
        a.drift(
            Severity::Medium,
            format!(
                "the running generation is {days} days old (limit {}): updates are overdue",
                spec.max_generation_age_days
            ),
        );
    }
    if reboot_pending {
        a.drift(
            Severity::Low,
            "the running kernel is not the booted one: a reboot is pending".to_owned(),
        );
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_link_names() {
        assert_eq!(generation_number("system", "system-42-link"), Some(42));
        assert_eq!(generation_number("system", "system-x-link"), None);
        assert_eq!(generation_number("system", "other-1-link"), None);
        assert_eq!(generation_number("system", "system"), None);
    }
}
