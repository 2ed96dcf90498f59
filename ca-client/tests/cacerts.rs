//! Loading a CA from files in Istio's `cacerts` layout: RSA and ECDSA roots, intermediates, the
//! three private key encodings, and the errors for files that do not belong together.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ca_client::local::LoadError;
use ca_client::{CaFiles, LocalCa, x509};
use identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ECDSA_P521_SHA512,
    PKCS_RSA_SHA256, RsaKeySize, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use x509_parser::der_parser::parse_der;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn id() -> Identity {
    "spiffe://cluster.local/ns/demo/sa/reviews".parse().unwrap()
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn key(alg: &'static SignatureAlgorithm) -> KeyPair {
    if alg == &PKCS_RSA_SHA256 {
        KeyPair::generate_rsa_for(alg, RsaKeySize::_2048).unwrap()
    } else {
        KeyPair::generate_for(alg).unwrap()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "ca-client tests");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - DAY).into();
    params.not_after = (now + 365 * DAY).into();
    params
}

type Ca = CertifiedIssuer<'static, KeyPair>;

fn root(alg: &'static SignatureAlgorithm, name: &str) -> Ca {
    CertifiedIssuer::self_signed(ca_params(name), key(alg)).unwrap()
}

fn intermediate(alg: &'static SignatureAlgorithm, name: &str, parent: &Ca) -> Ca {
    CertifiedIssuer::signed_by(ca_params(name), key(alg), parent).unwrap()
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The algorithm-specific key inside a PKCS#8 document: PKCS#1 for RSA, SEC1 for EC.
fn unwrap_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    let (_, info) = parse_der(pkcs8).unwrap();
    let fields = info.as_sequence().unwrap();
    fields[2].as_slice().unwrap().to_vec()
}

#[derive(Clone, Copy)]
enum KeyFormat {
    Pkcs8,
    Pkcs1,
    Sec1,
}

fn key_pem(ca: &Ca, format: KeyFormat) -> String {
    let pkcs8 = ca.key().serialize_der();
    match format {
        KeyFormat::Pkcs8 => pem("PRIVATE KEY", &pkcs8),
        KeyFormat::Pkcs1 => pem("RSA PRIVATE KEY", &unwrap_pkcs8(&pkcs8)),
        KeyFormat::Sec1 => pem("EC PRIVATE KEY", &unwrap_pkcs8(&pkcs8)),
    }
}

fn cert_pem(certs: &[&Ca]) -> String {
    certs.iter().map(|c| x509::cert_to_pem(c.der())).collect()
}

/// Writes the files Istio's `cacerts` secret has; `None` leaves one out.
struct Cacerts {
    dir: tempfile::TempDir,
}

