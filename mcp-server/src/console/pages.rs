//! The console's pages: each handler authenticates the session, checks the CSRF token
//! of a form, calls the same library functions and store queries as the API with the
//! viewer's `Caller`, and renders a template.

use std::collections::BTreeMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use compliance_agent::crypto::{VerifyingKey, sha256_hex};
use compliance_agent::evidence::{Bundle, Check, Outcome};
use jiff::Timestamp;
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::{
    Console, MIN_PASSWORD_LEN, SESSION_COOKIE, SIGN_IN_COOKIE, Viewer, cookie, hash_password,
    may_approve, plain, redirect, role_label, set_cookie, start_session, verify_password,
};
use crate::api::{ConnInfo, blocking};
use crate::archive::ArchiveKey;
use crate::auth::{Caller, hashes_equal, new_token, token_hash};
use crate::fleet::HostStatus;
use crate::store::console::BundleFilter;
use crate::store::{BundleRecord, Host, OrderState};

/// How many bundles an evidence listing or a timeline shows.
const LIST_LIMIT: u32 = 200;
const TIMELINE_LIMIT: u32 = 50;

/// A serde value for a template.
pub(super) fn ser<T: Serialize>(v: &T) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(v))
}

pub(super) fn when(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn when_opt(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "never".into(), when)
}

fn with_cookie(mut res: Response, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

/// Runs blocking work for a page; a join failure becomes a 500.
pub(super) async fn work<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    blocking(f)
        .await
        .map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &e.message))
}

macro_rules! viewer {
    ($st:expr, $info:expr, $headers:expr) => {
        match $st.viewer(&$info, &$headers).await {
            Ok(v) => v,
            Err(res) => return res,
        }
    };
}

macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(res) => return res,
        }
    };
}

pub(super) use {attempt, viewer};

pub async fn root() -> Response {
    redirect("/console/fleet")
}

pub async fn not_found(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let v = viewer!(st, info, headers);
    st.message(
        &v,
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such console page.",
    )
}

// ---------------------------------------------------------------- sign-in

#[derive(Deserialize)]
pub struct SignInForm {
    csrf: Option<String>,
    token: Option<String>,
    name: Option<String>,
    password: Option<String>,
}

fn sign_in_page(st: &Console, status: StatusCode, error: Option<&str>) -> Response {
    // A fresh double-submit token for each form shown.
    let csrf = new_token("");
    let res = st.render(
        status,
        "sign_in.html",
        context! { csrf => csrf.clone(), error },
    );
    with_cookie(res, &set_cookie(SIGN_IN_COOKIE, &csrf, 600))
}

pub async fn sign_in_form(State(st): State<Console>) -> Response {
    sign_in_page(&st, StatusCode::OK, None)
}

pub async fn sign_in(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let peer = info.peer.to_string();
    let svc = st.svc.clone();
    let refuse = move |why: &'static str| {
        let svc = svc.clone();
        let peer = peer.clone();
        async move {
            let _ = work(move || {
                crate::audit::record_anonymous(&*svc.store, Some(peer), "console.sign_in", "-", why)
            })
            .await;
        }
    };
    let Ok(Form(form)) = form else {
        refuse("malformed sign-in form").await;
        return sign_in_page(
            &st,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("The sign-in form was malformed."),
        );
    };
    let cookie_token = cookie(&headers, SIGN_IN_COOKIE);
    let csrf_ok = matches!((&cookie_token, &form.csrf), (Some(c), Some(f)) if !c.is_empty() && hashes_equal(c.as_bytes(), f.as_bytes()));
    if !csrf_ok {
        refuse("sign-in form without this browser's CSRF token").await;
        return sign_in_page(
            &st,
            StatusCode::FORBIDDEN,
            Some("This sign-in form was not sent from this browser's sign-in page. Try again."),
        );
    }
    let token = form.token.filter(|t| !t.trim().is_empty());
    let name = form.name.filter(|n| !n.trim().is_empty());
    let svc = st.svc.clone();
    let peer = info.peer.to_string();
    let outcome = work(
        move || -> Result<Result<(String, String), &'static str>, String> {
            let operator = if let Some(token) = token {
                svc.store
                    .operator_by_token(&token_hash(token.trim()))
                    .map_err(|e| e.to_string())?
                    .ok_or("unknown operator token")
            } else if let (Some(name), Some(password)) = (name, form.password) {
                match svc
                    .store
                    .operator_password(name.trim())
                    .map_err(|e| e.to_string())?
                {
                    Some((op, phc)) if verify_password(&password, &phc) => Ok(op),
                    Some(_) => Err("wrong password"),
                    None => {
                        // The same work as a real check, so timing does not tell who exists.
                        let _ = hash_password(&password);
                        Err("no operator with a password by that name")
                    }
                }
            } else {
                Err("neither a token nor a name and password")
            };
            let op = match operator {
                Ok(op) => op,
                Err(why) => {
                    crate::audit::record_anonymous(
                        &*svc.store,
                        Some(peer),
                        "console.sign_in",
                        "-",
                        why,
                    );
                    return Ok(Err(why));
                }
            };
            let (secret, _) =
                start_session(&svc, &op.name, Timestamp::now()).map_err(|e| e.to_string())?;
            let caller = Caller {
                actor: format!("operator:{}", op.name),
                role: op.role,
                tenants: op.tenants,
                peer: Some(peer),
            };
            crate::audit::record(&*svc.store, &caller, "console.sign_in", "-", None);
            Ok(Ok((secret, op.name)))
        },
    )
    .await;
    match outcome {
        Ok(Ok(Ok((secret, _name)))) => {
            let res = redirect("/console/fleet");
            let res = with_cookie(
                res,
                &set_cookie(
                    SESSION_COOKIE,
                    &secret,
                    st.svc.config.console.session_ttl_sec,
                ),
            );
            with_cookie(res, &set_cookie(SIGN_IN_COOKIE, "", 0))
        }
        Ok(Ok(Err(_))) => sign_in_page(
            &st,
            StatusCode::UNAUTHORIZED,
            Some("Sign-in failed: check the token, or the name and password."),
        ),
        Ok(Err(e)) => plain(StatusCode::SERVICE_UNAVAILABLE, &e),
        Err(res) => res,
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: Option<String>,
}

