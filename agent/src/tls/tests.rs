//! Real TLS handshakes between the configs built here, over in-memory duplex pipes, with
//! certificates minted per test by rcgen.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use identity::{Identity, WorkloadCertificate};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::client::Resumption;
use rustls::{CipherSuite, ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;

const CLIENT: &str = "spiffe://cluster.local/ns/front/sa/web";
const SERVER: &str = "spiffe://cluster.local/ns/back/sa/api";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// A certificate authority: a root, or an intermediate signed by another `Ca`.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

impl Ca {
    fn root(name: &str) -> Self {
        let params = ca_params(name);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        Self { params, key, der }
    }

    fn intermediate(&self, name: &str) -> Self {
        let params = ca_params(name);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params
            .signed_by(&key, &self.issuer())
            .unwrap()
            .der()
            .clone();
        Self { params, key, der }
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// A workload leaf (ECDSA P-256) naming `uris` as URI SANs, valid from an hour ago for a day,
    /// and its PKCS#8 key.
    fn leaf(&self, uris: &[&str]) -> (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>) {
        self.leaf_valid(uris, validity())
    }

    fn leaf_valid(
        &self,
        uris: &[&str],
        (not_before, not_after): (OffsetDateTime, OffsetDateTime),
    ) -> (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>) {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI((*uri).try_into().unwrap()))
            .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params
            .signed_by(&key, &self.issuer())
            .unwrap()
            .der()
            .clone();
        (der, PrivatePkcs8KeyDer::from(key.serialize_der()))
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (not_before, _) = validity();
    params.not_before = not_before;
    params.not_after = not_before + time::Duration::days(30);
    params
}

fn validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
}

/// A bundle for `identity` whose leaf is issued by `issuer` and names `uris`, sent with
/// `intermediates`, trusting `roots`.
fn bundle_naming(
    identity: &str,
    uris: &[&str],
    issuer: &Ca,
    intermediates: &[&Ca],
    roots: &[&Ca],
) -> Arc<WorkloadCertificate> {
    let (leaf, key) = issuer.leaf(uris);
    let (not_before, not_after) = validity();
    let mut chain = vec![leaf];
    chain.extend(intermediates.iter().map(|ca| ca.der.clone()));
    Arc::new(WorkloadCertificate {
        identity: id(identity),
        chain,
        key,
        roots: roots.iter().map(|ca| ca.der.clone()).collect(),
        not_before: not_before.into(),
        not_after: not_after.into(),
    })
}

/// The usual bundle: the leaf names exactly `identity`, issued directly by the root it trusts.
fn bundle(identity: &str, root: &Ca) -> Arc<WorkloadCertificate> {
    bundle_naming(identity, &[identity], root, &[], &[root])
}

struct Outcome {
    client: io::Result<client::TlsStream<DuplexStream>>,
    server: io::Result<server::TlsStream<DuplexStream>>,
}

async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let connect = TlsConnector::from(client).connect(server_name(), client_io);
    let accept = TlsAcceptor::from(server).accept(server_io);
    // Bounds a broken test, asserts nothing about speed.
    let (client, server) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(connect, accept)
    })
    .await
    .expect("handshake neither finished nor failed");
    Outcome { client, server }
}

/// Publishes both bundles and handshakes from `client`'s identity expecting `expected`.
async fn handshake_between(
    client: Arc<WorkloadCertificate>,
    server: Arc<WorkloadCertificate>,
    expected: &[Identity],
) -> Outcome {
    let creds = Credentials::new();
    let (src, dst) = (client.identity.clone(), server.identity.clone());
    creds.publish(client).unwrap();
    creds.publish(server).unwrap();
    handshake(
        creds.client_config(&src, expected).unwrap(),
        creds.server_config(&dst).unwrap(),
    )
    .await
}

fn err_text<T>(res: io::Result<T>) -> String {
    match res {
        Ok(_) => panic!("expected the handshake to fail"),
        Err(err) => err.to_string(),
    }
}

/// In TLS 1.3 the client finishes before the server has judged its certificate, so a server's
/// refusal shows up on the client's first read.
async fn assert_client_cut_off(client: io::Result<client::TlsStream<DuplexStream>>) {
    if let Ok(mut stream) = client {
        let mut buf = [0u8; 1];
        let read = stream.read(&mut buf).await;
        assert!(
            read.is_err(),
            "client read after a refused handshake: {read:?}"
        );
    }
}

