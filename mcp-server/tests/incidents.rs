//! Incidents, the planner and the executor against a server on loopback in this process:
//! evidence from the real agent binary and from the agent's evidence store, the rule-based
//! planner and the LLM planner against a local chat-completions endpoint this test starts
//! (no model runs here), the executor in each site mode, and the whole loop end to end.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use compliance_agent::evidence::{Check, Draft, Outcome};
use jiff::{SignedDuration, Timestamp};
use mcp_server::auth::{Caller, Role, Tenants, token_hash};
use mcp_server::config::{Config, ExecutorMode, LlmSettings};
use mcp_server::executor::ExecError;
use mcp_server::orders::OrderError;
use mcp_server::store::incidents::{IncidentFilter, IncidentRecord, IncidentState, PlanState};
use mcp_server::store::{Operator, OrderState};
use serde_json::{Value, json};

const SITE: &str = "clinic-1";

fn admin() -> Caller {
    Caller::local("test")
}

/// A box driven through the real `compliance-agent` binary: its own key, evidence store,
/// upload queue and the mTLS files its `enroll` wrote.
struct AgentBox {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl AgentBox {
    fn enroll(server: &TestServer, host: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let keygen = run_agent(
            None,
            &["keygen", "--out", &d.join("keys").display().to_string()],
        );
        assert!(keygen.status.success(), "keygen: {}", text(&keygen.stderr));
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "site_id = \"{SITE}\"\nhost_id = \"{host}\"\nsigning_key_file = \"{k}\"\nevidence_dir = \"{e}\"\nstate_dir = \"{s}\"\nmcp_url = \"{url}\"\nca_cert_file = \"{s}/mcp/ca.pem\"\nclient_cert_file = \"{s}/mcp/client.pem\"\nclient_key_file = \"{s}/mcp/client.key\"\nmcp_order_pubkey_file = \"{s}/mcp/order-signing.pub.pem\"\n",
                k = d.join("keys/signing.key").display(),
                e = d.join("evidence").display(),
                s = d.display(),
                url = server.url(),
            ),
        )
        .expect("write agent config");
        let b = Self { dir, config };
        let token = server.token(SITE, 1);
        let out = b.run(&["enroll", "--server", &server.url(), "--token", &token]);
        assert!(out.status.success(), "enroll: {}", text(&out.stderr));
        b
    }

    fn run(&self, args: &[&str]) -> Output {
        run_agent(Some(&self.config), args)
    }

    /// Records a bundle of `check` with `outcome` and delivers the queue; its bundle id.
    fn report(&self, check: &str, outcome: &str) -> String {
        let out = self.run(&[
            "evidence",
            "add",
            "--check",
            check,
            "--outcome",
            outcome,
            "--json",
        ]);
        assert!(out.status.success(), "evidence add: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        self.flush();
        v["bundle_id"].as_str().unwrap_or_default().to_owned()
    }

    fn flush(&self) {
        let out = self.run(&["queue", "flush"]);
        assert!(
            out.status.success(),
            "queue flush: {} {}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    fn poll_orders(&self) -> Value {
        let out = self.run(&["orders", "poll", "--json"]);
        assert!(
            out.status.success(),
            "orders poll: {} {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn state_dir(&self) -> &Path {
        self.dir.path()
    }
}

fn run_agent(config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(common::agent_binary());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args)
        .env_remove("COMPLIANCE_AGENT_CONFIG")
        .output()
        .expect("run compliance-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn server_with(mode: ExecutorMode, edit: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.remediation.default_site_mode = mode;
        c.remediation.worker_interval_ms = 50;
        edit(c);
    })
}

fn incidents_of(server: &TestServer, host: &str) -> Vec<IncidentRecord> {
    server
        .svc()
        .store
        .incidents(
            &admin(),
            &IncidentFilter {
                site_id: Some(SITE.into()),
                host_id: Some(host.into()),
                ..IncidentFilter::default()
            },
        )
        .expect("list incidents")
}

