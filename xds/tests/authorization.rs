//! `istio.security.Authorization` into the policy model: the upstream wire vectors in
//! `shared/testdata/wire` converted, and a component test of the real delta ADS client, over
//! TLS, against the fake control plane on 127.0.0.1, feeding the real `Store` (good policy
//! applies, a malformed DENY is NACKed and fails closed, a removal removes).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use xds::Store;
use xds::authorization::{AuthorizationError, decode};
use xds::client::{Client, Config, NodeInfo};
use xds::fake::{Fake, WAIT, response};
use xds::handler::{Handler, Update};
use xds::policy::{Action, Connection, Peer, Problem, Reason, Scope, StringMatch};
use xds::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use xds::proto::istio::security::{self as sec, Authorization};
use xds::proto::istio::workload as pb;
use xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// `shared/testdata/wire` beside the workspace or beside a folder above it (a worktree).
fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/testdata/wire"))
        .find(|dir| dir.is_dir())
        .expect("shared/testdata/wire must be beside the workspace (../shared)")
}

fn vector<M: Message + Default>(name: &str) -> M {
    let bytes = std::fs::read(vectors_dir().join(format!("{name}.binpb"))).unwrap();
    M::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_full_vector_converts_every_field() {
    let a: Authorization = vector("authorization_full");
    let p = decode("demo/deny-debug", &a).unwrap();
    assert_eq!(p.key(), "demo/deny-debug");
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::WorkloadSelector, Action::Deny, true)
    );
    assert_eq!(p.rules.len(), 2);
    let clauses = &p.rules[0].clauses;
    assert_eq!(clauses.len(), 2);
    assert_eq!(clauses[0].matches.len(), 2);
    let m = &clauses[0].matches[0];
    assert_eq!(
        m.namespaces,
        [
            StringMatch::Exact("demo".into()),
            StringMatch::Prefix("team-".into())
        ]
    );
    assert_eq!(
        m.not_namespaces,
        [StringMatch::Suffix("-system".into()), StringMatch::Presence]
    );
    assert_eq!(
        m.principals,
        [
            StringMatch::Exact("mesh.example/ns/demo/sa/productpage".into()),
            StringMatch::Prefix("mesh.example/ns/demo/".into())
        ]
    );
    assert_eq!(
        m.not_principals,
        [
            StringMatch::Suffix("/sa/untrusted".into()),
            StringMatch::Presence
        ]
    );
    let nets = |list: &[ipnet::IpNet]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(nets(&m.source_ips), ["198.19.1.0/24", "fd00:198:18:1::/64"]);
    assert_eq!(nets(&m.not_source_ips), ["198.19.1.66/32"]);
    assert_eq!(
        nets(&m.destination_ips),
        ["198.19.2.10/32", "fd00:198:18:2::10/128"]
    );
    assert_eq!(nets(&m.not_destination_ips), ["198.19.2.0/28"]);
    assert_eq!(m.destination_ports, [8080, 9443, 15008]);
    assert_eq!(m.not_destination_ports, [22, 65535]);
    let accounts = |list: &[xds::policy::ServiceAccountMatch]| {
        list.iter()
            .map(|s| format!("{}/{}", s.namespace, s.service_account))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        accounts(&m.service_accounts),
        ["demo/productpage", "demo/ratings"]
    );
    assert_eq!(accounts(&m.not_service_accounts), ["kube-system/default"]);
    assert_eq!(
        clauses[0].matches[1].namespaces,
        [StringMatch::Exact("other".into())]
    );
    assert_eq!(clauses[1].matches[0].destination_ports, [9080]);
    // rules[1]: one clause without matches (always true).
    assert_eq!(p.rules[1].clauses.len(), 1);
    assert!(p.rules[1].clauses[0].matches.is_empty());
}

#[test]
fn unpacked_ports_convert_like_packed_ones() {
    let a: Authorization = vector("authorization_unpacked_ports");
    let p = decode("demo/unpacked", &a).unwrap();
    assert_eq!((p.scope, p.action), (Scope::Namespace, Action::Allow));
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.destination_ports, [80, 443]);
    assert_eq!(m.not_destination_ports, [22]);
    assert_eq!(m.namespaces, [StringMatch::Exact("demo".into())]);
}

