//! SPIFFE workload identities and the certificate bundles that prove them.
//!
//! This is the leaf of the workspace: it parses and prints
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and holds a
//! workload's certificate chain and key as DER. Issuing certificates belongs
//! to `ca-client`; turning a bundle into TLS configuration belongs to the agent.

mod bundle;

pub use bundle::WorkloadCertificate;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Trust domain used when a workload does not name one (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account used when a workload does not name one (Kubernetes' default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

const SCHEME: &str = "spiffe://";

/// A SPIFFE identity in Istio's form: trust domain, namespace, service account.
///
/// Cheap to clone (the parts are shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

/// What is wrong with a SPIFFE id, a trust domain, a namespace or a service account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE id {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error(
        "SPIFFE id {0:?} must have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("trust domain {value:?} is invalid: {reason}")]
    TrustDomain { value: String, reason: &'static str },
    #[error("{part} {value:?} is invalid: {reason}")]
    Name {
        part: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name("namespace", namespace)?;
        validate_name("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// Like [`Identity::new`], with Istio's defaults for an empty trust domain
    /// (`cluster.local`) or service account (`default`).
    pub fn with_defaults(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let td = if trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            trust_domain
        };
        let sa = if service_account.is_empty() {
            DEFAULT_SERVICE_ACCOUNT
        } else {
            service_account
        };
        Self::new(td, namespace, sa)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity without the `spiffe://` scheme, as authorization policies
    /// compare principals: `<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

impl TryFrom<&str> for Identity {
    type Error = IdentityError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks a trust domain: a DNS-like name of lower-case letters, digits,
/// `.`, `-` and `_` (SPIFFE ID spec, section 2.1).
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let err = |reason| IdentityError::TrustDomain {
        value: td.to_owned(),
        reason,
    };
    if td.is_empty() {
        return Err(err("it is empty"));
    }
    if td.len() > 255 {
        return Err(err("it is longer than 255 characters"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(err(
            "only lower-case letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

fn validate_name(part: &'static str, value: &str) -> Result<(), IdentityError> {
    let err = |reason| IdentityError::Name {
        part,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value == "." || value == ".." {
        return Err(err("'.' and '..' are not allowed"));
    }
    // SPIFFE path segments: letters, digits, '.', '-', '_'.
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(err("only letters, digits, '.', '-' and '_' are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/reviews".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "reviews");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/reviews");
        assert_eq!(id.principal(), "cluster.local/ns/demo/sa/reviews");
    }

    #[test]
    fn defaults_fill_empty_parts() {
        let id = Identity::with_defaults("", "demo", "").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/default");
    }

    #[test]
    fn rejects_malformed_ids_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "http://cluster.local/ns/a/sa/b",
                "does not start with \"spiffe://\"",
            ),
            ("spiffe://cluster.local/ns/a", "must have the form"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "must have the form",
            ),
            (
                "spiffe://cluster.local/namespace/a/sa/b",
                "must have the form",
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                "namespace \"\" is invalid: it is empty",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "service account \"\" is invalid",
            ),
            (
                "spiffe:///ns/a/sa/b",
                "trust domain \"\" is invalid: it is empty",
            ),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                "only lower-case letters",
            ),
            (
                "spiffe://cluster.local/ns/a b/sa/c",
                "namespace \"a b\" is invalid",
            ),
            (
                "spiffe://cluster.local/ns/../sa/c",
                "'.' and '..' are not allowed",
            ),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn equality_and_ordering_follow_the_parts() {
        let a: Identity = "spiffe://td/ns/a/sa/x".parse().unwrap();
        let b: Identity = "spiffe://td/ns/b/sa/x".parse().unwrap();
        assert!(a < b);
        assert_eq!(a, a.clone());
        assert_ne!(a, b);
    }
}
