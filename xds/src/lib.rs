//! The mesh as this node sees it: workloads, services, the indexes the proxy
//! resolves connections with, and the sources that fill them.
//!
//! [`State`] holds validated [`Workload`]s and [`Service`]s, keyed the way
//! xDS names them (workload uid, `namespace/hostname`), so a source can
//! upsert or remove one resource at a time; [`Store`] shares it between the
//! control and data planes. [`local`] reads the YAML mesh file. Delta xDS and
//! authorization policies will join as further sources and state beside
//! these. Sockets, TLS and the proxy itself belong to the agent.

pub mod address;
pub mod client;
pub mod connection;
#[cfg(feature = "testing")]
pub mod fake;
pub mod handler;
pub mod local;
pub mod proto;
pub mod server;
mod service;
mod state;
mod store;
mod workload;

pub use service::{NetworkAddress, Port, Service, service_key};
pub use state::{Destination, State};
pub use store::Store;
pub use workload::{DEFAULT_CLUSTER_ID, TunnelProtocol, Workload, WorkloadStatus};
