//! The MSP console: server-rendered pages on the operator listener under `/console`.
//!
//! Every page authenticates the browser's session into the same `Caller` the API builds
//! from a token and makes the same store calls with it, so roles and tenants are exactly
//! the API's. Sessions live in the database (any server process can serve any request);
//! the cookie holds a random secret whose hash is the session's key. Every form carries
//! the session's CSRF token and every POST checks it; the sign-in form, before any
//! session exists, uses a double-submit cookie. No page runs a script.

mod export;
mod incidents;
mod pages;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::{SignedDuration, Timestamp};
use minijinja::Environment;
use serde::Serialize;

use crate::api::{ConnInfo, blocking};
use crate::auth::{Caller, Role, hashes_equal, new_token, token_hash};
use crate::services::Services;

/// The session cookie. `__Host-`: the browser keeps it only if Secure, with Path=/ and
/// no Domain, so no other host or path can set or shadow it.
pub const SESSION_COOKIE: &str = "__Host-mcp_session";
/// The sign-in form's double-submit CSRF cookie (there is no session yet).
pub const SIGN_IN_COOKIE: &str = "__Host-mcp_signin";
/// Prefix of session secrets, so a leaked cookie is recognisable in a scan.
pub const SESSION_PREFIX: &str = "mcps1_";
/// Shortest password the console accepts.
pub const MIN_PASSWORD_LEN: usize = 12;

/// The Content-Security-Policy of every console answer: no script at all, styles and
/// images only from this origin, forms only to it, never framed.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The navigation, in order: (path, label). A new page adds one line here and its
/// template (an incidents page goes between Fleet and Evidence).
pub const NAV: &[(&str, &str)] = &[
    ("/console/fleet", "Fleet"),
    ("/console/incidents", "Incidents"),
    ("/console/evidence", "Evidence"),
    ("/console/orders", "Orders"),
    ("/console/tokens", "Enrollment tokens"),
    ("/console/audit", "Audit log"),
    ("/console/export", "Auditor export"),
    ("/console/account", "Account"),
];

/// The templates, compiled into the binary.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("sign_in.html", include_str!("templates/sign_in.html")),
    ("fleet.html", include_str!("templates/fleet.html")),
    ("host.html", include_str!("templates/host.html")),
    ("evidence.html", include_str!("templates/evidence.html")),
    ("bundle.html", include_str!("templates/bundle.html")),
    ("orders.html", include_str!("templates/orders.html")),
    ("incidents.html", include_str!("templates/incidents.html")),
    ("incident.html", include_str!("templates/incident.html")),
    ("tokens.html", include_str!("templates/tokens.html")),
    (
        "token_created.html",
        include_str!("templates/token_created.html"),
    ),
    ("audit.html", include_str!("templates/audit.html")),
    ("export.html", include_str!("templates/export.html")),
    ("account.html", include_str!("templates/account.html")),
    ("message.html", include_str!("templates/message.html")),
];

const STYLESHEET: &str = include_str!("templates/console.css");

/// The console's shared state: the services and the compiled templates.
#[derive(Clone)]
pub struct Console {
    pub svc: Services,
    templates: Arc<Environment<'static>>,
}

/// The template environment; HTML is escaped in every `.html` template.
pub fn templates() -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            minijinja::AutoEscape::Html
        } else {
            minijinja::AutoEscape::None
        }
    });
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, source) in TEMPLATES {
        env.add_template(name, source)?;
    }
    Ok(env)
}

/// The console's routes, or an empty router when `console.enable` is false.
pub fn router(svc: Services) -> crate::Result<Router> {
    if !svc.config.console.enable {
        return Ok(Router::new());
    }
    let env =
        templates().map_err(|e| crate::Error::Invalid(format!("console templates: {e:#}")))?;
    let state = Console {
        svc,
        templates: Arc::new(env),
    };
    Ok(Router::new()
        .route("/console", get(pages::root))
        .route("/console/", get(pages::root))
        .route("/console/console.css", get(stylesheet))
        .route(
            "/console/sign-in",
            get(pages::sign_in_form).post(pages::sign_in),
        )
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/fleet", get(pages::fleet))
        .route("/console/hosts/{site}/{host}", get(pages::host))
        .route(
            "/console/hosts/{site}/{host}/evidence-key.pem",
            get(pages::host_key),
        )
        .route("/console/evidence", get(pages::evidence))
        .route("/console/evidence/{bundle_id}", get(pages::bundle))
        .route(
            "/console/evidence/{bundle_id}/{file}",
            get(pages::bundle_file),
        )
        .route("/console/incidents", get(incidents::list))
        .route("/console/incidents/{incident_id}", get(incidents::show))
        .route(
            "/console/incidents/{incident_id}/{action}",
            post(incidents::action),
        )
        .route("/console/orders", get(pages::orders))
        .route(
            "/console/orders/{order_id}/approve",
            post(pages::order_approve),
        )
        .route(
            "/console/tokens",
            get(pages::tokens).post(pages::token_create),
        )
        .route(
            "/console/tokens/{token_id}/revoke",
            post(pages::token_revoke),
        )
        .route("/console/audit", get(pages::audit))
        .route("/console/export", get(export::form))
        .route("/console/export/download", get(export::download))
        .route("/console/account", get(pages::account))
        .route("/console/account/password", post(pages::set_password))
        .route(
            "/console/{*rest}",
            get(pages::not_found).post(pages::not_found),
        )
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state))
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

