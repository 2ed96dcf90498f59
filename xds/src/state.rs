//! The mesh state and its indexes: workloads by uid, by `(network, IP)` and
//! by node; services by key and by VIP; endpoints by service; authorization
//! policies (indexed in `policy`).
//!
//! Sources (the local file, later xDS) upsert and remove single resources by
//! name and the indexes follow; the proxy resolves destinations here. The
//! state trusts its input: validating resources belongs to the sources.
//! Sharing it between threads is [`crate::Store`]'s job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use identity::Identity;
use rand::Rng;

use crate::policy::Policies;
use crate::service::Service;
use crate::workload::Workload;

#[cfg(test)]
mod tests;

/// Where a connection to an original destination address should go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// The address is a service VIP and port; `workload` is the chosen
    /// healthy endpoint and `target_port` the port to dial on it.
    Service {
        service: Arc<Service>,
        workload: Arc<Workload>,
        target_port: u16,
    },
    /// The address is a service VIP and port, but no endpoint can take it.
    NoHealthyEndpoint { service: Arc<Service> },
    /// The address is a workload's own IP.
    Workload { workload: Arc<Workload>, port: u16 },
    /// Not in the mesh.
    Unknown,
}

impl Destination {
    /// The identities the destination may prove: the workload's own and,
    /// through a service, the service's subject alt names.
    pub fn expected_identities(&self) -> Vec<Identity> {
        match self {
            Destination::Service {
                service, workload, ..
            } => std::iter::once(workload.identity())
                .chain(&service.subject_alt_names)
                .cloned()
                .collect(),
            Destination::Workload { workload, .. } => vec![workload.identity().clone()],
            Destination::NoHealthyEndpoint { .. } | Destination::Unknown => Vec::new(),
        }
    }
}

