//! The console: its security properties over plain HTTPS (headers, cookies, CSRF,
//! sessions in the database, tenant scoping by URL) and the whole flow in a real
//! Chromium driven over WebDriver (sign in, fleet, host, approve, download and verify a
//! bundle with the agent's own `evidence verify`, scoping, a forged form).

mod common;
mod console_fleet;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestResult, TestServer};
use console_fleet::{Fleet, browserless, csrf_field, get, post_form, sign_in};
use jiff::{SignedDuration, Timestamp};
use mcp_server::auth::{Caller, token_hash};
use mcp_server::store::OrderState;

fn session(value: &str) -> String {
    format!("__Host-mcp_session={value}")
}

fn refused(fleet: &Fleet, action: &str) -> usize {
    fleet
        .server
        .svc()
        .store
        .audit(&Caller::local("test"), 10_000)
        .expect("audit")
        .iter()
        .filter(|e| e.action == action && e.outcome == "refused")
        .count()
}

/// Every console answer carries the CSP without scripts and the framing, sniffing,
/// referrer and caching headers; no page holds a script, an inline style or an event
/// handler attribute (the CSP would block them, so none may be needed).
#[test]
fn every_page_has_the_security_headers_and_no_script() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let cookie = session(&sign_in(&agent, &base, &fleet.bob.token));
    let pages = [
        "/console/sign-in".to_owned(),
        "/console/fleet".into(),
        "/console/hosts/clinic-1/ws-1".into(),
        "/console/evidence".into(),
        format!("/console/evidence/{}", fleet.first_bundle),
        "/console/incidents".into(),
        "/console/incidents?state=all".into(),
        "/console/incidents/no-such-incident".into(),
        "/console/orders".into(),
        "/console/tokens".into(),
        "/console/audit".into(),
        "/console/account".into(),
        "/console/no-such-page".into(),
    ];
    let handler = regex_free_event_handler;
    for page in &pages {
        let a = get(&agent, &format!("{base}{page}"), Some(&cookie));
        assert!(
            matches!(a.status, 200 | 404),
            "{page}: {} {}",
            a.status,
            a.body
        );
        assert_eq!(
            a.header("content-security-policy"),
            mcp_server::console::CSP,
            "{page}"
        );
        assert!(
            !a.header("content-security-policy").contains("script-src"),
            "no script source at all"
        );
        assert_eq!(a.header("x-frame-options"), "DENY", "{page}");
        assert_eq!(a.header("x-content-type-options"), "nosniff", "{page}");
        assert_eq!(a.header("referrer-policy"), "no-referrer", "{page}");
        assert_eq!(a.header("cache-control"), "no-store", "{page}");
        let html = a.body.to_ascii_lowercase();
        assert!(!html.contains("<script"), "{page} has a script");
        assert!(!html.contains(" style="), "{page} has an inline style");
        assert!(!handler(&html), "{page} has an event handler attribute");
    }
    let css = get(&agent, &format!("{base}/console/console.css"), None);
    assert_eq!(
        (css.status, css.header("content-type").as_str()),
        (200, "text/css; charset=utf-8")
    );
    Ok(())
}

/// ` onclick=`, ` onload=` ...: an attribute starting with "on" directly followed by
/// letters and `=`.
fn regex_free_event_handler(html: &str) -> bool {
    html.match_indices(" on").any(|(i, _)| {
        let rest = &html[i + 3..];
        let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        letters > 0 && rest[letters..].starts_with('=')
    })
}

/// Both cookies are Secure, HttpOnly, SameSite=Strict, host-only (`__Host-`, Path=/, no
/// Domain); the session lasts as configured and signing in clears the sign-in cookie.
#[test]
fn cookies_are_secure_httponly_strict_and_host_only() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let form = get(&agent, &format!("{base}/console/sign-in"), None);
    let (pre, pre_header) = form
        .set_cookie("__Host-mcp_signin")
        .ok_or("sign-in cookie")?;
    let csrf = csrf_field(&form.body).ok_or("csrf field")?;
    let done = post_form(
        &agent,
        &format!("{base}/console/sign-in"),
        Some(&format!("__Host-mcp_signin={pre}")),
        &[("csrf", &csrf), ("token", &fleet.bob.token)],
    );
    assert_eq!(
        (done.status, done.header("location").as_str()),
        (303, "/console/fleet")
    );
    let (secret, header) = done
        .set_cookie("__Host-mcp_session")
        .ok_or("session cookie")?;
    for h in [&pre_header, &header] {
        for attr in ["; Secure", "; HttpOnly", "; SameSite=Strict", "; Path=/"] {
            assert!(h.contains(attr), "{attr} in {h}");
        }
        assert!(!h.to_ascii_lowercase().contains("domain"), "host-only: {h}");
    }
    let ttl = fleet.server.svc().config.console.session_ttl_sec;
    assert!(header.contains(&format!("Max-Age={ttl}")), "{header}");
    assert!(
        secret.starts_with(mcp_server::console::SESSION_PREFIX) && secret.len() > 40,
        "random: {secret}"
    );
    let cleared = done
        .set_cookie("__Host-mcp_signin")
        .ok_or("sign-in cookie cleared")?;
    assert!(
        cleared.0.is_empty() && cleared.1.contains("Max-Age=0"),
        "{}",
        cleared.1
    );
    // Only the hash is stored: the database does not hold the cookie's value.
    let stored = fleet
        .server
        .svc()
        .store
        .console_session(&token_hash(&secret), Timestamp::now())?;
    assert_eq!(stored.map(|s| s.operator.name), Some("bob".into()));
    Ok(())
}

