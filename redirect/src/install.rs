//! Applying and removing a [`RuleSet`] inside a pod's network namespace.
//!
//! Every tool runs in the namespace through [`Netns::run`] (a dedicated thread that `setns`es
//! and switches back), not `nsenter`: no util-linux dependency, no extra process per call, and
//! the same helper serves the agent's in-namespace listeners. Each tool call is atomic
//! (`iptables-restore --noflush` commits per table, `nft -f` is one transaction); apply is
//! idempotent and converges from any earlier state of ours; remove tolerates partial state.
//! Order: return routes before netfilter on apply, after it on remove. A pod leaving goes in
//! two steps: [`stop_capture`] (capture gone, return path kept), then [`remove`] after its
//! connections drain. Remove with the plan and backend that were applied: a family or backend
//! not named is not touched.

use std::path::PathBuf;

use crate::command::{self, CommandError};
use crate::iptables::{self, Saved};
use crate::netns::{Netns, NetnsError};
use crate::nft;
use crate::plan::{Family, ReturnRoute, RuleSet};

/// Which netfilter front end installs the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-restore`/`ip6tables-restore`: legacy xtables or nf_tables, whichever the
    /// installed binaries are (see [`Tools`]).
    Iptables,
    /// `nft`, one `inet` table.
    Nftables,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nft",
        }
    }
}

/// The programs run inside the namespace; [`Default`] finds them on `PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tools {
    pub iptables_restore: PathBuf,
    pub iptables_save: PathBuf,
    pub ip6tables_restore: PathBuf,
    pub ip6tables_save: PathBuf,
    pub nft: PathBuf,
    pub ip: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            iptables_restore: "iptables-restore".into(),
            iptables_save: "iptables-save".into(),
            ip6tables_restore: "ip6tables-restore".into(),
            ip6tables_save: "ip6tables-save".into(),
            nft: "nft".into(),
            ip: "ip".into(),
        }
    }
}

impl Tools {
    /// The `*-legacy-*` binaries of Debian's iptables package (xtables kernel tables).
    pub fn iptables_legacy() -> Tools {
        Tools {
            iptables_restore: "iptables-legacy-restore".into(),
            iptables_save: "iptables-legacy-save".into(),
            ip6tables_restore: "ip6tables-legacy-restore".into(),
            ip6tables_save: "ip6tables-legacy-save".into(),
            ..Tools::default()
        }
    }

    fn restore(&self, family: Family) -> &PathBuf {
        match family {
            Family::V4 => &self.iptables_restore,
            Family::V6 => &self.ip6tables_restore,
        }
    }

    fn save(&self, family: Family) -> &PathBuf {
        match family {
            Family::V4 => &self.iptables_save,
            Family::V6 => &self.ip6tables_save,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("in network namespace {netns}: {source}")]
    Command {
        netns: PathBuf,
        source: CommandError,
    },
}

/// `-w`: wait at most this many seconds for the xtables lock (legacy only; shared by all
/// namespaces on the host).
const XTABLES_WAIT_SECS: &str = "10";

/// Installs `plan` in `netns` with `backend`. Applying the same plan again changes nothing;
/// applying another plan replaces ours.
pub fn apply(
    netns: &Netns,
    plan: &RuleSet,
    backend: Backend,
    tools: &Tools,
) -> Result<(), InstallError> {
    apply_rules(netns, plan, backend, tools)?;
    tracing::info!(
        netns = %netns.path().display(),
        backend = backend.as_str(),
        inbound = plan.config().inbound.as_str(),
        "capture rules applied"
    );
    Ok(())
}

fn apply_rules(
    netns: &Netns,
    plan: &RuleSet,
    backend: Backend,
    tools: &Tools,
) -> Result<(), InstallError> {
    netns
        .run(|| {
            for route in plan.routes() {
                ensure_route(tools, route)?;
            }
            match backend {
                Backend::Iptables => {
                    for family in plan.families() {
                        let saved = Saved::parse(&save(tools, family)?);
                        let script = iptables::script(Some(plan), family, &saved);
                        restore(tools, family, &script)?;
                    }
                }
                Backend::Nftables => {
                    command::run(&tools.nft, &["-f", "-"], Some(&plan.render_nft()))?;
                }
            }
            Ok(())
        })?
        .map_err(|source| InstallError::Command {
            netns: netns.path().to_owned(),
            source,
        })
}

/// Stops capturing in `netns`, where `plan` is applied with `backend`, and keeps the return
/// path ([`RuleSet::return_path`]) for the connections already delivered, in one atomic step
/// per tool call. [`remove`] takes the rest away once they have drained.
pub fn stop_capture(
    netns: &Netns,
    plan: &RuleSet,
    backend: Backend,
    tools: &Tools,
) -> Result<(), InstallError> {
    apply_rules(netns, &plan.return_path(), backend, tools)?;
    tracing::info!(
        netns = %netns.path().display(),
        backend = backend.as_str(),
        "capture stopped, return path kept"
    );
    Ok(())
}

/// Removes everything `plan` installs with `backend` from `netns`, and any other chains of
/// ours. Succeeds when nothing (or only part) is there.
pub fn remove(
    netns: &Netns,
    plan: &RuleSet,
    backend: Backend,
    tools: &Tools,
) -> Result<(), InstallError> {
    netns
        .run(|| {
            match backend {
                Backend::Iptables => {
                    for family in plan.families() {
                        let saved = Saved::parse(&save(tools, family)?);
                        if !saved.is_empty() {
                            restore(tools, family, &iptables::script(None, family, &saved))?;
                        }
                    }
                }
                Backend::Nftables => {
                    command::run(&tools.nft, &["-f", "-"], Some(&nft::removal()))?;
                }
            }
            for route in plan.routes() {
                delete_route(tools, route)?;
            }
            Ok(())
        })?
        .map_err(|source| InstallError::Command {
            netns: netns.path().to_owned(),
            source,
        })?;
    tracing::info!(
        netns = %netns.path().display(),
        backend = backend.as_str(),
        "capture rules removed"
    );
    Ok(())
}

fn save(tools: &Tools, family: Family) -> Result<String, CommandError> {
    command::run(tools.save(family), &[], None)
}

fn restore(tools: &Tools, family: Family, script: &str) -> Result<String, CommandError> {
    command::run(
        tools.restore(family),
        &["--noflush", "-w", XTABLES_WAIT_SECS],
        Some(script),
    )
}

fn ip(tools: &Tools, args: &[String]) -> Result<String, CommandError> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command::run(&tools.ip, &args, None)
}

fn ensure_route(tools: &Tools, route: &ReturnRoute) -> Result<(), CommandError> {
    let present = route.count_rules(&ip(tools, &route.list_rules_args())?);
    if present == 0 {
        ip(tools, &route.rule_args("add"))?;
    }
    for _ in 1..present {
        ip(tools, &route.rule_args("del"))?;
    }
    ip(tools, &route.route_args("replace"))?;
    Ok(())
}

fn delete_route(tools: &Tools, route: &ReturnRoute) -> Result<(), CommandError> {
    let present = route.count_rules(&ip(tools, &route.list_rules_args())?);
    for _ in 0..present {
        ip(tools, &route.rule_args("del"))?;
    }
    if route.has_route(&ip(tools, &route.list_routes_args())?) {
        ip(tools, &route.route_args("del"))?;
    }
    Ok(())
}
