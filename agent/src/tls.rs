//! Mutual TLS for HBONE: rustls configurations built from workload certificates, and the
//! SPIFFE-aware certificate verifiers both ends of a tunnel use.
//!
//! This module owns the crypto provider (aws-lc-rs, TLS 1.3, AES-GCM only), the per-identity
//! credentials (signing key parsed once when a certificate is published, server config cached),
//! and peer verification: the chain must reach the mesh roots, then the peer's SPIFFE URI SAN is
//! checked — against the expected identities when dialing, against our own trust domain when
//! accepting. Obtaining and rotating certificates belongs to `ca-client`; choosing which identity
//! to present and which to expect belongs to the proxy.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::SystemTime;

use identity::{Identity, WorkloadCertificate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    InconsistentKeys, OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tracing::debug;

#[cfg(test)]
mod tests;

/// The only application protocol HBONE speaks over TLS.
pub const ALPN_H2: &[u8] = b"h2";

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider for every HBONE connection: aws-lc-rs (key exchange with its default
/// groups, X25519MLKEM768 first; signatures; randomness) with the two TLS 1.3 AES-GCM suites
/// (no ChaCha20, which is far slower than AES-GCM on hardware with AES instructions).
///
/// AES-128-GCM comes first, as in BoringSSL's (Envoy's) TLS 1.3 order: the two are both
/// strong, and AES-128 does 10 rounds to AES-256's 14, which shows in a tunnel's CPU per byte
/// (encryption and decryption are a quarter of both agents' work under bulk traffic).
///
/// The suites' record encryption is ring's on x86_64 CPUs with VAES and VPCLMULQDQ: ring 0.17
/// has the AVX2 VAES AES-GCM (from BoringSSL), which aws-lc 0.47 has only for AVX-512. Sealing
/// 16 KiB records with AES-128-GCM on this project's AMD EPYC (AVX2, VAES): 5.96 GB/s against
/// 2.59 GB/s; 1 KiB records 3.68 against 1.96. Everywhere else aws-lc's suites stay.
/// Same suites on the wire, so peers cannot tell.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let cipher_suites = if vaes_avx2() {
                vec![
                    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ]
            } else {
                vec![
                    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ]
            };
            Arc::new(CryptoProvider {
                cipher_suites,
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// Whether ring's AVX2 VAES AES-GCM runs here (the CPU features it checks for).
fn vaes_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The name handed to rustls when dialing. HBONE sends no SNI and checks SPIFFE ids instead of
/// host names, so this name never leaves the process and is never compared.
pub fn server_name() -> ServerName<'static> {
    ServerName::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The peer's identity: the first SPIFFE URI SAN of its leaf certificate, which the verifiers
/// below have already checked. `None` before the handshake or when the peer sent no certificate.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    uri_sans(leaf).ok()?.iter().find_map(|uri| uri.parse().ok())
}

/// Why a workload certificate could not be turned into TLS credentials, or why a config could
/// not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate for {0} has an empty chain (no leaf)")]
    EmptyChain(Identity),
    #[error("leaf certificate for {identity} cannot be parsed: {reason}")]
    BadLeaf { identity: Identity, reason: String },
    #[error(
        "leaf certificate for {identity} does not name it as a URI SAN (it names {})",
        list(.seen)
    )]
    IdentityMismatch {
        identity: Identity,
        seen: Vec<String>,
    },
    #[error("private key for {identity} is unusable: {source}")]
    BadKey {
        identity: Identity,
        source: rustls::Error,
    },
    #[error("private key for {0} does not match its leaf certificate's public key")]
    KeyMismatch(Identity),
    #[error("trust roots for {identity} are unusable: {reason}")]
    BadRoots { identity: Identity, reason: String },
    #[error("certificate chain for {identity} does not verify to its roots: {source}")]
    BadChain {
        identity: Identity,
        source: webpki::Error,
    },
    #[error("no certificate is published for {0}")]
    UnknownIdentity(Identity),
    #[error("no expected server identity given for a connection from {0}")]
    NothingExpected(Identity),
}

