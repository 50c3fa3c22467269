//! Everything a request or a command needs, opened once from the configuration: the store,
//! the archive, the CA, the order key and the policy. Shared by the listeners and the CLI.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use compliance_agent::crypto::SigningKey;
use jiff::Timestamp;
use serde::Serialize;

use crate::archive::Archive;
use crate::auth::{Caller, OPERATOR_TOKEN_PREFIX, Role, Tenants, new_token, token_hash};
use crate::config::{Config, Paths};
use crate::pki::{Ca, Validity};
use crate::store::{Operator, Store};
use crate::{Error, Result};

/// Counters since start (for tests and /metrics; nothing depends on them).
#[derive(Debug, Default)]
pub struct IntakeStats {
    pub received: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    /// Archive writes that failed (the bundle was not acknowledged).
    pub archive_errors: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub archive_errors: u64,
}

impl IntakeStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            archive_errors: self.archive_errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    pub paths: Arc<Paths>,
    pub store: Arc<dyn Store>,
    pub archive: Arc<dyn Archive>,
    pub ca: Arc<Ca>,
    pub order_key: Arc<SigningKey>,
    pub stats: Arc<IntakeStats>,
    /// Wakes the background executor when an incident wants a plan (it also polls).
    pub remediation_wake: Arc<tokio::sync::Notify>,
}

/// What opening made for the first time (so `serve` can say so).
#[derive(Debug, Default)]
pub struct FirstStart {
    pub created_ca: bool,
    pub created_order_key: bool,
    pub created_tls_cert: bool,
}

impl Services {
    /// Opens (creating on first use) the state, database, archive, CA and order key.
    pub fn open(config: Config) -> Result<(Self, FirstStart)> {
        let paths = config.paths();
        let mut first = FirstStart::default();
        create_private_dir(&paths.state_dir)?;
        let store: Arc<dyn Store> = Arc::from(crate::store::open(
            config.database_url.as_deref(),
            &paths.database,
        )?);
        let archive: Arc<dyn Archive> = Arc::from(crate::archive::open(&config, &paths)?);
        archive.check()?;
        let (ca, created_ca) = Ca::load_or_create(&paths.ca_dir, "compliance MCP enrollment CA")?;
        first.created_ca = created_ca;
        let order_key = if paths.order_key.exists() {
            SigningKey::load(&paths.order_key)?
        } else {
            let key = SigningKey::generate();
            key.write_pair(&paths.order_key, &paths.order_pubkey)?;
            first.created_order_key = true;
            key
        };
        if config.tls_cert_file.is_none() && !paths.tls_cert.exists() {
            let names: Vec<&str> = config.server_names.iter().map(String::as_str).collect();
            ca.server(&names, Validity::Days(397))?.write(
                paths.tls_cert.parent().unwrap_or(&paths.state_dir),
                "server",
            )?;
            first.created_tls_cert = true;
        }
        Ok((
            Self {
                config: Arc::new(config),
                paths: Arc::new(paths),
                store,
                archive,
                ca: Arc::new(ca),
                order_key: Arc::new(order_key),
                stats: Arc::new(IntakeStats::default()),
                remediation_wake: Arc::new(tokio::sync::Notify::new()),
            },
            first,
        ))
    }

    /// On a server with no operator yet: makes the `admin` operator and writes its
    /// token (0600) to `admin_token_file`. Returns the file when it did.
    pub fn bootstrap_admin(&self) -> Result<Option<std::path::PathBuf>> {
        let system = Caller::local("bootstrap");
        if !self.store.operators(&system)?.is_empty() {
            return Ok(None);
        }
        let token = new_token(OPERATOR_TOKEN_PREFIX);
        self.store.create_operator(
            &system,
            &Operator {
                name: "admin".into(),
                role: Role::Admin,
                tenants: Tenants::All,
                token_hash: token_hash(&token),
                created_at: Timestamp::now(),
                disabled: false,
            },
        )?;
        crate::write_durable(
            &self.paths.admin_token,
            format!("{token}\n").as_bytes(),
            0o600,
        )?;
        crate::audit::record(&*self.store, &system, "operator.create", "admin", None);
        Ok(Some(self.paths.admin_token.clone()))
    }

    /// The order public key (SPKI PEM) boxes pin.
    pub fn order_pubkey_pem(&self) -> Result<String> {
        Ok(self.order_key.verifying_key().to_spki_pem()?)
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(dir))
}
