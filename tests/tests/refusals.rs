//! What the mesh refuses: wrong identities, foreign roots and trust domains, malformed HBONE
//! requests, unreachable upstreams, and traffic aimed at the agent's own ports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent::events::Direction;
use agent::proxy::socks5::Reply;
use agent::tls::{self, Credentials};
use bytes::Bytes;
use ca_client::LocalCa;
use http::{Method, Request, StatusCode};
use identity::Identity;
use tests::{Echo, Setup, TIMEOUT, TwoNodes, mesh_yaml, mesh_yaml_with, record};
use tokio::io::AsyncReadExt;

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// An HBONE client of our own (not the agent's), holding a certificate for `as_id` from the
/// fixture's root, connected to node-b's HBONE listener.
async fn raw_hbone(
    nodes: &TwoNodes,
    as_id: &str,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let ca = LocalCa::load_or_init(&nodes.dir().join("ca"))?;
    let cert = ca.issue(&id(as_id), Duration::from_secs(600))?;
    let creds = Credentials::new();
    creds.publish(Arc::new(cert))?;
    let config = creds.client_config(&id(as_id), &[id(ECHO)])?;
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(nodes.net.echo(), 15008)).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await?;
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn status(send: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> StatusCode {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _stream) = ready.send_request(req, false).unwrap();
    tokio::time::timeout(TIMEOUT, resp)
        .await
        .unwrap()
        .unwrap()
        .status()
}

fn connect(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_server_answers_each_bad_request_with_its_status() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(SocketAddr::new(nodes.net.echo(), 8080))
        .await
        .unwrap();
    let echo = nodes.net.echo();
    let mut send = raw_hbone(&nodes, CLIENT).await.unwrap();

    // The good request first, so the refusals below are not an artefact of the client.
    assert_eq!(
        status(&mut send, connect(&format!("{echo}:8080"))).await,
        StatusCode::OK
    );

    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{echo}:8080/"))
        .body(())
        .unwrap();
    assert_eq!(
        status(&mut send, get).await,
        StatusCode::BAD_REQUEST,
        "non-CONNECT"
    );
    let other = nodes.net.client();
    assert_eq!(
        status(&mut send, connect(&format!("{other}:8080"))).await,
        StatusCode::BAD_REQUEST,
        "authority is another workload's address"
    );
    assert_eq!(
        status(&mut send, connect("echo.demo.svc.cluster.local:80")).await,
        StatusCode::BAD_REQUEST,
        "authority is not ip:port"
    );
    assert_eq!(
        status(&mut send, connect(&format!("{echo}:15006"))).await,
        StatusCode::BAD_REQUEST,
        "authority is the agent's own port"
    );
    assert_eq!(
        status(&mut send, connect(&format!("{echo}:8081"))).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "nothing listens upstream"
    );
    nodes.stop().await;
}

/// Starts two agents as `setup` says and connects client → echo service through node-a;
/// expects node-a to refuse with a general failure and returns the error it recorded.
async fn tunnel_refused(setup: impl Fn(&tests::Net) -> Setup) -> String {
    let nodes = TwoNodes::start_with(setup).await.unwrap();
    let _echo = Echo::start(SocketAddr::new(nodes.net.echo(), 8080))
        .await
        .unwrap();
    let mut events = nodes.a.events();
    let res = agent::proxy::socks5::connect(nodes.socks(), nodes.net.client(), nodes.net.vip())
        .await
        .unwrap();
    assert_eq!(res.err(), Some(Reply::GeneralFailure));
    let rec = record(&mut events, Direction::OutboundHbone).await.unwrap();
    nodes.stop().await;
    rec.error.expect("the refusal is recorded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_an_unexpected_identity() {
    tests::init_logging();
    // node-b presents the echo workload as `impostor`; node-a expects `echo`.
    let err = tunnel_refused(|net| Setup {
        mesh_a: mesh_yaml(net),
        mesh_b: mesh_yaml_with(net, "cluster.local", "client", "impostor"),
        separate_roots: false,
    })
    .await;
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(
        err.contains("impostor"),
        "the error names the identity seen: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_a_client_from_another_trust_domain() {
    tests::init_logging();
    // node-a issues the client's certificate in trust domain other.local (same root).
    let nodes = TwoNodes::start_with(|net| Setup {
        mesh_a: mesh_yaml_with(net, "other.local", "client", "echo"),
        mesh_b: mesh_yaml(net),
        separate_roots: false,
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(nodes.net.echo(), 8080))
        .await
        .unwrap();
    let res = agent::proxy::socks5::connect(nodes.socks(), nodes.net.client(), nodes.net.vip())
        .await
        .unwrap();
    assert!(res.is_err(), "the tunnel must not be established");
    // Our own client with a certificate of that trust domain fails the same way.
    assert!(
        status_of_raw(&nodes, "spiffe://other.local/ns/demo/sa/client")
            .await
            .is_err()
    );
    // Nothing reached the application.
    let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(
        accepted.is_err(),
        "the application must not see a connection"
    );
    nodes.stop().await;
}

async fn status_of_raw(nodes: &TwoNodes, as_id: &str) -> anyhow::Result<StatusCode> {
    let mut send = raw_hbone(nodes, as_id).await?;
    let mut ready = send.clone().ready().await?;
    let (resp, _s) = ready.send_request(connect(&format!("{}:8080", nodes.net.echo())), false)?;
    let st = tokio::time::timeout(TIMEOUT, resp).await??.status();
    let _ = &mut send;
    Ok(st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_different_roots_cannot_talk() {
    tests::init_logging();
    let err = tunnel_refused(|net| Setup {
        mesh_a: mesh_yaml(net),
        mesh_b: mesh_yaml(net),
        separate_roots: true,
    })
    .await;
    assert!(err.contains("TLS handshake"), "{err}");
}

/// Connects to `addr` and expects the connection to be closed without a byte: the reset may
/// already arrive while connecting.
async fn assert_closed(addr: SocketAddr) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let mut buf = [0u8; 8];
    let res = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(res, Ok(0) | Err(_)), "must be closed, got {res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_the_agents_own_ports_is_refused() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    // Through SOCKS5, to a peer's HBONE port: no nested tunnels.
    let res = agent::proxy::socks5::connect(
        nodes.socks(),
        nodes.net.client(),
        SocketAddr::new(nodes.net.echo(), 15008),
    )
    .await
    .unwrap();
    assert_eq!(res.err(), Some(Reply::NotAllowed));

    // Straight at the outbound listener: with no capture its original destination is itself.
    let mut events = nodes.a.events();
    assert_closed(SocketAddr::new(nodes.net.client(), 15001)).await;
    let rec = record(&mut events, Direction::OutboundPassthrough)
        .await
        .unwrap();
    assert!(rec.error.unwrap().contains("own ports"));

    // Straight at the inbound plaintext listener.
    let mut events = nodes.b.events();
    assert_closed(SocketAddr::new(nodes.net.echo(), 15006)).await;
    let rec = record(&mut events, Direction::InboundPlaintext)
        .await
        .unwrap();
    assert!(rec.error.unwrap().contains("own ports"));
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_refuses_clients_that_are_not_local_workloads() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    // 127.x.y.9 is no workload at all; the echo workload lives on node-b, not node-a.
    for ip in [nodes.net.ip(9), nodes.net.echo()] {
        let res = agent::proxy::socks5::connect(nodes.socks(), ip, nodes.net.vip())
            .await
            .unwrap();
        assert_eq!(res.err(), Some(Reply::NotAllowed), "from {ip}");
    }
    nodes.stop().await;
}
