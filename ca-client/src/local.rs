//! The built-in CA of local mode: a signing key and certificate that issue workload leaves.
//!
//! [`LocalCa`] owns the signing key, the intermediates sent after each leaf and the roots peers
//! trust. It is created in memory ([`LocalCa::generate`]), in a state directory holding
//! [`ROOT_CERT`] and [`ROOT_KEY`] ([`LocalCa::load_or_init`]), or from Istio's `cacerts` files
//! ([`CaFiles`], [`LocalCa::load`]). Leaves carry exactly one URI SAN, the SPIFFE id, as Istio's
//! do. Keeping leaves fresh is the [`Cache`](crate::Cache)'s job.

mod files;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use identity::{Identity, WorkloadCertificate};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::source::{BoxFuture, CertificateSource, Error};
use crate::x509;

pub use files::{CaFiles, LoadError, ROOT_CERT, ROOT_KEY};

/// Lifetime of the leaves [`LocalCa`] issues as a [`CertificateSource`], unless changed with
/// [`LocalCa::with_validity`]. Istio's default (`SECRET_TTL`).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);

/// How far a leaf's `not_before` is set in the past, so that peers whose clocks are a little
/// behind accept it at once (at most a tenth of the leaf's validity).
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Lifetime of a root generated here: long, since replacing it means re-trusting every agent.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Why a leaf could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the requested validity is zero")]
    ZeroValidity,
    #[error("the signing certificate chain expired at {0}")]
    Expired(OffsetDateTime),
    #[error("generating the leaf key failed: {0}")]
    Key(#[source] rcgen::Error),
    #[error("signing the leaf failed: {0}")]
    Sign(#[source] rcgen::Error),
    #[error("the CSR is invalid: {0}")]
    Csr(String),
    #[error("the name cannot go in a certificate: {0}")]
    Name(String),
}

/// A CA that signs workload certificates with a key it holds.
#[derive(Debug)]
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Sent after each leaf: the signing certificate unless it is a root, then the certificates
    /// between it and the root.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    /// Leaves never start before the signing certificate does...
    not_before: SystemTime,
    /// ...nor outlive any certificate they are sent with.
    not_after: SystemTime,
    validity: Duration,
}

impl LocalCa {
    /// A CA with a new self-signed root that lives only in memory (tests, throw-away meshes).
    pub fn generate() -> Result<LocalCa, LoadError> {
        let (key, cert) = new_root().map_err(LoadError::Generate)?;
        LocalCa::from_parts(key, cert.clone(), Vec::new(), vec![cert]).map_err(|e| {
            LoadError::Cert {
                path: "<generated root>".into(),
                source: e,
            }
        })
    }

    /// Loads the root in `dir`, or creates one there (and `dir`, mode 0700) if there is none.
    pub fn load_or_init(dir: &std::path::Path) -> Result<LocalCa, LoadError> {
        files::load_or_init(dir)
    }

    /// Creates a new root in `dir` (and `dir`, mode 0700); fails if a root is already there.
    pub fn init(dir: &std::path::Path) -> Result<LocalCa, LoadError> {
        files::init(dir)
    }

    /// Loads a CA from files (Istio's `cacerts` layout), checking that the key matches the
    /// certificate and that the certificate chains to the root.
    pub fn load(files: &CaFiles) -> Result<LocalCa, LoadError> {
        files::load(files)
    }

    /// Sets the lifetime of the leaves issued as a [`CertificateSource`].
    pub fn with_validity(mut self, validity: Duration) -> LocalCa {
        self.validity = validity;
        self
    }

    /// The trusted roots: what peers verify leaves against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trusted roots as one PEM bundle.
    pub fn roots_pem(&self) -> String {
        x509::certs_to_pem(&self.roots)
    }