impl Cacerts {
    fn new() -> Cacerts {
        Cacerts {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, contents: Option<String>) -> &Self {
        let path = self.dir.path().join(name);
        match contents {
            Some(contents) => fs::write(path, contents).unwrap(),
            None => {
                let _ = fs::remove_file(path);
            }
        }
        self
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn files(&self) -> CaFiles {
        CaFiles::cacerts(self.dir.path())
    }
}

fn assert_issues_verifiable_leaves(ca: &LocalCa, sent_after_leaf: &[CertificateDer<'_>]) {
    let cert = ca.issue(&id(), DAY).unwrap();
    assert_eq!(&cert.chain[1..], sent_after_leaf);
    x509::verify_chain(&cert.chain, ca.roots(), SystemTime::now()).unwrap();
    assert_eq!(x509::spiffe_ids(cert.leaf()).unwrap(), vec![id()]);
}

#[test]
fn istio_style_rsa_root_made_by_openssl() {
    let files = CaFiles::cacerts(&testdata("istio-rsa-root"));
    assert_eq!((files.chain.as_ref(), files.root.as_ref()), (None, None));
    let ca = LocalCa::load(&files).unwrap();
    let root = x509::certs_from_pem(&fs::read(&files.cert).unwrap()).unwrap();
    assert_eq!(ca.roots(), root);
    assert_issues_verifiable_leaves(&ca, &[]);

    let csr = rcgen::CertificateParams::default()
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .pem()
        .unwrap();
    let pems = ca.sign_csr(&csr, &id(), DAY).unwrap();
    assert_eq!(pems.len(), 2);
    let leaf = x509::certs_from_pem(pems[0].as_bytes()).unwrap();
    x509::verify_chain(&leaf, &root, SystemTime::now()).unwrap();
}

#[test]
fn rsa_root_with_pkcs8_or_pkcs1_key() {
    let root = root(&PKCS_RSA_SHA256, "rsa root");
    for format in [KeyFormat::Pkcs8, KeyFormat::Pkcs1] {
        let files = Cacerts::new();
        files
            .write("ca-cert.pem", Some(cert_pem(&[&root])))
            .write("ca-key.pem", Some(key_pem(&root, format)));
        let ca = LocalCa::load(&files.files()).unwrap();
        assert_eq!(ca.roots(), [root.der().clone()]);
        assert_issues_verifiable_leaves(&ca, &[]);
    }
}

#[test]
fn ecdsa_root_through_intermediates() {
    let root = root(&PKCS_ECDSA_P384_SHA384, "root");
    let middle = intermediate(&PKCS_ECDSA_P256_SHA256, "middle", &root);
    let signing = intermediate(&PKCS_ECDSA_P256_SHA256, "signing", &middle);
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&signing])))
        .write("ca-key.pem", Some(key_pem(&signing, KeyFormat::Sec1)))
        .write("root-cert.pem", Some(cert_pem(&[&root])));
    let sent = [signing.der().clone(), middle.der().clone()];

    // Istio's cert-chain.pem: from the signing certificate up to and including the root.
    files.write(
        "cert-chain.pem",
        Some(cert_pem(&[&signing, &middle, &root])),
    );
    let ca = LocalCa::load(&files.files()).unwrap();
    assert_eq!(ca.roots(), [root.der().clone()]);
    assert_issues_verifiable_leaves(&ca, &sent);

    // Just the certificates in between also does.
    files.write("cert-chain.pem", Some(cert_pem(&[&middle])));
    let ca = LocalCa::load(&files.files()).unwrap();
    assert_issues_verifiable_leaves(&ca, &sent);

    // A peer without the intermediates cannot build the path: they must be sent.
    let cert = ca.issue(&id(), DAY).unwrap();
    assert!(x509::verify_chain(&cert.chain[..1], ca.roots(), SystemTime::now()).is_err());

    // CreateCertificate layout: leaf, each intermediate, then the root bundle.
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .pem()
        .unwrap();
    let pems = ca.sign_csr(&csr, &id(), DAY).unwrap();
    assert_eq!(pems.len(), 4);
    assert_eq!(pems[1], x509::cert_to_pem(signing.der()));
    assert_eq!(pems[2], x509::cert_to_pem(middle.der()));
    assert_eq!(pems[3], x509::cert_to_pem(root.der()));
    let mut chain = x509::certs_from_pem(pems[..3].concat().as_bytes()).unwrap();
    assert_eq!(chain.len(), 3);
    x509::verify_chain(&chain, &[root.der().clone()], SystemTime::now()).unwrap();
    chain.truncate(1);
    assert_eq!(x509::spiffe_ids(&chain[0]).unwrap(), vec![id()]);
}

#[test]
fn several_roots_are_all_trusted() {
    let old = root(&PKCS_ECDSA_P256_SHA256, "old root");
    let new = root(&PKCS_ECDSA_P256_SHA256, "new root");
    let signing = intermediate(&PKCS_ECDSA_P256_SHA256, "signing", &new);
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&signing])))
        .write("ca-key.pem", Some(key_pem(&signing, KeyFormat::Pkcs8)))
        .write("root-cert.pem", Some(cert_pem(&[&old, &new])));
    let ca = LocalCa::load(&files.files()).unwrap();
    assert_eq!(ca.roots().len(), 2);
    assert_eq!(ca.roots_pem(), cert_pem(&[&old, &new]));
    assert_issues_verifiable_leaves(&ca, &[signing.der().clone()]);
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_naming_both_files() {
    let root = root(&PKCS_ECDSA_P256_SHA256, "root");
    let stranger = self::root(&PKCS_ECDSA_P256_SHA256, "stranger");
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&root])))
        .write("ca-key.pem", Some(key_pem(&stranger, KeyFormat::Pkcs8)));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::KeyMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&files.path("ca-key.pem")), "{msg}");
    assert!(msg.contains(&files.path("ca-cert.pem")), "{msg}");
}

