//! The local mesh file: what loads, and how every kind of mistake is reported.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use xds::local::{self, LoadError, Problem};
use xds::{Destination, TunnelProtocol, WorkloadStatus};

const SERVICE: &str = "
services:
  - name: echo
    namespace: demo
    hostname: echo.demo.svc.cluster.local
    addresses: [127.0.10.1]
    ports: [{servicePort: 80, targetPort: 8080}]
";

/// A minimal valid workload entry, to append fields to.
fn workload(name: &str, ip: &str) -> String {
    format!("  - name: {name}\n    namespace: demo\n    node: node-a\n    addresses: [{ip}]\n")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn empty_text_is_an_empty_mesh() {
    for text in [
        "",
        "{}",
        "---\n",
        "# nothing yet\n",
        "services:\nworkloads:\n",
        "workloads: []\n",
    ] {
        let mesh = local::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(
            mesh.workloads.is_empty() && mesh.services.is_empty(),
            "{text:?}"
        );
    }
}

#[test]
fn every_field_is_read_and_defaults_follow_istio() {
    let text = format!(
        "{SERVICE}    subjectAltNames: [spiffe://td.example/ns/demo/sa/extra]
  - name: other
    namespace: demo
    hostname: other.demo.svc.cluster.local
    addresses:
      - {{network: east, address: \"2001:2::10\"}}
      - 127.0.10.2
workloads:
  - uid: cluster1//Pod/demo/echo-1
    name: echo-1
    namespace: demo
    serviceAccount: echo
    trustDomain: td.example
    addresses: [127.0.0.3, \"::3\"]
    node: node-b
    network: east
    tunnelProtocol: HBONE
    status: UNHEALTHY
    services:
      demo/echo.demo.svc.cluster.local:
        ports: [{{servicePort: 80, targetPort: 9090}}, {{servicePort: 81}}]
    authorizationPolicies: [demo/allow-client]
    netns: /var/run/netns/pod-b
{}policies:
  - {{name: allow-client, namespace: demo, scope: WORKLOAD_SELECTOR}}
",
        workload("plain", "127.0.0.4")
    );
    let mesh = local::parse(&text).unwrap();

    let echo = &mesh.services[0];
    assert_eq!(echo.key(), "demo/echo.demo.svc.cluster.local");
    assert_eq!(echo.addresses[0].network, "");
    assert_eq!(echo.addresses[0].address, ip("127.0.10.1"));
    assert_eq!(
        (echo.ports[0].service_port, echo.ports[0].target_port),
        (80, 8080)
    );
    assert_eq!(
        echo.subject_alt_names[0].to_string(),
        "spiffe://td.example/ns/demo/sa/extra"
    );
    let other = &mesh.services[1];
    assert_eq!(other.addresses[0].network, "east");
    assert_eq!(other.addresses[0].address, ip("2001:2::10"));
    assert!(other.ports.is_empty());

    let w = &mesh.workloads[0];
    assert_eq!(w.uid, "cluster1//Pod/demo/echo-1");
    assert_eq!(w.name, "echo-1");
    assert_eq!(
        w.identity().to_string(),
        "spiffe://td.example/ns/demo/sa/echo"
    );
    assert_eq!(w.addresses, [ip("127.0.0.3"), ip("::3")]);
    assert_eq!(w.node, "node-b");
    assert_eq!(w.network, "east");
    assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone);
    assert_eq!(w.status, WorkloadStatus::Unhealthy);
    assert_eq!(
        w.target_port("demo/echo.demo.svc.cluster.local", 80),
        Some(9090)
    );
    assert_eq!(w.target_port("demo/echo.demo.svc.cluster.local", 81), None);
    assert_eq!(w.authorization_policies, ["demo/allow-client"]);
    assert_eq!(w.netns.as_deref(), Some(Path::new("/var/run/netns/pod-b")));

    let plain = &mesh.workloads[1];
    assert_eq!(plain.uid, "demo/plain");
    assert_eq!(
        plain.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/default"
    );
    assert_eq!(plain.network, "");
    assert_eq!(plain.tunnel_protocol, TunnelProtocol::None);
    assert_eq!(plain.status, WorkloadStatus::Healthy);
    assert!(plain.services.is_empty() && plain.netns.is_none());
}

#[test]
fn one_ip_may_be_used_once_per_network() {
    let text = format!(
        "workloads:\n{}    network: east\n{}",
        workload("a", "198.18.0.1"),
        workload("b", "198.18.0.1")
    );
    let state = local::parse(&text).unwrap().into_state();
    assert_eq!(
        state.workload_by_ip("east", ip("198.18.0.1")).unwrap().name,
        "a"
    );
    assert_eq!(
        state.workload_by_ip("", ip("198.18.0.1")).unwrap().name,
        "b"
    );
}

#[test]
fn the_example_mesh_file_loads_and_resolves() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let mesh = local::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let state = mesh.into_state();

    let client = state.workload_by_ip("", ip("127.0.0.2")).unwrap();
    assert_eq!(
        client.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(client.tunnel_protocol, TunnelProtocol::Hbone);
    assert_eq!(state.workloads_on_node("node-a").len(), 1);

    let vip: SocketAddr = "127.0.10.1:80".parse().unwrap();
    match state.resolve("", vip) {
        Destination::Service {
            service,
            workload,
            target_port,
        } => {
            assert_eq!(service.hostname, "echo.demo.svc.cluster.local");
            assert_eq!(
                workload.identity().to_string(),
                "spiffe://cluster.local/ns/demo/sa/echo"
            );
            assert_eq!(workload.node, "node-b");
            assert_eq!(workload.addresses, [ip("127.0.0.3")]);
            assert_eq!(target_port, 8080);
        }
        other => panic!("expected the echo service, got {other:?}"),
    }
}

#[test]
fn a_missing_file_is_a_read_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.yaml");
    let err = local::load(&path).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("absent.yaml"), "{message}");
    assert!(message.contains("cannot read mesh file"), "{message}");
}

/// One invalid input: the text, the field path the error must name, and the
/// words that must describe the problem.
struct Case {
    kind: &'static str,
    text: String,
    field: &'static str,
    problem: &'static [&'static str],
}

