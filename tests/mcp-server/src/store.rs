//! The server's state directory: its order key, enrolled hosts, stored bundles with their chains, orders and results.
//!
//! ```text
//! <state>/order-signing.key, order-signing.pub.pem    the Ed25519 order key
//! <state>/hosts/<site>/<host>/signing.pub.pem          the host's enrolled evidence key
//! <state>/hosts/<site>/<host>/bundles/<id>/bundle.json, bundle.sig
//! <state>/hosts/<site>/<host>/orders/pending/<order_id>.json
//! <state>/hosts/<site>/<host>/orders/done/<order_id>.json
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use compliance_agent::crypto::{SigningKey, VerifyingKey, sha256_hex};
use compliance_agent::evidence::{BUNDLE_FILE, Bundle, SIGNATURE_FILE};
use compliance_agent::orders::{Envelope, Order};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Error, Result, valid_id};

pub const ORDER_KEY_FILE: &str = "order-signing.key";
pub const ORDER_PUBKEY_FILE: &str = "order-signing.pub.pem";
const HOST_KEY_FILE: &str = "signing.pub.pem";

/// A refusal of an upload: the HTTP status and the reason for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// What the chain check keeps of a stored bundle.
#[derive(Clone, Debug)]
struct Link {
    bundle_id: String,
    hash: String,
    prev_hash: Option<String>,
}

#[derive(Default)]
struct HostChain {
    loaded: bool,
    by_seq: BTreeMap<u64, Link>,
}

/// Counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    pub uploads_received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub refused: u64,
}

/// An order to create and sign.
#[derive(Clone, Debug)]
pub struct OrderRequest {
    pub site_id: String,
    pub host_id: String,
    pub runbook_id: String,
    pub params: serde_json::Value,
    pub ttl: u64,
    /// Default: 16 random bytes in hex.
    pub nonce: Option<String>,
    /// Default: now.
    pub issued_at: Option<Timestamp>,
}

/// A pending order as stored and listed.
#[derive(Debug, Serialize, Deserialize)]
struct PendingOrder {
    order_id: String,
    queued_at: Timestamp,
    envelope: Box<RawValue>,
}

/// An order's result as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub order_id: String,
    pub bundle_id: String,
    pub outcome: String,
    pub error: Option<String>,
    pub received_at: Timestamp,
}

pub struct Store {
    root: PathBuf,
    order_key: SigningKey,
    chains: Mutex<HashMap<(String, String), HostChain>>,
    stats: Mutex<ServerStats>,
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(Error::io(path))?;
    f.write_all(data).map_err(Error::io(path))?;
    f.sync_all().map_err(Error::io(path))
}

fn fsync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(path))
}

/// Writes a small file atomically (temp, fsync, rename, fsync of the directory).
fn replace(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, data)?;
    fs::rename(&tmp, path).map_err(Error::io(path))?;
    match path.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}

