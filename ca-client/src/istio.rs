//! The client of Istio's CA: `CreateCertificate` over gRPC and TLS, as a [`CertificateSource`].
//!
//! [`Client`] makes a fresh ECDSA P-256 key and CSR for every certificate, calls
//! `/istio.v1.auth.IstioCertificateService/CreateCertificate` with the bearer token (re-read from
//! its file on every call, since it rotates), `clusterid` and, for identities other than the
//! agent's own, `ImpersonatedIdentity`; then checks that the leaf names exactly the identity
//! asked for, holds the key it was asked to certify, and chains to the returned root bundle.
//! At most [`MAX_IN_FLIGHT`] calls run at once. Renewal is the [`Cache`](crate::Cache)'s job;
//! connecting is `channel`'s.

mod channel;
mod response;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use identity::{Identity, WorkloadCertificate};
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::Semaphore;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest};
use crate::source::{BoxFuture, CertificateSource, Error};

pub use channel::ConfigError;
pub use response::ResponseError;

/// Calls to the CA in flight at once; more wait their turn (as ztunnel does).
pub const MAX_IN_FLIGHT: usize = 8;

/// Lifetime asked for when none is configured: Istio's `SECRET_TTL` default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);

/// How long one call (connecting included) may take before it fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the CA is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port` of the CA (Istio's `CA_ADDRESS`, e.g.
    /// `https://istiod.istio-system.svc:15012`).
    pub address: http::Uri,
    /// The roots the CA's serving certificate must chain to (Istio's mesh root file).
    pub roots: Vec<CertificateDer<'static>>,
    /// The name checked against the CA's serving certificate instead of the address's host
    /// (Istio's `ALT_CA_HOSTNAME`), e.g. when the address is an IP.
    pub server_name: Option<String>,
    /// The bearer token's file, re-read on every call; `None` sends no `authorization`.
    pub token_path: Option<PathBuf>,
    /// Sent as the `clusterid` header: which cluster's token review checks the token.
    pub cluster_id: String,
    /// The agent's own identity, asked for without `ImpersonatedIdentity`; every other identity
    /// is asked for on a workload's behalf. `None`: always impersonate.
    pub own_identity: Option<Identity>,
    /// Requested lifetime (`validity_duration`, whole seconds).
    pub validity: Duration,
    /// Extra headers on every call (Istio's `CA_HEADER_<NAME>` variables).
    pub headers: Vec<(String, String)>,
    /// Deadline of one call, connecting included.
    pub timeout: Duration,
}

impl Config {
    /// [`Config::new`] with the roots read from a PEM file (Istio's
    /// `/var/run/secrets/istio/root-cert.pem`).
    pub fn with_root_file(
        address: http::Uri,
        path: &std::path::Path,
    ) -> Result<Config, ConfigError> {
        let root_file = |reason: String| ConfigError::RootFile {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| root_file(e.to_string()))?;
        let roots = crate::x509::certs_from_pem(&pem).map_err(|e| root_file(e.to_string()))?;
        Ok(Config::new(address, roots))
    }

    /// A configuration with Istio's defaults for everything but the address and roots.
    pub fn new(address: http::Uri, roots: Vec<CertificateDer<'static>>) -> Config {
        Config {
            address,
            roots,
            server_name: None,
            token_path: None,
            cluster_id: "Kubernetes".to_owned(),
            own_identity: None,
            validity: DEFAULT_VALIDITY,
            headers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Why one `CreateCertificate` exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("reading the CA token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA token in {path} cannot be sent as a header value")]
    TokenValue { path: PathBuf },
    #[error("making the key or CSR failed: {0}")]
    Csr(#[source] rcgen::Error),
    #[error("CreateCertificate failed with {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the CA's response is unusable: {0}")]
    Response(#[from] ResponseError),
}

/// A [`CertificateSource`] backed by Istio's CA.
///
/// Connects lazily (and again after a failure) on first use; must be created inside a Tokio
/// runtime.
pub struct Client {
    grpc: IstioCertificateServiceClient<tonic::transport::Channel>,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    token_path: Option<PathBuf>,
    own_identity: Option<Identity>,
    validity_secs: i64,
    /// Used to verify the leaf when the CA sends no root bundle of its own.
    roots: Vec<CertificateDer<'static>>,
    permits: Semaphore,
}

impl Client {
    pub fn new(config: Config) -> Result<Client, ConfigError> {
        let channel = channel::connect_lazy(&config)?;
        let mut headers = Vec::with_capacity(1 + config.headers.len());
        let mut push = |name: &str, value: &str| -> Result<(), ConfigError> {
            let header = || ConfigError::Header(name.to_owned());
            let key = AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| header())?;
            let value = AsciiMetadataValue::try_from(value).map_err(|_| header())?;
            headers.push((key, value));
            Ok(())
        };
        push("clusterid", &config.cluster_id)?;
        for (name, value) in &config.headers {
            push(name, value)?;
        }
        Ok(Client {
            grpc: IstioCertificateServiceClient::new(channel),
            headers,
            token_path: config.token_path,
            own_identity: config.own_identity,
            validity_secs: i64::try_from(config.validity.as_secs()).unwrap_or(i64::MAX),
            roots: config.roots,
            permits: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    async fn create(&self, identity: &Identity) -> Result<WorkloadCertificate, FetchError> {
        let permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let (key, csr) = key_and_csr(identity).map_err(FetchError::Csr)?;
        let metadata =
            (self.own_identity.as_ref() != Some(identity)).then(|| prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                    },
                )]
                .into(),
            });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.validity_secs,
            metadata,
        });
        for (name, value) in &self.headers {
            request.metadata_mut().insert(name.clone(), value.clone());
        }
        if let Some(path) = &self.token_path {
            request
                .metadata_mut()
                .insert("authorization", bearer(path).await?);
        }
        let response = self
            .grpc
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| FetchError::Status {
                code: status.code(),
                message: status.message().to_owned(),
            })?;
        drop(permit);
        let cert = response::certificate(
            identity,
            &response.into_inner().cert_chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            &key.subject_public_key_info(),
            &self.roots,
        )?;
        Ok(cert)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("own_identity", &self.own_identity)
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

impl CertificateSource for Client {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, Error>> {
        Box::pin(async move {
            self.create(identity).await.map_err(|e| match e {
                FetchError::Response(ResponseError::WrongIdentity(got)) => Error::WrongIdentity {
                    identity: identity.clone(),
                    got,
                },
                e => Error::Istio {
                    identity: identity.clone(),
                    source: Arc::new(e),
                },
            })
        })
    }
}

/// A new ECDSA P-256 key and a PEM CSR for it: empty subject, one URI SAN (the SPIFFE id),
/// as ztunnel sends them.
fn key_and_csr(identity: &Identity) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// `Bearer <token>` from the token file as it is now.
async fn bearer(path: &std::path::Path) -> Result<AsciiMetadataValue, FetchError> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| FetchError::Token {
            path: path.to_owned(),
            source,
        })?;
    AsciiMetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
        FetchError::TokenValue {
            path: path.to_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_has_an_empty_subject_and_the_spiffe_id_as_its_only_san() {
        use x509_parser::certification_request::X509CertificationRequest;
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        use x509_parser::prelude::FromDer;

        let identity: Identity = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let (key, pem) = key_and_csr(&identity).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let der = ::pem::parse(&pem).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(der.contents()).unwrap();
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        assert_eq!(
            info.subject_pki.raw,
            key.subject_public_key_info().as_slice()
        );
        let sans: Vec<_> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|ext| match ext {
                ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(sans, vec![GeneralName::URI("spiffe://td/ns/a/sa/b")]);
    }
}
