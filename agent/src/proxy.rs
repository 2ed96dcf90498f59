//! The L4 proxy: per-workload listeners and every proxied connection.
//!
//! For each enrolled workload the agent opens, inside its pod's network namespace (or on the
//! workload's own address when it has none; see `app::pods`):
//! - 15001 outbound ([`outbound`]): captured client traffic → HBONE or plain passthrough;
//! - 15006 inbound plaintext ([`plaintext`]): clients outside the mesh → the workload;
//! - 15008 inbound HBONE ([`inbound`]): tunnels from peer agents → the workload.
//!
//! Every connection's sockets are created in the workload's [`Net`]; inbound connections reach
//! the application through [`delivery`].
//!
//! Inbound connections of both kinds are authorized and tracked by [`authorization`].
//!
//! An optional SOCKS5 listener ([`socks5`]) enters the same outbound path without capture.
//! Each server is a function of its listener and a drain [`Watch`](crate::drain::Watch).

pub mod authorization;
pub mod copy;
pub mod delivery;
pub mod headers;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod readahead;
pub mod socks5;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::ProxyConfig;
use crate::events::Events;
use crate::netns::Net;
use crate::tls::Credentials;

/// The destination the client asked for, before capture redirected it (`SO_ORIGINAL_DST`), or
/// the address it named through SOCKS5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// The address of the other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Everything the proxy's connections share. Cheap to clone behind an `Arc`.
pub struct Proxy {
    pub cfg: ProxyConfig,
    pub state: xds::Store,
    pub creds: Arc<Credentials>,
    pub certs: ca_client::Cache,
    pub pool: pool::Pool,
    pub events: Events,
    /// Live inbound connections, re-checked when policies change.
    pub live_inbound: Arc<authorization::Registry>,
}

impl Proxy {
    /// Ports the agent serves itself: traffic aimed at them is refused, never proxied (no
    /// loops, no nested tunnels).
    pub fn is_own_port(&self, port: u16) -> bool {
        let p = &self.cfg.ports;
        port == p.outbound || port == p.inbound_plaintext || port == p.hbone
    }

    /// Connects to `dst` from a socket in `net` with the configured timeout, from `src` when
    /// given.
    pub async fn connect(
        &self,
        net: &Net,
        src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = net.tcp_socket(dst.ip())?;
        if let Some(ip) = src {
            bind_source(&socket, ip)?;
        }
        self.connect_socket(socket, dst).await
    }

    /// Connects a prepared socket to `dst` with the configured timeout.
    pub async fn connect_socket(
        &self,
        socket: TcpSocket,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.cfg.connect_timeout, socket.connect(dst))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect to {dst} timed out after {:?}",
                        self.cfg.connect_timeout
                    ),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Binds an outgoing socket to the source address `ip`, leaving the port to `connect`.
///
/// With `IP_BIND_ADDRESS_NO_PORT` the kernel picks the port at connect time, unique only for
/// the whole 4-tuple, as for any client; a plain bind to port 0 would reserve a port for the
/// address alone, and every source address (a client pod's, for each connection delivered
/// from it) would run out of its ~28,000 ephemeral ports after as many connections in a
/// minute, while they wait in TIME_WAIT.
pub(crate) fn bind_source<S: std::os::fd::AsFd>(socket: &S, ip: IpAddr) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket2::SockRef::from(socket).bind(&SocketAddr::new(ip, 0).into())
}

/// Binds a listener with SO_REUSEADDR and SO_REUSEPORT, so a new agent can bind beside one
/// that is draining.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The original destination of a captured connection: `SO_ORIGINAL_DST` when NAT redirected
/// it, else the address it was accepted on.
pub fn orig_dst(stream: &TcpStream) -> io::Result<OrigDstAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match original.ok().and_then(|a| a.as_socket()) {
        Some(addr) => Ok(OrigDstAddr(addr)),
        None => Ok(OrigDstAddr(local)),
    }
}

/// Sends a PING every `interval`; returns when a PONG does not come back within `timeout`.
pub(crate) async fn keepalive(mut pings: h2::PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => {
                // The connection itself ended; its driver reports that.
                std::future::pending::<()>().await;
            }
            Err(_) => return,
        }
    }
}

/// Accepts connections until the drain starts; runs `handler`'s future for each on its own
/// task, which holds a drain watch until it ends and is abandoned when the drain deadline
/// passes.
/// Accepted sockets get `TCP_NODELAY`: the agent writes what it has as soon as it has it, so
/// small replies are not held back by Nagle's algorithm.
pub async fn serve<F, Fut>(listener: TcpListener, drain: crate::drain::Watch, handler: F)
where
    F: Fn(TcpStream, PeerAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            () = drain.draining() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(Guarded {
                    conn: handler(stream, PeerAddr(peer)),
                    closed: drain.clone().into_closed(),
                });
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = ?local, "listener closed for drain");
}

pin_project_lite::pin_project! {
    /// One connection's task: its handler's future, abandoned when the drain deadline passes
    /// (`closed`, which holds the connection's drain watch and so is dropped after `conn`).
    ///
    /// A plain struct rather than an `async` block with a `select!`: the task lives as long as
    /// the connection, and this way it holds the two futures and nothing else (the block also
    /// kept the accepted socket and address it had handed to the handler).
    struct Guarded<F, C> {
        #[pin]
        conn: F,
        #[pin]
        closed: C,
    }
}

impl<F: Future<Output = ()>, C: Future<Output = ()>> Future for Guarded<F, C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.conn.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.closed.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source port is left to `connect`, so it is not reserved at bind time; the
    /// connection still gets one and works.
    #[tokio::test]
    async fn a_source_bind_leaves_the_port_to_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let mut ports = Vec::new();
        for _ in 0..2 {
            let socket = TcpSocket::new_v4().unwrap();
            bind_source(&socket, IpAddr::from([127, 0, 0, 1])).unwrap();
            assert_eq!(
                socket.local_addr().unwrap().port(),
                0,
                "no port reserved at bind"
            );
            let stream = socket.connect(dst).await.unwrap();
            let (accepted, from) = listener.accept().await.unwrap();
            let local = stream.local_addr().unwrap();
            assert_eq!(local, from);
            assert_eq!(local.ip(), IpAddr::from([127, 0, 0, 1]));
            assert_ne!(local.port(), 0);
            ports.push(local.port());
            drop(accepted);
        }
        assert_ne!(ports[0], ports[1]);
    }
}
