//! [`SbomStore`] on SQLite.

use rusqlite::types::Value as SqlValue;
use rusqlite::{OptionalExtension, TransactionBehavior, params, params_from_iter};

use super::{Cached, SqliteStore, db, micros, scope, seq_sql, ts};
use crate::auth::{Caller, Role};
use crate::store::sbom::{SbomComponent, SbomMatch, SbomQuery, SbomRecord, SbomStore, check_query};
use crate::store::{Result, StoreError};

impl SbomStore for SqliteStore {
    fn put_sbom(
        &self,
        caller: &Caller,
        record: &SbomRecord,
        components: &[SbomComponent],
    ) -> Result<bool> {
        // A box writes its own SBOM (its scope is itself); operators need write rights.
        if caller.role != Role::Host {
            caller
                .require_write("sbom.put")
                .map_err(|e| StoreError::Forbidden(e.to_string()))?;
        }
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        self.visible_host(&tx, caller, &record.site_id, &record.host_id)?;
        let current: Option<i64> = tx
            .cached_row(
                "SELECT seq FROM sbom_latest WHERE site_id = ?1 AND host_id = ?2",
                params![record.site_id, record.host_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let seq = seq_sql(record.seq)?;
        if current.is_some_and(|c| c > seq) {
            return Ok(false);
        }
        tx.cached_exec(
            "DELETE FROM sbom_components WHERE site_id = ?1 AND host_id = ?2",
            params![record.site_id, record.host_id],
        )
        .map_err(db)?;
        tx.cached_exec(
            "DELETE FROM sbom_latest WHERE site_id = ?1 AND host_id = ?2",
            params![record.site_id, record.host_id],
        )
        .map_err(db)?;
        tx.cached_exec(
            "INSERT INTO sbom_latest (site_id, host_id, bundle_id, seq, sha256, components, received_at, document) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                record.site_id,
                record.host_id,
                record.bundle_id,
                seq,
                record.sha256,
                components.len() as i64,
                micros(record.received_at),
                record.document
            ],
        )
        .map_err(db)?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT OR IGNORE INTO sbom_components (site_id, host_id, store_path, name, version) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db)?;
            for c in components {
                insert
                    .execute(params![
                        record.site_id,
                        record.host_id,
                        c.store_path,
                        c.name,
                        c.version
                    ])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    fn latest_sbom(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Option<SbomRecord>> {
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        conn.cached_row(
            "SELECT bundle_id, seq, sha256, components, received_at, document FROM sbom_latest WHERE site_id = ?1 AND host_id = ?2",
            params![site_id, host_id],
            |r| {
                Ok(SbomRecord {
                    site_id: site_id.to_owned(),
                    host_id: host_id.to_owned(),
                    bundle_id: r.get(0)?,
                    seq: r.get::<_, i64>(1)?.max(0) as u64,
                    sha256: r.get(2)?,
                    components: r.get::<_, i64>(3)?.max(0) as u64,
                    received_at: ts(r.get(4)?),
                    document: r.get(5)?,
                })
            },
        )
        .optional()
        .map_err(db)
    }

    fn sbom_hosts(&self, caller: &Caller, query: &SbomQuery) -> Result<Vec<SbomMatch>> {
        check_query(query)?;
        let conn = self.reader()?;
        let (scoped, mut args) = scope(caller, "c.site_id", "s.reseller_id", "c.host_id");
        let mut sql = format!(
            "SELECT c.site_id, c.host_id, s.reseller_id, l.bundle_id, c.name, c.version, c.store_path \
             FROM sbom_components c \
             JOIN sbom_latest l ON l.site_id = c.site_id AND l.host_id = c.host_id \
             JOIN sites s ON s.site_id = c.site_id WHERE {scoped}"
        );
        if let Some(p) = &query.package {
            sql.push_str(" AND c.name = ?");
            args.push(SqlValue::Text(p.clone()));
        }
        if let Some(v) = &query.version {
            sql.push_str(" AND c.version = ?");
            args.push(SqlValue::Text(v.clone()));
        }
        if let Some(path) = &query.store_path {
            sql.push_str(" AND c.store_path = ?");
            args.push(SqlValue::Text(path.clone()));
        }
        sql.push_str(" ORDER BY c.site_id, c.host_id, c.store_path");
        let mut stmt = conn.prepare(&sql).map_err(db)?;
        stmt.query_map(params_from_iter(args), |r| {
            Ok(SbomMatch {
                site_id: r.get(0)?,
                host_id: r.get(1)?,
                reseller_id: r.get(2)?,
                bundle_id: r.get(3)?,
                component: SbomComponent {
                    name: r.get(4)?,
                    version: r.get(5)?,
                    store_path: r.get(6)?,
                },
            })
        })
        .map_err(db)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db)
    }
}
