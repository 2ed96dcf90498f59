use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use identity::Identity;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::service::{NetworkAddress, Port};
use crate::workload::WorkloadStatus;

const ECHO: &str = "demo/echo.demo.svc.cluster.local";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn workload(uid: &str, node: &str, ips: &[&str]) -> Workload {
    let sa = uid.rsplit('/').next().unwrap();
    let mut w = Workload::new(uid, sa, Identity::with_defaults("", "demo", sa).unwrap());
    w.node = node.to_owned();
    w.addresses = ips.iter().map(|s| ip(s)).collect();
    w
}

fn backing(mut w: Workload, service: &str, ports: &[(u16, u16)]) -> Workload {
    w.services.insert(service.to_owned(), ports_of(ports));
    w
}

fn ports_of(ports: &[(u16, u16)]) -> Vec<Port> {
    ports
        .iter()
        .map(|&(service_port, target_port)| Port {
            service_port,
            target_port,
        })
        .collect()
}

fn echo_service(vips: &[(&str, &str)], ports: &[(u16, u16)]) -> Service {
    Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
        addresses: vips
            .iter()
            .map(|&(network, a)| NetworkAddress {
                network: network.into(),
                address: ip(a),
            })
            .collect(),
        ports: ports_of(ports),
        subject_alt_names: vec!["spiffe://cluster.local/ns/demo/sa/extra".parse().unwrap()],
    }
}

fn uids(ws: &[Arc<Workload>]) -> Vec<&str> {
    ws.iter().map(|w| w.uid.as_str()).collect()
}

#[test]
fn upsert_indexes_a_workload_everywhere() {
    let mut state = State::new();
    let old = state.upsert_workload(backing(
        workload("demo/a", "node-a", &["127.0.0.2", "::2"]),
        ECHO,
        &[],
    ));
    assert!(old.is_none());
    assert_eq!(state.workload_by_uid("demo/a").unwrap().name, "a");
    assert_eq!(
        state.workload_by_ip("", ip("127.0.0.2")).unwrap().uid,
        "demo/a"
    );
    assert_eq!(state.workload_by_ip("", ip("::2")).unwrap().uid, "demo/a");
    assert_eq!(uids(&state.workloads_on_node("node-a")), ["demo/a"]);
    assert_eq!(uids(&state.endpoints(ECHO)), ["demo/a"]);
    assert!(state.workloads_on_node("node-b").is_empty());
}

#[test]
fn replacing_a_workload_moves_every_index_entry() {
    let mut state = State::new();
    state.upsert_workload(backing(
        workload("demo/a", "node-a", &["127.0.0.2", "127.0.0.4"]),
        ECHO,
        &[],
    ));
    state.upsert_workload(workload("demo/b", "node-a", &["127.0.0.5"]));

    let replaced = state
        .upsert_workload(backing(
            workload("demo/a", "node-b", &["127.0.0.3", "127.0.0.4"]),
            "demo/other.demo.svc.cluster.local",
            &[],
        ))
        .unwrap();
    assert_eq!(replaced.node, "node-a");

    assert!(state.workload_by_ip("", ip("127.0.0.2")).is_none());
    let a = state.workload_by_ip("", ip("127.0.0.3")).unwrap();
    assert_eq!(a.node, "node-b");
    // The address kept across the replacement points at the new version.
    assert_eq!(
        state.workload_by_ip("", ip("127.0.0.4")).unwrap().node,
        "node-b"
    );
    assert_eq!(uids(&state.workloads_on_node("node-a")), ["demo/b"]);
    assert_eq!(uids(&state.workloads_on_node("node-b")), ["demo/a"]);
    assert!(state.endpoints(ECHO).is_empty());
    assert_eq!(
        uids(&state.endpoints("demo/other.demo.svc.cluster.local")),
        ["demo/a"]
    );
    assert_eq!(state.workloads().count(), 2);
}

#[test]
fn removing_a_workload_clears_every_index_entry() {
    let mut state = State::new();
    state.upsert_workload(backing(
        workload("demo/a", "node-a", &["127.0.0.2"]),
        ECHO,
        &[],
    ));
    state.upsert_workload(backing(
        workload("demo/b", "node-a", &["127.0.0.3"]),
        ECHO,
        &[],
    ));

    assert_eq!(state.remove_workload("demo/a").unwrap().uid, "demo/a");
    assert!(state.remove_workload("demo/a").is_none());
    assert!(state.workload_by_uid("demo/a").is_none());
    assert!(state.workload_by_ip("", ip("127.0.0.2")).is_none());
    assert_eq!(uids(&state.workloads_on_node("node-a")), ["demo/b"]);
    assert_eq!(uids(&state.endpoints(ECHO)), ["demo/b"]);

    state.remove_workload("demo/b");
    assert!(state.workloads_on_node("node-a").is_empty());
    assert!(state.endpoints(ECHO).is_empty());
    assert_eq!(state.workloads().count(), 0);
}

