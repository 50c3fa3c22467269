//! End to end once on each database backend, with the agent's own code on the box
//! side: enroll with a token, deliver evidence, receive a signed order, report its
//! result; the server's index shows each step.

mod common;
mod support;

use common::*;
use compliance_agent::crypto::VerifyingKey;
use compliance_agent::enroll::{EnrollFiles, enroll};
use compliance_agent::evidence::{Check, Draft, Outcome};
use compliance_agent::mcp::{ChannelSettings, McpClient};
use compliance_agent::orders::{Envelope, ORDER_PAYLOAD_TYPE, Order};
use mcp_server::auth::Caller;
use mcp_server::store::OrderState;
use support::postgres::TestPostgres;

fn enroll_deliver_order_result(server: &TestServer, backend: &str) -> TestResult {
    assert_eq!(
        server.svc().store.backend(),
        backend,
        "the backend under test"
    );
    let token = server.token("clinic-1", 1);
    let b = TestBox::new("clinic-1", "frontdesk-01");
    let dir = tempfile::tempdir()?;
    let files = EnrollFiles {
        ca_cert: dir.path().join("mcp/ca.pem"),
        client_cert: dir.path().join("mcp/client.pem"),
        client_key: dir.path().join("mcp/client.key"),
        order_pubkey: dir.path().join("mcp/order.pub.pem"),
    };
    let pubkey = b.key.verifying_key().to_spki_pem()?;
    let enrolled = enroll(&server.url(), &token, "frontdesk-01", &pubkey, &files)?;
    assert_eq!(enrolled.host_id, "frontdesk-01");
    let client = McpClient::new(ChannelSettings {
        url: server.url(),
        ca_pem: std::fs::read(&files.ca_cert)?,
        client_identity: Some((
            std::fs::read(&files.client_cert)?,
            std::fs::read(&files.client_key)?,
        )),
        api_key: None,
        site_id: "clinic-1".into(),
        host_id: "frontdesk-01".into(),
        timeout: std::time::Duration::from_secs(20),
    })?;

    // Deliver three bundles; the third again (a lost acknowledgement) is a duplicate.
    let store = b.store();
    let mut dirs = vec![];
    for i in 0..3 {
        let mut d = Draft::new(Check::Backup, Outcome::Success);
        d.pre_state = serde_json::json!({ "i": i });
        dirs.push(store.store(d)?.dir);
    }
    for d in &dirs {
        client.upload(d, None)?;
    }
    client.upload(&dirs[2], None)?;
    let admin = Caller::local("test");
    assert_eq!(
        server
            .svc()
            .store
            .seqs(&admin, "clinic-1", "frontdesk-01")?,
        vec![1, 2, 3],
        "three bundles in the chain"
    );

    // An operator's order reaches the box signed by the key it pinned at enrollment.
    let order = mcp_server::orders::create(
        server.svc(),
        &admin,
        &mcp_server::orders::OrderDraft {
            site_id: "clinic-1".into(),
            host_id: "frontdesk-01".into(),
            runbook_id: "collect_evidence".into(),
            params: serde_json::json!({}),
            ttl: None,
        },
    )?;
    let listed = client.orders()?;
    assert_eq!(listed.len(), 1, "the box lists its order");
    let key = VerifyingKey::from_spki_pem(&std::fs::read_to_string(&files.order_pubkey)?)?;
    let payload =
        Envelope::parse(listed[0].envelope.get().as_bytes())?.verify(ORDER_PAYLOAD_TYPE, &key)?;
    let parsed = Order::parse(&payload)?;
    assert_eq!(
        (parsed.order_id.as_str(), parsed.host_id.as_str()),
        (order.order_id.as_str(), "frontdesk-01")
    );

    // The result is a bundle in the chain, answering the order.
    let mut d = Draft::new(Check::Backup, Outcome::Success);
    d.order_id = Some(parsed.order_id.clone());
    d.runbook_id = Some(parsed.runbook_id.clone());
    let result = store.store(d)?;
    client.upload(&result.dir, Some(&parsed.order_id))?;
    let answered = server
        .svc()
        .store
        .order(&admin, &order.order_id)?
        .ok_or("the order is stored")?;
    assert_eq!(
        answered.state,
        OrderState::Answered,
        "the order is answered"
    );
    assert_eq!(answered.result_outcome.as_deref(), Some("success"));
    assert!(client.orders()?.is_empty(), "and no longer pending");
    assert_eq!(
        server
            .svc()
            .store
            .seqs(&admin, "clinic-1", "frontdesk-01")?,
        vec![1, 2, 3, 4]
    );
    Ok(())
}

#[test]
fn end_to_end_on_sqlite() -> TestResult {
    let server = TestServer::start();
    enroll_deliver_order_result(&server, "sqlite")
}

#[test]
fn end_to_end_on_postgres() -> TestResult {
    let pg = TestPostgres::start();
    let server = TestServer::start_with(|c| c.database_url = Some(pg.url.clone()));
    enroll_deliver_order_result(&server, "postgres")?;
    drop(server);
    drop(pg);
    Ok(())
}
