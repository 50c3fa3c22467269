//! A box's SBOM on the central server: the agent's own channel code delivers an sbom
//! bundle and then its document; the server checks the document against the hash the
//! signed bundle records, keeps it as the host's latest SBOM and answers which hosts
//! run a package or a store path; a changed document, another host's certificate, a
//! bundle that is not an SBOM's and a bad query are each refused with the reason.

mod common;

use common::*;
use compliance_agent::evidence::{Attachment, Check, Draft, Outcome};
use compliance_agent::mcp::{ChannelSettings, McpClient};
use compliance_agent::sbom::SBOM_FILE;
use mcp_server::auth::Caller;
use mcp_server::store::sbom::SbomQuery;
use serde_json::{Value, json};

fn channel(server: &TestServer, b: &TestBox) -> McpClient {
    McpClient::new(ChannelSettings {
        url: server.url(),
        ca_pem: server.ca_pem().into_bytes(),
        client_identity: Some((
            b.cert_pem.clone().expect("enrolled").into_bytes(),
            b.tls_key_pem.clone().into_bytes(),
        )),
        api_key: None,
        site_id: b.site.clone(),
        host_id: b.host.clone(),
        timeout: std::time::Duration::from_secs(20),
    })
    .expect("channel")
}

/// A CycloneDX document of a small closure, components named as the agent names them.
fn document(openssl: &str) -> Vec<u8> {
    let path =
        |hash: char, name: &str| format!("/nix/store/{}-{name}", hash.to_string().repeat(32));
    let component = |hash: char, name: &str, version: &str| {
        let p = path(hash, &format!("{name}-{version}"));
        json!({
            "type": "library",
            "bom-ref": p,
            "name": name,
            "version": version,
            "properties": [{ "name": "nix:store_path", "value": p }],
        })
    };
    let system = path('s', "nixos-system-frontdesk-25.11");
    serde_json::to_vec(&json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "version": 1,
        "metadata": { "component": {
            "type": "operating-system",
            "bom-ref": system,
            "name": "nixos-system-frontdesk",
            "version": "25.11",
            "properties": [{ "name": "nix:store_path", "value": system }],
        }},
        "components": [
            component('o', "openssl", openssl),
            component('g', "glibc", "2.40"),
        ],
    }))
    .expect("json")
}

/// Stores an `sbom` bundle with `doc` beside it, as `compliance-agent sbom` does.
fn sbom_bundle(b: &TestBox, doc: &[u8]) -> std::path::PathBuf {
    let mut d = Draft::new(Check::Sbom, Outcome::Success);
    d.post_state = json!({
        "document": SBOM_FILE,
        "sha256": compliance_agent::crypto::sha256_hex(doc),
    });
    d.attachments = vec![Attachment {
        name: SBOM_FILE.into(),
        bytes: doc.to_vec(),
    }];
    b.store().store(d).expect("store sbom bundle").dir
}

fn hosts_running(server: &TestServer, q: SbomQuery) -> Vec<String> {
    server
        .svc()
        .store
        .sbom_hosts(&Caller::local("test"), &q)
        .expect("query")
        .into_iter()
        .map(|m| format!("{}/{}", m.site_id, m.host_id))
        .collect()
}

fn package(name: &str, version: Option<&str>) -> SbomQuery {
    SbomQuery {
        package: Some(name.into()),
        version: version.map(str::to_owned),
        store_path: None,
    }
}

