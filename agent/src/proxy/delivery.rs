//! Delivering an inbound connection (HBONE or plaintext) to a pod's application.
//!
//! In a pod's namespace the agent connects from inside it, with the original client's IP as
//! source (`IP_TRANSPARENT` bind), so the application sees who really called; the capture
//! rules' return path (mark 0x539 → connmark → table 100) brings the replies back to the
//! agent's socket. When the kernel does not permit that (no `CAP_NET_ADMIN`, or the client's
//! family differs from the destination's), the connection comes from the pod's own address
//! instead, and the log says so. Workloads in the agent's namespace (loopback mode) are
//! connected to as before, from an address the kernel picks.

use std::io;
use std::net::{IpAddr, SocketAddr};

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
    let (socket, source) = socket(pod, client, dst)?;
    Ok((proxy.connect_socket(socket, dst).await?, source))
}

/// The socket to deliver from, in the pod, and the source it will show.
pub fn socket(pod: &PodNet, client: IpAddr, dst: SocketAddr) -> io::Result<(TcpSocket, Source)> {
    match transparent_socket(pod, client, dst) {
        Ok(socket) => {
            tracing::debug!(%client, %dst, netns = %pod.path().display(), "delivering from the original source");
            Ok((socket, Source::Original(client)))
        }
        Err(reason) => {
            if pod.first_fallback() {
                tracing::warn!(%client, %dst, netns = %pod.path().display(), %reason, "cannot use the original source address; delivering from the pod's own address (logged once per pod)");
            } else {
                tracing::debug!(%client, %dst, %reason, "delivering from the pod's own address");
            }
            let socket = pod.socket(Domain::for_address(dst))?;
            Ok((TcpSocket::from_std_stream(socket.into()), Source::Pod))
        }
    }
}

/// A marked socket in the pod bound to `client` with `IP_TRANSPARENT`.
fn transparent_socket(pod: &PodNet, client: IpAddr, dst: SocketAddr) -> Result<TcpSocket, String> {
    if client.is_ipv4() != dst.is_ipv4() {
        return Err(format!(
            "client {client} and destination {dst} are of different IP families"
        ));
    }
    let domain = Domain::for_address(dst);
    let socket = pod
        .socket(domain)
        .map_err(|e| format!("creating a socket: {e}"))?;
    let transparent = if dst.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    };
    transparent.map_err(|e| format!("IP_TRANSPARENT: {e}"))?;
    super::bind_source(&socket, client).map_err(|e| format!("binding {client}: {e}"))?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}
