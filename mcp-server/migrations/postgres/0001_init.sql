-- 0001: tenants, hosts, enrollment tokens, the bundle index, latest results,
-- orders, operators and the append-only audit log: the same tables and meaning as
-- migrations/sqlite/0001_init.sql. Times are Unix microseconds (BIGINT), so both
-- backends read and compare them alike.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    reseller_id TEXT,
    runbook_allowlist TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX sites_by_reseller ON sites (reseller_id);

CREATE TABLE hosts (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    host_id TEXT NOT NULL,
    evidence_pubkey_pem TEXT NOT NULL,
    cert_serial TEXT,
    enrolled_at BIGINT NOT NULL,
    revoked_at BIGINT,
    scan_interval_sec BIGINT NOT NULL,
    last_seen BIGINT,
    PRIMARY KEY (site_id, host_id)
);

CREATE TABLE enrollment_tokens (
    secret_hash BYTEA PRIMARY KEY,
    token_id TEXT NOT NULL UNIQUE,
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    uses_left BIGINT NOT NULL CHECK (uses_left >= 0),
    expires_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE bundles (
    bundle_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    seq BIGINT NOT NULL CHECK (seq >= 1),
    hash TEXT NOT NULL,
    prev_hash TEXT,
    check_name TEXT NOT NULL,
    outcome TEXT NOT NULL,
    timestamp_end BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
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
    timestamp_end BIGINT NOT NULL,
    PRIMARY KEY (site_id, host_id, check_name)
);

CREATE TABLE orders (
    -- Insertion order, the tie-break SQLite's rowid gives.
    row_order BIGINT GENERATED ALWAYS AS IDENTITY,
    order_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    runbook_id TEXT NOT NULL,
    params TEXT NOT NULL,
    ttl BIGINT NOT NULL,
    state TEXT NOT NULL,
    envelope TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    approved_by TEXT,
    result_bundle_id TEXT,
    result_outcome TEXT,
    result_error TEXT,
    answered_at BIGINT,
    FOREIGN KEY (site_id, host_id) REFERENCES hosts(site_id, host_id)
);
CREATE INDEX orders_by_host ON orders (site_id, host_id, runbook_id, created_at);

CREATE TABLE operators (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    tenants TEXT NOT NULL,
    token_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    disabled BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    peer TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER audit_no_update_or_delete BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
