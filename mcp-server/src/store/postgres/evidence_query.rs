//! [`EvidenceQuery`] on PostgreSQL.

use super::{
    BUNDLE_COLS, Param, PostgresStore, bundle_row, db, micros, refs, rows, seq_sql, visible_host,
};
use crate::auth::Caller;
use crate::store::evidence_query::{EvidenceFilter, EvidenceQuery, check_limit};
use crate::store::{BundleRecord, Result};

impl EvidenceQuery for PostgresStore {
    fn evidence(&self, caller: &Caller, filter: &EvidenceFilter) -> Result<Vec<BundleRecord>> {
        check_limit(filter.limit)?;
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, &filter.site_id, &filter.host_id, false)?;
        let mut sql =
            format!("SELECT {BUNDLE_COLS} FROM bundles WHERE site_id = $1 AND host_id = $2");
        let mut args: Vec<Param> = vec![
            Box::new(filter.site_id.clone()),
            Box::new(filter.host_id.clone()),
        ];
        let mut push = |sql: &mut String, clause: &str, value: Param| {
            args.push(value);
            sql.push_str(&format!(" AND {clause} ${}", args.len()));
        };
        if let Some(check) = &filter.check {
            push(&mut sql, "check_name =", Box::new(check.clone()));
        }
        if let Some(outcome) = &filter.outcome {
            push(&mut sql, "outcome =", Box::new(outcome.clone()));
        }
        if let Some(since) = filter.since {
            push(&mut sql, "timestamp_end >=", Box::new(micros(since)));
        }
        if let Some(until) = filter.until {
            push(&mut sql, "timestamp_end <", Box::new(micros(until)));
        }
        if let Some(before) = filter.before_seq {
            push(&mut sql, "seq <", Box::new(seq_sql(before)?));
        }
        args.push(Box::new(i64::from(filter.limit)));
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", args.len()));
        let found = conn.query(&sql, &refs(&args)).map_err(db)?;
        rows(found, bundle_row)
    }
}
