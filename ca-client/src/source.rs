//! The two narrow traits the cache is built on: where certificates come from and where they go.
//!
//! A [`CertificateSource`] issues a certificate for one identity (the local CA here, Istio's CA
//! elsewhere); a [`CertificateSink`] is told about every certificate to serve and every identity
//! to drop (the agent's TLS side). The [`Error`] of a fetch is shared by everyone waiting on it,
//! so it is cheap to clone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use identity::{Identity, WorkloadCertificate};

use crate::local;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Gives a certificate for an identity.
///
/// Dyn-compatible so that the cache holds any CA behind one `Arc<dyn CertificateSource>`.
pub trait CertificateSource: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, Error>>;
}

/// Receives the certificates to serve.
///
/// Called with the cache's lock held, so that a `forget` is never overtaken by a late `publish`:
/// implementations must return quickly and must not call back into the cache.
pub trait CertificateSink: Send + Sync + 'static {
    /// `cert` replaces whatever was served for `cert.identity`.
    fn publish(&self, cert: Arc<WorkloadCertificate>);
    /// Stop serving `identity`.
    fn forget(&self, identity: &Identity);
}

/// Why no certificate could be had for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("the local CA cannot issue a certificate for {identity}: {source}")]
    Local {
        identity: Identity,
        source: Arc<local::IssueError>,
    },
    #[error("Istio's CA gave no certificate for {identity}: {source}")]
    Istio {
        identity: Identity,
        source: Arc<crate::istio::FetchError>,
    },
    #[error("the CA is unavailable for {identity}: {reason}")]
    Unavailable { identity: Identity, reason: String },
    #[error("the CA returned a certificate for {got} when {identity} was asked for")]
    WrongIdentity { identity: Identity, got: Identity },
    #[error("the certificate for {identity} was forgotten while it was being fetched")]
    Forgotten { identity: Identity },
}

impl Error {
    /// The identity the failed request was for.
    pub fn identity(&self) -> &Identity {
        match self {
            Error::Local { identity, .. }
            | Error::Istio { identity, .. }
            | Error::Unavailable { identity, .. }
            | Error::WrongIdentity { identity, .. }
            | Error::Forgotten { identity } => identity,
        }
    }
}
