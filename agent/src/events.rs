//! A record of every proxied connection when it ends, for logs, the demo and tests.
//!
//! Records go to the log (one line per connection) and to a broadcast channel that anyone may
//! subscribe to; with no subscriber, sending costs one atomic load.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use identity::Identity;
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client in a local workload, tunnelled over HBONE.
    OutboundHbone,
    /// Client in a local workload, destination outside the mesh or not HBONE-capable.
    OutboundPassthrough,
    /// HBONE from a peer agent to a local workload.
    InboundHbone,
    /// Plain TCP from outside the mesh to a local workload.
    InboundPlaintext,
}

#[derive(Debug, Clone)]
pub struct ConnectionRecord {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The local workload's identity (source for outbound, destination for inbound).
    pub local_identity: Option<Identity>,
    /// The peer's identity as verified by TLS (server for outbound, client for inbound).
    pub peer_identity: Option<Identity>,
    /// Bytes from the client towards the server.
    pub sent: u64,
    /// Bytes from the server back to the client.
    pub received: u64,
    pub duration: Duration,
    /// Why the connection failed, if it did.
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<ConnectionRecord>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.tx.subscribe()
    }

    pub fn record(&self, rec: ConnectionRecord) {
        let peer = rec.peer_identity.as_ref().map(|i| i.to_string());
        let local = rec.local_identity.as_ref().map(|i| i.to_string());
        match &rec.error {
            None => tracing::info!(
                direction = ?rec.direction, src = %rec.src, dst = %rec.dst,
                local_identity = local.as_deref().unwrap_or("-"),
                peer_identity = peer.as_deref().unwrap_or("-"),
                sent = rec.sent, received = rec.received,
                duration_ms = rec.duration.as_millis() as u64,
                "connection complete"
            ),
            Some(error) => tracing::warn!(
                direction = ?rec.direction, src = %rec.src, dst = %rec.dst,
                local_identity = local.as_deref().unwrap_or("-"),
                peer_identity = peer.as_deref().unwrap_or("-"),
                sent = rec.sent, received = rec.received,
                duration_ms = rec.duration.as_millis() as u64,
                error = %error,
                "connection failed"
            ),
        }
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(rec);
        }
    }
}

/// A socket address kept for a connection's record, in 19 bytes with no alignment
/// (`SocketAddr` is 32): a connection's task keeps two for its whole life. An IPv6 address's
/// flow label and scope id are not kept (the record prints neither; pod addresses have no
/// scope, only a link-local address named through SOCKS5 could).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    ip: IpAddr,
    port: [u8; 2],
}

impl From<SocketAddr> for Addr {
    fn from(addr: SocketAddr) -> Addr {
        Addr {
            ip: addr.ip(),
            port: addr.port().to_ne_bytes(),
        }
    }
}

impl From<Addr> for SocketAddr {
    fn from(addr: Addr) -> SocketAddr {
        SocketAddr::new(addr.ip, u16::from_ne_bytes(addr.port))
    }
}

/// When a connection started, in 8 bytes (`Instant` is 16): nanoseconds since this process
/// first asked.
#[derive(Debug, Clone, Copy)]
pub struct Started(u64);

impl Started {
    pub fn now() -> Started {
        Started(since_base().as_nanos() as u64)
    }

    pub fn elapsed(self) -> Duration {
        since_base().saturating_sub(Duration::from_nanos(self.0))
    }
}

fn since_base() -> Duration {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_keeps_ip_and_port_of_both_families_in_19_bytes() {
        for text in [
            "198.18.0.7:15008",
            "[2001:2::7]:8080",
            "0.0.0.0:0",
            "[::]:65535",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(SocketAddr::from(Addr::from(addr)), addr);
        }
        assert_eq!(std::mem::size_of::<Addr>(), 19);
        assert_eq!(std::mem::align_of::<Addr>(), 1);
    }

    #[tokio::test]
    async fn started_measures_time_since_it_was_taken() {
        let before = Started::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after = Started::now();
        assert!(before.elapsed() >= Duration::from_millis(20));
        assert!(before.elapsed() > after.elapsed());
    }
}
