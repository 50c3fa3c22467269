//! The SQLite store (the embedded default): one file in WAL mode with synchronous=FULL,
//! versioned append-only migrations from migrations/sqlite/.

/// The console's storage (sessions, passwords, token revocation, evidence listing).
mod console;
mod evidence_query;
pub mod incidents;

use std::path::Path;
use std::sync::Mutex;

use compliance_agent::evidence::chain::{StoredLink, check_link};
use jiff::Timestamp;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
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
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "incidents",
        include_str!("../../migrations/sqlite/0002_incidents.sql"),
    ),
    (
        3,
        "transparency_log",
        include_str!("../../migrations/sqlite/0003_transparency_log.sql"),
    ),
    (
        4,
        "console",
        include_str!("../../migrations/sqlite/0004_console.sql"),
    ),
    (
        5,
        "sbom",
        include_str!("../../migrations/sqlite/0005_sbom.sql"),
    ),
];

/// One writer connection (SQLite allows one writer at a time) and a pool of read
/// connections (WAL readers run beside the writer and see committed data only).
/// Bundle records are group-committed: every `record_bundle` waiting while a commit
/// runs goes into the next transaction together, each in its own savepoint, and each
/// caller is answered only after that transaction's commit is durable.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: std::path::PathBuf,
    readers: Mutex<Vec<Connection>>,
    waiting: Mutex<Vec<WaitingRecord>>,
}

/// Idle read connections kept open; more may be open at once, the rest are closed.
const IDLE_READERS: usize = 16;

/// A `record_bundle` call waiting for the next group commit.
struct WaitingRecord {
    caller: Caller,
    record: BundleRecord,
    result_for: Option<String>,
    error: Option<String>,
    answer: std::sync::mpsc::SyncSender<Result<Recorded>>,
}

/// A read connection from the pool, returned to it on drop.
/// Statements through each connection's prepared-statement cache: intake runs the same
/// few statements for every bundle, and parsing them again each time was a tenth of
/// the server's CPU.
pub(crate) trait Cached {
    fn cached_row<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>;
    fn cached_exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
}

impl Cached for Connection {
    fn cached_row<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    fn cached_exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
}

/// Settings every connection gets: room in the statement cache for every statement
/// intake runs. (Reads through a 256 MB mmap were tried with it; the mapped pages put
/// the server's RSS past its 150 MB target, so they are off.)
fn tune(conn: &Connection) -> Result<()> {
    conn.set_prepared_statement_cache_capacity(128);
    Ok(())
}

struct Reader<'a> {
    store: &'a SqliteStore,
    conn: Option<Connection>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a reader holds its connection until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut idle)) = (self.conn.take(), self.store.readers.lock())
            && idle.len() < IDLE_READERS
        {
            idle.push(conn);
        }
    }
}

/// The same error for every caller of a failed group commit.
fn batch_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        other => StoreError::Backend(other.to_string()),
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, ref msg)
            if matches!(
                f.code,
                rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::ReadOnly
            ) =>
        {
            StoreError::Unavailable(msg.clone().unwrap_or_else(|| f.to_string()))
        }
        other => StoreError::Backend(other.to_string()),
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

/// A WHERE fragment restricting `site_col`/`host_col` (with the site's reseller in
/// `reseller_col`) to the caller's tenants, and its parameters.
fn scope(
    caller: &Caller,
    site_col: &str,
    reseller_col: &str,
    host_col: &str,
) -> (String, Vec<SqlValue>) {
    match &caller.tenants {
        Tenants::All => ("1 = 1".into(), vec![]),
        Tenants::Reseller { reseller_id } => (
            format!("{reseller_col} = ?"),
            vec![SqlValue::Text(reseller_id.clone())],
        ),
        Tenants::Sites { site_ids } => {
            if site_ids.is_empty() {
                return ("1 = 0".into(), vec![]);
            }
            let marks = vec!["?"; site_ids.len()].join(", ");
            (
                format!("{site_col} IN ({marks})"),
                site_ids.iter().cloned().map(SqlValue::Text).collect(),
            )
        }
        Tenants::Host { site_id, host_id } => (
            format!("{site_col} = ? AND {host_col} = ?"),
            vec![
                SqlValue::Text(site_id.clone()),
                SqlValue::Text(host_id.clone()),
            ],
        ),
    }
}

