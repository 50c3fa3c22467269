//! The agent's SQLite state (WAL, synchronous=FULL): the upload queue with backoff, seen order nonces, processed orders.
//!
//! The evidence directory is the truth and this database an index over it:
//! a bundle on disk that is neither queued nor known to be delivered is queued
//! again by [`Queue::reconcile`], so a lost or deleted database costs at most
//! some re-uploads, which the MCP deduplicates by bundle_id.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::config::Config;
use crate::evidence::{self, Check};

/// File name of the database in state_dir.
pub const DB_FILE: &str = "agent.db";

/// Schema migrations, in order; the database's `user_version` counts how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: the upload queue, seen nonces, processed orders, small key/value facts.
    "CREATE TABLE uploads (
        bundle_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        dir TEXT NOT NULL,
        order_id TEXT,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        enqueued_at INTEGER NOT NULL,
        next_attempt_at INTEGER NOT NULL,
        last_attempt_at INTEGER,
        last_error TEXT,
        delivered_at INTEGER
    );
    CREATE INDEX uploads_by_state ON uploads (state, next_attempt_at, seq);
    CREATE TABLE seen_nonces (
        nonce TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        seen_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE orders (
        order_id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('running', 'done')),
        outcome TEXT,
        bundle_id TEXT,
        received_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    // 2: order listings refused without an order id to answer under, so that
    // a stuck listing is refused (and recorded as evidence) once, not at every poll.
    "CREATE TABLE refused_listings (
        listing_sha256 TEXT PRIMARY KEY,
        listed_order_id TEXT NOT NULL,
        bundle_id TEXT,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );",
];

/// meta keys: the UTC day (days since the epoch) and how many order-refusal
/// bundles were written on it (the daily limit of refusal evidence).
const REFUSAL_DAY: &str = "refusal_bundles_day";
const REFUSAL_COUNT: &str = "refusal_bundles_count";

/// meta key: every bundle with a seq at or below this was delivered and its row pruned.
const DELIVERED_WATERMARK: &str = "delivered_watermark_seq";

/// How long processed-order records are kept after they finish.
const ORDER_RECORD_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state database {path} has schema version {found}, newer than the {known} this agent knows; run the newer agent or move the file away (it is rebuilt from the evidence directory)"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "state database {path}: journal mode is {mode:?}, not WAL; the file system must support shared memory (not NFS)"
    )]
    NotWal { path: PathBuf, mode: String },
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Evidence(#[from] evidence::EvidenceError),
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// Exponential backoff with jitter, and when to stop retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Refusals by the MCP after which a row is parked as failed.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(30),
            cap: Duration::from_secs(3600),
            max_attempts: 10,
        }
    }
}

impl RetryPolicy {
    pub fn from_config(config: &Config) -> Self {
        Self {
            base: Duration::from_secs(config.upload_backoff_base_sec),
            cap: Duration::from_secs(config.upload_backoff_cap_sec),
            max_attempts: config.upload_max_attempts,
        }
    }

    /// The delay before the next try after `attempts` failures: base * 2^(attempts-1),
    /// at most cap, then a random point in its upper half so that many boxes
    /// coming back from one outage do not retry in step.
    pub fn delay(&self, attempts: u32, rng: &mut impl Rng) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let full = self
            .base
            .saturating_mul(1u32 << exp)
            .min(self.cap)
            .max(Duration::from_secs(1));
        let half = full / 2;
        half + Duration::from_millis(rng.gen_range(0..=half.as_millis().max(1) as u64))
    }
}

/// Why an upload attempt failed, which decides whether the row may be parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The MCP could not be reached or did not complete the exchange (network,
    /// TLS, timeouts, 5xx): retried for as long as it takes.
    Unreachable,
    /// The MCP answered and refused the bundle, or answered against the
    /// protocol: parked after `max_attempts`.
    Refused,
}

