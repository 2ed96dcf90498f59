//! Outbound: a client in a local workload connects somewhere; the agent finds out where, and
//! carries the connection over HBONE when the destination accepts it, as plain TCP otherwise.
//!
//! Entered from the 15001 capture listener (destination from `SO_ORIGINAL_DST`) and from
//! SOCKS5 (destination named by the client). Connecting is separate from copying so SOCKS5 can
//! answer with the outcome before bytes flow.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use identity::Identity;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use xds::{Destination, Service, Workload};

use super::pool::{self, Checkout, Key};
use super::readahead::ReadAhead;
use super::{OrigDstAddr, PeerAddr, Proxy, copy, headers};
use crate::events::{Addr, ConnectionRecord, Direction, Started};
use crate::netns::Net;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("destination {0} is one of the agent's own ports")]
    OwnPort(SocketAddr),
    #[error("service {0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    #[error("workload {0} has no address of the destination's family")]
    NoAddress(String),
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("no certificate for {identity}: {source}")]
    Certificate {
        identity: Identity,
        source: ca_client::Error,
    },
    #[error("TLS configuration for {identity}: {source}")]
    TlsConfig {
        identity: Identity,
        source: tls::TlsError,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("{addr} answered {status} to CONNECT {authority}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("reading the client's first bytes: {0}")]
    ClientRead(io::Error),
    #[error("{what} with {addr} timed out")]
    Timeout {
        what: &'static str,
        addr: SocketAddr,
    },
}

impl Error {
    /// Whether the connection failed on its way into an HBONE tunnel (rather than before a
    /// destination was chosen, or on a plain TCP connect).
    fn tunnelled(&self) -> bool {
        matches!(
            self,
            Error::Certificate { .. }
                | Error::TlsConfig { .. }
                | Error::Tls { .. }
                | Error::H2 { .. }
                | Error::Status { .. }
                | Error::ClientRead(_)
                | Error::Timeout { .. }
        )
    }
}

/// Where the client's bytes go once connected.
pub enum Upstream {
    Hbone {
        send: SendStream<Bytes>,
        recv: RecvStream,
        /// Holds the stream's slot on the pooled connection (whose peer identity the record
        /// names).
        slot: Checkout,
        /// Bytes of the client's sent with the request ([`first_flight`]).
        early: u32,
    },
    Tcp(TcpStream),
}

/// Serves one captured connection from `source`.
///
/// Two phases, one task: opening (original destination, resolve, pool, TLS and HTTP/2
/// handshakes) is boxed and gone once the upstream is open, then the [`Session`] copies. The
/// task lives as long as the connection, so it holds only the session.
pub fn handle(
    proxy: Arc<Proxy>,
    net: Net,
    source: Arc<Workload>,
    client: TcpStream,
    peer: PeerAddr,
) -> impl Future<Output = ()> + Send {
    super::Phases::new(async move {
        let dst = match super::orig_dst(&client, peer) {
            Ok(dst) => dst,
            Err(e) => {
                tracing::warn!(src = %peer.0, error = %e, "cannot read the original destination");
                return None;
            }
        };
        let started = Started::now();
        let early = Some(&client);
        let opened = open(&proxy, &net, &source, Client { addr: peer, early }, dst).await;
        Some(Session::new(
            proxy, source, client, peer, dst, started, opened,
        ))
    })
}

/// A captured connection whose upstream was opened (or failed): what its copy and its record
/// need, owned in one place, as a future that copies until both directions ended and then
/// records the connection. Hand-written, like the copies it holds: it lives as long as the
/// connection, and this way it holds each part once, with no references between them.
pub struct Session {
    proxy: Arc<Proxy>,
    source: Arc<Workload>,
    /// The client, and the destination it asked for; compact, as is the start: the three
    /// take 46 bytes instead of 80, which keeps the task in tokio's 384-byte class.
    peer: Addr,
    dst: Addr,
    started: Started,
    link: Link,
}

/// A session's copy (which owns the client's socket), or why it has none.
enum Link {
    Hbone {
        copy: copy::Tunnel,
        /// Holds the stream's slot on the pooled connection (whose peer identity the record
        /// names).
        slot: Checkout,
        /// Bytes of the client's sent with the request ([`first_flight`]).
        early: u32,
    },
    Tcp(copy::Tcp),
    Failed {
        direction: Direction,
        error: String,
    },
    /// Recorded.
    Ended,
}

impl Session {
    /// Takes over a connection after [`open`]; a failed open resets the client at once (it
    /// must see a failure, not an orderly close).
    pub fn new(
        proxy: Arc<Proxy>,
        source: Arc<Workload>,
        client: TcpStream,
        peer: PeerAddr,
        dst: OrigDstAddr,
        started: Started,
        opened: Result<Upstream, Error>,
    ) -> Session {
        let link = match opened {
            Ok(Upstream::Hbone {
                send,
                recv,
                slot,
                early,
            }) => Link::Hbone {
                copy: copy::tunnel(client, send, recv),
                slot,
                early,
            },
            Ok(Upstream::Tcp(server)) => Link::Tcp(copy::tcp(client, server)),
            Err(e) => {
                copy::reset(&client);
                let direction = if e.tunnelled() {
                    Direction::OutboundHbone
                } else {
                    Direction::OutboundPassthrough
                };
                Link::Failed {
                    direction,
                    error: e.to_string(),
                }
            }
        };
        Session {
            proxy,
            source,
            peer: peer.0.into(),
            dst: dst.0.into(),
            started,
            link,
        }
    }
}

impl Future for Session {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let (direction, copied, peer_identity) = match &mut this.link {
            Link::Hbone { copy, slot, early } => {
                let copied = ready!(Pin::new(copy).poll(cx)).map(|mut t| {
                    t.a_to_b += u64::from(*early);
                    t
                });
                let peer = slot.conn().peer.clone();
                (
                    Direction::OutboundHbone,
                    copied.map_err(|e| e.to_string()),
                    peer,
                )
            }
            Link::Tcp(copy) => {
                let copied = ready!(Pin::new(copy).poll(cx)).map_err(|e| e.to_string());
                (Direction::OutboundPassthrough, copied, None)
            }
            Link::Failed { direction, error } => (*direction, Err(std::mem::take(error)), None),
            Link::Ended => return Poll::Ready(()),
        };
        // The sockets close, and the stream's slot on the pooled connection is given back,
        // before the record.
        this.link = Link::Ended;
        let (sent, received, error) = match copied {
            Ok(t) => (t.a_to_b, t.b_to_a, None),
            Err(e) => (0, 0, Some(e)),
        };
        this.proxy.events.record(ConnectionRecord {
            direction,
            src: this.peer.into(),
            dst: this.dst.into(),
            local_identity: Some(this.source.identity().clone()),
            peer_identity,
            sent,
            received,
            duration: this.started.elapsed(),
            error,
        });
        Poll::Ready(())
    }
}

