//! Authorization policy through real agents: node-b decides every HBONE stream to its workload
//! from the TLS-verified client identity, answers 401 when policy denies it, closes open
//! connections a policy added to its mesh file now denies, and refuses malformed policies
//! without loosening what it enforces.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent::events::Direction;
use agent::mesh::Status;
use agent::tls::{self, Credentials};
use ca_client::LocalCa;
use http::{Method, Request, StatusCode};
use identity::Identity;
use tests::{Echo, Setup, TIMEOUT, TwoNodes, mesh_yaml, record, send_and_receive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// Denies the `client` service account to every workload of `demo`.
const DENY_CLIENT: &str = "
policies:
  - name: deny-client
    namespace: demo
    scope: NAMESPACE
    action: DENY
    rules:
      - clauses:
          - matches:
              - serviceAccounts: [{namespace: demo, serviceAccount: client}]
";

/// Lets only the `client` principal reach the echo workload, which names it.
const ALLOW_CLIENT: &str = "
policies:
  - name: allow-client
    namespace: demo
    scope: WORKLOAD_SELECTOR
    rules:
      - clauses:
          - matches:
              - principals: [{exact: cluster.local/ns/demo/sa/client}]
";

fn echo_app(nodes: &TwoNodes) -> SocketAddr {
    SocketAddr::new(nodes.net.echo(), 8080)
}

/// Node-b's mesh with `policies` appended.
fn mesh_b(nodes: &TwoNodes, policies: &str) -> String {
    format!("{}{policies}", mesh_yaml(&nodes.net))
}

/// Rewrites node-b's mesh file and waits until node-b has handled the change.
async fn rewrite_b(nodes: &TwoNodes, text: &str) -> Status {
    let mut status = nodes.b.mesh_status();
    let handled = {
        let s = status.borrow_and_update();
        s.applied + s.rejected
    };
    std::fs::write(nodes.dir().join("mesh-b.yaml"), text).unwrap();
    tokio::time::timeout(
        TIMEOUT,
        status.wait_for(|s| s.applied + s.rejected > handled),
    )
    .await
    .expect("node-b handles the new mesh file")
    .unwrap()
    .clone()
}

/// Sends a few bytes and expects them back.
async fn ping(stream: &mut tokio::net::TcpStream) {
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
}

/// An HBONE client of our own holding a certificate for `as_id` from the fixture's root,
/// asking node-b for `CONNECT echo:8080`; returns the status.
async fn connect_as(nodes: &TwoNodes, as_id: &str) -> StatusCode {
    let as_id: Identity = as_id.parse().unwrap();
    let ca = LocalCa::load_or_init(&nodes.dir().join("ca")).unwrap();
    let creds = Credentials::new();
    creds
        .publish(Arc::new(
            ca.issue(&as_id, Duration::from_secs(600)).unwrap(),
        ))
        .unwrap();
    let config = creds
        .client_config(&as_id, &[ECHO.parse().unwrap()])
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(nodes.net.echo(), 15008))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(echo_app(nodes).to_string())
        .body(())
        .unwrap();
    let (resp, _stream) = send
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    tokio::time::timeout(TIMEOUT, resp)
        .await
        .unwrap()
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_identity_connects_and_others_get_401() {
    tests::init_logging();
    let nodes = TwoNodes::start_with(|net| Setup {
        mesh_a: mesh_yaml(net),
        mesh_b: format!(
            "{}    authorizationPolicies: [demo/allow-client]\n{ALLOW_CLIENT}",
            mesh_yaml(net)
        ),
        separate_roots: false,
    })
    .await
    .unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let mut events = nodes.b.events();

    // Through the agents, as the allowed client.
    let stream = nodes.connect(nodes.net.vip()).await.unwrap();
    let back = send_and_receive(stream, b"allowed").await.unwrap();
    assert_eq!(back, b"allowed");
    let rec = record(&mut events, Direction::InboundHbone).await.unwrap();
    assert_eq!(rec.error, None);

    // Straight to node-b's HBONE port with two identities from the same root.
    assert_eq!(
        connect_as(&nodes, "spiffe://cluster.local/ns/demo/sa/client").await,
        StatusCode::OK
    );
    assert_eq!(
        connect_as(&nodes, "spiffe://cluster.local/ns/demo/sa/intruder").await,
        StatusCode::UNAUTHORIZED
    );
    // (Our own client's allowed stream ends too, when its handle is dropped.)
    let intruder = "spiffe://cluster.local/ns/demo/sa/intruder";
    let rec = loop {
        let rec = record(&mut events, Direction::InboundHbone).await.unwrap();
        if rec.peer_identity.as_ref().map(|i| i.to_string()).as_deref() == Some(intruder) {
            break rec;
        }
    };
    let error = rec.error.unwrap();
    assert!(error.contains("denied by authorization policy"), "{error}");
    assert!(
        error.contains("none of the 1 ALLOW policies matched"),
        "{error}"
    );
    assert!(error.contains("401"), "{error}");
    assert_eq!(nodes.b.live_inbound(), 0, "nothing denied is left tracked");
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_client_gets_401_and_its_connection_fails_before_any_upstream_connect() {
    tests::init_logging();
    let nodes = TwoNodes::start_with(|net| Setup {
        mesh_a: mesh_yaml(net),
        mesh_b: format!("{}{DENY_CLIENT}", mesh_yaml(net)),
        separate_roots: false,
    })
    .await
    .unwrap();
    // The application counts the connections it accepts: a denied one must never get there.
    let app = tokio::net::TcpListener::bind(echo_app(&nodes))
        .await
        .unwrap();
    let mut out_events = nodes.a.events();
    let mut in_events = nodes.b.events();

    let refused = nodes.connect(nodes.net.vip()).await;
    assert!(refused.is_err(), "the client's connection must fail");
    let out = record(&mut out_events, Direction::OutboundHbone)
        .await
        .unwrap();
    let error = out.error.unwrap();
    assert!(error.contains("401"), "{error}");
    let inb = record(&mut in_events, Direction::InboundHbone)
        .await
        .unwrap();
    let error = inb.error.unwrap();
    assert!(
        error.contains("DENY policy demo/deny-client matched (rule 0)"),
        "{error}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(300), app.accept()).await;
    assert!(
        accepted.is_err(),
        "no upstream connection for a denied client"
    );
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_added_while_a_connection_is_open_closes_it_and_removing_it_lets_new_ones_in() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let mut in_events = nodes.b.events();

    let mut open = nodes.connect(nodes.net.vip()).await.unwrap();
    ping(&mut open).await;
    assert_eq!(nodes.b.live_inbound(), 1);

    let status = rewrite_b(&nodes, &mesh_b(&nodes, DENY_CLIENT)).await;
    assert_eq!(status.applied, 1, "{status:?}");
    let mut buf = [0u8; 8];
    let res = tokio::time::timeout(TIMEOUT, open.read(&mut buf))
        .await
        .expect("the open connection is closed");
    assert!(
        matches!(res, Ok(0) | Err(_)),
        "the connection must be closed, got {res:?}"
    );
    let rec = record(&mut in_events, Direction::InboundHbone)
        .await
        .unwrap();
    let error = rec.error.unwrap();
    assert!(
        error.contains("now denied by authorization policy"),
        "{error}"
    );
    assert!(error.contains("demo/deny-client"), "{error}");
    assert!(
        nodes.connect(nodes.net.vip()).await.is_err(),
        "new connections are denied too"
    );

    // Removing the deny lets new connections through.
    let status = rewrite_b(&nodes, &mesh_yaml(&nodes.net)).await;
    assert_eq!(status.applied, 2, "{status:?}");
    let mut again = nodes.connect(nodes.net.vip()).await.unwrap();
    ping(&mut again).await;
    drop(again);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_policy_is_refused_with_its_reason_and_the_deny_stays() {
    tests::init_logging();
    let nodes = TwoNodes::start_with(|net| Setup {
        mesh_a: mesh_yaml(net),
        mesh_b: format!("{}{DENY_CLIENT}", mesh_yaml(net)),
        separate_roots: false,
    })
    .await
    .unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    assert!(nodes.connect(nodes.net.vip()).await.is_err());

    // Each edit would, if half-read, stop denying the client.
    let broken = [
        (
            DENY_CLIENT.replace(
                "serviceAccount: client}",
                "serviceAccount: client, port: 1}",
            ),
            "policies[0].rules[0].clauses[0].matches[0].serviceAccounts[0].port",
            "unknown field `port`",
        ),
        (
            format!("{DENY_CLIENT}                sourceIps: [198.18.0.0/33]\n"),
            "policies[0].rules[0].clauses[0].matches[0].sourceIps[0]",
            "prefix length 33 exceeds 32",
        ),
        (
            DENY_CLIENT.replace("action: DENY", "action: deny"),
            "policies[0].action",
            "unknown variant `deny`",
        ),
    ];
    for (i, (policies, field, problem)) in broken.iter().enumerate() {
        let status = rewrite_b(&nodes, &mesh_b(&nodes, policies)).await;
        assert_eq!(status.rejected, i as u64 + 1, "{status:?}");
        assert_eq!(status.applied, 0, "{status:?}");
        let error = status.last_error.unwrap();
        assert!(error.contains("mesh-b.yaml:"), "{error}");
        assert!(error.contains(field), "{error}");
        assert!(error.contains(problem), "{error}");
        assert!(
            nodes.connect(nodes.net.vip()).await.is_err(),
            "the deny must stay in force after {field}"
        );
    }

    // An agent never starts with a malformed policy.
    let bad = nodes.dir().join("bad.yaml");
    std::fs::write(&bad, mesh_b(&nodes, &broken[1].0)).unwrap();
    let cfg = tests::config(&bad, &nodes.dir().join("ca"), "node-b");
    let err = match agent::app::start(cfg).await {
        Ok(_) => panic!("an agent started with a malformed policy"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("prefix length 33 exceeds 32"), "{err}");
    nodes.stop().await;
}
