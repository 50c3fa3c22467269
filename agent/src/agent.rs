//! `compliance-agent run`: the long-lived service. One tokio loop reacts to unit state changes,
//! scans on an interval, polls orders, drains the upload queue, prunes evidence, and keeps systemd
//! informed (READY, STATUS, WATCHDOG). Work runs in tasks so the loop itself never waits on it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde::Serialize;
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::baseline::Baseline;
use crate::config::Config;
use crate::drift::{self, CheckResult, Status};
use crate::evidence::{EvidenceStore, StoredBundle};
use crate::heal::{self, Engine, HealState};
use crate::mcp::{self, McpClient, Selection};
use crate::metrics::{self, Metrics};
use crate::notify::Notifier;
use crate::queue::{NewUpload, Queue, QueueStats, unix_now};
use crate::scan::{Cycle, HealLine, heal_cycle, load_baseline};
use crate::systemd::{Systemd, UnitChange};
use crate::{Error, Result};

/// How `run` was asked to behave.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config_path: Option<PathBuf>,
    /// React to unit state changes (the default). Off: only the fixed interval
    /// scan, the platform spec's original design, kept for comparison.
    pub watch_units: bool,
    /// Seconds between full scans (with evidence of every check).
    pub scan_interval: Duration,
}

/// What the loop reports in `<state_dir>/status.json` for `compliance-agent status`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub version: String,
    pub started: Option<jiff::Timestamp>,
    pub mode: String,
    pub watching_units: usize,
    pub last_scan: Option<jiff::Timestamp>,
    pub last_cycle: Option<jiff::Timestamp>,
    pub score: Option<f64>,
    pub checks: Vec<Value>,
    pub drifted: Vec<String>,
    pub queue_pending: Option<u64>,
    pub oldest_pending_age_sec: Option<i64>,
    pub last_upload_ok: Option<jiff::Timestamp>,
    pub last_mcp_contact: Option<jiff::Timestamp>,
    pub last_mcp_error: Option<String>,
    pub deferred: Vec<heal::Deferred>,
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// What the loop holds; replaced whole on SIGHUP.
#[derive(Clone)]
struct Shared {
    config: Arc<Config>,
    baseline: Arc<Baseline>,
    store: Arc<EvidenceStore>,
    queue: Option<Arc<Mutex<Queue>>>,
    mcp: Option<Arc<McpClient>>,
}

fn load(path: Option<&Path>) -> Result<Shared> {
    let config = Config::load(path)?;
    let (baseline, _) = load_baseline(&config, None, Path::new("/"))?;
    let store = crate::resources::open_evidence_store(&config)?;
    let (queue, mcp) = if config.mcp_url.is_some() {
        (
            Some(Arc::new(Mutex::new(crate::resources::open_queue(&config)?))),
            Some(Arc::new(McpClient::from_config(&config)?)),
        )
    } else {
        (None, None)
    };
    Ok(Shared {
        config: Arc::new(config),
        baseline: Arc::new(baseline),
        store: Arc::new(store),
        queue,
        mcp,
    })
}

/// Units whose state changes trigger a check: the baseline's and those its checks name.
fn watched_units(baseline: &Baseline) -> Vec<String> {
    heal::allowlist(baseline)
}

/// The result of one heal cycle task.
struct CycleDone {
    state: HealState,
    scan: bool,
    cycle: Result<Cycle>,
}

/// Background I/O with the MCP and the evidence store.
enum IoJob {
    Upload,
    Orders,
    Prune,
}

struct IoDone {
    job: IoJob,
    outcome: std::result::Result<String, String>,
    uploaded_ok: bool,
}

fn spawn_cycle(
    shared: &Shared,
    systemd: &Systemd,
    state: HealState,
    scan: bool,
) -> JoinHandle<CycleDone> {
    let shared = shared.clone();
    let systemd = systemd.clone();
    tokio::spawn(async move {
        let mut engine = Engine {
            config: &shared.config,
            baseline: &shared.baseline,
            systemd: &systemd,
            root: PathBuf::from("/"),
            state,
        };
        let cycle = heal_cycle(&mut engine, Some(&shared.store), None, scan).await;
        CycleDone {
            state: engine.state,
            scan,
            cycle,
        }
    })
}

