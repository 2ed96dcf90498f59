//! The mesh file's `policies:`: Istio's `istio.security.Authorization` in camelCase (rules →
//! clauses → matches), read strictly and checked with [`Policy::validate`], plus the checks
//! only a hand-written file needs (a duplicate name, a match with nothing in it, a workload
//! naming a policy that is missing or not selector-scoped). Any problem refuses the whole
//! file, so a policy is never loaded partly.

use std::collections::HashMap;
use std::fmt;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::Spanned;

use super::error::{Invalid, Position, Problem};
use super::schema::{Checked, Namespace, NonEmpty, PortNumber};
use crate::policy::{
    self, Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicyEntry {
    pub name: Checked<NonEmpty>,
    pub namespace: Checked<Namespace>,
    /// Required: the proto's default (GLOBAL) is too wide to be implied.
    pub scope: ScopeName,
    #[serde(default)]
    pub action: ActionName,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub rules: Vec<RuleEntry>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub(super) enum ScopeName {
    #[serde(rename = "GLOBAL")]
    Global,
    #[serde(rename = "NAMESPACE")]
    Namespace,
    #[serde(rename = "WORKLOAD_SELECTOR")]
    WorkloadSelector,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(super) enum ActionName {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RuleEntry {
    #[serde(default)]
    pub clauses: Vec<ClauseEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ClauseEntry {
    #[serde(default)]
    pub matches: Vec<Spanned<MatchEntry>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct MatchEntry {
    #[serde(default)]
    pub namespaces: Vec<StringMatchEntry>,
    #[serde(default)]
    pub not_namespaces: Vec<StringMatchEntry>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountEntry>,
    #[serde(default)]
    pub not_service_accounts: Vec<ServiceAccountEntry>,
    #[serde(default)]
    pub principals: Vec<StringMatchEntry>,
    #[serde(default)]
    pub not_principals: Vec<StringMatchEntry>,
    #[serde(default)]
    pub source_ips: Vec<Cidr>,
    #[serde(default)]
    pub not_source_ips: Vec<Cidr>,
    #[serde(default)]
    pub destination_ips: Vec<Cidr>,
    #[serde(default)]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(default)]
    pub destination_ports: Vec<PortNumber>,
    #[serde(default)]
    pub not_destination_ports: Vec<PortNumber>,
}

/// `{exact: v}`, `{prefix: v}`, `{suffix: v}` or `{presence: {}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum StringMatchEntry {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence(Empty),
}

/// `{}`, as `google.protobuf.Empty`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ServiceAccountEntry {
    pub namespace: Checked<NonEmpty>,
    pub service_account: Checked<NonEmpty>,
}

/// An IP or CIDR written as text.
#[derive(Debug)]
pub(super) struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CidrVisitor;

        impl Visitor<'_> for CidrVisitor {
            type Value = Cidr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or CIDR")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cidr, E> {
                policy::wire::parse_cidr(v).map(Cidr).map_err(E::custom)
            }
        }

        d.deserialize_str(CidrVisitor)
    }
}

impl From<StringMatchEntry> for StringMatch {
    fn from(m: StringMatchEntry) -> Self {
        match m {
            StringMatchEntry::Exact(v) => StringMatch::Exact(v),
            StringMatchEntry::Prefix(v) => StringMatch::Prefix(v),
            StringMatchEntry::Suffix(v) => StringMatch::Suffix(v),
            StringMatchEntry::Presence(Empty {}) => StringMatch::Presence,
        }
    }
}

fn strings(list: Vec<StringMatchEntry>) -> Vec<StringMatch> {
    list.into_iter().map(StringMatch::from).collect()
}

fn accounts(list: Vec<ServiceAccountEntry>) -> Vec<ServiceAccountMatch> {
    list.into_iter()
        .map(|sa| ServiceAccountMatch {
            namespace: sa.namespace.value,
            service_account: sa.service_account.value,
        })
        .collect()
}

