//! `istio.security.Authorization` resources → the policy model's [`Policy`]: [`decode`]
//! validates every field and names the first problem by its path (`scope`,
//! `rules[0].clauses[1].matches[0].sourceIps[2].length`, ...), and [`crate::Store`]
//! implements the xDS client's handler with it.
//!
//! A resource that fails is NACKed, and it must never widen access, so it is not simply
//! dropped (a deny that vanished would allow what it denied): [`stand_in`] builds the
//! [`Policy::rejected`] that takes its place under its resource name, replacing any earlier
//! version. The stand-in is at least as strict as both the broken version and the version
//! it replaces, as far as either can be read: it is a DENY if either is (or if the action
//! cannot be read), enforced if either is, and its scope is the wider of the two (an
//! unreadable scope counts as NAMESPACE, the policy's own namespace). A rejected DENY denies
//! every connection in that scope; a rejected ALLOW matches none, so only other ALLOW
//! policies can let a connection in. This departs on purpose from the handler's general
//! rule that a refused update leaves the earlier version as it was.
//!
//! Deviations from Istio's evaluation, both towards refusing: a `Match` with every list
//! empty is rejected rather than skipped, since istiod does not send one and a condition in
//! a field this agent does not know (a newer istiod's) would decode as exactly that; and a
//! `StringMatch` that sets none of its kinds is rejected. `extensions` (of the policy and of
//! a match) are opaque and ignored.

use crate::handler::{Handler, Rejection, Update};
use crate::policy::{
    self, Action, Clause, Match, Policy, PolicyError, Problem, Rule, Scope, ServiceAccountMatch,
    StringMatch, policy_key,
};
use crate::proto::istio::security as pb;
use crate::store::Store;

#[cfg(test)]
mod tests;

/// Why an `istio.security.Authorization` was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    /// A field of the message, named by its path.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    #[error("resource name {name:?} does not match the policy's own namespace/name {own:?}")]
    Name { name: String, own: String },
}

/// Converts a decoded Authorization into a validated [`Policy`]; `name` is the xDS resource
/// name it arrived under, which must be its `namespace/name`.
pub fn decode(name: &str, a: &pb::Authorization) -> Result<Policy, AuthorizationError> {
    let own = policy_key(&a.namespace, &a.name);
    // Name and namespace first: every later reason is about this policy.
    Policy::new(&a.namespace, &a.name, Scope::Global, Action::Allow).validate()?;
    if own != name {
        return Err(AuthorizationError::Name {
            name: name.to_owned(),
            own,
        });
    }
    let fail = |field: String, problem: Problem| {
        AuthorizationError::Invalid(PolicyError {
            policy: own.clone(),
            field,
            problem,
        })
    };
    let scope = policy::wire::scope(a.scope).map_err(|p| fail("scope".into(), p))?;
    let action = policy::wire::action(a.action).map_err(|p| fail("action".into(), p))?;
    let mut out = Policy::new(&a.namespace, &a.name, scope, action);
    out.dry_run = a.dry_run;
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, mat) in clause.matches.iter().enumerate() {
                let converted = convert_match(mat).map_err(|(field, problem)| {
                    let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                    fail(
                        if field.is_empty() {
                            at
                        } else {
                            format!("{at}.{field}")
                        },
                        problem,
                    )
                })?;
                matches.push(converted);
            }
            clauses.push(Clause { matches });
        }
        out.rules.push(Rule { clauses });
    }
    out.validate()?;
    Ok(out)
}

/// One `Match`; an error carries the field path inside it (empty for the match itself).
fn convert_match(m: &pb::Match) -> Result<Match, (String, Problem)> {
    let out = Match {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("notNamespaces", &m.not_namespaces)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings("principals", &m.principals)?,
        not_principals: strings("notPrincipals", &m.not_principals)?,
        source_ips: nets("sourceIps", &m.source_ips)?,
        not_source_ips: nets("notSourceIps", &m.not_source_ips)?,
        destination_ips: nets("destinationIps", &m.destination_ips)?,
        not_destination_ips: nets("notDestinationIps", &m.not_destination_ips)?,
        destination_ports: ports("destinationPorts", &m.destination_ports)?,
        not_destination_ports: ports("notDestinationPorts", &m.not_destination_ports)?,
    };
    if out.is_empty() {
        return Err((String::new(), Problem::EmptyMatch));
    }
    Ok(out)
}

fn strings(field: &str, list: &[pb::StringMatch]) -> Result<Vec<StringMatch>, (String, Problem)> {
    use pb::string_match::MatchType;
    list.iter()
        .enumerate()
        .map(|(i, s)| match &s.match_type {
            Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
            Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
            Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
            Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
            None => Err((format!("{field}[{i}]"), Problem::NoMatchKind)),
        })
        .collect()
}

/// Empty parts are left to [`Policy::validate`], which names them.
fn accounts(list: &[pb::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    list.iter()
        .map(|sa| ServiceAccountMatch {
            namespace: sa.namespace.clone(),
            service_account: sa.service_account.clone(),
        })
        .collect()
}

fn nets(field: &str, list: &[pb::Address]) -> Result<Vec<ipnet::IpNet>, (String, Problem)> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            policy::wire::cidr(&a.address, a.length).map_err(|p| {
                let part = match p {
                    Problem::AddressLength(_) => "address",
                    _ => "length",
                };
                (format!("{field}[{i}].{part}"), p)
            })
        })
        .collect()
}