#[tokio::test]
async fn mutual_handshake_reports_both_identities_and_parameters() {
    let root = Ca::root("mesh root");
    let out = handshake_between(bundle(CLIENT, &root), bundle(SERVER, &root), &[id(SERVER)]).await;
    let mut client = out.client.expect("client handshake");
    let mut server = out.server.expect("server handshake");

    let (_, client_conn) = client.get_ref();
    let (_, server_conn) = server.get_ref();
    assert_eq!(peer_identity(client_conn), Some(id(SERVER)));
    assert_eq!(peer_identity(server_conn), Some(id(CLIENT)));
    let both: [&CommonState; 2] = [client_conn, server_conn];
    for conn in both {
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        let suite = conn.negotiated_cipher_suite().unwrap().suite();
        assert!(
            matches!(
                suite,
                CipherSuite::TLS13_AES_256_GCM_SHA384 | CipherSuite::TLS13_AES_128_GCM_SHA256
            ),
            "negotiated {suite:?}"
        );
    }
    assert_eq!(server_conn.server_name(), None, "client sent SNI");
    exchange(&mut client, &mut server).await;
}

/// Sends `ping`, answers `pong`: proves bytes flow both ways and lets the client take in
/// whatever the server sent after the handshake (session tickets).
async fn exchange(
    client: &mut client::TlsStream<DuplexStream>,
    server: &mut server::TlsStream<DuplexStream>,
) {
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn client_sends_no_sni_and_checks_no_host_name() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(CLIENT, &root)).unwrap();
    creds.publish(bundle(SERVER, &root)).unwrap();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    // A DNS name that the server's certificate does not carry, and that SNI would send.
    let name = ServerName::try_from("api.back.svc.cluster.local").unwrap();
    let connector = TlsConnector::from(creds.client_config(&id(CLIENT), &[id(SERVER)]).unwrap());
    let acceptor = TlsAcceptor::from(creds.server_config(&id(SERVER)).unwrap());
    let (client, server) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            connector.connect(name, client_io),
            acceptor.accept(server_io)
        )
    })
    .await
    .expect("handshake neither finished nor failed");
    client.expect("client handshake");
    assert_eq!(
        server.expect("server handshake").get_ref().1.server_name(),
        None
    );
}

#[tokio::test]
async fn client_never_resumes_a_session() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(CLIENT, &root)).unwrap();
    creds.publish(bundle(SERVER, &root)).unwrap();
    let client_config = creds.client_config(&id(CLIENT), &[id(SERVER)]).unwrap();
    let server_config = creds.server_config(&id(SERVER)).unwrap();
    for _ in 0..2 {
        let out = handshake(client_config.clone(), server_config.clone()).await;
        let mut client = out.client.expect("client handshake");
        let mut server = out.server.expect("server handshake");
        exchange(&mut client, &mut server).await;
        assert_eq!(
            client.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full)
        );
    }
}

#[tokio::test]
async fn handshake_succeeds_through_an_intermediate() {
    let root = Ca::root("mesh root");
    let inter = root.intermediate("mesh intermediate");
    let client = bundle_naming(CLIENT, &[CLIENT], &inter, &[&inter], &[&root]);
    let server = bundle_naming(SERVER, &[SERVER], &inter, &[&inter], &[&root]);
    let out = handshake_between(client, server, &[id(SERVER)]).await;
    let client = out.client.expect("client handshake");
    let server = out.server.expect("server handshake");
    assert_eq!(peer_identity(client.get_ref().1), Some(id(SERVER)));
    assert_eq!(peer_identity(server.get_ref().1), Some(id(CLIENT)));
    assert_eq!(client.get_ref().1.peer_certificates().unwrap().len(), 2);
}

