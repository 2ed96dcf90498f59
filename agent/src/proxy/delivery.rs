//! Delivering an inbound connection (HBONE or plaintext) to a pod's application.
//!
//! In a pod's namespace the agent connects from inside it, with the original client's IP as
//! source (`IP_TRANSPARENT` bind), so the application sees who really called; the capture
//! rules' return path (mark 0x539 → connmark → table 100) brings the replies back to the
//! agent's socket. When the kernel does not permit that (no `CAP_NET_ADMIN`, or the client's
//! family differs from the destination's), the connection comes from the pod's own address
//! instead, and the log says so. Workloads in the agent's namespace (loopback mode) are
//! connected to as before, from an address the kernel picks.
//!
//! The source port is the agent's pick from [`SOURCE_PORTS`], below the ephemeral range
//! clients use (Linux's default is 32768-60999). A port the kernel picked from that range
//! could be one a client of the same address uses at the same time for a direct connection
//! to the same destination: the two connections then share a 4-tuple in the pod (its
//! conntrack entry, or with TPROXY the agent's own socket), and one of them is reset or
//! hangs. Clients on the same node draw from the same kernel's port sequence, so that is not
//! rare: in `tests/tests/upgrade.rs` about one in 7,000 connections from a pod out of the
//! mesh to one in it, with no change going on.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};

use super::Proxy;
use crate::netns::{Net, PodNet};

/// Which source address the application sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The original client's address.
    Original(IpAddr),
    /// The pod's own address (the original one was not permitted).
    Pod,
    /// Loopback mode: whatever the agent's namespace picks.
    Host,
}

/// Source ports of connections delivered from a client's address.
pub const SOURCE_PORTS: RangeInclusive<u16> = 1024..=32767;

/// Ports tried from [`SOURCE_PORTS`] before the kernel picks one.
const PORT_TRIES: usize = 8;

/// Connects to `dst` for a connection that originally came from `client`.
pub async fn connect(
    proxy: &Proxy,
    net: &Net,
    client: IpAddr,
    dst: SocketAddr,
) -> io::Result<(TcpStream, Source)> {
    let pod = match net {
        Net::Host => return Ok((proxy.connect(net, None, dst).await?, Source::Host)),
        Net::Pod(pod) => pod,
    };
    let mut tries = 0;
    loop {
        let port = (tries < PORT_TRIES).then(|| rand::random_range(SOURCE_PORTS));
        tries += 1;
        let Some((socket, source)) = socket(pod, client, dst, port)? else {
            continue;
        };
        match proxy.connect_socket(socket, dst).await {
            // The 4-tuple is taken (one of ours, maybe in TIME_WAIT): another port.
            Err(e)
                if port.is_some()
                    && source != Source::Pod
                    && e.kind() == io::ErrorKind::AddrNotAvailable =>
            {
                continue;
            }
            connected => return Ok((connected?, source)),
        }
    }
}

/// The socket to deliver from, in the pod, and the source it will show: bound to `port` of
/// the client's address, or the kernel picks it with `None`. `None` when `port` is in use.
pub fn socket(
    pod: &PodNet,
    client: IpAddr,
    dst: SocketAddr,
    port: Option<u16>,
) -> io::Result<Option<(TcpSocket, Source)>> {
    match transparent_socket(pod, client, dst, port) {
        Err(PortInUse) => Ok(None),
        Ok(socket) => {
            tracing::debug!(%client, %dst, netns = %pod.path().display(), "delivering from the original source");
            Ok(Some((socket, Source::Original(client))))
        }
        Err(Unpermitted(reason)) => {
            if pod.first_fallback() {
                tracing::warn!(%client, %dst, netns = %pod.path().display(), %reason, "cannot use the original source address; delivering from the pod's own address (logged once per pod)");
            } else {
                tracing::debug!(%client, %dst, %reason, "delivering from the pod's own address");
            }
            let socket = pod.socket(Domain::for_address(dst))?;
            Ok(Some((
                TcpSocket::from_std_stream(socket.into()),
                Source::Pod,
            )))
        }
    }
}

/// Why [`transparent_socket`] gave none.
enum NoSocket {
    /// The original source is not permitted; the pod's own address will do.
    Unpermitted(String),
    /// The port chosen is bound already (by a listener, or one of ours with no
    /// SO_REUSEADDR).
    PortInUse,
}
use NoSocket::{PortInUse, Unpermitted};

/// A marked socket in the pod bound to `client` with `IP_TRANSPARENT`, on `port` or on one
/// the kernel picks at connect.
fn transparent_socket(
    pod: &PodNet,
    client: IpAddr,
    dst: SocketAddr,
    port: Option<u16>,
) -> Result<TcpSocket, NoSocket> {
    if client.is_ipv4() != dst.is_ipv4() {
        return Err(Unpermitted(format!(
            "client {client} and destination {dst} are of different IP families"
        )));
    }
    let domain = Domain::for_address(dst);
    let socket = pod
        .socket(domain)
        .map_err(|e| Unpermitted(format!("creating a socket: {e}")))?;
    let transparent = if dst.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    };
    transparent.map_err(|e| Unpermitted(format!("IP_TRANSPARENT: {e}")))?;
    match port {
        // SO_REUSEADDR: the port is shared by connections to other destinations (and by
        // ours in TIME_WAIT), as the kernel's own pick would be; never with a listener.
        Some(port) => socket
            .set_reuse_address(true)
            .and_then(|()| socket.bind(&SocketAddr::new(client, port).into()))
            .map_err(|e| match e.kind() {
                io::ErrorKind::AddrInUse => PortInUse,
                _ => Unpermitted(format!("binding {client}:{port}: {e}")),
            })?,
        None => super::bind_source(&socket, client)
            .map_err(|e| Unpermitted(format!("binding {client}: {e}")))?,
    }
    Ok(TcpSocket::from_std_stream(socket.into()))
}