/// The connection being opened for, as [`open`] sees it.
pub struct Client<'a> {
    pub addr: PeerAddr,
    /// Its socket, when what it already sent may go with the CONNECT request
    /// ([`first_flight`]); `None` (SOCKS5, whose client waits for the reply) copies all of it
    /// once the peer answered.
    pub early: Option<&'a TcpStream>,
}

/// Resolves `dst` for `source` and connects from `net`: HBONE to a mesh workload that accepts
/// it, plain TCP otherwise.
pub async fn open(
    proxy: &Proxy,
    net: &Net,
    source: &Workload,
    client: Client<'_>,
    dst: OrigDstAddr,
) -> Result<Upstream, Error> {
    let dst = dst.0;
    if proxy.is_own_port(dst.port()) {
        return Err(Error::OwnPort(dst));
    }
    let (workload, port, service) = match proxy.state.resolve(&source.network, dst) {
        Destination::Service {
            service,
            workload,
            target_port,
        } => (workload, target_port, Some(service)),
        Destination::Workload { workload, port } => (workload, port, None),
        Destination::NoHealthyEndpoint { service } => {
            return Err(Error::NoHealthyEndpoint(service.hostname.clone()));
        }
        Destination::Unknown => return tcp(proxy, net, dst).await,
    };
    let ip = workload
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == dst.is_ipv4())
        .or(workload.addresses.first())
        .copied()
        .ok_or_else(|| Error::NoAddress(workload.uid.clone()))?;
    let target = SocketAddr::new(ip, port);
    if proxy.is_own_port(port) {
        return Err(Error::OwnPort(target));
    }
    match workload.tunnel_protocol {
        xds::TunnelProtocol::Hbone => {
            hbone(
                proxy,
                net,
                source,
                client,
                &workload,
                target,
                service.as_deref(),
            )
            .await
        }
        xds::TunnelProtocol::None => tcp(proxy, net, target).await,
    }
}

