//! Command line: flags with `env =` fallbacks (Istio's names where they exist), turned into the
//! typed [`Config`] once.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::capture::{CaptureSettings, parse_backend, parse_inbound_mode};
use crate::config::{
    CaConfig, CaSource, Config, Enrollment, H2Config, IstioConfig, KubernetesConfig, Mode,
    ProxyConfig, parse_duration, parse_port_range,
};
use crate::proxy::pool::PoolConfig;

#[derive(Debug, Parser)]
#[command(
    name = "ambientd",
    version,
    about = "Node agent for a sidecar-less service mesh, wire-compatible with Istio ambient"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent for the workloads of one node.
    Run(Box<RunArgs>),
    /// Start two agents on loopback addresses and send traffic through the mesh between them.
    Demo,
    /// The built-in CA: create a root, or issue a certificate to inspect.
    #[command(subcommand)]
    Ca(CaCommand),
    /// A development stand-in for istiod: serves a mesh file over delta xDS and signs CSRs
    /// with the built-in CA, on one TLS port. Production uses istiod.
    DevControlPlane(DevControlPlaneArgs),
    /// Measure what the mesh costs on this node (root): throughput, latency, connection rate,
    /// agent CPU and memory, each against a direct connection in the same run.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Modes to measure: direct (no agent, no capture), mesh (capture + HBONE between two
    /// agents), tcp (capture, plain TCP between them).
    #[arg(long, value_delimiter = ',', default_value = "direct,mesh,tcp")]
    pub modes: Vec<crate::bench::Mode>,
    /// Groups of cases to run: throughput, latency, connections, memory [default: all].
    #[arg(long, value_delimiter = ',')]
    pub cases: Option<Vec<crate::bench::CaseGroup>>,
    /// Measuring window of each sample [default: 2s; --quick: 200ms].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Traffic before each window [default: 300ms; --quick: 100ms].
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Samples of every case and mode; the median is reported [default: 3; --quick: 1].
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Open idle connections to measure agent memory at [default: 1000,10000; --quick: 100].
    #[arg(long, value_delimiter = ',')]
    pub idle_conns: Option<Vec<usize>>,
    /// After the load, how long the agents are left without traffic before their memory is
    /// read again (it is read about once a second meanwhile) [default: 10s; --quick: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub quiet_for: Option<Duration>,
    /// Write every raw sample, the figures and the machine to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the ratios to direct, with the targets, as an SVG chart in this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Small settings for tests (one repeat of short windows, 100 idle connections); the
    /// flags above still override them.
    #[arg(long)]
    pub quick: bool,
    /// A flag added to every agent's `ambientd run` (repeatable), e.g.
    /// `--agent-arg=--inbound-mode --agent-arg=tproxy`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Run the agents from this binary instead of this one: another build to compare with
    /// the same load, or a wrapper script that execs one under a profiler (it must exec, so
    /// the agent is the process the bench starts, measures and stops).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Internal: be the bench's idle-connection holder on this address (a child process in
    /// the server pod).
    #[arg(long, hide = true)]
    pub hold: Option<SocketAddr>,
}

