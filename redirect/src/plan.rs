//! The capture plan: [`CaptureConfig`] in, a list of netfilter rules and return routes out,
//! with nothing run and nothing rendered. Both backends render this one list, so iptables and
//! nftables capture the same traffic by construction. The rules follow DESIGN.md "Capture
//! rules" (the facts are Istio ambient's in-pod rules).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{CaptureConfig, ConfigError, InboundMode};

/// An IP family; iptables needs one restore per family, nft one rule per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `ipv4` / `ipv6`, as nft's `meta nfproto` and golden file names spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}

/// The netfilter table a rule lives in, with iptables' meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Runs before nat; marks, connmarks and TPROXY.
    Mangle,
    /// First packet of a connection only; REDIRECT.
    Nat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// Packets arriving at the pod, including over `lo`.
    Prerouting,
    /// Packets sent by processes in the pod.
    Output,
}

/// One of our chains: attached to `hook` in `table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chain {
    pub table: Table,
    pub hook: Hook,
}

impl Chain {
    pub const MANGLE_PREROUTING: Chain = Chain {
        table: Table::Mangle,
        hook: Hook::Prerouting,
    };
    pub const MANGLE_OUTPUT: Chain = Chain {
        table: Table::Mangle,
        hook: Hook::Output,
    };
    pub const NAT_PREROUTING: Chain = Chain {
        table: Table::Nat,
        hook: Hook::Prerouting,
    };
    pub const NAT_OUTPUT: Chain = Chain {
        table: Table::Nat,
        hook: Hook::Output,
    };
    /// Every chain we may own, in the order packets meet them per hook (mangle before nat).
    pub const ALL: [Chain; 4] = [
        Chain::MANGLE_PREROUTING,
        Chain::MANGLE_OUTPUT,
        Chain::NAT_PREROUTING,
        Chain::NAT_OUTPUT,
    ];
}

/// `value/mask` of a packet or connection mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MarkMatch {
    pub value: u32,
    pub mask: u32,
}

/// One condition of a rule; a rule matches when all of its conditions do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    Tcp,
    Source(IpAddr),
    Destination(IpAddr),
    NotDestination(IpAddr),
    InInterface(&'static str),
    OutInterface(&'static str),
    /// Needs [`Match::Tcp`] earlier in the same rule.
    DestinationPort(u16),
    NotDestinationPort(u16),
    Mark(MarkMatch),
    NotMark(MarkMatch),
    ConnMark(MarkMatch),
    /// Conntrack state ESTABLISHED or RELATED.
    Established,
}

/// What happens to a matching packet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Stop evaluating our chain; the packet goes on uncaptured.
    Accept,
    /// Rewrite the destination to the local `port` (nat).
    Redirect { port: u16 },
    /// Hand the connection to a transparent listener on `port` and set `mark` for the
    /// local route. With no listener the packet is dropped, never delivered uncaptured.
    Tproxy { port: u16, mark: MarkMatch },
    /// Set the masked bits of the connection mark, keeping the rest.
    SetConnMark(MarkMatch),
    /// Copy the connection mark to the packet mark (so policy routing sees it).
    RestoreMark,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub family: Family,
    pub chain: Chain,
    pub matches: Vec<Match>,
    pub action: Action,
}

/// The return path of one family: `ip rule add fwmark F/M lookup T pref P` and
/// `ip route replace local default dev lo table T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReturnRoute {
    pub family: Family,
    pub fwmark: MarkMatch,
    pub table: u32,
    pub priority: u32,
}

/// Everything to install in one pod netns, in order. Built only by [`RuleSet::plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    config: CaptureConfig,
    rules: Vec<Rule>,
    routes: Vec<ReturnRoute>,
    /// Chains hooked though they hold no rule (see [`RuleSet::return_path`]).
    empty_chains: Vec<(Family, Chain)>,
}

