//! The console's storage on SQLite: sessions, passwords, token revocation, evidence listing.

use jiff::Timestamp;
use rusqlite::types::Value as SqlValue;
use rusqlite::{OptionalExtension, params, params_from_iter};

use super::{BUNDLE_COLS, Cached, SqliteStore, bundle_row, db, micros, operator_row, scope, ts};
use crate::auth::{Caller, hashes_equal};
use crate::store::console::{
    BundleCount, BundleFilter, ConsoleSession, ConsoleStore, TokenListing, may_set_password,
};
use crate::store::{BundleRecord, Operator, Result, StoreError};

impl ConsoleStore for SqliteStore {
    fn create_console_session(
        &self,
        session_hash: &[u8; 32],
        operator: &str,
        csrf_token: &str,
        created_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        let conn = self.conn()?;
        conn.cached_exec(
            "INSERT INTO console_sessions (session_hash, operator, csrf_token, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![&session_hash[..], operator, csrf_token, micros(created_at), micros(expires_at)],
        )
        .map_err(db)?;
        Ok(())
    }

    fn console_session(
        &self,
        session_hash: &[u8; 32],
        now: Timestamp,
    ) -> Result<Option<ConsoleSession>> {
        let conn = self.conn()?;
        let found = conn
            .cached_row(
                "SELECT o.name, o.role, o.tenants, o.token_hash, o.created_at, o.disabled, \
                 c.session_hash, c.csrf_token, c.created_at, c.expires_at \
                 FROM console_sessions c JOIN operators o ON o.name = c.operator \
                 WHERE c.session_hash = ?1",
                params![&session_hash[..]],
                |r| {
                    let operator = operator_row(r)?;
                    let hash: Vec<u8> = r.get(6)?;
                    Ok((
                        operator,
                        hash,
                        r.get::<_, String>(7)?,
                        ts(r.get(8)?),
                        ts(r.get(9)?),
                    ))
                },
            )
            .optional()
            .map_err(db)?;
        Ok(
            found.and_then(|(operator, hash, csrf_token, created_at, expires_at)| {
                (hashes_equal(&hash, session_hash) && expires_at > now && !operator.disabled)
                    .then_some(ConsoleSession {
                        operator,
                        csrf_token,
                        created_at,
                        expires_at,
                    })
            }),
        )
    }

    fn delete_console_session(&self, session_hash: &[u8; 32]) -> Result<bool> {
        let conn = self.conn()?;
        let n = conn
            .cached_exec(
                "DELETE FROM console_sessions WHERE session_hash = ?1",
                params![&session_hash[..]],
            )
            .map_err(db)?;
        Ok(n > 0)
    }

    fn purge_console_sessions(&self, now: Timestamp) -> Result<u64> {
        let conn = self.conn()?;
        let n = conn
            .cached_exec(
                "DELETE FROM console_sessions WHERE expires_at <= ?1",
                params![micros(now)],
            )
            .map_err(db)?;
        Ok(n as u64)
    }

    fn set_operator_password(
        &self,
        caller: &Caller,
        name: &str,
        phc: &str,
        at: Timestamp,
    ) -> Result<()> {
        if !may_set_password(caller, name) {
            return Err(StoreError::Forbidden(format!(
                "only {name} or an admin may set {name}'s password"
            )));
        }
        let conn = self.conn()?;
        let exists: Option<String> = conn
            .cached_row(
                "SELECT name FROM operators WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("operator {name}")));
        }
        conn.cached_exec(
            "INSERT INTO operator_passwords (name, phc, set_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET phc = excluded.phc, set_at = excluded.set_at",
            params![name, phc, micros(at)],
        )
        .map_err(db)?;
        Ok(())
    }

    fn operator_password(&self, name: &str) -> Result<Option<(Operator, String)>> {
        let conn = self.conn()?;
        let found = conn
            .cached_row(
                "SELECT o.name, o.role, o.tenants, o.token_hash, o.created_at, o.disabled, p.phc \
                 FROM operator_passwords p JOIN operators o ON o.name = p.name WHERE p.name = ?1",
                params![name],
                |r| Ok((operator_row(r)?, r.get::<_, String>(6)?)),
            )
            .optional()
            .map_err(db)?;
        Ok(found.filter(|(o, _)| !o.disabled))
    }