#[test]
fn open_enums_are_rejected_with_the_field_and_fail_closed() {
    let a: Authorization = vector("authorization_open_enums");
    let e = decode("demo/future", &a).unwrap_err();
    let AuthorizationError::Invalid(invalid) = &e else {
        panic!("field error expected, got {e}");
    };
    assert_eq!(invalid.field, "scope");
    assert_eq!(invalid.problem, Problem::UnknownScope(99));
    assert_eq!(
        e.to_string(),
        "authorization policy demo/future: scope: unknown scope 99 \
         (GLOBAL=0, NAMESPACE=1, WORKLOAD_SELECTOR=2)"
    );
    let mut known_scope = a.clone();
    known_scope.scope = sec::Scope::Namespace as i32;
    assert_eq!(
        decode("demo/future", &known_scope).unwrap_err().to_string(),
        "authorization policy demo/future: action: unknown action 99 (ALLOW=0, DENY=1)"
    );

    // Through the store: NACKed, and its stand-in denies its namespace.
    let store = Store::default();
    store.update(|s| s.upsert_workload(echo()));
    let rejections = store.apply(
        vec![Update {
            name: "demo/future".into(),
            resource: a,
        }],
        &[],
    );
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].name, "demo/future");
    assert!(rejections[0].reason.contains("unknown scope 99"));
    let stored = store.read(|s| s.policies().get("demo/future").cloned().unwrap());
    assert_eq!(
        (stored.scope, stored.action, stored.dry_run),
        (Scope::Namespace, Action::Deny, false)
    );
    assert!(!decide(&store, 8080).is_allowed());
}

#[test]
fn the_delta_response_vector_applies_through_the_store() {
    let r: DeltaDiscoveryResponse = vector("delta_response_authorization");
    assert_eq!(r.type_url, AUTHORIZATION_TYPE_URL);
    let updates: Vec<Update<Authorization>> = r
        .resources
        .iter()
        .map(|res| Update {
            name: res.name.clone(),
            resource: Authorization::decode(res.resource.as_ref().unwrap().value.as_slice())
                .unwrap(),
        })
        .collect();
    let store = Store::default();
    let rejections = store.apply(updates, &r.removed_resources);
    assert_eq!(rejections, []);
    let p = store.read(|s| s.policies().get("demo/deny-debug").cloned().unwrap());
    assert_eq!(p.rejection(), None);
    assert_eq!(p.scope, Scope::WorkloadSelector);
}

// --- component test with the fake control plane ---

#[path = "support/pki.rs"]
mod pki;
use pki::{Pki, SERVER_NAME};

fn start_client(pki: &Pki, addr: SocketAddr, store: &Store) -> oneshot::Sender<()> {
    let cfg = Config {
        address: format!("https://{addr}"),
        root_cert: Some(pki.path("root.pem")),
        server_name: Some(SERVER_NAME.to_owned()),
        token: Some(pki.path("token")),
        cluster_id: "Kubernetes".to_owned(),
        headers: Vec::new(),
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
    let client = Client::new(cfg).watch_store(store);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client.run(async {
        let _ = stopped.await;
    }));
    stop
}

/// The destination workload `demo/echo` at 198.19.1.3.
fn echo() -> xds::Workload {
    let id = identity::Identity::new("cluster.local", "demo", "echo").unwrap();
    let mut w = xds::Workload::new("demo/echo", "echo", id);
    w.addresses = vec![[198, 19, 1, 3].into()];
    w
}

fn echo_address() -> (String, pb::Address) {
    let w = pb::Workload {
        uid: "demo/echo".into(),
        name: "echo".into(),
        namespace: "demo".into(),
        addresses: vec![vec![198, 19, 1, 3]],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: "echo".into(),
        ..Default::default()
    };
    (
        "demo/echo".into(),
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        },
    )
}

/// Decides an mTLS connection from `client` at 198.19.0.2 to echo's `port`.
fn decide(store: &Store, port: u16) -> xds::policy::Decision {
    let conn = Connection {
        src: "198.19.0.2:40000".parse().unwrap(),
        dst: SocketAddr::from(([198, 19, 1, 3], port)),
        peer: Some(std::sync::Arc::new(Peer::new(
            "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap(),
        ))),
    };
    store.read(|s| s.authorize("demo/echo", &conn))
}

