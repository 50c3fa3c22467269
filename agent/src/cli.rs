//! The command line: keys, configuration, evidence, the upload queue and MCP orders.
//!
//! Exit codes: 0 success; 1 the thing checked is not right (invalid config,
//! evidence that does not verify); 2 the command could not do its work.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::json;

use crate::config::{Config, ConfigError, public_key_path};
use crate::crypto::{SigningKey, VerifyingKey};
use crate::evidence::{self, Check, Draft, Filter, Outcome};
use crate::mcp::{self, DeliverReport, McpClient, McpError, Selection};
use crate::orders::{self, OrderContext};
use crate::queue::{QueueStats, unix_now};
use crate::resources::{load_signing_key, open_evidence_store, open_queue};
use crate::{Error, Result};

/// HIPAA compliance agent for NixOS appliances: detects drift, heals it and
/// writes Ed25519-signed, hash-chained evidence.
#[derive(Debug, Parser)]
#[command(name = "compliance-agent", version)]
pub struct Cli {
    /// Configuration file (TOML). Default: $COMPLIANCE_AGENT_CONFIG, else the
    /// embedded local default (site "local", state in ./compliance-state or
    /// $XDG_STATE_HOME/compliance-agent).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an Ed25519 evidence signing key: DIR/signing.key (PKCS#8 PEM,
    /// mode 0600) and DIR/signing.pub.pem (SPKI PEM). Never overwrites.
    /// Enroll with the MSP's central server: a one-time token from `mcp-server token create`.
    Enroll {
        /// https://HOST:PORT of the server's agent listener.
        #[arg(long)]
        server: String,
        #[arg(long)]
        token: String,
    },
    Keygen {
        /// Directory for the key pair (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Add, list, show, verify and prune evidence bundles.
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// An auditor's package from `mcp-server export`: check it offline, trusting only
    /// the keys given (no configuration, no server).
    #[command(subcommand)]
    Export(ExportCommand),
    /// The service: react to unit state changes, scan on an interval, heal,
    /// poll orders, deliver evidence, prune; READY/STATUS/WATCHDOG to systemd.
    /// SIGTERM or SIGINT finish current work and exit 0; SIGHUP reloads the
    /// configuration and baseline (a bad new one is refused, the old stays).
    Run {
        /// No unit state signals: only the fixed interval scan (for comparison).
        #[arg(long)]
        poll_only: bool,
        /// Seconds between full scans (default 300; 60 with --poll-only).
        #[arg(long, value_name = "SECONDS")]
        scan_interval: Option<u64>,
    },
    /// The running agent's state: last scan, score, drifted checks, queue, MCP contact, deferred fixes.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Heal drift: for each drifted check pick its runbook, apply the guardrails
    /// (maintenance window, cooldown, circuit breaker, allowlist), run it,
    /// verify, and write one signed bundle per attempt.
    Heal {
        /// Only this check.
        #[arg(long)]
        check: Option<String>,
        /// Print the plan; change nothing, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Baseline file instead of baseline_path.
        #[arg(long, value_name = "FILE")]
        baseline: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check this box against its baseline: prints each check's status and the
    /// compliance score and writes one signed bundle per applicable check.
    /// Exit 0 all compliant, 1 drift, 2 a check could not run.
    Scan {
        /// Baseline file instead of baseline_path (or the embedded local default).
        #[arg(long, value_name = "FILE")]
        baseline: Option<PathBuf>,
        /// Only report; write no evidence.
        #[arg(long)]
        no_evidence: bool,
        /// Read the box's files (/proc, /sys, /dev, /run, /nix, /etc) under DIR
        /// instead of /: for checking a captured tree.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the software bill of materials (CycloneDX 1.6 JSON) of the
    /// running system's closure, read from the Nix store database, as a signed
    /// `sbom` bundle with the document beside bundle.json (sbom.cdx.json). A
    /// generation that fails (the database missing, locked or corrupt, an
    /// incomplete closure) is stored as a `failed` bundle naming why; exit 1.
    Sbom {
        /// The system: a link such as /run/current-system, or a store path.
        #[arg(long, value_name = "PATH", default_value = crate::nixos::CURRENT_SYSTEM)]
        system: PathBuf,
        /// Also write the SBOM to FILE.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The Nix store database to read.
        #[arg(long, value_name = "FILE", default_value = crate::sbom::NIX_DB)]
        nix_db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The upload queue of bundles for the MSP's central server (MCP).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Orders from the MCP.
    #[command(subcommand)]
    Orders(OrdersCommand),
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Counts of pending, delivered and parked bundles, the next retry and the
    /// last error. Bundles on disk that are missing from the queue are queued first.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Deliver every pending bundle to the MCP now, ignoring backoff; exit 1
    /// when anything is still queued afterwards, saying why.
    Flush {
        /// Also re-arm bundles parked after too many refusals.
        #[arg(long)]
        retry_failed: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrdersCommand {
    /// Fetch pending orders once, verify each, run the accepted ones, and
    /// report every outcome (accepted or refused) to the MCP as a signed bundle.
    Poll {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (secrets as paths, never contents),
    /// or every problem with it and how to fix it (exit 1).
    Check {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Check every file against the signed manifest, every bundle's signature and
    /// log inclusion proof, each host's chain across the period, and the OSCAL
    /// document's references. Exit 0 only if nothing is wrong; 1 naming each problem.
    Verify {
        /// The export directory.
        dir: PathBuf,
        /// The log's key as a box holds it (log.vkey). Default: keys/log.vkey of the
        /// export itself, which proves less (said in the output).
        #[arg(long, value_name = "FILE")]
        log_key: Option<PathBuf>,
        /// The server's export key (SPKI PEM) as the MSP published it. Default:
        /// keys/export.pub.pem of the export.
        #[arg(long, value_name = "PEM")]
        export_key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Record manual evidence (a restore test done by hand, say); prints the new bundle's id.
    Add {
        /// patching, av_health, backup, logging, firewall, encryption or time_sync.
        #[arg(long)]
        check: String,
        /// success, failed, reverted, deferred, alert, rejected or expired.
        #[arg(long)]
        outcome: String,
        /// Free text kept in the bundle's post_state.
        #[arg(long)]
        note: Option<String>,
        /// HIPAA controls instead of the check's defaults (comma-separated, e.g. 164.312(b)).
        #[arg(long, value_delimiter = ',')]
        controls: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List bundles, newest first.
    List {
        #[command(flatten)]
        filter: ListFilter,
        #[arg(long)]
        json: bool,
    },
    /// Show one bundle and whether its signature verifies.
    Show {
        bundle_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Verify every signature and the whole hash chain; exit 1 naming each problem.
    Verify {
        /// The signing public key (SPKI PEM). Default: signing.pub.pem beside the configured signing key.
        #[arg(long, value_name = "PEM")]
        pubkey: Option<PathBuf>,
        /// The evidence directory. Default: evidence_dir of the configuration.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Also check the stored transparency-log proofs (state_dir/log-proofs) offline:
        /// each checkpoint's signature, each inclusion proof against the bundle's own
        /// bytes, each consistency proof.
        #[arg(long)]
        log_proofs: bool,
        /// The log's verifier key file (`<name>+<id>+<key>`). Default: log.vkey beside the order key.
        #[arg(long, value_name = "FILE", requires = "log_proofs")]
        log_key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Counts per check and outcome, size, time span, chain length.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Remove bundles older than the retention period, keeping at least the N
    /// newest; a signed checkpoint keeps the chain verifiable.
    Prune {
        /// Always keep at least this many of the newest bundles.
        #[arg(long, value_name = "N")]
        keep: u64,
        /// Override evidence_retention_days.
        #[arg(long, value_name = "DAYS")]
        retention_days: Option<u32>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ListFilter {
    #[arg(long)]
    check: Option<String>,
    #[arg(long)]
    outcome: Option<String>,
    /// From this instant or day (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    since: Option<String>,
    /// Before this instant, or up to the end of this day (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    limit: Option<usize>,
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Keygen { out, json } => keygen(&out, json),
        Command::Export(ExportCommand::Verify {
            dir,
            log_key,
            export_key,
            json,
        }) => export_verify(&dir, log_key.as_deref(), export_key.as_deref(), json),
        Command::Enroll { server, token } => {
            // The files enrollment writes may not exist yet.
            let config = Config::load_for_enrollment(cli.config.as_deref())?;
            let pubkey = load_signing_key(&config)?.verifying_key().to_spki_pem()?;
            let files = crate::enroll::EnrollFiles::from_config(&config);
            let e = crate::enroll::enroll(&server, &token, &config.host_id, &pubkey, &files)?;
            out!(
                "enrolled {}/{} ({} mode); add to the agent's config:",
                e.site_id,
                e.host_id,
                e.deployment_mode
            );
            out!(
                "site_id = {:?}\nhost_id = {:?}\nmcp_url = {:?}",
                e.site_id,
                e.host_id,
                e.mcp_url
            );
            if let Some(r) = &e.reseller_id {
                out!("reseller_id = {r:?}");
            }
            out!(
                "ca_cert_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\nmcp_order_pubkey_file = {:?}",
                files.ca_cert,
                files.client_cert,
                files.client_key,
                files.order_pubkey
            );
            if e.log_key.is_some() {
                out!(
                    "the transparency log's key is in {}; the agent witnesses the log at every order poll",
                    files.log_key().display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { json }) => config_check(cli.config.as_deref(), json),
        Command::Run {
            poll_only,
            scan_interval,
        } => {
            let default = if poll_only { 60 } else { 300 };
            crate::agent::run(crate::agent::RunOptions {
                config_path: cli.config.clone(),
                watch_units: !poll_only,
                scan_interval: std::time::Duration::from_secs(
                    scan_interval.unwrap_or(default).max(5),
                ),
            })
        }
        Command::Status { json } => {
            let config = Config::load(cli.config.as_deref())?;
            agent_status(&config, json)
        }
        Command::Heal {
            check,
            dry_run,
            baseline,
            json,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let only = check.as_deref().map(parse_check).transpose()?;
            crate::scan::run_heal(&config, baseline.as_deref(), only, dry_run, json)
        }
        Command::Scan {
            baseline,
            no_evidence,
            root,
            json,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let options = crate::scan::ScanOptions {
                baseline: baseline.as_deref(),
                root: &root,
                write_evidence: !no_evidence,
                json,
            };
            crate::scan::run_scan(&config, &options)
        }
        Command::Evidence(cmd) => {
            let config = Config::load(cli.config.as_deref())?;
            evidence_command(&config, cmd)
        }
        Command::Queue(cmd) => {
            let config = Config::load(cli.config.as_deref())?;
            queue_command(&config, cmd)
        }
        Command::Sbom {
            system,
            out,
            nix_db,
            json,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            sbom_command(&config, &system, out.as_deref(), &nix_db, json)
        }
        Command::Orders(OrdersCommand::Poll { json }) => {
            let config = Config::load(cli.config.as_deref())?;
            orders_poll(&config, json)
        }
    }
}

fn sbom_command(
    config: &Config,
    system: &Path,
    out: Option<&Path>,
    nix_db: &Path,
    json: bool,
) -> Result<ExitCode> {
    let store = open_evidence_store(config)?;
    let source = crate::sbom::Source {
        db: nix_db.to_owned(),
        ..Default::default()
    };
    let (recorded, sbom) = crate::sbom::record(&store, &source, system)?;
    if let (Some(out), Some(sbom)) = (out, &sbom) {
        crate::sbom::write_document(out, &sbom.bytes).map_err(|source| Error::Io {
            context: format!("cannot write the SBOM to {}", out.display()),
            source,
        })?;
    }
    if json {
        print_json(&recorded)?;
    } else if let Some(sbom) = &sbom {
        out!(
            "sbom of {}: {} store paths, {} references, sha256 {}; bundle {}",
            sbom.system,
            sbom.components,
            sbom.dependency_edges,
            sbom.sha256,
            recorded.bundle.bundle_id
        );
    } else {
        eprintln!(
            "compliance-agent: no SBOM: {}; recorded as failed bundle {}",
            recorded.error.as_deref().unwrap_or("unknown error"),
            recorded.bundle.bundle_id
        );
    }
    Ok(if sbom.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// How long delivered rows stay in the queue before they are pruned.
const DELIVERED_ROW_DAYS: i64 = 7;

fn queue_command(config: &Config, cmd: QueueCommand) -> Result<ExitCode> {
    match cmd {
        QueueCommand::Status { json } => {
            let queue = open_queue(config)?;
            let stats = queue.stats(unix_now())?;
            if json {
                print_json(
                    &json!({ "mcp_url": config.mcp_url, "database": queue.path(), "stats": stats }),
                )?;
            } else {
                let fmt_time = |t: Option<i64>| {
                    t.and_then(|s| Timestamp::from_second(s).ok())
                        .map_or_else(|| "-".to_owned(), |t| t.to_string())
                };
                out!(
                    "mcp:       {}",
                    config.mcp_url.as_deref().unwrap_or("(none: offline)")
                );
                out!(
                    "database:  {} (schema {})",
                    queue.path().display(),
                    stats.schema_version
                );
                out!(
                    "pending:   {} ({} due now; oldest queued {}; next attempt {})",
                    stats.pending,
                    stats.due,
                    fmt_time(stats.oldest_pending_enqueued_at),
                    fmt_time(stats.next_attempt_at)
                );
                out!(
                    "delivered: {} (and every seq up to {} pruned from the queue)",
                    stats.delivered,
                    stats.delivered_watermark_seq
                );
                out!(
                    "parked:    {} (queue flush --retry-failed re-arms them)",
                    stats.failed
                );
                out!(
                    "orders:    {} processed, {} nonces remembered",
                    stats.orders_processed,
                    stats.seen_nonces
                );
                if let Some(e) = &stats.last_error {
                    out!("last error: {e}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Flush { retry_failed, json } => {
            let client = McpClient::from_config(config)?;
            let mut queue = open_queue(config)?;
            if retry_failed {
                queue.retry_failed(unix_now())?;
            }
            let report = mcp::deliver(&client, &mut queue, Selection::AllPending)?;
            let now = unix_now();
            queue.prune(now - DELIVERED_ROW_DAYS * 86_400, now)?;
            let stats = queue.stats(now)?;
            report_delivery(&report, &stats, json)
        }
    }
}

fn report_delivery(report: &DeliverReport, stats: &QueueStats, json: bool) -> Result<ExitCode> {
    let left = stats.pending + stats.failed;
    if json {
        print_json(&json!({ "delivery": report, "stats": stats }))?;
    } else {
        out!(
            "delivered {} bundle(s) ({} already on the MCP), {} refused, {} still queued, {} parked",
            report.delivered,
            report.duplicates,
            report.refused,
            stats.pending,
            stats.failed
        );
    }
    if let Some(reason) = &report.stopped {
        eprintln!("compliance-agent: {left} bundle(s) still queued: {reason}");
    }
    for e in &report.errors {
        eprintln!("compliance-agent: refused: {e}");
    }
    Ok(if left == 0 && report.stopped.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn orders_poll(config: &Config, json: bool) -> Result<ExitCode> {
    let client = McpClient::from_config(config)?;
    let Some(key_path) = &config.mcp_order_pubkey_file else {
        return Err(McpError::NotConfigured.into());
    };
    let order_key = VerifyingKey::load(key_path)?;
    let mut queue = open_queue(config)?;
    let store = open_evidence_store(config)?;
    let processed = {
        let mut ctx = OrderContext {
            config,
            order_key: &order_key,
            queue: &mut queue,
            store: &store,
            now: Timestamp::now(),
        };
        orders::poll(&client, &mut ctx)?
    };
    let mut report = mcp::deliver(&client, &mut queue, Selection::AllPending)?;
    let witness = crate::witness::observe(config, &client, &mut queue, &store);
    if let Ok(w) = &witness
        && !w.alerts.is_empty()
    {
        let again = mcp::deliver(&client, &mut queue, Selection::AllPending)?;
        report.delivered += again.delivered;
    }
    let witness = match witness {
        Ok(w) => json!(w),
        Err(e) => {
            eprintln!("compliance-agent: the log witness step failed: {e:#}");
            json!({ "error": e.to_string() })
        }
    };
    if json {
        print_json(&json!({ "orders": processed, "delivery": report, "log_witness": witness }))?;
    } else {
        if processed.is_empty() {
            out!("no pending orders");
        }
        for p in &processed {
            let note = if p.already_answered {
                " (answered before)".to_owned()
            } else {
                p.reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            };
            out!(
                "order {} -> {} bundle {}{note}",
                p.order_id,
                p.outcome,
                p.bundle_id.as_deref().unwrap_or("-")
            );
        }
        if let Some(alerts) = witness["alerts"].as_array()
            && !alerts.is_empty()
        {
            out!(
                "the MSP's transparency log failed the witness check: {} alert bundle(s) {}",
                alerts.len(),
                alerts
                    .iter()
                    .filter_map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if let Some(reason) = &report.stopped {
        eprintln!("compliance-agent: order results stay queued: {reason}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn export_verify(
    dir: &Path,
    log_key: Option<&Path>,
    export_key: Option<&Path>,
    json: bool,
) -> Result<ExitCode> {
    let trusted =
        crate::audit_export::TrustedKeys {
            log_key: log_key.map(crate::witness::load_verifier).transpose()?,
            export_key: match export_key {
                Some(path) => {
                    let pem = std::fs::read_to_string(path).map_err(|source| Error::Io {
                        context: format!("cannot read the export key {}", path.display()),
                        source,
                    })?;
                    Some(VerifyingKey::from_spki_pem(&pem).map_err(|e| {
                        Error::Usage(format!("the export key {}: {e}", path.display()))
                    })?)
                }
                None => None,
            },
        };
    let report = crate::audit_export::verify(dir, &trusted).map_err(Error::Usage)?;
    if json {
        print_json(&report)?;
    } else {
        for p in &report.problems {
            out!("PROBLEM {p}");
        }
        for n in &report.notes {
            out!("NOTE {n}");
        }
        for h in &report.hosts {
            out!(
                "host {}: {} bundles ({} in the period), seq {}..{}, {} signatures and {} log proofs valid, key {}",
                h.host_id,
                h.bundles,
                h.in_period,
                h.first_seq.map_or("-".into(), |s| s.to_string()),
                h.last_seq.map_or("-".into(), |s| s.to_string()),
                h.signatures_valid,
                h.proofs_valid,
                h.key_fingerprint
            );
        }
        out!(
            "export of site {} from {} to {}: {} files, log tree size {}, export key {}, log key from {}, {} OSCAL observations checked: {}",
            report.site_id.as_deref().unwrap_or("?"),
            report.from.map_or("?".into(), |t| t.to_string()),
            report.to.map_or("?".into(), |t| t.to_string()),
            report.files,
            report.tree_size.map_or("?".into(), |s| s.to_string()),
            report.export_key_fingerprint.as_deref().unwrap_or("?"),
            report.log_key_source,
            report.observations_checked,
            if report.ok() {
                "OK".to_owned()
            } else {
                format!("{} problems", report.problems.len())
            }
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(evidence::EvidenceError::from)?;
    out!("{text}");
    Ok(())
}

fn keygen(out: &Path, json: bool) -> Result<ExitCode> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        context: format!("cannot create {}", out.display()),
        source,
    })?;
    let key = SigningKey::generate();
    let private = out.join("signing.key");
    let public = public_key_path(&private);
    key.write_pair(&private, &public)?;
    let fingerprint = key.verifying_key().fingerprint();
    if json {
        print_json(
            &json!({ "private_key": private, "public_key": public, "fingerprint": fingerprint }),
        )?;
    } else {
        out!(
            "private key: {} (mode 0600; keep it on this box only)",
            private.display()
        );
        out!(
            "public key:  {} (give it to the MSP and the auditor)",
            public.display()
        );
        out!("fingerprint: {fingerprint}");
    }
    Ok(ExitCode::SUCCESS)
}

fn config_check(path: Option<&Path>, json: bool) -> Result<ExitCode> {
    match Config::load(path) {
        Ok(config) => {
            if json {
                print_json(&json!({ "valid": true, "config": config }))?;
            } else {
                let value = serde_json::to_value(&config).map_err(evidence::EvidenceError::from)?;
                if let serde_json::Value::Object(map) = value {
                    for (k, v) in map {
                        out!("{k} = {v}");
                    }
                }
                out!("# configuration is valid");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(issues)) => {
            if json {
                print_json(&json!({ "valid": false, "problems": issues }))?;
            } else {
                eprintln!("{}", ConfigError::Invalid(issues));
            }
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            if json {
                print_json(
                    &json!({ "valid": false, "problems": [{ "key": null, "message": e.to_string() }] }),
                )?;
            } else {
                eprintln!("{e}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// The key that evidence is checked against: an explicit public key, the
/// public key beside the signing key, or the signing key itself.
fn verifying_key(config: &Config, pubkey: Option<&Path>) -> Result<VerifyingKey> {
    if let Some(path) = pubkey {
        return Ok(VerifyingKey::load(path)?);
    }
    let public = config.signing_pubkey_file();
    if public.exists() {
        return Ok(VerifyingKey::load(&public)?);
    }
    if config.signing_key_file.exists() {
        return Ok(SigningKey::load(&config.signing_key_file)?.verifying_key());
    }
    Err(Error::Usage(format!(
        "no public key to verify with: pass --pubkey signing.pub.pem (neither {} nor {} exists)",
        public.display(),
        config.signing_key_file.display()
    )))
}

fn parse_instant(flag: &str, value: &str, end_of_day: bool) -> Result<Timestamp> {
    if let Ok(ts) = value.parse::<Timestamp>() {
        return Ok(ts);
    }
    let date: jiff::civil::Date = value.parse().map_err(|_| {
        Error::Usage(format!("{flag} {value:?}: expected an RFC 3339 instant (2026-11-29T10:00:00Z) or a day (2026-11-29)"))
    })?;
    let date = if end_of_day {
        date.tomorrow()
            .map_err(|e| Error::Usage(format!("{flag} {value:?}: {e}")))?
    } else {
        date
    };
    date.to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp())
        .map_err(|e| Error::Usage(format!("{flag} {value:?}: {e}")))
}

fn parse_check(value: &str) -> Result<Check> {
    Check::parse(value).ok_or_else(|| {
        let names: Vec<&str> = Check::ALL.iter().map(|c| c.as_str()).collect();
        Error::Usage(format!(
            "unknown check {value:?}; use one of {}",
            names.join(", ")
        ))
    })
}

fn parse_outcome(value: &str) -> Result<Outcome> {
    Outcome::parse(value).ok_or_else(|| {
        let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        Error::Usage(format!(
            "unknown outcome {value:?}; use one of {}",
            names.join(", ")
        ))
    })
}

fn evidence_command(config: &Config, cmd: EvidenceCommand) -> Result<ExitCode> {
    match cmd {
        EvidenceCommand::Add {
            check,
            outcome,
            note,
            controls,
            json,
        } => {
            let check = parse_check(&check)?;
            if let Some(writer) = check.agent_only() {
                return Err(Error::Usage(format!(
                    "{check} bundles are written by {writer} only"
                )));
            }
            let mut draft = Draft::new(check, parse_outcome(&outcome)?);
            draft.post_state = json!({
                "recorded_by": "manual",
                "operator": std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).ok(),
                "note": note,
            });
            if !controls.is_empty() {
                draft.hipaa_controls = Some(controls);
            }
            let store = open_evidence_store(config)?;
            let stored = store.store(draft)?;
            if json {
                print_json(&stored)?;
            } else {
                out!("{}", stored.bundle_id);
            }
            // Flush now: a caller may be killed right after reading the id.
            let _ = std::io::stdout().flush();
            Ok(ExitCode::SUCCESS)
        }
        EvidenceCommand::List { filter, json } => {
            let filter = Filter {
                check: filter.check.as_deref().map(parse_check).transpose()?,
                outcome: filter.outcome.as_deref().map(parse_outcome).transpose()?,
                since: filter
                    .since
                    .as_deref()
                    .map(|s| parse_instant("--since", s, false))
                    .transpose()?,
                until: filter
                    .until
                    .as_deref()
                    .map(|s| parse_instant("--until", s, true))
                    .transpose()?,
                limit: filter.limit,
            };
            // Each line says whether its signature verifies: edited content is never shown as if it were signed.
            let key = verifying_key(config, None).ok();
            let listing = evidence::list_checked(&config.evidence_dir, &filter, key.as_ref())?;
            let items = &listing.items;
            if json {
                print_json(items)?;
            } else {
                out!(
                    "{:>6}  {:<30}  {:<18}  {:<9}  {:<9}  BUNDLE_ID",
                    "SEQ",
                    "TIMESTAMP",
                    "CHECK",
                    "OUTCOME",
                    "SIGNATURE"
                );
                for s in items {
                    let mark = match s.signature.as_deref() {
                        Some("valid") => "valid",
                        Some(_) => "INVALID",
                        None => "unchecked",
                    };
                    out!(
                        "{:>6}  {:<30}  {:<18}  {:<9}  {:<9}  {}",
                        s.seq,
                        s.timestamp_end.to_string(),
                        s.check.as_str(),
                        s.outcome.as_str(),
                        mark,
                        s.bundle_id
                    );
                }
            }
            for u in &listing.unreadable {
                eprintln!(
                    "compliance-agent: unreadable bundle {}: {} (run `evidence verify`)",
                    u.dir.display(),
                    u.reason
                );
            }
            let invalid = items
                .iter()
                .any(|s| s.signature.as_deref().is_some_and(|m| m != "valid"));
            Ok(if listing.unreadable.is_empty() && !invalid {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        EvidenceCommand::Show { bundle_id, json } => {
            let (bundle, dir) = evidence::find(&config.evidence_dir, &bundle_id)?;
            let signature = match verifying_key(config, None) {
                Ok(key) => match evidence::read_bundle_files(&dir) {
                    Ok((data, sig)) if key.verify(&data, &sig).is_ok() => {
                        format!("valid ({})", key.fingerprint())
                    }
                    Ok(_) => format!("INVALID for key {}", key.fingerprint()),
                    Err(e) => format!("cannot be checked ({e})"),
                },
                Err(e) => format!("not checked ({e})"),
            };
            if json {
                print_json(&json!({ "dir": dir, "signature": signature, "bundle": bundle }))?;
            } else {
                out!("bundle:    {} (seq {})", bundle.bundle_id, bundle.seq);
                out!("check:     {} -> {}", bundle.check, bundle.outcome);
                out!("controls:  {}", bundle.hipaa_controls.join(", "));
                out!(
                    "time:      {} .. {}",
                    bundle.timestamp_start,
                    bundle.timestamp_end
                );
                out!(
                    "host:      {}/{} ({})",
                    bundle.site_id,
                    bundle.host_id,
                    bundle.deployment_mode.as_str()
                );
                out!("signature: {signature}");
                out!("path:      {}", dir.display());
                if let Some(err) = &bundle.error {
                    out!("error:     {err}");
                }
                let text =
                    serde_json::to_string_pretty(&bundle).map_err(evidence::EvidenceError::from)?;
                out!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        EvidenceCommand::Verify {
            pubkey,
            dir,
            log_proofs,
            log_key,
            json,
        } => {
            let key = verifying_key(config, pubkey.as_deref())?;
            let root = dir.unwrap_or_else(|| config.evidence_dir.clone());
            if !root.is_dir() {
                return Err(Error::Usage(format!(
                    "{} is not an evidence directory",
                    root.display()
                )));
            }
            if let Some(store) = evidence::store_containing(&root) {
                return Err(Error::Usage(format!(
                    "{} is inside the evidence store {}; verify the whole store: --dir {}",
                    root.display(),
                    store.display(),
                    store.display()
                )));
            }
            let report = evidence::verify(&root, &key)?;
            let offline = if log_proofs {
                let key_file = log_key
                    .or_else(|| crate::witness::log_key_file(config))
                    .ok_or_else(|| {
                        Error::Usage(
                            "no log key: give --log-key FILE (log.vkey from enrollment)".into(),
                        )
                    })?;
                let verifier = crate::witness::load_verifier(&key_file)?;
                Some(crate::witness::verify_offline(
                    &config.state_dir.join(crate::witness::PROOFS_DIR),
                    &root,
                    &verifier,
                )?)
            } else {
                None
            };
            let proofs_ok = offline.as_ref().is_none_or(|o| o.ok());
            if json {
                match &offline {
                    Some(o) => print_json(&json!({ "evidence": report, "log_proofs": o }))?,
                    None => print_json(&report)?,
                }
            } else {
                if let Some(o) = &offline {
                    for p in &o.problems {
                        out!("PROBLEM log proof {p}");
                    }
                    out!(
                        "log proofs: {} inclusion and {} consistency proofs verified ({} of bundles no longer stored here): {}",
                        o.inclusion_verified,
                        o.consistency_verified,
                        o.without_local_bundle,
                        if o.ok() {
                            "log intact".to_owned()
                        } else {
                            format!("{} problem(s)", o.problems.len())
                        }
                    );
                }
                for p in &report.problems {
                    out!("PROBLEM {p}");
                }
                let range = match (report.first_seq, report.last_seq) {
                    (Some(a), Some(b)) => format!("seq {a}..{b}"),
                    _ => "empty".into(),
                };
                let pruned = report
                    .pruned_through_seq
                    .map(|p| format!(", pruned through seq {p} by a signed checkpoint"))
                    .unwrap_or_default();
                out!(
                    "{} bundles ({range}{pruned}), {} signatures valid, key {}: {}",
                    report.bundles,
                    report.signatures_valid,
                    report.key_fingerprint,
                    if report.ok() {
                        "chain intact".to_owned()
                    } else {
                        format!("{} problem(s)", report.problems.len())
                    }
                );
            }
            Ok(if report.ok() && proofs_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        EvidenceCommand::Stats { json } => {
            let stats = evidence::stats(&config.evidence_dir)?;
            if json {
                print_json(&stats)?;
            } else {
                out!("bundles: {} ({} bytes)", stats.bundles, stats.bytes);
                if let (Some(a), Some(b)) = (stats.first_seq, stats.last_seq) {
                    out!("chain:   seq {a}..{b}");
                }
                if let (Some(a), Some(b)) = (stats.oldest, stats.newest) {
                    out!("span:    {a} .. {b}");
                }
                if stats.unreadable > 0 {
                    out!("unreadable: {} (run `evidence verify`)", stats.unreadable);
                }
                for (check, outcomes) in &stats.by_check {
                    let parts: Vec<String> =
                        outcomes.iter().map(|(o, n)| format!("{o}={n}")).collect();
                    out!("  {check:<18} {}", parts.join(" "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        EvidenceCommand::Prune {
            keep,
            retention_days,
            json,
        } => {
            let store = open_evidence_store(config)?;
            let days = retention_days.unwrap_or(config.evidence_retention_days);
            crate::config::check_retention_days(days)
                .map_err(|e| Error::Usage(format!("--retention-days {days}: {e}")))?;
            let report = if config.mcp_url.is_some() {
                // Only what the MCP acknowledged may leave the box.
                let acknowledged = open_queue(config)?.acknowledged()?;
                store.prune_where(keep, days, Timestamp::now(), acknowledged)?
            } else {
                store.prune(keep, days, Timestamp::now())?
            };
            if json {
                print_json(&report)?;
            } else if let Some(cp) = &report.checkpoint {
                out!(
                    "pruned {} bundle(s) older than {days} days; {} kept; checkpoint {} (seq {})",
                    report.pruned,
                    report.kept,
                    cp.bundle_id,
                    cp.seq
                );
            } else {
                out!(
                    "nothing to prune ({} bundle(s), none older than {days} days beyond the {keep} newest)",
                    report.kept
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn agent_status(config: &Config, json: bool) -> Result<ExitCode> {
    let path = crate::agent::status_path(&config.state_dir);
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        context: format!("no status at {} (is the agent running?)", path.display()),
        source,
    })?;
    let status: crate::agent::AgentStatus = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Usage(format!("{} is not a status file: {e}", path.display())))?;
    let running = std::path::Path::new(&format!("/proc/{}", status.pid)).exists();
    if json {
        print_json(&json!({ "running": running, "status": status }))?;
    } else {
        let when =
            |t: Option<jiff::Timestamp>| t.map_or_else(|| "never".to_owned(), |t| t.to_string());
        out!(
            "agent:      {} (pid {}, version {}, {})",
            if running { "running" } else { "NOT running" },
            status.pid,
            status.version,
            status.mode
        );
        out!("started:    {}", when(status.started));
        out!(
            "last scan:  {}; last cycle {}",
            when(status.last_scan),
            when(status.last_cycle)
        );
        out!(
            "score:      {}",
            status
                .score
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.0}%"))
        );
        out!(
            "drifted:    {}",
            if status.drifted.is_empty() {
                "none".to_owned()
            } else {
                status.drifted.join(", ")
            }
        );
        out!(
            "queue:      {}",
            status
                .queue_pending
                .map_or_else(|| "offline".to_owned(), |p| format!("{p} pending"))
        );
        out!(
            "mcp:        last contact {}{}",
            when(status.last_mcp_contact),
            status
                .last_mcp_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        for d in &status.deferred {
            out!(
                "deferred:   {} {} (since {}; window opens {})",
                d.check,
                d.runbook,
                d.since,
                d.window_opens
            );
        }
    }
    Ok(if running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