fn open_of(server: &TestServer, host: &str, cause: &str) -> Option<IncidentRecord> {
    incidents_of(server, host)
        .into_iter()
        .find(|i| i.cause == cause && i.state == IncidentState::Open)
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the background executor has acted on the incident.
fn settled(server: &TestServer, id: &str) -> IncidentRecord {
    wait_until("the executor to act", Duration::from_secs(20), || {
        server
            .svc()
            .store
            .incident(&admin(), id)
            .ok()
            .flatten()
            .filter(|i| !matches!(i.plan_state, PlanState::Wanted | PlanState::Claimed))
    })
}

/// Delivers one bundle of the agent's own evidence store over HTTPS with the box's certificate.
fn deliver(server: &TestServer, b: &TestBox, json: &[u8], sig: &[u8]) -> (u16, Value) {
    upload(
        &b.client(server),
        &format!("{}/api/v1/evidence", server.url()),
        json,
        sig,
    )
}

/// A scan-shaped drift bundle: status, severity, reason and the box's recommended fix.
fn drift(b: &TestBox, check: Check, recommended: Option<(&str, Value)>) -> (Vec<u8>, Vec<u8>) {
    let mut d = Draft::new(check, Outcome::Alert);
    d.pre_state = json!({
        "status": "drifted",
        "severity": "high",
        "reason": format!("{check} drifted"),
        "facts": {},
        "recommended": recommended.map(|(r, p)| vec![json!({ "runbook": r, "params": p })]).unwrap_or_default(),
    });
    d.error = Some(format!("{check} drifted"));
    let stored = b.store().store(d).expect("store bundle");
    read_bundle(&stored.dir)
}

fn allow(server: &TestServer, runbooks: &[&str]) {
    let store = &server.svc().store;
    let mut site = store
        .site(&admin(), SITE)
        .expect("site")
        .expect("site exists");
    for r in runbooks {
        if !site.runbook_allowlist.iter().any(|a| a == r) {
            site.runbook_allowlist.push((*r).into());
        }
    }
    store.put_site(&admin(), &site).expect("allow runbooks");
}

/// An operator account: its caller and its token.
fn operator(server: &TestServer, name: &str, role: Role, tenants: Tenants) -> (Caller, String) {
    let token = mcp_server::auth::new_token(mcp_server::auth::OPERATOR_TOKEN_PREFIX);
    server
        .svc()
        .store
        .create_operator(
            &admin(),
            &Operator {
                name: name.into(),
                role,
                tenants: tenants.clone(),
                token_hash: token_hash(&token),
                created_at: Timestamp::now(),
                disabled: false,
            },
        )
        .expect("create operator");
    (
        Caller {
            actor: format!("operator:{name}"),
            role,
            tenants,
            peer: None,
        },
        token,
    )
}

fn acme() -> Tenants {
    Tenants::Reseller {
        reseller_id: "acme".into(),
    }
}

#[test]
fn the_real_agent_opens_updates_and_resolves_an_incident() -> TestResult {
    // Invariant: failing evidence of a check opens one incident per host and cause,
    // later failures update it, other checks leave it alone, and compliant evidence of
    // the check resolves it with the remediation duration recorded.
    let server = server_with(ExecutorMode::Off, |_| {});
    let b = AgentBox::enroll(&server, "frontdesk-01");
    let first = b.report("backup", "alert");
    let inc = open_of(&server, "frontdesk-01", "check:backup").ok_or("an open backup incident")?;
    assert_eq!(inc.check.as_deref(), Some("backup"));
    assert_eq!(inc.severity, "high", "backup's default severity");
    assert!(
        inc.hipaa_controls
            .iter()
            .any(|c| c == "164.308(a)(7)(ii)(A)"),
        "the check's HIPAA controls: {:?}",
        inc.hipaa_controls
    );
    let second = b.report("backup", "failed");
    b.report("firewall", "success");
    let all = incidents_of(&server, "frontdesk-01");
    assert_eq!(all.len(), 1, "one incident for the host and cause: {all:?}");
    let view = mcp_server::incidents::show(server.svc(), &admin(), &inc.incident_id)?;
    let evidence: Vec<&str> = view
        .timeline
        .iter()
        .filter(|e| e.kind == "evidence")
        .filter_map(|e| e.bundle_id.as_deref())
        .collect();
    assert_eq!(
        evidence,
        vec![first.as_str(), second.as_str()],
        "both failures on the timeline"
    );

    let fixed = b.report("backup", "success");
    let done = server
        .svc()
        .store
        .incident(&admin(), &inc.incident_id)?
        .ok_or("still listed")?;
    assert_eq!(
        done.state,
        IncidentState::Resolved,
        "compliant evidence resolves it"
    );
    assert!(
        done.remediation_sec.is_some(),
        "remediation duration recorded"
    );
    assert!(
        done.resolution
            .as_deref()
            .is_some_and(|r| r.contains(&fixed)),
        "the resolution names the bundle: {:?}",
        done.resolution
    );
    assert!(open_of(&server, "frontdesk-01", "check:backup").is_none());

    // Failing again later is a new incident, not the old one reopened.
    b.report("backup", "alert");
    let again = open_of(&server, "frontdesk-01", "check:backup").ok_or("a new incident")?;
    assert_ne!(again.incident_id, inc.incident_id);
    Ok(())
}

#[test]
fn redelivered_bundles_update_nothing_twice() -> TestResult {
    // Invariant: the incident update is idempotent: a bundle delivered again (a lost
    // acknowledgement, or a crash between recording it and its incident update) is on
    // the timeline once.
    let server = server_with(ExecutorMode::Off, |_| {});
    let b = server.enroll(SITE, "h1");
    let (json, sig) = drift(&b, Check::Firewall, None);
    for _ in 0..3 {
        let (status, body) = deliver(&server, &b, &json, &sig);
        assert_eq!(status, 200, "{body}");
    }
    let inc = open_of(&server, "h1", "check:firewall").ok_or("incident")?;
    let evidence = server
        .svc()
        .store
        .incident_events(&admin(), &inc.incident_id)?
        .into_iter()
        .filter(|e| e.kind == "evidence")
        .count();
    assert_eq!(
        evidence, 1,
        "one timeline entry for one bundle delivered three times"
    );
    Ok(())
}

#[test]
fn chain_gaps_and_bad_signatures_open_their_incidents() -> TestResult {
    // Invariant: a hole in a host's chain opens a chain-gap incident that the late bundle
    // resolves; a bundle whose signature does not verify is refused and opens a critical
    // incident that stays open until an operator closes it with a reason.
    let server = server_with(ExecutorMode::Off, |_| {});
    let b = server.enroll(SITE, "h1");
    let bundles = b.bundles(4);
    assert_eq!(deliver(&server, &b, &bundles[0].0, &bundles[0].1).0, 200);
    assert_eq!(deliver(&server, &b, &bundles[2].0, &bundles[2].1).0, 200);
    let gap = open_of(&server, "h1", "chain_gap").ok_or("a chain-gap incident")?;
    assert!(gap.summary.contains("seq 2 is missing"), "{}", gap.summary);
    assert_eq!(deliver(&server, &b, &bundles[1].0, &bundles[1].1).0, 200);
    let filled = server
        .svc()
        .store
        .incident(&admin(), &gap.incident_id)?
        .ok_or("listed")?;
    assert_eq!(
        filled.state,
        IncidentState::Resolved,
        "the late bundle fills the gap"
    );

    let mut bad = bundles[3].1.clone();
    bad[0] ^= 0xff;
    let (status, body) = deliver(&server, &b, &bundles[3].0, &bad);
    assert_eq!(status, 422, "refused: {body}");
    let sig = open_of(&server, "h1", "bad_signature").ok_or("a bad-signature incident")?;
    assert_eq!(sig.severity, "critical");
    assert_eq!(deliver(&server, &b, &bundles[3].0, &bundles[3].1).0, 200);
    assert!(
        open_of(&server, "h1", "bad_signature").is_some(),
        "good evidence afterwards does not excuse a forged bundle"
    );
    let (auditor, _) = operator(
        &server,
        "auditor",
        Role::Auditor,
        Tenants::Sites {
            site_ids: vec![SITE.into()],
        },
    );
    assert!(
        mcp_server::incidents::close(server.svc(), &auditor, &sig.incident_id, "looked at it")
            .is_err(),
        "an auditor cannot close"
    );
    assert!(
        mcp_server::incidents::close(server.svc(), &admin(), &sig.incident_id, "  ").is_err(),
        "closing needs a reason"
    );
    let closed = mcp_server::incidents::close(
        server.svc(),
        &admin(),
        &sig.incident_id,
        "key rotated after a disk swap; the box re-enrolled",
    )?;
    assert_eq!(closed.state, IncidentState::Closed);
    let audit = server.svc().store.audit(&admin(), 50)?;
    assert!(
        audit.iter().any(|a| a.action == "incident.close"
            && a.outcome == "ok"
            && a.target.ends_with(&sig.incident_id)),
        "the close is audited"
    );
    assert!(
        audit
            .iter()
            .any(|a| a.action == "incident.close" && a.outcome == "refused"),
        "and so are the refusals"
    );
    Ok(())
}

#[test]
fn overdue_hosts_and_orders_without_a_result_are_reported() -> TestResult {
    // Invariant: the sweep opens one overdue incident for a silent host (and no second
    // while it is open), the host's next bundle resolves it, and an order whose result
    // never comes within its TTL is on the incident's timeline as such.
    let server = server_with(ExecutorMode::Approve, |_| {});
    let b = server.enroll(SITE, "h1");
    let svc = server.svc();
    let host = svc.store.host(&admin(), SITE, "h1")?.ok_or("host")?;
    let later = host
        .enrolled_at
        .checked_add(SignedDuration::from_secs(3 * host.scan_interval_sec as i64))?;
    assert_eq!(
        mcp_server::incidents::sweep(svc, host.enrolled_at)?.overdue_opened,
        0,
        "not yet"
    );
    assert_eq!(
        mcp_server::incidents::sweep(svc, later)?.overdue_opened,
        1,
        "silent too long"
    );
    assert_eq!(
        mcp_server::incidents::sweep(svc, later)?.overdue_opened,
        0,
        "one incident"
    );
    let overdue = open_of(&server, "h1", "overdue").ok_or("an overdue incident")?;
    let plan = mcp_server::planner::propose(svc, &admin(), &overdue.incident_id)?;
    assert_eq!(plan.runbook, None, "an order cannot reach a silent host");
    let (json, sig) = drift(&b, Check::Backup, None);
    assert_eq!(deliver(&server, &b, &json, &sig).0, 200);
    let back = svc
        .store
        .incident(&admin(), &overdue.incident_id)?
        .ok_or("listed")?;
    assert_eq!(back.state, IncidentState::Resolved, "the host is back");

    let backup = open_of(&server, "h1", "check:backup")
        .ok_or_else(|| format!("backup incident: {:?}", incidents_of(&server, "h1")))?;
    settled(&server, &backup.incident_id);
    let x = mcp_server::executor::execute(svc, &admin(), &backup.incident_id)?;
    let deadline = x
        .order
        .created_at
        .checked_add(SignedDuration::from_secs(x.order.ttl as i64 + 1))?;
    assert_eq!(
        mcp_server::incidents::sweep(svc, Timestamp::now())?.orders_without_result,
        0
    );
    assert_eq!(
        mcp_server::incidents::sweep(svc, deadline)?.orders_without_result,
        1
    );
    let view = mcp_server::incidents::show(svc, &admin(), &backup.incident_id)?;
    assert_eq!(view.incident.state, IncidentState::Open, "still open");
    assert_eq!(view.incident.plan_state, PlanState::Failed);
    assert!(
        view.timeline
            .iter()
            .any(|e| e.kind == "order_expired" && e.detail.contains("no result within its TTL")),
        "the timeline says so: {:?}",
        view.timeline
    );
    assert_eq!(
        mcp_server::incidents::sweep(svc, deadline)?.orders_without_result,
        0,
        "said once"
    );
    Ok(())
}

#[test]
fn the_rule_based_planner_follows_the_box_within_the_site_allowlist() -> TestResult {
    // Invariant: the default plan is the box's recommendation when the site allows it,
    // nothing (with the reason) when it does not, and fresh evidence when the box
    // recommended nothing; deterministic, the same facts give the same plan.
    let server = server_with(ExecutorMode::Approve, |_| {});
    let b = server.enroll(SITE, "h1");
    let svc = server.svc();
    let rec = (
        "run_backup",
        json!({ "unit": "restic-backups-clinic.service" }),
    );
    let (j, s) = drift(&b, Check::Backup, Some(rec.clone()));
    deliver(&server, &b, &j, &s);
    let (j, s) = drift(&b, Check::TimeSync, None);
    deliver(&server, &b, &j, &s);
    let backup = open_of(&server, "h1", "check:backup").ok_or("backup")?;
    let time = open_of(&server, "h1", "check:time_sync").ok_or("time_sync")?;

    let refused = mcp_server::planner::propose(svc, &admin(), &backup.incident_id)?;
    assert_eq!(
        refused.runbook, None,
        "run_backup is not on the site's allowlist"
    );
    assert!(
        refused.rationale.contains("does not allow"),
        "{}",
        refused.rationale
    );
    allow(&server, &["run_backup"]);
    let plan = mcp_server::planner::propose(svc, &admin(), &backup.incident_id)?;
    assert_eq!(plan.runbook.as_deref(), Some("run_backup"));
    assert_eq!(plan.params, rec.1, "the box's params");
    assert_eq!((plan.planner.as_str(), plan.disruptive), ("rule", false));
    let again = mcp_server::planner::propose(svc, &admin(), &backup.incident_id)?;
    assert_eq!(
        (again.runbook, again.params),
        (plan.runbook, plan.params),
        "deterministic"
    );

    let fresh = mcp_server::planner::propose(svc, &admin(), &time.incident_id)?;
    assert_eq!(fresh.runbook.as_deref(), Some("collect_evidence"));
    assert_eq!(fresh.params["checks"], json!(["time_sync"]));
    let (auditor, _) = operator(
        &server,
        "aud",
        Role::Auditor,
        Tenants::Sites {
            site_ids: vec![SITE.into()],
        },
    );
    assert!(
        mcp_server::planner::propose(svc, &auditor, &time.incident_id).is_err(),
        "auditors do not plan"
    );
    let (other, _) = operator(
        &server,
        "other",
        Role::ResellerOperator,
        Tenants::Reseller {
            reseller_id: "other".into(),
        },
    );
    assert!(
        matches!(
            mcp_server::planner::propose(svc, &other, &time.incident_id),
            Err(mcp_server::incidents::IncidentError::NotFound(_))
        ),
        "another reseller's incident does not exist for it"
    );
    Ok(())
}

/// A local OpenAI-compatible chat-completions endpoint: answers each request with the
/// next canned (status, body, delay) and keeps the requests it got.
struct FakeLlm {
    url: String,
    requests: Arc<Mutex<Vec<(String, Value)>>>,
}

impl FakeLlm {
    fn start(answers: Vec<(u16, String, Duration)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().expect("addr")
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for (stream, (status, body, delay)) in listener.incoming().zip(answers) {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let (mut auth, mut length) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("authorization:") {
                        auth = line["authorization:".len()..].trim().to_owned();
                    }
                }
                let mut buf = vec![0; length];
                let _ = reader.read_exact(&mut buf);
                let v: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
                if let Ok(mut r) = seen.lock() {
                    r.push((auth, v));
                }
                std::thread::sleep(delay);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, requests }
    }
}