fn spawn_io(shared: &Shared, job: IoJob) -> JoinHandle<IoDone> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let outcome = match job {
            IoJob::Upload => upload(&shared),
            IoJob::Orders => orders(&shared),
            IoJob::Prune => prune(&shared),
        };
        let uploaded_ok = matches!(job, IoJob::Upload | IoJob::Orders) && outcome.is_ok();
        IoDone {
            job,
            outcome: outcome.map_err(|e| e.to_string()),
            uploaded_ok,
        }
    })
}

fn lock(queue: &Arc<Mutex<Queue>>) -> Result<std::sync::MutexGuard<'_, Queue>> {
    queue
        .lock()
        .map_err(|_| Error::Usage("the upload queue lock was poisoned".into()))
}

fn upload(shared: &Shared) -> Result<String> {
    let (Some(queue), Some(client)) = (&shared.queue, &shared.mcp) else {
        return Ok("offline".into());
    };
    let mut q = lock(queue)?;
    let report = mcp::deliver(client, &mut q, Selection::Due)?;
    match report.stopped {
        Some(why) => Err(Error::Usage(why)),
        None => Ok(format!("{} delivered", report.delivered)),
    }
}

fn orders(shared: &Shared) -> Result<String> {
    let (Some(queue), Some(client)) = (&shared.queue, &shared.mcp) else {
        return Ok("offline".into());
    };
    let Some(key_path) = &shared.config.mcp_order_pubkey_file else {
        return Ok("no order key".into());
    };
    let order_key = crate::crypto::VerifyingKey::load(key_path)?;
    let mut q = lock(queue)?;
    let processed = {
        let mut ctx = crate::orders::OrderContext {
            config: &shared.config,
            order_key: &order_key,
            queue: &mut q,
            store: &shared.store,
            now: jiff::Timestamp::now(),
        };
        crate::orders::poll(client, &mut ctx)?
    };
    for p in &processed {
        tracing::info!(order_id = %p.order_id, outcome = %p.outcome, runbook = ?p.runbook_id, bundle_id = ?p.bundle_id, "order handled");
    }
    let report = mcp::deliver(client, &mut q, Selection::Due)?;
    // The box as the log's witness; a failure to reach the log is retried next poll.
    let witnessed = match crate::witness::observe(&shared.config, client, &mut q, &shared.store) {
        Ok(w) if !w.alerts.is_empty() => format!("; {} log alert(s)", w.alerts.len()),
        Ok(_) => String::new(),
        Err(e) => {
            tracing::warn!(error = %e, "the log witness step failed; retried at the next poll");
            String::new()
        }
    };
    if witnessed.is_empty() {
        return Ok(format!(
            "{} order(s); {} bundle(s) delivered",
            processed.len(),
            report.delivered
        ));
    }
    // Deliver the alerts too (to the same server: they are also in the box's chain).
    let again = mcp::deliver(client, &mut q, Selection::Due)?;
    Ok(format!(
        "{} order(s); {} bundle(s) delivered{witnessed}",
        processed.len(),
        report.delivered + again.delivered
    ))
}

fn prune(shared: &Shared) -> Result<String> {
    let config = &shared.config;
    // Keep at least a week of bundles whatever the retention says.
    let keep = 7 * 24 * 12;
    let report = match &shared.queue {
        Some(queue) => {
            let acknowledged = lock(queue)?.acknowledged()?;
            shared.store.prune_where(
                keep,
                config.evidence_retention_days,
                jiff::Timestamp::now(),
                acknowledged,
            )?
        }
        None => shared
            .store
            .prune(keep, config.evidence_retention_days, jiff::Timestamp::now())?,
    };
    Ok(format!("pruned {} bundle(s)", report.pruned))
}

/// Queues stored bundles for the MCP.
fn enqueue(shared: &Shared, stored: &[StoredBundle]) {
    let Some(queue) = &shared.queue else { return };
    let uploads: Vec<NewUpload> = stored
        .iter()
        .map(|s| NewUpload {
            bundle_id: s.bundle_id.clone(),
            seq: s.seq,
            dir: s.dir.clone(),
            order_id: None,
        })
        .collect();
    let queue = queue.clone();
    // SQLite with synchronous=FULL: off the async threads.
    tokio::task::spawn_blocking(move || {
        if let Ok(mut q) = queue.lock()
            && let Err(e) = q.enqueue(&uploads, unix_now())
        {
            tracing::error!(error = %e, "cannot queue bundles for upload; they are queued again at the next start");
        }
    });
}

