//! The agent listener over mTLS on loopback: enrollment tokens, the identity matrix,
//! revocation, the chain rules, and the bounds that keep slow clients from starving hosts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use compliance_agent::crypto::sha256_hex;
use jiff::{SignedDuration, Timestamp};
use mcp_server::auth::{Caller, token_hash};
use mcp_server::store::EnrollmentToken;
use serde_json::Value;

const NOT_AUTHORIZED: &str = "not authorized on this server";

#[test]
fn enrollment_tokens_are_bounded_and_csrs_must_name_the_host() -> TestResult {
    let server = TestServer::start();
    let token = server.token("clinic-1", 1);
    let first = TestBox::new("clinic-1", "frontdesk-01");
    let (status, body) = first.enroll(&server, &token);
    assert_eq!(status, 200, "first use enrolls: {body}");
    assert_eq!(body["site_id"], "clinic-1", "{body}");
    assert_eq!(body["deployment_mode"], "reseller", "{body}");
    assert!(
        body["order_pubkey_pem"]
            .as_str()
            .is_some_and(|p| p.contains("PUBLIC KEY")),
        "{body}"
    );
    assert_eq!(
        body["ca_cert_pem"].as_str(),
        Some(server.ca_pem().as_str()),
        "the CA the token pins"
    );

    let (status, body) = TestBox::new("clinic-1", "frontdesk-02").enroll(&server, &token);
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("used up"))
        ),
        (403, true),
        "single use: {body}"
    );

    let fp = server.svc().ca.fingerprint();
    let unknown = format!("mcpe1_{}.{fp}", "A".repeat(43));
    let (status, body) = TestBox::new("clinic-1", "frontdesk-03").enroll(&server, &unknown);
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("not known"))
        ),
        (403, true),
        "wrong token: {body}"
    );

    let other_ca = format!(
        "{}.{}",
        token.rsplit_once('.').map_or("", |t| t.0),
        "0".repeat(64)
    );
    let (status, body) = TestBox::new("clinic-1", "frontdesk-03").enroll(&server, &other_ca);
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("another server"))
        ),
        (403, true),
        "other CA: {body}"
    );

    let secret = format!("mcpe1_{}", "E".repeat(43));
    server.svc().store.create_enrollment_token(
        &Caller::local("test"),
        &EnrollmentToken {
            secret_hash: token_hash(&secret),
            token_id: "expired".into(),
            site_id: "clinic-1".into(),
            uses_left: 5,
            expires_at: Timestamp::now() - SignedDuration::from_secs(60),
            created_by: "test".into(),
            created_at: Timestamp::now() - SignedDuration::from_hours(25),
        },
    )?;
    let (status, body) =
        TestBox::new("clinic-1", "frontdesk-04").enroll(&server, &format!("{secret}.{fp}"));
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("expired"))
        ),
        (403, true),
        "expired: {body}"
    );

    let two = server.token("clinic-1", 2);
    let mut liar = TestBox::new("clinic-1", "frontdesk-05");
    liar.csr_pem = mcp_server::pki::make_csr("clinic-1/frontdesk-01")?.0;
    let (status, body) = liar.enroll(&server, &two);
    assert_eq!(status, 422, "a CSR for another host: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("clinic-1/frontdesk-01")),
        "names it: {body}"
    );
    let (status, body) = TestBox::new("clinic-1", "frontdesk-01").enroll(&server, &two);
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("already enrolled"))
        ),
        (409, true),
        "a host id is not taken over: {body}"
    );
    let (status, _) = TestBox::new("clinic-1", "frontdesk-06").enroll(&server, &two);
    assert_eq!(
        status, 200,
        "the refused attempts used none of the two uses"
    );

    let audit = server.svc().store.audit(&Caller::local("test"), 100)?;
    let refused = audit
        .iter()
        .filter(|e| e.action == "host.enroll" && e.outcome == "refused")
        .count();
    assert_eq!(
        refused, 6,
        "every refused enrollment is audited: {audit:#?}"
    );
    Ok(())
}

