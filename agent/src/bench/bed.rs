//! The bench's test bed: the two simulated nodes of the netns harness (198.18.0.0/15 only),
//! with one client pod on node-1 and one server pod on node-2 per mode, so the modes never
//! share a pod, a capture rule or an agent:
//!
//! - `direct`: the pods are not in the mesh; no agent, no rules.
//! - `mesh`: both pods are HBONE workloads; one `ambientd run` process per node captures its
//!   pod, and the connection is tunnelled between them.
//! - `tcp`: both pods are workloads with `tunnelProtocol: NONE`; the agents capture as in
//!   `mesh`, node-1 passes the connection through as plain TCP and node-2's inbound
//!   plaintext listener delivers it.
//!
//! Every mode runs its own pair of agents, so each agent's CPU and memory belong to one mode.
//! Every pod namespace gets `tcp_tw_reuse` and a wide ephemeral port range (namespaced
//! sysctls, the same for every mode) so connection-rate samples do not run out of ports.
//! Dropping the bed kills the agents, stops the servers, deletes the namespaces and files.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::Mode;
use super::load::{self, Interrupt, Server};
use super::usage::{Cpu, Process, Usage};
use crate::demo::process::{AgentProcess, Spec};
use crate::demo::topology::{Pod, Topology};

/// Bound on an agent's start (certificates, rules, listeners).
const AGENT_START: Duration = Duration::from_secs(20);

/// One mode's pods, server and agents.
pub struct Lane {
    pub mode: Mode,
    /// node-1's then node-2's; none in `direct`.
    pub agents: Vec<AgentProcess>,
    pub server: Server,
    /// Index of the lane's pods in their nodes.
    pod: usize,
    /// The agents' mesh file; none in `direct`.
    mesh: Option<PathBuf>,
    /// Agent pairs started so far (names their logs).
    started: usize,
}

pub struct Bed {
    // Agents and servers go before the namespaces they live in.
    pub lanes: Vec<Lane>,
    topology: Topology,
    dir: tempfile::TempDir,
    agent_args: Vec<String>,
    agent_bin: PathBuf,
}

fn pod_name(mode: Mode, side: &str) -> String {
    format!("{}-{side}", mode.label())
}