fn case(
    kind: &'static str,
    text: impl Into<String>,
    field: &'static str,
    problem: &'static [&'static str],
) -> Case {
    Case {
        kind,
        text: text.into(),
        field,
        problem,
    }
}

fn invalid_cases() -> Vec<Case> {
    let svc = SERVICE;
    let ok = workload("a", "127.0.0.2");
    vec![
        case(
            "YAML syntax",
            "workloads: [\n",
            "workloads",
            &["unclosed bracket"],
        ),
        case(
            "two documents",
            "workloads: []\n---\nservices: []\n",
            "",
            &["single YAML document"],
        ),
        case(
            "top level not a mapping",
            "- a\n",
            "",
            &["expected mapping"],
        ),
        case(
            "wrong type",
            "workloads: 3\n",
            "workloads",
            &["expected sequence"],
        ),
        case(
            "unknown top-level field",
            "policy: []\n",
            "policy",
            &["unknown field `policy`", "policies"],
        ),
        case(
            "unknown workload field",
            format!("workloads:\n{ok}    serviceAcount: a\n"),
            "workloads[0].serviceAcount",
            &["unknown field `serviceAcount`", "serviceAccount"],
        ),
        case(
            "unknown VIP field",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, addresses: [{addr: 127.0.10.1}]}\n",
            "services[0].addresses[0].addr",
            &["unknown field `addr`", "network, address"],
        ),
        case(
            "missing required field",
            "workloads:\n  - name: a\n    namespace: demo\n",
            "workloads[0]",
            &["missing field `node`"],
        ),
        case(
            "missing service port",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, ports: [{targetPort: 80}]}\n",
            "services[0].ports[0]",
            &["missing field `servicePort`"],
        ),
        case(
            "bad workload IP",
            format!("workloads:\n{}", workload("a", "127.0.0.300")),
            "workloads[0].addresses[0]",
            &["\"127.0.0.300\" is not an IPv4 or IPv6 address"],
        ),
        case(
            "bad VIP",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, addresses: [vip]}\n",
            "services[0].addresses[0]",
            &["\"vip\" is not an IPv4 or IPv6 address"],
        ),
        case(
            "bad VIP in the long form",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, addresses: [{network: n, address: \"::g\"}]}\n",
            "services[0].addresses[0].address",
            &["\"::g\" is not an IPv4 or IPv6 address"],
        ),
        case(
            "bad tunnel protocol",
            format!("workloads:\n{ok}    tunnelProtocol: hbone\n"),
            "workloads[0].tunnelProtocol",
            &["unknown variant `hbone`", "NONE", "HBONE"],
        ),
        case(
            "bad status",
            format!("workloads:\n{ok}    status: READY\n"),
            "workloads[0].status",
            &["unknown variant `READY`", "HEALTHY", "UNHEALTHY"],
        ),
        case(
            "port 0",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, ports: [{servicePort: 0}]}\n",
            "services[0].ports[0].servicePort",
            &["port 0 is out of range 1-65535"],
        ),
        case(
            "port above 65535",
            format!(
                "{svc}workloads:\n{ok}    services:\n      demo/echo.demo.svc.cluster.local:\n        ports: [{{servicePort: 80, targetPort: 65536}}]\n"
            ),
            "workloads[0].services[\"demo/echo.demo.svc.cluster.local\"].ports[0].targetPort",
            &["port 65536 is out of range 1-65535"],
        ),
        case(
            "negative port",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, ports: [{servicePort: -80}]}\n",
            "services[0].ports[0].servicePort",
            &["port -80 is out of range 1-65535"],
        ),
        case(
            "port not a number",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, ports: [{servicePort: http}]}\n",
            "services[0].ports[0].servicePort",
            &["\"http\"", "expected a port number (1-65535)"],
        ),
        case(
            "duplicate uid",
            format!(
                "workloads:\n{ok}    uid: pod-1\n{}    uid: pod-1\n",
                workload("b", "127.0.0.3")
            ),
            "workloads[1].uid",
            &["workload uid \"pod-1\" is already used by workloads[0]"],
        ),
        case(
            "duplicate default uid",
            format!("workloads:\n{ok}{}", workload("a", "127.0.0.3")),
            "workloads[1]",
            &["workload uid \"demo/a\" is already used by workloads[0]"],
        ),
        case(
            "duplicate IP in a network",
            format!(
                "workloads:\n{ok}{}",
                workload("b", "[127.0.0.9, 127.0.0.2]")
                    .replace("[[", "[")
                    .replace("]]", "]")
            ),
            "workloads[1].addresses[1]",
            &[
                "address 127.0.0.2",
                "workload \"demo/b\"",
                "already used by workload \"demo/a\" at workloads[0].addresses[0]",
            ],
        ),
        case(
            "workload address is a VIP",
            format!("{svc}workloads:\n{}", workload("a", "127.0.10.1")),
            "workloads[0].addresses[0]",
            &[
                "address 127.0.10.1",
                "workload \"demo/a\"",
                "VIP of service \"demo/echo.demo.svc.cluster.local\" at services[0].addresses[0]",
            ],
        ),
        case(
            "duplicate service",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo}\n  - {name: t, namespace: demo, hostname: s.demo}\n",
            "services[1]",
            &["service \"demo/s.demo\" is already defined by services[0]"],
        ),
        case(
            "duplicate VIP",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, addresses: [127.0.10.1]}\n  - {name: t, namespace: demo, hostname: t.demo, addresses: [{address: 127.0.10.1}]}\n",
            "services[1].addresses[0]",
            &[
                "VIP 127.0.10.1",
                "service \"demo/t.demo\"",
                "already used by service \"demo/s.demo\" at services[0].addresses[0]",
            ],
        ),
        case(
            "unknown service reference",
            format!(
                "{svc}workloads:\n{ok}    services:\n      demo/echo.demo.svc.cluster.local: {{}}\n      demo/echo.demo.svc:\n        ports: []\n"
            ),
            "workloads[0].services[\"demo/echo.demo.svc\"]",
            &["service \"demo/echo.demo.svc\" is not defined"],
        ),
        case(
            "service key not namespace/hostname",
            format!(
                "{svc}workloads:\n{ok}    services:\n      echo.demo.svc.cluster.local: {{}}\n"
            ),
            "workloads[0].services[\"echo.demo.svc.cluster.local\"]",
            &["\"echo.demo.svc.cluster.local\" is not of the form namespace/hostname"],
        ),
        case(
            "service port listed twice",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, ports: [{servicePort: 80}, {servicePort: 80, targetPort: 8080}]}\n",
            "services[0].ports[1].servicePort",
            &["service port 80 is listed twice, first at services[0].ports[0]"],
        ),
        case(
            "workload port listed twice",
            format!(
                "{svc}workloads:\n{ok}    services:\n      demo/echo.demo.svc.cluster.local:\n        ports: [{{servicePort: 80}}, {{servicePort: 80}}]\n"
            ),
            "workloads[0].services[\"demo/echo.demo.svc.cluster.local\"].ports[1].servicePort",
            &["service port 80 is listed twice"],
        ),
        case(
            "empty name",
            "workloads:\n  - {name: \"\", namespace: demo, node: n}\n",
            "workloads[0].name",
            &["must not be empty"],
        ),
        case(
            "empty namespace",
            "services:\n  - {name: s, namespace: \"\", hostname: s.demo}\n",
            "services[0].namespace",
            &["must not be empty"],
        ),
        case(
            "empty node",
            "workloads:\n  - {name: a, namespace: demo, node: \"\"}\n",
            "workloads[0].node",
            &["must not be empty"],
        ),
        case(
            "empty hostname",
            "services:\n  - {name: s, namespace: demo, hostname: \"\"}\n",
            "services[0].hostname",
            &["must not be empty"],
        ),
        case(
            "null name",
            "workloads:\n  - {name: ~, namespace: demo, node: n}\n",
            "workloads[0].name",
            &["null"],
        ),
        case(
            "invalid namespace",
            "workloads:\n  - {name: a, namespace: demo ns, node: n}\n",
            "workloads[0].namespace",
            &["namespace \"demo ns\" is invalid", "only letters, digits"],
        ),
        case(
            "invalid service account",
            format!("workloads:\n{ok}    serviceAccount: sa/x\n"),
            "workloads[0].serviceAccount",
            &["service account \"sa/x\" is invalid"],
        ),
        case(
            "invalid trust domain",
            format!("workloads:\n{ok}    trustDomain: Cluster.Local\n"),
            "workloads[0].trustDomain",
            &["trust domain \"Cluster.Local\" is invalid", "lower-case"],
        ),
        case(
            "invalid subjectAltNames entry",
            "services:\n  - {name: s, namespace: demo, hostname: s.demo, subjectAltNames: [\"spiffe://cluster.local/ns/demo\"]}\n",
            "services[0].subjectAltNames[0]",
            &["\"spiffe://cluster.local/ns/demo\"", "must have the form"],
        ),
        case(
            "relative netns",
            format!("workloads:\n{ok}    netns: pod-a\n"),
            "workloads[0].netns",
            &["path \"pod-a\" is not absolute"],
        ),
    ]
}

