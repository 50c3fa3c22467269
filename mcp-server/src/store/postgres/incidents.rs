//! The PostgreSQL side of `IncidentStore`. Writers of one host's incidents serialise on
//! the host's row lock (as bundles do), and planners in several processes take work
//! with `FOR UPDATE SKIP LOCKED`, so each incident is planned by one of them.

use jiff::Timestamp;
use postgres::{GenericClient, Row};
use serde_json::Value;

use super::{Param, PostgresStore, db, forbidden, micros, refs, scope, site_in, ts, visible_host};
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

fn incident_row(r: &Row) -> std::result::Result<IncidentRecord, postgres::Error> {
    let state: String = r.try_get(5)?;
    let controls: String = r.try_get(7)?;
    let plan_state: String = r.try_get(17)?;
    Ok(IncidentRecord {
        incident_id: r.try_get(0)?,
        site_id: r.try_get(1)?,
        host_id: r.try_get(2)?,
        cause: r.try_get(3)?,
        check: r.try_get(4)?,
        state: IncidentState::parse(&state).unwrap_or(IncidentState::Open),
        severity: r.try_get(6)?,
        hipaa_controls: serde_json::from_str(&controls).unwrap_or_default(),
        summary: r.try_get(8)?,
        recommended: json_opt(r.try_get(9)?),
        opened_at: ts(r.try_get(10)?),
        updated_at: ts(r.try_get(11)?),
        resolved_at: r.try_get::<_, Option<i64>>(12)?.map(ts),
        resolved_by: r.try_get(13)?,
        resolution: r.try_get(14)?,
        remediation_sec: r
            .try_get::<_, Option<i64>>(15)?
            .map(|v| u64::try_from(v).unwrap_or(0)),
        event_count: u64::try_from(r.try_get::<_, i64>(16)?).unwrap_or(0),
        plan_state: PlanState::parse(&plan_state).unwrap_or(PlanState::None),
        plan: json_opt(r.try_get(18)?),
        claimed_at: r.try_get::<_, Option<i64>>(19)?.map(ts),
        order_id: r.try_get(20)?,
    })
}

fn event_row(r: &Row) -> std::result::Result<IncidentEvent, postgres::Error> {
    Ok(IncidentEvent {
        id: r.try_get(0)?,
        incident_id: r.try_get(1)?,
        at: ts(r.try_get(2)?),
        kind: r.try_get(3)?,
        bundle_id: r.try_get(4)?,
        order_id: r.try_get(5)?,
        actor: r.try_get(6)?,
        detail: r.try_get(7)?,
    })
}

fn insert_event(c: &mut impl GenericClient, incident_id: &str, e: &IncidentEvent) -> Result<()> {
    c.execute(
        "INSERT INTO incident_events (incident_id, at, kind, bundle_id, order_id, actor, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&incident_id, &micros(e.at), &e.kind, &e.bundle_id, &e.order_id, &e.actor, &e.detail],
    )
    .map_err(db)?;
    c.execute(
        "UPDATE incidents SET event_count = event_count + 1, updated_at = GREATEST(updated_at, $2) WHERE incident_id = $1",
        &[&incident_id, &micros(e.at)],
    )
    .map_err(db)?;
    Ok(())
}

fn open_of(
    c: &mut impl GenericClient,
    site: &str,
    host: &str,
    cause: &str,
) -> Result<Option<IncidentRecord>> {
    let row = c
        .query_opt(
            &format!("SELECT {COLS} FROM incidents i WHERE i.site_id = $1 AND i.host_id = $2 AND i.cause = $3 AND i.state = 'open'"),
            &[&site, &host, &cause],
        )
        .map_err(db)?;
    row.map(|r| incident_row(&r)).transpose().map_err(db)
}

fn by_id(c: &mut impl GenericClient, id: &str, lock: bool) -> Result<Option<IncidentRecord>> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {COLS} FROM incidents i WHERE i.incident_id = $1{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &[&id],
        )
        .map_err(db)?;
    row.map(|r| incident_row(&r)).transpose().map_err(db)
}

/// The incident if the caller sees its host.
fn visible_incident(
    c: &mut impl GenericClient,
    caller: &Caller,
    id: &str,
    lock: bool,
) -> Result<IncidentRecord> {
    match by_id(c, id, lock)? {
        Some(i) if visible_host(c, caller, &i.site_id, &i.host_id, false).is_ok() => Ok(i),
        _ => Err(StoreError::NotFound(format!("incident {id}"))),
    }
}

