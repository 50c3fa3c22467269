//! The evidence archive behind one trait: every accepted bundle.json and bundle.sig,
//! written once under a key naming reseller/site/host/seq, never replaced.

pub mod local;
pub mod s3;

use jiff::Timestamp;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "archive object {key} already exists with other contents; archived evidence is never replaced"
    )]
    Conflict { key: String },
    #[error("the archive is unavailable: {0}")]
    Unavailable(String),
    #[error("the archive is not usable: {0}")]
    Unusable(String),
}

pub type Result<T> = std::result::Result<T, ArchiveError>;

/// Where a bundle lives in the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveKey {
    /// None: a direct-mode site of the MSP (archived under `_direct`).
    pub reseller_id: Option<String>,
    pub site_id: String,
    pub host_id: String,
    pub seq: u64,
    pub bundle_id: String,
}

impl ArchiveKey {
    /// Where `record`, a bundle of `host`, was archived.
    pub fn of(host: &crate::store::Host, record: &crate::store::BundleRecord) -> Self {
        Self {
            reseller_id: host.reseller_id.clone(),
            site_id: record.site_id.clone(),
            host_id: record.host_id.clone(),
            seq: record.seq,
            bundle_id: record.bundle_id.clone(),
        }
    }

    /// `RESELLER/SITE/HOST/SEQ(20 digits)-BUNDLE_ID`, so a listing sorts by seq.
    pub fn prefix(&self) -> String {
        format!(
            "{}/{}/{}/{:020}-{}",
            self.reseller_id.as_deref().unwrap_or("_direct"),
            self.site_id,
            self.host_id,
            self.seq,
            self.bundle_id
        )
    }
}

/// What the archive holds for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archived {
    pub json: Vec<u8>,
    pub sig: Vec<u8>,
    pub retain_until: Timestamp,
}

/// An archive backend. `put` is durable when it returns, idempotent for the same
/// bytes and refuses other bytes under an existing key. Calls block.
pub trait Archive: Send + Sync {
    /// `local` or `s3`.
    fn kind(&self) -> &'static str;
    /// Start-up check: the archive exists, is writable and enforces what it must.
    fn check(&self) -> Result<()>;
    fn put(&self, key: &ArchiveKey, json: &[u8], sig: &[u8], retain_until: Timestamp)
    -> Result<()>;
    fn get(&self, key: &ArchiveKey) -> Result<Option<Archived>>;
}

/// Opens the archive the configuration names: `[archive_s3]`, else the local directory.
/// Does not check it; [`Archive::check`] does, at start.
pub fn open(
    config: &crate::config::Config,
    paths: &crate::config::Paths,
) -> Result<Box<dyn Archive>> {
    let Some(s3) = &config.archive_s3 else {
        return Ok(Box::new(local::LocalArchive::new(&paths.archive_dir)));
    };
    let id = s3
        .access_key_id
        .clone()
        .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok())
        .filter(|s| !s.is_empty());
    let secret = match &s3.secret_access_key_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| {
                    ArchiveError::Unusable(format!(
                        "archive_s3.secret_access_key_file {}: {e}",
                        file.display()
                    ))
                })?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("AWS_SECRET_ACCESS_KEY").ok(),
    }
    .filter(|s| !s.is_empty());
    let (Some(id), Some(secret)) = (id, secret) else {
        return Err(ArchiveError::Unusable(
            "archive_s3 has no credentials: set access_key_id and secret_access_key_file (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)".into(),
        ));
    };
    Ok(Box::new(s3::S3Archive::new(s3, &id, &secret)?))
}
