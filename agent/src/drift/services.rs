//! Units the baseline declares: security and site services that must run, units that must not.

use serde_json::json;

use super::{Assessment, Context, Severity};
use crate::baseline::UnitExpectation;

pub async fn check(ctx: &Context<'_>, units: &[UnitExpectation], mut a: Assessment) -> Assessment {
    let mut states = serde_json::Map::new();
    for expected in units {
        let state = match ctx.unit(&expected.name).await {
            Ok(s) => s,
            Err(e) => {
                a.error(format!("{}: {e}", expected.name));
                continue;
            }
        };
        states.insert(
            expected.name.clone(),
            serde_json::to_value(&state).unwrap_or_default(),
        );
        if !state.exists() {
            if expected.active {
                a.drift(Severity::High, format!("{} does not exist", expected.name));
            }
            continue;
        }
        if expected.active && !state.is_active() {
            a.drift(
                Severity::High,
                format!(
                    "{} is {} ({}), expected active",
                    expected.name, state.active_state, state.sub_state
                ),
            );
            a.recommend("restart_unit", json!({ "unit": expected.name }));
        }
        if !expected.active && state.is_active() {
            a.drift(
                Severity::High,
                format!("{} is active, expected stopped", expected.name),
            );
            a.recommend("stop_unit", json!({ "unit": expected.name }));
        }
        if expected.enabled && !state.is_enabled() {
            a.drift(
                Severity::Medium,
                format!(
                    "{} is {}, expected enabled",
                    expected.name,
                    if state.unit_file_state.is_empty() {
                        "not installed"
                    } else {
                        &state.unit_file_state
                    }
                ),
            );
        }
    }
    a.fact("units", states);
    a
}
