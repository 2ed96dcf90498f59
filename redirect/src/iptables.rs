//! The plan as `iptables-restore --noflush` input, one per IP family.
//!
//! We own two user chains per table and one jump to each from the built-in chain. `--noflush`
//! leaves everyone else's rules alone; declaring our chains (`:NAME - [0:0]`) creates or
//! flushes them inside the same atomic commit. Jumps in built-in chains cannot be declared, so
//! the script is computed against the current `iptables-save` output: it inserts a missing jump,
//! deletes duplicates, and deletes chains of ours the plan no longer uses. Removal is the same
//! script with nothing wanted. Whether the kernel side is legacy xtables or nf_tables is
//! whatever the installed `iptables-restore` is (Debian's default is `iptables-nft`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;

use crate::plan::{Action, Chain, Family, Hook, MarkMatch, Match, Rule, RuleSet, Table};

/// Our chain hooked from `PREROUTING` (in mangle and nat).
pub const PREROUTING_CHAIN: &str = "AMBIENTD_PRERT";
/// Our chain hooked from `OUTPUT` (in mangle and nat).
pub const OUTPUT_CHAIN: &str = "AMBIENTD_OUTPUT";

fn table_name(table: Table) -> &'static str {
    match table {
        Table::Mangle => "mangle",
        Table::Nat => "nat",
    }
}

fn builtin(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => "PREROUTING",
        Hook::Output => "OUTPUT",
    }
}

fn ours(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => PREROUTING_CHAIN,
        Hook::Output => OUTPUT_CHAIN,
    }
}

/// Our chains and jumps as `iptables-save` shows them for one family.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Saved {
    /// Our chains that exist, with the number of plain jumps to them from their built-in chain.
    chains: BTreeMap<Chain, usize>,
}

impl Saved {
    pub(crate) fn parse(save: &str) -> Saved {
        let mut saved = Saved::default();
        let mut table = None;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = match name {
                    "mangle" => Some(Table::Mangle),
                    "nat" => Some(Table::Nat),
                    _ => None,
                };
                continue;
            }
            let Some(table) = table else { continue };
            for hook in [Hook::Prerouting, Hook::Output] {
                let chain = Chain { table, hook };
                let declared = line
                    .strip_prefix(':')
                    .and_then(|rest| rest.split_whitespace().next())
                    == Some(ours(hook));
                if declared {
                    saved.chains.entry(chain).or_insert(0);
                }
                if line == format!("-A {} -j {}", builtin(hook), ours(hook)) {
                    *saved.chains.entry(chain).or_insert(0) += 1;
                }
            }
        }
        saved
    }

    /// Nothing of ours is left.
    pub(crate) fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }
}

