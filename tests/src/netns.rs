//! The netns end-to-end harness (root): simulated nodes and pods as network namespaces
//! (`agent::demo::topology`), one real `ambientd` process per node running inside its node's
//! namespace and capturing its pods, applications (echo servers, clients) inside the pods.
//!
//! Every guard cleans up on drop, also while a failing test unwinds: agent processes are
//! killed by their PID and reaped, namespaces deleted, files removed. Every wait is bounded.
//! The `ambientd` binary is the one cargo built next to the test binary (`target/<profile>/`),
//! or `AMBIENTD_BIN`; `cargo nextest run --workspace` builds it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::demo::process::{AgentProcess, Spec};
use agent::demo::topology::{Namespace, Topology};
use anyhow::{Context, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on every connect in these tests; a rule that drops shows up as this timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on waiting for an agent to start, stop or act on a change.
pub const AGENT_WAIT: Duration = Duration::from_secs(20);

/// Port every test application listens on.
pub const APP_PORT: u16 = 8080;

/// True when root; with `CI` set and not root, panics (root-only tests never skip in CI).
pub fn root_or_skip(test: &str) -> bool {
    if !redirect::testing::root_or_skip(test) {
        return false;
    }
    redirect::testing::sweep_stale().expect("removing stale test namespaces");
    true
}

/// The `ambientd` binary to run.
pub fn ambientd_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("AMBIENTD_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/ambientd
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ambientd"))
        .context("test binary has no target directory")?;
    ensure!(
        bin.exists(),
        "{} not built: run `cargo build -p agent --bin ambientd` (or the whole workspace's tests), or set AMBIENTD_BIN",
        bin.display()
    );
    Ok(bin)
}

/// One `ambientd run` process inside a node's namespace; killed on drop.
pub struct NodeAgent {
    pub node: String,
    process: AgentProcess,
    pub mesh: PathBuf,
}

impl NodeAgent {
    fn spawn(
        bin: &Path,
        node_ns: &Namespace,
        node: &str,
        mesh: PathBuf,
        ca_dir: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<NodeAgent> {
        let process = AgentProcess::spawn(
            node_ns,
            Spec {
                bin,
                node,
                mesh: &mesh,
                ca_dir,
                args,
                log,
            },
        )?;
        Ok(NodeAgent {
            node: node.to_owned(),
            process,
            mesh,
        })
    }

    /// Every JSON log line so far.
    pub fn log(&self) -> Vec<Value> {
        self.process.log()
    }

    /// The raw log, for failure messages.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Log lines whose message is `message`, as their `fields`.
    pub fn messages(&self, message: &str) -> Vec<Value> {
        self.process.messages(message)
    }

    /// Connection records (complete or failed).
    pub fn records(&self) -> Vec<Value> {
        let mut all = self.messages("connection complete");
        all.extend(self.messages("connection failed"));
        all
    }

    /// Waits until `check` holds on the log, or the process exits, or [`AGENT_WAIT`] passes.
    pub async fn wait_for(
        &mut self,
        what: &str,
        check: impl Fn(&NodeAgent) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + AGENT_WAIT;
        loop {
            if check(self) {
                return Ok(());
            }
            if let Some(status) = self.process.exited()? {
                bail!(
                    "agent of {} exited ({status}) before {what}:\n{}",
                    self.node,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent of {} not {what} after {AGENT_WAIT:?}:\n{}",
                    self.node,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        self.process
            .signal(signal)
            .with_context(|| format!("sending {signal} to the agent of {}", self.node))
    }

    /// SIGHUP: the agent re-reads its mesh file.
    pub fn reload(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGHUP)
    }

    /// SIGTERM, then waits (bounded) for the process to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + AGENT_WAIT;
        while self.process.exited()?.is_none() {
            if Instant::now() > deadline {
                bail!("agent of {} did not stop on SIGTERM", self.node);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

/// A topology with one agent per node, all pods enrolled.
pub struct Cluster {
    // Agents stop before their namespaces are deleted.
    pub agents: Vec<Option<NodeAgent>>,
    pub topology: Topology,
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    /// `--capture-backend B --inbound-mode M` and any further flags of every agent.
    args: Vec<String>,
    started: usize,
}

impl Cluster {
    /// Builds `nodes` (pod names per node) plus a host outside the mesh, and starts an agent
    /// per node with the given capture flags; returns once every pod is enrolled.
    pub async fn start(nodes: &[&[&str]], backend: &str, inbound: &str) -> anyhow::Result<Self> {
        let mut cluster = Cluster::build(nodes, backend, inbound)?;
        cluster.start_agents().await?;
        Ok(cluster)
    }

    /// Starts every node's agent; returns once every pod is enrolled.
    pub async fn start_agents(&mut self) -> anyhow::Result<()> {
        for n in 1..=self.topology.nodes.len() {
            self.start_agent(n)?;
        }
        for n in 1..=self.topology.nodes.len() {
            self.wait_enrolled(n).await?;
        }
        Ok(())
    }

    /// The topology, its mesh files and the CA, with no agent started yet.
    pub fn build(nodes: &[&[&str]], backend: &str, inbound: &str) -> anyhow::Result<Self> {
        let bin = ambientd_bin()?;
        let topology = Topology::build(nodes, true)?;
        let dir = tempfile::Builder::new()
            .prefix("ambientd-netns-test-")
            .tempdir()?;
        let ca = dir.path().join("ca");
        ca_client::LocalCa::init(&ca)?;
        let mut cluster = Cluster {
            agents: Vec::new(),
            topology,
            dir,
            bin,
            args: vec![
                "--capture-backend".into(),
                backend.into(),
                "--inbound-mode".into(),
                inbound.into(),
            ],
            started: 0,
        };
        for node in &cluster.topology.nodes {
            let mesh = cluster.dir.path().join(format!("mesh-{}.yaml", node.name));
            std::fs::write(&mesh, cluster.mesh_yaml(&[]))?;
            cluster.agents.push(None);
        }
        Ok(cluster)
    }

    /// Adds flags to every agent started from now on.
    pub fn add_args<S: Into<String>>(&mut self, args: impl IntoIterator<Item = S>) {
        self.args.extend(args.into_iter().map(Into::into));
    }

    /// Starts node `n`'s agent (again) on its mesh file.
    pub fn start_agent(&mut self, n: usize) -> anyhow::Result<()> {
        ensure!(self.agents[n - 1].is_none(), "node {n}'s agent is running");
        let node = self.topology.node(n);
        self.started += 1;
        let agent = NodeAgent::spawn(
            &self.bin,
            &node.ns,
            &node.name,
            self.dir.path().join(format!("mesh-{}.yaml", node.name)),
            &self.dir.path().join("ca"),
            &self.args,
            self.dir
                .path()
                .join(format!("{}-{}.log", node.name, self.started)),
        )?;
        self.agents[n - 1] = Some(agent);
        Ok(())
    }

    /// Waits until node `n`'s agent enrolled every pod of its node.
    pub async fn wait_enrolled(&mut self, n: usize) -> anyhow::Result<()> {
        let pods = self.topology.node(n).pods.len();
        let agent = self.agents[n - 1].as_mut().context("agent is running")?;
        agent
            .wait_for("enrolled all its pods", |a| {
                a.messages("pod enrolled").len() == pods
            })
            .await
    }

    /// The mesh: every pod an HBONE workload `demo/<pod>` with service account `<pod>` on its
    /// node, in its namespace; pods in `elsewhere` are placed on a node no agent serves.
    pub fn mesh_yaml(&self, elsewhere: &[&str]) -> String {
        let mut yaml = String::from("workloads:\n");
        for node in &self.topology.nodes {
            for pod in &node.pods {
                let on = if elsewhere.contains(&pod.name.as_str()) {
                    "node-elsewhere"
                } else {
                    &node.name
                };
                yaml.push_str(&pod.workload_yaml(on, "HBONE"));
            }
        }
        yaml
    }

    /// The agent of node `n` (1-based), to wait on its log.
    pub fn agent_mut(&mut self, n: usize) -> &mut NodeAgent {
        self.agents[n - 1].as_mut().expect("agent is running")
    }

    /// The agent of node `n` (1-based).
    pub fn agent(&self, n: usize) -> &NodeAgent {
        self.agents[n - 1].as_ref().expect("agent is running")
    }

    /// Stops node `n`'s agent with SIGTERM.
    pub async fn stop_agent(&mut self, n: usize) -> anyhow::Result<()> {
        let agent = self.agents[n - 1].take().context("agent already stopped")?;
        agent.stop().await
    }

    /// Moves `pod` of node `n` off the node in that agent's mesh file and reloads it; returns
    /// once the agent logged the un-enrollment.
    pub async fn unenroll(&mut self, n: usize, pod: &str) -> anyhow::Result<()> {
        let yaml = self.mesh_yaml(&[pod]);
        let agent = self.agents[n - 1].as_mut().context("agent is running")?;
        std::fs::write(&agent.mesh, yaml)?;
        agent.reload()?;
        let uid = format!("demo/{pod}");
        agent
            .wait_for("un-enrolled the pod", |a| {
                a.messages("pod unenrolled")
                    .iter()
                    .any(|f| f["pod"] == uid.as_str())
            })
            .await
    }

    pub fn outside(&self) -> &Namespace {
        self.topology
            .outside
            .as_ref()
            .expect("built with a host outside")
    }
}

/// An echo application in a namespace that remembers who connected; stops on drop.
pub struct App {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub fn start(ns: &Namespace) -> anyhow::Result<App> {
        // Dual-stack: IPv4 peers show as mapped addresses, canonicalized in `peers`.
        let listener = ns.listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), APP_PORT))?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                seen.lock().expect("peers lock").push(peer);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        Ok(App { peers, task })
    }

    /// The source IPs of every connection accepted so far.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.peer_addrs().iter().map(SocketAddr::ip).collect()
    }

    /// The source addresses (IP and port) of every connection accepted so far.
    pub fn peer_addrs(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .expect("peers lock")
            .iter()
            .map(|p| SocketAddr::new(p.ip().to_canonical(), p.port()))
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects from `ns` to `dst` as an application would, sends a pattern and checks it comes
/// back intact.
pub async fn echo(ns: &Namespace, dst: SocketAddr) -> anyhow::Result<()> {
    let data = crate::pattern(64 * 1024, u64::from(dst.port()) + 7);
    let stream = ns
        .connect(dst, CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("connecting from {} to {dst}", ns.name()))?;
    let back = tokio::time::timeout(
        Duration::from_secs(10),
        crate::send_and_receive(stream, &data),
    )
    .await
    .with_context(|| format!("echo from {dst} timed out"))??;
    ensure!(
        back == data,
        "{dst} echoed {} bytes, not the {} sent",
        back.len(),
        data.len()
    );
    Ok(())
}

/// Connects from `ns` to `dst` and expects no echo: refused, reset, closed or timed out.
pub async fn expect_failure(ns: &Namespace, dst: SocketAddr) -> anyhow::Result<String> {
    let mut stream = match ns.connect(dst, CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => return Ok(format!("connect failed: {e}")),
    };
    let attempt = async {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        let n = stream.read(&mut buf).await?;
        std::io::Result::Ok(buf[..n].to_vec())
    };
    match tokio::time::timeout(Duration::from_secs(8), attempt).await {
        Err(_) => Ok("no answer".into()),
        Ok(Err(e)) => Ok(format!("failed: {e}")),
        Ok(Ok(back)) if back.is_empty() => Ok("closed without data".into()),
        Ok(Ok(back)) => bail!(
            "connection to {dst} from {} was answered ({back:?}): it bypassed the mesh",
            ns.name()
        ),
    }
}

/// Runs a listing tool inside `ns` (`iptables-save`, `nft list ruleset`, `ip rule`).
pub fn list(ns: &Namespace, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .output()
        .with_context(|| format!("running {program} in {}", ns.name()))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} in {} failed: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What of ours is installed in `ns`: chains, tables, policy rules, table-100 routes.
pub fn capture_state(ns: &Namespace) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for (program, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
        ("ip", &["-4", "rule", "show"][..]),
        ("ip", &["-6", "rule", "show"][..]),
        ("ip", &["-4", "route", "show", "table", "all"][..]),
        ("ip", &["-6", "route", "show", "table", "all"][..]),
    ] {
        for line in list(ns, program, args)?.lines() {
            let l = line.to_ascii_lowercase();
            if l.contains("ambientd") || l.contains("lookup 100") || l.contains("table 100") {
                found.push(format!("{program}: {line}"));
            }
        }
    }
    Ok(found)
}
