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
//! The source port is the agent's pick from `--delivery-ports`, by default
//! [`crate::config::DEFAULT_DELIVERY_PORTS`]: below the ephemeral range clients use (Linux's
//! default is 32768-60999). A port the kernel picked from that range could be one a client
//! of the same address uses at the same time for a direct connection to the same
//! destination: the two connections then share a 4-tuple in the pod (its conntrack entry, or
//! with TPROXY the agent's own socket), and one of them is reset or hangs. Clients on the same node draw from the same kernel's port sequence, so that is not
//! rare: in `tests/tests/upgrade.rs` about one in 7,000 connections from a pod out of the
//! mesh to one in it, with no change going on. Where clients' ranges were widened, the
//! delivery ports should be set apart from them; [`warn_if_ephemeral`] says so at start for
//! the agent's own namespace (the node's, for a DaemonSet on the host network).

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

/// Ports tried from the delivery ports before the kernel picks one.
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
        let port =
            (tries < PORT_TRIES).then(|| rand::random_range(proxy.cfg.delivery_ports.clone()));
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

/// Logs a warning when `ports` overlap the ephemeral port range of the agent's own network
/// namespace (`net.ipv4.ip_local_port_range`): clients there, and clients elsewhere tuned the
/// same way, may then meet a delivery on the same 4-tuple. Returns the overlap.
pub fn warn_if_ephemeral(ports: &RangeInclusive<u16>) -> Option<RangeInclusive<u16>> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).ok()?;
    let ephemeral = parse_local_port_range(&text)?;
    let overlap = overlap(ports, &ephemeral)?;
    let shown = |r: &RangeInclusive<u16>| format!("{}-{}", r.start(), r.end());
    tracing::warn!(
        delivery_ports = %shown(ports),
        ephemeral = %shown(&ephemeral),
        overlap = %shown(&overlap),
        "the delivery ports (--delivery-ports) overlap this namespace's ephemeral port range \
         ({PATH}); a delivery can then take the 4-tuple of a client's direct connection: \
         set them apart"
    );
    Some(overlap)
}

/// `ip_local_port_range`'s two numbers.
fn parse_local_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut numbers = text.split_whitespace().map(|n| n.parse::<u16>().ok());
    let (low, high) = (numbers.next()??, numbers.next()??);
    Some(low..=high)
}

fn overlap(a: &RangeInclusive<u16>, b: &RangeInclusive<u16>) -> Option<RangeInclusive<u16>> {
    let (low, high) = (*a.start().max(b.start()), *a.end().min(b.end()));
    (low <= high).then_some(low..=high)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_with_the_ephemeral_range_are_found() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some(32768..=60999)
        );
        assert_eq!(parse_local_port_range("32768"), None);
        let default = crate::config::DEFAULT_DELIVERY_PORTS;
        assert_eq!(overlap(&default, &(32768..=60999)), None);
        assert_eq!(overlap(&default, &(1024..=65535)), Some(default.clone()));
        assert_eq!(overlap(&default, &(30000..=40000)), Some(30000..=32767));
        assert_eq!(
            overlap(&(40000..=40009), &(40009..=60999)),
            Some(40009..=40009)
        );
    }
}
