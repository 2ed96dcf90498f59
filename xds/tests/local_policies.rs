//! The mesh file's `policies:`: what loads and how it decides, and how every kind of mistake
//! is refused with the field and the reason.

use std::path::Path;

use xds::local;
use xds::policy::{Action, Connection, Peer, Reason, Scope, StringMatch};

/// A file with `policies` and one workload `echo` in `demo` naming `listed`.
fn file(policies: &str, listed: &str) -> String {
    format!(
        "policies:\n{policies}workloads:\n  - name: echo\n    namespace: demo\n    node: n\n    \
         addresses: [198.18.1.3]\n    authorizationPolicies: [{listed}]\n"
    )
}

fn conn(src: &str, dst: &str, id: Option<&str>) -> Connection {
    Connection {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        peer: id.map(|i| std::sync::Arc::new(Peer::new(i.parse().unwrap()))),
    }
}

#[test]
fn the_example_policies_load_and_decide() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies.yaml");
    let mesh = local::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh.policies.len(), 3);
    let allow = &mesh.policies[0];
    assert_eq!(allow.key(), "demo/echo-from-client");
    assert_eq!(
        (allow.scope, allow.action, allow.dry_run),
        (Scope::WorkloadSelector, Action::Allow, false)
    );
    assert_eq!(allow.rules[0].clauses.len(), 2);
    let audit = &mesh.policies[2];
    assert_eq!(
        (audit.scope, audit.action, audit.dry_run),
        (Scope::Global, Action::Deny, true)
    );
    let m = &audit.rules[0].clauses[0].matches[0];
    assert_eq!(m.namespaces, [StringMatch::Presence]);
    assert_eq!(m.not_namespaces, [StringMatch::Suffix("-admin".into())]);
    assert_eq!(m.not_service_accounts[0].service_account, "prober");
    assert_eq!(m.not_destination_ips, ["198.18.1.1/32".parse().unwrap()]);
    assert_eq!(m.source_ips[0], "2001:2::/48".parse().unwrap());
    assert_eq!(m.destination_ports, [9090]);
    assert_eq!(m.not_destination_ports, [9091]);

    let state = mesh.into_state();
    assert_eq!(state.policies().len(), 3);
    let client = Some("spiffe://cluster.local/ns/demo/sa/client");
    let got = state.authorize("demo/echo", &conn("198.18.0.2:1", "127.0.0.3:8080", client));
    assert_eq!(
        got.reason,
        Reason::Allowed {
            policy: "demo/echo-from-client".into(),
            rule: 0
        }
    );
    assert_eq!(
        got.dry_run.len(),
        1,
        "the global dry-run policy is reported"
    );
    let got = state.authorize("demo/echo", &conn("198.18.0.2:1", "127.0.0.3:80", client));
    assert_eq!(got.reason, Reason::NoAllowMatched { allow_policies: 1 });
    // From outside the benchmark ranges and not a demo principal: the namespace DENY.
    let got = state.authorize(
        "demo/echo",
        &conn(
            "127.0.0.9:1",
            "127.0.0.3:8080",
            Some("spiffe://cluster.local/ns/prod/sa/x"),
        ),
    );
    assert_eq!(
        got.reason,
        Reason::Denied {
            policy: "demo/deny-foreign".into(),
            rule: 0
        }
    );
}

#[test]
fn policies_without_rules_or_optional_fields_get_istio_defaults() {
    let text = file(
        "  - {name: nothing, namespace: demo, scope: WORKLOAD_SELECTOR}\n  - {name: all, namespace: demo, scope: NAMESPACE, rules: [{}]}\n",
        "demo/nothing",
    );
    let mesh = local::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh.policies[0].action, Action::Allow);
    assert!(!mesh.policies[0].dry_run);
    assert!(mesh.policies[0].rules.is_empty());
    assert!(mesh.policies[1].rules[0].clauses.is_empty());
    assert_eq!(mesh.workloads[0].authorization_policies, ["demo/nothing"]);
    // Two ALLOWs: the one without rules allows nothing, the rule without clauses allows all.
    let got = mesh
        .into_state()
        .authorize("demo/echo", &conn("198.18.0.2:1", "198.18.1.3:80", None));
    assert!(got.is_allowed(), "{:?}", got.reason);
}

/// A one-rule, one-clause, one-match policy with `m` as its match.
fn with_match(m: &str) -> String {
    file(
        &format!(
            "  - name: p\n    namespace: demo\n    scope: WORKLOAD_SELECTOR\n    action: DENY\n    \
             rules: [{{clauses: [{{matches: [{m}]}}]}}]\n"
        ),
        "demo/p",
    )
}

const MATCH: &str = "policies[0].rules[0].clauses[0].matches[0]";

