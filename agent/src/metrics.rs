//! Metrics for the Prometheus node exporter's textfile collector, written atomically.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::drift::{CheckResult, Severity, Status};
use crate::queue::QueueStats;

/// The file the node exporter reads (`*.prom` in its textfile directory).
pub const FILE_NAME: &str = "compliance_agent.prom";

/// Upper bounds of the remediation duration histogram, seconds.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Counters since the agent started (Prometheus handles the reset at restart).
#[derive(Default)]
pub struct Metrics {
    /// (check, severity) -> drift detections
    incidents: BTreeMap<(String, String), u64>,
    /// (runbook, outcome) -> attempts
    remediations: BTreeMap<(String, String), u64>,
    bucket_counts: [u64; BUCKETS.len()],
    duration_sum: f64,
    duration_count: u64,
    bundles_signed: u64,
    pub last_upload_ok: Option<i64>,
}

impl Metrics {
    pub fn incident(&mut self, check: &str, severity: Severity) {
        *self
            .incidents
            .entry((check.into(), severity.as_str().into()))
            .or_default() += 1;
    }

    pub fn remediation(&mut self, runbook: &str, outcome: &str, seconds: f64) {
        *self
            .remediations
            .entry((runbook.into(), outcome.into()))
            .or_default() += 1;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.bucket_counts[i] += 1;
            }
        }
        self.duration_sum += seconds;
        self.duration_count += 1;
    }

    pub fn bundles(&mut self, n: u64) {
        self.bundles_signed += n;
    }

    /// The exposition text for the current state.
    pub fn render(
        &self,
        results: &[CheckResult],
        score: f64,
        queue: Option<&QueueStats>,
        now: i64,
    ) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# HELP msp_compliance_score Applicable checks compliant, percent.\n# TYPE msp_compliance_score gauge"
        );
        let _ = writeln!(t, "msp_compliance_score {score}");
        let _ = writeln!(
            t,
            "# HELP msp_control_status Per check and HIPAA control: 0 pass, 1 warn, 2 fail.\n# TYPE msp_control_status gauge"
        );
        for r in results.iter().filter(|r| r.status != Status::NotApplicable) {
            let value = match (r.status, r.severity) {
                (Status::Compliant, _) => 0,
                (Status::Drifted, Severity::Low | Severity::Medium) => 1,
                _ => 2,
            };
            for control in &r.hipaa_controls {
                let _ = writeln!(
                    t,
                    "msp_control_status{{check=\"{}\",control=\"{}\"}} {value}",
                    r.check.as_str(),
                    control
                );
            }
        }
        let _ = writeln!(
            t,
            "# HELP msp_incidents_total Drift detections by check and severity.\n# TYPE msp_incidents_total counter"
        );
        for ((kind, severity), n) in &self.incidents {
            let _ = writeln!(
                t,
                "msp_incidents_total{{type=\"{kind}\",severity=\"{severity}\"}} {n}"
            );
        }
        let _ = writeln!(
            t,
            "# HELP msp_remediations_total Fix attempts by runbook and outcome.\n# TYPE msp_remediations_total counter"
        );
        for ((runbook, outcome), n) in &self.remediations {
            let _ = writeln!(
                t,
                "msp_remediations_total{{runbook=\"{runbook}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            t,
            "# HELP msp_remediation_duration_seconds Time a fix took, from decision to verified.\n# TYPE msp_remediation_duration_seconds histogram"
        );
        for (bound, n) in BUCKETS.iter().zip(self.bucket_counts) {
            let _ = writeln!(
                t,
                "msp_remediation_duration_seconds_bucket{{le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            t,
            "msp_remediation_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            self.duration_count
        );
        let _ = writeln!(
            t,
            "msp_remediation_duration_seconds_sum {}",
            self.duration_sum
        );
        let _ = writeln!(
            t,
            "msp_remediation_duration_seconds_count {}",
            self.duration_count
        );
        let _ = writeln!(
            t,
            "# HELP msp_evidence_bundles_total Evidence bundles written.\n# TYPE msp_evidence_bundles_total counter"
        );
        let _ = writeln!(
            t,
            "msp_evidence_bundles_total{{signed=\"true\"}} {}",
            self.bundles_signed
        );
        let _ = writeln!(t, "msp_evidence_bundles_total{{signed=\"false\"}} 0");
        if let Some(q) = queue {
            let _ = writeln!(
                t,
                "# HELP msp_upload_queue_depth Bundles waiting for the MCP.\n# TYPE msp_upload_queue_depth gauge"
            );
            let _ = writeln!(t, "msp_upload_queue_depth {}", q.pending);
            let _ = writeln!(
                t,
                "# HELP msp_upload_parked Bundles parked after repeated refusals.\n# TYPE msp_upload_parked gauge"
            );
            let _ = writeln!(t, "msp_upload_parked {}", q.failed);
            let oldest = q
                .oldest_pending_enqueued_at
                .map_or(0, |t0| (now - t0).max(0));
            let _ = writeln!(
                t,
                "# HELP msp_upload_oldest_pending_age_seconds Age of the oldest undelivered bundle.\n# TYPE msp_upload_oldest_pending_age_seconds gauge"
            );
            let _ = writeln!(t, "msp_upload_oldest_pending_age_seconds {oldest}");
        }
        if let Some(ok) = self.last_upload_ok {
            let _ = writeln!(
                t,
                "# HELP msp_last_successful_upload_timestamp_seconds When the MCP last acknowledged a bundle.\n# TYPE msp_last_successful_upload_timestamp_seconds gauge"
            );
            let _ = writeln!(t, "msp_last_successful_upload_timestamp_seconds {ok}");
        }
        let _ = writeln!(
            t,
            "# HELP msp_agent_build_info The agent's version.\n# TYPE msp_agent_build_info gauge"
        );
        let _ = writeln!(
            t,
            "msp_agent_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        t
    }
}

/// Writes the metrics file atomically (temp file and rename), world-readable for the node exporter.
pub fn write(dir: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    drop(f);
    std::fs::rename(&tmp, dir.join(FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut m = Metrics::default();
        m.remediation("restart_unit", "success", 0.3);
        m.remediation("restart_unit", "success", 4.0);
        let text = m.render(&[], 100.0, None, 0);
        assert!(
            text.contains("msp_remediation_duration_seconds_bucket{le=\"0.5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("msp_remediation_duration_seconds_bucket{le=\"5\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("msp_remediation_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("msp_remediations_total{runbook=\"restart_unit\",outcome=\"success\"} 2"),
            "{text}"
        );
        assert!(text.contains("msp_compliance_score 100"), "{text}");
    }
}
