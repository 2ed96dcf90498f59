//! Component tests: the real delta ADS client, over TLS, against the fake
//! control plane on 127.0.0.1, feeding the real `Store`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use xds::client::{Client, Config, NodeInfo, Ready};
use xds::fake::{Fake, Seen, WAIT, response};
use xds::handler::{Handler, Rejection, Update};
use xds::proto::istio::security::Authorization;
use xds::proto::istio::workload as pb;
use xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use xds::{Store, TunnelProtocol};

#[path = "support/pki.rs"]
mod pki;
use pki::{Pki, SERVER_NAME};

/// Authorization resources as received, by name.
#[derive(Clone, Default)]
struct Policies(Arc<Mutex<BTreeMap<String, Authorization>>>);

impl Handler<Authorization> for Policies {
    fn apply(&self, updates: Vec<Update<Authorization>>, removals: &[String]) -> Vec<Rejection> {
        let mut held = self.0.lock().unwrap();
        for u in updates {
            held.insert(u.name, u.resource);
        }
        for name in removals {
            held.remove(name);
        }
        Vec::new()
    }
}

/// A running client; dropping it stops the client.
struct Agent {
    store: Store,
    policies: Policies,
    ready: Ready,
    _stop: oneshot::Sender<()>,
}

fn start_client(pki: &Pki, addr: SocketAddr) -> Agent {
    let cfg = Config {
        address: format!("https://{addr}"),
        root_cert: Some(pki.path("root.pem")),
        server_name: Some(SERVER_NAME.to_owned()),
        token: Some(pki.path("token")),
        cluster_id: "Kubernetes".to_owned(),
        headers: vec![("X-Mesh-Tenant".to_owned(), "blue".to_owned())],
        node: NodeInfo {
            pod_name: "ambientd-a".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "198.18.0.1".into(),
            node_name: "node-a".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
            extra_metadata: BTreeMap::new(),
        },
        connect_timeout: Duration::from_secs(2),
    };
    let store = Store::default();
    let policies = Policies::default();
    let client = Client::new(cfg)
        .watch::<pb::Address, _>(ADDRESS_TYPE_URL, store.clone())
        .watch::<Authorization, _>(AUTHORIZATION_TYPE_URL, policies.clone());
    let ready = client.ready();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client.run(async {
        let _ = stopped.await;
    }));
    Agent {
        store,
        policies,
        ready,
        _stop: stop,
    }
}

