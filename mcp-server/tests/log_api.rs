//! The transparency log's routes: a box proves only its own bundles, an operator only
//! its tenants'; a proof the log cannot give yet is "pending", never wrong; and the
//! proofs served verify offline with `mcp-server verify`.

mod common;

use common::*;
use compliance_agent::crypto::sha256_hex;
use compliance_agent::tlog::{BundleLeaf, LogVerifier};
use mcp_server::auth::{Caller, Role, Tenants, token_hash};
use mcp_server::store::Operator;
use serde_json::Value;

fn operator(server: &TestServer, name: &str, tenants: Tenants) -> String {
    let token = format!("mcpo_test_{name}_{}", uuid::Uuid::new_v4().simple());
    server
        .svc()
        .store
        .create_operator(
            &Caller::local("test"),
            &Operator {
                name: name.into(),
                role: Role::Auditor,
                tenants,
                token_hash: token_hash(&token),
                created_at: jiff::Timestamp::now(),
                disabled: false,
            },
        )
        .expect("operator");
    token
}

fn bearer(agent: &ureq::Agent, url: &str, token: &str) -> (u16, Value) {
    match agent
        .get(url)
        .header("Authorization", format!("Bearer {token}"))
        .call()
    {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

fn sequence(server: &TestServer) {
    let svc = server.svc();
    mcp_server::tlog::sequence(&*svc.store, &svc.log).expect("sequence");
}

#[test]
fn proofs_are_scoped_pending_is_said_and_answers_verify_offline() -> TestResult {
    // The background sequencer is slower than this test's next request (1 s), so the
    // pending answer is seen before the test sequences by hand.
    let server = TestServer::start();
    let a = server.enroll("clinic-1", "frontdesk-01");
    let b = server.enroll("clinic-2", "reception-02");
    let (ca, cb, url) = (a.client(&server), b.client(&server), server.url());
    let a_bundles = a.bundles(3);
    for (json, sig) in &a_bundles {
        let (status, body) = upload(&ca, &format!("{url}/api/v1/evidence"), json, sig);
        assert_eq!(status, 200, "{body}");
    }
    let bundle_id = |json: &[u8]| -> String {
        serde_json::from_slice::<Value>(json).expect("json")["bundle_id"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    let a0 = bundle_id(&a_bundles[0].0);
    let (status, body) = get(&ca, &format!("{url}/api/v1/log/inclusion?bundle_id={a0}"));
    if status == 202 {
        assert_eq!(body["status"], "pending", "pending says so: {body}");
    } else {
        // The background sequencer was faster: then the proof must be real.
        assert_eq!(status, 200, "{body}");
    }
    sequence(&server);
    let b_bundles = b.bundles(1);
    let (status, body) = upload(
        &cb,
        &format!("{url}/api/v1/evidence"),
        &b_bundles[0].0,
        &b_bundles[0].1,
    );
    assert_eq!(status, 200, "{body}");
    sequence(&server);

    // The box's own bundle: a proof that verifies against the signed checkpoint.
    let (status, cp) = get(&ca, &format!("{url}/api/v1/log/checkpoint"));
    assert_eq!(status, 200, "{cp}");
    let vkey = cp["log_key"].as_str().ok_or("log key")?.to_owned();
    assert_eq!(
        vkey,
        server.svc().log.vkey(),
        "the log key the box got at enrollment"
    );
    let verifier = LogVerifier::from_vkey(&vkey)?;
    let checkpoint = verifier.verify(cp["checkpoint"].as_str().ok_or("note")?.as_bytes())?;
    let (status, inc) = get(
        &ca,
        &format!(
            "{url}/api/v1/log/inclusion?bundle_id={a0}&tree_size={}",
            checkpoint.size
        ),
    );
    assert_eq!(status, 200, "{inc}");
    let proof: compliance_agent::tlog::InclusionProof =
        serde_json::from_value(inc["proof"].clone())?;
    let leaf = BundleLeaf {
        site_id: "clinic-1".into(),
        host_id: "frontdesk-01".into(),
        seq: 1,
        bundle_id: a0.clone(),
        bundle_sha256: compliance_agent::crypto::sha256(&a_bundles[0].0),
    };
    proof.verify(&leaf.hash()?, &checkpoint)?;
    assert_eq!(inc["leaf"]["bundle_sha256"], sha256_hex(&a_bundles[0].0));

    // Another host's bundle, an unknown one: not found, and the refusal is audited.
    let b0 = server
        .svc()
        .store
        .bundle_ids(&Caller::local("test"), "clinic-2", "reception-02")?
        .remove(0);
    let (status, body) = get(&ca, &format!("{url}/api/v1/log/inclusion?bundle_id={b0}"));
    assert_eq!(
        status, 404,
        "A asking for B's bundle learns nothing: {body}"
    );
    let (status, body) = get(&ca, &format!("{url}/api/v1/log/inclusion?bundle_id=nope"));
    assert_eq!(status, 404, "{body}");
    let audited = server
        .svc()
        .store
        .audit(&Caller::local("test"), 100)?
        .into_iter()
        .filter(|e| e.action == "log.inclusion" && e.outcome == "refused")
        .count();
    assert_eq!(audited, 2, "both refusals are in the audit log");

    // Sizes the log does not have, bad queries, no certificate.
    let (status, body) = get(
        &ca,
        &format!(
            "{url}/api/v1/log/inclusion?bundle_id={a0}&tree_size={}",
            checkpoint.size + 1
        ),
    );
    assert_eq!(status, 416, "beyond the log: {body}");
    let (status, body) = get(
        &ca,
        &format!("{url}/api/v1/log/inclusion?bundle_id={a0}&tree_size=0"),
    );
    assert_eq!(status, 416, "a tree too small to hold the leaf: {body}");
    let (status, body) = get(&ca, &format!("{url}/api/v1/log/consistency?old=3&new=2"));
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&ca, &format!("{url}/api/v1/log/consistency?old=1&new=99"));
    assert_eq!(status, 416, "{body}");
    let (status, body) = get(
        &ca,
        &format!("{url}/api/v1/log/inclusion?bundle_id={a0}&leaf_hash=x"),
    );
    assert_eq!(status, 400, "one way of naming the leaf: {body}");
    let (status, _) = get(
        &client(&server.ca_pem(), None),
        &format!("{url}/api/v1/log/checkpoint"),
    );
    assert_eq!(status, 401, "the log routes need the box's certificate");

    // Operators: their tenants' bundles only.
    let ops = format!("https://{}", server.running.operator_addr());
    let mine = operator(
        &server,
        "auditor-1",
        Tenants::Sites {
            site_ids: vec!["clinic-1".into()],
        },
    );
    let other = operator(
        &server,
        "auditor-2",
        Tenants::Sites {
            site_ids: vec!["clinic-2".into()],
        },
    );
    let agent = client(&server.ca_pem(), None);
    let (status, body) = bearer(
        &agent,
        &format!("{ops}/api/v1/ops/log/inclusion?bundle_id={a0}"),
        &mine,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = bearer(
        &agent,
        &format!("{ops}/api/v1/ops/log/inclusion?bundle_id={a0}"),
        &other,
    );
    assert_eq!(status, 404, "another site's auditor: {body}");
    let (status, cons) = bearer(
        &agent,
        &format!("{ops}/api/v1/ops/log/consistency?old=1"),
        &mine,
    );
    assert_eq!(status, 200, "{cons}");

    // Offline, with nothing but the log key: the answers verify, and a changed byte does not.
    let dir = tempfile::tempdir()?;
    let (inc_file, cons_file, json_file) = (
        dir.path().join("inclusion.json"),
        dir.path().join("consistency.json"),
        dir.path().join("bundle.json"),
    );
    std::fs::write(&inc_file, inc.to_string())?;
    std::fs::write(&cons_file, cons.to_string())?;
    std::fs::write(&json_file, &a_bundles[0].0)?;
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--log-key", vkey.as_str()];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_mcp-server"))
            .args(&args)
            .output()
            .expect("run mcp-server verify")
    };
    let inc_arg = inc_file.display().to_string();
    let cons_arg = cons_file.display().to_string();
    let json_arg = json_file.display().to_string();
    let out = verify(&[
        "--inclusion",
        &inc_arg,
        "--bundle",
        &json_arg,
        "--consistency",
        &cons_arg,
    ]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut changed = a_bundles[0].0.clone();
    changed[10] ^= 1;
    std::fs::write(&json_file, &changed)?;
    let out = verify(&["--inclusion", &inc_arg, "--bundle", &json_arg]);
    assert!(
        !out.status.success(),
        "a changed bundle byte fails verification"
    );
    let other_key = compliance_agent::tlog::LogSigner::new(
        verifier.name(),
        compliance_agent::crypto::SigningKey::generate(),
    )?
    .verifier()
    .to_vkey();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-server"))
        .args([
            "verify",
            "--log-key",
            &other_key,
            "--consistency",
            &cons_arg,
        ])
        .output()?;
    assert!(!out.status.success(), "another log key fails verification");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not signed by the log key"),
        "and says why: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
