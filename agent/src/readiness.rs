//! Readiness: the agent answers `200` on `/healthz/ready` (port 15021) once nothing holds it
//! back, `503` with the reasons otherwise.
//!
//! Whatever must finish before the agent serves well (the first enrollment pass, the first
//! xDS sync) takes a [`Block`] and drops it when done; something that can go wrong later (the
//! Kubernetes API out of reach for long) takes one again for as long as it lasts. Dropping the
//! `Block` is what clears it, so a task that ends or panics never leaves the agent unready
//! by mistake — nor ready by forgetting to say so.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The path the DaemonSet's readiness probe asks.
pub const PATH: &str = "/healthz/ready";

/// Shared readiness of the agent; clones see the same state.
#[derive(Debug, Clone)]
pub struct Readiness {
    blocks: Arc<watch::Sender<BTreeMap<u64, String>>>,
    next: Arc<AtomicU64>,
}

/// Holds the agent unready until dropped.
#[derive(Debug)]
pub struct Block {
    id: u64,
    blocks: Arc<watch::Sender<BTreeMap<u64, String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            blocks: Arc::new(watch::Sender::new(BTreeMap::new())),
            next: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the agent unready, for the reason `what`, until the returned [`Block`] drops.
    pub fn block(&self, what: impl Into<String>) -> Block {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let what = what.into();
        self.blocks.send_modify(|b| {
            b.insert(id, what);
        });
        Block {
            id,
            blocks: self.blocks.clone(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.blocks.borrow().is_empty()
    }

    /// What holds the agent back now, sorted, without repeats.
    pub fn pending(&self) -> Vec<String> {
        let mut all: Vec<String> = self.blocks.borrow().values().cloned().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Waits until the agent is ready.
    pub async fn wait_ready(&self) {
        let mut rx = self.blocks.subscribe();
        let _ = rx.wait_for(BTreeMap::is_empty).await;
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.blocks.send_modify(|b| {
            b.remove(&self.id);
        });
    }
}

/// The answer to one request.
fn respond(readiness: &Readiness, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() != PATH {
        (StatusCode::NOT_FOUND, "not found\n".to_owned())
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned())
    } else if readiness.is_ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", readiness.pending().join(", ")),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Serves `/healthz/ready` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "readiness: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(&readiness, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            // A probe that goes away mid-request is no news.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn ready_only_while_no_block_is_held() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let a = r.block("enrollment");
        let b = r.block("xds");
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["enrollment", "xds"]);
        drop(a);
        assert_eq!(r.pending(), vec!["xds"]);
        drop(b);
        assert!(r.is_ready());
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_endpoint_answers_503_with_reasons_then_200() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Readiness::new();
        let block = r.block("kubernetes api");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, r.clone(), async move {
            let _ = stopped.await;
        }));
        let answer = get(addr, PATH).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.ends_with("not ready: kubernetes api\n"), "{answer}");
        drop(block);
        let answer = get(addr, PATH).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