/// One queued bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Upload {
    pub bundle_id: String,
    pub seq: u64,
    pub dir: PathBuf,
    /// Set for the result bundle of an MCP order: delivered to that order's result endpoint.
    pub order_id: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// What a caller enqueues: a bundle on disk.
#[derive(Clone, Debug)]
pub struct NewUpload {
    pub bundle_id: String,
    pub seq: u64,
    pub dir: PathBuf,
    pub order_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub schema_version: i64,
    pub pending: u64,
    /// Pending rows whose next attempt is due now.
    pub due: u64,
    pub delivered: u64,
    /// Parked after too many refusals; `queue flush --retry-failed` re-arms them.
    pub failed: u64,
    /// Delivered rows already pruned: every seq at or below this was acknowledged.
    pub delivered_watermark_seq: u64,
    pub oldest_pending_enqueued_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub seen_nonces: u64,
    pub orders_processed: u64,
}

/// What happened to an order's nonce when the order was claimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// First sight: the nonce is now recorded and the order marked running.
    Fresh,
    /// The nonce was seen before, with this order id.
    Replay {
        first_order_id: String,
        seen_at: i64,
    },
}

/// A processed order, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRecord {
    pub order_id: String,
    /// False while the runbook runs (or the agent stopped while it ran).
    pub done: bool,
    pub outcome: Option<String>,
    pub bundle_id: Option<String>,
}

pub struct Queue {
    conn: Connection,
    path: PathBuf,
    retry: RetryPolicy,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Queue {
    /// The database of `config` (state_dir/agent.db), created if missing.
    pub fn open_for(config: &Config) -> Result<Self> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| QueueError::CreateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        Self::open(
            &config.state_dir.join(DB_FILE),
            RetryPolicy::from_config(config),
        )
    }