#[test]
fn identity_matrix_hosts_act_only_for_themselves_and_revocation_is_immediate() -> TestResult {
    let server = TestServer::start();
    let a = server.enroll("clinic-1", "frontdesk-01");
    let b = server.enroll("clinic-1", "reception-02");
    let (ca, url) = (a.client(&server), server.url());

    let a_bundles = a.bundles(1);
    let (status, body) = upload(
        &ca,
        &format!("{url}/api/v1/evidence"),
        &a_bundles[0].0,
        &a_bundles[0].1,
    );
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("stored")),
        "own bundle: {body}"
    );

    let b_bundles = b.bundles(1);
    let (status, body) = upload(
        &ca,
        &format!("{url}/api/v1/evidence"),
        &b_bundles[0].0,
        &b_bundles[0].1,
    );
    assert_eq!(status, 403, "A posting B's bundle: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("only its own")),
        "{body}"
    );

    let order = mcp_server::orders::create(
        server.svc(),
        &Caller::local("test"),
        &mcp_server::orders::OrderDraft {
            site_id: "clinic-1".into(),
            host_id: "reception-02".into(),
            runbook_id: "collect_evidence".into(),
            params: serde_json::json!({ "note": "secret note for B" }),
            ttl: None,
        },
    )?;
    let (status, body) = get(
        &ca,
        &format!("{url}/api/v1/hosts/clinic-1/reception-02/orders"),
    );
    assert_eq!(status, 403, "A listing B's orders: {body}");
    assert!(
        !body.to_string().contains("secret note"),
        "nothing of B's orders leaks: {body}"
    );
    let (status, body) = upload(
        &ca,
        &format!(
            "{url}/api/v1/hosts/clinic-1/reception-02/orders/{}/result",
            order.order_id
        ),
        &a_bundles[0].0,
        &a_bundles[0].1,
    );
    assert_eq!(status, 403, "A reporting B's result: {body}");
    let (status, body) = get(
        &b.client(&server),
        &format!("{url}/api/v1/hosts/clinic-1/reception-02/orders"),
    );
    assert_eq!(
        (status, body["orders"].as_array().map(Vec::len)),
        (200, Some(1)),
        "B sees its own order: {body}"
    );

    // A certificate of the CA for a host that never enrolled, and one revoked: the same answer.
    let ghost = server
        .svc()
        .ca
        .client("clinic-1/ghost-09", mcp_server::pki::Validity::Days(1))?;
    let gc = client(&server.ca_pem(), Some((&ghost.cert_pem, &ghost.key_pem)));
    let (status, unknown_body) = get(&gc, &format!("{url}/api/v1/health"));
    assert_eq!(status, 403, "unknown host: {unknown_body}");
    // A second certificate naming an enrolled host (not the one issued at enrollment).
    let twin = server
        .svc()
        .ca
        .client("clinic-1/frontdesk-01", mcp_server::pki::Validity::Days(1))?;
    let (status, twin_body) = get(
        &client(&server.ca_pem(), Some((&twin.cert_pem, &twin.key_pem))),
        &format!("{url}/api/v1/health"),
    );
    assert_eq!(
        status, 403,
        "a certificate other than the enrolled one: {twin_body}"
    );

    let (status, _) = get(&ca, &format!("{url}/api/v1/health"));
    assert_eq!(status, 200, "A is fine before revocation");
    mcp_server::cli::revoke(
        server.svc(),
        &Caller::local("test"),
        "clinic-1",
        "frontdesk-01",
    )?;
    let (status, revoked_body) = get(&ca, &format!("{url}/api/v1/health"));
    assert_eq!(
        status, 403,
        "revoked on the next request, same connection pool: {revoked_body}"
    );
    assert_eq!(
        revoked_body, unknown_body,
        "revoked and unknown hosts get the same answer"
    );
    assert_eq!(
        twin_body, unknown_body,
        "and so does a replaced certificate"
    );
    assert!(
        unknown_body["error"]
            .as_str()
            .is_some_and(|e| e.contains(NOT_AUTHORIZED)),
        "{unknown_body}"
    );

    let (status, body) = get(
        &client(&server.ca_pem(), None),
        &format!("{url}/api/v1/health"),
    );
    assert_eq!(status, 401, "no certificate: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("requires a client certificate")),
        "{body}"
    );

    let audit = server.svc().store.audit(&Caller::local("test"), 200)?;
    for (action, target, reason) in [
        ("evidence.upload", "clinic-1/frontdesk-01", "only its own"),
        ("orders.list", "clinic-1/reception-02", "another host"),
        ("order.result", "clinic-1/reception-02", "another host"),
        ("health", "clinic-1/ghost-09", "not enrolled"),
        ("health", "clinic-1/frontdesk-01", "revoked"),
        ("health", "-", "no client certificate"),
    ] {
        assert!(
            audit.iter().any(|e| e.action == action
                && e.target == target
                && e.outcome == "refused"
                && e.detail.contains(reason)),
            "audited: {action} {target} ({reason}): {audit:#?}"
        );
    }
    Ok(())
}

