//! The local mesh file: workloads, services and authorization policies in
//! YAML, with Istio's field names in camelCase, for running without a
//! control plane.
//!
//! [`parse`] and [`load`] turn the text into a validated [`Mesh`] or an
//! error naming the file, the field and the problem; [`Mesh::into_state`]
//! builds the [`State`] the proxy reads. Reading the file's shape is in
//! `schema`; this module checks entries against each other.

mod error;
mod policies;
mod schema;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use identity::Identity;
use serde_saphyr::Spanned;

pub use error::{Invalid, LoadError, Position, Problem};

use crate::policy::Policy;
use crate::service::{NetworkAddress, Port, Service, service_key};
use crate::state::State;
use crate::workload::Workload;
use error::key_segment;

/// The validated content of a mesh file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mesh {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
}

impl Mesh {
    pub fn into_state(self) -> State {
        State::from(self)
    }
}

impl From<Mesh> for State {
    fn from(mesh: Mesh) -> Self {
        let mut state = State::new();
        for service in mesh.services {
            state.upsert_service(service);
        }
        for workload in mesh.workloads {
            state.upsert_workload(workload);
        }
        for policy in mesh.policies {
            state.policies_mut().upsert(policy);
        }
        state
    }
}

/// Reads and validates the mesh file at `path`.
pub fn load(path: &Path) -> Result<Mesh, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, &bytes)
}

/// Validates `bytes`, read from the mesh file at `path` (named in errors).
pub fn parse_file(path: &Path, bytes: &[u8]) -> Result<Mesh, LoadError> {
    let text = std::str::from_utf8(bytes).map_err(|e| LoadError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let mesh = parse_text(text).map_err(|mut invalid| {
        invalid.file = Some(path.to_owned());
        invalid
    })?;
    tracing::debug!(
        path = %path.display(), workloads = mesh.workloads.len(), services = mesh.services.len(),
        policies = mesh.policies.len(), "loaded mesh file"
    );
    Ok(mesh)
}

/// Validates mesh file text. Empty text or `{}` is an empty mesh.
pub fn parse(text: &str) -> Result<Mesh, LoadError> {
    Ok(parse_text(text)?)
}

/// Follows a file that is edited in place. A writer truncates the file and then writes it, so a
/// read can land in between and find it empty or cut off, which may well parse (an empty file is
/// an empty mesh). An edit is therefore taken only once two consecutive reads agree: it costs
/// one poll interval per edit, and a torn read is never served.
#[derive(Debug, Default)]
pub struct Settle {
    /// The content in force (`None`: the file could not be read).
    taken: Option<Vec<u8>>,
    /// What the last read found.
    seen: Option<Vec<u8>>,
}

impl Settle {
    /// Starts from `taken`, the content already in force.
    pub fn new(taken: Option<Vec<u8>>) -> Self {
        Self {
            seen: taken.clone(),
            taken,
        }
    }

    /// Whether the last read differed from the content in force, so the next read decides.
    pub fn pending(&self) -> bool {
        self.seen != self.taken
    }

    /// Offers what one read found (`None`: unreadable). Returns true when it differs from the
    /// content in force and the previous read found the same: it is then in force
    /// ([`Settle::taken`]).
    pub fn offer(&mut self, read: Option<Vec<u8>>) -> bool {
        if read == self.taken || read != self.seen {
            self.seen = read;
            return false;
        }
        self.taken = read;
        true
    }

    /// The content in force.
    pub fn taken(&self) -> Option<&[u8]> {
        self.taken.as_deref()
    }
}

fn parse_text(text: &str) -> Result<Mesh, Box<Invalid>> {
    let file = read(text)?;
    let mut mesh = Mesh::default();
    let services = Services::check(file.services.unwrap_or_default(), &mut mesh.services)?;
    let policies = policies::Seen::check(file.policies.unwrap_or_default(), &mut mesh.policies)?;
    Workloads::check(
        file.workloads.unwrap_or_default(),
        &services,
        &policies,
        &mut mesh.workloads,
    )?;
    Ok(mesh)
}

/// Parses the YAML into the file's shape, keeping the path serde reached
/// when it fails.
fn read(text: &str) -> Result<schema::File, Box<Invalid>> {
    let mut failed_at = None;
    let file: Result<Option<schema::File>, _> =
        serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                failed_at = Some(e.path().clone());
                e.into_inner()
            })
        });
    // `None`: an empty document.
    file.map(Option::unwrap_or_default)
        .map_err(|e| error::from_parser(&e, failed_at.as_ref()))
}