    pub fn open(path: &Path, retry: RetryPolicy) -> Result<Self> {
        let sql = |source| QueueError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        // The service and a CLI command may use the database at once.
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QueueError::NotWal {
                path: path.to_owned(),
                mode,
            });
        }
        // FULL: a commit (delivered, nonce seen) survives power loss, not only a crash.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        let mut queue = Self {
            conn,
            path: path.to_owned(),
            retry,
        };
        queue.migrate()?;
        Ok(queue)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
        move |source| QueueError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The schema version this agent writes.
    pub fn known_version() -> i64 {
        MIGRATIONS.len() as i64
    }

    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        let found: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&sql)?;
        let known = Self::known_version();
        if found > known {
            return Err(QueueError::TooNew { path, found, known });
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.execute_batch(migration).map_err(&sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(&sql)?;
        }
        tx.commit().map_err(&sql)
    }

    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql())
    }

    /// `PRAGMA integrity_check`: "ok", or SQLite's description of the damage.
    pub fn integrity_check(&self) -> Result<String> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(self.sql())?;
        let lines = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.sql())?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.sql())?;
        Ok(lines.join("\n"))
    }

    /// Queues bundles for upload (already known ones are left alone); returns how many were new.
    pub fn enqueue(&mut self, uploads: &[NewUpload], now: i64) -> Result<usize> {
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        let mut added = 0;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO uploads (bundle_id, seq, dir, order_id, enqueued_at, next_attempt_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                )
                .map_err(&sql)?;
            for u in uploads {
                added += stmt
                    .execute(params![
                        u.bundle_id,
                        u.seq as i64,
                        u.dir.to_string_lossy(),
                        u.order_id,
                        now
                    ])
                    .map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)?;
        Ok(added)
    }

    /// Queues every bundle under `evidence_dir` that is neither queued nor
    /// known to be delivered; returns how many were queued.
    pub fn reconcile(&mut self, evidence_dir: &Path, now: i64) -> Result<usize> {
        let known: HashSet<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT bundle_id FROM uploads")
                .map_err(self.sql())?;
            stmt.query_map([], |r| r.get::<_, String>(0))
                .map_err(self.sql())?
                .collect::<std::result::Result<_, _>>()
                .map_err(self.sql())?
        };
        let watermark = self.watermark()?;
        let mut missing = Vec::new();
        let mut orders: Vec<evidence::Bundle> = Vec::new();
        for r in evidence::bundle_refs(evidence_dir)? {
            if known.contains(&r.bundle_id) {
                continue;
            }
            // A bundle being written right now, or damaged: `evidence verify` reports it.
            let Ok(bundle) = evidence::read(&r.dir) else {
                tracing::warn!(dir = %r.dir.display(), "bundle cannot be read; not queued");
                continue;
            };
            if bundle.check == Check::McpOrder {
                orders.push(bundle.clone());
            }
            if bundle.seq <= watermark {
                continue;
            }
            missing.push(NewUpload {
                order_id: order_route(bundle.check, bundle.order_id),
                bundle_id: r.bundle_id,
                seq: bundle.seq,
                dir: r.dir,
            });
        }
        if !missing.is_empty() {
            tracing::info!(
                count = missing.len(),
                "queued bundles found on disk but not in the upload queue"
            );
        }
        orders.sort_by_key(|b| b.seq);
        self.remember_orders(&orders)?;
        self.enqueue(&missing, now)
    }

    /// Rebuilds processed orders and seen nonces from `mcp_order` bundles the
    /// database does not know (after it was lost): the evidence records every
    /// order answered and the nonce of every order accepted, so a lost
    /// database never lets an order run twice.
    fn remember_orders(&mut self, bundles: &[evidence::Bundle]) -> Result<()> {
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        let mut rebuilt = (0, 0);
        for b in bundles {
            let Some(order_id) = &b.order_id else {
                continue;
            };
            let at = b.timestamp_end.as_second();
            rebuilt.0 += tx
                .execute(
                    "INSERT OR IGNORE INTO orders (order_id, state, outcome, bundle_id, received_at, finished_at)
                     VALUES (?1, 'done', ?2, ?3, ?4, ?4)",
                    params![order_id, b.outcome.as_str(), b.bundle_id, at],
                )
                .map_err(&sql)?;
            // Accepted orders (and replays refused for their nonce) record the verified order.
            let order = &b.pre_state["order"];
            if let Some(nonce) = order["nonce"].as_str() {
                let issued = order["issued_at"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map_or(at, |t| t.as_second());
                let ttl = order["ttl"].as_i64().unwrap_or(0);
                // As long as any order could still be current, plus the largest clock skew allowed.
                let expires_at =
                    issued.max(at) + ttl.max(crate::orders::MAX_TTL_SEC as i64) + 86_400;
                rebuilt.1 += tx
                    .execute(
                        "INSERT OR IGNORE INTO seen_nonces (nonce, order_id, seen_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                        params![nonce, order_id, at, expires_at],
                    )
                    .map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)?;
        if rebuilt != (0, 0) {
            tracing::warn!(
                orders = rebuilt.0,
                nonces = rebuilt.1,
                "rebuilt processed orders and seen nonces from the evidence (the state database had lost them)"
            );
        }
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Upload> {
        Ok(Upload {
            bundle_id: r.get(0)?,
            seq: r.get::<_, i64>(1)? as u64,
            dir: PathBuf::from(r.get::<_, String>(2)?),
            order_id: r.get(3)?,
            attempts: r.get::<_, i64>(4)? as u32,
            last_error: r.get(5)?,
        })
    }

    /// Pending rows after `after_seq` whose next attempt is due at `now`, oldest seq first.
    pub fn due(&self, now: i64, after_seq: u64, limit: usize) -> Result<Vec<Upload>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT bundle_id, seq, dir, order_id, attempts, last_error FROM uploads
                 WHERE state = 'pending' AND next_attempt_at <= ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(self.sql())?;
        stmt.query_map(params![now, after_seq as i64, limit as i64], Self::row)
            .map_err(self.sql())?
            .collect::<std::result::Result<_, _>>()
            .map_err(self.sql())
    }

    /// Pending rows after `after_seq` regardless of backoff, oldest seq first (`queue flush`).
    pub fn pending_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Upload>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT bundle_id, seq, dir, order_id, attempts, last_error FROM uploads
                 WHERE state = 'pending' AND seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.sql())?;
        stmt.query_map(params![after_seq as i64, limit as i64], Self::row)
            .map_err(self.sql())?
            .collect::<std::result::Result<_, _>>()
            .map_err(self.sql())
    }

    pub fn state_of(&self, bundle_id: &str) -> Result<Option<UploadState>> {
        let state: Option<String> = self
            .conn
            .query_row(
                "SELECT state FROM uploads WHERE bundle_id = ?1",
                [bundle_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())?;
        Ok(state.map(|s| match s.as_str() {
            "delivered" => UploadState::Delivered,
            "failed" => UploadState::Failed,
            _ => UploadState::Pending,
        }))
    }

    /// Records acknowledgements from the MCP, in one transaction.
    pub fn mark_delivered(&mut self, bundle_ids: &[String], now: i64) -> Result<()> {
        if bundle_ids.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE uploads SET state = 'delivered', delivered_at = ?2, last_error = NULL
                     WHERE bundle_id = ?1",
                )
                .map_err(&sql)?;
            for id in bundle_ids {
                stmt.execute(params![id, now]).map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)
    }

    /// Records a failed attempt and schedules the next; returns the row's new state.
    pub fn record_failure(
        &mut self,
        bundle_id: &str,
        failure: Failure,
        error: &str,
        now: i64,
    ) -> Result<UploadState> {
        let attempts: Option<i64> = self
            .conn
            .query_row(
                "SELECT attempts FROM uploads WHERE bundle_id = ?1",
                [bundle_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())?;
        let Some(attempts) = attempts else {
            return Ok(UploadState::Pending);
        };
        let attempts = (attempts as u32).saturating_add(1);
        let delay = self.retry.delay(attempts, &mut rand::thread_rng());
        let park = failure == Failure::Refused && attempts >= self.retry.max_attempts;
        let state = if park {
            UploadState::Failed
        } else {
            UploadState::Pending
        };
        // Keep the stored error short: a hostile answer must not bloat the database.
        let error: String = error.chars().take(1000).collect();
        self.conn
            .execute(
                "UPDATE uploads SET attempts = ?2, last_error = ?3, last_attempt_at = ?4,
                 next_attempt_at = ?5, state = ?6 WHERE bundle_id = ?1",
                params![
                    bundle_id,
                    attempts as i64,
                    error,
                    now,
                    now.saturating_add(delay.as_secs() as i64),
                    if park { "failed" } else { "pending" }
                ],
            )
            .map_err(self.sql())?;
        Ok(state)
    }

    /// Re-arms parked rows for another round of attempts; returns how many.
    pub fn retry_failed(&mut self, now: i64) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE uploads SET state = 'pending', attempts = 0, next_attempt_at = ?1 WHERE state = 'failed'",
                [now],
            )
            .map_err(self.sql())
    }

    /// The refusal bundle of a listing refused before (Some(None): refused, summarised only).
    pub fn refused_listing(&self, listing_sha256: &str) -> Result<Option<Option<String>>> {
        self.conn
            .query_row(
                "SELECT bundle_id FROM refused_listings WHERE listing_sha256 = ?1",
                [listing_sha256],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map_err(self.sql())
    }

    /// Remembers a refused listing (and the bundle recording it, if one was written).
    pub fn note_refused_listing(
        &mut self,
        listing_sha256: &str,
        listed_order_id: &str,
        bundle_id: Option<&str>,
        now: i64,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO refused_listings (listing_sha256, listed_order_id, bundle_id, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (listing_sha256) DO UPDATE SET last_seen = excluded.last_seen",
                params![listing_sha256, listed_order_id, bundle_id, now],
            )
            .map(|_| ())
            .map_err(self.sql())
    }

    /// How many order-refusal bundles were written on the UTC day of `now`.
    pub fn refusal_bundles_today(&self, now: i64) -> Result<u64> {
        let meta = |key: &str| -> Result<i64> {
            Ok(self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(self.sql())?
                .unwrap_or(-1))
        };
        if meta(REFUSAL_DAY)? != now.div_euclid(86_400) {
            return Ok(0);
        }
        Ok(meta(REFUSAL_COUNT)?.max(0) as u64)
    }

    /// Counts `n` more order-refusal bundles on the UTC day of `now`.
    pub fn count_refusal_bundles(&mut self, n: u64, now: i64) -> Result<()> {
        let today = self.refusal_bundles_today(now)? + n;
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        for (key, value) in [
            (REFUSAL_DAY, now.div_euclid(86_400)),
            (REFUSAL_COUNT, today as i64),
        ] {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(&sql)?;
        }
        tx.commit().map_err(&sql)
    }

    fn watermark(&self) -> Result<u64> {
        let value: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [DELIVERED_WATERMARK],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())?;
        Ok(value.unwrap_or(0).max(0) as u64)
    }

    /// Removes delivered rows: the unbroken run of delivered seqs from the
    /// oldest row, ending at `before` (exclusive) at most. The highest pruned
    /// seq is kept as a watermark so that `reconcile` does not queue those
    /// bundles again. Processed-order records and nonces past their use go too.
    pub fn prune(&mut self, delivered_before: i64, now: i64) -> Result<u64> {
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let watermark = self.watermark()?;
        let tx = self.conn.transaction().map_err(&sql)?;
        // The lowest seq that must stay: not delivered, or delivered too recently.
        let stop: Option<i64> = tx
            .query_row(
                "SELECT MIN(seq) FROM uploads WHERE state != 'delivered' OR delivered_at >= ?1",
                [delivered_before],
                |r| r.get(0),
            )
            .map_err(&sql)?;
        let top: Option<i64> = match stop {
            Some(stop) => tx
                .query_row(
                    "SELECT MAX(seq) FROM uploads WHERE state = 'delivered' AND seq < ?1",
                    [stop],
                    |r| r.get(0),
                )
                .map_err(&sql)?,
            None => tx
                .query_row(
                    "SELECT MAX(seq) FROM uploads WHERE state = 'delivered'",
                    [],
                    |r| r.get(0),
                )
                .map_err(&sql)?,
        };
        let mut removed = 0;
        if let Some(top) = top {
            removed = tx
                .execute(
                    "DELETE FROM uploads WHERE state = 'delivered' AND seq <= ?1",
                    [top],
                )
                .map_err(&sql)? as u64;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
                params![DELIVERED_WATERMARK, top.max(watermark as i64)],
            )
            .map_err(&sql)?;
        }
        tx.execute("DELETE FROM seen_nonces WHERE expires_at < ?1", [now])
            .map_err(&sql)?;
        tx.execute(
            "DELETE FROM refused_listings WHERE last_seen < ?1",
            [now - ORDER_RECORD_DAYS * 86_400],
        )
        .map_err(&sql)?;
        tx.execute(
            "DELETE FROM orders WHERE state = 'done' AND finished_at < ?1",
            [now - ORDER_RECORD_DAYS * 86_400],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(removed)
    }

    /// Delivered rows after the cursor (delivered_at, seq), in that order: the
    /// bundles the log witness asks inclusion proofs for.
    pub fn delivered_after(
        &self,
        delivered_at: i64,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<(Upload, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT bundle_id, seq, dir, order_id, attempts, last_error, delivered_at FROM uploads
                 WHERE state = 'delivered' AND (delivered_at > ?1 OR (delivered_at = ?1 AND seq > ?2))
                 ORDER BY delivered_at, seq LIMIT ?3",
            )
            .map_err(self.sql())?;
        stmt.query_map(params![delivered_at, seq as i64, limit as i64], |r| {
            Ok((Self::row(r)?, r.get::<_, i64>(6)?))
        })
        .map_err(self.sql())?
        .collect::<std::result::Result<_, _>>()
        .map_err(self.sql())
    }

    /// Whether the MCP acknowledged `bundle_id` (the evidence prune guard).
    pub fn acknowledged(&self) -> Result<impl Fn(&str, u64) -> bool + use<>> {
        let watermark = self.watermark()?;
        let mut stmt = self
            .conn
            .prepare("SELECT bundle_id FROM uploads WHERE state = 'delivered'")
            .map_err(self.sql())?;
        let delivered: HashSet<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.sql())?
            .collect::<std::result::Result<_, _>>()
            .map_err(self.sql())?;
        Ok(move |id: &str, seq: u64| seq <= watermark || delivered.contains(id))
    }

    pub fn stats(&self, now: i64) -> Result<QueueStats> {
        let count = |sql: &str| -> Result<u64> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(self.sql())
        };
        let due: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM uploads WHERE state = 'pending' AND next_attempt_at <= ?1",
                [now],
                |r| r.get(0),
            )
            .map_err(self.sql())?;
        let (oldest, next): (Option<i64>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT MIN(enqueued_at), MIN(next_attempt_at) FROM uploads WHERE state = 'pending'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql())?;
        let last_error: Option<String> = self
            .conn
            .query_row(
                "SELECT last_error FROM uploads WHERE state != 'delivered' AND last_error IS NOT NULL
                 ORDER BY last_attempt_at DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())?;
        Ok(QueueStats {
            schema_version: self.schema_version()?,
            pending: count("SELECT COUNT(*) FROM uploads WHERE state = 'pending'")?,
            due: due as u64,
            delivered: count("SELECT COUNT(*) FROM uploads WHERE state = 'delivered'")?,
            failed: count("SELECT COUNT(*) FROM uploads WHERE state = 'failed'")?,
            delivered_watermark_seq: self.watermark()?,
            oldest_pending_enqueued_at: oldest,
            next_attempt_at: next,
            last_error,
            seen_nonces: count("SELECT COUNT(*) FROM seen_nonces")?,
            orders_processed: count("SELECT COUNT(*) FROM orders")?,
        })
    }

    /// Records an authentic order's nonce and marks the order running, or
    /// reports the earlier order that used the nonce. One transaction: once
    /// this returns `Fresh`, the order can never be claimed again.
    pub fn claim_order(
        &mut self,
        order_id: &str,
        nonce: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<Claim> {
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        let seen: Option<(String, i64)> = tx
            .query_row(
                "SELECT order_id, seen_at FROM seen_nonces WHERE nonce = ?1",
                [nonce],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&sql)?;
        if let Some((first_order_id, seen_at)) = seen {
            return Ok(Claim::Replay {
                first_order_id,
                seen_at,
            });
        }
        tx.execute(
            "INSERT INTO seen_nonces (nonce, order_id, seen_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![nonce, order_id, now, expires_at],
        )
        .map_err(&sql)?;
        tx.execute(
            "INSERT OR REPLACE INTO orders (order_id, state, received_at) VALUES (?1, 'running', ?2)",
            params![order_id, now],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(Claim::Fresh)
    }

    /// Records that an order was answered with `bundle_id`, and queues that bundle.
    pub fn finish_order(
        &mut self,
        order_id: &str,
        outcome: &str,
        bundle: &NewUpload,
        now: i64,
    ) -> Result<()> {
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        tx.execute(
            "INSERT INTO orders (order_id, state, outcome, bundle_id, received_at, finished_at)
             VALUES (?1, 'done', ?2, ?3, ?4, ?4)
             ON CONFLICT (order_id) DO UPDATE SET state = 'done', outcome = excluded.outcome,
               bundle_id = excluded.bundle_id, finished_at = excluded.finished_at",
            params![order_id, outcome, bundle.bundle_id, now],
        )
        .map_err(&sql)?;
        tx.execute(
            "INSERT OR IGNORE INTO uploads (bundle_id, seq, dir, order_id, enqueued_at, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![
                bundle.bundle_id,
                bundle.seq as i64,
                bundle.dir.to_string_lossy(),
                bundle.order_id,
                now
            ],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)
    }

    pub fn order(&self, order_id: &str) -> Result<Option<OrderRecord>> {
        self.conn
            .query_row(
                "SELECT order_id, state, outcome, bundle_id FROM orders WHERE order_id = ?1",
                [order_id],
                |r| {
                    Ok(OrderRecord {
                        order_id: r.get(0)?,
                        done: r.get::<_, String>(1)? == "done",
                        outcome: r.get(2)?,
                        bundle_id: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(self.sql())
    }
}

/// The order a bundle answers, when it is the result of an MCP order.
pub fn order_route(check: Check, order_id: Option<String>) -> Option<String> {
    if check == Check::McpOrder {
        order_id
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn open(dir: &Path) -> Queue {
        Queue::open(
            &dir.join(DB_FILE),
            RetryPolicy {
                base: Duration::from_secs(10),
                cap: Duration::from_secs(100),
                max_attempts: 3,
            },
        )
        .expect("open queue")
    }

    fn upload(i: u64) -> NewUpload {
        NewUpload {
            bundle_id: format!("b-{i:04}"),
            seq: i,
            dir: PathBuf::from(format!("/evidence/b-{i:04}")),
            order_id: None,
        }
    }

    #[test]
    fn schema_is_wal_full_and_versioned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(dir.path());
        assert_eq!(q.schema_version().expect("version"), Queue::known_version());
        let mode: String = q
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal", "WAL journal");
        let sync: i64 = q
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("synchronous");
        assert_eq!(sync, 2, "synchronous=FULL");
        assert_eq!(q.integrity_check().expect("check"), "ok");
        drop(q);
        // Reopening runs no migration twice.
        let q = open(dir.path());
        assert_eq!(q.schema_version().expect("version"), Queue::known_version());
        q.conn
            .pragma_update(None, "user_version", 99)
            .expect("bump version");
        drop(q);
        let err = Queue::open(&dir.path().join(DB_FILE), RetryPolicy::default())
            .err()
            .expect("a newer schema is refused");
        assert!(
            err.to_string()
                .contains(&format!("newer than the {}", Queue::known_version())),
            "says why: {err}"
        );
    }

    #[test]
    fn enqueue_due_deliver_and_stats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = open(dir.path());
        let items: Vec<NewUpload> = (1..=5).map(upload).collect();
        assert_eq!(q.enqueue(&items, 1000).expect("enqueue"), 5);
        assert_eq!(
            q.enqueue(&items, 1000).expect("enqueue again"),
            0,
            "idempotent"
        );
        let due = q.due(1000, 0, 3).expect("due");
        let seqs: Vec<u64> = due.iter().map(|u| u.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "oldest seq first, limited");
        q.mark_delivered(&["b-0001".into(), "b-0002".into()], 1001)
            .expect("deliver");
        let stats = q.stats(1001).expect("stats");
        assert_eq!((stats.pending, stats.delivered, stats.failed), (3, 2, 0));
        assert_eq!(
            q.state_of("b-0001").expect("state"),
            Some(UploadState::Delivered)
        );
        assert_eq!(q.state_of("nope").expect("state"), None);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_refusals_park() {
        let policy = RetryPolicy {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(100),
            max_attempts: 3,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (attempts, full) in [
            (1u32, 10u64),
            (2, 20),
            (3, 40),
            (4, 80),
            (5, 100),
            (40, 100),
        ] {
            for _ in 0..50 {
                let d = policy.delay(attempts, &mut rng).as_secs_f64();
                assert!(
                    d >= full as f64 / 2.0 && d <= full as f64 + 0.001,
                    "attempt {attempts}: {d} s within [{}, {full}]",
                    full / 2
                );
            }
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = open(dir.path());
        q.enqueue(&[upload(1), upload(2)], 0).expect("enqueue");
        for i in 0..10 {
            let state = q
                .record_failure("b-0001", Failure::Unreachable, "connection refused", i)
                .expect("failure");
            assert_eq!(state, UploadState::Pending, "an outage never parks a row");
        }
        assert!(q.due(10, 0, 10).expect("due").iter().all(|u| u.seq != 1));
        let far = 10 + 100;
        assert!(
            q.due(far, 0, 10).expect("due").iter().any(|u| u.seq == 1),
            "due again after at most the cap"
        );
        for i in 0..2 {
            assert_eq!(
                q.record_failure("b-0002", Failure::Refused, "HTTP 409", 20 + i)
                    .expect("failure"),
                UploadState::Pending
            );
        }
        assert_eq!(
            q.record_failure("b-0002", Failure::Refused, "HTTP 409 fork", 30)
                .expect("failure"),
            UploadState::Failed,
            "the third refusal parks it"
        );
        let stats = q.stats(far).expect("stats");
        assert_eq!(stats.failed, 1);
        assert_eq!(stats.last_error.as_deref(), Some("HTTP 409 fork"));
        assert_eq!(q.retry_failed(far).expect("retry"), 1);
        assert_eq!(
            q.state_of("b-0002").expect("state"),
            Some(UploadState::Pending)
        );
    }

    #[test]
    fn prune_keeps_a_watermark_and_stops_at_the_first_undelivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = open(dir.path());
        q.enqueue(&(1..=6).map(upload).collect::<Vec<_>>(), 0)
            .expect("enqueue");
        q.mark_delivered(&["b-0001".into(), "b-0002".into(), "b-0004".into()], 10)
            .expect("deliver");
        assert_eq!(
            q.prune(100, 100).expect("prune"),
            2,
            "1 and 2 go, 4 waits for 3"
        );
        let ack = q.acknowledged().expect("ack");
        assert!(ack("b-0001", 1) && ack("b-0004", 4), "acknowledged");
        assert!(!ack("b-0003", 3), "3 is not");
        assert_eq!(q.stats(100).expect("stats").delivered_watermark_seq, 2);
        q.mark_delivered(&["b-0003".into()], 50).expect("deliver");
        assert_eq!(
            q.prune(20, 100).expect("prune"),
            0,
            "3 delivered too recently"
        );
        assert_eq!(q.prune(100, 100).expect("prune"), 2);
        assert_eq!(q.stats(100).expect("stats").delivered_watermark_seq, 4);
    }

    #[test]
    fn nonces_are_claimed_once_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = open(dir.path());
        assert_eq!(
            q.claim_order("o-1", "n-1", 500, 100).expect("claim"),
            Claim::Fresh
        );
        assert_eq!(
            q.claim_order("o-2", "n-1", 500, 101).expect("claim"),
            Claim::Replay {
                first_order_id: "o-1".into(),
                seen_at: 100
            }
        );
        let rec = q.order("o-1").expect("order").expect("recorded");
        assert!(!rec.done, "running until finished");
        q.finish_order("o-1", "success", &upload(1), 102)
            .expect("finish");
        let rec = q.order("o-1").expect("order").expect("recorded");
        assert!(rec.done && rec.bundle_id.as_deref() == Some("b-0001"));
        drop(q);
        let mut q = open(dir.path());
        assert!(
            matches!(
                q.claim_order("o-3", "n-1", 500, 200).expect("claim"),
                Claim::Replay { .. }
            ),
            "nonces survive a restart"
        );
        q.prune(0, 501).expect("prune");
        assert_eq!(
            q.stats(501).expect("stats").seen_nonces,
            0,
            "expired nonces go"
        );
    }
}
