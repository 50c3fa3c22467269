//! The HTTPS listener: rustls with required client certificates, one thread per connection, protocol v1 routing.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

use crate::http::{self, HttpError, Request, Response};
use crate::store::Store;
use crate::{Error, Result, valid_id};

/// Most connections served at once; more are closed right away.
const MAX_CONNECTIONS: usize = 64;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to.
    pub client_ca: PathBuf,
    /// When set, every request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what} {}: {e}", path.display()))
}

fn tls_config(config: &ServerConfig) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| tls_err("server certificate", &config.cert, e))?;
    if certs.is_empty() {
        return Err(tls_err(
            "server certificate",
            &config.cert,
            "no CERTIFICATE block",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| tls_err("server key", &config.key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&config.client_ca)
        .map_err(|e| tls_err("client CA", &config.client_ca, e))?
    {
        let ca = ca.map_err(|e| tls_err("client CA", &config.client_ca, e))?;
        roots
            .add(ca)
            .map_err(|e| tls_err("client CA", &config.client_ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls_err("client CA", &config.client_ca, e))?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("server certificate and key", &config.cert, e))?;
    Ok(Arc::new(server))
}

/// Open connections by number, so that stopping the server can close them.
type Connections = Arc<Mutex<HashMap<u64, TcpStream>>>;

/// A server running on its own threads; stopped on [`Running::stop`] or drop.
pub struct Running {
    addr: SocketAddr,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    connections: Connections,
    accept: Option<JoinHandle<()>>,
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops accepting, closes every open connection and waits for the listener.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(conns) = self.connections.lock() {
            for c in conns.values() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Answers one request; [`start`] uses protocol v1, tests may inject faults.
pub type Handler = Arc<dyn Fn(&Store, &Request) -> Response + Send + Sync>;

/// Binds `config.listen` (port 0 picks a free port) and serves protocol v1 until stopped.
pub fn start(config: ServerConfig) -> Result<Running> {
    let api_key = config.api_key.clone();
    start_with(
        config,
        Arc::new(move |store: &Store, request: &Request| {
            let (status, body) = route(store, request, api_key.as_ref());
            Response::json(status, &body)
        }),
    )
}

/// [`start`] with another handler behind the same TLS and HTTP code.
pub fn start_with(config: ServerConfig, handler: Handler) -> Result<Running> {
    let tls = tls_config(&config)?;
    let store = Arc::new(Store::open(&config.state_dir)?);
    let listener = TcpListener::bind(config.listen).map_err(|e| Error::Io {
        path: PathBuf::from(config.listen.to_string()),
        source: e,
    })?;
    let addr = listener
        .local_addr()
        .map_err(Error::io(Path::new("listener")))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io(Path::new("listener")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let connections: Connections = Arc::new(Mutex::new(HashMap::new()));
    let accept = {
        let (store, stop, connections) = (store.clone(), stop.clone(), connections.clone());
        std::thread::Builder::new()
            .name("mcp-accept".into())
            .spawn(move || accept_loop(listener, tls, store, stop, connections, handler))
            .map_err(Error::io(Path::new("accept thread")))?
    };
    Ok(Running {
        addr,
        store,
        stop,
        connections,
        accept: Some(accept),
    })
}

fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    connections: Connections,
    handler: Handler,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let next_id = AtomicU64::new(0);
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
                let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
                let _ = stream.set_nodelay(true);
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                if let (Ok(clone), Ok(mut conns)) = (stream.try_clone(), connections.lock()) {
                    conns.insert(id, clone);
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (tls, store, stop, active, handler, connections) = (
                    tls.clone(),
                    store.clone(),
                    stop.clone(),
                    active.clone(),
                    handler.clone(),
                    connections.clone(),
                );
                let spawned =
                    std::thread::Builder::new()
                        .name("mcp-conn".into())
                        .spawn(move || {
                            serve_connection(stream, tls, &store, &stop, &handler);
                            // Dropping the registered clone closes the socket for good.
                            if let Ok(mut conns) = connections.lock() {
                                conns.remove(&id);
                            }
                            active.fetch_sub(1, Ordering::SeqCst);
                        });
                match spawned {
                    Ok(handle) => workers.push(handle),
                    Err(e) => tracing::error!(error = %e, "cannot start a connection thread"),
                }
                workers.retain(|w| !w.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

fn serve_connection(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    store: &Store,
    stop: &AtomicBool,
    handler: &Handler,
) {
    let conn = match rustls::ServerConnection::new(tls) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start TLS");
            return;
        }
    };
    let mut reader = BufReader::new(rustls::StreamOwned::new(conn, stream));
    while !stop.load(Ordering::SeqCst) {
        match http::read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(request)) => {
                let response = handler(store, &request);
                let keep_alive = !request.wants_close() && !stop.load(Ordering::SeqCst);
                if http::write_response(reader.get_mut(), &response, keep_alive).is_err()
                    || !keep_alive
                {
                    return;
                }
            }
            Err(HttpError::Bad(status, message)) => {
                let response = Response::json(status, &json!({ "error": message }));
                let _ = http::write_response(reader.get_mut(), &response, false);
                return;
            }
            Err(HttpError::Io(e)) => {
                // TLS handshake failures land here: a client without a valid
                // certificate never gets to send a request.
                tracing::debug!(error = %e, "connection ended");
                return;
            }
        }
    }
}

fn error(status: u16, message: impl Into<String>) -> (u16, serde_json::Value) {
    (status, json!({ "error": message.into() }))
}

fn authorized(request: &Request, api_key: Option<&String>) -> bool {
    let Some(expected) = api_key else {
        return true;
    };
    let given = request
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compare in constant time: the key is a secret.
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Protocol v1 (docs/protocol.md).
pub fn route(
    store: &Store,
    request: &Request,
    api_key: Option<&String>,
) -> (u16, serde_json::Value) {
    if !authorized(request, api_key) {
        return error(401, "missing or wrong API key (Authorization: Bearer ...)");
    }
    let path = request.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "health"]) => (
            200,
            json!({ "status": "ok", "protocol": 1, "server": format!("mcp-server {}", env!("CARGO_PKG_VERSION")) }),
        ),
        ("GET", ["api", "v1", "hosts", site, host, "orders"]) => {
            if !valid_id(site) || !valid_id(host) {
                return error(404, "no such host");
            }
            match store.pending_orders(site, host) {
                Ok(list) => (200, list),
                Err(e) => error(500, e.to_string()),
            }
        }
        (
            "POST",
            [
                "api",
                "v1",
                "hosts",
                site,
                host,
                "orders",
                order_id,
                "result",
            ],
        ) => {
            if !valid_id(site) || !valid_id(host) || !valid_id(order_id) {
                return error(404, "no such order");
            }
            upload(store, request, Some((site, host, order_id)))
        }
        ("POST", ["api", "v1", "evidence"]) => upload(store, request, None),
        (_, ["api", "v1", ..]) => error(
            if matches!(request.method.as_str(), "GET" | "POST") {
                404
            } else {
                405
            },
            format!("no route {} {path} in protocol v1", request.method),
        ),
        _ => error(404, format!("no route {path}")),
    }
}

fn upload(
    store: &Store,
    request: &Request,
    order: Option<(&str, &str, &str)>,
) -> (u16, serde_json::Value) {
    let content_type = request.header("content-type").unwrap_or_default();
    let parts = match http::multipart(content_type, &request.body) {
        Ok(p) => p,
        Err(e) => return error(415, e),
    };
    let part = |name: &str| parts.iter().find(|p| p.name == name).map(|p| &p.data);
    let (Some(json), Some(sig)) = (part("bundle.json"), part("bundle.sig")) else {
        return error(422, "the upload needs the parts bundle.json and bundle.sig");
    };
    match store.receive(json, sig, order) {
        Ok((bundle, stored)) => {
            let status = if stored { "stored" } else { "duplicate" };
            let mut body = json!({ "bundle_id": bundle.bundle_id, "status": status });
            if let Some((_, _, order_id)) = order {
                body["order_id"] = json!(order_id);
            }
            (200, body)
        }
        Err(refusal) => error(refusal.status, refusal.message),
    }
}
