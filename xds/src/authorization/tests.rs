//! Conversion of every field, every rejection reason with its field path, the stand-in's
//! choice of action, scope and dry-run, and the handler on a real [`Store`].

use std::net::SocketAddr;

use identity::Identity;
use ipnet::IpNet;

use super::*;
use crate::policy::{Connection, Peer, Reason};
use crate::proto::istio::workload as wl;
use crate::workload::Workload;
use pb::string_match::MatchType;

fn sm(kind: MatchType) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(kind),
    }
}
fn exact(s: &str) -> pb::StringMatch {
    sm(MatchType::Exact(s.into()))
}
fn addr(bytes: &[u8], length: u32) -> pb::Address {
    pb::Address {
        address: bytes.to_vec(),
        length,
    }
}
fn sa(ns: &str, name: &str) -> pb::ServiceAccountMatch {
    pb::ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    }
}
fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// `demo/p`, NAMESPACE, ALLOW, one rule of one clause holding `matches`.
fn message(matches: Vec<pb::Match>) -> pb::Authorization {
    pb::Authorization {
        name: "p".into(),
        namespace: "demo".into(),
        scope: pb::Scope::Namespace as i32,
        action: pb::Action::Allow as i32,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause { matches }],
        }],
        ..Default::default()
    }
}

/// A match that sets only destination port 80.
fn port80() -> pb::Match {
    pb::Match {
        destination_ports: vec![80],
        ..Default::default()
    }
}

fn full_match() -> pb::Match {
    let v6 = "2001:2::".parse::<std::net::Ipv6Addr>().unwrap().octets();
    pb::Match {
        namespaces: vec![exact("demo"), sm(MatchType::Prefix("team-".into()))],
        not_namespaces: vec![
            sm(MatchType::Suffix("-system".into())),
            sm(MatchType::Presence(())),
        ],
        service_accounts: vec![sa("demo", "client")],
        not_service_accounts: vec![sa("kube-system", "default")],
        principals: vec![exact("cluster.local/ns/demo/sa/client")],
        not_principals: vec![sm(MatchType::Suffix("/sa/untrusted".into()))],
        source_ips: vec![addr(&[198, 18, 0, 0], 24), addr(&v6, 48)],
        not_source_ips: vec![addr(&[198, 18, 0, 66], 32)],
        destination_ips: vec![addr(&[198, 18, 1, 3], 32)],
        not_destination_ips: vec![addr(&[198, 18, 2, 0], 28)],
        destination_ports: vec![8080, 65535],
        not_destination_ports: vec![22],
        extensions: vec![wl::Extension {
            name: "example.com/ext".into(),
            config: None,
        }],
    }
}

#[test]
fn every_field_converts() {
    let mut a = message(vec![full_match(), port80()]);
    a.scope = pb::Scope::WorkloadSelector as i32;
    a.action = pb::Action::Deny as i32;
    a.dry_run = true;
    a.rules.push(pb::Rule {
        clauses: vec![pb::Clause::default()],
    });
    a.rules.push(pb::Rule::default());
    let got = decode("demo/p", &a).unwrap();

    let mut want = Policy::new("demo", "p", Scope::WorkloadSelector, Action::Deny);
    want.dry_run = true;
    want.rules = vec![
        Rule {
            clauses: vec![Clause {
                matches: vec![
                    Match {
                        namespaces: vec![
                            StringMatch::Exact("demo".into()),
                            StringMatch::Prefix("team-".into()),
                        ],
                        not_namespaces: vec![
                            StringMatch::Suffix("-system".into()),
                            StringMatch::Presence,
                        ],
                        service_accounts: vec![ServiceAccountMatch {
                            namespace: "demo".into(),
                            service_account: "client".into(),
                        }],
                        not_service_accounts: vec![ServiceAccountMatch {
                            namespace: "kube-system".into(),
                            service_account: "default".into(),
                        }],
                        principals: vec![StringMatch::Exact(
                            "cluster.local/ns/demo/sa/client".into(),
                        )],
                        not_principals: vec![StringMatch::Suffix("/sa/untrusted".into())],
                        source_ips: vec![net("198.18.0.0/24"), net("2001:2::/48")],
                        not_source_ips: vec![net("198.18.0.66/32")],
                        destination_ips: vec![net("198.18.1.3/32")],
                        not_destination_ips: vec![net("198.18.2.0/28")],
                        destination_ports: vec![8080, 65535],
                        not_destination_ports: vec![22],
                    },
                    Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    },
                ],
            }],
        },
        Rule {
            clauses: vec![Clause::default()],
        },
        Rule::default(),
    ];
    assert_eq!(got, want);
    assert_eq!(got.rejection(), None);

    // Each enum value maps to its own variant.
    for (number, scope) in [
        (0, Scope::Global),
        (1, Scope::Namespace),
        (2, Scope::WorkloadSelector),
    ] {
        let mut a = message(vec![port80()]);
        a.scope = number;
        assert_eq!(decode("demo/p", &a).unwrap().scope, scope);
    }
    let mut a = message(vec![port80()]);
    a.action = 0;
    assert_eq!(decode("demo/p", &a).unwrap().action, Action::Allow);
}

