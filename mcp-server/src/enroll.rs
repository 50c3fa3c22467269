//! Enrollment: one-time (or bounded) tokens that carry the CA fingerprint, and the
//! exchange that turns a box's CSR into a client certificate naming `<site_id>/<host_id>`.

use compliance_agent::crypto::VerifyingKey;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::auth::{Caller, new_token, token_hash};
use crate::services::Services;
use crate::store::{EnrollmentToken, Host, Site, StoreError};

/// Prefix of enrollment tokens: `mcpe1_<secret>.<CA fingerprint, 64 hex>`.
pub const TOKEN_PREFIX: &str = "mcpe1_";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "the enrollment token is malformed: expected mcpe1_<secret>.<64 hex digits of the CA fingerprint>"
    )]
    MalformedToken,
    #[error("the enrollment token {0}")]
    Token(&'static str),
    #[error(
        "the token names CA {token}, this server's CA is {server}: the token is from another server"
    )]
    OtherCa { token: String, server: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

impl EnrollError {
    pub fn status(&self) -> u16 {
        match self {
            EnrollError::MalformedToken | EnrollError::Token(_) | EnrollError::OtherCa { .. } => {
                403
            }
            EnrollError::BadRequest(_) | EnrollError::Pki(_) => 422,
            EnrollError::Conflict(_) => 409,
            EnrollError::Store(StoreError::Unavailable(_)) => 503,
            EnrollError::Store(StoreError::NotFound(_)) => 404,
            EnrollError::Store(StoreError::Forbidden(_)) => 403,
            EnrollError::Store(_) => 500,
        }
    }
}

impl From<StoreError> for EnrollError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Token(reason) => EnrollError::Token(reason),
            StoreError::Exists(m) => EnrollError::Conflict(m),
            other => EnrollError::Store(other),
        }
    }
}

/// A parsed token: the secret's hash and the CA fingerprint the box pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedToken {
    pub secret_hash: [u8; 32],
    pub ca_fingerprint: String,
}

pub fn parse_token(token: &str) -> Result<ParsedToken, EnrollError> {
    let token = token.trim();
    let (secret, fingerprint) = token.rsplit_once('.').ok_or(EnrollError::MalformedToken)?;
    if !secret.starts_with(TOKEN_PREFIX)
        || secret.len() < TOKEN_PREFIX.len() + 32
        || fingerprint.len() != 64
        || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(EnrollError::MalformedToken);
    }
    Ok(ParsedToken {
        secret_hash: token_hash(secret),
        ca_fingerprint: fingerprint.to_ascii_lowercase(),
    })
}

/// What `token create` asks for.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub site_id: String,
    /// None: a direct-mode site of the MSP.
    pub reseller_id: Option<String>,
    pub uses: u32,
    pub expires_in: SignedDuration,
}

#[derive(Clone, Debug, Serialize)]
pub struct CreatedToken {
    /// Shown once; the server keeps only its hash.
    pub token: String,
    pub token_id: String,
    pub site_id: String,
    pub reseller_id: Option<String>,
    pub uses: u32,
    pub expires_at: Timestamp,
    pub ca_fingerprint: String,
}

/// Creates the site if it is new, and a token for it.
pub fn create_token(
    svc: &Services,
    caller: &Caller,
    req: &TokenRequest,
) -> crate::Result<CreatedToken> {
    let result = create_token_inner(svc, caller, req);
    let refused = crate::audit::refusal(&result);
    crate::audit::record(
        &*svc.store,
        caller,
        "enrollment_token.create",
        &req.site_id,
        refused.as_deref(),
    );
    result
}

fn create_token_inner(
    svc: &Services,
    caller: &Caller,
    req: &TokenRequest,
) -> crate::Result<CreatedToken> {
    if !crate::valid_id(&req.site_id)
        || req
            .reseller_id
            .as_deref()
            .is_some_and(|r| !crate::valid_id(r))
    {
        return Err(crate::Error::Invalid(
            "site and reseller ids are 1-64 of letters, digits, '.', '_' and '-'".into(),
        ));
    }
    if req.uses == 0 || req.uses > 10_000 {
        return Err(crate::Error::Invalid(
            "--uses must be between 1 and 10000".into(),
        ));
    }
    let secs = req.expires_in.as_secs();
    if !(60..=30 * 86_400).contains(&secs) {
        return Err(crate::Error::Invalid(
            "--expires must be between 1m and 30d".into(),
        ));
    }
    let site = match svc.store.site(caller, &req.site_id)? {
        Some(site) => {
            if site.reseller_id != req.reseller_id {
                return Err(crate::Error::Invalid(format!(
                    "site {} belongs to {}; give the same --reseller (or none for a direct site)",
                    site.site_id,
                    site.reseller_id
                        .as_deref()
                        .unwrap_or("the MSP (direct mode)")
                )));
            }
            site
        }
        None => {
            let site = Site {
                site_id: req.site_id.clone(),
                reseller_id: req.reseller_id.clone(),
                runbook_allowlist: svc.config.orders.default_site_allowlist.clone(),
                created_at: Timestamp::now(),
            };
            svc.store.put_site(caller, &site)?;
            site
        }
    };
    let secret = new_token(TOKEN_PREFIX);
    let fingerprint = svc.ca.fingerprint();
    let now = Timestamp::now();
    let record = EnrollmentToken {
        secret_hash: token_hash(&secret),
        token_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        site_id: site.site_id.clone(),
        uses_left: req.uses,
        expires_at: now.checked_add(req.expires_in).unwrap_or(Timestamp::MAX),
        created_by: caller.actor.clone(),
        created_at: now,
    };
    svc.store.create_enrollment_token(caller, &record)?;
    Ok(CreatedToken {
        token: format!("{secret}.{fingerprint}"),
        token_id: record.token_id,
        site_id: site.site_id,
        reseller_id: site.reseller_id,
        uses: req.uses,
        expires_at: record.expires_at,
        ca_fingerprint: fingerprint,
    })
}

