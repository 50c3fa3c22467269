//! A small PKI for tests and trials: a CA, the server's certificate and clients' certificates, as PEM files.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};

use crate::{Error, Result};

fn pki_err(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

/// How long a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From last year to ten years from now.
    Current,
    /// Expired at the start of 2020.
    Expired,
}

fn apply(params: &mut CertificateParams, validity: Validity) {
    let year = jiff::Zoned::now().year() as i32;
    let (from, to) = match validity {
        Validity::Current => (
            date_time_ymd(year - 1, 1, 1),
            date_time_ymd(year + 10, 1, 1),
        ),
        Validity::Expired => (date_time_ymd(2018, 1, 1), date_time_ymd(2020, 1, 1)),
    };
    params.not_before = from;
    params.not_after = to;
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (mode 0600).
    pub fn write(&self, dir: &Path, name: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, &self.cert_pem).map_err(Error::io(&cert))?;
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, &self.key_pem).map_err(Error::io(&key))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(Error::io(&key))
    }
}

/// A certificate authority that issues server and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate.
    pub cert_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(pki_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        apply(&mut params, Validity::Current);
        let cert = params.self_signed(&key).map_err(pki_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Issued> {
        let key = KeyPair::generate().map_err(pki_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().map_err(pki_err)?),
            };
            params.subject_alt_names.push(san);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        apply(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A TLS server certificate for these DNS names and IP addresses.
    pub fn server(&self, names: &[&str], validity: Validity) -> Result<Issued> {
        let cn = names.first().copied().unwrap_or("mcp");
        self.issue(cn, names, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// A TLS client certificate; the common name is `site_id/host_id` by convention.
    pub fn client(&self, common_name: &str, validity: Validity) -> Result<Issued> {
        self.issue(
            common_name,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }

    /// Writes `<dir>/ca.pem` (the key stays in memory: a test CA issues in one go).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.cert_pem).map_err(Error::io(&path))
    }
}

/// The files `mcp-server pki` writes.
pub struct PkiFiles {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

/// A CA, a server certificate for `server_names` and one client certificate,
/// written to `dir` as ca.pem, server.pem/.key and client.pem/.key.
pub fn make(dir: &Path, server_names: &[&str], client_name: &str) -> Result<PkiFiles> {
    let ca = Ca::new("compliance test CA")?;
    ca.write(dir)?;
    ca.server(server_names, Validity::Current)?
        .write(dir, "server")?;
    ca.client(client_name, Validity::Current)?
        .write(dir, "client")?;
    Ok(PkiFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    })
}
