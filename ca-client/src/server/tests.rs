use std::collections::HashMap;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::metadata::MetadataValue;

use super::*;

fn id(ns: &str, sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
        .parse()
        .unwrap()
}

/// A CSR with the given URI SANs.
fn csr(uris: &[&str]) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(csr: String, impersonate: Option<&Identity>, validity: i64) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata: impersonate.map(|identity| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        }),
    }
}

fn token(value: &str) -> MetadataMap {
    let mut headers = MetadataMap::new();
    headers.insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {value}")).unwrap(),
    );
    headers
}

fn service(auth: Auth) -> Service {
    let mut config = Config::new("cluster.local");
    config.auth = auth;
    Service::new(Arc::new(LocalCa::generate().unwrap()), config)
}

fn tokens() -> Auth {
    Auth::Tokens(HashMap::from([
        ("node-token".to_owned(), id("istio-system", "ztunnel")),
        ("app-token".to_owned(), id("demo", "reviews")),
    ]))
}

/// The identity the leaf of an answer names.
fn leaf_identity(chain: &[String]) -> Identity {
    let leaf = x509::certs_from_pem(chain[0].as_bytes()).unwrap();
    let ids = x509::spiffe_ids(&leaf[0]).unwrap();
    assert_eq!(ids.len(), 1);
    ids[0].clone()
}

#[test]
fn open_signs_the_csrs_identity_in_istio_layout() {
    let service = service(Auth::Open);
    let chain = service
        .sign(
            &MetadataMap::new(),
            &request(
                csr(&["spiffe://cluster.local/ns/demo/sa/reviews"]),
                None,
                3600,
            ),
        )
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf, then the root bundle");
    assert_eq!(leaf_identity(&chain), id("demo", "reviews"));
    let leaf = x509::certs_from_pem(chain[0].as_bytes()).unwrap();
    let roots = x509::certs_from_pem(chain[1].as_bytes()).unwrap();
    x509::verify_chain(&leaf, &roots, std::time::SystemTime::now()).unwrap();
    let (nb, na) = x509::validity(&leaf[0]).unwrap();
    assert_eq!(
        na.duration_since(nb).unwrap(),
        Duration::from_secs(3600 + 60)
    );
}

#[test]
fn open_honours_impersonation() {
    let service = service(Auth::Open);
    let chain = service
        .sign(
            &MetadataMap::new(),
            &request(csr(&[]), Some(&id("demo", "ratings")), 0),
        )
        .unwrap();
    assert_eq!(leaf_identity(&chain), id("demo", "ratings"));
}

#[test]
fn open_needs_exactly_one_spiffe_id_without_impersonation() {
    let service = service(Auth::Open);
    let status = service
        .sign(&MetadataMap::new(), &request(csr(&[]), None, 0))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("exactly one SPIFFE id"),
        "{status:?}"
    );
}

#[test]
fn identities_outside_the_trust_domain_are_refused() {
    let service = service(Auth::Open);
    let foreign: Identity = "spiffe://other.domain/ns/demo/sa/x".parse().unwrap();
    let status = service
        .sign(&MetadataMap::new(), &request(csr(&[]), Some(&foreign), 0))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("outside the trust domain cluster.local")
    );
}

#[test]
fn tokens_are_checked_when_configured() {
    let service = service(tokens());
    for headers in [MetadataMap::new(), token("wrong"), token("")] {
        let status = service
            .sign(&headers, &request(csr(&[]), None, 0))
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), "request authenticate failure");
    }
    // The token names the caller, whatever the CSR says.
    let chain = service
        .sign(
            &token("app-token"),
            &request(csr(&["spiffe://cluster.local/ns/demo/sa/other"]), None, 0),
        )
        .unwrap();
    assert_eq!(leaf_identity(&chain), id("demo", "reviews"));
}

#[test]
fn only_trusted_node_accounts_impersonate() {
    let service = service(tokens());
    let ratings = id("demo", "ratings");
    let status = service
        .sign(&token("app-token"), &request(csr(&[]), Some(&ratings), 0))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "request impersonation authentication failure"
    );
    // Asking for oneself through impersonation is no impersonation.
    let own = id("demo", "reviews");
    let chain = service
        .sign(&token("app-token"), &request(csr(&[]), Some(&own), 0))
        .unwrap();
    assert_eq!(leaf_identity(&chain), own);
    // The node agent's account may.
    let chain = service
        .sign(&token("node-token"), &request(csr(&[]), Some(&ratings), 0))
        .unwrap();
    assert_eq!(leaf_identity(&chain), ratings);
}

#[test]
fn lifetimes_follow_istiods_rules() {
    let service = service(Auth::Open);
    let ask = |validity| {
        service.sign(
            &MetadataMap::new(),
            &request(csr(&[]), Some(&id("demo", "a")), validity),
        )
    };
    let chain = ask(0).unwrap();
    let leaf = x509::certs_from_pem(chain[0].as_bytes()).unwrap();
    let (nb, na) = x509::validity(&leaf[0]).unwrap();
    assert_eq!(
        na.duration_since(nb).unwrap(),
        crate::local::DEFAULT_VALIDITY + Duration::from_secs(60),
        "zero means the default"
    );
    let status = ask(-1).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = ask(91 * 24 * 3600).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("greater than the max allowed TTL")
    );
}

#[test]
fn a_bad_csr_is_a_signing_error() {
    let service = service(Auth::Open);
    let status = service
        .sign(
            &MetadataMap::new(),
            &request("not a csr".into(), Some(&id("demo", "a")), 0),
        )
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("CSR signing error ("),
        "{status:?}"
    );
}

#[test]
fn impersonated_identity_must_be_a_spiffe_string() {
    let service = service(Auth::Open);
    let mut bad = request(csr(&[]), None, 0);
    bad.metadata = Some(prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(1.0)),
            },
        )]
        .into(),
    });
    let status = service.sign(&MetadataMap::new(), &bad).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn serving_certificate_names_dns_names_and_ips() {
    let ca = LocalCa::generate().unwrap();
    let (chain, _key) = ca
        .issue_server(&default_dns_names(), SERVING_VALIDITY)
        .unwrap();
    let parsed = x509::parse(&chain[0]).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(
        names.contains(&"DNSName(istiod.istio-system.svc)".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"IPAddress(7f:00:00:01)".to_owned()),
        "{names:?}"
    );
    x509::verify_chain_for(
        &chain,
        ca.roots(),
        std::time::SystemTime::now(),
        x509::Usage::Server,
    )
    .unwrap();
    assert!(matches!(
        ca.issue_server(&["bad name!".into()], SERVING_VALIDITY),
        Err(IssueError::Name(_))
    ));
}