/// `POST /api/v1/enroll` body.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub host_id: String,
    /// PEM CSR for the box's TLS key.
    pub csr_pem: String,
    /// The box's Ed25519 evidence key (SPKI PEM).
    pub evidence_pubkey_pem: String,
    #[serde(default)]
    pub scan_interval_sec: Option<u64>,
}

/// `POST /api/v1/enroll` answer.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EnrollResponse {
    pub site_id: String,
    pub host_id: String,
    pub reseller_id: Option<String>,
    /// `reseller` or `direct`.
    pub deployment_mode: String,
    pub client_cert_pem: String,
    pub ca_cert_pem: String,
    pub order_pubkey_pem: String,
    pub mcp_url: String,
    /// The transparency log's verifier key (`<origin>+<key ID>+<key>`, docs/tlog.md):
    /// the box checks every checkpoint against it.
    #[serde(default)]
    pub log_key: Option<String>,
}

/// The exchange: redeem the token, sign the CSR, enroll the host. Audited either way.
pub fn exchange(
    svc: &Services,
    peer: Option<String>,
    req: &EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let result = exchange_inner(svc, req);
    let target = match &result {
        Ok(r) => format!("{}/{}", r.site_id, r.host_id),
        Err(_) => format!("?/{}", req.host_id.chars().take(64).collect::<String>()),
    };
    let caller = Caller {
        actor: "enrollment".into(),
        role: crate::auth::Role::Host,
        tenants: crate::auth::Tenants::Sites { site_ids: vec![] },
        peer,
    };
    let refused = crate::audit::refusal(&result);
    crate::audit::record(
        &*svc.store,
        &caller,
        "host.enroll",
        &target,
        refused.as_deref(),
    );
    result
}

fn exchange_inner(svc: &Services, req: &EnrollRequest) -> Result<EnrollResponse, EnrollError> {
    let parsed = parse_token(&req.token)?;
    let server_fp = svc.ca.fingerprint();
    if parsed.ca_fingerprint != server_fp {
        return Err(EnrollError::OtherCa {
            token: parsed.ca_fingerprint,
            server: server_fp,
        });
    }
    if !crate::valid_id(&req.host_id) {
        return Err(EnrollError::BadRequest(
            "host_id must be 1-64 of letters, digits, '.', '_' and '-'".into(),
        ));
    }
    VerifyingKey::from_spki_pem(&req.evidence_pubkey_pem).map_err(|e| {
        EnrollError::BadRequest(format!(
            "evidence_pubkey_pem is not an Ed25519 public key in SPKI PEM: {e}"
        ))
    })?;
    let scan_interval_sec = req
        .scan_interval_sec
        .unwrap_or(svc.config.default_scan_interval_sec);
    if !(10..=86_400).contains(&scan_interval_sec) {
        return Err(EnrollError::BadRequest(
            "scan_interval_sec must be between 10 and 86400".into(),
        ));
    }
    let token = svc
        .store
        .enrollment_token(&parsed.secret_hash)?
        .ok_or(EnrollError::Token("is not known to this server"))?;
    let now = Timestamp::now();
    if token.expires_at <= now {
        return Err(EnrollError::Token("has expired; create a new one"));
    }
    if token.uses_left == 0 {
        return Err(EnrollError::Token("has been used up; create a new one"));
    }
    let (cert_pem, serial) = svc.ca.sign_csr(
        &req.csr_pem,
        &token.site_id,
        &req.host_id,
        svc.config.client_cert_days,
    )?;
    let host = svc.store.enroll_host(
        &parsed.secret_hash,
        now,
        &Host {
            site_id: token.site_id.clone(),
            host_id: req.host_id.clone(),
            reseller_id: None,
            evidence_pubkey_pem: req.evidence_pubkey_pem.clone(),
            cert_serial: Some(serial),
            enrolled_at: now,
            revoked_at: None,
            scan_interval_sec,
            last_seen: None,
        },
    )?;
    Ok(EnrollResponse {
        deployment_mode: if host.reseller_id.is_some() {
            "reseller"
        } else {
            "direct"
        }
        .into(),
        site_id: host.site_id,
        host_id: host.host_id,
        reseller_id: host.reseller_id,
        client_cert_pem: cert_pem,
        ca_cert_pem: svc.ca.cert_pem.clone(),
        log_key: Some(svc.log.vkey()),
        order_pubkey_pem: svc
            .order_key
            .verifying_key()
            .to_spki_pem()
            .map_err(|e| EnrollError::BadRequest(e.to_string()))?,
        mcp_url: svc.config.public_url(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_shape() {
        let fp = "ab".repeat(32);
        let good = format!("{TOKEN_PREFIX}{}.{fp}", "x".repeat(43));
        assert_eq!(
            parse_token(&good).ok().map(|t| t.ca_fingerprint),
            Some(fp.clone())
        );
        for bad in [
            "",
            "mcpe1_short.abc",
            &format!("other_{}.{fp}", "x".repeat(43)),
            &format!("{TOKEN_PREFIX}{}", "x".repeat(43)),
        ] {
            assert!(parse_token(bad).is_err(), "{bad:?} refused");
        }
    }
}
