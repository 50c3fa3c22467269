//! The HTTPS client of the MCP protocol v1 (docs/protocol.md): mutual TLS with rustls, only the configured CA, no redirects.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig, TlsProvider};

use crate::config::Config;
use crate::evidence::{BUNDLE_FILE, Check, SIGNATURE_FILE};
use crate::queue::{Failure, Queue, Upload, UploadState, unix_now};

/// The protocol version this client speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest answer body the client reads; anything longer is a protocol error.
pub const MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// Largest bundle.json the client sends (the server's limit is the same, and
/// the evidence writer refuses to seal a larger one).
pub const MAX_BUNDLE_BYTES: u64 = crate::evidence::MAX_BUNDLE_BYTES;
/// Uploads acknowledged before the queue records them in one transaction.
const MARK_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error(
        "no MCP is configured; set mcp_url, ca_cert_file, client_cert_file, client_key_file and mcp_order_pubkey_file"
    )]
    NotConfigured,
    #[error("cannot use {what} {path}: {reason}")]
    Load {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot reach the MCP at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the MCP answered {url} with HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("the MCP's answer to {url} is not protocol v1: {reason}")]
    Protocol { url: String, reason: String },
    #[error("bundle {dir} cannot be sent: {reason}")]
    Bundle { dir: PathBuf, reason: String },
}

impl McpError {
    /// Whether the failure says anything about the bundle (refused) or only
    /// about the way to the MCP (unreachable: retry for as long as it takes).
    pub fn failure(&self) -> Failure {
        match self {
            McpError::Unreachable { .. } | McpError::NotConfigured | McpError::Load { .. } => {
                Failure::Unreachable
            }
            McpError::Status { status, .. } if *status >= 500 || matches!(status, 408 | 429) => {
                Failure::Unreachable
            }
            // The box's credentials (client certificate, API key) or its enrollment are
            // refused: nothing about the bundle, so it stays queued until that is fixed
            // (a revoked or not yet enrolled box must not park its evidence).
            McpError::Status {
                status: 401 | 403, ..
            } => Failure::Unreachable,
            _ => Failure::Refused,
        }
    }
}

pub type Result<T> = std::result::Result<T, McpError>;

/// Everything the client needs, read from the config's files or given by a test.
#[derive(Clone)]
pub struct ChannelSettings {
    /// `https://host[:port]` with no path.
    pub url: String,
    /// PEM: the CA certificates the MCP's certificate must chain to (nothing else is trusted).
    pub ca_pem: Vec<u8>,
    /// PEM: the client certificate chain and its private key.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    pub api_key: Option<String>,
    pub site_id: String,
    pub host_id: String,
    /// Whole-call timeout (connect, TLS, request and answer).
    pub timeout: Duration,
}

impl std::fmt::Debug for ChannelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key or the API key.
        f.debug_struct("ChannelSettings")
            .field("url", &self.url)
            .field("site_id", &self.site_id)
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| McpError::Load {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl ChannelSettings {
    pub fn from_config(config: &Config) -> Result<Self> {
        let (Some(url), Some(ca), Some(cert), Some(key)) = (
            &config.mcp_url,
            &config.ca_cert_file,
            &config.client_cert_file,
            &config.client_key_file,
        ) else {
            return Err(McpError::NotConfigured);
        };
        let api_key = match &config.mcp_api_key_file {
            Some(path) => {
                let text =
                    String::from_utf8(read_file("MCP API key file", path)?).map_err(|_| {
                        McpError::Load {
                            what: "MCP API key file",
                            path: path.clone(),
                            reason: "is not UTF-8 text".into(),
                        }
                    })?;
                let key = text.trim().to_owned();
                if key.is_empty() || key.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(McpError::Load {
                        what: "MCP API key file",
                        path: path.clone(),
                        reason: "must hold one token without spaces".into(),
                    });
                }
                Some(key)
            }
            None => None,
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            ca_pem: read_file("CA certificate file (ca_cert_file)", ca)?,
            client_identity: Some((
                read_file("client certificate file (client_cert_file)", cert)?,
                read_file("client key file (client_key_file)", key)?,
            )),
            api_key,
            site_id: config.site_id.clone(),
            host_id: config.host_id.clone(),
            timeout: Duration::from_secs(30),
        })
    }
}

