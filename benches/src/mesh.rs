//! Inputs of the look-up benchmark: a mesh of `n` workloads behind `n / 10` services, shaped
//! like a cluster's (100 namespaces, 100 nodes, HBONE pods with one IP each, a VIP per service,
//! one endpoint in 20 unhealthy), and the addresses the proxy would look up in it.
//!
//! Every size keeps 10 endpoints per service, so a growing look-up time is the tables' size,
//! not a longer endpoint walk.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use identity::Identity;
use xds::{NetworkAddress, Port, Service, State, TunnelProtocol, Workload, WorkloadStatus};

/// Workloads backing each service.
pub const ENDPOINTS: usize = 10;

/// The service port every service exposes, and the port its endpoints listen on.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// The default network, where everything in [`Mesh`] lives.
pub const NETWORK: &str = "";

/// A mesh state and one hit of each kind of look-up, taken from the middle of the mesh.
pub struct Mesh {
    pub state: State,
    /// A service VIP and port: resolves to one of the service's endpoints.
    pub service: SocketAddr,
    /// A pod IP and port: resolves to that workload.
    pub pod: SocketAddr,
    /// The uid of the workload at `pod`.
    pub uid: String,
}

impl Mesh {
    /// `workloads` workloads (a multiple of [`ENDPOINTS`], at least 10) and a service for each
    /// [`ENDPOINTS`] of them.
    pub fn new(workloads: usize) -> Self {
        assert!(
            workloads >= ENDPOINTS && workloads.is_multiple_of(ENDPOINTS),
            "a multiple of {ENDPOINTS} workloads"
        );
        let services = workloads / ENDPOINTS;
        let mut state = State::new();
        for i in 0..services {
            state.upsert_service(service(i));
        }
        for i in 0..workloads {
            state.upsert_workload(workload(i, services));
        }
        let middle = workloads / 2;
        Self {
            state,
            service: SocketAddr::new(vip(services / 2), SERVICE_PORT),
            pod: SocketAddr::new(pod_ip(middle), TARGET_PORT),
            uid: uid(middle),
        }
    }
}

fn namespace(i: usize) -> String {
    format!("ns-{}", i % 100)
}

fn hostname(i: usize) -> String {
    format!("svc-{i}.{}.svc.cluster.local", namespace(i))
}

/// 240.0.0.0/4 for VIPs, 10.0.0.0/8 for pods: never in each other's way.
fn vip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        0xf000_0000 + u32::try_from(i).expect("small index"),
    ))
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        0x0a00_0000 + u32::try_from(i).expect("small index"),
    ))
}

fn uid(i: usize) -> String {
    format!("Kubernetes//Pod/{}/pod-{i}", namespace(i))
}

fn service(i: usize) -> Service {
    let ns = namespace(i);
    Service {
        name: format!("svc-{i}"),
        namespace: ns.clone(),
        hostname: hostname(i),
        addresses: vec![NetworkAddress {
            network: NETWORK.into(),
            address: vip(i),
        }],
        ports: vec![Port {
            service_port: SERVICE_PORT,
            target_port: TARGET_PORT,
        }],
        subject_alt_names: Vec::new(),
    }
}

/// Workload `i` backs service `i % services`, so each service's endpoints are spread over
/// namespaces and nodes as in a real cluster's pod list.
fn workload(i: usize, services: usize) -> Workload {
    let ns = namespace(i);
    let sa = format!("sa-{}", i % services);
    let id = Identity::new("cluster.local", &ns, &sa).expect("valid identity");
    let mut w = Workload::new(uid(i), format!("pod-{i}"), id);
    w.addresses = vec![pod_ip(i)];
    w.node = format!("node-{}", i % 100);
    w.tunnel_protocol = TunnelProtocol::Hbone;
    let backed = i % services;
    w.services.insert(
        xds::service_key(&namespace(backed), &hostname(backed)),
        vec![Port {
            service_port: SERVICE_PORT,
            target_port: TARGET_PORT,
        }],
    );
    if i % 20 == 19 {
        w.status = WorkloadStatus::Unhealthy;
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds::{Destination, Store};

    #[test]
    fn every_lookup_hits_whatever_the_size() {
        for workloads in [100, 10_000] {
            let mesh = Mesh::new(workloads);
            assert_eq!(mesh.state.workloads().count(), workloads);
            assert_eq!(mesh.state.services().count(), workloads / ENDPOINTS);

            for _ in 0..50 {
                match mesh.state.resolve(NETWORK, mesh.service) {
                    Destination::Service {
                        service,
                        workload,
                        target_port,
                    } => {
                        assert_eq!(target_port, TARGET_PORT);
                        assert!(workload.is_healthy());
                        assert!(workload.services.contains_key(&service.key()));
                        assert_eq!(mesh.state.endpoints(&service.key()).len(), ENDPOINTS);
                    }
                    other => panic!("{workloads}: service VIP resolved to {other:?}"),
                }
            }
            match mesh.state.resolve(NETWORK, mesh.pod) {
                Destination::Workload { workload, port } => {
                    assert_eq!(workload.uid, mesh.uid);
                    assert_eq!(port, TARGET_PORT);
                }
                other => panic!("{workloads}: pod IP resolved to {other:?}"),
            }
            let by_ip = mesh.state.workload_by_ip(NETWORK, mesh.pod.ip()).unwrap();
            assert_eq!(by_ip.uid, mesh.uid);
            assert!(mesh.state.workload_by_uid(&mesh.uid).is_some());

            let store = Store::new(mesh.state);
            assert!(matches!(
                store.resolve(NETWORK, mesh.service),
                Destination::Service { .. }
            ));
        }
    }
}
