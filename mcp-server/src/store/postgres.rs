//! The PostgreSQL store (production, `database_url = "postgres://..."`): versioned
//! append-only migrations from migrations/postgres/, the same tables and meaning as the
//! SQLite store. Several server processes may share one database:
//!
//! - a bundle is inserted in a transaction that first locks its host's row
//!   (`SELECT ... FOR UPDATE`), so the chain check and the insert are one step for all
//!   writers of that host, in any process, and a chain cannot fork between them;
//! - a token's use is redeemed under a lock on the token's row;
//! - the audit log refuses UPDATE, DELETE and TRUNCATE by trigger, whoever asks;
//! - migrations run under an advisory lock, and a database whose applied migration
//!   differs from this build's text is refused.
//!
//! Connections come from a small pool of blocking clients; handlers call in through
//! `spawn_blocking`.

/// The console's storage (sessions, passwords, token revocation, evidence listing).
mod console;
mod evidence_query;
pub mod incidents;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use compliance_agent::evidence::chain::{StoredLink, check_link};
use jiff::Timestamp;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row};
use sha2::{Digest, Sha256};

use super::{
    AuditEntry, BundleRecord, CheckResult, EnrollmentToken, Host, Neighbours, Operator,
    OrderRecord, OrderState, Recorded, Result, Site, Store, StoreError, audit_visible,
    require_sees,
};
use crate::auth::{Caller, Role, Tenants, hashes_equal};

mod sbom;
mod tlog;

/// The migrations, in order. Append only: a released file is never edited (the
/// store refuses a database whose applied migration differs from this text).
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "incidents",
        include_str!("../../migrations/postgres/0002_incidents.sql"),
    ),
    (
        3,
        "transparency_log",
        include_str!("../../migrations/postgres/0003_transparency_log.sql"),
    ),
    (
        4,
        "console",
        include_str!("../../migrations/postgres/0004_console.sql"),
    ),
    (
        5,
        "sbom",
        include_str!("../../migrations/postgres/0005_sbom.sql"),
    ),
];

/// Connections kept open between calls.
const MAX_IDLE: usize = 16;
/// Connections one store (one server process) has open at most. Requests beyond it wait
/// for a free one (up to `CONNECTION_WAIT`) instead of opening more: PostgreSQL's own
/// limit (`max_connections`, 100 by default) is shared by every server process, and a
/// refused connection would turn a burst of uploads into 503s.
pub const MAX_OPEN: usize = 32;
/// How long a request waits for one of the `MAX_OPEN` connections.
const CONNECTION_WAIT: Duration = Duration::from_secs(30);
/// A connection idle longer than this is checked before it is used again (a database
/// restarted meanwhile would otherwise fail the first call on every pooled connection).
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(10);
/// The advisory lock key migrations run under ("mcp-migr").
const MIGRATION_LOCK: i64 = 0x6d63_702d_6d69_6772;

type Param = Box<dyn ToSql + Sync + Send>;

pub struct PostgresStore {
    config: postgres::Config,
    /// Where the database is, for messages (never the password).
    target: String,
    idle: Mutex<Vec<(Client, Instant)>>,
    /// Connections handed out now (at most `MAX_OPEN`), and the signal that one came back.
    in_use: Mutex<usize>,
    returned: std::sync::Condvar,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Each blocking client owns a small runtime, which must not be dropped on an
        // async worker (the last reference to the store may go there at shutdown).
        let idle = self.idle.get_mut().map(std::mem::take).unwrap_or_default();
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("mcp-pg-close".into())
                .spawn(move || drop(idle));
        }
    }
}

/// A pooled connection, returned to the pool on drop unless it broke.
struct Conn<'a> {
    store: &'a PostgresStore,
    client: Option<Client>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Present from construction until drop.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && !client.is_closed()
            && let Ok(mut idle) = self.store.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push((client, Instant::now()));
        }
        self.store.release_slot();
    }
}

fn db(e: postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable(format!("the connection to PostgreSQL closed: {e}"));
    }
    match e.code() {
        Some(code) => {
            let class = &code.code()[..2];
            let message = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            // 08 connection exception, 53 insufficient resources, 57 operator intervention.
            if matches!(class, "08" | "53" | "57") {
                StoreError::Unavailable(message)
            } else {
                StoreError::Backend(message)
            }
        }
        None => {
            let io = std::error::Error::source(&e)
                .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
            if io {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Backend(e.to_string())
            }
        }
    }
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// An error mapper for an INSERT: a unique violation becomes `taken()`, anything else `db`.
fn unique_or_db(taken: impl FnOnce() -> StoreError) -> impl FnOnce(postgres::Error) -> StoreError {
    move |e| {
        if is_unique_violation(&e) {
            taken()
        } else {
            db(e)
        }
    }
}

fn micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

