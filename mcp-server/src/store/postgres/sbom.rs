//! [`SbomStore`] on PostgreSQL.

use super::{
    Param, PostgresStore, db, micros, refs, rows, scope, seq_sql, ts, unsigned, visible_host,
};
use crate::auth::{Caller, Role};
use crate::store::sbom::{SbomComponent, SbomMatch, SbomQuery, SbomRecord, SbomStore, check_query};
use crate::store::{Result, StoreError};

impl SbomStore for PostgresStore {
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
        let mut tx = conn.transaction().map_err(db)?;
        // The host's row lock: one writer of this host's SBOM at a time, in any process.
        visible_host(&mut tx, caller, &record.site_id, &record.host_id, true)?;
        let current = tx
            .query_opt(
                "SELECT seq FROM sbom_latest WHERE site_id = $1 AND host_id = $2",
                &[&record.site_id, &record.host_id],
            )
            .map_err(db)?
            .map(|r| r.get::<_, i64>(0));
        let seq = seq_sql(record.seq)?;
        if current.is_some_and(|c| c > seq) {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM sbom_components WHERE site_id = $1 AND host_id = $2",
            &[&record.site_id, &record.host_id],
        )
        .map_err(db)?;
        tx.execute(
            "DELETE FROM sbom_latest WHERE site_id = $1 AND host_id = $2",
            &[&record.site_id, &record.host_id],
        )
        .map_err(db)?;
        tx.execute(
            "INSERT INTO sbom_latest (site_id, host_id, bundle_id, seq, sha256, components, received_at, document) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &record.site_id,
                &record.host_id,
                &record.bundle_id,
                &seq,
                &record.sha256,
                &(components.len() as i64),
                &micros(record.received_at),
                &record.document,
            ],
        )
        .map_err(db)?;
        let insert = tx
            .prepare(
                "INSERT INTO sbom_components (site_id, host_id, store_path, name, version) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .map_err(db)?;
        for c in components {
            tx.execute(
                &insert,
                &[
                    &record.site_id,
                    &record.host_id,
                    &c.store_path,
                    &c.name,
                    &c.version,
                ],
            )
            .map_err(db)?;
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
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let row = conn
            .query_opt(
                "SELECT bundle_id, seq, sha256, components, received_at, document FROM sbom_latest WHERE site_id = $1 AND host_id = $2",
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        Ok(row.map(|r| SbomRecord {
            site_id: site_id.to_owned(),
            host_id: host_id.to_owned(),
            bundle_id: r.get(0),
            seq: unsigned(r.get(1)),
            sha256: r.get(2),
            components: unsigned(r.get(3)),
            received_at: ts(r.get(4)),
            document: r.get(5),
        }))
    }

    fn sbom_hosts(&self, caller: &Caller, query: &SbomQuery) -> Result<Vec<SbomMatch>> {
        check_query(query)?;
        let mut conn = self.conn()?;
        let (scoped, mut args): (String, Vec<Param>) =
            scope(caller, "c.site_id", "s.reseller_id", "c.host_id", 1);
        let mut sql = format!(
            "SELECT c.site_id, c.host_id, s.reseller_id, l.bundle_id, c.name, c.version, c.store_path \
             FROM sbom_components c \
             JOIN sbom_latest l ON l.site_id = c.site_id AND l.host_id = c.host_id \
             JOIN sites s ON s.site_id = c.site_id WHERE {scoped}"
        );
        let mut push = |sql: &mut String, clause: &str, value: Param| {
            args.push(value);
            sql.push_str(&format!(" AND {clause} ${}", args.len()));
        };
        if let Some(p) = &query.package {
            push(&mut sql, "c.name =", Box::new(p.clone()));
        }
        if let Some(v) = &query.version {
            push(&mut sql, "c.version =", Box::new(v.clone()));
        }
        if let Some(path) = &query.store_path {
            push(&mut sql, "c.store_path =", Box::new(path.clone()));
        }
        sql.push_str(" ORDER BY c.site_id, c.host_id, c.store_path");
        let found = conn.query(&sql, &refs(&args)).map_err(db)?;
        rows(found, |r| {
            Ok(SbomMatch {
                site_id: r.try_get(0)?,
                host_id: r.try_get(1)?,
                reseller_id: r.try_get(2)?,
                bundle_id: r.try_get(3)?,
                component: SbomComponent {
                    name: r.try_get(4)?,
                    version: r.try_get(5)?,
                    store_path: r.try_get(6)?,
                },
            })
        })
    }
}