#[test]
fn a_chain_that_does_not_lead_to_the_root_is_refused_naming_the_files() {
    let root_a = root(&PKCS_ECDSA_P256_SHA256, "root a");
    let root_b = root(&PKCS_ECDSA_P256_SHA256, "root b");
    let middle = intermediate(&PKCS_ECDSA_P256_SHA256, "middle", &root_a);
    let signing = intermediate(&PKCS_ECDSA_P256_SHA256, "signing", &middle);
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&signing])))
        .write("ca-key.pem", Some(key_pem(&signing, KeyFormat::Pkcs8)))
        .write("cert-chain.pem", Some(cert_pem(&[&middle])))
        .write("root-cert.pem", Some(cert_pem(&[&root_b])));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::Chain { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&files.path("ca-cert.pem")), "{msg}");
    assert!(msg.contains(&files.path("root-cert.pem")), "{msg}");
    assert!(msg.contains(&files.path("cert-chain.pem")), "{msg}");

    // The right root, but a link missing from the chain.
    files
        .write("root-cert.pem", Some(cert_pem(&[&root_a])))
        .write("cert-chain.pem", None);
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::Chain { .. }), "{err}");
    assert!(
        err.to_string().contains(&files.path("root-cert.pem")),
        "{err}"
    );
}

#[test]
fn an_intermediate_without_a_root_file_is_refused() {
    let root = root(&PKCS_ECDSA_P256_SHA256, "root");
    let signing = intermediate(&PKCS_ECDSA_P256_SHA256, "signing", &root);
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&signing])))
        .write("ca-key.pem", Some(key_pem(&signing, KeyFormat::Pkcs8)));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::NotSelfSigned { .. }), "{err}");
    assert!(
        err.to_string().contains(&files.path("ca-cert.pem")),
        "{err}"
    );
}

#[test]
fn a_certificate_that_is_not_a_ca_is_refused() {
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::default().self_signed(&key).unwrap();
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(leaf.pem()))
        .write("ca-key.pem", Some(key.serialize_pem()));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::NotCa { .. }), "{err}");
    assert!(
        err.to_string().contains(&files.path("ca-cert.pem")),
        "{err}"
    );
}

#[test]
fn weak_and_unsupported_keys_are_refused() {
    let files = CaFiles::cacerts(&testdata("weak-rsa-1024"));
    let err = LocalCa::load(&files).unwrap_err();
    assert!(
        matches!(err, LoadError::WeakKey { bits: 1024, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&files.cert.display().to_string()),
        "{err}"
    );

    let p521 = root(&PKCS_ECDSA_P521_SHA512, "p521");
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&p521])))
        .write("ca-key.pem", Some(key_pem(&p521, KeyFormat::Pkcs8)));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::UnsupportedKey { .. }), "{err}");
    assert!(err.to_string().contains(&files.path("ca-key.pem")), "{err}");
}

#[test]
fn a_corrupt_key_is_refused_naming_the_file() {
    let root = root(&PKCS_ECDSA_P256_SHA256, "root");
    let files = Cacerts::new();
    files
        .write("ca-cert.pem", Some(cert_pem(&[&root])))
        .write("ca-key.pem", Some(pem("PRIVATE KEY", b"not a key")));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::Key { .. }), "{err}");
    assert!(err.to_string().contains(&files.path("ca-key.pem")), "{err}");
}

#[test]
fn missing_or_empty_files_are_named() {
    let root = root(&PKCS_ECDSA_P256_SHA256, "root");
    let files = Cacerts::new();
    files.write("ca-cert.pem", Some(cert_pem(&[&root])));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }), "{err}");
    assert!(err.to_string().contains(&files.path("ca-key.pem")), "{err}");

    files.write("ca-key.pem", Some(cert_pem(&[&root])));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::Pem { .. }), "{err}");
    assert!(err.to_string().contains(&files.path("ca-key.pem")), "{err}");
    assert!(
        err.to_string().contains("no unencrypted private key"),
        "{err}"
    );

    files
        .write("ca-key.pem", Some(key_pem(&root, KeyFormat::Pkcs8)))
        .write("ca-cert.pem", Some("nothing here\n".into()));
    let err = LocalCa::load(&files.files()).unwrap_err();
    assert!(matches!(err, LoadError::Pem { .. }), "{err}");
    assert!(
        err.to_string().contains(&files.path("ca-cert.pem")),
        "{err}"
    );
}
