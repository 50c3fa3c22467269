-- 0001: tenants, hosts, enrollment tokens, the bundle index, latest results,
-- orders, operators and the append-only audit log. Times are Unix microseconds.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    reseller_id TEXT,
    runbook_allowlist TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE hosts (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    host_id TEXT NOT NULL,
    evidence_pubkey_pem TEXT NOT NULL,
    cert_serial TEXT,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    scan_interval_sec INTEGER NOT NULL,
    last_seen INTEGER,
    PRIMARY KEY (site_id, host_id)
);

CREATE TABLE enrollment_tokens (
    secret_hash BLOB PRIMARY KEY,
    token_id TEXT NOT NULL UNIQUE,
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    uses_left INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE bundles (
    bundle_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    prev_hash TEXT,
    check_name TEXT NOT NULL,
    outcome TEXT NOT NULL,
    timestamp_end INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    archive_key TEXT NOT NULL,
    order_id TEXT,
    UNIQUE (site_id, host_id, seq),
    FOREIGN KEY (site_id, host_id) REFERENCES hosts(site_id, host_id)
);

CREATE TABLE latest_results (
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    check_name TEXT NOT NULL,
    outcome TEXT NOT NULL,
    bundle_id TEXT NOT NULL,
    timestamp_end INTEGER NOT NULL,
    PRIMARY KEY (site_id, host_id, check_name)
);

CREATE TABLE orders (
    order_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    runbook_id TEXT NOT NULL,
    params TEXT NOT NULL,
    ttl INTEGER NOT NULL,
    state TEXT NOT NULL,
    envelope TEXT,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    approved_by TEXT,
    result_bundle_id TEXT,
    result_outcome TEXT,
    result_error TEXT,
    answered_at INTEGER,
    FOREIGN KEY (site_id, host_id) REFERENCES hosts(site_id, host_id)
);
CREATE INDEX orders_by_host ON orders (site_id, host_id, runbook_id, created_at);

CREATE TABLE operators (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    tenants TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    peer TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