/// The error for `message([m])`, as (field, problem).
fn reject_match(m: pb::Match) -> (String, Problem) {
    match decode("demo/p", &message(vec![port80(), m])).unwrap_err() {
        AuthorizationError::Invalid(e) => {
            assert_eq!(e.policy, "demo/p");
            (e.field, e.problem)
        }
        other => panic!("field error expected, got {other}"),
    }
}

const M: &str = "rules[0].clauses[0].matches[1]";

#[test]
fn every_match_problem_is_named_by_its_field_path() {
    let case = |m: pb::Match, field: &str, problem: Problem| {
        assert_eq!(reject_match(m), (format!("{M}.{field}"), problem));
    };
    case(
        pb::Match {
            source_ips: vec![addr(&[198, 18, 0, 0], 16), addr(&[198, 18, 0], 8)],
            ..Default::default()
        },
        "sourceIps[1].address",
        Problem::AddressLength(3),
    );
    case(
        pb::Match {
            not_source_ips: vec![addr(&[], 0)],
            ..Default::default()
        },
        "notSourceIps[0].address",
        Problem::AddressLength(0),
    );
    case(
        pb::Match {
            destination_ips: vec![addr(&[198, 18, 0, 0], 33)],
            ..Default::default()
        },
        "destinationIps[0].length",
        Problem::PrefixLength {
            address: "198.18.0.0".parse().unwrap(),
            length: 33,
            max: 32,
        },
    );
    case(
        pb::Match {
            not_destination_ips: vec![addr(
                &[0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                129,
            )],
            ..Default::default()
        },
        "notDestinationIps[0].length",
        Problem::PrefixLength {
            address: "2001:2::".parse().unwrap(),
            length: 129,
            max: 128,
        },
    );
    case(
        pb::Match {
            destination_ports: vec![80, 0],
            ..Default::default()
        },
        "destinationPorts[1]",
        Problem::PortZero,
    );
    case(
        pb::Match {
            not_destination_ports: vec![65536],
            ..Default::default()
        },
        "notDestinationPorts[0]",
        Problem::PortOutOfRange(65536),
    );
    let no_kind = pb::StringMatch { match_type: None };
    for (i, field) in ["namespaces", "notNamespaces", "principals", "notPrincipals"]
        .into_iter()
        .enumerate()
    {
        let mut m = pb::Match::default();
        let list = match i {
            0 => &mut m.namespaces,
            1 => &mut m.not_namespaces,
            2 => &mut m.principals,
            _ => &mut m.not_principals,
        };
        *list = vec![sm(MatchType::Presence(())), no_kind.clone()];
        case(m, &format!("{field}[1]"), Problem::NoMatchKind);
    }
    case(
        pb::Match {
            namespaces: vec![exact("")],
            ..Default::default()
        },
        "namespaces[0]",
        Problem::EmptyValue("exact"),
    );
    case(
        pb::Match {
            principals: vec![exact("spiffe://cluster.local/ns/demo/sa/x")],
            ..Default::default()
        },
        "principals[0]",
        Problem::SpiffePrefix("spiffe://cluster.local/ns/demo/sa/x".into()),
    );
    case(
        pb::Match {
            service_accounts: vec![sa("", "client")],
            ..Default::default()
        },
        "serviceAccounts[0].namespace",
        Problem::EmptyServiceAccountPart,
    );
    case(
        pb::Match {
            not_service_accounts: vec![sa("demo", "")],
            ..Default::default()
        },
        "notServiceAccounts[0].serviceAccount",
        Problem::EmptyServiceAccountPart,
    );
    // Nothing set, or only opaque extensions: refused, not skipped.
    assert_eq!(
        reject_match(pb::Match::default()),
        (M.to_owned(), Problem::EmptyMatch)
    );
    let only_extensions = pb::Match {
        extensions: full_match().extensions,
        ..Default::default()
    };
    assert_eq!(
        reject_match(only_extensions),
        (M.to_owned(), Problem::EmptyMatch)
    );
}

#[test]
fn policy_level_problems_name_the_field() {
    let field_of = |a: &pb::Authorization, name: &str| match decode(name, a).unwrap_err() {
        AuthorizationError::Invalid(e) => (e.field, e.problem),
        other => panic!("field error expected, got {other}"),
    };
    let mut a = message(vec![port80()]);
    a.scope = 99;
    assert_eq!(
        field_of(&a, "demo/p"),
        ("scope".into(), Problem::UnknownScope(99))
    );
    let mut a = message(vec![port80()]);
    a.action = -1;
    assert_eq!(
        field_of(&a, "demo/p"),
        ("action".into(), Problem::UnknownAction(-1))
    );
    let mut a = message(vec![port80()]);
    a.name.clear();
    assert_eq!(
        field_of(&a, "demo/"),
        ("name".into(), Problem::Name("it is empty".into()))
    );
    let mut a = message(vec![port80()]);
    a.namespace.clear();
    assert_eq!(
        field_of(&a, "/p"),
        ("namespace".into(), Problem::Namespace("it is empty".into()))
    );
    let mut a = message(vec![port80()]);
    a.namespace = "Demo!".into();
    assert!(matches!(field_of(&a, "Demo!/p").1, Problem::Namespace(_)));

    // The resource name must be the message's own namespace/name.
    let e = decode("demo/other", &message(vec![port80()])).unwrap_err();
    assert_eq!(
        e,
        AuthorizationError::Name {
            name: "demo/other".into(),
            own: "demo/p".into(),
        }
    );
    assert_eq!(
        e.to_string(),
        "resource name \"demo/other\" does not match the policy's own namespace/name \"demo/p\""
    );
    // Whole reasons name the policy, the field and the problem.
    let mut a = message(vec![port80()]);
    a.rules[0].clauses[0].matches[0].destination_ports = vec![70000];
    assert_eq!(
        decode("demo/p", &a).unwrap_err().to_string(),
        "authorization policy demo/p: rules[0].clauses[0].matches[0].destinationPorts[0]: \
         port 70000 is out of range 1-65535"
    );
}

fn rejected(name: &str, a: &pb::Authorization, previous: Option<&Policy>) -> Policy {
    let e = decode(name, a).unwrap_err();
    stand_in(name, a, previous, &e).unwrap()
}

#[test]
fn stand_ins_are_at_least_as_strict_as_either_version() {
    let bad = |scope: i32, action: i32, dry_run: bool| {
        let mut a = message(vec![pb::Match::default()]);
        a.scope = scope;
        a.action = action;
        a.dry_run = dry_run;
        a
    };
    // Readable fields are kept; the reason is carried.
    let p = rejected("demo/p", &bad(2, 1, false), None);
    assert_eq!(
        (p.scope, p.action, p.dry_run, p.rules.len()),
        (Scope::WorkloadSelector, Action::Deny, false, 0)
    );
    assert!(p.rejection().unwrap().contains("sets no condition"));
    let p = rejected("demo/p", &bad(0, 0, true), None);
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::Global, Action::Allow, true)
    );
    // Unreadable action: DENY; unreadable scope: the policy's namespace.
    let p = rejected("demo/p", &bad(99, 99, false), None);
    assert_eq!((p.scope, p.action), (Scope::Namespace, Action::Deny));
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("demo", "p"));

    // An earlier enforced global DENY stays an enforced global DENY.
    let mut earlier = Policy::new("demo", "p", Scope::Global, Action::Deny);
    earlier.rules.push(Rule::default());
    let p = rejected("demo/p", &bad(2, 0, true), Some(&earlier));
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::Global, Action::Deny, false)
    );
    // A narrower earlier version does not narrow the broken one.
    let earlier = Policy::new("demo", "p", Scope::WorkloadSelector, Action::Allow);
    let p = rejected("demo/p", &bad(1, 0, false), Some(&earlier));
    assert_eq!((p.scope, p.action), (Scope::Namespace, Action::Allow));

    // Stored under the resource name, even when the message names itself otherwise.
    let mut a = message(vec![port80()]);
    a.name = "q".into();
    let p = rejected("demo/p", &a, None);
    assert_eq!(p.key(), "demo/p");
    // No `namespace/name` form: nothing can be stored under it.
    let e = decode("p", &a).unwrap_err();
    assert_eq!(stand_in("p", &a, None, &e), None);
}

