//! The Model Context Protocol tools driven by a client nobody here wrote: the official
//! Python MCP SDK (PyPI `mcp`, pinned in tests/python-requirements.txt), over stdio
//! (it spawns `mcp-server mcp --token-file F`) and over streamable HTTP (`/mcp` on the
//! in-process operator listener, HTTPS trusting the server's CA). The evidence comes
//! from real signed bundles delivered over mTLS by enrolled boxes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use compliance_agent::evidence::{Check, Draft, Outcome};
use jiff::{SignedDuration, Timestamp};
use mcp_server::auth::{Caller, OPERATOR_TOKEN_PREFIX, Role, Tenants, new_token, token_hash};
use mcp_server::enroll::TokenRequest;
use mcp_server::store::Operator;
use serde_json::{Value, json};

const READ_ONLY_TOOLS: &[&str] = &[
    "fleet_status",
    "list_evidence",
    "list_incidents",
    "show_bundle",
    "show_host",
    "show_incident",
    "verify_chain",
];
const MUTATING_TOOLS: &[&str] = &["propose_remediation", "request_order"];

/// (readOnly, destructive, idempotent, openWorld) each tool must declare: only
/// request_order reaches the boxes and can change them; a proposal changes only the
/// incident's plan.
fn expected_annotations(name: &str) -> (bool, bool, bool, bool) {
    match name {
        "request_order" => (false, true, false, true),
        "propose_remediation" => (false, false, false, false),
        _ => (true, false, true, false),
    }
}