impl BenchArgs {
    /// Validates the flags and fills in the defaults (or `--quick`'s).
    pub fn into_settings(self) -> Result<crate::bench::Settings, String> {
        let quick = self.quick;
        let pick = |given: Option<Duration>, normal: u64, small: u64| {
            given.unwrap_or(Duration::from_millis(if quick { small } else { normal }))
        };
        let duration = pick(self.duration, 2000, 200);
        let warmup = pick(self.warmup, 300, 100);
        let quiet_for = pick(self.quiet_for, 10_000, 1_000);
        if quiet_for > Duration::from_secs(3600) {
            return Err("--quiet-for: at most 1h".into());
        }
        if duration.is_zero() {
            return Err("--duration must be more than 0".into());
        }
        let repeats = self.repeats.unwrap_or(if quick { 1 } else { 3 });
        if repeats == 0 {
            return Err("--repeats must be at least 1".into());
        }
        let mut idle_conns = self
            .idle_conns
            .unwrap_or_else(|| if quick { vec![100] } else { vec![1000, 10_000] });
        idle_conns.retain(|&n| n > 0);
        idle_conns.sort_unstable();
        idle_conns.dedup();
        if idle_conns.last().is_some_and(|&n| n > 100_000) {
            return Err("--idle-conns: at most 100000".into());
        }
        let mut modes = Vec::new();
        for m in self.modes {
            if !modes.contains(&m) {
                modes.push(m);
            }
        }
        if modes.is_empty() {
            return Err("--modes: name at least one of direct, mesh, tcp".into());
        }
        let mut cases = Vec::new();
        for c in self
            .cases
            .unwrap_or_else(|| crate::bench::CaseGroup::ALL.to_vec())
        {
            if !cases.contains(&c) {
                cases.push(c);
            }
        }
        if cases.is_empty() {
            return Err(
                "--cases: name at least one of throughput, latency, connections, memory".into(),
            );
        }
        Ok(crate::bench::Settings {
            modes,
            cases,
            duration,
            warmup,
            repeats,
            idle_conns,
            quiet_for,
            round_trip_cap: 1_000_000,
            conn_cap: 200_000,
            agent_args: self.agent_args,
            agent_bin: self.agent_bin,
            json: self.json,
            svg: self.svg,
        })
    }
}

#[derive(Debug, Args)]
pub struct DevControlPlaneArgs {
    /// The mesh file to serve; edits are pushed to connected agents.
    #[arg(long)]
    pub mesh: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,
    /// The CA's state directory (root created on first run); agents trust its root-cert.pem.
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Names on the serving certificate (repeatable); default istiod.istio-system.svc,
    /// istiod.istio-system.svc.cluster.local, localhost, 127.0.0.1, ::1.
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Accept only these bearer tokens, as TOKEN=SPIFFE_ID (repeatable); default: any caller.
    #[arg(long = "token")]
    pub tokens: Vec<String>,
}