fn workload(uid: &str, ip: [u8; 4]) -> (String, pb::Address) {
    let w = pb::Workload {
        uid: uid.to_owned(),
        name: uid.rsplit('/').next().unwrap().to_owned(),
        namespace: "demo".to_owned(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: "reviews".to_owned(),
        node: "node-a".to_owned(),
        services: [(
            "demo/reviews.demo.svc.cluster.local".to_owned(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        ..Default::default()
    };
    (
        uid.to_owned(),
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        },
    )
}

fn service() -> (String, pb::Address) {
    let s = pb::Service {
        name: "reviews".to_owned(),
        namespace: "demo".to_owned(),
        hostname: "reviews.demo.svc.cluster.local".to_owned(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![198, 19, 200, 1],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    (
        "demo/reviews.demo.svc.cluster.local".to_owned(),
        pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        },
    )
}

fn policy(name: &str) -> (String, Authorization) {
    let a = Authorization {
        name: name.to_owned(),
        namespace: "demo".to_owned(),
        ..Default::default()
    };
    (format!("demo/{name}"), a)
}

fn ip(octets: [u8; 4]) -> IpAddr {
    IpAddr::from(octets)
}

/// Reads the two initial requests of a stream, Address first.
async fn initial_requests(fake: &mut Fake) -> (Seen, Seen) {
    let a = fake.next_request().await;
    let b = fake.next_request().await;
    assert_eq!(a.request.type_url, ADDRESS_TYPE_URL);
    assert_eq!(b.request.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(a.stream, b.stream);
    (a, b)
}

/// Answers both initial requests and waits for the ACKs.
async fn sync(fake: &mut Fake, addresses: Vec<(String, pb::Address)>) {
    let nonce = fake.push(response(ADDRESS_TYPE_URL, addresses, []));
    let ack = fake.reply_to(&nonce).await;
    assert!(ack.request.error_detail.is_none(), "{:?}", ack.request);
    let nonce = fake.push(response(AUTHORIZATION_TYPE_URL, [policy("allow-all")], []));
    fake.reply_to(&nonce).await;
}

async fn wait_ready(ready: &mut Ready) {
    tokio::time::timeout(WAIT, ready.wait())
        .await
        .expect("the client never became ready");
}

#[tokio::test]
async fn initial_sync_sends_node_and_credentials_and_becomes_ready_after_every_type() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());

    let (address, authz) = initial_requests(&mut fake).await;
    for seen in [&address, &authz] {
        let r = &seen.request;
        let node = r
            .node
            .as_ref()
            .expect("every initial request carries the node");
        assert_eq!(
            node.id,
            "ztunnel~198.18.0.1~ambientd-a.istio-system~istio-system.svc.cluster.local"
        );
        let meta = &node.metadata.as_ref().unwrap().fields;
        for key in [
            "NAME",
            "NAMESPACE",
            "INSTANCE_IPS",
            "NODE_NAME",
            "CLUSTER_ID",
        ] {
            assert!(meta.contains_key(key), "metadata {key} missing");
        }
        assert!(r.response_nonce.is_empty());
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert!(r.initial_resource_versions.is_empty());
        assert_eq!(
            seen.metadata.get("authorization").unwrap(),
            "Bearer token-1"
        );
        assert_eq!(seen.metadata.get("clusterid").unwrap(), "Kubernetes");
        assert_eq!(seen.metadata.get("x-mesh-tenant").unwrap(), "blue");
    }

    let nonce = fake.push(response(
        ADDRESS_TYPE_URL,
        [
            workload("Kubernetes//Pod/demo/reviews-1", [198, 19, 1, 5]),
            service(),
        ],
        [],
    ));
    let ack = fake.reply_to(&nonce).await;
    assert_eq!(ack.request.type_url, ADDRESS_TYPE_URL);
    assert!(ack.request.error_detail.is_none());
    assert!(ack.request.node.is_none());
    assert!(
        !agent.ready.is_ready(),
        "ready before the Authorization type was synced"
    );
    let w = agent.store.workload_by_ip("", ip([198, 19, 1, 5])).unwrap();
    assert_eq!(w.uid, "Kubernetes//Pod/demo/reviews-1");
    assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone);
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/reviews"
    );
    assert!(
        agent
            .store
            .service_by_vip("", SocketAddr::from(([198, 19, 200, 1], 80)))
            .is_some()
    );

    let nonce = fake.push(response(AUTHORIZATION_TYPE_URL, [policy("allow-all")], []));
    fake.reply_to(&nonce).await;
    let mut ready = agent.ready.clone();
    wait_ready(&mut ready).await;
    assert!(
        agent
            .policies
            .0
            .lock()
            .unwrap()
            .contains_key("demo/allow-all")
    );
}

#[tokio::test]
async fn updates_add_replace_and_remove_resources_and_notify_the_store() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());
    initial_requests(&mut fake).await;
    sync(&mut fake, vec![workload("demo/a", [198, 19, 1, 1])]).await;
    let mut changes = agent.store.subscribe();
    changes.borrow_and_update();

    // Add b, move a to a new IP.
    let nonce = fake.push(response(
        ADDRESS_TYPE_URL,
        [
            workload("demo/a", [198, 19, 1, 2]),
            workload("demo/b", [198, 19, 1, 3]),
        ],
        [],
    ));
    fake.reply_to(&nonce).await;
    assert!(changes.has_changed().unwrap());
    assert!(
        agent
            .store
            .workload_by_ip("", ip([198, 19, 1, 1]))
            .is_none()
    );
    assert_eq!(
        agent
            .store
            .workload_by_ip("", ip([198, 19, 1, 2]))
            .unwrap()
            .uid,
        "demo/a"
    );
    assert!(agent.store.workload_by_uid("demo/b").is_some());

    // Remove a and a name never sent (ignored); remove the policy.
    let nonce = fake.push(response::<pb::Address>(
        ADDRESS_TYPE_URL,
        [],
        ["demo/a".to_owned(), "demo/never-sent".to_owned()],
    ));
    let ack = fake.reply_to(&nonce).await;
    assert!(ack.request.error_detail.is_none());
    assert!(agent.store.workload_by_uid("demo/a").is_none());
    assert!(
        agent
            .store
            .workload_by_ip("", ip([198, 19, 1, 2]))
            .is_none()
    );
    assert!(agent.store.workload_by_uid("demo/b").is_some());
    let nonce = fake.push(response::<Authorization>(
        AUTHORIZATION_TYPE_URL,
        [],
        ["demo/allow-all".to_owned()],
    ));
    fake.reply_to(&nonce).await;
    assert!(agent.policies.0.lock().unwrap().is_empty());
}

