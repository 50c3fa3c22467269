//! The central server's transparency log at 1,000,000 leaves in its SQLite store:
//! the sequencer's append cost per bundle, and inclusion and consistency proofs served
//! per second from the stored nodes, side by side with the same proofs from the agent
//! crate's in-memory tree (the floor: no database at all).
//!
//! Run: `cargo bench -p mcp-server --bench tlog` (LOG_BENCH_LEAVES changes the size,
//! BENCH_DIR where the database goes).

use std::time::Instant;

use compliance_agent::crypto::SigningKey;
use compliance_agent::tlog::{Checkpoint, Log, LogSigner, MemoryStore};
use jiff::Timestamp;
use mcp_server::auth::Caller;
use mcp_server::store::sqlite::SqliteStore;
use mcp_server::store::tlog::LogStore as _;
use mcp_server::store::{Host, Site, Store};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BenchResult<()> {
    let leaves: u64 = std::env::var("LOG_BENCH_LEAVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::var_os("BENCH_DIR")
        .map_or_else(
            || std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
            Into::into,
        )
        .join("tlog-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("mcp.db");
    let store = SqliteStore::open(&db)?;
    let admin = Caller::local("bench");
    store.put_site(
        &admin,
        &Site {
            site_id: "s".into(),
            reseller_id: None,
            runbook_allowlist: vec![],
            created_at: Timestamp::now(),
        },
    )?;
    store.add_host(
        &admin,
        &Host {
            site_id: "s".into(),
            host_id: "h".into(),
            reseller_id: None,
            evidence_pubkey_pem: "PEM".into(),
            cert_serial: None,
            enrolled_at: Timestamp::now(),
            revoked_at: None,
            scan_interval_sec: 300,
            last_seen: None,
        },
    )?;
    // The accepted bundles, written straight into the index in one transaction (the
    // intake's own cost is the intake benchmark's); the trigger queues each.
    {
        let mut conn = rusqlite::Connection::open(&db)?;
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO bundles (bundle_id, site_id, host_id, seq, hash, prev_hash, check_name, outcome, timestamp_end, received_at, archive_key, order_id)
                 VALUES (?1, 's', 'h', ?2, ?3, NULL, 'backup', 'success', 0, ?2, 'k', NULL)",
            )?;
            for seq in 1..=leaves {
                let hash = hex::encode(compliance_agent::crypto::sha256(&seq.to_be_bytes()));
                stmt.execute(rusqlite::params![format!("b-{seq}"), seq as i64, hash])?;
            }
        }
        tx.commit()?;
    }
    let signer = LogSigner::new("bench.example/log", SigningKey::generate())?;
    let sign = |size: u64, root: &[u8; 32]| {
        signer
            .sign(&Checkpoint {
                origin: "bench.example/log".into(),
                size,
                root: *root,
                extensions: vec![],
            })
            .map_err(|e| e.to_string())
    };
    let started = Instant::now();
    let mut batches = 0u64;
    while store
        .log_sequence(mcp_server::tlog::SEQUENCE_BATCH, Timestamp::now(), &sign)?
        .is_some()
    {
        batches += 1;
    }
    let append = started.elapsed();
    assert_eq!(store.log_size()?, leaves, "every bundle sequenced");

    // The same leaves in memory, for the floor.
    let leaf_hashes: Vec<[u8; 32]> = (0..leaves)
        .map(|i| {
            let seq = i + 1;
            compliance_agent::tlog::BundleLeaf {
                site_id: "s".into(),
                host_id: "h".into(),
                seq,
                bundle_id: format!("b-{seq}"),
                bundle_sha256: compliance_agent::crypto::sha256(&seq.to_be_bytes()),
            }
            .hash()
            .expect("leaf")
        })
        .collect();
    let mut memory = Log::new(MemoryStore::new());
    let mem_started = Instant::now();
    memory.append_many(&leaf_hashes)?;
    let mem_append = mem_started.elapsed();

    let (stored, newest) = mcp_server::tlog::stored_log(&store)?;
    assert_eq!(stored.root(leaves)?, memory.root(leaves)?, "one tree");
    assert_eq!(
        newest.root,
        memory.root(leaves)?,
        "the checkpoint is its head"
    );

    let rounds = 20_000u64;
    let pick = |i: u64| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % leaves;
    let rate = |f: &mut dyn FnMut(u64) -> BenchResult<()>| -> BenchResult<f64> {
        let t = Instant::now();
        for i in 0..rounds {
            f(i)?;
        }
        Ok(rounds as f64 / t.elapsed().as_secs_f64())
    };
    let db_inclusion = rate(&mut |i| {
        stored.inclusion_proof(pick(i), leaves)?;
        Ok(())
    })?;
    let mem_inclusion = rate(&mut |i| {
        memory.inclusion_proof(pick(i), leaves)?;
        Ok(())
    })?;
    let db_consistency = rate(&mut |i| {
        stored.consistency_proof(pick(i).max(1), leaves)?;
        Ok(())
    })?;
    let mem_consistency = rate(&mut |i| {
        memory.consistency_proof(pick(i).max(1), leaves)?;
        Ok(())
    })?;
    let db_bytes = std::fs::metadata(&db)?.len();
    println!("transparency log at {leaves} leaves ({batches} checkpoints signed)");
    println!("| | append per bundle | inclusion proofs/s | consistency proofs/s |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| server log, SQLite store | {:.1} µs | {db_inclusion:.0} | {db_consistency:.0} |",
        append.as_secs_f64() * 1e6 / leaves as f64
    );
    println!(
        "| in-memory tree (agent crate) | {:.2} µs | {mem_inclusion:.0} | {mem_consistency:.0} |",
        mem_append.as_secs_f64() * 1e6 / leaves as f64
    );
    println!("database file: {:.0} MB", db_bytes as f64 / 1e6);
    Ok(())
}
