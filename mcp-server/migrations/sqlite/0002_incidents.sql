-- 0002: incidents opened from what the boxes report, their timelines, and each
-- site's executor mode. Times are Unix microseconds. Released migrations are never
-- edited; changes go into a new file.

-- NULL: the configured default (remediation.default_site_mode).
ALTER TABLE sites ADD COLUMN executor_mode TEXT;

CREATE TABLE incidents (
    incident_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    -- check:<name>, chain_gap, chain_break, bad_signature or overdue
    cause TEXT NOT NULL,
    check_name TEXT,
    -- open, resolved (later evidence compliant) or closed (by an operator)
    state TEXT NOT NULL,
    severity TEXT NOT NULL,
    hipaa_controls TEXT NOT NULL,
    summary TEXT NOT NULL,
    -- the box's recommended fix, JSON {"runbook": ..., "params": ...}
    recommended TEXT,
    opened_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    resolved_at INTEGER,
    resolved_by TEXT,
    resolution TEXT,
    remediation_sec INTEGER,
    event_count INTEGER NOT NULL,
    -- wanted, claimed, awaiting_operator, ordered, refused, failed, off or none
    plan_state TEXT NOT NULL,
    plan TEXT,
    claimed_at INTEGER,
    order_id TEXT,
    FOREIGN KEY (site_id, host_id) REFERENCES hosts(site_id, host_id)
);
-- One open incident per host and cause.
CREATE UNIQUE INDEX incidents_one_open ON incidents (site_id, host_id, cause) WHERE state = 'open';
CREATE INDEX incidents_by_plan ON incidents (plan_state, state);
CREATE INDEX incidents_by_order ON incidents (order_id);
CREATE INDEX incidents_by_opened ON incidents (opened_at);

CREATE TABLE incident_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL REFERENCES incidents(incident_id),
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    bundle_id TEXT,
    order_id TEXT,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX incident_events_by_incident ON incident_events (incident_id, id);
CREATE INDEX incident_events_by_bundle ON incident_events (bundle_id);
