//! The TLS accept loop: a total deadline on the handshake, on reading each request head
//! (and on idling between requests), and on each whole request; a cap on connections
//! per peer address and in all. One idle, trickling or greedy client cannot starve others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::ConnInfo;
use crate::config::Limits;

/// Counts open connections per peer address; a slot is freed when its guard drops.
#[derive(Default)]
struct Slots {
    per_peer: HashMap<IpAddr, usize>,
    total: usize,
}

struct SlotGuard {
    slots: Arc<Mutex<Slots>>,
    ip: IpAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.per_peer.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    s.per_peer.remove(&self.ip);
                }
            }
        }
    }
}

fn take_slot(slots: &Arc<Mutex<Slots>>, ip: IpAddr, limits: &Limits) -> Option<SlotGuard> {
    let mut s = slots.lock().ok()?;
    let mine = s.per_peer.get(&ip).copied().unwrap_or(0);
    if mine >= limits.max_connections_per_peer || s.total >= limits.max_connections {
        return None;
    }
    s.per_peer.insert(ip, mine + 1);
    s.total += 1;
    Some(SlotGuard {
        slots: slots.clone(),
        ip,
    })
}

fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Mutex::new(Slots::default()));
    let router = router.layer(axum::middleware::from_fn_with_state(
        secs(limits.request_timeout_sec),
        request_deadline,
    ));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(guard) = take_slot(&slots, peer.ip(), &limits) else {
            tracing::warn!(%peer, "connection limit reached for this address; closed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, router, limits, mut shutdown) = (
            acceptor.clone(),
            router.clone(),
            limits.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            let tls = match tokio::time::timeout(
                secs(limits.handshake_timeout_sec),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake deadline passed; closed");
                    return;
                }
            };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            let info = ConnInfo { peer, client_cert };
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(info.clone());
                    router.clone().oneshot(req)
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(secs(limits.header_timeout_sec))
                .max_buf_size(64 * 1024)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                }
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// Answers 408 when a whole request (body included) takes longer than the deadline.
async fn request_deadline(
    axum::extract::State(deadline): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(r) => r,
        Err(_) => axum::response::IntoResponse::into_response(super::ApiError::new(
            408,
            format!("the request took longer than {} s", deadline.as_secs_f64()),
        )),
    }
}
