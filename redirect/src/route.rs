//! The return path's policy routing as `ip` commands, and reading `ip`'s listings back.
//!
//! `ip rule add` refuses an identical rule on current kernels but older ones stack duplicates,
//! so installing first lists the rules and adds only a missing one; removal deletes as many as
//! are listed. The route uses `replace`, which is idempotent by itself.

use std::fmt::Write;

use crate::plan::{Family, ReturnRoute, RuleSet};

impl Family {
    pub(crate) fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

impl ReturnRoute {
    /// Arguments of `ip` for `ip rule <op> fwmark … lookup … pref …` (`op`: add or del).
    pub fn rule_args(&self, op: &str) -> Vec<String> {
        [
            self.family.ip_flag(),
            "rule",
            op,
            "fwmark",
            &format!("{:#x}/{:#x}", self.fwmark.value, self.fwmark.mask),
            "lookup",
            &self.table.to_string(),
            "pref",
            &self.priority.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Arguments of `ip` for `ip route <op> local default dev lo table …` (replace or del).
    pub fn route_args(&self, op: &str) -> Vec<String> {
        [
            self.family.ip_flag(),
            "route",
            op,
            "local",
            self.family.default_route(),
            "dev",
            "lo",
            "table",
            &self.table.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Arguments of `ip` listing the rules [`ReturnRoute::count_rules`] reads.
    pub(crate) fn list_rules_args(&self) -> Vec<String> {
        [self.family.ip_flag(), "rule", "show"]
            .map(str::to_owned)
            .to_vec()
    }

    /// Arguments of `ip` listing the routes [`ReturnRoute::has_route`] reads. All tables:
    /// showing table 100 alone fails while it has never held a route.
    pub(crate) fn list_routes_args(&self) -> Vec<String> {
        [self.family.ip_flag(), "route", "show", "table", "all"]
            .map(str::to_owned)
            .to_vec()
    }

    /// How many copies of our rule `ip rule show` lists.
    pub(crate) fn count_rules(&self, listing: &str) -> usize {
        listing.lines().filter(|l| self.is_our_rule(l)).count()
    }

    fn is_our_rule(&self, line: &str) -> bool {
        let mut tokens = line.split_whitespace();
        if tokens.next() != Some(&format!("{}:", self.priority)) {
            return false;
        }
        let rest: Vec<&str> = tokens.collect();
        let ["from", "all", "fwmark", mark, "lookup", table] = rest[..] else {
            return false;
        };
        let (value, mask) = match mark.split_once('/') {
            Some((v, m)) => (parse_hex(v), parse_hex(m)),
            // iproute2 omits a full mask.
            None => (parse_hex(mark), Some(u32::MAX)),
        };
        value == Some(self.fwmark.value)
            && mask == Some(self.fwmark.mask)
            && table == self.table.to_string()
    }

    /// Whether `ip route show table all` lists our local default route.
    pub(crate) fn has_route(&self, listing: &str) -> bool {
        let table = self.table.to_string();
        listing.lines().any(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            matches!(
                tokens[..],
                ["local", dst, "dev", "lo", "table", t, ..]
                    if (dst == "default" || dst == self.family.default_route()) && t == table
            )
        })
    }
}

fn parse_hex(text: &str) -> Option<u32> {
    u32::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

impl RuleSet {
    /// The `ip` commands that install the return path, one per line, for review and golden
    /// files ([`crate::apply`] adds the rule only when it is missing).
    pub fn render_routes(&self) -> String {
        let mut out = String::new();
        for route in self.routes() {
            let _ = writeln!(out, "ip {}", route.rule_args("add").join(" "));
            let _ = writeln!(out, "ip {}", route.route_args("replace").join(" "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::MarkMatch;

    fn route(family: Family) -> ReturnRoute {
        ReturnRoute {
            family,
            fwmark: MarkMatch {
                value: 0x111,
                mask: 0xfff,
            },
            table: 100,
            priority: 32764,
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            route(Family::V4).rule_args("add").join(" "),
            "-4 rule add fwmark 0x111/0xfff lookup 100 pref 32764"
        );
        assert_eq!(
            route(Family::V6).route_args("replace").join(" "),
            "-6 route replace local ::/0 dev lo table 100"
        );
    }

    #[test]
    fn counts_only_our_rule() {
        let listing = "0:\tfrom all lookup local\n\
                       32764:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                       32764:\tfrom all fwmark 0x111/0xfff lookup 100 \n\
                       32764:\tfrom all fwmark 0x111/0xffff lookup 100\n\
                       32764:\tfrom all fwmark 0x111 lookup 100\n\
                       32765:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                       32764:\tfrom all iif eth0 fwmark 0x111/0xfff lookup 100\n\
                       32764:\tfrom all fwmark 0x111/0xfff lookup 101\n\
                       32766:\tfrom all lookup main\n";
        assert_eq!(route(Family::V4).count_rules(listing), 2);
        let full_mask = ReturnRoute {
            fwmark: MarkMatch {
                value: 0x111,
                mask: u32::MAX,
            },
            ..route(Family::V4)
        };
        assert_eq!(full_mask.count_rules(listing), 1);
    }

    #[test]
    fn finds_the_local_default_route() {
        let v4 = "local default dev lo table 100 scope host \n\
                  local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1\n";
        assert!(route(Family::V4).has_route(v4));
        let v6 = "local default dev lo table 100 metric 1024 pref medium\n";
        assert!(route(Family::V6).has_route(v6));
        assert!(route(Family::V6).has_route("local ::/0 dev lo table 100 metric 1024\n"));
        assert!(!route(Family::V4).has_route("local default dev lo table 101 scope host\n"));
        assert!(!route(Family::V4).has_route("local default dev eth0 table 100 scope host\n"));
        assert!(!route(Family::V4).has_route("local default dev lo scope host\n"));
        assert!(!route(Family::V4).has_route("default via 198.18.0.1 dev eth0\n"));
        assert!(!route(Family::V4).has_route(""));
    }
}