/// A chat-completions answer whose message content is `content`.
fn completion(content: &str) -> String {
    json!({ "id": "x", "object": "chat.completion", "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }] }).to_string()
}

#[test]
fn the_llm_planner_is_used_only_for_valid_choices_and_falls_back_otherwise() -> TestResult {
    // Invariant: an LLM answer becomes the plan only when it is a JSON choice among the
    // site's runbooks with params the runbook accepts; a timeout, an error, invalid JSON,
    // a forbidden runbook or injected params give the rule-based plan with the reason
    // kept. The request carries the prototype's settings and the incident's facts only.
    let good = r#"{"runbook": "restart_unit", "params": {"unit": "sshd.service"}, "rationale": "sshd is down; restart it"}"#;
    let fenced = format!("```json\n{good}\n```");
    let ok = Duration::ZERO;
    let answers = vec![
        (200, completion(good), ok),
        (200, completion(&fenced), ok),
        (200, completion("I would restart sshd."), ok),
        (
            200,
            completion(
                r#"{"runbook": "switch_generation", "params": {"generation": 1}, "rationale": "roll forward"}"#,
            ),
            ok,
        ),
        (
            200,
            completion(
                r#"{"runbook": "restart_unit", "params": {"unit": "sshd.service; rm -rf /"}, "rationale": "x"}"#,
            ),
            ok,
        ),
        (
            200,
            completion(
                r#"{"runbook": "restart_unit", "params": {"unit": "sshd.service", "as_root": true}, "rationale": "x"}"#,
            ),
            ok,
        ),
        (
            200,
            completion(
                r#"{"runbook": "restart_unit", "params": {"unit": "sshd.service"}, "rationale": "x", "also_run": "stop_unit"}"#,
            ),
            ok,
        ),
        (500, "{\"error\": \"overloaded\"}".into(), ok),
        (200, "not json at all".into(), ok),
        (200, completion(good), Duration::from_secs(3)),
    ];
    let llm = FakeLlm::start(answers);
    let key_dir = tempfile::tempdir()?;
    let key_file = key_dir.path().join("llm.key");
    std::fs::write(&key_file, "sk-test-only-key\n")?;
    let url = llm.url.clone();
    let kf = key_file.clone();
    let server = server_with(ExecutorMode::Off, move |c| {
        c.remediation.llm = Some(LlmSettings {
            url,
            model: "local-test-model".into(),
            api_key_file: Some(kf),
            ca_file: None,
            timeout_sec: 1.0,
        });
    });
    let b = server.enroll(SITE, "h1");
    allow(&server, &["restart_unit"]);
    let (j, s) = drift(
        &b,
        Check::Services,
        Some(("restart_unit", json!({ "unit": "sshd.service" }))),
    );
    deliver(&server, &b, &j, &s);
    let inc = open_of(&server, "h1", "check:services").ok_or("incident")?;
    let propose = || mcp_server::planner::propose(server.svc(), &admin(), &inc.incident_id);

    let p = propose()?;
    assert_eq!(
        (p.planner.as_str(), p.runbook.as_deref()),
        ("llm", Some("restart_unit")),
        "{p:?}"
    );
    assert_eq!(p.rationale, "sshd is down; restart it");
    assert!(
        p.disruptive,
        "restart_unit needs a second operator by default"
    );
    assert_eq!(propose()?.planner, "llm", "a fenced JSON block is accepted");
    for expected in [
        "not the expected JSON choice",
        "does not allow",
        "params are refused",
        "params are refused",
        "not the expected JSON choice",
        "HTTP 500",
        "not JSON",
        "did not answer",
    ] {
        let p = propose()?;
        assert_eq!(p.planner, "rule", "falls back ({expected}): {p:?}");
        assert_eq!(
            p.runbook.as_deref(),
            Some("restart_unit"),
            "the rule-based plan"
        );
        let reason = p.fallback_reason.clone().unwrap_or_default();
        assert!(
            reason.contains(expected),
            "reason {reason:?} names {expected:?}"
        );
    }
    let view = mcp_server::incidents::show(server.svc(), &admin(), &inc.incident_id)?;
    assert!(
        view.timeline
            .iter()
            .any(|e| e.kind == "plan" && e.detail.contains("LLM answer not used")),
        "the fallback reason is on the timeline"
    );

    let requests = llm.requests.lock().map_err(|_| "lock")?.clone();
    assert_eq!(requests.len(), 10, "one call per plan");
    let (auth, body) = &requests[0];
    assert_eq!(
        auth, "Bearer sk-test-only-key",
        "the key from the key file, in the header"
    );
    assert_eq!(body["model"], "local-test-model");
    assert_eq!(body["temperature"], 0.1);
    assert_eq!(body["max_tokens"], 200);
    let sent = body.to_string();
    for secret in [
        "sk-test-only-key",
        "PRIVATE KEY",
        "BEGIN CERTIFICATE",
        server
            .svc()
            .order_pubkey_pem()?
            .lines()
            .nth(1)
            .unwrap_or("-"),
    ] {
        assert!(
            !sent.contains(secret),
            "the request carries no secrets ({secret:?})"
        );
    }
    let facts: Value =
        serde_json::from_str(body["messages"][1]["content"].as_str().unwrap_or("{}"))?;
    assert_eq!(facts["incident_id"], inc.incident_id.as_str());
    assert_eq!(facts["check"], "services");
    assert!(
        facts["allowed_runbooks"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["runbook"] == "restart_unit")),
        "the site's runbooks: {facts}"
    );
    Ok(())
}

#[test]
fn the_executor_follows_each_site_mode_and_the_central_guardrails() -> TestResult {
    // Invariant: `off` orders nothing, `approve` waits for an operator, `auto` orders
    // non-disruptive plans at once and leaves disruptive ones to an operator, whose order
    // then waits for a second operator; every order is made by `orders::create`, so a
    // cooldown refuses a second order of the same runbook for the host.
    let server = server_with(ExecutorMode::Approve, |_| {});
    let svc = server.svc();
    let b = server.enroll(SITE, "h1");
    allow(&server, &["restart_unit", "reapply_firewall"]);

    // off
    mcp_server::executor::set_site_mode(svc, &admin(), SITE, Some(ExecutorMode::Off))?;
    let (j, s) = drift(&b, Check::Logging, None);
    deliver(&server, &b, &j, &s);
    let logging = open_of(&server, "h1", "check:logging").ok_or("logging")?;
    assert_eq!(
        settled(&server, &logging.incident_id).plan_state,
        PlanState::Off
    );
    let off = mcp_server::executor::execute(svc, &admin(), &logging.incident_id);
    assert!(
        matches!(off, Err(ExecError::Off(_))),
        "mode off orders nothing: {off:?}"
    );
    assert!(svc.store.orders(&admin(), None)?.is_empty(), "no order");

    // approve
    mcp_server::executor::set_site_mode(svc, &admin(), SITE, Some(ExecutorMode::Approve))?;
    let (j, s) = drift(&b, Check::TimeSync, None);
    deliver(&server, &b, &j, &s);
    let time = open_of(&server, "h1", "check:time_sync").ok_or("time_sync")?;
    let waiting = settled(&server, &time.incident_id);
    assert_eq!(waiting.plan_state, PlanState::AwaitingOperator);
    assert!(waiting.plan.is_some(), "the plan is kept for the operator");
    assert!(
        svc.store.orders(&admin(), None)?.is_empty(),
        "approve orders nothing by itself"
    );
    let (alice, _) = operator(&server, "alice", Role::ResellerOperator, acme());
    let x = mcp_server::executor::execute(svc, &alice, &time.incident_id)?;
    assert_eq!(
        (x.order.runbook_id.as_str(), x.order.state),
        ("collect_evidence", OrderState::Pending)
    );
    assert_eq!(x.order.created_by, "operator:alice");

    // The cooldown: the same runbook for the same host again is refused, and said so.
    let cooled = mcp_server::executor::execute(svc, &alice, &logging.incident_id);
    assert!(
        matches!(cooled, Err(ExecError::Order(OrderError::Cooldown { .. }))),
        "a second collect_evidence for the host within the cooldown is refused: {cooled:?}"
    );
    let view = mcp_server::incidents::show(svc, &admin(), &logging.incident_id)?;
    assert_eq!(view.incident.plan_state, PlanState::Refused);
    assert!(
        view.timeline
            .iter()
            .any(|e| e.kind == "order_refused" && e.detail.contains("cooldown")),
        "the refusal is on the timeline"
    );
    assert!(
        svc.store
            .audit(&admin(), 100)?
            .iter()
            .any(|a| a.action == "order.create:collect_evidence"
                && a.outcome == "refused"
                && a.detail.contains("cooldown")),
        "and in the audit log"
    );

    // auto: a non-disruptive plan is ordered at once by the executor.
    mcp_server::executor::set_site_mode(svc, &admin(), SITE, Some(ExecutorMode::Auto))?;
    let (j, s) = drift(&b, Check::Firewall, Some(("reapply_firewall", json!({}))));
    deliver(&server, &b, &j, &s);
    let fw = open_of(&server, "h1", "check:firewall").ok_or("firewall")?;
    let ordered = settled(&server, &fw.incident_id);
    assert_eq!(ordered.plan_state, PlanState::Ordered, "{ordered:?}");
    let order = svc
        .store
        .order(&admin(), ordered.order_id.as_deref().unwrap_or("-"))?
        .ok_or("order")?;
    assert_eq!(
        (order.runbook_id.as_str(), order.state),
        ("reapply_firewall", OrderState::Pending)
    );
    assert_eq!(order.created_by, "system:executor");

    // auto with a disruptive plan: an operator orders it, a second operator approves it.
    let (j, s) = drift(
        &b,
        Check::Services,
        Some(("restart_unit", json!({ "unit": "sshd.service" }))),
    );
    deliver(&server, &b, &j, &s);
    let svc_inc = open_of(&server, "h1", "check:services").ok_or("services")?;
    assert_eq!(
        settled(&server, &svc_inc.incident_id).plan_state,
        PlanState::AwaitingOperator
    );
    let x = mcp_server::executor::execute(svc, &alice, &svc_inc.incident_id)?;
    assert_eq!(
        x.order.state,
        OrderState::AwaitingApproval,
        "disruptive: waits for a second operator"
    );
    assert!(x.order.envelope.is_none(), "not signed yet");
    assert!(
        matches!(
            mcp_server::orders::approve(svc, &alice, &x.order.order_id),
            Err(OrderError::SelfApproval(_))
        ),
        "the operator who ordered it cannot approve it"
    );
    let (bob, _) = operator(&server, "bob", Role::ResellerOperator, acme());
    let approved = mcp_server::orders::approve(svc, &bob, &x.order.order_id)?;
    assert_eq!(approved.state, OrderState::Pending);
    assert_eq!(approved.approved_by.as_deref(), Some("operator:bob"));
    Ok(())
}

#[test]
fn the_operator_api_lists_shows_plans_executes_and_closes_within_scope() -> TestResult {
    // Invariant: the incident routes answer only within the token's tenants (another
    // reseller gets 404 for the same id), refusals carry their status, and every action
    // is in the audit log.
    let server = server_with(ExecutorMode::Approve, |_| {});
    let b = server.enroll(SITE, "h1");
    let (j, s) = drift(&b, Check::Backup, None);
    deliver(&server, &b, &j, &s);
    let inc = open_of(&server, "h1", "check:backup").ok_or("incident")?;
    settled(&server, &inc.incident_id);
    let (_, token) = operator(&server, "alice", Role::ResellerOperator, acme());
    let (_, stranger) = operator(
        &server,
        "mallory",
        Role::ResellerOperator,
        Tenants::Reseller {
            reseller_id: "other".into(),
        },
    );
    let base = format!("https://{}", server.running.operator_addr());
    let http = client(&server.ca_pem(), None);
    let call = |method: &str, path: &str, token: &str, body: Option<Value>| -> (u16, Value) {
        let url = format!("{base}{path}");
        let auth = format!("Bearer {token}");
        let r = match (method, body) {
            ("GET", _) => http.get(&url).header("Authorization", &auth).call(),
            (_, Some(b)) => http
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.to_string().as_bytes()),
            (_, None) => http.post(&url).header("Authorization", &auth).send_empty(),
        };
        match r {
            Ok(mut r) => (
                r.status().as_u16(),
                serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
                    .unwrap_or(Value::Null),
            ),
            Err(e) => (0, Value::String(e.to_string())),
        }
    };
    let id = &inc.incident_id;
    let (status, list) = call("GET", "/api/v1/incidents?state=open", &token, None);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["incidents"].as_array().map(Vec::len), Some(1));
    let (status, none) = call("GET", "/api/v1/incidents", &stranger, None);
    assert_eq!(
        (status, none["incidents"].as_array().map(Vec::len)),
        (200, Some(0)),
        "another reseller sees none"
    );
    assert_eq!(
        call("GET", &format!("/api/v1/incidents/{id}"), &stranger, None).0,
        404
    );
    assert_eq!(
        call(
            "POST",
            &format!("/api/v1/incidents/{id}/execute"),
            &stranger,
            None
        )
        .0,
        404
    );
    assert_eq!(
        call("GET", "/api/v1/incidents?state=bogus", &token, None).0,
        422,
        "a bad filter is named"
    );
    let (status, shown) = call("GET", &format!("/api/v1/incidents/{id}"), &token, None);
    assert_eq!(status, 200);
    assert!(
        shown["timeline"].as_array().is_some_and(|t| !t.is_empty()),
        "{shown}"
    );
    let (status, plan) = call(
        "POST",
        &format!("/api/v1/incidents/{id}/plan"),
        &token,
        None,
    );
    assert_eq!(
        (status, plan["runbook"].as_str()),
        (200, Some("collect_evidence")),
        "{plan}"
    );
    let (status, x) = call(
        "POST",
        &format!("/api/v1/incidents/{id}/execute"),
        &token,
        None,
    );
    assert_eq!(status, 200, "{x}");
    assert_eq!(x["order"]["state"], "pending");
    let (status, again) = call(
        "POST",
        &format!("/api/v1/incidents/{id}/execute"),
        &token,
        None,
    );
    assert_eq!(status, 429, "the cooldown: {again}");
    assert_eq!(
        call(
            "POST",
            &format!("/api/v1/incidents/{id}/close"),
            &token,
            Some(json!({}))
        )
        .0,
        422,
        "no reason"
    );
    let (status, closed) = call(
        "POST",
        &format!("/api/v1/incidents/{id}/close"),
        &token,
        Some(json!({ "reason": "restored from the offsite copy" })),
    );
    assert_eq!(
        (status, closed["state"].as_str()),
        (200, Some("closed")),
        "{closed}"
    );
    assert_eq!(
        call(
            "POST",
            &format!("/api/v1/incidents/{id}/close"),
            &token,
            Some(json!({ "reason": "again" }))
        )
        .0,
        409,
        "already closed"
    );
    let audit = server.svc().store.audit(&admin(), 100)?;
    for action in ["incident.plan", "incident.execute", "incident.close"] {
        assert!(
            audit
                .iter()
                .any(|a| a.action == action && a.actor == "operator:alice"),
            "{action} is audited"
        );
    }
    assert!(
        audit.iter().any(|a| a.action == "incident.execute"
            && a.outcome == "refused"
            && a.actor == "operator:mallory"),
        "the stranger's attempt is audited as refused"
    );
    Ok(())
}