pub async fn sign_out(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let sent = form.ok().and_then(|Form(f)| f.csrf);
    attempt!(st.check_csrf(&v, sent.as_deref(), "console.sign_out").await);
    let (svc, hash, caller) = (st.svc.clone(), v.session_hash, v.caller.clone());
    let done = attempt!(
        work(move || {
            let r = svc.store.delete_console_session(&hash);
            crate::audit::record(&*svc.store, &caller, "console.sign_out", "-", None);
            r
        })
        .await
    );
    if let Err(e) = done {
        return plain(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    with_cookie(
        redirect("/console/sign-in"),
        &set_cookie(SESSION_COOKIE, "", 0),
    )
}

// ---------------------------------------------------------------- fleet

#[derive(Serialize)]
struct HostRow {
    reseller: String,
    site: String,
    host: String,
    score: String,
    score_class: &'static str,
    last_seen: String,
    chain: String,
    chain_ok: bool,
    overdue: bool,
    revoked: bool,
}

fn chain_text(h: &HostStatus) -> (String, bool) {
    match (h.contiguous_through, h.gaps.is_empty()) {
        (None, _) => ("no bundles yet".into(), true),
        (Some(n), true) => (
            format!(
                "intact, {} bundle{} through seq {n}",
                h.bundles,
                if h.bundles == 1 { "" } else { "s" }
            ),
            true,
        ),
        (Some(n), false) => {
            let gaps: Vec<String> = h
                .gaps
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            (
                format!("gaps after seq {n}: missing {}", gaps.join(", ")),
                false,
            )
        }
    }
}

fn score_text(score: Option<f64>) -> (String, &'static str) {
    match score {
        None => ("-".into(), "none"),
        Some(s) if s >= 90.0 => (format!("{s:.0}%"), "good"),
        Some(s) if s >= 70.0 => (format!("{s:.0}%"), "warn"),
        Some(s) => (format!("{s:.0}%"), "bad"),
    }
}

fn host_row(h: &HostStatus) -> HostRow {
    let (score, score_class) = score_text(h.score);
    let (chain, chain_ok) = chain_text(h);
    HostRow {
        reseller: h
            .reseller_id
            .clone()
            .unwrap_or_else(|| "direct (MSP)".into()),
        site: h.site_id.clone(),
        host: h.host_id.clone(),
        score,
        score_class,
        last_seen: when_opt(h.last_seen),
        chain,
        chain_ok,
        overdue: h.overdue,
        revoked: h.revoked_at.is_some(),
    }
}

pub async fn fleet(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let v = viewer!(st, info, headers);
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(
        work(move || {
            let hosts = crate::fleet::fleet(&*svc.store, &caller, Timestamp::now())?;
            let sites = svc.store.sites(&caller)?;
            Ok::<_, crate::store::StoreError>((hosts, sites))
        })
        .await
    );
    let (hosts, sites) = match found {
        Ok(x) => x,
        Err(e) => {
            return st.message(
                &v,
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &e.to_string(),
            );
        }
    };
    // reseller -> site -> hosts, with sites that have no host yet.
    let mut tree: BTreeMap<String, BTreeMap<String, Vec<HostRow>>> = BTreeMap::new();
    for s in &sites {
        tree.entry(
            s.reseller_id
                .clone()
                .unwrap_or_else(|| "direct (MSP)".into()),
        )
        .or_default()
        .entry(s.site_id.clone())
        .or_default();
    }
    for h in &hosts {
        let row = host_row(h);
        tree.entry(row.reseller.clone())
            .or_default()
            .entry(row.site.clone())
            .or_default()
            .push(row);
    }
    let resellers: Vec<minijinja::Value> = tree
        .into_iter()
        .map(|(name, sites)| {
            let sites: Vec<minijinja::Value> = sites
                .into_iter()
                .map(|(site, hosts)| context! { site, hosts => ser(&hosts) })
                .collect();
            context! { name, sites }
        })
        .collect();
    let (fleet_score, fleet_class) = score_text(crate::metrics::fleet_score(&hosts));
    let summary = context! {
        hosts => hosts.len(),
        sites => sites.len(),
        overdue => hosts.iter().filter(|h| h.overdue).count(),
        broken => hosts.iter().filter(|h| !h.gaps.is_empty()).count(),
        score => fleet_score,
        score_class => fleet_class,
    };
    st.page(
        &v,
        StatusCode::OK,
        "fleet.html",
        "/console/fleet",
        context! { resellers, summary },
    )
}

// ---------------------------------------------------------------- host

/// What the archive says about one indexed bundle.
struct Checked {
    bundle: Option<Bundle>,
    json: Option<Vec<u8>>,
    sig: Option<Vec<u8>>,
    /// `valid`, or what is wrong.
    signature: String,
    signature_ok: bool,
    hash_ok: bool,
}

/// Reads a bundle from the archive and verifies it against the host's enrolled key and
/// the hash the index holds.
fn check_bundle(svc: &crate::Services, host: &Host, r: &BundleRecord) -> Checked {
    let archived = match svc.archive.get(&ArchiveKey::of(host, r)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Checked {
                bundle: None,
                json: None,
                sig: None,
                signature: "missing from the archive".into(),
                signature_ok: false,
                hash_ok: false,
            };
        }
        Err(e) => {
            return Checked {
                bundle: None,
                json: None,
                sig: None,
                signature: format!("not checked: {e}"),
                signature_ok: false,
                hash_ok: false,
            };
        }
    };
    let hash_ok = sha256_hex(&archived.json) == r.hash;
    let (signature, signature_ok) = match VerifyingKey::from_spki_pem(&host.evidence_pubkey_pem) {
        Err(e) => (
            format!("the host's enrolled key does not parse: {e}"),
            false,
        ),
        Ok(key) => match key.verify(&archived.json, &archived.sig) {
            Ok(()) => ("valid (the host's enrolled key)".into(), true),
            Err(_) => (
                "INVALID: does not verify with the host's enrolled key".into(),
                false,
            ),
        },
    };
    Checked {
        bundle: serde_json::from_slice(&archived.json).ok(),
        json: Some(archived.json),
        sig: Some(archived.sig),
        signature,
        signature_ok,
        hash_ok,
    }
}

#[derive(Serialize)]
struct CheckRow {
    check: String,
    outcome: String,
    passing: bool,
    status: String,
    severity: String,
    reason: String,
    controls: String,
    bundle_id: String,
    at: String,
    signature: String,
    signature_ok: bool,
}

#[derive(Serialize)]
struct TimelineRow {
    at: String,
    sort: i64,
    kind: &'static str,
    text: String,
    link: Option<String>,
}

fn refused_view(
    st: &Console,
    v: &Viewer,
    action: &str,
    target: String,
) -> impl std::future::Future<Output = ()> + use<> {
    let (svc, caller, action) = (st.svc.clone(), v.caller.clone(), action.to_owned());
    async move {
        let _ = work(move || {
            crate::audit::record(
                &*svc.store,
                &caller,
                &action,
                &target,
                Some("not among the viewer's tenants"),
            )
        })
        .await;
    }
}

pub async fn host(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host)): Path<(String, String)>,
) -> Response {
    let v = viewer!(st, info, headers);
    let (svc, caller, s2, h2) = (st.svc.clone(), v.caller.clone(), site.clone(), host.clone());
    let found = attempt!(
        work(move || -> Result<Option<_>, crate::store::StoreError> {
            let Some(h) = svc.store.host(&caller, &s2, &h2)? else {
                return Ok(None);
            };
            let status = crate::fleet::host_status(&*svc.store, &caller, &h, Timestamp::now())?;
            let mut checks = Vec::new();
            for r in &status.latest {
                let record = svc.store.bundle(&caller, &r.bundle_id)?;
                let checked = record.as_ref().map(|rec| check_bundle(&svc, &h, rec));
                checks.push((r.clone(), checked));
            }
            let bundles = svc.store.bundles(
                &caller,
                &BundleFilter {
                    site_id: Some(s2.clone()),
                    host_id: Some(h2.clone()),
                    limit: TIMELINE_LIMIT,
                    ..BundleFilter::default()
                },
            )?;
            let orders = svc.store.orders(&caller, Some((&s2, &h2)))?;
            Ok(Some((h, status, checks, bundles, orders)))
        })
        .await
    );
    let (h, status, checks, bundles, orders) = match found {
        Ok(Some(x)) => x,
        Ok(None) => {
            refused_view(&st, &v, "console.host", format!("{site}/{host}")).await;
            return st.message(
                &v,
                StatusCode::NOT_FOUND,
                "No such host",
                &format!("There is no host {site}/{host} among your tenants."),
            );
        }
        Err(e) => {
            return st.message(
                &v,
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &e.to_string(),
            );
        }
    };
    let rows: Vec<CheckRow> = checks
        .into_iter()
        .map(|(r, checked)| {
            let bundle = checked.as_ref().and_then(|c| c.bundle.as_ref());
            let pre = bundle.map(|b| &b.pre_state);
            let field = |k: &str| {
                pre.and_then(|p| p.get(k))
                    .and_then(|x| x.as_str())
                    .unwrap_or("-")
                    .to_owned()
            };
            let controls = bundle.map_or_else(
                || {
                    Check::parse(&r.check)
                        .map(|c| c.hipaa_controls().join(", "))
                        .unwrap_or_default()
                },
                |b| b.hipaa_controls.join(", "),
            );
            let (signature, signature_ok) = match &checked {
                Some(c) if c.signature_ok && !c.hash_ok => (
                    "valid signature, but the bytes differ from the index's hash".into(),
                    false,
                ),
                Some(c) => (c.signature.clone(), c.signature_ok),
                None => ("the bundle is not in the index".into(), false),
            };
            CheckRow {
                passing: r.outcome == Outcome::Success.as_str(),
                check: r.check.clone(),
                outcome: r.outcome.clone(),
                status: field("status"),
                severity: field("severity"),
                reason: field("reason"),
                controls,
                bundle_id: r.bundle_id.clone(),
                at: when(r.timestamp_end),
                signature,
                signature_ok,
            }
        })
        .collect();
    let mut timeline: Vec<TimelineRow> = bundles
        .iter()
        .map(|b| TimelineRow {
            at: when(b.received_at),
            sort: b.received_at.as_microsecond(),
            kind: "evidence",
            text: format!("seq {} {}: {}", b.seq, b.check, b.outcome),
            link: Some(format!("/console/evidence/{}", b.bundle_id)),
        })
        .collect();
    for o in &orders {
        timeline.push(TimelineRow {
            at: when(o.created_at),
            sort: o.created_at.as_microsecond(),
            kind: "order",
            text: format!(
                "order {} created by {} ({})",
                o.runbook_id,
                o.created_by,
                o.state.as_str()
            ),
            link: None,
        });
        if let Some(at) = o.answered_at {
            timeline.push(TimelineRow {
                at: when(at),
                sort: at.as_microsecond(),
                kind: "order",
                text: format!(
                    "order {} answered: {}{}",
                    o.runbook_id,
                    o.result_outcome.as_deref().unwrap_or("-"),
                    o.result_error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
                link: o
                    .result_bundle_id
                    .as_ref()
                    .map(|b| format!("/console/evidence/{b}")),
            });
        }
    }
    timeline.sort_by_key(|t| std::cmp::Reverse(t.sort));
    let summary = host_row(&status);
    st.page(
        &v,
        StatusCode::OK,
        "host.html",
        "/console/fleet",
        context! {
            host => ser(&summary),
            enrolled_at => when(h.enrolled_at),
            revoked_at => h.revoked_at.map(when),
            scan_interval => h.scan_interval_sec,
            checks => ser(&rows),
            timeline => ser(&timeline),
        },
    )
}

pub async fn host_key(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((site, host)): Path<(String, String)>,
) -> Response {
    let v = viewer!(st, info, headers);
    let (svc, caller, s2, h2) = (st.svc.clone(), v.caller.clone(), site.clone(), host.clone());
    let found = attempt!(work(move || svc.store.host(&caller, &s2, &h2)).await);
    match found {
        Ok(Some(h)) => (
            [
                (header::CONTENT_TYPE, "application/x-pem-file".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"{}-{}.pub.pem\"",
                        h.site_id, h.host_id
                    ),
                ),
            ],
            h.evidence_pubkey_pem,
        )
            .into_response(),
        Ok(None) => {
            refused_view(&st, &v, "console.host", format!("{site}/{host}")).await;
            st.message(
                &v,
                StatusCode::NOT_FOUND,
                "No such host",
                &format!("There is no host {site}/{host} among your tenants."),
            )
        }
        Err(e) => st.message(
            &v,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &e.to_string(),
        ),
    }
}