fn summary(results: &[CheckResult], queue: Option<&QueueStats>) -> String {
    let score = drift::score(results);
    let drifted: Vec<&str> = results
        .iter()
        .filter(|r| matches!(r.status, Status::Drifted | Status::Error))
        .map(|r| r.check.as_str())
        .collect();
    let queue = queue.map_or_else(|| "offline".to_owned(), |q| format!("{} queued", q.pending));
    if drifted.is_empty() {
        format!("score {score:.0}%; all applicable checks compliant; {queue}")
    } else {
        format!(
            "score {score:.0}%; drifted: {}; {queue}",
            drifted.join(", ")
        )
    }
}

/// Runs until SIGTERM or SIGINT.
pub fn run(options: RunOptions) -> Result<ExitCode> {
    let runtime = crate::runtime()?;
    runtime.block_on(main_loop(options))
}

async fn pending_or<T>(
    handle: &mut Option<JoinHandle<T>>,
) -> Option<std::result::Result<T, tokio::task::JoinError>> {
    match handle {
        Some(h) => Some(h.await),
        None => std::future::pending().await,
    }
}

async fn main_loop(options: RunOptions) -> Result<ExitCode> {
    let notifier = Notifier::from_env();
    let mut shared = load(options.config_path.as_deref())?;
    let systemd = Systemd::system()
        .await
        .map_err(|e| Error::Usage(format!("the agent needs systemd: {e}")))?;
    let mut heal_state =
        Some(HealState::load(&shared.config.state_dir).map_err(|e| Error::Usage(e.to_string()))?);
    let mut metrics = Metrics::default();
    let started = jiff::Timestamp::now();
    let mut status = AgentStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        started: Some(started),
        mode: if options.watch_units {
            "unit signals + interval scan".into()
        } else {
            "interval scan only".into()
        },
        ..AgentStatus::default()
    };
    let test_hooks = std::env::var_os("COMPLIANCE_AGENT_TEST_HOOKS").is_some();

    let watch = |shared: &Shared| {
        let units = watched_units(&shared.baseline);
        let systemd = systemd.clone();
        let enabled = options.watch_units;
        async move {
            if !enabled {
                return (0, futures_util::stream::pending().boxed());
            }
            match systemd.watch(&units).await {
                Ok(s) => (units.len(), s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch unit state changes; relying on the interval scan");
                    (0, futures_util::stream::pending().boxed())
                }
            }
        }
    };
    let (n_watched, mut changes): (usize, BoxStream<'static, UnitChange>) = watch(&shared).await;
    status.watching_units = n_watched;

    // The first full cycle before READY=1: the state is loaded and known.
    let first = spawn_cycle(
        &shared,
        &systemd,
        heal_state.take().unwrap_or_default(),
        true,
    )
    .await;
    let mut last_results: Vec<CheckResult> = Vec::new();
    match first {
        Ok(done) => {
            heal_state = Some(done.state);
            absorb(
                &shared,
                &mut metrics,
                &mut status,
                &mut last_results,
                done.scan,
                done.cycle,
            );
        }
        Err(e) => return Err(Error::Usage(format!("the first check cycle failed: {e}"))),
    }
    let queue_stats = |shared: &Shared| {
        shared
            .queue
            .as_ref()
            .and_then(|q| q.lock().ok().and_then(|q| q.stats(unix_now()).ok()))
    };
    write_outputs(
        &shared,
        &metrics,
        &mut status,
        &last_results,
        queue_stats(&shared).as_ref(),
        heal_state.as_ref(),
    );
    notifier.ready(&summary(&last_results, queue_stats(&shared).as_ref()));
    tracing::info!(units = n_watched, mode = %status.mode, "compliance agent running");

    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Io {
        context: "SIGTERM handler".into(),
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| Error::Io {
        context: "SIGINT handler".into(),
        source,
    })?;
    let mut hup = signal(SignalKind::hangup()).map_err(|source| Error::Io {
        context: "SIGHUP handler".into(),
        source,
    })?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(|source| Error::Io {
        context: "SIGUSR2 handler".into(),
        source,
    })?;

    let jitter = crate::schedule::jitter;
    let now = Instant::now();
    let mut scan_at = now + jitter(options.scan_interval, 0.1);
    let poll_interval = Duration::from_secs(shared.config.mcp_poll_interval_sec);
    let mut poll_at = now + jitter(poll_interval, 0.2);
    let mut upload_at = now + Duration::from_secs(2);
    let mut prune_at = now + jitter(Duration::from_secs(3600), 0.5);
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);

    let mut cycle_task: Option<JoinHandle<CycleDone>> = None;
    let mut io_task: Option<JoinHandle<IoDone>> = None;
    // A cycle requested while one runs: (wanted, with scan evidence).
    let mut queued_cycle: Option<bool> = None;
    let mut io_queue: Vec<IoJob> = Vec::new();

    loop {
        // The maintenance window opening is a wake-up when fixes wait for it.
        let window_at = heal_state
            .as_ref()
            .filter(|s| !s.deferred.is_empty())
            .map(|_| {
                now_plus(
                    shared
                        .config
                        .maintenance_window
                        .time_until_open(jiff::Timestamp::now()),
                )
            });
        tokio::select! {
            _ = async { match &mut watchdog { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                notifier.watchdog();
            }
            Some(change) = changes.next() => {
                if matches!(change.active_state.as_str(), "inactive" | "failed") {
                    tracing::info!(unit = %change.unit, state = %change.active_state, "watched unit changed");
                    queued_cycle = Some(queued_cycle.unwrap_or(false));
                }
            }
            _ = sleep_until(scan_at) => {
                scan_at = Instant::now() + jitter(options.scan_interval, 0.1);
                queued_cycle = Some(true);
            }
            _ = sleep_until(poll_at), if shared.mcp.is_some() => {
                poll_at = Instant::now() + jitter(poll_interval, 0.2);
                io_queue.push(IoJob::Orders);
            }
            _ = sleep_until(upload_at), if shared.mcp.is_some() => {
                upload_at = Instant::now() + Duration::from_secs(15);
                io_queue.push(IoJob::Upload);
            }
            _ = sleep_until(prune_at) => {
                prune_at = Instant::now() + jitter(Duration::from_secs(86_400), 0.1);
                io_queue.push(IoJob::Prune);
            }
            _ = async { match window_at { Some(t) => sleep_until(t).await, None => std::future::pending().await } } => {
                tracing::info!("maintenance window open: re-evaluating deferred fixes");
                queued_cycle = Some(queued_cycle.unwrap_or(false));
            }
            Some(done) = pending_or(&mut cycle_task) => {
                cycle_task = None;
                match done {
                    Ok(done) => {
                        heal_state = Some(done.state);
                        absorb(&shared, &mut metrics, &mut status, &mut last_results, done.scan, done.cycle);
                        let stats = queue_stats(&shared);
                        write_outputs(&shared, &metrics, &mut status, &last_results, stats.as_ref(), heal_state.as_ref());
                        notifier.status(&summary(&last_results, stats.as_ref()));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a check cycle task failed; the guardrail state is reloaded from disk");
                        heal_state = HealState::load(&shared.config.state_dir).ok().or(Some(HealState::default()));
                    }
                }
            }
            Some(done) = pending_or(&mut io_task) => {
                io_task = None;
                if let Ok(done) = done {
                    let what = match done.job { IoJob::Upload => "upload", IoJob::Orders => "orders", IoJob::Prune => "prune" };
                    match &done.outcome {
                        Ok(msg) => {
                            tracing::debug!(job = what, result = %msg, "done");
                            if done.uploaded_ok {
                                let now = jiff::Timestamp::now();
                                status.last_mcp_contact = Some(now);
                                status.last_upload_ok = Some(now);
                                status.last_mcp_error = None;
                                metrics.last_upload_ok = Some(now.as_second());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(job = what, error = %e, "background job failed; it is retried");
                            if !matches!(done.job, IoJob::Prune) {
                                status.last_mcp_error = Some(e.clone());
                            }
                        }
                    }
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: finishing current work"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: finishing current work"); break; }
            _ = hup.recv() => {
                notifier.reloading();
                match load(options.config_path.as_deref()) {
                    Ok(new) => {
                        tracing::info!("configuration and baseline reloaded");
                        shared = new;
                        let (n, stream) = watch(&shared).await;
                        changes = stream;
                        status.watching_units = n;
                        queued_cycle = Some(true);
                    }
                    Err(e) => tracing::error!(error = %e, "refusing the new configuration; the old one stays in force"),
                }
                notifier.ready(&summary(&last_results, queue_stats(&shared).as_ref()));
            }
            _ = usr2.recv(), if test_hooks => {
                // Test hook: a hung loop. The watchdog must notice and restart the service.
                tracing::warn!("SIGUSR2 with test hooks enabled: blocking the loop");
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if cycle_task.is_none()
            && let Some(scan) = queued_cycle.take()
            && let Some(state) = heal_state.take()
        {
            cycle_task = Some(spawn_cycle(&shared, &systemd, state, scan));
        }
        if io_task.is_none() && !io_queue.is_empty() {
            let job = io_queue.remove(0);
            io_task = Some(spawn_io(&shared, job));
        }
    }

    // Shutdown: let the bundle being written and the order being run finish.
    notifier.stopping();
    let deadline = tokio::time::sleep(Duration::from_secs(8));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            Some(done) = pending_or(&mut cycle_task) => {
                cycle_task = None;
                if let Ok(done) = done {
                    let _ = done.state.save(&shared.config.state_dir);
                    absorb(&shared, &mut metrics, &mut status, &mut last_results, done.scan, done.cycle);
                }
            }
            Some(_) = pending_or(&mut io_task) => { io_task = None; }
            _ = &mut deadline => { tracing::warn!("work still running at shutdown; it is picked up at the next start"); break; }
        }
        if cycle_task.is_none() && io_task.is_none() {
            break;
        }
    }
    tracing::info!("compliance agent stopped");
    Ok(ExitCode::SUCCESS)
}

fn now_plus(d: Duration) -> Instant {
    Instant::now() + d.max(Duration::from_millis(100))
}

/// Folds a finished cycle into the metrics, the status and the upload queue.
fn absorb(
    shared: &Shared,
    metrics: &mut Metrics,
    status: &mut AgentStatus,
    last: &mut Vec<CheckResult>,
    scan: bool,
    cycle: Result<Cycle>,
) {
    let cycle = match cycle {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "check cycle failed");
            return;
        }
    };
    for r in cycle.results.iter().filter(|r| r.status == Status::Drifted) {
        metrics.incident(r.check.as_str(), r.severity);
        tracing::warn!(check = %r.check, severity = r.severity.as_str(), reason = %r.reason, "drift");
    }
    for line in &cycle.lines {
        log_line(line);
        if let (Some(runbook), Some(outcome)) = (&line.runbook, line.outcome) {
            metrics.remediation(runbook, outcome.as_str(), line.duration_ms as f64 / 1000.0);
        }
    }
    metrics.bundles(cycle.stored.len() as u64);
    enqueue(shared, &cycle.stored);
    let now = jiff::Timestamp::now();
    status.last_cycle = Some(now);
    if scan {
        status.last_scan = Some(now);
    }
    *last = cycle.results;
}

