//! The S3 archive with Object Lock (production): S3, MinIO or any S3-compatible store.
//!
//! Every accepted bundle.json and bundle.sig is one object under
//! `[prefix/]RESELLER/SITE/HOST/SEQ-BUNDLE_ID/bundle.{json,sig}`, written in COMPLIANCE
//! mode with retain-until = received + `archive_retention_days`, with the Content-MD5
//! and x-amz-checksum-sha256 headers Object Lock requires. The store itself then
//! refuses to delete or overwrite the version before that date, whoever asks.
//!
//! A key is written once: an existing object with the same bytes is the same bundle
//! again (idempotent); with other bytes the upload is refused, and the archived version
//! stays. The write is conditional (`If-None-Match: *`), so two server processes
//! racing on one key cannot both create it.
//!
//! At start [`Archive::check`] refuses a bucket that is missing, unversioned or
//! without Object Lock, with the reason.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{BucketVersioningStatus, ObjectLockEnabled, ObjectLockMode};
use base64::Engine as _;
use compliance_agent::evidence::{BUNDLE_FILE, SIGNATURE_FILE};
use jiff::Timestamp;
// md-5 and sha2 share digest's Digest trait.
use sha2::Digest as _;

use super::{Archive, ArchiveError, ArchiveKey, Archived, Result};
use crate::config::S3Settings;

pub struct S3Archive {
    client: Client,
    bucket: String,
    prefix: String,
    /// The SDK is async; this runtime runs its calls for the blocking trait. Shut down
    /// in the background on drop (dropping a runtime inside another panics).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for S3Archive {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What went wrong with a request, with the service's error code when it answered.
fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, HttpResponse>,
) -> String {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let status = s.raw().status().as_u16();
            match (err.code(), err.message()) {
                (Some(code), message) => {
                    format!(
                        "HTTP {status} {code}: {}",
                        message.unwrap_or("(no message)")
                    )
                }
                // An answer the client could not read as an S3 error.
                (None, _) => {
                    let body = s
                        .raw()
                        .body()
                        .bytes()
                        .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                        .unwrap_or_default();
                    format!("HTTP {status}: {body}")
                }
            }
        }
        other => {
            // Timeouts and connection failures: the innermost cause says most.
            let mut msg = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            msg
        }
    }
}

fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Archive {
    /// A client for the bucket in `settings`, with `secret` the secret access key.
    pub fn new(settings: &S3Settings, access_key_id: &str, secret: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mcp-s3")
            .enable_all()
            .build()
            .map_err(|e| ArchiveError::Unusable(format!("cannot start the S3 client: {e}")))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(Credentials::new(
                access_key_id,
                secret,
                None,
                None,
                "mcp-server config",
            ))
            .http_client(http)
            .force_path_style(settings.force_path_style)
            // The checksums are set by hand below (Content-MD5 and SHA-256 headers);
            // no trailer-encoded extra checksum the S3-compatible stores may not know.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(20))
                    .operation_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let client = Client::from_conf(config.build());
        Ok(Self {
            client,
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.trim_matches('/').to_owned(),
            runtime: Some(runtime),
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> Result<F::Output> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| ArchiveError::Unavailable("the S3 client is shut down".into()))?;
        Ok(rt.block_on(f))
    }

    /// The object key of one file of a bundle.
    pub fn object_key(&self, key: &ArchiveKey, file: &str) -> String {
        if self.prefix.is_empty() {
            format!("{}/{file}", key.prefix())
        } else {
            format!("{}/{}/{file}", self.prefix, key.prefix())
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The current bytes and retain-until of an object, None if it does not exist.
    async fn fetch(&self, object: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if code(&e) == Some("NoSuchKey") || status(&e) == Some(404) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(ArchiveError::Unavailable(format!(
                    "reading s3://{}/{object}: {}",
                    self.bucket,
                    describe(&e)
                )));
            }
        };
        let retain = out
            .object_lock_retain_until_date()
            .and_then(|d| Timestamp::from_second(d.secs()).ok());
        let body = out.body.collect().await.map_err(|e| {
            ArchiveError::Unavailable(format!("reading s3://{}/{object}: {e}", self.bucket))
        })?;
        Ok(Some((body.into_bytes().to_vec(), retain)))
    }

    /// Writes one object once: same bytes already there is success, other bytes a conflict.
    async fn put_once(&self, object: &str, bytes: &[u8], retain_until: Timestamp) -> Result<()> {
        let conflict = || ArchiveError::Conflict {
            key: format!("s3://{}/{object}", self.bucket),
        };
        if let Some((existing, _)) = self.fetch(object).await? {
            return if existing == bytes {
                Ok(())
            } else {
                Err(conflict())
            };
        }
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(bytes));
        let sha256 = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes));
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object)
            .body(ByteStream::from(bytes.to_vec()))
            .content_type(if object.ends_with(".json") {
                "application/json"
            } else {
                "application/octet-stream"
            })
            .content_md5(md5)
            .checksum_sha256(sha256)
            .object_lock_mode(ObjectLockMode::Compliance)
            .object_lock_retain_until_date(DateTime::from_secs(retain_until.as_second()))
            .if_none_match("*")
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Created meanwhile by another writer: the same bundle, or a conflict.
            Err(e) if matches!(status(&e), Some(412 | 409)) => match self.fetch(object).await? {
                Some((existing, _)) if existing == bytes => Ok(()),
                Some(_) => Err(conflict()),
                None => Err(ArchiveError::Unavailable(format!(
                    "writing s3://{}/{object}: {}",
                    self.bucket,
                    describe(&e)
                ))),
            },
            Err(e) => Err(ArchiveError::Unavailable(format!(
                "writing s3://{}/{object}: {}",
                self.bucket,
                describe(&e)
            ))),
        }
    }

    async fn check_async(&self) -> Result<()> {
        let b = &self.bucket;
        self.client
            .head_bucket()
            .bucket(b)
            .send()
            .await
            .map_err(|e| match status(&e) {
                Some(404) => ArchiveError::Unusable(format!(
                    "bucket {b} does not exist; create it with Object Lock enabled"
                )),
                Some(403) => ArchiveError::Unusable(format!(
                    "bucket {b} is not accessible with these credentials"
                )),
                _ => {
                    ArchiveError::Unavailable(format!("cannot reach bucket {b}: {}", describe(&e)))
                }
            })?;
        let versioning = self
            .client
            .get_bucket_versioning()
            .bucket(b)
            .send()
            .await
            .map_err(|e| {
                ArchiveError::Unavailable(format!(
                    "reading the versioning of bucket {b}: {}",
                    describe(&e)
                ))
            })?;
        if versioning.status() != Some(&BucketVersioningStatus::Enabled) {
            return Err(ArchiveError::Unusable(format!(
                "bucket {b} does not have versioning enabled (it is {}); the archive needs a bucket created with Object Lock, which enables versioning",
                versioning.status().map_or("never enabled", |s| s.as_str())
            )));
        }
        let lock = match self
            .client
            .get_object_lock_configuration()
            .bucket(b)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if code(&e) == Some("ObjectLockConfigurationNotFoundError")
                    || status(&e) == Some(404) =>
            {
                return Err(ArchiveError::Unusable(format!(
                    "bucket {b} does not have Object Lock enabled; evidence must be WORM: create the bucket with Object Lock (aws s3api create-bucket --object-lock-enabled-for-bucket, mc mb --with-lock)"
                )));
            }
            Err(e) => {
                return Err(ArchiveError::Unavailable(format!(
                    "reading the Object Lock configuration of bucket {b}: {}",
                    describe(&e)
                )));
            }
        };
        let enabled = lock
            .object_lock_configuration()
            .and_then(|c| c.object_lock_enabled())
            == Some(&ObjectLockEnabled::Enabled);
        if !enabled {
            return Err(ArchiveError::Unusable(format!(
                "bucket {b} does not have Object Lock enabled; evidence must be WORM: create the bucket with Object Lock (aws s3api create-bucket --object-lock-enabled-for-bucket, mc mb --with-lock)"
            )));
        }
        Ok(())
    }
}

impl Archive for S3Archive {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn check(&self) -> Result<()> {
        self.block_on(self.check_async())?
    }

    fn put(
        &self,
        key: &ArchiveKey,
        json: &[u8],
        sig: &[u8],
        retain_until: Timestamp,
    ) -> Result<()> {
        self.block_on(async {
            self.put_once(&self.object_key(key, BUNDLE_FILE), json, retain_until)
                .await?;
            self.put_once(&self.object_key(key, SIGNATURE_FILE), sig, retain_until)
                .await
        })?
    }

    fn get(&self, key: &ArchiveKey) -> Result<Option<Archived>> {
        self.block_on(async {
            let Some((json, retain)) = self.fetch(&self.object_key(key, BUNDLE_FILE)).await? else {
                return Ok(None);
            };
            let sig = self
                .fetch(&self.object_key(key, SIGNATURE_FILE))
                .await?
                .map(|(b, _)| b)
                .unwrap_or_default();
            Ok(Some(Archived {
                json,
                sig,
                retain_until: retain.unwrap_or(Timestamp::UNIX_EPOCH),
            }))
        })?
    }
}
