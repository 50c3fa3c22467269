-- 0003: the transparency log (docs/tlog.md): the same tables and meaning as
-- migrations/sqlite/0003_transparency_log.sql. Every accepted bundle is queued for the
-- sequencer by a trigger in the intake's own transaction; the sequencer (under a row
-- lock on tlog_head, so one process at a time) appends queued bundles as leaves, keeps
-- the hash of every complete subtree, and signs a checkpoint of each new tree size.
-- Leaves, nodes and checkpoints refuse UPDATE, DELETE and TRUNCATE.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE tlog_queue (
    id BIGSERIAL PRIMARY KEY,
    bundle_id TEXT NOT NULL UNIQUE
);

CREATE TABLE tlog_leaves (
    leaf_index BIGINT PRIMARY KEY CHECK (leaf_index >= 0),
    bundle_id TEXT NOT NULL UNIQUE,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    leaf_hash BYTEA NOT NULL,
    sequenced_at BIGINT NOT NULL
);
CREATE INDEX tlog_leaves_by_hash ON tlog_leaves (leaf_hash);
CREATE INDEX tlog_leaves_by_host ON tlog_leaves (site_id, host_id, seq);

CREATE TABLE tlog_nodes (
    level INTEGER NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TABLE tlog_checkpoints (
    tree_size BIGINT PRIMARY KEY,
    root BYTEA NOT NULL,
    note TEXT NOT NULL,
    signed_at BIGINT NOT NULL
);

CREATE TABLE tlog_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    tree_size BIGINT NOT NULL
);
INSERT INTO tlog_head (id, tree_size) VALUES (1, 0);

CREATE FUNCTION tlog_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tlog_queue (bundle_id) VALUES (NEW.bundle_id) ON CONFLICT DO NOTHING;
    RETURN NEW;
END;
$$;
CREATE TRIGGER tlog_enqueue AFTER INSERT ON bundles
    FOR EACH ROW EXECUTE FUNCTION tlog_enqueue();

INSERT INTO tlog_queue (bundle_id) SELECT bundle_id FROM bundles ORDER BY received_at, bundle_id;

CREATE FUNCTION tlog_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the transparency log is append-only';
END;
$$;
CREATE TRIGGER tlog_leaves_append_only BEFORE UPDATE OR DELETE ON tlog_leaves
    FOR EACH ROW EXECUTE FUNCTION tlog_append_only();
CREATE TRIGGER tlog_leaves_no_truncate BEFORE TRUNCATE ON tlog_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION tlog_append_only();
CREATE TRIGGER tlog_nodes_append_only BEFORE UPDATE OR DELETE ON tlog_nodes
    FOR EACH ROW EXECUTE FUNCTION tlog_append_only();
CREATE TRIGGER tlog_nodes_no_truncate BEFORE TRUNCATE ON tlog_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION tlog_append_only();
CREATE TRIGGER tlog_checkpoints_append_only BEFORE UPDATE OR DELETE ON tlog_checkpoints
    FOR EACH ROW EXECUTE FUNCTION tlog_append_only();
CREATE TRIGGER tlog_checkpoints_no_truncate BEFORE TRUNCATE ON tlog_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION tlog_append_only();