/// Why a peer's certificate was refused after its chain verified. Reaches rustls as
/// `Error::InvalidCertificate(CertificateError::Other(..))`; downcast the `OtherError` to tell
/// an identity mismatch from a bad chain.
#[derive(thiserror::Error)]
pub enum PeerError {
    #[error("peer certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error(
        "server presented identity {}, expected one of {}",
        list(.seen),
        list(.expected)
    )]
    UnexpectedIdentity {
        seen: Vec<String>,
        expected: Vec<Identity>,
    },
    #[error(
        "client presented identity {}, none in trust domain {trust_domain:?}",
        list(.seen)
    )]
    ForeignTrustDomain {
        seen: Vec<String>,
        trust_domain: String,
    },
}

// rustls prints a CertificateError::Other through Debug, so Debug carries the readable message.
impl fmt::Debug for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<PeerError> for rustls::Error {
    fn from(err: PeerError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
    }
}

fn list(items: &[impl fmt::Display]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    let names: Vec<String> = items.iter().map(ToString::to_string).collect();
    names.join(", ")
}

/// TLS credentials of the local workload identities, ready for handshakes.
///
/// Publishing a certificate does the expensive work once (parse the key, load the roots, build
/// the server config); reading afterwards is a read lock and an `Arc` clone.
#[derive(Default)]
pub struct Credentials {
    by_identity: RwLock<HashMap<Identity, Arc<Published>>>,
}

/// What one published certificate yields.
struct Published {
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
    /// A complete client config (its resolver holds the parsed key) whose verifier expects
    /// nothing; each dial clones it and swaps in a verifier for the identities it expects.
    /// Cloning shares the key and the provider and, unlike a fresh builder, allocates no session
    /// cache just to disable it.
    client: ClientConfig,
}

impl Credentials {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `cert` the certificate presented for its identity, replacing any earlier one.
    /// Connections already established keep the configuration they were built with.
    pub fn publish(&self, cert: Arc<WorkloadCertificate>) -> Result<(), TlsError> {
        let published = Arc::new(Published::build(&cert)?);
        self.by_identity
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cert.identity.clone(), published);
        debug!(identity = %cert.identity, "published TLS credentials");
        Ok(())
    }

    /// Drops the credentials of an identity that no local workload uses any more.
    pub fn forget(&self, identity: &Identity) {
        let removed = self
            .by_identity
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(identity);
        if removed.is_some() {
            debug!(%identity, "forgot TLS credentials");
        }
    }

    /// The inbound HBONE config presenting `id`'s certificate, built when it was published.
    pub fn server_config(&self, id: &Identity) -> Option<Arc<ServerConfig>> {
        self.get(id).map(|published| published.server.clone())
    }

    /// An outbound HBONE config presenting `src`'s certificate that accepts only a server whose
    /// leaf names one of `expected`.
    pub fn client_config(
        &self,
        src: &Identity,
        expected: &[Identity],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        if expected.is_empty() {
            return Err(TlsError::NothingExpected(src.clone()));
        }
        let published = self
            .get(src)
            .ok_or_else(|| TlsError::UnknownIdentity(src.clone()))?;
        let mut config = published.client.clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: published.roots.clone(),
                expected: expected.to_vec(),
                algorithms: provider().signature_verification_algorithms,
            }));
        Ok(Arc::new(config))
    }

    fn get(&self, id: &Identity) -> Option<Arc<Published>> {
        self.by_identity
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self
            .by_identity
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        f.debug_set().entries(map.keys()).finish()
    }
}

