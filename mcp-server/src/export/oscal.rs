//! The export's OSCAL assessment results (JSON, OSCAL 1.1.3): one result for the period;
//! the reviewed controls are the HIPAA control map (every control a check evidences);
//! one observation per bundle of the period (method TEST for the automated checks,
//! EXAMINE for documents the box records, such as its SBOM), each referring to its
//! bundle by path, id and SHA-256; one finding per control, satisfied when the latest
//! bundle of every host and check evidencing it in the period is a success, not
//! satisfied (with the bundles that show it) otherwise, or when nothing evidences it.

use std::collections::{BTreeMap, BTreeSet};

use compliance_agent::audit_export::{ExportInfo, OSCAL_NS};
use compliance_agent::evidence::{Check, Outcome};
use jiff::Timestamp;
use serde_json::{Value, json};

use super::ExportedBundle;

/// The OSCAL version the document is written to (and states in its metadata).
pub const OSCAL_VERSION: &str = "1.1.3";

/// A HIPAA citation as an OSCAL control id (a token: letters, digits, `.`, `-`, `_`,
/// starting with a letter): `164.308(a)(7)(ii)(A)` -> `hipaa-164.308-a-7-ii-a`.
pub fn control_id(citation: &str) -> String {
    let mut id = String::from("hipaa-");
    let mut dash = false;
    for c in citation.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            if dash {
                id.push('-');
                dash = false;
            }
            id.push(c.to_ascii_lowercase());
        } else {
            dash = true;
        }
    }
    id
}

/// The control map: every control a check evidences, in citation order.
pub fn control_map() -> BTreeMap<String, BTreeSet<Check>> {
    let mut map: BTreeMap<String, BTreeSet<Check>> = BTreeMap::new();
    for check in Check::ALL {
        for c in check.hipaa_controls() {
            map.entry((*c).to_owned()).or_default().insert(check);
        }
    }
    map
}

fn method(check: Check) -> &'static str {
    match check {
        // A document the box recorded, examined rather than a test run.
        Check::Sbom => "EXAMINE",
        _ => "TEST",
    }
}

fn prop(name: &str, value: impl Into<String>) -> Value {
    json!({ "name": name, "ns": OSCAL_NS, "value": value.into() })
}

