use super::*;
use crate::handler::{Handler, Update};

fn pb_workload() -> pb::Workload {
    pb::Workload {
        uid: "Kubernetes//Pod/demo/a".into(),
        name: "a".into(),
        namespace: "demo".into(),
        addresses: vec![
            vec![198, 19, 1, 1],
            vec![0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        node: "node-a".into(),
        services: [(
            "demo/echo.demo.svc.cluster.local".into(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: pb::AppProtocol::Http11 as i32,
                }],
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn pb_service() -> pb::Service {
    pb::Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
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
        subject_alt_names: vec!["spiffe://cluster.local/ns/demo/sa/echo".into()],
        ..Default::default()
    }
}

fn wl(w: pb::Workload) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    }
}

fn svc(s: pb::Service) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    }
}

fn workload_err(edit: impl FnOnce(&mut pb::Workload)) -> String {
    let mut w = pb_workload();
    edit(&mut w);
    let uid = w.uid.clone();
    decode(&uid, wl(w)).unwrap_err().to_string()
}

fn service_err(edit: impl FnOnce(&mut pb::Service)) -> String {
    let mut s = pb_service();
    edit(&mut s);
    let key = format!("{}/{}", s.namespace, s.hostname);
    decode(&key, svc(s)).unwrap_err().to_string()
}

#[test]
fn a_workload_gets_istio_defaults() {
    let Resource::Workload(w) = decode("Kubernetes//Pod/demo/a", wl(pb_workload())).unwrap() else {
        panic!("workload expected");
    };
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/default"
    );
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.capacity, 1);
    assert_eq!(w.addresses[1], "2001:2::1".parse::<IpAddr>().unwrap());
    assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone);
    assert_eq!(
        w.target_port("demo/echo.demo.svc.cluster.local", 80),
        Some(8080)
    );
}

