//! Deciding one connection against the policies that apply to its destination: a pure
//! function of the policies and the connection, so it is table-tested and re-run as is when
//! policies change.
//!
//! Order (wire.md §6.3): any matching DENY denies; with no ALLOW policy the connection is
//! allowed; otherwise it is allowed only if some ALLOW matches. Dry-run policies are
//! evaluated and reported, never enforced.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use identity::Identity;
use ipnet::IpNet;

use super::{Action, Match, Policy, ServiceAccountMatch, StringMatch};

/// A verified peer identity, with the principal string policies compare computed once and
/// shared by clones (one per connection of the same peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    identity: Identity,
    principal: Arc<str>,
}

impl Peer {
    pub fn new(identity: Identity) -> Self {
        let principal = identity.principal().into();
        Self {
            identity,
            principal,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// What policies see of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub src: SocketAddr,
    /// The destination workload's address and port (after service resolution).
    pub dst: SocketAddr,
    /// `None` for a client without a verified identity (inbound plaintext). Shared: one per
    /// peer connection, not per tunnelled stream.
    pub peer: Option<Arc<Peer>>,
}

/// The outcome, with why, and what dry-run policies would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub dry_run: Vec<DryRun>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.reason.is_allowed()
    }
}

/// Why a connection is allowed or denied. Rules are counted from 0 in the policy's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No ALLOW policy applies and no DENY matched.
    NoAllowPolicies,
    /// This ALLOW policy matched, through this rule.
    Allowed { policy: String, rule: usize },
    /// This DENY policy matched, through this rule.
    Denied { policy: String, rule: usize },
    /// A DENY policy was rejected by its source; it denies everything it applies to.
    Rejected { policy: String, why: Arc<str> },
    /// ALLOW policies apply and none matched.
    NoAllowMatched { allow_policies: usize },
    /// The destination workload is not (or no longer) in the mesh.
    UnknownWorkload(String),
}

impl Reason {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Reason::NoAllowPolicies | Reason::Allowed { .. })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoAllowPolicies => f.write_str("no DENY matched and no ALLOW policy applies"),
            Reason::Allowed { policy, rule } => {
                write!(f, "ALLOW policy {policy} matched (rule {rule})")
            }
            Reason::Denied { policy, rule } => {
                write!(f, "DENY policy {policy} matched (rule {rule})")
            }
            Reason::Rejected { policy, why } => write!(
                f,
                "DENY policy {policy} was rejected ({why}) and denies every connection"
            ),
            Reason::NoAllowMatched { allow_policies } => {
                write!(f, "none of the {allow_policies} ALLOW policies matched")
            }
            Reason::UnknownWorkload(uid) => {
                write!(f, "destination workload {uid} is not in the mesh")
            }
        }
    }
}

/// What a dry-run policy would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub policy: String,
    pub action: Action,
    /// The rule that matched; `None` when the policy did not match.
    pub rule: Option<usize>,
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(rule) => write!(
                f,
                "dry-run {} policy {} matched (rule {rule})",
                self.action, self.policy
            ),
            None => write!(
                f,
                "dry-run {} policy {} did not match",
                self.action, self.policy
            ),
        }
    }
}

/// Decides `conn` against `policies`, all of which apply to its destination.
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, conn: &Connection) -> Decision {
    let mut dry_run = Vec::new();
    let mut denied = None;
    let mut allowed = None;
    let mut allow_policies = 0;
    for policy in policies {
        if policy.dry_run {
            dry_run.push(DryRun {
                policy: policy.key(),
                action: policy.action,
                rule: matched_rule(policy, conn),
            });
            continue;
        }
        match policy.action {
            Action::Deny if denied.is_none() => {
                if let Some(why) = &policy.rejection {
                    denied = Some(Reason::Rejected {
                        policy: policy.key(),
                        why: why.clone(),
                    });
                } else if let Some(rule) = matched_rule(policy, conn) {
                    denied = Some(Reason::Denied {
                        policy: policy.key(),
                        rule,
                    });
                }
            }
            Action::Deny => {}
            Action::Allow => {
                allow_policies += 1;
                if allowed.is_none() && denied.is_none() {
                    allowed = matched_rule(policy, conn).map(|rule| Reason::Allowed {
                        policy: policy.key(),
                        rule,
                    });
                }
            }
        }
    }
    let reason = match (denied, allowed) {
        (Some(deny), _) => deny,
        (None, _) if allow_policies == 0 => Reason::NoAllowPolicies,
        (None, Some(allow)) => allow,
        (None, None) => Reason::NoAllowMatched { allow_policies },
    };
    Decision { reason, dry_run }
}

/// The first rule of `policy` that matches `conn`. A rejected policy matches nothing here;
/// [`evaluate`] gives a rejected DENY its fail-closed meaning.
fn matched_rule(policy: &Policy, conn: &Connection) -> Option<usize> {
    if policy.rejection.is_some() {
        return (policy.action == Action::Deny).then_some(0);
    }
    policy.rules.iter().position(|rule| {
        rule.clauses.iter().all(|clause| {
            clause.matches.is_empty() || clause.matches.iter().any(|m| m.matches(conn))
        })
    })
}

impl Match {
    fn matches(&self, conn: &Connection) -> bool {
        if self.is_empty() {
            return false;
        }
        let peer = conn.peer.as_ref();
        let namespace = |m: &StringMatch| peer.is_some_and(|p| m.matches(p.identity.namespace()));
        let principal = |m: &StringMatch| peer.is_some_and(|p| m.matches(&p.principal));
        let account = |m: &ServiceAccountMatch| {
            peer.is_some_and(|p| {
                p.identity.namespace() == m.namespace
                    && p.identity.service_account() == m.service_account
            })
        };
        let src = |net: &IpNet| net.contains(&conn.src.ip());
        let dst = |net: &IpNet| net.contains(&conn.dst.ip());
        let port = |p: &u16| *p == conn.dst.port();
        pair(&self.destination_ports, &self.not_destination_ports, port)
            && pair(&self.destination_ips, &self.not_destination_ips, dst)
            && pair(&self.source_ips, &self.not_source_ips, src)
            && pair(&self.namespaces, &self.not_namespaces, namespace)
            && pair(&self.service_accounts, &self.not_service_accounts, account)
            && pair(&self.principals, &self.not_principals, principal)
    }
}

/// Positive list empty or ANY matches, and negative list empty or NONE matches.
fn pair<T>(positive: &[T], negative: &[T], test: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&test)) && !negative.iter().any(&test)
}
