//! Evidence intake: each bundle verified against the host's enrolled key and chain by the
//! agent crate's rules, archived, then committed; acknowledged only when both are durable.

use std::sync::atomic::Ordering;

use compliance_agent::crypto::{VerifyingKey, sha256_hex};
use compliance_agent::evidence::Bundle;
use compliance_agent::evidence::chain::{ChainProblem, check_link};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::archive::{ArchiveError, ArchiveKey};
use crate::auth::Caller;
use crate::services::Services;
use crate::store::{BundleRecord, Host, Recorded, StoreError};

/// The protocol's limit on bundle.json.
pub const MAX_BUNDLE_BYTES: usize = 512 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("bundle.json is {0} bytes; the limit is {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    #[error("bundle.json is not an evidence bundle: {0}")]
    NotABundle(String),
    #[error("this certificate is for {cert}; it may deliver only its own bundles, not {bundle}'s")]
    OtherHost { cert: String, bundle: String },
    #[error("bundle_id {0:?} is not a valid id")]
    BadId(String),
    #[error("the bundle answers order {found:?}, the URL names {url}")]
    OrderMismatch { found: Option<String>, url: String },
    #[error("bundle.sig is {0} bytes; an Ed25519 signature is 64")]
    SignatureLength(usize),
    #[error("bundle.sig does not verify with the enrolled key of {0}")]
    BadSignature(String),
    #[error("seq {0} is beyond what the index holds (2^63 - 1)")]
    SeqTooLarge(u64),
    #[error(transparent)]
    Chain(#[from] ChainProblem),
    #[error("bundle {0} is already stored with other contents")]
    Conflict(String),
    #[error("{0}; the bundle was not acknowledged, send it again later")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntakeError {
    pub fn status(&self) -> u16 {
        match self {
            IntakeError::TooLarge(_) => 413,
            IntakeError::OtherHost { .. } => 403,
            IntakeError::Chain(_) | IntakeError::Conflict(_) => 409,
            IntakeError::Unavailable(_) => 503,
            IntakeError::Internal(_) => 500,
            _ => 422,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Receipt {
    pub bundle_id: String,
    /// `stored` or `duplicate`.
    pub status: &'static str,
}

fn store_err(e: StoreError) -> IntakeError {
    match e {
        StoreError::Chain(p) => IntakeError::Chain(p),
        StoreError::BundleConflict(id) => IntakeError::Conflict(id),
        StoreError::Unavailable(m) => {
            IntakeError::Unavailable(format!("the database is unavailable: {m}"))
        }
        other => IntakeError::Internal(other.to_string()),
    }
}

/// Checks, archives and records one upload from `host` (already authorized as `caller`).
/// `order_id` comes from a result URL.
pub fn receive(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    json: &[u8],
    sig: &[u8],
    order_id: Option<&str>,
) -> Result<Receipt, IntakeError> {
    svc.stats.received.fetch_add(1, Ordering::Relaxed);
    let result = receive_inner(svc, caller, host, json, sig, order_id);
    if let Err(e) = &result {
        crate::incidents::after_refusal(svc, caller, host, e);
    }
    let counter = match &result {
        Ok(r) if r.status == "stored" => &svc.stats.stored,
        Ok(_) => &svc.stats.duplicates,
        Err(_) => &svc.stats.refused,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    result
}

fn receive_inner(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    json: &[u8],
    sig: &[u8],
    order_id: Option<&str>,
) -> Result<Receipt, IntakeError> {
    if json.len() > MAX_BUNDLE_BYTES {
        return Err(IntakeError::TooLarge(json.len()));
    }
    let bundle: Bundle =
        serde_json::from_slice(json).map_err(|e| IntakeError::NotABundle(e.to_string()))?;
    let me = format!("{}/{}", host.site_id, host.host_id);
    if (bundle.site_id.as_str(), bundle.host_id.as_str())
        != (host.site_id.as_str(), host.host_id.as_str())
    {
        return Err(IntakeError::OtherHost {
            cert: me,
            bundle: format!("{}/{}", bundle.site_id, bundle.host_id),
        });
    }
    if !crate::valid_id(&bundle.bundle_id) {
        return Err(IntakeError::BadId(
            bundle.bundle_id.chars().take(80).collect(),
        ));
    }
    if let Some(url_order) = order_id
        && bundle.order_id.as_deref() != Some(url_order)
    {
        return Err(IntakeError::OrderMismatch {
            found: bundle.order_id.clone(),
            url: url_order.into(),
        });
    }
    if sig.len() != compliance_agent::crypto::SIGNATURE_LEN {
        return Err(IntakeError::SignatureLength(sig.len()));
    }
    let key = VerifyingKey::from_spki_pem(&host.evidence_pubkey_pem).map_err(|e| {
        IntakeError::Internal(format!("the enrolled key of {me} does not parse: {e}"))
    })?;
    key.verify(json, sig)
        .map_err(|_| IntakeError::BadSignature(me.clone()))?;
    if i64::try_from(bundle.seq).is_err() {
        // u64::MAX is the chain rule's refusal; anything else this large the index cannot hold.
        if bundle.seq == u64::MAX {
            return Err(IntakeError::Chain(ChainProblem::SeqOutOfRange(bundle.seq)));
        }
        return Err(IntakeError::SeqTooLarge(bundle.seq));
    }
    let hash = sha256_hex(json);

    if let Some(existing) = svc
        .store
        .bundle(caller, &bundle.bundle_id)
        .map_err(store_err)?
    {
        if existing.hash != hash {
            return Err(IntakeError::Conflict(bundle.bundle_id));
        }
        // The agent lost our acknowledgement: record the result (once) and say duplicate.
        svc.store
            .record_bundle(caller, &existing, order_id, bundle.error.as_deref())
            .map_err(store_err)?;
        incidents(svc, caller, host, &bundle, &existing)?;
        return Ok(Receipt {
            bundle_id: bundle.bundle_id,
            status: "duplicate",
        });
    }
    // Refuse before writing to the archive; the store checks again in its transaction.
    let n = svc
        .store
        .neighbours(caller, &host.site_id, &host.host_id, bundle.seq)
        .map_err(store_err)?;
    check_link(
        bundle.seq,
        bundle.prev_hash.as_deref(),
        &hash,
        n.previous.as_ref(),
        n.same_seq.as_ref(),
        n.next.as_ref(),
    )?;

    let received_at = Timestamp::now();
    let key = ArchiveKey {
        reseller_id: host.reseller_id.clone(),
        site_id: host.site_id.clone(),
        host_id: host.host_id.clone(),
        seq: bundle.seq,
        bundle_id: bundle.bundle_id.clone(),
    };
    let retain_until = received_at
        .checked_add(SignedDuration::from_hours(
            24 * i64::from(svc.config.archive_retention_days),
        ))
        .unwrap_or(Timestamp::MAX);
    svc.archive
        .put(&key, json, sig, retain_until)
        .map_err(|e| {
            svc.stats.archive_errors.fetch_add(1, Ordering::Relaxed);
            match e {
                ArchiveError::Conflict { key } => IntakeError::Conflict(key),
                other => IntakeError::Unavailable(other.to_string()),
            }
        })?;
    let record = BundleRecord {
        bundle_id: bundle.bundle_id.clone(),
        site_id: host.site_id.clone(),
        host_id: host.host_id.clone(),
        seq: bundle.seq,
        hash,
        prev_hash: bundle.prev_hash.clone(),
        check: bundle.check.as_str().into(),
        outcome: bundle.outcome.as_str().into(),
        timestamp_end: bundle.timestamp_end,
        received_at,
        archive_key: key.prefix(),
        order_id: bundle.order_id.clone(),
    };
    let recorded = svc
        .store
        .record_bundle(caller, &record, order_id, bundle.error.as_deref())
        .map_err(store_err)?;
    incidents(svc, caller, host, &bundle, &record)?;
    Ok(Receipt {
        bundle_id: bundle.bundle_id,
        status: match recorded {
            Recorded::Stored => "stored",
            Recorded::Duplicate => "duplicate",
        },
    })
}

/// The incident update after a bundle is recorded. On failure the bundle is not
/// acknowledged: the box sends it again and the (idempotent) update is retried.
fn incidents(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    bundle: &Bundle,
    record: &BundleRecord,
) -> Result<(), IntakeError> {
    crate::incidents::after_bundle(svc, caller, host, bundle, record).map_err(|e| {
        IntakeError::Unavailable(format!(
            "the bundle is stored but its incident update failed: {e}"
        ))
    })
}
