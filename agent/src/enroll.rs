//! `compliance-agent enroll`: pins the central server by the CA fingerprint in the token,
//! sends a CSR and the evidence public key, and stores the certificate, CA and order key.

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::{Error, Result};

/// Where enrollment puts what the server returns.
#[derive(Clone, Debug)]
pub struct EnrollFiles {
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub order_pubkey: PathBuf,
}

impl EnrollFiles {
    /// The log's verifier key, beside the order key (docs/tlog.md, "The box as witness").
    pub fn log_key(&self) -> PathBuf {
        log_key_path(&self.order_pubkey)
    }

    /// The config's paths, or `<state_dir>/mcp/...` for those it leaves unset.
    pub fn from_config(config: &Config) -> Self {
        let dir = config.state_dir.join("mcp");
        Self {
            ca_cert: config
                .ca_cert_file
                .clone()
                .unwrap_or_else(|| dir.join("ca.pem")),
            client_cert: config
                .client_cert_file
                .clone()
                .unwrap_or_else(|| dir.join("client.pem")),
            client_key: config
                .client_key_file
                .clone()
                .unwrap_or_else(|| dir.join("client.key")),
            order_pubkey: config
                .mcp_order_pubkey_file
                .clone()
                .unwrap_or_else(|| dir.join("order-signing.pub.pem")),
        }
    }
}

/// Where the box keeps the log's verifier key: `log.vkey` beside its order key.
pub fn log_key_path(order_pubkey: &Path) -> PathBuf {
    order_pubkey.with_file_name("log.vkey")
}

#[derive(Debug, Deserialize)]
pub struct Enrolled {
    pub site_id: String,
    pub host_id: String,
    pub reseller_id: Option<String>,
    pub deployment_mode: String,
    pub client_cert_pem: String,
    pub ca_cert_pem: String,
    pub order_pubkey_pem: String,
    pub mcp_url: String,
    /// The transparency log's verifier key; absent from servers without a log.
    #[serde(default)]
    pub log_key: Option<String>,
}

fn usage(m: impl Into<String>) -> Error {
    Error::Usage(m.into())
}

/// Accepts the server only if its chain carries the pinned CA and the leaf verifies under it.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    found: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General("the server does not present the CA the token pins".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        if let Ok(mut f) = self.found.lock() {
            *f = Some(ca.clone().into_owned());
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The CA certificate (DER) of the server at `url`, if it matches `fingerprint`.
fn pinned_ca(url: &str, fingerprint: &str) -> Result<Vec<u8>> {
    let authority = url
        .strip_prefix("https://")
        .ok_or_else(|| usage("--server must start with https://"))?
        .split('/')
        .next()
        .unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| usage(format!("bad port in {url}")))?,
        ),
        None => (authority, 443),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        fingerprint: fingerprint.to_owned(),
        found: Mutex::new(None),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| usage(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_owned())
        .map_err(|e| usage(format!("{host}: {e}")))?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| usage(e.to_string()))?;
    let mut tcp = TcpStream::connect((host, port)).map_err(|source| Error::Io {
        context: format!("cannot connect to {authority}"),
        source,
    })?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).ok();
    tcp.set_write_timeout(Some(Duration::from_secs(15))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| {
            usage(format!(
                "TLS with {authority} failed: {e} (is the token from this server?)"
            ))
        })?;
    }
    let _ = tcp.flush();
    let der = verifier
        .found
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .ok_or_else(|| usage("the server's CA was not found"))?;
    Ok(der.to_vec())
}

fn write(path: &Path, data: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("cannot create {}", dir.display()),
            source,
        })?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|source| Error::Io {
            context: format!("cannot write {}", path.display()),
            source,
        })?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| Error::Io {
            context: format!("cannot write {}", path.display()),
            source,
        })
}

/// Enrolls this box with `token` at `server`, writing `files`.
pub fn enroll(
    server: &str,
    token: &str,
    host_id: &str,
    evidence_pubkey_pem: &str,
    files: &EnrollFiles,
) -> Result<Enrolled> {
    let server = server.trim_end_matches('/');
    let fingerprint = token
        .trim()
        .rsplit_once('.')
        .map(|(_, f)| f.to_ascii_lowercase())
        .filter(|f| f.len() == 64 && f.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| usage("the token is malformed: it ends in .<64 hex digits of the server's CA fingerprint>"))?;
    let ca_der = pinned_ca(server, &fingerprint)?;
    let key = rcgen::KeyPair::generate().map_err(|e| usage(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| usage(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| usage(e.to_string()))?;
    let roots = vec![ureq::tls::Certificate::from_der(&ca_der).to_owned()];
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .build();
    let agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .https_only(true)
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let body = serde_json::json!({ "token": token.trim(), "host_id": host_id, "csr_pem": csr, "evidence_pubkey_pem": evidence_pubkey_pem });
    let url = format!("{server}/api/v1/enroll");
    let mut response = agent
        .post(&url)
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .map_err(|e| usage(format!("{url}: {e}")))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(1024 * 1024)
        .read_to_string()
        .map_err(|e| usage(format!("{url}: {e}")))?;
    if status != 200 {
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        return Err(usage(format!(
            "the server refused the enrollment (HTTP {status}): {reason}"
        )));
    }
    let enrolled: Enrolled = serde_json::from_str(&text)
        .map_err(|e| usage(format!("{url}: unexpected answer ({e})")))?;
    let answered_ca: Vec<Vec<u8>> = ureq::tls::parse_pem(enrolled.ca_cert_pem.as_bytes())
        .filter_map(|i| match i {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.der().to_vec()),
            _ => None,
        })
        .collect();
    if answered_ca != vec![ca_der.clone()] {
        return Err(usage(
            "the server answered with another CA than the one the token pins",
        ));
    }
    if let Some(vkey) = &enrolled.log_key {
        // Refuse a log key the box could not verify with, before writing anything.
        crate::tlog::LogVerifier::from_vkey(vkey)
            .map_err(|e| usage(format!("the server's log key: {e}")))?;
    }
    write(&files.client_key, &key.serialize_pem(), 0o600)?;
    write(&files.client_cert, &enrolled.client_cert_pem, 0o644)?;
    write(&files.ca_cert, &enrolled.ca_cert_pem, 0o644)?;
    write(&files.order_pubkey, &enrolled.order_pubkey_pem, 0o644)?;
    if let Some(vkey) = &enrolled.log_key {
        write(&files.log_key(), &format!("{}\n", vkey.trim()), 0o644)?;
    }
    Ok(enrolled)
}
