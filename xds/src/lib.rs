//! The mesh as this node sees it: workloads, services, the indexes the proxy
//! resolves connections with, and the sources that fill them.
//!
//! [`State`] holds validated [`Workload`]s and [`Service`]s, keyed the way
//! xDS names them (workload uid, `namespace/hostname`), so a source can
//! upsert or remove one resource at a time; [`Store`] shares it between the
//! control and data planes. [`local`] reads the YAML mesh file. [`policy`]
//! holds L4 authorization policies, their index and their evaluation. Delta
//! xDS will join as a further source. Sockets, TLS and the proxy itself
//! belong to the agent.

pub mod local;
pub mod policy;
mod service;
mod state;
mod store;
mod workload;

pub use policy::{Policies, Policy};
pub use service::{NetworkAddress, Port, Service, service_key};
pub use state::{Destination, State};
pub use store::Store;
pub use workload::{TunnelProtocol, Workload, WorkloadStatus};
