//! The SBOM a box delivers beside its signed `sbom` bundle: checked against the SHA-256
//! the bundle records (from the archived bundle.json, not from the upload), parsed as
//! CycloneDX, and kept as the host's latest SBOM with its components indexed, for
//! `mcp-server sbom hosts --package P` / `--path /nix/store/...` on a CVE day.

use compliance_agent::evidence::Bundle;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

use crate::archive::ArchiveKey;
use crate::auth::Caller;
use crate::services::Services;
use crate::store::sbom::{SbomComponent, SbomRecord};
use crate::store::{Host, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error("no bundle {0} of this host is stored; deliver the bundle first")]
    NoBundle(String),
    #[error("{0}")]
    NotItsDocument(String),
    #[error("the document is not a CycloneDX SBOM of Nix store paths: {0}")]
    NotCycloneDx(String),
    #[error("{0}; the SBOM was not stored, send it again later")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl SbomError {
    pub fn status(&self) -> u16 {
        match self {
            SbomError::NoBundle(_) => 404,
            SbomError::Unavailable(_) => 503,
            SbomError::Internal(_) => 500,
            _ => 422,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SbomReceipt {
    pub bundle_id: String,
    pub components: u64,
    /// False when the host already has an SBOM from a later bundle (kept).
    pub latest: bool,
}

fn store_err(e: StoreError) -> SbomError {
    match e {
        StoreError::Unavailable(m) => {
            SbomError::Unavailable(format!("the database is unavailable: {m}"))
        }
        other => SbomError::Internal(other.to_string()),
    }
}

/// The components of a CycloneDX document: every component (and the metadata
/// component, the system itself) with its name, version and Nix store path.
pub fn components(document: &[u8]) -> Result<Vec<SbomComponent>, String> {
    let doc: Value = serde_json::from_slice(document).map_err(|e| format!("not JSON: {e}"))?;
    if doc["bomFormat"] != "CycloneDX" {
        return Err("bomFormat is not \"CycloneDX\"".into());
    }
    let listed = doc["components"]
        .as_array()
        .ok_or("it has no components array")?;
    let mut out = Vec::with_capacity(listed.len() + 1);
    let root = doc["metadata"]["component"]
        .is_object()
        .then(|| &doc["metadata"]["component"]);
    for (i, c) in root.into_iter().chain(listed.iter()).enumerate() {
        let what = if root.is_some() && i == 0 {
            "metadata.component".to_owned()
        } else {
            format!("components[{}]", i - usize::from(root.is_some()))
        };
        let name = c["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{what} has no name"))?;
        let store_path = c["properties"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "nix:store_path")
            .and_then(|p| p["value"].as_str())
            .or_else(|| c["bom-ref"].as_str())
            .filter(|p| p.starts_with("/nix/store/"))
            .ok_or_else(|| format!("{what} ({name}) names no Nix store path"))?;
        out.push(SbomComponent {
            name: name.to_owned(),
            version: c["version"].as_str().map(str::to_owned),
            store_path: store_path.to_owned(),
        });
    }
    Ok(out)
}

/// Checks and keeps the document of bundle `bundle_id`, a bundle `host` delivered.
pub fn receive(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    bundle_id: &str,
    document: &[u8],
) -> Result<SbomReceipt, SbomError> {
    if !crate::valid_id(bundle_id) {
        return Err(SbomError::NoBundle(bundle_id.chars().take(80).collect()));
    }
    let record = svc
        .store
        .bundle(caller, bundle_id)
        .map_err(store_err)?
        .filter(|r| {
            (r.site_id.as_str(), r.host_id.as_str())
                == (host.site_id.as_str(), host.host_id.as_str())
        })
        .ok_or_else(|| SbomError::NoBundle(bundle_id.to_owned()))?;
    // What the box signed, from the archive: the upload cannot name its own hash.
    let archived = svc
        .archive
        .get(&ArchiveKey::of(host, &record))
        .map_err(|e| SbomError::Unavailable(e.to_string()))?
        .ok_or_else(|| {
            SbomError::Internal(format!(
                "bundle {bundle_id} is indexed but missing from the archive"
            ))
        })?;
    let bundle: Bundle = serde_json::from_slice(&archived.json)
        .map_err(|e| SbomError::Internal(format!("archived bundle {bundle_id}: {e}")))?;
    let sha256 = compliance_agent::sbom::check_document(&bundle, document)
        .map_err(SbomError::NotItsDocument)?;
    let components = components(document).map_err(SbomError::NotCycloneDx)?;
    let latest = svc
        .store
        .put_sbom(
            caller,
            &SbomRecord {
                site_id: host.site_id.clone(),
                host_id: host.host_id.clone(),
                bundle_id: bundle_id.to_owned(),
                seq: bundle.seq,
                sha256,
                components: components.len() as u64,
                received_at: Timestamp::now(),
                document: document.to_vec(),
            },
            &components,
        )
        .map_err(store_err)?;
    Ok(SbomReceipt {
        bundle_id: bundle_id.to_owned(),
        components: components.len() as u64,
        latest,
    })
}