const HOST_COLS: &str = "h.site_id, h.host_id, s.reseller_id, h.evidence_pubkey_pem, h.cert_serial, \
    h.enrolled_at, h.revoked_at, h.scan_interval_sec, h.last_seen";

fn host_row(r: &Row<'_>) -> rusqlite::Result<Host> {
    Ok(Host {
        site_id: r.get(0)?,
        host_id: r.get(1)?,
        reseller_id: r.get(2)?,
        evidence_pubkey_pem: r.get(3)?,
        cert_serial: r.get(4)?,
        enrolled_at: ts(r.get(5)?),
        revoked_at: r.get::<_, Option<i64>>(6)?.map(ts),
        scan_interval_sec: r.get::<_, i64>(7)?.max(0) as u64,
        last_seen: r.get::<_, Option<i64>>(8)?.map(ts),
    })
}

const BUNDLE_COLS: &str = "bundle_id, site_id, host_id, seq, hash, prev_hash, check_name, outcome, \
    timestamp_end, received_at, archive_key, order_id";

fn bundle_row(r: &Row<'_>) -> rusqlite::Result<BundleRecord> {
    Ok(BundleRecord {
        bundle_id: r.get(0)?,
        site_id: r.get(1)?,
        host_id: r.get(2)?,
        seq: r.get::<_, i64>(3)?.max(0) as u64,
        hash: r.get(4)?,
        prev_hash: r.get(5)?,
        check: r.get(6)?,
        outcome: r.get(7)?,
        timestamp_end: ts(r.get(8)?),
        received_at: ts(r.get(9)?),
        archive_key: r.get(10)?,
        order_id: r.get(11)?,
    })
}

const ORDER_COLS: &str = "o.order_id, o.site_id, o.host_id, o.runbook_id, o.params, o.ttl, o.state, \
    o.envelope, o.created_by, o.created_at, o.approved_by, o.result_bundle_id, o.result_outcome, \
    o.result_error, o.answered_at";

fn order_row(r: &Row<'_>) -> rusqlite::Result<OrderRecord> {
    let params: String = r.get(4)?;
    let state: String = r.get(6)?;
    Ok(OrderRecord {
        order_id: r.get(0)?,
        site_id: r.get(1)?,
        host_id: r.get(2)?,
        runbook_id: r.get(3)?,
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        ttl: r.get::<_, i64>(5)?.max(0) as u64,
        state: OrderState::parse(&state).unwrap_or(OrderState::Answered),
        envelope: r.get(7)?,
        created_by: r.get(8)?,
        created_at: ts(r.get(9)?),
        approved_by: r.get(10)?,
        result_bundle_id: r.get(11)?,
        result_outcome: r.get(12)?,
        result_error: r.get(13)?,
        answered_at: r.get::<_, Option<i64>>(14)?.map(ts),
    })
}

fn link_at(conn: &Connection, site: &str, host: &str, seq: u64) -> Result<Option<StoredLink>> {
    let Ok(seq_i) = i64::try_from(seq) else {
        return Ok(None);
    };
    conn.cached_row(
        "SELECT bundle_id, seq, hash, prev_hash FROM bundles WHERE site_id = ?1 AND host_id = ?2 AND seq = ?3",
        params![site, host, seq_i],
        |r| {
            Ok(StoredLink {
                bundle_id: r.get(0)?,
                seq: r.get::<_, i64>(1)?.max(0) as u64,
                hash: r.get(2)?,
                prev_hash: r.get(3)?,
            })
        },
    )
    .optional()
    .map_err(db)
}

fn neighbours_in(conn: &Connection, site: &str, host: &str, seq: u64) -> Result<Neighbours> {
    Ok(Neighbours {
        previous: match seq.checked_sub(1) {
            Some(s) if s > 0 => link_at(conn, site, host, s)?,
            _ => None,
        },
        same_seq: link_at(conn, site, host, seq)?,
        next: match seq.checked_add(1) {
            Some(s) => link_at(conn, site, host, s)?,
            None => None,
        },
    })
}

