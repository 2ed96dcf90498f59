//! Workload certificates: where they come from, how they are kept fresh, how they are checked.
//!
//! This crate owns the built-in CA of local mode ([`local::LocalCa`]), the
//! [`CertificateSource`] trait that any CA plugs into, the per-identity [`Cache`] that fetches,
//! renews at half-life and publishes certificates through a [`CertificateSink`], and the X.509
//! checks the TLS side needs ([`x509`]). It does not know about workloads or xDS (the agent says
//! which identities it needs) and it never touches rustls: the agent implements the sink and
//! builds its TLS configurations from what is published.

pub mod cache;
pub mod local;
mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod x509;

pub use cache::Cache;
pub use local::{CaFiles, LocalCa};
pub use source::{BoxFuture, CertificateSink, CertificateSource, Error};
