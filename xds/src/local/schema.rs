//! The mesh file's YAML shape, read with serde: Istio's field names in
//! camelCase, unknown fields rejected, and every check that concerns a
//! single value (IP syntax, port range, names, SPIFFE ids, paths) made while
//! reading, so the parser can report its line and column. Checks across
//! entries (duplicates, references) come after, in `local`.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::Path;

use identity::{DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, Identity};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor, value::MapAccessDeserializer};
use serde_saphyr::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct File {
    #[serde(default)]
    pub services: Option<Vec<Spanned<ServiceEntry>>>,
    #[serde(default)]
    pub workloads: Option<Vec<Spanned<WorkloadEntry>>>,
    #[serde(default)]
    pub policies: Option<Vec<Spanned<super::policies::PolicyEntry>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ServiceEntry {
    pub name: Checked<NonEmpty>,
    pub namespace: Checked<Namespace>,
    pub hostname: Checked<NonEmpty>,
    #[serde(default)]
    pub addresses: Vec<Spanned<VipEntry>>,
    #[serde(default)]
    pub ports: Vec<Spanned<PortEntry>>,
    #[serde(default)]
    pub subject_alt_names: Vec<SpiffeId>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WorkloadEntry {
    #[serde(default)]
    pub uid: Option<Spanned<Checked<NonEmpty>>>,
    pub name: Checked<NonEmpty>,
    pub namespace: Checked<Namespace>,
    #[serde(default)]
    pub service_account: Option<Checked<ServiceAccount>>,
    #[serde(default)]
    pub trust_domain: Option<Checked<TrustDomain>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<Ip>>,
    pub node: Checked<NonEmpty>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub tunnel_protocol: TunnelProtocol,
    #[serde(default)]
    pub status: WorkloadStatus,
    #[serde(default)]
    // Plain keys: the field path then names the key; the value's span
    // locates the entry.
    pub services: HashMap<Checked<ServiceKey>, Spanned<PortList>>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub netns: Option<Checked<AbsolutePath>>,
}

/// Istio's `PortList`: a workload's port mappings for one service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PortList {
    #[serde(default)]
    pub ports: Vec<Spanned<PortEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PortEntry {
    pub service_port: PortNumber,
    /// Absent: fall back to the service's target port, then the service port.
    #[serde(default)]
    pub target_port: Option<PortNumber>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(super) enum TunnelProtocol {
    #[default]
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "HBONE")]
    Hbone,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(super) enum WorkloadStatus {
    #[default]
    #[serde(rename = "HEALTHY")]
    Healthy,
    #[serde(rename = "UNHEALTHY")]
    Unhealthy,
}

impl From<TunnelProtocol> for crate::TunnelProtocol {
    fn from(p: TunnelProtocol) -> Self {
        match p {
            TunnelProtocol::None => crate::TunnelProtocol::None,
            TunnelProtocol::Hbone => crate::TunnelProtocol::Hbone,
        }
    }
}

impl From<WorkloadStatus> for crate::WorkloadStatus {
    fn from(s: WorkloadStatus) -> Self {
        match s {
            WorkloadStatus::Healthy => crate::WorkloadStatus::Healthy,
            WorkloadStatus::Unhealthy => crate::WorkloadStatus::Unhealthy,
        }
    }
}

/// A string that passed `R`'s check while being read.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct Checked<R> {
    pub value: String,
    rule: PhantomData<R>,
}

/// What a [`Checked`] string must satisfy.
pub(super) trait Rule {
    /// Completes "expected …" in the parser's type errors.
    const EXPECTING: &'static str;
    fn check(value: &str) -> Result<(), String>;
}

impl<'de, R: Rule> Deserialize<'de> for Checked<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CheckedVisitor<R>(PhantomData<R>);

        impl<R: Rule> Visitor<'_> for CheckedVisitor<R> {
            type Value = Checked<R>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(R::EXPECTING)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                R::check(v).map_err(E::custom)?;
                Ok(Checked {
                    value: v.to_owned(),
                    rule: PhantomData,
                })
            }
        }

        d.deserialize_str(CheckedVisitor(PhantomData))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct NonEmpty;

impl Rule for NonEmpty {
    const EXPECTING: &'static str = "a non-empty string";

