//! A record of every proxied connection when it ends, for logs, the demo and tests.
//!
//! Records go to the log (one line per connection) and to a broadcast channel that anyone may
//! subscribe to; with no subscriber, sending costs one atomic load.

use std::net::SocketAddr;
use std::time::Duration;

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
