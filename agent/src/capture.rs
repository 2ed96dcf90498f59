//! The agent's capture settings (backend, inbound mode, tools) and the rule plan for one
//! workload. Rendering and installing rules is `redirect`'s job; this module only decides what
//! to ask it for: the agent's ports, the pod's IP families, the configured inbound mode.

use redirect::{Backend, CaptureConfig, ConfigError, InboundMode, RuleSet, Tools};
use xds::Workload;

use crate::config::Ports;

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub backend: Backend,
    pub inbound: InboundMode,
    pub tools: Tools,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            backend: Backend::Iptables,
            inbound: InboundMode::Redirect,
            tools: Tools::default(),
        }
    }
}

impl CaptureSettings {
    /// The rules for `workload`: rules and listeners cover the IP families it has addresses in.
    pub fn plan(&self, workload: &Workload, ports: Ports) -> Result<RuleSet, ConfigError> {
        RuleSet::plan(&CaptureConfig {
            inbound: self.inbound,
            ipv4: workload.addresses.iter().any(|a| a.is_ipv4()),
            ipv6: workload.addresses.iter().any(|a| a.is_ipv6()),
            outbound_port: ports.outbound,
            inbound_plaintext_port: ports.inbound_plaintext,
            inbound_hbone_port: ports.hbone,
            ..CaptureConfig::default()
        })
    }
}

impl CaptureSettings {
    /// Rules for both families: removing them takes away whatever of ours a namespace has,
    /// whichever addresses its pod had.
    pub fn plan_all_families(&self, ports: Ports) -> Result<RuleSet, ConfigError> {
        RuleSet::plan(&CaptureConfig {
            inbound: self.inbound,
            ipv4: true,
            ipv6: true,
            outbound_port: ports.outbound,
            inbound_plaintext_port: ports.inbound_plaintext,
            inbound_hbone_port: ports.hbone,
            ..CaptureConfig::default()
        })
    }
}

/// Parses `iptables` / `nftables` (also `nft`).
pub fn parse_backend(s: &str) -> Result<Backend, String> {
    match s {
        "iptables" => Ok(Backend::Iptables),
        "nftables" | "nft" => Ok(Backend::Nftables),
        _ => Err(format!(
            "unknown capture backend {s:?} (use iptables or nftables)"
        )),
    }
}

/// Parses `redirect` / `tproxy`.
pub fn parse_inbound_mode(s: &str) -> Result<InboundMode, String> {
    match s {
        "redirect" => Ok(InboundMode::Redirect),
        "tproxy" => Ok(InboundMode::Tproxy),
        _ => Err(format!(
            "unknown inbound mode {s:?} (use redirect or tproxy)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(addresses: &[&str]) -> Workload {
        let id = identity::Identity::new("cluster.local", "demo", "a").unwrap();
        let mut w = Workload::new("demo/a", "a", id);
        w.addresses = addresses.iter().map(|a| a.parse().unwrap()).collect();
        w
    }

    #[test]
    fn families_follow_the_workload_addresses() {
        let settings = CaptureSettings::default();
        let v4 = settings
            .plan(&workload(&["198.19.1.1"]), Ports::default())
            .unwrap();
        assert!(v4.config().ipv4 && !v4.config().ipv6);
        let dual = settings
            .plan(&workload(&["198.19.1.1", "2001:2::1:1"]), Ports::default())
            .unwrap();
        assert!(dual.config().ipv4 && dual.config().ipv6);
        assert!(
            settings
                .plan(&workload(&[]), Ports::default())
                .unwrap_err()
                .to_string()
                .contains("neither IPv4 nor IPv6")
        );
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!(parse_backend("nftables"), Ok(Backend::Nftables));
        assert_eq!(parse_backend("iptables"), Ok(Backend::Iptables));
        assert!(parse_backend("ebtables").unwrap_err().contains("ebtables"));
        assert_eq!(parse_inbound_mode("tproxy"), Ok(InboundMode::Tproxy));
        assert!(
            parse_inbound_mode("nat")
                .unwrap_err()
                .contains("redirect or tproxy")
        );
    }
}
