//! Inputs of the policy benchmark: a mesh state with many authorization policies, most of
//! which do not apply to the destination.

use std::sync::Arc;

use identity::Identity;
use xds::policy::{
    Action, Clause, Connection, Match, Peer, Policy, Rule, Scope, ServiceAccountMatch, StringMatch,
};
use xds::{State, Workload};

/// The destination workload's uid.
pub const DESTINATION: &str = "ns-0/echo";

/// Policies that apply to [`DESTINATION`] in every state [`mesh`] builds: 2 global, 4 of its
/// namespace, 2 it selects.
pub const APPLYING: usize = 8;

/// A state holding `total` policies (at least [`APPLYING`]): the [`APPLYING`] ones that
/// apply to [`DESTINATION`], the rest spread over other namespaces (namespace-scoped) and
/// other workloads (selector-scoped). None of them denies [`connection`]; one ALLOW (the last
/// evaluated) lets it in, so a decision walks every applying policy.
pub fn mesh(total: usize) -> State {
    assert!(
        total >= APPLYING,
        "at least the {APPLYING} applying policies"
    );
    let mut state = State::new();
    let id = Identity::new("cluster.local", "ns-0", "echo").expect("valid identity");
    let mut echo = Workload::new(DESTINATION, "echo", id);
    echo.addresses = vec!["198.18.1.3".parse().expect("valid IP")];
    echo.authorization_policies = vec!["ns-0/select-0".into(), "ns-0/select-1".into()];
    state.upsert_workload(echo);

    let policies = state.policies_mut();
    for i in 0..2 {
        policies.upsert(deny_from_net(
            "istio-system",
            &format!("global-{i}"),
            Scope::Global,
        ));
    }
    for i in 0..4 {
        policies.upsert(deny_from_net("ns-0", &format!("ns-{i}"), Scope::Namespace));
    }
    policies.upsert(deny_from_net("ns-0", "select-0", Scope::WorkloadSelector));
    policies.upsert(allow_client("ns-0", "select-1", Scope::WorkloadSelector));
    // The rest: in 1,000 other namespaces, half namespace-wide, half selected by workloads
    // that are not the destination.
    for i in 0..total - APPLYING {
        let namespace = format!("other-{}", i % 1000);
        let name = format!("p-{i}");
        if i % 2 == 0 {
            policies.upsert(allow_client(&namespace, &name, Scope::Namespace));
        } else {
            policies.upsert(deny_from_net(&namespace, &name, Scope::WorkloadSelector));
        }
    }
    state
}

/// The connection decided: `ns-1/client` to the destination's port 8080.
pub fn connection() -> Connection {
    let client = Identity::new("cluster.local", "ns-1", "client").expect("valid identity");
    Connection {
        src: "198.18.0.2:40000".parse().expect("valid address"),
        dst: "198.18.1.3:8080".parse().expect("valid address"),
        peer: Some(Arc::new(Peer::new(client))),
    }
}

/// Denies a source network the benchmark connection is not in, unless it is a prober.
fn deny_from_net(namespace: &str, name: &str, scope: Scope) -> Policy {
    let mut p = Policy::new(namespace, name, scope, Action::Deny);
    p.rules.push(Rule {
        clauses: vec![Clause {
            matches: vec![Match {
                source_ips: vec!["198.19.0.0/16".parse().expect("valid CIDR")],
                not_service_accounts: vec![ServiceAccountMatch {
                    namespace: "ops".into(),
                    service_account: "prober".into(),
                }],
                ..Match::default()
            }],
        }],
    });
    p
}

/// Allows the client principal on port 8080, after a rule that does not match.
fn allow_client(namespace: &str, name: &str, scope: Scope) -> Policy {
    let mut p = Policy::new(namespace, name, scope, Action::Allow);
    p.rules.push(Rule {
        clauses: vec![Clause {
            matches: vec![Match {
                namespaces: vec![StringMatch::Exact("prod".into())],
                ..Match::default()
            }],
        }],
    });
    p.rules.push(Rule {
        clauses: vec![
            Clause {
                matches: vec![Match {
                    principals: vec![StringMatch::Suffix("/sa/client".into())],
                    ..Match::default()
                }],
            },
            Clause {
                matches: vec![Match {
                    destination_ports: vec![8080],
                    ..Match::default()
                }],
            },
        ],
    });
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds::policy::Reason;

    #[test]
    fn the_destination_sees_the_same_policies_whatever_the_total() {
        for total in [APPLYING, 10_000] {
            let state = mesh(total);
            assert_eq!(state.policies().len(), total);
            let echo = state.workload_by_uid(DESTINATION).unwrap();
            assert_eq!(state.policies().applying_to(&echo).count(), APPLYING);
            let decision = state.authorize(DESTINATION, &connection());
            assert_eq!(
                decision.reason,
                Reason::Allowed {
                    policy: "ns-0/select-1".into(),
                    rule: 1
                }
            );
        }
    }
}
