//! The built-in CA in a state directory, the leaves it issues, and CSR signing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use ca_client::local::{DEFAULT_VALIDITY, IssueError, LoadError, ROOT_CERT, ROOT_KEY};
use ca_client::x509::{self, Usage};
use ca_client::{CertificateSource, LocalCa};
use identity::Identity;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const HOUR: Duration = Duration::from_secs(3600);

fn id() -> Identity {
    "spiffe://cluster.local/ns/demo/sa/reviews".parse().unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn root_is_created_private_and_reloaded_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/ca");
    let created = LocalCa::load_or_init(&dir).unwrap();

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(ROOT_KEY)), 0o600);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [ROOT_CERT, ROOT_KEY],
        "no temporary files left behind"
    );

    let root = &created.roots()[0];
    let (_, parsed) = X509Certificate::from_der(root).unwrap();
    assert_eq!(
        parsed.subject().to_string(),
        "O=ambientd, CN=ambientd local root"
    );
    assert!(parsed.is_ca());
    let usage = parsed.key_usage().unwrap().unwrap().value;
    assert!(usage.key_cert_sign() && usage.crl_sign());
    let (not_before, not_after) = x509::validity(root).unwrap();
    let years = not_after.duration_since(not_before).unwrap().as_secs() / (365 * 24 * 3600);
    assert_eq!(years, 10);
    let key = fs::read_to_string(dir.join(ROOT_KEY)).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(
        KeyPair::from_pem(&key).unwrap().algorithm(),
        &PKCS_ECDSA_P256_SHA256
    );

    let reloaded = LocalCa::load_or_init(&dir).unwrap();
    assert_eq!(reloaded.roots(), created.roots());
    assert_eq!(
        reloaded.roots_pem(),
        fs::read_to_string(dir.join(ROOT_CERT)).unwrap()
    );
    // Same key too: what the reloaded CA issues verifies against the first root.
    let leaf = reloaded.issue(&id(), HOUR).unwrap();
    x509::verify_chain(&leaf.chain, created.roots(), SystemTime::now()).unwrap();
}

#[test]
fn init_refuses_to_overwrite_a_root() {
    let tmp = tempfile::tempdir().unwrap();
    let first = LocalCa::init(tmp.path()).unwrap();
    let cert = fs::read(tmp.path().join(ROOT_CERT)).unwrap();
    let key = fs::read(tmp.path().join(ROOT_KEY)).unwrap();

    let err = LocalCa::init(tmp.path()).unwrap_err();
    assert!(matches!(err, LoadError::Exists { .. }), "{err}");
    assert!(err.to_string().contains(ROOT_CERT), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read(tmp.path().join(ROOT_CERT)).unwrap(), cert);
    assert_eq!(fs::read(tmp.path().join(ROOT_KEY)).unwrap(), key);
    assert_eq!(
        LocalCa::load_or_init(tmp.path()).unwrap().roots(),
        first.roots()
    );
}

#[test]
fn a_half_written_state_dir_is_not_silently_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    LocalCa::init(tmp.path()).unwrap();
    fs::remove_file(tmp.path().join(ROOT_KEY)).unwrap();
    let err = LocalCa::load_or_init(tmp.path()).unwrap_err();
    assert!(matches!(err, LoadError::Incomplete { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(ROOT_CERT) && msg.contains(ROOT_KEY), "{msg}");
    let err = LocalCa::init(tmp.path()).unwrap_err();
    assert!(matches!(err, LoadError::Exists { .. }), "{err}");
}

#[test]
fn leaf_names_exactly_the_identity_and_is_a_plain_p256_leaf() {
    let ca = LocalCa::generate().unwrap();
    let cert = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    assert_eq!(cert.identity, id());
    assert_eq!(cert.chain.len(), 1, "a root CA sends the leaf alone");
    assert_eq!(cert.roots, ca.roots());
    assert_eq!(x509::spiffe_ids(cert.leaf()).unwrap(), vec![id()]);

    let (_, leaf) = X509Certificate::from_der(cert.leaf()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "the subject is empty, so the SAN is critical");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/demo/sa/reviews"
        )]
    );
    assert_eq!(leaf.subject().iter().count(), 0, "empty subject, as Istio");
    assert!(!leaf.is_ca());
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && usage.key_encipherment() && !usage.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);

    let key = KeyPair::try_from(&cert.key).unwrap();
    assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the key is the leaf's"
    );
}