    fn enrollment_tokens(&self, caller: &Caller) -> Result<Vec<TokenListing>> {
        let conn = self.conn()?;
        // Tokens belong to sites: a host-scoped caller has none to see.
        let (clause, values) = scope(caller, "t.site_id", "s.reseller_id", "NULL");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT t.token_id, t.site_id, s.reseller_id, t.uses_left, t.expires_at, t.created_by, t.created_at, t.revoked_at \
                 FROM enrollment_tokens t JOIN sites s ON s.site_id = t.site_id \
                 WHERE {clause} ORDER BY t.created_at DESC, t.token_id"
            ))
            .map_err(db)?;
        stmt.query_map(params_from_iter(values), |r| {
            Ok(TokenListing {
                token_id: r.get(0)?,
                site_id: r.get(1)?,
                reseller_id: r.get(2)?,
                uses_left: r.get::<_, i64>(3)?.max(0) as u32,
                expires_at: ts(r.get(4)?),
                created_by: r.get(5)?,
                created_at: ts(r.get(6)?),
                revoked_at: r.get::<_, Option<i64>>(7)?.map(ts),
            })
        })
        .map_err(db)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db)
    }

    fn revoke_enrollment_token(
        &self,
        caller: &Caller,
        token_id: &str,
        at: Timestamp,
    ) -> Result<bool> {
        caller
            .require_write("revoke enrollment tokens")
            .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        let conn = self.conn()?;
        let site: Option<String> = conn
            .cached_row(
                "SELECT site_id FROM enrollment_tokens WHERE token_id = ?1",
                params![token_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let what = format!("enrollment token {token_id}");
        let site = site
            .and_then(|s| Self::site_in(&conn, &s).transpose())
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(what.clone()))?;
        crate::store::require_sees(caller, &site, &what)?;
        // uses_left = 0 as well: the redemption refuses a token without uses.
        let n = conn
            .cached_exec(
                "UPDATE enrollment_tokens SET revoked_at = ?2, uses_left = 0 WHERE token_id = ?1 AND revoked_at IS NULL",
                params![token_id, micros(at)],
            )
            .map_err(db)?;
        Ok(n > 0)
    }

    fn bundles(&self, caller: &Caller, filter: &BundleFilter) -> Result<Vec<BundleRecord>> {
        let conn = self.conn()?;
        let (clause, mut values) = scope(caller, "b.site_id", "s.reseller_id", "b.host_id");
        let mut wheres = vec![clause];
        for (col, v) in [
            ("b.site_id", &filter.site_id),
            ("b.host_id", &filter.host_id),
            ("b.check_name", &filter.check),
            ("b.outcome", &filter.outcome),
        ] {
            if let Some(v) = v {
                wheres.push(format!("{col} = ?"));
                values.push(SqlValue::Text(v.clone()));
            }
        }
        values.push(SqlValue::Integer(i64::from(filter.limit)));
        let cols = BUNDLE_COLS
            .split(", ")
            .map(|c| format!("b.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {cols} FROM bundles b JOIN sites s ON s.site_id = b.site_id \
                 WHERE {} ORDER BY b.received_at DESC, b.seq DESC LIMIT ?",
                wheres.join(" AND ")
            ))
            .map_err(db)?;
        stmt.query_map(params_from_iter(values), bundle_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn bundle_counts(&self, caller: &Caller) -> Result<Vec<BundleCount>> {
        let conn = self.conn()?;
        let (clause, values) = scope(caller, "b.site_id", "s.reseller_id", "b.host_id");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT s.reseller_id, b.site_id, b.host_id, b.check_name, b.outcome, COUNT(*) \
                 FROM bundles b JOIN sites s ON s.site_id = b.site_id WHERE {clause} \
                 GROUP BY s.reseller_id, b.site_id, b.host_id, b.check_name, b.outcome \
                 ORDER BY b.site_id, b.host_id, b.check_name, b.outcome"
            ))
            .map_err(db)?;
        stmt.query_map(params_from_iter(values), |r| {
            Ok(BundleCount {
                reseller_id: r.get(0)?,
                site_id: r.get(1)?,
                host_id: r.get(2)?,
                check: r.get(3)?,
                outcome: r.get(4)?,
                count: r.get::<_, i64>(5)?.max(0) as u64,
            })
        })
        .map_err(db)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db)
    }
}
