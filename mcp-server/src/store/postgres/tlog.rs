//! The transparency log on PostgreSQL: sequencing under a row lock on `tlog_head`
//! (`SELECT ... FOR UPDATE`), so one process at a time appends, whichever of the
//! processes sharing the database runs the sequencer; batched reads and writes with
//! `unnest` so an append costs a few round trips whatever its size.

use std::collections::HashMap;

use compliance_agent::tlog::{Hash, NodeId};
use jiff::Timestamp;
use postgres::{GenericClient, Row};

use super::{PostgresStore, db, micros, ts, unsigned};
use crate::auth::Caller;
use crate::store::Result;
use crate::store::tlog::{
    CheckpointSigner, LeafLookup, LogLeaf, LogStore, LogTx, Queued, QueuedBundle, SignedCheckpoint,
    hash_col, index_sql, sequence_in,
};

struct PgLogTx<'a, 'b> {
    tx: &'a mut postgres::Transaction<'b>,
}

fn nodes_in(c: &mut impl GenericClient, ids: &[NodeId]) -> Result<Vec<Option<Hash>>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let levels: Vec<i32> = ids
        .iter()
        .map(|id| i32::try_from(id.level).unwrap_or(i32::MAX))
        .collect();
    let idxs: Vec<i64> = ids
        .iter()
        .map(|id| index_sql(id.index))
        .collect::<Result<_>>()?;
    let rows = c
        .query(
            "SELECT n.level, n.idx, n.hash FROM tlog_nodes n
             JOIN unnest($1::int[], $2::bigint[]) AS want(level, idx) ON n.level = want.level AND n.idx = want.idx",
            &[&levels, &idxs],
        )
        .map_err(db)?;
    let mut found = HashMap::with_capacity(rows.len());
    for r in rows {
        let level: i32 = r.try_get(0).map_err(db)?;
        let idx: i64 = r.try_get(1).map_err(db)?;
        let hash = hash_col(r.try_get(2).map_err(db)?, "a log node")?;
        found.insert((level, idx), hash);
    }
    Ok(levels
        .iter()
        .zip(&idxs)
        .map(|(l, i)| found.get(&(*l, *i)).copied())
        .collect())
}