// ---------------------------------------------------------------- evidence

#[derive(Deserialize, Default)]
pub struct EvidenceQuery {
    site: Option<String>,
    host: Option<String>,
    check: Option<String>,
    outcome: Option<String>,
}

#[derive(Serialize)]
struct BundleRow {
    bundle_id: String,
    site: String,
    host: String,
    seq: u64,
    check: String,
    outcome: String,
    at: String,
    received: String,
}

fn bundle_row(b: &BundleRecord) -> BundleRow {
    BundleRow {
        bundle_id: b.bundle_id.clone(),
        site: b.site_id.clone(),
        host: b.host_id.clone(),
        seq: b.seq,
        check: b.check.clone(),
        outcome: b.outcome.clone(),
        at: when(b.timestamp_end),
        received: when(b.received_at),
    }
}

/// The filter a query names, or what is wrong with it.
fn evidence_filter(q: EvidenceQuery) -> Result<BundleFilter, String> {
    let nonempty = |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let (site, host, check, outcome) = (
        nonempty(q.site),
        nonempty(q.host),
        nonempty(q.check),
        nonempty(q.outcome),
    );
    for (what, v) in [("site", &site), ("host", &host)] {
        if let Some(v) = v
            && !crate::valid_id(v)
        {
            return Err(format!("{what} {v:?} is not a valid id"));
        }
    }
    if let Some(c) = &check
        && Check::parse(c).is_none()
    {
        return Err(format!("check {c:?} is unknown"));
    }
    if let Some(o) = &outcome
        && !Outcome::ALL.iter().any(|x| x.as_str() == o)
    {
        return Err(format!("outcome {o:?} is unknown"));
    }
    Ok(BundleFilter {
        site_id: site,
        host_id: host,
        check,
        outcome,
        limit: LIST_LIMIT,
    })
}

