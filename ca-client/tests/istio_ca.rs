//! Component tests: the Istio CA client (and the cache on top of it) against the fake CA on
//! loopback, over real TLS and gRPC.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ca_client::istio::{self, Client, FetchError};
use ca_client::server::{self, Service};
use ca_client::testing::{FakeCa, RecordingSink};
use ca_client::{Cache, CertificateSource, Error, LocalCa, x509};
use identity::Identity;

/// Bounds every wait on the network, so that a broken build fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

fn id(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
        .parse()
        .unwrap()
}

fn node() -> Identity {
    "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        .parse()
        .unwrap()
}

async fn fetch(
    client: &Client,
    identity: &Identity,
) -> Result<identity::WorkloadCertificate, Error> {
    tokio::time::timeout(PATIENCE, client.fetch(identity))
        .await
        .expect("the fetch finished in time")
}

fn status_of(err: &Error) -> Option<(tonic::Code, String)> {
    match err {
        Error::Istio { source, .. } => match source.as_ref() {
            FetchError::Status { code, message } => Some((*code, message.clone())),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn issues_a_verified_certificate_for_the_key_it_made() {
    let fake = FakeCa::start().await;
    let client = Client::new(fake.client_config()).unwrap();
    let cert = fetch(&client, &id("reviews")).await.unwrap();

    assert_eq!(cert.identity, id("reviews"));
    assert_eq!(x509::spiffe_ids(cert.leaf()).unwrap(), vec![id("reviews")]);
    assert_eq!(cert.roots, fake.roots(), "the roots are the CA's bundle");
    x509::verify_chain(&cert.chain, &fake.roots(), SystemTime::now()).unwrap();
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(lifetime, istio::DEFAULT_VALIDITY + Duration::from_secs(60));

    // The key the agent will serve with is the one the CSR was made for.
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].validity_duration, 86_400);
    let key = rcgen::KeyPair::try_from(cert.key.secret_pkcs8_der()).unwrap();
    let csr_ids = x509::csr_spiffe_ids(&requests[0].csr).unwrap();
    assert_eq!(
        csr_ids,
        vec![id("reviews")],
        "the CSR names the identity as a URI SAN"
    );
    use rcgen::PublicKeyData;
    let leaf = x509_parser::parse_x509_certificate(cert.leaf()).unwrap().1;
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
}

#[tokio::test]
async fn sends_the_token_from_its_file_the_cluster_id_and_impersonation() {
    let fake = FakeCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("istio-token");
    std::fs::write(&token_path, "first-token\n").unwrap();
    let mut config = fake.client_config();
    config.token_path = Some(token_path.clone());
    config.cluster_id = "cluster-7".into();
    config.own_identity = Some(node());
    config.validity = Duration::from_secs(3600);
    config.headers = vec![("X-Extra".into(), "yes".into())];
    let client = Client::new(config).unwrap();

    fetch(&client, &id("reviews")).await.unwrap();
    std::fs::write(&token_path, "second-token").unwrap();
    fetch(&client, &node()).await.unwrap();

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let (workload, own) = (&requests[0], &requests[1]);
    assert_eq!(
        workload.authorization.as_deref(),
        Some("Bearer first-token")
    );
    assert_eq!(
        own.authorization.as_deref(),
        Some("Bearer second-token"),
        "re-read per call"
    );
    for request in [workload, own] {
        assert_eq!(request.cluster_id.as_deref(), Some("cluster-7"));
        assert_eq!(request.headers.get("x-extra").unwrap(), "yes");
        assert_eq!(request.validity_duration, 3600);
    }
    assert_eq!(
        workload.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/reviews")
    );
    assert!(
        !own.has_metadata,
        "no impersonation for the agent's own identity"
    );
}

#[tokio::test]
async fn a_missing_token_file_is_named_and_nothing_is_sent() {
    let fake = FakeCa::start().await;
    let mut config = fake.client_config();
    config.token_path = Some("/nonexistent/ambientd-test/istio-token".into());
    let client = Client::new(config).unwrap();
    let err = fetch(&client, &id("reviews")).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/ambientd-test/istio-token"),
        "{err}"
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn a_certificate_for_another_identity_is_refused() {
    let fake = FakeCa::start().await;
    fake.sign_as(Some(id("mallory")));
    let client = Client::new(fake.client_config()).unwrap();
    let err = fetch(&client, &id("reviews")).await.unwrap_err();
    assert!(
        matches!(&err, Error::WrongIdentity { identity, got } if *identity == id("reviews") && *got == id("mallory")),
        "{err}"
    );
}

#[tokio::test]
async fn ca_failures_carry_the_status() {
    let fake = FakeCa::start().await;
    fake.fail_next(
        1,
        tonic::Code::Unauthenticated,
        "request authenticate failure",
    );
    let client = Client::new(fake.client_config()).unwrap();
    let err = fetch(&client, &id("reviews")).await.unwrap_err();
    assert_eq!(
        status_of(&err),
        Some((
            tonic::Code::Unauthenticated,
            "request authenticate failure".into()
        )),
        "{err}"
    );
    // The next call goes through on the same client.
    fetch(&client, &id("reviews")).await.unwrap();
}

#[tokio::test]
async fn a_slow_ca_times_out() {
    let fake = FakeCa::start().await;
    fake.set_delay(Duration::from_secs(30));
    let mut config = fake.client_config();
    config.timeout = Duration::from_millis(300);
    let client = Client::new(config).unwrap();
    let err = fetch(&client, &id("reviews")).await.unwrap_err();
    let (code, _) = status_of(&err).expect("a gRPC status");
    assert_eq!(code, tonic::Code::Cancelled, "{err}");
}

#[tokio::test]
async fn at_most_eight_calls_are_in_flight() {
    let fake = FakeCa::start().await;
    fake.hold();
    let client = Arc::new(Client::new(fake.client_config()).unwrap());
    let calls: Vec<_> = (0..20)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { fetch(&client, &id(&format!("w{n}"))).await })
        })
        .collect();
    tokio::time::timeout(PATIENCE, fake.wait_for_in_flight(istio::MAX_IN_FLIGHT))
        .await
        .expect("eight calls reached the CA");
    // Give the other twelve every chance to (wrongly) get through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.in_flight(), istio::MAX_IN_FLIGHT);
    assert_eq!(fake.requests().len(), istio::MAX_IN_FLIGHT);
    fake.release();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(fake.requests().len(), 20);
    assert_eq!(fake.max_in_flight(), istio::MAX_IN_FLIGHT);
}

