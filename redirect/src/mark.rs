//! Packet marks and the policy routing that goes with them.
//!
//! The agent sets [`SOCKET`] on its own sockets so no capture rule touches them. Connections the
//! agent opens with a spoofed source get [`CONNMARK`] on their conntrack entry; replies carry it
//! again and [`ROUTE_TABLE`] sends them to the local stack instead of out of the pod.

/// `SO_MARK` of every agent socket (1337, as in Istio ambient).
pub const SOCKET: u32 = 0x539;
/// Bits of the packet and connection mark that are ours; the rest belong to others.
pub const MASK: u32 = 0xfff;
/// Connection mark of the return path, also the TPROXY mark.
pub const CONNMARK: u32 = 0x111;
/// Routing table holding `local default dev lo`.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of `ip rule fwmark CONNMARK/MASK lookup ROUTE_TABLE`, just before `main` (32766).
pub const RULE_PRIORITY: u32 = 32764;
