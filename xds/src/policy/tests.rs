//! Evaluation tables (every match field and its negation, each string-match kind, CIDR
//! edges in both families, scopes, deny-over-allow, the default, dry-run, plaintext peers,
//! rejected policies), the index, and validation reasons.

use std::net::SocketAddr;

use identity::Identity;

use super::*;
use crate::state::State;
use crate::workload::Workload;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    wire::parse_cidr(s).unwrap()
}

/// `src` → `dst` with the peer `id` (`None`: plaintext).
fn conn(src: &str, dst: &str, id: Option<&str>) -> Connection {
    Connection {
        src: addr(src),
        dst: addr(dst),
        peer: id.map(|i| Arc::new(Peer::new(i.parse().unwrap()))),
    }
}

/// The usual connection: `client` from 198.18.0.2 to the echo workload's 198.18.1.3:8080.
fn mtls() -> Connection {
    conn("198.18.0.2:40000", "198.18.1.3:8080", Some(CLIENT))
}

fn plaintext() -> Connection {
    conn("198.18.0.2:40000", "198.18.1.3:8080", None)
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}
fn prefix(s: &str) -> StringMatch {
    StringMatch::Prefix(s.into())
}
fn suffix(s: &str) -> StringMatch {
    StringMatch::Suffix(s.into())
}
fn sa(ns: &str, name: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    }
}

/// A policy with one rule of one clause holding `matches`.
fn policy(name: &str, action: Action, matches: Vec<Match>) -> Policy {
    let mut p = Policy::new("demo", name, Scope::Namespace, action);
    p.rules.push(Rule {
        clauses: vec![Clause { matches }],
    });
    p
}

