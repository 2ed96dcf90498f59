//! Enrollment in one process, no root: pods present at start must enroll or the agent does not
//! start; a reloaded mesh file un-enrolls a pod that left the node (its listeners close) and
//! enrolls one that arrived.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agent::app::Role;
use tests::{Echo, TwoNodes, mesh_yaml, pattern, send_and_receive};

/// Polls `check` until it holds, at most 10 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_pod_whose_netns_cannot_be_opened_stops_the_start_with_both_named() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "workloads:\n  - name: a\n    namespace: demo\n    addresses: [198.19.1.1]\n    \
         node: n1\n    netns: /var/run/netns/amb-no-such-namespace\n",
    )
    .unwrap();
    let cfg = tests::config(&mesh, &dir.path().join("ca"), "n1");
    let err = match agent::app::start(cfg).await {
        Ok(_) => panic!("started with a missing namespace"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("pod demo/a"), "{err}");
    assert!(
        err.contains("/var/run/netns/amb-no-such-namespace"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_unenrolls_a_pod_that_left_the_node_and_enrolls_it_again() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(SocketAddr::new(nodes.net.echo(), 8080))
        .await
        .unwrap();
    let hbone = nodes.b.listener(Role::Hbone).expect("echo is enrolled");
    let data = pattern(4096, 3);
    let target = SocketAddr::new(nodes.net.echo(), 8080);
    let back = send_and_receive(nodes.connect(target).await.unwrap(), &data)
        .await
        .unwrap();
    assert_eq!(back, data);

    let mesh_b = nodes.dir().join("mesh-b.yaml");
    let moved = mesh_yaml(&nodes.net).replace("node: node-b", "node: node-elsewhere");
    std::fs::write(&mesh_b, moved).unwrap();
    nodes.b.reload().unwrap();
    eventually("un-enrolling echo", || {
        nodes.b.listener(Role::Hbone).is_none()
    })
    .await;
    // The listener closes as its accept loop sees the drain: wait for that, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(hbone),
        )
        .await
        .expect("connect is answered");
        if attempt.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "echo's HBONE listener {hbone} still accepts after un-enrollment"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    std::fs::write(&mesh_b, mesh_yaml(&nodes.net)).unwrap();
    nodes.b.reload().unwrap();
    eventually("enrolling echo again", || {
        nodes.b.listener(Role::Hbone).is_some()
    })
    .await;
    let back = send_and_receive(nodes.connect(target).await.unwrap(), &data)
        .await
        .unwrap();
    assert_eq!(back, data);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolling_the_client_releases_its_pooled_connections() {
    tests::init_logging();
    let nodes = TwoNodes::start().await.unwrap();
    let _echo = Echo::start(SocketAddr::new(nodes.net.echo(), 8080))
        .await
        .unwrap();
    let data = pattern(1024, 5);
    let target = SocketAddr::new(nodes.net.echo(), 8080);
    let back = send_and_receive(nodes.connect(target).await.unwrap(), &data)
        .await
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(nodes.a.pool().connections(), 1);

    let moved = mesh_yaml(&nodes.net).replace("node: node-a", "node: node-elsewhere");
    std::fs::write(nodes.dir().join("mesh-a.yaml"), moved).unwrap();
    nodes.a.reload().unwrap();
    eventually("releasing the client's pooled connection", || {
        nodes.a.pool().connections() == 0
    })
    .await;
    nodes.stop().await;
}
