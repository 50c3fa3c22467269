//! The command line: `serve` and the operator commands, which act on the server's own
//! database as the local admin (`cli:<user>` in the audit log). Each has `--json`.

mod incidents;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use crate::auth::{Caller, Role, new_token, tenants_for, token_hash};
use crate::config::Config;
use crate::services::Services;
use crate::store::{Host, Operator};
use crate::{Error, Result};

/// The MSP's central server for the compliance appliance.
#[derive(Debug, Parser)]
#[command(name = "mcp-server", version)]
pub struct Cli {
    /// TOML configuration; without it (and without MCP_SERVER_CONFIG) the embedded default.
    #[arg(long, global = true, env = "MCP_SERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the agent listener (mTLS, protocol v1) and the operator listener until SIGTERM.
    Serve,
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled hosts.
    #[command(subcommand)]
    Hosts(HostsCommand),
    /// Sites and their runbook allowlists.
    #[command(subcommand)]
    Sites(SitesCommand),
    /// Fleet summary: hosts, overdue hosts, chains with gaps.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Orders to hosts.
    #[command(subcommand)]
    Order(OrderCommand),
    /// The evidence the server accepted.
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// Operator accounts and their API tokens.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Serve the Model Context Protocol tools on stdin/stdout for an MCP client, as the
    /// operator whose API token is in FILE (its scope and role; every call audited).
    Mcp {
        /// A file holding an operator token (`mcp-server users add` prints one).
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
        /// Register only the tools that change nothing (also `[mcp] read_only`).
        #[arg(long)]
        read_only: bool,
    },
    /// Incidents from the boxes' evidence, their plans and the orders made from them.
    #[command(subcommand)]
    Incidents(incidents::IncidentsCommand),
    /// The transparency log: its newest checkpoint, proofs, and sequencing now.
    #[command(subcommand)]
    Log(LogCommand),
    /// Check a log checkpoint and proofs offline with the log key (no server, no database).
    /// Exits 0 only if every given file verifies.
    Verify {
        /// The log key: `<name>+<id>+<key>` or a file holding it (log.vkey).
        #[arg(long, value_name = "VKEY|FILE")]
        log_key: String,
        /// A signed checkpoint note.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
        /// An inclusion proof as `log inclusion` or GET .../log/inclusion answers it.
        #[arg(long = "inclusion", value_name = "FILE")]
        inclusions: Vec<PathBuf>,
        /// The bundle.json each --inclusion is for, in the same order (checks the bytes too).
        #[arg(long = "bundle", value_name = "FILE")]
        bundles: Vec<PathBuf>,
        /// A consistency proof as `log consistency` answers it.
        #[arg(long = "consistency", value_name = "FILE")]
        consistencies: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// An auditor's package for one site and period: every bundle, key, log proof and
    /// report, the OSCAL assessment results, a README with the commands that check it
    /// (`compliance-agent export verify DIR`), and a signed manifest.
    Export {
        #[arg(long)]
        site: String,
        /// Start of the period: a date (midnight UTC) or an RFC 3339 time.
        #[arg(long, value_name = "DATE")]
        from: String,
        /// End of the period (exclusive), likewise.
        #[arg(long, value_name = "DATE")]
        to: String,
        /// A new directory for the export.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Export as the operator whose token is in FILE (an auditor, say), in its scope.
        #[arg(long, value_name = "FILE")]
        as_token: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The latest SBOM of each host: which hosts run a package or a store path.
    #[command(subcommand)]
    Sbom(SbomCommand),
    /// The audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SbomCommand {
    /// The hosts whose latest SBOM holds a package (at a version) or a store path.
    Hosts {
        /// A package name as the SBOM names its component (`openssl`).
        #[arg(long, conflicts_with = "path")]
        package: Option<String>,
        /// Only this version of the package.
        #[arg(long, requires = "package")]
        version: Option<String>,
        /// A full Nix store path.
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A host's latest SBOM document (CycloneDX JSON) on stdout.
    Show {
        /// SITE/HOST
        host: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// The newest signed checkpoint (the note; with --json also the log key).
    Checkpoint {
        #[arg(long)]
        json: bool,
    },
    /// Append every queued bundle now and sign a checkpoint (the server does this by itself).
    Sequence,
    /// The inclusion proof of a bundle (JSON, for `mcp-server verify --inclusion`).
    Inclusion {
        #[arg(long)]
        bundle: String,
        #[arg(long)]
        tree_size: Option<u64>,
    },
    /// The consistency proof between two tree sizes (JSON, for `mcp-server verify --consistency`).
    Consistency {
        #[arg(long)]
        old: u64,
        #[arg(long)]
        new: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// A token a box enrolls with: `compliance-agent enroll --server URL --token T`.
    Create {
        #[arg(long)]
        site: String,
        /// The site's reseller; none for a direct-mode site of the MSP.
        #[arg(long)]
        reseller: Option<String>,
        /// How many boxes may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime: 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        expires: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// One host: chain, gaps, latest result per check, last seen.
    Show {
        /// SITE/HOST
        host: String,
        #[arg(long)]
        json: bool,
    },
    /// Refuse the host's certificate from its next request on.
    Revoke {
        /// SITE/HOST
        host: String,
        #[arg(long)]
        json: bool,
    },
    /// Provision a host by hand with its evidence public key (no enrollment token;
    /// any certificate of the CA naming SITE/HOST then acts for it).
    Add {
        /// SITE/HOST
        host: String,
        #[arg(long, value_name = "PEM")]
        pubkey: PathBuf,
        #[arg(long)]
        reseller: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SitesCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show or set a site's executor mode: auto, approve, off, or default (the configured one).
    Mode {
        #[arg(long)]
        site: String,
        #[arg(long)]
        mode: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put runbooks on a site's allowlist.
    Allow {
        #[arg(long)]
        site: String,
        #[arg(long = "runbook", required = true)]
        runbooks: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// Sign an order (or queue it for a second operator's approval if disruptive).
    Create {
        /// SITE/HOST
        #[arg(long)]
        host: String,
        #[arg(long)]
        runbook: String,
        /// The runbook's parameters as a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    List {
        /// Only this SITE/HOST.
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Approve a disruptive order created by another operator.
    Approve {
        order_id: String,
        /// Approve as this operator (its token file), not as the local admin.
        #[arg(long, value_name = "FILE")]
        as_token: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Bundle ids a host delivered, in seq order.
    List {
        /// SITE/HOST
        #[arg(long)]
        host: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// A new operator; prints its API token once.
    Add {
        #[arg(long)]
        name: String,
        /// admin, reseller_operator, site_operator or auditor.
        #[arg(long)]
        role: String,
        #[arg(long)]
        reseller: Option<String>,
        #[arg(long = "site")]
        sites: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

/// `30m`, `24h`, `7d`, `90s`.
pub fn parse_duration(text: &str) -> Result<SignedDuration> {
    let text = text.trim();
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: i64 = num
        .parse()
        .map_err(|_| Error::Invalid(format!("{text:?} is not a duration like 30m, 24h or 7d")))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" | "" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(Error::Invalid(format!(
                "{text:?}: the unit must be s, m, h or d"
            )));
        }
    };
    Ok(SignedDuration::from_secs(secs))
}

fn split_host(s: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((a, b)) if crate::valid_id(a) && crate::valid_id(b) => Ok((a.into(), b.into())),
        _ => Err(Error::Invalid(format!("{s:?} is not SITE/HOST"))),
    }
}

/// Revokes a host (audited); shared by the CLI and the operator API.
pub fn revoke(svc: &Services, caller: &Caller, site: &str, host: &str) -> Result<bool> {
    let r = svc.store.revoke_host(caller, site, host, Timestamp::now());
    let refused = crate::audit::refusal(&r);
    crate::audit::record(
        &*svc.store,
        caller,
        "host.revoke",
        &format!("{site}/{host}"),
        refused.as_deref(),
    );
    Ok(r?)
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn local_caller() -> Caller {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    Caller::local(&user)
}

pub fn run(cli: Cli) -> Result<()> {
    if let Command::Verify {
        log_key,
        checkpoints,
        inclusions,
        bundles,
        consistencies,
        json,
    } = cli.command
    {
        let report = crate::verify::verify(&crate::verify::VerifyRequest {
            log_key,
            checkpoints,
            inclusions,
            bundles,
            consistencies,
        })?;
        if json {
            print_json(&json!(report));
        } else {
            for line in &report.checked {
                println!("OK {line}");
            }
            for p in &report.problems {
                println!("PROBLEM {p}");
            }
        }
        if !report.ok() {
            return Err(Error::Invalid(format!(
                "{} of the given files do not verify",
                report.problems.len()
            )));
        }
        if report.checked.is_empty() {
            return Err(Error::Invalid(
                "nothing to verify: give --checkpoint, --inclusion or --consistency".into(),
            ));
        }
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    let (svc, first) = Services::open(config)?;
    let caller = local_caller();
    match cli.command {
        Command::Serve => {
            if first.created_ca {
                println!(
                    "created the enrollment CA in {}",
                    svc.paths.ca_dir.display()
                );
            }
            if first.created_order_key {
                println!(
                    "created the order key {} (boxes pin {})",
                    svc.paths.order_key.display(),
                    svc.paths.order_pubkey.display()
                );
            }
            if first.created_log_key {
                println!(
                    "created the transparency log key {}",
                    svc.paths.log_key.display()
                );
            }
            println!(
                "log key {} (in {})",
                svc.log.vkey(),
                svc.paths.log_vkey.display()
            );
            if let Some(path) = svc.bootstrap_admin()? {
                println!("wrote the first admin token to {}", path.display());
            }
            let running = crate::Running::start(svc, crate::StartOptions::default())?;
            println!(
                "agent listener on https://{} (mTLS, protocol v1)",
                running.agent_addr()
            );
            println!("operator listener on https://{}", running.operator_addr());
            println!("CA fingerprint {}", running.services.ca.fingerprint());
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            running.wait_for_signal()?;
        }
        Command::Token(TokenCommand::Create {
            site,
            reseller,
            uses,
            expires,
            json,
        }) => {
            let req = crate::enroll::TokenRequest {
                site_id: site,
                reseller_id: reseller,
                uses,
                expires_in: parse_duration(&expires)?,
            };
            let t = crate::enroll::create_token(&svc, &caller, &req)?;
            if json {
                print_json(&json!(t));
            } else {
                println!("{}", t.token);
                eprintln!(
                    "site {} ({} use(s), expires {}); on the box: compliance-agent enroll --server {} --token <token>",
                    t.site_id,
                    t.uses,
                    t.expires_at,
                    svc.config.public_url()
                );
            }
        }
        Command::Hosts(HostsCommand::List { json }) => {
            let fleet = crate::fleet::fleet(&*svc.store, &caller, Timestamp::now())?;
            if json {
                print_json(&json!({ "hosts": fleet }));
            } else {
                for h in fleet {
                    println!(
                        "{}/{}\tbundles {}\tthrough {}\tgaps {}\t{}{}",
                        h.site_id,
                        h.host_id,
                        h.bundles,
                        h.contiguous_through.map_or("-".into(), |s| s.to_string()),
                        h.gaps.len(),
                        if h.overdue { "OVERDUE" } else { "ok" },
                        if h.revoked_at.is_some() {
                            " revoked"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Hosts(HostsCommand::Show { host, json }) => {
            let (site, host_id) = split_host(&host)?;
            let h = svc
                .store
                .host(&caller, &site, &host_id)?
                .ok_or_else(|| Error::Invalid(format!("no such host {host}")))?;
            let st = crate::fleet::host_status(&*svc.store, &caller, &h, Timestamp::now())?;
            if json {
                print_json(&json!(st));
            } else {
                println!(
                    "{host}: {} bundles, contiguous through {:?}, gaps {:?}, last seen {:?}, overdue {}",
                    st.bundles, st.contiguous_through, st.gaps, st.last_seen, st.overdue
                );
                for r in &st.latest {
                    println!("  {}\t{}\t{}", r.check, r.outcome, r.timestamp_end);
                }
            }
        }
        Command::Hosts(HostsCommand::Revoke { host, json }) => {
            let (site, host_id) = split_host(&host)?;
            let changed = revoke(&svc, &caller, &site, &host_id)?;
            if json {
                print_json(&json!({ "revoked": host, "changed": changed }));
            } else if changed {
                println!("revoked {host}: its certificate is refused from the next request on");
            } else {
                println!("{host} was already revoked");
            }
        }
        Command::Hosts(HostsCommand::Add {
            host,
            pubkey,
            reseller,
        }) => {
            let (site, host_id) = split_host(&host)?;
            let pem = std::fs::read_to_string(&pubkey).map_err(Error::io(&pubkey))?;
            compliance_agent::crypto::VerifyingKey::from_spki_pem(&pem).map_err(|e| {
                Error::Invalid(format!(
                    "{}: not an Ed25519 public key in SPKI PEM: {e}",
                    pubkey.display()
                ))
            })?;
            add_host(&svc, &caller, &site, &host_id, reseller.as_deref(), &pem)?;
            println!("added {host}");
        }
        Command::Sites(SitesCommand::List { json }) => {
            let sites = svc.store.sites(&caller)?;
            if json {
                print_json(&json!({ "sites": sites }));
            } else {
                for s in sites {
                    println!(
                        "{}\t{}\t{}",
                        s.site_id,
                        s.reseller_id.as_deref().unwrap_or("(direct)"),
                        s.runbook_allowlist.join(",")
                    );
                }
            }
        }
        Command::Sites(SitesCommand::Allow { site, runbooks }) => {
            for r in &runbooks {
                if !compliance_agent::runbook_ids::RUNBOOK_IDS.contains(&r.as_str()) {
                    return Err(Error::Invalid(format!(
                        "unknown runbook {r:?}; known: {}",
                        compliance_agent::runbook_ids::RUNBOOK_IDS.join(", ")
                    )));
                }
            }
            let mut s = svc
                .store
                .site(&caller, &site)?
                .ok_or_else(|| Error::Invalid(format!("no such site {site}")))?;
            for r in runbooks {
                if !s.runbook_allowlist.contains(&r) {
                    s.runbook_allowlist.push(r);
                }
            }
            let result = svc.store.put_site(&caller, &s);
            let refused = crate::audit::refusal(&result);
            crate::audit::record(
                &*svc.store,
                &caller,
                "site.allow",
                &site,
                refused.as_deref(),
            );
            result?;
            println!("{site}: {}", s.runbook_allowlist.join(", "));
        }
        Command::Status { json } => {
            let fleet = crate::fleet::fleet(&*svc.store, &caller, Timestamp::now())?;
            let overdue: Vec<String> = fleet
                .iter()
                .filter(|h| h.overdue)
                .map(|h| format!("{}/{}", h.site_id, h.host_id))
                .collect();
            let gaps = fleet.iter().filter(|h| !h.gaps.is_empty()).count();
            let v = json!({ "hosts": fleet.len(), "overdue": overdue, "hosts_with_gaps": gaps, "database": svc.store.backend(), "schema_version": svc.store.schema_version()?, "archive": svc.archive.kind() });
            if json {
                print_json(&v);
            } else {
                println!(
                    "{} hosts, {} overdue, {} with chain gaps ({} database, {} archive)",
                    fleet.len(),
                    overdue.len(),
                    gaps,
                    svc.store.backend(),
                    svc.archive.kind()
                );
            }
        }
        Command::Order(OrderCommand::Create {
            host,
            runbook,
            params,
            ttl,
            json,
        }) => {
            let (site, host_id) = split_host(&host)?;
            let params: serde_json::Value = serde_json::from_str(&params)
                .map_err(|e| Error::Invalid(format!("--params is not JSON: {e}")))?;
            let o = crate::orders::create(
                &svc,
                &caller,
                &crate::orders::OrderDraft {
                    site_id: site,
                    host_id,
                    runbook_id: runbook,
                    params,
                    ttl,
                },
            )?;
            if json {
                print_json(&json!(o));
            } else {
                println!("{}\t{}", o.order_id, o.state.as_str());
            }
        }
        Command::Order(OrderCommand::List { host, json }) => {
            let host = host.as_deref().map(split_host).transpose()?;
            let orders = svc.store.orders(
                &caller,
                host.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
            )?;
            if json {
                print_json(&json!({ "orders": orders }));
            } else {
                for o in orders {
                    println!(
                        "{}\t{}/{}\t{}\t{}\t{}",
                        o.order_id,
                        o.site_id,
                        o.host_id,
                        o.runbook_id,
                        o.state.as_str(),
                        o.result_outcome.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        Command::Order(OrderCommand::Approve {
            order_id,
            as_token,
            json,
        }) => {
            let approver = match as_token {
                Some(path) => token_caller(&svc, &path)?,
                None => caller,
            };
            let o = crate::orders::approve(&svc, &approver, &order_id)?;
            if json {
                print_json(&json!(o));
            } else {
                println!("{}\t{}", o.order_id, o.state.as_str());
            }
        }
        Command::Evidence(EvidenceCommand::List { host, json }) => {
            let (site, host_id) = split_host(&host)?;
            let ids = svc.store.bundle_ids(&caller, &site, &host_id)?;
            if json {
                print_json(&json!({ "host": host, "bundles": ids }));
            } else {
                for id in ids {
                    println!("{id}");
                }
            }
        }
        Command::Users(UsersCommand::Add {
            name,
            role,
            reseller,
            sites,
            json,
        }) => {
            let role = Role::parse(&role).ok_or_else(|| {
                Error::Invalid(format!(
                    "--role {role:?}: one of admin, reseller_operator, site_operator, auditor"
                ))
            })?;
            let tenants = tenants_for(role, reseller.as_deref(), &sites)?;
            let token = new_token(crate::auth::OPERATOR_TOKEN_PREFIX);
            let op = Operator {
                name: name.clone(),
                role,
                tenants,
                token_hash: token_hash(&token),
                created_at: Timestamp::now(),
                disabled: false,
            };
            let r = svc.store.create_operator(&caller, &op);
            let refused = crate::audit::refusal(&r);
            crate::audit::record(
                &*svc.store,
                &caller,
                "operator.create",
                &name,
                refused.as_deref(),
            );
            r?;
            if json {
                print_json(&json!({ "name": name, "role": role, "token": token }));
            } else {
                println!("{token}");
            }
        }
        Command::Users(UsersCommand::List { json }) => {
            let ops = svc.store.operators(&caller)?;
            if json {
                print_json(&json!({ "operators": ops }));
            } else {
                for o in ops {
                    println!(
                        "{}\t{}\t{}",
                        o.name,
                        o.role.as_str(),
                        serde_json::to_string(&o.tenants).unwrap_or_default()
                    );
                }
            }
        }
        Command::Mcp {
            token_file,
            read_only,
        } => {
            let read_only = read_only || svc.config.mcp.read_only;
            crate::tools::serve_stdio(svc, &token_file, read_only)?;
        }
        Command::Incidents(command) => incidents::run(&svc, &caller, command)?,
        Command::Sites(SitesCommand::Mode { site, mode, json }) => {
            incidents::site_mode(&svc, &caller, &site, mode.as_deref(), json)?;
        }
        Command::Verify { .. } => unreachable!("handled before the state is opened"),
        Command::Sbom(SbomCommand::Hosts {
            package,
            version,
            path,
            json,
        }) => {
            let q = crate::store::sbom::SbomQuery {
                package,
                version,
                store_path: path,
            };
            let found = svc.store.sbom_hosts(&caller, &q)?;
            if json {
                print_json(&json!({ "hosts": found }));
            } else {
                for m in found {
                    println!(
                        "{}/{}\t{}\t{}\t{}",
                        m.site_id,
                        m.host_id,
                        m.component.name,
                        m.component.version.as_deref().unwrap_or("-"),
                        m.component.store_path
                    );
                }
            }
        }
        Command::Sbom(SbomCommand::Show { host }) => {
            let (site, host_id) = split_host(&host)?;
            let found = svc
                .store
                .latest_sbom(&caller, &site, &host_id)?
                .ok_or_else(|| Error::Invalid(format!("no SBOM from {host} yet")))?;
            use std::io::Write as _;
            std::io::stdout()
                .write_all(&found.document)
                .map_err(|e| Error::Invalid(format!("stdout: {e}")))?;
        }
        Command::Export {
            site,
            from,
            to,
            out,
            as_token,
            json,
        } => {
            let caller = match as_token {
                Some(path) => token_caller(&svc, &path)?,
                None => caller,
            };
            let req = crate::export::ExportRequest {
                site_id: site,
                from: crate::export::parse_when("--from", &from)?,
                to: crate::export::parse_when("--to", &to)?,
                out,
            };
            let s = crate::export::export(&svc, &caller, &req)?;
            if json {
                print_json(&json!(s));
            } else {
                for p in &s.problems {
                    println!("PROBLEM {p}");
                }
                println!(
                    "exported site {} to {}: {} hosts, {} bundles ({} in the period), {} files, log tree size {}, manifest signed by {}",
                    s.site_id,
                    s.out.display(),
                    s.hosts,
                    s.bundles,
                    s.in_period,
                    s.files,
                    s.tree_size,
                    s.export_key_fingerprint
                );
                println!(
                    "check it: compliance-agent export verify {} --log-key LOG_VKEY (see its README.md)",
                    s.out.display()
                );
            }
        }
        Command::Log(cmd) => log_command(&svc, &caller, cmd)?,
        Command::Audit { limit, json } => {
            let entries = svc.store.audit(&caller, limit)?;
            if json {
                print_json(&json!({ "audit": entries }));
            } else {
                for e in entries {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        e.at, e.actor, e.action, e.target, e.outcome, e.detail
                    );
                }
            }
        }
    }
    Ok(())
}

/// The operator whose API token is in `path`, as a caller (scope and role its own).
fn token_caller(svc: &Services, path: &Path) -> Result<Caller> {
    let token = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let op = svc
        .store
        .operator_by_token(&token_hash(token.trim()))?
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the operator token is not valid",
                path.display()
            ))
        })?;
    Ok(Caller {
        actor: format!("operator:{}", op.name),
        role: op.role,
        tenants: op.tenants,
        peer: None,
    })
}

fn log_command(svc: &Services, caller: &Caller, cmd: LogCommand) -> Result<()> {
    let log_err = |e: crate::tlog::LogError| Error::Invalid(e.to_string());
    match cmd {
        LogCommand::Checkpoint { json } => {
            let c = crate::tlog::checkpoint(svc).map_err(log_err)?;
            if json {
                print_json(&json!(c));
            } else {
                print!("{}", c.checkpoint);
            }
        }
        LogCommand::Sequence => {
            match crate::tlog::sequence(&*svc.store, &svc.log).map_err(log_err)? {
                Some(c) => println!("sequenced: the log has {} leaves", c.tree_size),
                None => println!("nothing queued"),
            }
        }
        LogCommand::Inclusion { bundle, tree_size } => {
            let a = crate::tlog::inclusion(
                svc,
                caller,
                crate::tlog::LeafKey::Bundle(&bundle),
                tree_size,
            )
            .map_err(log_err)?;
            print_json(&json!(a));
        }
        LogCommand::Consistency { old, new } => {
            print_json(&json!(
                crate::tlog::consistency(svc, old, new).map_err(log_err)?
            ));
        }
    }
    Ok(())
}

/// Adds a host by hand (creating its site); audited.
pub fn add_host(
    svc: &Services,
    caller: &Caller,
    site: &str,
    host: &str,
    reseller: Option<&str>,
    pubkey_pem: &str,
) -> Result<()> {
    let r = (|| -> Result<()> {
        if svc.store.site(caller, site)?.is_none() {
            svc.store.put_site(
                caller,
                &crate::store::Site {
                    site_id: site.into(),
                    reseller_id: reseller.map(str::to_owned),
                    runbook_allowlist: svc.config.orders.default_site_allowlist.clone(),
                    created_at: Timestamp::now(),
                },
            )?;
        }
        svc.store.add_host(
            caller,
            &Host {
                site_id: site.into(),
                host_id: host.into(),
                reseller_id: None,
                evidence_pubkey_pem: pubkey_pem.into(),
                cert_serial: None,
                enrolled_at: Timestamp::now(),
                revoked_at: None,
                scan_interval_sec: svc.config.default_scan_interval_sec,
                last_seen: None,
            },
        )?;
        Ok(())
    })();
    let refused = crate::audit::refusal(&r);
    crate::audit::record(
        &*svc.store,
        caller,
        "host.add",
        &format!("{site}/{host}"),
        refused.as_deref(),
    );
    r
}