/// The security headers of every console answer.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        ("strict-transport-security", "max-age=31536000"),
        // Pages show tenants' state (and once, a new token): never kept in a cache.
        ("cache-control", "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

/// The signed-in operator behind a request.
#[derive(Clone, Debug)]
pub struct Viewer {
    pub caller: Caller,
    pub name: String,
    pub csrf: String,
    session_hash: [u8; 32],
}

/// What every page's template gets about the viewer.
#[derive(Serialize)]
struct ViewerContext<'a> {
    name: &'a str,
    role: &'a str,
    tenants: String,
    csrf: &'a str,
    can_write: bool,
}

impl Viewer {
    fn context(&self) -> ViewerContext<'_> {
        ViewerContext {
            name: &self.name,
            role: self.caller.role.as_str(),
            tenants: match &self.caller.tenants {
                crate::auth::Tenants::All => "all tenants".into(),
                crate::auth::Tenants::Reseller { reseller_id } => format!("reseller {reseller_id}"),
                crate::auth::Tenants::Sites { site_ids } => {
                    format!("sites {}", site_ids.join(", "))
                }
                crate::auth::Tenants::Host { site_id, host_id } => {
                    format!("host {site_id}/{host_id}")
                }
            },
            csrf: &self.csrf,
            can_write: self.caller.require_write("write").is_ok(),
        }
    }
}

/// The value of cookie `name` in the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A `Set-Cookie` value with the console's attributes; `max_age` 0 deletes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: u64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

impl Console {
    /// Renders `template` with the page's context; a failure is a 500 naming the template.
    fn render(&self, status: StatusCode, template: &str, ctx: minijinja::Value) -> Response {
        match self
            .templates
            .get_template(template)
            .and_then(|t| t.render(ctx))
        {
            Ok(html) => (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html,
            )
                .into_response(),
            Err(e) => {
                tracing::error!(template, error = %format!("{e:#}"), "console template failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    format!("the page {template} could not be rendered\n"),
                )
                    .into_response()
            }
        }
    }

    /// A page for `viewer` with the navigation around it.
    fn page(
        &self,
        viewer: &Viewer,
        status: StatusCode,
        template: &str,
        active: &str,
        ctx: minijinja::Value,
    ) -> Response {
        let nav: Vec<minijinja::Value> = NAV
            .iter()
            .map(|(path, label)| minijinja::context! { path => *path, label => *label, active => *path == active })
            .collect();
        let full = minijinja::context! { viewer => minijinja::Value::from(minijinja::value::Serde(viewer.context())), nav, ..ctx };
        self.render(status, template, full)
    }

    /// A message page (an error, a refusal) for a signed-in viewer.
    fn message(&self, viewer: &Viewer, status: StatusCode, title: &str, text: &str) -> Response {
        self.page(
            viewer,
            status,
            "message.html",
            "",
            minijinja::context! { title, text },
        )
    }

    /// The operator behind the request's session cookie, or the answer to send instead:
    /// a redirect to sign-in (an unknown or expired session is also audited).
    async fn viewer(&self, info: &ConnInfo, headers: &HeaderMap) -> Result<Viewer, Response> {
        let Some(secret) = cookie(headers, SESSION_COOKIE) else {
            return Err(redirect("/console/sign-in"));
        };
        let hash = token_hash(&secret);
        let (svc, peer) = (self.svc.clone(), info.peer.to_string());
        let found = blocking(move || {
            let found = svc.store.console_session(&hash, Timestamp::now());
            if let Ok(None) = found {
                crate::audit::record_anonymous(
                    &*svc.store,
                    Some(peer.clone()),
                    "console.authenticate",
                    "-",
                    "unknown or expired session",
                );
            }
            found.map(|s| (s, peer))
        })
        .await
        .map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &e.message))?;
        match found {
            Ok((Some(s), peer)) => Ok(Viewer {
                caller: Caller {
                    actor: format!("operator:{}", s.operator.name),
                    role: s.operator.role,
                    tenants: s.operator.tenants,
                    peer: Some(peer),
                },
                name: s.operator.name,
                csrf: s.csrf_token,
                session_hash: hash,
            }),
            Ok((None, _)) => {
                let mut res = redirect("/console/sign-in");
                if let Ok(v) = HeaderValue::from_str(&set_cookie(SESSION_COOKIE, "", 0)) {
                    res.headers_mut().insert(header::SET_COOKIE, v);
                }
                Err(res)
            }
            Err(e) => Err(plain(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())),
        }
    }

    /// Refuses a form whose CSRF token is not this session's (audited).
    async fn check_csrf(
        &self,
        viewer: &Viewer,
        sent: Option<&str>,
        action: &str,
    ) -> Result<(), Response> {
        if sent.is_some_and(|s| hashes_equal(s.as_bytes(), viewer.csrf.as_bytes())) {
            return Ok(());
        }
        let (svc, caller, action) = (self.svc.clone(), viewer.caller.clone(), action.to_owned());
        let _ = blocking(move || {
            crate::audit::record(
                &*svc.store,
                &caller,
                "console.csrf",
                &action,
                Some("the form's CSRF token is missing or not this session's"),
            );
        })
        .await;
        Err(self.message(
            viewer,
            StatusCode::FORBIDDEN,
            "Refused",
            "This form was not sent from this console session (its CSRF token is missing or wrong). Nothing was changed; reload the page and try again.",
        ))
    }
}

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

