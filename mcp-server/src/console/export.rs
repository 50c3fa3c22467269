//! The auditor's export from the console: a form, and the export of one site and period
//! as a tar archive (the same package as `mcp-server export`, in the viewer's scope).

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use minijinja::context;
use serde::Deserialize;

use super::Console;
use super::pages::{attempt, viewer, work};
use crate::api::ConnInfo;

pub async fn form(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let v = viewer!(st, info, headers);
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    match attempt!(work(move || svc.store.sites(&caller)).await) {
        Ok(sites) => {
            let today = jiff::Timestamp::now()
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date();
            let month_ago = today
                .checked_sub(jiff::Span::new().days(30))
                .unwrap_or(today);
            let ids: Vec<String> = sites.into_iter().map(|s| s.site_id).collect();
            st.page(
                &v,
                StatusCode::OK,
                "export.html",
                "/console/export",
                context! { sites => ids, from => month_ago.to_string(), to => today.to_string() },
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    site: String,
    from: String,
    to: String,
}

/// Builds the export in a private directory under the state directory, archives it as
/// tar, removes the directory, and sends the archive.
pub async fn download(
    State(st): State<Console>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Response {
    let v = viewer!(st, info, headers);
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return st.message(
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                "Bad request",
                &e.body_text(),
            );
        }
    };
    let (svc, caller) = (st.svc.clone(), v.caller.clone());
    let name = safe_name(&format!("{}-{}-{}", q.site, q.from, q.to));
    let top = name.clone();
    let built = attempt!(
        work(move || -> crate::Result<Vec<u8>> {
            let scratch = svc
                .paths
                .state_dir
                .join("exports")
                .join(format!(".console-{}", uuid::Uuid::new_v4().simple()));
            let req = crate::export::ExportRequest {
                from: crate::export::parse_when("from", &q.from)?,
                to: crate::export::parse_when("to", &q.to)?,
                site_id: q.site,
                out: scratch.join("export"),
            };
            std::fs::create_dir_all(&scratch).map_err(crate::Error::io(&scratch))?;
            let r = crate::export::export(&svc, &caller, &req)
                .and_then(|_| crate::export::tar(&req.out, &top));
            let _ = std::fs::remove_dir_all(&scratch);
            r
        })
        .await
    );
    match built {
        Ok(tar) => (
            [
                (header::CONTENT_TYPE, "application/x-tar".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}.tar\""),
                ),
            ],
            tar,
        )
            .into_response(),
        Err(crate::Error::Invalid(m)) => {
            st.message(&v, StatusCode::UNPROCESSABLE_ENTITY, "Export refused", &m)
        }
        Err(e) => st.message(
            &v,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            &e.to_string(),
        ),
    }
}

/// A file name of letters, digits, `.`, `-` and `_` only.
fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
