use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;

use super::*;

fn id() -> Identity {
    "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap()
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// A self-signed CA valid over `[not_before, not_after]`.
fn ca_valid(not_before: SystemTime, not_after: SystemTime) -> LocalCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_before = OffsetDateTime::from(whole_seconds(not_before));
    params.not_after = OffsetDateTime::from(whole_seconds(not_after));
    let cert = params.self_signed(&key).unwrap().der().clone();
    LocalCa::from_parts(key, cert.clone(), Vec::new(), vec![cert]).unwrap()
}

#[test]
fn leaf_starts_a_little_in_the_past_and_lasts_as_asked() {
    let year = Duration::from_secs(365 * 24 * 3600);
    let now = SystemTime::now();
    let ca = ca_valid(now - year, now + year);
    let cert = ca.issue(&id(), Duration::from_secs(3600)).unwrap();
    let before = secs(now);
    assert!(secs(cert.not_before) + 60 >= before && secs(cert.not_before) + 58 <= before);
    assert_eq!(
        cert.not_after.duration_since(cert.not_before).unwrap(),
        Duration::from_secs(3600) + CLOCK_SKEW
    );
    // What the certificate says is what the bundle says.
    assert_eq!(
        x509::validity(cert.leaf()).unwrap(),
        (cert.not_before, cert.not_after)
    );
}

#[test]
fn leaf_never_starts_before_the_ca() {
    let now = whole_seconds(SystemTime::now());
    let ca = ca_valid(now, now + Duration::from_secs(365 * 24 * 3600));
    let cert = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    assert_eq!(cert.not_before, now);
}

#[test]
fn leaf_never_outlives_the_ca() {
    let now = SystemTime::now();
    let ca_end = whole_seconds(now + Duration::from_secs(3600));
    let ca = ca_valid(now - Duration::from_secs(3600), ca_end);
    let cert = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    assert_eq!(cert.not_after, ca_end);
    x509::verify_chain(&cert.chain, &cert.roots, SystemTime::now()).unwrap();
}

#[test]
fn an_expired_ca_issues_nothing() {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let ca = ca_valid(now - 2 * day, now - day);
    let err = ca.issue(&id(), DEFAULT_VALIDITY).unwrap_err();
    assert!(matches!(err, IssueError::Expired(_)), "{err}");
}

#[test]
fn zero_validity_is_refused() {
    let ca = LocalCa::generate().unwrap();
    let err = ca.issue(&id(), Duration::ZERO).unwrap_err();
    assert!(matches!(err, IssueError::ZeroValidity), "{err}");
}

#[test]
fn serials_are_random_positive_and_full_length() {
    let ca = LocalCa::generate().unwrap();
    let a = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    let b = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    let serial = |c: &WorkloadCertificate| x509::parse(c.leaf()).unwrap().raw_serial().to_vec();
    let (sa, sb) = (serial(&a), serial(&b));
    assert_ne!(sa, sb);
    for s in [sa, sb] {
        assert_eq!(s.len(), 16);
        assert_eq!(s[0] & 0x80, 0, "positive");
    }
}

#[test]
fn chain_sent_with_leaves_skips_roots_and_duplicates() {
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, &root_key);

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "intermediate");
    let intermediate = params.signed_by(&key, &root_issuer).unwrap().der().clone();
    let root = root.der().clone();

    // `cert-chain.pem` often repeats the signing certificate and ends with the root.
    let ca = LocalCa::from_parts(
        key,
        intermediate.clone(),
        vec![intermediate.clone(), root.clone()],
        vec![root.clone()],
    )
    .unwrap();
    let cert = ca.issue(&id(), DEFAULT_VALIDITY).unwrap();
    assert_eq!(cert.chain.len(), 2);
    assert_eq!(cert.chain[1], intermediate);
    assert_eq!(cert.roots, vec![root]);
    x509::verify_chain(&cert.chain, &cert.roots, SystemTime::now()).unwrap();
}

#[tokio::test]
async fn as_a_source_it_issues_for_the_default_validity() {
    let ca = LocalCa::generate().unwrap();
    let cert = ca.fetch(&id()).await.unwrap();
    assert_eq!(cert.identity, id());
    assert_eq!(
        cert.not_after.duration_since(cert.not_before).unwrap(),
        DEFAULT_VALIDITY + CLOCK_SKEW
    );
    let ca = ca.with_validity(Duration::from_secs(600));
    let cert = ca.fetch(&id()).await.unwrap();
    assert_eq!(
        cert.not_after.duration_since(cert.not_before).unwrap(),
        Duration::from_secs(600) + CLOCK_SKEW
    );
}
