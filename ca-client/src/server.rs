//! A development CA server speaking Istio's `CreateCertificate`, signing with a [`LocalCa`].
//!
//! The development control plane serves it over TLS beside its xDS server, at istiod's RPC path,
//! so that an unmodified Istio data-plane client can use it. It is not istiod: it has no token
//! review and no view of pods. What it does instead, by [`Auth`]:
//!
//! * [`Auth::Open`] (the default): tokens are not checked and the caller is anonymous. The
//!   certificate is for `ImpersonatedIdentity` when the request names one, otherwise for the one
//!   SPIFFE id in the CSR's SANs. Any identity of the trust domain is signed: for demos and tests
//!   on one machine only.
//! * [`Auth::Tokens`]: `authorization: Bearer <token>` must be one of the configured tokens, and
//!   the token names the caller's identity (as a Kubernetes token names its service account).
//!   Without impersonation the certificate is for the caller. Impersonation is honoured only
//!   when the caller is a trusted node account (`namespace/service-account` in
//!   [`Config::trusted_node_accounts`], Istio's `CA_TRUSTED_NODE_ACCOUNTS`, default
//!   `istio-system/ztunnel`) or asks for its own identity; istiod's further check that a pod with
//!   the requested identity runs on the caller's node is not made.
//!
//! Either way the identity must be in the configured trust domain, and the lifetime asked for
//! must be at most [`Config::max_validity`] (zero means [`Config::default_validity`]), as istiod
//! rules. Errors use istiod's status codes and messages. Serving connections is `transport`'s.

#[cfg(test)]
mod tests;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use identity::Identity;
use rustls::ServerConfig;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::local::{IssueError, LocalCa};
use crate::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse};
use crate::{tls, x509};

pub use transport::serve_grpc;

/// The names on the serving certificate unless configured otherwise: istiod's in-cluster name
/// (what Istio clients derive from `istiod.istio-system.svc:15012`) and the loopback ones.
pub const DEFAULT_DNS_NAMES: &[&str] = &[
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "localhost",
    "127.0.0.1",
    "::1",
];

/// Lifetime of the serving certificate: a development control plane rarely runs longer.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Who may ask for what; see the [module documentation](self).
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    Open,
    /// Accepted bearer tokens and the caller identity each one stands for.
    Tokens(HashMap<String, Identity>),
}

/// How the server signs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Identities outside it are refused.
    pub trust_domain: String,
    pub auth: Auth,
    /// `(namespace, service account)` pairs allowed to impersonate under [`Auth::Tokens`].
    pub trusted_node_accounts: Vec<(String, String)>,
    /// Lifetime when a request asks for none (`validity_duration` 0).
    pub default_validity: Duration,
    /// Longest lifetime granted; longer requests are refused.
    pub max_validity: Duration,
}

impl Config {
    pub fn new(trust_domain: impl Into<String>) -> Config {
        Config {
            trust_domain: trust_domain.into(),
            auth: Auth::Open,
            trusted_node_accounts: vec![("istio-system".into(), "ztunnel".into())],
            default_validity: crate::local::DEFAULT_VALIDITY,
            // istiod's default max-workload-cert-TTL.
            max_validity: Duration::from_secs(90 * 24 * 60 * 60),
        }
    }
}

/// The `IstioCertificateService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    ca: Arc<LocalCa>,
    config: Arc<Config>,
}

impl Service {
    pub fn new(ca: Arc<LocalCa>, config: Config) -> Service {
        Service {
            ca,
            config: Arc::new(config),
        }
    }

    /// The tonic service to mount at `/istio.v1.auth.IstioCertificateService/`.
    pub fn into_grpc(self) -> IstioCertificateServiceServer<Service> {
        IstioCertificateServiceServer::new(self)
    }

