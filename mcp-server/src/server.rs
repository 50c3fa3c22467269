//! The running server: both listeners on one tokio runtime it owns, stopped on drop.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::api::agent::{AgentState, Intercept};
use crate::services::Services;
use crate::{Error, Result};

/// Knobs for tests and embedding; the configuration covers the rest.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Answers to send instead of the real ones on the agent listener.
    pub intercept: Option<Intercept>,
    /// Worker threads of the runtime (default 2).
    pub worker_threads: Option<usize>,
}

pub struct Running {
    pub services: Services,
    agent_addr: SocketAddr,
    operator_addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn tls_err(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what} {}: {e}", path.display()))
}

fn server_identity(
    svc: &Services,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let (cert, key) = (&svc.paths.tls_cert, &svc.paths.tls_key);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| tls_err("server certificate", cert, e))?;
    if chain.is_empty() {
        return Err(tls_err(
            "server certificate",
            cert,
            "holds no CERTIFICATE block",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err("server key", key, e))?;
    Ok((chain, key))
}

fn agent_tls(svc: &Services) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &svc.config.client_ca_file {
        Some(path) => {
            for ca in
                CertificateDer::pem_file_iter(path).map_err(|e| tls_err("client CA", path, e))?
            {
                roots
                    .add(ca.map_err(|e| tls_err("client CA", path, e))?)
                    .map_err(|e| tls_err("client CA", path, e))?;
            }
        }
        None => roots
            .add(CertificateDer::from(svc.ca.cert_der().to_vec()))
            .map_err(|e| Error::Tls(format!("enrollment CA: {e}")))?,
    }
    // Optional at the TLS layer so a box without a certificate can enroll; every
    // other route refuses a request without one. A presented certificate must verify.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Tls(format!("client CA: {e}")))?;
    let (chain, key) = server_identity(svc)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err("server certificate and key", &svc.paths.tls_cert, e))?;
    Ok(Arc::new(config))
}

fn operator_tls(svc: &Services) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = server_identity(svc)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_err("server certificate and key", &svc.paths.tls_cert, e))?;
    Ok(Arc::new(config))
}

impl Running {
    /// Binds both listeners (port 0 picks a free port) and serves until stopped.
    pub fn start(svc: Services, options: StartOptions) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads.unwrap_or(2))
            .thread_name("mcp-server")
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))?;
        let api_key = match &svc.config.agent_api_key_file {
            Some(path) => Some(Arc::new(
                std::fs::read_to_string(path)
                    .map_err(Error::io(path))?
                    .trim()
                    .to_owned(),
            )),
            None => None,
        };
        let (agent_tls, operator_tls) = (agent_tls(&svc)?, operator_tls(&svc)?);
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let limits = svc.config.limits.clone();
        let (agent_addr, operator_addr) = runtime.block_on(async {
            let agent = tokio::net::TcpListener::bind(svc.config.agent_listen)
                .await
                .map_err(|e| {
                    Error::Invalid(format!(
                        "cannot listen on {} (agent_listen): {e}",
                        svc.config.agent_listen
                    ))
                })?;
            let ops = tokio::net::TcpListener::bind(svc.config.operator_listen)
                .await
                .map_err(|e| {
                    Error::Invalid(format!(
                        "cannot listen on {} (operator_listen): {e}",
                        svc.config.operator_listen
                    ))
                })?;
            let addrs = (
                agent
                    .local_addr()
                    .map_err(Error::io(std::path::Path::new("agent listener")))?,
                ops.local_addr()
                    .map_err(Error::io(std::path::Path::new("operator listener")))?,
            );
            let agent_router = crate::api::agent::router(
                AgentState {
                    svc: svc.clone(),
                    api_key,
                },
                options.intercept.clone(),
            );
            tokio::spawn(crate::api::listener::serve(
                agent,
                agent_tls,
                agent_router,
                limits.clone(),
                rx.clone(),
            ));
            tokio::spawn(crate::executor::background(svc.clone(), rx.clone()));
            tokio::spawn(crate::api::listener::serve(
                ops,
                operator_tls,
                crate::api::ops::router(svc.clone())
                    .merge(crate::console::router(svc.clone())?)
                    .merge(crate::metrics::router(svc.clone())),
                limits,
                rx,
            ));
            Ok::<_, Error>(addrs)
        })?;
        Ok(Self {
            services: svc,
            agent_addr,
            operator_addr,
            shutdown,
            runtime: Some(runtime),
        })
    }

    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_addr
    }

    pub fn operator_addr(&self) -> SocketAddr {
        self.operator_addr
    }

    /// `https://ADDR` of the agent listener.
    pub fn url(&self) -> String {
        format!("https://{}", self.agent_addr)
    }

    /// Stops both listeners and closes every connection.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }

    /// Blocks until SIGINT or SIGTERM, then stops.
    pub fn wait_for_signal(mut self) -> Result<()> {
        if let Some(rt) = &self.runtime {
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .map_err(|e| Error::Invalid(format!("cannot watch SIGTERM: {e}")))?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok::<_, Error>(())
            })?;
        }
        self.shutdown_now();
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}
