//! What to capture in one pod: inbound mode, IP families, ports and marks. Validated once when
//! a plan is made; where the values come from (file, env, flags) is the agent's config tree.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{mark, ports, probe};

/// How connections arriving at the pod reach the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InboundMode {
    /// nat PREROUTING REDIRECT to the plaintext port; HBONE arrives at its port directly.
    Redirect,
    /// mangle PREROUTING TPROXY to the plaintext and HBONE ports; listeners need
    /// `IP_TRANSPARENT`, the original destination stays the socket's local address.
    Tproxy,
}

impl InboundMode {
    /// Lower-case name as used in config files and golden file names.
    pub fn as_str(self) -> &'static str {
        match self {
            InboundMode::Redirect => "redirect",
            InboundMode::Tproxy => "tproxy",
        }
    }
}

/// Capture settings for one pod network namespace. [`Default`] is the project's constants,
/// inbound `redirect`, IPv4 and IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    pub inbound: InboundMode,
    pub ipv4: bool,
    pub ipv6: bool,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub inbound_hbone_port: u16,
    /// `SO_MARK` of the agent's sockets; rules skip packets carrying it.
    pub socket_mark: u32,
    /// Bits of the packet and connection marks that the rules read and write.
    pub mark_mask: u32,
    /// Return-path connection mark and TPROXY mark.
    pub connmark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
    pub probe_v4: Ipv4Addr,
    pub probe_v6: Ipv6Addr,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            inbound: InboundMode::Redirect,
            ipv4: true,
            ipv6: true,
            outbound_port: ports::OUTBOUND,
            inbound_plaintext_port: ports::INBOUND_PLAINTEXT,
            inbound_hbone_port: ports::INBOUND_HBONE,
            socket_mark: mark::SOCKET,
            mark_mask: mark::MASK,
            connmark: mark::CONNMARK,
            route_table: mark::ROUTE_TABLE,
            rule_priority: mark::RULE_PRIORITY,
            probe_v4: probe::SNAT_V4,
            probe_v6: probe::SNAT_V6,
        }
    }
}

/// A capture config that cannot produce working rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("capture config enables neither IPv4 nor IPv6")]
    NoFamily,
    #[error("capture port {name} is 0")]
    ZeroPort { name: &'static str },
    #[error("capture ports {first} and {second} are both {port}")]
    SamePort {
        first: &'static str,
        second: &'static str,
        port: u16,
    },
    #[error("{name} {value:#x} is 0 or has bits outside mark mask {mask:#x}")]
    MarkOutsideMask {
        name: &'static str,
        value: u32,
        mask: u32,
    },
    #[error(
        "socket mark and connmark are both {value:#x}; replies would be taken for agent traffic"
    )]
    SameMark { value: u32 },
    #[error("route table {table} is reserved (0, 253 default, 254 main, 255 local)")]
    ReservedTable { table: u32 },
}

impl CaptureConfig {
    /// Checks the values the rules depend on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ipv4 && !self.ipv6 {
            return Err(ConfigError::NoFamily);
        }
        let ports = [
            ("outbound_port", self.outbound_port),
            ("inbound_plaintext_port", self.inbound_plaintext_port),
            ("inbound_hbone_port", self.inbound_hbone_port),
        ];
        for (i, &(name, port)) in ports.iter().enumerate() {
            if port == 0 {
                return Err(ConfigError::ZeroPort { name });
            }
            if let Some(&(other, _)) = ports[i + 1..].iter().find(|(_, p)| *p == port) {
                return Err(ConfigError::SamePort {
                    first: name,
                    second: other,
                    port,
                });
            }
        }
        for (name, value) in [
            ("socket_mark", self.socket_mark),
            ("connmark", self.connmark),
        ] {
            if value == 0 || value & !self.mark_mask != 0 {
                return Err(ConfigError::MarkOutsideMask {
                    name,
                    value,
                    mask: self.mark_mask,
                });
            }
        }
        if self.socket_mark == self.connmark {
            return Err(ConfigError::SameMark {
                value: self.connmark,
            });
        }
        if matches!(self.route_table, 0 | 253..=255) {
            return Err(ConfigError::ReservedTable {
                table: self.route_table,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_uses_the_constants() {
        let config = CaptureConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            (
                config.outbound_port,
                config.inbound_plaintext_port,
                config.inbound_hbone_port
            ),
            (15001, 15006, 15008)
        );
        assert_eq!((config.socket_mark, config.mark_mask), (0x539, 0xfff));
        assert_eq!((config.connmark, config.route_table), (0x111, 100));
        assert_eq!(config.inbound, InboundMode::Redirect);
        assert!(config.ipv4 && config.ipv6);
    }

    #[test]
    fn rejects_configs_that_cannot_work() {
        let base = CaptureConfig::default();
        let cases = [
            (
                CaptureConfig {
                    ipv4: false,
                    ipv6: false,
                    ..base.clone()
                },
                ConfigError::NoFamily,
            ),
            (
                CaptureConfig {
                    inbound_hbone_port: 0,
                    ..base.clone()
                },
                ConfigError::ZeroPort {
                    name: "inbound_hbone_port",
                },
            ),
            (
                CaptureConfig {
                    inbound_plaintext_port: 15001,
                    ..base.clone()
                },
                ConfigError::SamePort {
                    first: "outbound_port",
                    second: "inbound_plaintext_port",
                    port: 15001,
                },
            ),
            (
                CaptureConfig {
                    socket_mark: 0x1539,
                    ..base.clone()
                },
                ConfigError::MarkOutsideMask {
                    name: "socket_mark",
                    value: 0x1539,
                    mask: 0xfff,
                },
            ),
            (
                CaptureConfig {
                    connmark: 0x539,
                    ..base.clone()
                },
                ConfigError::SameMark { value: 0x539 },
            ),
            (
                CaptureConfig {
                    route_table: 254,
                    ..base.clone()
                },
                ConfigError::ReservedTable { table: 254 },
            ),
        ];
        for (config, want) in cases {
            assert_eq!(config.validate(), Err(want));
        }
    }

    #[test]
    fn error_messages_name_the_field() {
        let err = CaptureConfig {
            socket_mark: 0x1539,
            ..CaptureConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "socket_mark 0x1539 is 0 or has bits outside mark mask 0xfff"
        );
    }
}