    fn check(value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct Namespace;

impl Rule for Namespace {
    const EXPECTING: &'static str = "a Kubernetes namespace";

    fn check(value: &str) -> Result<(), String> {
        NonEmpty::check(value)?;
        // The defaults are valid, so any error is the namespace's.
        Identity::new(DEFAULT_TRUST_DOMAIN, value, DEFAULT_SERVICE_ACCOUNT)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Empty means the default, as in Istio.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct ServiceAccount;

impl Rule for ServiceAccount {
    const EXPECTING: &'static str = "a service account name";

    fn check(value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Ok(());
        }
        Identity::new(DEFAULT_TRUST_DOMAIN, "default", value)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Empty means the default, as in Istio.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct TrustDomain;

impl Rule for TrustDomain {
    const EXPECTING: &'static str = "a trust domain";

    fn check(value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Ok(());
        }
        identity::validate_trust_domain(value).map_err(|e| e.to_string())
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct AbsolutePath;

impl Rule for AbsolutePath {
    const EXPECTING: &'static str = "an absolute path";

    fn check(value: &str) -> Result<(), String> {
        if !Path::new(value).is_absolute() {
            return Err(format!(
                "path {value:?} is not absolute; give the network namespace as \
                 /var/run/netns/NAME or /proc/PID/ns/net"
            ));
        }
        Ok(())
    }
}

/// A reference to a service in Istio's `namespace/hostname` form.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct ServiceKey;

impl Rule for ServiceKey {
    const EXPECTING: &'static str = "a service key namespace/hostname";

    fn check(value: &str) -> Result<(), String> {
        match value.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() => Ok(()),
            _ => Err(format!(
                "service key {value:?} is not of the form namespace/hostname"
            )),
        }
    }
}

/// An IP address written as text.
#[derive(Debug)]
pub(super) struct Ip(pub IpAddr);

impl<'de> Deserialize<'de> for Ip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IpVisitor;

        impl Visitor<'_> for IpVisitor {
            type Value = Ip;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ip, E> {
                parse_ip(v).map(Ip).map_err(E::custom)
            }
        }

        d.deserialize_str(IpVisitor)
    }
}

fn parse_ip(v: &str) -> Result<IpAddr, String> {
    v.parse()
        .map_err(|_| format!("{v:?} is not an IPv4 or IPv6 address"))
}

/// A service VIP: a bare IP in the default network, or `{network, address}`.
#[derive(Debug)]
pub(super) struct VipEntry {
    pub network: String,
    pub address: IpAddr,
}

impl<'de> Deserialize<'de> for VipEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            #[serde(default)]
            network: String,
            address: Ip,
        }

        struct VipVisitor;

        impl<'de> Visitor<'de> for VipVisitor {
            type Value = VipEntry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or {network, address}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<VipEntry, E> {
                Ok(VipEntry {
                    network: String::new(),
                    address: parse_ip(v).map_err(E::custom)?,
                })
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<VipEntry, M::Error> {
                let long = Long::deserialize(MapAccessDeserializer::new(map))?;
                Ok(VipEntry {
                    network: long.network,
                    address: long.address.0,
                })
            }
        }

        d.deserialize_any(VipVisitor)
    }
}

/// A TCP port, 1 to 65535.
#[derive(Debug, Clone, Copy)]
pub(super) struct PortNumber(pub u16);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl Visitor<'_> for PortVisitor {
            type Value = PortNumber;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortNumber, E> {
                match u16::try_from(v) {
                    Ok(p) if p != 0 => Ok(PortNumber(p)),
                    _ => Err(E::custom(format!("port {v} is out of range 1-65535"))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortNumber, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("port {v} is out of range 1-65535"))),
                }
            }
        }

        // Not deserialize_u16: the parser would reject 0 and 70000 with a
        // bare "invalid u16", without the value or the range.
        d.deserialize_any(PortVisitor)
    }
}

/// A SPIFFE id, parsed.
#[derive(Debug)]
pub(super) struct SpiffeId(pub Identity);

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = SpiffeId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a SPIFFE id spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpiffeId, E> {
                v.parse().map(SpiffeId).map_err(E::custom)
            }
        }

        d.deserialize_str(IdVisitor)
    }
}