fn bad_workloads() -> Vec<(String, pb::Address)> {
    let (name, mut five_bytes) = workload("demo/bad-ip", [198, 19, 1, 9]);
    if let Some(pb::address::Type::Workload(w)) = &mut five_bytes.r#type {
        w.addresses = vec![vec![198, 19, 1, 9, 9]];
    }
    let (key_name, mut bad_key) = workload("demo/bad-key", [198, 19, 1, 10]);
    if let Some(pb::address::Type::Workload(w)) = &mut bad_key.r#type {
        w.services
            .insert("no-slash".to_owned(), pb::PortList::default());
    }
    vec![(name, five_bytes), (key_name, bad_key)]
}

#[tokio::test]
async fn bad_resources_are_nacked_by_name_with_reason_while_good_ones_apply() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());
    initial_requests(&mut fake).await;
    let mut updates = vec![workload("demo/good", [198, 19, 1, 1])];
    updates.extend(bad_workloads());
    let nonce = fake.push(response(ADDRESS_TYPE_URL, updates, []));
    let nack = fake.reply_to(&nonce).await;
    let detail = nack.request.error_detail.expect("a NACK");
    assert!(
        detail
            .message
            .contains("demo/bad-ip: workload.addresses[0] has 5 bytes; an IP address has 4 or 16"),
        "{}",
        detail.message
    );
    assert!(
        detail.message.contains(
            "demo/bad-key: workload.services key \"no-slash\" is not of the form namespace/hostname"
        ),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("demo/good"));
    assert!(agent.store.workload_by_uid("demo/good").is_some());
    assert!(agent.store.workload_by_uid("demo/bad-ip").is_none());
    assert!(agent.store.workload_by_uid("demo/bad-key").is_none());
}

#[tokio::test]
async fn reconnect_claims_held_versions_but_not_nacked_ones_and_rereads_the_token() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());
    initial_requests(&mut fake).await;
    let mut updates = vec![workload("demo/good", [198, 19, 1, 1]), service()];
    updates.extend(bad_workloads());
    let sent = response(ADDRESS_TYPE_URL, updates, []);
    let versions: BTreeMap<_, _> = sent
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    let nonce = fake.push(sent);
    fake.reply_to(&nonce).await;
    let nonce = fake.push(response(AUTHORIZATION_TYPE_URL, [policy("p")], []));
    fake.reply_to(&nonce).await;

    std::fs::write(pki.path("token"), "token-2").unwrap();
    fake.disconnect();
    let (address, authz) = initial_requests(&mut fake).await;
    assert_eq!(address.stream, 2);
    assert_eq!(
        address.metadata.get("authorization").unwrap(),
        "Bearer token-2"
    );
    let claimed: BTreeMap<_, _> = address
        .request
        .initial_resource_versions
        .into_iter()
        .collect();
    let expected: BTreeMap<_, _> = ["demo/good", "demo/reviews.demo.svc.cluster.local"]
        .into_iter()
        .map(|n| (n.to_owned(), versions[n].clone()))
        .collect();
    assert_eq!(claimed, expected);
    assert_eq!(
        authz
            .request
            .initial_resource_versions
            .keys()
            .collect::<Vec<_>>(),
        ["demo/p"]
    );
    // State was kept across the reconnect.
    assert!(agent.store.workload_by_uid("demo/good").is_some());
}

#[tokio::test]
async fn control_plane_down_at_start_is_retried_until_it_appears() {
    let pki = Pki::new();
    // Something that accepts and hangs up: every attempt fails its TLS handshake.
    let refuser = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = refuser.local_addr().unwrap();
    let agent = start_client(&pki, addr);
    for _ in 0..3 {
        let (conn, _) = tokio::time::timeout(WAIT, refuser.accept())
            .await
            .expect("the client stopped retrying")
            .unwrap();
        drop(conn);
        assert!(!agent.ready.is_ready());
    }
    drop(refuser);
    assert!(agent.store.workload_by_uid("demo/a").is_none());

    let mut fake = Fake::start_at(addr, Some(pki.server.clone()))
        .await
        .unwrap();
    initial_requests(&mut fake).await;
    sync(&mut fake, vec![workload("demo/a", [198, 19, 1, 1])]).await;
    let mut ready = agent.ready.clone();
    wait_ready(&mut ready).await;
    assert!(agent.store.workload_by_uid("demo/a").is_some());
}

