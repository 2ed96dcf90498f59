//! Serving a gRPC service over TLS and HTTP/2: accept, handshake, serve, drain.
//!
//! Generic over the tower service so that the development control plane can put the CA and its
//! xDS server behind one listener, as istiod does on port 15012. A slow or failed handshake
//! affects only its own connection.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `service` on `listener` over `tls` (which should offer ALPN `h2`) until `shutdown`
/// completes; then stops accepting, asks every connection to finish its calls in progress and
/// returns when they have.
pub async fn serve_grpc<S, B>(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let acceptor = TlsAcceptor::from(tls);
    let (draining, drain) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "CA server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Reap finished connections as we go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (acceptor, service, mut drain) = (acceptor.clone(), service.clone(), drain.clone());
        connections.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "CA server TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "CA server TLS handshake timed out");
                    return;
                }
            };
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = drain.wait_for(|d| *d).map(|_| ()) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "CA server connection ended with an error");
            }
        });
    }
    drop(listener);
    draining.send_replace(true);
    while connections.join_next().await.is_some() {}
}
