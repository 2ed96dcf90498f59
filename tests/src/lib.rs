//! Support for the cross-crate tests: two agents on loopback addresses sharing one root CA,
//! echo servers, and byte checks.
//!
//! Every fixture picks its own random `127.X.Y.0/24`, so tests running in parallel (threads or
//! processes) never fight over the agents' fixed ports; everything lives in a temporary
//! directory and stops when the fixture drops.

pub mod kube_api;
pub mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::app::{self, Agent, Role};
use agent::config::{CaConfig, CaSource, Config, ProxyConfig};
use agent::events::{ConnectionRecord, Direction};
use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bounds every wait in these tests: a silent drop must fail the test, not hang it.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Addresses of one fixture, all inside its own `127.X.Y.0/24`.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    pub x: u8,
    pub y: u8,
}

impl Net {
    pub fn random() -> Self {
        // 127.0.0.0/16 is left to the demo and other programs.
        Net {
            x: rand::random_range(1..=254),
            y: rand::random_range(1..=254),
        }
    }

    pub fn ip(&self, last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.x, self.y, last))
    }

    /// Workload `client` (node-a).
    pub fn client(&self) -> IpAddr {
        self.ip(2)
    }

    /// Workload `echo` (node-b); its application listens on port 8080.
    pub fn echo(&self) -> IpAddr {
        self.ip(3)
    }

    /// Service `echo.demo.svc.cluster.local`, port 80 → 8080.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.ip(100), 80)
    }

    /// A host outside the mesh.
    pub fn outside(&self) -> IpAddr {
        self.ip(50)
    }
}

/// The mesh both agents share unless a test gives one agent its own view.
pub fn mesh_yaml(net: &Net) -> String {
    mesh_yaml_with(net, "cluster.local", "client", "echo")
}

/// The same mesh with the client's trust domain and both service accounts chosen.
pub fn mesh_yaml_with(net: &Net, client_td: &str, client_sa: &str, echo_sa: &str) -> String {
    format!(
        r#"
services:
  - name: echo
    namespace: demo
    hostname: echo.demo.svc.cluster.local
    addresses: [{vip}]
    ports: [{{servicePort: 80, targetPort: 8080}}]
workloads:
  - name: client
    namespace: demo
    serviceAccount: {client_sa}
    trustDomain: {client_td}
    addresses: [{client}]
    node: node-a
    tunnelProtocol: HBONE
  - name: echo
    namespace: demo
    serviceAccount: {echo_sa}
    addresses: [{echo}]
    node: node-b
    tunnelProtocol: HBONE
    services:
      demo/echo.demo.svc.cluster.local:
        ports: [{{servicePort: 80, targetPort: 8080}}]
"#,
        vip = net.vip().ip(),
        client = net.client(),
        echo = net.echo(),
    )
}

/// Configuration of one agent of a fixture.
pub fn config(mesh: &Path, ca_dir: &Path, node: &str) -> Config {
    Config {
        mode: Default::default(),
        mesh_file: mesh.to_owned(),
        // Fast, so tests that edit a mesh file wait little.
        mesh_poll: Some(Duration::from_millis(100)),
        ca: CaConfig {
            source: CaSource::Dir(ca_dir.to_owned()),
            cert_ttl: Duration::from_secs(3600),
        },
        socks5: Some("127.0.0.1:0".parse().expect("valid address")),
        proxy: ProxyConfig {
            node_name: node.into(),
            connect_timeout: Duration::from_secs(2),
            ..ProxyConfig::default()
        },
        capture: Default::default(),
        drain_deadline: Duration::from_secs(2),
        enrollment: Default::default(),
        readiness: None,
    }
}

/// How the two agents of a fixture see the mesh and the CA.
pub struct Setup {
    /// Mesh file of node-a (the client's agent).
    pub mesh_a: String,
    /// Mesh file of node-b (the echo's agent).
    pub mesh_b: String,
    /// Give node-b a root of its own instead of sharing node-a's.
    pub separate_roots: bool,
}