#[tokio::test]
async fn client_refuses_server_not_among_expected() {
    let root = Ca::root("mesh root");
    let wanted = [
        id("spiffe://cluster.local/ns/back/sa/db"),
        id("spiffe://cluster.local/ns/back/sa/cache"),
    ];
    let out = handshake_between(bundle(CLIENT, &root), bundle(SERVER, &root), &wanted).await;
    let err = err_text(out.client);
    assert!(
        err.contains(&format!("server presented identity {SERVER}")),
        "{err}"
    );
    assert!(
        err.contains("expected one of spiffe://cluster.local/ns/back/sa/db, spiffe://cluster.local/ns/back/sa/cache"),
        "{err}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn server_accepts_a_client_with_any_id_in_its_trust_domain() {
    let root = Ca::root("mesh root");
    let other_td = "spiffe://other.domain/ns/front/sa/web";
    let uris = ["https://example.invalid/not-spiffe", other_td, CLIENT];
    let client = bundle_naming(other_td, &uris, &root, &[], &[&root]);
    let out = handshake_between(client, bundle(SERVER, &root), &[id(SERVER)]).await;
    let server = out.server.expect("server handshake");
    // The first SPIFFE id is the peer's identity, even where a later one let it in.
    assert_eq!(peer_identity(server.get_ref().1), Some(id(other_td)));
}

#[tokio::test]
async fn server_refuses_client_from_another_trust_domain() {
    let root = Ca::root("mesh root");
    let other_td = "spiffe://other.domain/ns/front/sa/web";
    let out = handshake_between(
        bundle(other_td, &root),
        bundle(SERVER, &root),
        &[id(SERVER)],
    )
    .await;
    let err = err_text(out.server);
    assert!(
        err.contains(&format!(
            "client presented identity {other_td}, none in trust domain \"cluster.local\""
        )),
        "{err}"
    );
    assert_client_cut_off(out.client).await;
}

#[tokio::test]
async fn server_refuses_client_signed_by_another_root() {
    let root = Ca::root("mesh root");
    let stranger = Ca::root("other root");
    // The client trusts both roots, so only the server's check can fail.
    let client = bundle_naming(CLIENT, &[CLIENT], &stranger, &[], &[&root, &stranger]);
    let out = handshake_between(client, bundle(SERVER, &root), &[id(SERVER)]).await;
    let err = err_text(out.server);
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_client_cut_off(out.client).await;
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(SERVER, &root)).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(root.der.clone()).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            roots: Arc::new(roots),
            expected: vec![id(SERVER)],
            algorithms: provider().signature_verification_algorithms,
        }))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    client.resumption = Resumption::disabled();

    let out = handshake(Arc::new(client), creds.server_config(&id(SERVER)).unwrap()).await;
    let err = err_text(out.server);
    assert!(err.contains("peer sent no certificates"), "{err}");
    assert_client_cut_off(out.client).await;
}

#[tokio::test]
async fn client_refuses_server_signed_by_another_root() {
    let root = Ca::root("mesh root");
    let stranger = Ca::root("other root");
    // The server trusts both roots, so only the client's check can fail.
    let server = bundle_naming(SERVER, &[SERVER], &stranger, &[], &[&root, &stranger]);
    let out = handshake_between(bundle(CLIENT, &root), server, &[id(SERVER)]).await;
    let err = err_text(out.client);
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(out.server.is_err());
}

#[tokio::test]
async fn republishing_changes_the_presented_certificate() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(CLIENT, &root)).unwrap();
    let first = bundle(SERVER, &root);
    let second = bundle(SERVER, &root);
    assert_ne!(first.leaf(), second.leaf());

    for published in [first, second] {
        let leaf = published.leaf().clone();
        creds.publish(published).unwrap();
        let out = handshake(
            creds.client_config(&id(CLIENT), &[id(SERVER)]).unwrap(),
            creds.server_config(&id(SERVER)).unwrap(),
        )
        .await;
        let client = out.client.expect("client handshake");
        assert_eq!(client.get_ref().1.peer_certificates().unwrap()[0], leaf);
    }
}