pub async fn evidence(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    query: Result<Query<EvidenceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let shown = context! {
        site => q.site.clone().unwrap_or_default(),
        host => q.host.clone().unwrap_or_default(),
        check => q.check.clone().unwrap_or_default(),
        outcome => q.outcome.clone().unwrap_or_default(),
    };
    let checks: Vec<&str> = Check::ALL.iter().map(|c| c.as_str()).collect();
    let outcomes: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    let filter = match evidence_filter(q) {
        Ok(f) => f,
        Err(e) => {
            return st.page(
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                "evidence.html",
                "/console/evidence",
                context! { error => e, bundles => ser(&Vec::<BundleRow>::new()), filter => shown, checks, outcomes, limit => LIST_LIMIT },
            );
        }
    };
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(work(move || svc.store.bundles(&caller, &filter)).await);
    match found {
        Ok(list) => {
            let bundles: Vec<BundleRow> = list.iter().map(bundle_row).collect();
            st.page(
                &v,
                StatusCode::OK,
                "evidence.html",
                "/console/evidence",
                context! { error => None::<String>, bundles => ser(&bundles), filter => shown, checks, outcomes, limit => LIST_LIMIT },
            )
        }
        Err(e) => st.message(
            &v,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &e.to_string(),
        ),
    }
}

