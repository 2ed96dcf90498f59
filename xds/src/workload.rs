//! A workload: one addressable member of the mesh (a pod, a VM), with the
//! identity it proves and the services it backs. Istio's `istio.workload.Workload`
//! reduced to what this agent uses, plus the pod's network namespace path.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use identity::Identity;

use crate::service::Port;

/// Cluster a workload belongs to when its source names none (Istio's default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// How to reach a workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TunnelProtocol {
    /// Plain TCP to the workload's address (Istio's default).
    #[default]
    None,
    /// HBONE: HTTP/2 CONNECT over mutual TLS to port 15008 of the workload.
    Hbone,
}

/// Health of a workload; only healthy ones are chosen as service endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WorkloadStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// One workload of the mesh.
///
/// The identity (trust domain, namespace, service account) is validated when
/// the workload is built, so the hot path reads it without re-parsing; the
/// other fields are plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Globally unique id; the xDS resource name.
    pub uid: String,
    /// Pod or instance name, for logs.
    pub name: String,
    identity: Identity,
    /// Raw IPs (dual-stack workloads have two); `(network, ip)` is the look-up key.
    pub addresses: Vec<IpAddr>,
    /// Kubernetes node the workload runs on.
    pub node: String,
    /// Network id; empty is the default network.
    pub network: String,
    pub tunnel_protocol: TunnelProtocol,
    /// Services this workload backs, by `namespace/hostname`, with this
    /// workload's own port mappings (which override the service's).
    pub services: BTreeMap<String, Vec<Port>>,
    pub status: WorkloadStatus,
    /// Selector-based authorization policies (`namespace/name`) that apply.
    pub authorization_policies: Vec<String>,
    /// Owning cluster; Istio's default is `Kubernetes`.
    pub cluster_id: String,
    /// Relative load-balancing weight; Istio's default is 1.
    pub capacity: u32,
    /// Not Istio's: the pod's network namespace (`/var/run/netns/NAME` or
    /// `/proc/PID/ns/net`), where capture rules and listeners go.
    pub netns: Option<PathBuf>,
}

impl Workload {
    /// A healthy, plaintext workload with no addresses, node or services;
    /// set the public fields for the rest.
    pub fn new(uid: impl Into<String>, name: impl Into<String>, identity: Identity) -> Self {
        Self {
            uid: uid.into(),
            name: name.into(),
            identity,
            addresses: Vec::new(),
            node: String::new(),
            network: String::new(),
            tunnel_protocol: TunnelProtocol::None,
            services: BTreeMap::new(),
            status: WorkloadStatus::Healthy,
            authorization_policies: Vec::new(),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            capacity: 1,
            netns: None,
        }
    }

    /// The SPIFFE identity this workload's certificates carry.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Kubernetes namespace, which is also the identity's namespace.
    pub fn namespace(&self) -> &str {
        self.identity.namespace()
    }

    pub fn service_account(&self) -> &str {
        self.identity.service_account()
    }

    pub fn trust_domain(&self) -> &str {
        self.identity.trust_domain()
    }

    pub fn is_healthy(&self) -> bool {
        self.status == WorkloadStatus::Healthy
    }

    /// This workload's own target port for `service_port` of the service
    /// `service_key`, when it maps one (0 means it does not).
    pub fn target_port(&self, service_key: &str, service_port: u16) -> Option<u16> {
        self.services
            .get(service_key)?
            .iter()
            .find(|p| p.service_port == service_port && p.target_port != 0)
            .map(|p| p.target_port)
    }
}
