//! A small fleet behind a running server for the console and metrics tests: two
//! resellers' sites, enrolled boxes that delivered evidence of several checks, operators
//! of each role with their tokens, and a disruptive order awaiting a second operator.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use compliance_agent::evidence::{Check, Draft, Outcome};
use jiff::SignedDuration;
use mcp_server::auth::{Caller, OPERATOR_TOKEN_PREFIX, Role, Tenants, new_token, token_hash};
use mcp_server::enroll::TokenRequest;
use mcp_server::orders::OrderDraft;
use mcp_server::store::{Operator, OrderRecord};
use serde_json::json;
use ureq::tls::{PemItem, RootCerts, TlsConfig, TlsProvider};

use crate::common::{TestBox, TestServer, read_bundle, upload};

/// One operator and the token it signs in with.
pub struct Op {
    pub name: &'static str,
    pub token: String,
}

pub struct Fleet {
    pub server: TestServer,
    /// acme's clinic-1/ws-1: backup, patching, encryption pass; the firewall drifted (75%).
    pub acme_a: TestBox,
    /// acme's clinic-1/ws-2: backup passes (100%).
    pub acme_b: TestBox,
    /// other's dental-9/ws-1: backup alert (0%).
    pub other: TestBox,
    /// Admins: alice creates orders, bob approves them.
    pub alice: Op,
    pub bob: Op,
    /// Reseller operators of acme and of other.
    pub rita: Op,
    pub otto: Op,
    /// Auditor of clinic-1.
    pub audrey: Op,
    /// The first bundle (seq 1) of acme_a.
    pub first_bundle: String,
    /// other's first bundle.
    pub other_bundle: String,
    /// Disruptive orders alice made, awaiting a second operator: for ws-1 and ws-2.
    pub awaiting: Vec<OrderRecord>,
}

fn operator(server: &TestServer, name: &'static str, role: Role, tenants: Tenants) -> Op {
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
                created_at: jiff::Timestamp::now(),
                disabled: false,
            },
        )
        .expect("create operator");
    Op { name, token }
}

impl Op {
    pub fn caller(&self, role: Role, tenants: Tenants) -> Caller {
        Caller {
            actor: format!("operator:{}", self.name),
            role,
            tenants,
            peer: None,
        }
    }
}

/// Stores `drafts` in the box's evidence store and delivers each; returns the bundle ids.
pub fn deliver(server: &TestServer, b: &TestBox, drafts: Vec<Draft>) -> Vec<String> {
    let store = b.store();
    let client = b.client(server);
    drafts
        .into_iter()
        .map(|d| {
            let stored = store.store(d).expect("store bundle");
            let (json, sig) = read_bundle(&stored.dir);
            let (status, body) = upload(
                &client,
                &format!("{}/api/v1/evidence", server.url()),
                &json,
                &sig,
            );
            assert_eq!(status, 200, "delivery of {}: {body}", stored.bundle_id);
            stored.bundle_id
        })
        .collect()
}

/// A check result as the agent's scan writes it.
pub fn result(check: Check, passing: bool, severity: &str, reason: &str) -> Draft {
    let mut d = Draft::new(
        check,
        if passing {
            Outcome::Success
        } else {
            Outcome::Alert
        },
    );
    d.pre_state = json!({
        "status": if passing { "compliant" } else { "drifted" },
        "severity": severity,
        "reason": reason,
        "facts": {},
        "recommended": [],
    });
    if !passing {
        d.error = Some(reason.into());
    }
    d
}

impl Fleet {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(edit: impl FnOnce(&mut mcp_server::config::Config)) -> Self {
        let server = TestServer::start_with(|c| {
            // collect_evidence needs a second operator here, so an order awaits approval
            // without a disruptive runbook on the box; no cooldown between the test's orders.
            c.orders.disruptive_runbooks = vec!["collect_evidence".into()];
            c.orders.cooldown_sec = 0;
            edit(c);
        });
        let acme_a = server.enroll("clinic-1", "ws-1");
        let acme_b = server.enroll("clinic-1", "ws-2");
        let token = mcp_server::enroll::create_token(
            server.svc(),
            &Caller::local("test"),
            &TokenRequest {
                site_id: "dental-9".into(),
                reseller_id: Some("other".into()),
                uses: 1,
                expires_in: SignedDuration::from_hours(1),
            },
        )
        .expect("token for other")
        .token;
        let other = TestBox::new("dental-9", "ws-1");
        let answer = other.enroll(&server, &token);
        assert_eq!(answer.0, 200, "enrollment of dental-9/ws-1: {}", answer.1);
        let other = other.with_cert(&answer.1);