/// A bundle of the viewer's tenants with its host, or None (not there, or not theirs).
fn visible_bundle(
    svc: &crate::Services,
    caller: &Caller,
    bundle_id: &str,
) -> Result<Option<(BundleRecord, Host)>, crate::store::StoreError> {
    let Some(r) = svc.store.bundle(caller, bundle_id)? else {
        return Ok(None);
    };
    Ok(svc
        .store
        .host(caller, &r.site_id, &r.host_id)?
        .map(|h| (r, h)))
}

pub async fn bundle(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(bundle_id): Path<String>,
) -> Response {
    let v = viewer!(st, info, headers);
    let (svc, caller, id) = (st.svc.clone(), v.caller.clone(), bundle_id.clone());
    let found = attempt!(
        work(move || -> Result<Option<_>, crate::store::StoreError> {
            let Some((r, h)) = visible_bundle(&svc, &caller, &id)? else {
                return Ok(None);
            };
            let checked = check_bundle(&svc, &h, &r);
            let n = svc
                .store
                .neighbours(&caller, &r.site_id, &r.host_id, r.seq)?;
            Ok(Some((r, checked, n)))
        })
        .await
    );
    let (r, checked, n) = match found {
        Ok(Some(x)) => x,
        Ok(None) => {
            refused_view(&st, &v, "console.evidence", bundle_id.clone()).await;
            return st.message(
                &v,
                StatusCode::NOT_FOUND,
                "No such bundle",
                &format!("There is no bundle {bundle_id} among your tenants."),
            );
        }
        Err(e) => {
            return st.message(
                &v,
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &e.to_string(),
            );
        }
    };
    let chain = match (&n.previous, r.seq) {
        (_, 1) => (
            "the first bundle of the chain".to_owned(),
            r.prev_hash.is_none(),
        ),
        (Some(p), _) if p.seq + 1 == r.seq => {
            if r.prev_hash.as_deref() == Some(p.hash.as_str()) {
                (format!("links to seq {} (prev_hash matches)", p.seq), true)
            } else {
                (format!("prev_hash does NOT match seq {}", p.seq), false)
            }
        }
        (Some(p), _) => (
            format!("gap: the previous stored bundle is seq {}", p.seq),
            false,
        ),
        (None, _) => ("no earlier bundle is stored".to_owned(), false),
    };
    let pretty = checked
        .json
        .as_ref()
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
        .and_then(|j| serde_json::to_string_pretty(&j).ok())
        .unwrap_or_default();
    let verification = context! {
        signature => checked.signature,
        signature_ok => checked.signature_ok,
        hash_ok => checked.hash_ok,
        chain => chain.0,
        chain_ok => chain.1,
        sig_bytes => checked.sig.as_ref().map_or(0, Vec::len),
    };
    st.page(
        &v,
        StatusCode::OK,
        "bundle.html",
        "/console/evidence",
        context! { bundle => ser(&bundle_row(&r)), hash => r.hash, prev_hash => r.prev_hash, order_id => r.order_id, verification, json => pretty },
    )
}