impl SqliteStore {
    /// Opens (creating) the database file and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        tune(&conn)?;
        let store = Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            readers: Mutex::new(Vec::new()),
            waiting: Mutex::new(Vec::new()),
        };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Backend("connection lock poisoned".into()))
    }

    /// A read connection: an idle one from the pool, or a new one.
    fn reader(&self) -> Result<Reader<'_>> {
        let idle = self
            .readers
            .lock()
            .map_err(|_| StoreError::Backend("reader pool lock poisoned".into()))?
            .pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot open {}: {e}", self.path.display()))
                })?;
                c.busy_timeout(std::time::Duration::from_secs(10))
                    .map_err(db)?;
                tune(&c)?;
                c
            }
        };
        Ok(Reader {
            store: self,
            conn: Some(conn),
        })
    }

    /// Records every waiting bundle in one transaction, each in a savepoint of its own
    /// (one refused bundle does not undo the others), and answers each caller after
    /// the commit; if the commit fails, every caller gets the error and nothing of the
    /// batch is stored.
    fn commit_waiting(&self, conn: &mut Connection, batch: Vec<WaitingRecord>) {
        let run = |conn: &mut Connection| -> Result<Vec<Result<Recorded>>> {
            let mut tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let mut answers = Vec::with_capacity(batch.len());
            for w in &batch {
                let sp = tx.savepoint().map_err(db)?;
                let answer = self.record_in(
                    &sp,
                    &w.caller,
                    &w.record,
                    w.result_for.as_deref(),
                    w.error.as_deref(),
                );
                if answer.is_ok() {
                    sp.commit().map_err(db)?;
                } // else: dropping the savepoint rolls it back.
                answers.push(answer);
            }
            tx.commit().map_err(db)?;
            Ok(answers)
        };
        match run(conn) {
            Ok(answers) => {
                for (w, answer) in batch.into_iter().zip(answers) {
                    let _ = w.answer.send(answer);
                }
            }
            Err(e) => {
                for w in batch {
                    let _ = w.answer.send(Err(batch_error(&e)));
                }
            }
        }
    }

    /// One bundle's record inside the group commit's transaction.
    fn record_in(
        &self,
        tx: &Connection,
        caller: &Caller,
        record: &BundleRecord,
        result_for: Option<&str>,
        error: Option<&str>,
    ) -> Result<Recorded> {
        self.visible_host(tx, caller, &record.site_id, &record.host_id)?;
        let existing: Option<(String, String, String)> = tx
            .cached_row(
                "SELECT hash, site_id, host_id FROM bundles WHERE bundle_id = ?1",
                params![record.bundle_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?;
        let recorded = match existing {
            Some((hash, site, host))
                if hash == record.hash && site == record.site_id && host == record.host_id =>
            {
                Recorded::Duplicate
            }
            Some(_) => return Err(StoreError::BundleConflict(record.bundle_id.clone())),
            None => {
                let n = neighbours_in(tx, &record.site_id, &record.host_id, record.seq)?;
                check_link(
                    record.seq,
                    record.prev_hash.as_deref(),
                    &record.hash,
                    n.previous.as_ref(),
                    n.same_seq.as_ref(),
                    n.next.as_ref(),
                )?;
                tx.cached_exec(
                    &format!("INSERT INTO bundles ({BUNDLE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                    params![
                        record.bundle_id, record.site_id, record.host_id, seq_sql(record.seq)?,
                        record.hash, record.prev_hash, record.check, record.outcome,
                        micros(record.timestamp_end), micros(record.received_at), record.archive_key, record.order_id
                    ],
                )
                .map_err(db)?;
                tx.cached_exec(
                    "INSERT INTO latest_results (site_id, host_id, check_name, outcome, bundle_id, timestamp_end) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (site_id, host_id, check_name) DO UPDATE SET outcome = excluded.outcome, bundle_id = excluded.bundle_id, timestamp_end = excluded.timestamp_end
                     WHERE excluded.timestamp_end >= latest_results.timestamp_end",
                    params![record.site_id, record.host_id, record.check, record.outcome, record.bundle_id, micros(record.timestamp_end)],
                )
                .map_err(db)?;
                Recorded::Stored
            }
        };
        tx.cached_exec(
            "UPDATE hosts SET last_seen = MAX(COALESCE(last_seen, 0), ?3) WHERE site_id = ?1 AND host_id = ?2",
            params![record.site_id, record.host_id, micros(record.received_at)],
        )
        .map_err(db)?;
        if let Some(order_id) = result_for {
            tx.cached_exec(
                "UPDATE orders SET state = 'answered', result_bundle_id = ?4, result_outcome = ?5, result_error = ?6, answered_at = ?7
                 WHERE order_id = ?1 AND site_id = ?2 AND host_id = ?3 AND state != 'answered'",
                params![order_id, record.site_id, record.host_id, record.bundle_id, record.outcome, error, micros(record.received_at)],
            )
            .map_err(db)?;
        }
        Ok(recorded)
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .map_err(db)?;
        let applied: Vec<(u32, String)> = {
            let mut stmt = tx
                .prepare("SELECT version, sha256 FROM schema_migrations ORDER BY version")
                .map_err(db)?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?
                .collect::<rusqlite::Result<_>>()
                .map_err(db)?
        };
        let known_max = MIGRATIONS.last().map_or(0, |m| m.0);
        for (version, sha) in &applied {
            match MIGRATIONS.iter().find(|m| m.0 == *version) {
                None => {
                    return Err(StoreError::Schema(format!(
                        "the database has migration {version}, this server knows only up to {known_max}: run a newer mcp-server"
                    )));
                }
                Some((_, name, sql)) if hex::encode(Sha256::digest(sql.as_bytes())) != *sha => {
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
            tx.execute_batch(sql)
                .map_err(|e| StoreError::Schema(format!("migration {version} ({name}): {e}")))?;
            tx.cached_exec(
                "INSERT INTO schema_migrations (version, name, sha256, applied_at) VALUES (?1, ?2, ?3, ?4)",
                params![version, name, hex::encode(Sha256::digest(sql.as_bytes())), micros(Timestamp::now())],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    fn site_in(conn: &Connection, site_id: &str) -> Result<Option<Site>> {
        conn.cached_row(
            "SELECT site_id, reseller_id, runbook_allowlist, created_at FROM sites WHERE site_id = ?1",
            params![site_id],
            |r| {
                let list: String = r.get(2)?;
                Ok(Site {
                    site_id: r.get(0)?,
                    reseller_id: r.get(1)?,
                    runbook_allowlist: serde_json::from_str(&list).unwrap_or_default(),
                    created_at: ts(r.get(3)?),
                })
            },
        )
        .optional()
        .map_err(db)
    }

    fn host_in(conn: &Connection, site_id: &str, host_id: &str) -> Result<Option<Host>> {
        conn.cached_row(
            &format!("SELECT {HOST_COLS} FROM hosts h JOIN sites s ON s.site_id = h.site_id WHERE h.site_id = ?1 AND h.host_id = ?2"),
            params![site_id, host_id],
            host_row,
        )
        .optional()
        .map_err(db)
    }

    fn insert_host(conn: &Connection, host: &Host) -> Result<()> {
        if Self::host_in(conn, &host.site_id, &host.host_id)?.is_some() {
            return Err(StoreError::Exists(format!(
                "host {}/{} is already enrolled (a host id is never reused; revoke the old one and pick a new id)",
                host.site_id, host.host_id
            )));
        }
        conn.cached_exec(
            "INSERT INTO hosts (site_id, host_id, evidence_pubkey_pem, cert_serial, enrolled_at, revoked_at, scan_interval_sec, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, NULL)",
            params![host.site_id, host.host_id, host.evidence_pubkey_pem, host.cert_serial, micros(host.enrolled_at), host.scan_interval_sec as i64],
        )
        .map_err(db)?;
        Ok(())
    }

    fn visible_host(
        &self,
        conn: &Connection,
        caller: &Caller,
        site: &str,
        host: &str,
    ) -> Result<Host> {
        match Self::host_in(conn, site, host)? {
            Some(h) if caller.sees(h.reseller_id.as_deref(), site, Some(host)) => Ok(h),
            _ => Err(StoreError::NotFound(format!("host {site}/{host}"))),
        }
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn schema_version(&self) -> Result<u32> {
        self.conn()?
            .cached_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(db)
    }

    fn put_site(&self, caller: &Caller, site: &Site) -> Result<()> {
        caller
            .require_write("change sites")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        if !caller.sees(site.reseller_id.as_deref(), &site.site_id, None) {
            return Err(StoreError::Forbidden(format!(
                "site {} is outside this caller's tenants",
                site.site_id
            )));
        }
        let conn = self.conn()?;
        if let Some(existing) = Self::site_in(&conn, &site.site_id)? {
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
        }
        conn.cached_exec(
            "INSERT INTO sites (site_id, reseller_id, runbook_allowlist, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (site_id) DO UPDATE SET runbook_allowlist = excluded.runbook_allowlist",
            params![
                site.site_id,
                site.reseller_id,
                serde_json::to_string(&site.runbook_allowlist).unwrap_or_else(|_| "[]".into()),
                micros(site.created_at)
            ],
        )
        .map_err(db)?;
        Ok(())
    }

    fn site(&self, caller: &Caller, site_id: &str) -> Result<Option<Site>> {
        let conn = self.reader()?;
        Ok(Self::site_in(&conn, site_id)?
            .filter(|s| caller.sees(s.reseller_id.as_deref(), &s.site_id, None)))
    }

    fn sites(&self, caller: &Caller) -> Result<Vec<Site>> {
        let conn = self.reader()?;
        let ids: Vec<String> = {
            let mut stmt = conn
                .prepare("SELECT site_id FROM sites ORDER BY site_id")
                .map_err(db)?;
            stmt.query_map([], |r| r.get(0))
                .map_err(db)?
                .collect::<rusqlite::Result<_>>()
                .map_err(db)?
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(s) = Self::site_in(&conn, &id)?
                && caller.sees(s.reseller_id.as_deref(), &s.site_id, None)
            {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn create_enrollment_token(&self, caller: &Caller, token: &EnrollmentToken) -> Result<()> {
        caller
            .require_write("create enrollment tokens")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        let site = Self::site_in(&conn, &token.site_id)?
            .ok_or_else(|| StoreError::NotFound(format!("site {}", token.site_id)))?;
        require_sees(caller, &site, &format!("site {}", token.site_id))?;
        conn.cached_exec(
            "INSERT INTO enrollment_tokens (secret_hash, token_id, site_id, uses_left, expires_at, created_by, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![&token.secret_hash[..], token.token_id, token.site_id, token.uses_left, micros(token.expires_at), token.created_by, micros(token.created_at)],
        )
        .map_err(db)?;
        Ok(())
    }

    fn enrollment_token(&self, secret_hash: &[u8; 32]) -> Result<Option<EnrollmentToken>> {
        let conn = self.reader()?;
        let found = conn
            .cached_row(
                "SELECT secret_hash, token_id, site_id, uses_left, expires_at, created_by, created_at FROM enrollment_tokens WHERE secret_hash = ?1",
                params![&secret_hash[..]],
                |r| {
                    let h: Vec<u8> = r.get(0)?;
                    let mut secret = [0u8; 32];
                    if h.len() == 32 {
                        secret.copy_from_slice(&h);
                    }
                    Ok(EnrollmentToken {
                        secret_hash: secret,
                        token_id: r.get(1)?,
                        site_id: r.get(2)?,
                        uses_left: r.get::<_, i64>(3)?.max(0) as u32,
                        expires_at: ts(r.get(4)?),
                        created_by: r.get(5)?,
                        created_at: ts(r.get(6)?),
                    })
                },
            )
            .optional()
            .map_err(db)?;
        Ok(found.filter(|t| hashes_equal(&t.secret_hash, secret_hash)))
    }

    fn enroll_host(&self, secret_hash: &[u8; 32], now: Timestamp, host: &Host) -> Result<Host> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let token: Option<(Vec<u8>, String, i64, i64)> = tx
            .cached_row(
                "SELECT secret_hash, site_id, uses_left, expires_at FROM enrollment_tokens WHERE secret_hash = ?1",
                params![&secret_hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((stored_hash, site_id, uses_left, expires_at)) = token else {
            return Err(StoreError::Token("is not known to this server"));
        };
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
        Self::insert_host(&tx, host)?;
        tx.cached_exec(
            "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE secret_hash = ?1",
            params![&secret_hash[..]],
        )
        .map_err(db)?;
        let stored = Self::host_in(&tx, &host.site_id, &host.host_id)?
            .ok_or_else(|| StoreError::Backend("the enrolled host vanished".into()))?;
        tx.commit().map_err(db)?;
        Ok(stored)
    }

    fn add_host(&self, caller: &Caller, host: &Host) -> Result<()> {
        caller
            .require_write("add hosts")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        let site = Self::site_in(&conn, &host.site_id)?
            .ok_or_else(|| StoreError::NotFound(format!("site {}", host.site_id)))?;
        require_sees(caller, &site, &format!("site {}", host.site_id))?;
        Self::insert_host(&conn, host)
    }

    fn host(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Option<Host>> {
        let conn = self.reader()?;
        Ok(Self::host_in(&conn, site_id, host_id)?
            .filter(|h| caller.sees(h.reseller_id.as_deref(), site_id, Some(host_id))))
    }

    fn hosts(&self, caller: &Caller) -> Result<Vec<Host>> {
        let conn = self.reader()?;
        let (clause, values) = scope(caller, "h.site_id", "s.reseller_id", "h.host_id");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {HOST_COLS} FROM hosts h JOIN sites s ON s.site_id = h.site_id WHERE {clause} ORDER BY h.site_id, h.host_id"
            ))
            .map_err(db)?;
        stmt.query_map(params_from_iter(values), host_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn revoke_host(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        at: Timestamp,
    ) -> Result<bool> {
        caller
            .require_write("revoke hosts")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        let changed = conn
            .cached_exec(
                "UPDATE hosts SET revoked_at = ?3 WHERE site_id = ?1 AND host_id = ?2 AND revoked_at IS NULL",
                params![site_id, host_id, micros(at)],
            )
            .map_err(db)?;
        Ok(changed > 0)
    }

    fn bundle(&self, caller: &Caller, bundle_id: &str) -> Result<Option<BundleRecord>> {
        let conn = self.reader()?;
        let record = conn
            .cached_row(
                &format!("SELECT {BUNDLE_COLS} FROM bundles WHERE bundle_id = ?1"),
                params![bundle_id],
                bundle_row,
            )
            .optional()
            .map_err(db)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let reseller = Self::site_in(&conn, &record.site_id)?.and_then(|s| s.reseller_id);
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
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        neighbours_in(&conn, site_id, host_id, seq)
    }

    fn record_bundle(
        &self,
        caller: &Caller,
        record: &BundleRecord,
        result_for: Option<&str>,
        error: Option<&str>,
    ) -> Result<Recorded> {
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        self.waiting
            .lock()
            .map_err(|_| StoreError::Backend("group commit queue lock poisoned".into()))?
            .push(WaitingRecord {
                caller: caller.clone(),
                record: record.clone(),
                result_for: result_for.map(str::to_owned),
                error: error.map(str::to_owned),
                answer,
            });
        // Whoever holds the writer next commits everything waiting, ours included unless
        // the holder before already did (it answers before letting the writer go).
        {
            let mut conn = self.conn()?;
            let batch = std::mem::take(
                &mut *self
                    .waiting
                    .lock()
                    .map_err(|_| StoreError::Backend("group commit queue lock poisoned".into()))?,
            );
            if !batch.is_empty() {
                self.commit_waiting(&mut conn, batch);
            }
        }
        answered.recv().map_err(|_| {
            StoreError::Backend("the group commit ended without answering this bundle".into())
        })?
    }

    fn bundle_ids(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Vec<String>> {
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        let mut stmt = conn
            .prepare(
                "SELECT bundle_id FROM bundles WHERE site_id = ?1 AND host_id = ?2 ORDER BY seq",
            )
            .map_err(db)?;
        stmt.query_map(params![site_id, host_id], |r| r.get(0))
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn seqs(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Vec<u64>> {
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        let mut stmt = conn
            .prepare("SELECT seq FROM bundles WHERE site_id = ?1 AND host_id = ?2 ORDER BY seq")
            .map_err(db)?;
        stmt.query_map(params![site_id, host_id], |r| {
            Ok(r.get::<_, i64>(0)?.max(0) as u64)
        })
        .map_err(db)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db)
    }

    fn latest_results(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<CheckResult>> {
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        let mut stmt = conn
            .prepare("SELECT check_name, outcome, bundle_id, timestamp_end FROM latest_results WHERE site_id = ?1 AND host_id = ?2 ORDER BY check_name")
            .map_err(db)?;
        stmt.query_map(params![site_id, host_id], |r| {
            Ok(CheckResult {
                check: r.get(0)?,
                outcome: r.get(1)?,
                bundle_id: r.get(2)?,
                timestamp_end: ts(r.get(3)?),
            })
        })
        .map_err(db)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db)
    }

    fn insert_order(&self, caller: &Caller, order: &OrderRecord) -> Result<()> {
        caller
            .require_write("create orders")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        self.visible_host(&conn, caller, &order.site_id, &order.host_id)?;
        conn.cached_exec(
            "INSERT INTO orders (order_id, site_id, host_id, runbook_id, params, ttl, state, envelope, created_by, created_at, approved_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                order.order_id, order.site_id, order.host_id, order.runbook_id,
                order.params.to_string(), order.ttl as i64, order.state.as_str(), order.envelope,
                order.created_by, micros(order.created_at), order.approved_by
            ],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::Exists(format!("order {}", order.order_id))
            }
            other => db(other),
        })?;
        Ok(())
    }

    fn approve_order(
        &self,
        caller: &Caller,
        order_id: &str,
        envelope: &str,
        approved_by: &str,
    ) -> Result<()> {
        caller
            .require_write("approve orders")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        let changed = conn
            .cached_exec(
                "UPDATE orders SET state = 'pending', envelope = ?2, approved_by = ?3 WHERE order_id = ?1 AND state = 'awaiting_approval'",
                params![order_id, envelope, approved_by],
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
        let conn = self.reader()?;
        let (clause, mut values) = scope(caller, "o.site_id", "s.reseller_id", "o.host_id");
        values.insert(0, SqlValue::Text(order_id.into()));
        conn.cached_row(
            &format!("SELECT {ORDER_COLS} FROM orders o JOIN sites s ON s.site_id = o.site_id WHERE o.order_id = ? AND {clause}"),
            params_from_iter(values),
            order_row,
        )
        .optional()
        .map_err(db)
    }

    fn orders(&self, caller: &Caller, host: Option<(&str, &str)>) -> Result<Vec<OrderRecord>> {
        let conn = self.reader()?;
        let (clause, mut values) = scope(caller, "o.site_id", "s.reseller_id", "o.host_id");
        let mut sql = format!(
            "SELECT {ORDER_COLS} FROM orders o JOIN sites s ON s.site_id = o.site_id WHERE {clause}"
        );
        if let Some((site, host)) = host {
            sql.push_str(" AND o.site_id = ? AND o.host_id = ?");
            values.push(SqlValue::Text(site.into()));
            values.push(SqlValue::Text(host.into()));
        }
        sql.push_str(" ORDER BY o.created_at DESC, o.rowid DESC");
        let mut stmt = conn.prepare(&sql).map_err(db)?;
        stmt.query_map(params_from_iter(values), order_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn pending_orders(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<OrderRecord>> {
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {ORDER_COLS} FROM orders o WHERE o.site_id = ?1 AND o.host_id = ?2 AND o.state = 'pending' ORDER BY o.created_at, o.rowid"
            ))
            .map_err(db)?;
        stmt.query_map(params![site_id, host_id], order_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn last_order_at(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        runbook_id: &str,
    ) -> Result<Option<Timestamp>> {
        let conn = self.conn()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        conn.cached_row(
            "SELECT MAX(created_at) FROM orders WHERE site_id = ?1 AND host_id = ?2 AND runbook_id = ?3",
            params![site_id, host_id, runbook_id],
            |r| r.get::<_, Option<i64>>(0),
        )
        .map(|v| v.map(ts))
        .map_err(db)
    }

    fn create_operator(&self, caller: &Caller, operator: &Operator) -> Result<()> {
        caller
            .require_admin("create operators")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        conn.cached_exec(
            "INSERT INTO operators (name, role, tenants, token_hash, created_at, disabled) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                operator.name,
                operator.role.as_str(),
                serde_json::to_string(&operator.tenants).map_err(|e| StoreError::Backend(e.to_string()))?,
                &operator.token_hash[..],
                micros(operator.created_at),
                operator.disabled
            ],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::Exists(format!("operator {}", operator.name))
            }
            other => db(other),
        })?;
        Ok(())
    }

    fn operator_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<Operator>> {
        let conn = self.reader()?;
        let found = conn
            .cached_row(
                "SELECT name, role, tenants, token_hash, created_at, disabled FROM operators WHERE token_hash = ?1",
                params![&token_hash[..]],
                operator_row,
            )
            .optional()
            .map_err(db)?;
        Ok(found.filter(|o| hashes_equal(&o.token_hash, token_hash) && !o.disabled))
    }

    fn operators(&self, caller: &Caller) -> Result<Vec<Operator>> {
        caller
            .require_admin("list operators")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare("SELECT name, role, tenants, token_hash, created_at, disabled FROM operators ORDER BY name")
            .map_err(db)?;
        stmt.query_map([], operator_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<i64> {
        let conn = self.conn()?;
        conn.cached_exec(
            "INSERT INTO audit (at, actor, peer, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![micros(entry.at), entry.actor, entry.peer, entry.action, entry.target, entry.outcome, entry.detail],
        )
        .map_err(db)?;
        Ok(conn.last_insert_rowid())
    }

    fn audit(&self, caller: &Caller, limit: u32) -> Result<Vec<AuditEntry>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare("SELECT id, at, actor, peer, action, target, outcome, detail FROM audit ORDER BY id DESC")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: ts(r.get(1)?),
                    actor: r.get(2)?,
                    peer: r.get(3)?,
                    action: r.get(4)?,
                    target: r.get(5)?,
                    outcome: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let entry = row.map_err(db)?;
            let site = entry
                .target
                .split_once('/')
                .map_or(entry.target.as_str(), |(s, _)| s);
            let reseller = Self::site_in(&conn, site)?.and_then(|s| s.reseller_id);
            if audit_visible(caller, &entry, reseller.as_deref()) {
                out.push(entry);
                if out.len() >= limit as usize {
                    break;
                }
            }
        }
        Ok(out)
    }
}

fn operator_row(r: &Row<'_>) -> rusqlite::Result<Operator> {
    let role: String = r.get(1)?;
    let tenants: String = r.get(2)?;
    let hash: Vec<u8> = r.get(3)?;
    let mut token_hash = [0u8; 32];
    if hash.len() == 32 {
        token_hash.copy_from_slice(&hash);
    }
    Ok(Operator {
        name: r.get(0)?,
        // An unknown role in the database reads as the weakest one.
        role: Role::parse(&role).unwrap_or(Role::Auditor),
        tenants: serde_json::from_str(&tenants).unwrap_or(Tenants::Sites { site_ids: vec![] }),
        token_hash,
        created_at: ts(r.get(4)?),
        disabled: r.get(5)?,
    })
}
