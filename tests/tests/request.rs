//! The HBONE request as a peer sees it: node-a talks to a stand-in for node-b (our own TLS +
//! HTTP/2 server presenting the echo workload's certificate), which records what arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent::app;
use agent::tls::{self, Credentials};
use ca_client::LocalCa;
use http::{Method, Response, StatusCode};
use identity::Identity;
use tests::{Net, TIMEOUT, mesh_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_request_carries_authority_and_istio_headers() {
    tests::init_logging();
    let net = Net::random();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = LocalCa::init(&ca_dir).unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&net)).unwrap();
    let node_a = app::start(tests::config(&mesh, &ca_dir, "node-a"))
        .await
        .unwrap();

    // The stand-in for node-b.
    let echo_id: Identity = "spiffe://cluster.local/ns/demo/sa/echo".parse().unwrap();
    let creds = Credentials::new();
    creds
        .publish(Arc::new(
            ca.issue(&echo_id, Duration::from_secs(600)).unwrap(),
        ))
        .unwrap();
    let server_cfg = creds.server_config(&echo_id).unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(net.echo(), 15008))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(tcp)
            .await?;
        let peer = tls::peer_identity(tls.get_ref().1);
        let mut conn = h2::server::handshake(tls).await?;
        let (req, mut respond) = conn.accept().await.expect("one request")?;
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let (parts, mut body) = req.into_parts();
        let mut send = respond.send_response(
            Response::builder().status(StatusCode::OK).body(()).unwrap(),
            false,
        )?;
        // Echo one chunk so the client sees the tunnel work.
        let chunk = body.data().await.expect("data")?;
        send.send_data(chunk, true)?;
        anyhow::Ok((parts, peer))
    });

    let socks = node_a.listener(app::Role::Socks5).unwrap();
    let mut stream = agent::proxy::socks5::connect(socks, net.client(), net.vip())
        .await
        .unwrap()
        .expect("node-a accepts the connection");
    let client_port = stream.local_addr().unwrap().port();
    stream.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hi");

    let (parts, peer) = tokio::time::timeout(TIMEOUT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        peer.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(parts.method, Method::CONNECT);
    assert_eq!(parts.version, http::Version::HTTP_2);
    // Classic CONNECT: authority only (the service VIP resolved to the endpoint's target port).
    assert_eq!(parts.uri.scheme(), None);
    assert_eq!(parts.uri.path_and_query(), None);
    assert_eq!(
        parts.uri.authority().unwrap().as_str(),
        format!("{}:8080", net.echo())
    );
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        header("forwarded"),
        format!(
            "for=\"{}:{client_port}\";host=echo.demo.svc.cluster.local",
            net.client()
        )
    );
    assert_eq!(
        header("baggage"),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=client"
    );
    let tp = header("traceparent");
    let parts_tp: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts_tp.len(), 4, "{tp}");
    assert_eq!(
        (
            parts_tp[0],
            parts_tp[1].len(),
            parts_tp[2].len(),
            parts_tp[3]
        ),
        ("00", 32, 16, "00")
    );
    node_a.shutdown(Duration::from_secs(1)).await;
}