fn echo(policies: &[&str]) -> Workload {
    let id = Identity::new("cluster.local", "demo", "echo").unwrap();
    let mut w = Workload::new("demo/echo", "echo", id);
    w.addresses = vec!["198.18.1.3".parse().unwrap()];
    w.authorization_policies = policies.iter().map(|s| s.to_string()).collect();
    w
}

fn conn(port: u16) -> Connection {
    Connection {
        src: "198.18.0.2:40000".parse::<SocketAddr>().unwrap(),
        dst: SocketAddr::from(([198, 18, 1, 3], port)),
        peer: Some(std::sync::Arc::new(Peer::new(
            "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap(),
        ))),
    }
}

fn update(name: &str, a: pb::Authorization) -> Update<pb::Authorization> {
    Update {
        name: name.into(),
        resource: a,
    }
}

#[test]
fn the_store_applies_good_policies_and_fails_closed_on_bad_ones() {
    let store = Store::default();
    store.update(|s| s.upsert_workload(echo(&[])));
    let decide = |port| store.read(|s| s.authorize("demo/echo", &conn(port)));

    // DENY port 80 in the namespace.
    let mut deny80 = message(vec![port80()]);
    deny80.name = "deny80".into();
    deny80.action = pb::Action::Deny as i32;
    let rejections = Handler::apply(&store, vec![update("demo/deny80", deny80.clone())], &[]);
    assert_eq!(rejections, []);
    assert!(!decide(80).is_allowed());
    assert!(decide(8080).is_allowed());

    // A broken update of it is NACKed by name and denies everything instead of nothing.
    let mut broken = deny80.clone();
    broken.rules[0].clauses[0].matches[0].source_ips = vec![addr(&[1, 2, 3, 4, 5], 32)];
    let rejections = Handler::apply(
        &store,
        vec![
            update("demo/deny80", broken),
            update("demo/ok", {
                let mut a = message(vec![port80()]);
                a.name = "ok".into();
                a
            }),
        ],
        &[],
    );
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].name, "demo/deny80");
    assert!(
        rejections[0]
            .reason
            .contains("rules[0].clauses[0].matches[0].sourceIps[0].address"),
        "{}",
        rejections[0].reason
    );
    let got = decide(8080);
    assert!(
        matches!(&got.reason, Reason::Rejected { policy, .. } if policy == "demo/deny80"),
        "{got:?}"
    );
    // The good policy of the same response was applied.
    assert!(store.read(|s| s.policies().get("demo/ok").is_some()));

    // A removal removes the stand-in; the ALLOW `demo/ok` (port 80) now decides.
    Handler::<pb::Authorization>::apply(&store, Vec::new(), &["demo/deny80".to_owned()]);
    assert!(store.read(|s| s.policies().get("demo/deny80").is_none()));
    assert!(decide(80).is_allowed());
    assert!(!decide(8080).is_allowed());

    // A broken ALLOW allows nothing, whatever it meant to allow.
    let mut broken_allow = message(vec![port80()]);
    broken_allow.name = "ok".into();
    broken_allow.rules[0].clauses[0].matches[0].destination_ports = vec![80, 0];
    let rejections = Handler::apply(&store, vec![update("demo/ok", broken_allow)], &[]);
    assert_eq!(rejections.len(), 1);
    assert_eq!(
        decide(80).reason,
        Reason::NoAllowMatched { allow_policies: 1 }
    );
    // Removing a name that is not held is ignored.
    Handler::<pb::Authorization>::apply(&store, Vec::new(), &["demo/none".to_owned()]);
    assert_eq!(store.read(|s| s.policies().len()), 1);
}
