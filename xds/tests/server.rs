//! The snapshot-serving ADS server (the development control plane's xDS
//! side) against the real client and against raw requests.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnboundedReceiverStream;
use xds::client::{Client, Config, NodeInfo};
use xds::fake::WAIT;
use xds::handler::{Handler, Rejection, Update};
use xds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use xds::proto::istio::security::Authorization;
use xds::proto::istio::workload as pb;
use xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use xds::server::{Snapshot, Source, follow_mesh_file, mesh_snapshot, serve};
use xds::{Store, local};

const MESH: &str = "
services:
  - name: echo
    namespace: demo
    hostname: echo.demo.svc.cluster.local
    addresses: [198.19.200.1]
    ports: [{servicePort: 80, targetPort: 8080}]
workloads:
  - uid: demo/echo-1
    name: echo-1
    namespace: demo
    serviceAccount: echo
    node: node-a
    addresses: [198.19.1.1]
    tunnelProtocol: HBONE
    services:
      demo/echo.demo.svc.cluster.local:
        ports: [{servicePort: 80, targetPort: 8080}]
  - uid: demo/echo-2
    name: echo-2
    namespace: demo
    node: node-b
    addresses: [198.19.1.2]
";

/// Stops the task when dropped.
struct Running(Option<oneshot::Sender<()>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

fn running<F: Future<Output = ()> + Send + 'static>(
    f: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(f(Box::pin(async {
        let _ = stopped.await;
    })));
    Running(Some(stop))
}

struct NoPolicies;

impl Handler<Authorization> for NoPolicies {
    fn apply(&self, updates: Vec<Update<Authorization>>, _: &[String]) -> Vec<Rejection> {
        assert!(updates.is_empty(), "the mesh file has no policies");
        Vec::new()
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        pod_name: "ambientd-a".into(),
        pod_namespace: "istio-system".into(),
        instance_ip: "198.18.0.1".into(),
        node_name: "node-a".into(),
        cluster_id: "Kubernetes".into(),
        cluster_domain: "cluster.local".into(),
        extra_metadata: BTreeMap::new(),
    }
}

async fn until(store: &Store, what: &str, done: impl Fn(&Store) -> bool) {
    let mut changes = store.subscribe();
    let wait = async {
        while !done(store) {
            let _ = changes.changed().await;
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn serves_the_mesh_file_over_tls_and_pushes_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["istiod.istio-system.svc".to_owned()])
        .unwrap()
        .signed_by(&key, &Issuer::new(root_params, &root_key))
        .unwrap();
    std::fs::write(dir.path().join("root.pem"), root.pem()).unwrap();
    let tls = xds::connection::tls_config(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();

    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, MESH).unwrap();
    let source = Source::new(Snapshot::new());
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let src = source.clone();
    let _server = running(move |stop| async move {
        serve(listener, Some(tls), src, stop).await.unwrap();
    });
    let (path, src) = (mesh_path.clone(), source.clone());
    let _follower =
        running(move |stop| follow_mesh_file(path, src, Duration::from_millis(20), stop));

    let store = Store::default();
    let client = Client::new(Config {
        address: format!("https://{addr}"),
        root_cert: Some(dir.path().join("root.pem")),
        server_name: Some("istiod.istio-system.svc".into()),
        token: None,
        cluster_id: String::new(),
        headers: Vec::new(),
        node: node(),
        connect_timeout: Duration::from_secs(2),
    })
    .watch::<pb::Address, _>(ADDRESS_TYPE_URL, store.clone())
    .watch::<Authorization, _>(AUTHORIZATION_TYPE_URL, NoPolicies);
    let mut ready = client.ready();
    let _client = running(move |stop| client.run(stop));
    tokio::time::timeout(WAIT, ready.wait()).await.unwrap();

    // What arrives over xDS is what the file says.
    until(&store, "the mesh file's workloads", |s| {
        s.workload_by_uid("demo/echo-2").is_some()
    })
    .await;
    let expected = local::parse(MESH).unwrap();
    for w in &expected.workloads {
        assert_eq!(*store.workload_by_uid(&w.uid).unwrap(), *w, "{}", w.uid);
    }
    assert_eq!(
        *store
            .read(|s| s.service_by_key("demo/echo.demo.svc.cluster.local"))
            .unwrap(),
        expected.services[0]
    );

    // Edit the file: echo-2 goes, echo-3 comes, echo-1 moves.
    let edited = MESH
        .replace(
            "uid: demo/echo-2\n    name: echo-2",
            "uid: demo/echo-3\n    name: echo-3",
        )
        .replace("198.19.1.2", "198.19.1.3")
        .replace("198.19.1.1", "198.19.1.11");
    std::fs::write(&mesh_path, edited).unwrap();
    until(&store, "the edited mesh", |s| {
        s.workload_by_uid("demo/echo-3").is_some() && s.workload_by_uid("demo/echo-2").is_none()
    })
    .await;
    let moved = store.workload_by_uid("demo/echo-1").unwrap();
    assert_eq!(moved.addresses, [IpAddr::from([198, 19, 1, 11])]);

    // A broken edit keeps the last good mesh served.
    std::fs::write(&mesh_path, "workloads: [{name: x}]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        source
            .current()
            .resources(ADDRESS_TYPE_URL)
            .unwrap()
            .contains_key("demo/echo-3")
    );
}

#[tokio::test]
async fn a_reconnecting_client_gets_only_what_changed_and_removals_of_what_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, MESH).unwrap();
    let snapshot = mesh_snapshot(&path).unwrap();
    let addresses = snapshot.resources(ADDRESS_TYPE_URL).unwrap().clone();
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = Source::new(snapshot);
    let src = source.clone();
    let _server = running(move |stop| async move {
        serve(listener, None, src, stop).await.unwrap();
    });

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let claimed: HashMap<String, String> = [
        ("demo/echo-1", addresses["demo/echo-1"].version.clone()),
        ("demo/echo-2", "stale".to_owned()),
        ("demo/deleted-meanwhile", "v1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        initial_resource_versions: claimed,
        ..Default::default()
    })
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        ..Default::default()
    })
    .unwrap();
    let mut responses = ads
        .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let next = async |responses: &mut tonic::Streaming<_>| {
        tokio::time::timeout(WAIT, responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let first: xds::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse =
        next(&mut responses).await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    let mut names: Vec<_> = first.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["demo/echo-2", "demo/echo.demo.svc.cluster.local"]);
    assert_eq!(first.removed_resources, ["demo/deleted-meanwhile"]);
    for r in &first.resources {
        assert_eq!(r.resource.as_ref().unwrap().type_url, ADDRESS_TYPE_URL);
        assert_eq!(r.version, addresses[&r.name].version);
    }
    let second = next(&mut responses).await;
    assert_eq!(second.type_url, AUTHORIZATION_TYPE_URL);
    assert!(second.resources.is_empty() && second.removed_resources.is_empty());
    assert!(!second.nonce.is_empty() && second.nonce != first.nonce);

    // Closing the source ends the stream cleanly (for a draining server).
    source.close();
    let end = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}
