//! The channel to the MCP against the central server (`mcp-server`, in this process) over mTLS on loopback:
//! outages, certificate failures, protocol faults, the order matrix, SIGKILL during delivery.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use compliance_agent::crypto::SigningKey;
use compliance_agent::mcp::{self, ChannelSettings, McpClient, Selection};
use compliance_agent::orders::{COLLECT_EVIDENCE, Order};
use compliance_agent::queue::{Queue, RetryPolicy};
use jiff::{SignedDuration, Timestamp};
use mcp_server::api::agent::Canned;
use mcp_server::pki::{Ca, Validity};
use mcp_server::store::{OrderRecord, OrderState};
use rand::Rng;
use serde_json::{Value, json};

fn run_ok(ch: &Channel, args: &[&str]) -> std::process::Output {
    let out = ch.agent(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `queue flush` must fail, keep everything queued and say `needle` on stderr.
fn assert_flush_fails(ch: &Channel, needle: &str, case: &str) {
    let before = ch.queue_stats()["pending"].as_u64();
    let out = ch.agent(&["queue", "flush"]);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: flush exits 1 (stdout {} stderr {stderr})",
        text(&out.stdout)
    );
    assert!(
        stderr.contains(needle),
        "{case}: the error says why ({needle:?}): {stderr}"
    );
    eprintln!("{case}: {}", stderr.trim());
    let after = ch.queue_stats();
    assert_eq!(
        after["pending"].as_u64(),
        before,
        "{case}: every bundle stays queued"
    );
    assert_eq!(
        after["delivered"], 0,
        "{case}: nothing counted as delivered"
    );
}

#[test]
fn bundles_queued_during_an_outage_are_delivered_exactly_once() -> TestResult {
    let mut ch = Channel::new();
    ch.add_bundles(1000);
    // The server is down: nothing listens on the port.
    assert_flush_fails(&ch, "nothing listens there", "server down");
    assert_eq!(ch.queue_stats()["pending"], 1000, "all 1000 queued");

    ch.start_server();
    let health = McpClient::from_config(&ch.config())?.health()?;
    assert_eq!(health.protocol, 1, "the server speaks protocol v1");
    let started = Instant::now();
    let out = run_ok(&ch, &["queue", "flush", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        report["delivery"]["delivered"], 1000,
        "all delivered: {report}"
    );
    eprintln!("1000 bundles delivered in {:?}", started.elapsed());
    let on_server: BTreeSet<String> = ch.server_bundles().into_iter().collect();
    let on_disk: BTreeSet<String> = ch.disk_bundles().into_iter().collect();
    assert_eq!(
        on_server, on_disk,
        "the server holds exactly the box's bundles"
    );
    let stats = ch.server_stats();
    assert_eq!(
        (stats.stored, stats.duplicates),
        (1000, 0),
        "each stored once: {stats:?}"
    );

    // The agent killed after the upload and before recording it: the rows are
    // pending again, and the next flush must not store anything twice.
    let db = rusqlite::Connection::open(ch.db_path())?;
    let reset = db.execute(
        "UPDATE uploads SET state = 'pending', delivered_at = NULL WHERE seq % 10 = 0",
        [],
    )?;
    drop(db);
    assert_eq!(reset, 100, "100 acknowledgements forgotten");
    let out = run_ok(&ch, &["queue", "flush", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        report["delivery"]["duplicates"], 100,
        "the server answers duplicate: {report}"
    );
    let stats = ch.server_stats();
    assert_eq!(stats.stored, 1000, "still stored once each: {stats:?}");

    // The database lost entirely: the disk is the truth and the queue is rebuilt.
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", ch.db_path().display());
        let _ = std::fs::remove_file(path);
    }
    assert_eq!(ch.queue_stats()["pending"], 1000, "rebuilt from the disk");
    run_ok(&ch, &["queue", "flush"]);
    assert_eq!(ch.server_stats().stored, 1000, "no bundle stored twice");
    assert_eq!(ch.queue_stats()["pending"], 0, "queue drained");
    Ok(())
}

#[test]
fn mtls_failures_fail_closed_and_say_why() -> TestResult {
    let mut ch = Channel::new();
    ch.add_bundles(3);
    let ca = Ca::new("second CA")?;
    let other = ch.dir.path().join("other");
    ca.write(&other)?;
    ca.client("clinic-1/frontdesk-01", Validity::Days(30))?
        .write(&other, "client")?;
    ca.server(&["localhost", "127.0.0.1"], Validity::Days(30))?
        .write(&other, "server")?;

    // 1. The box trusts another CA than the one that signed the server.
    ch.start_server();
    ch.write_config(&format!("ca_cert_file = {:?}", other.join("ca.pem")));
    assert_flush_fails(&ch, "not signed by the CA in ca_cert_file", "wrong CA");

    // 2. The server's certificate expired.
    ch.write_config("");
    let original = Ca::new("expiring CA")?;
    let expired_dir = ch.dir.path().join("expired");
    original.write(&expired_dir)?;
    original
        .server(&["localhost", "127.0.0.1"], Validity::Expired)?
        .write(&expired_dir, "server")?;
    original
        .client("clinic-1/frontdesk-01", Validity::Days(30))?
        .write(&expired_dir, "client")?;
    ch.start_server_with(
        |c| {
            c.tls_cert_file = Some(expired_dir.join("server.pem"));
            c.tls_key_file = Some(expired_dir.join("server.key"));
            c.client_ca_file = Some(expired_dir.join("ca.pem"));
        },
        None,
    );
    ch.write_config(&format!(
        "ca_cert_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
        expired_dir.join("ca.pem"),
        expired_dir.join("client.pem"),
        expired_dir.join("client.key")
    ));
    assert_flush_fails(&ch, "has expired", "expired server certificate");

    // 3. The certificate names another host.
    let wrong_name = ch.dir.path().join("wrong-name");
    let main_ca_key_less = Ca::new("name CA")?;
    main_ca_key_less.write(&wrong_name)?;
    main_ca_key_less
        .server(&["mcp.example.invalid"], Validity::Days(30))?
        .write(&wrong_name, "server")?;
    main_ca_key_less
        .client("clinic-1/frontdesk-01", Validity::Days(30))?
        .write(&wrong_name, "client")?;
    ch.start_server_with(
        |c| {
            c.tls_cert_file = Some(wrong_name.join("server.pem"));
            c.tls_key_file = Some(wrong_name.join("server.key"));
            c.client_ca_file = Some(wrong_name.join("ca.pem"));
        },
        None,
    );
    ch.write_config(&format!(
        "ca_cert_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
        wrong_name.join("ca.pem"),
        wrong_name.join("client.pem"),
        wrong_name.join("client.key")
    ));
    assert_flush_fails(&ch, "not issued for the host name", "hostname mismatch");

    // 4. A client certificate from another CA.
    ch.start_server();
    ch.write_config(&format!(
        "client_cert_file = {:?}\nclient_key_file = {:?}",
        other.join("client.pem"),
        other.join("client.key")
    ));
    assert_flush_fails(
        &ch,
        "refused this box's client certificate",
        "client certificate from another CA",
    );

    // 5. No client certificate at all (config validation forbids it, so
    // through the library, as a misconfigured build would).
    ch.write_config("");
    let config = ch.config();
    let mut settings = ChannelSettings::from_config(&config)?;
    settings.client_identity = None;
    let client = McpClient::new(settings)?;
    let mut queue = Queue::open(&ch.db_path(), RetryPolicy::from_config(&config))?;
    let report = mcp::deliver(&client, &mut queue, Selection::AllPending)?;
    let reason = report.stopped.clone().unwrap_or_default();
    assert!(
        reason.contains("requires a client certificate"),
        "no client certificate: says why: {report:?}"
    );
    assert_eq!(
        report.delivered, 0,
        "nothing delivered without a certificate"
    );
    let stats = queue.stats(compliance_agent::queue::unix_now())?;
    assert_eq!(stats.pending, 3, "all still queued");

    assert_eq!(
        ch.server_bundles().len(),
        0,
        "the server stored nothing in any case"
    );
    // With the right files, the same bundles go through.
    run_ok(&ch, &["queue", "flush"]);
    assert_eq!(ch.server_bundles().len(), 3, "delivered once mTLS is right");
    Ok(())
}

#[test]
fn protocol_faults_are_errors_and_bundles_stay_queued() -> TestResult {
    let mut ch = Channel::new();
    ch.add_bundles(2);
    let cases: Vec<(&str, Canned, &str)> = vec![
        (
            "not JSON",
            Canned {
                status: 200,
                headers: vec![],
                body: b"<html>hello</html>".to_vec(),
                content_type: "text/html",
            },
            "is not the expected JSON",
        ),
        (
            "oversized answer",
            Canned {
                status: 200,
                headers: vec![],
                body: vec![b' '; 2 * 1024 * 1024],
                content_type: "application/json",
            },
            "longer than",
        ),
        (
            "server error",
            Canned::json(500, &json!({ "error": "disk full" })),
            "HTTP 500: disk full",
        ),
        (
            "acknowledges another bundle",
            Canned::json(
                200,
                &json!({ "bundle_id": "00000000-0000-0000-0000-000000000000", "status": "stored" }),
            ),
            "acknowledged bundle 00000000",
        ),
        (
            "redirect to another host",
            Canned {
                status: 302,
                headers: vec![(
                    "Location".into(),
                    "https://evil.example.invalid/api/v1/evidence".into(),
                )],
                body: Vec::new(),
                content_type: "text/plain",
            },
            "a redirect",
        ),
    ];
    for (case, response, needle) in cases {
        let canned = response.clone();
        ch.start_faulty_server(Arc::new(move |_, _| Some(canned.clone())));
        let out = ch.agent(&["queue", "flush"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: exit 1: {stderr}");
        assert!(stderr.contains(needle), "{case}: says {needle:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{case}: no panic: {stderr}");
        let stats = ch.queue_stats();
        assert_eq!(
            stats["pending"].as_u64().unwrap_or(0) + stats["failed"].as_u64().unwrap_or(0),
            2,
            "{case}: both bundles stay queued: {stats}"
        );
        assert_eq!(stats["delivered"], 0, "{case}: nothing delivered");
    }
    // The real server afterwards: everything goes through (re-arming parked rows).
    ch.start_server();
    run_ok(&ch, &["queue", "flush", "--retry-failed"]);
    assert_eq!(ch.server_bundles().len(), 2, "delivered to the real server");
    Ok(())
}

#[test]
fn api_key_is_sent_and_checked() -> TestResult {
    let mut ch = Channel::new();
    ch.add_bundles(1);
    let key_file = ch.dir.path().join("api-key");
    std::fs::write(&key_file, "wrong-key\n")?;
    ch.write_config(&format!("mcp_api_key_file = {key_file:?}"));
    let server_key_file = ch.dir.path().join("server-api-key");
    std::fs::write(&server_key_file, "s3cret-token\n")?;
    ch.start_server_with(|c| c.agent_api_key_file = Some(server_key_file), None);
    let out = ch.agent(&["queue", "flush"]);
    assert_eq!(out.status.code(), Some(1), "a wrong key is refused");
    assert!(
        text(&out.stderr).contains("HTTP 401"),
        "says 401: {}",
        text(&out.stderr)
    );
    std::fs::write(&key_file, "s3cret-token\n")?;
    run_ok(&ch, &["queue", "flush"]);
    assert_eq!(ch.server_bundles().len(), 1, "delivered with the right key");
    Ok(())
}

#[test]
fn evidence_prune_waits_for_the_mcp() -> TestResult {
    let mut ch = Channel::new();
    ch.add_bundles(10);
    // Everything is past retention when judged two days ahead (the CLI
    // refuses --retention-days 0, as the config does); what may go is what the
    // MCP acknowledged, as `evidence prune` and the service decide it.
    let prune = |ch: &Channel| -> Result<Value, Box<dyn std::error::Error>> {
        let later = Timestamp::now().checked_add(SignedDuration::from_hours(48))?;
        let acknowledged = Queue::open_for(&ch.config())?.acknowledged()?;
        let report = ch.evidence().prune_where(0, 1, later, acknowledged)?;
        Ok(serde_json::to_value(report)?)
    };
    let report = prune(&ch)?;
    assert_eq!(
        report["pruned"], 0,
        "nothing acknowledged, nothing pruned: {report}"
    );
    ch.start_server();
    run_ok(&ch, &["queue", "flush"]);
    let report = prune(&ch)?;
    assert_eq!(report["pruned"], 10, "acknowledged bundles go: {report}");
    // The checkpoint is itself queued and delivered; the chain still verifies.
    run_ok(&ch, &["queue", "flush"]);
    assert_eq!(ch.server_bundles().len(), 11, "checkpoint delivered too");
    run_ok(&ch, &["evidence", "verify"]);
    Ok(())
}

/// A valid order signed by `key`, issued at `issued_at`.
fn order(
    site: &str,
    host: &str,
    runbook: &str,
    params: Value,
    nonce: &str,
    issued_at: Timestamp,
    ttl: u64,
) -> Order {
    Order {
        order_id: uuid::Uuid::new_v4().to_string(),
        site_id: site.into(),
        host_id: host.into(),
        runbook_id: runbook.into(),
        params,
        nonce: nonce.into(),
        issued_at,
        ttl,
    }
}

/// Lists `envelope` to the box as a pending order with `order_id`, bypassing the
/// server's own signing and guardrails (so bad envelopes reach the box).
fn queue_envelope(
    server: &mcp_server::Services,
    order_id: &str,
    runbook: &str,
    envelope: &str,
) -> TestResult {
    server.store.insert_order(
        &admin(),
        &OrderRecord {
            order_id: order_id.into(),
            site_id: SITE.into(),
            host_id: HOST.into(),
            runbook_id: runbook.into(),
            params: json!({}),
            ttl: 600,
            state: OrderState::Pending,
            envelope: Some(envelope.into()),
            created_by: "cli:test".into(),
            created_at: Timestamp::now(),
            approved_by: None,
            result_bundle_id: None,
            result_outcome: None,
            result_error: None,
            answered_at: None,
        },
    )?;
    Ok(())
}

/// Lists `order`, signed with `key`, to the box.
fn queue_order(server: &mcp_server::Services, order: &Order, key: &SigningKey) -> TestResult {
    let envelope = serde_json::to_string(&order.sign(key))?;
    queue_envelope(server, &order.order_id, &order.runbook_id, &envelope)
}

fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[test]
fn order_matrix_only_the_valid_order_runs() -> TestResult {
    let mut ch = Channel::new();
    ch.start_server();
    let server = ch.server();
    let key = SigningKey::load(&server.paths.order_key)?;
    let now = Timestamp::now();
    let backup = json!({ "checks": ["backup"], "note": "quarterly review" });
    let mut expect: Vec<(String, &str, &str)> = Vec::new();

    let valid_nonce = nonce();
    let valid = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &valid_nonce,
        now,
        600,
    );
    queue_order(&server, &valid, &key)?;
    expect.push((valid.order_id.clone(), "success", ""));

    // A flipped byte in the signed payload.
    let flipped = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &nonce(),
        now,
        600,
    );
    let mut envelope = flipped.sign(&key);
    let mut payload = base64::engine::general_purpose::STANDARD.decode(&envelope.payload)?;
    let at = payload.len() / 2;
    payload[at] ^= 0x01;
    envelope.payload = base64::engine::general_purpose::STANDARD.encode(&payload);
    queue_envelope(
        &server,
        &flipped.order_id,
        COLLECT_EVIDENCE,
        &serde_json::to_string(&envelope)?,
    )?;
    expect.push((
        flipped.order_id.clone(),
        "rejected",
        "no signature verifies",
    ));

    let wrong_key = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &nonce(),
        now,
        600,
    );
    queue_order(&server, &wrong_key, &SigningKey::generate())?;
    expect.push((
        wrong_key.order_id.clone(),
        "rejected",
        "no signature verifies",
    ));

    let replay = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &valid_nonce,
        now,
        600,
    );
    queue_order(&server, &replay, &key)?;
    expect.push((replay.order_id.clone(), "rejected", "nonce already used"));

    let expired = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &nonce(),
        now - SignedDuration::from_secs(3600),
        60,
    );
    queue_order(&server, &expired, &key)?;
    expect.push((expired.order_id.clone(), "expired", "expired at"));

    let future = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &nonce(),
        now + SignedDuration::from_secs(3600),
        600,
    );
    queue_order(&server, &future, &key)?;
    expect.push((future.order_id.clone(), "rejected", "in the future"));

    let other_host = order(
        SITE,
        "reception-02",
        COLLECT_EVIDENCE,
        backup.clone(),
        &nonce(),
        now,
        600,
    );
    queue_order(&server, &other_host, &key)?;
    expect.push((other_host.order_id.clone(), "rejected", "addressed to host"));

    let other_site = order(
        "clinic-2",
        HOST,
        COLLECT_EVIDENCE,
        backup.clone(),
        &nonce(),
        now,
        600,
    );
    queue_order(&server, &other_site, &key)?;
    expect.push((other_site.order_id.clone(), "rejected", "addressed to site"));

    let unknown = order(SITE, HOST, "reboot_now", json!({}), &nonce(), now, 600);
    queue_order(&server, &unknown, &key)?;
    expect.push((
        unknown.order_id.clone(),
        "rejected",
        "not on this box's allowlist",
    ));

    let bad_params = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        json!({ "rm": "-rf /" }),
        &nonce(),
        now,
        600,
    );
    queue_order(&server, &bad_params, &key)?;
    expect.push((
        bad_params.order_id.clone(),
        "rejected",
        "params do not match",
    ));

    let out = run_ok(&ch, &["orders", "poll", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let processed = report["orders"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        processed.len(),
        expect.len(),
        "every order processed: {report}"
    );
    for (id, outcome, reason) in &expect {
        let p = processed
            .iter()
            .find(|p| p["order_id"] == json!(id))
            .ok_or_else(|| format!("order {id} not in the report: {report}"))?;
        assert_eq!(p["outcome"], json!(outcome), "order {id}: {p}");
        let said = p["reason"].as_str().unwrap_or_default();
        assert!(
            said.contains(reason),
            "order {id}: reason says {reason:?}: {said}"
        );
    }
    let ran = processed
        .iter()
        .filter(|p| p["outcome"] == "success")
        .count();
    assert_eq!(ran, 1, "only the valid order ran: {report}");
    assert_eq!(
        report["delivery"]["delivered"],
        expect.len(),
        "every outcome reported: {report}"
    );

    // The server recorded each result, from a bundle it verified against the enrolled key.
    let results: Vec<OrderRecord> = ch
        .server_orders()
        .into_iter()
        .filter(|o| o.result_outcome.is_some())
        .collect();
    assert_eq!(results.len(), expect.len(), "a result for every order");
    for (id, outcome, _) in &expect {
        let r = results
            .iter()
            .find(|r| r.order_id == *id)
            .ok_or_else(|| format!("no result for {id}"))?;
        assert_eq!(
            r.result_outcome.as_deref(),
            Some(*outcome),
            "result of {id}"
        );
        assert_eq!(r.state, OrderState::Answered, "order {id} answered");
    }
    let pending = server.store.pending_orders(&admin(), SITE, HOST)?;
    assert!(pending.is_empty(), "no order left pending: {pending:?}");

    // The valid order's bundle carries the runbook's record.
    let (bundle, _) = compliance_agent::evidence::find(
        &ch.dir.path().join("evidence"),
        results
            .iter()
            .find(|r| r.order_id == valid.order_id)
            .and_then(|r| r.result_bundle_id.as_deref())
            .unwrap_or_default(),
    )?;
    assert_eq!(bundle.check.as_str(), "mcp_order", "an mcp_order bundle");
    assert_eq!(bundle.runbook_id.as_deref(), Some(COLLECT_EVIDENCE));
    assert_eq!(
        bundle.post_state["note"], "quarterly review",
        "params recorded"
    );
    assert!(
        bundle.post_state["evidence_head"]["seq"].as_u64().is_some(),
        "current state recorded: {}",
        bundle.post_state
    );

    // Every refusal is a signed bundle that `evidence verify` accepts.
    let out = run_ok(&ch, &["evidence", "verify", "--json"]);
    let verify: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        verify["bundles"],
        expect.len(),
        "one bundle per order: {verify}"
    );
    assert_eq!(verify["problems"], json!([]), "chain intact: {verify}");

    // A replay after a restart (a new process): the nonce is remembered.
    let late_replay = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        backup,
        &valid_nonce,
        Timestamp::now(),
        600,
    );
    queue_order(&server, &late_replay, &key)?;
    let out = run_ok(&ch, &["orders", "poll", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        report["orders"][0]["outcome"], "rejected",
        "replay after restart: {report}"
    );
    assert!(
        report["orders"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&valid.order_id),
        "names the order that used the nonce: {report}"
    );
    let out = run_ok(&ch, &["orders", "poll"]);
    assert!(
        text(&out.stdout).contains("no pending orders"),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

#[test]
fn an_unreported_result_is_sent_later_and_the_order_never_runs_twice() -> TestResult {
    let mut ch = Channel::new();
    ch.start_server();
    let created = mcp_server::orders::create(
        &ch.server(),
        &admin(),
        &mcp_server::orders::OrderDraft {
            site_id: SITE.into(),
            host_id: HOST.into(),
            runbook_id: COLLECT_EVIDENCE.into(),
            params: json!({}),
            ttl: Some(600),
        },
    )?;
    // The result upload fails: the server refuses every POST.
    ch.start_faulty_server(Arc::new(|method, _| {
        (method == "POST").then(|| Canned::json(503, &json!({ "error": "maintenance" })))
    }));
    let out = ch.agent(&["orders", "poll", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "results stay queued: {}",
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["orders"][0]["outcome"], "success", "{report}");
    // The order is still listed; polling again must not run it again.
    ch.start_server();
    let out = run_ok(&ch, &["orders", "poll", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        report["orders"][0]["already_answered"], true,
        "answered before, not run again: {report}"
    );
    let orders = ch.server_orders();
    assert_eq!(orders.len(), 1, "one order: {orders:?}");
    assert_eq!(orders[0].order_id, created.order_id);
    assert_eq!(
        orders[0].result_outcome.as_deref(),
        Some("success"),
        "the result arrived: {orders:?}"
    );
    assert_eq!(ch.disk_bundles().len(), 1, "one bundle for the order");
    Ok(())
}

#[test]
fn sigkill_during_flush_loses_and_duplicates_nothing() -> TestResult {
    let mut ch = Channel::new();
    ch.start_server();
    ch.add_bundles(200);
    let mut rng = rand::thread_rng();
    let mut killed_mid_run = 0;
    for round in 0..100 {
        ch.add_bundles(3);
        let mut child = Command::new(agent_bin())
            .arg("--config")
            .arg(&ch.config)
            .args(["queue", "flush"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..120)));
        if child.try_wait()?.is_none() {
            killed_mid_run += 1;
        }
        child.kill()?;
        let status = child.wait()?;
        assert!(
            status.code().is_none() || status.code() == Some(0),
            "round {round}: flush either was killed or succeeded: {status:?}"
        );
    }
    eprintln!("{killed_mid_run} of 100 kills landed while flush ran");
    assert!(
        killed_mid_run >= 20,
        "most kills land during a run ({killed_mid_run} of 100)"
    );
    let queue = Queue::open(&ch.db_path(), RetryPolicy::default())?;
    assert_eq!(
        queue.integrity_check()?,
        "ok",
        "the database survived every kill"
    );
    drop(queue);
    run_ok(&ch, &["queue", "flush"]);
    let on_disk = ch.disk_bundles();
    let mut on_server = ch.server_bundles();
    assert_eq!(on_disk.len(), 500, "every bundle on disk");
    on_server.sort();
    assert_eq!(on_server, on_disk, "no bundle lost on the way");
    let stats = ch.server_stats();
    eprintln!("server after the kills: {stats:?}");
    assert_eq!(
        stats.stored, 500,
        "each stored exactly once (re-sends were answered as duplicates): {stats:?}"
    );
    assert_eq!(ch.queue_stats()["pending"], 0, "queue drained");
    Ok(())
}

#[test]
fn a_lost_database_never_lets_an_order_run_twice() -> TestResult {
    // Invariant (item 7): processed orders and seen nonces are rebuilt from
    // the mcp_order bundles, so after agent.db is lost neither the same order
    // nor another order with its nonce runs again.
    let mut ch = Channel::new();
    ch.start_server();
    let server = ch.server();
    let key = SigningKey::load(&server.paths.order_key)?;
    let used_nonce = nonce();
    let first = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        json!({}),
        &used_nonce,
        Timestamp::now(),
        600,
    );
    queue_order(&server, &first, &key)?;
    let out = run_ok(&ch, &["orders", "poll", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["orders"][0]["outcome"], "success", "{report}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ch.db_path().display()));
    }
    // The same order listed again (a server that lost track of its answer), and
    // another order reusing its nonce.
    let replay = order(
        SITE,
        HOST,
        COLLECT_EVIDENCE,
        json!({}),
        &used_nonce,
        Timestamp::now(),
        600,
    );
    queue_order(&server, &replay, &key)?;
    let listing = json!({ "orders": [
        { "order_id": first.order_id, "envelope": first.sign(&key) },
        { "order_id": replay.order_id, "envelope": replay.sign(&key) },
    ] });
    ch.start_faulty_server(Arc::new(move |method, path| {
        (method == "GET" && path.ends_with("/orders")).then(|| Canned::json(200, &listing))
    }));
    let out = ch.agent(&["orders", "poll", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let by_id = |id: &str| {
        report["orders"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|o| o["order_id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        by_id(&first.order_id)["already_answered"],
        true,
        "the answered order is known again from the evidence: {report}"
    );
    let replayed = by_id(&replay.order_id);
    assert_eq!(replayed["outcome"], "rejected", "{report}");
    assert!(
        replayed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nonce already used")),
        "the nonce is known again from the evidence: {report}"
    );
    let ran = compliance_agent::evidence::list(
        &ch.dir.path().join("evidence"),
        &compliance_agent::evidence::Filter::default(),
    )?
    .into_iter()
    .filter(|s| s.outcome.as_str() == "success" && s.check.as_str() == "mcp_order")
    .count();
    assert_eq!(ran, 1, "the order ran exactly once");
    Ok(())
}

#[test]
fn junk_order_listings_cannot_grow_the_store_without_bound() -> TestResult {
    // Invariant (item 8): a listing refused without an id to answer under is
    // recorded once, not at every poll; and one poll writes at most
    // MAX_REFUSAL_BUNDLES_PER_POLL refusal bundles plus one summary.
    let mut ch = Channel::new();
    let junk: Vec<Value> = (0..150)
        .map(|i| json!({ "order_id": format!("../junk {i}"), "envelope": { "payload": "x" } }))
        .collect();
    let body = json!({ "orders": junk });
    ch.start_faulty_server(Arc::new(move |method, path| {
        (method == "GET" && path.ends_with("/orders")).then(|| Canned::json(200, &body))
    }));
    let evidence_dir = ch.dir.path().join("evidence");
    let count = || {
        compliance_agent::evidence::bundle_refs(&evidence_dir)
            .map(|r| r.len())
            .unwrap_or(0)
    };
    let limit = compliance_agent::orders::MAX_REFUSAL_BUNDLES_PER_POLL as usize;
    let mut after = Vec::new();
    for _ in 0..3 {
        let _ = ch.agent(&["orders", "poll", "--json"]);
        after.push(count());
    }
    assert!(
        after[0] <= limit + 1,
        "one poll wrote {} bundles for 150 junk listings (limit {limit} plus a summary)",
        after[0]
    );
    assert_eq!(
        after[2], after[0],
        "the same junk listings polled again add nothing: {after:?}"
    );
    run_ok(&ch, &["evidence", "verify"]);
    Ok(())
}