async fn tcp(proxy: &Proxy, net: &Net, dst: SocketAddr) -> Result<Upstream, Error> {
    proxy
        .connect(net, None, dst)
        .await
        .map(Upstream::Tcp)
        .map_err(|source| Error::Connect { addr: dst, source })
}

async fn hbone(
    proxy: &Proxy,
    net: &Net,
    source: &Workload,
    client: Client<'_>,
    workload: &Workload,
    target: SocketAddr,
    service: Option<&Service>,
) -> Result<Upstream, Error> {
    let src_id = source.identity().clone();
    let mut expected = vec![workload.identity().clone()];
    if let Some(svc) = service {
        expected.extend(svc.subject_alt_names.iter().cloned());
    }
    let src_ip = source
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == target.is_ipv4())
        .copied();
    let key = Key::new(
        src_id.clone(),
        src_ip,
        expected,
        SocketAddr::new(target.ip(), proxy.cfg.ports.hbone),
    );
    let request = || {
        Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(
                headers::BAGGAGE,
                headers::baggage(source, &proxy.cfg.cluster_id),
            )
            .header(
                headers::FORWARDED,
                headers::unindexed(headers::forwarded(
                    client.addr.0,
                    service.map(|s| s.hostname.as_str()),
                )),
            )
            .header(
                headers::TRACEPARENT,
                headers::unindexed(headers::traceparent()),
            )
            .body(())
            .expect("CONNECT request with an IP authority is valid")
    };
    // Read once, right after the first request went out (the later, the likelier the client
    // has written), and sent again with a retried stream.
    let mut early: Option<Option<Bytes>> = None;
    // Two reasons to try again on another connection, at most [`ATTEMPTS`] times in all: a
    // pooled connection the peer closed since it was last used (the request cannot be sent),
    // and a peer that is draining (an upgrade: its GOAWAY without error says it did not
    // process the stream, RFC 9113 §6.8, so nothing reached the destination).
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt == ATTEMPTS;
        let (slot, reused) = proxy
            .pool
            .checkout(key.clone(), || connect(proxy, net, &key))
            .await?;
        let sent = match slot.sender().ready().await {
            Ok(mut sender) => sender.send_request(request(), false),
            Err(e) => Err(e),
        };
        let h2_error = |source| Error::H2 {
            addr: key.dst,
            source,
        };
        let (response, mut send) = match sent {
            Ok(pair) => pair,
            Err(e) if (reused || draining(&e)) && !last => {
                tracing::debug!(peer = %key.dst, error = %e, "stale pooled connection; retrying");
                slot.conn().retire();
                continue;
            }
            Err(source) => return Err(h2_error(source)),
        };
        let early = match (&early, client.early) {
            (Some(read), _) => read,
            (None, Some(socket)) => early.insert(first_flight(socket).map_err(Error::ClientRead)?),
            (None, None) => early.insert(None),
        };
        if let Some(bytes) = early {
            send.send_data(bytes.clone(), false)
                .map_err(|e| Error::ClientRead(copy::h2_io(e)))?;
        }
        let response = tokio::time::timeout(proxy.cfg.connect_timeout * 2, response)
            .await
            .map_err(|_| Error::Timeout {
                what: "CONNECT",
                addr: key.dst,
            })?;
        let response = match response {
            Ok(response) => response,
            Err(e) if draining(&e) && !last => {
                tracing::debug!(peer = %key.dst, error = %e, "peer draining; retrying the stream");
                slot.conn().retire();
                continue;
            }
            Err(source) => return Err(h2_error(source)),
        };
        if response.status() != StatusCode::OK {
            return Err(Error::Status {
                addr: key.dst,
                authority: target,
                status: response.status(),
            });
        }
        return Ok(Upstream::Hbone {
            send,
            recv: response.into_body(),
            slot,
            early: early.as_ref().map_or(0, |b| b.len() as u32),
        });
    }
}

/// Tries of a CONNECT, each on a connection other than the last one's.
const ATTEMPTS: u32 = 3;

/// The peer sent GOAWAY without an error and this stream was above its last one: it was not
/// processed, and may go again on another connection.
fn draining(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
}

