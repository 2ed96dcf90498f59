//! Root only: sockets the agent creates for a pod live in the pod's network namespace, carry
//! the agent's mark, and leave the creating thread in the agent's own namespace; delivery
//! sockets take the client's address or fall back to the pod's. Prints what one socket costs
//! (not asserted). Without root it is skipped, unless `CI` is set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::demo::topology::Namespace;
use agent::netns::{Home, Net, PodNet};
use agent::proxy::delivery;
use socket2::Domain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(5);

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root (network namespaces) and CI is set: refusing to skip"
    );
    eprintln!("skipping {test}: needs root");
    false
}

fn thread_netns() -> std::path::PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn pod_sockets_live_in_the_pod_and_carry_the_mark() {
    if !root_or_skip("pod_sockets_live_in_the_pod_and_carry_the_mark") {
        return;
    }
    let ns = Namespace::create("sock").unwrap();
    // An address only the pod has: binding it proves where the socket lives.
    ns.ip(&["addr", "add", "198.19.9.1/32", "dev", "lo"])
        .unwrap();
    let own = thread_netns();
    let pod = Arc::new(PodNet::open(&ns.path(), Home::current().unwrap(), 0x539, true).unwrap());

    let socket = pod.socket(Domain::IPV4).unwrap();
    assert_eq!(socket.mark().unwrap(), 0x539);
    socket
        .bind(&"198.19.9.1:0".parse::<SocketAddr>().unwrap().into())
        .expect("the pod's address is local to the socket");
    assert_eq!(thread_netns(), own, "the thread went back to its namespace");
    let host = socket2::Socket::new(Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    assert!(
        host.bind(&"198.19.9.1:0".parse::<SocketAddr>().unwrap().into())
            .is_err(),
        "the address must not exist outside the pod"
    );

    // Listeners: marked, transparent in tproxy mode, reachable inside the pod only.
    let net = Net::Pod(pod.clone());
    let listener = net.listen("0.0.0.0:15006".parse().unwrap()).unwrap();
    let sock = socket2::SockRef::from(&listener);
    assert_eq!(sock.mark().unwrap(), 0x539);
    assert!(sock.ip_transparent_v4().unwrap());
    let client = ns
        .connect(
            "198.19.9.1:15006".parse().unwrap(),
            std::time::Duration::from_secs(2),
        )
        .await
        .unwrap();
    let (_accepted, peer) = listener.accept().await.unwrap();
    assert_eq!(peer, client.local_addr().unwrap());

    // Delivery: from the client's address when the families match, else from the pod's.
    let app = ns.listen("0.0.0.0:8080".parse().unwrap()).unwrap();
    let client: std::net::IpAddr = "198.18.0.77".parse().unwrap();
    let dst: SocketAddr = "198.19.9.1:8080".parse().unwrap();
    let (socket, source) = delivery::socket(&pod, client, dst, None).unwrap().unwrap();
    assert_eq!(source, delivery::Source::Original(client));
    assert_eq!(socket.local_addr().unwrap().ip(), client);
    // On a port of the agent's choice: shared with other connections of the client's
    // address, never with a listener.
    let port = *agent::config::DEFAULT_DELIVERY_PORTS.start() + 1000;
    let (chosen, _) = delivery::socket(&pod, client, dst, Some(port))
        .unwrap()
        .unwrap();
    assert_eq!(chosen.local_addr().unwrap(), SocketAddr::new(client, port));
    assert!(
        delivery::socket(&pod, client, dst, Some(port))
            .unwrap()
            .is_some()
    );
    let _held = ns
        .listen(SocketAddr::new([0, 0, 0, 0].into(), port + 1))
        .unwrap();
    assert!(
        delivery::socket(&pod, client, dst, Some(port + 1))
            .unwrap()
            .is_none(),
        "a listener's port was shared"
    );
    let other_family: std::net::IpAddr = "2001:2::77".parse().unwrap();
    let (socket, source) = delivery::socket(&pod, other_family, dst, Some(port))
        .unwrap()
        .unwrap();
    assert_eq!(source, delivery::Source::Pod);
    // Without capture rules there is no return path for a spoofed source, but the pod's own
    // address needs none: the fallback connects.
    let stream = socket.connect(dst).await.unwrap();
    let (_conn, peer) = app.accept().await.unwrap();
    assert_eq!(peer.ip().to_canonical(), stream.local_addr().unwrap().ip());
    assert_eq!(peer.ip(), std::net::IpAddr::from([198, 19, 9, 1]));

    let n = 10_000;
    let started = Instant::now();
    for _ in 0..n {
        drop(pod.socket(Domain::IPV4).unwrap());
    }
    let each = started.elapsed() / n;
    let started = Instant::now();
    for _ in 0..n {
        let s = socket2::Socket::new(Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_mark(0x539).unwrap();
    }
    let direct = started.elapsed() / n;
    eprintln!(
        "per socket: in the pod (setns in + socket() + SO_MARK + setns back + close) {each:?}; \
         in the agent's namespace (socket() + SO_MARK + close) {direct:?}"
    );
    assert_eq!(thread_netns(), own);
}

/// An upgrade: the new agent's listener binds beside the old one's (SO_REUSEPORT), and the old
/// one closes as it drains. The connections the kernel had queued on the old listener (the
/// port's group spreads new connections over both) are handed to the new one, not reset —
/// `tcp_migrate_req`, which the agent turns on in the pod. Without it about half of them
/// would be lost here.
#[tokio::test(flavor = "current_thread")]
async fn connections_queued_on_a_closing_listener_go_to_the_new_agent() {
    if !root_or_skip("connections_queued_on_a_closing_listener_go_to_the_new_agent") {
        return;
    }
    let ns = Namespace::create("upgr").unwrap();
    ns.ip(&["addr", "add", "198.19.9.2/32", "dev", "lo"])
        .unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let addr: SocketAddr = "0.0.0.0:15001".parse().unwrap();
    let agent = || {
        let pod = PodNet::open(&ns.path(), Home::current().unwrap(), 0x539, false).unwrap();
        Net::Pod(Arc::new(pod))
    };
    let (old, new) = (agent(), agent());
    let old_listener = old.listen(addr).unwrap();
    let new_listener = new.listen(addr).unwrap();

    // Connected, none accepted yet: they wait in the two listeners' queues.
    let n = 32;
    let mut clients = Vec::new();
    for _ in 0..n {
        let dst = "198.19.9.2:15001".parse().unwrap();
        clients.push(ns.connect(dst, TIMEOUT).await.unwrap());
    }
    drop(old_listener);

    let mut served = 0;
    while served < n {
        match tokio::time::timeout(Duration::from_millis(500), new_listener.accept()).await {
            Ok(accepted) => {
                let (mut conn, _) = accepted.unwrap();
                conn.write_all(b"k").await.unwrap();
                served += 1;
            }
            Err(_) => break,
        }
    }
    assert_eq!(
        served, n,
        "the new listener must get every connection queued on the one that closed"
    );
    for mut client in clients {
        let mut byte = [0u8; 1];
        tokio::time::timeout(TIMEOUT, client.read_exact(&mut byte))
            .await
            .expect("an answer in time")
            .expect("the client's connection was not reset");
        assert_eq!(&byte, b"k");
    }
}