/// Two agents: node-a serves workload `client`, node-b serves workload `echo`.
pub struct TwoNodes {
    pub net: Net,
    pub a: Agent,
    pub b: Agent,
    pub dir: tempfile::TempDir,
}

impl TwoNodes {
    /// Both agents with the same mesh file and one root.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|net| Setup {
            mesh_a: mesh_yaml(net),
            mesh_b: mesh_yaml(net),
            separate_roots: false,
        })
        .await
    }

    pub async fn start_with(setup: impl Fn(&Net) -> Setup) -> anyhow::Result<Self> {
        Self::start_tuned(setup, |_| {}).await
    }

    /// Like [`TwoNodes::start_with`], with `tune` applied to both agents' configurations.
    pub async fn start_tuned(
        setup: impl Fn(&Net) -> Setup,
        tune: impl Fn(&mut Config),
    ) -> anyhow::Result<Self> {
        let mut last = None;
        // A random subnet can collide with a concurrently running test: try another.
        for _ in 0..5 {
            let net = Net::random();
            match Self::try_start(net, setup(&net), &tune).await {
                Ok(nodes) => return Ok(nodes),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn try_start(net: Net, setup: Setup, tune: &dyn Fn(&mut Config)) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ambientd-test-")
            .tempdir()?;
        let ca_a = dir.path().join("ca");
        let ca_b = if setup.separate_roots {
            dir.path().join("ca-b")
        } else {
            ca_a.clone()
        };
        ca_client::LocalCa::init(&ca_a)?;
        let mesh_a = dir.path().join("mesh-a.yaml");
        let mesh_b = dir.path().join("mesh-b.yaml");
        std::fs::write(&mesh_a, setup.mesh_a)?;
        std::fs::write(&mesh_b, setup.mesh_b)?;
        let (mut cfg_a, mut cfg_b) = (
            config(&mesh_a, &ca_a, "node-a"),
            config(&mesh_b, &ca_b, "node-b"),
        );
        tune(&mut cfg_a);
        tune(&mut cfg_b);
        let a = app::start(cfg_a).await?;
        let b = app::start(cfg_b).await?;
        Ok(TwoNodes { net, a, b, dir })
    }

    pub fn socks(&self) -> SocketAddr {
        self.a
            .listener(Role::Socks5)
            .expect("node-a has a SOCKS5 listener")
    }

    /// Connects as workload `client` through node-a's SOCKS5 listener.
    pub async fn connect(&self, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        let res = tokio::time::timeout(
            TIMEOUT,
            agent::proxy::socks5::connect(self.socks(), self.net.client(), dst),
        )
        .await
        .context("SOCKS5 connect timed out")??;
        res.map_err(|reply| anyhow::anyhow!("node-a refused the connection: {reply:?}"))
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub async fn stop(self) {
        let (_a, _b) = tokio::join!(
            self.a.shutdown(Duration::from_secs(1)),
            self.b.shutdown(Duration::from_secs(1))
        );
    }
}

/// An echo server: every accepted connection gets its bytes back, and a FIN when the client
/// half-closes. Stops when dropped.
pub struct Echo {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding echo server on {addr}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        Ok(Echo { addr, task })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a corrupted byte cannot hide.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Writes `data` then half-closes, while reading everything the other side sends until its
/// FIN; returns what was read.
pub async fn send_and_receive(stream: TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut r, mut w) = stream.into_split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let read = async {
        let mut back = Vec::with_capacity(data.len());
        r.read_to_end(&mut back).await?;
        anyhow::Ok(back)
    };
    let (w, back) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(write, read)
    })
    .await
    .context("transfer timed out")?;
    w?;
    back
}

/// The next record of `direction`, waiting at most [`TIMEOUT`].
pub async fn record(
    rx: &mut tokio::sync::broadcast::Receiver<ConnectionRecord>,
    direction: Direction,
) -> anyhow::Result<ConnectionRecord> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let rec = rx.recv().await?;
            if rec.direction == direction {
                return anyhow::Ok(rec);
            }
        }
    })
    .await
    .with_context(|| format!("no {direction:?} record"))?
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
