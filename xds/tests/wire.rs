//! Wire compatibility with istiod and ztunnel, checked against sources that
//! are not our own `.proto` files:
//!
//! * every xDS, workload and authorization vector in `shared/testdata/wire`
//!   (encoded from the upstream definitions) decodes with our prost types,
//!   round-trips, and — printed as proto3 JSON through our descriptors — equals
//!   the upstream JSON expectation;
//! * every field and enum value of our files has the number the tables of
//!   `shared/protocol/wire.md` give, and no istio field there is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::PathBuf;

use base64::Engine;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;
use xds::address::{AddressError, Resource, decode};
use xds::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds::proto::istio::security::{self as sec, Authorization};
use xds::proto::istio::workload as pb;
use xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, DESCRIPTOR_SET};

/// `shared/` beside the workspace (`../shared` from its root, as CI lays it
/// out), or beside a folder above it (a git worktree under `/work/wt/`).
fn shared() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("shared"))
        .find(|dir| dir.join("testdata/wire").is_dir())
        .expect("shared/testdata/wire must be beside the workspace (../shared)")
}

fn vectors_dir() -> PathBuf {
    shared().join("testdata/wire")
}

struct Vector {
    name: String,
    message: String,
    bytes: Vec<u8>,
    meta: Value,
}

impl Vector {
    fn load(name: &str) -> Self {
        let dir = vectors_dir();
        let meta: Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.binpb"))).unwrap();
        assert_eq!(
            bytes.len() as u64,
            meta["binpb_len"].as_u64().unwrap(),
            "{name}"
        );
        Self {
            name: name.to_owned(),
            message: meta["message"].as_str().unwrap().to_owned(),
            bytes,
            meta,
        }
    }

    fn decode<M: Message + Default>(&self) -> M {
        M::decode(self.bytes.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

/// Every vector about xDS, workloads or authorization (the CA ones belong to
/// the CA client's tests).
fn xds_vectors() -> Vec<Vector> {
    let mut names: Vec<String> = std::fs::read_dir(vectors_dir())
        .expect("shared/testdata/wire must be beside the workspace")
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".binpb").map(str::to_owned)
        })
        .collect();
    names.sort();
    let vectors: Vec<Vector> = names
        .iter()
        .map(|n| Vector::load(n))
        .filter(|v| !v.message.starts_with("istio.v1.auth."))
        .collect();
    assert!(vectors.len() >= 19, "only {} vectors found", vectors.len());
    vectors
}

fn pool() -> DescriptorPool {
    DescriptorPool::decode(DESCRIPTOR_SET).unwrap()
}

/// Decodes with our prost type, re-encodes, decodes again; returns the
/// re-encoded bytes.
fn round_trip<M: Message + Default + PartialEq + Debug>(v: &Vector) -> Vec<u8> {
    let first: M = v.decode();
    let bytes = first.encode_to_vec();
    let second = M::decode(bytes.as_slice()).unwrap();
    assert_eq!(first, second, "{}: round trip changed the message", v.name);
    bytes
}

fn typed_round_trip(v: &Vector) -> Vec<u8> {
    match v.message.as_str() {
        "istio.workload.Workload" => round_trip::<pb::Workload>(v),
        "istio.workload.Service" => round_trip::<pb::Service>(v),
        "istio.workload.Address" => round_trip::<pb::Address>(v),
        "istio.security.Authorization" => round_trip::<Authorization>(v),
        "envoy.service.discovery.v3.DeltaDiscoveryRequest" => {
            round_trip::<DeltaDiscoveryRequest>(v)
        }
        "envoy.service.discovery.v3.DeltaDiscoveryResponse" => {
            round_trip::<DeltaDiscoveryResponse>(v)
        }
        other => panic!("{}: no type of ours for {other}", v.name),
    }
}

/// Proto3 JSON of `bytes` read as `message` through our descriptors, with
/// numbers as f64 so `1` and `1.0` compare equal.
fn json(pool: &DescriptorPool, message: &str, bytes: &[u8]) -> Value {
    let desc = pool
        .get_message_by_name(message)
        .unwrap_or_else(|| panic!("our files define no {message}"));
    let msg = DynamicMessage::decode(desc, bytes).unwrap();
    let options = SerializeOptions::new().use_proto_field_name(true);
    let value = msg
        .serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap();
    normalize(value)
}

fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