impl Bed {
    /// Builds the nodes and pods for `modes`, starts their servers and agents (with
    /// `agent_args` added to `ambientd run`, from `agent_bin` or else this binary), and checks
    /// one connection of each mode takes the path its mode says.
    pub fn build(
        modes: &[Mode],
        agent_args: &[String],
        agent_bin: Option<&Path>,
        interrupt: &Interrupt,
    ) -> anyhow::Result<Bed> {
        let agent_bin = match agent_bin {
            Some(bin) => bin.to_owned(),
            None => std::env::current_exe().context("finding the ambientd binary")?,
        };
        let clients: Vec<String> = modes.iter().map(|&m| pod_name(m, "c")).collect();
        let servers: Vec<String> = modes.iter().map(|&m| pod_name(m, "s")).collect();
        let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
        let servers: Vec<&str> = servers.iter().map(String::as_str).collect();
        let topology = Topology::build(&[&clients, &servers], false)
            .context("building the simulated nodes (network namespaces)")?;
        let dir = tempfile::Builder::new()
            .prefix("ambientd-bench-")
            .tempdir()?;
        let mut bed = Bed {
            lanes: Vec::new(),
            topology,
            dir,
            agent_args: agent_args.to_vec(),
            agent_bin,
        };
        // Wide port ranges, so connection churn does not run out of ports, apart from the
        // ports the agents deliver from: the simulated nodes share one kernel, and a client
        // port the same as a delivery's from the same address to the same destination would
        // be taken for the other connection's.
        let delivery = delivery_ports(agent_args, std::env::var("DELIVERY_PORTS").ok())?;
        let ephemeral = ephemeral_ports(&delivery)?;
        let ports = format!("{} {}", ephemeral.start(), ephemeral.end());
        for node in &bed.topology.nodes {
            for pod in &node.pods {
                pod.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
                pod.ns.sysctl("net.ipv4.ip_local_port_range", &ports)?;
            }
        }
        ca_client::LocalCa::init(&bed.ca()).context("creating the bench's root CA")?;
        for (pod, &mode) in modes.iter().enumerate() {
            let server_pod = &bed.topology.node(2).pods[pod];
            let server = Server::start(&server_pod.ns, server_pod.ip)
                .with_context(|| format!("starting the {mode} server application"))?;
            let mut lane = Lane {
                mode,
                agents: Vec::new(),
                server,
                pod,
                mesh: None,
                started: 0,
            };
            if let Some(tunnel) = mode.tunnel() {
                let mesh = bed.dir.path().join(format!("mesh-{}.yaml", mode.label()));
                let mut yaml = String::from("workloads:\n");
                yaml.push_str(&bed.client(&lane).workload_yaml("node-1", tunnel));
                yaml.push_str(&bed.server_pod(&lane).workload_yaml("node-2", tunnel));
                std::fs::write(&mesh, yaml)?;
                lane.mesh = Some(mesh);
                lane.agents = bed.spawn_agents(&lane)?;
            }
            bed.lanes.push(lane);
        }
        for i in 0..bed.lanes.len() {
            for agent in &mut bed.lanes[i].agents {
                wait_ready(agent, interrupt)?;
            }
            bed.check_path(&bed.lanes[i], interrupt)?;
        }
        Ok(bed)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Starts the lane's agents, one per node, on its mesh file.
    fn spawn_agents(&self, lane: &Lane) -> anyhow::Result<Vec<AgentProcess>> {
        let Some(mesh) = &lane.mesh else {
            return Ok(Vec::new());
        };
        let mut agents = Vec::new();
        for node in &self.topology.nodes {
            let log = self.dir.path().join(format!(
                "{}-{}-{}.log",
                lane.mode.label(),
                node.name,
                lane.started
            ));
            let spec = Spec {
                bin: &self.agent_bin,
                node: &node.name,
                mesh,
                ca_dir: &self.ca(),
                args: &self.agent_args,
                log,
            };
            agents.push(
                AgentProcess::spawn(&node.ns, spec).with_context(|| {
                    format!("starting the {} agent of {}", lane.mode, node.name)
                })?,
            );
        }
        Ok(agents)
    }

    /// Replaces lane `i`'s agents with fresh processes and waits until they carry its
    /// traffic again: memory figures then start from a new process in every repeat.
    pub fn restart_agents(&mut self, i: usize, interrupt: &Interrupt) -> anyhow::Result<()> {
        // The old ones go first (killed): the new ones take over their pods' rules.
        self.lanes[i].agents.clear();
        self.lanes[i].started += 1;
        let agents = self.spawn_agents(&self.lanes[i])?;
        self.lanes[i].agents = agents;
        for agent in &mut self.lanes[i].agents {
            wait_ready(agent, interrupt)?;
        }
        self.check_path(&self.lanes[i], interrupt)
    }

    pub fn client(&self, lane: &Lane) -> &Pod {
        &self.topology.node(1).pods[lane.pod]
    }

    pub fn server_pod(&self, lane: &Lane) -> &Pod {
        &self.topology.node(2).pods[lane.pod]
    }

    /// Where the agents' logs and mesh files are (deleted with the bed).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// One connection through the lane; in `mesh` and `tcp` node-2's agent must have logged
    /// it as HBONE or plaintext, so a figure never comes from a path that bypassed the agents.
    fn check_path(&self, lane: &Lane, interrupt: &Interrupt) -> anyhow::Result<()> {
        let mut open = Vec::new();
        load::open_idle(&self.client(lane).ns, &lane.server, &mut open, 1, interrupt)
            .with_context(|| format!("a first {} connection failed", lane.mode))?;
        drop(open);
        let Some(expected) = lane.mode.inbound_direction() else {
            return Ok(());
        };
        let agent = &lane.agents[1];
        let deadline = Instant::now() + Duration::from_secs(5);
        let dst = lane.server.addr(load::HOLD_PORT);
        loop {
            let seen = agent.messages("connection complete").iter().any(|r| {
                r["direction"] == expected
                    && r["dst"]
                        .as_str()
                        .and_then(|d| d.parse::<SocketAddr>().ok())
                        .is_some_and(|d| d == dst)
            });
            if seen {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the {} agent of node-2 logged no {expected} connection to {dst}: the path \
                 bypassed it\n{}",
                lane.mode,
                agent.log_text()
            );
            load::sleep(Duration::from_millis(20), interrupt)?;
        }
    }
}

impl Lane {
    /// CPU seconds of each agent now (NaN when unreadable, so the figure shows none).
    pub fn agent_cpu(&self) -> Vec<Cpu> {
        self.agents
            .iter()
            .map(|a| {
                Process::Pid(a.pid()).cpu().unwrap_or(Cpu {
                    user_s: f64::NAN,
                    system_s: f64::NAN,
                })
            })
            .collect()
    }

