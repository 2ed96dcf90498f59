//! Root only: sockets the agent creates for a pod live in the pod's network namespace, carry
//! the agent's mark, and leave the creating thread in the agent's own namespace; delivery
//! sockets take the client's address or fall back to the pod's. Prints what one socket costs
//! (not asserted). Without root it is skipped, unless `CI` is set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use agent::demo::topology::Namespace;
use agent::netns::{Home, Net, PodNet};
use agent::proxy::delivery;
use socket2::Domain;

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
    let (socket, source) = delivery::socket(&pod, client, dst).unwrap();
    assert_eq!(source, delivery::Source::Original(client));
    assert_eq!(socket.local_addr().unwrap().ip(), client);
    let other_family: std::net::IpAddr = "2001:2::77".parse().unwrap();
    let (socket, source) = delivery::socket(&pod, other_family, dst).unwrap();
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