#[tokio::test]
async fn peer_offering_only_chacha20_or_tls12_is_refused() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(SERVER, &root)).unwrap();

    // The server refuses at the ClientHello, before the client would verify anything.
    let chacha_only = Arc::new(CryptoProvider {
        cipher_suites: vec![aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
        ..aws_lc_rs::default_provider()
    });
    let tls12_only = Arc::new(aws_lc_rs::default_provider());
    let peers = [
        (
            chacha_only,
            &rustls::version::TLS13,
            "NoCipherSuitesInCommon",
        ),
        (
            tls12_only,
            &rustls::version::TLS12,
            "Tls12NotOfferedOrEnabled",
        ),
    ];
    for (peer_provider, version, want) in peers {
        let mut config = ClientConfig::builder_with_provider(peer_provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let out = handshake(Arc::new(config), creds.server_config(&id(SERVER)).unwrap()).await;
        let err = err_text(out.server);
        assert!(err.contains(want), "{version:?}: {err}");
    }
}

#[test]
fn provider_offers_only_the_two_aes_gcm_suites_aes_128_first() {
    let suites: Vec<CipherSuite> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        [
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::TLS13_AES_256_GCM_SHA384
        ]
    );
    let groups = |p: &CryptoProvider| p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>();
    assert_eq!(groups(&provider()), groups(&aws_lc_rs::default_provider()));
}

/// A peer whose records are aws-lc's (another agent or ztunnel built with it) and ours, which
/// are ring's where the CPU has VAES: handshakes and bytes both ways, with each suite, in
/// records of every size up to the 16 KiB maximum.
#[tokio::test]
async fn records_interoperate_with_a_peer_using_aws_lc_for_each_suite() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(SERVER, &root)).unwrap();
    let client_cert = unwrapped(bundle(CLIENT, &root));
    let mut roots = RootCertStore::empty();
    roots.add(root.der.clone()).unwrap();
    let roots = Arc::new(roots);
    for suite in [
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ] {
        let aws_lc_only = Arc::new(CryptoProvider {
            cipher_suites: vec![suite],
            ..aws_lc_rs::default_provider()
        });
        let mut client = ClientConfig::builder_with_provider(aws_lc_only)
            .with_protocol_versions(TLS13_ONLY)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: roots.clone(),
                expected: vec![id(SERVER)],
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_client_auth_cert(
                client_cert.chain.clone(),
                client_cert.key.clone_key().into(),
            )
            .unwrap();
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        let out = handshake(Arc::new(client), creds.server_config(&id(SERVER)).unwrap()).await;
        let mut client = out.client.expect("client handshake");
        let mut server = out.server.expect("server handshake");
        let negotiated = server.get_ref().1.negotiated_cipher_suite().unwrap();
        assert_eq!(negotiated.suite(), suite.suite());

        let data: Vec<u8> = (0..64 * 1024 + 7).map(|i| (i * 7 + 3) as u8).collect();
        // Bounds a broken test, asserts nothing about speed.
        let (up, down) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(
                async {
                    for len in [1, 100, 16 * 1024, 64 * 1024 + 7] {
                        client.write_all(&data[..len]).await.unwrap();
                        client.flush().await.unwrap();
                        let mut got = vec![0; len];
                        client.read_exact(&mut got).await.unwrap();
                        assert!(got == data[..len], "{suite:?}: {len} B back");
                    }
                },
                async {
                    let mut got = vec![0; 1 + 100 + 16 * 1024 + 64 * 1024 + 7];
                    let mut at = 0;
                    for len in [1, 100, 16 * 1024, 64 * 1024 + 7] {
                        server.read_exact(&mut got[at..at + len]).await.unwrap();
                        assert!(got[at..at + len] == data[..len], "{suite:?}: {len} B sent");
                        server.write_all(&got[at..at + len]).await.unwrap();
                        server.flush().await.unwrap();
                        at += len;
                    }
                }
            )
        })
        .await
        .expect("the exchange neither finished nor failed");
        let ((), ()) = (up, down);
    }
}

fn unwrapped(cert: Arc<WorkloadCertificate>) -> WorkloadCertificate {
    Arc::into_inner(cert).unwrap()
}

fn publish_err(cert: WorkloadCertificate) -> String {
    let creds = Credentials::new();
    let identity = cert.identity.clone();
    let err = creds.publish(Arc::new(cert)).unwrap_err().to_string();
    assert!(
        creds.server_config(&identity).is_none(),
        "a refused cert was kept"
    );
    err
}

