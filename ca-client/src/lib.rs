//! Workload certificates: where they come from, how they are kept fresh, how they are checked.
//!
//! This crate owns the built-in CA of local mode ([`local::LocalCa`]), the client of Istio's CA
//! ([`istio::Client`]), a development server of Istio's CA protocol signing with the local CA
//! ([`server`]), the [`CertificateSource`] trait that any CA plugs into, the per-identity
//! [`Cache`] that fetches ahead, renews at half-life and publishes certificates through a
//! [`CertificateSink`], and the X.509 checks the TLS side needs ([`x509`]). It does not know
//! about workloads or xDS (the agent says which identities it needs). rustls appears only in
//! [`tls`], the transport to and from the CA; workload certificates reach the agent's TLS side
//! through the sink as plain DER.

pub mod cache;
pub mod istio;
pub mod local;
pub mod proto;
pub mod server;
mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod x509;

pub use cache::Cache;
pub use local::{CaFiles, LocalCa};
pub use source::{BoxFuture, CertificateSink, CertificateSource, Error};
