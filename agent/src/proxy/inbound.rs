//! Inbound HBONE (15008): mutual TLS presenting the destination workload's certificate, then
//! one HTTP/2 `CONNECT` stream per tunnelled TCP connection, delivered to the workload.
//!
//! Status codes (hbone.md §3.2): 400 for a request that is not `CONNECT` or whose authority is
//! not `ip:port` of this workload; 401 when authorization policy denies it (decided before
//! the upstream connect, from the TLS-verified peer identity and the TCP peer address); 503
//! when the upstream connection fails; 200 only once the upstream connection is established.
//! A stream that policy denies later is reset.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use xds::Workload;
use xds::policy::Peer;

use super::authorization::{self, Denied, Tracked};
use super::readahead::ReadAhead;
use super::relay::{Relay, record};
use super::{PeerAddr, Proxy, copy, delivery, headers};
use crate::drain::Watch;
use crate::events::{Direction, Started};
use crate::netns::Net;
use crate::tls;

/// One accepted TCP connection on a workload's HBONE listener.
pub async fn handle(
    proxy: Arc<Proxy>,
    net: Net,
    workload: Arc<Workload>,
    tcp: TcpStream,
    peer: PeerAddr,
    drain: Watch,
) {
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = tcp.set_nodelay(true);
    let id = workload.identity().clone();
    let Some(config) = proxy.creds.server_config(&id) else {
        tracing::warn!(workload = %workload.uid, identity = %id, "no certificate to present; HBONE connection refused");
        return;
    };
    let handshake = async {
        let tls = TlsAcceptor::from(config)
            .accept(ReadAhead::new(tcp))
            .await?;
        // With the principal policies compare computed once for all the connection's streams.
        let peer_id = tls::peer_identity(tls.get_ref().1).map(|id| Arc::new(Peer::new(id)));
        let conn = h2::server::Builder::new()
            .initial_window_size(proxy.cfg.h2.stream_window)
            .initial_connection_window_size(proxy.cfg.h2.connection_window)
            .max_frame_size(proxy.cfg.h2.max_frame_size)
            .max_concurrent_streams(200)
            .max_header_list_size(64 * 1024)
            .max_send_buffer_size(400 * 1024)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((conn, peer_id))
    };
    let (mut conn, peer_id) =
        match tokio::time::timeout(proxy.cfg.handshake_timeout, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                tracing::warn!(src = %peer.0, dst = %local, error = %e, "HBONE handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(src = %peer.0, dst = %local, "HBONE handshake timed out");
                return;
            }
        };
    tracing::debug!(src = %peer.0, dst = %local, peer_identity = ?peer_id.as_deref().map(Peer::identity), "HBONE connection accepted");
    let pings = conn.ping_pong();
    let keepalive = async {
        match pings {
            Some(p) => {
                super::keepalive(p, proxy.cfg.h2.ping_interval, proxy.cfg.h2.ping_timeout).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let stream = Stream {
                        proxy: proxy.clone(),
                        net: net.clone(),
                        workload: workload.clone(),
                        local,
                        peer,
                        peer_id: peer_id.clone(),
                    };
                    // The request is read here and only what the stream needs goes into its
                    // task, which lives as long as the connection.
                    let src = client_addr(&req).unwrap_or(peer.0);
                    let target = stream.target(&req).map_err(Box::new);
                    tokio::spawn(stream.serve(target, src, req.into_body(), respond));
                }
                Some(Err(e)) => {
                    tracing::debug!(src = %peer.0, error = %e, "HBONE connection error");
                    break;
                }
                None => break,
            },
            () = &mut keepalive => {
                tracing::warn!(src = %peer.0, "HBONE peer did not answer PING; connection closed");
                break;
            }
            () = drain.draining(), if !draining => {
                // GOAWAY: no new streams; open ones finish.
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

struct Stream {
    proxy: Arc<Proxy>,
    /// Where the workload's application is connected to from.
    net: Net,
    workload: Arc<Workload>,
    /// The address the tunnel connection was accepted on (the workload's IP).
    local: SocketAddr,
    peer: PeerAddr,
    /// Shared by the connection's streams.
    peer_id: Option<Arc<Peer>>,
}

/// Why a CONNECT was refused, with the status it is answered with.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("authority {0:?} is not an ip:port")]
    BadAuthority(String),
    #[error("authority {authority} is not this workload's address {local}")]
    WrongAuthority {
        authority: SocketAddr,
        local: std::net::IpAddr,
    },
    #[error("authority {0} is one of the agent's own ports")]
    OwnPort(SocketAddr),
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("connect to {addr}: {source}")]
    Upstream {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::NotConnect(_)
            | Refusal::BadAuthority(_)
            | Refusal::WrongAuthority { .. }
            | Refusal::OwnPort(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Upstream { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl Stream {
    /// Serves one CONNECT stream to its end and records it.
    ///
    /// Two phases, one task: the policy check, the upstream connect and the answer are boxed
    /// and gone once connected, then the [`Relay`] copies. The task lives as long as the
    /// tunnelled connection, so it holds only the relay. A refused stream is answered and
    /// recorded in the first phase.
    fn serve(
        self,
        target: Result<SocketAddr, Box<Refusal>>,
        src: SocketAddr,
        body: RecvStream,
        mut respond: SendResponse<Bytes>,
    ) -> impl Future<Output = ()> + Send {
        super::Phases::new(async move {
            let started = Started::now();
            let opened = match target {
                Ok(authority) => self.connect(authority, src.ip()).await.map_err(Box::new),
                Err(refusal) => Err(refusal),
            };
            let refused = |dst, error| {
                let (peer, direction) = (self.peer_id.as_deref(), Direction::InboundHbone);
                let ends = (src, dst);
                record(
                    &self.proxy,
                    direction,
                    ends,
                    &self.workload,
                    peer,
                    started,
                    Err(error),
                );
            };
            let (authority, upstream, tracked) = match opened {
                Ok(connected) => connected,
                Err(refusal) => {
                    let response = Response::builder()
                        .status(refusal.status())
                        .body(())
                        .expect("static response is valid");
                    let _ = respond.send_response(response, true);
                    refused(self.local, format!("{} ({})", refusal, refusal.status()));
                    return None;
                }
            };
            let response = Response::builder()
                .status(StatusCode::OK)
                .header(
                    headers::BAGGAGE,
                    headers::baggage(&self.workload, &self.proxy.cfg.cluster_id),
                )
                .body(())
                .expect("static response is valid");
            let send = match respond.send_response(response, false) {
                Ok(send) => send,
                Err(e) => {
                    refused(authority, format!("sending 200: {e}"));
                    return None;
                }
            };
            Some(Relay {
                copy: copy::tunnel(upstream, send, body),
                tracked,
                proxy: self.proxy,
                src: src.into(),
                started,
            })
        })
    }

    /// The address the request asks for, when it is a CONNECT to this workload.
    fn target(&self, req: &Request<RecvStream>) -> Result<SocketAddr, Refusal> {
        if req.method() != Method::CONNECT {
            return Err(Refusal::NotConnect(req.method().clone()));
        }
        let raw = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let authority: SocketAddr = raw
            .parse()
            .map_err(|_| Refusal::BadAuthority(raw.to_owned()))?;
        if authority.ip() != self.local.ip() {
            return Err(Refusal::WrongAuthority {
                authority,
                local: self.local.ip(),
            });
        }
        if self.proxy.is_own_port(authority.port()) {
            return Err(Refusal::OwnPort(authority));
        }
        Ok(authority)
    }

    /// Checks the policy, then connects to the workload, as `client` where permitted.
    async fn connect(
        &self,
        authority: SocketAddr,
        client: std::net::IpAddr,
    ) -> Result<(SocketAddr, TcpStream, Tracked), Refusal> {
        // The TCP peer, not the `forwarded` header: a header is the client's claim.
        let conn = xds::policy::Connection {
            src: self.peer.0,
            dst: authority,
            peer: self.peer_id.clone(),
        };
        let tracked = authorization::admit(
            &self.proxy.live_inbound,
            &self.proxy.state,
            &self.workload,
            conn,
        )?;
        let (upstream, _) = delivery::connect(&self.proxy, &self.net, client, authority)
            .await
            .map_err(|source| Refusal::Upstream {
                addr: authority,
                source,
            })?;
        Ok((authority, upstream, tracked))
    }
}

/// The original client from `forwarded: for="ip:port"`, when the peer sent one.
fn client_addr(req: &Request<RecvStream>) -> Option<SocketAddr> {
    let value = req.headers().get(headers::FORWARDED)?.to_str().ok()?;
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}