/// One refused sign-in: the cookie sent, the form fields, the status, what it shows.
type SignInCase<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>, u16, &'a str);

/// Sign-in is refused without this browser's sign-in cookie (login CSRF), with a wrong
/// token, and with a wrong password; each refusal is audited and starts no session.
#[test]
fn sign_in_refusals_are_audited_and_start_nothing() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let url = format!("{base}/console/sign-in");
    let form = get(&agent, &url, None);
    let (pre, _) = form
        .set_cookie("__Host-mcp_signin")
        .ok_or("sign-in cookie")?;
    let pre_cookie = format!("__Host-mcp_signin={pre}");
    let cases: [SignInCase; 5] = [
        (
            None,
            vec![("csrf", &pre), ("token", &fleet.bob.token)],
            403,
            "no sign-in cookie",
        ),
        (
            Some(&pre_cookie),
            vec![("token", &fleet.bob.token)],
            403,
            "no csrf field",
        ),
        (
            Some(&pre_cookie),
            vec![("csrf", "forged"), ("token", &fleet.bob.token)],
            403,
            "another csrf value",
        ),
        (
            Some(&pre_cookie),
            vec![("csrf", &pre), ("token", "mcpo1_wrong")],
            401,
            "a wrong token",
        ),
        (
            Some(&pre_cookie),
            vec![
                ("csrf", &pre),
                ("name", "bob"),
                ("password", "not bob's password"),
            ],
            401,
            "no password set",
        ),
    ];
    for (i, (cookie, fields, status, what)) in cases.iter().enumerate() {
        let a = post_form(&agent, &url, *cookie, fields);
        assert_eq!(a.status, *status, "{what}: {}", a.body);
        assert!(
            a.set_cookie("__Host-mcp_session").is_none(),
            "{what}: no session"
        );
        assert_eq!(
            refused(&fleet, "console.sign_in"),
            i + 1,
            "{what} is audited"
        );
    }
    Ok(())
}

/// A form post without this session's CSRF token changes nothing and is audited,
/// whatever the token it carries; the right token works.
#[test]
fn forged_form_posts_are_refused_and_change_nothing() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let bob = session(&sign_in(&agent, &base, &fleet.bob.token));
    let rita = session(&sign_in(&agent, &base, &fleet.rita.token));
    let order = &fleet.awaiting[0];
    let rita_page = get(&agent, &format!("{base}/console/orders"), Some(&rita));
    let ritas_csrf = csrf_field(&rita_page.body).ok_or("rita's csrf")?;
    let bob_page = get(&agent, &format!("{base}/console/orders"), Some(&bob));
    let bobs_csrf = csrf_field(&bob_page.body).ok_or("bob's csrf")?;
    let url = format!("{base}/console/orders/{}/approve", order.order_id);
    let forged = [
        String::new(),
        ritas_csrf.clone(),
        bobs_csrf[..bobs_csrf.len() - 1].to_owned(),
        format!("{bobs_csrf}x"),
        bobs_csrf.to_ascii_uppercase(),
    ];
    for (i, csrf) in forged.iter().enumerate() {
        let a = post_form(&agent, &url, Some(&bob), &[("csrf", csrf)]);
        assert_eq!(a.status, 403, "csrf {csrf:?}: {}", a.body);
        assert!(a.body.contains("CSRF"), "the page says why");
        assert_eq!(refused(&fleet, "console.csrf"), i + 1, "audited");
    }
    let a = post_form(&agent, &url, Some(&bob), &[]);
    assert_eq!(a.status, 403, "no field at all");
    let still = fleet
        .server
        .svc()
        .store
        .order(&Caller::local("t"), &order.order_id)?
        .ok_or("order")?;
    assert_eq!(
        still.state,
        OrderState::AwaitingApproval,
        "nothing was approved"
    );
    // Without a session the form goes nowhere either (to sign-in).
    let a = post_form(&agent, &url, None, &[("csrf", &bobs_csrf)]);
    assert_eq!(
        (a.status, a.header("location").as_str()),
        (303, "/console/sign-in")
    );
    // The real form does approve.
    let a = post_form(&agent, &url, Some(&bob), &[("csrf", &bobs_csrf)]);
    assert_eq!(a.status, 303, "approved: {}", a.body);
    let done = fleet
        .server
        .svc()
        .store
        .order(&Caller::local("t"), &order.order_id)?
        .ok_or("order")?;
    assert_eq!(
        (done.state, done.approved_by.as_deref()),
        (OrderState::Pending, Some("operator:bob"))
    );
    Ok(())
}

