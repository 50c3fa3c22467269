//! The operator API's OpenAPI document: served at /api/v1/openapi.json on the operator
//! listener, and naming every operator route, each of which the server really serves.

mod common;

use common::*;
use serde_json::Value;

/// The operator API as the CLI and the README use it: (method, path) of every route.
const OPERATOR_ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/ops/status"),
    ("get", "/api/v1/ops/hosts"),
    ("get", "/api/v1/ops/hosts/{site}/{host}"),
    ("post", "/api/v1/ops/hosts/{site}/{host}/revoke"),
    ("post", "/api/v1/ops/tokens"),
    ("get", "/api/v1/ops/orders"),
    ("post", "/api/v1/ops/orders"),
    ("post", "/api/v1/ops/orders/{order_id}/approve"),
    ("get", "/api/v1/ops/audit"),
    ("get", "/api/v1/ops/log/checkpoint"),
    ("get", "/api/v1/ops/log/inclusion"),
    ("get", "/api/v1/ops/log/consistency"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/incidents"),
    ("get", "/api/v1/incidents/{incident_id}"),
    ("post", "/api/v1/incidents/{incident_id}/close"),
    ("post", "/api/v1/incidents/{incident_id}/plan"),
    ("post", "/api/v1/incidents/{incident_id}/execute"),
    ("get", "/api/v1/ops/sites/{site}/executor"),
    ("put", "/api/v1/ops/sites/{site}/executor"),
    ("get", "/api/v1/ops/sbom/hosts"),
    ("get", "/api/v1/ops/hosts/{site}/{host}/sbom"),
];

fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops: Vec<(String, String)> = doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(m, _)| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
                .map(move |(m, _)| (m.clone(), path.clone()))
        })
        .collect();
    ops.sort();
    ops
}

#[test]
fn the_openapi_document_names_every_operator_route_and_each_is_served() -> TestResult {
    let server = TestServer::start();
    let base = format!("https://{}", server.running.operator_addr());
    let agent = client(&server.ca_pem(), None);

    let (status, doc) = get(
        &agent,
        &format!("{base}{}", mcp_server::api::ops::OPENAPI_PATH),
    );
    assert_eq!(status, 200, "the document is served without a token: {doc}");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3 document: {doc}"
    );
    assert_eq!(
        doc,
        serde_json::to_value(mcp_server::api::ops::openapi())?,
        "the served document is the one generated from the code"
    );

    let mut expected: Vec<(String, String)> = OPERATOR_ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    expected.sort();
    assert_eq!(
        operations(&doc),
        expected,
        "the document lists exactly the operator routes"
    );
    assert!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer")),
        "the bearer scheme is described: {}",
        doc["components"]
    );

    // Each documented operation is a route the listener serves: without a token it
    // answers 401 (the route exists and authenticates), never the fallback's 404.
    for (method, path) in &expected {
        let concrete = path
            .replace("{site}", "clinic-1")
            .replace("{host}", "frontdesk-01")
            .replace("{order_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{incident_id}", "00000000-0000-0000-0000-000000000000");
        let url = format!("{base}{concrete}");
        let (status, body) = match method.as_str() {
            "get" => get(&agent, &url),
            "put" => put_json(&agent, &url, &serde_json::json!({})),
            _ => post_json(&agent, &url, &serde_json::json!({})),
        };
        if path == mcp_server::api::ops::OPENAPI_PATH {
            assert_eq!(status, 200, "{method} {path}: {body}");
            continue;
        }
        assert_eq!(
            status, 401,
            "{method} {path} is served and asks for a token: {body}"
        );
        let op = &doc["paths"][path.as_str()][method.as_str()];
        assert!(
            op["security"].to_string().contains("bearer"),
            "{method} {path} is documented as needing the bearer token: {op}"
        );
        assert!(
            op["responses"]["401"].is_object(),
            "{method} {path} documents its 401: {op}"
        );
    }

    // Control: a path the document does not name is not served.
    let (status, body) = get(&agent, &format!("{base}/api/v1/ops/undocumented"));
    assert_eq!(
        status, 404,
        "an undocumented operator path is the fallback's 404: {body}"
    );
    Ok(())
}

/// PUTs a JSON body: (status, body).
fn put_json(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    match agent
        .put(url)
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
    {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}