#[test]
fn invalid_workload_fields_are_named_with_the_problem() {
    assert_eq!(workload_err(|w| w.uid.clear()), "workload.uid is missing");
    assert_eq!(
        workload_err(|w| w.namespace.clear()),
        "workload.namespace is missing"
    );
    assert_eq!(
        workload_err(|w| w.addresses[1] = vec![1, 2, 3]),
        "workload.addresses[1] has 3 bytes; an IP address has 4 or 16"
    );
    assert_eq!(
        workload_err(|w| w.tunnel_protocol = 7),
        "workload.tunnel_protocol has unknown value 7"
    );
    assert_eq!(
        workload_err(|w| w.status = 2),
        "workload.status has unknown value 2"
    );
    assert_eq!(
        workload_err(|w| w.network_mode = 5),
        "workload.network_mode has unknown value 5"
    );
    assert_eq!(
        workload_err(|w| {
            w.services.insert("nohost".into(), pb::PortList::default());
        }),
        "workload.services key \"nohost\" is not of the form namespace/hostname"
    );
    assert_eq!(
        workload_err(|w| w
            .services
            .values_mut()
            .for_each(|p| p.ports[0].target_port = 70000)),
        "workload.services[demo/echo.demo.svc.cluster.local].ports[0].target_port 70000 is not a valid port (1-65535)"
    );
    assert_eq!(
        workload_err(|w| w.waypoint = Some(pb::GatewayAddress::default())),
        "workload.waypoint.destination is missing"
    );
    assert!(
        workload_err(|w| w.trust_domain = "Bad Domain".into()).starts_with(
            "workload.namespace/trust_domain/service_account: trust domain \"Bad Domain\""
        ),
    );
    let mut other = pb_workload();
    other.uid = "other".into();
    assert_eq!(
        decode("Kubernetes//Pod/demo/a", wl(other))
            .unwrap_err()
            .to_string(),
        "resource name \"Kubernetes//Pod/demo/a\" does not match the workload's own name \"other\""
    );
    assert_eq!(
        decode("Kubernetes//Pod/demo/a", pb::Address { r#type: None }).unwrap_err(),
        AddressError::Empty
    );
}

#[test]
fn invalid_service_fields_are_named_with_the_problem() {
    assert_eq!(
        service_err(|s| s.hostname.clear()),
        "service.hostname is missing"
    );
    assert_eq!(
        service_err(|s| s.addresses[0].address = vec![]),
        "service.addresses[0].address has 0 bytes; an IP address has 4 or 16"
    );
    assert_eq!(
        service_err(|s| s.addresses[0].length = Some(33)),
        "service.addresses[0].length prefix length 33 exceeds 32 for 198.19.200.1"
    );
    assert_eq!(
        service_err(|s| s.ports[0].service_port = 0),
        "service.ports[0].service_port 0 is not a valid port (1-65535)"
    );
    assert!(
        service_err(|s| s.subject_alt_names[0] = "echo".into())
            .starts_with("service.subject_alt_names[0]: SPIFFE id \"echo\""),
    );
    assert_eq!(
        service_err(|s| s.visibility = 3),
        "service.visibility has unknown value 3"
    );
    assert_eq!(
        service_err(|s| s.weighted_waypoints = vec![pb::WeightedWaypoint::default()]),
        "service.weighted_waypoints[0].destination is missing"
    );
}

#[test]
fn a_cidr_service_address_is_kept_out_of_the_vips() {
    let mut s = pb_service();
    s.addresses.push(pb::NetworkAddress {
        network: "net-b".into(),
        address: vec![198, 19, 0, 0],
        length: Some(16),
    });
    s.addresses.push(pb::NetworkAddress {
        network: "net-b".into(),
        address: vec![198, 19, 7, 7],
        length: Some(32),
    });
    let Resource::Service(s) = decode("demo/echo.demo.svc.cluster.local", svc(s)).unwrap() else {
        panic!("service expected");
    };
    let vips: Vec<_> = s.addresses.iter().map(|a| a.address.to_string()).collect();
    assert_eq!(vips, ["198.19.200.1", "198.19.7.7"]);
}

#[test]
fn encoding_then_decoding_gives_the_same_resources() {
    let Resource::Workload(mut w) = decode("Kubernetes//Pod/demo/a", wl(pb_workload())).unwrap()
    else {
        panic!("workload expected");
    };
    w.status = WorkloadStatus::Unhealthy;
    w.capacity = 3;
    w.cluster_id = "east".into();
    assert_eq!(
        decode(&w.uid, encode_workload(&w)).unwrap(),
        Resource::Workload(w.clone())
    );
    let Resource::Service(s) =
        decode("demo/echo.demo.svc.cluster.local", svc(pb_service())).unwrap()
    else {
        panic!("service expected");
    };
    assert_eq!(
        decode(&s.key(), encode_service(&s)).unwrap(),
        Resource::Service(s)
    );
}

#[test]
fn the_store_applies_valid_updates_keeps_the_old_version_of_rejected_ones_and_removes() {
    let store = crate::Store::default();
    let update = |name: &str, resource| Update {
        name: name.to_owned(),
        resource,
    };
    let rejected = store.apply(
        vec![
            update("Kubernetes//Pod/demo/a", wl(pb_workload())),
            update("demo/echo.demo.svc.cluster.local", svc(pb_service())),
        ],
        &[],
    );
    assert!(rejected.is_empty());
    let mut broken = pb_workload();
    broken.addresses = vec![vec![1]];
    let rejected = store.apply(
        vec![update("Kubernetes//Pod/demo/a", wl(broken))],
        &["demo/unknown".to_owned()],
    );
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].name, "Kubernetes//Pod/demo/a");
    assert!(
        rejected[0]
            .reason
            .contains("workload.addresses[0] has 1 bytes")
    );
    let kept = store.workload_by_uid("Kubernetes//Pod/demo/a").unwrap();
    assert_eq!(kept.addresses[0], IpAddr::from([198, 19, 1, 1]));

    let removals = [
        "Kubernetes//Pod/demo/a".to_owned(),
        "demo/echo.demo.svc.cluster.local".to_owned(),
    ];
    assert!(Handler::<pb::Address>::apply(&store, Vec::new(), &removals).is_empty());
    assert!(store.workload_by_uid("Kubernetes//Pod/demo/a").is_none());
    assert!(
        store
            .read(|s| s.service_by_key("demo/echo.demo.svc.cluster.local"))
            .is_none()
    );
}

#[test]
fn corrupted_resources_are_errors_never_panics() {
    use prost::Message;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut w = pb_workload();
    w.waypoint = Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: String::new(),
                address: vec![198, 19, 9, 9],
                length: Some(32),
            },
        )),
        hbone_mtls_port: 15008,
    });
    let seeds = [wl(w).encode_to_vec(), svc(pb_service()).encode_to_vec()];
    let (mut decoded, mut accepted) = (0, 0);
    for i in 0..4000 {
        let mut bytes = seeds[i % 2].clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..bytes.len());
            bytes[at] = rng.random();
        }
        let Ok(address) = pb::Address::decode(bytes.as_slice()) else {
            continue;
        };
        decoded += 1;
        let name = match &address.r#type {
            Some(pb::address::Type::Workload(w)) => w.uid.clone(),
            Some(pb::address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
            None => String::new(),
        };
        if decode(&name, address).is_ok() {
            accepted += 1;
        }
    }
    // The corpus exercised both outcomes of the conversion.
    assert!(decoded > 100, "{decoded}");
    assert!(
        accepted > 0 && accepted < decoded,
        "{accepted} of {decoded}"
    );
}