    /// Decides who the certificate is for and signs it: the whole RPC, minus the transport.
    pub fn sign(
        &self,
        headers: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<Vec<String>, Status> {
        let (identity, validity) = self.decide(headers, request)?;
        self.sign_for(&request.csr, &identity, validity)
    }

    /// The identity to certify and for how long, if the caller may have it.
    pub fn decide(
        &self,
        headers: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<(Identity, Duration), Status> {
        let identity = self.authorize(headers, request)?;
        let validity = self.validity(request.validity_duration)?;
        Ok((identity, validity))
    }

    /// Signs the CSR's key for `identity`, answering in Istio's `cert_chain` layout, with
    /// istiod's status codes on failure.
    pub fn sign_for(
        &self,
        csr: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<Vec<String>, Status> {
        self.ca.sign_csr(csr, identity, validity).map_err(|e| {
            let code = match e {
                IssueError::Csr(_) | IssueError::ZeroValidity | IssueError::Name(_) => {
                    tonic::Code::InvalidArgument
                }
                _ => tonic::Code::Internal,
            };
            Status::new(code, format!("CSR signing error ({e})"))
        })
    }

    /// The identity to certify, if the caller may have it.
    fn authorize(
        &self,
        headers: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<Identity, Status> {
        let impersonated = impersonated_identity(request)?;
        let identity = match &self.config.auth {
            Auth::Open => match impersonated {
                Some(identity) => identity,
                None => csr_identity(&request.csr)?,
            },
            Auth::Tokens(tokens) => {
                let caller = bearer(headers)
                    .and_then(|token| tokens.get(token))
                    .ok_or_else(|| Status::unauthenticated("request authenticate failure"))?;
                match impersonated {
                    None => caller.clone(),
                    Some(identity) if identity == *caller || self.trusted(caller) => identity,
                    Some(_) => {
                        return Err(Status::unauthenticated(
                            "request impersonation authentication failure",
                        ));
                    }
                }
            }
        };
        if identity.trust_domain() != self.config.trust_domain {
            return Err(Status::invalid_argument(format!(
                "identity {identity} is outside the trust domain {}",
                self.config.trust_domain
            )));
        }
        Ok(identity)
    }

    fn trusted(&self, caller: &Identity) -> bool {
        self.config
            .trusted_node_accounts
            .iter()
            .any(|(ns, sa)| caller.namespace() == ns && caller.service_account() == sa)
    }

    fn validity(&self, seconds: i64) -> Result<Duration, Status> {
        let requested = u64::try_from(seconds).map_err(|_| {
            Status::invalid_argument(format!("requested TTL {seconds}s is negative"))
        })?;
        if requested == 0 {
            return Ok(self.config.default_validity);
        }
        let requested = Duration::from_secs(requested);
        if requested > self.config.max_validity {
            return Err(Status::invalid_argument(format!(
                "requested TTL {}s is greater than the max allowed TTL {}s",
                requested.as_secs(),
                self.config.max_validity.as_secs()
            )));
        }
        Ok(requested)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let cert_chain = self.sign(request.metadata(), request.get_ref())?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// Why the serving TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] IssueError),
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] tls::Error),
}

/// A TLS configuration presenting a certificate from `ca` for `names` (DNS names or IPs; see
/// [`DEFAULT_DNS_NAMES`]), valid for [`SERVING_VALIDITY`] or until the CA expires.
pub fn serving_tls(ca: &LocalCa, names: &[String]) -> Result<Arc<ServerConfig>, ServingError> {
    let (chain, key) = ca.issue_server(names, SERVING_VALIDITY)?;
    Ok(tls::server_config(chain, key.into())?)
}

/// The default serving names as owned strings.
pub fn default_dns_names() -> Vec<String> {
    DEFAULT_DNS_NAMES.iter().map(|s| (*s).to_owned()).collect()
}

/// Serves the CA on `listener` over `tls` until `shutdown` completes, then lets calls in
/// progress finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    service: Service,
    shutdown: impl Future<Output = ()>,
) {
    serve_grpc(listener, tls, service.into_grpc(), shutdown).await;
}

/// The `ImpersonatedIdentity` of the request's metadata, if it has one.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    let Some(value) = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(prost_types::value::Kind::StringValue(s)) => s.parse().map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "{IMPERSONATED_IDENTITY} {s:?} is not a SPIFFE id: {e}"
            ))
        }),
        _ => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} is not a string"
        ))),
    }
}

/// The one SPIFFE id among the CSR's requested SANs.
fn csr_identity(csr_pem: &str) -> Result<Identity, Status> {
    let ids = x509::csr_spiffe_ids(csr_pem)
        .map_err(|e| Status::invalid_argument(format!("CSR signing error ({e})")))?;
    match <[Identity; 1]>::try_from(ids) {
        Ok([id]) => Ok(id),
        Err(ids) => Err(Status::invalid_argument(format!(
            "the CSR must name exactly one SPIFFE id when no {IMPERSONATED_IDENTITY} is given; it names {}",
            ids.len()
        ))),
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &MetadataMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
