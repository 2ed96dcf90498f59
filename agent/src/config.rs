//! The one typed configuration tree: defaults < environment < flags (clap with `env =`),
//! validated once at start. Each component gets only its own part.
//!
//! Tests build [`Config`] directly instead of going through the process environment.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use crate::capture::CaptureSettings;
use crate::proxy::pool::PoolConfig;

/// Ports of the agent's per-workload listeners (hbone.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: 15008,
        }
    }
}

/// HTTP/2 settings of HBONE connections (hbone.md §3.3).
#[derive(Debug, Clone)]
pub struct H2Config {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Default for H2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
        }
    }
}

/// Source ports of delivered connections by default: below the ephemeral range clients use
/// (Linux's default is 32768-60999), so a delivery never takes a port a client of the same
/// address could be using for a direct connection to the same destination.
pub const DEFAULT_DELIVERY_PORTS: RangeInclusive<u16> = 1024..=32767;

/// What the proxy needs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub ports: Ports,
    pub connect_timeout: Duration,
    /// Source ports of connections delivered to a pod from the original client's address
    /// (`--delivery-ports`; see [`crate::proxy::delivery`]).
    pub delivery_ports: RangeInclusive<u16>,
    /// How long a TLS + HTTP/2 handshake may take, either side.
    pub handshake_timeout: Duration,
    pub h2: H2Config,
    pub pool: PoolConfig,
    /// This node's name: local workloads are those whose `node` is this.
    pub node_name: String,
    /// `k8s.cluster.name` in baggage.
    pub cluster_id: String,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            ports: Ports::default(),
            connect_timeout: Duration::from_secs(5),
            delivery_ports: DEFAULT_DELIVERY_PORTS,
            handshake_timeout: Duration::from_secs(10),
            h2: H2Config::default(),
            pool: PoolConfig::default(),
            node_name: String::new(),
            cluster_id: "Kubernetes".into(),
        }
    }
}

/// Where the built-in CA's root comes from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A state directory: the root is created there on first run, loaded afterwards.
    Dir(PathBuf),
    /// Existing files (Istio's `cacerts` layout), so several agents share one root.
    Files(ca_client::CaFiles),
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub source: CaSource,
    /// Lifetime of issued workload certificates.
    pub cert_ttl: Duration,
}

/// The whole agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where workloads, services, policies and certificates come from.
    pub mode: Mode,
    /// The local mesh file (local mode only).
    pub mesh_file: PathBuf,
    /// How often the mesh file is checked for changes; `None`: loaded once at start.
    pub mesh_poll: Option<Duration>,
    /// The built-in CA (local mode only).
    pub ca: CaConfig,
    /// SOCKS5 listener (off by default); enters the outbound path without capture.
    pub socks5: Option<SocketAddr>,
    pub proxy: ProxyConfig,
    /// How enrolled pods with a network namespace are captured.
    pub capture: CaptureSettings,
    /// How long SIGTERM waits for open connections before closing them.
    pub drain_deadline: Duration,
    /// Which pods of this node are enrolled.
    pub enrollment: Enrollment,
    /// Where `/healthz/ready` is served; `None`: not served (in-process tests).
    pub readiness: Option<SocketAddr>,
}

/// Where enrollment comes from.
#[derive(Debug, Clone, Default)]
pub enum Enrollment {
    /// The mesh state's workloads on this node, each in the namespace its `netns` names
    /// (local mode's mesh file; in istio mode, the workloads xDS places on this node).
    #[default]
    MeshFile,
    /// Namespaces and pods of this node watched on the Kubernetes API.
    Kubernetes(KubernetesConfig),
}

/// How the Kubernetes enrollment reaches the API and the pods' namespaces.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// The host's `/proc` as the agent sees it: a pod's network namespace is found from the
    /// cgroup of its processes there.
    pub host_proc: PathBuf,
    /// Kubeconfig files (merged in order); empty: in-cluster config, or `~/.kube/config`.
    pub kubeconfig: Vec<PathBuf>,
    /// The agent turns unready when the API has been out of reach this long.
    pub unready_after: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            host_proc: PathBuf::from("/proc"),
            kubeconfig: Vec::new(),
            unready_after: Duration::from_secs(30),
        }
    }
}

/// Local: the mesh file and the built-in CA. Istio: delta xDS and the Istio CA.
#[derive(Debug, Clone, Default)]
pub enum Mode {
    #[default]
    Local,
    Istio(Box<IstioConfig>),
}

/// How to reach istiod (or `ambientd dev-control-plane`).
#[derive(Debug, Clone)]
pub struct IstioConfig {
    pub xds: xds::client::Config,
    pub ca: ca_client::istio::Config,
}

/// Parses durations like `500ms`, `10s`, `5m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m or h)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "{s:?} has unknown unit {unit:?} (use ms, s, m or h)"
        )),
    }
}

/// Parses a port range `LOW-HIGH`, both included, e.g. `1024-32767`.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = s
        .trim()
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range LOW-HIGH (e.g. 1024-32767)"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{p:?} in {s:?} is not a port (1-65535)"))
    };
    let (low, high) = (port(low)?, port(high)?);
    if low > high {
        return Err(format!("{s:?} starts above its end"));
    }
    Ok(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_the_rest() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").unwrap_err().contains("whole number"));
    }

    #[test]
    fn port_ranges_parse_and_reject_the_rest() {
        assert_eq!(parse_port_range("1024-32767"), Ok(1024..=32767));
        assert_eq!(parse_port_range(" 40000 - 40000 "), Ok(40000..=40000));
        assert!(parse_port_range("1024").unwrap_err().contains("LOW-HIGH"));
        assert!(
            parse_port_range("0-100")
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            parse_port_range("1024-65536")
                .unwrap_err()
                .contains("not a port")
        );
        assert!(parse_port_range("2000-1000").unwrap_err().contains("above"));
    }
}