#[test]
fn the_same_ip_in_two_networks_is_two_workloads() {
    let mut state = State::new();
    let mut east = workload("demo/east", "n", &["198.18.0.1"]);
    east.network = "east".into();
    state.upsert_workload(east);
    state.upsert_workload(workload("demo/default", "n", &["198.18.0.1"]));

    assert_eq!(
        state.workload_by_ip("east", ip("198.18.0.1")).unwrap().uid,
        "demo/east"
    );
    assert_eq!(
        state.workload_by_ip("", ip("198.18.0.1")).unwrap().uid,
        "demo/default"
    );
    assert!(state.workload_by_ip("west", ip("198.18.0.1")).is_none());

    state.remove_workload("demo/east");
    assert!(state.workload_by_ip("east", ip("198.18.0.1")).is_none());
    assert_eq!(
        state.workload_by_ip("", ip("198.18.0.1")).unwrap().uid,
        "demo/default"
    );
}

#[test]
fn a_contested_ip_goes_to_the_latest_claim_and_falls_back_when_it_leaves() {
    let mut state = State::new();
    state.upsert_workload(workload("demo/old", "n", &["127.0.0.2"]));
    state.upsert_workload(workload("demo/new", "n", &["127.0.0.2"]));
    assert_eq!(
        state.workload_by_ip("", ip("127.0.0.2")).unwrap().uid,
        "demo/new"
    );

    state.remove_workload("demo/new");
    assert_eq!(
        state.workload_by_ip("", ip("127.0.0.2")).unwrap().uid,
        "demo/old"
    );

    // Removing the only remaining claim leaves nothing behind.
    state.upsert_workload(workload("demo/new", "n", &["127.0.0.2"]));
    state.remove_workload("demo/old");
    assert_eq!(
        state.workload_by_ip("", ip("127.0.0.2")).unwrap().uid,
        "demo/new"
    );
    state.remove_workload("demo/new");
    assert!(state.workload_by_ip("", ip("127.0.0.2")).is_none());
}

#[test]
fn a_vip_is_found_only_with_one_of_its_ports_and_in_its_network() {
    let mut state = State::new();
    state.upsert_service(echo_service(
        &[("", "127.0.10.1"), ("east", "198.18.10.1")],
        &[(80, 8080)],
    ));

    let svc = state.service_by_vip("", sock("127.0.10.1:80")).unwrap();
    assert_eq!(svc.key(), ECHO);
    assert!(state.service_by_vip("", sock("127.0.10.1:81")).is_none());
    assert!(
        state
            .service_by_vip("east", sock("127.0.10.1:80"))
            .is_none()
    );
    assert!(
        state
            .service_by_vip("east", sock("198.18.10.1:80"))
            .is_some()
    );
    assert!(state.service_by_vip("", sock("127.0.10.2:80")).is_none());
    assert_eq!(state.service_by_key(ECHO).unwrap().name, "echo");
}

#[test]
fn replacing_or_removing_a_service_updates_its_vips() {
    let mut state = State::new();
    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    let old = state
        .upsert_service(echo_service(&[("", "127.0.10.2")], &[(80, 8080)]))
        .unwrap();
    assert_eq!(old.addresses[0].address, ip("127.0.10.1"));
    assert!(state.service_by_vip("", sock("127.0.10.1:80")).is_none());
    assert!(state.service_by_vip("", sock("127.0.10.2:80")).is_some());
    assert_eq!(state.services().count(), 1);

    assert!(state.remove_service(ECHO).is_some());
    assert!(state.remove_service(ECHO).is_none());
    assert!(state.service_by_vip("", sock("127.0.10.2:80")).is_none());
    assert!(state.service_by_key(ECHO).is_none());
}

#[test]
fn endpoints_survive_their_service_being_removed_and_re_added() {
    // xDS may deliver workloads before (or without) their service.
    let mut state = State::new();
    state.upsert_workload(backing(workload("demo/a", "n", &["127.0.0.3"]), ECHO, &[]));
    let dst = sock("127.0.10.1:80");
    assert!(matches!(state.resolve("", dst), Destination::Unknown));

    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    assert!(matches!(
        state.resolve("", dst),
        Destination::Service { .. }
    ));
    state.remove_service(ECHO);
    assert_eq!(uids(&state.endpoints(ECHO)), ["demo/a"]);
    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    assert!(matches!(
        state.resolve("", dst),
        Destination::Service { .. }
    ));
}

/// Resolves `dst` many times with a fixed seed; returns the chosen uids.
fn chosen(state: &State, dst: SocketAddr) -> BTreeSet<String> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..200)
        .map(|_| match state.resolve_with("", dst, &mut rng) {
            Destination::Service { workload, .. } => workload.uid.clone(),
            other => panic!("expected a service destination, got {other:?}"),
        })
        .collect()
}

