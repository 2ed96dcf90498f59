//! Istio mode end to end: two agents get workloads over delta xDS and certificates from the
//! Istio CA protocol, both served by `ambientd dev-control-plane` (in process), and carry
//! HBONE between them; mesh file edits reach the running agents.

use std::net::SocketAddr;
use std::time::Duration;

use agent::app::{self, Agent};
use agent::config::{IstioConfig, Mode};
use agent::control_plane;
use agent::events::Direction;
use tests::{Echo, Net, TIMEOUT, mesh_yaml, pattern, record, send_and_receive, sha256};

fn istio_config(cp: &control_plane::Running, node: &str) -> IstioConfig {
    let address = format!("https://{}", cp.addr);
    let xds = xds::client::Config {
        address: address.clone(),
        root_cert: Some(cp.root_cert.clone()),
        server_name: None,
        token: None,
        cluster_id: "Kubernetes".into(),
        headers: Vec::new(),
        node: xds::client::NodeInfo {
            pod_name: format!("ambientd-{node}"),
            pod_namespace: "istio-system".into(),
            instance_ip: "127.0.0.1".into(),
            node_name: node.into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
            extra_metadata: Default::default(),
        },
        connect_timeout: Duration::from_secs(2),
    };
    let mut ca =
        ca_client::istio::Config::with_root_file(address.parse().unwrap(), &cp.root_cert).unwrap();
    ca.validity = Duration::from_secs(3600);
    IstioConfig { xds, ca }
}

async fn agent(cp: &control_plane::Running, dir: &std::path::Path, node: &str) -> Agent {
    let mut cfg = tests::config(&dir.join("unused.yaml"), &dir.join("unused-ca"), node);
    cfg.mode = Mode::Istio(Box::new(istio_config(cp, node)));
    cfg.mesh_poll = None;
    app::start(cfg).await.unwrap()
}

/// Waits until something accepts connections on `addr` (`up`) or refuses them (`!up`).
async fn wait_listening(addr: SocketAddr, up: bool) {
    let waited = tokio::time::timeout(TIMEOUT, async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() == up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{addr} never became {}",
        if up { "reachable" } else { "closed" }
    );
}

fn with_echo2(net: &Net) -> String {
    format!(
        "{}  - name: echo2\n    namespace: demo\n    serviceAccount: echo2\n    addresses: [{}]\n    node: node-b\n    tunnelProtocol: HBONE\n",
        mesh_yaml(net),
        net.ip(4)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_in_istio_mode_tunnel_with_ca_certificates_and_follow_mesh_edits() {
    tests::init_logging();
    let net = Net::random();
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&net)).unwrap();
    let cp = control_plane::start(control_plane::Config {
        mesh_file: mesh.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ca_dir: dir.path().join("ca"),
        dns_names: ca_client::server::default_dns_names(),
        trust_domain: "cluster.local".into(),
        tokens: Vec::new(),
        poll: Duration::from_millis(100),
    })
    .await
    .unwrap();
    let a = agent(&cp, dir.path(), "node-a").await;
    let b = agent(&cp, dir.path(), "node-b").await;
    // Workloads arrive over xDS; node-b then enrolls echo and opens its HBONE listener.
    wait_listening(SocketAddr::new(net.echo(), 15008), true).await;
    assert!(a.xds_synced() && b.xds_synced());
    let _echo = Echo::start(SocketAddr::new(net.echo(), 8080))
        .await
        .unwrap();
    let socks = a.listener(app::Role::Socks5).unwrap();
    let connect = |dst: SocketAddr| async move {
        agent::proxy::socks5::connect(socks, net.client(), dst)
            .await
            .unwrap()
            .expect("node-a accepts the connection")
    };

    let mut out = a.events();
    let mut inb = b.events();
    let data = pattern(1 << 20, 11);
    let back = send_and_receive(connect(net.vip()).await, &data)
        .await
        .unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    let rec = record(&mut out, Direction::OutboundHbone).await.unwrap();
    assert_eq!(rec.error, None);
    assert_eq!(
        rec.peer_identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    let rec = record(&mut inb, Direction::InboundHbone).await.unwrap();
    assert_eq!(
        rec.peer_identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );

    // A workload added to the file becomes reachable through the mesh, nothing restarted.
    std::fs::write(&mesh, with_echo2(&net)).unwrap();
    wait_listening(SocketAddr::new(net.ip(4), 15008), true).await;
    let _echo2 = Echo::start(SocketAddr::new(net.ip(4), 8080)).await.unwrap();
    let back = send_and_receive(connect(SocketAddr::new(net.ip(4), 8080)).await, b"new")
        .await
        .unwrap();
    assert_eq!(back, b"new");
    let rec = record(&mut out, Direction::OutboundHbone).await.unwrap();
    assert_eq!(
        rec.peer_identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo2"
    );

    // Removed again: node-b stops serving it and node-a no longer tunnels to it.
    std::fs::write(&mesh, mesh_yaml(&net)).unwrap();
    wait_listening(SocketAddr::new(net.ip(4), 15008), false).await;
    let mut out = a.events();
    let _ = send_and_receive(connect(SocketAddr::new(net.ip(4), 8080)).await, b"old").await;
    let rec = record(&mut out, Direction::OutboundPassthrough)
        .await
        .unwrap();
    assert_eq!(rec.peer_identity, None, "not tunnelled any more");

    // A policy in the file reaches node-b over xDS: the client is now refused (401).
    let deny = format!(
        "{}policies:\n  - name: deny-client\n    namespace: demo\n    scope: NAMESPACE\n    action: DENY\n    rules:\n      - clauses:\n          - matches:\n              - principals: [{{exact: cluster.local/ns/demo/sa/client}}]\n",
        mesh_yaml(&net)
    );
    std::fs::write(&mesh, deny).unwrap();
    let refused = tokio::time::timeout(TIMEOUT, async {
        loop {
            let res = agent::proxy::socks5::connect(socks, net.client(), net.vip())
                .await
                .unwrap();
            if res.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the DENY policy never took effect");
    // Connections made before the policy arrived may have left records too: find the refusal.
    let refusal = tokio::time::timeout(TIMEOUT, async {
        loop {
            let rec = record(&mut out, Direction::OutboundHbone).await.unwrap();
            if let Some(err) = rec.error.filter(|e| e.contains("401")) {
                return err;
            }
        }
    })
    .await
    .expect("no connection was refused with 401");
    assert!(refusal.contains("CONNECT"), "{refusal}");

    let (_, _) = tokio::join!(
        a.shutdown(Duration::from_secs(1)),
        b.shutdown(Duration::from_secs(1))
    );
    cp.stop().await;
}