    /// Memory, CPU and descriptors of each agent now.
    pub fn agent_usage(&self) -> anyhow::Result<Vec<Usage>> {
        self.agents
            .iter()
            .map(|a| {
                Process::Pid(a.pid())
                    .usage()
                    .with_context(|| format!("reading /proc of the agent of {}", a.node))
            })
            .collect()
    }

    /// Each agent's soft open-files limit (`/proc/PID/limits`).
    pub fn agent_nofile(&self) -> anyhow::Result<Vec<u64>> {
        self.agents
            .iter()
            .map(|a| {
                Process::Pid(a.pid())
                    .open_files_limit()
                    .with_context(|| format!("reading the limits of the agent of {}", a.node))
            })
            .collect()
    }

    /// Fails when an agent is no longer running.
    pub fn check_agents(&mut self) -> anyhow::Result<()> {
        for agent in &mut self.agents {
            if let Some(status) = agent.exited()? {
                bail!(
                    "the {} agent of {} exited ({status}):\n{}",
                    self.mode,
                    agent.node,
                    agent.log_text()
                );
            }
        }
        Ok(())
    }
}

fn wait_ready(agent: &mut AgentProcess, interrupt: &Interrupt) -> anyhow::Result<()> {
    let deadline = Instant::now() + AGENT_START;
    loop {
        // Ready also means its start-up pages are released: memory is measured after that.
        if !agent.messages("pod enrolled").is_empty() && !agent.messages("agent ready").is_empty() {
            return Ok(());
        }
        if let Some(status) = agent.exited()? {
            bail!(
                "the agent of {} exited ({status}) before enrolling its pod:\n{}",
                agent.node,
                agent.log_text()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the agent of {} did not enroll its pod and report ready within {AGENT_START:?}:\n{}",
            agent.node,
            agent.log_text()
        );
        load::sleep(Duration::from_millis(20), interrupt)?;
    }
}

/// The agents' delivery ports: `--delivery-ports` among `agent_args` (the last one given),
/// else the `DELIVERY_PORTS` they inherit, else the default.
fn delivery_ports(
    agent_args: &[String],
    env: Option<String>,
) -> anyhow::Result<RangeInclusive<u16>> {
    let mut given = env;
    let mut args = agent_args.iter();
    while let Some(arg) = args.next() {
        if let Some(value) = arg.strip_prefix("--delivery-ports=") {
            given = Some(value.to_owned());
        } else if arg == "--delivery-ports" {
            given = args.next().cloned();
        }
    }
    match given {
        Some(text) => crate::config::parse_port_range(&text)
            .map_err(|e| anyhow::anyhow!("--delivery-ports of the agents: {e}")),
        None => Ok(crate::config::DEFAULT_DELIVERY_PORTS),
    }
}

/// The simulated pods' ephemeral port range: the wider side of 1024-65535 left by `delivery`.
fn ephemeral_ports(delivery: &RangeInclusive<u16>) -> anyhow::Result<RangeInclusive<u16>> {
    let below = 1024..=delivery.start().saturating_sub(1);
    let above = delivery.end().saturating_add(1)..=65535;
    let width = |r: &RangeInclusive<u16>| r.end().saturating_sub(*r.start());
    let wider = if width(&above) >= width(&below) {
        above
    } else {
        below
    };
    // The connection cases open thousands of connections a second from one client address.
    ensure!(
        width(&wider) >= 10_000,
        "the agents' delivery ports {}-{} leave the simulated pods no 10,000 ports of their own",
        delivery.start(),
        delivery.end()
    );
    Ok(wider)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_pods_ports_stay_apart_from_the_agents_delivery_ports() {
        let default = delivery_ports(&[], None).unwrap();
        assert_eq!(default, crate::config::DEFAULT_DELIVERY_PORTS);
        assert_eq!(ephemeral_ports(&default).unwrap(), 32768..=65535);
        let given = args(&[
            "--inbound-mode",
            "tproxy",
            "--delivery-ports",
            "50000-65535",
        ]);
        let ports = delivery_ports(&given, Some("2000-2999".into())).unwrap();
        assert_eq!(ports, 50000..=65535);
        assert_eq!(ephemeral_ports(&ports).unwrap(), 1024..=49999);
        let from_env = delivery_ports(&args(&["--delivery-ports=x"]), None).unwrap_err();
        assert!(from_env.to_string().contains("LOW-HIGH"), "{from_env}");
        assert_eq!(
            delivery_ports(&[], Some("2000-2999".into())).unwrap(),
            2000..=2999
        );
        assert!(ephemeral_ports(&(5000..=60000)).is_err());
    }
}