/// All known workloads and services, with consistent indexes.
#[derive(Debug, Clone, Default)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    workload_ips: AddressIndex<Workload>,
    node_workloads: HashMap<String, BTreeSet<String>>,
    services: HashMap<String, Arc<Service>>,
    service_vips: AddressIndex<Service>,
    /// Service key → uid → workload. Kept also for services not (yet)
    /// known: xDS may deliver a workload before the service it backs.
    endpoints: HashMap<String, BTreeMap<String, Arc<Workload>>>,
    policies: Policies,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the workload with this uid; returns the one replaced.
    pub fn upsert_workload(&mut self, workload: impl Into<Arc<Workload>>) -> Option<Arc<Workload>> {
        let workload = workload.into();
        let old = self
            .workloads
            .insert(workload.uid.clone(), workload.clone());
        if let Some(old) = &old {
            self.unindex_workload(old);
        }
        self.index_workload(&workload);
        old
    }

    /// Removes the workload with this uid; returns it.
    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        self.unindex_workload(&old);
        Some(old)
    }

    /// Adds or replaces the service with this `namespace/hostname`; returns
    /// the one replaced.
    pub fn upsert_service(&mut self, service: impl Into<Arc<Service>>) -> Option<Arc<Service>> {
        let service = service.into();
        let key = service.key();
        let old = self.services.insert(key.clone(), service.clone());
        if let Some(old) = &old {
            self.unindex_service(&key, old);
        }
        for vip in &service.addresses {
            if let Some(other) = self
                .service_vips
                .claim(&vip.network, vip.address, &service, |s| s.key() == key)
            {
                tracing::warn!(
                    network = %vip.network, vip = %vip.address, service = %key, previous = %other.key(),
                    "VIP claimed by two services; the latest wins"
                );
            }
        }
        old
    }

    /// Removes the service with this `namespace/hostname`; returns it.
    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        self.unindex_service(key, &old);
        Some(old)
    }

    /// Authorization policies, indexed by where they apply.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    pub fn policies_mut(&mut self) -> &mut Policies {
        &mut self.policies
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    /// The workload with this IP in this network (empty: the default network).
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workload_ips.get(network, ip).cloned()
    }

    /// Workloads scheduled on `node`, ordered by uid.
    pub fn workloads_on_node(&self, node: &str) -> Vec<Arc<Workload>> {
        self.node_workloads
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid).cloned())
            .collect()
    }

    /// The service by `namespace/hostname`.
    pub fn service_by_key(&self, key: &str) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The service whose VIP in `network` is `vip`'s IP, if it also has
    /// `vip`'s port.
    pub fn service_by_vip(&self, network: &str, vip: SocketAddr) -> Option<Arc<Service>> {
        self.service_vips
            .get(network, vip.ip())
            .filter(|s| s.port(vip.port()).is_some())
            .cloned()
    }

    /// Workloads that name the service `namespace/hostname` in their
    /// `services`, healthy or not, ordered by uid.
    pub fn endpoints(&self, service_key: &str) -> Vec<Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .map(|eps| eps.values().cloned().collect())
            .unwrap_or_default()
    }

    /// All workloads, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// All services, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// Decides where a connection to `dst`, seen in `network`, goes. A service
    /// VIP picks a random healthy endpoint.
    pub fn resolve(&self, network: &str, dst: SocketAddr) -> Destination {
        self.resolve_with(network, dst, &mut rand::rng())
    }

    pub(crate) fn resolve_with(
        &self,
        network: &str,
        dst: SocketAddr,
        rng: &mut impl Rng,
    ) -> Destination {
        if let Some(service) = self.service_by_vip(network, dst) {
            return self.pick_endpoint(service, dst.port(), rng);
        }
        match self.workload_by_ip(network, dst.ip()) {
            Some(workload) => Destination::Workload {
                workload,
                port: dst.port(),
            },
            None => Destination::Unknown,
        }
    }

    fn pick_endpoint(
        &self,
        service: Arc<Service>,
        service_port: u16,
        rng: &mut impl Rng,
    ) -> Destination {
        let key = service.key();
        // A workload without an address cannot be dialled, whatever its health.
        let usable = |w: &&Arc<Workload>| w.is_healthy() && !w.addresses.is_empty();
        let candidates = || {
            self.endpoints
                .get(&key)
                .into_iter()
                .flat_map(|e| e.values())
        };
        // Count, then walk again: no allocation per connection.
        let count = candidates().filter(usable).count();
        let chosen = match count {
            0 => None,
            n => candidates().filter(usable).nth(rng.random_range(0..n)),
        };
        let Some(workload) = chosen.cloned() else {
            return Destination::NoHealthyEndpoint { service };
        };
        let target_port = workload
            .target_port(&key, service_port)
            .or_else(|| {
                service
                    .port(service_port)
                    .map(|p| p.target_port)
                    .filter(|&p| p != 0)
            })
            .unwrap_or(service_port);
        Destination::Service {
            service,
            workload,
            target_port,
        }
    }

    fn index_workload(&mut self, workload: &Arc<Workload>) {
        let uid = &workload.uid;
        for &ip in &workload.addresses {
            if let Some(other) = self
                .workload_ips
                .claim(&workload.network, ip, workload, |w| &w.uid == uid)
            {
                tracing::warn!(
                    network = %workload.network, %ip, workload = %uid, previous = %other.uid,
                    "address claimed by two workloads; the latest wins"
                );
            }
        }
        self.node_workloads
            .entry(workload.node.clone())
            .or_default()
            .insert(uid.clone());
        for key in workload.services.keys() {
            self.endpoints
                .entry(key.clone())
                .or_default()
                .insert(uid.clone(), workload.clone());
        }
    }

    fn unindex_workload(&mut self, workload: &Workload) {
        let uid = &workload.uid;
        for &ip in &workload.addresses {
            self.workload_ips
                .release(&workload.network, ip, |w| &w.uid == uid);
        }
        if let Some(uids) = self.node_workloads.get_mut(&workload.node) {
            uids.remove(uid);
            if uids.is_empty() {
                self.node_workloads.remove(&workload.node);
            }
        }
        for key in workload.services.keys() {
            if let Some(eps) = self.endpoints.get_mut(key) {
                eps.remove(uid);
                if eps.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
    }

    fn unindex_service(&mut self, key: &str, service: &Service) {
        for vip in &service.addresses {
            self.service_vips
                .release(&vip.network, vip.address, |s| s.key() == key);
        }
    }
}

/// `(network, IP)` → the resources claiming that address.
///
/// Two resources may claim one address for a while (xDS applies changes one
/// at a time, e.g. a pod IP reused before the old pod's removal arrives). The
/// latest claim is the one looked up; when it goes, the earlier one is found
/// again instead of the address vanishing.
#[derive(Debug)]
struct AddressIndex<T> {
    /// The default network (`""`), where nearly every look-up goes, has its own map: finding
    /// an empty `String` key compares zero bytes at a dangling pointer, which measured ~200 ns
    /// on the 2-core dev VM (likely the AVX-512 compare's masked load next to an unmapped
    /// page) against ~60 ns for a one-byte key (`cargo bench -p benches --bench lookup`).
    default: HashMap<IpAddr, Vec<Arc<T>>>,
    by_network: HashMap<String, HashMap<IpAddr, Vec<Arc<T>>>>,
}

impl<T> Default for AddressIndex<T> {
    fn default() -> Self {
        Self {
            default: HashMap::new(),
            by_network: HashMap::new(),
        }
    }
}

impl<T> Clone for AddressIndex<T> {
    fn clone(&self) -> Self {
        Self {
            default: self.default.clone(),
            by_network: self.by_network.clone(),
        }
    }
}

impl<T> AddressIndex<T> {
    fn network(&self, network: &str) -> Option<&HashMap<IpAddr, Vec<Arc<T>>>> {
        if network.is_empty() {
            Some(&self.default)
        } else {
            self.by_network.get(network)
        }
    }

    fn get(&self, network: &str, ip: IpAddr) -> Option<&Arc<T>> {
        self.network(network)?.get(&ip)?.last()
    }

    /// Makes `item` the owner of the address, dropping an older claim by the
    /// same resource (`same`); returns the other resource it takes over from.
    fn claim(
        &mut self,
        network: &str,
        ip: IpAddr,
        item: &Arc<T>,
        same: impl Fn(&T) -> bool,
    ) -> Option<Arc<T>> {
        let ips = if network.is_empty() {
            &mut self.default
        } else {
            self.by_network.entry(network.to_owned()).or_default()
        };
        let claims = ips.entry(ip).or_default();
        claims.retain(|c| !same(c));
        let previous = claims.last().cloned();
        claims.push(item.clone());
        previous
    }

    /// Drops the claim of the resource `same` matches.
    fn release(&mut self, network: &str, ip: IpAddr, same: impl Fn(&T) -> bool) {
        let ips = if network.is_empty() {
            &mut self.default
        } else if let Some(ips) = self.by_network.get_mut(network) {
            ips
        } else {
            return;
        };
        if let Some(claims) = ips.get_mut(&ip) {
            claims.retain(|c| !same(c));
            if claims.is_empty() {
                ips.remove(&ip);
            }
        }
        if ips.is_empty() && !network.is_empty() {
            self.by_network.remove(network);
        }
    }
}
