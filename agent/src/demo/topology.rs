//! Simulated nodes and pods as network namespaces (root and iproute2), for the root demo and
//! the netns end-to-end tests.
//!
//! Addresses come only from 198.18.0.0/15 and 2001:2::/48: node N is 198.18.0.N and
//! 2001:2::N on a shared bridge (in a `fabric` namespace), pod M of node N is 198.19.N.M/32 and
//! 2001:2:0:N::M/128 behind a veth into its node, which routes between its pods and the other
//! nodes. An optional host outside the mesh sits on the bridge as 198.18.0.200 and 2001:2::200.
//! No namespace has a route that leaves the machine. Duplicate address detection is off, so
//! IPv6 addresses are usable at once. Namespace names
//! carry `amb-<pid>-<n>-`; every namespace is deleted when its guard drops, also while a
//! failing test unwinds.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Prefix of every namespace this project creates for tests and the demo.
pub const PREFIX: &str = "amb-";

/// The host outside the mesh.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
pub const OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x200);

/// Node `n`'s address on the bridge.
pub fn node_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, u16::from(n))
}

/// The IPv6 prefix of node `n`'s pods.
fn pod_prefix6(n: u8) -> String {
    format!("2001:2:0:{n:x}::/64")
}

/// Node-side link-local address of every pod veth: the pods' IPv6 next hop.
const GATEWAY6: &str = "fe80::1";

static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("in network namespace {name}: {source}")]
    Netns {
        name: String,
        source: redirect::NetnsError,
    },
    #[error("setting {key} in network namespace {name}: {source}")]
    Sysctl {
        name: String,
        key: String,
        source: io::Error,
    },
}

