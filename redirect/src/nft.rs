//! The plan as one `nft -f` transaction on our own `inet` table.
//!
//! The transaction creates the table if missing, deletes it, and defines it again in full, so
//! it applies atomically and any earlier version of our rules (another mode, other families) is
//! replaced whole; nothing outside our table is touched. One `inet` table serves both families:
//! every rule names its family with `meta nfproto`, so a family the plan leaves out is not
//! captured. Base chains use iptables' priorities (mangle -150, nat -100) so they order the
//! same way against each other.

use std::fmt::Write;
use std::net::IpAddr;

use crate::plan::{Action, Chain, Family, Hook, MarkMatch, Match, Rule, RuleSet, Table};

/// Name of our `inet` table.
pub const TABLE: &str = "ambientd";

fn chain_name(chain: Chain) -> &'static str {
    match (chain.table, chain.hook) {
        (Table::Mangle, Hook::Prerouting) => "mangle-prerouting",
        (Table::Mangle, Hook::Output) => "mangle-output",
        (Table::Nat, Hook::Prerouting) => "nat-prerouting",
        (Table::Nat, Hook::Output) => "nat-output",
    }
}

fn chain_type(chain: Chain) -> &'static str {
    match (chain.table, chain.hook) {
        (Table::Mangle, Hook::Prerouting) => "type filter hook prerouting priority -150",
        // A route chain re-routes when the mark changes, as iptables' mangle OUTPUT does.
        (Table::Mangle, Hook::Output) => "type route hook output priority -150",
        (Table::Nat, Hook::Prerouting) => "type nat hook prerouting priority -100",
        (Table::Nat, Hook::Output) => "type nat hook output priority -100",
    }
}

/// A transaction that deletes our table whether or not it exists.
pub(crate) fn removal() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

impl RuleSet {
    /// One `nft -f -` transaction that replaces our `inet` table with this plan.
    pub fn render_nft(&self) -> String {
        let families = self.families();
        let mut out = removal();
        let _ = writeln!(out, "table inet {TABLE} {{");
        let chains: Vec<Chain> = Chain::ALL
            .into_iter()
            .filter(|&c| families.iter().any(|&f| self.chains(f).contains(&c)))
            .collect();
        for (i, &chain) in chains.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(out, "\tchain {} {{", chain_name(chain));
            let _ = writeln!(out, "\t\t{}; policy accept;", chain_type(chain));
            for &family in &families {
                for rule in self.chain_rules(family, chain) {
                    for line in rule_lines(rule) {
                        let _ = writeln!(out, "\t\t{line}");
                    }
                }
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }
}

fn rule_lines(rule: &Rule) -> Vec<String> {
    let mut matches = format!("meta nfproto {}", rule.family.as_str());
    for m in &rule.matches {
        matches.push(' ');
        matches.push_str(&match_expr(rule.family, m));
    }
    let action = match &rule.action {
        Action::Accept => "accept".to_owned(),
        Action::Redirect { port } => format!("redirect to :{port}"),
        Action::Tproxy { port, mark } => {
            let proto = match rule.family {
                Family::V4 => "ip",
                Family::V6 => "ip6",
            };
            // Unlike iptables' TPROXY, nft's tproxy just ends the rule when no listener takes
            // the packet; the drop keeps such a packet from reaching the app uncaptured.
            return vec![
                format!(
                    "{matches} tproxy {proto} to :{port} meta mark set {} accept",
                    masked_set("meta mark", mark)
                ),
                format!("{matches} drop"),
            ];
        }
        Action::SetConnMark(m) => format!("ct mark set {}", masked_set("ct mark", m)),
        Action::RestoreMark => "meta mark set ct mark".to_owned(),
    };
    vec![format!("{matches} {action}")]
}

fn addr_key(family: Family, direction: &str) -> String {
    match family {
        Family::V4 => format!("ip {direction}"),
        Family::V6 => format!("ip6 {direction}"),
    }
}

fn masked(key: &str, m: &MarkMatch, op: &str) -> String {
    format!("{key} & {:#x} {op} {:#x}", m.mask, m.value)
}

/// `key` with the masked bits replaced by the mark's value, the other bits kept.
fn masked_set(key: &str, m: &MarkMatch) -> String {
    format!("{key} & {:#x} | {:#x}", !m.mask, m.value)
}

fn addr(a: &IpAddr) -> String {
    a.to_string()
}

fn match_expr(family: Family, m: &Match) -> String {
    match m {
        Match::Tcp => "meta l4proto tcp".to_owned(),
        Match::Source(a) => format!("{} {}", addr_key(family, "saddr"), addr(a)),
        Match::Destination(a) => format!("{} {}", addr_key(family, "daddr"), addr(a)),
        Match::NotDestination(a) => format!("{} != {}", addr_key(family, "daddr"), addr(a)),
        Match::InInterface(i) => format!("iifname \"{i}\""),
        Match::OutInterface(i) => format!("oifname \"{i}\""),
        Match::DestinationPort(p) => format!("tcp dport {p}"),
        Match::NotDestinationPort(p) => format!("tcp dport != {p}"),
        Match::Mark(m) => masked("meta mark", m, "=="),
        Match::NotMark(m) => masked("meta mark", m, "!="),
        Match::ConnMark(m) => masked("ct mark", m, "=="),
        Match::Established => "ct state established,related".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureConfig, InboundMode};

    fn plan(inbound: InboundMode, ipv4: bool, ipv6: bool) -> RuleSet {
        RuleSet::plan(&CaptureConfig {
            inbound,
            ipv4,
            ipv6,
            ..CaptureConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn transaction_replaces_only_our_table() {
        let text = plan(InboundMode::Redirect, true, true).render_nft();
        assert!(text.starts_with(
            "table inet ambientd {}\ndelete table inet ambientd\ntable inet ambientd {\n"
        ));
        let tables: Vec<&str> = text.lines().filter(|l| l.starts_with("table ")).collect();
        assert_eq!(tables.len(), 2);
        assert!(!text.contains("flush ruleset"));
        assert_eq!(
            removal(),
            "table inet ambientd {}\ndelete table inet ambientd\n"
        );
    }

    #[test]
    fn every_rule_names_its_family() {
        let text = plan(InboundMode::Tproxy, false, true).render_nft();
        let rules: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.starts_with("type")
                    && !l.starts_with("chain")
                    && !l.starts_with("table")
                    && !l.starts_with("delete")
                    && *l != "}"
                    && !l.is_empty()
            })
            .collect();
        assert!(!rules.is_empty());
        assert!(
            rules.iter().all(|l| l.starts_with("meta nfproto ipv6 ")),
            "{rules:#?}"
        );
        assert!(!text.contains("ip daddr") && text.contains("ip6 daddr != ::1"));
    }

    #[test]
    fn tproxy_is_followed_by_a_drop_with_the_same_matches() {
        let text = plan(InboundMode::Tproxy, true, false).render_nft();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let tproxy: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].contains(" tproxy "))
            .collect();
        assert_eq!(tproxy.len(), 2);
        for i in tproxy {
            let matches = lines[i].split(" tproxy ").next().unwrap();
            assert_eq!(lines[i + 1], format!("{matches} drop"));
            assert!(lines[i].ends_with("meta mark set meta mark & 0xfffff000 | 0x111 accept"));
        }
    }

    #[test]
    fn unused_chains_are_not_declared() {
        let text = plan(InboundMode::Tproxy, true, true).render_nft();
        assert!(!text.contains("nat-prerouting"));
        let text = plan(InboundMode::Redirect, true, true).render_nft();
        assert!(text.contains(
            "chain nat-prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n"
        ));
    }
}
