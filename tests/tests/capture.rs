//! Root only: transparent capture end to end on simulated nodes (network namespaces), with a
//! real `ambientd` process per node, for both backends × both inbound modes. Without root it
//! is skipped, unless `CI` is set, where it fails.
//!
//! One dual-stack topology per combination, shared by the steps of its test, each step done
//! over IPv4 and IPv6: node 1 runs pods a1 and a2, node 2 runs pod b1, and a host outside the
//! mesh (198.18.0.200, 2001:2::200) has no agent. Every pod and the outside host run an echo
//! application on port 8080 that records who connected. Steps: capture and tunnel with the
//! client's address and identity seen, two pods on one node, passthrough, inbound plaintext,
//! deliveries from the ports `--delivery-ports` gives, no re-capture, un-enrollment leaving
//! nothing behind, fail-closed while node 2's agent is stopped, service again once it is
//! restarted, no namespace left.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use agent::demo::topology::{OUTSIDE_IP, OUTSIDE_IP6, leftovers};
use anyhow::{Context, ensure};
use serde_json::Value;
use tests::netns::{App, Cluster, capture_state, echo, expect_failure, root_or_skip};

fn addr(ip: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(ip.into(), tests::netns::APP_PORT)
}

fn records_of<'a>(records: &'a [Value], direction: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["direction"] == direction)
        .collect()
}

fn src_ip(record: &Value) -> Option<IpAddr> {
    record["src"]
        .as_str()?
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip())
}

/// The addresses of one IP family.
struct Family {
    a1: IpAddr,
    a2: IpAddr,
    b1: IpAddr,
    outside: IpAddr,
}

