//! Command line: flags with `env =` fallbacks (Istio's names where they exist), turned into the
//! typed [`Config`] once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::capture::{CaptureSettings, parse_backend, parse_inbound_mode};
use crate::config::{CaConfig, CaSource, Config, H2Config, ProxyConfig, parse_duration};
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

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The local mesh file (workloads, services, authorization policies).
    #[arg(long, env = "MESH_FILE")]
    pub mesh: PathBuf,
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
    /// How long SIGTERM lets open connections finish.
    #[arg(long, env = "DRAIN_DEADLINE", default_value = "20s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Streams per pooled HBONE connection before another is opened.
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub pool_max_streams: usize,
    /// Close pooled HBONE connections unused this long.
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
        let defaults = H2Config::default();
        Ok(Config {
            mesh_file: self.mesh,
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
        })
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
}