#[test]
fn each_invalid_input_names_the_field_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (n, c) in invalid_cases().iter().enumerate() {
        let err = match local::parse(&c.text) {
            Ok(mesh) => panic!("{}: accepted: {mesh:?}", c.kind),
            Err(err) => err,
        };
        let invalid = err
            .invalid()
            .unwrap_or_else(|| panic!("{}: not an invalid-mesh error: {err:?}", c.kind));
        assert_eq!(invalid.field, c.field, "{}: wrong field in {err}", c.kind);
        let message = err.to_string();
        if !c.field.is_empty() {
            assert!(
                message.contains(&format!(": {}: ", c.field)),
                "{}: {message}",
                c.kind
            );
        }
        for words in c.problem {
            assert!(
                message.contains(words),
                "{}: {message:?} lacks {words:?}",
                c.kind
            );
        }

        // From a file, the same error also names the file.
        let path = dir.path().join(format!("case-{n}.yaml"));
        std::fs::write(&path, &c.text).unwrap();
        let from_file = local::load(&path).unwrap_err().to_string();
        assert!(
            from_file.starts_with(&path.display().to_string()),
            "{}: {from_file}",
            c.kind
        );
        assert!(
            from_file.ends_with(&message[message.find(": ").unwrap()..]),
            "{}: {from_file}",
            c.kind
        );
    }
}

