//! The agent's local resources opened from its configuration: the signing key, the evidence store and the upload queue.
//!
//! The command line, `scan` and the service loop all open them here, so the
//! dependencies run one way: cli -> agent/scan -> engine modules -> these.

use crate::config::{Config, public_key_path};
use crate::crypto::SigningKey;
use crate::evidence::{EvidenceStore, HostIdentity};
use crate::nixos::RunningSystem;
use crate::queue::{Queue, unix_now};
use crate::{Error, Result};

/// The upload queue of `config`, with every bundle on disk accounted for.
pub fn open_queue(config: &Config) -> Result<Queue> {
    let mut queue = Queue::open_for(config)?;
    if config.evidence_dir.is_dir() {
        queue.reconcile(&config.evidence_dir, unix_now())?;
    }
    Ok(queue)
}

/// The signing key of `config`; the local default creates one on first use.
pub fn load_signing_key(config: &Config) -> Result<SigningKey> {
    let path = &config.signing_key_file;
    if config.creates_signing_key() && !path.exists() {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                context: format!("cannot create {}", parent.display()),
                source,
            })?;
        }
        let key = SigningKey::generate();
        let public = public_key_path(path);
        key.write_pair(path, &public)?;
        eprintln!(
            "compliance-agent: created a new evidence signing key at {} (public key {}, fingerprint {}); \
             keep the private key safe and give the public key to whoever verifies the evidence",
            path.display(),
            public.display(),
            key.verifying_key().fingerprint()
        );
        return Ok(key);
    }
    Ok(SigningKey::load(path)?)
}

/// The evidence store of `config`, ready to write.
pub fn open_evidence_store(config: &Config) -> Result<EvidenceStore> {
    let key = load_signing_key(config)?;
    let host = HostIdentity {
        site_id: config.site_id.clone(),
        host_id: config.host_id.clone(),
        deployment_mode: config.deployment_mode,
        reseller_id: config.reseller_id.clone(),
        policy_version: config.policy_version.clone(),
    };
    Ok(EvidenceStore::open(
        &config.evidence_dir,
        key,
        host,
        RunningSystem::detect(),
    )?)
}