impl Store {
    /// Opens the state directory, creating it and the order key on first use.
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root.join("hosts")).map_err(Error::io(root))?;
        let key_path = root.join(ORDER_KEY_FILE);
        let order_key = if key_path.exists() {
            SigningKey::load(&key_path)?
        } else {
            let key = SigningKey::generate();
            key.write_pair(&key_path, &root.join(ORDER_PUBKEY_FILE))?;
            key
        };
        Ok(Self {
            root: root.to_owned(),
            order_key,
            chains: Mutex::new(HashMap::new()),
            stats: Mutex::new(ServerStats::default()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The public key agents pin as `mcp_order_pubkey_file`.
    pub fn order_pubkey_file(&self) -> PathBuf {
        self.root.join(ORDER_PUBKEY_FILE)
    }

    pub fn order_key(&self) -> &SigningKey {
        &self.order_key
    }

    fn host_dir(&self, site: &str, host: &str) -> Result<PathBuf> {
        if !valid_id(site) || !valid_id(host) {
            return Err(Error::Invalid(format!(
                "{site:?}/{host:?} is not a valid site/host id"
            )));
        }
        Ok(self.root.join("hosts").join(site).join(host))
    }

    /// Records the evidence public key of a host; its bundles are checked against it.
    pub fn enroll(&self, site: &str, host: &str, pubkey_pem: &str) -> Result<()> {
        VerifyingKey::from_spki_pem(pubkey_pem)
            .map_err(|e| Error::Invalid(format!("not an Ed25519 public key in SPKI PEM: {e}")))?;
        let dir = self.host_dir(site, host)?;
        for sub in ["bundles", "orders/pending", "orders/done"] {
            fs::create_dir_all(dir.join(sub)).map_err(Error::io(&dir))?;
        }
        replace(&dir.join(HOST_KEY_FILE), pubkey_pem.as_bytes())
    }

    fn host_key(&self, site: &str, host: &str) -> Option<VerifyingKey> {
        let dir = self.host_dir(site, host).ok()?;
        VerifyingKey::load(&dir.join(HOST_KEY_FILE)).ok()
    }

    pub fn stats(&self) -> ServerStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn count(&self, f: impl FnOnce(&mut ServerStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Signs an order with the order key and queues it for its host.
    pub fn create_order(&self, request: OrderRequest) -> Result<Order> {
        let order = Order {
            order_id: uuid::Uuid::new_v4().to_string(),
            site_id: request.site_id.clone(),
            host_id: request.host_id.clone(),
            runbook_id: request.runbook_id,
            params: request.params,
            nonce: request
                .nonce
                .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>())),
            issued_at: request.issued_at.unwrap_or_else(Timestamp::now),
            ttl: request.ttl,
        };
        let envelope = order.sign(&self.order_key);
        let json = serde_json::to_string(&envelope)
            .map_err(|e| Error::Invalid(format!("cannot encode envelope: {e}")))?;
        self.queue_envelope(&request.site_id, &request.host_id, &order.order_id, &json)?;
        Ok(order)
    }

    /// Queues any envelope JSON under `order_id` (a test makes bad orders this way).
    pub fn queue_envelope(
        &self,
        site: &str,
        host: &str,
        order_id: &str,
        envelope_json: &str,
    ) -> Result<()> {
        if !valid_id(order_id) {
            return Err(Error::Invalid(format!(
                "{order_id:?} is not a valid order id"
            )));
        }
        let envelope = RawValue::from_string(envelope_json.to_owned())
            .map_err(|e| Error::Invalid(format!("the envelope is not JSON: {e}")))?;
        let pending = PendingOrder {
            order_id: order_id.to_owned(),
            queued_at: Timestamp::now(),
            envelope,
        };
        let dir = self.host_dir(site, host)?.join("orders/pending");
        fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        let data = serde_json::to_vec(&pending)
            .map_err(|e| Error::Invalid(format!("cannot encode order: {e}")))?;
        replace(&dir.join(format!("{order_id}.json")), &data)
    }

    /// The pending orders of a host, oldest first, as the listing's JSON value.
    pub fn pending_orders(&self, site: &str, host: &str) -> Result<serde_json::Value> {
        let dir = self.host_dir(site, host)?.join("orders/pending");
        let mut orders: Vec<PendingOrder> = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(serde_json::json!({ "orders": [] }));
            }
            Err(e) => return Err(Error::io(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(Error::io(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(Error::io(&path))?;
            if let Ok(order) = serde_json::from_slice::<PendingOrder>(&bytes) {
                orders.push(order);
            }
        }
        orders.sort_by_key(|o| o.queued_at);
        let listed: Vec<serde_json::Value> = orders
            .into_iter()
            .map(|o| {
                serde_json::json!({
                    "order_id": o.order_id,
                    "envelope": o.envelope,
                })
            })
            .collect();
        Ok(serde_json::json!({ "orders": listed }))
    }

    /// The bundle ids stored for a host, in seq order.
    pub fn bundles(&self, site: &str, host: &str) -> Result<Vec<String>> {
        let mut chains = self
            .chains
            .lock()
            .map_err(|_| Error::Invalid("chain lock poisoned".into()))?;
        let chain = self.chain(&mut chains, site, host)?;
        Ok(chain.by_seq.values().map(|l| l.bundle_id.clone()).collect())
    }

    /// The recorded results of a host's orders.
    pub fn results(&self, site: &str, host: &str) -> Result<Vec<ResultRecord>> {
        let dir = self.host_dir(site, host)?.join("orders/done");
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for entry in entries {
            let path = entry.map_err(Error::io(&dir))?.path();
            let bytes = fs::read(&path).map_err(Error::io(&path))?;
            if let Ok(r) = serde_json::from_slice::<ResultRecord>(&bytes) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.received_at);
        Ok(out)
    }

    fn chain<'a>(
        &self,
        chains: &'a mut HashMap<(String, String), HostChain>,
        site: &str,
        host: &str,
    ) -> Result<&'a mut HostChain> {
        let dir = self.host_dir(site, host)?.join("bundles");
        let chain = chains
            .entry((site.to_owned(), host.to_owned()))
            .or_default();
        if !chain.loaded {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries {
                    let path = entry.map_err(Error::io(&dir))?.path().join(BUNDLE_FILE);
                    let Ok(bytes) = fs::read(&path) else { continue };
                    let Ok(bundle) = serde_json::from_slice::<Bundle>(&bytes) else {
                        continue;
                    };
                    chain.by_seq.insert(
                        bundle.seq,
                        Link {
                            bundle_id: bundle.bundle_id,
                            hash: sha256_hex(&bytes),
                            prev_hash: bundle.prev_hash,
                        },
                    );
                }
            }
            chain.loaded = true;
        }
        Ok(chain)
    }

    /// Checks and stores an uploaded bundle; `order` is `(site, host, order_id)`
    /// from a result URL. Returns the bundle id and whether it was new.
    pub fn receive(
        &self,
        json: &[u8],
        sig: &[u8],
        order: Option<(&str, &str, &str)>,
    ) -> std::result::Result<(Bundle, bool), Refusal> {
        self.count(|s| s.uploads_received += 1);
        let result = self.receive_inner(json, sig, order);
        match &result {
            Ok((_, true)) => self.count(|s| s.stored += 1),
            Ok((_, false)) => self.count(|s| s.duplicates += 1),
            Err(_) => self.count(|s| s.refused += 1),
        }
        result
    }

    fn receive_inner(
        &self,
        json: &[u8],
        sig: &[u8],
        order: Option<(&str, &str, &str)>,
    ) -> std::result::Result<(Bundle, bool), Refusal> {
        let bundle: Bundle = serde_json::from_slice(json)
            .map_err(|e| refuse(422, format!("bundle.json is not an evidence bundle: {e}")))?;
        let (site, host) = (bundle.site_id.as_str(), bundle.host_id.as_str());
        if !valid_id(&bundle.bundle_id) {
            return Err(refuse(422, "bundle_id is not a valid id"));
        }
        if let Some((path_site, path_host, order_id)) = order {
            if (path_site, path_host) != (site, host) {
                return Err(refuse(
                    422,
                    format!(
                        "the bundle is from {site}/{host}, the URL names {path_site}/{path_host}"
                    ),
                ));
            }
            if bundle.order_id.as_deref() != Some(order_id) {
                return Err(refuse(
                    422,
                    format!(
                        "the bundle answers order {:?}, the URL names {order_id}",
                        bundle.order_id
                    ),
                ));
            }
        }
        let key = self.host_key(site, host).ok_or_else(|| {
            refuse(
                403,
                format!("host {site}/{host} is not enrolled; enroll its public key with `mcp-server enroll`"),
            )
        })?;
        key.verify(json, sig).map_err(|e| {
            refuse(
                422,
                format!("bundle.sig does not verify with the enrolled key of {site}/{host} ({e})"),
            )
        })?;
        let hash = sha256_hex(json);
        let host_dir = self
            .host_dir(site, host)
            .map_err(|e| refuse(422, e.to_string()))?;
        let internal = |e: Error| refuse(500, e.to_string());

        let mut chains = self
            .chains
            .lock()
            .map_err(|_| refuse(500, "chain lock poisoned"))?;
        let chain = self.chain(&mut chains, site, host).map_err(internal)?;
        let dir = host_dir.join("bundles").join(&bundle.bundle_id);
        if dir.join(BUNDLE_FILE).exists() {
            let stored = fs::read(dir.join(BUNDLE_FILE)).map_err(|e| refuse(500, e.to_string()))?;
            if stored == json {
                self.record_result(&host_dir, &bundle, order.map(|o| o.2))
                    .map_err(internal)?;
                return Ok((bundle, false));
            }
            return Err(refuse(
                409,
                format!(
                    "bundle {} is already stored with other contents",
                    bundle.bundle_id
                ),
            ));
        }
        if let Some(existing) = chain.by_seq.get(&bundle.seq) {
            return Err(refuse(
                409,
                format!(
                    "fork: seq {} of {site}/{host} is already bundle {}",
                    bundle.seq, existing.bundle_id
                ),
            ));
        }
        if let Some(prev) = bundle.seq.checked_sub(1).and_then(|s| chain.by_seq.get(&s))
            && bundle.prev_hash.as_deref() != Some(prev.hash.as_str())
        {
            return Err(refuse(
                409,
                format!(
                    "chain break: prev_hash of seq {} does not match the stored seq {}",
                    bundle.seq,
                    bundle.seq - 1
                ),
            ));
        }
        if let Some(next) = chain.by_seq.get(&(bundle.seq + 1))
            && next.prev_hash.as_deref() != Some(hash.as_str())
        {
            return Err(refuse(
                409,
                format!(
                    "chain break: the stored seq {} does not name this bundle as its predecessor",
                    bundle.seq + 1
                ),
            ));
        }
        // Assemble beside the target and rename: a bundle appears whole or not at all.
        let tmp = host_dir
            .join("bundles")
            .join(format!(".tmp-{}", bundle.bundle_id));
        let write = || -> Result<()> {
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
            write_synced(&tmp.join(BUNDLE_FILE), json)?;
            write_synced(&tmp.join(SIGNATURE_FILE), sig)?;
            fs::rename(&tmp, &dir).map_err(Error::io(&dir))?;
            fsync_dir(&host_dir.join("bundles"))
        };
        write().map_err(internal)?;
        chain.by_seq.insert(
            bundle.seq,
            Link {
                bundle_id: bundle.bundle_id.clone(),
                hash,
                prev_hash: bundle.prev_hash.clone(),
            },
        );
        drop(chains);
        self.record_result(&host_dir, &bundle, order.map(|o| o.2))
            .map_err(internal)?;
        Ok((bundle, true))
    }

    /// Marks an order answered by `bundle` (once; a repeated upload changes nothing).
    fn record_result(
        &self,
        host_dir: &Path,
        bundle: &Bundle,
        order_id: Option<&str>,
    ) -> Result<()> {
        let Some(order_id) = order_id else {
            return Ok(());
        };
        let done = host_dir.join("orders/done");
        fs::create_dir_all(&done).map_err(Error::io(&done))?;
        let record_path = done.join(format!("{order_id}.json"));
        if !record_path.exists() {
            let record = ResultRecord {
                order_id: order_id.to_owned(),
                bundle_id: bundle.bundle_id.clone(),
                outcome: bundle.outcome.as_str().to_owned(),
                error: bundle.error.clone(),
                received_at: Timestamp::now(),
            };
            let data =
                serde_json::to_vec_pretty(&record).map_err(|e| Error::Invalid(e.to_string()))?;
            replace(&record_path, &data)?;
        }
        let pending = host_dir
            .join("orders/pending")
            .join(format!("{order_id}.json"));
        match fs::remove_file(&pending) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&pending)(e)),
        }
    }
}

/// Parses an envelope as the agent would (for `mcp-server list`).
pub fn describe_envelope(json: &str) -> Option<Order> {
    let envelope = Envelope::parse(json.as_bytes()).ok()?;
    Order::parse(&envelope.unverified_payload()?).ok()
}
