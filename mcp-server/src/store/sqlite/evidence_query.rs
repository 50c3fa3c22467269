//! [`EvidenceQuery`] on SQLite.

use rusqlite::params_from_iter;
use rusqlite::types::Value as SqlValue;

use super::{BUNDLE_COLS, SqliteStore, bundle_row, db, micros, seq_sql};
use crate::auth::Caller;
use crate::store::evidence_query::{EvidenceFilter, EvidenceQuery, check_limit};
use crate::store::{BundleRecord, Result};

impl EvidenceQuery for SqliteStore {
    fn evidence(&self, caller: &Caller, filter: &EvidenceFilter) -> Result<Vec<BundleRecord>> {
        check_limit(filter.limit)?;
        let conn = self.conn()?;
        self.visible_host(&conn, caller, &filter.site_id, &filter.host_id)?;
        let mut sql =
            format!("SELECT {BUNDLE_COLS} FROM bundles WHERE site_id = ? AND host_id = ?");
        let mut args = vec![
            SqlValue::Text(filter.site_id.clone()),
            SqlValue::Text(filter.host_id.clone()),
        ];
        if let Some(check) = &filter.check {
            sql.push_str(" AND check_name = ?");
            args.push(SqlValue::Text(check.clone()));
        }
        if let Some(outcome) = &filter.outcome {
            sql.push_str(" AND outcome = ?");
            args.push(SqlValue::Text(outcome.clone()));
        }
        if let Some(since) = filter.since {
            sql.push_str(" AND timestamp_end >= ?");
            args.push(SqlValue::Integer(micros(since)));
        }
        if let Some(until) = filter.until {
            sql.push_str(" AND timestamp_end < ?");
            args.push(SqlValue::Integer(micros(until)));
        }
        if let Some(before) = filter.before_seq {
            sql.push_str(" AND seq < ?");
            args.push(SqlValue::Integer(seq_sql(before)?));
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        args.push(SqlValue::Integer(i64::from(filter.limit)));
        let mut stmt = conn.prepare(&sql).map_err(db)?;
        stmt.query_map(params_from_iter(args), bundle_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }
}