#[tokio::test]
async fn the_ca_is_checked_by_root_and_by_name() {
    let fake = FakeCa::start().await;
    let other = LocalCa::generate().unwrap();

    let mut wrong_root = fake.client_config();
    wrong_root.roots = other.roots().to_vec();
    let err = fetch(&Client::new(wrong_root).unwrap(), &id("a"))
        .await
        .unwrap_err();
    assert_eq!(
        status_of(&err).map(|s| s.0),
        Some(tonic::Code::Unavailable),
        "{err}"
    );

    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    let mut wrong_name = fake.client_config();
    wrong_name.server_name = Some("not-istiod.example".into());
    let err = fetch(&Client::new(wrong_name).unwrap(), &id("a"))
        .await
        .unwrap_err();
    assert_eq!(
        status_of(&err).map(|s| s.0),
        Some(tonic::Code::Unavailable),
        "{err}"
    );
    assert!(err.to_string().contains("not valid for name"), "{err}");
    assert!(
        fake.requests().is_empty(),
        "no request crossed a bad handshake"
    );

    // Without an override the address's host is the name: 127.0.0.1 is on the certificate.
    let mut by_ip = fake.client_config();
    by_ip.server_name = None;
    fetch(&Client::new(by_ip).unwrap(), &id("a")).await.unwrap();
}

#[test]
fn bad_client_configurations_are_refused() {
    let roots = LocalCa::generate().unwrap().roots().to_vec();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    for address in ["http://127.0.0.1:15012", "https://127.0.0.1"] {
        let config = istio::Config::new(address.parse().unwrap(), roots.clone());
        let err = Client::new(config).unwrap_err();
        assert!(err.to_string().contains(address), "{err}");
    }
    let mut config = istio::Config::new("https://127.0.0.1:1".parse().unwrap(), Vec::new());
    assert!(Client::new(config.clone()).is_err(), "no roots");
    config.roots = roots;
    config.headers = vec![("bad header".into(), "x".into())];
    assert!(Client::new(config).is_err());
}

#[tokio::test]
async fn roots_can_come_from_istios_root_cert_file() {
    let fake = FakeCa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root-cert.pem");
    std::fs::write(&path, x509::certs_to_pem(&fake.roots())).unwrap();
    let mut config = istio::Config::with_root_file(fake.address(), &path).unwrap();
    config.server_name = Some(ca_client::testing::SERVER_NAME.into());
    fetch(&Client::new(config).unwrap(), &id("a"))
        .await
        .unwrap();

    std::fs::write(&path, "no certificate here").unwrap();
    let err = istio::Config::with_root_file(fake.address(), &path).unwrap_err();
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
    let err =
        istio::Config::with_root_file(fake.address(), &dir.path().join("absent.pem")).unwrap_err();
    assert!(err.to_string().contains("absent.pem"), "{err}");
}