/// A session lives in the database: another server process on the same database honours
/// it, signing out in one ends it in all, and an expired one is refused (and audited).
#[test]
fn sessions_live_in_the_database_and_expire() -> TestResult {
    let fleet = Fleet::start();
    let second = {
        let config = common::test_config(fleet.server.dir.path());
        let (svc, _) = mcp_server::Services::open(config)?;
        mcp_server::Running::start(svc, mcp_server::StartOptions::default())?
    };
    let agent = browserless(&fleet.server.ca_pem());
    let (one, two) = (
        fleet.ops_url(),
        format!("https://{}", second.operator_addr()),
    );
    let cookie = session(&sign_in(&agent, &one, &fleet.bob.token));
    let a = get(&agent, &format!("{two}/console/fleet"), Some(&cookie));
    assert_eq!(
        a.status, 200,
        "the other process knows the session: {}",
        a.body
    );
    assert!(a.body.contains("clinic-1"), "and shows the fleet");
    let csrf = csrf_field(&a.body).ok_or("csrf")?;
    let out = post_form(
        &agent,
        &format!("{two}/console/sign-out"),
        Some(&cookie),
        &[("csrf", &csrf)],
    );
    assert_eq!(out.status, 303, "signed out: {}", out.body);
    assert!(
        out.set_cookie("__Host-mcp_session")
            .is_some_and(|c| c.1.contains("Max-Age=0"))
    );
    let a = get(&agent, &format!("{one}/console/fleet"), Some(&cookie));
    assert_eq!(
        (a.status, a.header("location").as_str()),
        (303, "/console/sign-in"),
        "ended everywhere"
    );

    let before = refused(&fleet, "console.authenticate");
    let now = Timestamp::now();
    let secret = "mcps1_an-expired-session-secret-for-this-test-only";
    fleet.server.svc().store.create_console_session(
        &token_hash(secret),
        "bob",
        "csrf",
        now - SignedDuration::from_hours(9),
        now - SignedDuration::from_secs(1),
    )?;
    let a = get(
        &agent,
        &format!("{one}/console/fleet"),
        Some(&session(secret)),
    );
    assert_eq!(
        (a.status, a.header("location").as_str()),
        (303, "/console/sign-in"),
        "expired"
    );
    assert_eq!(
        refused(&fleet, "console.authenticate"),
        before + 1,
        "audited"
    );
    let a = get(
        &agent,
        &format!("{one}/console/fleet"),
        Some(&session("mcps1_guessed")),
    );
    assert_eq!(a.status, 303, "a guessed cookie");
    second.stop();
    Ok(())
}

/// A reseller operator reaches neither another reseller's host page, nor its evidence,
/// nor its downloads by URL: each answers "not found" without the other's data and is
/// audited; its own fleet page lists only its own sites. An auditor reads but cannot
/// approve or make tokens.
#[test]
fn operators_reach_only_their_tenants_by_url() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let otto = session(&sign_in(&agent, &base, &fleet.otto.token));
    let own = get(&agent, &format!("{base}/console/fleet"), Some(&otto));
    assert!(own.body.contains("dental-9"), "its own site");
    assert!(!own.body.contains("clinic-1"), "not acme's: {}", own.body);
    let first = &fleet.first_bundle;
    for url in [
        "/console/hosts/clinic-1/ws-1".to_owned(),
        "/console/hosts/clinic-1/ws-1/evidence-key.pem".into(),
        format!("/console/evidence/{first}"),
        format!("/console/evidence/{first}/bundle.json"),
        format!("/console/evidence/{first}/bundle.sig"),
    ] {
        let a = get(&agent, &format!("{base}{url}"), Some(&otto));
        assert_eq!(a.status, 404, "{url}: {}", a.body);
        assert!(
            !a.body.contains("PUBLIC KEY")
                && !a.body.contains("\"seq\"")
                && !a.body.contains("firewall"),
            "{url} leaks: {}",
            a.body
        );
    }
    assert_eq!(refused(&fleet, "console.host"), 2, "host refusals audited");
    assert_eq!(
        refused(&fleet, "console.evidence"),
        3,
        "evidence refusals audited"
    );
    let listing = get(
        &agent,
        &format!("{base}/console/evidence?site=clinic-1"),
        Some(&otto),
    );
    assert!(
        listing.status == 200 && !listing.body.contains(first.as_str()),
        "a filter does not widen the scope"
    );
    let orders = get(&agent, &format!("{base}/console/orders"), Some(&otto));
    assert!(
        !orders.body.contains(&fleet.awaiting[0].order_id),
        "not acme's orders"
    );
    let audit = get(&agent, &format!("{base}/console/audit"), Some(&otto));
    assert!(
        !audit.body.contains("clinic-1/ws-1/"),
        "not acme's audit entries"
    );
    let csrf = csrf_field(&orders.body).ok_or("csrf")?;
    let a = post_form(
        &agent,
        &format!(
            "{base}/console/orders/{}/approve",
            fleet.awaiting[0].order_id
        ),
        Some(&otto),
        &[("csrf", &csrf)],
    );
    assert_eq!(
        a.status, 404,
        "another reseller's order is not found: {}",
        a.body
    );

    let audrey = session(&sign_in(&agent, &base, &fleet.audrey.token));
    let host = get(
        &agent,
        &format!("{base}/console/hosts/clinic-1/ws-1"),
        Some(&audrey),
    );
    assert_eq!(host.status, 200, "an auditor reads its site");
    let orders = get(&agent, &format!("{base}/console/orders"), Some(&audrey));
    assert!(
        !orders.body.contains("class=\"approve\""),
        "no approve button for an auditor"
    );
    let csrf = csrf_field(&orders.body).ok_or("csrf")?;
    let a = post_form(
        &agent,
        &format!(
            "{base}/console/orders/{}/approve",
            fleet.awaiting[0].order_id
        ),
        Some(&audrey),
        &[("csrf", &csrf)],
    );
    assert_eq!(a.status, 403, "an auditor approves nothing: {}", a.body);
    let tokens = get(&agent, &format!("{base}/console/tokens"), Some(&audrey));
    assert!(
        !tokens.body.contains("id=\"token-form\""),
        "no token form for an auditor"
    );
    let a = post_form(
        &agent,
        &format!("{base}/console/tokens"),
        Some(&audrey),
        &[("csrf", &csrf), ("site", "clinic-1")],
    );
    assert_eq!(a.status, 422, "refused: {}", a.body);
    assert!(a.body.contains("No token made"), "{}", a.body);
    Ok(())
}