/// `iptables-restore --noflush` input that turns `saved` into exactly `plan`'s chains for
/// `family` (or into none of ours when `plan` is `None`).
pub(crate) fn script(plan: Option<&RuleSet>, family: Family, saved: &Saved) -> String {
    let wanted = plan.map(|p| p.chains(family)).unwrap_or_default();
    let mut out = String::new();
    for table in [Table::Mangle, Table::Nat] {
        let touched: Vec<Chain> = Chain::ALL
            .into_iter()
            .filter(|c| c.table == table)
            .filter(|c| wanted.contains(c) || saved.chains.contains_key(c))
            .collect();
        if touched.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", table_name(table));
        for chain in &touched {
            let _ = writeln!(out, ":{} - [0:0]", ours(chain.hook));
        }
        for chain in &touched {
            let jump = format!("{} -j {}", builtin(chain.hook), ours(chain.hook));
            let present = saved.chains.get(chain).copied().unwrap_or(0);
            if wanted.contains(chain) {
                // Insert at the top: a rule of someone else's that accepts first would let
                // traffic bypass capture.
                if present == 0 {
                    let _ = writeln!(out, "-I {} 1 -j {}", builtin(chain.hook), ours(chain.hook));
                }
                for _ in 1..present {
                    let _ = writeln!(out, "-D {jump}");
                }
            } else {
                for _ in 0..present {
                    let _ = writeln!(out, "-D {jump}");
                }
                let _ = writeln!(out, "-X {}", ours(chain.hook));
            }
        }
        if let Some(plan) = plan {
            for chain in touched.iter().filter(|c| wanted.contains(c)) {
                for rule in plan.chain_rules(family, *chain) {
                    let _ = writeln!(out, "{}", rule_line(rule));
                }
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn rule_line(rule: &Rule) -> String {
    let mut line = format!("-A {}", ours(rule.chain.hook));
    for m in &rule.matches {
        line.push(' ');
        line.push_str(&match_args(m));
    }
    line.push(' ');
    line.push_str(&action_args(&rule.action));
    line
}

fn host(addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn mark(m: &MarkMatch) -> String {
    format!("{:#x}/{:#x}", m.value, m.mask)
}

fn match_args(m: &Match) -> String {
    match m {
        Match::Tcp => "-p tcp".to_owned(),
        Match::Source(a) => format!("-s {}", host(a)),
        Match::Destination(a) => format!("-d {}", host(a)),
        Match::NotDestination(a) => format!("! -d {}", host(a)),
        Match::InInterface(i) => format!("-i {i}"),
        Match::OutInterface(i) => format!("-o {i}"),
        Match::DestinationPort(p) => format!("-m tcp --dport {p}"),
        Match::NotDestinationPort(p) => format!("-m tcp ! --dport {p}"),
        Match::Mark(m) => format!("-m mark --mark {}", mark(m)),
        Match::NotMark(m) => format!("-m mark ! --mark {}", mark(m)),
        Match::ConnMark(m) => format!("-m connmark --mark {}", mark(m)),
        Match::Established => "-m conntrack --ctstate RELATED,ESTABLISHED".to_owned(),
    }
}

fn action_args(action: &Action) -> String {
    match action {
        Action::Accept => "-j ACCEPT".to_owned(),
        Action::Redirect { port } => format!("-j REDIRECT --to-ports {port}"),
        // TPROXY drops the packet itself when no listener takes it: fail closed.
        Action::Tproxy { port, mark: m } => {
            format!("-j TPROXY --on-port {port} --tproxy-mark {}", mark(m))
        }
        Action::SetConnMark(m) => format!("-j CONNMARK --set-xmark {}", mark(m)),
        Action::RestoreMark => {
            "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff".to_owned()
        }
    }
}

impl RuleSet {
    /// `iptables-restore --noflush` input for `family` (`ip6tables-restore` for IPv6) as it is
    /// fed to a netns holding nothing of ours. Empty when the plan does not capture `family`.
    pub fn render_iptables(&self, family: Family) -> String {
        script(Some(self), family, &Saved::default())
    }

    /// The same input as fed to a netns where `installed` is in place (one jump to each of
    /// its chains).
    pub fn render_iptables_over(&self, family: Family, installed: &RuleSet) -> String {
        let saved = Saved {
            chains: installed
                .chains(family)
                .into_iter()
                .map(|c| (c, 1))
                .collect(),
        };
        script(Some(self), family, &saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureConfig, InboundMode};

    fn plan(inbound: InboundMode) -> RuleSet {
        RuleSet::plan(&CaptureConfig {
            inbound,
            ..CaptureConfig::default()
        })
        .unwrap()
    }

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:AMBIENTD_OUTPUT - [0:0]
:AMBIENTD_PRERT - [0:0]
-A PREROUTING -j AMBIENTD_PRERT
-A PREROUTING -j AMBIENTD_PRERT
-A PREROUTING -i eth0 -j AMBIENTD_PRERT
-A AMBIENTD_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:AMBIENTD_PRERT - [0:0]
-A PREROUTING -j AMBIENTD_PRERT
COMMIT
*filter
:AMBIENTD_OUTPUT - [0:0]
-A OUTPUT -j AMBIENTD_OUTPUT
COMMIT
";

    #[test]
    fn parses_our_chains_and_plain_jumps_only() {
        let saved = Saved::parse(SAVE);
        let want = BTreeMap::from([
            (Chain::MANGLE_PREROUTING, 2),
            (Chain::MANGLE_OUTPUT, 0),
            (Chain::NAT_PREROUTING, 1),
        ]);
        assert_eq!(saved.chains, want);
        assert!(Saved::parse("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").is_empty());
    }

    #[test]
    fn converges_from_an_old_state() {
        // Tproxy mode: nat PREROUTING is stale, mangle has a duplicate jump and a missing one.
        let script = script(
            Some(&plan(InboundMode::Tproxy)),
            Family::V4,
            &Saved::parse(SAVE),
        );
        let mangle = script.split("*nat").next().unwrap();
        assert!(mangle.contains("-D PREROUTING -j AMBIENTD_PRERT\n"));
        assert!(mangle.contains("-I OUTPUT 1 -j AMBIENTD_OUTPUT\n"));
        assert!(!mangle.contains("-I PREROUTING"));
        let nat = script.split("*nat").nth(1).unwrap();
        assert!(nat.starts_with("\n:AMBIENTD_PRERT - [0:0]\n:AMBIENTD_OUTPUT - [0:0]\n"));
        assert!(nat.contains("-D PREROUTING -j AMBIENTD_PRERT\n-X AMBIENTD_PRERT\n"));
        assert!(nat.contains("-I OUTPUT 1 -j AMBIENTD_OUTPUT\n"));
        assert!(!nat.contains("-A AMBIENTD_PRERT"));
        assert!(!script.contains("*filter"));
    }

    #[test]
    fn removal_deletes_every_jump_then_the_chain() {
        let script = script(None, Family::V4, &Saved::parse(SAVE));
        assert_eq!(
            script,
            "*mangle\n:AMBIENTD_PRERT - [0:0]\n:AMBIENTD_OUTPUT - [0:0]\n\
             -D PREROUTING -j AMBIENTD_PRERT\n-D PREROUTING -j AMBIENTD_PRERT\n\
             -X AMBIENTD_PRERT\n-X AMBIENTD_OUTPUT\nCOMMIT\n\
             *nat\n:AMBIENTD_PRERT - [0:0]\n-D PREROUTING -j AMBIENTD_PRERT\n\
             -X AMBIENTD_PRERT\nCOMMIT\n"
        );
        assert_eq!(super::script(None, Family::V4, &Saved::default()), "");
    }

    #[test]
    fn reapplying_the_plan_keeps_the_single_jump() {
        let set = plan(InboundMode::Redirect);
        let save = "*nat\n:AMBIENTD_OUTPUT - [0:0]\n:AMBIENTD_PRERT - [0:0]\n\
                    -A PREROUTING -j AMBIENTD_PRERT\n-A OUTPUT -j AMBIENTD_OUTPUT\nCOMMIT\n";
        let script = script(Some(&set), Family::V6, &Saved::parse(save));
        let nat = script.split("*nat").nth(1).unwrap();
        assert!(!nat.contains("-I ") && !nat.contains("-D ") && !nat.contains("-X "));
        assert!(nat.contains(
            "-A AMBIENTD_OUTPUT -p tcp ! -d ::1/128 -m mark ! --mark 0x539/0xfff \
             -j REDIRECT --to-ports 15001\n"
        ));
    }

    #[test]
    fn disabled_family_renders_nothing() {
        let set = RuleSet::plan(&CaptureConfig {
            ipv6: false,
            ..CaptureConfig::default()
        })
        .unwrap();
        assert_eq!(set.render_iptables(Family::V6), "");
        assert!(set.render_iptables(Family::V4).starts_with("*mangle\n"));
    }
}
