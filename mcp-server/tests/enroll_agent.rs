//! The agent's own `enroll` code against the server: pinning by the token's CA
//! fingerprint, the files it writes, and the channel working with them.

mod common;

use common::*;
use compliance_agent::crypto::SigningKey;
use compliance_agent::enroll::{EnrollFiles, enroll};
use compliance_agent::mcp::{ChannelSettings, McpClient};

#[test]
fn a_box_enrolls_with_a_token_and_then_speaks_protocol_v1() -> TestResult {
    let server = TestServer::start();
    let token = server.token("clinic-1", 1);
    let dir = tempfile::tempdir()?;
    let files = EnrollFiles {
        ca_cert: dir.path().join("mcp/ca.pem"),
        client_cert: dir.path().join("mcp/client.pem"),
        client_key: dir.path().join("mcp/client.key"),
        order_pubkey: dir.path().join("mcp/order.pub.pem"),
    };
    let key = SigningKey::generate();
    let pubkey = key.verifying_key().to_spki_pem()?;

    // A token pinning another CA is refused before anything is sent.
    let wrong = format!(
        "{}.{}",
        token.rsplit_once('.').map_or("", |t| t.0),
        "1".repeat(64)
    );
    let err = enroll(&server.url(), &wrong, "frontdesk-01", &pubkey, &files)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("pins"), "another CA is refused: {err}");
    assert!(!files.client_cert.exists(), "nothing written");

    let enrolled = enroll(&server.url(), &token, "frontdesk-01", &pubkey, &files)?;
    assert_eq!(
        (enrolled.site_id.as_str(), enrolled.host_id.as_str()),
        ("clinic-1", "frontdesk-01")
    );
    let client = McpClient::new(ChannelSettings {
        url: server.url(),
        ca_pem: std::fs::read(&files.ca_cert)?,
        client_identity: Some((
            std::fs::read(&files.client_cert)?,
            std::fs::read(&files.client_key)?,
        )),
        api_key: None,
        site_id: enrolled.site_id.clone(),
        host_id: enrolled.host_id.clone(),
        timeout: std::time::Duration::from_secs(10),
    })?;
    assert_eq!(client.health()?.protocol, 1, "the enrolled box is served");
    assert!(client.orders()?.is_empty(), "and lists its (empty) orders");

    let again = enroll(&server.url(), &token, "frontdesk-02", &pubkey, &files)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        again.contains("used up"),
        "the token was single-use: {again}"
    );
    Ok(())
}
