//! Inbound plaintext (15006): a client outside the mesh connects to a local workload; capture
//! redirected it here. No peer identity: authorization sees an unauthenticated client, decided
//! before the upstream connect; a denied connection is reset, also when a later policy change
//! denies it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::net::TcpStream;
use xds::Workload;

use super::authorization::{self, Tracked};
use super::{PeerAddr, Proxy, copy, delivery};
use crate::events::{Addr, ConnectionRecord, Direction, Started};
use crate::netns::Net;

/// Serves one redirected connection to `workload`.
///
/// Two phases, one task, as for HBONE: the checks, the policy decision and the upstream
/// connect are boxed and gone once connected, then the [`Relay`] copies. A refused
/// connection is reset and recorded in the first phase.
pub fn handle(
    proxy: Arc<Proxy>,
    net: Net,
    workload: Arc<Workload>,
    client: TcpStream,
    peer: PeerAddr,
) -> impl Future<Output = ()> + Send {
    super::Phases::new(async move {
        let started = Started::now();
        let dst = super::orig_dst(&client).ok()?.0;
        let refused = |error: String| {
            copy::reset(&client);
            record(&proxy, peer.0, dst, &workload, started, Err(error));
            None
        };
        if proxy.is_own_port(dst.port()) {
            return refused(format!("destination {dst} is one of the agent's own ports"));
        }
        if !workload.addresses.contains(&dst.ip()) {
            return refused(format!(
                "destination {dst} is not an address of {}",
                workload.uid
            ));
        }
        let conn = xds::policy::Connection {
            src: peer.0,
            dst,
            peer: None,
        };
        let tracked = match authorization::admit(&proxy.live_inbound, &proxy.state, &workload, conn)
        {
            Ok(tracked) => tracked,
            Err(denied) => return refused(denied.to_string()),
        };
        let upstream = match delivery::connect(&proxy, &net, peer.0.ip(), dst).await {
            Ok((upstream, _)) => upstream,
            Err(e) => return refused(format!("connect to {dst}: {e}")),
        };
        Some(Relay {
            copy: copy::tcp(client, upstream),
            tracked,
            proxy,
            src: peer.0.into(),
            started,
        })
    })
}

/// A connection delivered to its workload, for its life: the copy (which owns both sockets),
/// the policy guard (which holds the destination and the workload for the record), and the
/// rest of what the record needs.
struct Relay {
    copy: copy::Tcp,
    tracked: Tracked,
    proxy: Arc<Proxy>,
    src: Addr,
    started: Started,
}

impl Future for Relay {
    type Output = ();

    /// Copies until both directions ended or policy revokes the connection, then records it.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let outcome = match ready!(this.tracked.poll_unless_revoked(&mut this.copy, cx)) {
            Ok(Ok(t)) => Ok((t.a_to_b, t.b_to_a)),
            // The copy has reset both sides.
            Ok(Err(e)) => Err(e.to_string()),
            Err(why) => {
                let (client, upstream) = this.copy.sockets();
                copy::reset(upstream);
                copy::reset(client);
                Err(format!("closed: now denied by authorization policy: {why}"))
            }
        };
        let dst = this.tracked.connection().dst;
        let workload = this.tracked.workload();
        record(
            &this.proxy,
            this.src.into(),
            dst,
            workload,
            this.started,
            outcome,
        );
        Poll::Ready(())
    }
}

/// Records one connection: bytes moved (sent, received), or why it failed.
fn record(
    proxy: &Proxy,
    src: SocketAddr,
    dst: SocketAddr,
    workload: &Workload,
    started: Started,
    outcome: Result<(u64, u64), String>,
) {
    let ((sent, received), error) = match outcome {
        Ok(moved) => (moved, None),
        Err(e) => ((0, 0), Some(e)),
    };
    proxy.events.record(ConnectionRecord {
        direction: Direction::InboundPlaintext,
        src,
        dst,
        local_identity: Some(workload.identity().clone()),
        peer_identity: None,
        sent,
        received,
        duration: started.elapsed(),
        error,
    });
}