/// `GET /api/v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub protocol: u32,
    #[serde(default)]
    pub server: Option<String>,
}

/// The answer to an upload: the bundle was stored now or already before.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadAck {
    pub bundle_id: String,
    pub status: AckStatus,
    #[serde(default)]
    pub order_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Stored,
    Duplicate,
}

/// One pending order as listed: the MCP's name for it and the signed envelope.
/// The outer `order_id` is not signed; the agent checks it against the payload.
#[derive(Clone, Debug, Deserialize)]
pub struct ListedOrder {
    pub order_id: String,
    pub envelope: Box<serde_json::value::RawValue>,
}

#[derive(Debug, Deserialize)]
struct OrderList {
    orders: Vec<ListedOrder>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

pub struct McpClient {
    agent: ureq::Agent,
    settings: ChannelSettings,
}

fn pem_items(what: &'static str, pem: &[u8]) -> Result<Vec<PemItem<'static>>> {
    ureq::tls::parse_pem(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| McpError::Load {
            what,
            path: PathBuf::from("(PEM)"),
            reason: e.to_string(),
        })
}

impl McpClient {
    pub fn from_config(config: &Config) -> Result<Self> {
        let settings = ChannelSettings::from_config(config)?;
        let ca = config.ca_cert_file.clone().unwrap_or_default();
        let cert = config.client_cert_file.clone().unwrap_or_default();
        // Name the files, not "(PEM)", when their contents are wrong.
        Self::new(settings).map_err(|e| match e {
            McpError::Load { what, reason, .. } => McpError::Load {
                what,
                path: if what.starts_with("CA") { ca } else { cert },
                reason,
            },
            other => other,
        })
    }

    pub fn new(settings: ChannelSettings) -> Result<Self> {
        if !settings.url.starts_with("https://") {
            return Err(McpError::Load {
                what: "mcp_url",
                path: PathBuf::from(&settings.url),
                reason: "must start with https://".into(),
            });
        }
        let roots: Vec<Certificate<'static>> = pem_items("CA certificate", &settings.ca_pem)?
            .into_iter()
            .filter_map(|item| match item {
                PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect();
        if roots.is_empty() {
            return Err(McpError::Load {
                what: "CA certificate",
                path: PathBuf::from("(PEM)"),
                reason: "holds no CERTIFICATE block".into(),
            });
        }
        let client_cert = match &settings.client_identity {
            Some((cert_pem, key_pem)) => {
                let chain: Vec<Certificate<'static>> = pem_items("client certificate", cert_pem)?
                    .into_iter()
                    .filter_map(|item| match item {
                        PemItem::Certificate(c) => Some(c),
                        _ => None,
                    })
                    .collect();
                if chain.is_empty() {
                    return Err(McpError::Load {
                        what: "client certificate",
                        path: PathBuf::from("(PEM)"),
                        reason: "holds no CERTIFICATE block".into(),
                    });
                }
                let key = PrivateKey::from_pem(key_pem).map_err(|e| McpError::Load {
                    what: "client key",
                    path: PathBuf::from("(PEM)"),
                    reason: format!("{e}; expected a PKCS#8, RSA or EC private key in PEM"),
                })?;
                Some(ClientCert::new_with_certs(&chain, key))
            }
            None => None,
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .client_cert(client_cert)
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            // Redirects are not part of the protocol: never follow one, to any host.
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(settings.timeout))
            .timeout_connect(Some(Duration::from_secs(10)))
            .max_response_header_size(16 * 1024)
            .user_agent(format!("compliance-agent/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Self { agent, settings })
    }

    pub fn settings(&self) -> &ChannelSettings {
        &self.settings
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.url)
    }

    fn host_path(&self) -> String {
        format!(
            "/api/v1/hosts/{}/{}",
            self.settings.site_id, self.settings.host_id
        )
    }

    fn authorize<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.settings.api_key {
            Some(key) => req.header("Authorization", format!("Bearer {key}")),
            None => req,
        }
    }

    /// Reads a JSON answer with status 200; anything else is an error naming why.
    fn answer<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        result: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut response = result.map_err(|e| McpError::Unreachable {
            url: url.to_owned(),
            reason: describe(&e, self.settings.client_identity.is_some()),
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => McpError::Protocol {
                    url: url.to_owned(),
                    reason: format!("the answer is longer than {MAX_RESPONSE_BYTES} bytes"),
                },
                other => McpError::Unreachable {
                    url: url.to_owned(),
                    reason: format!(
                        "the answer was cut off: {}",
                        describe(&other, self.settings.client_identity.is_some())
                    ),
                },
            })?;
        if status != 200 {
            let message = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => e.error.chars().take(500).collect(),
                Err(_) if (300..400).contains(&status) => {
                    "a redirect; the protocol has none and the agent follows none (check mcp_url)"
                        .into()
                }
                Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            };
            return Err(McpError::Status {
                url: url.to_owned(),
                status,
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| McpError::Protocol {
            url: url.to_owned(),
            reason: format!("the body is not the expected JSON ({e})"),
        })
    }

    /// `GET /api/v1/health`.
    pub fn health(&self) -> Result<Health> {
        let url = self.url("/api/v1/health");
        let health: Health = self.answer(&url, self.authorize(self.agent.get(&url)).call())?;
        if health.protocol != PROTOCOL_VERSION {
            return Err(McpError::Protocol {
                url,
                reason: format!(
                    "the MCP speaks protocol {}, this agent {PROTOCOL_VERSION}",
                    health.protocol
                ),
            });
        }
        Ok(health)
    }

    /// `GET /api/v1/hosts/{site}/{host}/orders`.
    pub fn orders(&self) -> Result<Vec<ListedOrder>> {
        let url = self.url(&format!("{}/orders", self.host_path()));
        let list: OrderList = self.answer(&url, self.authorize(self.agent.get(&url)).call())?;
        Ok(list.orders)
    }

    /// Sends one stored bundle: to the evidence endpoint, or to its order's result endpoint.
    pub fn upload(&self, dir: &Path, order_id: Option<&str>) -> Result<UploadAck> {
        let (json, sig) = read_bundle(dir)?;
        let IdView { bundle_id, check } =
            serde_json::from_slice::<IdView>(&json).map_err(|e| McpError::Bundle {
                dir: dir.to_owned(),
                reason: format!("{BUNDLE_FILE} is not a bundle ({e})"),
            })?;
        let url = match order_id {
            Some(id) => self.url(&format!("{}/orders/{id}/result", self.host_path())),
            None => self.url("/api/v1/evidence"),
        };
        let (content_type, body) = multipart(&[
            (BUNDLE_FILE, "application/json", &json),
            (SIGNATURE_FILE, "application/octet-stream", &sig),
        ]);
        let ack: UploadAck = self.answer(
            &url,
            self.authorize(self.agent.post(&url))
                .header("Content-Type", content_type)
                .send(&body[..]),
        )?;
        if ack.bundle_id != bundle_id {
            return Err(McpError::Protocol {
                url,
                reason: format!(
                    "acknowledged bundle {} instead of {bundle_id}",
                    ack.bundle_id
                ),
            });
        }
        if check.as_deref() == Some(Check::Sbom.as_str()) {
            self.upload_sbom(dir, &json, &bundle_id)?;
        }
        Ok(ack)
    }

    /// After an sbom bundle is acknowledged (the only bundles parsed whole here), its document (sbom.cdx.json beside it):
    /// `PUT .../bundles/ID/sbom`. The row stays queued until this succeeds too; sent
    /// again, the bundle is a duplicate and the document replaces nothing newer.
    fn upload_sbom(&self, dir: &Path, json: &[u8], bundle_id: &str) -> Result<()> {
        let bundle: crate::evidence::Bundle =
            serde_json::from_slice(json).map_err(|e| McpError::Bundle {
                dir: dir.to_owned(),
                reason: format!("{BUNDLE_FILE} is not a bundle ({e})"),
            })?;
        let name = match crate::sbom::document_name(&bundle) {
            Ok(Some(name)) => name,
            Ok(None) => return Ok(()),
            Err(reason) => {
                return Err(McpError::Bundle {
                    dir: dir.to_owned(),
                    reason,
                });
            }
        };
        let document = std::fs::read(dir.join(name)).map_err(|e| McpError::Bundle {
            dir: dir.to_owned(),
            reason: format!("{name} cannot be read: {e}"),
        })?;
        let url = self.url(&format!("{}/bundles/{bundle_id}/sbom", self.host_path()));
        let ack: SbomAck = self.answer(
            &url,
            self.authorize(self.agent.put(&url))
                .header("Content-Type", "application/vnd.cyclonedx+json")
                .send(&document[..]),
        )?;
        if ack.bundle_id != bundle_id {
            return Err(McpError::Protocol {
                url,
                reason: format!(
                    "acknowledged the SBOM of bundle {} instead of {bundle_id}",
                    ack.bundle_id
                ),
            });
        }
        Ok(())
    }
}

/// The answer to an SBOM upload.
#[derive(Clone, Debug, Deserialize)]
struct SbomAck {
    bundle_id: String,
}

/// The answer to a log request: ready, or not yet (the server has not sequenced it).
#[derive(Clone, Debug)]
pub enum LogAnswer<T> {
    Ready(T),
    Pending(String),
}

/// `GET /api/v1/log/checkpoint`.
#[derive(Clone, Debug, Deserialize)]
pub struct LogCheckpoint {
    pub origin: String,
    pub tree_size: u64,
    /// The C2SP signed note (unverified until the box checks it).
    pub checkpoint: String,
    #[serde(default)]
    pub log_key: Option<String>,
}

/// The leaf a server says it holds for a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLeafView {
    pub leaf_index: u64,
    pub bundle_id: String,
    pub site_id: String,
    pub host_id: String,
    pub seq: u64,
    pub bundle_sha256: String,
    #[serde(default)]
    pub leaf_hash: Option<String>,
}

/// `GET /api/v1/log/inclusion`.
#[derive(Clone, Debug, Deserialize)]
pub struct LogInclusion {
    pub leaf: LogLeafView,
    pub proof: crate::tlog::InclusionProof,
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// `GET /api/v1/log/consistency`.
#[derive(Clone, Debug, Deserialize)]
pub struct LogConsistency {
    pub proof: crate::tlog::ConsistencyProof,
    #[serde(default)]
    pub old_checkpoint: Option<String>,
    #[serde(default)]
    pub new_checkpoint: Option<String>,
}

impl McpClient {
    fn log_get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<LogAnswer<T>> {
        let url = self.url(path);
        match self.answer(&url, self.authorize(self.agent.get(&url)).call()) {
            Ok(v) => Ok(LogAnswer::Ready(v)),
            // 202: accepted, not yet in the log; the server says when to ask again.
            Err(McpError::Status {
                status: 202,
                message,
                ..
            }) => Ok(LogAnswer::Pending(message)),
            Err(e) => Err(e),
        }
    }

    /// The log's newest checkpoint.
    pub fn log_checkpoint(&self) -> Result<LogAnswer<LogCheckpoint>> {
        self.log_get("/api/v1/log/checkpoint")
    }

    /// The proof that the tree of `old` leaves is a prefix of the tree of `new`.
    pub fn log_consistency(&self, old: u64, new: u64) -> Result<LogAnswer<LogConsistency>> {
        self.log_get(&format!("/api/v1/log/consistency?old={old}&new={new}"))
    }

    /// The inclusion proof of one of this box's bundles in the tree of `tree_size` leaves.
    pub fn log_inclusion(
        &self,
        bundle_id: &str,
        tree_size: u64,
    ) -> Result<LogAnswer<LogInclusion>> {
        if !crate::orders::valid_order_id(bundle_id) {
            return Err(McpError::Protocol {
                url: self.url("/api/v1/log/inclusion"),
                reason: format!("{bundle_id:?} is not a bundle id"),
            });
        }
        self.log_get(&format!(
            "/api/v1/log/inclusion?bundle_id={bundle_id}&tree_size={tree_size}"
        ))
    }
}

#[derive(Deserialize)]
struct IdView {
    bundle_id: String,
    #[serde(default)]
    check: Option<String>,
}

fn read_bundle(dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    crate::evidence::read_bundle_files(dir).map_err(|reason| McpError::Bundle {
        dir: dir.to_owned(),
        reason,
    })
}

/// A multipart/form-data body of named files; returns (content type, body).
pub fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    use rand::Rng;
    let boundary = loop {
        let candidate = format!(
            "compliance-agent-{}",
            hex::encode(rand::thread_rng().r#gen::<[u8; 16]>())
        );
        let needle = candidate.as_bytes();
        if !parts
            .iter()
            .any(|(_, _, data)| data.windows(needle.len()).any(|w| w == needle))
        {
            break candidate;
        }
    };
    let mut body = Vec::new();
    for (name, content_type, data) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The error and its causes on one line, with what it most likely means.
fn describe(err: &ureq::Error, presents_client_cert: bool) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    let hint = if text.contains("UnknownIssuer") {
        Some("the MCP's certificate is not signed by the CA in ca_cert_file")
    } else if text.contains("Expired") || text.contains("expired") {
        Some("the MCP's certificate has expired, or this box's clock is wrong")
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        Some("the MCP's certificate is not issued for the host name in mcp_url")
    } else if text.contains("CertificateRequired") {
        Some("the MCP requires a client certificate; set client_cert_file and client_key_file")
    } else if text.contains("UnknownCA")
        || text.contains("BadCertificate")
        || text.contains("DecryptError")
        || text.contains("AccessDenied")
    {
        Some(
            "the MCP refused this box's client certificate (not issued by the CA it trusts, or expired)",
        )
    } else if !presents_client_cert
        && (text.contains("Broken pipe") || text.contains("onnection reset"))
    {
        Some(
            "the MCP requires a client certificate and this box presents none; set client_cert_file and client_key_file",
        )
    } else if text.contains("Broken pipe") || text.contains("onnection reset") {
        Some(
            "the MCP closed the connection during or right after the TLS handshake; most often it refused this box's client certificate (not issued by the CA it trusts, or expired)",
        )
    } else if text.contains("onnection refused") {
        Some("nothing listens there: is the MCP up, and is mcp_url right?")
    } else if text.contains("imeout") || text.contains("timed out") {
        Some("no answer in time")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}

/// Which rows a delivery run sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Rows whose backoff has passed (the service's periodic run).
    Due,
    /// Every pending row now (`queue flush`).
    AllPending,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DeliverReport {
    pub attempted: u64,
    pub delivered: u64,
    /// Acknowledged as already stored (an earlier upload whose acknowledgement was lost).
    pub duplicates: u64,
    pub refused: u64,
    /// Rows parked after too many refusals.
    pub parked: u64,
    /// Why the run stopped before the queue was empty (the MCP could not be reached).
    pub stopped: Option<String>,
    /// Refusals, one line per bundle (the first 20).
    pub errors: Vec<String>,
}

/// Delivers queued bundles oldest first; each row is marked delivered only
/// after the MCP acknowledged it. An unreachable MCP ends the run (the
/// remaining rows stay queued); a refusal backs that row off and goes on.
pub fn deliver(
    client: &McpClient,
    queue: &mut Queue,
    selection: Selection,
) -> crate::Result<DeliverReport> {
    let mut report = DeliverReport::default();
    let mut acked: Vec<String> = Vec::new();
    let mut after_seq = 0u64;
    let now = unix_now();
    loop {
        let rows: Vec<Upload> = match selection {
            Selection::AllPending => queue.pending_after(after_seq, 256)?,
            Selection::Due => queue.due(now, after_seq, 256)?,
        };
        if rows.is_empty() {
            break;
        }
        for row in rows {
            after_seq = after_seq.max(row.seq);
            report.attempted += 1;
            match client.upload(&row.dir, row.order_id.as_deref()) {
                Ok(ack) => {
                    if ack.status == AckStatus::Duplicate {
                        report.duplicates += 1;
                    }
                    report.delivered += 1;
                    acked.push(row.bundle_id);
                    if acked.len() >= MARK_BATCH {
                        queue.mark_delivered(&acked, unix_now())?;
                        acked.clear();
                    }
                }
                Err(e) => {
                    queue.mark_delivered(&acked, unix_now())?;
                    acked.clear();
                    let failure = e.failure();
                    let message = e.to_string();
                    let state =
                        queue.record_failure(&row.bundle_id, failure, &message, unix_now())?;
                    if failure == Failure::Unreachable {
                        tracing::warn!(error = %message, "MCP unreachable; bundles stay queued");
                        report.stopped = Some(message);
                        return Ok(report);
                    }
                    tracing::warn!(bundle = %row.bundle_id, error = %message, "MCP refused a bundle");
                    report.refused += 1;
                    if state == UploadState::Failed {
                        report.parked += 1;
                    }
                    if report.errors.len() < 20 {
                        report.errors.push(format!("{}: {message}", row.bundle_id));
                    }
                }
            }
        }
    }
    queue.mark_delivered(&acked, unix_now())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_boundary_never_occurs_in_the_parts() {
        let data = b"--compliance-agent-not-quite".to_vec();
        let (ct, body) = multipart(&[("bundle.json", "application/json", &data)]);
        let boundary = ct
            .strip_prefix("multipart/form-data; boundary=")
            .expect("boundary in the content type");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with(&format!("--{boundary}\r\n")),
            "starts with the boundary: {text}"
        );
        assert!(
            text.ends_with(&format!("--{boundary}--\r\n")),
            "ends with the closing boundary: {text}"
        );
        assert!(
            text.contains("name=\"bundle.json\""),
            "names the part: {text}"
        );
    }

    #[test]
    fn failures_are_classified() {
        let status = |status| McpError::Status {
            url: "u".into(),
            status,
            message: "m".into(),
        };
        assert_eq!(status(503).failure(), Failure::Unreachable);
        assert_eq!(status(429).failure(), Failure::Unreachable);
        assert_eq!(status(409).failure(), Failure::Refused);
        assert_eq!(status(422).failure(), Failure::Refused);
        assert_eq!(
            status(401).failure(),
            Failure::Unreachable,
            "missing credentials say nothing about the bundle"
        );
        assert_eq!(
            status(403).failure(),
            Failure::Unreachable,
            "a revoked or unknown box keeps its evidence queued"
        );
        assert_eq!(
            McpError::Protocol {
                url: "u".into(),
                reason: "r".into()
            }
            .failure(),
            Failure::Refused
        );
        assert_eq!(
            McpError::Unreachable {
                url: "u".into(),
                reason: "r".into()
            }
            .failure(),
            Failure::Unreachable
        );
    }

    #[test]
    fn plain_http_and_empty_ca_are_refused() {
        let settings = ChannelSettings {
            url: "http://127.0.0.1:1".into(),
            ca_pem: Vec::new(),
            client_identity: None,
            api_key: None,
            site_id: "s".into(),
            host_id: "h".into(),
            timeout: Duration::from_secs(1),
        };
        let err = McpClient::new(settings.clone())
            .err()
            .expect("http is refused");
        assert!(err.to_string().contains("https://"), "{err}");
        let err = McpClient::new(ChannelSettings {
            url: "https://127.0.0.1:1".into(),
            ..settings
        })
        .err()
        .expect("no CA is refused");
        assert!(err.to_string().contains("CERTIFICATE"), "{err}");
    }
}
