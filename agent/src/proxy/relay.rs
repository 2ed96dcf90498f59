//! An inbound connection delivered to its local workload, for its life: the copy, its policy
//! guard and what its record needs. HBONE streams and plaintext connections differ only in
//! their copy (a tunnel stream or a socket), which [`Delivered`] describes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use xds::Workload;
use xds::policy::Peer;

use super::Proxy;
use super::authorization::Tracked;
use super::copy::{self, Transferred};
use crate::events::{Addr, ConnectionRecord, Direction, Started};

/// The copy of an inbound connection, as its relay needs to know it.
pub(super) trait Delivered: Future<Output = io::Result<Transferred>> + Unpin {
    const DIRECTION: Direction;

    /// (sent, received): the client's bytes first.
    fn sent_received(moved: Transferred) -> (u64, u64);

    /// Ends the connection in a reset, when policy revokes it.
    fn reset(&self);
}

impl Delivered for copy::Tunnel {
    const DIRECTION: Direction = Direction::InboundHbone;

    /// The socket is the workload's: the tunnel's client sent what went into the socket.
    fn sent_received(moved: Transferred) -> (u64, u64) {
        (moved.b_to_a, moved.a_to_b)
    }

    /// The workload's socket; the stream is reset when its handles drop (the task ends
    /// right after).
    fn reset(&self) {
        copy::reset(self.sock());
    }
}

impl Delivered for copy::Tcp {
    const DIRECTION: Direction = Direction::InboundPlaintext;

    fn sent_received(moved: Transferred) -> (u64, u64) {
        (moved.a_to_b, moved.b_to_a)
    }

    fn reset(&self) {
        let (client, upstream) = self.sockets();
        copy::reset(upstream);
        copy::reset(client);
    }
}

/// A hand-written future: it lives as long as the connection. The copy owns the sockets (and
/// the stream's halves); the policy guard holds the destination, the workload and the peer
/// the record names, so they are not kept twice.
pub(super) struct Relay<C> {
    pub copy: C,
    pub tracked: Tracked,
    pub proxy: Arc<Proxy>,
    /// The client (for HBONE: from `forwarded`, else the peer).
    pub src: Addr,
    pub started: Started,
}

impl<C: Delivered> Future for Relay<C> {
    type Output = ();

    /// Copies until both directions ended or policy revokes the connection, then records it.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let outcome = match ready!(this.tracked.poll_unless_revoked(&mut this.copy, cx)) {
            Ok(Ok(moved)) => Ok(C::sent_received(moved)),
            // The copy has reset the other side.
            Ok(Err(e)) => Err(e.to_string()),
            Err(why) => {
                this.copy.reset();
                Err(format!("closed: now denied by authorization policy: {why}"))
            }
        };
        let conn = this.tracked.connection();
        let ends = (this.src.into(), conn.dst);
        let (workload, peer) = (this.tracked.workload(), conn.peer.as_deref());
        record(
            &this.proxy,
            C::DIRECTION,
            ends,
            workload,
            peer,
            this.started,
            outcome,
        );
        Poll::Ready(())
    }
}

/// Records one inbound connection from `ends.0` to `ends.1`: bytes moved (sent, received), or
/// why it failed.
pub(super) fn record(
    proxy: &Proxy,
    direction: Direction,
    ends: (SocketAddr, SocketAddr),
    workload: &Workload,
    peer: Option<&Peer>,
    started: Started,
    outcome: Result<(u64, u64), String>,
) {
    let ((sent, received), error) = match outcome {
        Ok(moved) => (moved, None),
        Err(e) => ((0, 0), Some(e)),
    };
    proxy.events.record(ConnectionRecord {
        direction,
        src: ends.0,
        dst: ends.1,
        local_identity: Some(workload.identity().clone()),
        peer_identity: peer.map(|p| p.identity().clone()),
        sent,
        received,
        duration: started.elapsed(),
        error,
    });
}
