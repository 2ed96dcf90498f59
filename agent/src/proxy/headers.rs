//! HBONE request and response headers: `baggage`, `forwarded`, `traceparent`
//! (facts in `shared/protocol/hbone.md` §3).

use std::fmt::Write;
use std::net::SocketAddr;

use http::HeaderValue;
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

/// A header value that differs on every tunnelled connection (`forwarded` has the client's
/// port, `traceparent` is random), marked never-indexed for HPACK.
///
/// Indexed, each such value is inserted into both ends' dynamic tables of the pooled
/// connection only to be evicted by the next one: copies and table churn on every new
/// connection, and ~4 KiB of header copies kept per pooled connection on each side, for
/// nothing. `baggage` stays indexed: it is the same for every connection from a workload.
pub fn unindexed(value: String) -> HeaderValue {
    let mut value =
        HeaderValue::try_from(value).expect("forwarded and traceparent values are visible ASCII");
    value.set_sensitive(true);
    value
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
    fn per_connection_values_are_not_indexed() {
        let v = unindexed(forwarded("198.18.0.1:4000".parse().unwrap(), None));
        assert!(v.is_sensitive());
        assert_eq!(v, "for=\"198.18.0.1:4000\"");
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