pub async fn bundle_file(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path((bundle_id, file)): Path<(String, String)>,
) -> Response {
    let v = viewer!(st, info, headers);
    if file != "bundle.json" && file != "bundle.sig" {
        return st.message(
            &v,
            StatusCode::NOT_FOUND,
            "Not found",
            "A bundle has bundle.json and bundle.sig.",
        );
    }
    let (svc, caller, id) = (st.svc.clone(), v.caller.clone(), bundle_id.clone());
    let f2 = file.clone();
    let found = attempt!(
        work(move || -> Result<Option<Vec<u8>>, String> {
            let Some((r, h)) = visible_bundle(&svc, &caller, &id).map_err(|e| e.to_string())?
            else {
                return Ok(None);
            };
            let archived = svc
                .archive
                .get(&ArchiveKey::of(&h, &r))
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("bundle {id} is indexed but missing from the archive"))?;
            crate::audit::record(
                &*svc.store,
                &caller,
                "evidence.download",
                &format!("{}/{}/{id}/{f2}", r.site_id, r.host_id),
                None,
            );
            Ok(Some(if f2 == "bundle.json" {
                archived.json
            } else {
                archived.sig
            }))
        })
        .await
    );
    match found {
        Ok(Some(bytes)) => (
            [
                (
                    header::CONTENT_TYPE,
                    if file == "bundle.json" {
                        "application/json"
                    } else {
                        "application/octet-stream"
                    },
                ),
                (
                    header::CONTENT_DISPOSITION,
                    if file == "bundle.json" {
                        "attachment; filename=\"bundle.json\""
                    } else {
                        "attachment; filename=\"bundle.sig\""
                    },
                ),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => {
            refused_view(&st, &v, "console.evidence", bundle_id.clone()).await;
            st.message(
                &v,
                StatusCode::NOT_FOUND,
                "No such bundle",
                &format!("There is no bundle {bundle_id} among your tenants."),
            )
        }
        Err(e) => st.message(&v, StatusCode::SERVICE_UNAVAILABLE, "Unavailable", &e),
    }
}

// ---------------------------------------------------------------- orders

#[derive(Serialize)]
struct OrderRow {
    order_id: String,
    host: String,
    runbook: String,
    state: &'static str,
    created_by: String,
    created_at: String,
    approved_by: Option<String>,
    result: String,
    can_approve: bool,
}

#[derive(Deserialize, Default)]
pub struct OrdersQuery {
    approved: Option<String>,
}

async fn orders_page(
    st: &Console,
    v: &Viewer,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(work(move || svc.store.orders(&caller, None)).await);
    let list = match found {
        Ok(l) => l,
        Err(e) => {
            return st.message(
                v,
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &e.to_string(),
            );
        }
    };
    let rows: Vec<OrderRow> = list
        .iter()
        .map(|o| OrderRow {
            order_id: o.order_id.clone(),
            host: format!("{}/{}", o.site_id, o.host_id),
            runbook: o.runbook_id.clone(),
            state: o.state.as_str(),
            created_by: o.created_by.clone(),
            created_at: when(o.created_at),
            approved_by: o.approved_by.clone(),
            result: match (&o.result_outcome, &o.result_error) {
                (Some(r), Some(e)) => format!("{r}: {e}"),
                (Some(r), None) => r.clone(),
                _ => "-".into(),
            },
            can_approve: o.state == OrderState::AwaitingApproval
                && may_approve(&v.caller, &o.created_by),
        })
        .collect();
    st.page(
        v,
        status,
        "orders.html",
        "/console/orders",
        context! { orders => ser(&rows), notice, error },
    )
}

pub async fn orders(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    query: Result<Query<OrdersQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let approved = query
        .ok()
        .and_then(|Query(q)| q.approved)
        .filter(|id| crate::valid_id(id));
    let notice = approved.map(|id| format!("Order {id} approved and signed."));
    orders_page(&st, &v, StatusCode::OK, notice, None).await
}

pub async fn order_approve(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let sent = form.ok().and_then(|Form(f)| f.csrf);
    attempt!(
        st.check_csrf(&v, sent.as_deref(), &format!("order.approve:{order_id}"))
            .await
    );
    let (svc, caller, id) = (st.svc.clone(), v.caller.clone(), order_id.clone());
    // orders::approve applies the second-operator rule and audits either way.
    let result = attempt!(work(move || crate::orders::approve(&svc, &caller, &id)).await);
    match result {
        Ok(_) => redirect(&format!("/console/orders?approved={order_id}")),
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN);
            orders_page(&st, &v, status, None, Some(format!("Not approved: {e}"))).await
        }
    }
}