/// Follows `a.b[2].c` through a JSON value.
fn at<'a>(mut v: &'a Value, path: &str) -> &'a Value {
    for segment in path.split('.') {
        let (key, index) = match segment.split_once('[') {
            Some((k, rest)) => (
                k,
                Some(rest.trim_end_matches(']').parse::<usize>().unwrap()),
            ),
            None => (segment, None),
        };
        if !key.is_empty() {
            v = &v[key];
        }
        if let Some(i) = index {
            v = &v[i];
        }
    }
    v
}

#[test]
fn every_vector_decodes_round_trips_and_prints_the_upstream_json() {
    let pool = pool();
    for v in xds_vectors() {
        let expected = normalize(v.meta["json"].clone());
        let reencoded = typed_round_trip(&v);
        assert_eq!(
            json(&pool, &v.message, &v.bytes),
            expected,
            "{}: upstream bytes read through our descriptors",
            v.name
        );
        let ours = json(&pool, &v.message, &reencoded);
        assert_eq!(ours, expected, "{}: our re-encoding", v.name);
        // Every IP decodes to the address upstream meant.
        if let Some(ips) = v.meta.get("decoded_ips").and_then(Value::as_object) {
            for (path, want) in ips {
                let b64 = at(&ours, path)
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: no bytes at {path}", v.name));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                let ip = match bytes.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap()),
                    16 => IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap()),
                    n => panic!("{}: {path} has {n} bytes", v.name),
                };
                assert_eq!(ip.to_string(), want.as_str().unwrap(), "{}: {path}", v.name);
            }
        }
    }
}

#[test]
fn delta_responses_dispatch_by_type_url_to_the_standalone_vectors() {
    for (name, type_url) in [
        ("delta_response_address", ADDRESS_TYPE_URL),
        ("delta_response_authorization", AUTHORIZATION_TYPE_URL),
    ] {
        let v = Vector::load(name);
        let r: DeltaDiscoveryResponse = v.decode();
        assert_eq!(r.type_url, type_url);
        assert!(!r.nonce.is_empty());
        let anys = v.meta["any_values"].as_object().unwrap();
        for (i, res) in r.resources.iter().enumerate() {
            let any = res.resource.as_ref().unwrap();
            assert_eq!(any.type_url, type_url, "{name} resources[{i}]");
            let same = anys[&format!("resources[{i}].resource")]["value_same_bytes_as"]
                .as_str()
                .unwrap();
            let standalone = std::fs::read(vectors_dir().join(same)).unwrap();
            assert_eq!(any.value, standalone, "{name} resources[{i}] vs {same}");
            if type_url == ADDRESS_TYPE_URL {
                let address = pb::Address::decode(any.value.as_slice()).unwrap();
                let converted = decode(&res.name, address).unwrap();
                assert_eq!(converted.name(), res.name);
            } else {
                let policy = Authorization::decode(any.value.as_slice()).unwrap();
                assert_eq!(format!("{}/{}", policy.namespace, policy.name), res.name);
                assert!(
                    res.version.is_empty(),
                    "istiod sends no version for policies"
                );
            }
        }
        let removed = v.meta["json"]["removed_resources"].as_array().unwrap();
        assert_eq!(r.removed_resources.len(), removed.len());
    }
}

#[test]
fn typed_fields_carry_presence_open_enums_and_unpacked_repeats() {
    let full: pb::Workload = Vector::load("workload_full").decode();
    assert_eq!(full.tunnel_protocol(), pb::TunnelProtocol::Hbone);
    assert_eq!(full.capacity, Some(5));
    assert_eq!(full.workload_type(), pb::WorkloadType::Pod);
    assert_eq!(full.network_mode(), pb::NetworkMode::HostNetwork);

    let minimal: pb::Workload = Vector::load("workload_minimal").decode();
    assert_eq!(minimal.capacity, None);
    assert!(minimal.waypoint.is_none() && minimal.application_tunnel.is_none());

    let zero: pb::Workload = Vector::load("workload_presence_zero").decode();
    assert_eq!(
        zero.capacity,
        Some(0),
        "a present zero is not the unset case"
    );
    assert!(zero.application_tunnel.is_some() && zero.locality.is_some());
    match zero.waypoint.and_then(|w| w.destination) {
        Some(pb::gateway_address::Destination::Address(a)) => assert_eq!(a.length, Some(0)),
        other => panic!("waypoint address expected, got {other:?}"),
    }

    let open: pb::Workload = Vector::load("workload_open_enums").decode();
    assert_eq!(open.tunnel_protocol, 99);
    assert_eq!(open.status, 99);
    assert_eq!(open.workload_type, 99);
    assert_eq!(open.network_mode, 99);

    let unpacked: pb::Service = Vector::load("service_unpacked_enums").decode();
    let lb = unpacked.load_balancing.unwrap();
    use pb::load_balancing::Scope;
    assert_eq!(
        lb.routing_preference,
        [
            Scope::Network as i32,
            Scope::Region as i32,
            Scope::Zone as i32
        ]
    );
    assert_eq!(lb.mode(), pb::load_balancing::Mode::Strict);

    let ports: Authorization = Vector::load("authorization_unpacked_ports").decode();
    assert_eq!(ports.scope(), sec::Scope::Namespace);
    let m = &ports.rules[0].clauses[0].matches[0];
    assert_eq!(m.destination_ports, [80, 443]);
    assert_eq!(m.not_destination_ports, [22]);

    let open: Authorization = Vector::load("authorization_open_enums").decode();
    assert_eq!((open.scope, open.action), (99, 99));

    // Nothing from the injected unknown fields leaks into known ones.
    let v = Vector::load("address_unknown_fields");
    let a: pb::Address = v.decode();
    let Some(pb::address::Type::Workload(w)) = &a.r#type else {
        panic!("workload expected");
    };
    assert_eq!(w.uid, v.meta["json"]["workload"]["uid"].as_str().unwrap());
    assert_eq!(w.tunnel_protocol(), pb::TunnelProtocol::LegacyIstioMtls);
}

