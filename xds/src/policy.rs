//! L4 authorization policy: Istio's `istio.security.Authorization` as a validated model, the
//! index that finds the policies applying to a destination workload ([`Policies`]), and the
//! pure evaluation that decides one connection ([`evaluate`]).
//!
//! Sources build [`Policy`] values and call [`Policy::validate`] before storing one. A policy
//! that fails is never stored as written, because a partly read policy can widen access
//! (an allow that lost a source-IP list allows everyone; a deny that lost its principals
//! denies no one). The local mesh file is then refused as a whole; an xDS conversion stores
//! [`Policy::rejected`] in its place, which fails closed. The [`wire`] helpers turn the
//! proto's loosely typed fields (byte addresses, `u32` ports, enum numbers) into the model's
//! types with the same precise reasons.

mod eval;
mod index;
pub mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use identity::{DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, Identity};
use ipnet::IpNet;

pub use eval::{Connection, Decision, DryRun, Peer, Reason, evaluate};
pub use index::Policies;

/// Where a policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every workload in every namespace (policies of Istio's root namespace).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that list the policy in their `authorizationPolicies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Global => "GLOBAL",
            Scope::Namespace => "NAMESPACE",
            Scope::WorkloadSelector => "WORKLOAD_SELECTOR",
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// One authorization policy. Matches when any rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
    /// OR-ed. No rules: the policy never matches (an ALLOW with none allows nothing).
    pub rules: Vec<Rule>,
    /// Why the source could not accept the policy as written; see [`Policy::rejected`].
    rejection: Option<Arc<str>>,
}