#[test]
fn every_match_field_its_negation_and_each_string_kind() {
    let m = Match::default;
    #[rustfmt::skip]
    let cases: Vec<(&str, Match, Connection, bool)> = vec![
        // namespaces: each string-match kind, both outcomes, and the negation.
        ("ns exact", Match { namespaces: vec![exact("demo")], ..m() }, mtls(), true),
        ("ns exact other", Match { namespaces: vec![exact("prod")], ..m() }, mtls(), false),
        ("ns prefix", Match { namespaces: vec![prefix("de")], ..m() }, mtls(), true),
        ("ns prefix other", Match { namespaces: vec![prefix("emo")], ..m() }, mtls(), false),
        ("ns suffix", Match { namespaces: vec![suffix("mo")], ..m() }, mtls(), true),
        ("ns suffix other", Match { namespaces: vec![suffix("de")], ..m() }, mtls(), false),
        ("ns presence", Match { namespaces: vec![StringMatch::Presence], ..m() }, mtls(), true),
        ("ns any of", Match { namespaces: vec![exact("prod"), exact("demo")], ..m() }, mtls(), true),
        ("not ns hit", Match { not_namespaces: vec![exact("demo")], ..m() }, mtls(), false),
        ("not ns miss", Match { not_namespaces: vec![exact("prod")], ..m() }, mtls(), true),
        ("not ns none of", Match { not_namespaces: vec![exact("prod"), prefix("d")], ..m() }, mtls(), false),
        // service accounts: namespace and name both count; the trust domain does not.
        ("sa", Match { service_accounts: vec![sa("demo", "client")], ..m() }, mtls(), true),
        ("sa other name", Match { service_accounts: vec![sa("demo", "echo")], ..m() }, mtls(), false),
        ("sa other ns", Match { service_accounts: vec![sa("prod", "client")], ..m() }, mtls(), false),
        ("sa any td", Match { service_accounts: vec![sa("demo", "client")], ..m() },
            conn("198.18.0.2:1", "198.18.1.3:8080", Some("spiffe://td.example/ns/demo/sa/client")), true),
        ("not sa hit", Match { not_service_accounts: vec![sa("demo", "client")], ..m() }, mtls(), false),
        ("not sa miss", Match { not_service_accounts: vec![sa("demo", "echo")], ..m() }, mtls(), true),
        // principals: compared without spiffe://.
        ("principal exact", Match { principals: vec![exact("cluster.local/ns/demo/sa/client")], ..m() }, mtls(), true),
        ("principal with scheme never matches", Match { principals: vec![exact(CLIENT)], ..m() }, mtls(), false),
        ("principal prefix", Match { principals: vec![prefix("cluster.local/ns/demo/")], ..m() }, mtls(), true),
        ("principal prefix other", Match { principals: vec![prefix("cluster.local/ns/prod/")], ..m() }, mtls(), false),
        ("principal suffix", Match { principals: vec![suffix("/sa/client")], ..m() }, mtls(), true),
        ("principal suffix other", Match { principals: vec![suffix("/sa/echo")], ..m() }, mtls(), false),
        ("principal presence", Match { principals: vec![StringMatch::Presence], ..m() }, mtls(), true),
        ("not principal hit", Match { not_principals: vec![suffix("/sa/client")], ..m() }, mtls(), false),
        ("not principal miss", Match { not_principals: vec![suffix("/sa/echo")], ..m() }, mtls(), true),
        // source IPs, v4 CIDR edges.
        ("src host", Match { source_ips: vec![net("198.18.0.2")], ..m() }, mtls(), true),
        ("src other host", Match { source_ips: vec![net("198.18.0.3/32")], ..m() }, mtls(), false),
        ("src /31 below", Match { source_ips: vec![net("198.18.0.0/31")], ..m() }, mtls(), false),
        ("src /31 containing", Match { source_ips: vec![net("198.18.0.2/31")], ..m() }, mtls(), true),
        ("src host bits ignored", Match { source_ips: vec![net("198.18.0.77/24")], ..m() }, mtls(), true),
        ("src /24 last", Match { source_ips: vec![net("198.18.0.0/24")], ..m() },
            conn("198.18.0.255:1", "198.18.1.3:8080", Some(CLIENT)), true),
        ("src /24 next", Match { source_ips: vec![net("198.18.0.0/24")], ..m() },
            conn("198.18.1.0:1", "198.18.1.3:8080", Some(CLIENT)), false),
        ("src /15 edge", Match { source_ips: vec![net("198.18.0.0/15")], ..m() },
            conn("198.19.255.255:1", "198.18.1.3:8080", Some(CLIENT)), true),
        ("src /15 past", Match { source_ips: vec![net("198.18.0.0/15")], ..m() },
            conn("198.20.0.0:1", "198.18.1.3:8080", Some(CLIENT)), false),
        ("src v4 /0", Match { source_ips: vec![net("0.0.0.0/0")], ..m() }, mtls(), true),
        ("src v4 /0 not v6", Match { source_ips: vec![net("0.0.0.0/0")], ..m() },
            conn("[2001:2::2]:1", "[2001:2::3]:8080", Some(CLIENT)), false),
        // source IPs, v6 CIDR edges.
        ("src v6 /48 last", Match { source_ips: vec![net("2001:2::/48")], ..m() },
            conn("[2001:2:0:ffff:ffff:ffff:ffff:ffff]:1", "[2001:2::3]:8080", Some(CLIENT)), true),
        ("src v6 /48 next", Match { source_ips: vec![net("2001:2::/48")], ..m() },
            conn("[2001:2:1::]:1", "[2001:2::3]:8080", Some(CLIENT)), false),
        ("src v6 host", Match { source_ips: vec![net("2001:2::2")], ..m() },
            conn("[2001:2::2]:1", "[2001:2::3]:8080", Some(CLIENT)), true),
        ("src v6 /127 neighbour", Match { source_ips: vec![net("2001:2::2/127")], ..m() },
            conn("[2001:2::4]:1", "[2001:2::3]:8080", Some(CLIENT)), false),
        ("src v6 /0 not v4", Match { source_ips: vec![net("::/0")], ..m() }, mtls(), false),
        ("not src hit", Match { not_source_ips: vec![net("198.18.0.0/24")], ..m() }, mtls(), false),
        ("not src miss", Match { not_source_ips: vec![net("198.19.0.0/16")], ..m() }, mtls(), true),
        ("not src v6 miss for v4", Match { not_source_ips: vec![net("::/0")], ..m() }, mtls(), true),
        // destination IPs.
        ("dst host", Match { destination_ips: vec![net("198.18.1.3")], ..m() }, mtls(), true),
        ("dst /30 edge", Match { destination_ips: vec![net("198.18.1.0/30")], ..m() }, mtls(), true),
        ("dst /30 past", Match { destination_ips: vec![net("198.18.1.4/30")], ..m() }, mtls(), false),
        ("dst v6 /64", Match { destination_ips: vec![net("2001:2::/64")], ..m() },
            conn("[2001:2::2]:1", "[2001:2::ffff]:8080", Some(CLIENT)), true),
        ("dst v6 /64 next", Match { destination_ips: vec![net("2001:2::/64")], ..m() },
            conn("[2001:2::2]:1", "[2001:2:0:1::]:8080", Some(CLIENT)), false),
        ("not dst hit", Match { not_destination_ips: vec![net("198.18.1.3")], ..m() }, mtls(), false),
        ("not dst miss", Match { not_destination_ips: vec![net("198.18.2.0/24")], ..m() }, mtls(), true),
        // destination ports.
        ("port", Match { destination_ports: vec![8080], ..m() }, mtls(), true),
        ("port other", Match { destination_ports: vec![80], ..m() }, mtls(), false),
        ("port any of", Match { destination_ports: vec![80, 8080], ..m() }, mtls(), true),
        ("not port hit", Match { not_destination_ports: vec![8080], ..m() }, mtls(), false),
        ("not port miss", Match { not_destination_ports: vec![80], ..m() }, mtls(), true),
        // Fields are AND-ed; positive and negative of one field both apply.
        ("and both", Match { destination_ports: vec![8080], principals: vec![suffix("/sa/client")], ..m() }, mtls(), true),
        ("and one fails", Match { destination_ports: vec![8080], principals: vec![suffix("/sa/echo")], ..m() }, mtls(), false),
        ("pos and neg", Match { namespaces: vec![prefix("d")], not_namespaces: vec![exact("demo")], ..m() }, mtls(), false),
        // A match with nothing in it never matches.
        ("empty match", m(), mtls(), false),
        // Plaintext: identity fields cannot hold; negations are satisfied; the rest works.
        ("plain ns presence", Match { namespaces: vec![StringMatch::Presence], ..m() }, plaintext(), false),
        ("plain ns prefix empty-free", Match { namespaces: vec![prefix("d")], ..m() }, plaintext(), false),
        ("plain sa", Match { service_accounts: vec![sa("demo", "client")], ..m() }, plaintext(), false),
        ("plain principal", Match { principals: vec![StringMatch::Presence], ..m() }, plaintext(), false),
        ("plain not ns", Match { not_namespaces: vec![exact("demo")], ..m() }, plaintext(), true),
        ("plain not sa", Match { not_service_accounts: vec![sa("demo", "client")], ..m() }, plaintext(), true),
        ("plain not principal", Match { not_principals: vec![StringMatch::Presence], ..m() }, plaintext(), true),
        ("plain src", Match { source_ips: vec![net("198.18.0.0/24")], ..m() }, plaintext(), true),
        ("plain port", Match { destination_ports: vec![8080], ..m() }, plaintext(), true),
        ("plain port and principal", Match { destination_ports: vec![8080], principals: vec![StringMatch::Presence], ..m() }, plaintext(), false),
    ];
    let mut failed = Vec::new();
    for (name, mat, conn, want) in cases {
        // As the only ALLOW: allowed exactly when it matches.
        let allow = policy("allow", Action::Allow, vec![mat.clone()]);
        let got = evaluate([&allow], &conn);
        if got.is_allowed() != want {
            failed.push(format!("ALLOW {name}: got {:?}", got.reason));
        }
        // As a DENY: denied exactly when it matches.
        let deny = policy("deny", Action::Deny, vec![mat]);
        let got = evaluate([&deny], &conn);
        if got.is_allowed() == want {
            failed.push(format!("DENY {name}: got {:?}", got.reason));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn rules_or_clauses_and_matches_or() {
    let port = |p| Match {
        destination_ports: vec![p],
        ..Match::default()
    };
    let clause = |ports: &[u16]| Clause {
        matches: ports.iter().map(|&p| port(p)).collect(),
    };
    let with = |rules: Vec<Vec<Clause>>| {
        let mut p = Policy::new("demo", "p", Scope::Namespace, Action::Allow);
        p.rules = rules.into_iter().map(|clauses| Rule { clauses }).collect();
        evaluate([&p], &mtls()).reason
    };
    let allowed = |rule| Reason::Allowed {
        policy: "demo/p".into(),
        rule,
    };
    let none = Reason::NoAllowMatched { allow_policies: 1 };
    #[rustfmt::skip]
    let cases = [
        ("no rules: allow nothing", with(vec![]), none.clone()),
        ("a rule without clauses matches all", with(vec![vec![]]), allowed(0)),
        ("an empty clause is true", with(vec![vec![Clause::default(), clause(&[8080])]]), allowed(0)),
        ("matches are OR-ed", with(vec![vec![clause(&[80, 8080])]]), allowed(0)),
        ("clauses are AND-ed", with(vec![vec![clause(&[8080]), clause(&[80])]]), none.clone()),
        ("rules are OR-ed; the first matching is named",
            with(vec![vec![clause(&[80])], vec![clause(&[8080])], vec![]]), allowed(1)),
    ];
    for (name, got, want) in cases {
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn deny_wins_then_allow_decides_then_the_default_allows() {
    let client = Match {
        principals: vec![suffix("/sa/client")],
        ..Match::default()
    };
    let other = Match {
        principals: vec![suffix("/sa/other")],
        ..Match::default()
    };
    let allow_client = policy("allow-client", Action::Allow, vec![client.clone()]);
    let allow_other = policy("allow-other", Action::Allow, vec![other.clone()]);
    let deny_client = policy("deny-client", Action::Deny, vec![client.clone()]);
    let deny_other = policy("deny-other", Action::Deny, vec![other]);
    let mut dry_deny_client = deny_client.clone();
    dry_deny_client.name = "dry-deny-client".into();
    dry_deny_client.dry_run = true;
    let mut dry_allow_other = allow_other.clone();
    dry_allow_other.name = "dry-allow-other".into();
    dry_allow_other.dry_run = true;
    let denied = |p: &str| Reason::Denied {
        policy: format!("demo/{p}"),
        rule: 0,
    };
    let allowed = |p: &str| Reason::Allowed {
        policy: format!("demo/{p}"),
        rule: 0,
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<&Policy>, Reason)> = vec![
        ("no policy", vec![], Reason::NoAllowPolicies),
        ("a deny that does not match", vec![&deny_other], Reason::NoAllowPolicies),
        ("a matching deny", vec![&deny_other, &deny_client], denied("deny-client")),
        ("deny over allow", vec![&allow_client, &deny_client], denied("deny-client")),
        ("allow matches", vec![&allow_other, &allow_client], allowed("allow-client")),
        ("allow exists, none matches", vec![&allow_other, &deny_other],
            Reason::NoAllowMatched { allow_policies: 1 }),
        ("a dry-run deny is not enforced", vec![&dry_deny_client], Reason::NoAllowPolicies),
        ("a dry-run allow does not flip the default", vec![&dry_allow_other], Reason::NoAllowPolicies),
        ("dry-run does not change a real decision", vec![&dry_deny_client, &allow_client],
            allowed("allow-client")),
    ];
    for (name, policies, want) in cases {
        assert_eq!(evaluate(policies, &mtls()).reason, want, "{name}");
    }

    // Dry-run policies report what they would have done, in order.
    let got = evaluate([&dry_deny_client, &dry_allow_other, &allow_client], &mtls());
    assert!(got.is_allowed());
    assert_eq!(
        got.dry_run,
        vec![
            DryRun {
                policy: "demo/dry-deny-client".into(),
                action: Action::Deny,
                rule: Some(0),
            },
            DryRun {
                policy: "demo/dry-allow-other".into(),
                action: Action::Allow,
                rule: None,
            },
        ]
    );
    assert_eq!(
        got.dry_run[0].to_string(),
        "dry-run DENY policy demo/dry-deny-client matched (rule 0)"
    );
}

#[test]
fn plaintext_peers_match_only_rules_that_need_no_identity() {
    let from_net = policy(
        "from-net",
        Action::Allow,
        vec![Match {
            source_ips: vec![net("198.18.0.0/24")],
            ..Match::default()
        }],
    );
    let any_identity = policy(
        "any-identity",
        Action::Allow,
        vec![Match {
            principals: vec![StringMatch::Presence],
            ..Match::default()
        }],
    );
    // "Deny everyone but client": a plaintext peer is not client, so it is denied.
    let all_but_client = policy(
        "all-but-client",
        Action::Deny,
        vec![Match {
            not_principals: vec![exact("cluster.local/ns/demo/sa/client")],
            ..Match::default()
        }],
    );
    assert!(!evaluate([&any_identity], &plaintext()).is_allowed());
    assert!(evaluate([&any_identity], &mtls()).is_allowed());
    assert!(evaluate([&from_net, &any_identity], &plaintext()).is_allowed());
    assert!(!evaluate([&all_but_client], &plaintext()).is_allowed());
    assert!(evaluate([&all_but_client], &mtls()).is_allowed());
}

#[test]
fn rejected_policies_fail_closed() {
    let allow_all = {
        let mut p = Policy::new("demo", "allow-all", Scope::Namespace, Action::Allow);
        p.rules.push(Rule::default());
        p
    };
    let bad_deny = Policy::rejected(
        "demo",
        "bad-deny",
        Scope::Namespace,
        Action::Deny,
        false,
        "bad address",
    );
    let bad_allow = Policy::rejected(
        "demo",
        "bad-allow",
        Scope::Namespace,
        Action::Allow,
        false,
        "bad port",
    );
    let bad_dry = Policy::rejected(
        "demo",
        "bad-dry",
        Scope::Namespace,
        Action::Deny,
        true,
        "bad",
    );
    assert_eq!(bad_deny.rejection(), Some("bad address"));
    // A rejected deny denies everything, even what an allow lets in.
    let got = evaluate([&allow_all, &bad_deny], &mtls());
    assert_eq!(
        got.reason,
        Reason::Rejected {
            policy: "demo/bad-deny".into(),
            why: "bad address".into(),
        }
    );
    assert!(got.reason.to_string().contains("bad address"));
    assert!(!evaluate([&bad_deny], &plaintext()).is_allowed());
    // A rejected allow allows nothing, but still counts as an allow policy.
    assert_eq!(
        evaluate([&bad_allow], &mtls()).reason,
        Reason::NoAllowMatched { allow_policies: 1 }
    );
    assert!(evaluate([&bad_allow, &allow_all], &mtls()).is_allowed());
    // Dry-run stays dry-run.
    let got = evaluate([&bad_dry], &mtls());
    assert!(got.is_allowed());
    assert_eq!(got.dry_run[0].rule, Some(0));
}

fn echo_workload(policies: &[&str]) -> Workload {
    let id = Identity::new("cluster.local", "demo", "echo").unwrap();
    let mut w = Workload::new("demo/echo", "echo", id);
    w.addresses = vec!["198.18.1.3".parse().unwrap()];
    w.authorization_policies = policies.iter().map(|s| s.to_string()).collect();
    w
}

fn deny_all(namespace: &str, name: &str, scope: Scope) -> Policy {
    let mut p = Policy::new(namespace, name, scope, Action::Deny);
    p.rules.push(Rule::default());
    p
}

#[test]
fn each_scope_applies_where_it_should() {
    let mut index = Policies::new();
    index.upsert(deny_all("istio-system", "global", Scope::Global));
    index.upsert(deny_all("demo", "ns", Scope::Namespace));
    index.upsert(deny_all("prod", "other-ns", Scope::Namespace));
    index.upsert(deny_all("demo", "selected", Scope::WorkloadSelector));
    index.upsert(deny_all("demo", "not-selected", Scope::WorkloadSelector));
    // Listed twice (global, own namespace): counted once.
    let w = echo_workload(&[
        "demo/selected",
        "demo/missing",
        "istio-system/global",
        "demo/ns",
    ]);
    let mut keys: Vec<String> = index.applying_to(&w).map(Policy::key).collect();
    keys.sort();
    assert_eq!(keys, ["demo/ns", "demo/selected", "istio-system/global"]);

    // Each scope alone decides.
    #[rustfmt::skip]
    let cases = [
        (deny_all("istio-system", "g", Scope::Global), vec![], false),
        (deny_all("demo", "n", Scope::Namespace), vec![], false),
        (deny_all("prod", "n", Scope::Namespace), vec![], true),
        (deny_all("demo", "s", Scope::WorkloadSelector), vec!["demo/s"], false),
        (deny_all("demo", "s", Scope::WorkloadSelector), vec![], true),
        // A workload may name a policy of another namespace.
        (deny_all("prod", "s", Scope::WorkloadSelector), vec!["prod/s"], false),
    ];
    for (policy, listed, allowed) in cases {
        let mut index = Policies::new();
        let what = format!("{} {:?} listed {listed:?}", policy.key(), policy.scope);
        index.upsert(policy);
        let w = echo_workload(&listed);
        assert_eq!(index.evaluate(&w, &mtls()).is_allowed(), allowed, "{what}");
    }
}

#[test]
fn upsert_moves_a_policy_between_scopes_and_remove_forgets_it() {
    let mut index = Policies::new();
    let w = echo_workload(&[]);
    index.upsert(deny_all("demo", "p", Scope::Namespace));
    assert!(!index.evaluate(&w, &mtls()).is_allowed());
    let old = index.upsert(deny_all("demo", "p", Scope::WorkloadSelector));
    assert_eq!(old.unwrap().scope, Scope::Namespace);
    assert!(
        index.evaluate(&w, &mtls()).is_allowed(),
        "no longer in demo's list"
    );
    index.upsert(deny_all("demo", "p", Scope::Global));
    assert!(!index.evaluate(&w, &mtls()).is_allowed());
    assert_eq!(index.len(), 1);
    assert!(index.remove("demo/p").is_some());
    assert!(index.is_empty());
    assert!(index.evaluate(&w, &mtls()).is_allowed());
    assert!(index.remove("demo/p").is_none());
}

#[test]
fn state_authorizes_against_the_current_workload_and_denies_unknown_ones() {
    let mut state = State::new();
    state.upsert_workload(echo_workload(&["demo/s"]));
    assert!(state.authorize("demo/echo", &mtls()).is_allowed());
    state
        .policies_mut()
        .upsert(deny_all("demo", "s", Scope::WorkloadSelector));
    let got = state.authorize("demo/echo", &mtls());
    assert_eq!(
        got.reason,
        Reason::Denied {
            policy: "demo/s".into(),
            rule: 0
        }
    );
    assert_eq!(
        state.authorize("demo/gone", &mtls()).reason,
        Reason::UnknownWorkload("demo/gone".into())
    );
}

#[test]
fn validation_names_the_field_and_the_problem() {
    let base = || {
        let mut p = Policy::new("demo", "p", Scope::Namespace, Action::Allow);
        p.rules.push(Rule {
            clauses: vec![
                Clause::default(),
                Clause {
                    matches: vec![Match::default(), Match::default()],
                },
            ],
        });
        p
    };
    assert_eq!(base().validate(), Ok(()));
    let at = |f: fn(&mut Match)| {
        let mut p = base();
        f(&mut p.rules[0].clauses[1].matches[1]);
        let e = p.validate().unwrap_err();
        (e.field.clone(), e.problem.clone(), e.to_string())
    };
    let (field, problem, text) = at(|m| m.not_destination_ports = vec![80, 0]);
    assert_eq!(
        field,
        "rules[0].clauses[1].matches[1].notDestinationPorts[1]"
    );
    assert_eq!(problem, Problem::PortZero);
    assert_eq!(
        text,
        "authorization policy demo/p: rules[0].clauses[1].matches[1].notDestinationPorts[1]: \
         port 0 is not a destination port"
    );
    let (field, problem, _) = at(|m| m.principals = vec![exact(CLIENT)]);
    assert_eq!(field, "rules[0].clauses[1].matches[1].principals[0]");
    assert_eq!(problem, Problem::SpiffePrefix(CLIENT.into()));
    let (field, problem, _) = at(|m| m.not_namespaces = vec![exact("x"), suffix("")]);
    assert_eq!(field, "rules[0].clauses[1].matches[1].notNamespaces[1]");
    assert_eq!(problem, Problem::EmptyValue("suffix"));
    let (field, problem, _) = at(|m| m.service_accounts = vec![sa("demo", "")]);
    assert_eq!(
        field,
        "rules[0].clauses[1].matches[1].serviceAccounts[0].serviceAccount"
    );
    assert_eq!(problem, Problem::EmptyServiceAccountPart);
    let (field, _, _) = at(|m| m.not_service_accounts = vec![sa("", "x")]);
    assert_eq!(
        field,
        "rules[0].clauses[1].matches[1].notServiceAccounts[0].namespace"
    );

    let mut p = base();
    p.name = "a/b".into();
    let e = p.validate().unwrap_err();
    assert_eq!(e.field, "name");
    assert!(matches!(e.problem, Problem::Name(_)), "{e}");
    let mut p = base();
    p.namespace = "Demo!".into();
    let e = p.validate().unwrap_err();
    assert_eq!(e.field, "namespace");
    assert!(matches!(e.problem, Problem::Namespace(_)), "{e}");
}