    /// Issues a leaf for `identity` with a fresh ECDSA P-256 key, valid for `validity` (less if
    /// the signing chain expires sooner).
    pub fn issue(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> Result<WorkloadCertificate, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Key)?;
        let (leaf, not_before, not_after) = self.sign(&key, identity, validity)?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(leaf);
        chain.extend(self.intermediates.iter().cloned());
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: self.roots.clone(),
            not_before,
            not_after,
        })
    }

    /// Signs the public key of a PKCS#10 CSR for `identity` and answers in Istio's
    /// `CreateCertificate` layout: PEM strings `[leaf, intermediates..., root bundle]`.
    ///
    /// Only the CSR's key is used: its subject and SANs are ignored, as Istio does, and the leaf
    /// names `identity` alone.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<Vec<String>, IssueError> {
        let public_key = csr_public_key(csr_pem)?;
        let (leaf, _, _) = self.sign(&public_key, identity, validity)?;
        let mut pems = Vec::with_capacity(2 + self.intermediates.len());
        pems.push(x509::cert_to_pem(&leaf));
        pems.extend(self.intermediates.iter().map(x509::cert_to_pem));
        pems.push(self.roots_pem());
        Ok(pems)
    }

    /// Builds a CA from a signing key and certificate the caller has already checked belong
    /// together.
    fn from_parts(
        key: KeyPair,
        signing: CertificateDer<'static>,
        rest_of_chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<LocalCa, x509::Error> {
        let (not_before, mut not_after) = x509::validity(&signing)?;
        let mut intermediates = Vec::new();
        if !roots.contains(&signing) {
            intermediates.push(signing.clone());
        }
        for cert in rest_of_chain {
            if cert != signing && !roots.contains(&cert) && !intermediates.contains(&cert) {
                intermediates.push(cert);
            }
        }
        for cert in &intermediates {
            not_after = not_after.min(x509::validity(cert)?.1);
        }
        let issuer = Issuer::from_ca_cert_der(&signing, key)
            .map_err(|e| x509::Error::Parse(e.to_string()))?;
        Ok(LocalCa {
            issuer,
            intermediates,
            roots,
            not_before,
            not_after,
            validity: DEFAULT_VALIDITY,
        })
    }

    /// Issues a TLS server certificate (for a control plane's serving port) naming `names`, each a
    /// DNS name or an IP address, with a fresh ECDSA P-256 key. Returns the chain to present
    /// (leaf, then intermediates) and the key.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), IssueError> {
        if names.is_empty() {
            return Err(IssueError::Name("no name to certify".into()));
        }
        let sans = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() => Err(
                    IssueError::Name(format!("{name:?} is neither a DNS name nor an IP address")),
                ),
                Err(_) => name
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| IssueError::Name(format!("{name:?}: {e}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Key)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (leaf, _, _) = self.sign_params(params, &key, validity)?;
        let mut chain = vec![leaf];
        chain.extend(self.intermediates.iter().cloned());
        Ok((chain, PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        validity: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime, SystemTime), IssueError> {
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| IssueError::Sign(e))?;
        let mut params = CertificateParams::default();
        // Istio's leaves have an empty subject; rcgen then marks the SAN critical (RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign_params(params, public_key, validity)
    }

    /// Signs a leaf with `params`' names and extended key usages.
    fn sign_params(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        validity: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime, SystemTime), IssueError> {
        let (not_before, not_after) = self.leaf_window(validity)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok((cert.der().clone(), not_before, not_after))
    }

    /// `[not_before, not_after]` of a leaf issued now, in whole seconds (what X.509 can say).
    fn leaf_window(&self, validity: Duration) -> Result<(SystemTime, SystemTime), IssueError> {
        if validity.is_zero() {
            return Err(IssueError::ZeroValidity);
        }
        let now = whole_seconds(SystemTime::now());
        let not_after = whole_seconds(now + validity).min(self.not_after);
        if not_after <= now {
            return Err(IssueError::Expired(OffsetDateTime::from(self.not_after)));
        }
        // A short-lived leaf (tests that expire certificates fast) gets less, in whole seconds,
        // so that its half-life is still ahead.
        let skew = CLOCK_SKEW.min(Duration::from_secs(validity.as_secs() / 10));
        let not_before = (now - skew).max(self.not_before);
        Ok((not_before, not_after))
    }
}

impl CertificateSource for LocalCa {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, Error>> {
        // Signing with the local key takes well under a millisecond: no need to leave the task.
        let result = self
            .issue(identity, self.validity)
            .map_err(|source| Error::Local {
                identity: identity.clone(),
                source: Arc::new(source),
            });
        Box::pin(std::future::ready(result))
    }
}

/// A new self-signed root: ECDSA P-256, O=ambientd, CN=ambientd local root, 10 years.
fn new_root() -> Result<(KeyPair, CertificateDer<'static>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let now = whole_seconds(SystemTime::now());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "ambientd");
    params
        .distinguished_name
        .push(DnType::CommonName, "ambientd local root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::from(now - CLOCK_SKEW);
    params.not_after = OffsetDateTime::from(now + ROOT_VALIDITY);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((key, cert.der().clone()))
}

/// The public key of a PEM CSR whose signature verifies (proof that the requester holds the key).
fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, IssueError> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use rustls_pki_types::pem::PemObject;

    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| IssueError::Csr(format!("no PEM CERTIFICATE REQUEST: {e}")))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| IssueError::Csr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::Csr(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature()
        .map_err(|e| IssueError::Csr(format!("signature does not verify: {e}")))?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| IssueError::Csr(format!("unsupported public key: {e}")))
}

/// A positive 127-bit serial: random, as RFC 5280 recommends, and never shortened on encoding.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}