#[test]
fn each_invalid_policy_names_the_field_and_the_problem() {
    let select = |p: &str| file(p, "");
    #[rustfmt::skip]
    let cases: Vec<(&str, String, String, &[&str])> = vec![
        ("missing scope", select("  - {name: p, namespace: demo}\n"),
            "policies[0]".into(), &["missing field `scope`"]),
        ("bad scope", select("  - {name: p, namespace: demo, scope: global}\n"),
            "policies[0].scope".into(), &["unknown variant `global`", "WORKLOAD_SELECTOR"]),
        ("bad action", select("  - {name: p, namespace: demo, scope: GLOBAL, action: REJECT}\n"),
            "policies[0].action".into(), &["unknown variant `REJECT`", "DENY"]),
        ("bad namespace", select("  - {name: p, namespace: \"demo!\", scope: GLOBAL}\n"),
            "policies[0].namespace".into(), &["\"demo!\"", "only letters"]),
        ("name with a slash", select("  - {name: a/b, namespace: demo, scope: GLOBAL}\n"),
            "policies[0].name".into(), &["invalid policy name", "'/'"]),
        ("unknown policy field", select("  - {name: p, namespace: demo, scope: GLOBAL, dryrun: true}\n"),
            "policies[0].dryrun".into(), &["unknown field `dryrun`", "dryRun"]),
        ("unknown rule field", select("  - {name: p, namespace: demo, scope: GLOBAL, rules: [{from: []}]}\n"),
            "policies[0].rules[0].from".into(), &["unknown field `from`", "clauses"]),
        ("unknown match field", with_match("{sourceIP: [198.18.0.1]}"),
            format!("{MATCH}.sourceIP"), &["unknown field `sourceIP`", "sourceIps"]),
        ("v4 prefix too long", with_match("{sourceIps: [198.18.0.0/33]}"),
            format!("{MATCH}.sourceIps[0]"), &["prefix length 33 exceeds 32"]),
        ("v6 prefix too long", with_match("{notDestinationIps: [\"2001:2::/129\"]}"),
            format!("{MATCH}.notDestinationIps[0]"), &["prefix length 129 exceeds 128"]),
        ("not an address", with_match("{destinationIps: [198.18.0.300/24]}"),
            format!("{MATCH}.destinationIps[0]"), &["\"198.18.0.300/24\" is not an IP address or CIDR"]),
        ("signed prefix", with_match("{notSourceIps: [198.18.0.0/+8]}"),
            format!("{MATCH}.notSourceIps[0]"), &["is not an IP address or CIDR"]),
        ("port 0", with_match("{destinationPorts: [0]}"),
            format!("{MATCH}.destinationPorts[0]"), &["port 0 is out of range 1-65535"]),
        ("port too big", with_match("{notDestinationPorts: [80, 70000]}"),
            format!("{MATCH}.notDestinationPorts[1]"), &["port 70000 is out of range 1-65535"]),
        ("unknown string match", with_match("{namespaces: [{regex: d.*}]}"),
            format!("{MATCH}.namespaces[0]"), &["unknown variant `regex`", "exact"]),
        ("bare string match", with_match("{namespaces: [demo]}"),
            format!("{MATCH}.namespaces[0]"), &[]),
        ("two kinds in one string match", with_match("{principals: [{exact: a, prefix: b}]}"),
            format!("{MATCH}.principals[0].exact"), &["expected end of mapping"]),
        ("presence with a value", with_match("{principals: [{presence: yes}]}"),
            format!("{MATCH}.principals[0].presence"), &["expected mapping"]),
        ("empty exact", with_match("{namespaces: [{exact: \"\"}]}"),
            format!("{MATCH}.namespaces[0]"), &["empty exact value is not allowed", "presence"]),
        ("principal with scheme", with_match("{notPrincipals: [{exact: \"spiffe://cluster.local/ns/a/sa/b\"}]}"),
            format!("{MATCH}.notPrincipals[0]"), &["starts with spiffe://"]),
        ("service account without its name", with_match("{serviceAccounts: [{namespace: demo}]}"),
            format!("{MATCH}.serviceAccounts[0]"), &["missing field `serviceAccount`"]),
        ("empty match", with_match("{}"),
            MATCH.into(), &["never matches", "Istio skips it"]),
        ("duplicate policy", select("  - {name: p, namespace: demo, scope: GLOBAL}\n  - {name: p, namespace: demo, scope: NAMESPACE}\n"),
            "policies[1]".into(), &["\"demo/p\" is already defined by policies[0]"]),
        ("unknown reference", file("  - {name: p, namespace: demo, scope: WORKLOAD_SELECTOR}\n", "demo/q"),
            "workloads[0].authorizationPolicies[0]".into(), &["\"demo/q\" is not defined"]),
        ("reference to a namespace policy", file("  - {name: p, namespace: demo, scope: NAMESPACE}\n", "demo/p"),
            "workloads[0].authorizationPolicies[0]".into(), &["scope NAMESPACE", "policies[0]", "WORKLOAD_SELECTOR"]),
    ];
    let mut failed = Vec::new();
    for (kind, text, field, words) in cases {
        let err = match local::parse(&text) {
            Ok(_) => {
                failed.push(format!("{kind}: loaded"));
                continue;
            }
            Err(e) => e,
        };
        let message = err.to_string();
        let invalid = err.invalid().expect("text errors are Invalid");
        if invalid.field != field {
            failed.push(format!(
                "{kind}: field {:?}, want {field:?} ({message})",
                invalid.field
            ));
        }
        if invalid.position.is_none() {
            failed.push(format!("{kind}: no line and column ({message})"));
        }
        for w in words {
            if !message.contains(w) {
                failed.push(format!("{kind}: {message:?} lacks {w:?}"));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
