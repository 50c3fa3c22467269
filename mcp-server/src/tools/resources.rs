//! Bundles as resources: `bundle://BUNDLE_ID` reads bundle.json exactly as archived,
//! with a second part, `bundle://BUNDLE_ID/verification`, giving its signature status
//! and chain links as `show_bundle` checks them. Scoped and audited like the tools.

use rmcp::model::{
    ListResourceTemplatesResult, ReadResourceResult, ResourceContents, ResourceTemplate,
};
use serde_json::{Value, json};

use super::ToolError;
use super::evidence::verified_bundle;
use crate::auth::Caller;
use crate::services::Services;

const SCHEME: &str = "bundle://";

pub(super) fn templates() -> ListResourceTemplatesResult {
    ListResourceTemplatesResult::with_all_items(vec![
        ResourceTemplate::new(format!("{SCHEME}{{bundle_id}}"), "bundle")
            .with_title("An evidence bundle")
            .with_description(
                "bundle.json exactly as archived, then its verification (signature by the host's enrolled key, hash, chain links) as a second part",
            ),
    ])
}

/// The bundle id a resource URI names.
pub(super) fn bundle_id(uri: &str) -> Result<&str, ToolError> {
    uri.strip_prefix(SCHEME)
        .map(|id| id.strip_suffix("/verification").unwrap_or(id))
        .filter(|id| crate::valid_id(id))
        .ok_or_else(|| ToolError::Arguments {
            tool: "read_resource",
            reason: format!("{uri:?} is not bundle://BUNDLE_ID"),
        })
}

pub(super) fn read(
    svc: &Services,
    caller: &Caller,
    uri: &str,
) -> Result<ReadResourceResult, ToolError> {
    let id = bundle_id(uri)?;
    let found = verified_bundle(svc, caller, "read_resource", id)?;
    let mut contents = Vec::new();
    if let Some(json) = &found.json {
        contents.push(ResourceContents::TextResourceContents {
            uri: format!("{SCHEME}{id}"),
            mime_type: Some("application/json".into()),
            // Archived bytes that are not UTF-8 are shown lossily; the verification says they fail.
            text: String::from_utf8_lossy(json).into_owned(),
            meta: None,
        });
    }
    let summary: Value = found.summary(caller);
    contents.push(ResourceContents::TextResourceContents {
        uri: format!("{SCHEME}{id}/verification"),
        mime_type: Some("application/json".into()),
        text: json!(summary).to_string(),
        meta: None,
    });
    Ok(ReadResourceResult::new(contents))
}
