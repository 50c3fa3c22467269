//! Firewall: the live nftables ruleset, read through the nftables crate's JSON schema, normalised and compared with the baseline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nftables::schema::{NfListObject, NfObject, Nftables};
use nftables::types::{NfChainPolicy, NfHook};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Assessment, Context, Severity};
use crate::baseline::{Firewall, Policy};

/// A ruleset reduced to what defines its behaviour: no handles, no counter
/// values, no metainfo. Rules are kept in order per chain.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NormalRuleset {
    pub tables: BTreeSet<String>,
    /// "family table chain" -> the chain's definition (type, hook, priority, policy)
    pub chains: BTreeMap<String, Value>,
    /// "family table chain" -> its rules, in order, as normalised JSON
    pub rules: BTreeMap<String, Vec<Value>>,
    /// "family table name" -> set or map definition with elements
    pub sets: BTreeMap<String, Value>,
    /// Output-hook filter chains and their policies ("family table chain" -> "accept"/"drop").
    pub output_policies: BTreeMap<String, String>,
}

/// Removes handles and zeroes counters, recursively.
fn scrub(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("handle");
            map.remove("index");
            for key in ["packets", "bytes"] {
                if map.contains_key(key) {
                    map.insert(key.into(), json!(0));
                }
            }
            for v in map.values_mut() {
                scrub(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

fn normal(value: impl Serialize) -> Value {
    let mut v = serde_json::to_value(value).unwrap_or(Value::Null);
    scrub(&mut v);
    v
}

fn family(f: impl Serialize) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Parses `nft --json list ruleset` output with the nftables crate and normalises it.
pub fn normalize(json: &[u8]) -> Result<NormalRuleset, String> {
    let parsed: Nftables =
        serde_json::from_slice(json).map_err(|e| format!("not an nftables JSON ruleset: {e}"))?;
    let mut out = NormalRuleset::default();
    for object in parsed.objects.iter() {
        let NfObject::ListObject(item) = object else {
            continue;
        };
        match item {
            NfListObject::Table(t) => {
                out.tables
                    .insert(format!("{} {}", family(t.family), t.name));
            }
            NfListObject::Chain(c) => {
                let key = format!("{} {} {}", family(c.family), c.table, c.name);
                let mut def = c.clone();
                def.handle = None;
                if def.hook == Some(NfHook::Output) {
                    let policy = match def.policy {
                        Some(NfChainPolicy::Drop) => "drop",
                        _ => "accept",
                    };
                    out.output_policies.insert(key.clone(), policy.into());
                }
                out.chains.insert(key.clone(), normal(&def));
                out.rules.entry(key).or_default();
            }
            NfListObject::Rule(r) => {
                let key = format!("{} {} {}", family(r.family), r.table, r.chain);
                let mut rule = r.clone();
                rule.handle = None;
                rule.index = None;
                out.rules.entry(key).or_default().push(normal(&rule.expr));
            }
            NfListObject::Set(s) => {
                out.sets.insert(
                    format!("{} {} {}", family(s.family), s.table, s.name),
                    normal(s),
                );
            }
            NfListObject::Map(m) => {
                out.sets.insert(
                    format!("{} {} {}", family(m.family), m.table, m.name),
                    normal(m),
                );
            }
            _ => {}
        }
    }
    Ok(out)
}

/// What differs between the expected and the live ruleset.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RulesetDiff {
    pub missing_tables: Vec<String>,
    pub extra_tables: Vec<String>,
    pub missing_chains: Vec<String>,
    pub extra_chains: Vec<String>,
    pub changed_chains: Vec<String>,
    /// chain -> rules of the baseline not in force
    pub missing_rules: BTreeMap<String, Vec<Value>>,
    /// chain -> rules in force not in the baseline
    pub extra_rules: BTreeMap<String, Vec<Value>>,
    /// chains whose rules are the same but in another order
    pub reordered_chains: Vec<String>,
    pub changed_sets: Vec<String>,
}

impl RulesetDiff {
    pub fn is_empty(&self) -> bool {
        *self == RulesetDiff::default()
    }
}

pub fn diff(expected: &NormalRuleset, live: &NormalRuleset) -> RulesetDiff {
    let mut d = RulesetDiff {
        missing_tables: expected.tables.difference(&live.tables).cloned().collect(),
        extra_tables: live.tables.difference(&expected.tables).cloned().collect(),
        ..RulesetDiff::default()
    };
    for (name, def) in &expected.chains {
        match live.chains.get(name) {
            None => d.missing_chains.push(name.clone()),
            Some(l) if l != def => d.changed_chains.push(name.clone()),
            Some(_) => {}
        }
    }
    d.extra_chains = live
        .chains
        .keys()
        .filter(|k| !expected.chains.contains_key(*k))
        .cloned()
        .collect();
    let empty = Vec::new();
    for chain in expected
        .rules
        .keys()
        .chain(live.rules.keys())
        .collect::<BTreeSet<_>>()
    {
        let want = expected.rules.get(chain).unwrap_or(&empty);
        let have = live.rules.get(chain).unwrap_or(&empty);
        if want == have {
            continue;
        }
        let missing: Vec<Value> = want.iter().filter(|r| !have.contains(r)).cloned().collect();
        let extra: Vec<Value> = have.iter().filter(|r| !want.contains(r)).cloned().collect();
        if missing.is_empty() && extra.is_empty() {
            d.reordered_chains.push(chain.clone());
        }
        if !missing.is_empty() {
            d.missing_rules.insert(chain.clone(), missing);
        }
        if !extra.is_empty() {
            d.extra_rules.insert(chain.clone(), extra);
        }
    }
    for (name, def) in &expected.sets {
        if live.sets.get(name) != Some(def) {
            d.changed_sets.push(name.clone());
        }
    }
    d
}

async fn run(cmd: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let run = tokio::process::Command::new(cmd)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(out)) if out.status.success() => Ok(out.stdout),
        Ok(Ok(out)) => Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("cannot run {cmd}: {e}")),
        Err(_) => Err(format!("{cmd} did not answer within 10 s")),
    }
}