#[test]
fn endpoints_are_chosen_among_healthy_addressable_workloads_only() {
    let mut state = State::new();
    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    for (uid, ip) in [
        ("demo/h1", "127.0.0.3"),
        ("demo/h2", "127.0.0.4"),
        ("demo/sick", "127.0.0.5"),
    ] {
        state.upsert_workload(backing(workload(uid, "n", &[ip]), ECHO, &[]));
    }
    let mut sick = (*state.workload_by_uid("demo/sick").unwrap()).clone();
    sick.status = WorkloadStatus::Unhealthy;
    state.upsert_workload(sick);
    state.upsert_workload(backing(workload("demo/no-ip", "n", &[]), ECHO, &[]));
    assert_eq!(state.endpoints(ECHO).len(), 4);

    let dst = sock("127.0.10.1:80");
    let expected: BTreeSet<String> = ["demo/h1".to_owned(), "demo/h2".to_owned()].into();
    assert_eq!(chosen(&state, dst), expected);

    for uid in ["demo/h1", "demo/h2"] {
        let mut w = (*state.workload_by_uid(uid).unwrap()).clone();
        w.status = WorkloadStatus::Unhealthy;
        state.upsert_workload(w);
    }
    match state.resolve("", dst) {
        Destination::NoHealthyEndpoint { service } => assert_eq!(service.key(), ECHO),
        other => panic!("expected no healthy endpoint, got {other:?}"),
    }
}

#[test]
fn a_service_without_endpoints_has_no_healthy_endpoint() {
    let mut state = State::new();
    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    let dst = state.resolve("", sock("127.0.10.1:80"));
    assert!(matches!(dst, Destination::NoHealthyEndpoint { .. }));
    assert!(dst.expected_identities().is_empty());
}

#[test]
fn target_port_prefers_the_workload_then_the_service_then_the_service_port() {
    let mut state = State::new();
    state.upsert_service(echo_service(
        &[("", "127.0.10.1")],
        &[(80, 8080), (81, 0), (82, 8082)],
    ));
    // The workload maps 80 itself, leaves 81 to the service (which has no
    // target either), and lists 82 without a target of its own.
    state.upsert_workload(backing(
        workload("demo/a", "n", &["127.0.0.3"]),
        ECHO,
        &[(80, 9090), (82, 0)],
    ));
    let target = |port: u16| match state.resolve("", SocketAddr::new(ip("127.0.10.1"), port)) {
        Destination::Service { target_port, .. } => target_port,
        other => panic!("port {port}: expected a service destination, got {other:?}"),
    };
    assert_eq!(target(80), 9090);
    assert_eq!(target(81), 81);
    assert_eq!(target(82), 8082);

    // Without the workload's own mapping, the service's target applies.
    state.upsert_workload(backing(workload("demo/a", "n", &["127.0.0.3"]), ECHO, &[]));
    let target = |port: u16| match state.resolve("", SocketAddr::new(ip("127.0.10.1"), port)) {
        Destination::Service { target_port, .. } => target_port,
        other => panic!("port {port}: expected a service destination, got {other:?}"),
    };
    assert_eq!(target(80), 8080);
}

#[test]
fn resolve_falls_back_to_the_workload_ip_then_unknown() {
    let mut state = State::new();
    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    state.upsert_workload(backing(
        workload("demo/echo", "n", &["127.0.0.3"]),
        ECHO,
        &[],
    ));

    match state.resolve("", sock("127.0.0.3:8080")) {
        Destination::Workload { workload, port } => {
            assert_eq!(workload.uid, "demo/echo");
            assert_eq!(port, 8080);
        }
        other => panic!("expected the workload, got {other:?}"),
    }
    assert!(matches!(
        state.resolve("", sock("127.0.0.9:80")),
        Destination::Unknown
    ));
    assert!(matches!(
        state.resolve("other", sock("127.0.0.3:80")),
        Destination::Unknown
    ));
    // A VIP on a port the service does not have is not the service.
    assert!(matches!(
        state.resolve("", sock("127.0.10.1:81")),
        Destination::Unknown
    ));
}

#[test]
fn expected_identities_add_the_service_subject_alt_names() {
    let mut state = State::new();
    state.upsert_service(echo_service(&[("", "127.0.10.1")], &[(80, 8080)]));
    state.upsert_workload(backing(
        workload("demo/echo", "n", &["127.0.0.3"]),
        ECHO,
        &[],
    ));

    let via_service: Vec<String> = state
        .resolve("", sock("127.0.10.1:80"))
        .expected_identities()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        via_service,
        [
            "spiffe://cluster.local/ns/demo/sa/echo",
            "spiffe://cluster.local/ns/demo/sa/extra"
        ]
    );
    let direct: Vec<String> = state
        .resolve("", sock("127.0.0.3:8080"))
        .expected_identities()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(direct, ["spiffe://cluster.local/ns/demo/sa/echo"]);
}
