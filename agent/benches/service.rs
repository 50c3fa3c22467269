//! The service in the appliance harness, with unit signals and with the platform spec's fixed
//! 60 s poll: time from a watched unit dying to it being active again with its bundle stored,
//! and the agent's RSS and CPU time after a long idle period.
//!
//! Run (as root): `cargo bench -p compliance-agent --bench service`
//! BENCH_IDLE_SECS (default 600) and BENCH_POLL_RUNS (default 10: each waits for a poll) shorten it.

#[path = "../tests/common/agent_box.rs"]
mod agent_box;
#[path = "../tests/common/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use agent_box::{AgentBox, SERVICE, Setup};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds of CPU (user + system) and RSS in kB of the service's main process.
fn usage(b: &AgentBox) -> Result<(f64, u64), String> {
    let pid = b.app.unit_property(SERVICE, "MainPID");
    let stat =
        String::from_utf8_lossy(&b.app.read_file(&format!("/proc/{pid}/stat"))?).into_owned();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let status =
        String::from_utf8_lossy(&b.app.read_file(&format!("/proc/{pid}/status"))?).into_owned();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / 100.0, rss))
}

/// Stops the clinic's service `runs` times; each time waits for it to be active with a new bundle.
fn reaction(b: &AgentBox, runs: usize, limit: Duration) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let before = b.bundles("services").len();
        b.sh("systemctl stop clinic-app.service");
        let start = Instant::now();
        loop {
            if b.active("clinic-app.service") == "active" && b.bundles("services").len() > before {
                times.push(start.elapsed());
                break;
            }
            if start.elapsed() > limit {
                return Err(format!("run {i}: not healed within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(times)
}

fn summary(times: &mut [Duration]) -> String {
    if times.is_empty() {
        return "-".into();
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    format!(
        "mean {:.0} ms, worst {:.0} ms ({} runs)",
        mean.as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0,
        times.len()
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    harness::available()?;
    let idle = Duration::from_secs(env_u64("BENCH_IDLE_SECS", 600));
    let poll_runs = env_u64("BENCH_POLL_RUNS", 10) as usize;
    // Successive deaths of the same unit are compressed here; the restart cooldown would hold them back.
    let setup = Setup {
        extra_config: "restart_cooldown_sec = 0\n",
        ..Setup::default()
    };
    let signals = AgentBox::boot("bench-signals", &setup);
    let poll = AgentBox::boot("bench-poll", &setup);
    signals.start_service("--scan-interval 300");
    poll.start_service("--poll-only --scan-interval 60");

    // Idle: both agents running, nothing happening.
    let (cpu0_s, _) = usage(&signals)?;
    let (cpu0_p, _) = usage(&poll)?;
    std::thread::sleep(idle);
    let (cpu1_s, rss_s) = usage(&signals)?;
    let (cpu1_p, rss_p) = usage(&poll)?;

    let mut react_s = reaction(&signals, 50, Duration::from_secs(10))?;
    let mut react_p = reaction(&poll, poll_runs, Duration::from_secs(90))?;

    println!("service benchmark in the appliance harness (same machine, same baseline)");
    println!(
        "{:<34} {:>16} {:>16}",
        "", "unit signals", "fixed 60 s poll"
    );
    println!(
        "{:<34} {:>13.0} kB {:>13.0} kB",
        format!("RSS after {} s idle", idle.as_secs()),
        rss_s,
        rss_p
    );
    println!(
        "{:<34} {:>14.2} s {:>14.2} s",
        format!("CPU time over {} s idle", idle.as_secs()),
        cpu1_s - cpu0_s,
        cpu1_p - cpu0_p
    );
    println!("unit death -> active again with its bundle stored:");
    println!("  unit signals:    {}", summary(&mut react_s));
    println!("  fixed 60 s poll: {}", summary(&mut react_p));
    println!(
        "targets (unit signals): mean under 1 s, worst under 2 s; RSS under 12 MB and CPU under 1 s over 10 minutes idle"
    );
    signals.verify();
    poll.verify();
    Ok(())
}