#[test]
fn parser_errors_carry_line_and_column() {
    let text = format!("workloads:\n{}", workload("a", "127.0.0.300"));
    let err = local::parse(&text).unwrap_err();
    let position = err.invalid().unwrap().position.unwrap();
    assert_eq!((position.line, position.column), (5, 17));
    assert!(
        err.to_string().starts_with("mesh file line 5, column 17: "),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "services: []\nworkloads: [\n").unwrap();
    let message = local::load(&path).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("{}:2:", path.display())),
        "{message}"
    );
}

#[test]
fn cross_entry_errors_point_at_the_later_entry() {
    let text = format!(
        "workloads:\n{}{}",
        workload("a", "127.0.0.2"),
        workload("b", "127.0.0.2")
    );
    let err = local::parse(&text).unwrap_err();
    let invalid = err.invalid().unwrap();
    assert!(
        matches!(invalid.problem, Problem::DuplicateAddress { .. }),
        "{err}"
    );
    // The second workload's address is on line 9.
    assert_eq!(invalid.position.map(|p| p.line), Some(9), "{err}");
}

#[test]
fn an_edit_is_taken_once_two_reads_agree() {
    let read = |s: &str| Some(s.as_bytes().to_vec());
    let mut settle = local::Settle::new(read("a"));
    assert!(!settle.offer(read("a")), "the content in force is no edit");
    assert!(!settle.pending());
    // A torn read (truncated), then the finished write of the same content: nothing to take.
    assert!(!settle.offer(read("")));
    assert!(settle.pending());
    assert!(!settle.offer(read("a")));
    assert!(!settle.pending());
    // A new content is taken on its second read, and only once.
    assert!(!settle.offer(read("b")));
    assert!(settle.offer(read("b")));
    assert_eq!(settle.taken(), Some(&b"b"[..]));
    assert!(!settle.offer(read("b")));
    // Reads that keep changing are never taken; an unreadable file settles like content.
    for s in ["c", "d", "e"] {
        assert!(!settle.offer(read(s)));
    }
    assert!(!settle.offer(None));
    assert!(settle.offer(None));
    assert_eq!(settle.taken(), None);
    // Starting from nothing (a follower's first reads), the first settled read is taken.
    let mut fresh = local::Settle::default();
    assert!(!fresh.offer(read("a")));
    assert!(fresh.offer(read("a")));
}

#[test]
fn parse_file_names_the_file_and_refuses_text_that_is_not_utf8() {
    let path = Path::new("/etc/mesh.yaml");
    let e = local::parse_file(path, b"workloads: [\n").unwrap_err();
    assert!(e.to_string().contains("/etc/mesh.yaml:"), "{e}");
    let e = local::parse_file(path, b"workloads: \xff\n").unwrap_err();
    assert!(matches!(e, LoadError::Read { .. }), "{e}");
    assert!(e.to_string().contains("/etc/mesh.yaml"), "{e}");
}
