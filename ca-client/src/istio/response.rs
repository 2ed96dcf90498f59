//! Turning a `CreateCertificate` answer into a [`WorkloadCertificate`] the agent may serve.
//!
//! Istio's layout: `cert_chain[0]` is the leaf, then intermediates, and the last element is the
//! root bundle (possibly several roots during a root rotation). The leaf must name exactly the
//! identity asked for, certify the key the CSR was made with, and chain to the returned roots
//! (to the configured ones if the CA sent the leaf alone).

use std::time::SystemTime;

use identity::{Identity, WorkloadCertificate};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::x509;

/// What is wrong with the CA's answer.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("cert_chain is empty")]
    Empty,
    #[error("cert_chain[{index}] is not PEM certificates: {source}")]
    Pem { index: usize, source: x509::Error },
    #[error("the leaf names {0} instead of the identity asked for")]
    WrongIdentity(Identity),
    #[error("the leaf names no SPIFFE identity")]
    NoIdentity,
    #[error("the leaf names several SPIFFE identities: {0:?}")]
    SeveralIdentities(Vec<Identity>),
    #[error("the leaf certifies a different key than the CSR's")]
    KeyMismatch,
    #[error("the leaf: {0}")]
    Leaf(#[source] x509::Error),
    #[error("the chain does not verify: {0}")]
    Chain(#[source] x509::Error),
}

/// Checks `cert_chain` against what was asked for and packages it with `key`.
pub(super) fn certificate(
    identity: &Identity,
    cert_chain: &[String],
    key: PrivatePkcs8KeyDer<'static>,
    public_key_spki: &[u8],
    configured_roots: &[CertificateDer<'static>],
) -> Result<WorkloadCertificate, ResponseError> {
    let parse = |index: usize| {
        x509::certs_from_pem(cert_chain[index].as_bytes())
            .map_err(|source| ResponseError::Pem { index, source })
    };
    let (chain, roots) = match cert_chain.len() {
        0 => return Err(ResponseError::Empty),
        1 => (parse(0)?, configured_roots.to_vec()),
        n => {
            let mut chain = Vec::new();
            for index in 0..n - 1 {
                chain.extend(parse(index)?);
            }
            (chain, parse(n - 1)?)
        }
    };
    let leaf = &chain[0];

    let mut ids = x509::spiffe_ids(leaf).map_err(ResponseError::Leaf)?;
    match ids.len() {
        0 => return Err(ResponseError::NoIdentity),
        1 if ids[0] == *identity => {}
        1 => return Err(ResponseError::WrongIdentity(ids.remove(0))),
        _ => return Err(ResponseError::SeveralIdentities(ids)),
    }
    let parsed = x509::parse(leaf).map_err(ResponseError::Leaf)?;
    if parsed.public_key().raw != public_key_spki {
        return Err(ResponseError::KeyMismatch);
    }
    x509::verify_chain(&chain, &roots, SystemTime::now()).map_err(ResponseError::Chain)?;
    let (not_before, not_after) = x509::validity(leaf).map_err(ResponseError::Leaf)?;
    Ok(WorkloadCertificate {
        identity: identity.clone(),
        chain,
        key,
        roots,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};

    use super::*;
    use crate::LocalCa;

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/demo/sa/{sa}")
            .parse()
            .unwrap()
    }

    /// A CSR for `key` and what `ca` answers to it for `identity`.
    fn answer(ca: &LocalCa, key: &KeyPair, identity: &Identity) -> Vec<String> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(key).unwrap().pem().unwrap();
        ca.sign_csr(&csr, identity, Duration::from_secs(600))
            .unwrap()
    }

    fn check(
        identity: &Identity,
        chain: &[String],
        key: &KeyPair,
        roots: &[CertificateDer<'static>],
    ) -> Result<WorkloadCertificate, ResponseError> {
        certificate(
            identity,
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            &key.subject_public_key_info(),
            roots,
        )
    }

    #[test]
    fn a_good_answer_becomes_a_certificate_with_the_returned_roots() {
        let ca = LocalCa::generate().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = answer(&ca, &key, &id("alice"));
        let cert = check(&id("alice"), &chain, &key, &[]).unwrap();
        assert_eq!(cert.identity, id("alice"));
        assert_eq!(cert.chain.len(), 1, "the root is not part of the chain");
        assert_eq!(cert.roots, ca.roots());
        assert!(cert.not_after > SystemTime::now());
    }

    #[test]
    fn a_leaf_alone_is_verified_against_the_configured_roots() {
        let ca = LocalCa::generate().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = answer(&ca, &key, &id("alice"));
        let leaf_only = &chain[..1];
        check(&id("alice"), leaf_only, &key, ca.roots()).unwrap();
        let other = LocalCa::generate().unwrap();
        let err = check(&id("alice"), leaf_only, &key, other.roots()).unwrap_err();
        assert!(matches!(err, ResponseError::Chain(_)), "{err}");
    }

    #[test]
    fn a_leaf_for_someone_else_is_refused() {
        let ca = LocalCa::generate().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = answer(&ca, &key, &id("mallory"));
        let err = check(&id("alice"), &chain, &key, &[]).unwrap_err();
        assert!(
            matches!(&err, ResponseError::WrongIdentity(got) if *got == id("mallory")),
            "{err}"
        );
    }

    #[test]
    fn a_leaf_for_another_key_is_refused() {
        let ca = LocalCa::generate().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = answer(&ca, &other, &id("alice"));
        let err = check(&id("alice"), &chain, &key, &[]).unwrap_err();
        assert!(matches!(err, ResponseError::KeyMismatch), "{err}");
    }

    #[test]
    fn a_chain_to_a_root_other_than_the_returned_one_is_refused() {
        let ca = LocalCa::generate().unwrap();
        let other = LocalCa::generate().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut chain = answer(&ca, &key, &id("alice"));
        *chain.last_mut().unwrap() = other.roots_pem();
        let err = check(&id("alice"), &chain, &key, ca.roots()).unwrap_err();
        assert!(matches!(err, ResponseError::Chain(_)), "{err}");
    }

    #[test]
    fn empty_and_garbage_answers_are_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let err = check(&id("alice"), &[], &key, &[]).unwrap_err();
        assert!(matches!(err, ResponseError::Empty), "{err}");
        let err = check(&id("alice"), &["junk".into(), "junk".into()], &key, &[]).unwrap_err();
        assert!(matches!(err, ResponseError::Pem { index: 0, .. }), "{err}");
    }
}