/// Re-signs `json` after `edit` with the box's key.
fn forged(b: &TestBox, json: &[u8], edit: impl FnOnce(&mut Value)) -> (Vec<u8>, Vec<u8>) {
    let mut v: Value = serde_json::from_slice(json).expect("bundle json");
    edit(&mut v);
    let bytes = serde_json::to_vec(&v).expect("encode");
    let sig = b.key.sign(&bytes).to_vec();
    (bytes, sig)
}

#[test]
fn chain_rules_refuse_wraps_mismatches_forks_and_bad_signatures() -> TestResult {
    let server = TestServer::start();
    let a = server.enroll("clinic-1", "frontdesk-01");
    let (c, url) = (
        a.client(&server),
        format!("{}/api/v1/evidence", server.url()),
    );
    let bundles = a.bundles(3);
    let send = |j: &[u8], s: &[u8]| upload(&c, &url, j, s);
    assert_eq!(send(&bundles[0].0, &bundles[0].1).0, 200, "seq 1");
    assert_eq!(
        send(&bundles[2].0, &bundles[2].1).0,
        200,
        "seq 3 (a gap is allowed)"
    );

    let (j, s) = forged(&a, &bundles[1].0, |v| {
        v["seq"] = serde_json::json!(u64::MAX);
        v["bundle_id"] = serde_json::json!(uuid::Uuid::new_v4().to_string());
    });
    let (status, body) = send(&j, &s);
    assert_eq!(status, 409, "seq u64::MAX: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("out of range")),
        "{body}"
    );

    let hash3 = sha256_hex(&bundles[2].0);
    let (j, s) = forged(&a, &bundles[1].0, |v| {
        v["prev_hash"] = serde_json::json!(hash3)
    });
    let (status, body) = send(&j, &s);
    assert_eq!(
        status, 409,
        "prev_hash names a stored bundle other than seq - 1: {body}"
    );
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("prev_hash of seq 2")),
        "{body}"
    );

    let (j, s) = forged(&a, &bundles[0].0, |v| {
        v["bundle_id"] = serde_json::json!(uuid::Uuid::new_v4().to_string());
        v["pre_state"] = serde_json::json!({ "forked": true });
    });
    let (status, body) = send(&j, &s);
    assert_eq!(status, 409, "a second seq 1: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("fork")),
        "{body}"
    );

    let mut bad = bundles[1].1.clone();
    bad[0] ^= 1;
    let (status, body) = send(&bundles[1].0, &bad);
    assert_eq!(status, 422, "bad signature: {body}");
    let (status, body) = send(&bundles[1].0[..10], &bundles[1].1);
    assert_eq!(status, 422, "not a bundle: {body}");
    let (status, body) = answer_raw(
        &c,
        &url,
        "multipart/form-data; boundary=x",
        b"--x\r\nnonsense",
    );
    assert!(
        status == 422 || status == 415,
        "malformed multipart: {status} {body}"
    );
    let (status, body) = send(&vec![b' '; 600 * 1024], &bundles[1].1);
    assert_eq!(status, 413, "over the size limit: {body}");

    let (status, body) = send(&bundles[1].0, &bundles[1].1);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("stored")),
        "the real seq 2 fills the gap: {body}"
    );
    let (status, body) = send(&bundles[1].0, &bundles[1].1);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("duplicate")),
        "idempotent: {body}"
    );
    let (j, s) = forged(&a, &bundles[1].0, |v| {
        v["pre_state"] = serde_json::json!({ "edited": true })
    });
    let (status, body) = send(&j, &s);
    assert_eq!(status, 409, "same bundle_id, other bytes: {body}");

    let caller = Caller::local("test");
    let ids = server
        .svc()
        .store
        .bundle_ids(&caller, "clinic-1", "frontdesk-01")?;
    assert_eq!(ids.len(), 3, "exactly the three real bundles are indexed");
    let host = server
        .svc()
        .store
        .host(&caller, "clinic-1", "frontdesk-01")?
        .ok_or("host")?;
    let status =
        mcp_server::fleet::host_status(&*server.svc().store, &caller, &host, Timestamp::now())?;
    assert_eq!(
        (status.contiguous_through, status.gaps.len()),
        (Some(3), 0),
        "{status:?}"
    );
    assert_eq!(
        status.latest.first().map(|r| r.outcome.as_str()),
        Some("success"),
        "{status:?}"
    );
    // The archive holds every indexed bundle, byte for byte.
    for (json, sig) in &bundles {
        let v: Value = serde_json::from_slice(json)?;
        let key = mcp_server::archive::ArchiveKey {
            reseller_id: Some("acme".into()),
            site_id: "clinic-1".into(),
            host_id: "frontdesk-01".into(),
            seq: v["seq"].as_u64().ok_or("seq")?,
            bundle_id: v["bundle_id"].as_str().ok_or("id")?.into(),
        };
        let archived = server.svc().archive.get(&key)?.ok_or("archived")?;
        assert_eq!(
            (&archived.json, &archived.sig),
            (json, sig),
            "archived as received"
        );
        assert!(
            archived.retain_until > Timestamp::now() + SignedDuration::from_hours(24 * 2000),
            "six years"
        );
    }
    Ok(())
}

