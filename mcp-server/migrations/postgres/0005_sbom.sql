-- 0005: the latest SBOM of each host (the CycloneDX document the signed sbom bundle
-- names by SHA-256) and its components, indexed by package name and store path.
-- The same tables and meaning as migrations/sqlite/0005_sbom.sql; times are Unix microseconds.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE sbom_latest (
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    bundle_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    components BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    document BYTEA NOT NULL,
    PRIMARY KEY (site_id, host_id),
    FOREIGN KEY (site_id, host_id) REFERENCES hosts(site_id, host_id)
);

CREATE TABLE sbom_components (
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    store_path TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT,
    PRIMARY KEY (site_id, host_id, store_path),
    FOREIGN KEY (site_id, host_id) REFERENCES sbom_latest(site_id, host_id) ON DELETE CASCADE
);
CREATE INDEX sbom_components_by_name ON sbom_components (name, version);
CREATE INDEX sbom_components_by_path ON sbom_components (store_path);
