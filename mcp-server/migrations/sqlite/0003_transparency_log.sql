-- 0003: the transparency log (docs/tlog.md). Every accepted bundle is queued for the
-- sequencer by a trigger in the intake's own transaction; the sequencer appends queued
-- bundles as leaves, keeps the hash of every complete subtree (one row per node), and
-- signs a checkpoint of each new tree size. The log only grows: leaves, nodes and
-- checkpoints refuse UPDATE and DELETE.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE tlog_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bundle_id TEXT NOT NULL UNIQUE
);

CREATE TABLE tlog_leaves (
    leaf_index INTEGER PRIMARY KEY,
    bundle_id TEXT NOT NULL UNIQUE,
    site_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    leaf_hash BLOB NOT NULL,
    sequenced_at INTEGER NOT NULL
);
CREATE INDEX tlog_leaves_by_hash ON tlog_leaves (leaf_hash);
CREATE INDEX tlog_leaves_by_host ON tlog_leaves (site_id, host_id, seq);

CREATE TABLE tlog_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

CREATE TABLE tlog_checkpoints (
    tree_size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    signed_at INTEGER NOT NULL
);

-- The head: one row, the size the nodes cover (the sequencer's lock on PostgreSQL).
CREATE TABLE tlog_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    tree_size INTEGER NOT NULL
);
INSERT INTO tlog_head (id, tree_size) VALUES (1, 0);

CREATE TRIGGER tlog_enqueue AFTER INSERT ON bundles
BEGIN INSERT OR IGNORE INTO tlog_queue (bundle_id) VALUES (NEW.bundle_id); END;

-- Bundles accepted before this migration, in the order they were received.
INSERT INTO tlog_queue (bundle_id) SELECT bundle_id FROM bundles ORDER BY received_at, bundle_id;

CREATE TRIGGER tlog_leaves_no_update BEFORE UPDATE ON tlog_leaves
BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END;
CREATE TRIGGER tlog_leaves_no_delete BEFORE DELETE ON tlog_leaves
BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END;
CREATE TRIGGER tlog_nodes_no_update BEFORE UPDATE ON tlog_nodes
BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END;
CREATE TRIGGER tlog_nodes_no_delete BEFORE DELETE ON tlog_nodes
BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END;
CREATE TRIGGER tlog_checkpoints_no_update BEFORE UPDATE ON tlog_checkpoints
BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END;
CREATE TRIGGER tlog_checkpoints_no_delete BEFORE DELETE ON tlog_checkpoints
BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END;
