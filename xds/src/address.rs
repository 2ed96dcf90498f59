//! `istio.workload.Address` resources ↔ the mesh state's [`Workload`] and
//! [`Service`]: decoding validates every field the agent relies on and names
//! the first problem precisely; encoding (for the ADS server) writes what the
//! state holds.
//!
//! Enum values that decide where or whether traffic goes (tunnel protocol,
//! health, network mode, application tunnel, load-balancing mode, visibility)
//! must be known; telemetry-only hints (workload type, app protocol) are not
//! checked, so a newer istiod's additions there do not get resources NACKed.
//! The xDS client knows nothing of this module: [`crate::Store`] implements
//! the client's handler with it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use identity::Identity;

use crate::proto::istio::workload as pb;
use crate::service::{NetworkAddress, Port, Service, service_key};
use crate::workload::{DEFAULT_CLUSTER_ID, TunnelProtocol, Workload, WorkloadStatus};

#[cfg(test)]
mod tests;

/// A decoded, validated `istio.workload.Address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Workload(Workload),
    Service(Service),
}

impl Resource {
    /// The xDS resource name: the workload uid or `namespace/hostname`.
    pub fn name(&self) -> String {
        match self {
            Resource::Workload(w) => w.uid.clone(),
            Resource::Service(s) => s.key(),
        }
    }
}

/// Why an `istio.workload.Address` was rejected. `field` is the path of the
/// offending field inside the message, e.g. `workload.addresses[1]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the Address holds neither a workload nor a service")]
    Empty,
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field} has {len} bytes; an IP address has 4 or 16")]
    IpBytes { field: String, len: usize },
    #[error("{field} prefix length {length} exceeds {max} for {ip}")]
    PrefixLength {
        field: String,
        length: u32,
        max: u32,
        ip: IpAddr,
    },
    #[error("{field} has unknown value {value}")]
    UnknownEnum { field: String, value: i32 },
    #[error("{field} = {value} is not supported by this agent")]
    Unsupported { field: String, value: &'static str },
    #[error("{field} {value} is not a valid port (1-65535)")]
    Port { field: String, value: u32 },
    #[error("{field} key {key:?} is not of the form namespace/hostname")]
    ServiceKey { field: String, key: String },
    #[error("{field}: {source}")]
    Identity {
        field: String,
        source: identity::IdentityError,
    },
    #[error("resource name {name:?} does not match the {kind}'s own name {own:?}")]
    Name {
        name: String,
        kind: &'static str,
        own: String,
    },
}

/// Converts a decoded Address into a state resource; `name` is the xDS
/// resource name it arrived under, which must be the resource's own name.
pub fn decode(name: &str, address: pb::Address) -> Result<Resource, AddressError> {
    let resource = match address.r#type {
        Some(pb::address::Type::Workload(w)) => Resource::Workload(workload(w)?),
        Some(pb::address::Type::Service(s)) => Resource::Service(service(s)?),
        None => return Err(AddressError::Empty),
    };
    let own = resource.name();
    if own != name {
        let kind = match resource {
            Resource::Workload(_) => "workload",
            Resource::Service(_) => "service",
        };
        return Err(AddressError::Name {
            name: name.to_owned(),
            kind,
            own,
        });
    }
    Ok(resource)
}

