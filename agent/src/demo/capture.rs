//! The root demo: two simulated nodes (network namespaces), pod `client` on node-1 and pod
//! `echo` on node-2, each agent capturing its pod with real netfilter rules. The client
//! connects to the echo pod's IP as any application would; capture, HBONE and delivery with
//! the client's own source address happen underneath. Everything is removed at the end, also
//! on Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::topology::Topology;
use crate::app::{self, Agent};
use crate::events::Direction;

const ECHO_PORT: u16 = 8080;

fn mesh(topology: &Topology) -> String {
    let client = topology.node(1).pod("client");
    let echo = topology.node(2).pod("echo");
    format!(
        r#"workloads:
  - name: client
    namespace: demo
    serviceAccount: client
    addresses: [{client_ip}, {client_ip6}]
    node: node-1
    tunnelProtocol: HBONE
    netns: {client_ns}
  - name: echo
    namespace: demo
    serviceAccount: echo
    addresses: [{echo_ip}, {echo_ip6}]
    node: node-2
    tunnelProtocol: HBONE
    netns: {echo_ns}
"#,
        client_ip = client.ip,
        client_ip6 = client.ip6,
        echo_ip6 = echo.ip6,
        client_ns = client.ns.path().display(),
        echo_ip = echo.ip,
        echo_ns = echo.ns.path().display(),
    )
}

/// Builds the demo's two nodes. Register the Ctrl-C handler before: from then on Ctrl-C no
/// longer kills the process with namespaces in place.
pub fn topology() -> Result<Topology, super::topology::TopologyError> {
    Topology::build(&[&["client"], &["echo"]], false)
}

/// Runs the demo on `topology`; `interrupt` (SIGINT) ends it early, cleaning up.
pub async fn run(
    topology: Topology,
    mut interrupt: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ambientd-demo-")
        .tempdir()?;
    ca_client::LocalCa::init(&dir.path().join("ca")).context("creating the demo root CA")?;
    std::fs::write(dir.path().join("mesh.yaml"), mesh(&topology))?;
    println!(
        "ambientd demo (root): two simulated nodes as network namespaces, real capture rules, \
         one built-in root CA ({})",
        dir.path().display()
    );
    for node in &topology.nodes {
        for pod in &node.pods {
            println!(
                "  {} ({}) : pod {} {} {} in netns {}",
                node.name,
                node.ip,
                pod.name,
                pod.ip,
                pod.ip6,
                pod.ns.name()
            );
        }
    }
    // Ctrl-C is handled inside, so the agents still un-enroll before the namespaces go.
    let result = with_agents(dir.path(), &topology, &mut interrupt).await;
    drop(topology);
    drop(dir);
    println!("\ncleaned up: capture rules removed, agents stopped, namespaces and files deleted");
    result
}

async fn with_agents(
    dir: &Path,
    topology: &Topology,
    interrupt: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let mut agents: Vec<Agent> = Vec::new();
    let mut result = Ok(());
    for node in ["node-1", "node-2"] {
        let mut cfg = super::agent_config(dir, node);
        cfg.socks5 = None;
        match app::start(cfg).await {
            Ok(agent) => agents.push(agent),
            Err(e) => {
                result = Err(e.context(format!("starting the agent of {node}")));
                break;
            }
        }
    }
    if result.is_ok() {
        let exchange = exchange(&agents[0], &agents[1], topology);
        result = tokio::select! {
            r = exchange => r,
            _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
        };
    }
    for agent in agents {
        agent.unenroll_all().await;
        agent.shutdown(Duration::from_secs(1)).await;
    }
    result
}

async fn exchange(node_1: &Agent, node_2: &Agent, topology: &Topology) -> anyhow::Result<()> {
    let client = topology.node(1).pod("client");
    let echo = topology.node(2).pod("echo");
    let echo_addr = SocketAddr::new(echo.ip.into(), ECHO_PORT);
    let listener = echo
        .ns
        .listen(SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)))
        .context("starting the echo server in pod echo")?;
    let server = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await?;
        }
        s.shutdown().await?;
        anyhow::Ok(peer)
    });
    let mut out_events = node_1.events();
    let mut in_events = node_2.events();
    println!(
        "\nclient (pod {} in node-1) connects to echo's pod IP {echo_addr} like any application",
        client.ip
    );
    let started = Instant::now();
    let stream = client.ns.connect(echo_addr, Duration::from_secs(5)).await?;
    super::round_trip(stream).await?;
    let elapsed = started.elapsed();
    let seen = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .context("echo server did not finish")???;
    let out = super::next_record(&mut out_events, Direction::OutboundHbone).await?;
    let inb = super::next_record(&mut in_events, Direction::InboundHbone).await?;
    let id = |i: &Option<identity::Identity>| {
        i.as_ref()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "  path:    client {} → nat OUTPUT REDIRECT → node-1 agent :15001 (socket in client's netns) \
         → HBONE: mTLS 1.3 + h2 CONNECT {} → {}:15008 (node-2 agent's socket in echo's netns) → echo app",
        out.src, inb.dst, echo.ip
    );
    println!("  echo app saw the connection from {seen} (the client's own address)");
    println!("  node-1:  source identity   {}", id(&out.local_identity));
    println!("           verified server   {}", id(&out.peer_identity));
    println!("  node-2:  verified client   {}", id(&inb.peer_identity));
    println!("           presented as      {}", id(&inb.local_identity));
    println!(
        "  bytes:   {} sent, {} echoed back, intact",
        out.sent, out.received
    );
    println!(
        "  time:    {:.1} ms round trip (including the first TLS handshake)",
        elapsed.as_secs_f64() * 1000.0
    );
    Ok(())
}