#[tokio::test]
async fn control_plane_killed_mid_run_keeps_state_and_resyncs_on_return() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());
    initial_requests(&mut fake).await;
    sync(
        &mut fake,
        vec![
            workload("demo/a", [198, 19, 1, 1]),
            workload("demo/b", [198, 19, 1, 2]),
        ],
    )
    .await;

    fake.stop().await;
    // Reconnect attempts now fail; nothing is flushed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(agent.ready.is_ready());
    assert!(
        agent
            .store
            .workload_by_ip("", ip([198, 19, 1, 1]))
            .is_some()
    );
    assert!(
        agent
            .store
            .workload_by_ip("", ip([198, 19, 1, 2]))
            .is_some()
    );

    fake.restart().await.unwrap();
    let (address, _) = initial_requests(&mut fake).await;
    let claimed: Vec<_> = address
        .request
        .initial_resource_versions
        .keys()
        .cloned()
        .collect();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    // The control plane answers with what changed meanwhile.
    let nonce = fake.push(response(
        ADDRESS_TYPE_URL,
        [workload("demo/c", [198, 19, 1, 3])],
        ["demo/b".to_owned()],
    ));
    fake.reply_to(&nonce).await;
    assert!(agent.store.workload_by_uid("demo/a").is_some());
    assert!(agent.store.workload_by_uid("demo/b").is_none());
    assert!(agent.store.workload_by_uid("demo/c").is_some());
}

#[tokio::test]
async fn refused_and_failed_streams_are_retried_and_a_slow_control_plane_still_syncs() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    fake.refuse_next([
        tonic::Status::unavailable("fake: not yet"),
        tonic::Status::permission_denied("fake: authorization failed"),
    ]);
    fake.set_delay(Some(Duration::from_millis(50)));
    let mut agent = start_client(&pki, fake.addr());
    let (address, _) = initial_requests(&mut fake).await;
    assert_eq!(address.stream, 1, "refused streams are not counted");
    sync(&mut fake, vec![workload("demo/a", [198, 19, 1, 1])]).await;
    wait_ready(&mut agent.ready).await;

    fake.fail_streams(tonic::Status::internal("fake: broken"));
    let (again, _) = initial_requests(&mut fake).await;
    assert_eq!(again.stream, 2);
    assert_eq!(
        again
            .request
            .initial_resource_versions
            .keys()
            .collect::<Vec<_>>(),
        ["demo/a"]
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_root_is_never_trusted() {
    let pki = Pki::new();
    let other = Pki::new();
    let mut fake = Fake::start(Some(other.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());
    // No stream ever opens: the handshake fails before gRPC.
    assert!(
        fake.try_next_request(Duration::from_secs(1))
            .await
            .is_none()
    );
    assert!(!agent.ready.is_ready());
}

#[tokio::test]
async fn undecodable_or_mistyped_payloads_are_nacked_and_unknown_types_acked() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let agent = start_client(&pki, fake.addr());
    initial_requests(&mut fake).await;

    let mut r = response(
        ADDRESS_TYPE_URL,
        [
            workload("demo/garbage", [198, 19, 1, 1]),
            workload("demo/mistyped", [198, 19, 1, 2]),
            workload("demo/empty", [198, 19, 1, 3]),
            workload("demo/fine", [198, 19, 1, 4]),
        ],
        [],
    );
    r.resources[0].resource.as_mut().unwrap().value = vec![0x0a, 0xff];
    r.resources[1].resource.as_mut().unwrap().type_url = AUTHORIZATION_TYPE_URL.to_owned();
    r.resources[2].resource = None;
    let nonce = fake.push(r);
    let message = fake
        .reply_to(&nonce)
        .await
        .request
        .error_detail
        .expect("a NACK")
        .message;
    assert!(
        message.contains("demo/garbage: cannot decode the payload"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "demo/mistyped: payload type {AUTHORIZATION_TYPE_URL} does not match the response type {ADDRESS_TYPE_URL}"
        )),
        "{message}"
    );
    assert!(
        message.contains("demo/empty: the resource has no payload"),
        "{message}"
    );
    assert!(agent.store.workload_by_uid("demo/fine").is_some());

    let nonce = fake.push(response(
        "type.googleapis.com/istio.workload.Workload",
        [("x".to_owned(), pb::Workload::default())],
        [],
    ));
    let ack = fake.reply_to(&nonce).await;
    assert!(ack.request.error_detail.is_none());
    assert_eq!(
        ack.request.type_url,
        "type.googleapis.com/istio.workload.Workload"
    );
}
