//! The box as a witness of the central server's transparency log: the real agent binary
//! (`orders poll`) against the server in this process, whose database the test edits
//! the way an insider would (dropping or rewriting an old leaf and rebuilding the log).

mod common;

use common::*;
use compliance_agent::evidence::{Check, Outcome};
use serde_json::Value;

fn poll(ch: &Channel) -> Value {
    let out = ch.agent(&["orders", "poll", "--json"]);
    assert!(
        out.status.success(),
        "orders poll: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("orders poll prints JSON")
}

/// Appends everything the server accepted to its log now (the server also does this
/// by itself within a second; the test does not wait for it).
fn sequence(ch: &Channel) {
    let svc = ch.server();
    mcp_server::tlog::sequence(&*svc.store, &svc.log).expect("sequence the log");
}

/// Delivers, lets the log take the bundles in, and witnesses: two polls.
fn deliver_and_witness(ch: &Channel) -> Value {
    poll(ch);
    sequence(ch);
    poll(ch)
}

fn proof_files(ch: &Channel, kind: &str) -> usize {
    std::fs::read_dir(ch.dir.path().join("state/log-proofs").join(kind))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The box's log_witness alerts: (problem, error).
fn alerts(ch: &Channel) -> Vec<(String, String)> {
    compliance_agent::evidence::bundle_refs(&ch.dir.path().join("evidence"))
        .expect("list evidence")
        .into_iter()
        .filter_map(|r| compliance_agent::evidence::read(&r.dir).ok())
        .filter(|b| b.check == Check::LogWitness)
        .map(|b| {
            assert_eq!(b.outcome, Outcome::Alert, "a witness finding is an alert");
            (
                b.pre_state["problem"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                b.error.unwrap_or_default(),
            )
        })
        .collect()
}

/// The insider's edit: with the server stopped, drop the log's guards and rebuild the
/// log from the bundle index as `edit` leaves it (a bundle left out, a hash changed).
fn rebuild_log(ch: &mut Channel, edit: &str) {
    ch.stop_server();
    let db =
        rusqlite::Connection::open(ch.server_state.join("mcp.db")).expect("open the server db");
    db.execute_batch(&format!(
        "BEGIN;
         DROP TRIGGER tlog_leaves_no_delete; DROP TRIGGER tlog_nodes_no_delete; DROP TRIGGER tlog_checkpoints_no_delete;
         CREATE TEMP TABLE order_kept AS SELECT bundle_id, leaf_index FROM tlog_leaves;
         DELETE FROM tlog_leaves; DELETE FROM tlog_nodes; DELETE FROM tlog_checkpoints; DELETE FROM tlog_queue;
         UPDATE tlog_head SET tree_size = 0;
         {edit};
         INSERT INTO tlog_queue (bundle_id) SELECT b.bundle_id FROM bundles b LEFT JOIN order_kept o ON o.bundle_id = b.bundle_id
             WHERE b.bundle_id NOT IN (SELECT bundle_id FROM dropped) ORDER BY o.leaf_index IS NULL, o.leaf_index, b.received_at;
         COMMIT;"
    ))
    .expect("rewrite the log");
    drop(db);
    ch.start_server();
    sequence(ch);
}

fn witness_until_first_checkpoint() -> (Channel, Vec<String>) {
    let mut ch = Channel::new();
    assert!(
        ch.files.log_key().exists(),
        "enrollment wrote the log key to {}",
        ch.files.log_key().display()
    );
    ch.start_server();
    ch.add_bundles(10);
    let report = deliver_and_witness(&ch);
    assert_eq!(
        report["log_witness"]["tree_size"], 10,
        "the box holds the checkpoint of its 10 bundles: {report}"
    );
    assert_eq!(
        proof_files(&ch, "inclusion"),
        10,
        "an inclusion proof per acknowledged bundle"
    );
    ch.add_bundles(5);
    let report = deliver_and_witness(&ch);
    assert_eq!(report["log_witness"]["tree_size"], 15, "{report}");
    assert_eq!(
        report["log_witness"]["consistency_verified"], true,
        "size 15 extends size 10: {report}"
    );
    assert_eq!(proof_files(&ch, "inclusion"), 15);
    assert_eq!(proof_files(&ch, "consistency"), 1);
    assert!(alerts(&ch).is_empty(), "an honest log raises no alert");

    // Offline: every stored proof checks against the bundles' own bytes.
    let out = ch.agent(&["evidence", "verify", "--log-proofs", "--json"]);
    assert!(
        out.status.success(),
        "verify --log-proofs: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["log_proofs"]["inclusion_verified"], 15, "{v}");
    assert_eq!(v["log_proofs"]["consistency_verified"], 1, "{v}");
    let ids = ch.server_bundles();
    (ch, ids)
}

/// Invariant: a server that drops one old leaf (and rebuilds its log without it) is
/// caught by the box at its next poll, with the alert stored as signed evidence.
#[test]
fn a_dropped_leaf_is_caught_at_the_next_poll() -> TestResult {
    let (mut ch, ids) = witness_until_first_checkpoint();
    let victim = &ids[3];
    rebuild_log(
        &mut ch,
        &format!("CREATE TEMP TABLE dropped AS SELECT '{victim}' AS bundle_id"),
    );
    ch.add_bundles(2);
    poll(&ch);
    sequence(&ch);
    let report = poll(&ch);
    let found = alerts(&ch);
    assert!(
        !found.is_empty(),
        "the alert is stored on the box: {report}"
    );
    for (problem, error) in &found {
        assert!(
            matches!(problem.as_str(), "inconsistent" | "log_shrank"),
            "the alert says the history does not extend the box's view: {problem}: {error}"
        );
    }
    assert!(
        found.iter().any(|(p, _)| p == "inconsistent"),
        "the consistency proof from the box's checkpoint fails: {found:?}"
    );
    assert_eq!(
        report["log_witness"]["tree_size"],
        Value::Null,
        "the box holds no newer checkpoint: {report}"
    );
    // The same broken log at the next poll is not reported again.
    let _ = poll(&ch);
    assert_eq!(
        alerts(&ch).len(),
        found.len(),
        "one alert per problem, not one per poll"
    );
    // Offline verification still passes: what the box stored was verified when stored.
    let out = ch.agent(&["evidence", "verify", "--log-proofs"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    Ok(())
}

/// Invariant: a server that rewrites one old leaf (other bytes for an accepted bundle)
/// is caught the same way.
#[test]
fn a_rewritten_leaf_is_caught_at_the_next_poll() -> TestResult {
    let (mut ch, ids) = witness_until_first_checkpoint();
    let victim = &ids[2];
    rebuild_log(
        &mut ch,
        &format!(
            "CREATE TEMP TABLE dropped (bundle_id TEXT);
             UPDATE bundles SET hash = '{}' WHERE bundle_id = '{victim}'",
            "ab".repeat(32)
        ),
    );
    ch.add_bundles(1);
    poll(&ch);
    sequence(&ch);
    let report = poll(&ch);
    let found = alerts(&ch);
    let inconsistent: Vec<_> = found.iter().filter(|(p, _)| p == "inconsistent").collect();
    assert_eq!(
        inconsistent.len(),
        1,
        "one alert for the rewritten history: {found:?} {report}"
    );
    assert!(
        inconsistent[0].1.contains("does not extend"),
        "the alert names the problem: {}",
        inconsistent[0].1
    );
    for (problem, _) in &found {
        assert!(
            matches!(problem.as_str(), "inconsistent" | "log_forked"),
            "only history alerts: {found:?}"
        );
    }
    // The alert also went to the server, in the box's own chain.
    let svc = ch.server();
    let on_server = svc
        .store
        .latest_results(&admin(), SITE, HOST)?
        .into_iter()
        .any(|r| r.check == "log_witness" && r.outcome == "alert");
    assert!(on_server, "the server holds the box's alert");
    Ok(())
}

/// Invariant: a checkpoint signed by another key is refused and reported, never held.
#[test]
fn a_checkpoint_of_another_key_is_an_alert() -> TestResult {
    let (mut ch, _) = witness_until_first_checkpoint();
    // The server's log key replaced: its checkpoints no longer verify with the box's key.
    ch.stop_server();
    let key = ch.server_state.join("log-signing.key");
    std::fs::remove_file(&key)?;
    ch.start_server();
    ch.add_bundles(1);
    poll(&ch);
    sequence(&ch);
    let report = poll(&ch);
    let found = alerts(&ch);
    assert_eq!(found.len(), 1, "{found:?} {report}");
    assert_eq!(found[0].0, "bad_checkpoint", "{found:?}");
    assert!(
        found[0].1.contains("not signed by the log key"),
        "{}",
        found[0].1
    );
    Ok(())
}
