//! The latest SBOM of each host and its components, for the question an MSP asks on a
//! CVE day: which hosts run this store path, or this package (at this version)? Scoped
//! by the `Caller` like every other query; written by intake (the host's own SBOM).

use jiff::Timestamp;
use serde::Serialize;

use super::Result;
use crate::auth::Caller;

/// One component of an SBOM as the index keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SbomComponent {
    pub name: String,
    pub version: Option<String>,
    pub store_path: String,
}

/// The SBOM a host delivered last (by bundle seq).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SbomRecord {
    pub site_id: String,
    pub host_id: String,
    pub bundle_id: String,
    pub seq: u64,
    /// SHA-256 (hex) of the document, as the signed bundle records it.
    pub sha256: String,
    pub components: u64,
    pub received_at: Timestamp,
    #[serde(skip)]
    pub document: Vec<u8>,
}

/// What to look for; exactly one of `package` and `store_path`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SbomQuery {
    /// A package name, as the SBOM's component name (`openssl`).
    pub package: Option<String>,
    /// Only this version of the package.
    pub version: Option<String>,
    /// A full store path (`/nix/store/...-openssl-3.0.13`).
    pub store_path: Option<String>,
}

/// A host whose latest SBOM holds a matching component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SbomMatch {
    pub site_id: String,
    pub host_id: String,
    pub reseller_id: Option<String>,
    pub bundle_id: String,
    pub component: SbomComponent,
}

/// Implemented by both backends; the conformance suite in tests/store.rs covers it.
pub trait SbomStore {
    /// Keeps `record` (with `components`) as the host's latest SBOM unless the host
    /// already has one from a later bundle; answers whether it is now the latest.
    fn put_sbom(
        &self,
        caller: &Caller,
        record: &SbomRecord,
        components: &[SbomComponent],
    ) -> Result<bool>;
    /// The host's latest SBOM, document included; a host outside the caller's tenants
    /// is "not found".
    fn latest_sbom(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Option<SbomRecord>>;
    /// The hosts among the caller's tenants whose latest SBOM matches, by site and host.
    fn sbom_hosts(&self, caller: &Caller, query: &SbomQuery) -> Result<Vec<SbomMatch>>;
}

/// Refuses a query that names neither or both of a package and a store path.
pub fn check_query(q: &SbomQuery) -> Result<()> {
    let bad = |m: &str| Err(super::StoreError::Forbidden(m.into()));
    match (&q.package, &q.store_path) {
        (Some(p), None) if !p.is_empty() => Ok(()),
        (None, Some(s)) if s.starts_with("/nix/store/") => {
            if q.version.is_some() {
                return bad("a version narrows a package name, not a store path");
            }
            Ok(())
        }
        (None, Some(s)) => bad(&format!("{s:?} is not a store path (/nix/store/...)")),
        (Some(_), Some(_)) => bad("name a package or a store path, not both"),
        _ => bad("name a package (and optionally its version) or a store path"),
    }
}