/// Starts a session for `operator_name`: stores it and returns the cookie's secret.
fn start_session(
    svc: &Services,
    operator_name: &str,
    now: Timestamp,
) -> crate::Result<(String, Timestamp)> {
    let secret = new_token(SESSION_PREFIX);
    let csrf = new_token("");
    let ttl = svc.config.console.session_ttl_sec;
    let expires = now
        .checked_add(SignedDuration::from_secs(ttl as i64))
        .unwrap_or(Timestamp::MAX);
    // Expired sessions go whenever someone signs in; nothing else needs them.
    svc.store.purge_console_sessions(now)?;
    svc.store
        .create_console_session(&token_hash(&secret), operator_name, &csrf, now, expires)?;
    Ok((secret, expires))
}

/// Hashes a password as an argon2id PHC string (random salt, the crate's default cost).
pub fn hash_password(password: &str) -> crate::Result<String> {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| crate::Error::Invalid(format!("password salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| crate::Error::Invalid(format!("password hash: {e}")))
}

/// Whether `password` matches the PHC string (false for a malformed one).
pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Whether a role may approve an order created by `created_by`: the API's rule
/// (a writing role, and not the order's creator).
fn may_approve(caller: &Caller, created_by: &str) -> bool {
    caller.require_write("approve orders").is_ok() && caller.actor != created_by
}

/// A role's label for pages.
pub fn role_label(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::ResellerOperator => "reseller operator",
        Role::SiteOperator => "site operator",
        Role::Auditor => "auditor",
        Role::Host => "host",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_escapes_html() -> Result<(), Box<dyn std::error::Error>> {
        let env = templates()?;
        let t = env.template_from_str("{{ x }}")?;
        // template_from_str has no name, so no auto-escape: check a named one instead.
        assert_eq!(t.render(minijinja::context! { x => "<b>" })?, "<b>");
        let html = env.get_template("message.html")?.render(minijinja::context! {
            viewer => minijinja::context! { name => "<script>", role => "admin", tenants => "all", csrf => "c", can_write => true },
            nav => Vec::<minijinja::Value>::new(),
            title => "t<i>",
            text => "<script>alert(1)</script>",
        })?;
        assert!(!html.contains("<script>"), "escaped: {html}");
        assert!(html.contains("&lt;script&gt;"), "escaped: {html}");
        Ok(())
    }

    #[test]
    fn cookies_are_secure_host_only_and_strict() {
        let c = set_cookie(SESSION_COOKIE, "v", 60);
        for attr in [
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(c.contains(attr), "{attr} in {c}");
        }
        assert!(!c.contains("Domain"), "a __Host- cookie has no Domain: {c}");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-mcp_session=s3cret; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("s3cret"));
        assert_eq!(cookie(&h, "mcp_session"), None, "exact names only");
    }

    proptest::proptest! {
        /// A Cookie header yields the value of the cookie with exactly that name (the first
        /// one), never a cookie whose name merely contains it or starts with it.
        #[test]
        fn only_the_named_cookie_is_read(
            others in proptest::collection::vec(("[a-zA-Z_-]{1,20}", "[A-Za-z0-9_-]{0,20}"), 0..6),
            session in proptest::option::of("[A-Za-z0-9_-]{1,40}"),
            at in 0usize..6,
        ) {
            let mut pairs: Vec<(String, String)> = others
                .into_iter()
                .filter(|(k, _)| k != SESSION_COOKIE)
                .collect();
            // Look-alike names around the real one.
            pairs.push((format!("x{SESSION_COOKIE}"), "lookalike".into()));
            pairs.push((SESSION_COOKIE.trim_start_matches("__Host-").into(), "unprefixed".into()));
            if let Some(s) = &session {
                let at = at.min(pairs.len());
                pairs.insert(at, (SESSION_COOKIE.into(), s.clone()));
            }
            let header = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, HeaderValue::from_str(&header).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?);
            proptest::prop_assert_eq!(cookie(&h, SESSION_COOKIE), session, "{}", header);
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() -> Result<(), Box<dyn std::error::Error>> {
        let phc = hash_password("correct horse battery")?;
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(
            verify_password("correct horse battery", &phc),
            "right password"
        );
        assert!(
            !verify_password("correct horse batterx", &phc),
            "wrong password"
        );
        assert!(!verify_password("x", "not a phc string"), "malformed hash");
        Ok(())
    }
}