impl RuleSet {
    /// Plans the rules for `config`; no side effects.
    pub fn plan(config: &CaptureConfig) -> Result<RuleSet, ConfigError> {
        config.validate()?;
        let families: Vec<Family> = Family::ALL
            .into_iter()
            .filter(|f| match f {
                Family::V4 => config.ipv4,
                Family::V6 => config.ipv6,
            })
            .collect();
        let mut rules = Vec::new();
        let mut routes = Vec::new();
        for &family in &families {
            plan_family(config, family, &mut rules);
            routes.push(ReturnRoute {
                family,
                fwmark: MarkMatch {
                    value: config.connmark,
                    mask: config.mark_mask,
                },
                table: config.route_table,
                priority: config.rule_priority,
            });
        }
        Ok(RuleSet {
            config: config.clone(),
            rules,
            routes,
            empty_chains: Vec::new(),
        })
    }

    pub fn config(&self) -> &CaptureConfig {
        &self.config
    }

    /// The families this plan captures, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        self.routes.iter().map(|r| r.family).collect()
    }

    /// All rules, grouped by family, in evaluation order within each chain.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules of one chain for one family, in evaluation order.
    pub fn chain_rules(&self, family: Family, chain: Chain) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(move |r| r.family == family && r.chain == chain)
    }

    /// Our chains for `family`, in [`Chain::ALL`] order: those that carry rules, and those
    /// kept hooked without any.
    pub fn chains(&self, family: Family) -> Vec<Chain> {
        Chain::ALL
            .into_iter()
            .filter(|&c| {
                self.chain_rules(family, c).next().is_some()
                    || self.empty_chains.contains(&(family, c))
            })
            .collect()
    }

    pub fn routes(&self) -> &[ReturnRoute] {
        &self.routes
    }

    /// This plan without its capture: only what the connections already captured need. The
    /// connection mark on the agent's packets, the mark restored on the app's replies and
    /// the return routes bring back the replies to a client's address the agent delivered
    /// from; without them those leave through the pod's interface. Every chain stays hooked,
    /// emptied: the kernel translates a redirected connection's packets only while a nat
    /// chain is hooked in the namespace, and nft unhooks with the last one (the connections
    /// the agent held on its ports then broke). Installed over the full plan when a pod
    /// leaves, it stops new captures at once while the connections in flight drain.
    pub fn return_path(&self) -> RuleSet {
        let rules: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| r.action.is_return_path())
            .cloned()
            .collect();
        let empty_chains = self
            .families()
            .into_iter()
            .flat_map(|f| self.chains(f).into_iter().map(move |c| (f, c)))
            .filter(|&(f, c)| !rules.iter().any(|r| r.family == f && r.chain == c))
            .collect();
        RuleSet {
            config: self.config.clone(),
            rules,
            routes: self.routes.clone(),
            empty_chains,
        }
    }
}

impl Action {
    /// Marks for the return path rather than capture.
    fn is_return_path(&self) -> bool {
        matches!(self, Action::SetConnMark(_) | Action::RestoreMark)
    }
}

