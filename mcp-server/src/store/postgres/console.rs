//! The console's storage on PostgreSQL: sessions, passwords, token revocation, evidence
//! listing; the same meaning as the SQLite store's.

use jiff::Timestamp;

use super::{
    BUNDLE_COLS, Param, PostgresStore, bundle_row, db, forbidden, micros, operator_row, refs, rows,
    scope, site_in, ts,
};
use crate::auth::{Caller, hashes_equal};
use crate::store::console::{
    BundleCount, BundleFilter, ConsoleSession, ConsoleStore, TokenListing, may_set_password,
};
use crate::store::{BundleRecord, Operator, Result, StoreError};

impl ConsoleStore for PostgresStore {
    fn create_console_session(
        &self,
        session_hash: &[u8; 32],
        operator: &str,
        csrf_token: &str,
        created_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        self.conn()?
            .execute(
                "INSERT INTO console_sessions (session_hash, operator, csrf_token, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                &[&&session_hash[..], &operator, &csrf_token, &micros(created_at), &micros(expires_at)],
            )
            .map_err(db)?;
        Ok(())
    }

    fn console_session(
        &self,
        session_hash: &[u8; 32],
        now: Timestamp,
    ) -> Result<Option<ConsoleSession>> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT o.name, o.role, o.tenants, o.token_hash, o.created_at, o.disabled, \
                 c.session_hash, c.csrf_token, c.created_at, c.expires_at \
                 FROM console_sessions c JOIN operators o ON o.name = c.operator \
                 WHERE c.session_hash = $1",
                &[&&session_hash[..]],
            )
            .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let operator = operator_row(&r).map_err(db)?;
        let hash: Vec<u8> = r.try_get(6).map_err(db)?;
        let csrf_token: String = r.try_get(7).map_err(db)?;
        let created_at = ts(r.try_get(8).map_err(db)?);
        let expires_at = ts(r.try_get(9).map_err(db)?);
        Ok(
            (hashes_equal(&hash, session_hash) && expires_at > now && !operator.disabled)
                .then_some(ConsoleSession {
                    operator,
                    csrf_token,
                    created_at,
                    expires_at,
                }),
        )
    }

    fn delete_console_session(&self, session_hash: &[u8; 32]) -> Result<bool> {
        let n = self
            .conn()?
            .execute(
                "DELETE FROM console_sessions WHERE session_hash = $1",
                &[&&session_hash[..]],
            )
            .map_err(db)?;
        Ok(n > 0)
    }

    fn purge_console_sessions(&self, now: Timestamp) -> Result<u64> {
        self.conn()?
            .execute(
                "DELETE FROM console_sessions WHERE expires_at <= $1",
                &[&micros(now)],
            )
            .map_err(db)
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
        let mut conn = self.conn()?;
        if conn
            .query_opt("SELECT name FROM operators WHERE name = $1", &[&name])
            .map_err(db)?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("operator {name}")));
        }
        conn.execute(
            "INSERT INTO operator_passwords (name, phc, set_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET phc = excluded.phc, set_at = excluded.set_at",
            &[&name, &phc, &micros(at)],
        )
        .map_err(db)?;
        Ok(())
    }

    fn operator_password(&self, name: &str) -> Result<Option<(Operator, String)>> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT o.name, o.role, o.tenants, o.token_hash, o.created_at, o.disabled, p.phc \
                 FROM operator_passwords p JOIN operators o ON o.name = p.name WHERE p.name = $1",
                &[&name],
            )
            .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let operator = operator_row(&r).map_err(db)?;
        let phc: String = r.try_get(6).map_err(db)?;
        Ok((!operator.disabled).then_some((operator, phc)))
    }

    fn enrollment_tokens(&self, caller: &Caller) -> Result<Vec<TokenListing>> {
        // Tokens belong to sites: a host-scoped caller has none to see.
        let (clause, values) = scope(caller, "t.site_id", "s.reseller_id", "NULL", 1);
        let found = self
            .conn()?
            .query(
                &format!(
                    "SELECT t.token_id, t.site_id, s.reseller_id, t.uses_left, t.expires_at, t.created_by, t.created_at, t.revoked_at \
                     FROM enrollment_tokens t JOIN sites s ON s.site_id = t.site_id \
                     WHERE {clause} ORDER BY t.created_at DESC, t.token_id"
                ),
                &refs(&values),
            )
            .map_err(db)?;
        rows(found, |r| {
            Ok(TokenListing {
                token_id: r.try_get(0)?,
                site_id: r.try_get(1)?,
                reseller_id: r.try_get(2)?,
                uses_left: u32::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
                expires_at: ts(r.try_get(4)?),
                created_by: r.try_get(5)?,
                created_at: ts(r.try_get(6)?),
                revoked_at: r.try_get::<_, Option<i64>>(7)?.map(ts),
            })
        })
    }

    fn revoke_enrollment_token(
        &self,
        caller: &Caller,
        token_id: &str,
        at: Timestamp,
    ) -> Result<bool> {
        caller
            .require_write("revoke enrollment tokens")
            .map_err(forbidden)?;
        let mut conn = self.conn()?;
        let what = format!("enrollment token {token_id}");
        let site_id: String = conn
            .query_opt(
                "SELECT site_id FROM enrollment_tokens WHERE token_id = $1",
                &[&token_id],
            )
            .map_err(db)?
            .ok_or_else(|| StoreError::NotFound(what.clone()))?
            .try_get(0)
            .map_err(db)?;
        let site = site_in(&mut *conn, &site_id, false)?
            .ok_or_else(|| StoreError::NotFound(what.clone()))?;
        crate::store::require_sees(caller, &site, &what)?;
        // uses_left = 0 as well: the redemption refuses a token without uses.
        let n = conn
            .execute(
                "UPDATE enrollment_tokens SET revoked_at = $2, uses_left = 0 WHERE token_id = $1 AND revoked_at IS NULL",
                &[&token_id, &micros(at)],
            )
            .map_err(db)?;
        Ok(n > 0)
    }

    fn bundles(&self, caller: &Caller, filter: &BundleFilter) -> Result<Vec<BundleRecord>> {
        let (clause, mut values) = scope(caller, "b.site_id", "s.reseller_id", "b.host_id", 1);
        let mut wheres = vec![clause];
        for (col, v) in [
            ("b.site_id", &filter.site_id),
            ("b.host_id", &filter.host_id),
            ("b.check_name", &filter.check),
            ("b.outcome", &filter.outcome),
        ] {
            if let Some(v) = v {
                values.push(Box::new(v.clone()) as Param);
                wheres.push(format!("{col} = ${}", values.len()));
            }
        }
        values.push(Box::new(i64::from(filter.limit)));
        let limit = values.len();
        let cols = BUNDLE_COLS
            .split(", ")
            .map(|c| format!("b.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let found = self
            .conn()?
            .query(
                &format!(
                    "SELECT {cols} FROM bundles b JOIN sites s ON s.site_id = b.site_id \
                     WHERE {} ORDER BY b.received_at DESC, b.seq DESC LIMIT ${limit}",
                    wheres.join(" AND ")
                ),
                &refs(&values),
            )
            .map_err(db)?;
        rows(found, bundle_row)
    }

    fn bundle_counts(&self, caller: &Caller) -> Result<Vec<BundleCount>> {
        let (clause, values) = scope(caller, "b.site_id", "s.reseller_id", "b.host_id", 1);
        let found = self
            .conn()?
            .query(
                &format!(
                    "SELECT s.reseller_id, b.site_id, b.host_id, b.check_name, b.outcome, COUNT(*) \
                     FROM bundles b JOIN sites s ON s.site_id = b.site_id WHERE {clause} \
                     GROUP BY s.reseller_id, b.site_id, b.host_id, b.check_name, b.outcome \
                     ORDER BY b.site_id, b.host_id, b.check_name, b.outcome"
                ),
                &refs(&values),
            )
            .map_err(db)?;
        rows(found, |r| {
            Ok(BundleCount {
                reseller_id: r.try_get(0)?,
                site_id: r.try_get(1)?,
                host_id: r.try_get(2)?,
                check: r.try_get(3)?,
                outcome: r.try_get(4)?,
                count: u64::try_from(r.try_get::<_, i64>(5)?).unwrap_or(0),
            })
        })
    }
}
