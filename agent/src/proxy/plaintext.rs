//! Inbound plaintext (15006): a client outside the mesh connects to a local workload; capture
//! redirected it here. No peer identity: authorization sees an unauthenticated client.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use xds::Workload;

use super::{PeerAddr, Proxy, copy, delivery};
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
    let result = if proxy.is_own_port(dst.port()) {
        Err(format!("destination {dst} is one of the agent's own ports"))
    } else if !workload.addresses.contains(&dst.ip()) {
        Err(format!(
            "destination {dst} is not an address of {}",
            workload.uid
        ))
    } else {
        match delivery::connect(&proxy, &net, peer.0.ip(), dst).await {
            Ok((upstream, _)) => copy::tcp(&client, &upstream)
                .await
                .map(|t| (rec.sent, rec.received) = (t.a_to_b, t.b_to_a))
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("connect to {dst}: {e}")),
        }
    };
    if let Err(e) = result {
        copy::reset(&client);
        rec.error = Some(e);
    }
    rec.duration = started.elapsed();
    proxy.events.record(rec);
}