/// The Python of the suite's virtualenv ($COMPLIANCE_TEST_VENV, else target/test-venv),
/// with the pinned SDK installed from tests/python-requirements.txt when it is missing.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::env::var_os("COMPLIANCE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/test-venv"));
    let python = venv.join("bin/python");
    let has_sdk = || {
        Command::new(&python)
            .args(["-c", "import mcp, httpx2"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_sdk() {
        return python;
    }
    let lock = std::fs::File::create(root.join("target/test-venv.lock")).expect("venv lock file");
    lock.lock().expect("lock the venv");
    if !has_sdk() {
        if !python.exists() {
            let made = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .expect("python3 -m venv (install python3-venv)");
            assert!(made.success(), "python3 -m venv {}", venv.display());
        }
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(root.join("tests/python-requirements.txt"))
            .status()
            .expect("pip");
        assert!(pip.success() && has_sdk(), "pip install the MCP SDK");
    }
    python
}

fn driver() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mcp_driver.py")
}

/// Two resellers' hosts with delivered evidence, and an operator token for each reseller.
struct World {
    server: TestServer,
    dir: tempfile::TempDir,
    /// acme's clinic-1/frontdesk-01: seven bundles.
    acme_bundles: Vec<String>,
    /// globex's clinic-9/reception-01: two bundles.
    globex_bundles: Vec<String>,
    acme_token: PathBuf,
    globex_token: PathBuf,
    config: PathBuf,
}

const ACME_HOST: &str = "clinic-1/frontdesk-01";
const GLOBEX_HOST: &str = "clinic-9/reception-01";

/// Stores bundles of (check, outcome) on the box and delivers each over mTLS.
fn deliver(server: &TestServer, b: &TestBox, kinds: &[(Check, Outcome)]) -> Vec<String> {
    let store = b.store();
    let client = b.client(server);
    kinds
        .iter()
        .enumerate()
        .map(|(i, (check, outcome))| {
            let mut d = Draft::new(*check, *outcome);
            d.pre_state = json!({ "i": i });
            let stored = store.store(d).expect("store bundle");
            let (json, sig) = read_bundle(&stored.dir);
            let (status, body) = upload(
                &client,
                &format!("{}/api/v1/evidence", server.url()),
                &json,
                &sig,
            );
            assert_eq!(
                (status, body["status"].as_str()),
                (200, Some("stored")),
                "delivered: {body}"
            );
            body["bundle_id"].as_str().expect("bundle id").to_owned()
        })
        .collect()
}

fn operator(server: &TestServer, dir: &Path, name: &str, role: Role, tenants: Tenants) -> PathBuf {
    let token = new_token(OPERATOR_TOKEN_PREFIX);
    server
        .svc()
        .store
        .create_operator(
            &Caller::local("test"),
            &Operator {
                name: name.into(),
                role,
                tenants,
                token_hash: token_hash(&token),
                created_at: Timestamp::now(),
                disabled: false,
            },
        )
        .expect("create operator");
    let file = dir.join(format!("{name}.token"));
    std::fs::write(&file, format!("{token}\n")).expect("write token");
    file
}

fn world_with(read_only: bool) -> World {
    let server = TestServer::start_with(|c| {
        c.mcp.read_only = read_only;
        c.orders.default_site_allowlist = vec!["collect_evidence".into(), "restart_unit".into()];
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let acme = server.enroll("clinic-1", "frontdesk-01");
    let acme_bundles = deliver(
        &server,
        &acme,
        &[
            (Check::Backup, Outcome::Success),
            (Check::Firewall, Outcome::Success),
            (Check::Backup, Outcome::Failed),
            (Check::Patching, Outcome::Success),
            (Check::Backup, Outcome::Success),
            (Check::Firewall, Outcome::Alert),
            (Check::Backup, Outcome::Failed),
        ],
    );
    let token = mcp_server::enroll::create_token(
        server.svc(),
        &Caller::local("test"),
        &TokenRequest {
            site_id: "clinic-9".into(),
            reseller_id: Some("globex".into()),
            uses: 1,
            expires_in: SignedDuration::from_hours(1),
        },
    )
    .expect("globex token")
    .token;
    let globex = TestBox::new("clinic-9", "reception-01");
    let answer = globex.enroll(&server, &token);
    assert_eq!(answer.0, 200, "globex enrollment: {}", answer.1);
    let globex = globex.with_cert(&answer.1);
    let globex_bundles = deliver(
        &server,
        &globex,
        &[
            (Check::Backup, Outcome::Success),
            (Check::TimeSync, Outcome::Success),
        ],
    );
    let acme_token = operator(
        &server,
        dir.path(),
        "acme-ops",
        Role::ResellerOperator,
        Tenants::Reseller {
            reseller_id: "acme".into(),
        },
    );
    let globex_token = operator(
        &server,
        dir.path(),
        "globex-ops",
        Role::ResellerOperator,
        Tenants::Reseller {
            reseller_id: "globex".into(),
        },
    );
    // The stdio server opens the same state as the in-process one.
    let config = dir.path().join("mcp-server.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nagent_listen = \"127.0.0.1:0\"\noperator_listen = \"127.0.0.1:0\"\n[orders]\ndefault_site_allowlist = [\"collect_evidence\", \"restart_unit\"]\n[mcp]\nread_only = {read_only}\n",
            state_dir(&server)
        ),
    )
    .expect("config");
    World {
        server,
        dir,
        acme_bundles,
        globex_bundles,
        acme_token,
        globex_token,
        config,
    }
}

fn world() -> World {
    world_with(false)
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Stdio,
    Http,
}

impl World {
    /// Runs `steps` through the Python SDK as the operator of `token`; returns its answer.
    fn drive(&self, transport: Transport, token: &Path, extra: &[&str], steps: Value) -> Value {
        let mut cmd = Command::new(python());
        cmd.arg(driver());
        match transport {
            Transport::Stdio => {
                cmd.arg("stdio")
                    .arg(env!("CARGO_BIN_EXE_mcp-server"))
                    .arg("--config")
                    .arg(&self.config)
                    .arg("mcp")
                    .arg("--token-file")
                    .arg(token)
                    .args(extra);
            }
            Transport::Http => {
                let ca = self.dir.path().join("ca.pem");
                std::fs::write(&ca, self.server.ca_pem()).expect("ca");
                cmd.arg("http")
                    .arg(format!(
                        "https://127.0.0.1:{}/mcp",
                        self.server.running.operator_addr().port()
                    ))
                    .arg(ca)
                    .arg(token);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the Python MCP client");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(json!({ "steps": steps }).to_string().as_bytes())
                .expect("plan");
        }
        let out = child.wait_with_output().expect("the Python MCP client");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{transport:?} client failed ({}): {stderr}",
            out.status
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client answer is not JSON ({e}): {}\n{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn orders(&self) -> usize {
        self.server
            .svc()
            .store
            .orders(&Caller::local("test"), None)
            .expect("orders")
            .len()
    }

    fn audit(&self) -> Vec<mcp_server::store::AuditEntry> {
        self.server
            .svc()
            .store
            .audit(&Caller::local("test"), 1000)
            .expect("audit")
    }
}

fn call(tool: &str, arguments: Value) -> Value {
    json!({ "op": "call", "tool": tool, "arguments": arguments })
}

/// The structured answer of a successful call (and that it did succeed).
fn ok(result: &Value, what: &str) -> Value {
    let r = &result["result"];
    assert_eq!(r["isError"], json!(false), "{what} succeeds: {result}");
    r["structuredContent"].clone()
}

/// The text of a tool error (and that it is one).
fn tool_error(result: &Value, what: &str) -> String {
    let r = &result["result"];
    assert_eq!(
        r["isError"],
        json!(true),
        "{what} is a tool error: {result}"
    );
    r["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn tool_names(list: &Value) -> Vec<String> {
    list["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Invariant: over either transport, a client initializes, lists every tool with
/// annotations that say truthfully which change nothing, and each read-only tool
/// answers from the signed evidence, naming the tenant and verifying signatures and links.
fn read_only_tools_answer(transport: Transport) -> TestResult {
    let w = world();
    let bundle = &w.acme_bundles[2];
    let incident = acme_incident(&w)?;
    let answer = w.drive(
        transport,
        &w.acme_token,
        &[],
        json!([
            { "op": "list_tools" },
            call("fleet_status", json!({})),
            call("show_host", json!({ "host": ACME_HOST })),
            call("list_evidence", json!({ "host": ACME_HOST, "check": "backup", "limit": 3 })),
            call("list_evidence", json!({ "host": ACME_HOST, "outcome": "failed" })),
            call("show_bundle", json!({ "bundle_id": bundle })),
            call("verify_chain", json!({ "host": ACME_HOST })),
            { "op": "list_resource_templates" },
            { "op": "read_resource", "uri": format!("bundle://{bundle}") },
            call("list_incidents", json!({ "host": ACME_HOST, "state": "all" })),
            call("show_incident", json!({ "incident_id": incident })),
            call("show_incident", json!({ "incident_id": "no-such-incident" })),
        ]),
    );
    {
        let r = answer["results"].as_array().ok_or("results")?;
        let listed = ok(&r[9], "list_incidents");
        let mut ids = Vec::new();
        for i in listed["incident_list"].as_array().ok_or("incident_list")? {
            assert_eq!(i["host"], ACME_HOST, "only the host asked for: {i}");
            assert_eq!(
                i["tenant"]["reseller_id"], "acme",
                "the tenant is named: {i}"
            );
            ids.push(i["incident_id"].clone());
        }
        assert!(
            ids.contains(&json!(incident)),
            "the failed backup's incident is listed: {listed}"
        );
        let shown = ok(&r[10], "show_incident");
        assert_eq!(shown["incident"]["incident_id"], json!(incident), "{shown}");
        assert!(
            !shown["timeline"].as_array().ok_or("timeline")?.is_empty(),
            "with its timeline: {shown}"
        );
        let text = tool_error(&r[11], "show_incident of an unknown id");
        assert!(text.contains("not found among your tenants"), "{text}");
    }
    assert_eq!(
        answer["initialize"]["serverInfo"]["name"], "mcp-server",
        "initialize names the server: {}",
        answer["initialize"]
    );
    let r = answer["results"].as_array().ok_or("results")?;

    let mut names = tool_names(&r[0]);
    names.sort();
    let mut want: Vec<&str> = READ_ONLY_TOOLS
        .iter()
        .chain(MUTATING_TOOLS)
        .copied()
        .collect();
    want.sort();
    assert_eq!(names, want, "every tool is listed");
    for t in r[0]["tools"].as_array().ok_or("tools")? {
        let name = t["name"].as_str().unwrap_or_default();
        let a = &t["annotations"];
        let (read_only, destructive, idempotent, open_world) = expected_annotations(name);
        assert_eq!(
            read_only,
            READ_ONLY_TOOLS.contains(&name),
            "{name} is listed on its side"
        );
        assert_eq!(a["readOnlyHint"], json!(read_only), "{name}: {a}");
        assert_eq!(a["destructiveHint"], json!(destructive), "{name}: {a}");
        assert_eq!(a["idempotentHint"], json!(idempotent), "{name}: {a}");
        assert_eq!(a["openWorldHint"], json!(open_world), "{name}: {a}");
        assert_eq!(
            t["inputSchema"]["additionalProperties"],
            json!(false),
            "{name} refuses unknown arguments in its schema"
        );
    }

    let fleet = ok(&r[1], "fleet_status");
    assert_eq!(fleet["hosts"], 1, "acme sees its one host: {fleet}");
    assert_eq!(fleet["host_list"][0]["host"], ACME_HOST, "{fleet}");
    assert_eq!(
        fleet["host_list"][0]["tenant"]["reseller_id"], "acme",
        "the tenant is named: {fleet}"
    );
    assert_eq!(
        fleet["caller"]["scope"],
        json!({ "kind": "reseller", "reseller_id": "acme" }),
        "{fleet}"
    );
    let failing = fleet["host_list"][0]["failing_checks"]
        .as_array()
        .ok_or("failing")?;
    assert!(
        failing.contains(&json!("backup")) && failing.contains(&json!("firewall")),
        "the latest backup failed and the firewall alerted: {fleet}"
    );

    let host = ok(&r[2], "show_host");
    assert_eq!(host["status"]["bundles"], 7, "{host}");
    assert_eq!(host["status"]["contiguous_through"], 7, "{host}");
    assert_eq!(host["tenant"]["site_id"], "clinic-1", "{host}");

    let backups = ok(&r[3], "list_evidence backup");
    let seqs: Vec<u64> = backups["bundles"]
        .as_array()
        .ok_or("bundles")?
        .iter()
        .map(|b| b["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        seqs,
        vec![7, 5, 3],
        "the newest three backups, newest first"
    );
    assert_eq!(
        backups["next_before_seq"], 3,
        "a full page says where to go on"
    );
    let failed = ok(&r[4], "list_evidence failed");
    assert_eq!(failed["count"], 2, "two failed bundles: {failed}");

    let shown = ok(&r[5], "show_bundle");
    let v = &shown["verification"];
    assert_eq!(v["ok"], true, "the stored bundle verifies: {v}");
    assert_eq!(v["signature"], "valid", "{v}");
    assert_eq!(v["chain_previous"], "linked", "{v}");
    assert_eq!(v["chain_next"], "linked", "{v}");
    assert_eq!(
        shown["bundle"]["bundle_id"],
        json!(bundle),
        "bundle.json itself"
    );
    assert_eq!(shown["bundle"]["outcome"], "failed", "{shown}");

    let chain = ok(&r[6], "verify_chain");
    assert_eq!(
        (&chain["ok"], &chain["checked"], &chain["valid"]),
        (&json!(true), &json!(7), &json!(7)),
        "{chain}"
    );

    assert_eq!(
        r[7]["templates"][0]["uriTemplate"], "bundle://{bundle_id}",
        "{}",
        r[7]
    );
    let contents = r[8]["contents"].as_array().ok_or("contents")?;
    let record = w
        .server
        .svc()
        .store
        .bundle(&Caller::local("test"), bundle)?
        .ok_or("indexed")?;
    let archived = std::fs::read(
        state_dir(&w.server)
            .join("archive")
            .join(&record.archive_key)
            .join("bundle.json"),
    )?;
    assert_eq!(
        contents[0]["text"].as_str().map(str::as_bytes),
        Some(&archived[..]),
        "the resource is bundle.json byte for byte"
    );
    let status: Value = serde_json::from_str(contents[1]["text"].as_str().ok_or("text")?)?;
    assert_eq!(
        (
            &status["verification"]["signature"],
            &status["tenant"]["reseller_id"]
        ),
        (&json!("valid"), &json!("acme")),
        "its signature status and tenant: {status}"
    );

    // Each call is in the audit log with its tool, arguments and outcome.
    let audit = w.audit();
    for tool in READ_ONLY_TOOLS {
        assert!(
            audit.iter().any(|e| e.action == format!("mcp.{tool}")
                && e.actor == "operator:acme-ops"
                && e.outcome == "ok"
                && e.detail.starts_with("arguments {")),
            "{tool} audited"
        );
    }
    assert!(
        audit.iter().any(|e| e.action == "mcp.show_bundle"
            && e.target == *bundle
            && e.detail.contains(bundle.as_str())),
        "the arguments are in the entry"
    );
    Ok(())
}

#[test]
fn stdio_initialize_list_and_call_each_read_only_tool() -> TestResult {
    read_only_tools_answer(Transport::Stdio)
}

#[test]
fn http_initialize_list_and_call_each_read_only_tool() -> TestResult {
    read_only_tools_answer(Transport::Http)
}

/// Invariant: an order requested twice meets the cooldown: the second is a tool error
/// naming it, audited, and no second order exists. Malformed arguments, a forbidden
/// runbook and a bad TTL are refused the same way; a disruptive runbook is stored
/// unsigned, waiting for a person, and no tool can approve it.
/// An open incident of the acme host (its delivered failed backups opened one).
fn acme_incident(w: &World) -> Result<String, Box<dyn std::error::Error>> {
    use mcp_server::store::incidents::{IncidentFilter, IncidentState};
    let (site, host) = ACME_HOST.split_once('/').ok_or("SITE/HOST")?;
    let open = w.server.svc().store.incidents(
        &Caller::local("test"),
        &IncidentFilter {
            state: Some(IncidentState::Open),
            site_id: Some(site.into()),
            host_id: Some(host.into()),
            ..IncidentFilter::default()
        },
    )?;
    Ok(open
        .first()
        .ok_or("the acme host's failed evidence opened an incident")?
        .incident_id
        .clone())
}

/// propose_remediation keeps a plan on the incident and signs nothing; another
/// reseller's token cannot plan it, and an unknown incident is named.
#[test]
fn propose_remediation_keeps_a_plan_and_signs_nothing() -> TestResult {
    let w = world();
    let incident = acme_incident(&w)?;
    let orders_before = w
        .server
        .svc()
        .store
        .orders(&Caller::local("test"), None)?
        .len();
    let answer = w.drive(
        Transport::Stdio,
        &w.acme_token,
        &[],
        json!([
            call("propose_remediation", json!({ "incident_id": incident })),
            call(
                "propose_remediation",
                json!({ "incident_id": "no-such-incident" })
            ),
        ]),
    );
    let r = answer["results"].as_array().ok_or("results")?;
    let plan = ok(&r[0], "propose_remediation");
    assert_eq!(plan["plan"]["incident_id"], json!(incident), "{plan}");
    assert_eq!(plan["tenant"]["reseller_id"], "acme", "{plan}");
    assert!(
        plan["plan"]["rationale"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{plan}"
    );
    let unknown = tool_error(&r[1], "an unknown incident");
    assert!(
        unknown.contains("not found among your tenants"),
        "{unknown}"
    );
    let other = w.drive(
        Transport::Stdio,
        &w.globex_token,
        &[],
        json!([call(
            "propose_remediation",
            json!({ "incident_id": incident })
        )]),
    );
    let text = tool_error(&other["results"][0], "another reseller's incident");
    assert!(
        text.contains("not found among your tenants") && !text.contains("acme"),
        "{text}"
    );
    let stored = w
        .server
        .svc()
        .store
        .incident(&Caller::local("test"), &incident)?
        .ok_or("incident")?;
    assert!(stored.plan.is_some(), "the plan is kept on the incident");
    assert_eq!(
        w.server
            .svc()
            .store
            .orders(&Caller::local("test"), None)?
            .len(),
        orders_before,
        "no order was made"
    );
    assert!(
        w.audit()
            .iter()
            .any(|e| e.action == "mcp.propose_remediation" && e.outcome == "ok"),
        "audited"
    );
    Ok(())
}

#[test]
fn request_order_goes_through_the_guardrails() -> TestResult {
    let w = world();
    let answer = w.drive(
        Transport::Http,
        &w.acme_token,
        &[],
        json!([
            call("request_order", json!({ "host": ACME_HOST, "runbook": "collect_evidence" })),
            call("request_order", json!({ "host": ACME_HOST, "runbook": "collect_evidence" })),
            call("request_order", json!({ "host": ACME_HOST, "runbook": "switch_generation" })),
            call("request_order", json!({ "host": ACME_HOST, "runbook": "collect_evidence", "force": true })),
            call("request_order", json!({ "host": ACME_HOST })),
            call("request_order", json!({ "host": ACME_HOST, "runbook": "collect_evidence", "ttl": 5 })),
            call("request_order", json!({ "host": ACME_HOST, "runbook": "restart_unit", "params": { "unit": "clamav-daemon.service" } })),
            { "op": "list_tools" },
        ]),
    );
    let r = answer["results"].as_array().ok_or("results")?;
    let first = ok(&r[0], "the first order");
    assert_eq!(
        (&first["state"], &first["signed"]),
        (&json!("pending"), &json!(true)),
        "{first}"
    );
    assert_eq!(first["tenant"]["reseller_id"], "acme", "{first}");
    let cooldown = tool_error(&r[1], "the second order");
    assert!(
        cooldown.contains("cooldown") && cooldown.contains("collect_evidence"),
        "names the cooldown: {cooldown}"
    );
    let forbidden = tool_error(&r[2], "a runbook off the allowlist");
    assert!(forbidden.contains("allowlist"), "{forbidden}");
    let unknown = tool_error(&r[3], "an unknown argument");
    assert!(
        unknown.contains("unknown field") && unknown.contains("force"),
        "{unknown}"
    );
    let missing = tool_error(&r[4], "a missing argument");
    assert!(missing.contains("runbook"), "{missing}");
    let ttl = tool_error(&r[5], "a TTL out of bounds");
    assert!(ttl.contains("ttl 5 s is out of bounds"), "{ttl}");
    let disruptive = ok(&r[6], "a disruptive order");
    assert_eq!(
        (&disruptive["state"], &disruptive["signed"]),
        (&json!("awaiting_approval"), &json!(false)),
        "{disruptive}"
    );
    assert!(
        disruptive["next"]
            .as_str()
            .is_some_and(|n| n.contains("second operator")),
        "{disruptive}"
    );
    let names = tool_names(&r[7]);
    assert!(
        !names.iter().any(|n| n.contains("approve")),
        "no tool approves: {names:?}"
    );

    assert_eq!(
        w.orders(),
        2,
        "the first order and the waiting one, nothing else"
    );
    let stored = w
        .server
        .svc()
        .store
        .order(
            &Caller::local("test"),
            disruptive["order_id"].as_str().ok_or("id")?,
        )?
        .ok_or("stored")?;
    assert!(
        stored.envelope.is_none(),
        "the disruptive order is not signed"
    );
    let audit = w.audit();
    let refused: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "mcp.request_order" && e.outcome == "refused")
        .collect();
    assert_eq!(refused.len(), 5, "every refusal audited: {refused:#?}");
    assert!(
        refused.iter().any(|e| e.detail.contains("cooldown")
            && e.detail.contains("\"runbook\":\"collect_evidence\"")
            && e.target == ACME_HOST),
        "the cooldown refusal with its arguments: {refused:#?}"
    );
    Ok(())
}

/// Invariant: a reseller's token never sees another reseller's host: every tool answers
/// "not found among your tenants" for it (as for a host that does not exist), no order is
/// made, the fleet lists only its own, and each refusal is audited.
#[test]
fn reseller_token_cannot_see_another_resellers_host() -> TestResult {
    let w = world();
    let acme_bundle = &w.acme_bundles[0];
    for transport in [Transport::Stdio, Transport::Http] {
        let answer = w.drive(
            transport,
            &w.globex_token,
            &[],
            json!([
                call("fleet_status", json!({})),
                call("show_host", json!({ "host": ACME_HOST })),
                call("list_evidence", json!({ "host": ACME_HOST })),
                call("show_bundle", json!({ "bundle_id": acme_bundle })),
                call("verify_chain", json!({ "host": ACME_HOST })),
                call(
                    "request_order",
                    json!({ "host": ACME_HOST, "runbook": "collect_evidence" })
                ),
                call("fleet_status", json!({ "site": "clinic-1" })),
                call("show_host", json!({ "host": "clinic-1/no-such-host" })),
                call("show_bundle", json!({ "bundle_id": w.globex_bundles[1] })),
                { "op": "read_resource", "uri": format!("bundle://{acme_bundle}") },
                call("list_incidents", json!({ "host": ACME_HOST })),
            ]),
        );
        let text = tool_error(
            &answer["results"][10],
            "list_incidents of another reseller's host",
        );
        assert!(
            text.contains("not found among your tenants") && !text.contains("acme"),
            "{transport:?}: {text}"
        );
        let r = answer["results"].as_array().ok_or("results")?;
        let fleet = ok(&r[0], "fleet_status");
        assert_eq!(
            fleet["hosts"], 1,
            "{transport:?}: only its own host: {fleet}"
        );
        assert_eq!(fleet["host_list"][0]["host"], GLOBEX_HOST, "{fleet}");
        assert_eq!(
            fleet["host_list"][0]["tenant"]["reseller_id"], "globex",
            "{fleet}"
        );
        for (i, what) in [
            (1, "show_host"),
            (2, "list_evidence"),
            (3, "show_bundle"),
            (4, "verify_chain"),
            (5, "request_order"),
            (6, "fleet_status of the other site"),
            (7, "a host that does not exist"),
        ] {
            let text = tool_error(&r[i], what);
            assert!(
                text.contains("not found among your tenants"),
                "{transport:?} {what}: {text}"
            );
            assert!(
                !text.contains("acme"),
                "{transport:?} {what} names nothing of the other tenant: {text}"
            );
        }
        let unread = &r[9]["protocol_error"];
        assert!(
            unread["message"]
                .as_str()
                .is_some_and(|m| m.contains("not found among your tenants")),
            "{transport:?}: another reseller's bundle is no resource: {}",
            r[9]
        );
        let own = ok(&r[8], "its own bundle");
        assert_eq!(own["verification"]["ok"], true, "{own}");
        assert_eq!(own["tenant"]["reseller_id"], "globex", "{own}");
    }
    assert_eq!(w.orders(), 0, "no order was made");
    let audit = w.audit();
    let refused = |prefix: &str| {
        audit
            .iter()
            .filter(|e| {
                e.actor == "operator:globex-ops"
                    && e.outcome == "refused"
                    && e.action.starts_with(prefix)
            })
            .count()
    };
    assert_eq!(
        refused("mcp."),
        18,
        "nine refusals per transport (eight tool calls, one resource), each audited"
    );
    assert_eq!(
        refused("order.create:"),
        2,
        "and the order refusal itself, once per transport"
    );
    Ok(())
}

/// Invariant: a read-only server (CLI flag, `[mcp] read_only`, or an auditor's token on
/// stdio) registers no mutating tool: none is listed, and calling one is refused,
/// audited, and makes no order.
#[test]
fn read_only_mode_lists_no_mutating_tool() -> TestResult {
    let check = |w: &World, token: &Path, transport: Transport, extra: &[&str]| -> TestResult {
        let answer = w.drive(
            transport,
            token,
            extra,
            json!([
                { "op": "list_tools" },
                call("request_order", json!({ "host": ACME_HOST, "runbook": "collect_evidence" })),
                call("fleet_status", json!({})),
            ]),
        );
        let r = answer["results"].as_array().ok_or("results")?;
        let mut names = tool_names(&r[0]);
        names.sort();
        assert_eq!(
            names, READ_ONLY_TOOLS,
            "{transport:?} {extra:?}: only read-only tools"
        );
        for t in r[0]["tools"].as_array().ok_or("tools")? {
            assert_eq!(t["annotations"]["readOnlyHint"], true, "{t}");
        }
        let refused = &r[1];
        let message = refused["protocol_error"]["message"]
            .as_str()
            .or_else(|| refused["result"]["content"][0]["text"].as_str())
            .unwrap_or_default();
        assert!(
            message.contains("read-only"),
            "{transport:?}: refused, naming read-only mode: {refused}"
        );
        ok(&r[2], "a read-only tool still answers");
        assert!(
            answer["initialize"]["instructions"]
                .as_str()
                .is_some_and(|i| i.contains("read-only")),
            "the server says it is read-only"
        );
        Ok(())
    };
    let w = world();
    check(&w, &w.acme_token, Transport::Stdio, &["--read-only"])?;
    // An auditor's role changes nothing: its stdio server is read-only without the flag.
    let auditor = operator(
        &w.server,
        w.dir.path(),
        "acme-auditor",
        Role::Auditor,
        Tenants::Sites {
            site_ids: vec!["clinic-1".into()],
        },
    );
    check(&w, &auditor, Transport::Stdio, &[])?;
    let ro = world_with(true);
    check(&ro, &ro.acme_token, Transport::Http, &[])?;
    check(&ro, &ro.acme_token, Transport::Stdio, &[])?;
    assert_eq!(w.orders() + ro.orders(), 0, "no order was made");
    let audited = |w: &World| {
        w.audit()
            .iter()
            .filter(|e| {
                e.action == "mcp.request_order"
                    && e.outcome == "refused"
                    && e.detail.contains("read-only")
            })
            .count()
    };
    assert_eq!((audited(&w), audited(&ro)), (2, 2), "each refusal audited");
    Ok(())
}

/// Invariant: `/mcp` takes the operator API's authentication: no token or a wrong one
/// is refused with 401 before MCP sees the request, and audited.
#[test]
fn http_endpoint_refuses_missing_and_wrong_tokens() -> TestResult {
    let w = world();
    let agent = client(&w.server.ca_pem(), None);
    let url = format!(
        "https://127.0.0.1:{}/mcp",
        w.server.running.operator_addr().port()
    );
    let init = json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": { "name": "t", "version": "1" } } });
    for auth in [None, Some("Bearer mcpo1_not-a-token")] {
        let mut req = agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream");
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send(init.to_string().as_bytes())?;
        assert_eq!(resp.status().as_u16(), 401, "{auth:?} refused");
    }
    let refusals = w
        .audit()
        .into_iter()
        .filter(|e| e.action == "ops.authenticate" && e.outcome == "refused")
        .count();
    assert_eq!(refusals, 2, "both audited");
    Ok(())
}

/// Invariant: `mcp-server mcp` with a token that names no operator does not serve:
/// it exits non-zero naming the token file, and the attempt is audited.
#[test]
fn stdio_refuses_a_wrong_token_file() -> TestResult {
    let w = world();
    let bad = w.dir.path().join("bad.token");
    std::fs::write(&bad, "mcpo1_nobody\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-server"))
        .arg("--config")
        .arg(&w.config)
        .args(["mcp", "--token-file"])
        .arg(&bad)
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(
        stderr.contains("bad.token") && stderr.contains("not valid"),
        "names the file: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on the protocol channel");
    assert!(
        w.audit()
            .iter()
            .any(|e| e.action == "mcp.authenticate" && e.outcome == "refused"),
        "audited"
    );
    Ok(())
}

/// Invariant: verification reads the archived evidence itself, so an insider who edits
/// one archived bundle or deletes another cannot hide it: show_bundle and verify_chain
/// name each, and the chain is not `ok`.
#[test]
fn tampered_or_missing_archived_evidence_is_named() -> TestResult {
    let w = world();
    let admin = Caller::local("test");
    let archive = state_dir(&w.server).join("archive");
    let object = |i: usize| -> Result<PathBuf, Box<dyn std::error::Error>> {
        let r = w
            .server
            .svc()
            .store
            .bundle(&admin, &w.acme_bundles[i])?
            .ok_or("indexed")?;
        Ok(archive.join(r.archive_key))
    };
    // seq 3: one byte of bundle.json changed; seq 5: the whole object removed.
    let edited = object(2)?.join("bundle.json");
    let mut bytes = std::fs::read(&edited)?;
    let at = bytes
        .iter()
        .position(|b| *b == b'f')
        .ok_or("a byte to change")?;
    bytes[at] = b'F';
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&edited, std::fs::Permissions::from_mode(0o644))?;
    std::fs::write(&edited, &bytes)?;
    std::fs::remove_dir_all(object(4)?)?;

    let answer = w.drive(
        Transport::Http,
        &w.acme_token,
        &[],
        json!([
            call("show_bundle", json!({ "bundle_id": w.acme_bundles[2] })),
            call("show_bundle", json!({ "bundle_id": w.acme_bundles[4] })),
            call("show_bundle", json!({ "bundle_id": w.acme_bundles[3] })),
            call("verify_chain", json!({ "host": ACME_HOST })),
        ]),
    );
    let r = answer["results"].as_array().ok_or("results")?;
    let v = &ok(&r[0], "the edited bundle")["verification"];
    assert_eq!(
        (&v["ok"], &v["signature"], &v["hash_matches_index"]),
        (&json!(false), &json!("invalid"), &json!(false)),
        "{v}"
    );
    let v = &ok(&r[1], "the removed bundle")["verification"];
    assert_eq!(
        (&v["ok"], &v["signature"]),
        (&json!(false), &json!("missing")),
        "{v}"
    );
    let v = &ok(&r[2], "an untouched neighbour")["verification"];
    assert_eq!(v["ok"], true, "{v}");
    let chain = ok(&r[3], "verify_chain");
    assert_eq!(
        (&chain["ok"], &chain["checked"], &chain["valid"]),
        (&json!(false), &json!(7), &json!(5)),
        "{chain}"
    );
    let problems = chain["problems"].to_string();
    assert!(
        problems.contains("seq 3: the archived bundle.json does not hash")
            && problems.contains("seq 3: bundle.sig does not verify")
            && problems.contains("seq 5: bundle ")
            && problems.contains("missing from the archive"),
        "each is named: {problems}"
    );
    Ok(())
}

/// Invariant: the Python driver passes pyflakes (tests/run installs pyflakes3).
#[test]
fn python_driver_is_lint_clean() -> TestResult {
    let out = Command::new("pyflakes3")
        .arg(driver())
        .output()
        .map_err(|e| format!("pyflakes3: {e}; apt-get install pyflakes3 (tests/run does)"))?;
    assert!(
        out.status.success(),
        "pyflakes3: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
