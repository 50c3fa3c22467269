//! The SQLite side of `IncidentStore`: incidents, their timelines and site executor modes.

use jiff::Timestamp;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use serde_json::Value;

use super::{Cached, SqliteStore, db, micros, scope, ts};
use crate::auth::Caller;
use crate::store::incidents::{
    IncidentEvent, IncidentFilter, IncidentRecord, IncidentState, IncidentStore, Observation,
    Observed, PlanState, Resolution, severity_rank,
};
use crate::store::{Result, StoreError, require_sees};

const COLS: &str = "i.incident_id, i.site_id, i.host_id, i.cause, i.check_name, i.state, i.severity, \
    i.hipaa_controls, i.summary, i.recommended, i.opened_at, i.updated_at, i.resolved_at, \
    i.resolved_by, i.resolution, i.remediation_sec, i.event_count, i.plan_state, i.plan, \
    i.claimed_at, i.order_id";

fn json_opt(text: Option<String>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn incident_row(r: &Row<'_>) -> rusqlite::Result<IncidentRecord> {
    let state: String = r.get(5)?;
    let controls: String = r.get(7)?;
    let plan_state: String = r.get(17)?;
    Ok(IncidentRecord {
        incident_id: r.get(0)?,
        site_id: r.get(1)?,
        host_id: r.get(2)?,
        cause: r.get(3)?,
        check: r.get(4)?,
        state: IncidentState::parse(&state).unwrap_or(IncidentState::Open),
        severity: r.get(6)?,
        hipaa_controls: serde_json::from_str(&controls).unwrap_or_default(),
        summary: r.get(8)?,
        recommended: json_opt(r.get(9)?),
        opened_at: ts(r.get(10)?),
        updated_at: ts(r.get(11)?),
        resolved_at: r.get::<_, Option<i64>>(12)?.map(ts),
        resolved_by: r.get(13)?,
        resolution: r.get(14)?,
        remediation_sec: r.get::<_, Option<i64>>(15)?.map(|v| v.max(0) as u64),
        event_count: r.get::<_, i64>(16)?.max(0) as u64,
        plan_state: PlanState::parse(&plan_state).unwrap_or(PlanState::None),
        plan: json_opt(r.get(18)?),
        claimed_at: r.get::<_, Option<i64>>(19)?.map(ts),
        order_id: r.get(20)?,
    })
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<IncidentEvent> {
    Ok(IncidentEvent {
        id: r.get(0)?,
        incident_id: r.get(1)?,
        at: ts(r.get(2)?),
        kind: r.get(3)?,
        bundle_id: r.get(4)?,
        order_id: r.get(5)?,
        actor: r.get(6)?,
        detail: r.get(7)?,
    })
}

fn insert_event(conn: &Connection, incident_id: &str, e: &IncidentEvent) -> Result<()> {
    conn.cached_exec(
        "INSERT INTO incident_events (incident_id, at, kind, bundle_id, order_id, actor, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![incident_id, micros(e.at), e.kind, e.bundle_id, e.order_id, e.actor, e.detail],
    )
    .map_err(db)?;
    conn.cached_exec(
        "UPDATE incidents SET event_count = event_count + 1, updated_at = MAX(updated_at, ?2) WHERE incident_id = ?1",
        params![incident_id, micros(e.at)],
    )
    .map_err(db)?;
    Ok(())
}

fn open_of(
    conn: &Connection,
    site: &str,
    host: &str,
    cause: &str,
) -> Result<Option<IncidentRecord>> {
    conn.cached_row(
        &format!("SELECT {COLS} FROM incidents i WHERE i.site_id = ?1 AND i.host_id = ?2 AND i.cause = ?3 AND i.state = 'open'"),
        params![site, host, cause],
        incident_row,
    )
    .optional()
    .map_err(db)
}

fn by_id(conn: &Connection, id: &str) -> Result<Option<IncidentRecord>> {
    conn.cached_row(
        &format!("SELECT {COLS} FROM incidents i WHERE i.incident_id = ?1"),
        params![id],
        incident_row,
    )
    .optional()
    .map_err(db)
}

fn forbidden(e: crate::auth::AuthError) -> StoreError {
    StoreError::Forbidden(e.to_string())
}

impl SqliteStore {
    /// The incident if the caller sees its host.
    fn visible_incident(
        &self,
        conn: &Connection,
        caller: &Caller,
        id: &str,
    ) -> Result<IncidentRecord> {
        let found = by_id(conn, id)?;
        match found {
            Some(i)
                if self
                    .visible_host(conn, caller, &i.site_id, &i.host_id)
                    .is_ok() =>
            {
                Ok(i)
            }
            _ => Err(StoreError::NotFound(format!("incident {id}"))),
        }
    }
}

fn end(
    conn: &Connection,
    inc: &IncidentRecord,
    state: IncidentState,
    how: &Resolution,
) -> Result<()> {
    let secs = how.at.duration_since(inc.opened_at).as_secs().max(0);
    conn.cached_exec(
        "UPDATE incidents SET state = ?2, resolved_at = ?3, resolved_by = ?4, resolution = ?5, remediation_sec = ?6, plan_state = 'none', claimed_at = NULL WHERE incident_id = ?1 AND state = 'open'",
        params![inc.incident_id, state.as_str(), micros(how.at), how.by, how.reason, secs],
    )
    .map_err(db)?;
    insert_event(
        conn,
        &inc.incident_id,
        &IncidentEvent {
            id: 0,
            incident_id: inc.incident_id.clone(),
            at: how.at,
            kind: state.as_str().into(),
            bundle_id: how.bundle_id.clone(),
            order_id: None,
            actor: how.by.clone(),
            detail: how.reason.clone(),
        },
    )
}

impl IncidentStore for SqliteStore {
    fn observe(&self, caller: &Caller, obs: &Observation, new_id: &str) -> Result<Observed> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        self.visible_host(&tx, caller, &obs.site_id, &obs.host_id)?;
        if let Some(bundle) = &obs.bundle_id {
            let seen: Option<i64> = tx
                .cached_row(
                    "SELECT e.id FROM incident_events e JOIN incidents i ON i.incident_id = e.incident_id WHERE e.bundle_id = ?1 AND i.site_id = ?2 AND i.host_id = ?3 AND i.cause = ?4 LIMIT 1",
                    params![bundle, obs.site_id, obs.host_id, obs.cause],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            if seen.is_some() {
                return Ok(Observed::AlreadyApplied);
            }
        }
        let event = IncidentEvent {
            id: 0,
            incident_id: String::new(),
            at: obs.at,
            kind: obs.kind.clone(),
            bundle_id: obs.bundle_id.clone(),
            order_id: None,
            actor: caller.actor.clone(),
            detail: obs.detail.clone(),
        };
        let controls = serde_json::to_string(&obs.hipaa_controls).unwrap_or_else(|_| "[]".into());
        let recommended = obs.recommended.as_ref().map(Value::to_string);
        let outcome = match open_of(&tx, &obs.site_id, &obs.host_id, &obs.cause)? {
            Some(open) => {
                let severity = if severity_rank(&obs.severity) > severity_rank(&open.severity) {
                    obs.severity.clone()
                } else {
                    open.severity.clone()
                };
                tx.cached_exec(
                    "UPDATE incidents SET severity = ?2, summary = ?3, recommended = COALESCE(?4, recommended), hipaa_controls = ?5 WHERE incident_id = ?1",
                    params![open.incident_id, severity, obs.summary, recommended, controls],
                )
                .map_err(db)?;
                insert_event(&tx, &open.incident_id, &event)?;
                Observed::Updated(open.incident_id)
            }
            None => {
                tx.cached_exec(
                    "INSERT INTO incidents (incident_id, site_id, host_id, cause, check_name, state, severity, hipaa_controls, summary, recommended, opened_at, updated_at, event_count, plan_state)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'open', ?6, ?7, ?8, ?9, ?10, ?10, 0, 'wanted')",
                    params![new_id, obs.site_id, obs.host_id, obs.cause, obs.check, obs.severity, controls, obs.summary, recommended, micros(obs.at)],
                )
                .map_err(db)?;
                insert_event(&tx, new_id, &event)?;
                Observed::Opened(new_id.to_owned())
            }
        };
        tx.commit().map_err(db)?;
        Ok(outcome)
    }

    fn resolve_incident(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        cause: &str,
        how: &Resolution,
    ) -> Result<Option<String>> {
        // Most bundles resolve nothing: look on a reader first, so that intake takes the
        // one writer only for its group commit (and here only when there is an incident).
        {
            let reader = self.reader()?;
            self.visible_host(&reader, caller, site_id, host_id)?;
            if open_of(&reader, site_id, host_id, cause)?.is_none() {
                return Ok(None);
            }
        }
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        self.visible_host(&tx, caller, site_id, host_id)?;
        let Some(open) = open_of(&tx, site_id, host_id, cause)? else {
            return Ok(None);
        };
        end(&tx, &open, IncidentState::Resolved, how)?;
        tx.commit().map_err(db)?;
        Ok(Some(open.incident_id))
    }

    fn close_incident(
        &self,
        caller: &Caller,
        incident_id: &str,
        how: &Resolution,
    ) -> Result<IncidentRecord> {
        caller.require_write("close incidents").map_err(forbidden)?;
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let inc = self.visible_incident(&tx, caller, incident_id)?;
        if inc.state != IncidentState::Open {
            return Err(StoreError::Exists(format!(
                "incident {incident_id} is already {}",
                inc.state.as_str()
            )));
        }
        end(&tx, &inc, IncidentState::Closed, how)?;
        let closed = by_id(&tx, incident_id)?
            .ok_or_else(|| StoreError::Backend("the closed incident vanished".into()))?;
        tx.commit().map_err(db)?;
        Ok(closed)
    }

    fn incident(&self, caller: &Caller, incident_id: &str) -> Result<Option<IncidentRecord>> {
        let conn = self.reader()?;
        match self.visible_incident(&conn, caller, incident_id) {
            Ok(i) => Ok(Some(i)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn incidents(&self, caller: &Caller, filter: &IncidentFilter) -> Result<Vec<IncidentRecord>> {
        let conn = self.reader()?;
        let (clause, mut values) = scope(caller, "i.site_id", "s.reseller_id", "i.host_id");
        let mut sql = format!(
            "SELECT {COLS} FROM incidents i JOIN sites s ON s.site_id = i.site_id WHERE {clause}"
        );
        if let Some(state) = filter.state {
            sql.push_str(" AND i.state = ?");
            values.push(SqlValue::Text(state.as_str().into()));
        }
        if let Some(p) = filter.plan_state {
            sql.push_str(" AND i.plan_state = ?");
            values.push(SqlValue::Text(p.as_str().into()));
        }
        if let Some(site) = &filter.site_id {
            sql.push_str(" AND i.site_id = ?");
            values.push(SqlValue::Text(site.clone()));
        }
        if let Some(host) = &filter.host_id {
            sql.push_str(" AND i.host_id = ?");
            values.push(SqlValue::Text(host.clone()));
        }
        sql.push_str(" ORDER BY i.opened_at DESC, i.incident_id LIMIT ?");
        values.push(SqlValue::Integer(i64::from(filter.limit.unwrap_or(1000))));
        let mut stmt = conn.prepare(&sql).map_err(db)?;
        stmt.query_map(params_from_iter(values), incident_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn incident_events(&self, caller: &Caller, incident_id: &str) -> Result<Vec<IncidentEvent>> {
        let conn = self.reader()?;
        self.visible_incident(&conn, caller, incident_id)?;
        let mut stmt = conn
            .prepare("SELECT id, incident_id, at, kind, bundle_id, order_id, actor, detail FROM incident_events WHERE incident_id = ?1 ORDER BY id")
            .map_err(db)?;
        stmt.query_map(params![incident_id], event_row)
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)
    }

    fn add_incident_event(
        &self,
        caller: &Caller,
        incident_id: &str,
        event: &IncidentEvent,
    ) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        self.visible_incident(&tx, caller, incident_id)?;
        insert_event(&tx, incident_id, event)?;
        tx.commit().map_err(db)
    }

    fn set_incident_plan(
        &self,
        caller: &Caller,
        incident_id: &str,
        plan_state: PlanState,
        plan: Option<&Value>,
        order_id: Option<&str>,
    ) -> Result<()> {
        let conn = self.conn()?;
        self.visible_incident(&conn, caller, incident_id)?;
        let changed = conn
            .cached_exec(
                "UPDATE incidents SET plan_state = ?2, plan = COALESCE(?3, plan), order_id = COALESCE(?4, order_id), claimed_at = CASE WHEN ?2 = 'claimed' THEN claimed_at ELSE NULL END WHERE incident_id = ?1 AND state = 'open'",
                params![incident_id, plan_state.as_str(), plan.map(Value::to_string), order_id],
            )
            .map_err(db)?;
        if changed == 0 {
            return Err(StoreError::Exists(format!(
                "incident {incident_id} is no longer open"
            )));
        }
        Ok(())
    }

    fn claim_incidents(
        &self,
        caller: &Caller,
        limit: u32,
        now: Timestamp,
        stale_before: Timestamp,
    ) -> Result<Vec<IncidentRecord>> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let (clause, mut values) = scope(caller, "i.site_id", "s.reseller_id", "i.host_id");
        values.push(SqlValue::Integer(micros(stale_before)));
        values.push(SqlValue::Integer(i64::from(limit)));
        let ids: Vec<String> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT i.incident_id FROM incidents i JOIN sites s ON s.site_id = i.site_id WHERE {clause}
                     AND i.state = 'open' AND (i.plan_state = 'wanted' OR (i.plan_state = 'claimed' AND i.claimed_at < ?))
                     ORDER BY i.updated_at LIMIT ?"
                ))
                .map_err(db)?;
            stmt.query_map(params_from_iter(values), |r| r.get(0))
                .map_err(db)?
                .collect::<rusqlite::Result<_>>()
                .map_err(db)?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            tx.cached_exec(
                "UPDATE incidents SET plan_state = 'claimed', claimed_at = ?2 WHERE incident_id = ?1",
                params![id, micros(now)],
            )
            .map_err(db)?;
            if let Some(i) = by_id(&tx, &id)? {
                out.push(i);
            }
        }
        tx.commit().map_err(db)?;
        Ok(out)
    }

    fn incident_for_order(
        &self,
        caller: &Caller,
        order_id: &str,
    ) -> Result<Option<IncidentRecord>> {
        let conn = self.reader()?;
        let found = conn
            .cached_row(
                &format!("SELECT {COLS} FROM incidents i WHERE i.order_id = ?1 ORDER BY i.opened_at DESC LIMIT 1"),
                params![order_id],
                incident_row,
            )
            .optional()
            .map_err(db)?;
        Ok(found.filter(|i| {
            self.visible_host(&conn, caller, &i.site_id, &i.host_id)
                .is_ok()
        }))
    }

    fn site_executor_mode(&self, caller: &Caller, site_id: &str) -> Result<Option<String>> {
        let conn = self.reader()?;
        let site = Self::site_in(&conn, site_id)?
            .ok_or_else(|| StoreError::NotFound(format!("site {site_id}")))?;
        require_sees(caller, &site, &format!("site {site_id}"))?;
        conn.cached_row(
            "SELECT executor_mode FROM sites WHERE site_id = ?1",
            params![site_id],
            |r| r.get(0),
        )
        .map_err(db)
    }

    fn set_site_executor_mode(
        &self,
        caller: &Caller,
        site_id: &str,
        mode: Option<&str>,
    ) -> Result<()> {
        caller
            .require_write("set a site's executor mode")
            .map_err(forbidden)?;
        let conn = self.conn()?;
        let site = Self::site_in(&conn, site_id)?
            .ok_or_else(|| StoreError::NotFound(format!("site {site_id}")))?;
        require_sees(caller, &site, &format!("site {site_id}"))?;
        conn.cached_exec(
            "UPDATE sites SET executor_mode = ?2 WHERE site_id = ?1",
            params![site_id, mode],
        )
        .map_err(db)?;
        Ok(())
    }

    fn min_seq(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Option<u64>> {
        let conn = self.reader()?;
        self.visible_host(&conn, caller, site_id, host_id)?;
        conn.cached_row(
            "SELECT MIN(seq) FROM bundles WHERE site_id = ?1 AND host_id = ?2",
            params![site_id, host_id],
            |r| r.get::<_, Option<i64>>(0),
        )
        .map(|v| v.map(|s| s.max(0) as u64))
        .map_err(db)
    }
}