async fn scenario(backend: &str, inbound: &str) -> anyhow::Result<()> {
    let mut cluster = Cluster::build(&[&["a1", "a2"], &["b1"]], backend, inbound)?;
    // Not the default range, to show the flag is what decides.
    cluster.add_args(["--delivery-ports", "20000-20999"]);
    cluster.start_agents().await?;
    // Ready agents drop their start-up pages (`residency`); all the traffic below runs after.
    for n in [1, 2] {
        cluster
            .agent_mut(n)
            .wait_for("ready", |a| !a.messages("agent ready").is_empty())
            .await?;
        let ready = &cluster.agent(n).messages("agent ready")[0];
        ensure!(
            ready["released_kib"].as_u64() > Some(0),
            "node {n}'s agent released no start-up pages: {ready}"
        );
    }
    let topo = &cluster.topology;
    let (a1, a2, b1) = (
        topo.node(1).pod("a1"),
        topo.node(1).pod("a2"),
        topo.node(2).pod("b1"),
    );
    let families = [
        Family {
            a1: a1.ip.into(),
            a2: a2.ip.into(),
            b1: b1.ip.into(),
            outside: OUTSIDE_IP.into(),
        },
        Family {
            a1: a1.ip6.into(),
            a2: a2.ip6.into(),
            b1: b1.ip6.into(),
            outside: OUTSIDE_IP6.into(),
        },
    ];
    let a2_ns_name = a2.ns.name().to_owned();
    let outside = cluster.outside();
    let b1_app = App::start(&b1.ns)?;
    let a2_app = App::start(&a2.ns)?;
    let out_app = App::start(outside)?;

    for f in &families {
        // A1 (node 1) → B1 (node 2): captured, tunnelled, delivered from A1's own address.
        echo(&a1.ns, addr(f.b1))
            .await
            .with_context(|| format!("a1 → b1 {}", f.b1))?;
        ensure!(
            b1_app.peers().last() == Some(&f.a1),
            "b1 saw {:?}",
            b1_app.peers()
        );
        // Two pods on one node: A1 → A2 goes through node 1's agent on both ends.
        echo(&a1.ns, addr(f.a2))
            .await
            .with_context(|| format!("a1 → a2 {}", f.a2))?;
        ensure!(
            a2_app.peers().last() == Some(&f.a1),
            "a2 saw {:?}",
            a2_app.peers()
        );
        // Outside the mesh: passthrough from A1's namespace, A1's address.
        echo(&a1.ns, addr(f.outside))
            .await
            .context("a1 → outside")?;
        ensure!(
            out_app.peers().last() == Some(&f.a1),
            "outside saw {:?}",
            out_app.peers()
        );
        // A client outside the mesh reaches B1 through inbound plaintext capture.
        echo(outside, addr(f.b1)).await.context("outside → b1")?;
        ensure!(
            b1_app.peers().last() == Some(&f.outside),
            "b1 saw {:?}",
            b1_app.peers()
        );
    }

    // Deliveries (tunnelled or plaintext) come from the ports the agents were given; a
    // passthrough keeps the port the client's kernel picked.
    let delivered = b1_app.peer_addrs().into_iter().chain(a2_app.peer_addrs());
    for peer in delivered {
        ensure!(
            (20000..=20999).contains(&peer.port()),
            "a delivery came from {peer}, outside --delivery-ports 20000-20999"
        );
    }
    for peer in out_app.peer_addrs() {
        ensure!(peer.port() >= 32768, "a passthrough came from {peer}");
    }

    // Records are written when connections end, just after the echo completes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let node1 = cluster.agent(1).records();
    let node2 = cluster.agent(2).records();
    let a1_id = "spiffe://cluster.local/ns/demo/sa/a1";
    for f in &families {
        ensure!(
            records_of(&node2, "InboundHbone")
                .iter()
                .any(|r| r["peer_identity"] == a1_id && src_ip(r) == Some(f.a1)),
            "node 2 should log an HBONE connection from {a1_id} at {}: {node2:?}",
            f.a1
        );
        ensure!(
            records_of(&node2, "InboundPlaintext")
                .iter()
                .any(|r| src_ip(r) == Some(f.outside)),
            "node 2 has no plaintext record from {}: {node2:?}",
            f.outside
        );
    }
    ensure!(
        records_of(&node2, "InboundHbone").len() == 2,
        "node 2 inbound tunnels: {node2:?}"
    );
    ensure!(
        records_of(&node1, "OutboundPassthrough").len() == 2,
        "node 1 should have passed one connection per family through: {node1:?}"
    );
    // No loop: exactly the tunnels the clients opened, nothing re-captured, no failure.
    ensure!(
        records_of(&node1, "OutboundHbone").len() == 4,
        "node 1 outbound tunnels: {node1:?}"
    );
    for r in node1.iter().chain(&node2) {
        ensure!(r["error"].is_null(), "a connection failed: {r}");
        let dst: SocketAddr = r["dst"].as_str().unwrap_or_default().parse()?;
        ensure!(
            ![15001, 15006, 15008].contains(&dst.port()),
            "agent traffic was re-captured: {r}"
        );
    }

    // Un-enroll A2: its rules and routes are gone, new connections go direct.
    cluster.unenroll(1, "a2").await?;
    let a2 = cluster.topology.node(1).pod("a2");
    let left = capture_state(&a2.ns)?;
    ensure!(left.is_empty(), "{a2_ns_name} still has: {left:#?}");
    let plaintext_before = records_of(&cluster.agent(1).records(), "InboundPlaintext").len();
    for f in &families {
        echo(cluster.outside(), addr(f.a2))
            .await
            .with_context(|| format!("outside → un-enrolled a2 {}", f.a2))?;
        ensure!(
            a2_app.peers().last() == Some(&f.outside),
            "a2 saw {:?}",
            a2_app.peers()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let node1 = cluster.agent(1).records();
    ensure!(
        records_of(&node1, "InboundPlaintext").len() == plaintext_before,
        "connection to un-enrolled a2 went through the agent: {node1:?}"
    );

    // Stopping node 2's agent: B1's rules stay, its traffic fails instead of bypassing.
    cluster.stop_agent(2).await?;
    let b1 = cluster.topology.node(2).pod("b1");
    ensure!(
        !capture_state(&b1.ns)?.is_empty(),
        "b1's rules were removed on SIGTERM"
    );
    let seen = b1_app.peers().len();
    for f in &families {
        let how = expect_failure(&cluster.topology.node(1).pod("a1").ns, addr(f.b1)).await?;
        eprintln!("a1 → b1 {} with node 2's agent stopped: {how}", f.b1);
        let how = expect_failure(cluster.outside(), addr(f.b1)).await?;
        eprintln!("outside → b1 {} with node 2's agent stopped: {how}", f.b1);
    }
    ensure!(
        b1_app.peers().len() == seen,
        "b1's application was reached without its agent: {:?}",
        b1_app.peers()
    );

    // A new agent applies the rules it finds in place again (idempotent) and serves B1.
    cluster.start_agent(2)?;
    cluster.wait_enrolled(2).await?;
    for f in &families {
        echo(&cluster.topology.node(1).pod("a1").ns, addr(f.b1))
            .await
            .with_context(|| format!("a1 → b1 {} after node 2's agent restarted", f.b1))?;
        ensure!(
            b1_app.peers().last() == Some(&f.a1),
            "b1 saw {:?}",
            b1_app.peers()
        );
    }
    drop((b1_app, a2_app, out_app));
    drop(cluster);
    let left = leftovers()?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_redirect_captures_tunnels_and_fails_closed() {
    if root_or_skip("iptables_redirect_captures_tunnels_and_fails_closed") {
        scenario("iptables", "redirect").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_tproxy_captures_tunnels_and_fails_closed() {
    if root_or_skip("iptables_tproxy_captures_tunnels_and_fails_closed") {
        scenario("iptables", "tproxy").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_redirect_captures_tunnels_and_fails_closed() {
    if root_or_skip("nftables_redirect_captures_tunnels_and_fails_closed") {
        scenario("nftables", "redirect").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_tproxy_captures_tunnels_and_fails_closed() {
    if root_or_skip("nftables_tproxy_captures_tunnels_and_fails_closed") {
        scenario("nftables", "tproxy").await.unwrap();
    }
}