#[test]
fn leaf_verifies_against_its_root_only_and_only_while_valid() {
    let ca = LocalCa::generate().unwrap();
    let other = LocalCa::generate().unwrap();
    let cert = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    let now = SystemTime::now();

    x509::verify_chain(&cert.chain, ca.roots(), now).unwrap();
    x509::verify_chain_for(&cert.chain, ca.roots(), now, Usage::Server).unwrap();
    x509::verify_chain_for(&cert.chain, ca.roots(), now, Usage::Client).unwrap();

    let err = x509::verify_chain(&cert.chain, other.roots(), now).unwrap_err();
    assert!(matches!(err, x509::Error::Verify(_)), "{err}");

    // Default validity is 24 h from now, plus the clock-skew allowance before now.
    assert_eq!(
        cert.not_after.duration_since(cert.not_before).unwrap(),
        24 * HOUR + Duration::from_secs(60)
    );
    x509::verify_chain(&cert.chain, ca.roots(), now + 23 * HOUR).unwrap();
    let err = x509::verify_chain(&cert.chain, ca.roots(), now + 25 * HOUR).unwrap_err();
    assert!(
        matches!(err, x509::Error::Verify(webpki::Error::CertExpired { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn as_a_source_it_honours_the_configured_validity() {
    let ca = LocalCa::generate().unwrap().with_validity(2 * HOUR);
    let cert = ca.fetch(&id()).await.unwrap();
    let (not_before, not_after) = x509::validity(cert.leaf()).unwrap();
    assert_eq!((not_before, not_after), (cert.not_before, cert.not_after));
    let lifetime = not_after.duration_since(not_before).unwrap();
    assert!(lifetime > 2 * HOUR && lifetime <= 2 * HOUR + Duration::from_secs(60));
}

fn csr_for(sans: Vec<SanType>) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

#[test]
fn sign_csr_issues_for_the_given_identity_in_istio_layout() {
    let ca = LocalCa::generate().unwrap();
    let (key, csr) = csr_for(vec![
        SanType::URI(
            "spiffe://cluster.local/ns/other/sa/admin"
                .try_into()
                .unwrap(),
        ),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ]);
    let pems = ca.sign_csr(&csr, &id(), HOUR).unwrap();
    assert_eq!(pems.len(), 2, "[leaf, root bundle]");
    assert!(
        pems.iter()
            .all(|p| p.ends_with("-----END CERTIFICATE-----\n"))
    );
    assert_eq!(pems[1], ca.roots_pem());

    let leaf = x509::certs_from_pem(pems[0].as_bytes()).unwrap();
    assert_eq!(leaf.len(), 1, "one certificate per element");
    assert_eq!(x509::spiffe_ids(&leaf[0]).unwrap(), vec![id()]);
    let (_, parsed) = X509Certificate::from_der(&leaf[0]).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names.len(),
        1,
        "the CSR's SANs are ignored"
    );
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let roots = x509::certs_from_pem(pems[1].as_bytes()).unwrap();
    x509::verify_chain(&leaf, &roots, SystemTime::now()).unwrap();
    let (not_before, not_after) = x509::validity(&leaf[0]).unwrap();
    assert!(not_after.duration_since(not_before).unwrap() <= HOUR + Duration::from_secs(60));
}

#[test]
fn sign_csr_refuses_what_is_not_a_valid_request() {
    let ca = LocalCa::generate().unwrap();
    let err = ca.sign_csr("not a csr", &id(), HOUR).unwrap_err();
    assert!(matches!(err, IssueError::Csr(_)), "{err}");

    // A request whose signature does not match its key proves nothing.
    let (_, csr) = csr_for(vec![]);
    let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let err = ca.sign_csr(&tampered, &id(), HOUR).unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
}