impl DevControlPlaneArgs {
    pub fn into_config(self) -> Result<crate::control_plane::Config, String> {
        let tokens = self
            .tokens
            .iter()
            .map(|t| {
                let (token, id) = t
                    .split_once('=')
                    .ok_or_else(|| format!("--token {t:?} is not TOKEN=SPIFFE_ID"))?;
                let id = id.parse().map_err(|e| format!("--token {t:?}: {e}"))?;
                Ok((token.to_owned(), id))
            })
            .collect::<Result<_, String>>()?;
        Ok(crate::control_plane::Config {
            mesh_file: self.mesh,
            listen: self.listen,
            ca_dir: self.ca_dir,
            dns_names: if self.dns_names.is_empty() {
                ca_client::server::default_dns_names()
            } else {
                self.dns_names
            },
            trust_domain: self.trust_domain,
            tokens,
            poll: Duration::from_secs(1),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new root (ECDSA P-256) in DIR; refuses to overwrite an existing one.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a workload certificate from the root in DIR and write it to OUT.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE id, e.g. spiffe://cluster.local/ns/demo/sa/echo
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EnrollmentName {
    /// The mesh state's workloads on this node, with their `netns`.
    MeshFile,
    /// Namespaces labelled `istio.io/dataplane-mode=ambient` and this node's pods, watched on
    /// the Kubernetes API.
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeName {
    Local,
    Istio,
}

/// Istio mode: where istiod is and who the agent is (Istio's variable names).
#[derive(Debug, Args)]
pub struct IstioArgs {
    /// The xDS server, e.g. https://istiod.istio-system.svc:15012.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// The CA; default: the xDS address.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM file with the root the control plane's certificate must chain to.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_ca: Option<PathBuf>,
    /// The same for the CA; default: the xDS root.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<PathBuf>,
    /// Name to verify in the xDS server's certificate instead of the address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    /// Name to verify in the CA's certificate instead of the address's host.
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,
    /// File with the bearer token (projected service-account token, audience istio-ca).
    #[arg(long, env = "AUTH_TOKEN")]
    pub auth_token: Option<PathBuf>,
    /// The agent's own pod, namespace and address, sent as xDS node metadata.
    #[arg(long, env = "POD_NAME", default_value = "ambientd")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub instance_ip: String,
    /// The agent's own service account: its own certificate is asked for without
    /// impersonation.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// `local`: a mesh file and the built-in CA; `istio`: delta xDS and the Istio CA.
    #[arg(long, env = "AMBIENTD_MODE", default_value = "local")]
    pub mode: ModeName,
    /// The local mesh file (workloads, services, authorization policies); local mode.
    #[arg(long, env = "MESH_FILE")]
    pub mesh: Option<PathBuf>,
    #[command(flatten)]
    pub istio: IstioArgs,
    /// How often to check the mesh file for changes and apply them (0s: never).
    #[arg(long, env = "MESH_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub mesh_poll_interval: Duration,
    /// This node's name: the agent serves the workloads whose `node` is this.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Where the built-in CA keeps its root (created on first run).
    #[arg(long, env = "AMBIENTD_STATE_DIR", default_value = "/var/lib/ambientd")]
    pub state_dir: PathBuf,
    /// Use this CA certificate (Istio `ca-cert.pem`) instead of the state directory's root.
    #[arg(long, env = "CA_CERT_FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA certificate's private key (Istio `ca-key.pem`; ECDSA or RSA).
    #[arg(long, env = "CA_KEY_FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Intermediates from the CA certificate up to the root (Istio `cert-chain.pem`).
    #[arg(long, env = "CA_CHAIN_FILE", requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// The root certificate(s) (Istio `root-cert.pem`); default: the CA certificate itself.
    #[arg(long, env = "CA_ROOT_FILE", requires = "ca_cert")]
    pub ca_root: Option<PathBuf>,
    /// Lifetime of workload certificates.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// Open a SOCKS5 listener here (e.g. 127.0.0.1:15080) to enter the mesh without capture.
    #[arg(long, env = "SOCKS5_ADDRESS")]
    pub socks5: Option<SocketAddr>,
    /// Cluster id, sent in baggage.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Bound on every upstream TCP connect.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Source ports (LOW-HIGH) of connections delivered to a pod from the original client's
    /// address; keep them out of the clients' ephemeral port range.
    #[arg(long, env = "DELIVERY_PORTS", default_value = "1024-32767", value_parser = parse_port_range)]
    pub delivery_ports: RangeInclusive<u16>,
    /// How long SIGTERM lets open connections finish.
    #[arg(long, env = "DRAIN_DEADLINE", default_value = "20s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Streams per pooled HBONE connection before another is opened.
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub pool_max_streams: usize,
    /// Close a peer's last pooled HBONE connection once unused this long (its others, opened
    /// for a burst, go after 30 s unused, or this if shorter).
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    #[arg(long, env = "HTTP2_STREAM_WINDOW_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub h2_stream_window: u32,
    #[arg(long, env = "HTTP2_CONNECTION_WINDOW_SIZE", default_value_t = 16 * 1024 * 1024)]
    pub h2_connection_window: u32,
    #[arg(long, env = "HTTP2_FRAME_SIZE", default_value_t = 1024 * 1024)]
    pub h2_frame_size: u32,
    /// Netfilter front end for pod capture rules: iptables or nftables.
    #[arg(long, env = "CAPTURE_BACKEND", default_value = "iptables", value_parser = parse_backend)]
    pub capture_backend: redirect::Backend,
    /// How inbound traffic reaches the agent in a pod: redirect (NAT) or tproxy.
    #[arg(long, env = "INBOUND_MODE", default_value = "redirect", value_parser = parse_inbound_mode)]
    pub inbound_mode: redirect::InboundMode,
    /// Which pods are enrolled: the mesh file's workloads on this node (`mesh-file`), or the
    /// pods of this node in ambient namespaces, watched on the Kubernetes API (`kubernetes`).
    #[arg(long, env = "AMBIENTD_ENROLLMENT", default_value = "mesh-file")]
    pub enrollment: EnrollmentName,
    /// The host's /proc as the agent sees it (the DaemonSet mounts it at /host/proc); pods'
    /// network namespaces are found there (kubernetes enrollment).
    #[arg(long, env = "HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,
    /// Kubeconfig file(s), `:`-separated; default: in-cluster config, else ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<String>,
    /// Turn unready when the Kubernetes API has been out of reach this long.
    #[arg(long, env = "KUBE_UNREADY_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub kube_unready_after: Duration,
    /// Where /healthz/ready is served, or `off`.
    #[arg(long, env = "READINESS_ADDRESS", default_value = "0.0.0.0:15021")]
    pub readiness_address: String,
}

impl RunArgs {
    /// Validates the flags and builds the configuration.
    pub fn into_config(self) -> Result<Config, String> {
        if self.node.trim().is_empty() {
            return Err("--node (NODE_NAME) must not be empty".into());
        }
        if self.pool_max_streams == 0 {
            return Err("--pool-max-streams must be at least 1".into());
        }
        if !(16_384..=16_777_215).contains(&self.h2_frame_size) {
            return Err(format!(
                "--h2-frame-size {} is outside HTTP/2's 16384..=16777215",
                self.h2_frame_size
            ));
        }
        if self.h2_connection_window < self.h2_stream_window {
            return Err("--h2-connection-window must be at least --h2-stream-window".into());
        }
        let source = match (self.ca_cert, self.ca_key) {
            (Some(cert), Some(key)) => CaSource::Files(ca_client::CaFiles {
                cert,
                key,
                chain: self.ca_chain,
                root: self.ca_root,
            }),
            _ => CaSource::Dir(self.state_dir),
        };
        let (mode, mesh_file) = match self.mode {
            ModeName::Local => {
                let mesh = self.mesh.ok_or("local mode needs --mesh (MESH_FILE)")?;
                (Mode::Local, mesh)
            }
            ModeName::Istio => (
                Mode::Istio(Box::new(self.istio.into_config(
                    &self.node,
                    &self.cluster_id,
                    self.cert_ttl,
                )?)),
                PathBuf::new(),
            ),
        };
        let readiness = match self.readiness_address.as_str() {
            "off" => None,
            addr => Some(addr.parse::<SocketAddr>().map_err(|e| {
                format!("--readiness-address {addr:?} is not an address:port or `off`: {e}")
            })?),
        };
        let enrollment = match self.enrollment {
            EnrollmentName::MeshFile => Enrollment::MeshFile,
            EnrollmentName::Kubernetes => Enrollment::Kubernetes(KubernetesConfig {
                host_proc: self.host_proc,
                kubeconfig: self
                    .kubeconfig
                    .iter()
                    .flat_map(|list| list.split(':'))
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .collect(),
                unready_after: self.kube_unready_after,
            }),
        };
        let defaults = H2Config::default();
        Ok(Config {
            mode,
            mesh_file,
            mesh_poll: Some(self.mesh_poll_interval).filter(|d| !d.is_zero()),
            ca: CaConfig {
                source,
                cert_ttl: self.cert_ttl,
            },
            socks5: self.socks5,
            proxy: ProxyConfig {
                node_name: self.node,
                cluster_id: self.cluster_id,
                connect_timeout: self.connect_timeout,
                delivery_ports: self.delivery_ports,
                h2: H2Config {
                    stream_window: self.h2_stream_window,
                    connection_window: self.h2_connection_window,
                    max_frame_size: self.h2_frame_size,
                    ..defaults
                },
                pool: PoolConfig {
                    max_streams: self.pool_max_streams,
                    idle_timeout: self.pool_idle_timeout,
                },
                ..ProxyConfig::default()
            },
            capture: CaptureSettings {
                backend: self.capture_backend,
                inbound: self.inbound_mode,
                ..CaptureSettings::default()
            },
            drain_deadline: self.drain_deadline,
            enrollment,
            readiness,
        })
    }
}

impl IstioArgs {
    fn into_config(
        self,
        node: &str,
        cluster_id: &str,
        cert_ttl: Duration,
    ) -> Result<IstioConfig, String> {
        let xds_address = self
            .xds_address
            .ok_or("istio mode needs --xds-address (XDS_ADDRESS)")?;
        let ca_address = self.ca_address.unwrap_or_else(|| xds_address.clone());
        let xds_root = self.xds_root_ca;
        let ca_root = self.ca_root_ca.or_else(|| xds_root.clone());
        let own_identity = match &self.service_account {
            Some(sa) => Some(
                identity::Identity::new(&self.trust_domain, &self.pod_namespace, sa)
                    .map_err(|e| format!("SERVICE_ACCOUNT/POD_NAMESPACE/TRUST_DOMAIN: {e}"))?,
            ),
            None => None,
        };
        let xds = xds::client::Config {
            address: xds_address,
            root_cert: xds_root,
            server_name: self.alt_xds_hostname,
            token: self.auth_token.clone(),
            cluster_id: cluster_id.to_owned(),
            headers: Vec::new(),
            node: xds::client::NodeInfo {
                pod_name: self.pod_name,
                pod_namespace: self.pod_namespace,
                instance_ip: self.instance_ip,
                node_name: node.to_owned(),
                cluster_id: cluster_id.to_owned(),
                cluster_domain: self.cluster_domain,
                extra_metadata: Default::default(),
            },
            connect_timeout: Duration::from_secs(5),
        };
        let uri: http::Uri = ca_address
            .parse()
            .map_err(|e| format!("--ca-address {ca_address:?}: {e}"))?;
        let mut ca = match &ca_root {
            Some(path) => ca_client::istio::Config::with_root_file(uri, path)
                .map_err(|e| format!("--ca-root-ca: {e}"))?,
            None => {
                return Err("istio mode needs --xds-root-ca (XDS_ROOT_CA) or --ca-root-ca".into());
            }
        };
        ca.server_name = self.alt_ca_hostname;
        ca.token_path = self.auth_token;
        ca.cluster_id = cluster_id.to_owned();
        ca.own_identity = own_identity;
        ca.validity = cert_ttl;
        Ok(IstioConfig { xds, ca })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["ambientd", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(r) => r.into_config(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_build_the_config_with_defaults() {
        let cfg = run(&[
            "--mesh",
            "m.yaml",
            "--node",
            "n1",
            "--socks5",
            "127.0.0.1:1080",
        ])
        .unwrap();
        assert_eq!(cfg.proxy.node_name, "n1");
        assert_eq!(cfg.socks5, Some("127.0.0.1:1080".parse().unwrap()));
        assert_eq!(cfg.proxy.pool.max_streams, 100);
        assert_eq!(cfg.ca.cert_ttl, Duration::from_secs(86400));
        assert_eq!(cfg.mesh_poll, Some(Duration::from_secs(1)));
        let off = run(&["--mesh", "m", "--node", "n", "--mesh-poll-interval", "0s"]).unwrap();
        assert_eq!(off.mesh_poll, None);
        assert!(matches!(cfg.ca.source, CaSource::Dir(_)));
        assert_eq!(cfg.capture.backend, redirect::Backend::Iptables);
        assert_eq!(cfg.capture.inbound, redirect::InboundMode::Redirect);
        assert_eq!(
            cfg.proxy.delivery_ports,
            crate::config::DEFAULT_DELIVERY_PORTS
        );
        let ports = run(&[
            "--mesh",
            "m",
            "--node",
            "n",
            "--delivery-ports",
            "2000-2999",
        ])
        .unwrap();
        assert_eq!(ports.proxy.delivery_ports, 2000..=2999);
    }

    #[test]
    fn capture_flags_choose_backend_and_inbound_mode() {
        let cfg = run(&[
            "--mesh",
            "m",
            "--node",
            "n",
            "--capture-backend",
            "nftables",
            "--inbound-mode",
            "tproxy",
        ])
        .unwrap();
        assert_eq!(cfg.capture.backend, redirect::Backend::Nftables);
        assert_eq!(cfg.capture.inbound, redirect::InboundMode::Tproxy);
        assert!(
            run(&["--mesh", "m", "--node", "n", "--inbound-mode", "nat"])
                .unwrap_err()
                .contains("redirect or tproxy")
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        assert!(
            run(&["--mesh", "m", "--node", " "])
                .unwrap_err()
                .contains("--node")
        );
        assert!(
            run(&["--mesh", "m", "--node", "n", "--cert-ttl", "3d"])
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            run(&["--mesh", "m", "--node", "n", "--h2-frame-size", "100"])
                .unwrap_err()
                .contains("16384")
        );
        assert!(
            run(&["--mesh", "m", "--node", "n", "--ca-cert", "c.pem"])
                .unwrap_err()
                .contains("--ca-key")
        );
        assert!(
            run(&["--mesh", "m", "--node", "n", "--delivery-ports", "5000"])
                .unwrap_err()
                .contains("LOW-HIGH")
        );
    }

    #[test]
    fn kubernetes_enrollment_and_readiness_settings() {
        let cfg = run(&["--mesh", "m", "--node", "n"]).unwrap();
        assert!(matches!(cfg.enrollment, Enrollment::MeshFile));
        assert_eq!(cfg.readiness, Some("0.0.0.0:15021".parse().unwrap()));
        let cfg = run(&[
            "--mesh",
            "m",
            "--node",
            "n",
            "--enrollment",
            "kubernetes",
            "--host-proc",
            "/host/proc",
            "--kubeconfig",
            "/a/config:/b/config",
            "--kube-unready-after",
            "5s",
            "--readiness-address",
            "off",
        ])
        .unwrap();
        let Enrollment::Kubernetes(kube) = cfg.enrollment else {
            panic!("expected kubernetes enrollment")
        };
        assert_eq!(kube.host_proc, PathBuf::from("/host/proc"));
        assert_eq!(
            kube.kubeconfig,
            vec![PathBuf::from("/a/config"), PathBuf::from("/b/config")]
        );
        assert_eq!(kube.unready_after, Duration::from_secs(5));
        assert_eq!(cfg.readiness, None);
        assert!(
            run(&["--mesh", "m", "--node", "n", "--readiness-address", "15021"])
                .unwrap_err()
                .contains("--readiness-address")
        );
        assert!(
            run(&["--mesh", "m", "--node", "n", "--enrollment", "static"])
                .unwrap_err()
                .contains("kubernetes")
        );
    }

    #[test]
    fn ca_files_replace_the_state_dir() {
        let cfg = run(&[
            "--mesh",
            "m",
            "--node",
            "n",
            "--ca-cert",
            "c.pem",
            "--ca-key",
            "k.pem",
        ])
        .unwrap();
        match cfg.ca.source {
            CaSource::Files(f) => {
                assert_eq!(f.cert, PathBuf::from("c.pem"));
                assert_eq!(f.key, PathBuf::from("k.pem"));
            }
            CaSource::Dir(_) => panic!("expected CA files"),
        }
    }

    #[test]
    fn istio_mode_takes_istio_names_and_needs_an_address_and_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root-cert.pem");
        let ca = ca_client::LocalCa::generate().unwrap();
        std::fs::write(&root, ca.roots_pem()).unwrap();
        let root = root.to_str().unwrap();
        assert!(
            run(&["--mode", "istio", "--node", "n"])
                .unwrap_err()
                .contains("--xds-address")
        );
        assert!(
            run(&[
                "--mode",
                "istio",
                "--node",
                "n",
                "--xds-address",
                "https://istiod:15012"
            ])
            .unwrap_err()
            .contains("--xds-root-ca")
        );
        let cfg = run(&[
            "--mode",
            "istio",
            "--node",
            "n1",
            "--xds-address",
            "https://istiod:15012",
            "--xds-root-ca",
            root,
            "--service-account",
            "ztunnel",
            "--cluster-id",
            "c1",
        ])
        .unwrap();
        let Mode::Istio(istio) = cfg.mode else {
            panic!("expected istio mode")
        };
        assert_eq!(istio.xds.address, "https://istiod:15012");
        assert_eq!(istio.ca.address.to_string(), "https://istiod:15012/");
        assert_eq!(istio.xds.node.node_name, "n1");
        assert_eq!(istio.xds.cluster_id, "c1");
        assert_eq!(
            istio.ca.own_identity.unwrap().to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert!(run(&["--node", "n"]).unwrap_err().contains("--mesh"));
    }

    fn bench(args: &[&str]) -> Result<crate::bench::Settings, String> {
        let mut argv = vec!["ambientd", "bench"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Bench(b) => b.into_settings(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bench_defaults_quick_and_overrides() {
        use crate::bench::Mode;
        let s = bench(&[]).unwrap();
        assert_eq!(s.modes, [Mode::Direct, Mode::Mesh, Mode::Tcp]);
        assert_eq!((s.duration, s.repeats), (Duration::from_secs(2), 3));
        assert_eq!(s.idle_conns, [1000, 10_000]);
        assert_eq!(s.quiet_for, Duration::from_secs(10));
        let q = bench(&["--quick", "--modes", "mesh,direct,mesh", "--repeats", "2"]).unwrap();
        assert_eq!(q.modes, [Mode::Mesh, Mode::Direct]);
        assert_eq!((q.duration, q.repeats), (Duration::from_millis(200), 2));
        assert_eq!(q.idle_conns, [100]);
        assert_eq!(q.quiet_for, Duration::from_secs(1));
        let w = bench(&["--quick", "--quiet-for", "5m"]).unwrap();
        assert_eq!(w.quiet_for, Duration::from_secs(300));
        assert!(
            bench(&["--quiet-for", "2h"])
                .unwrap_err()
                .contains("--quiet-for")
        );
        let i = bench(&["--idle-conns", "500,0,50", "--agent-arg=--inbound-mode"]).unwrap();
        assert_eq!(i.idle_conns, [50, 500]);
        assert_eq!(i.agent_args, ["--inbound-mode"]);
        assert!(
            bench(&["--repeats", "0"])
                .unwrap_err()
                .contains("--repeats")
        );
        assert!(
            bench(&["--duration", "0s"])
                .unwrap_err()
                .contains("--duration")
        );
        assert!(bench(&["--modes", "udp"]).is_err());
        use crate::bench::CaseGroup;
        assert_eq!(s.cases, CaseGroup::ALL);
        let c = bench(&["--cases", "latency,throughput,latency"]).unwrap();
        assert_eq!(c.cases, [CaseGroup::Latency, CaseGroup::Throughput]);
        assert!(bench(&["--cases", "speed"]).is_err());
    }

    #[test]
    fn dev_control_plane_tokens_are_token_equals_spiffe_id() {
        let parse = |tokens: &[&str]| {
            let mut argv = vec![
                "ambientd",
                "dev-control-plane",
                "--mesh",
                "m",
                "--ca-dir",
                "d",
            ];
            for t in tokens {
                argv.extend_from_slice(&["--token", t]);
            }
            match Cli::try_parse_from(argv).unwrap().command {
                Command::DevControlPlane(a) => a.into_config(),
                other => panic!("parsed as {other:?}"),
            }
        };
        let cfg = parse(&["abc=spiffe://cluster.local/ns/istio-system/sa/ztunnel"]).unwrap();
        assert_eq!(cfg.tokens[0].0, "abc");
        assert!(
            cfg.dns_names
                .contains(&"istiod.istio-system.svc".to_owned())
        );
        assert!(parse(&["abc"]).unwrap_err().contains("TOKEN=SPIFFE_ID"));
        assert!(
            parse(&["abc=spiffe://x"])
                .unwrap_err()
                .contains("must have the form")
        );
    }
}
