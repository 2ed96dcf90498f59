//! ambientd, the node agent: configuration, wiring and lifecycle, and the L4 proxy that
//! carries enrolled workloads' TCP traffic over HBONE.
//!
//! The mesh state comes from `xds`, certificates from `ca-client`; this crate turns them into
//! listeners, TLS sessions and proxied connections. See ARCHITECTURE.md for the runtime split
//! and the port table.

pub mod app;
pub mod bench;
pub mod ca;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control_plane;
pub mod demo;
pub mod drain;
pub mod enrollment;
pub mod events;
pub mod logs;
pub mod mesh;
pub mod netns;
pub mod proxy;
pub mod readiness;
pub mod residency;
pub mod tls;

/// An error and its causes on one line, `outer: cause: root cause`, as `{:#}` prints them,
/// but without a cause whose text the error before it already shows: most of our errors
/// write their source into their own message and also report it as their source, so `{:#}`
/// repeated the root cause once per layer ("…: No such file or directory (os error 2): No
/// such file or directory (os error 2): …").
pub fn describe(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    let mut shown = out.clone();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !shown.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        shown = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe;

    /// Shows its source in its message and reports it as its source too.
    #[derive(Debug, thiserror::Error)]
    #[error("running iptables-save: {source}")]
    struct Layer {
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_shown_once() {
        let root = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Layer { source: root }).context("pod p: capture rules");
        assert_eq!(
            format!("{e:#}"),
            "pod p: capture rules: running iptables-save: no such file: no such file"
        );
        assert_eq!(
            describe(&e),
            "pod p: capture rules: running iptables-save: no such file"
        );
    }

    #[test]
    fn causes_that_are_not_in_the_message_are_kept() {
        let root = std::io::Error::other("disk full");
        let e = anyhow::Error::new(root)
            .context("writing the state")
            .context("ca init");
        assert_eq!(describe(&e), "ca init: writing the state: disk full");
    }
}