/// The live ruleset: the root export unit's file when the baseline names one, else `nft` itself.
async fn live_ruleset(ctx: &Context<'_>, spec: &Firewall) -> Result<(Vec<u8>, String), String> {
    if let Some(file) = &spec.ruleset_export_file {
        if let Some(unit) = &spec.ruleset_export_unit {
            // A fresh export; if it cannot be started the last one is still read.
            if let Some(systemd) = ctx.systemd {
                let _ = systemd
                    .run_job(crate::systemd::JobOp::Start, unit, Duration::from_secs(10))
                    .await;
            }
        }
        let bytes = std::fs::read(ctx.path(file))
            .map_err(|e| format!("cannot read the exported ruleset {}: {e}", file.display()))?;
        return Ok((bytes, format!("export file {}", file.display())));
    }
    Ok((
        run("nft", &["--json", "list", "ruleset"]).await?,
        "nft --json list ruleset".into(),
    ))
}

/// The baseline ruleset as the kernel lists it: exported by the root unit, or
/// loaded here into a throwaway network namespace.
async fn expected_ruleset(ctx: &Context<'_>, spec: &Firewall) -> Result<Option<Vec<u8>>, String> {
    if let Some(file) = &spec.expected_export_file {
        return std::fs::read(ctx.path(file)).map(Some).map_err(|e| {
            format!(
                "cannot read the exported baseline ruleset {}: {e}",
                file.display()
            )
        });
    }
    let Some(file) = &spec.ruleset_file else {
        return Ok(None);
    };
    let path = ctx.path(file);
    let path = path
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
    run(
        "unshare",
        &[
            "--net",
            "--",
            "sh",
            "-c",
            "nft -f \"$1\" && nft --json list ruleset",
            "sh",
            path,
        ],
    )
    .await
    .map(Some)
}