/// `demo/deny-80`: a namespace-wide DENY of destination port 80.
fn deny_80() -> (String, Authorization) {
    let a = Authorization {
        name: "deny-80".into(),
        namespace: "demo".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    ("demo/deny-80".into(), a)
}

#[tokio::test]
async fn policies_from_the_control_plane_apply_fail_closed_and_go() {
    let pki = Pki::new();
    let mut fake = Fake::start(Some(pki.server.clone())).await.unwrap();
    let store = Store::default();
    let _stop = start_client(&pki, fake.addr(), &store);
    let first = fake.next_request().await;
    let second = fake.next_request().await;
    assert_eq!(first.request.type_url, ADDRESS_TYPE_URL);
    assert_eq!(second.request.type_url, AUTHORIZATION_TYPE_URL);

    let nonce = fake.push(response(ADDRESS_TYPE_URL, [echo_address()], []));
    let ack = fake.reply_to(&nonce).await;
    assert!(ack.request.error_detail.is_none(), "{:?}", ack.request);
    assert!(decide(&store, 80).is_allowed(), "no policies yet");

    // A good policy applies and evaluates.
    let nonce = fake.push(response(AUTHORIZATION_TYPE_URL, [deny_80()], []));
    let ack = fake.reply_to(&nonce).await;
    assert!(ack.request.error_detail.is_none(), "{:?}", ack.request);
    assert_eq!(
        decide(&store, 80).reason,
        Reason::Denied {
            policy: "demo/deny-80".into(),
            rule: 0
        }
    );
    assert!(decide(&store, 8080).is_allowed());

    // A malformed version of the DENY is NACKed by name and then denies everything.
    let (name, mut broken) = deny_80();
    broken.rules[0].clauses[0].matches[0].source_ips = vec![sec::Address {
        address: vec![198, 19, 0],
        length: 24,
    }];
    let nonce = fake.push(response(AUTHORIZATION_TYPE_URL, [(name, broken)], []));
    let nack = fake.reply_to(&nonce).await;
    let detail = nack.request.error_detail.expect("a NACK");
    assert!(
        detail.message.contains(
            "demo/deny-80: authorization policy demo/deny-80: \
             rules[0].clauses[0].matches[0].sourceIps[0].address: \
             address of 3 bytes is neither IPv4 (4) nor IPv6 (16)"
        ),
        "{}",
        detail.message
    );
    let got = decide(&store, 8080);
    assert!(
        matches!(&got.reason, Reason::Rejected { policy, .. } if policy == "demo/deny-80"),
        "the broken DENY must deny, not allow: {got:?}"
    );
    assert!(!decide(&store, 80).is_allowed());

    // A removal removes it.
    let nonce = fake.push(response::<Authorization>(
        AUTHORIZATION_TYPE_URL,
        [],
        ["demo/deny-80".to_owned()],
    ));
    let ack = tokio::time::timeout(WAIT, fake.reply_to(&nonce))
        .await
        .expect("the removal was never acknowledged");
    assert!(ack.request.error_detail.is_none(), "{:?}", ack.request);
    assert!(store.read(|s| s.policies().is_empty()));
    assert_eq!(decide(&store, 8080).reason, Reason::NoAllowPolicies);
    assert!(decide(&store, 80).is_allowed());
}

#[test]
fn every_policy_of_the_example_file_survives_encode_and_decode() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies.yaml");
    let mesh = xds::local::load(&path).unwrap();
    assert!(!mesh.policies.is_empty());
    for policy in &mesh.policies {
        let name = format!("{}/{}", policy.namespace, policy.name);
        let wire = xds::authorization::encode(policy);
        let bytes = wire.encode_to_vec();
        let back = decode(&name, &Authorization::decode(&bytes[..]).unwrap()).unwrap();
        assert_eq!(&back, policy, "{name}");
    }
    // And the served snapshot carries them under their resource names.
    let snapshot = xds::server::Snapshot::from_state(&mesh.into_state());
    let served = snapshot.resources(AUTHORIZATION_TYPE_URL).unwrap();
    assert!(served.contains_key("demo/echo-from-client"));
}