/// Matches when every clause matches (an empty rule matches every connection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches when any of its matches does; a clause without matches is true.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Conditions on one connection. Within a field pair the positive list needs ANY entry to
/// match (or is empty) and the negative list needs NONE to match (or is empty); all pairs
/// must hold. A match with every list empty never matches (Istio skips it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// The peer identity's namespace.
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// The peer identity's (namespace, service account), any trust domain.
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// The peer identity without `spiffe://`: `<td>/ns/<ns>/sa/<sa>`.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl Policy {
    /// A policy with no rules (which never matches); push rules to give it some.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        scope: Scope,
        action: Action,
    ) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            scope,
            action,
            dry_run: false,
            rules: Vec::new(),
            rejection: None,
        }
    }

    /// The stand-in for a policy whose source could not accept it (e.g. an xDS resource that
    /// fails [`Policy::validate`] or conversion). It fails closed wherever the policy would
    /// have applied: a rejected DENY denies every connection; a rejected ALLOW matches none,
    /// yet counts as an ALLOW policy, so only other ALLOW policies can let a connection in.
    /// Pass [`Action::Deny`] when the action itself could not be read; a rejected dry-run
    /// policy stays dry-run (it only logs).
    pub fn rejected(
        namespace: impl Into<String>,
        name: impl Into<String>,
        scope: Scope,
        action: Action,
        dry_run: bool,
        reason: impl fmt::Display,
    ) -> Self {
        let mut policy = Self::new(namespace, name, scope, action);
        policy.dry_run = dry_run;
        policy.rejection = Some(reason.to_string().into());
        policy
    }

    /// Why this policy stands in for one that was rejected, if it does.
    pub fn rejection(&self) -> Option<&str> {
        self.rejection.as_deref()
    }

    /// `namespace/name`: how xDS names it and how workloads refer to it.
    pub fn key(&self) -> String {
        policy_key(&self.namespace, &self.name)
    }

    /// Checks everything the types leave open; the first problem found is returned with the
    /// path of the offending field (`rules[0].clauses[1].matches[0].destinationPorts[2]`).
    pub fn validate(&self) -> Result<(), PolicyError> {
        let fail = |field: String, problem| {
            Err(PolicyError {
                policy: self.key(),
                field,
                problem,
            })
        };
        if let Err(reason) = check_name(&self.name) {
            return fail("name".into(), Problem::Name(reason));
        }
        if let Err(reason) = check_namespace(&self.namespace) {
            return fail("namespace".into(), Problem::Namespace(reason));
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (c, clause) in rule.clauses.iter().enumerate() {
                for (m, mat) in clause.matches.iter().enumerate() {
                    if let Err((field, problem)) = mat.validate() {
                        return fail(
                            format!("rules[{r}].clauses[{c}].matches[{m}].{field}"),
                            problem,
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// `namespace/name`.
pub fn policy_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Match {
    /// True when every list is empty: such a match never matches.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    fn validate(&self) -> Result<(), (String, Problem)> {
        let strings = [
            ("namespaces", &self.namespaces),
            ("notNamespaces", &self.not_namespaces),
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
        ];
        for (name, list) in strings {
            for (i, m) in list.iter().enumerate() {
                m.validate(name == "principals" || name == "notPrincipals")
                    .map_err(|p| (format!("{name}[{i}]"), p))?;
            }
        }
        let accounts = [
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
        ];
        for (name, list) in accounts {
            for (i, sa) in list.iter().enumerate() {
                let part = if sa.namespace.is_empty() {
                    "namespace"
                } else if sa.service_account.is_empty() {
                    "serviceAccount"
                } else {
                    continue;
                };
                return Err((
                    format!("{name}[{i}].{part}"),
                    Problem::EmptyServiceAccountPart,
                ));
            }
        }
        let ports = [
            ("destinationPorts", &self.destination_ports),
            ("notDestinationPorts", &self.not_destination_ports),
        ];
        for (name, list) in ports {
            if let Some(i) = list.iter().position(|&p| p == 0) {
                return Err((format!("{name}[{i}]"), Problem::PortZero));
            }
        }
        Ok(())
    }
}

impl StringMatch {
    fn validate(&self, principal: bool) -> Result<(), Problem> {
        let value = match self {
            StringMatch::Presence => return Ok(()),
            StringMatch::Exact(v) | StringMatch::Prefix(v) | StringMatch::Suffix(v) => v,
        };
        if value.is_empty() {
            return Err(Problem::EmptyValue(self.kind()));
        }
        if principal && value.starts_with("spiffe://") {
            return Err(Problem::SpiffePrefix(value.clone()));
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        match self {
            StringMatch::Exact(_) => "exact",
            StringMatch::Prefix(_) => "prefix",
            StringMatch::Suffix(_) => "suffix",
            StringMatch::Presence => "presence",
        }
    }

    /// Whether `value` (a namespace, or a principal without `spiffe://`) matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(v) => value == v,
            StringMatch::Prefix(v) => value.starts_with(v.as_str()),
            StringMatch::Suffix(v) => value.ends_with(v.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{name:?} contains {c:?}"));
    }
    Ok(())
}

fn check_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() {
        return Err("it is empty".into());
    }
    // The defaults are valid, so any error is the namespace's.
    Identity::new(DEFAULT_TRUST_DOMAIN, namespace, DEFAULT_SERVICE_ACCOUNT)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A policy that cannot be accepted, and where in it the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorization policy {policy}: {field}: {problem}")]
pub struct PolicyError {
    /// `namespace/name` as given.
    pub policy: String,
    /// Path of the offending field, e.g. `rules[0].clauses[0].matches[1].sourceIps[0]`.
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with one field of a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("invalid policy name: {0}")]
    Name(String),
    #[error("invalid namespace: {0}")]
    Namespace(String),
    #[error("an empty {0} value is not allowed (use presence to match any value)")]
    EmptyValue(&'static str),
    #[error(
        "principal {0:?} starts with spiffe://; principals are written without it \
         (<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    SpiffePrefix(String),
    #[error("must not be empty")]
    EmptyServiceAccountPart,
    #[error("port 0 is not a destination port")]
    PortZero,
    #[error("port {0} is out of range 1-65535")]
    PortOutOfRange(u32),
    #[error("address of {0} bytes is neither IPv4 (4) nor IPv6 (16)")]
    AddressLength(usize),
    #[error("prefix length {length} exceeds {max} for {address}")]
    PrefixLength {
        address: std::net::IpAddr,
        length: u32,
        max: u8,
    },
    #[error("{0:?} is not an IP address or CIDR (e.g. 198.18.0.0/15 or 2001:2::/48)")]
    Cidr(String),
    #[error("string match sets none of exact, prefix, suffix, presence")]
    NoMatchKind,
    #[error(
        "the match sets no condition (every list is empty): Istio would skip it, but it may \
         hold a condition this agent does not know, so it is refused"
    )]
    EmptyMatch,
    #[error("unknown scope {0} (GLOBAL=0, NAMESPACE=1, WORKLOAD_SELECTOR=2)")]
    UnknownScope(i32),
    #[error("unknown action {0} (ALLOW=0, DENY=1)")]
    UnknownAction(i32),
}