fn put(agent: &ureq::Agent, url: &str, body: &[u8]) -> (u16, Value) {
    match agent
        .put(url)
        .header("Content-Type", "application/vnd.cyclonedx+json")
        .send(body)
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

/// Invariant: once the agent's channel has delivered an sbom bundle, the server holds its
/// document byte for byte and answers package, version and store-path queries with the
/// host; a newer SBOM replaces it, and the operator API answers the same.
#[test]
fn the_agent_delivers_its_sbom_and_the_server_answers_who_runs_a_package() -> TestResult {
    let server = TestServer::start();
    let a = server.enroll("clinic-1", "frontdesk-01");
    let b = server.enroll("clinic-1", "exam-02");
    let first = document("3.0.12");
    for (host, doc) in [(&a, &first), (&b, &document("3.0.13"))] {
        let dir = sbom_bundle(host, doc);
        channel(&server, host).upload(&dir, None)?;
    }
    assert_eq!(
        hosts_running(&server, package("openssl", None)),
        ["clinic-1/exam-02", "clinic-1/frontdesk-01"]
    );
    assert_eq!(
        hosts_running(&server, package("openssl", Some("3.0.12"))),
        ["clinic-1/frontdesk-01"]
    );
    let latest = server
        .svc()
        .store
        .latest_sbom(&Caller::local("test"), "clinic-1", "frontdesk-01")?
        .ok_or("the SBOM is kept")?;
    assert_eq!(latest.document, first, "byte for byte");
    assert_eq!(latest.components, 3, "two components and the system");

    // frontdesk-01 upgrades openssl: its new SBOM replaces the old one.
    let dir = sbom_bundle(&a, &document("3.0.13"));
    channel(&server, &a).upload(&dir, None)?;
    assert!(hosts_running(&server, package("openssl", Some("3.0.12"))).is_empty());
    let path = format!("/nix/store/{}-openssl-3.0.13", "o".repeat(32));
    assert_eq!(
        hosts_running(
            &server,
            SbomQuery {
                store_path: Some(path.clone()),
                ..SbomQuery::default()
            }
        ),
        ["clinic-1/exam-02", "clinic-1/frontdesk-01"]
    );

    // The operator API: the same answer, and a bad query refused with the reason.
    let token = format!("mcpo_test_admin_{}", uuid::Uuid::new_v4().simple());
    server.svc().store.create_operator(
        &Caller::local("test"),
        &mcp_server::store::Operator {
            name: "sbom-admin".into(),
            role: mcp_server::auth::Role::Admin,
            tenants: mcp_server::auth::Tenants::All,
            token_hash: mcp_server::auth::token_hash(&token),
            created_at: jiff::Timestamp::now(),
            disabled: false,
        },
    )?;
    let ops = client(&server.ca_pem(), None);
    let base = format!("https://{}", server.running.operator_addr());
    let get = |url: &str| -> (u16, Value) {
        match ops
            .get(url)
            .header("Authorization", format!("Bearer {}", token.trim()))
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
    };
    let (status, body) = get(&format!("{base}/api/v1/ops/sbom/hosts?path={path}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hosts"].as_array().map(Vec::len), Some(2), "{body}");
    let (status, body) = get(&format!(
        "{base}/api/v1/ops/sbom/hosts?package=openssl&path={path}"
    ));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not both"),
        "{body}"
    );
    let (status, _) = get(&format!("{base}/api/v1/ops/hosts/clinic-1/exam-02/sbom"));
    assert_eq!(status, 200);
    Ok(())
}

/// Invariant: the server indexes only the document the signed bundle names: a changed
/// document, a document for a bundle that is not an SBOM's, another host's route and an
/// unknown bundle are refused (422, 422, 403, 404) and the index keeps what it had.
#[test]
fn a_changed_document_or_another_hosts_route_is_refused() -> TestResult {
    let server = TestServer::start();
    let a = server.enroll("clinic-1", "frontdesk-01");
    let other = server.enroll("clinic-1", "exam-02");
    let good = document("3.0.12");
    let dir = sbom_bundle(&a, &good);
    channel(&server, &a).upload(&dir, None)?;
    let bundle: Value = serde_json::from_slice(&std::fs::read(dir.join("bundle.json"))?)?;
    let id = bundle["bundle_id"].as_str().ok_or("bundle_id")?;
    let route = |host: &str, id: &str| {
        format!(
            "{}/api/v1/hosts/clinic-1/{host}/bundles/{id}/sbom",
            server.url()
        )
    };

    // The box's copy changed after signing: the agent's own upload is refused, named.
    let dir2 = sbom_bundle(&a, &document("3.0.13"));
    std::fs::write(dir2.join(SBOM_FILE), document("9.9.9"))?;
    let err = channel(&server, &a)
        .upload(&dir2, None)
        .err()
        .ok_or("a changed document was accepted")?;
    assert!(
        err.to_string().contains("the document was changed"),
        "{err}"
    );
    assert_eq!(
        hosts_running(&server, package("openssl", Some("3.0.12"))),
        ["clinic-1/frontdesk-01"]
    );
    assert!(hosts_running(&server, package("openssl", Some("9.9.9"))).is_empty());

    let (status, body) = put(
        &a.client(&server),
        &route("frontdesk-01", id),
        b"{\"bomFormat\":\"CycloneDX\"}",
    );
    assert_eq!(status, 422, "{body}");
    let (status, body) = put(&other.client(&server), &route("frontdesk-01", id), &good);
    assert_eq!(status, 403, "another host's certificate: {body}");
    let (status, body) = put(
        &a.client(&server),
        &route("frontdesk-01", "no-such-bundle"),
        &good,
    );
    assert_eq!(status, 404, "{body}");
    let backup = {
        let stored = a
            .store()
            .store(Draft::new(Check::Backup, Outcome::Success))?;
        channel(&server, &a).upload(&stored.dir, None)?;
        let v: Value = serde_json::from_slice(&std::fs::read(stored.dir.join("bundle.json"))?)?;
        v["bundle_id"].as_str().ok_or("id")?.to_owned()
    };
    let (status, body) = put(&a.client(&server), &route("frontdesk-01", &backup), &good);
    assert_eq!(status, 422, "a backup bundle names no SBOM: {body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("names no SBOM"),
        "{body}"
    );

    let audit = server.svc().store.audit(&Caller::local("test"), 50)?;
    assert!(
        audit.iter().filter(|e| e.action == "sbom.upload").count() >= 3,
        "the refusals are audited: {audit:?}"
    );
    Ok(())
}
