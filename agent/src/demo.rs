//! `ambientd demo`: two agents, one root CA, a client in workload `client` reaching the echo
//! server of workload `echo` through the mesh — then a summary of what happened, and
//! everything cleaned up.
//!
//! As root it builds two simulated nodes as network namespaces ([`topology`]) with real
//! capture rules in the pods ([`capture`]); otherwise the agents serve loopback addresses and
//! the client enters through SOCKS5. Needs no set-up either way.

pub mod capture;
pub mod process;
pub mod topology;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::{self, Agent, Role};
use crate::config::{CaConfig, CaSource, Config, ProxyConfig};
use crate::events::{ConnectionRecord, Direction};
use crate::proxy::socks5;

/// The bundled example mesh: `client` on node-a (127.0.0.2), `echo` on node-b (127.0.0.3)
/// behind service `echo.demo.svc.cluster.local` (127.0.10.1:80 → 8080).
pub const EXAMPLE_MESH: &str = include_str!("../../examples/mesh.yaml");

const CLIENT_IP: &str = "127.0.0.2";
const ECHO_ADDR: &str = "127.0.0.3:8080";
const SERVICE_ADDR: &str = "127.0.10.1:80";

/// Configuration for one demo agent sharing the CA in `dir`.
pub fn agent_config(dir: &Path, node: &str) -> Config {
    Config {
        mode: Default::default(),
        mesh_file: dir.join("mesh.yaml"),
        mesh_poll: None,
        ca: CaConfig {
            source: CaSource::Dir(dir.join("ca")),
            cert_ttl: Duration::from_secs(3600),
        },
        socks5: Some("127.0.0.1:0".parse().expect("valid address")),
        proxy: ProxyConfig {
            node_name: node.into(),
            ..ProxyConfig::default()
        },
        capture: Default::default(),
        drain_deadline: Duration::from_secs(2),
        enrollment: Default::default(),
        readiness: None,
    }
}

/// The root demo when root, else the loopback one, saying why.
pub async fn run() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "not running as root: simulated nodes (network namespaces) and capture rules need \
             root, so this is the loopback demo — the client enters the mesh through SOCKS5"
        );
        return loopback().await;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    match capture::topology() {
        Ok(topology) => capture::run(topology, interrupt).await,
        Err(e) => {
            println!(
                "cannot build simulated nodes ({e}), so this is the loopback demo — the client \
                 enters the mesh through SOCKS5"
            );
            // SIGINT is ours now (see above), so Ctrl-C has to be handled here too.
            tokio::select! {
                r = loopback() => r,
                _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
            }
        }
    }
}

async fn loopback() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ambientd-demo-")
        .tempdir()?;
    std::fs::write(dir.path().join("mesh.yaml"), EXAMPLE_MESH)?;
    ca_client::LocalCa::init(&dir.path().join("ca")).context("creating the demo root CA")?;
    println!(
        "ambientd demo: two agents on loopback, one built-in root CA ({})",
        dir.path().display()
    );

    let node_a = app::start(agent_config(dir.path(), "node-a"))
        .await
        .context("starting the agent of node-a")?;
    let node_b = app::start(agent_config(dir.path(), "node-b"))
        .await
        .context("starting the agent of node-b")?;
    let result = exchange(&node_a, &node_b).await;
    let (a, b) = tokio::join!(
        node_a.shutdown(Duration::from_secs(2)),
        node_b.shutdown(Duration::from_secs(2))
    );
    tracing::debug!(?a, ?b, "demo agents stopped");
    drop(dir);
    result?;
    println!("\ncleaned up: agents stopped, temporary CA and mesh file removed");
    Ok(())
}

async fn exchange(node_a: &Agent, node_b: &Agent) -> anyhow::Result<()> {
    let echo = TcpListener::bind(ECHO_ADDR)
        .await
        .with_context(|| format!("binding the echo server on {ECHO_ADDR}"))?;
    let server = tokio::spawn(async move {
        let (mut s, _) = echo.accept().await?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await?;
        }
        s.shutdown().await?;
        anyhow::Ok(())
    });
    let mut out_events = node_a.events();
    let mut in_events = node_b.events();
    let socks = node_a
        .listener(Role::Socks5)
        .context("node-a has no SOCKS5 listener")?;
    let service: SocketAddr = SERVICE_ADDR.parse()?;
    let client_ip: IpAddr = CLIENT_IP.parse()?;

    println!(
        "\nclient (workload demo/client, {CLIENT_IP}) → service echo.demo.svc.cluster.local ({SERVICE_ADDR})"
    );
    let started = Instant::now();
    let stream = match socks5::connect(socks, client_ip, service).await? {
        Ok(s) => s,
        Err(reply) => bail!("node-a refused the connection: {reply:?}"),
    };
    round_trip(stream).await?;
    let elapsed = started.elapsed();
    server.await??;
    let out = next_record(&mut out_events, Direction::OutboundHbone).await?;
    let inb = next_record(&mut in_events, Direction::InboundHbone).await?;
    let id = |r: &ConnectionRecord, peer: bool| {
        let i = if peer {
            &r.peer_identity
        } else {
            &r.local_identity
        };
        i.as_ref()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "  path:    {} → node-a outbound (entered by SOCKS5) → HBONE: mTLS 1.3 + h2 CONNECT {} → node-b {}:15008 → echo app {}",
        inb.src,
        inb.dst,
        inb.dst.ip(),
        inb.dst
    );
    println!("  node-a:  source identity   {}", id(&out, false));
    println!("           verified server   {}", id(&out, true));
    println!("  node-b:  verified client   {}", id(&inb, true));
    println!("           presented as      {}", id(&inb, false));
    println!(
        "  bytes:   {} sent, {} echoed back, intact",
        out.sent, out.received
    );
    println!(
        "  time:    {:.1} ms round trip (including the first TLS handshake)",
        elapsed.as_secs_f64() * 1000.0
    );
    println!(
        "  pool:    {} HBONE connection(s) open on node-a",
        node_a.pool().connections()
    );
    Ok(())
}

/// The bytes the demo sends: enough for several TLS records and HTTP/2 frames.
const MESSAGE: &[u8] = b"hello through the mesh\n";
const REPEAT: usize = 1000;

/// Sends the demo message on `stream`, half-closes, and checks that the echo comes back
/// intact; bounded in time.
pub(crate) async fn round_trip(mut stream: tokio::net::TcpStream) -> anyhow::Result<()> {
    let message = MESSAGE.repeat(REPEAT);
    let exchange = async {
        stream.write_all(&message).await?;
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        anyhow::Ok(back)
    };
    let back = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("echo timed out")??;
    if back != message {
        bail!(
            "echo returned {} bytes that differ from the {} sent",
            back.len(),
            message.len()
        );
    }
    Ok(())
}

pub(crate) async fn next_record(
    rx: &mut tokio::sync::broadcast::Receiver<ConnectionRecord>,
    direction: Direction,
) -> anyhow::Result<ConnectionRecord> {
    let wait = async {
        loop {
            let rec = rx.recv().await?;
            if rec.direction == direction {
                return anyhow::Ok(rec);
            }
        }
    };
    let rec = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .with_context(|| format!("no {direction:?} connection record"))??;
    if let Some(e) = &rec.error {
        bail!("{direction:?} connection failed: {e}");
    }
    Ok(rec)
}
