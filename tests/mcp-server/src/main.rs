//! The `mcp-server` binary: test PKI, host enrolment, orders, and the HTTPS server.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mcp_server::store::{ORDER_PUBKEY_FILE, describe_envelope};
use mcp_server::{OrderRequest, ServerConfig, Store};

/// Reference MCP server for the compliance agent: protocol v1 over HTTPS with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "mcp-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a test CA, a server certificate and a client certificate:
    /// DIR/ca.pem, DIR/server.pem + .key, DIR/client.pem + .key.
    Pki {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// DNS names and IP addresses of the server certificate.
        #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
        server_names: Vec<String>,
        /// Common name of the client certificate (by convention SITE/HOST).
        #[arg(long, default_value = "clinic-1/frontdesk-01")]
        client_name: String,
    },
    /// Create the state directory and its order-signing key; print the public key's path.
    Init {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Enroll a host's evidence public key (signing.pub.pem from `compliance-agent keygen`).
    Enroll {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        host: String,
        #[arg(long, value_name = "PEM")]
        pubkey: PathBuf,
    },
    /// Serve protocol v1 until killed; prints "listening on https://ADDR" first.
    Serve {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        #[arg(long, value_name = "PEM")]
        cert: PathBuf,
        #[arg(long, value_name = "PEM")]
        key: PathBuf,
        /// CA certificate(s) that client certificates must chain to.
        #[arg(long, value_name = "PEM")]
        client_ca: PathBuf,
        /// Require `Authorization: Bearer <contents of FILE>` on every request.
        #[arg(long, value_name = "FILE")]
        api_key_file: Option<PathBuf>,
    },
    /// Sign an order with the order key and queue it for a host; prints the order id.
    Order {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        runbook: String,
        /// The runbook's parameters as a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Seconds the order stays valid (at least 60).
        #[arg(long, default_value_t = 900)]
        ttl: u64,
        /// A fixed nonce instead of a random one (for replay tests).
        #[arg(long)]
        nonce: Option<String>,
    },
    /// What the server holds for a host: stored bundles, pending orders, results.
    List {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCP_SERVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-server: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Pki {
            out,
            server_names,
            client_name,
        } => {
            let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
            let files = mcp_server::pki::make(&out, &names, &client_name)?;
            println!("ca:     {}", files.ca.display());
            println!(
                "server: {} {}",
                files.server_cert.display(),
                files.server_key.display()
            );
            println!(
                "client: {} {}",
                files.client_cert.display(),
                files.client_key.display()
            );
        }
        Command::Init { state } => {
            Store::open(&state)?;
            println!("{}", state.join(ORDER_PUBKEY_FILE).display());
        }
        Command::Enroll {
            state,
            site,
            host,
            pubkey,
        } => {
            let pem = std::fs::read_to_string(&pubkey)
                .map_err(|e| format!("cannot read {}: {e}", pubkey.display()))?;
            Store::open(&state)?.enroll(&site, &host, &pem)?;
            println!("enrolled {site}/{host}");
        }
        Command::Serve {
            state,
            listen,
            cert,
            key,
            client_ca,
            api_key_file,
        } => {
            let api_key = match api_key_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let running = mcp_server::start(ServerConfig {
                state_dir: state,
                listen,
                cert,
                key,
                client_ca,
                api_key,
            })?;
            let mut stdout = std::io::stdout();
            writeln!(stdout, "listening on {}", running.url())?;
            stdout.flush()?;
            // Serve until the process is killed.
            loop {
                std::thread::park();
            }
        }
        Command::Order {
            state,
            site,
            host,
            runbook,
            params,
            ttl,
            nonce,
        } => {
            let params: serde_json::Value =
                serde_json::from_str(&params).map_err(|e| format!("--params: {e}"))?;
            let order = Store::open(&state)?.create_order(OrderRequest {
                site_id: site,
                host_id: host,
                runbook_id: runbook,
                params,
                ttl,
                nonce,
                issued_at: None,
            })?;
            println!("{}", order.order_id);
        }
        Command::List {
            state,
            site,
            host,
            json,
        } => {
            let store = Store::open(&state)?;
            let bundles = store.bundles(&site, &host)?;
            let pending = store.pending_orders(&site, &host)?;
            let results = store.results(&site, &host)?;
            if json {
                let value = serde_json::json!({
                    "bundles": bundles,
                    "pending_orders": pending["orders"],
                    "results": results,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("{} bundle(s) stored for {site}/{host}", bundles.len());
                if let Some(orders) = pending["orders"].as_array() {
                    for o in orders {
                        let runbook = describe_envelope(&o["envelope"].to_string())
                            .map(|o| o.runbook_id)
                            .unwrap_or_else(|| "?".into());
                        println!("pending order {} ({runbook})", o["order_id"]);
                    }
                }
                for r in results {
                    println!(
                        "result of order {}: {} (bundle {}){}",
                        r.order_id,
                        r.outcome,
                        r.bundle_id,
                        r.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}