/// A token made in the console is shown once; the list never shows it again; revoked,
/// no box can enroll with it.
#[test]
fn a_new_token_is_shown_once_and_revocation_stops_enrollment() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let rita = session(&sign_in(&agent, &base, &fleet.rita.token));
    let page = get(&agent, &format!("{base}/console/tokens"), Some(&rita));
    let csrf = csrf_field(&page.body).ok_or("csrf")?;
    let made = post_form(
        &agent,
        &format!("{base}/console/tokens"),
        Some(&rita),
        &[
            ("csrf", &csrf),
            ("site", "clinic-2"),
            ("reseller", "acme"),
            ("uses", "2"),
            ("expires", "2h"),
        ],
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let at = made
        .body
        .find("id=\"new-token\">")
        .ok_or("the token is shown")?
        + "id=\"new-token\">".len();
    let token: String = made.body[at..].chars().take_while(|c| *c != '<').collect();
    assert!(token.starts_with("mcpe1_"), "{token}");
    for url in ["/console/tokens", "/console/audit", "/console/fleet"] {
        let again = get(&agent, &format!("{base}{url}"), Some(&rita));
        assert!(!again.body.contains(&token), "{url} shows the secret again");
    }
    let incomplete = post_form(
        &agent,
        &format!("{base}/console/tokens"),
        Some(&rita),
        &[("csrf", &csrf)],
    );
    assert_eq!(incomplete.status, 422, "no site: {}", incomplete.body);
    assert!(
        incomplete.body.contains("No token made") && !incomplete.body.contains("CSRF"),
        "named as what it is: {}",
        incomplete.body
    );
    let listed = fleet
        .server
        .svc()
        .store
        .enrollment_tokens(&Caller::local("t"))?;
    let new = listed
        .iter()
        .find(|t| t.site_id == "clinic-2")
        .ok_or("listed")?;
    assert_eq!(new.uses_left, 2);
    let a = post_form(
        &agent,
        &format!("{base}/console/tokens/{}/revoke", new.token_id),
        Some(&rita),
        &[("csrf", &csrf)],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("revoked"), "{}", a.body);
    let b = common::TestBox::new("clinic-2", "late-box");
    let (status, body) = b.enroll(&fleet.server, &token);
    assert_ne!(status, 200, "a revoked token enrolls nobody: {body}");
    let otto = session(&sign_in(&agent, &base, &fleet.otto.token));
    let ottos = csrf_field(&get(&agent, &format!("{base}/console/tokens"), Some(&otto)).body)
        .ok_or("csrf")?;
    let other = listed
        .iter()
        .find(|t| t.site_id == "clinic-1")
        .ok_or("acme's first token")?;
    let a = post_form(
        &agent,
        &format!("{base}/console/tokens/{}/revoke", other.token_id),
        Some(&otto),
        &[("csrf", &ottos)],
    );
    assert_eq!(a.status, 404, "another reseller's token: {}", a.body);
    Ok(())
}

// ---------------------------------------------------------------- Chromium over WebDriver