fn workload(w: pb::Workload) -> Result<Workload, AddressError> {
    let f = |name: &str| format!("workload.{name}");
    required(&w.uid, f("uid"))?;
    required(&w.namespace, f("namespace"))?;
    let id = Identity::with_defaults(&w.trust_domain, &w.namespace, &w.service_account).map_err(
        |source| AddressError::Identity {
            field: f("namespace/trust_domain/service_account"),
            source,
        },
    )?;
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, b)| ip(b, format!("workload.addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let tunnel_protocol =
        match known::<pb::TunnelProtocol>(w.tunnel_protocol, f("tunnel_protocol"))? {
            pb::TunnelProtocol::None => TunnelProtocol::None,
            pb::TunnelProtocol::Hbone => TunnelProtocol::Hbone,
            pb::TunnelProtocol::LegacyIstioMtls => {
                return Err(AddressError::Unsupported {
                    field: f("tunnel_protocol"),
                    value: "LEGACY_ISTIO_MTLS",
                });
            }
        };
    let status = match known::<pb::WorkloadStatus>(w.status, f("status"))? {
        pb::WorkloadStatus::Healthy => WorkloadStatus::Healthy,
        pb::WorkloadStatus::Unhealthy => WorkloadStatus::Unhealthy,
    };
    known::<pb::NetworkMode>(w.network_mode, f("network_mode"))?;
    if let Some(tunnel) = &w.application_tunnel {
        known::<pb::application_tunnel::Protocol>(
            tunnel.protocol,
            f("application_tunnel.protocol"),
        )?;
        port_or_zero(tunnel.port, f("application_tunnel.port"))?;
    }
    if let Some(g) = &w.waypoint {
        gateway(g, &f("waypoint"))?;
    }
    if let Some(g) = &w.network_gateway {
        gateway(g, &f("network_gateway"))?;
    }
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let field = f("services");
        if !key.contains('/') {
            return Err(AddressError::ServiceKey {
                field,
                key: key.clone(),
            });
        }
        let ports = list
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| port(p, &format!("{field}[{key}].ports[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        services.insert(key.clone(), ports);
    }
    let mut out = Workload::new(w.uid, w.name, id);
    out.addresses = addresses;
    out.node = w.node;
    out.network = w.network;
    out.tunnel_protocol = tunnel_protocol;
    out.services = services;
    out.status = status;
    out.authorization_policies = w.authorization_policies;
    if !w.cluster_id.is_empty() {
        out.cluster_id = w.cluster_id;
    }
    out.capacity = w.capacity.unwrap_or(1);
    Ok(out)
}

fn service(s: pb::Service) -> Result<Service, AddressError> {
    let f = |name: &str| format!("service.{name}");
    required(&s.name, f("name"))?;
    required(&s.namespace, f("namespace"))?;
    required(&s.hostname, f("hostname"))?;
    let mut addresses = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        let field = format!("service.addresses[{i}]");
        if let Some(vip) = network_address(a, &field)? {
            addresses.push(vip);
        } else {
            tracing::debug!(service = %service_key(&s.namespace, &s.hostname), %field,
                "CIDR service address is not used as a VIP");
        }
    }
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| port(p, &format!("service.ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, san)| {
            san.parse::<Identity>()
                .map_err(|source| AddressError::Identity {
                    field: format!("service.subject_alt_names[{i}]"),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(g) = &s.waypoint {
        gateway(g, &f("waypoint"))?;
    }
    for (i, w) in s.weighted_waypoints.iter().enumerate() {
        let field = format!("service.weighted_waypoints[{i}].destination");
        match &w.destination {
            Some(g) => gateway(g, &field)?,
            None => return Err(AddressError::Missing { field }),
        }
    }
    if let Some(lb) = &s.load_balancing {
        for (i, &scope) in lb.routing_preference.iter().enumerate() {
            known::<pb::load_balancing::Scope>(
                scope,
                format!("service.load_balancing.routing_preference[{i}]"),
            )?;
        }
        known::<pb::load_balancing::Mode>(lb.mode, f("load_balancing.mode"))?;
        known::<pb::load_balancing::HealthPolicy>(
            lb.health_policy,
            f("load_balancing.health_policy"),
        )?;
    }
    known::<pb::IpFamilies>(s.ip_families, f("ip_families"))?;
    known::<pb::service::Visibility>(s.visibility, f("visibility"))?;
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses,
        ports,
        subject_alt_names,
    })
}

fn required(value: &str, field: String) -> Result<(), AddressError> {
    if value.is_empty() {
        return Err(AddressError::Missing { field });
    }
    Ok(())
}

fn ip(bytes: &[u8], field: String) -> Result<IpAddr, AddressError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).expect("length checked"),
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).expect("length checked"),
        )),
        len => Err(AddressError::IpBytes { field, len }),
    }
}

/// A host address, or `None` for a real CIDR range (valid, but not a VIP).
fn network_address(
    a: &pb::NetworkAddress,
    field: &str,
) -> Result<Option<NetworkAddress>, AddressError> {
    let address = ip(&a.address, format!("{field}.address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    match a.length {
        Some(length) if length > max => Err(AddressError::PrefixLength {
            field: format!("{field}.length"),
            length,
            max,
            ip: address,
        }),
        Some(length) if length < max => Ok(None),
        _ => Ok(Some(NetworkAddress {
            network: a.network.clone(),
            address,
        })),
    }
}

fn gateway(g: &pb::GatewayAddress, field: &str) -> Result<(), AddressError> {
    match &g.destination {
        None => {
            return Err(AddressError::Missing {
                field: format!("{field}.destination"),
            });
        }
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            required(&h.namespace, format!("{field}.hostname.namespace"))?;
            required(&h.hostname, format!("{field}.hostname.hostname"))?;
        }
        Some(pb::gateway_address::Destination::Address(a)) => {
            network_address(a, &format!("{field}.address"))?;
        }
    }
    port_or_zero(g.hbone_mtls_port, format!("{field}.hbone_mtls_port"))?;
    Ok(())
}