#[test]
fn publish_refuses_unusable_bundles_naming_the_identity() {
    let root = Ca::root("mesh root");
    let stranger = Ca::root("other root");
    let now = OffsetDateTime::now_utc();

    let mut no_chain = unwrapped(bundle(SERVER, &root));
    no_chain.chain.clear();
    let mut garbage_key = unwrapped(bundle(SERVER, &root));
    garbage_key.key = PrivatePkcs8KeyDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let mut other_key = unwrapped(bundle(SERVER, &root));
    other_key.key = unwrapped(bundle(SERVER, &root)).key;
    let mut no_roots = unwrapped(bundle(SERVER, &root));
    no_roots.roots.clear();
    let mut garbage_root = unwrapped(bundle(SERVER, &root));
    garbage_root.roots = vec![CertificateDer::from(vec![1, 2, 3])];
    let mut garbage_leaf = unwrapped(bundle(SERVER, &root));
    garbage_leaf.chain[0] = CertificateDer::from(vec![1, 2, 3]);
    let mut expired = unwrapped(bundle(SERVER, &root));
    let expired_window = (now - time::Duration::days(2), now - time::Duration::days(1));
    expired.chain[0] = root.leaf_valid(&[SERVER], expired_window).0;

    let names_client = format!("does not name it as a URI SAN (it names {CLIENT})");
    let cases: Vec<(&str, WorkloadCertificate, &str)> = vec![
        ("empty chain", no_chain, "has an empty chain"),
        ("garbage key", garbage_key, "private key for"),
        ("another leaf's key", other_key, "does not match its leaf"),
        ("no roots", no_roots, "no root certificates given"),
        ("garbage root", garbage_root, "trust roots for"),
        ("garbage leaf", garbage_leaf, "cannot be parsed"),
        (
            "leaf naming another identity",
            unwrapped(bundle_naming(SERVER, &[CLIENT], &root, &[], &[&root])),
            &names_client,
        ),
        (
            "leaf from another root",
            unwrapped(bundle_naming(SERVER, &[SERVER], &stranger, &[], &[&root])),
            "does not verify to its roots: UnknownIssuer",
        ),
        (
            "expired leaf",
            expired,
            "does not verify to its roots: CertExpired",
        ),
    ];
    for (what, cert, want) in cases {
        let err = publish_err(cert);
        assert!(err.contains(SERVER), "{what}: {err}");
        assert!(err.contains(want), "{what}: {err}");
    }
}

#[test]
fn publish_accepts_a_leaf_that_starts_a_little_in_the_future() {
    let root = Ca::root("mesh root");
    let now = OffsetDateTime::now_utc();
    let mut cert = unwrapped(bundle(SERVER, &root));
    let (leaf, key) = root.leaf_valid(
        &[SERVER],
        (
            now + time::Duration::minutes(5),
            now + time::Duration::days(1),
        ),
    );
    cert.chain[0] = leaf;
    cert.key = key;
    cert.not_before = (now + time::Duration::minutes(5)).into();
    let creds = Credentials::new();
    creds.publish(Arc::new(cert)).unwrap();
    assert!(creds.server_config(&id(SERVER)).is_some());
}

#[test]
fn forgotten_and_unknown_identities_have_no_configs() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(CLIENT, &root)).unwrap();
    assert!(creds.client_config(&id(CLIENT), &[id(SERVER)]).is_ok());
    assert!(creds.server_config(&id(CLIENT)).is_some());

    creds.forget(&id(CLIENT));
    assert!(creds.server_config(&id(CLIENT)).is_none());
    let err = creds
        .client_config(&id(CLIENT), &[id(SERVER)])
        .unwrap_err()
        .to_string();
    assert_eq!(err, format!("no certificate is published for {CLIENT}"));
    // Forgetting what is not there is not an error.
    creds.forget(&id(SERVER));
}

#[test]
fn client_config_needs_an_expected_identity() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(CLIENT, &root)).unwrap();
    let err = creds
        .client_config(&id(CLIENT), &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("no expected server identity given for a connection from {CLIENT}")
    );
}

#[test]
fn server_config_is_shared_until_republished() {
    let root = Ca::root("mesh root");
    let creds = Credentials::new();
    creds.publish(bundle(SERVER, &root)).unwrap();
    let first = creds.server_config(&id(SERVER)).unwrap();
    assert!(Arc::ptr_eq(
        &first,
        &creds.server_config(&id(SERVER)).unwrap()
    ));
    creds.publish(bundle(SERVER, &root)).unwrap();
    assert!(!Arc::ptr_eq(
        &first,
        &creds.server_config(&id(SERVER)).unwrap()
    ));
}
