//! The mesh as this node sees it: workloads, services, the indexes the proxy
//! resolves connections with, and the sources that fill them.
//!
//! [`State`] holds validated [`Workload`]s and [`Service`]s, keyed the way
//! xDS names them (workload uid, `namespace/hostname`), so a source can
//! upsert or remove one resource at a time; [`Store`] shares it between the
//! control and data planes and notifies writes. Two sources fill it:
//! [`local`] reads the YAML mesh file, and [`client`] speaks delta xDS to
//! istiod through our own [`proto`] files. The client calls a narrow
//! [`handler::Handler`] per type; [`Store`] implements it for
//! `istio.workload.Address` with the validating conversion in [`address`],
//! and for `istio.security.Authorization` with the one in [`authorization`]
//! (a rejected policy is replaced by a stand-in that fails closed).
//! [`server`] serves a snapshot (e.g. the mesh file) over delta ADS for the
//! development control plane, and `fake` (feature `testing`) is a scriptable
//! control plane for tests. [`policy`] holds L4 authorization policies, their
//! index and their evaluation. TLS here is only the control-plane channel;
//! sockets and the proxy belong to the agent.

pub mod address;
pub mod authorization;
pub mod client;
pub mod connection;
#[cfg(feature = "testing")]
pub mod fake;
pub mod handler;
pub mod local;
pub mod policy;
pub mod proto;
pub mod server;
mod service;
mod state;
mod store;
mod workload;

pub use policy::{Policies, Policy};
pub use service::{NetworkAddress, Port, Service, service_key};
pub use state::{Destination, State};
pub use store::Store;
pub use workload::{DEFAULT_CLUSTER_ID, TunnelProtocol, Workload, WorkloadStatus};
