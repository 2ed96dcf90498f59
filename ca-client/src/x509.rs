//! Reading and checking X.509 certificates: SPIFFE ids, validity, chain verification, PEM.
//!
//! The agent's TLS verifiers call [`spiffe_ids`] and [`verify_chain`] on what peers present; the
//! local CA uses the same functions on its own files. Chains are verified with rustls-webpki and
//! the aws-lc-rs algorithms; names (SPIFFE ids) are the caller's business, not webpki's.

use std::time::{Duration, SystemTime};

use identity::Identity;
use rustls_pki_types::pem::{Error as PemError, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

/// What is wrong with a certificate, a chain or a PEM document.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("PEM is malformed: {0}")]
    Pem(#[source] PemError),
    #[error("no {0} found in the PEM")]
    NoPem(&'static str),
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("no trusted roots to verify the chain against")]
    NoRoots,
    #[error("root certificate cannot be used as a trust anchor: {0}")]
    Anchor(#[source] webpki::Error),
    #[error("certificate chain does not verify against the trusted roots: {0}")]
    Verify(#[source] webpki::Error),
    #[error("certificate validity time {0} is outside the range this system can represent")]
    Time(i64),
}

/// The TLS role a certificate is checked for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is the server of the connection (`serverAuth`).
    Server,
    /// The peer is the client of the connection (`clientAuth`).
    Client,
}

/// The URI SANs of `cert` that are SPIFFE ids in Istio's form; other SANs are ignored.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, Error> {
    Ok(uri_sans(cert)?
        .iter()
        .filter_map(|uri| uri.parse().ok())
        .collect())
}

/// Every URI SAN of `cert`, in order, SPIFFE or not (error messages show what a peer sent).
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let cert = parse(cert)?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| Error::Parse(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The SPIFFE ids among the URI SANs a PEM CSR asks for (its signature is not checked here).
pub fn csr_spiffe_ids(csr_pem: &str) -> Result<Vec<Identity>, Error> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::FromDer;

    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| match e {
            PemError::NoItemsFound => Error::NoPem("certificate request"),
            e => Error::Pem(e),
        })?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| Error::Parse(e.to_string()))?;
    Ok(csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.iter()),
            _ => None,
        })
        .flatten()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect())
}

/// `(not_before, not_after)` of `cert`.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), Error> {
    let cert = parse(cert)?;
    let validity = cert.validity();
    Ok((
        system_time(validity.not_before)?,
        system_time(validity.not_after)?,
    ))
}

/// Verifies `chain` (leaf first, then intermediates in any order) against `roots` at `now`,
/// accepting a leaf that may act as a TLS client or as a TLS server.
///
/// Use [`verify_chain_for`] when the peer's role is known.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), Error> {
    match verify_chain_for(chain, roots, now, Usage::Server) {
        Err(Error::Verify(webpki::Error::RequiredEkuNotFoundContext(_))) => {
            verify_chain_for(chain, roots, now, Usage::Client)
        }
        result => result,
    }
}

/// Verifies `chain` (leaf first, then intermediates in any order) against `roots` at `now`, for
/// a leaf used as `usage`.
pub fn verify_chain_for(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: SystemTime,
    usage: Usage,
) -> Result<(), Error> {
    let (leaf, intermediates) = chain.split_first().ok_or(Error::EmptyChain)?;
    if roots.is_empty() {
        return Err(Error::NoRoots);
    }
    let anchors = roots
        .iter()
        .map(|root| webpki::anchor_from_trusted_cert(root).map_err(Error::Anchor))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = EndEntityCert::try_from(leaf).map_err(Error::Verify)?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let usage = match usage {
        Usage::Server => KeyUsage::server_auth(),
        Usage::Client => KeyUsage::client_auth(),
    };
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::since_unix_epoch(since_epoch),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(Error::Verify)
}

/// Every certificate in a PEM document, in order; other sections are skipped.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::Pem)?;
    if certs.is_empty() {
        return Err(Error::NoPem("certificate"));
    }
    Ok(certs)
}

/// The first private key in a PEM document: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`)
/// or SEC1 (`EC PRIVATE KEY`). Encrypted keys are not supported.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        PemError::NoItemsFound => Error::NoPem("unencrypted private key"),
        e => Error::Pem(e),
    })
}

/// `cert` as a PEM `CERTIFICATE` block ending in a newline.
pub fn cert_to_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", cert.as_ref()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A PKCS#8 key as a PEM `PRIVATE KEY` block ending in a newline.
pub fn key_to_pem(key: &rustls_pki_types::PrivatePkcs8KeyDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", key.secret_pkcs8_der()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// `certs` as concatenated PEM `CERTIFICATE` blocks (a bundle).
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(cert_to_pem).collect()
}

pub(crate) fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, Error> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| Error::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Parse(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

pub(crate) fn system_time(time: ASN1Time) -> Result<SystemTime, Error> {
    let secs = time.timestamp();
    let offset = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(offset)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(offset)
    }
    .ok_or(Error::Time(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn spiffe_ids_keeps_only_spiffe_uris() {
        let cert = cert_with_sans(vec![
            SanType::DnsName("example.com".try_into().unwrap()),
            SanType::URI("https://example.com/x".try_into().unwrap()),
            SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap()),
            SanType::URI("spiffe://td/not/istio/shape".try_into().unwrap()),
        ]);
        let ids = spiffe_ids(&cert).unwrap();
        assert_eq!(ids, vec!["spiffe://td/ns/a/sa/b".parse().unwrap()]);
    }

    #[test]
    fn spiffe_ids_of_a_cert_without_sans_is_empty() {
        assert!(spiffe_ids(&cert_with_sans(vec![])).unwrap().is_empty());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let err = spiffe_ids(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).unwrap_err();
        assert!(matches!(err, Error::Parse(_)), "{err}");
    }

    #[test]
    fn validity_reads_both_bounds() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_000_000).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (nb, na) = validity(cert.der()).unwrap();
        assert_eq!(nb, SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        assert_eq!(na, SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000));
    }

    #[test]
    fn pem_round_trip() {
        let a = cert_with_sans(vec![]);
        let b = cert_with_sans(vec![]);
        let pem = certs_to_pem(&[a.clone(), b.clone()]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.ends_with("-----END CERTIFICATE-----\n"));
        assert_eq!(certs_from_pem(pem.as_bytes()).unwrap(), vec![a, b]);
    }

    #[test]
    fn pem_without_certificates_is_an_error() {
        let err = certs_from_pem(b"hello").unwrap_err();
        assert_eq!(err.to_string(), "no certificate found in the PEM");
        let err = key_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no unencrypted private key found in the PEM"
        );
    }

    #[test]
    fn usage_follows_the_leafs_extended_key_usage() {
        use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer};

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = ca_params.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap().der().clone();
        let (chain, roots, now) = ([leaf], [root], SystemTime::now());

        verify_chain_for(&chain, &roots, now, Usage::Client).unwrap();
        let err = verify_chain_for(&chain, &roots, now, Usage::Server).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Verify(webpki::Error::RequiredEkuNotFoundContext(_))
            ),
            "{err}"
        );
        verify_chain(&chain, &roots, now).unwrap();
    }

    #[test]
    fn empty_chain_and_missing_roots_are_errors() {
        let cert = cert_with_sans(vec![]);
        let now = SystemTime::now();
        assert!(matches!(
            verify_chain(&[], std::slice::from_ref(&cert), now),
            Err(Error::EmptyChain)
        ));
        assert!(matches!(
            verify_chain(std::slice::from_ref(&cert), &[], now),
            Err(Error::NoRoots)
        ));
    }
}