fn port(p: &pb::Port, field: &str) -> Result<Port, AddressError> {
    let service_port = match u16::try_from(p.service_port) {
        Ok(v) if v != 0 => v,
        _ => {
            return Err(AddressError::Port {
                field: format!("{field}.service_port"),
                value: p.service_port,
            });
        }
    };
    let target_port = port_or_zero(p.target_port, format!("{field}.target_port"))?;
    Ok(Port {
        service_port,
        target_port,
    })
}

/// A port where 0 means "unset".
fn port_or_zero(value: u32, field: String) -> Result<u16, AddressError> {
    u16::try_from(value).map_err(|_| AddressError::Port { field, value })
}

/// Checks that `value` is a value of the prost enum `E`.
fn known<E: TryFrom<i32>>(value: i32, field: String) -> Result<E, AddressError> {
    E::try_from(value).map_err(|_| AddressError::UnknownEnum { field, value })
}

/// The Address resource for a workload, as the ADS server sends it.
pub fn encode_workload(w: &Workload) -> pb::Address {
    let services = w
        .services
        .iter()
        .map(|(key, ports)| {
            let ports = ports.iter().map(encode_port).collect();
            (key.clone(), pb::PortList { ports })
        })
        .collect();
    let workload = pb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace().to_owned(),
        addresses: w.addresses.iter().map(ip_bytes).collect(),
        network: w.network.clone(),
        tunnel_protocol: match w.tunnel_protocol {
            TunnelProtocol::None => pb::TunnelProtocol::None,
            TunnelProtocol::Hbone => pb::TunnelProtocol::Hbone,
        } as i32,
        trust_domain: w.trust_domain().to_owned(),
        service_account: w.service_account().to_owned(),
        node: w.node.clone(),
        services,
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            WorkloadStatus::Healthy => pb::WorkloadStatus::Healthy,
            WorkloadStatus::Unhealthy => pb::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: if w.cluster_id == DEFAULT_CLUSTER_ID {
            String::new()
        } else {
            w.cluster_id.clone()
        },
        capacity: (w.capacity != 1).then_some(w.capacity),
        ..Default::default()
    };
    pb::Address {
        r#type: Some(pb::address::Type::Workload(workload)),
    }
}

/// The Address resource for a service, as the ADS server sends it.
pub fn encode_service(s: &Service) -> pb::Address {
    let service = pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .addresses
            .iter()
            .map(|a| pb::NetworkAddress {
                network: a.network.clone(),
                address: ip_bytes(&a.address),
                length: None,
            })
            .collect(),
        ports: s.ports.iter().map(encode_port).collect(),
        subject_alt_names: s.subject_alt_names.iter().map(|i| i.to_string()).collect(),
        ..Default::default()
    };
    pb::Address {
        r#type: Some(pb::address::Type::Service(service)),
    }
}

fn encode_port(p: &Port) -> pb::Port {
    pb::Port {
        service_port: p.service_port.into(),
        target_port: p.target_port.into(),
        app_protocol: pb::AppProtocol::Unknown as i32,
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl crate::handler::Handler<pb::Address> for crate::Store {
    /// Validates outside the lock, then applies the valid updates and the
    /// removals in one write. A removal name is a workload uid or a service
    /// key; whichever is held goes.
    fn apply(
        &self,
        updates: Vec<crate::handler::Update<pb::Address>>,
        removals: &[String],
    ) -> Vec<crate::handler::Rejection> {
        let mut rejected = Vec::new();
        let mut valid = Vec::with_capacity(updates.len());
        for u in updates {
            match decode(&u.name, u.resource) {
                Ok(r) => valid.push(r),
                Err(e) => {
                    tracing::warn!(resource = %u.name, error = %e, "rejecting Address resource");
                    rejected.push(crate::handler::Rejection::new(u.name, e));
                }
            }
        }
        self.update(|state| {
            for r in valid {
                match r {
                    Resource::Workload(w) => drop(state.upsert_workload(w)),
                    Resource::Service(s) => drop(state.upsert_service(s)),
                }
            }
            for name in removals {
                if state.remove_workload(name).is_none() {
                    state.remove_service(name);
                }
            }
        });
        rejected
    }
}
