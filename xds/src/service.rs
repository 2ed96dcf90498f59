//! A service: virtual IPs and ports in front of the workloads that back it.
//! Istio's `istio.workload.Service` reduced to what this agent uses. Which
//! workloads back a service is recorded on the workloads, not here.

use std::net::IpAddr;

use identity::Identity;

/// A service port and the port the backends listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Port {
    pub service_port: u16,
    /// 0 means unset (Istio's "unknown"): fall back to the next rule.
    pub target_port: u16,
}

/// An IP in a given network; empty network is the default one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

/// One service of the mesh, keyed by [`Service::key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Fully qualified, e.g. `echo.demo.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs; empty for a headless service.
    pub addresses: Vec<NetworkAddress>,
    pub ports: Vec<Port>,
    /// Identities accepted from this service's endpoints besides their own.
    pub subject_alt_names: Vec<Identity>,
}

impl Service {
    /// `namespace/hostname`: the xDS resource name, and how workloads refer to it.
    pub fn key(&self) -> String {
        service_key(&self.namespace, &self.hostname)
    }

    pub fn port(&self, service_port: u16) -> Option<Port> {
        self.ports
            .iter()
            .copied()
            .find(|p| p.service_port == service_port)
    }
}

/// Builds the `namespace/hostname` key a service is known by.
pub fn service_key(namespace: &str, hostname: &str) -> String {
    format!("{namespace}/{hostname}")
}