pub async fn check(ctx: &Context<'_>, spec: &Firewall, mut a: Assessment) -> Assessment {
    // nftables.service is a oneshot that stays "active (exited)" once the ruleset is loaded.
    if let Some(unit) = &spec.unit {
        a.require_active(ctx, unit, Severity::High).await;
    }
    let reapply =
        |a: &mut Assessment| a.recommend("reapply_firewall", json!({ "unit": spec.unit }));
    let live = match live_ruleset(ctx, spec).await {
        Ok((bytes, source)) => {
            a.fact("live_source", source);
            a.fact("ruleset_hash", crate::crypto::sha256_hex(&bytes));
            match normalize(&bytes) {
                Ok(n) => n,
                Err(e) => {
                    a.error(format!("live ruleset: {e}"));
                    return a;
                }
            }
        }
        Err(e) => {
            a.error(e);
            return a;
        }
    };
    a.fact("tables", &live.tables);
    a.fact("output_policies", &live.output_policies);
    a.fact(
        "rule_count",
        live.rules.values().map(Vec::len).sum::<usize>(),
    );

    if spec.egress_policy == Policy::Drop {
        if live.output_policies.is_empty() {
            a.drift(
                Severity::Critical,
                "no output-hook chain: egress is not restricted".to_owned(),
            );
            reapply(&mut a);
        }
        for (chain, policy) in &live.output_policies {
            if policy != "drop" {
                a.drift(
                    Severity::Critical,
                    format!("output chain {chain} has policy {policy}, the baseline requires drop"),
                );
                reapply(&mut a);
            }
        }
    }

    match expected_ruleset(ctx, spec).await {
        Ok(Some(bytes)) => match normalize(&bytes) {
            Ok(expected) => {
                let d = diff(&expected, &live);
                if !d.is_empty() {
                    let missing: usize = d.missing_rules.values().map(Vec::len).sum();
                    let extra: usize = d.extra_rules.values().map(Vec::len).sum();
                    a.drift(
                        Severity::High,
                        format!(
                            "the live ruleset differs from the baseline: {} missing and {} extra chain(s), {missing} missing and {extra} extra rule(s), {} reordered chain(s)",
                            d.missing_chains.len() + d.missing_tables.len(),
                            d.extra_chains.len() + d.extra_tables.len(),
                            d.reordered_chains.len()
                        ),
                    );
                    reapply(&mut a);
                }
                a.fact("diff", d);
            }
            Err(e) => a.error(format!("baseline ruleset: {e}")),
        },
        Ok(None) => a.fact("diff", "no baseline ruleset to compare with"),
        Err(e) => a.error(e),
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"{"nftables": [
      {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "inet", "name": "appliance", "handle": 1}},
      {"chain": {"family": "inet", "table": "appliance", "name": "output", "handle": 1, "type": "filter", "hook": "output", "prio": 0, "policy": "drop"}},
      {"rule": {"family": "inet", "table": "appliance", "chain": "output", "handle": 4,
        "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}}, {"counter": {"packets": 17, "bytes": 1020}}, {"accept": null}]}}
    ]}"#;

    #[test]
    fn handles_and_counters_do_not_matter() {
        let a = normalize(LIVE.as_bytes()).expect("parse");
        let b = normalize(
            LIVE.replace("\"handle\": 4", "\"handle\": 9")
                .replace("17", "99999")
                .as_bytes(),
        )
        .expect("parse");
        assert!(
            diff(&a, &b).is_empty(),
            "same ruleset modulo handles and counters"
        );
        assert_eq!(
            a.output_policies
                .get("inet appliance output")
                .map(String::as_str),
            Some("drop")
        );
    }

    #[test]
    fn flushed_and_changed_rulesets_differ() {
        let expected = normalize(LIVE.as_bytes()).expect("parse");
        let flushed = normalize(br#"{"nftables": [{"metainfo": {"json_schema_version": 1}}]}"#)
            .expect("parse");
        let d = diff(&expected, &flushed);
        assert_eq!(d.missing_tables, ["inet appliance"]);
        assert_eq!(d.missing_chains, ["inet appliance output"]);
        let accept = normalize(
            LIVE.replace("\"policy\": \"drop\"", "\"policy\": \"accept\"")
                .as_bytes(),
        )
        .expect("parse");
        let d = diff(&expected, &accept);
        assert_eq!(d.changed_chains, ["inet appliance output"], "{d:?}");
        assert_eq!(
            accept
                .output_policies
                .get("inet appliance output")
                .map(String::as_str),
            Some("accept")
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(normalize(b"not json").is_err());
        assert!(normalize(b"{\"tables\": []}").is_err());
    }
}
