//! TLS for the Istio CA connection, both ends: rustls with aws-lc-rs only, TLS 1.3 only,
//! ALPN `h2`.
//!
//! The client verifies the CA's serving certificate against configured roots by server name
//! (webpki), with no client certificate: callers authenticate with a bearer token. The server
//! side presents a certificate the local CA issued for the control plane's DNS names. Workload
//! certificates never pass through here; the agent's data-path TLS is its own.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN id of HTTP/2, the only protocol gRPC runs on here.
pub const ALPN_H2: &[u8] = b"h2";

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no root certificate could be used as a trust anchor: {0}")]
    Roots(String),
    #[error("the serving certificate or key is unusable: {0}")]
    Cert(#[source] rustls::Error),
}

/// aws-lc-rs with the TLS 1.3 AES-GCM suites only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// A client configuration that trusts exactly `roots` and offers ALPN `h2`.
pub fn client_config(roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, Error> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(Error::Roots(format!(
            "none of the {} certificates parsed",
            roots.len()
        )));
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .expect("the provider has TLS 1.3 suites")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A server configuration presenting `chain` (leaf first) with `key`, ALPN `h2`, no client
/// certificates asked for.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .expect("the provider has TLS 1.3 suites")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(Error::Cert)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