fn nets(list: Vec<Cidr>) -> Vec<IpNet> {
    list.into_iter().map(|c| c.0).collect()
}

fn ports(list: Vec<PortNumber>) -> Vec<u16> {
    list.into_iter().map(|p| p.0).collect()
}

impl From<MatchEntry> for Match {
    fn from(m: MatchEntry) -> Self {
        Match {
            namespaces: strings(m.namespaces),
            not_namespaces: strings(m.not_namespaces),
            service_accounts: accounts(m.service_accounts),
            not_service_accounts: accounts(m.not_service_accounts),
            principals: strings(m.principals),
            not_principals: strings(m.not_principals),
            source_ips: nets(m.source_ips),
            not_source_ips: nets(m.not_source_ips),
            destination_ips: nets(m.destination_ips),
            not_destination_ips: nets(m.not_destination_ips),
            destination_ports: ports(m.destination_ports),
            not_destination_ports: ports(m.not_destination_ports),
        }
    }
}

/// The file's policies by key, to check workloads' references against.
pub(super) struct Seen {
    /// Key → (index in the file, scope).
    by_key: HashMap<String, (usize, Scope)>,
}

impl Seen {
    /// Converts and checks every entry into `out`.
    pub(super) fn check(
        entries: Vec<Spanned<PolicyEntry>>,
        out: &mut Vec<Policy>,
    ) -> Result<Self, Box<Invalid>> {
        let mut seen = Seen {
            by_key: HashMap::new(),
        };
        for (i, entry) in entries.into_iter().enumerate() {
            let field = format!("policies[{i}]");
            let at = Position::of(entry.referenced);
            let policy = convert(&field, entry.value)?;
            policy
                .validate()
                .map_err(|e| Invalid::new(format!("{field}.{}", e.field), at, e.problem.into()))?;
            let key = policy.key();
            if let Some((first, _)) = seen.by_key.get(&key) {
                return Err(Invalid::new(
                    field,
                    at,
                    Problem::DuplicatePolicy {
                        key,
                        first: format!("policies[{first}]"),
                    },
                ));
            }
            seen.by_key.insert(key, (i, policy.scope));
            out.push(policy);
        }
        Ok(seen)
    }

    /// Checks a workload's `authorizationPolicies` entry.
    pub(super) fn reference(&self, key: &str) -> Result<(), Problem> {
        match self.by_key.get(key) {
            Some((_, Scope::WorkloadSelector)) => Ok(()),
            Some((i, scope)) => Err(Problem::NotSelectorPolicy {
                key: key.to_owned(),
                scope: *scope,
                at: format!("policies[{i}]"),
            }),
            None => Err(Problem::UnknownPolicy {
                key: key.to_owned(),
            }),
        }
    }
}

fn convert(field: &str, p: PolicyEntry) -> Result<Policy, Box<Invalid>> {
    let scope = match p.scope {
        ScopeName::Global => Scope::Global,
        ScopeName::Namespace => Scope::Namespace,
        ScopeName::WorkloadSelector => Scope::WorkloadSelector,
    };
    let action = match p.action {
        ActionName::Allow => Action::Allow,
        ActionName::Deny => Action::Deny,
    };
    let mut policy = Policy::new(p.namespace.value, p.name.value, scope, action);
    policy.dry_run = p.dry_run;
    for (r, rule) in p.rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.into_iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, entry) in clause.matches.into_iter().enumerate() {
                let at = Position::of(entry.referenced);
                let converted = Match::from(entry.value);
                // Istio skips such a match: in a DENY it would silently deny nothing.
                if converted.is_empty() {
                    return Err(Invalid::new(
                        format!("{field}.rules[{r}].clauses[{c}].matches[{m}]"),
                        at,
                        Problem::EmptyMatch,
                    ));
                }
                matches.push(converted);
            }
            clauses.push(Clause { matches });
        }
        policy.rules.push(Rule { clauses });
    }
    Ok(policy)
}