#[test]
fn vectors_convert_into_the_mesh_state_or_fail_with_a_precise_reason() {
    let addr = |w: pb::Workload| pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    };
    let full: pb::Workload = Vector::load("workload_full").decode();
    let uid = full.uid.clone();
    let Resource::Workload(w) = decode(&uid, addr(full.clone())).unwrap() else {
        panic!("workload expected");
    };
    assert_eq!(w.addresses.len(), 2);
    assert_eq!(w.capacity, 5);
    assert_eq!(w.cluster_id, full.cluster_id);
    assert_eq!(w.trust_domain(), full.trust_domain);
    assert_eq!(w.services.len(), 2);
    assert!(!w.is_healthy());

    let minimal: pb::Workload = Vector::load("workload_minimal").decode();
    assert_eq!(
        decode(&minimal.uid.clone(), addr(minimal)).unwrap_err(),
        AddressError::Missing {
            field: "workload.namespace".into()
        }
    );

    let open: pb::Workload = Vector::load("workload_open_enums").decode();
    assert_eq!(
        decode(&open.uid.clone(), addr(open))
            .unwrap_err()
            .to_string(),
        "workload.tunnel_protocol has unknown value 99"
    );

    let v = Vector::load("address_unknown_fields");
    let a: pb::Address = v.decode();
    let uid = v.meta["json"]["workload"]["uid"].as_str().unwrap();
    assert_eq!(
        decode(uid, a).unwrap_err().to_string(),
        "workload.tunnel_protocol = LEGACY_ISTIO_MTLS is not supported by this agent"
    );

    let svc: pb::Service = Vector::load("service_full").decode();
    let key = format!("{}/{}", svc.namespace, svc.hostname);
    let Resource::Service(s) = decode(
        &key,
        pb::Address {
            r#type: Some(pb::address::Type::Service(svc)),
        },
    )
    .unwrap() else {
        panic!("service expected");
    };
    assert_eq!(s.addresses.len(), 2, "the /24 range is not a VIP");
    assert_eq!(s.ports.len(), 5);
    assert_eq!(s.subject_alt_names.len(), 2);

    let open: pb::Service = Vector::load("service_open_enums").decode();
    let key = format!("{}/{}", open.namespace, open.hostname);
    let err = decode(
        &key,
        pb::Address {
            r#type: Some(pb::address::Type::Service(open)),
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, AddressError::UnknownEnum { value: 99, .. }),
        "{err}"
    );
}

