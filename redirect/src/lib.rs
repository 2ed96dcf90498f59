//! Traffic capture for enrolled pods: which netfilter rules and routes put a pod's TCP
//! connections onto the agent's ports, and installing them inside the pod's network namespace.
//!
//! A [`CaptureConfig`] becomes a pure, inspectable [`RuleSet`] plan; the plan renders to
//! `iptables-restore` input (one per IP family) or to one `nft` transaction, plus the
//! `ip rule`/`ip route` steps of the return path. [`apply`], [`stop_capture`] and [`remove`]
//! run those tools inside a [`Netns`], atomically per tool call and idempotently. Listening on
//! the ports, proxying and deciding which pods are enrolled belong to the agent.

mod command;
mod config;
mod install;
mod iptables;
pub mod mark;
mod netns;
mod nft;
mod plan;
pub mod ports;
pub mod probe;
mod route;
#[cfg(feature = "testing")]
pub mod testing;

pub use command::CommandError;
pub use config::{CaptureConfig, ConfigError, InboundMode};
pub use install::{Backend, InstallError, Tools, apply, remove, stop_capture};
pub use iptables::{OUTPUT_CHAIN, PREROUTING_CHAIN};
pub use netns::{Netns, NetnsError};
pub use nft::TABLE as NFT_TABLE;
pub use plan::{Action, Chain, Family, Hook, MarkMatch, Match, ReturnRoute, Rule, RuleSet, Table};