/// `chromedriver` on a free loopback port, stopped on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Invariant: the console's auditor export is the CLI's package: the site's auditor
/// downloads it as a tar that `compliance-agent export verify` accepts with the log key
/// from a box; another reseller's operator gets no export of the site, and the refusal
/// is audited.
#[test]
fn the_auditor_downloads_a_verifiable_export_and_others_cannot() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let audrey = session(&sign_in(&agent, &base, &fleet.audrey.token));
    let form = get(&agent, &format!("{base}/console/export"), Some(&audrey));
    assert_eq!(form.status, 200, "{}", form.body);
    assert!(
        form.body.contains("<option value=\"clinic-1\">"),
        "{}",
        form.body
    );
    assert!(
        !form.body.contains("dental-9"),
        "only its own sites: {}",
        form.body
    );

    let today = Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).date();
    let (from, to) = (
        today.checked_sub(jiff::Span::new().days(2))?.to_string(),
        today.checked_add(jiff::Span::new().days(1))?.to_string(),
    );
    let url = format!("{base}/console/export/download?site=clinic-1&from={from}&to={to}");
    let mut r = agent.get(&url).header("Cookie", &audrey).call()?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-tar")
    );
    let tar_bytes = r.body_mut().with_config().limit(64 << 20).read_to_vec()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("export.tar"), &tar_bytes)?;
    let untar = Command::new("tar")
        .args(["-xf", "export.tar"])
        .current_dir(dir.path())
        .status()?;
    assert!(untar.success());
    let top = dir.path().join(format!("clinic-1-{from}-{to}"));
    let verify = Command::new(common::agent_binary())
        .arg("export")
        .arg("verify")
        .arg(&top)
        .arg("--log-key")
        .arg(common::state_dir(&fleet.server).join("log.vkey"))
        .output()?;
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "compliance-agent export verify: {out}"
    );
    assert!(
        out.contains("host ws-1") && out.contains("host ws-2"),
        "{out}"
    );

    let otto = session(&sign_in(&agent, &base, &fleet.otto.token));
    let a = get(&agent, &url, Some(&otto));
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(a.body.contains("no site clinic-1"), "{}", a.body);
    assert!(
        fleet
            .server
            .svc()
            .store
            .audit(&Caller::local("test"), 1000)?
            .iter()
            .any(|e| e.action == "site.export"
                && e.actor == "operator:otto"
                && e.outcome == "refused"),
        "the refusal is audited"
    );
    Ok(())
}

