//! Kubelet health probes. The node SNATs probe connections to these addresses before they enter
//! the pod (that host-side rule is not ours), so the pod's rules can let them through uncaptured.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Source of kubelet probes over IPv4 (Istio's 169.254.7.127).
pub const SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// Source of kubelet probes over IPv6 (Istio's `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`).
pub const SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);