#[test]
fn a_drifting_box_is_remediated_end_to_end_with_the_real_agent() -> TestResult {
    // Invariant: box drifts -> incident -> plan -> signed order -> the box runs it and
    // reports -> the box is compliant again -> the incident closes, each step on the
    // incident's timeline, with the remediation duration recorded.
    let server = server_with(ExecutorMode::Auto, |_| {});
    let b = AgentBox::enroll(&server, "frontdesk-01");
    b.report("time_sync", "alert");
    let inc = open_of(&server, "frontdesk-01", "check:time_sync").ok_or("incident")?;
    let ordered = settled(&server, &inc.incident_id);
    assert_eq!(ordered.plan_state, PlanState::Ordered, "{ordered:?}");
    let order_id = ordered.order_id.clone().ok_or("the order")?;

    let polled = b.poll_orders();
    assert!(
        polled.to_string().contains(&order_id),
        "the box ran the order: {polled}"
    );
    b.flush();
    let answered = server
        .svc()
        .store
        .order(&admin(), &order_id)?
        .ok_or("order")?;
    assert_eq!(
        answered.state,
        OrderState::Answered,
        "the result reached the server"
    );
    assert_eq!(answered.result_outcome.as_deref(), Some("success"));

    b.report("time_sync", "success");
    let view = mcp_server::incidents::show(server.svc(), &admin(), &inc.incident_id)?;
    assert_eq!(
        view.incident.state,
        IncidentState::Resolved,
        "{:?}",
        view.timeline
    );
    assert!(view.incident.remediation_sec.is_some());
    let kinds: Vec<&str> = view.timeline.iter().map(|e| e.kind.as_str()).collect();
    for step in ["evidence", "plan", "order", "order_result", "resolved"] {
        assert!(kinds.contains(&step), "{step} on the timeline: {kinds:?}");
    }
    assert!(
        b.state_dir().join("mcp/client.pem").exists(),
        "the box used its enrolled identity"
    );
    Ok(())
}