fn require(binary: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(binary);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{binary} is missing: apt-get install chromium chromium-driver (tests/run installs them)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_chromedriver() -> Chromedriver {
    let port = free_port();
    let child = Command::new(require("chromedriver"))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    // The guard kills and reaps the process on every path from here on.
    let driver = Chromedriver { child, url };
    while Instant::now() < deadline {
        if agent
            .get(&format!("{}/status", driver.url))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            return driver;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("chromedriver did not answer on {}", driver.url);
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

async fn wait_for_text(
    driver: &thirtyfour::WebDriver,
    needle: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let source = driver.source().await?;
        if source.contains(needle) {
            return Ok(source);
        }
        if Instant::now() > deadline {
            return Err(format!("the page never showed {needle:?}; it shows:\n{source}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_for_file(path: &Path) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(path)
            && !bytes.is_empty()
        {
            return Ok(bytes);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{} was never downloaded", path.display()).into())
}

/// The console in Chromium, as an operator uses it: sign in, see the fleet, open a host,
/// approve another operator's order, download a bundle and verify it with the agent's
/// `compliance-agent evidence verify`; a reseller operator cannot reach another
/// reseller's host page or evidence by URL; a forged form post is refused. Screenshots of
/// the main pages go to target/console-screenshots/.
#[test]
fn the_console_in_chromium() -> TestResult {
    let chromium = require("chromium");
    let driver_process = start_chromedriver();
    let fleet = Fleet::start();
    let base = fleet.ops_url();
    let shots = target_dir().join("console-screenshots");
    std::fs::create_dir_all(&shots)?;
    let downloads = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use thirtyfour::prelude::*;
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary(&chromium.display().to_string())?;
        for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,1000"] {
            caps.add_arg(arg)?;
        }
        // The server's certificate comes from its own CA, which this throwaway profile
        // does not know; the cookies' Secure attribute still applies (https).
        caps.accept_insecure_certs(true)?;
        caps.add_experimental_option(
            "prefs",
            serde_json::json!({
                "download.default_directory": downloads.path().display().to_string(),
                "download.prompt_for_download": false,
                "download.directory_upgrade": true,
            }),
        )?;
        let driver = WebDriver::new(&driver_process.url, caps).await?;
        let outcome = async {
            // Signing in.
            driver.goto(format!("{base}/console/fleet")).await?;
            wait_for_text(&driver, "With an operator token").await?;
            assert!(driver.current_url().await?.path().ends_with("/console/sign-in"), "sent to sign-in first");
            driver.screenshot(&shots.join("sign-in.png")).await?;
            driver.find(By::Id("token")).await?.send_keys(&fleet.bob.token).await?;
            driver.find(By::Id("sign-in-with-token")).await?.click().await?;
            let page = wait_for_text(&driver, "id=\"fleet-score\"").await?;
            for text in ["Reseller: acme", "Reseller: other", "Site clinic-1", "ws-1", "ws-2", "dental-9", "75%", "100%", "0%"] {
                assert!(page.contains(text), "the fleet page shows {text:?}");
            }
            let cookies = driver.get_all_cookies().await?;
            let c = cookies.iter().find(|c| c.name == "__Host-mcp_session").ok_or("the session cookie")?;
            assert_eq!((c.secure, c.http_only, c.same_site), (Some(true), Some(true), Some(thirtyfour::SameSite::Strict)), "{c:?}");
            driver.screenshot(&shots.join("fleet.png")).await?;

            // One host.
            driver.find(By::LinkText("ws-1")).await?.click().await?;
            let page = wait_for_text(&driver, "id=\"checks\"").await?;
            let firewall = driver.find(By::Id("check-firewall")).await?.text().await?;
            for text in ["drifted", "high", "164.312(e)(1)", "valid (the host's enrolled key)"] {
                assert!(firewall.contains(text), "the firewall row shows {text:?}: {firewall}");
            }
            assert!(page.contains("intact, 4 bundles through seq 4"), "the chain");
            assert!(page.contains("order collect_evidence created by operator:alice"), "the timeline has the order");
            driver.screenshot(&shots.join("host.png")).await?;

            // Approving alice's order as bob.
            driver.goto(format!("{base}/console/orders")).await?;
            wait_for_text(&driver, "id=\"orders\"").await?;
            driver.screenshot(&shots.join("orders.png")).await?;
            let first = &fleet.awaiting[0].order_id;
            driver.find(By::Css(format!("#order-{first} button.approve"))).await?.click().await?;
            wait_for_text(&driver, &format!("Order {first} approved and signed.")).await?;
            let order = fleet.server.svc().store.order(&Caller::local("t"), first)?.ok_or("order")?;
            assert_eq!((order.state, order.approved_by.as_deref()), (OrderState::Pending, Some("operator:bob")), "approved and signed");
            assert!(order.envelope.is_some(), "with its signed envelope");

            // A forged form: the second order's approve form with another token in it.
            let second = &fleet.awaiting[1].order_id;
            driver
                .execute(
                    &format!("document.querySelector('#order-{second} input[name=csrf]').value = 'forged-by-another-page';"),
                    Vec::new(),
                )
                .await?;
            driver.find(By::Css(format!("#order-{second} button.approve"))).await?.click().await?;
            wait_for_text(&driver, "CSRF token is missing or wrong").await?;
            let order = fleet.server.svc().store.order(&Caller::local("t"), second)?.ok_or("order")?;
            assert_eq!(order.state, OrderState::AwaitingApproval, "the forged post changed nothing");
            driver.screenshot(&shots.join("csrf-refused.png")).await?;

            // Evidence: the list, one bundle, its files, verified by the agent.
            driver.goto(format!("{base}/console/evidence?site=clinic-1&host=ws-1")).await?;
            wait_for_text(&driver, "id=\"bundles\"").await?;
            driver.screenshot(&shots.join("evidence.png")).await?;
            driver.goto(format!("{base}/console/evidence/{}", fleet.first_bundle)).await?;
            let page = wait_for_text(&driver, "id=\"signature-status\"").await?;
            assert!(page.contains("valid (the host&#x27;s enrolled key)") || page.contains("valid (the host's enrolled key)"), "verified on the page");
            assert!(page.contains("the first bundle of the chain"), "chain position");
            driver.screenshot(&shots.join("bundle.png")).await?;
            driver.find(By::Id("download-json")).await?.click().await?;
            driver.find(By::Id("download-sig")).await?.click().await?;
            let json = wait_for_file(&downloads.path().join("bundle.json"))?;
            let sig = wait_for_file(&downloads.path().join("bundle.sig"))?;
            driver.goto(format!("{base}/console/hosts/clinic-1/ws-1")).await?;
            wait_for_text(&driver, "id=\"evidence-key\"").await?;
            driver.find(By::Id("evidence-key")).await?.click().await?;
            let key = wait_for_file(&downloads.path().join("clinic-1-ws-1.pub.pem"))?;
            let bundle: serde_json::Value = serde_json::from_slice(&json)?;
            let day = bundle["timestamp_end"].as_str().and_then(|t| t.get(..10)).ok_or("timestamp_end")?.replace('-', "/");
            let evidence = tempfile::tempdir()?;
            let dir = evidence.path().join(day).join(&fleet.first_bundle);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("bundle.json"), &json)?;
            std::fs::write(dir.join("bundle.sig"), &sig)?;
            let pubkey = evidence.path().join("ws-1.pub.pem");
            std::fs::write(&pubkey, &key)?;
            let verify = |root: &Path| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
                let out = Command::new(common::agent_binary())
                    .args(["evidence", "verify", "--json", "--dir"])
                    .arg(root)
                    .arg("--pubkey")
                    .arg(&pubkey)
                    .output()?;
                Ok(serde_json::from_slice(&out.stdout).map_err(|e| {
                    format!("evidence verify --json: {e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
                })?)
            };
            // The agent checks the signature with the host's key as the console served it.
            // The chain head record is the box's own (signed with its private key, never
            // delivered), so an exported bundle cannot rule out later bundles; that is the
            // one problem left, and it names the head record.
            let report = verify(evidence.path())?;
            assert_eq!((report["bundles"].as_u64(), report["signatures_valid"].as_u64()), (Some(1), Some(1)), "{report}");
            let problems = report["problems"].as_array().ok_or("problems")?;
            assert_eq!(problems.len(), 1, "only the head record is missing: {report}");
            assert!(problems[0]["message"].as_str().is_some_and(|m| m.contains(".chain-head.json is missing")), "{report}");
            // The same files with one byte changed do not verify: the check is real.
            let mut tampered = json.clone();
            let at = tampered.iter().position(|b| *b == b'1').ok_or("a digit")?;
            tampered[at] = b'2';
            std::fs::write(dir.join("bundle.json"), &tampered)?;
            let report = verify(evidence.path())?;
            assert_eq!(report["signatures_valid"].as_u64(), Some(0), "a changed bundle fails its signature: {report}");
            assert!(report["problems"].as_array().is_some_and(|p| p.len() >= 2), "{report}");

            // The audit log and the tokens page.
            driver.goto(format!("{base}/console/audit")).await?;
            let page = wait_for_text(&driver, "console.sign_in").await?;
            assert!(page.contains("console.csrf") && page.contains("order.approve"), "the refusal and the approval are in the log");
            driver.screenshot(&shots.join("audit.png")).await?;
            driver.goto(format!("{base}/console/tokens")).await?;
            wait_for_text(&driver, "id=\"tokens\"").await?;
            driver.screenshot(&shots.join("tokens.png")).await?;

            // Another reseller's operator, by URL.
            driver.find(By::Id("sign-out")).await?.click().await?;
            wait_for_text(&driver, "With an operator token").await?;
            driver.find(By::Id("token")).await?.send_keys(&fleet.otto.token).await?;
            driver.find(By::Id("sign-in-with-token")).await?.click().await?;
            let page = wait_for_text(&driver, "id=\"fleet-score\"").await?;
            assert!(page.contains("dental-9") && !page.contains("clinic-1"), "otto's fleet is its own");
            driver.goto(format!("{base}/console/hosts/clinic-1/ws-1")).await?;
            let page = wait_for_text(&driver, "No such host").await?;
            assert!(!page.contains("firewall") && !page.contains("164.312"), "nothing of the host shows");
            driver.goto(format!("{base}/console/evidence/{}", fleet.first_bundle)).await?;
            let page = wait_for_text(&driver, "No such bundle").await?;
            assert!(!page.contains("signature-status"), "nothing of the bundle shows");
            driver.screenshot(&shots.join("other-reseller-refused.png")).await?;
            Ok::<(), Box<dyn std::error::Error>>(())
        }
        .await;
        driver.quit().await?;
        outcome
    })?;
    for name in [
        "sign-in", "fleet", "host", "orders", "evidence", "bundle", "audit", "tokens",
    ] {
        let meta = std::fs::metadata(shots.join(format!("{name}.png")))?;
        assert!(meta.len() > 1000, "screenshot {name}.png was written");
    }
    Ok(())
}

/// The console is off when `console.enable` is false: its paths fall through to the API's 404.
#[test]
fn the_console_can_be_switched_off() -> TestResult {
    let server = TestServer::start_with(|c| c.console.enable = false);
    let agent = browserless(&server.ca_pem());
    let a = get(
        &agent,
        &format!("https://{}/console/sign-in", server.running.operator_addr()),
        None,
    );
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(a.body.contains("no such operator route"), "{}", a.body);
    Ok(())
}

/// A password set on the Account page (argon2id in the database, never the text) signs
/// the operator in by name; a wrong one, a short one or mismatched ones do not.
#[test]
fn a_password_set_in_the_console_signs_in_by_name() -> TestResult {
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let rita = session(&sign_in(&agent, &base, &fleet.rita.token));
    let page = get(&agent, &format!("{base}/console/account"), Some(&rita));
    let csrf = csrf_field(&page.body).ok_or("csrf")?;
    let url = format!("{base}/console/account/password");
    let short = post_form(
        &agent,
        &url,
        Some(&rita),
        &[("csrf", &csrf), ("password", "short"), ("confirm", "short")],
    );
    assert_eq!(short.status, 422, "{}", short.body);
    let differ = post_form(
        &agent,
        &url,
        Some(&rita),
        &[
            ("csrf", &csrf),
            ("password", "correct horse battery"),
            ("confirm", "correct horse batterx"),
        ],
    );
    assert_eq!(differ.status, 422, "{}", differ.body);
    assert!(
        fleet
            .server
            .svc()
            .store
            .operator_password("rita")?
            .is_none(),
        "nothing stored yet"
    );
    let set = post_form(
        &agent,
        &url,
        Some(&rita),
        &[
            ("csrf", &csrf),
            ("password", "correct horse battery"),
            ("confirm", "correct horse battery"),
        ],
    );
    assert_eq!(set.status, 200, "{}", set.body);
    let (_, phc) = fleet
        .server
        .svc()
        .store
        .operator_password("rita")?
        .ok_or("stored")?;
    assert!(
        phc.starts_with("$argon2id$") && !phc.contains("correct horse"),
        "a hash: {phc}"
    );

    let sign_in_url = format!("{base}/console/sign-in");
    let try_password = |name: &str, password: &str| {
        let form = get(&agent, &sign_in_url, None);
        let (pre, _) = form
            .set_cookie("__Host-mcp_signin")
            .expect("sign-in cookie");
        post_form(
            &agent,
            &sign_in_url,
            Some(&format!("__Host-mcp_signin={pre}")),
            &[("csrf", &pre), ("name", name), ("password", password)],
        )
    };
    let wrong = try_password("rita", "correct horse batterx");
    assert!(
        wrong.status == 401 && wrong.set_cookie("__Host-mcp_session").is_none(),
        "wrong password: {}",
        wrong.status
    );
    let other = try_password("otto", "correct horse battery");
    assert_eq!(other.status, 401, "another operator's name");
    let ok = try_password("rita", "correct horse battery");
    assert_eq!(ok.status, 303, "{}", ok.body);
    let cookie = session(&ok.set_cookie("__Host-mcp_session").ok_or("session")?.0);
    let fleet_page = get(&agent, &format!("{base}/console/fleet"), Some(&cookie));
    assert!(
        fleet_page.body.contains("rita") && fleet_page.body.contains("reseller acme"),
        "signed in as rita with rita's scope"
    );
    assert!(
        !fleet_page.body.contains("dental-9"),
        "and only rita's tenants"
    );
    Ok(())
}

/// The incident pages show what the boxes reported (an alert bundle opens an incident)
/// with its timeline, and an action on an incident needs this session's CSRF token: a
/// forged close changes nothing; the real form closes it, with its reason, audited.
#[test]
fn incident_pages_show_the_timeline_and_close_only_by_a_real_form() -> TestResult {
    use mcp_server::store::incidents::{IncidentFilter, IncidentState};
    let fleet = Fleet::start();
    let (agent, base) = (browserless(&fleet.server.ca_pem()), fleet.ops_url());
    let bob = session(&sign_in(&agent, &base, &fleet.bob.token));
    let open = fleet.server.svc().store.incidents(
        &Caller::local("t"),
        &IncidentFilter {
            state: Some(IncidentState::Open),
            ..IncidentFilter::default()
        },
    )?;
    let first = open
        .first()
        .ok_or("the fleet's alert bundles opened incidents")?;
    let list = get(&agent, &format!("{base}/console/incidents"), Some(&bob));
    assert_eq!(list.status, 200, "{}", list.body);
    let visible: Vec<_> = open
        .iter()
        .filter(|i| {
            list.body
                .contains(&format!("/console/incidents/{}", i.incident_id))
        })
        .collect();
    assert!(
        !visible.is_empty(),
        "the list links its incidents: {}",
        list.body
    );
    let first = visible.first().copied().unwrap_or(first);
    let url = format!("{base}/console/incidents/{}", first.incident_id);
    let page = get(&agent, &url, Some(&bob));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Timeline"), "{}", page.body);
    // minijinja escapes '/' in HTML, so the host is looked for by its parts.
    assert!(
        page.body.contains(&first.site_id) && page.body.contains(&first.host_id),
        "names the host"
    );
    let csrf = csrf_field(&page.body).ok_or("the page's csrf")?;
    let close = format!("{url}/close");
    let a = post_form(
        &agent,
        &close,
        Some(&bob),
        &[("csrf", &format!("{csrf}x")), ("reason", "forged")],
    );
    assert_eq!(a.status, 403, "a forged close is refused: {}", a.body);
    let still = fleet
        .server
        .svc()
        .store
        .incident(&Caller::local("t"), &first.incident_id)?
        .ok_or("incident")?;
    assert_eq!(still.state, IncidentState::Open, "nothing changed");
    let a = post_form(
        &agent,
        &close,
        Some(&bob),
        &[
            ("csrf", &csrf),
            ("reason", "handled by phone with the clinic"),
        ],
    );
    assert_eq!(a.status, 303, "closed: {}", a.body);
    let done = fleet
        .server
        .svc()
        .store
        .incident(&Caller::local("t"), &first.incident_id)?
        .ok_or("incident")?;
    assert_eq!(done.state, IncidentState::Closed);
    assert_eq!(
        done.resolution.as_deref(),
        Some("handled by phone with the clinic")
    );
    let location = a.header("location");
    assert_eq!(
        location,
        format!("/console/incidents/{}?done=close", first.incident_id),
        "back to the incident"
    );
    let after = get(&agent, &format!("{base}{location}"), Some(&bob));
    assert!(
        after.body.contains("closed") && after.body.contains("The incident is closed."),
        "{}",
        after.body
    );
    Ok(())
}