fn head_size(c: &mut impl GenericClient, lock: bool) -> Result<u64> {
    let sql = format!(
        "SELECT tree_size FROM tlog_head WHERE id = 1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = c.query_one(&sql, &[]).map_err(db)?;
    Ok(unsigned(row.try_get(0).map_err(db)?))
}

impl LogTx for PgLogTx<'_, '_> {
    fn head_size(&mut self) -> Result<u64> {
        // The sequencer's lock: held until commit, so appends of all processes queue here.
        head_size(self.tx, true)
    }

    fn queued(&mut self, max: usize) -> Result<Vec<Queued>> {
        let rows = self
            .tx
            .query(
                "SELECT q.id, q.bundle_id, b.site_id, b.host_id, b.seq, b.hash FROM tlog_queue q
                 LEFT JOIN bundles b ON b.bundle_id = q.bundle_id ORDER BY q.id LIMIT $1",
                &[&i64::try_from(max).unwrap_or(i64::MAX)],
            )
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                let site: Option<String> = r.try_get(2)?;
                Ok(Queued {
                    queue_id: r.try_get(0)?,
                    bundle_id: r.try_get(1)?,
                    bundle: match site {
                        Some(site_id) => Some(QueuedBundle {
                            site_id,
                            host_id: r.try_get(3)?,
                            seq: unsigned(r.try_get(4)?),
                            hash: r.try_get(5)?,
                        }),
                        None => None,
                    },
                })
            })
            .collect::<std::result::Result<_, postgres::Error>>()
            .map_err(db)
    }

    fn nodes(&mut self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>> {
        nodes_in(self.tx, ids)
    }

    fn put_nodes(&mut self, new_size: u64, nodes: &[(NodeId, Hash)]) -> Result<()> {
        let levels: Vec<i32> = nodes
            .iter()
            .map(|(id, _)| i32::try_from(id.level).unwrap_or(i32::MAX))
            .collect();
        let idxs: Vec<i64> = nodes
            .iter()
            .map(|(id, _)| index_sql(id.index))
            .collect::<Result<_>>()?;
        let hashes: Vec<Vec<u8>> = nodes.iter().map(|(_, h)| h.to_vec()).collect();
        self.tx
            .execute(
                "INSERT INTO tlog_nodes (level, idx, hash) SELECT * FROM unnest($1::int[], $2::bigint[], $3::bytea[])",
                &[&levels, &idxs, &hashes],
            )
            .map_err(db)?;
        self.tx
            .execute(
                "UPDATE tlog_head SET tree_size = $1 WHERE id = 1",
                &[&index_sql(new_size)?],
            )
            .map_err(db)?;
        Ok(())
    }

    fn put_leaves(&mut self, leaves: &[LogLeaf], now: Timestamp) -> Result<()> {
        let index: Vec<i64> = leaves
            .iter()
            .map(|l| index_sql(l.leaf_index))
            .collect::<Result<_>>()?;
        let ids: Vec<&str> = leaves.iter().map(|l| l.bundle_id.as_str()).collect();
        let sites: Vec<&str> = leaves.iter().map(|l| l.site_id.as_str()).collect();
        let hosts: Vec<&str> = leaves.iter().map(|l| l.host_id.as_str()).collect();
        let seqs: Vec<i64> = leaves
            .iter()
            .map(|l| index_sql(l.seq))
            .collect::<Result<_>>()?;
        let shas: Vec<&str> = leaves.iter().map(|l| l.bundle_sha256.as_str()).collect();
        let hashes: Vec<Vec<u8>> = leaves.iter().map(|l| l.leaf_hash.to_vec()).collect();
        self.tx
            .execute(
                "INSERT INTO tlog_leaves (leaf_index, bundle_id, site_id, host_id, seq, bundle_sha256, leaf_hash, sequenced_at)
                 SELECT i, b, s, h, q, sha, lh, $8 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bytea[])
                 AS t(i, b, s, h, q, sha, lh)",
                &[&index, &ids, &sites, &hosts, &seqs, &shas, &hashes, &micros(now)],
            )
            .map_err(db)?;
        Ok(())
    }

    fn put_checkpoint(&mut self, c: &SignedCheckpoint) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO tlog_checkpoints (tree_size, root, note, signed_at) VALUES ($1, $2, $3, $4)",
                &[&index_sql(c.tree_size)?, &c.root.to_vec(), &c.note, &micros(c.signed_at)],
            )
            .map_err(db)?;
        Ok(())
    }

    fn dequeue(&mut self, queue_ids: &[i64]) -> Result<()> {
        self.tx
            .execute("DELETE FROM tlog_queue WHERE id = ANY($1)", &[&queue_ids])
            .map_err(db)?;
        Ok(())
    }
}

const CHECKPOINT_COLS: &str = "tree_size, root, note, signed_at";

fn checkpoint(r: &Row) -> Result<SignedCheckpoint> {
    Ok(SignedCheckpoint {
        tree_size: unsigned(r.try_get(0).map_err(db)?),
        root: hash_col(r.try_get(1).map_err(db)?, "a checkpoint root")?,
        note: r.try_get(2).map_err(db)?,
        signed_at: ts(r.try_get(3).map_err(db)?),
    })
}

const LEAF_COLS: &str = "l.leaf_index, l.bundle_id, l.site_id, l.host_id, l.seq, l.bundle_sha256, l.leaf_hash, s.reseller_id";

/// The leaf, if the caller sees its site and host.
fn visible_leaf(caller: &Caller, r: &Row) -> Result<Option<LogLeaf>> {
    let site: String = r.try_get(2).map_err(db)?;
    let host: String = r.try_get(3).map_err(db)?;
    let reseller: Option<String> = r.try_get(7).map_err(db)?;
    if !caller.sees(reseller.as_deref(), &site, Some(&host)) {
        return Ok(None);
    }
    Ok(Some(LogLeaf {
        leaf_index: unsigned(r.try_get(0).map_err(db)?),
        bundle_id: r.try_get(1).map_err(db)?,
        site_id: site,
        host_id: host,
        seq: unsigned(r.try_get(4).map_err(db)?),
        bundle_sha256: r.try_get(5).map_err(db)?,
        leaf_hash: hash_col(r.try_get(6).map_err(db)?, "a leaf hash")?,
    }))
}

