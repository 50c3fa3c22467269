//! The enrollment CA: its key and certificate on disk, the server's TLS certificate,
//! client certificates naming `<site_id>/<host_id>` from a box's CSR, and reading the
//! host identity back out of a verified client certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    date_time_ymd,
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR names {found:?}; this enrollment is for {expected:?}")]
    CsrForAnotherHost { found: String, expected: String },
    #[error("the client certificate does not name a host as SITE/HOST in its common name")]
    NoIdentity,
}

pub type Result<T> = std::result::Result<T, PkiError>;

fn cert_err(e: rcgen::Error) -> PkiError {
    PkiError::Cert(e.to_string())
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> PkiError {
    PkiError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// How long a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From yesterday for this many days.
    Days(u32),
    /// Expired at the start of 2020 (for tests of expiry handling).
    Expired,
}

fn apply(params: &mut CertificateParams, validity: Validity) {
    match validity {
        Validity::Days(days) => {
            let (y, m, d) = ymd_in_days(-1);
            params.not_before = date_time_ymd(y, m, d);
            let (y, m, d) = ymd_in_days(i64::from(days));
            params.not_after = date_time_ymd(y, m, d);
        }
        Validity::Expired => {
            params.not_before = date_time_ymd(2018, 1, 1);
            params.not_after = date_time_ymd(2020, 1, 1);
        }
    }
}

/// Midnight UTC of the day `days` from today (certificates need no finer grain).
fn ymd_in_days(days: i64) -> (i32, u8, u8) {
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let day = today
        .checked_add(jiff::Span::new().days(days))
        .unwrap_or(today);
    (i32::from(day.year()), day.month() as u8, day.day() as u8)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as DER integers want.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (0600).
    pub fn write(&self, dir: &Path, name: &str) -> crate::Result<()> {
        crate::write_durable(
            &dir.join(format!("{name}.pem")),
            self.cert_pem.as_bytes(),
            0o644,
        )?;
        crate::write_durable(
            &dir.join(format!("{name}.key")),
            self.key_pem.as_bytes(),
            0o600,
        )
    }
}

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate.
    pub cert_pem: String,
    cert_der: Vec<u8>,
}

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

impl Ca {
    /// A new CA (kept in memory until written).
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        apply(&mut params, Validity::Days(20 * 365));
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca.key`, or makes and writes them on first use.
    pub fn load_or_create(dir: &Path, name: &str) -> crate::Result<(Self, bool)> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if cert_path.exists() || key_path.exists() {
            let cert_pem =
                std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path, e))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, e))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&key_path, e))?;
            let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| file_err(&cert_path, e))?;
            let issuer =
                Issuer::from_ca_cert_der(&der, key).map_err(|e| file_err(&cert_path, e))?;
            return Ok((
                Self {
                    cert_pem,
                    cert_der: der.to_vec(),
                    issuer,
                },
                false,
            ));
        }
        let ca = Self::new(name)?;
        crate::write_durable(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
        crate::write_durable(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
        Ok((ca, true))
    }

    /// Writes `<dir>/ca.pem` (only the certificate).
    pub fn write(&self, dir: &Path) -> crate::Result<()> {
        crate::write_durable(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 (hex) of the CA certificate's DER: what enrollment tokens carry.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.cert_der))
    }

    fn leaf_params(
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<CertificateParams> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        apply(&mut params, validity);
        Ok(params)
    }

    /// A TLS server certificate for these DNS names and IP addresses (with a new key).
    pub fn server(&self, names: &[&str], validity: Validity) -> Result<Issued> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = Self::leaf_params(
            names.first().copied().unwrap_or("mcp-server"),
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )?;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().map_err(cert_err)?),
            };
            params.subject_alt_names.push(san);
        }
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok(Issued {
            // The chain with the CA, so a box that pins the CA fingerprint can find it.
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate with a new key; the common name is `site_id/host_id`.
    pub fn client(&self, common_name: &str, validity: Validity) -> Result<Issued> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let params = Self::leaf_params(common_name, ExtendedKeyUsagePurpose::ClientAuth, validity)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a box's CSR (its signature checked) into a client certificate naming
    /// `site_id/host_id`. A CSR that names another host is refused. Returns the PEM
    /// and the serial (hex).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        site_id: &str,
        host_id: &str,
        days: u32,
    ) -> Result<(String, String)> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let expected = format!("{site_id}/{host_id}");
        if let Some(cn) = csr.params.distinguished_name.get(&DnType::CommonName) {
            let found = match cn {
                rcgen::DnValue::Utf8String(s) => s.clone(),
                rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
                rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            if found != expected {
                return Err(PkiError::CsrForAnotherHost { found, expected });
            }
        }
        let params = Self::leaf_params(
            &expected,
            ExtendedKeyUsagePurpose::ClientAuth,
            Validity::Days(days),
        )?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err)?;
        Ok((cert.pem(), serial))
    }
}

/// The identity in a client certificate the TLS layer has verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    pub site_id: String,
    pub host_id: String,
    /// Serial (hex, as [`Ca::sign_csr`] returns it).
    pub serial: String,
}

/// Reads `SITE/HOST` from the subject common name and the serial.
pub fn identity(cert_der: &[u8]) -> Result<CertIdentity> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Cert(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NoIdentity)?;
    let (site, host) = cn.split_once('/').ok_or(PkiError::NoIdentity)?;
    if !crate::valid_id(site) || !crate::valid_id(host) {
        return Err(PkiError::NoIdentity);
    }
    Ok(CertIdentity {
        site_id: site.into(),
        host_id: host.into(),
        serial: hex::encode(cert.raw_serial()),
    })
}

/// A CSR for `common_name` with a new key (what `compliance-agent enroll` makes; tests use it).
pub fn make_csr(common_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key).map_err(cert_err)?;
    Ok((csr.pem().map_err(cert_err)?, key.serialize_pem()))
}

use rustls_pki_types::pem::PemObject as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_becomes_a_certificate_naming_the_host()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let ca = Ca::new("test CA")?;
        let (csr, _key) = make_csr("clinic-1/frontdesk-01")?;
        let (pem, serial) = ca.sign_csr(&csr, "clinic-1", "frontdesk-01", 30)?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?;
        let id = identity(&der)?;
        assert_eq!(
            (id.site_id.as_str(), id.host_id.as_str()),
            ("clinic-1", "frontdesk-01")
        );
        assert_eq!(
            id.serial, serial,
            "the serial the store keeps is the certificate's"
        );
        Ok(())
    }

    #[test]
    fn a_csr_for_another_host_or_garbage_is_refused()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let ca = Ca::new("test CA")?;
        let (csr, _) = make_csr("clinic-1/reception-02")?;
        let err = ca
            .sign_csr(&csr, "clinic-1", "frontdesk-01", 30)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("reception-02")),
            "{err:?}"
        );
        let err = ca
            .sign_csr("not a csr", "clinic-1", "frontdesk-01", 30)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("CSR is not valid")),
            "{err:?}"
        );
        Ok(())
    }
}
