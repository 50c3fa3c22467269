//! Time sync: chronyd running, its offset, stratum and leap status (from `chronyc -c tracking`).

use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::{Assessment, Context, Severity};
use crate::baseline::TimeSync;

/// chronyd's view of the clock, from the machine-readable `tracking` report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tracking {
    pub reference_id: String,
    pub reference: String,
    pub stratum: u8,
    /// How far the system clock is from NTP time, seconds (positive: fast).
    pub system_offset_sec: f64,
    pub last_offset_sec: f64,
    pub rms_offset_sec: f64,
    pub frequency_ppm: f64,
    pub root_delay_sec: f64,
    pub root_dispersion_sec: f64,
    pub leap_status: String,
}

/// Parses `chronyc -c tracking` (14 comma-separated fields).
pub fn parse_tracking(line: &str) -> Result<Tracking, String> {
    let f: Vec<&str> = line.trim().split(',').collect();
    if f.len() < 14 {
        return Err(format!(
            "expected 14 fields from chronyc -c tracking, got {}: {line:?}",
            f.len()
        ));
    }
    let num = |i: usize, what: &str| -> Result<f64, String> {
        f[i].trim()
            .parse::<f64>()
            .map_err(|_| format!("{what} {:?} is not a number", f[i]))
    };
    Ok(Tracking {
        reference_id: f[0].to_owned(),
        reference: f[1].to_owned(),
        stratum: f[2]
            .trim()
            .parse()
            .map_err(|_| format!("stratum {:?} is not a number", f[2]))?,
        system_offset_sec: num(4, "system time offset")?,
        last_offset_sec: num(5, "last offset")?,
        rms_offset_sec: num(6, "rms offset")?,
        frequency_ppm: num(7, "frequency")?,
        root_delay_sec: num(10, "root delay")?,
        root_dispersion_sec: num(11, "root dispersion")?,
        leap_status: f[13].trim().to_owned(),
    })
}

async fn chronyc_tracking() -> Result<Tracking, String> {
    let run = tokio::process::Command::new("chronyc")
        .args(["-c", "-n", "tracking"])
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run chronyc: {e}")),
        Err(_) => return Err("chronyc did not answer within 5 s".into()),
    };
    if !out.status.success() {
        return Err(format!(
            "chronyc tracking failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_tracking(&String::from_utf8_lossy(&out.stdout))
}

pub async fn check(ctx: &Context<'_>, spec: &TimeSync, mut a: Assessment) -> Assessment {
    if let Some(unit) = &spec.unit {
        a.require_active(ctx, unit, Severity::High).await;
    }
    a.fact("max_offset_ms", spec.max_offset_ms);
    a.fact("max_stratum", spec.max_stratum);
    match chronyc_tracking().await {
        Ok(t) => {
            let offset_ms = (t.system_offset_sec.abs() * 1000.0).round() as u64;
            a.fact("offset_ms", offset_ms);
            if t.leap_status == "Not synchronised" {
                a.drift(
                    Severity::High,
                    format!("chronyd is not synchronised (reference {})", t.reference),
                );
                a.recommend("resync_time", json!({ "unit": spec.unit }));
            }
            if offset_ms > spec.max_offset_ms {
                a.drift(
                    Severity::High,
                    format!(
                        "the clock is {offset_ms} ms off (limit {} ms)",
                        spec.max_offset_ms
                    ),
                );
                a.recommend("resync_time", json!({ "unit": spec.unit }));
            }
            if t.stratum > spec.max_stratum || t.stratum == 0 {
                a.drift(
                    Severity::Medium,
                    format!("stratum {} (limit {})", t.stratum, spec.max_stratum),
                );
            }
            a.fact("tracking", t);
        }
        Err(e) => a.error(e),
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chronyc_csv() {
        let t = parse_tracking(
            "C0000201,192.0.2.1,3,1764400000.123456789,-0.000012345,0.000001000,0.000010000,-14.123,0.001,0.050,0.012345,0.000678,64.5,Normal\n",
        )
        .expect("valid line");
        assert_eq!(t.stratum, 3);
        assert!((t.system_offset_sec + 0.000012345).abs() < 1e-12);
        assert_eq!(t.leap_status, "Normal");
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(parse_tracking("").is_err());
        assert!(parse_tracking("506 Cannot talk to daemon").is_err());
        let e = parse_tracking("A,B,x,1,2,3,4,5,6,7,8,9,10,Normal").expect_err("bad stratum");
        assert!(e.contains("stratum"), "{e}");
    }
}
