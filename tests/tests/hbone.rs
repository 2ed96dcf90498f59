//! Two agents in one process, each owning one workload on its own loopback address, one root:
//! traffic entering node-a through SOCKS5 reaches an echo server behind node-b over HBONE.

use std::net::SocketAddr;
use std::time::Duration;

use agent::events::Direction;
use tests::{Echo, TIMEOUT, TwoNodes, pattern, record, send_and_receive, sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn echo_app(nodes: &TwoNodes) -> SocketAddr {
    SocketAddr::new(nodes.net.echo(), 8080)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_64_mib_both_ways_intact_and_both_sides_verify_identities() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let mut out_events = nodes.a.events();
    let mut in_events = nodes.b.events();

    let data = pattern(64 << 20, 7);
    let stream = nodes.connect(nodes.net.vip()).await.unwrap();
    let back = send_and_receive(stream, &data).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256(&back), sha256(&data), "echoed bytes differ");

    let out = record(&mut out_events, Direction::OutboundHbone)
        .await
        .unwrap();
    assert_eq!(out.error, None);
    assert_eq!(out.sent, 64 << 20);
    assert_eq!(out.received, 64 << 20);
    assert_eq!(
        out.peer_identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    let inb = record(&mut in_events, Direction::InboundHbone)
        .await
        .unwrap();
    assert_eq!(inb.error, None);
    assert_eq!(
        inb.peer_identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    // The service VIP was resolved to the endpoint and its target port.
    assert_eq!(inb.dst, echo_app(&nodes));
    // `forwarded` carried the original client.
    assert_eq!(inb.src.ip(), nodes.net.client());
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_travels_both_ways() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let listener = tokio::net::TcpListener::bind(echo_app(&nodes))
        .await
        .unwrap();

    // Client closes its side first: the server reads EOF, then still answers.
    let client = nodes.connect(echo_app(&nodes)).await.unwrap();
    let (mut server, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (mut cr, mut cw) = client.into_split();
    cw.write_all(b"question").await.unwrap();
    cw.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"question", "server must see the data, then EOF");
    server.write_all(b"answer after your FIN").await.unwrap();
    server.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, cr.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"answer after your FIN");

    // Server closes its side first: the client reads EOF, then still sends.
    let client = nodes.connect(echo_app(&nodes)).await.unwrap();
    let (server, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (mut sr, mut sw) = server.into_split();
    sw.write_all(b"banner").await.unwrap();
    sw.shutdown().await.unwrap();
    let (mut cr, mut cw) = client.into_split();
    let mut banner = Vec::new();
    tokio::time::timeout(TIMEOUT, cr.read_to_end(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(banner, b"banner", "client must see the data, then EOF");
    cw.write_all(b"late words").await.unwrap();
    cw.shutdown().await.unwrap();
    let mut late = Vec::new();
    tokio::time::timeout(TIMEOUT, sr.read_to_end(&mut late))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late, b"late words");
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_carried_to_the_other_side() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let listener = tokio::net::TcpListener::bind(echo_app(&nodes))
        .await
        .unwrap();
    let mut client = nodes.connect(echo_app(&nodes)).await.unwrap();
    let (server, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    // The server aborts its connection (RST).
    #[allow(deprecated)] // blocking on drop is what we want here: an immediate RST
    server.set_linger(Some(Duration::ZERO)).unwrap();
    drop(server);
    let mut buf = [0u8; 16];
    let res = tokio::time::timeout(TIMEOUT, client.read(&mut buf))
        .await
        .unwrap();
    match res {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("client read {n} bytes / EOF instead of a reset"),
    }
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_share_pooled_hbone_connections() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    // 150 connections open at the same time: at most 100 streams per HBONE connection, so the
    // pool must hold exactly two.
    let mut streams = Vec::new();
    for i in 0..150u32 {
        let mut s = nodes.connect(nodes.net.vip()).await.unwrap();
        s.write_all(&i.to_be_bytes()).await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(TIMEOUT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u32::from_be_bytes(back), i);
        streams.push(s);
    }
    assert_eq!(nodes.a.pool().connections(), 2);
    assert_eq!(nodes.a.pool().opened(), 2);
    drop(streams);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_connections_opens_one_connection_per_100_streams() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let nodes = std::sync::Arc::new(nodes);
    let mut tasks = tokio::task::JoinSet::new();
    let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(101));
    for i in 0..100u32 {
        let nodes = nodes.clone();
        let barrier = barrier.clone();
        let mut go = go_tx.subscribe();
        tasks.spawn(async move {
            let mut s = nodes.connect(nodes.net.vip()).await?;
            s.write_all(&i.to_be_bytes()).await?;
            let mut back = [0u8; 4];
            s.read_exact(&mut back).await?;
            anyhow::ensure!(u32::from_be_bytes(back) == i, "wrong echo");
            barrier.wait().await;
            let _ = go.recv().await;
            anyhow::Ok(())
        });
    }
    tokio::time::timeout(TIMEOUT, barrier.wait()).await.unwrap();
    // All 100 were opened at once and are open now: they fit on one connection.
    assert_eq!(nodes.a.pool().connections(), 1);
    go_tx.send(()).unwrap();
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let nodes = std::sync::Arc::into_inner(nodes).expect("all tasks done");
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_outside_the_mesh_is_passed_through_as_plain_tcp() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let outside = Echo::start(SocketAddr::new(nodes.net.outside(), 9000))
        .await
        .unwrap();
    let mut events = nodes.a.events();
    let stream = nodes.connect(outside.addr).await.unwrap();
    let data = pattern(1 << 20, 3);
    let back = send_and_receive(stream, &data).await.unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    let rec = record(&mut events, Direction::OutboundPassthrough)
        .await
        .unwrap();
    assert_eq!(rec.error, None);
    assert_eq!(rec.peer_identity, None);
    assert_eq!(rec.dst, outside.addr);
    assert_eq!(
        nodes.a.pool().opened(),
        0,
        "no HBONE connection for a plain destination"
    );
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_connections_finish_and_refuses_new_ones() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let mut open = nodes.connect(nodes.net.vip()).await.unwrap();
    let socks = nodes.socks();
    let TwoNodes {
        a,
        b,
        net,
        dir: _dir,
    } = nodes;
    let shutdown = tokio::spawn(a.shutdown(Duration::from_secs(10)));
    // Give the drain a moment to close the listeners.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = agent::proxy::socks5::connect(socks, net.client(), net.vip()).await;
    assert!(
        refused.is_err(),
        "a draining agent must not accept new connections"
    );
    // The open connection still works...
    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(TIMEOUT, open.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"still here");
    // ...and once it ends, the drain completes cleanly before its deadline.
    drop(open);
    let outcome = tokio::time::timeout(TIMEOUT, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, agent::drain::Outcome::Clean);
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_what_is_still_open_at_the_deadline() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let mut open = nodes.connect(nodes.net.vip()).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();
    let TwoNodes { a, b, .. } = nodes;
    let outcome = a.shutdown(Duration::from_millis(300)).await;
    assert_eq!(outcome, agent::drain::Outcome::Forced);
    let mut buf = [0u8; 8];
    let res = tokio::time::timeout(TIMEOUT, open.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(res, Ok(0) | Err(_)),
        "the connection must be closed, got {res:?}"
    );
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_released() {
    tests::init_logging();
    let nodes = TwoNodes::start_tuned(
        |net| tests::Setup {
            mesh_a: tests::mesh_yaml(net),
            mesh_b: tests::mesh_yaml(net),
            separate_roots: false,
        },
        |cfg| cfg.proxy.pool.idle_timeout = Duration::from_millis(300),
    )
    .await
    .unwrap();
    let _echo = Echo::start(echo_app(&nodes)).await.unwrap();
    let stream = nodes.connect(nodes.net.vip()).await.unwrap();
    let back = send_and_receive(stream, b"ping").await.unwrap();
    assert_eq!(back, b"ping");
    assert_eq!(nodes.a.pool().opened(), 1);
    // Nothing uses the connection any more: the reaper closes it.
    let released = tokio::time::timeout(TIMEOUT, async {
        while nodes.a.pool().connections() != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(released.is_ok(), "idle HBONE connection was never released");
    // The next connection opens a fresh one and works.
    let stream = nodes.connect(nodes.net.vip()).await.unwrap();
    assert_eq!(send_and_receive(stream, b"again").await.unwrap(), b"again");
    assert_eq!(nodes.a.pool().opened(), 2);
    nodes.stop().await;
}