/// (message full name, field number, field name) rows of wire.md's tables,
/// and enum (full name) → value name → number.
struct WireTables {
    fields: Vec<(String, i32, String)>,
    enums: BTreeMap<String, BTreeMap<String, i32>>,
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

fn first_backticked(s: &str) -> Option<String> {
    let mut parts = s.split('`');
    parts.next()?;
    parts.next().map(str::to_owned)
}

fn wire_tables() -> WireTables {
    let text = std::fs::read_to_string(shared().join("protocol/wire.md")).unwrap();
    let mut package = "";
    let mut message: Option<String> = None;
    let mut header: Vec<String> = Vec::new();
    let mut out = WireTables {
        fields: Vec::new(),
        enums: BTreeMap::new(),
    };
    let qualify = |package: &str, name: &str| {
        if name.contains('.') && !name.starts_with(char::is_uppercase) {
            name.to_owned()
        } else {
            format!("{package}.{name}")
        }
    };
    let mut in_table = false;
    for line in text.lines() {
        let starts_table = line.starts_with('|') && !in_table;
        in_table = line.starts_with('|');
        if let Some(h) = line.strip_prefix("## ") {
            package = match h.split('.').next().unwrap() {
                "2" => "envoy.service.discovery.v3",
                "5" => "istio.workload",
                "6" => "istio.security",
                _ => "",
            };
            message = None;
        } else if let Some(h) = line.strip_prefix("### ") {
            message = first_backticked(h).map(|m| qualify(package, &m));
        } else if line.starts_with('|') && !package.is_empty() {
            let row = cells(line);
            if row.iter().all(|c| c.starts_with("---") || c.is_empty()) {
                continue;
            }
            if starts_table {
                header = row;
                continue;
            }
            if header.first().is_some_and(|h| h.starts_with("enum")) {
                let name = qualify(package, &first_backticked(&row[0]).unwrap());
                let values = out.enums.entry(name).or_default();
                for chunk in row[1].split('`').skip(1).step_by(2) {
                    if let Some((n, v)) = chunk.split_once(" = ") {
                        values.insert(n.to_owned(), v.parse().unwrap());
                    }
                }
                continue;
            }
            let Some(num_col) = header.iter().position(|c| c == "#") else {
                continue;
            };
            if num_col == 1 && !row[0].is_empty() {
                message = first_backticked(&row[0]).map(|m| qualify(package, &m));
            }
            let (Some(msg), Ok(number)) = (&message, row[num_col].parse::<i32>()) else {
                continue;
            };
            let name = row[num_col + 1].split_whitespace().next().unwrap_or("");
            if name.chars().all(|c| c.is_alphanumeric() || c == '_') && !name.is_empty() {
                out.fields.push((msg.clone(), number, name.to_owned()));
            }
        }
    }
    out
}

#[test]
fn our_field_and_enum_numbers_are_those_of_wire_md() {
    let tables = wire_tables();
    assert!(
        tables.fields.len() > 120,
        "parsed {} rows",
        tables.fields.len()
    );
    let pool = pool();
    let documented: BTreeSet<&str> = tables.fields.iter().map(|(m, _, _)| m.as_str()).collect();
    let mut checked = 0;
    // wire.md → ours: same numbers; every istio field present.
    for (msg, number, name) in &tables.fields {
        let Some(desc) = pool.get_message_by_name(msg) else {
            assert!(
                !msg.starts_with("istio."),
                "wire.md's {msg} is missing from our files"
            );
            continue;
        };
        match desc.get_field_by_name(name) {
            Some(f) => {
                assert_eq!(f.number() as i32, *number, "{msg}.{name}");
                checked += 1;
            }
            None => {
                assert!(
                    !msg.starts_with("istio."),
                    "{msg}.{name} (#{number}) is missing from our files"
                );
                assert!(
                    desc.get_field(*number as u32).is_none(),
                    "{msg}: our field #{number} is not wire.md's {name}"
                );
            }
        }
    }
    // ours → wire.md: nothing undocumented, except map entries and the one
    // message wire.md describes inline ({1 `do_not_cache` bool}).
    for desc in pool.all_messages() {
        let full = desc.full_name();
        if desc.is_map_entry() || full.starts_with("google.protobuf.") {
            continue;
        }
        if full == "envoy.service.discovery.v3.Resource.CacheControl" {
            assert_eq!(desc.get_field_by_name("do_not_cache").unwrap().number(), 1);
            continue;
        }
        assert!(documented.contains(full), "{full} has no table in wire.md");
        for f in desc.fields() {
            assert!(
                tables
                    .fields
                    .iter()
                    .any(|(m, n, name)| m == full && *n == f.number() as i32 && name == f.name()),
                "{full}.{} (#{}) is not in wire.md",
                f.name(),
                f.number()
            );
        }
    }
    assert!(checked > 100, "only {checked} fields compared");
    // Enums: the same values by name and number, in both directions.
    assert!(
        tables.enums.len() >= 13,
        "parsed {} enums",
        tables.enums.len()
    );
    for (name, values) in &tables.enums {
        let desc = pool
            .get_enum_by_name(name)
            .unwrap_or_else(|| panic!("wire.md's enum {name} is missing from our files"));
        let ours: BTreeMap<String, i32> = desc
            .values()
            .map(|v| (v.name().to_owned(), v.number()))
            .collect();
        assert_eq!(&ours, values, "enum {name}");
    }
}