fn ts(us: i64) -> Timestamp {
    Timestamp::from_microsecond(us).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn seq_sql(seq: u64) -> Result<i64> {
    i64::try_from(seq)
        .map_err(|_| StoreError::Backend(format!("seq {seq} exceeds the index range")))
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
}

/// A WHERE fragment restricting `site_col`/`host_col` (with the site's reseller in
/// `reseller_col`) to the caller's tenants, with parameters numbered from `first`.
fn scope(
    caller: &Caller,
    site_col: &str,
    reseller_col: &str,
    host_col: &str,
    first: usize,
) -> (String, Vec<Param>) {
    match &caller.tenants {
        Tenants::All => ("TRUE".into(), vec![]),
        Tenants::Reseller { reseller_id } => (
            format!("{reseller_col} = ${first}"),
            vec![Box::new(reseller_id.clone())],
        ),
        Tenants::Sites { site_ids } => (
            format!("{site_col} = ANY(${first})"),
            vec![Box::new(site_ids.clone())],
        ),
        Tenants::Host { site_id, host_id } => (
            format!("{site_col} = ${first} AND {host_col} = ${}", first + 1),
            vec![Box::new(site_id.clone()), Box::new(host_id.clone())],
        ),
    }
}

const HOST_COLS: &str = "h.site_id, h.host_id, s.reseller_id, h.evidence_pubkey_pem, h.cert_serial, \
    h.enrolled_at, h.revoked_at, h.scan_interval_sec, h.last_seen";

fn host_row(r: &Row) -> std::result::Result<Host, postgres::Error> {
    Ok(Host {
        site_id: r.try_get(0)?,
        host_id: r.try_get(1)?,
        reseller_id: r.try_get(2)?,
        evidence_pubkey_pem: r.try_get(3)?,
        cert_serial: r.try_get(4)?,
        enrolled_at: ts(r.try_get(5)?),
        revoked_at: r.try_get::<_, Option<i64>>(6)?.map(ts),
        scan_interval_sec: unsigned(r.try_get(7)?),
        last_seen: r.try_get::<_, Option<i64>>(8)?.map(ts),
    })
}

const BUNDLE_COLS: &str = "bundle_id, site_id, host_id, seq, hash, prev_hash, check_name, outcome, \
    timestamp_end, received_at, archive_key, order_id";

fn bundle_row(r: &Row) -> std::result::Result<BundleRecord, postgres::Error> {
    Ok(BundleRecord {
        bundle_id: r.try_get(0)?,
        site_id: r.try_get(1)?,
        host_id: r.try_get(2)?,
        seq: unsigned(r.try_get(3)?),
        hash: r.try_get(4)?,
        prev_hash: r.try_get(5)?,
        check: r.try_get(6)?,
        outcome: r.try_get(7)?,
        timestamp_end: ts(r.try_get(8)?),
        received_at: ts(r.try_get(9)?),
        archive_key: r.try_get(10)?,
        order_id: r.try_get(11)?,
    })
}

const ORDER_COLS: &str = "o.order_id, o.site_id, o.host_id, o.runbook_id, o.params, o.ttl, o.state, \
    o.envelope, o.created_by, o.created_at, o.approved_by, o.result_bundle_id, o.result_outcome, \
    o.result_error, o.answered_at";

fn order_row(r: &Row) -> std::result::Result<OrderRecord, postgres::Error> {
    let params: String = r.try_get(4)?;
    let state: String = r.try_get(6)?;
    Ok(OrderRecord {
        order_id: r.try_get(0)?,
        site_id: r.try_get(1)?,
        host_id: r.try_get(2)?,
        runbook_id: r.try_get(3)?,
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        ttl: unsigned(r.try_get(5)?),
        state: OrderState::parse(&state).unwrap_or(OrderState::Answered),
        envelope: r.try_get(7)?,
        created_by: r.try_get(8)?,
        created_at: ts(r.try_get(9)?),
        approved_by: r.try_get(10)?,
        result_bundle_id: r.try_get(11)?,
        result_outcome: r.try_get(12)?,
        result_error: r.try_get(13)?,
        answered_at: r.try_get::<_, Option<i64>>(14)?.map(ts),
    })
}

fn operator_row(r: &Row) -> std::result::Result<Operator, postgres::Error> {
    let role: String = r.try_get(1)?;
    let tenants: String = r.try_get(2)?;
    let hash: Vec<u8> = r.try_get(3)?;
    let mut token_hash = [0u8; 32];
    if hash.len() == 32 {
        token_hash.copy_from_slice(&hash);
    }
    Ok(Operator {
        name: r.try_get(0)?,
        // An unknown role in the database reads as the weakest one.
        role: Role::parse(&role).unwrap_or(Role::Auditor),
        tenants: serde_json::from_str(&tenants).unwrap_or(Tenants::Sites { site_ids: vec![] }),
        token_hash,
        created_at: ts(r.try_get(4)?),
        disabled: r.try_get(5)?,
    })
}

fn rows<T>(
    rows: Vec<Row>,
    f: impl Fn(&Row) -> std::result::Result<T, postgres::Error>,
) -> Result<Vec<T>> {
    rows.iter().map(|r| f(r).map_err(db)).collect()
}

fn link_at(
    c: &mut impl GenericClient,
    site: &str,
    host: &str,
    seq: u64,
) -> Result<Option<StoredLink>> {
    let Ok(seq_i) = i64::try_from(seq) else {
        return Ok(None);
    };
    let row = c
        .query_opt(
            "SELECT bundle_id, seq, hash, prev_hash FROM bundles WHERE site_id = $1 AND host_id = $2 AND seq = $3",
            &[&site, &host, &seq_i],
        )
        .map_err(db)?;
    row.map(|r| {
        Ok(StoredLink {
            bundle_id: r.try_get(0)?,
            seq: unsigned(r.try_get(1)?),
            hash: r.try_get(2)?,
            prev_hash: r.try_get(3)?,
        })
    })
    .transpose()
    .map_err(db)
}

fn neighbours_in(
    c: &mut impl GenericClient,
    site: &str,
    host: &str,
    seq: u64,
) -> Result<Neighbours> {
    Ok(Neighbours {
        previous: match seq.checked_sub(1) {
            Some(s) if s > 0 => link_at(c, site, host, s)?,
            _ => None,
        },
        same_seq: link_at(c, site, host, seq)?,
        next: match seq.checked_add(1) {
            Some(s) => link_at(c, site, host, s)?,
            None => None,
        },
    })
}

fn site_in(c: &mut impl GenericClient, site_id: &str, lock: bool) -> Result<Option<Site>> {
    let sql = format!(
        "SELECT site_id, reseller_id, runbook_allowlist, created_at FROM sites WHERE site_id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = c.query_opt(&sql, &[&site_id]).map_err(db)?;
    row.map(|r| {
        let list: String = r.try_get(2)?;
        Ok(Site {
            site_id: r.try_get(0)?,
            reseller_id: r.try_get(1)?,
            runbook_allowlist: serde_json::from_str(&list).unwrap_or_default(),
            created_at: ts(r.try_get(3)?),
        })
    })
    .transpose()
    .map_err(db)
}

/// The host, optionally locking its row until the transaction ends (the chain lock).
fn host_in(
    c: &mut impl GenericClient,
    site_id: &str,
    host_id: &str,
    lock: bool,
) -> Result<Option<Host>> {
    let sql = format!(
        "SELECT {HOST_COLS} FROM hosts h JOIN sites s ON s.site_id = h.site_id WHERE h.site_id = $1 AND h.host_id = $2{}",
        if lock { " FOR UPDATE OF h" } else { "" }
    );
    let row = c.query_opt(&sql, &[&site_id, &host_id]).map_err(db)?;
    row.map(|r| host_row(&r)).transpose().map_err(db)
}

fn visible_host(
    c: &mut impl GenericClient,
    caller: &Caller,
    site: &str,
    host: &str,
    lock: bool,
) -> Result<Host> {
    match host_in(c, site, host, lock)? {
        Some(h) if caller.sees(h.reseller_id.as_deref(), site, Some(host)) => Ok(h),
        _ => Err(StoreError::NotFound(format!("host {site}/{host}"))),
    }
}

fn insert_host(c: &mut impl GenericClient, host: &Host) -> Result<()> {
    let exists = || {
        StoreError::Exists(format!(
            "host {}/{} is already enrolled (a host id is never reused; revoke the old one and pick a new id)",
            host.site_id, host.host_id
        ))
    };
    if host_in(c, &host.site_id, &host.host_id, false)?.is_some() {
        return Err(exists());
    }
    let interval = i64::try_from(host.scan_interval_sec).unwrap_or(i64::MAX);
    c.execute(
        "INSERT INTO hosts (site_id, host_id, evidence_pubkey_pem, cert_serial, enrolled_at, revoked_at, scan_interval_sec, last_seen) VALUES ($1, $2, $3, $4, $5, NULL, $6, NULL)",
        &[&host.site_id, &host.host_id, &host.evidence_pubkey_pem, &host.cert_serial, &micros(host.enrolled_at), &interval],
    )
    .map_err(unique_or_db(exists))?;
    Ok(())
}

fn forbidden(e: crate::auth::AuthError) -> StoreError {
    StoreError::Forbidden(e.to_string())
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/db`, or a Unix socket
    /// directory as a percent-encoded host, `postgres://user@%2Frun%2Fpostgresql/db`) and
    /// applies pending migrations.
    pub fn open(url: &str) -> Result<Self> {
        let mut config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Unavailable(format!("database_url is not a PostgreSQL URL: {e}"))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // An acknowledged bundle must be on disk: commits wait for the WAL flush even
        // where the server's default says otherwise (synchronous_commit = off).
        let options = match config.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=on"),
            None => "-c synchronous_commit=on".to_owned(),
        };
        config.options(&options);
        if config.get_application_name().is_none() {
            config.application_name("mcp-server");
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let target = format!(
            "database {:?} on {}",
            config.get_dbname().unwrap_or("(the user's)"),
            if hosts.is_empty() {
                "the default socket".to_owned()
            } else {
                hosts.join(", ")
            }
        );
        let store = Self {
            config,
            target,
            idle: Mutex::new(Vec::new()),
            in_use: Mutex::new(0),
            returned: std::sync::Condvar::new(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Takes one of the `MAX_OPEN` slots, waiting for one to come back if all are taken.
    fn take_slot(&self) -> Result<()> {
        let poisoned = || StoreError::Backend("connection pool lock poisoned".into());
        let deadline = Instant::now() + CONNECTION_WAIT;
        let mut n = self.in_use.lock().map_err(|_| poisoned())?;
        while *n >= MAX_OPEN {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "all {MAX_OPEN} connections to PostgreSQL ({}) stayed busy for {} s",
                    self.target,
                    CONNECTION_WAIT.as_secs()
                )));
            }
            n = self
                .returned
                .wait_timeout(n, left)
                .map_err(|_| poisoned())?
                .0;
        }
        *n += 1;
        Ok(())
    }

    fn release_slot(&self) {
        if let Ok(mut n) = self.in_use.lock() {
            *n = n.saturating_sub(1);
        }
        self.returned.notify_one();
    }

    fn conn(&self) -> Result<Conn<'_>> {
        self.take_slot()?;
        // From here the slot is released by the Conn's drop, or below on failure.
        let got = self.checkout();
        if got.is_err() {
            self.release_slot();
        }
        got.map(|client| Conn {
            store: self,
            client: Some(client),
        })
    }

    fn checkout(&self) -> Result<Client> {
        let mut client = None;
        loop {
            let pooled = self
                .idle
                .lock()
                .map_err(|_| StoreError::Backend("connection pool lock poisoned".into()))?
                .pop();
            let Some((mut c, since)) = pooled else { break };
            if c.is_closed()
                || (since.elapsed() > CHECK_AFTER_IDLE
                    && c.is_valid(Duration::from_secs(5)).is_err())
            {
                continue;
            }
            client = Some(c);
            break;
        }
        match client {
            Some(c) => Ok(c),
            None => self.config.connect(NoTls).map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL ({}): {e}",
                    self.target
                ))
            }),
        }
    }

    /// The value of a server setting in this store's sessions (e.g. `synchronous_commit`).
    pub fn setting(&self, name: &str) -> Result<String> {
        let row = self
            .conn()?
            .query_one("SELECT current_setting($1)", &[&name])
            .map_err(db)?;
        row.try_get(0).map_err(db)
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        // One process migrates at a time; the others wait, then find nothing to do.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .map_err(db)?;
        let applied: Vec<(u32, String)> = tx
            .query(
                "SELECT version, sha256 FROM schema_migrations ORDER BY version",
                &[],
            )
            .map_err(db)?
            .iter()
            .map(|r| {
                Ok((
                    u32::try_from(r.try_get::<_, i32>(0)?).unwrap_or(u32::MAX),
                    r.try_get(1)?,
                ))
            })
            .collect::<std::result::Result<_, postgres::Error>>()
            .map_err(db)?;
        let known_max = MIGRATIONS.last().map_or(0, |m| m.0);
        for (version, sha) in &applied {
            match MIGRATIONS.iter().find(|m| m.0 == *version) {
                None => {
                    return Err(StoreError::Schema(format!(
                        "the database has migration {version}, this server knows only up to {known_max}: run a newer mcp-server"
                    )));
                }
                Some((_, name, sql)) if sha256_hex(sql) != *sha => {
                    return Err(StoreError::Schema(format!(
                        "migration {version} ({name}) differs from the one applied to this database; released migrations must not be edited"
                    )));
                }
                Some(_) => {}
            }
        }
        for (version, name, sql) in MIGRATIONS {
            if applied.iter().any(|(v, _)| v == version) {
                continue;
            }
            tx.batch_execute(sql).map_err(|e| {
                StoreError::Schema(format!("migration {version} ({name}): {}", db(e)))
            })?;
            let v = i32::try_from(*version).unwrap_or(i32::MAX);
            tx.execute(
                "INSERT INTO schema_migrations (version, name, sha256, applied_at) VALUES ($1, $2, $3, $4)",
                &[&v, name, &sha256_hex(sql), &micros(Timestamp::now())],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn schema_version(&self) -> Result<u32> {
        let row = self
            .conn()?
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .map_err(db)?;
        let v: i32 = row.try_get(0).map_err(db)?;
        Ok(u32::try_from(v).unwrap_or(0))
    }

    fn put_site(&self, caller: &Caller, site: &Site) -> Result<()> {
        caller.require_write("change sites").map_err(forbidden)?;
        if !caller.sees(site.reseller_id.as_deref(), &site.site_id, None) {
            return Err(StoreError::Forbidden(format!(
                "site {} is outside this caller's tenants",
                site.site_id
            )));
        }
        let allowlist =
            serde_json::to_string(&site.runbook_allowlist).unwrap_or_else(|_| "[]".into());
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        tx.execute(
            "INSERT INTO sites (site_id, reseller_id, runbook_allowlist, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (site_id) DO NOTHING",
            &[&site.site_id, &site.reseller_id, &allowlist, &micros(site.created_at)],
        )
        .map_err(db)?;
        let existing = site_in(&mut tx, &site.site_id, true)?
            .ok_or_else(|| StoreError::Backend(format!("site {} vanished", site.site_id)))?;
        require_sees(caller, &existing, &format!("site {}", site.site_id))?;
        if existing.reseller_id != site.reseller_id {
            return Err(StoreError::Exists(format!(
                "site {} belongs to {}; a site does not change reseller",
                site.site_id,
                existing
                    .reseller_id
                    .as_deref()
                    .unwrap_or("the MSP (direct)")
            )));
        }
        tx.execute(
            "UPDATE sites SET runbook_allowlist = $2 WHERE site_id = $1",
            &[&site.site_id, &allowlist],
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    fn site(&self, caller: &Caller, site_id: &str) -> Result<Option<Site>> {
        let mut conn = self.conn()?;
        Ok(site_in(&mut *conn, site_id, false)?
            .filter(|s| caller.sees(s.reseller_id.as_deref(), &s.site_id, None)))
    }

    fn sites(&self, caller: &Caller) -> Result<Vec<Site>> {
        let mut conn = self.conn()?;
        // A host caller's scope names its site; the host column plays no part here.
        let (clause, values): (String, Vec<Param>) = match &caller.tenants {
            Tenants::Host { site_id, .. } => {
                ("site_id = $1".into(), vec![Box::new(site_id.clone())])
            }
            _ => scope(caller, "site_id", "reseller_id", "NULL", 1),
        };
        let found = conn
            .query(
                &format!("SELECT site_id, reseller_id, runbook_allowlist, created_at FROM sites WHERE {clause} ORDER BY site_id"),
                &refs(&values),
            )
            .map_err(db)?;
        let sites = found
            .iter()
            .map(|r| {
                let list: String = r.try_get(2)?;
                Ok(Site {
                    site_id: r.try_get(0)?,
                    reseller_id: r.try_get(1)?,
                    runbook_allowlist: serde_json::from_str(&list).unwrap_or_default(),
                    created_at: ts(r.try_get(3)?),
                })
            })
            .collect::<std::result::Result<Vec<Site>, postgres::Error>>()
            .map_err(db)?;
        // The shared rule decides, as on SQLite.
        Ok(sites
            .into_iter()
            .filter(|s| caller.sees(s.reseller_id.as_deref(), &s.site_id, None))
            .collect())
    }

    fn create_enrollment_token(&self, caller: &Caller, token: &EnrollmentToken) -> Result<()> {
        caller
            .require_write("create enrollment tokens")
            .map_err(forbidden)?;
        let mut conn = self.conn()?;
        let site = site_in(&mut *conn, &token.site_id, false)?
            .ok_or_else(|| StoreError::NotFound(format!("site {}", token.site_id)))?;
        require_sees(caller, &site, &format!("site {}", token.site_id))?;
        conn.execute(
            "INSERT INTO enrollment_tokens (secret_hash, token_id, site_id, uses_left, expires_at, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&&token.secret_hash[..], &token.token_id, &token.site_id, &i64::from(token.uses_left), &micros(token.expires_at), &token.created_by, &micros(token.created_at)],
        )
        .map_err(unique_or_db(|| StoreError::Exists(format!("enrollment token {}", token.token_id))))?;
        Ok(())
    }

    fn enrollment_token(&self, secret_hash: &[u8; 32]) -> Result<Option<EnrollmentToken>> {
        let mut conn = self.conn()?;
        let row = conn
            .query_opt(
                "SELECT secret_hash, token_id, site_id, uses_left, expires_at, created_by, created_at FROM enrollment_tokens WHERE secret_hash = $1",
                &[&&secret_hash[..]],
            )
            .map_err(db)?;
        let found = row
            .map(|r| {
                let h: Vec<u8> = r.try_get(0)?;
                let mut secret = [0u8; 32];
                if h.len() == 32 {
                    secret.copy_from_slice(&h);
                }
                Ok(EnrollmentToken {
                    secret_hash: secret,
                    token_id: r.try_get(1)?,
                    site_id: r.try_get(2)?,
                    uses_left: u32::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
                    expires_at: ts(r.try_get(4)?),
                    created_by: r.try_get(5)?,
                    created_at: ts(r.try_get(6)?),
                })
            })
            .transpose()
            .map_err(db)?;
        Ok(found.filter(|t: &EnrollmentToken| hashes_equal(&t.secret_hash, secret_hash)))
    }

    fn enroll_host(&self, secret_hash: &[u8; 32], now: Timestamp, host: &Host) -> Result<Host> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        // The token's row stays locked until commit: concurrent redemptions queue here.
        let row = tx
            .query_opt(
                "SELECT secret_hash, site_id, uses_left, expires_at FROM enrollment_tokens WHERE secret_hash = $1 FOR UPDATE",
                &[&&secret_hash[..]],
            )
            .map_err(db)?;
        let Some(row) = row else {
            return Err(StoreError::Token("is not known to this server"));
        };
        let stored_hash: Vec<u8> = row.try_get(0).map_err(db)?;
        let site_id: String = row.try_get(1).map_err(db)?;
        let uses_left: i64 = row.try_get(2).map_err(db)?;
        let expires_at: i64 = row.try_get(3).map_err(db)?;
        // The lookup was by hash; compare once more in constant time.
        if !hashes_equal(&stored_hash, secret_hash) {
            return Err(StoreError::Token("is not known to this server"));
        }
        if ts(expires_at) <= now {
            return Err(StoreError::Token("has expired; create a new one"));
        }
        if uses_left <= 0 {
            return Err(StoreError::Token("has been used up; create a new one"));
        }
        if host.site_id != site_id {
            return Err(StoreError::Forbidden(format!(
                "the token is for site {site_id}, not {}",
                host.site_id
            )));
        }
        insert_host(&mut tx, host)?;
        tx.execute(
            "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE secret_hash = $1",
            &[&&secret_hash[..]],
        )
        .map_err(db)?;
        let stored = host_in(&mut tx, &host.site_id, &host.host_id, false)?
            .ok_or_else(|| StoreError::Backend("the enrolled host vanished".into()))?;
        tx.commit().map_err(db)?;
        Ok(stored)
    }

    fn add_host(&self, caller: &Caller, host: &Host) -> Result<()> {
        caller.require_write("add hosts").map_err(forbidden)?;
        let mut conn = self.conn()?;
        let site = site_in(&mut *conn, &host.site_id, false)?
            .ok_or_else(|| StoreError::NotFound(format!("site {}", host.site_id)))?;
        require_sees(caller, &site, &format!("site {}", host.site_id))?;
        insert_host(&mut *conn, host)
    }

    fn host(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Option<Host>> {
        let mut conn = self.conn()?;
        Ok(host_in(&mut *conn, site_id, host_id, false)?
            .filter(|h| caller.sees(h.reseller_id.as_deref(), site_id, Some(host_id))))
    }

    fn hosts(&self, caller: &Caller) -> Result<Vec<Host>> {
        let mut conn = self.conn()?;
        let (clause, values) = scope(caller, "h.site_id", "s.reseller_id", "h.host_id", 1);
        let found = conn
            .query(
                &format!("SELECT {HOST_COLS} FROM hosts h JOIN sites s ON s.site_id = h.site_id WHERE {clause} ORDER BY h.site_id, h.host_id"),
                &refs(&values),
            )
            .map_err(db)?;
        rows(found, host_row)
    }

    fn revoke_host(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        at: Timestamp,
    ) -> Result<bool> {
        caller.require_write("revoke hosts").map_err(forbidden)?;
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let changed = conn
            .execute(
                "UPDATE hosts SET revoked_at = $3 WHERE site_id = $1 AND host_id = $2 AND revoked_at IS NULL",
                &[&site_id, &host_id, &micros(at)],
            )
            .map_err(db)?;
        Ok(changed > 0)
    }

    fn bundle(&self, caller: &Caller, bundle_id: &str) -> Result<Option<BundleRecord>> {
        let mut conn = self.conn()?;
        let row = conn
            .query_opt(
                &format!("SELECT {BUNDLE_COLS} FROM bundles WHERE bundle_id = $1"),
                &[&bundle_id],
            )
            .map_err(db)?;
        let Some(record) = row.map(|r| bundle_row(&r)).transpose().map_err(db)? else {
            return Ok(None);
        };
        let reseller = site_in(&mut *conn, &record.site_id, false)?.and_then(|s| s.reseller_id);
        Ok(caller
            .sees(reseller.as_deref(), &record.site_id, Some(&record.host_id))
            .then_some(record))
    }

    fn neighbours(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        seq: u64,
    ) -> Result<Neighbours> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        neighbours_in(&mut *conn, site_id, host_id, seq)
    }

    fn record_bundle(
        &self,
        caller: &Caller,
        record: &BundleRecord,
        result_for: Option<&str>,
        error: Option<&str>,
    ) -> Result<Recorded> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        // The chain lock: the host's row, held to commit. Every writer of this host's
        // chain, in this process or another, waits here; under READ COMMITTED each
        // statement below then sees what the writer before committed.
        visible_host(&mut tx, caller, &record.site_id, &record.host_id, true)?;
        let existing = tx
            .query_opt(
                "SELECT hash, site_id, host_id FROM bundles WHERE bundle_id = $1",
                &[&record.bundle_id],
            )
            .map_err(db)?
            .map(
                |r| -> std::result::Result<(String, String, String), postgres::Error> {
                    Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
                },
            )
            .transpose()
            .map_err(db)?;
        let recorded = match existing {
            Some((hash, site, host))
                if hash == record.hash && site == record.site_id && host == record.host_id =>
            {
                Recorded::Duplicate
            }
            Some(_) => return Err(StoreError::BundleConflict(record.bundle_id.clone())),
            None => {
                let n = neighbours_in(&mut tx, &record.site_id, &record.host_id, record.seq)?;
                check_link(
                    record.seq,
                    record.prev_hash.as_deref(),
                    &record.hash,
                    n.previous.as_ref(),
                    n.same_seq.as_ref(),
                    n.next.as_ref(),
                )?;
                tx.execute(
                    &format!("INSERT INTO bundles ({BUNDLE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
                    &[
                        &record.bundle_id, &record.site_id, &record.host_id, &seq_sql(record.seq)?,
                        &record.hash, &record.prev_hash, &record.check, &record.outcome,
                        &micros(record.timestamp_end), &micros(record.received_at), &record.archive_key, &record.order_id,
                    ],
                )
                .map_err(unique_or_db(|| StoreError::BundleConflict(record.bundle_id.clone())))?;
                tx.execute(
                    "INSERT INTO latest_results (site_id, host_id, check_name, outcome, bundle_id, timestamp_end) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (site_id, host_id, check_name) DO UPDATE SET outcome = EXCLUDED.outcome, bundle_id = EXCLUDED.bundle_id, timestamp_end = EXCLUDED.timestamp_end
                     WHERE EXCLUDED.timestamp_end >= latest_results.timestamp_end",
                    &[&record.site_id, &record.host_id, &record.check, &record.outcome, &record.bundle_id, &micros(record.timestamp_end)],
                )
                .map_err(db)?;
                Recorded::Stored
            }
        };
        tx.execute(
            "UPDATE hosts SET last_seen = GREATEST(COALESCE(last_seen, 0), $3) WHERE site_id = $1 AND host_id = $2",
            &[&record.site_id, &record.host_id, &micros(record.received_at)],
        )
        .map_err(db)?;
        if let Some(order_id) = result_for {
            tx.execute(
                "UPDATE orders SET state = 'answered', result_bundle_id = $4, result_outcome = $5, result_error = $6, answered_at = $7
                 WHERE order_id = $1 AND site_id = $2 AND host_id = $3 AND state != 'answered'",
                &[&order_id, &record.site_id, &record.host_id, &record.bundle_id, &record.outcome, &error, &micros(record.received_at)],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(recorded)
    }

    fn bundle_ids(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Vec<String>> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let found = conn
            .query(
                "SELECT bundle_id FROM bundles WHERE site_id = $1 AND host_id = $2 ORDER BY seq",
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        rows(found, |r| r.try_get(0))
    }

    fn seqs(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Vec<u64>> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let found = conn
            .query(
                "SELECT seq FROM bundles WHERE site_id = $1 AND host_id = $2 ORDER BY seq",
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        rows(found, |r| Ok(unsigned(r.try_get(0)?)))
    }

    fn latest_results(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<CheckResult>> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let found = conn
            .query(
                "SELECT check_name, outcome, bundle_id, timestamp_end FROM latest_results WHERE site_id = $1 AND host_id = $2 ORDER BY check_name",
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        rows(found, |r| {
            Ok(CheckResult {
                check: r.try_get(0)?,
                outcome: r.try_get(1)?,
                bundle_id: r.try_get(2)?,
                timestamp_end: ts(r.try_get(3)?),
            })
        })
    }

    fn insert_order(&self, caller: &Caller, order: &OrderRecord) -> Result<()> {
        caller.require_write("create orders").map_err(forbidden)?;
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, &order.site_id, &order.host_id, false)?;
        let ttl = i64::try_from(order.ttl).unwrap_or(i64::MAX);
        conn.execute(
            "INSERT INTO orders (order_id, site_id, host_id, runbook_id, params, ttl, state, envelope, created_by, created_at, approved_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &order.order_id, &order.site_id, &order.host_id, &order.runbook_id,
                &order.params.to_string(), &ttl, &order.state.as_str(), &order.envelope,
                &order.created_by, &micros(order.created_at), &order.approved_by,
            ],
        )
        .map_err(unique_or_db(|| StoreError::Exists(format!("order {}", order.order_id))))?;
        Ok(())
    }

    fn approve_order(
        &self,
        caller: &Caller,
        order_id: &str,
        envelope: &str,
        approved_by: &str,
    ) -> Result<()> {
        caller.require_write("approve orders").map_err(forbidden)?;
        let changed = self
            .conn()?
            .execute(
                "UPDATE orders SET state = 'pending', envelope = $2, approved_by = $3 WHERE order_id = $1 AND state = 'awaiting_approval'",
                &[&order_id, &envelope, &approved_by],
            )
            .map_err(db)?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!(
                "order {order_id} awaiting approval"
            )));
        }
        Ok(())
    }

    fn order(&self, caller: &Caller, order_id: &str) -> Result<Option<OrderRecord>> {
        let mut conn = self.conn()?;
        let (clause, mut values) = scope(caller, "o.site_id", "s.reseller_id", "o.host_id", 2);
        values.insert(0, Box::new(order_id.to_owned()));
        let row = conn
            .query_opt(
                &format!("SELECT {ORDER_COLS} FROM orders o JOIN sites s ON s.site_id = o.site_id WHERE o.order_id = $1 AND {clause}"),
                &refs(&values),
            )
            .map_err(db)?;
        row.map(|r| order_row(&r)).transpose().map_err(db)
    }

    fn orders(&self, caller: &Caller, host: Option<(&str, &str)>) -> Result<Vec<OrderRecord>> {
        let mut conn = self.conn()?;
        let (clause, mut values) = scope(caller, "o.site_id", "s.reseller_id", "o.host_id", 1);
        let mut sql = format!(
            "SELECT {ORDER_COLS} FROM orders o JOIN sites s ON s.site_id = o.site_id WHERE {clause}"
        );
        if let Some((site, host)) = host {
            let n = values.len();
            sql.push_str(&format!(
                " AND o.site_id = ${} AND o.host_id = ${}",
                n + 1,
                n + 2
            ));
            values.push(Box::new(site.to_owned()));
            values.push(Box::new(host.to_owned()));
        }
        sql.push_str(" ORDER BY o.created_at DESC, o.row_order DESC");
        let found = conn.query(&sql, &refs(&values)).map_err(db)?;
        rows(found, order_row)
    }

    fn pending_orders(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<OrderRecord>> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let found = conn
            .query(
                &format!("SELECT {ORDER_COLS} FROM orders o WHERE o.site_id = $1 AND o.host_id = $2 AND o.state = 'pending' ORDER BY o.created_at, o.row_order"),
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        rows(found, order_row)
    }

    fn last_order_at(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        runbook_id: &str,
    ) -> Result<Option<Timestamp>> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let row = conn
            .query_one(
                "SELECT MAX(created_at) FROM orders WHERE site_id = $1 AND host_id = $2 AND runbook_id = $3",
                &[&site_id, &host_id, &runbook_id],
            )
            .map_err(db)?;
        Ok(row.try_get::<_, Option<i64>>(0).map_err(db)?.map(ts))
    }

    fn create_operator(&self, caller: &Caller, operator: &Operator) -> Result<()> {
        caller
            .require_admin("create operators")
            .map_err(forbidden)?;
        let tenants = serde_json::to_string(&operator.tenants)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        self.conn()?
            .execute(
                "INSERT INTO operators (name, role, tenants, token_hash, created_at, disabled) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &operator.name,
                    &operator.role.as_str(),
                    &tenants,
                    &&operator.token_hash[..],
                    &micros(operator.created_at),
                    &operator.disabled,
                ],
            )
            .map_err(unique_or_db(|| StoreError::Exists(format!("operator {}", operator.name))))?;
        Ok(())
    }

    fn operator_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<Operator>> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT name, role, tenants, token_hash, created_at, disabled FROM operators WHERE token_hash = $1",
                &[&&token_hash[..]],
            )
            .map_err(db)?;
        let found = row.map(|r| operator_row(&r)).transpose().map_err(db)?;
        Ok(found.filter(|o| hashes_equal(&o.token_hash, token_hash) && !o.disabled))
    }

    fn operators(&self, caller: &Caller) -> Result<Vec<Operator>> {
        caller.require_admin("list operators").map_err(forbidden)?;
        let found = self
            .conn()?
            .query(
                "SELECT name, role, tenants, token_hash, created_at, disabled FROM operators ORDER BY name",
                &[],
            )
            .map_err(db)?;
        rows(found, operator_row)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<i64> {
        let row = self
            .conn()?
            .query_one(
                "INSERT INTO audit (at, actor, peer, action, target, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[&micros(entry.at), &entry.actor, &entry.peer, &entry.action, &entry.target, &entry.outcome, &entry.detail],
            )
            .map_err(db)?;
        row.try_get(0).map_err(db)
    }

    fn audit(&self, caller: &Caller, limit: u32) -> Result<Vec<AuditEntry>> {
        let mut conn = self.conn()?;
        // Newest first, streamed, with the reseller of the site the target names; the
        // shared visibility rule decides, as on SQLite.
        let mut it = conn
            .query_raw(
                "SELECT a.id, a.at, a.actor, a.peer, a.action, a.target, a.outcome, a.detail, s.reseller_id
                 FROM audit a LEFT JOIN sites s ON s.site_id = split_part(a.target, '/', 1)
                 ORDER BY a.id DESC",
                std::iter::empty::<&(dyn ToSql + Sync)>(),
            )
            .map_err(db)?;
        let mut out = Vec::new();
        while out.len() < limit as usize {
            let Some(r) = it.next().map_err(db)? else {
                break;
            };
            let entry = AuditEntry {
                id: r.try_get(0).map_err(db)?,
                at: ts(r.try_get(1).map_err(db)?),
                actor: r.try_get(2).map_err(db)?,
                peer: r.try_get(3).map_err(db)?,
                action: r.try_get(4).map_err(db)?,
                target: r.try_get(5).map_err(db)?,
                outcome: r.try_get(6).map_err(db)?,
                detail: r.try_get(7).map_err(db)?,
            };
            let reseller: Option<String> = r.try_get(8).map_err(db)?;
            if audit_visible(caller, &entry, reseller.as_deref()) {
                out.push(entry);
            }
        }
        Ok(out)
    }
}