fn ts(t: Timestamp) -> String {
    // RFC 3339 in UTC (`Z`), as OSCAL's date-time-with-timezone requires.
    t.to_string()
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The latest bundle of a host and check for a control: seq, outcome, observation uuid,
/// bundle id.
type Latest = (u64, Outcome, String, String);

/// The assessment-results document of an export.
pub fn assessment_results(info: &ExportInfo, bundles: &[ExportedBundle]) -> Value {
    let map = control_map();
    let mut observations = Vec::new();
    // Per control: (host, check) -> the latest bundle of the period and its observation.
    let mut latest: BTreeMap<String, BTreeMap<(String, Check), Latest>> = BTreeMap::new();
    for b in bundles.iter().filter(|b| b.in_period) {
        let bundle = &b.bundle;
        let obs_uuid = uuid();
        let mut description = format!(
            "{} on {}/{}: {} (seq {}, {} to {}).",
            bundle.check,
            bundle.site_id,
            bundle.host_id,
            bundle.outcome,
            bundle.seq,
            bundle.timestamp_start,
            bundle.timestamp_end
        );
        if let Some(e) = &bundle.error {
            description.push_str(&format!(" Error: {e}"));
        }
        observations.push(json!({
            "uuid": obs_uuid,
            "title": format!("{} on {} (seq {})", bundle.check, bundle.host_id, bundle.seq),
            "description": description,
            "props": [
                prop("check", bundle.check.as_str()),
                prop("outcome", bundle.outcome.as_str()),
                prop("host", format!("{}/{}", bundle.site_id, bundle.host_id)),
            ],
            "methods": [method(bundle.check)],
            "types": ["finding"],
            "relevant-evidence": [{
                "href": b.href,
                "description": format!(
                    "Evidence bundle {} of {}/{}, signed by the box's key {}.",
                    bundle.bundle_id, bundle.site_id, bundle.host_id, bundle.signing_key_fingerprint
                ),
                "props": [
                    prop("bundle-id", bundle.bundle_id.as_str()),
                    prop("bundle-sha256", b.sha256.as_str()),
                ],
            }],
            "collected": ts(bundle.timestamp_end),
        }));
        for control in &bundle.hipaa_controls {
            let slot = latest
                .entry(control.clone())
                .or_default()
                .entry((b.host_id.clone(), bundle.check));
            let candidate = (
                bundle.seq,
                bundle.outcome,
                obs_uuid.clone(),
                bundle.bundle_id.clone(),
            );
            match slot {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(candidate);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if o.get().0 < bundle.seq {
                        o.insert(candidate);
                    }
                }
            }
        }
    }

    let reviewed: BTreeSet<String> = map.keys().cloned().chain(latest.keys().cloned()).collect();
    let mut findings = Vec::new();
    for control in &reviewed {
        let id = control_id(control);
        let evidence = latest.get(control);
        let failing: Vec<_> = evidence
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, v)| v.1 != Outcome::Success)
            .collect();
        let (state, description, related): (&str, String, Vec<&String>) = match evidence {
            None => (
                "not-satisfied",
                format!("No bundle of the period evidences {control}."),
                Vec::new(),
            ),
            Some(m) if failing.is_empty() => (
                "satisfied",
                format!(
                    "The latest bundle of each of {} host and check pairs evidencing {control} in the period is a success.",
                    m.len()
                ),
                m.values().map(|v| &v.2).collect(),
            ),
            Some(m) => (
                "not-satisfied",
                format!(
                    "{} of {} host and check pairs evidencing {control} end the period without success: {}.",
                    failing.len(),
                    m.len(),
                    failing
                        .iter()
                        .map(|((host, check), v)| format!(
                            "{check} on {host} is {} (bundle {})",
                            v.1, v.3
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                failing.iter().map(|(_, v)| &v.2).collect(),
            ),
        };
        let mut finding = json!({
            "uuid": uuid(),
            "title": format!("HIPAA {control}"),
            "description": description,
            "props": [prop("hipaa-citation", control.as_str())],
            "target": {
                "type": "statement-id",
                "target-id": format!("{id}_smt"),
                "status": { "state": state },
            },
        });
        if !related.is_empty() {
            finding["related-observations"] = related
                .into_iter()
                .map(|u| json!({ "observation-uuid": u }))
                .collect();
        }
        findings.push(finding);
    }

    let plan = uuid();
    let mut result = json!({
        "uuid": uuid(),
        "title": format!("Site {} from {} to {}", info.site_id, info.from, info.to),
        "description": format!(
            "Automated evidence of the HIPAA Security Rule controls from the compliance agents of site {}: {} bundles in the period, each signed by its box and proven in the MSP's transparency log of size {}.",
            info.site_id,
            observations.len(),
            info.tree_size
        ),
        "start": ts(info.from),
        "end": ts(info.to),
        "reviewed-controls": {
            "control-selections": [{
                "description": "The HIPAA Security Rule (45 CFR 164 Subpart C) controls the platform's checks evidence.",
                "include-controls": reviewed.iter().map(|c| json!({ "control-id": control_id(c) })).collect::<Vec<_>>(),
            }],
        },
        "findings": findings,
    });
    if !observations.is_empty() {
        result["observations"] = Value::Array(observations);
    }
    let mut metadata = json!({
        "title": format!("HIPAA evidence of site {} from {} to {}", info.site_id, info.from, info.to),
        "last-modified": ts(info.created_at),
        "version": format!("{}", info.created_at.as_second()),
        "oscal-version": OSCAL_VERSION,
        "props": [prop("site", info.site_id.as_str())],
    });
    if let Some(r) = &info.reseller_id {
        metadata["props"]
            .as_array_mut()
            .expect("props is an array")
            .push(prop("reseller", r.as_str()));
    }
    json!({
        "assessment-results": {
            "uuid": uuid(),
            "metadata": metadata,
            "import-ap": { "href": format!("#{plan}") },
            "results": [result],
            "back-matter": {
                "resources": [{
                    "uuid": plan,
                    "title": "Assessment plan: the compliance agent's checks",
                    "description": "Each box runs the platform's automated checks (patching, antivirus, backups and restore tests, logging and audit, the firewall, disk encryption, time sync, services, evidence retention and integrity, orders, the SBOM and the log witness) against its declared baseline and signs every result; the HIPAA control each check evidences is in the check's bundle.",
                }],
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mapped_citation_becomes_a_distinct_oscal_token() {
        let map = control_map();
        let ids: BTreeSet<String> = map.keys().map(|c| control_id(c)).collect();
        assert_eq!(ids.len(), map.len(), "two citations map to one id: {ids:?}");
        for id in &ids {
            let mut chars = id.chars();
            assert!(
                chars.next().is_some_and(|c| c.is_ascii_alphabetic()),
                "{id}"
            );
            assert!(
                chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
                "{id}"
            );
        }
        assert_eq!(control_id("164.308(a)(7)(ii)(A)"), "hipaa-164.308-a-7-ii-a");
        assert_eq!(control_id("164.312(b)"), "hipaa-164.312-b");
    }
}