// ---------------------------------------------------------------- tokens

#[derive(Serialize)]
struct TokenRow {
    token_id: String,
    site: String,
    reseller: String,
    uses_left: u32,
    expires_at: String,
    created_by: String,
    created_at: String,
    state: &'static str,
    can_revoke: bool,
}

async fn tokens_page(
    st: &Console,
    v: &Viewer,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(work(move || svc.store.enrollment_tokens(&caller)).await);
    let list = match found {
        Ok(l) => l,
        Err(e) => {
            return st.message(
                v,
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                &e.to_string(),
            );
        }
    };
    let now = Timestamp::now();
    let can_write = v.caller.require_write("revoke enrollment tokens").is_ok();
    let rows: Vec<TokenRow> = list
        .iter()
        .map(|t| {
            let state = if t.revoked_at.is_some() {
                "revoked"
            } else if t.expires_at <= now {
                "expired"
            } else if t.uses_left == 0 {
                "used up"
            } else {
                "active"
            };
            TokenRow {
                token_id: t.token_id.clone(),
                site: t.site_id.clone(),
                reseller: t
                    .reseller_id
                    .clone()
                    .unwrap_or_else(|| "direct (MSP)".into()),
                uses_left: t.uses_left,
                expires_at: when(t.expires_at),
                created_by: t.created_by.clone(),
                created_at: when(t.created_at),
                state,
                can_revoke: can_write && state == "active",
            }
        })
        .collect();
    let default_reseller = match &v.caller.tenants {
        crate::auth::Tenants::Reseller { reseller_id } => reseller_id.clone(),
        _ => String::new(),
    };
    st.page(
        v,
        status,
        "tokens.html",
        "/console/tokens",
        context! { tokens => ser(&rows), notice, error, default_reseller },
    )
}

pub async fn tokens(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let v = viewer!(st, info, headers);
    tokens_page(&st, &v, StatusCode::OK, None, None).await
}

#[derive(Deserialize)]
pub struct TokenForm {
    csrf: Option<String>,
    // Missing fields are empty, so only a body that is not a form at all is rejected
    // before its CSRF token is checked; an empty site is refused by create_token.
    #[serde(default)]
    site: String,
    #[serde(default)]
    reseller: String,
    #[serde(default)]
    uses: String,
    #[serde(default)]
    expires: String,
}

pub async fn token_create(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            attempt!(st.check_csrf(&v, None, "enrollment_token.create").await);
            return tokens_page(
                &st,
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(format!("The form is incomplete: {e}")),
            )
            .await;
        }
    };
    attempt!(
        st.check_csrf(&v, form.csrf.as_deref(), "enrollment_token.create")
            .await
    );
    let uses = if form.uses.trim().is_empty() {
        Ok(1)
    } else {
        form.uses.trim().parse::<u32>()
    };
    let Ok(uses) = uses else {
        return tokens_page(
            &st,
            &v,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            Some(format!("uses {:?} is not a number", form.uses)),
        )
        .await;
    };
    let expires = if form.expires.trim().is_empty() {
        "24h".to_owned()
    } else {
        form.expires.trim().to_owned()
    };
    let expires_in = match crate::cli::parse_duration(&expires) {
        Ok(d) => d,
        Err(e) => {
            return tokens_page(
                &st,
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(e.to_string()),
            )
            .await;
        }
    };
    let req = crate::enroll::TokenRequest {
        site_id: form.site.trim().to_owned(),
        reseller_id: Some(form.reseller.trim().to_owned()).filter(|r| !r.is_empty()),
        uses,
        expires_in,
    };
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    // create_token checks the scope and audits either way.
    let created = attempt!(work(move || crate::enroll::create_token(&svc, &caller, &req)).await);
    match created {
        Ok(t) => st.page(
            &v,
            StatusCode::OK,
            "token_created.html",
            "/console/tokens",
            context! {
                token => t.token,
                token_id => t.token_id,
                site => t.site_id,
                uses => t.uses,
                expires_at => when(t.expires_at),
                ca_fingerprint => t.ca_fingerprint,
                enroll_url => st.svc.config.public_url(),
            },
        ),
        Err(e) => {
            tokens_page(
                &st,
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(format!("No token made: {e}")),
            )
            .await
        }
    }
}

