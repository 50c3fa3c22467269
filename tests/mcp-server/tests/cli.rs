//! The `mcp-server` binary as an operator runs it: pki, init, enroll, order, serve, list.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use compliance_agent::crypto::SigningKey;
use compliance_agent::mcp::{ChannelSettings, McpClient};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mcp-server"))
        .args(args)
        .output()
        .expect("run mcp-server")
}

fn ok(args: &[&str]) -> Result<String, String> {
    let out = server(args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "mcp-server {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Kills the server when the test ends, however it ends.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_operator_sets_up_a_server_and_a_box_talks_to_it() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let pki = tmp.path().join("pki");
    let state = tmp.path().join("state");
    ok(&["pki", "--out", &s(&pki)])?;
    for file in [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        assert!(pki.join(file).is_file(), "pki wrote {file}");
    }
    let pubkey_path = PathBuf::from(ok(&["init", "--state", &s(&state)])?.trim());
    assert!(
        pubkey_path.is_file(),
        "init prints the order public key path"
    );

    let box_key = SigningKey::generate();
    let box_pub = tmp.path().join("box.pub.pem");
    std::fs::write(&box_pub, box_key.verifying_key().to_spki_pem()?)?;
    ok(&[
        "enroll",
        "--state",
        &s(&state),
        "--site",
        "clinic-1",
        "--host",
        "fd-01",
        "--pubkey",
        &s(&box_pub),
    ])?;
    let order_id = ok(&[
        "order",
        "--state",
        &s(&state),
        "--site",
        "clinic-1",
        "--host",
        "fd-01",
        "--runbook",
        "collect_evidence",
        "--params",
        "{\"note\":\"hello\"}",
    ])?;
    assert!(
        uuid::Uuid::parse_str(order_id.trim()).is_ok(),
        "order prints the id: {order_id}"
    );
    let bad = server(&[
        "order",
        "--state",
        &s(&state),
        "--site",
        "clinic-1",
        "--host",
        "fd-01",
        "--runbook",
        "collect_evidence",
        "--params",
        "not json",
    ]);
    assert_eq!(bad.status.code(), Some(2), "bad params are refused");

    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-server"))
        .args([
            "serve",
            "--state",
            &s(&state),
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &s(&pki.join("server.pem")),
            "--key",
            &s(&pki.join("server.key")),
            "--client-ca",
            &s(&pki.join("ca.pem")),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let serving = Serving(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("first line names the address: {line}"))?
        .to_owned();

    let client = McpClient::new(ChannelSettings {
        url,
        ca_pem: std::fs::read(pki.join("ca.pem"))?,
        client_identity: Some((
            std::fs::read(pki.join("client.pem"))?,
            std::fs::read(pki.join("client.key"))?,
        )),
        api_key: None,
        site_id: "clinic-1".into(),
        host_id: "fd-01".into(),
        timeout: std::time::Duration::from_secs(10),
    })?;
    assert_eq!(client.health()?.protocol, 1, "health over mTLS");
    let orders = client.orders()?;
    assert_eq!(orders.len(), 1, "the queued order is listed");
    assert_eq!(orders[0].order_id, order_id.trim(), "by its id");
    drop(serving);

    let listing = ok(&[
        "list",
        "--state",
        &s(&state),
        "--site",
        "clinic-1",
        "--host",
        "fd-01",
    ])?;
    assert!(
        listing.contains("(collect_evidence)") && listing.contains("0 bundle(s)"),
        "list shows the pending order: {listing}"
    );
    Ok(())
}