fn at<T>(spanned: &Spanned<T>) -> Option<Position> {
    Position::of(spanned.referenced)
}

/// The services seen so far, to check VIPs and workload references against.
struct Services {
    /// Key → index in the file.
    by_key: HashMap<String, usize>,
    /// `(network, VIP)` → service key and field path.
    vips: HashMap<(String, IpAddr), (String, String)>,
}

impl Services {
    fn check(
        entries: Vec<Spanned<schema::ServiceEntry>>,
        out: &mut Vec<Service>,
    ) -> Result<Self, Box<Invalid>> {
        let mut seen = Services {
            by_key: HashMap::new(),
            vips: HashMap::new(),
        };
        for (i, entry) in entries.into_iter().enumerate() {
            let field = format!("services[{i}]");
            let s = entry.value;
            let key = service_key(&s.namespace.value, &s.hostname.value);
            if let Some(first) = seen.by_key.get(&key) {
                return Err(Invalid::new(
                    field,
                    Position::of(entry.referenced),
                    Problem::DuplicateService {
                        key,
                        first: format!("services[{first}]"),
                    },
                ));
            }
            seen.by_key.insert(key.clone(), i);
            let mut addresses = Vec::with_capacity(s.addresses.len());
            for (j, vip) in s.addresses.iter().enumerate() {
                let vip_field = format!("{field}.addresses[{j}]");
                let schema::VipEntry { network, address } = &vip.value;
                let slot = (network.clone(), *address);
                if let Some((other, other_field)) = seen.vips.get(&slot) {
                    return Err(Invalid::new(
                        vip_field,
                        at(vip),
                        Problem::DuplicateVip {
                            network: network.clone(),
                            ip: *address,
                            service: key,
                            other: other.clone(),
                            other_field: other_field.clone(),
                        },
                    ));
                }
                seen.vips.insert(slot, (key.clone(), vip_field));
                addresses.push(NetworkAddress {
                    network: network.clone(),
                    address: *address,
                });
            }
            out.push(Service {
                name: s.name.value,
                namespace: s.namespace.value,
                hostname: s.hostname.value,
                addresses,
                ports: ports(&s.ports, &format!("{field}.ports"))?,
                subject_alt_names: s.subject_alt_names.into_iter().map(|id| id.0).collect(),
            });
        }
        Ok(seen)
    }
}

/// The workloads seen so far, to check uids and addresses against.
struct Workloads<'a> {
    services: &'a Services,
    policies: &'a policies::Seen,
    /// Uid → index in the file.
    uids: HashMap<String, usize>,
    /// `(network, IP)` → owner's uid and field path.
    ips: HashMap<(String, IpAddr), (String, String)>,
}

impl<'a> Workloads<'a> {
    fn check(
        entries: Vec<Spanned<schema::WorkloadEntry>>,
        services: &'a Services,
        policies: &'a policies::Seen,
        out: &mut Vec<Workload>,
    ) -> Result<(), Box<Invalid>> {
        let mut seen = Workloads {
            services,
            policies,
            uids: HashMap::new(),
            ips: HashMap::new(),
        };
        for (i, entry) in entries.into_iter().enumerate() {
            out.push(seen.workload(i, entry)?);
        }
        Ok(())
    }

    fn workload(
        &mut self,
        i: usize,
        entry: Spanned<schema::WorkloadEntry>,
    ) -> Result<Workload, Box<Invalid>> {
        let field = format!("workloads[{i}]");
        let entry_at = Position::of(entry.referenced);
        let w = entry.value;
        let uid = self.uid(i, &field, entry_at, &w)?;
        let identity = Identity::with_defaults(
            w.trust_domain.as_ref().map_or("", |td| &td.value),
            &w.namespace.value,
            w.service_account.as_ref().map_or("", |sa| &sa.value),
        )
        .map_err(|e| Invalid::new(field.clone(), entry_at, e.into()))?;
        let network = w.network.unwrap_or_default();
        let addresses = self.addresses(&field, &uid, &network, &w.addresses)?;
        let services = self.backed_services(&field, w.services)?;

        let mut workload = Workload::new(uid, w.name.value, identity);
        workload.addresses = addresses;
        workload.node = w.node.value;
        workload.network = network;
        workload.tunnel_protocol = w.tunnel_protocol.into();
        workload.status = w.status.into();
        workload.services = services;
        for (j, key) in w.authorization_policies.iter().enumerate() {
            self.policies.reference(key).map_err(|problem| {
                Invalid::new(
                    format!("{field}.authorizationPolicies[{j}]"),
                    entry_at,
                    problem,
                )
            })?;
        }
        workload.authorization_policies = w.authorization_policies;
        workload.netns = w.netns.map(|p| p.value.into());
        Ok(workload)
    }

