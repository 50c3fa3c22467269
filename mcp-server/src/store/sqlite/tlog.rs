//! The transparency log on SQLite: sequencing in an IMMEDIATE transaction (the
//! database's write lock, shared by every process on the file), reads on the
//! store's connection.

use compliance_agent::tlog::{Hash, NodeId};
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Cached, SqliteStore, db, micros, ts};
use crate::auth::Caller;
use crate::store::Result;
use crate::store::tlog::{
    CheckpointSigner, LeafLookup, LogLeaf, LogStore, LogTx, Queued, QueuedBundle, SignedCheckpoint,
    hash_col, index_sql, sequence_in,
};

struct SqliteLogTx<'a> {
    tx: &'a Connection,
}

fn nodes_in(conn: &Connection, ids: &[NodeId]) -> Result<Vec<Option<Hash>>> {
    let mut stmt = conn
        .prepare_cached("SELECT hash FROM tlog_nodes WHERE level = ?1 AND idx = ?2")
        .map_err(db)?;
    ids.iter()
        .map(|id| {
            let found: Option<Vec<u8>> = stmt
                .query_row(params![id.level, index_sql(id.index)?], |r| r.get(0))
                .optional()
                .map_err(db)?;
            found.map(|h| hash_col(h, "a log node")).transpose()
        })
        .collect()
}

impl LogTx for SqliteLogTx<'_> {
    fn head_size(&mut self) -> Result<u64> {
        head_size(self.tx)
    }

    fn queued(&mut self, max: usize) -> Result<Vec<Queued>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT q.id, q.bundle_id, b.site_id, b.host_id, b.seq, b.hash FROM tlog_queue q
                 LEFT JOIN bundles b ON b.bundle_id = q.bundle_id ORDER BY q.id LIMIT ?1",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![i64::try_from(max).unwrap_or(i64::MAX)], |r| {
                let site: Option<String> = r.get(2)?;
                Ok(Queued {
                    queue_id: r.get(0)?,
                    bundle_id: r.get(1)?,
                    bundle: match site {
                        Some(site_id) => Some(QueuedBundle {
                            site_id,
                            host_id: r.get(3)?,
                            seq: r.get::<_, i64>(4)?.max(0) as u64,
                            hash: r.get(5)?,
                        }),
                        None => None,
                    },
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn nodes(&mut self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>> {
        nodes_in(self.tx, ids)
    }

    fn put_nodes(&mut self, new_size: u64, nodes: &[(NodeId, Hash)]) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached("INSERT INTO tlog_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")
            .map_err(db)?;
        for (id, hash) in nodes {
            stmt.execute(params![id.level, index_sql(id.index)?, &hash[..]])
                .map_err(db)?;
        }
        self.tx
            .cached_exec(
                "UPDATE tlog_head SET tree_size = ?1 WHERE id = 1",
                params![index_sql(new_size)?],
            )
            .map_err(db)?;
        Ok(())
    }

    fn put_leaves(&mut self, leaves: &[LogLeaf], now: Timestamp) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO tlog_leaves (leaf_index, bundle_id, site_id, host_id, seq, bundle_sha256, leaf_hash, sequenced_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(db)?;
        for l in leaves {
            stmt.execute(params![
                index_sql(l.leaf_index)?,
                l.bundle_id,
                l.site_id,
                l.host_id,
                index_sql(l.seq)?,
                l.bundle_sha256,
                &l.leaf_hash[..],
                micros(now)
            ])
            .map_err(db)?;
        }
        Ok(())
    }

    fn put_checkpoint(&mut self, c: &SignedCheckpoint) -> Result<()> {
        self.tx
            .cached_exec(
                "INSERT INTO tlog_checkpoints (tree_size, root, note, signed_at) VALUES (?1, ?2, ?3, ?4)",
                params![index_sql(c.tree_size)?, &c.root[..], c.note, micros(c.signed_at)],
            )
            .map_err(db)?;
        Ok(())
    }

    fn dequeue(&mut self, queue_ids: &[i64]) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached("DELETE FROM tlog_queue WHERE id = ?1")
            .map_err(db)?;
        for id in queue_ids {
            stmt.execute(params![id]).map_err(db)?;
        }
        Ok(())
    }
}

fn head_size(conn: &Connection) -> Result<u64> {
    let size: i64 = conn
        .cached_row("SELECT tree_size FROM tlog_head WHERE id = 1", [], |r| {
            r.get(0)
        })
        .map_err(db)?;
    Ok(size.max(0) as u64)
}

const CHECKPOINT_COLS: &str = "tree_size, root, note, signed_at";

fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Vec<u8>, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn checkpoint(row: (i64, Vec<u8>, String, i64)) -> Result<SignedCheckpoint> {
    Ok(SignedCheckpoint {
        tree_size: row.0.max(0) as u64,
        root: hash_col(row.1, "a checkpoint root")?,
        note: row.2,
        signed_at: ts(row.3),
    })
}

const LEAF_COLS: &str = "l.leaf_index, l.bundle_id, l.site_id, l.host_id, l.seq, l.bundle_sha256, l.leaf_hash, s.reseller_id";

type LeafRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    Vec<u8>,
    Option<String>,
);

fn leaf_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeafRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