fn answer_raw(c: &ureq::Agent, url: &str, ct: &str, body: &[u8]) -> (u16, String) {
    match c.post(url).header("Content-Type", ct).send(body) {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// A TCP connection from a chosen loopback source address.
fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = rt.block_on(socket.connect(to))?.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// How long until the server closes `stream` (reads return 0 or an error), at most `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).ok()?;
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(_) => return Some(start.elapsed()),
        }
    }
}

#[test]
fn idle_and_trickling_clients_do_not_starve_hosts() -> TestResult {
    let server = TestServer::start_with(|c| {
        c.limits.handshake_timeout_sec = 1.0;
        c.limits.header_timeout_sec = 1.0;
        c.limits.request_timeout_sec = 2.0;
        c.limits.max_connections_per_peer = 8;
    });
    let a = server.enroll("clinic-1", "frontdesk-01");
    let addr = server.running.agent_addr();

    // 64 idle connections from one address, one trickling a byte every 200 ms from another.
    let mut idle: Vec<TcpStream> = (0..64)
        .map(|_| connect_from([127, 0, 0, 2], addr))
        .collect::<Result<_, _>>()?;
    let mut trickler = connect_from([127, 0, 0, 3], addr)?;
    let trickle_start = Instant::now();
    let trickle = std::thread::spawn(move || {
        for _ in 0..50 {
            if trickler.write_all(&[0x16]).is_err() {
                return Some(trickle_start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    });

    let started = Instant::now();
    let (status, body) = get(
        &a.client(&server),
        &format!("{}/api/v1/health", server.url()),
    );
    let took = started.elapsed();
    assert_eq!(
        status, 200,
        "the host is served while the others hang: {body}"
    );
    assert!(
        took < Duration::from_millis(900),
        "at once, not after a deadline: {took:?}"
    );

    let mut refused_at_once = 0;
    let mut closed_by_deadline = Vec::new();
    for s in idle.iter_mut() {
        match closed_within(s, Duration::from_secs(3)) {
            Some(t) if t < Duration::from_millis(300) => refused_at_once += 1,
            Some(t) => closed_by_deadline.push(t),
            None => {}
        }
    }
    assert_eq!(
        refused_at_once + closed_by_deadline.len(),
        64,
        "every idle connection is closed"
    );
    assert!(
        refused_at_once >= 56,
        "beyond 8 per address, closed at accept: {refused_at_once}"
    );
    assert!(
        closed_by_deadline
            .iter()
            .all(|t| *t < Duration::from_millis(2500)),
        "the handshake deadline closes the rest: {closed_by_deadline:?}"
    );
    let trickled = trickle.join().map_err(|_| "trickle thread")?;
    assert!(
        trickled.is_some_and(|t| t < Duration::from_secs(4)),
        "a trickling handshake is cut at its total deadline, not kept alive byte by byte: {trickled:?}"
    );
    eprintln!(
        "refused at accept {refused_at_once}, cut by deadline {}, trickler cut after {trickled:?}",
        closed_by_deadline.len()
    );

    // An idle kept-alive TLS connection is closed after header_timeout_sec too.
    let ca = server.ca_pem();
    let c = client(
        &ca,
        Some((a.cert_pem.as_deref().ok_or("cert")?, &a.tls_key_pem)),
    );
    let (status, _) = get(&c, &format!("{}/api/v1/health", server.url()));
    assert_eq!(status, 200, "still served afterwards");
    Ok(())
}
