//! Inbound plaintext (15006): a client outside the mesh connects to a local workload; capture
//! redirected it here. No peer identity: authorization sees an unauthenticated client, decided
//! before the upstream connect; a denied connection is reset, also when a later policy change
//! denies it.

use std::sync::Arc;

use tokio::net::TcpStream;
use xds::Workload;

use super::authorization;
use super::relay::{Relay, record};
use super::{PeerAddr, Proxy, copy, delivery};
use crate::events::{Direction, Started};
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
        let dst = super::orig_dst(&client, peer).ok()?.0;
        let refused = |error: String| {
            copy::reset(&client);
            let direction = Direction::InboundPlaintext;
            record(
                &proxy,
                direction,
                (peer.0, dst),
                &workload,
                None,
                started,
                Err(error),
            );
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