/// The leaf, if the caller sees its site and host.
fn visible_leaf(caller: &Caller, row: LeafRow) -> Result<Option<LogLeaf>> {
    if !caller.sees(row.7.as_deref(), &row.2, Some(&row.3)) {
        return Ok(None);
    }
    Ok(Some(LogLeaf {
        leaf_index: row.0.max(0) as u64,
        bundle_id: row.1,
        site_id: row.2,
        host_id: row.3,
        seq: row.4.max(0) as u64,
        bundle_sha256: row.5,
        leaf_hash: hash_col(row.6, "a leaf hash")?,
    }))
}

impl SqliteStore {
    /// Pending when the bundle is queued and visible to the caller, else unknown.
    fn queued_lookup(conn: &Connection, caller: &Caller, bundle_id: &str) -> Result<LeafLookup> {
        let row: Option<(String, String, Option<String>)> = conn
            .cached_row(
                "SELECT b.site_id, b.host_id, s.reseller_id FROM tlog_queue q JOIN bundles b ON b.bundle_id = q.bundle_id
                 JOIN sites s ON s.site_id = b.site_id WHERE q.bundle_id = ?1",
                params![bundle_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?;
        Ok(match row {
            Some((site, host, reseller))
                if caller.sees(reseller.as_deref(), &site, Some(&host)) =>
            {
                LeafLookup::Pending
            }
            _ => LeafLookup::Unknown,
        })
    }
}

impl LogStore for SqliteStore {
    fn log_sequence(
        &self,
        max: usize,
        now: Timestamp,
        sign: &CheckpointSigner<'_>,
    ) -> Result<Option<SignedCheckpoint>> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let checkpoint = sequence_in(&mut SqliteLogTx { tx: &tx }, max, now, sign)?;
        tx.commit().map_err(db)?;
        Ok(checkpoint)
    }

    fn log_size(&self) -> Result<u64> {
        head_size(&*self.conn()?)
    }

    fn log_queued(&self) -> Result<u64> {
        let n: i64 = self
            .conn()?
            .cached_row("SELECT COUNT(*) FROM tlog_queue", [], |r| r.get(0))
            .map_err(db)?;
        Ok(n.max(0) as u64)
    }

    fn log_nodes(&self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>> {
        nodes_in(&*self.conn()?, ids)
    }

    fn log_latest(&self) -> Result<Option<SignedCheckpoint>> {
        self.conn()?
            .cached_row(
                &format!(
                    "SELECT {CHECKPOINT_COLS} FROM tlog_checkpoints ORDER BY tree_size DESC LIMIT 1"
                ),
                [],
                checkpoint_row,
            )
            .optional()
            .map_err(db)?
            .map(checkpoint)
            .transpose()
    }

    fn log_checkpoint(&self, tree_size: u64) -> Result<Option<SignedCheckpoint>> {
        self.conn()?
            .cached_row(
                &format!("SELECT {CHECKPOINT_COLS} FROM tlog_checkpoints WHERE tree_size = ?1"),
                params![index_sql(tree_size)?],
                checkpoint_row,
            )
            .optional()
            .map_err(db)?
            .map(checkpoint)
            .transpose()
    }

    fn log_checkpoints(&self, from: u64, to: u64) -> Result<Vec<SignedCheckpoint>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {CHECKPOINT_COLS} FROM tlog_checkpoints WHERE tree_size >= ?1 AND tree_size <= ?2 ORDER BY tree_size"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![index_sql(from)?, index_sql(to.min(i64::MAX as u64))?],
                checkpoint_row,
            )
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        rows.into_iter().map(checkpoint).collect()
    }

    fn log_leaf(&self, caller: &Caller, bundle_id: &str) -> Result<LeafLookup> {
        let conn = self.conn()?;
        let row = conn
            .cached_row(
                &format!("SELECT {LEAF_COLS} FROM tlog_leaves l JOIN sites s ON s.site_id = l.site_id WHERE l.bundle_id = ?1"),
                params![bundle_id],
                leaf_row,
            )
            .optional()
            .map_err(db)?;
        match row {
            Some(row) => {
                Ok(visible_leaf(caller, row)?.map_or(LeafLookup::Unknown, LeafLookup::Sequenced))
            }
            None => Self::queued_lookup(&conn, caller, bundle_id),
        }
    }

    fn log_leaf_by_hash(&self, caller: &Caller, leaf_hash: &Hash) -> Result<LeafLookup> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {LEAF_COLS} FROM tlog_leaves l JOIN sites s ON s.site_id = l.site_id WHERE l.leaf_hash = ?1 ORDER BY l.leaf_index"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(params![&leaf_hash[..]], leaf_row)
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        for row in rows {
            if let Some(leaf) = visible_leaf(caller, row)? {
                return Ok(LeafLookup::Sequenced(leaf));
            }
        }
        Ok(LeafLookup::Unknown)
    }

    fn log_host_leaves(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<LogLeaf>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {LEAF_COLS} FROM tlog_leaves l JOIN sites s ON s.site_id = l.site_id
                 WHERE l.site_id = ?1 AND l.host_id = ?2 ORDER BY l.seq"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(params![site_id, host_id], leaf_row)
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            match visible_leaf(caller, row)? {
                Some(leaf) => out.push(leaf),
                // Scope is per host: one invisible leaf means none are visible.
                None => return Ok(Vec::new()),
            }
        }
        Ok(out)
    }
}