fn plan_family(config: &CaptureConfig, family: Family, rules: &mut Vec<Rule>) {
    let loopback = family.loopback();
    let probe = match family {
        Family::V4 => IpAddr::V4(config.probe_v4),
        Family::V6 => IpAddr::V6(config.probe_v6),
    };
    let agent = MarkMatch {
        value: config.socket_mark,
        mask: config.mark_mask,
    };
    let connmark = MarkMatch {
        value: config.connmark,
        mask: config.mark_mask,
    };
    let mut add = |chain: Chain, matches: Vec<Match>, action: Action| {
        rules.push(Rule {
            family,
            chain,
            matches,
            action,
        })
    };
    use Match::*;

    // Return path: the agent connects to the app with the peer's address as source; its
    // packets reach PREROUTING over lo still carrying the socket mark. Tag the connection so
    // the app's replies (to a remote-looking address) are routed back to the local stack.
    add(
        Chain::MANGLE_PREROUTING,
        vec![Mark(agent)],
        Action::SetConnMark(connmark),
    );

    match config.inbound {
        InboundMode::Redirect => {
            add(
                Chain::NAT_PREROUTING,
                vec![Tcp, Source(probe)],
                Action::Accept,
            );
            // HBONE already arrives at the agent's own port.
            add(
                Chain::NAT_PREROUTING,
                vec![
                    Tcp,
                    NotDestination(loopback),
                    NotDestinationPort(config.inbound_hbone_port),
                    NotMark(agent),
                ],
                Action::Redirect {
                    port: config.inbound_plaintext_port,
                },
            );
        }
        InboundMode::Tproxy => {
            add(
                Chain::MANGLE_PREROUTING,
                vec![Tcp, Source(probe)],
                Action::Accept,
            );
            // mangle sees every packet, not only the first: the pod talking to its own IP
            // (and the agent's spoofed connections) come back in over lo and must pass.
            add(
                Chain::MANGLE_PREROUTING,
                vec![Tcp, InInterface("lo"), NotDestination(loopback)],
                Action::Accept,
            );
            add(
                Chain::MANGLE_PREROUTING,
                vec![
                    Tcp,
                    DestinationPort(config.inbound_hbone_port),
                    NotMark(agent),
                ],
                Action::Tproxy {
                    port: config.inbound_hbone_port,
                    mark: connmark,
                },
            );
            // Replies to the pod's own outbound connections must not be taken as inbound.
            add(
                Chain::MANGLE_PREROUTING,
                vec![Tcp, Established],
                Action::Accept,
            );
            add(
                Chain::MANGLE_PREROUTING,
                vec![Tcp, NotDestination(loopback), NotMark(agent)],
                Action::Tproxy {
                    port: config.inbound_plaintext_port,
                    mark: connmark,
                },
            );
        }
    }

    add(
        Chain::MANGLE_OUTPUT,
        vec![ConnMark(connmark)],
        Action::RestoreMark,
    );

    add(
        Chain::NAT_OUTPUT,
        vec![Tcp, Destination(probe)],
        Action::Accept,
    );
    add(Chain::NAT_OUTPUT, vec![Tcp, Mark(connmark)], Action::Accept);
    // The pod calling its own IP is local traffic, not a mesh connection.
    add(
        Chain::NAT_OUTPUT,
        vec![Tcp, OutInterface("lo"), NotDestination(loopback)],
        Action::Accept,
    );
    add(
        Chain::NAT_OUTPUT,
        vec![Tcp, NotDestination(loopback), NotMark(agent)],
        Action::Redirect {
            port: config.outbound_port,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn invalid_config_makes_no_plan() {
        let config = CaptureConfig {
            ipv4: false,
            ipv6: false,
            ..CaptureConfig::default()
        };
        assert_eq!(RuleSet::plan(&config), Err(ConfigError::NoFamily));
    }

    #[test]
    fn families_follow_the_config() {
        assert_eq!(
            plan(InboundMode::Redirect, true, true).families(),
            [Family::V4, Family::V6]
        );
        let v6 = plan(InboundMode::Redirect, false, true);
        assert_eq!(v6.families(), [Family::V6]);
        assert!(v6.rules().iter().all(|r| r.family == Family::V6));
        assert_eq!(v6.routes().len(), 1);
        assert!(v6.chains(Family::V4).is_empty());
    }

    #[test]
    fn outbound_is_redirected_last_after_every_exception() {
        for mode in [InboundMode::Redirect, InboundMode::Tproxy] {
            let set = plan(mode, true, true);
            for family in Family::ALL {
                let rules: Vec<_> = set.chain_rules(family, Chain::NAT_OUTPUT).collect();
                let last = rules.last().unwrap();
                assert_eq!(last.action, Action::Redirect { port: 15001 });
                assert!(last.matches.contains(&Match::NotMark(MarkMatch {
                    value: 0x539,
                    mask: 0xfff
                })));
                assert!(
                    last.matches
                        .contains(&Match::NotDestination(family.loopback()))
                );
                assert!(
                    rules[..rules.len() - 1]
                        .iter()
                        .all(|r| r.action == Action::Accept)
                );
            }
        }
    }

    #[test]
    fn redirect_mode_uses_nat_and_skips_hbone() {
        let set = plan(InboundMode::Redirect, true, false);
        assert_eq!(set.chains(Family::V4), Chain::ALL);
        let redirect = set
            .chain_rules(Family::V4, Chain::NAT_PREROUTING)
            .find(|r| r.action == Action::Redirect { port: 15006 })
            .unwrap();
        assert!(redirect.matches.contains(&Match::NotDestinationPort(15008)));
        assert!(
            set.rules()
                .iter()
                .all(|r| !matches!(r.action, Action::Tproxy { .. }))
        );
    }

    #[test]
    fn tproxy_mode_uses_mangle_only_for_inbound() {
        let set = plan(InboundMode::Tproxy, false, true);
        assert_eq!(
            set.chains(Family::V6),
            [
                Chain::MANGLE_PREROUTING,
                Chain::MANGLE_OUTPUT,
                Chain::NAT_OUTPUT
            ]
        );
        let ports: Vec<u16> = set
            .rules()
            .iter()
            .filter_map(|r| match r.action {
                Action::Tproxy { port, mark } => {
                    assert_eq!(
                        mark,
                        MarkMatch {
                            value: 0x111,
                            mask: 0xfff
                        }
                    );
                    Some(port)
                }
                _ => None,
            })
            .collect();
        assert_eq!(ports, [15008, 15006]);
        // Established replies are let through before the catch-all TPROXY.
        let prerouting: Vec<_> = set
            .chain_rules(Family::V6, Chain::MANGLE_PREROUTING)
            .collect();
        let established = prerouting
            .iter()
            .position(|r| r.matches.contains(&Match::Established))
            .unwrap();
        let plaintext = prerouting
            .iter()
            .position(|r| {
                r.action
                    == Action::Tproxy {
                        port: 15006,
                        mark: MarkMatch {
                            value: 0x111,
                            mask: 0xfff,
                        },
                    }
            })
            .unwrap();
        assert!(established < plaintext);
    }

    #[test]
    fn probes_are_let_through_per_family() {
        let set = plan(InboundMode::Redirect, true, true);
        let v6_probe: IpAddr = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff".parse().unwrap();
        let first = set
            .chain_rules(Family::V6, Chain::NAT_PREROUTING)
            .next()
            .unwrap();
        assert_eq!(first.matches, [Match::Tcp, Match::Source(v6_probe)]);
        assert_eq!(first.action, Action::Accept);
        let first = set
            .chain_rules(Family::V4, Chain::NAT_PREROUTING)
            .next()
            .unwrap();
        assert_eq!(
            first.matches,
            [Match::Tcp, Match::Source("169.254.7.127".parse().unwrap())]
        );
    }

    #[test]
    fn return_path_in_both_modes() {
        for mode in [InboundMode::Redirect, InboundMode::Tproxy] {
            let set = plan(mode, true, true);
            let tag = Rule {
                family: Family::V4,
                chain: Chain::MANGLE_PREROUTING,
                matches: vec![Match::Mark(MarkMatch {
                    value: 0x539,
                    mask: 0xfff,
                })],
                action: Action::SetConnMark(MarkMatch {
                    value: 0x111,
                    mask: 0xfff,
                }),
            };
            assert_eq!(set.rules()[0], tag);
            assert!(set.rules().iter().any(|r| r.family == Family::V6
                && r.chain == Chain::MANGLE_OUTPUT
                && r.action == Action::RestoreMark));
            assert_eq!(
                set.routes(),
                [Family::V4, Family::V6].map(|family| ReturnRoute {
                    family,
                    fwmark: MarkMatch {
                        value: 0x111,
                        mask: 0xfff
                    },
                    table: 100,
                    priority: 32764,
                })
            );
        }
    }

    #[test]
    fn return_path_keeps_the_marks_and_routes_and_no_capture() {
        for mode in [InboundMode::Redirect, InboundMode::Tproxy] {
            let set = plan(mode, true, true);
            let kept = set.return_path();
            let actions: Vec<(Family, Chain, &Action)> = kept
                .rules()
                .iter()
                .map(|r| (r.family, r.chain, &r.action))
                .collect();
            let tag = Action::SetConnMark(MarkMatch {
                value: 0x111,
                mask: 0xfff,
            });
            assert_eq!(
                actions,
                [
                    (Family::V4, Chain::MANGLE_PREROUTING, &tag),
                    (Family::V4, Chain::MANGLE_OUTPUT, &Action::RestoreMark),
                    (Family::V6, Chain::MANGLE_PREROUTING, &tag),
                    (Family::V6, Chain::MANGLE_OUTPUT, &Action::RestoreMark),
                ],
                "{mode:?}"
            );
            assert_eq!(kept.routes(), set.routes());
            assert_eq!(kept.families(), set.families());
            for family in [Family::V4, Family::V6] {
                assert_eq!(kept.chains(family), set.chains(family), "{mode:?}");
                assert_eq!(kept.chain_rules(family, Chain::NAT_OUTPUT).count(), 0);
            }
        }
    }
}