fn ports(field: &str, list: &[u32]) -> Result<Vec<u16>, (String, Problem)> {
    list.iter()
        .enumerate()
        .map(|(i, &p)| policy::wire::port(p).map_err(|e| (format!("{field}[{i}]"), e)))
        .collect()
}

/// The fail-closed [`Policy::rejected`] to store under resource `name` for a message that
/// failed [`decode`], given the version stored under that name now (see the module doc for
/// how it is chosen). `None` when `name` is not of the form `namespace/name`: no valid
/// policy can have been stored under it, and the index keys policies by `namespace/name`.
pub fn stand_in(
    name: &str,
    a: &pb::Authorization,
    previous: Option<&Policy>,
    reason: &AuthorizationError,
) -> Option<Policy> {
    let (namespace, policy_name) = name.split_once('/')?;
    let read_scope = policy::wire::scope(a.scope).unwrap_or(Scope::Namespace);
    let scope = match previous {
        Some(p) if breadth(p.scope) > breadth(read_scope) => p.scope,
        _ => read_scope,
    };
    let deny = policy::wire::action(a.action) != Ok(Action::Allow)
        || previous.is_some_and(|p| p.action == Action::Deny);
    let action = if deny { Action::Deny } else { Action::Allow };
    let dry_run = a.dry_run && previous.is_none_or(|p| p.dry_run);
    Some(Policy::rejected(
        namespace,
        policy_name,
        scope,
        action,
        dry_run,
        reason,
    ))
}

/// How many workloads a scope can reach, as an order: a NAMESPACE policy applies to every
/// workload of its namespace and to any workload naming it, a superset of WORKLOAD_SELECTOR.
fn breadth(scope: Scope) -> u8 {
    match scope {
        Scope::WorkloadSelector => 0,
        Scope::Namespace => 1,
        Scope::Global => 2,
    }
}

impl Handler<pb::Authorization> for Store {
    /// Converts outside the lock, then applies every update and the removals in one write.
    /// A valid policy replaces its earlier version; a rejected one is NACKed and replaced
    /// by its fail-closed [`stand_in`]. A removal removes a stand-in too.
    fn apply(
        &self,
        updates: Vec<Update<pb::Authorization>>,
        removals: &[String],
    ) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        let mut converted = Vec::with_capacity(updates.len());
        for u in updates {
            match decode(&u.name, &u.resource) {
                Ok(p) => converted.push((u.name, Ok(p))),
                Err(e) => {
                    tracing::warn!(resource = %u.name, error = %e,
                        "rejecting Authorization resource; a fail-closed stand-in takes its place");
                    rejected.push(Rejection::new(u.name.clone(), &e));
                    converted.push((u.name, Err((u.resource, e))));
                }
            }
        }
        self.update(|state| {
            let policies = state.policies_mut();
            for (name, result) in converted {
                match result {
                    Ok(p) => drop(policies.upsert(p)),
                    Err((message, e)) => {
                        let previous = policies.get(&name).map(|p| &**p);
                        if let Some(p) = stand_in(&name, &message, previous, &e) {
                            policies.upsert(p);
                        }
                    }
                }
            }
            for name in removals {
                policies.remove(name);
            }
        });
        rejected
    }
}

/// `policy` as an `istio.security.Authorization` (what a control plane sends): the inverse of
/// [`decode`] for every policy it accepts. The development control plane serves the mesh
/// file's policies with it.
pub fn encode(policy: &Policy) -> pb::Authorization {
    let strings = |list: &[StringMatch]| -> Vec<pb::StringMatch> {
        use pb::string_match::MatchType;
        list.iter()
            .map(|s| pb::StringMatch {
                match_type: Some(match s {
                    StringMatch::Exact(v) => MatchType::Exact(v.clone()),
                    StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
                    StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
                    StringMatch::Presence => MatchType::Presence(()),
                }),
            })
            .collect()
    };
    let accounts = |list: &[ServiceAccountMatch]| -> Vec<pb::ServiceAccountMatch> {
        list.iter()
            .map(|a| pb::ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.service_account.clone(),
            })
            .collect()
    };
    let nets = |list: &[ipnet::IpNet]| -> Vec<pb::Address> {
        list.iter()
            .map(|n| pb::Address {
                address: match n.addr() {
                    std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
                    std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
                },
                length: u32::from(n.prefix_len()),
            })
            .collect()
    };
    let ports = |list: &[u16]| list.iter().map(|p| u32::from(*p)).collect();
    let matches = |m: &Match| pb::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    };
    pb::Authorization {
        name: policy.name.clone(),
        namespace: policy.namespace.clone(),
        scope: match policy.scope {
            Scope::Global => pb::Scope::Global,
            Scope::Namespace => pb::Scope::Namespace,
            Scope::WorkloadSelector => pb::Scope::WorkloadSelector,
        } as i32,
        action: match policy.action {
            Action::Allow => pb::Action::Allow,
            Action::Deny => pb::Action::Deny,
        } as i32,
        rules: policy
            .rules
            .iter()
            .map(|r: &Rule| pb::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c: &Clause| pb::Clause {
                        matches: c.matches.iter().map(matches).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: policy.dry_run,
        extensions: Vec::new(),
    }
}