    fn uid(
        &mut self,
        i: usize,
        field: &str,
        entry_at: Option<Position>,
        w: &schema::WorkloadEntry,
    ) -> Result<String, Box<Invalid>> {
        let (uid, uid_field, uid_at) = match &w.uid {
            Some(uid) => (uid.value.value.clone(), format!("{field}.uid"), at(uid)),
            // Istio's uids are opaque; this one is just unique and readable.
            None => (
                format!("{}/{}", w.namespace.value, w.name.value),
                field.to_owned(),
                entry_at,
            ),
        };
        if let Some(first) = self.uids.get(&uid) {
            return Err(Invalid::new(
                uid_field,
                uid_at,
                Problem::DuplicateUid {
                    uid,
                    first: format!("workloads[{first}]"),
                },
            ));
        }
        self.uids.insert(uid.clone(), i);
        Ok(uid)
    }

    /// Claims the workload's addresses in its network: each may belong to
    /// one workload and must not be a service VIP.
    fn addresses(
        &mut self,
        field: &str,
        uid: &str,
        network: &str,
        entries: &[Spanned<schema::Ip>],
    ) -> Result<Vec<IpAddr>, Box<Invalid>> {
        let mut addresses = Vec::with_capacity(entries.len());
        for (j, entry) in entries.iter().enumerate() {
            let ip_field = format!("{field}.addresses[{j}]");
            let ip = entry.value.0;
            let slot = (network.to_owned(), ip);
            if let Some((service, service_field)) = self.services.vips.get(&slot) {
                return Err(Invalid::new(
                    ip_field,
                    at(entry),
                    Problem::AddressIsVip {
                        network: network.to_owned(),
                        ip,
                        uid: uid.to_owned(),
                        service: service.clone(),
                        service_field: service_field.clone(),
                    },
                ));
            }
            if let Some((other, other_field)) = self.ips.get(&slot) {
                return Err(Invalid::new(
                    ip_field,
                    at(entry),
                    Problem::DuplicateAddress {
                        network: network.to_owned(),
                        ip,
                        uid: uid.to_owned(),
                        other: other.clone(),
                        other_field: other_field.clone(),
                    },
                ));
            }
            self.ips.insert(slot, (uid.to_owned(), ip_field));
            addresses.push(ip);
        }
        Ok(addresses)
    }

    /// The workload's `services`: each must be one of the file's services.
    fn backed_services(
        &self,
        field: &str,
        entries: HashMap<schema::Checked<schema::ServiceKey>, Spanned<schema::PortList>>,
    ) -> Result<BTreeMap<String, Vec<Port>>, Box<Invalid>> {
        // In file order, so the first bad reference is the one reported.
        let mut entries: Vec<_> = entries.into_iter().collect();
        entries.sort_by_key(|(_, list)| (list.referenced.line(), list.referenced.column()));
        let mut services = BTreeMap::new();
        for (key, list) in entries {
            let key = key.value;
            let key_field = format!("{field}.services{}", key_segment("services", &key));
            if !self.services.by_key.contains_key(&key) {
                return Err(Invalid::new(
                    key_field,
                    at(&list),
                    Problem::UnknownService { key },
                ));
            }
            let ports = ports(&list.value.ports, &format!("{key_field}.ports"))?;
            services.insert(key, ports);
        }
        Ok(services)
    }
}

/// Converts a port list, refusing a service port listed twice.
fn ports(entries: &[Spanned<schema::PortEntry>], field: &str) -> Result<Vec<Port>, Box<Invalid>> {
    let mut out: Vec<Port> = Vec::with_capacity(entries.len());
    for (j, entry) in entries.iter().enumerate() {
        let service_port = entry.value.service_port.0;
        if let Some(first) = out.iter().position(|p| p.service_port == service_port) {
            return Err(Invalid::new(
                format!("{field}[{j}].servicePort"),
                at(entry),
                Problem::DuplicatePort {
                    port: service_port,
                    first: format!("{field}[{first}]"),
                },
            ));
        }
        out.push(Port {
            service_port,
            target_port: entry.value.target_port.map_or(0, |p| p.0),
        });
    }
    Ok(out)
}