#[tokio::test]
async fn serve_answers_until_shutdown_then_closes_its_listener() {
    let ca = Arc::new(LocalCa::generate().unwrap());
    let tls = server::serving_tls(&ca, &["ca.test".into()]).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = Service::new(ca.clone(), server::Config::new("cluster.local"));
    let server = tokio::spawn(server::serve(listener, tls, service, async {
        let _ = stopped.await;
    }));

    let mut config = istio::Config::new(
        format!("https://{addr}").parse().unwrap(),
        ca.roots().to_vec(),
    );
    config.server_name = Some("ca.test".into());
    let client = Client::new(config).unwrap();
    let cert = fetch(&client, &id("reviews")).await.unwrap();
    x509::verify_chain(&cert.chain, ca.roots(), SystemTime::now()).unwrap();

    stop.send(()).unwrap();
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("serve returned after shutdown")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn the_cache_renews_from_the_ca_and_keeps_a_valid_certificate_while_it_fails() {
    let fake = FakeCa::start().await;
    // Expire fast: renewal at half-life, 4 s in.
    fake.set_validity(Some(Duration::from_secs(8)));
    let sink = Arc::new(RecordingSink::default());
    let client = Arc::new(Client::new(fake.client_config()).unwrap());
    let cache = Cache::new(client, sink.clone());
    cache.set_renewal_jitter(0.0);

    let first = cache.get(&id("reviews")).await.unwrap();
    // The CA now fails every call until told otherwise.
    fake.fail_next(usize::MAX, tonic::Code::Unavailable, "istiod is restarting");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while fake.requests().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no renewal attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The renewal failed; the still-valid certificate is served, nothing new is published.
    assert!(
        SystemTime::now() < first.not_after,
        "the test machine is too slow"
    );
    assert!(Arc::ptr_eq(
        &cache.get(&id("reviews")).await.unwrap(),
        &first
    ));
    assert_eq!(sink.published().len(), 1);

    // Retries (with backoff) go on; once the CA is back, a new certificate arrives.
    fake.fail_next(0, tonic::Code::Ok, "");
    fake.set_validity(None);
    while sink.published().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal after the CA came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = cache.get(&id("reviews")).await.unwrap();
    assert!(!Arc::ptr_eq(&renewed, &first));
    assert!(renewed.not_after > first.not_after);
    assert!(
        fake.requests().len() >= 3,
        "at least one failed attempt, then the success"
    );
}

#[tokio::test]
async fn wanted_identities_are_fetched_ahead_with_impersonation() {
    let fake = FakeCa::start().await;
    let sink = Arc::new(RecordingSink::default());
    let mut config = fake.client_config();
    config.own_identity = Some(node());
    let cache = Cache::new(Arc::new(Client::new(config).unwrap()), sink.clone());
    cache.set_wanted([id("reviews"), id("ratings")]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sink.published().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no prefetch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut impersonated: Vec<String> = fake
        .requests()
        .into_iter()
        .filter_map(|r| r.impersonated)
        .collect();
    impersonated.sort();
    assert_eq!(
        impersonated,
        vec![id("ratings").to_string(), id("reviews").to_string()]
    );
    cache.set_wanted([id("ratings")]);
    assert_eq!(sink.forgotten(), vec![id("reviews")]);
}

#[tokio::test]
async fn shutdown_answers_calls_in_progress_then_refuses() {
    let fake = FakeCa::start().await;
    let client = Arc::new(Client::new(fake.client_config()).unwrap());
    fake.hold();
    let call = {
        let client = client.clone();
        tokio::spawn(async move { fetch(&client, &id("reviews")).await })
    };
    tokio::time::timeout(PATIENCE, fake.wait_for_in_flight(1))
        .await
        .expect("the call reached the CA");
    // `stop` asks for shutdown at once; the held call is released only afterwards.
    tokio::join!(fake.stop(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.release();
    });
    call.await
        .unwrap()
        .expect("the call in progress was answered");
    let err = fetch(&client, &id("ratings")).await.unwrap_err();
    assert_eq!(
        status_of(&err).map(|s| s.0),
        Some(tonic::Code::Unavailable),
        "{err}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_ca_that_is_down_at_start_is_retried_until_it_comes_up() {
    let first = FakeCa::start().await;
    let (address, ca, config) = (
        first.socket_addr(),
        first.ca().clone(),
        first.client_config(),
    );
    first.stop().await;
    drop(first);

    let sink = Arc::new(RecordingSink::default());
    let cache = Cache::new(Arc::new(Client::new(config).unwrap()), sink.clone());
    cache.set_wanted([id("reviews")]);
    // Several attempts fail (backoff 0.25-0.5 s, then 0.5-1 s) while nothing listens.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(sink.published().is_empty());

    let second = FakeCa::start_at(address, ca, server::Config::new("cluster.local"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sink.published().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no certificate once the CA was up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.published()[0].identity, id("reviews"));
    assert_eq!(second.requests().len(), 1);
}