pub async fn token_revoke(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(token_id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let sent = form.ok().and_then(|Form(f)| f.csrf);
    attempt!(
        st.check_csrf(&v, sent.as_deref(), "enrollment_token.revoke")
            .await
    );
    let (svc, caller, id) = (st.svc.clone(), v.caller.clone(), token_id.clone());
    let result = attempt!(
        work(move || {
            let r = svc
                .store
                .revoke_enrollment_token(&caller, &id, Timestamp::now());
            let refused = crate::audit::refusal(&r);
            crate::audit::record(
                &*svc.store,
                &caller,
                "enrollment_token.revoke",
                &id,
                refused.as_deref(),
            );
            r
        })
        .await
    );
    match result {
        Ok(true) => {
            tokens_page(
                &st,
                &v,
                StatusCode::OK,
                Some(format!(
                    "Token {token_id} revoked: no box can enroll with it now."
                )),
                None,
            )
            .await
        }
        Ok(false) => {
            tokens_page(
                &st,
                &v,
                StatusCode::OK,
                Some(format!("Token {token_id} was already revoked.")),
                None,
            )
            .await
        }
        Err(crate::store::StoreError::NotFound(_)) => {
            tokens_page(
                &st,
                &v,
                StatusCode::NOT_FOUND,
                None,
                Some(format!("There is no token {token_id} among your tenants.")),
            )
            .await
        }
        Err(e @ crate::store::StoreError::Forbidden(_)) => {
            tokens_page(&st, &v, StatusCode::FORBIDDEN, None, Some(e.to_string())).await
        }
        Err(e) => {
            tokens_page(
                &st,
                &v,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                Some(e.to_string()),
            )
            .await
        }
    }
}

// ---------------------------------------------------------------- audit, account

pub async fn audit(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let v = viewer!(st, info, headers);
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let found = attempt!(work(move || svc.store.audit(&caller, 500)).await);
    match found {
        Ok(entries) => {
            let rows: Vec<minijinja::Value> = entries
                .iter()
                .map(|e| {
                    context! {
                        id => e.id,
                        at => when(e.at),
                        actor => e.actor.clone(),
                        peer => e.peer.clone().unwrap_or_default(),
                        action => e.action.clone(),
                        target => e.target.clone(),
                        outcome => e.outcome.clone(),
                        detail => e.detail.clone(),
                    }
                })
                .collect();
            st.page(
                &v,
                StatusCode::OK,
                "audit.html",
                "/console/audit",
                context! { entries => rows },
            )
        }
        Err(e) => st.message(
            &v,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &e.to_string(),
        ),
    }
}

pub async fn account(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let v = viewer!(st, info, headers);
    let role = role_label(v.caller.role);
    st.page(&v, StatusCode::OK, "account.html", "/console/account", context! { role, notice => None::<String>, error => None::<String>, min => MIN_PASSWORD_LEN })
}

#[derive(Deserialize)]
pub struct PasswordForm {
    csrf: Option<String>,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
}

pub async fn set_password(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    form: Result<Form<PasswordForm>, FormRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let role = role_label(v.caller.role);
    let page = |status, notice: Option<String>, error: Option<String>| {
        st.page(
            &v,
            status,
            "account.html",
            "/console/account",
            context! { role, notice, error, min => MIN_PASSWORD_LEN },
        )
    };
    let form = match form {
        Ok(Form(f)) => f,
        Err(_) => {
            attempt!(st.check_csrf(&v, None, "operator.password").await);
            return page(
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some("The form is incomplete.".into()),
            );
        }
    };
    attempt!(
        st.check_csrf(&v, form.csrf.as_deref(), "operator.password")
            .await
    );
    if form.password != form.confirm {
        return page(
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            Some("The two passwords differ.".into()),
        );
    }
    if form.password.chars().count() < MIN_PASSWORD_LEN {
        return page(
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            Some(format!(
                "A password has at least {MIN_PASSWORD_LEN} characters."
            )),
        );
    }
    let (svc, caller, name) = (st.svc.clone(), v.caller.clone(), v.name.clone());
    let result = attempt!(
        work(move || -> Result<(), String> {
            let phc = hash_password(&form.password).map_err(|e| e.to_string())?;
            let r = svc
                .store
                .set_operator_password(&caller, &name, &phc, Timestamp::now());
            let refused = crate::audit::refusal(&r);
            crate::audit::record(
                &*svc.store,
                &caller,
                "operator.password",
                &name,
                refused.as_deref(),
            );
            r.map_err(|e| e.to_string())
        })
        .await
    );
    match result {
        Ok(()) => page(
            StatusCode::OK,
            Some("Password set: you can sign in with your name and this password.".into()),
            None,
        ),
        Err(e) => page(StatusCode::FORBIDDEN, None, Some(e)),
    }
}
