//! HBONE request and response headers: `baggage`, `forwarded`, `traceparent`
//! (facts in `shared/protocol/hbone.md` §3).

use std::fmt::Write;
use std::net::SocketAddr;

use xds::Workload;

pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";

/// W3C baggage describing a workload: only non-empty items, comma-joined, no spaces, in
/// Istio's order.
pub fn baggage(workload: &Workload, cluster_id: &str) -> String {
    let mut out = String::new();
    let mut item = |key: &str, value: &str| {
        if !value.is_empty() {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{key}={value}");
        }
    };
    item("k8s.cluster.name", cluster_id);
    item("k8s.namespace.name", workload.namespace());
    item("k8s.pod.name", &workload.name);
    out
}

/// RFC 7239 `forwarded`: the original client, and the service host when one was addressed.
pub fn forwarded(src: SocketAddr, service_host: Option<&str>) -> String {
    // SocketAddr's Display already brackets IPv6.
    match service_host {
        Some(host) => format!("for=\"{src}\";host={host}"),
        None => format!("for=\"{src}\""),
    }
}

/// A fresh W3C trace context for one tunnelled connection (sampled flag off).
pub fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let parent: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{parent:016x}-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_quotes_the_client_and_brackets_ipv6() {
        assert_eq!(
            forwarded("198.18.0.1:4000".parse().unwrap(), None),
            "for=\"198.18.0.1:4000\""
        );
        assert_eq!(
            forwarded("[2001:2::1]:4000".parse().unwrap(), Some("echo.demo.svc")),
            "for=\"[2001:2::1]:4000\";host=echo.demo.svc"
        );
    }

    #[test]
    fn traceparent_has_the_w3c_shape() {
        let tp = traceparent();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[3]), ("00", "00"));
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert!(parts[1].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(traceparent(), tp);
    }
}