impl Published {
    fn build(cert: &WorkloadCertificate) -> Result<Self, TlsError> {
        let identity = &cert.identity;
        let provider = provider();
        let leaf = cert
            .chain
            .first()
            .ok_or_else(|| TlsError::EmptyChain(identity.clone()))?;

        // A leaf that does not carry the identity would make peers refuse us with a confusing
        // error on every connection; refuse it here instead.
        let seen = uri_sans(leaf).map_err(|reason| TlsError::BadLeaf {
            identity: identity.clone(),
            reason,
        })?;
        if !seen
            .iter()
            .any(|uri| uri.parse::<Identity>().ok().as_ref() == Some(identity))
        {
            return Err(TlsError::IdentityMismatch {
                identity: identity.clone(),
                seen,
            });
        }

        let roots = Arc::new(root_store(cert)?);
        verify_own_chain(cert, &roots, provider.signature_verification_algorithms)?;

        let key = CertifiedKey::from_der(
            cert.chain.clone(),
            PrivateKeyDer::Pkcs8(cert.key.clone_key()),
            &provider,
        )
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch(identity.clone())
            }
            source => TlsError::BadKey {
                identity: identity.clone(),
                source,
            },
        })?;
        let key = Arc::new(key);

        let webpki_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|err| TlsError::BadRoots {
                    identity: identity.clone(),
                    reason: err.to_string(),
                })?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(TLS13_ONLY)
            .expect("the HBONE provider has TLS 1.3 suites")
            .with_client_cert_verifier(Arc::new(TrustDomainClientVerifier {
                webpki: webpki_verifier,
                trust_domain: identity.trust_domain().to_owned(),
            }))
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(TLS13_ONLY)
            .expect("the HBONE provider has TLS 1.3 suites")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: roots.clone(),
                expected: Vec::new(),
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        client.enable_sni = false;
        client.resumption = Resumption::disabled();

        Ok(Self {
            roots,
            server: Arc::new(server),
            client,
        })
    }
}

fn root_store(cert: &WorkloadCertificate) -> Result<RootCertStore, TlsError> {
    let bad = |reason: String| TlsError::BadRoots {
        identity: cert.identity.clone(),
        reason,
    };
    let mut store = RootCertStore::empty();
    for (i, root) in cert.roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|err| bad(format!("root #{i}: {err}")))?;
    }
    if store.is_empty() {
        return Err(bad("no root certificates given".to_owned()));
    }
    Ok(store)
}

/// Checks that our own chain reaches our roots for both roles we play, so a mismatched bundle
/// fails at publish rather than in every peer's handshake. Checked at the certificate's start
/// when that is still ahead: a CA whose clock runs a little fast must not make us refuse a
/// fresh certificate, while an expired one is still refused.
fn verify_own_chain(
    cert: &WorkloadCertificate,
    roots: &RootCertStore,
    algorithms: WebPkiSupportedAlgorithms,
) -> Result<(), TlsError> {
    let bad = |source| TlsError::BadChain {
        identity: cert.identity.clone(),
        source,
    };
    let at = SystemTime::now().max(cert.not_before);
    let at = UnixTime::since_unix_epoch(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let leaf = webpki::EndEntityCert::try_from(&cert.chain[0]).map_err(bad)?;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            algorithms.all,
            &roots.roots,
            &cert.chain[1..],
            at,
            usage,
            None,
            None,
        )
        .map_err(bad)?;
    }
    Ok(())
}

/// The URI SANs of a certificate, in order, SPIFFE or not (for error messages).
fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    ca_client::x509::uri_sans(der).map_err(|err| err.to_string())
}

/// Outbound: the server's chain must reach the source identity's roots (no host name check),
/// and its leaf must name one of the expected identities.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let seen = uri_sans(end_entity).map_err(PeerError::Malformed)?;
        let matches = seen
            .iter()
            .filter_map(|uri| uri.parse::<Identity>().ok())
            .any(|id| self.expected.contains(&id));
        if !matches {
            return Err(PeerError::UnexpectedIdentity {
                seen,
                expected: self.expected.clone(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Inbound: a client certificate is required, its chain must reach our roots (rustls' webpki
/// verifier), and one of its SPIFFE ids must be in our own trust domain. Which client may reach
/// which workload is authorization policy, decided later by the proxy.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        let seen = uri_sans(end_entity).map_err(PeerError::Malformed)?;
        let same_domain = seen
            .iter()
            .filter_map(|uri| uri.parse::<Identity>().ok())
            .any(|id| id.trust_domain() == self.trust_domain);
        if !same_domain {
            return Err(PeerError::ForeignTrustDomain {
                seen,
                trust_domain: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