impl LogStore for PostgresStore {
    fn log_sequence(
        &self,
        max: usize,
        now: Timestamp,
        sign: &CheckpointSigner<'_>,
    ) -> Result<Option<SignedCheckpoint>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(db)?;
        let checkpoint = sequence_in(&mut PgLogTx { tx: &mut tx }, max, now, sign)?;
        tx.commit().map_err(db)?;
        Ok(checkpoint)
    }

    fn log_size(&self) -> Result<u64> {
        head_size(&mut *self.conn()?, false)
    }

    fn log_queued(&self) -> Result<u64> {
        let row = self
            .conn()?
            .query_one("SELECT COUNT(*) FROM tlog_queue", &[])
            .map_err(db)?;
        Ok(unsigned(row.try_get(0).map_err(db)?))
    }

    fn log_nodes(&self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>> {
        nodes_in(&mut *self.conn()?, ids)
    }

    fn log_latest(&self) -> Result<Option<SignedCheckpoint>> {
        self.conn()?
            .query_opt(
                &format!(
                    "SELECT {CHECKPOINT_COLS} FROM tlog_checkpoints ORDER BY tree_size DESC LIMIT 1"
                ),
                &[],
            )
            .map_err(db)?
            .as_ref()
            .map(checkpoint)
            .transpose()
    }

    fn log_checkpoint(&self, tree_size: u64) -> Result<Option<SignedCheckpoint>> {
        self.conn()?
            .query_opt(
                &format!("SELECT {CHECKPOINT_COLS} FROM tlog_checkpoints WHERE tree_size = $1"),
                &[&index_sql(tree_size)?],
            )
            .map_err(db)?
            .as_ref()
            .map(checkpoint)
            .transpose()
    }

    fn log_checkpoints(&self, from: u64, to: u64) -> Result<Vec<SignedCheckpoint>> {
        let rows = self
            .conn()?
            .query(
                &format!("SELECT {CHECKPOINT_COLS} FROM tlog_checkpoints WHERE tree_size >= $1 AND tree_size <= $2 ORDER BY tree_size"),
                &[&index_sql(from)?, &index_sql(to.min(i64::MAX as u64))?],
            )
            .map_err(db)?;
        rows.iter().map(checkpoint).collect()
    }

    fn log_leaf(&self, caller: &Caller, bundle_id: &str) -> Result<LeafLookup> {
        let mut conn = self.conn()?;
        let row = conn
            .query_opt(
                &format!("SELECT {LEAF_COLS} FROM tlog_leaves l JOIN sites s ON s.site_id = l.site_id WHERE l.bundle_id = $1"),
                &[&bundle_id],
            )
            .map_err(db)?;
        if let Some(row) = row {
            return Ok(
                visible_leaf(caller, &row)?.map_or(LeafLookup::Unknown, LeafLookup::Sequenced)
            );
        }
        let queued = conn
            .query_opt(
                "SELECT b.site_id, b.host_id, s.reseller_id FROM tlog_queue q JOIN bundles b ON b.bundle_id = q.bundle_id
                 JOIN sites s ON s.site_id = b.site_id WHERE q.bundle_id = $1",
                &[&bundle_id],
            )
            .map_err(db)?;
        Ok(match queued {
            Some(r) => {
                let site: String = r.try_get(0).map_err(db)?;
                let host: String = r.try_get(1).map_err(db)?;
                let reseller: Option<String> = r.try_get(2).map_err(db)?;
                if caller.sees(reseller.as_deref(), &site, Some(&host)) {
                    LeafLookup::Pending
                } else {
                    LeafLookup::Unknown
                }
            }
            None => LeafLookup::Unknown,
        })
    }

    fn log_leaf_by_hash(&self, caller: &Caller, leaf_hash: &Hash) -> Result<LeafLookup> {
        let rows = self
            .conn()?
            .query(
                &format!("SELECT {LEAF_COLS} FROM tlog_leaves l JOIN sites s ON s.site_id = l.site_id WHERE l.leaf_hash = $1 ORDER BY l.leaf_index"),
                &[&leaf_hash.to_vec()],
            )
            .map_err(db)?;
        for row in &rows {
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
        let rows = self
            .conn()?
            .query(
                &format!("SELECT {LEAF_COLS} FROM tlog_leaves l JOIN sites s ON s.site_id = l.site_id WHERE l.site_id = $1 AND l.host_id = $2 ORDER BY l.seq"),
                &[&site_id, &host_id],
            )
            .map_err(db)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match visible_leaf(caller, row)? {
                Some(leaf) => out.push(leaf),
                None => return Ok(Vec::new()),
            }
        }
        Ok(out)
    }
}