fn end(
    c: &mut impl GenericClient,
    inc: &IncidentRecord,
    state: IncidentState,
    how: &Resolution,
) -> Result<()> {
    let secs = how.at.duration_since(inc.opened_at).as_secs().max(0);
    c.execute(
        "UPDATE incidents SET state = $2, resolved_at = $3, resolved_by = $4, resolution = $5, remediation_sec = $6, plan_state = 'none', claimed_at = NULL WHERE incident_id = $1 AND state = 'open'",
        &[&inc.incident_id, &state.as_str(), &micros(how.at), &how.by, &how.reason, &secs],
    )
    .map_err(db)?;
    insert_event(
        c,
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

impl IncidentStore for PostgresStore {
    fn observe(&self, caller: &Caller, obs: &Observation, new_id: &str) -> Result<Observed> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        // The host's row lock: one writer of this host's incidents at a time, in any process.
        visible_host(&mut tx, caller, &obs.site_id, &obs.host_id, true)?;
        if let Some(bundle) = &obs.bundle_id {
            let seen = tx
                .query_opt(
                    "SELECT e.id FROM incident_events e JOIN incidents i ON i.incident_id = e.incident_id WHERE e.bundle_id = $1 AND i.site_id = $2 AND i.host_id = $3 AND i.cause = $4 LIMIT 1",
                    &[bundle, &obs.site_id, &obs.host_id, &obs.cause],
                )
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
        let outcome = match open_of(&mut tx, &obs.site_id, &obs.host_id, &obs.cause)? {
            Some(open) => {
                let severity = if severity_rank(&obs.severity) > severity_rank(&open.severity) {
                    obs.severity.clone()
                } else {
                    open.severity.clone()
                };
                tx.execute(
                    "UPDATE incidents SET severity = $2, summary = $3, recommended = COALESCE($4, recommended), hipaa_controls = $5 WHERE incident_id = $1",
                    &[&open.incident_id, &severity, &obs.summary, &recommended, &controls],
                )
                .map_err(db)?;
                insert_event(&mut tx, &open.incident_id, &event)?;
                Observed::Updated(open.incident_id)
            }
            None => {
                tx.execute(
                    "INSERT INTO incidents (incident_id, site_id, host_id, cause, check_name, state, severity, hipaa_controls, summary, recommended, opened_at, updated_at, event_count, plan_state)
                     VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $8, $9, $10, $10, 0, 'wanted')",
                    &[&new_id, &obs.site_id, &obs.host_id, &obs.cause, &obs.check, &obs.severity, &controls, &obs.summary, &recommended, &micros(obs.at)],
                )
                .map_err(db)?;
                insert_event(&mut tx, new_id, &event)?;
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
        let mut conn = self.conn()?;
        // Most bundles resolve nothing: look before taking the host's lock.
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        if open_of(&mut *conn, site_id, host_id, cause)?.is_none() {
            return Ok(None);
        }
        let mut tx = conn.transaction().map_err(db)?;
        visible_host(&mut tx, caller, site_id, host_id, true)?;
        let Some(open) = open_of(&mut tx, site_id, host_id, cause)? else {
            return Ok(None);
        };
        end(&mut tx, &open, IncidentState::Resolved, how)?;
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
        let mut tx = conn.transaction().map_err(db)?;
        let inc = visible_incident(&mut tx, caller, incident_id, true)?;
        if inc.state != IncidentState::Open {
            return Err(StoreError::Exists(format!(
                "incident {incident_id} is already {}",
                inc.state.as_str()
            )));
        }
        end(&mut tx, &inc, IncidentState::Closed, how)?;
        let closed = by_id(&mut tx, incident_id, false)?
            .ok_or_else(|| StoreError::Backend("the closed incident vanished".into()))?;
        tx.commit().map_err(db)?;
        Ok(closed)
    }

    fn incident(&self, caller: &Caller, incident_id: &str) -> Result<Option<IncidentRecord>> {
        let mut conn = self.conn()?;
        match visible_incident(&mut *conn, caller, incident_id, false) {
            Ok(i) => Ok(Some(i)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn incidents(&self, caller: &Caller, filter: &IncidentFilter) -> Result<Vec<IncidentRecord>> {
        let mut conn = self.conn()?;
        let (clause, mut values) = scope(caller, "i.site_id", "s.reseller_id", "i.host_id", 1);
        let mut sql = format!(
            "SELECT {COLS} FROM incidents i JOIN sites s ON s.site_id = i.site_id WHERE {clause}"
        );
        let mut push = |sql: &mut String, col: &str, v: Param| {
            values.push(v);
            sql.push_str(&format!(" AND {col} = ${}", values.len()));
        };
        if let Some(state) = filter.state {
            push(&mut sql, "i.state", Box::new(state.as_str().to_owned()));
        }
        if let Some(p) = filter.plan_state {
            push(&mut sql, "i.plan_state", Box::new(p.as_str().to_owned()));
        }
        if let Some(site) = &filter.site_id {
            push(&mut sql, "i.site_id", Box::new(site.clone()));
        }
        if let Some(host) = &filter.host_id {
            push(&mut sql, "i.host_id", Box::new(host.clone()));
        }
        values.push(Box::new(i64::from(filter.limit.unwrap_or(1000))));
        sql.push_str(&format!(
            " ORDER BY i.opened_at DESC, i.incident_id LIMIT ${}",
            values.len()
        ));
        let rows = conn.query(&sql, &refs(&values)).map_err(db)?;
        super::rows(rows, incident_row)
    }

    fn incident_events(&self, caller: &Caller, incident_id: &str) -> Result<Vec<IncidentEvent>> {
        let mut conn = self.conn()?;
        visible_incident(&mut *conn, caller, incident_id, false)?;
        let rows = conn
            .query(
                "SELECT id, incident_id, at, kind, bundle_id, order_id, actor, detail FROM incident_events WHERE incident_id = $1 ORDER BY id",
                &[&incident_id],
            )
            .map_err(db)?;
        super::rows(rows, event_row)
    }

    fn add_incident_event(
        &self,
        caller: &Caller,
        incident_id: &str,
        event: &IncidentEvent,
    ) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        visible_incident(&mut tx, caller, incident_id, true)?;
        insert_event(&mut tx, incident_id, event)?;
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
        let mut conn = self.conn()?;
        visible_incident(&mut *conn, caller, incident_id, false)?;
        let plan = plan.map(Value::to_string);
        let changed = conn
            .execute(
                "UPDATE incidents SET plan_state = $2, plan = COALESCE($3, plan), order_id = COALESCE($4, order_id), claimed_at = CASE WHEN $2 = 'claimed' THEN claimed_at ELSE NULL END WHERE incident_id = $1 AND state = 'open'",
                &[&incident_id, &plan_state.as_str(), &plan, &order_id],
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
        let (clause, mut values) = scope(caller, "c.site_id", "s.reseller_id", "c.host_id", 1);
        let n = values.len();
        values.push(Box::new(micros(now)));
        values.push(Box::new(micros(stale_before)));
        values.push(Box::new(i64::from(limit)));
        let sql = format!(
            "UPDATE incidents AS i SET plan_state = 'claimed', claimed_at = ${now_p}
             WHERE i.incident_id IN (
                 SELECT c.incident_id FROM incidents c JOIN sites s ON s.site_id = c.site_id
                 WHERE {clause} AND c.state = 'open'
                   AND (c.plan_state = 'wanted' OR (c.plan_state = 'claimed' AND c.claimed_at < ${stale_p}))
                 ORDER BY c.updated_at LIMIT ${limit_p}
                 FOR UPDATE OF c SKIP LOCKED)
             RETURNING {COLS}",
            now_p = n + 1,
            stale_p = n + 2,
            limit_p = n + 3,
        );
        let rows = conn.query(&sql, &refs(&values)).map_err(db)?;
        super::rows(rows, incident_row)
    }

    fn incident_for_order(
        &self,
        caller: &Caller,
        order_id: &str,
    ) -> Result<Option<IncidentRecord>> {
        let mut conn = self.conn()?;
        let row = conn
            .query_opt(
                &format!("SELECT {COLS} FROM incidents i WHERE i.order_id = $1 ORDER BY i.opened_at DESC LIMIT 1"),
                &[&order_id],
            )
            .map_err(db)?;
        let Some(found) = row.map(|r| incident_row(&r)).transpose().map_err(db)? else {
            return Ok(None);
        };
        Ok(
            visible_host(&mut *conn, caller, &found.site_id, &found.host_id, false)
                .is_ok()
                .then_some(found),
        )
    }

    fn site_executor_mode(&self, caller: &Caller, site_id: &str) -> Result<Option<String>> {
        let mut conn = self.conn()?;
        let site = site_in(&mut *conn, site_id, false)?
            .ok_or_else(|| StoreError::NotFound(format!("site {site_id}")))?;
        require_sees(caller, &site, &format!("site {site_id}"))?;
        let row = conn
            .query_one(
                "SELECT executor_mode FROM sites WHERE site_id = $1",
                &[&site_id],
            )
            .map_err(db)?;
        row.try_get(0).map_err(db)
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
        let mut conn = self.conn()?;
        let site = site_in(&mut *conn, site_id, false)?
            .ok_or_else(|| StoreError::NotFound(format!("site {site_id}")))?;
        require_sees(caller, &site, &format!("site {site_id}"))?;
        conn.execute(
            "UPDATE sites SET executor_mode = $2 WHERE site_id = $1",
            &[&site_id, &mode],
        )
        .map_err(db)?;
        Ok(())
    }

    fn min_seq(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Option<u64>> {
        let mut conn = self.conn()?;
        visible_host(&mut *conn, caller, site_id, host_id, false)?;
        let row = conn
            .query_one(
                "SELECT MIN(seq) FROM bundles WHERE site_id = $1 AND host_id = $2",
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        Ok(row
            .try_get::<_, Option<i64>>(0)
            .map_err(db)?
            .map(|s| u64::try_from(s).unwrap_or(0)))
    }
}