/// Runs `ip args…`; returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, TopologyError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TopologyError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `amb-<pid>-<n>-<tag>`.
    pub fn create(tag: &str) -> Result<Namespace, TopologyError> {
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Namespace { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            ns.sysctl(key, "0")?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, TopologyError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, TopologyError> {
        let netns = redirect::Netns::open(self.path()).map_err(|source| TopologyError::Netns {
            name: self.name.clone(),
            source,
        })?;
        netns.run(f).map_err(|source| TopologyError::Netns {
            name: self.name.clone(),
            source,
        })
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` → `/proc/sys/net/ipv4/…`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TopologyError> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| TopologyError::Sysctl {
                name: self.name.clone(),
                key: key.to_owned(),
                source,
            })
    }

    /// A listener inside the namespace, served from tokio (an application in the pod).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let listener = self
            .run(|| std::net::TcpListener::bind(addr))
            .map_err(io::Error::other)??;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    }

    /// Connects from inside the namespace, unmarked (an application in the pod), within
    /// `timeout`.
    pub async fn connect(&self, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let socket = self
            .run(|| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(dst),
                    socket2::Type::STREAM.nonblocking().cloexec(),
                    Some(socket2::Protocol::TCP),
                )?;
                io::Result::Ok(std::net::TcpStream::from(s))
            })
            .map_err(io::Error::other)??;
        let socket = TcpSocket::from_std_stream(socket);
        tokio::time::timeout(timeout, socket.connect(dst))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {dst} timed out"),
                )
            })?
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {err}", self.name);
        }
    }
}

/// A pod: a namespace behind a veth into its node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: Namespace,
}

impl Pod {
    /// This pod as a workload of a mesh file: `demo/<pod>`, service account `<pod>`, both
    /// addresses, served by `node` in the pod's namespace, with `tunnel` (`HBONE` or `NONE`).
    pub fn workload_yaml(&self, node: &str, tunnel: &str) -> String {
        format!(
            "  - name: {name}\n    namespace: demo\n    serviceAccount: {name}\n    \
             addresses: [{ip}, {ip6}]\n    node: {node}\n    tunnelProtocol: {tunnel}\n    \
             netns: {netns}\n",
            name = self.name,
            ip = self.ip,
            ip6 = self.ip6,
            netns = self.ns.path().display(),
        )
    }
}

/// A node: a namespace on the bridge, routing for its pods.
#[derive(Debug)]
pub struct Node {
    /// `node-N`.
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    // Pods before the node namespace, so they are deleted first.
    pub pods: Vec<Pod>,
    pub ns: Namespace,
}

impl Node {
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{} has no pod {name}", self.name))
    }
}

/// Nodes with pods, a bridge between them, and optionally a host outside the mesh.
#[derive(Debug)]
pub struct Topology {
    pub nodes: Vec<Node>,
    /// 198.18.0.200, no agent, routes to every node's pods.
    pub outside: Option<Namespace>,
    pub fabric: Namespace,
}

impl Topology {
    /// `nodes[i]` lists the pod names of node `i + 1`.
    pub fn build(nodes: &[&[&str]], outside: bool) -> Result<Topology, TopologyError> {
        let fabric = Namespace::create("fabric")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut topology = Topology {
            nodes: Vec::new(),
            outside: None,
            fabric,
        };
        let count = nodes.len();
        for (i, pods) in nodes.iter().enumerate() {
            let n = u8::try_from(i + 1).expect("at most 199 nodes");
            let node = topology.add_node(n, count, pods)?;
            topology.nodes.push(node);
        }
        if outside {
            let ns = Namespace::create("out")?;
            topology.plug(&ns, "out0", OUTSIDE_IP, OUTSIDE_IP6)?;
            for k in 1..=count {
                let k = u8::try_from(k).expect("at most 199 nodes");
                ns.ip(&[
                    "route",
                    "add",
                    &format!("198.19.{k}.0/24"),
                    "via",
                    &format!("198.18.0.{k}"),
                ])?;
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &pod_prefix6(k),
                    "via",
                    &node_ip6(k).to_string(),
                ])?;
            }
            topology.outside = Some(ns);
        }
        Ok(topology)
    }

    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    /// Connects `ns` to the bridge as `ip`/24 and `ip6`/64 on its `eth0`.
    fn plug(
        &self,
        ns: &Namespace,
        port: &str,
        ip: Ipv4Addr,
        ip6: Ipv6Addr,
    ) -> Result<(), TopologyError> {
        self.fabric.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.fabric
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn add_node(&self, n: u8, count: usize, pods: &[&str]) -> Result<Node, TopologyError> {
        let ns = Namespace::create(&format!("n{n}"))?;
        let ip = Ipv4Addr::new(198, 18, 0, n);
        let ip6 = node_ip6(n);
        self.plug(&ns, &format!("n{n}"), ip, ip6)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for k in 1..=count {
            let k = u8::try_from(k).expect("at most 199 nodes");
            if k != n {
                ns.ip(&[
                    "route",
                    "add",
                    &format!("198.19.{k}.0/24"),
                    "via",
                    &format!("198.18.0.{k}"),
                ])?;
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &pod_prefix6(k),
                    "via",
                    &node_ip6(k).to_string(),
                ])?;
            }
        }
        let mut node = Node {
            name: format!("node-{n}"),
            ip,
            ip6,
            pods: Vec::new(),
            ns,
        };
        for (j, name) in pods.iter().enumerate() {
            let m = u8::try_from(j + 1).expect("at most 254 pods per node");
            let pod_ip = Ipv4Addr::new(198, 19, n, m);
            let pod_ip6 = Ipv6Addr::new(0x2001, 2, 0, u16::from(n), 0, 0, 0, u16::from(m));
            let pod = Namespace::create(&format!("n{n}-{name}"))?;
            let port = format!("p{m}");
            node.ns.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ])?;
            node.ns.ip(&["link", "set", &port, "up"])?;
            node.ns
                .ip(&["route", "add", &format!("{pod_ip}/32"), "dev", &port])?;
            node.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{GATEWAY6}/64"),
                "dev",
                &port,
                "nodad",
            ])?;
            node.ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{pod_ip6}/128"),
                "dev",
                &port,
            ])?;
            pod.ip(&["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
            pod.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{pod_ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            pod.ip(&[
                "-6",
                "route",
                "add",
                "2001:2::/48",
                "via",
                GATEWAY6,
                "dev",
                "eth0",
            ])?;
            pod.ip(&[
                "route",
                "add",
                &ip.to_string(),
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            pod.ip(&[
                "route",
                "add",
                "198.18.0.0/15",
                "via",
                &ip.to_string(),
                "dev",
                "eth0",
            ])?;
            node.pods.push(Pod {
                name: (*name).to_owned(),
                ip: pod_ip,
                ip6: pod_ip6,
                ns: pod,
            });
        }
        Ok(node)
    }
}

/// Namespaces of this process still present (`ip netns list`), for the end-of-test check.
pub fn leftovers() -> Result<Vec<String>, TopologyError> {
    let mine = format!("{PREFIX}{}-", std::process::id());
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&mine))
        .map(str::to_owned)
        .collect())
}
