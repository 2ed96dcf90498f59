//! Inbound plaintext (15006): a client outside the mesh connects to a local workload; capture
//! redirected it here. No peer identity: authorization sees an unauthenticated client, decided
//! before the upstream connect; a denied connection is reset, also when a later policy change
//! denies it.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use xds::Workload;

use super::{PeerAddr, Proxy, authorization, copy, delivery};
use crate::events::{ConnectionRecord, Direction};
use crate::netns::Net;

pub async fn handle(
    proxy: Arc<Proxy>,
    net: Net,
    workload: Arc<Workload>,
    client: TcpStream,
    peer: PeerAddr,
) {
    let started = Instant::now();
    let Ok(dst) = super::orig_dst(&client) else {
        return;
    };
    let dst = dst.0;
    let mut rec = ConnectionRecord {
        direction: Direction::InboundPlaintext,
        src: peer.0,
        dst,
        local_identity: Some(workload.identity().clone()),
        peer_identity: None,
        sent: 0,
        received: 0,
        duration: Default::default(),
        error: None,
    };
    let opened = if proxy.is_own_port(dst.port()) {
        Err(format!("destination {dst} is one of the agent's own ports"))
    } else if !workload.addresses.contains(&dst.ip()) {
        Err(format!(
            "destination {dst} is not an address of {}",
            workload.uid
        ))
    } else {
        let conn = xds::policy::Connection {
            src: peer.0,
            dst,
            peer: None,
        };
        match authorization::admit(&proxy.live_inbound, &proxy.state, &workload, conn) {
            Err(denied) => Err(denied.to_string()),
            Ok(tracked) => match delivery::connect(&proxy, &net, peer.0.ip(), dst).await {
                Ok((upstream, _)) => Ok((tracked, upstream)),
                Err(e) => Err(format!("connect to {dst}: {e}")),
            },
        }
    };
    rec.error = match opened {
        Err(e) => {
            copy::reset(&client);
            Some(e)
        }
        Ok((mut tracked, upstream)) => {
            let mut copy = copy::tcp(client, upstream);
            match tracked.unless_revoked(&mut copy).await {
                Ok(Ok(t)) => {
                    (rec.sent, rec.received) = (t.a_to_b, t.b_to_a);
                    None
                }
                // The copy has reset both sides.
                Ok(Err(e)) => Some(e.to_string()),
                Err(why) => {
                    let (client, upstream) = copy.sockets();
                    copy::reset(upstream);
                    copy::reset(client);
                    Some(format!("closed: now denied by authorization policy: {why}"))
                }
            }
        }
    };
    rec.duration = started.elapsed();
    proxy.events.record(rec);
}