/// Sends what the client has already written as DATA right behind the CONNECT request, so
/// the two leave in one TLS record instead of the bytes waiting for the peer's answer: a
/// client that speaks first (most do) saves a round trip between the agents per connection.
/// The peer passes them on only once it authorized the stream and connected (hbone.md §3.2:
/// DATA after the request headers carries the TCP bytes); if it refuses, they are dropped
/// with the stream, as bytes in the agent's socket buffer would be.
///
/// One non-blocking read of at most [`copy::MIN_BUF`] bytes, on the socket itself rather
/// than through tokio's readiness (which a just-accepted socket does not have yet); the copy
/// takes over from there. EOF is left for the copy, which reads it again.
fn first_flight(client: &TcpStream) -> io::Result<Option<Bytes>> {
    let mut buf = [0u8; copy::MIN_BUF];
    let read = (&*socket2::SockRef::from(client)).read(&mut buf);
    match read {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens a new HBONE connection for the pool: TCP, mutual TLS, HTTP/2.
async fn connect(proxy: &Proxy, net: &Net, key: &Key) -> Result<pool::Conn, Error> {
    proxy
        .certs
        .get(&key.src)
        .await
        .map_err(|source| Error::Certificate {
            identity: key.src.clone(),
            source,
        })?;
    let config = proxy
        .creds
        .client_config(&key.src, &key.expected)
        .map_err(|source| Error::TlsConfig {
            identity: key.src.clone(),
            source,
        })?;
    let addr = key.dst;
    let tcp = proxy
        .connect(net, key.src_ip, addr)
        .await
        .map_err(|source| Error::Connect { addr, source })?;
    let handshake = async {
        let tls = TlsConnector::from(config)
            .connect(tls::server_name(), ReadAhead::new(tcp))
            .await
            .map_err(|source| Error::Tls { addr, source })?;
        let peer = tls::peer_identity(tls.get_ref().1);
        pool::handshake(tls, &proxy.cfg.h2, peer)
            .await
            .map_err(|source| Error::H2 { addr, source })
    };
    tokio::time::timeout(proxy.cfg.handshake_timeout, handshake)
        .await
        .map_err(|_| Error::Timeout {
            what: "HBONE handshake",
            addr,
        })?
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};

    use super::*;

    /// A CONNECT stream's body as the peer receives it, with no answer ever sent: all of it
    /// must have come before the answer.
    async fn peer_bodies(io: tokio::io::DuplexStream, streams: usize) -> Vec<Vec<u8>> {
        let mut conn = h2::server::handshake(io).await.unwrap();
        let mut readers = Vec::new();
        for _ in 0..streams {
            let (req, unanswered) = conn.accept().await.unwrap().unwrap();
            readers.push(tokio::spawn(async move {
                let _unanswered = unanswered;
                let mut body = req.into_body();
                let mut got = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    got.extend_from_slice(&chunk);
                }
                got
            }));
        }
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut bodies = Vec::new();
        for reader in readers {
            bodies.push(reader.await.unwrap());
        }
        bodies
    }

    /// What the client wrote before its connection was opened goes out with the request,
    /// before any answer; with nothing written nothing is sent; EOF is left for the copy.
    #[tokio::test]
    async fn first_flight_sends_what_the_client_already_wrote_and_leaves_eof() {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let mut app = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let client = TcpStream::from_std(ours).unwrap();
        let (io, peer_io) = tokio::io::duplex(64 * 1024);
        let peer = tokio::spawn(peer_bodies(peer_io, 3));
        let (sender, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(conn);
        // Opens a stream, runs the first flight on it and ends the stream (which is held
        // open: dropping it would reset it).
        let mut open = Vec::new();
        let mut flight = async || {
            let request = http::Request::connect("198.18.1.3:8080").body(()).unwrap();
            let mut ready = sender.clone().ready().await.unwrap();
            let (response, mut send) = ready.send_request(request, false).unwrap();
            let early = first_flight(&client).unwrap();
            if let Some(bytes) = &early {
                send.send_data(bytes.clone(), false).unwrap();
            }
            send.send_data(Bytes::new(), true).unwrap();
            open.push((response, send));
            early.map_or(0, |b| b.len())
        };

        assert_eq!(flight().await, 0, "nothing written yet");
        app.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        client.readable().await.unwrap();
        assert_eq!(flight().await, 18);
        app.shutdown(Shutdown::Write).unwrap();
        client.readable().await.unwrap();
        assert_eq!(flight().await, 0, "EOF is not data");
        let mut buf = [0u8; 16];
        let mut sock = &*socket2::SockRef::from(&client);
        assert_eq!(sock.read(&mut buf).unwrap(), 0, "the copy still reads EOF");

        let bodies = tokio::time::timeout(std::time::Duration::from_secs(5), peer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            bodies,
            [Vec::new(), b"GET / HTTP/1.1\r\n\r\n".to_vec(), Vec::new()]
        );
    }
}