        let first = deliver(
            &server,
            &acme_a,
            vec![
                result(Check::Backup, true, "high", "the last backup is 3 h old"),
                result(Check::Patching, true, "high", "no pending security updates"),
                result(
                    Check::Encryption,
                    true,
                    "critical",
                    "the data volume is LUKS2",
                ),
                result(
                    Check::Firewall,
                    false,
                    "high",
                    "the ruleset differs from the baseline",
                ),
            ],
        );
        deliver(
            &server,
            &acme_b,
            vec![result(
                Check::Backup,
                true,
                "high",
                "the last backup is 1 h old",
            )],
        );
        let other_ids = deliver(
            &server,
            &other,
            vec![result(
                Check::Backup,
                false,
                "critical",
                "no backup for 4 days",
            )],
        );

        let alice = operator(&server, "alice", Role::Admin, Tenants::All);
        let bob = operator(&server, "bob", Role::Admin, Tenants::All);
        let rita = operator(
            &server,
            "rita",
            Role::ResellerOperator,
            Tenants::Reseller {
                reseller_id: "acme".into(),
            },
        );
        let otto = operator(
            &server,
            "otto",
            Role::ResellerOperator,
            Tenants::Reseller {
                reseller_id: "other".into(),
            },
        );
        let audrey = operator(
            &server,
            "audrey",
            Role::Auditor,
            Tenants::Sites {
                site_ids: vec!["clinic-1".into()],
            },
        );
        let alice_caller = alice.caller(Role::Admin, Tenants::All);
        let awaiting = ["ws-1", "ws-2"]
            .into_iter()
            .map(|host| {
                mcp_server::orders::create(
                    server.svc(),
                    &alice_caller,
                    &OrderDraft {
                        site_id: "clinic-1".into(),
                        host_id: host.into(),
                        runbook_id: "collect_evidence".into(),
                        params: json!({ "checks": ["backup"] }),
                        ttl: None,
                    },
                )
                .expect("order awaiting approval")
            })
            .collect();
        Fleet {
            server,
            acme_a,
            acme_b,
            other,
            alice,
            bob,
            rita,
            otto,
            audrey,
            first_bundle: first[0].clone(),
            other_bundle: other_ids[0].clone(),
            awaiting,
        }
    }

    /// `https://127.0.0.1:PORT` of the operator listener.
    pub fn ops_url(&self) -> String {
        format!("https://{}", self.server.running.operator_addr())
    }
}

/// An HTTPS client trusting the server's CA that does not follow redirects and keeps no
/// cookies: each test sends exactly the cookies it means to.
pub fn browserless(ca_pem: &str) -> ureq::Agent {
    let roots: Vec<_> = ureq::tls::parse_pem(ca_pem.as_bytes())
        .filter_map(|i| match i {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .max_redirects(0)
        .save_redirect_history(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .new_agent()
}

/// An answer: status, headers, body.
pub struct Answer {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    /// The value a `Set-Cookie` header gives cookie `name`.
    pub fn set_cookie(&self, name: &str) -> Option<(String, String)> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(|v| {
                let value = v[name.len() + 1..]
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                (value, v.to_owned())
            })
    }
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    match r {
        Ok(mut r) => Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        },
        Err(e) => Answer {
            status: 0,
            headers: Default::default(),
            body: e.to_string(),
        },
    }
}

pub fn get(agent: &ureq::Agent, url: &str, cookie: Option<&str>) -> Answer {
    let mut req = agent.get(url);
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    answer(req.call())
}

fn form_encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

pub fn post_form(
    agent: &ureq::Agent,
    url: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> Answer {
    let mut req = agent
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    answer(req.send(form_encode(fields).as_bytes()))
}

/// The value of the first hidden `csrf` field in a page.
pub fn csrf_field(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().map(str::to_owned)
}

/// Signs in with an operator token over plain HTTP; returns the session cookie's value.
pub fn sign_in(agent: &ureq::Agent, base: &str, token: &str) -> String {
    let form = get(agent, &format!("{base}/console/sign-in"), None);
    assert_eq!(form.status, 200, "sign-in page: {}", form.body);
    let (pre, _) = form
        .set_cookie("__Host-mcp_signin")
        .expect("the sign-in cookie");
    let csrf = csrf_field(&form.body).expect("the sign-in form's csrf field");
    assert_eq!(csrf, pre, "the form carries the cookie's value");
    let done = post_form(
        agent,
        &format!("{base}/console/sign-in"),
        Some(&format!("__Host-mcp_signin={pre}")),
        &[("csrf", &csrf), ("token", token)],
    );
    assert_eq!(done.status, 303, "signed in: {}", done.body);
    done.set_cookie("__Host-mcp_session")
        .expect("a session cookie")
        .0
}