fn log_line(line: &HealLine) {
    match line.outcome {
        Some(outcome) => tracing::info!(
            check = %line.check,
            runbook = line.runbook.as_deref().unwrap_or("-"),
            outcome = outcome.as_str(),
            bundle_id = line.bundle_id.as_deref().unwrap_or("-"),
            "fix attempted"
        ),
        None => tracing::debug!(check = %line.check, "no fix now"),
    }
}

/// The metrics file and status.json, after each cycle.
fn write_outputs(
    shared: &Shared,
    metrics: &Metrics,
    status: &mut AgentStatus,
    results: &[CheckResult],
    queue: Option<&QueueStats>,
    heal_state: Option<&HealState>,
) {
    let score = drift::score(results);
    status.score = Some(score);
    status.checks = results
        .iter()
        .map(|r| serde_json::json!({ "check": r.check, "status": r.status, "severity": r.severity, "reason": r.reason }))
        .collect();
    status.drifted = results
        .iter()
        .filter(|r| matches!(r.status, Status::Drifted | Status::Error))
        .map(|r| r.check.as_str().to_owned())
        .collect();
    status.queue_pending = queue.map(|q| q.pending);
    status.oldest_pending_age_sec = queue
        .and_then(|q| q.oldest_pending_enqueued_at)
        .map(|t| (unix_now() - t).max(0));
    if let Some(s) = heal_state {
        status.deferred = s.deferred.clone();
    }
    if let Some(dir) = &shared.config.metrics_dir
        && let Err(e) = metrics::write(dir, &metrics.render(results, score, queue, unix_now()))
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write the metrics file");
    }
    let path = status_path(&shared.config.state_dir);
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the status file");
    }
}
